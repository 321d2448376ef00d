"""What the catalog check of a long session costs (appliance/fronts/postgres/recheck.py): once
``catalog_recheck_s`` has passed, the next statement sent while idle waits while the front
reads the catalog's change counters on the session (one round trip), and the catalog again
when they moved (the engine's cached answers first).

Run from the repository root:

    .venv/bin/python bench/recheck_cost.py [--n 2000] [--repeat 3] [--views 20]

A real PostgreSQL 15 (appliance.sandbox) and three fronts in this process, whose services ask
the catalog as under a mask rule naming a bare column (every view and every function mentioning
``v`` count; ``--views`` views over one table). One psycopg session per front runs ``SELECT 1``
n times (each parsed: a Parse is what the check waits on; psycopg would otherwise prepare it after five), with the check off (``catalog_recheck_s = 0``), with a check before every statement
and the counters unchanged (a probe: the answers cached), and with a check before every
statement and no cache (the whole catalog read again each time, as after every catalog change:
on a warm backend). Interleaved rounds; medians. The difference over "off" is what one check
costs the statement it delays; at the default of 2 s a session pays it at most once per 2 s.
Prints a Markdown table and writes bench/results/recheck_cost.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.login_cost import CachedLookupServices, Front, UncachedLookupServices, prepare  # noqa: E402
from appliance.sandbox import PostgresServer  # noqa: E402

EVERY_STATEMENT = 1e-9  # seconds: due before every statement


def per_statement_us(conn: psycopg.Connection, n: int) -> float:
    for _ in range(50):
        conn.execute("SELECT 1", prepare=False)
    t0 = time.perf_counter()
    for _ in range(n):
        conn.execute("SELECT 1", prepare=False)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--views", type=int, default=20, help="views over one table in the database")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recheck_cost.md"))
    args = ap.parse_args()
    pg = PostgresServer().start()
    results: dict[str, list[float]] = {}
    try:
        prepare(pg, args.views)
        paths = {"check off (catalog_recheck_s = 0)": Front(pg, CachedLookupServices, recheck=0),
                 "a check before every statement, counters unchanged (cached answers)":
                     Front(pg, CachedLookupServices, recheck=EVERY_STATEMENT),
                 f"a check before every statement, the catalog read again ({args.views} views)":
                     Front(pg, UncachedLookupServices, recheck=EVERY_STATEMENT)}
        conns = {name: psycopg.connect(f"host=127.0.0.1 port={front.port} user=bot password=x dbname=postgres "
                                       "sslmode=disable", autocommit=True) for name, front in paths.items()}
        for _ in range(args.repeat):
            for name, conn in conns.items():
                results.setdefault(name, []).append(per_statement_us(conn, args.n))
        for name, front in paths.items():
            assert front.services.learned == args.views, (name, front.services.learned)
        for conn in conns.values():
            conn.close()
    finally:
        pg.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    off = med["check off (catalog_recheck_s = 0)"]
    lines = [f"Catalog check of a long session: µs per `SELECT 1` on one session through the front, median of "
             f"{args.repeat} interleaved rounds of {args.n} (`bench/recheck_cost.py`, {time.strftime('%Y-%m-%d')}, "
             "2 vCPU)", "", "| path | µs per statement | a check costs |", "|---|---:|---:|"]
    lines += [f"| {name} | {v:.0f} | {v - off:+.0f} µs |" for name, v in med.items()]
    lines += ["", "Rounds: " + "; ".join(f"{k}: " + ", ".join(f"{v:.0f}" for v in vs) for k, vs in results.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
