"""What the audit trail costs per request row, stage by stage (issue 20): the daemon's share
(validating the front's record, pickling it for the audit process), then the audit process's.

    /work/main/.venv/bin/python bench/audit_rows.py [--rows 200000] [--mode prepared|simple] [--json FILE]

Rows like the ones `pgbench -S -M prepared` leaves through full inspection (an Execute of
``SELECT abalance ... WHERE aid = $1`` with one bound value), one session; with ``--mode
simple`` the ones `pgbench -S -M simple` leaves (a Query whose text holds the value, so every
text differs). Each stage is timed alone, in this one process, on the same rows:

- in the daemon: ``RecordValidator`` turning the front's record (a dict) into a row (compiled,
  analytics/_schema.pyx, unless ``BOTWARDEN_PURE_PYTHON=1``), and the sender thread's
  ``pickle.dumps`` of 200-row frames;
- receiving: ``pickle.loads`` of a 200-row frame (what the daemon sends the audit process);
- redaction of the bound value (``AuditRedactor.params``) and of the text (cached per text);
- the row hash: the compiled ``analytics/_chain.pyx`` and the Python reference (what ``audit
  verify`` recomputes);
- the Arrow record batch of a 2,000-row batch, and its insert and commit into a DuckDB file with
  ``SET threads`` 1 (``audit.threads``, the default) and DuckDB's default (a thread per CPU),
  as wall time and as this process's CPU time.

Prints a Markdown table (µs per row) and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import pickle
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb  # noqa: E402

from analytics import AuditStore, chain, schema  # noqa: E402
from analytics.chain import GENESIS  # noqa: E402
from analytics.writer import ChainWriter, _arrow_batch  # noqa: E402
from appliance.daemon import tune_gc  # noqa: E402
from appliance.policy.redact import AuditRedactor  # noqa: E402

BATCH = 2000


def make_records(n: int, mode: str = "prepared") -> list[dict]:
    """The request records as the PostgreSQL front builds them (every field it sets)."""
    now = dt.datetime.now(dt.timezone.utc)
    session = uuid.uuid4().hex
    text = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    if mode == "simple":
        return [{"request_id": uuid.uuid4().hex, "session_id": session, "ts": now, "protocol": "postgresql",
                 "kind": "query", "text": f"SELECT abalance FROM pgbench_accounts WHERE aid = {i * 7919 % 100_000 + 1};",
                 "params": None, "decision": "allow", "rule": None, "reason": "allowed by default",
                 "duration_ms": 0.31, "rows": 1, "error": None, "sqlstate": None, "masked": None,
                 "row_estimate": None, "row_limit": None, "seq": i + 1}
                for i in range(n)]
    return [{"request_id": uuid.uuid4().hex, "session_id": session, "ts": now, "protocol": "postgresql",
             "kind": "execute", "text": text, "params": [str(i * 7919 % 1_000_000 + 1)], "decision": "allow",
             "rule": None, "reason": "allowed by default", "duration_ms": 0.31, "rows": 1, "error": None,
             "sqlstate": None, "masked": None, "row_estimate": None, "row_limit": None, "seq": i + 1}
            for i in range(n)]


def per_row(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n * 1e6


def commit_cost(items: list, threads: int | None, directory: Path) -> tuple[float, float]:
    """(wall µs, CPU µs) per row to insert and commit ``items`` in 2,000-row batches, as the store
    does (its checkpoint threshold included)."""
    path = directory / f"commit-{threads}.duckdb"
    with AuditStore(path):
        pass  # created and migrated
    con = duckdb.connect(str(path))
    try:
        con.execute("SET checkpoint_threshold = '256MB'")
        if threads is not None:
            con.execute(f"SET threads = {threads}")
        writer = ChainWriter(con)
        batches = [writer.prepare(items[i:i + BATCH]) for i in range(0, len(items), BATCH)]
        cpu0, t0 = os.times(), time.perf_counter()
        for b in batches:
            writer.commit(b)
        wall, cpu1 = time.perf_counter() - t0, os.times()
    finally:
        con.close()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return wall / len(items) * 1e6, cpu / len(items) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--mode", choices=["prepared", "simple"], default="prepared",
                    help="rows as pgbench -S -M prepared leaves them, or -M simple (every text differs)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    tune_gc()
    req = schema.KINDS["request"]
    records = make_records(args.rows, args.mode)
    rows = [schema.normalize(req, r)[0] for r in records]
    n = len(rows)
    frame = pickle.dumps([("request", r) for r in rows[:200]], protocol=pickle.HIGHEST_PROTOCOL)
    red = AuditRedactor()
    reference = chain.reference_row_hasher(req.names, req.bytes_columns, req.hash_prefix)
    compiled = req.hash_row

    def hash_all(h):
        def run():
            prev = GENESIS
            for r in rows:
                prev = h(prev, r)
        return run

    full = [(i, GENESIS, GENESIS) + r for i, r in enumerate(rows)]
    validate = schema.RecordValidator()
    out = {
        "daemon: validate the record into a row (RecordValidator)": per_row(
            lambda: [validate("request", r) for r in records], n),
        "daemon: pickle into 200-row frames (sender thread)": per_row(
            lambda: [pickle.dumps([("request", r) for r in rows[i:i + 200]], protocol=pickle.HIGHEST_PROTOCOL)
                     for i in range(0, n - 199, 200)], n // 200 * 200),
    }
    del records   # 200,000 live dicts more would make every later stage's garbage collections slower
    gc.collect()
    out |= {
        "receive (pickle.loads, 200-row frames)": per_row(lambda: [pickle.loads(frame) for _ in range(n // 200)],
                                                          n // 200 * 200),
        "redact the bound value": per_row(lambda: [red.params(r[6], masked_statement=False) for r in rows], n),
        "redact the text" + (" (cached)" if args.mode == "prepared" else " (each text new)"): per_row(
            lambda: [red.text(r[5]) for r in rows], n),
        "row hash, compiled" + ("" if chain.COMPILED else " (NOT BUILT: the reference ran)"): per_row(hash_all(compiled), n),
        "row hash, Python reference": per_row(hash_all(reference), n),
        "Arrow record batch (2,000-row batches)": per_row(lambda: [_arrow_batch(req, full[i:i + BATCH])
                                                            for i in range(0, n, BATCH)], n),
    }
    items = [(req, r) for r in rows]
    with tempfile.TemporaryDirectory(prefix="bw-audit-rows-") as d:
        for threads, label in ((1, "1 thread (audit.threads default)"), (None, f"DuckDB default ({os.cpu_count()} threads)")):
            wall, cpu = commit_cost(items, threads, Path(d))
            out[f"insert + commit, {label}, wall"] = wall
            out[f"insert + commit, {label}, CPU"] = cpu
    print(f"# The audit trail, per request row: the daemon's two stages, then the audit process's ({n:,} rows "
          f"as `pgbench -S -M {args.mode}` leaves them; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"compiled hash {'built' if chain.COMPILED else 'not built'}, "
          f"compiled validator {'built' if schema.COMPILED else 'not built'})\n")
    print("| stage | µs per row |\n|---|---:|")
    for k, v in out.items():
        print(f"| {k} | {v:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": n, "mode": args.mode, "cpus": os.cpu_count(), "compiled": chain.COMPILED, "compiled_validator": schema.COMPILED,
                                               "load": os.getloadavg(), "us_per_row": out}, indent=2))


if __name__ == "__main__":
    main()
