"""The audit stream for SIEMs: every committed audit row, once, in chain order, as one JSON line.

It runs in the audit process, beside the store (``appliance.auditproc`` starts and stops it).
A thread tails the committed chain: it reads the rows whose ``chain_seq`` is above the last
one it sent, in chain order, turns each into an event close to OCSF 1.1 (:func:`ocsf_event`;
docs/audit-schema.md, "Audit stream") and writes it to a file it rotates by size and/or sends
it to syslog as RFC 5424 with ``[meta sequenceId="<chain_seq>"]``.

Why tail the store rather than hook the writer: only committed rows are read, so a receiver
never hears of an event the store could still lose; and the writer never waits for a
receiver — a slow or absent one makes the stream lag, never the audit. Every chained row is
sent (writer rows and recordings included, a recording without its bytes), so sequence
numbers are consecutive and a receiver that sees one skipped knows it lost something.

The position of each destination (the last ``chain_seq`` sent to it) is kept in ``<store>.stream``:
a restart, a crash or a receiver that was down for a while skips nothing; after a crash the
last page may be sent again (receivers deduplicate on the sequence number). A stream enabled
on an existing store starts from its first row.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from analytics import schema

log = logging.getLogger(__name__)

OCSF_VERSION = "1.1.0"
PAGE_ROWS = 2000          # rows read and sent per round
POLL_S = 0.1              # how often the committed head is looked at when idle
RETRY_MAX_S = 30.0        # a failing destination is tried again after 1, 2, 4 ... up to this
# Longer syslog messages are shortened (syslog only; the file keeps them whole): rsyslog's default
# maxMessageSize (8k) kept 8,096 bytes of a datagram here; [audit.stream] syslog_max_bytes raises it.
SYSLOG_MAX_BYTES = 8000

_CATEGORIES = {3: "Identity & Access Management", 4: "Network Activity", 6: "Application Activity"}
_CLASSES = {3002: ("Authentication", 3), 4001: ("Network Activity", 4), 6002: ("Application Lifecycle", 6),
            6003: ("API Activity", 6)}
_SEVERITY = {1: "Informational", 2: "Low", 3: "Medium", 4: "High"}
_SYSLOG_SEVERITY = {1: 6, 2: 5, 3: 4, 4: 3}   # OCSF severity_id -> syslog severity (info, notice, warning, err)
# Decision -> OCSF disposition_id (1 Allowed, 2 Blocked, 7 Custom Action, 8 Approved).
_DISPOSITION = {"allow": (1, "Allowed"), "block": (2, "Blocked"), "deny": (2, "Blocked"),
                "mask": (7, "Custom Action"), "approve": (8, "Approved")}


def _millis(value: Any) -> int | None:
    return int(value.timestamp() * 1000) if isinstance(value, dt.datetime) else None


def _plain(value: Any) -> Any:
    """A column value as JSON: timestamps in ISO 8601, bytes in hex, maps as objects."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict) and set(value) == {"key", "value"} and isinstance(value["key"], list):
        return dict(zip(value["key"], value["value"]))
    return value


def _drop_none(doc: dict) -> dict:
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if not v:
                continue
        if v is not None:
            out[k] = v
    return out


def ocsf_event(table: str, row: dict[str, Any], *, host: str, product_version: str) -> dict[str, Any]:
    """One committed row of ``table`` as an event close to OCSF 1.1: the class, activity,
    status and the actor/endpoint objects a SIEM indexes, ``metadata.sequence`` = the row's
    ``chain_seq``, and every column of the row under ``unmapped`` (as stored: already redacted)."""
    seq = row["chain_seq"]
    unmapped = {k: _plain(v) for k, v in row.items() if k not in schema.CHAIN_COLUMNS}
    if table == "recordings":  # the session's bytes stay in the store; the stream says how many
        data = unmapped.pop("data", None)
        unmapped["data_bytes"] = None if data is None else len(data) // 2
    severity = 1
    status = None                 # (status_id, status) where the class has one
    extra: dict[str, Any] = {}
    actor_process = {"pid": row.get("pid"), "name": row.get("comm"),
                     "file": {"path": row.get("exe")}, "user": {"uid": _str(row.get("uid"))}}
    if table in ("session_starts", "session_ends"):
        cls = 3002
        if table == "session_starts":
            activity = (1, "Logon")
            status = (1, "Success") if row.get("identity") else (2, "Failure")
            extra = {"user": {"name": row.get("identity"), "uid": row.get("token_subject")},
                     "actor": {"process": actor_process},
                     "dst_endpoint": _endpoint(row.get("target_addr"), row.get("target")),
                     "src_endpoint": _endpoint(row.get("client_addr")),
                     "auth_protocol": row.get("protocol"), "is_remote": False}
        else:
            activity = (2, "Logoff")
            ok = row.get("outcome") in ("ok", None)
            status = (1, "Success") if ok else (2, "Failure")
            severity = 1 if ok else 2
            extra = {"status_detail": row.get("error"),
                     "traffic": {"bytes_in": row.get("bytes_in"), "bytes_out": row.get("bytes_out")}}
    elif table in ("requests", "request_starts", "approvals"):
        cls = 6003
        if table == "approvals":
            activity = (99, f"approval {row.get('event')}")
            extra = {"actor": {"user": {"name": row.get("operator"), "uid": _str(row.get("operator_uid"))}},
                     "api": {"operation": f"approval.{row.get('event')}", "request": {"uid": row.get("request_id")}},
                     "user": {"name": row.get("identity")}}
            severity = 2 if row.get("event") in ("denied", "expired", "decision_refused") else 1
        else:
            # The protocol's request kind (a PostgreSQL "query", "execute", ...): the statement's own
            # kind is in the policy's hands, not in the row, so the activity is "Other" (99).
            activity = (99, row.get("kind") or "request")
            decision = row.get("decision")
            disposition = _DISPOSITION.get(decision or "", (0, "Unknown"))
            if table == "requests":
                status = (2, "Failure") if row.get("error") or decision in ("block", "deny") else (1, "Success")
            severity = 3 if decision in ("block", "deny") else 1
            extra = {"api": {"operation": row.get("kind"), "request": {"uid": row.get("request_id")},
                             "service": {"name": row.get("protocol")}},
                     "disposition_id": disposition[0], "disposition": disposition[1],
                     "status_code": row.get("sqlstate"), "status_detail": row.get("error")}
    elif table == "probes":
        cls = 4001
        activity = {"denied_connect": (5, "Refuse"), "admission_refused": (5, "Refuse"),
                    "redirected": (1, "Open")}.get(row.get("event"), (99, str(row.get("event"))))
        severity = 3 if row.get("event") in ("denied_connect", "left_cgroup") else 1
        extra = {"actor": {"process": actor_process},
                 "dst_endpoint": {"ip": row.get("dst_addr"), "port": row.get("dst_port")},
                 "connection_info": {"protocol_ver": row.get("family")}}
    else:  # writer_events, audit_losses, recordings: the appliance's own lifecycle
        cls = 6002
        event = row.get("event")
        activity = {"writer_start": (3, "Start"), "writer_stop": (4, "Stop")}.get(event, (99, event or table))
        if table == "audit_losses":
            severity = 4
    class_name, category = _CLASSES[cls]
    doc = {
        "class_uid": cls, "class_name": class_name, "category_uid": category, "category_name": _CATEGORIES[category],
        "activity_id": activity[0], "activity_name": activity[1], "type_uid": cls * 100 + activity[0],
        "time": _millis(row.get("ts")), "severity_id": severity, "severity": _SEVERITY[severity],
        "status_id": status[0] if status else None, "status": status[1] if status else None,
        "session": {"uid": row.get("session_id")},
        "device": {"hostname": host},
        "metadata": {"version": OCSF_VERSION, "log_name": table, "sequence": seq,
                     "uid": f"{host}:{seq}", "correlation_uid": row.get("session_id"),
                     "product": {"name": "botwarden", "vendor_name": "botwarden", "version": product_version},
},
        **extra,
        "chain_hash": _plain(row.get("chain_hash")),
        "unmapped": unmapped,
    }
    return _drop_none(doc)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _endpoint(address: str | None, name: str | None = None) -> dict[str, Any]:
    if not address:
        return {"name": name}
    host, _, port = address.rpartition(":")
    return {"ip": host.strip("[]") or address, "port": int(port) if port.isdigit() else None, "name": name}


# ------------------------------------------------------------------ destinations


class _FileSink:
    """Appends lines to ``path`` (mode 0600); beyond ``max_bytes`` it moves the file to
    ``path.1`` (and ``.1`` to ``.2`` ..., keeping ``backups``) and starts a new one."""

    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._f = self._open()

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "ab")

    def send(self, lines: list[bytes], events: list[dict]) -> None:
        for line in lines:
            if self._f.tell() and self._f.tell() + len(line) > self.max_bytes:
                self._rotate()
            self._f.write(line)
        self._f.flush()

    def _rotate(self) -> None:
        self._f.close()
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._f = self._open()

    def close(self) -> None:
        self._f.close()


class _SyslogSink:
    """RFC 5424 messages to a Unix datagram socket (like /dev/log), UDP, or TCP with octet
    counting (RFC 6587). The structured data is ``[meta sequenceId="N"]`` (RFC 5424 7.3.1;
    it wraps after 2147483647, the JSON's ``metadata.sequence`` does not)."""

    def __init__(self, address: str, facility: int, host: str, max_bytes: int = SYSLOG_MAX_BYTES):
        self.scheme, _, rest = address.partition(":")
        if self.scheme == "unix":
            self.addr: Any = rest
        else:
            host_part, _, port = rest.rpartition(":")
            self.addr = (host_part.strip("[]"), int(port))
        self.facility, self.host, self.max_bytes = facility, host[:255] or "-", max_bytes
        self.pid = str(os.getpid())
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            if self.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            else:
                family = socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_DGRAM if self.scheme == "udp" else socket.SOCK_STREAM)
            try:
                sock.settimeout(5)
                sock.connect(self.addr)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def message(self, event: dict) -> bytes:
        pri = self.facility * 8 + _SYSLOG_SEVERITY[event.get("severity_id", 1)]
        ts = dt.datetime.fromtimestamp(event.get("time", 0) / 1000, dt.timezone.utc).isoformat(timespec="milliseconds")
        seq = (event["metadata"]["sequence"] - 1) % 2147483647 + 1
        head = (f"<{pri}>1 {ts.replace('+00:00', 'Z')} {self.host} botwarden {self.pid} "
                f"{event['metadata']['log_name']} [meta sequenceId=\"{seq}\"] ").encode()
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
        if len(head) + len(body) > self.max_bytes:
            body = _shortened(event, self.max_bytes - len(head))
        return head + body

    def send(self, lines: list[bytes], events: list[dict]) -> None:
        sock = self._connect()
        try:
            for event in events:
                msg = self.message(event)
                sock.sendall(b"%d %s" % (len(msg), msg) if self.scheme == "tcp" else msg)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _shortened(event: dict, room: int) -> bytes:
    """The event with its longest ``unmapped`` strings cut until it fits ``room`` bytes (syslog
    receivers truncate long messages, which would break the JSON); ``truncated`` says so."""
    doc = json.loads(json.dumps(event))
    doc["truncated"] = True
    unmapped = doc.get("unmapped", {})
    while True:
        body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        over = len(body) - room
        if over <= 0:
            return body
        key = max((k for k, v in unmapped.items() if isinstance(v, (str, list)) and v), default=None,
                  key=lambda k: len(json.dumps(unmapped[k])))
        if key is None:
            return body  # nothing left to cut; the receiver truncates
        value = unmapped[key]
        text = value if isinstance(value, str) else json.dumps(value)
        unmapped[key] = text[: max(0, len(text) - over - 40)] + "…[cut]"
        if unmapped[key] == "…[cut]":
            unmapped[key] = None


# ------------------------------------------------------------------ the tail


class AuditStream:
    """Tails ``store`` (an open :class:`analytics.AuditStore`) and sends each committed row to
    each destination. Each destination has its own position: one that is down (a receiver gone)
    is retried with back-off and catches up later, without holding up the other or re-sending
    to it."""

    def __init__(self, store: Any, settings: dict[str, Any]):
        self.store = store
        self.host = socket.gethostname()
        try:
            from importlib.metadata import version

            self.product_version = version("botwarden")
        except Exception:  # noqa: BLE001 - running from a source tree
            self.product_version = "unknown"
        self.sinks: dict[str, Any] = {}
        if settings.get("file"):
            self.sinks["file"] = _FileSink(settings["file"], settings["file_max_bytes"], settings["file_backups"])
        if settings.get("syslog"):
            from appliance.config import SYSLOG_FACILITIES

            self.sinks["syslog"] = _SyslogSink(settings["syslog"], SYSLOG_FACILITIES[settings["syslog_facility"]],
                                               self.host, settings.get("syslog_max_bytes", SYSLOG_MAX_BYTES))
        self.position_file = Path(f"{store.path}.stream")
        self.sent = self._load_positions()
        self._failing: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="audit-stream", daemon=True)

    def _load_positions(self) -> dict[str, int]:
        start = dict.fromkeys(self.sinks, 0)
        try:
            saved = json.loads(self.position_file.read_text())
            positions = {name: int(saved.get(name, 0)) for name in self.sinks}
        except FileNotFoundError:
            return start
        except (ValueError, TypeError, AttributeError, OSError) as e:
            log.error("audit stream: position file %s is unreadable (%s); starting from the first row",
                      self.position_file, e)
            return start
        head = self.store.stats()["head_seq"] or 0
        if max(positions.values(), default=0) > head:  # a new store under the same name: all its rows are new
            log.warning("audit stream: position %s is beyond the store's head %d (a new store?); "
                        "starting from its first row", positions, head)
            return start
        return positions

    def _save_positions(self) -> None:
        tmp = self.position_file.with_name(self.position_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.sent))
        os.replace(tmp, self.position_file)

    def start(self) -> "AuditStream":
        self._thread.start()
        log.info("audit stream started: %s", ", ".join(f"{name} after chain seq {pos}" for name, pos in self.sent.items()))
        return self

    def _read(self, after: int, upto: int) -> list[tuple[str, dict]]:
        rows: list[tuple[int, str, dict]] = []
        cur = self.store.cursor()
        try:
            for table in schema.CHAINED_TABLES:
                res = cur.execute(f"SELECT * FROM {table} WHERE chain_seq > ? AND chain_seq <= ? "
                                  "ORDER BY chain_seq", [after, upto])
                names = [d[0] for d in res.description]
                rows += [(r[0], table, dict(zip(names, r))) for r in res.fetchall()]
        finally:
            cur.close()
        rows.sort(key=lambda r: r[0])
        return [(table, row) for _, table, row in rows]

    def _send_next(self, name: str, head: int) -> None:
        """Send ``name`` the next page of committed rows after its position."""
        after = self.sent[name]
        upto = min(head, after + PAGE_ROWS)
        page = self._read(after, upto)
        if page and page[0][1]["chain_seq"] != after + 1:
            log.warning("audit stream: rows %d..%d are no longer in the store (retention) and were not sent to %s",
                        after + 1, page[0][1]["chain_seq"] - 1, name)
        events = [ocsf_event(t, r, host=self.host, product_version=self.product_version) for t, r in page]
        lines = [json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for e in events]
        self.sinks[name].send(lines, events)
        self.sent[name] = upto
        self._save_positions()

    def _run(self) -> None:
        import time

        while not self._stop.is_set():
            head = self.store.stats()["head_seq"] or 0
            busy = False
            for name in self.sinks:
                if self.sent[name] >= head or time.monotonic() < self._retry_at.get(name, 0):
                    continue
                try:
                    self._send_next(name, head)
                except Exception as e:  # noqa: BLE001 - a receiver or disk problem: retry, never stop the audit
                    why = f"{type(e).__name__}: {e}"
                    if self._failing.get(name) != why:
                        log.error("audit stream: cannot send events after chain seq %d to %s (%s); retrying",
                                  self.sent[name], name, why)
                        self._failing[name] = why
                    backoff = self._backoff[name] = min(self._backoff.get(name, 0.5) * 2, RETRY_MAX_S)
                    self._retry_at[name] = time.monotonic() + backoff
                    continue
                busy = True
                if self._failing.pop(name, None) is not None:
                    log.warning("audit stream: sending to %s again (at chain seq %d)", name, self.sent[name])
                    self._backoff.pop(name, None)
            if not busy:
                with self._idle:
                    self._idle.notify_all()
                self._stop.wait(POLL_S)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is committed (for up to ``timeout``), then stop; the rest goes at the next start."""
        target = self.store.stats()["head_seq"] or 0
        with self._idle:
            self._idle.wait_for(lambda: min(self.sent.values()) >= target or not self._thread.is_alive(), timeout)
        self._stop.set()
        self._thread.join(timeout)
        for sink in self.sinks.values():
            sink.close()
        behind = {name: pos for name, pos in self.sent.items() if pos < target}
        if behind:
            log.warning("audit stream: stopped behind the head (%d): %s; the rest is sent at the next start",
                        target, behind)


def start_stream(store: Any, settings: dict[str, Any] | None) -> AuditStream | None:
    """The audit process's one call: a running stream for ``[audit.stream]``, or None."""
    if not settings:
        return None
    return AuditStream(store, settings).start()


__all__ = ["AuditStream", "ocsf_event", "start_stream", "OCSF_VERSION"]
