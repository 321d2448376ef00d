"""What a login costs through the PostgreSQL front, and what reading the session's defaults
adds (one round trip: ``SELECT current_setting('search_path'), current_user, session_user``
before the bot's first ReadyForQuery, appliance/fronts/postgres/startup.py), and what the view
lookup adds when a rule names relations or columns (policy/catalog.py: the dependencies query in
the same round trip, then one more for the definitions of ``--views`` views over a table).

Run from the repository root:

    .venv/bin/python bench/login_cost.py [--n 300] [--repeat 3]

A real PostgreSQL 15 (appliance.sandbox, scram-sha-256 logins) and the front in this process
(allow-all services). psycopg connects, runs ``SELECT 1`` and closes, n times; the three paths
are interleaved per round: direct, the front as it is, the front with the defaults query
switched off (the method replaced by a no-op for that round only), and a second front whose
services ask for every view (as under a mask rule naming a bare column). Median of the rounds.
Prints a Markdown table and writes bench/results/login_cost.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import uvloop  # noqa: E402

from appliance.fronts.postgres import PgFrontSettings, PostgresFront  # noqa: E402
from appliance.fronts.postgres.startup import StartupMixin  # noqa: E402
from appliance.fronts.services import Credential, DefaultServices  # noqa: E402
from appliance.policy.catalog import CatalogLookup  # noqa: E402
from appliance.sandbox import PostgresServer  # noqa: E402

USER, PASSWORD = "bw_login", "bw-login-pw"


class QuietServices(DefaultServices):
    def audit(self, kind, record):
        pass


class ViewServices(QuietServices):
    """Asks for every view at login (a mask rule naming a bare column); keeps what it learns."""

    learned = 0

    def catalog_lookup(self, grant, target):
        return CatalogLookup(None, ["v"])

    def learn_catalog(self, grant, views, functions):
        self.learned = len(views)


class NoViewServices(ViewServices):
    """Asks which views reach a relation named ``nothing_named``: the dependencies only."""

    def catalog_lookup(self, grant, target):
        return CatalogLookup(lambda schema, name: name == "nothing_named", ["nothing_named"])


class Front:
    def __init__(self, pg: PostgresServer, services: type[QuietServices] = QuietServices) -> None:
        self.loop = uvloop.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        settings = PgFrontSettings(target="db", upstream_host=pg.host, upstream_port=pg.port,
                                   upstream_tls="disable", allow_plaintext=True)
        self.services = services(Credential(USER, PASSWORD))
        self.front = PostgresFront(settings, self.services)
        server = asyncio.run_coroutine_threadsafe(self.front.serve("127.0.0.1", 0), self.loop).result(30)
        self.port = server.sockets[0].getsockname()[1]


def per_login_us(dsn: str, n: int) -> float:
    for _ in range(10):  # warm-up
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT 1")
    t0 = time.perf_counter()
    for _ in range(n):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT 1")
    return (time.perf_counter() - t0) / n * 1e6


async def _no_defaults(self) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--views", type=int, default=20, help="views over one table in the database")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "login_cost.md"))
    args = ap.parse_args()
    pg = PostgresServer().start()
    real = StartupMixin._decide_session_defaults
    results: dict[str, list[float]] = {}
    try:
        pg.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        pg.psql("CREATE TABLE bw_login_t (id int, v text); "
                + "; ".join(f"CREATE VIEW bw_login_v{i} AS SELECT id, upper(v) AS v{i} FROM bw_login_t"
                            for i in range(args.views)))
        front = Front(pg)
        viewing = Front(pg, ViewServices)
        asking = Front(pg, NoViewServices)
        direct = f"host={pg.host} port={pg.port} user={USER} password={PASSWORD} dbname=postgres sslmode=disable"
        through = f"host=127.0.0.1 port={front.port} user=bot password=x dbname=postgres sslmode=disable"
        looking = f"host=127.0.0.1 port={viewing.port} user=bot password=x dbname=postgres sslmode=disable"
        deps_only = f"host=127.0.0.1 port={asking.port} user=bot password=x dbname=postgres sslmode=disable"
        for _ in range(args.repeat):
            results.setdefault("direct", []).append(per_login_us(direct, args.n))
            StartupMixin._decide_session_defaults = real
            results.setdefault("front", []).append(per_login_us(through, args.n))
            StartupMixin._decide_session_defaults = _no_defaults
            results.setdefault("front without the defaults query", []).append(per_login_us(through, args.n))
            StartupMixin._decide_session_defaults = real
            results.setdefault("front with the view lookup, no view over a named relation", []).append(
                per_login_us(deps_only, args.n))
            results.setdefault("front with the view lookup", []).append(per_login_us(looking, args.n))
    finally:
        StartupMixin._decide_session_defaults = real
        pg.stop()
    d, f, nf, fd, fv = (statistics.median(results[k]) for k in (
        "direct", "front", "front without the defaults query",
        "front with the view lookup, no view over a named relation", "front with the view lookup"))
    assert viewing.services.learned == args.views, viewing.services.learned
    lines = [f"Login cost: µs per connect + SELECT 1 + close, median of {args.repeat} interleaved rounds of "
             f"{args.n} (`bench/login_cost.py`, {time.strftime('%Y-%m-%d')}, 2 vCPU)", "",
             "| path | µs per login | / direct |", "|---|---:|---:|",
             f"| direct | {d:.0f} | 1.00 |",
             f"| front without the defaults query | {nf:.0f} | {nf / d:.2f} |",
             f"| front (reads search_path and role at login) | {f:.0f} | {f / d:.2f} |",
             f"| front with the view lookup, no view over a named relation (the dependencies only) | {fd:.0f} | {fd / d:.2f} |",
             f"| front with the view lookup ({args.views} views, every one read) | {fv:.0f} | {fv / d:.2f} |", "",
             f"The defaults query adds {f - nf:+.0f} µs per login ({f / nf:.2f}× the front without it); "
             f"the view lookup {fd - f:+.0f} µs more when no view reaches a relation a rule names, "
             f"{fv - f:+.0f} µs when {args.views} do. "
             f"Rounds: " + "; ".join(f"{k}: " + ", ".join(f"{v:.0f}" for v in vs) for k, vs in results.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
