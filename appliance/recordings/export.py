"""A recorded session in formats other tools read: asciicast v2, pcap, JSON lines.

Every export is built from the stored recording, which the audit process already redacted
(appliance/recordings/pgstream.py): an export holds nothing the audit store does not.

* asciicast v2 (``asciinema play``): a PostgreSQL session as the terminal rendering of its psql
  view (render.pg_lines); an SSH session as its terminal stream, with the recorded size and
  resizes; anything else as its request log.
* pcap (scapy): a PostgreSQL session as one TCP connection to port 5432 (handshake, sequence and
  acknowledgement numbers, the recorded timestamps, FIN at the end), so Wireshark/tshark decode
  it as pgsql. The startup is rebuilt from the ``pg_startup`` event (StartupMessage,
  AuthenticationOk, the server's parameters, ReadyForQuery): no password message was recorded.
* JSON lines: the session, then one event per line (statements with their results, decisions
  and approvals; terminal output; events; requests).
"""

from __future__ import annotations

import base64
import ipaddress
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from appliance.protocols.postgres import messages as m

from .load import SessionRecord
from .pgstream import exchanges
from .render import pg_lines, request_log_lines, terminal_chunks

PG_PORT = 5432
_MSS = 1448


def _epoch(ts: Any) -> float | None:
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        return ts.timestamp()
    return None


def _first_ts(rec: SessionRecord) -> float:
    for v in [rec.session.get("started_at")] + [r["ts"] for r in rec.recordings]:
        t = _epoch(v)
        if t is not None:
            return t
    return 0.0


# ------------------------------------------------------------------ asciicast v2

def cast_events(rec: SessionRecord) -> tuple[dict[str, Any], list[list[Any]]]:
    """(asciicast v2 header, events [time, code, data])."""
    start = _first_ts(rec)
    events: list[list[Any]] = []
    t = 0.0

    def at(ts: Any) -> float:
        nonlocal t
        e = _epoch(ts)
        if e is not None:
            t = max(t, round(e - start, 6))
        return t

    if rec.protocol == "ssh" and any(r["direction"] == "out" for r in rec.recordings):
        # A shell: the SSH front's own asciicast reading of its rows (one way to do it).
        from appliance.fronts.ssh_cast import asciicast

        lines = asciicast(rec.recordings).splitlines()
        header = json.loads(lines[0])
        header.setdefault("title", f"botwarden session {rec.session.get('session_id')} (ssh)")
        return header, [json.loads(line) for line in lines[1:]]
    lines = pg_lines(rec) if rec.protocol == "postgresql" else request_log_lines(rec)
    timed = [(ts, line + "\r\n") for ts, line in lines]
    if rec.protocol == "k8s":
        # exec/attach output, as the bot's terminal showed it, after the request log's line
        # for its request (the request's row is written when the connection ends).
        out = [(ts, chunk.decode("utf-8", "replace").replace("\n", "\r\n")) for ts, chunk in terminal_chunks(rec)]
        timed = _merged(timed, out)
    for ts, text in timed:
        events.append([at(ts), "o", text])
    s = rec.session
    header = {"version": 2, "width": 120, "height": 40, "timestamp": int(start),
              "title": f"botwarden session {s.get('session_id')} ({s.get('protocol')}, {s.get('identity')} → "
                       f"{s.get('target')})",
              "env": {"TERM": "xterm-256color", "SHELL": "/bin/sh"}}
    return header, events


def _merged(log: list[tuple[Any, str]], out: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """The request log and terminal output in time order (untimed log lines stay with the line
    before them)."""
    keyed = []
    last = None
    for i, (ts, text) in enumerate(log):
        last = _epoch(ts) if ts is not None else last
        keyed.append(((last or 0.0), 0, i, ts, text))
    keyed += [((_epoch(ts) or 0.0), 1, i, ts, text) for i, (ts, text) in enumerate(out)]
    return [(ts, text) for *_, ts, text in sorted(keyed, key=lambda k: k[:3])]


def write_cast(rec: SessionRecord, path: str | Path) -> int:
    header, events = cast_events(rec)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for e in events:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return len(events)


# ------------------------------------------------------------------ pcap

def _addr(text: Any, default_ip: str, default_port: int) -> tuple[str, int]:
    """An IPv4 (host, port) from "host:port" (IPv6 and Unix addresses: the defaults)."""
    if isinstance(text, str) and text.count(":") == 1:
        host, _, port = text.partition(":")
        try:
            ipaddress.IPv4Address(host)
            return host, int(port)
        except ValueError:
            pass
    return default_ip, default_port


def _startup_bytes(startup: dict[str, Any]) -> tuple[bytes, bytes]:
    """(client's StartupMessage, server's AuthenticationOk .. ReadyForQuery) from the event."""
    params = tuple((str(k), str(v)) for k, v in (startup.get("parameters") or {}).items())
    client = m.StartupMessage(params).encode()
    server = m.AuthenticationOk().encode()
    for k, v in (startup.get("server_parameters") or {}).items():
        server += m.ParameterStatus(str(k), str(v)).encode()
    server += m.BackendKeyData(int(startup.get("backend_pid") or 0), 0).encode()
    server += m.ReadyForQuery("I").encode()
    return client, server


def pcap_packets(rec: SessionRecord) -> list[Any]:
    """The PostgreSQL session as scapy packets of one TCP connection to port 5432."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    s = rec.session
    cip, cport = _addr(s.get("client_addr"), "10.0.0.1", 40000)
    sip, _ = _addr(s.get("target_addr"), "10.0.0.2", PG_PORT)
    if cport == PG_PORT:
        cport = 40000
    seq = {"c": 1000, "s": 5000}
    packets: list[Any] = []
    t0 = _first_ts(rec)
    clock = [t0]

    def packet(side: str, flags: str, payload: bytes = b"", ts: float | None = None) -> None:
        if ts is not None and ts > clock[0]:
            clock[0] = ts
        else:
            clock[0] += 0.000001
        other = "s" if side == "c" else "c"
        src, dst = ((cip, cport), (sip, PG_PORT)) if side == "c" else ((sip, PG_PORT), (cip, cport))
        p = (Ether(src="02:00:00:00:00:01" if side == "c" else "02:00:00:00:00:02",
                   dst="02:00:00:00:00:02" if side == "c" else "02:00:00:00:00:01")
             / IP(src=src[0], dst=dst[0])
             / TCP(sport=src[1], dport=dst[1], flags=flags, seq=seq[side],
                   ack=seq[other] if "A" in flags else 0, window=65535))
        if payload:
            p = p / payload
        p.time = clock[0]
        packets.append(p)
        seq[side] += len(payload) + (1 if ("S" in flags or "F" in flags) else 0)

    def send(side: str, data: bytes, ts: float | None) -> None:
        for i in range(0, len(data), _MSS):
            packet(side, "PA", data[i:i + _MSS], ts)
            ts = None
        packet("s" if side == "c" else "c", "A")

    packet("c", "S", ts=t0)
    packet("s", "SA")
    packet("c", "A")
    ses = exchanges(rec.recordings)
    if ses.startup:
        client, server = _startup_bytes(ses.startup)
        send("c", client, None)
        send("s", server, None)
    for r in rec.recordings:
        if r["direction"] in ("in", "out") and r["data"]:
            send("c" if r["direction"] == "in" else "s", r["data"], _epoch(r["ts"]))
    end = _epoch(s.get("ended_at"))
    packet("c", "FA", ts=end)
    packet("s", "FA")
    packet("c", "A")
    return packets


def write_pcap(rec: SessionRecord, path: str | Path) -> int:
    from scapy.utils import wrpcap

    packets = pcap_packets(rec)
    wrpcap(str(path), packets)
    return len(packets)


# ------------------------------------------------------------------ JSON lines

def _iso(v: Any) -> Any:
    return v.isoformat() if isinstance(v, datetime) else v


def _err_doc(e: m.ErrorResponse | m.NoticeResponse) -> dict[str, Any]:
    return {"severity": e.severity, "sqlstate": e.sqlstate, "message": e.message, "detail": e.get("D"),
            "hint": e.get("H")}


def jsonl_events(rec: SessionRecord) -> Iterator[dict[str, Any]]:
    yield {"type": "session", **{k: _iso(v) for k, v in rec.session.items()}}
    approvals_by_request: dict[str, list[dict[str, Any]]] = {}
    for a in rec.approvals:
        approvals_by_request.setdefault(a.get("request_id") or "", []).append({k: _iso(v) for k, v in a.items()})
    if rec.protocol == "postgresql":
        ses = exchanges(rec.recordings)
        if ses.startup:
            yield {**ses.startup}   # "type": "pg_startup"
        by_text: dict[str, list[dict[str, Any]]] = {}
        for req in rec.requests:
            by_text.setdefault(req.get("text") or "", []).append(req)
        for ex in ses.exchanges:
            req = by_text.get(ex.text, [None]).pop(0) if by_text.get(ex.text) else None
            doc: dict[str, Any] = {"type": "statement", "ts": _iso((req or {}).get("ts") or ex.sent_at),
                                   "protocol": ex.kind, "text": ex.text, "params": ex.params or None,
                                   "answers": [], "status": ex.status}
            for kind, value in ex.items:
                if kind == "result":
                    doc["answers"].append({"result": {"columns": [c[0] for c in value.columns or []] or None,
                                                      "rows": [list(r) for r in value.rows], "tag": value.tag,
                                                      "rows_not_recorded": value.not_recorded}})
                elif kind in ("error", "notice"):
                    doc["answers"].append({kind: _err_doc(value)})
            if req is not None:
                doc.update(request_id=req.get("request_id"), decision=req.get("decision"), rule=req.get("rule"),
                           reason=req.get("reason"), duration_ms=req.get("duration_ms"), rows=req.get("rows"),
                           approvals=approvals_by_request.get(req.get("request_id") or "", []))
            yield doc
        for ts, ev in ses.events:
            yield {"type": "event", "ts": _iso(ts), **{k: v for k, v in ev.items() if k != "type"},
                   "event": ev.get("type")}
        return
    for req in rec.requests:
        yield {"type": "request", **{k: _iso(v) for k, v in req.items()},
               "approvals": approvals_by_request.get(req.get("request_id") or "", [])}
    for r in rec.recordings:
        doc = {"type": "recording", "seq": r["seq"], "ts": _iso(r["ts"]), "direction": r["direction"]}
        if r["direction"] == "event":
            try:
                doc["event"] = json.loads(r["data"].decode())
            except ValueError:
                doc["data_base64"] = base64.b64encode(r["data"]).decode()
        else:
            text = r["data"].decode("utf-8", "replace")
            doc["text"] = text
        yield doc


def write_jsonl(rec: SessionRecord, path: str | Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in jsonl_events(rec):
            f.write(json.dumps(doc, default=str, ensure_ascii=False) + "\n")
            n += 1
    return n
