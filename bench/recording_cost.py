"""What recording PostgreSQL sessions costs the audit process, per pgbench transaction, without pgbench.

    .venv/bin/python bench/recording_cost.py [--txns 60000] [--sessions 8] [--repeat 5] [--json FILE]

pgbench's throughput on this shared 2-CPU machine moves by ±10-30 % between two runs of the same
daemon (`bench/pgbench_compare.py --paths full,full-aa`, the A/A spread), more than recording can
cost. This measures the cost itself: a real audit process (appliance.auditproc.AuditProcess,
journal on, as in strict mode) is fed what the daemon sends it for `pgbench -S` under full
inspection — per transaction a `request_start` and a `requests` row with pgbench's statement,
per session a `session_start`, and, when recorded, each session's "in" and "out" chunk every
`--per-chunk` transactions with the very bytes pgbench and the server exchange (simple: Query /
RowDescription, DataRow, CommandComplete, ReadyForQuery; prepared: Bind, Execute, Sync /
BindComplete, DataRow, ...). Both variants run `--repeat` times, interleaved; the numbers are the
audit process's CPU time (utime + stime from /proc) and this process's (validation, pickling,
the sender thread), per transaction: median and range.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.auditproc import AuditProcess  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
UTC = dt.timezone.utc


def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


def _data_row(v: int) -> bytes:
    s = str(v).encode()
    return _msg(b"D", struct.pack("!hi", 1, len(s)) + s)


_ROW_DESCRIPTION = _msg(b"T", struct.pack("!h", 1) + b"abalance\x00" + struct.pack("!ihihih", 16396, 3, 23, 4, -1, 0))
_COMPLETE = _msg(b"C", b"SELECT 1\x00")
_READY = _msg(b"Z", b"I")


def _sql(aid: int) -> str:
    return f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"


def exchange(mode: str, aid: int, balance: int) -> tuple[bytes, bytes]:
    """What the bot sends and receives for one `pgbench -S` transaction."""
    if mode == "simple":
        return _msg(b"Q", _sql(aid).encode() + b"\x00"), _ROW_DESCRIPTION + _data_row(balance) + _COMPLETE + _READY
    v = str(aid).encode()
    bind = _msg(b"B", b"\x00P0_1\x00" + struct.pack("!hhi", 0, 1, len(v)) + v + struct.pack("!h", 0))
    return (bind + _msg(b"E", b"\x00" + struct.pack("!i", 0)) + _msg(b"S", b""),
            _msg(b"2", b"") + _data_row(balance) + _COMPLETE + _READY)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@contextlib.contextmanager
def acks_read(audit: AuditProcess):
    """What the daemon's event loop does (``AuditProcess.attach``): read the acknowledgement the
    audit process sends for each frame it journals. Unread, they pile up in the events socket, and
    once it is full the child blocks sending the next and stops taking events."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="acks", daemon=True)
    thread.start()

    async def attach() -> None:
        audit.attach(loop)

    async def detach() -> None:  # off the loop's selector before close() closes the socket
        audit._watch(None)

    asyncio.run_coroutine_threadsafe(attach(), loop).result(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(detach(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def run(mode: str, recorded: bool, args, workdir: Path) -> dict:
    rnd = random.Random(7)
    path = workdir / f"{mode}-{'rec' if recorded else 'meta'}-{uuid.uuid4().hex[:6]}.duckdb"
    sessions = [uuid.uuid4().hex for _ in range(args.sessions)]
    with AuditProcess(path, journal=True, on_full="block", queue_max=200_000) as audit, acks_read(audit):
        now = dt.datetime.now(UTC)
        for sid in sessions:
            audit.submit("session_start", {"session_id": sid, "ts": now, "target": "bench", "protocol": "postgresql",
                                           "identity": "bench-bot", "credential_user": "bw_bench", "pid": 1,
                                           "attribution_source": "ebpf"})
        audit.flush(30)
        child = audit.pid
        child_before, own_before, wall = cpu_ticks(child), time.process_time(), time.monotonic()
        seq = dict.fromkeys(sessions, 0)
        bufs = {sid: [bytearray(), bytearray()] for sid in sessions}
        chunk_seq = dict.fromkeys(sessions, 0)
        for i in range(args.txns):
            sid = sessions[i % len(sessions)]
            seq[sid] += 1
            aid = rnd.randint(1, 1_000_000)
            rid = uuid.uuid4().hex
            ts = dt.datetime.now(UTC)
            common = {"request_id": rid, "session_id": sid, "ts": ts, "protocol": "postgresql", "kind": "SELECT",
                      "text": _sql(aid), "decision": "allow", "seq": seq[sid]}
            audit.submit("request_start", common)
            audit.submit("request", {**common, "duration_ms": 0.4, "rows": 1})
            if recorded:
                sent, got = exchange(mode, aid, rnd.randint(-5000, 5000))
                bufs[sid][0] += sent
                bufs[sid][1] += got
                if seq[sid] % args.per_chunk == 0:
                    for direction, buf in zip(("in", "out"), bufs[sid]):
                        chunk_seq[sid] += 1
                        audit.submit("recording", {"session_id": sid, "seq": chunk_seq[sid], "ts": ts,
                                                   "direction": direction, "data": bytes(buf)})
                        buf.clear()
        audit.flush(120)
        child_us = (cpu_ticks(child) - child_before) / CLK_TCK * 1e6 / args.txns
        own_us = (time.process_time() - own_before) * 1e6 / args.txns
        wall_s = time.monotonic() - wall
    return {"mode": mode, "recorded": recorded, "audit_process_us": child_us, "submitter_us": own_us,
            "seconds": wall_s, "load_1min": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--txns", type=int, default=60_000)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--per-chunk", type=int, default=600,
                    help="transactions per chunk and session (pgbench -S at ~5,000 TPS over 8 sessions, 1 s chunks)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--modes", default="simple,prepared")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="bw-reccost-") as tmp:
        for _ in range(args.repeat):
            for mode in args.modes.split(","):
                for recorded in (True, False):
                    r = run(mode, recorded, args, Path(tmp))
                    print(f"{mode} {'recorded' if recorded else 'metadata'}: audit process {r['audit_process_us']:.1f} "
                          f"µs/txn, submitter {r['submitter_us']:.1f} (load {r['load_1min']:.1f})", file=sys.stderr)
                    results.append(r)
    lines = [f"# Audit process CPU per pgbench -S transaction, {args.txns:,} transactions over {args.sessions} "
             f"sessions, chunks every {args.per_chunk} transactions per session, {args.repeat} rounds "
             f"(load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after)", "",
             "| mode | audit process µs/txn recorded | metadata | recording costs (median of per-round differences) "
             "| submitter µs/txn recorded vs metadata |", "|---|---|---|---|---|"]
    summary = {}
    for mode in args.modes.split(","):
        rec = [r for r in results if r["mode"] == mode and r["recorded"]]
        meta = [r for r in results if r["mode"] == mode and not r["recorded"]]
        diffs = sorted(a["audit_process_us"] - b["audit_process_us"] for a, b in zip(rec, meta))

        def med(rs, key):
            return statistics.median(r[key] for r in rs)

        summary[mode] = {"recorded": med(rec, "audit_process_us"), "metadata": med(meta, "audit_process_us"),
                         "differences": diffs}
        lines.append(f"| {mode} | {med(rec, 'audit_process_us'):.1f} | {med(meta, 'audit_process_us'):.1f} | "
                     f"{statistics.median(diffs):+.1f} ({', '.join(f'{d:+.1f}' for d in diffs)}) | "
                     f"{med(rec, 'submitter_us'):.1f} vs {med(meta, 'submitter_us'):.1f} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_before": load_before,
                                               "load_after": os.getloadavg(), "runs": results,
                                               "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
