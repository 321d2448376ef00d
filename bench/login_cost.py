"""What a login costs through the PostgreSQL front, and what reading the session's defaults
adds (one round trip: ``SELECT current_setting('search_path'), current_user, session_user``
before the bot's first ReadyForQuery, appliance/fronts/postgres/startup.py), and what the
catalog lookup adds when a rule names relations or columns (policy/catalog.py: the catalog's
change counters in the same round trip; when they changed since the answers were cached, the
views', triggers' and rules' dependencies and the functions in one more, then a round of
functions naming what was found, with the definitions of the ``--views`` views over a table in
the same round trip).

Run from the repository root:

    .venv/bin/python bench/login_cost.py [--n 300] [--repeat 3]

A real PostgreSQL 15 (appliance.sandbox, scram-sha-256 logins) and the front in this process
(allow-all services). psycopg connects, runs ``SELECT 1`` and closes, n times; the paths are
interleaved per round: direct, the front as it is, the front with the defaults query
switched off (the method replaced by a no-op for that round only), and three more fronts whose
services ask the catalog as under a mask rule naming a bare column: answers cached (the daemon's
case while the catalog does not change), uncached with nothing over a named relation, and
uncached with every view read. Median of the rounds.
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


class LookupServices(QuietServices):
    """Asks the catalog at login as the daemon does under a rule that masks a bare column (every
    view and every function mentioning ``v`` count); ``cache``: keep the answers between logins
    until the catalog's counters change, as the policy engine does."""

    every = True
    cache: dict | None = None

    def __init__(self, credential):
        super().__init__(credential)
        self.learned = 0

    def catalog_lookup(self, grant, target):
        if self.every:
            return CatalogLookup(None, ["v"], self.cache, ("bench",))
        return CatalogLookup(lambda schema, name: name == "nothing_named", ["nothing_named"], self.cache, ("bench",))

    def learn_catalog(self, grant, views, functions, effects):
        self.learned = len(views)


class UncachedLookupServices(LookupServices):
    pass


class CachedLookupServices(LookupServices):
    def __init__(self, credential):
        super().__init__(credential)
        self.cache = {}


class NothingNamedServices(LookupServices):
    """Uncached, and no view reaches a relation a rule names: the catalog questions only."""

    every = False


class Front:
    def __init__(self, pg: PostgresServer, services: type[QuietServices] = QuietServices, *,
                 recheck: float = 2.0) -> None:
        self.loop = uvloop.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        settings = PgFrontSettings(target="db", upstream_host=pg.host, upstream_port=pg.port,
                                   upstream_tls="disable", allow_plaintext=True, catalog_recheck_s=recheck)
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


def prepare(pg: PostgresServer, views: int) -> None:
    """The bench's login role, a table and ``views`` views over it (each a column ``v<i>``)."""
    pg.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
    pg.psql("CREATE TABLE bw_login_t (id int, v text); "
            + "; ".join(f"CREATE VIEW bw_login_v{i} AS SELECT id, upper(v) AS v{i} FROM bw_login_t" for i in range(views)))


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
        prepare(pg, args.views)
        front = Front(pg)
        fronts = {"front with the catalog lookup, answers cached (no catalog change since)": Front(pg, CachedLookupServices),
                  "front with the catalog lookup, uncached, nothing over a named relation": Front(pg, NothingNamedServices),
                  f"front with the catalog lookup, uncached, {args.views} views read": Front(pg, UncachedLookupServices)}
        direct = f"host={pg.host} port={pg.port} user={USER} password={PASSWORD} dbname=postgres sslmode=disable"
        through = f"host=127.0.0.1 port={front.port} user=bot password=x dbname=postgres sslmode=disable"
        for _ in range(args.repeat):
            results.setdefault("direct", []).append(per_login_us(direct, args.n))
            StartupMixin._decide_session_defaults = real
            results.setdefault("front", []).append(per_login_us(through, args.n))
            StartupMixin._decide_session_defaults = _no_defaults
            results.setdefault("front without the defaults query", []).append(per_login_us(through, args.n))
            StartupMixin._decide_session_defaults = real
            for name, other in fronts.items():
                dsn = f"host=127.0.0.1 port={other.port} user=bot password=x dbname=postgres sslmode=disable"
                results.setdefault(name, []).append(per_login_us(dsn, args.n))
    finally:
        StartupMixin._decide_session_defaults = real
        pg.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    d, f, nf = med["direct"], med["front"], med["front without the defaults query"]
    for name, other in fronts.items():
        expected = 0 if isinstance(other.services, NothingNamedServices) else args.views
        assert other.services.learned == expected, (name, other.services.learned)
    lines = [f"Login cost: µs per connect + SELECT 1 + close, median of {args.repeat} interleaved rounds of "
             f"{args.n} (`bench/login_cost.py`, {time.strftime('%Y-%m-%d')}, 2 vCPU)", "",
             "| path | µs per login | / direct |", "|---|---:|---:|",
             f"| direct | {d:.0f} | 1.00 |",
             f"| front without the defaults query | {nf:.0f} | {nf / d:.2f} |",
             f"| front (reads search_path and role at login) | {f:.0f} | {f / d:.2f} |"]
    lines += [f"| {name} | {med[name]:.0f} | {med[name] / d:.2f} |" for name in fronts]
    lines += ["", f"The defaults query adds {f - nf:+.0f} µs per login ({f / nf:.2f}× the front without it); "
              "the catalog lookup " + ", ".join(f"{med[name] - f:+.0f} µs ({name.split(', ', 1)[1]})" for name in fronts)
              + ". Rounds: " + "; ".join(f"{k}: " + ", ".join(f"{v:.0f}" for v in vs) for k, vs in results.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
