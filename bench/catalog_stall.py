"""How long an uncached catalog read at login holds the PostgreSQL front's event loop on a big
catalog, and so delays every other session of the daemon.

Run from the repository root:

    .venv/bin/python bench/catalog_stall.py [--views 500] [--functions 200] [--fks 1000] [--rounds 5]

A real PostgreSQL 15 (appliance.sandbox) with a table a mask rule names, ``--views`` views and
``--functions`` SQL functions reading its masked column, and ``--fks`` tables whose foreign keys
cascade from one parent (rows of the catalog's dependencies query); the front in this process
with the daemon's policy engine. A callback on the front's loop every millisecond records the
longest gap between two of its runs while one bot logs in and runs ``SELECT 1``:

- *cold*: the first login (the catalog read and every view and function body analysed);
- *uncached*: after a temporary table moved the catalog's counters (read again; the engine
  finds the same answers and does not analyse them again);
- *cached*: the counters unchanged (the engine's answers serve).

The process's garbage collector runs with the daemon's settings (``appliance.daemon.tune_gc``;
``--default-gc``: CPython's, under which a full collection of ~15 ms fell inside the cold login).

Prints a Markdown table (median of ``--rounds`` for the two later kinds) and writes it to
bench/results/catalog_stall.md.
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

from appliance.daemon import tune_gc  # noqa: E402
from appliance.sandbox import PostgresServer  # noqa: E402
from tests.pg_front_fixtures import (APP_PASSWORD, APP_USER, POLICY_HEAD, EngineServices, FrontThread,  # noqa: E402
                                     plain_settings, setup_roles)

POLICY = POLICY_HEAD + """
[[rules]]
name = "mask-emails"
action = "mask"
[[rules.mask]]
columns = ["bw_stall_acc.email"]
strategy = "full"
"""


def prepare(pg: PostgresServer, views: int, functions: int, fks: int) -> None:
    setup_roles(pg)  # (the front logs in as APP_USER)
    sql = ["CREATE TABLE bw_stall_acc (id int PRIMARY KEY, email text)", "CREATE TABLE bw_stall_parent (id int PRIMARY KEY)"]
    sql += [f"CREATE VIEW bw_stall_v{i} AS SELECT id, email AS e{i} FROM bw_stall_acc WHERE id > {i}" for i in range(views)]
    sql += [f"CREATE FUNCTION bw_stall_f{i}(x int) RETURNS text LANGUAGE sql AS "
            f"'SELECT email FROM bw_stall_acc WHERE id = x + {i}'" for i in range(functions)]
    sql += [f"CREATE TABLE bw_stall_c{i} (p int REFERENCES bw_stall_parent ON DELETE CASCADE)" for i in range(fks)]
    for k in range(0, len(sql), 200):
        pg.psql("; ".join(sql[k:k + 200]))


class Ticker:
    """A callback on the front's loop every millisecond; ``worst`` the longest gap while on."""

    def __init__(self, front: FrontThread) -> None:
        self.loop = front.loop
        self.last: float | None = None
        self.worst = 0.0
        self.on = False
        self.loop.call_soon_threadsafe(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.on and self.last is not None:
            self.worst = max(self.worst, now - self.last)
        self.last = now
        self.loop.call_later(0.001, self._tick)

    def measure(self, dsn: str) -> tuple[float, float]:
        """(login + SELECT 1 in ms, the longest gap in ms)."""
        self.worst, self.on = 0.0, True
        t0 = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT 1").fetchall()
        elapsed = time.perf_counter() - t0
        self.on = False
        return elapsed * 1e3, self.worst * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=500)
    ap.add_argument("--functions", type=int, default=200)
    ap.add_argument("--fks", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "catalog_stall.md"))
    ap.add_argument("--default-gc", action="store_true",
                    help="keep CPython's collector settings instead of the daemon's (appliance.daemon.tune_gc)")
    args = ap.parse_args()
    pg = PostgresServer().start()
    results: dict[str, list[tuple[float, float]]] = {"cold": [], "uncached": [], "cached": []}
    try:
        prepare(pg, args.views, args.functions, args.fks)
        front = FrontThread(plain_settings(pg, upstream_tls="disable"), EngineServices(POLICY, APP_USER, APP_PASSWORD))
        if not args.default_gc:
            tune_gc()  # as the daemon does at start (without it a full collection, ~15 ms, lands in the cold login)
        ticker = Ticker(front)
        dsn = front.dsn()
        time.sleep(1.2)  # (the server flushes its counters at most once a second)
        results["cold"].append(ticker.measure(dsn))
        for _ in range(args.rounds):
            pg.psql("CREATE TABLE bw_stall_churn (i int); DROP TABLE bw_stall_churn")
            time.sleep(1.2)
            results["uncached"].append(ticker.measure(dsn))
            results["cached"].append(ticker.measure(dsn))
        learned = next(iter(front.services.sessions.values()))
        assert len(learned.views) == args.views, len(learned.views)
        front.stop()
    finally:
        pg.stop()
    lines = [f"Event-loop stall during a login's catalog read: {args.views} views and {args.functions} functions "
             f"over a masked column, {args.fks} cascading foreign keys (`bench/catalog_stall.py`, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, 2 vCPU; median of {args.rounds} rounds, the cold login once; "
             f"{'CPython' if args.default_gc else 'the daemon'}'s garbage collector settings)", "",
             "| login | login + SELECT 1, ms | longest gap of the front's loop, ms |", "|---|---:|---:|"]
    for kind, runs in results.items():
        lines.append(f"| {kind} | {statistics.median(r[0] for r in runs):.1f} | {statistics.median(r[1] for r in runs):.1f} |")
    lines += ["", "Rounds (login ms / gap ms): " + "; ".join(
        f"{k}: " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in v) for k, v in results.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
