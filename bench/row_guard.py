"""What the affected-rows guard costs (issue 15.2): one EXPLAIN round trip on the bot's session
before each guarded UPDATE/DELETE/MERGE, nothing for other statements.

Run from the repository root:

    .venv/bin/python bench/row_guard.py [--n 2000] [--repeat 3]

A real PostgreSQL 15 (appliance.sandbox) and the PostgreSQL front in this process, deciding with
the policy engine: once with a policy whose approval rule does not concern DELETE, once with
the rule on DELETE with ``max_rows = 1000`` (never exceeded here: the statement runs). A psycopg client runs the same point DELETE (a primary-key lookup that finds
no row, so the table never changes) in the simple protocol (client-side binding) and the
extended protocol (bound parameter), and a SELECT as the control; per statement latency,
median of the rounds. Direct to PostgreSQL as the floor. Prints a Markdown table and writes
bench/results/row_guard.md.
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

from appliance.config import parse_config  # noqa: E402
from appliance.fronts.postgres import PgFrontSettings, PostgresFront  # noqa: E402
from appliance.fronts.services import Credential, DefaultServices  # noqa: E402
from appliance.policy import PolicyEngine  # noqa: E402
from appliance.sandbox import PostgresServer  # noqa: E402

USER, PASSWORD = "bw_guard", "bw-guard-pw"
POLICY = """
[[targets]]
name = "db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"
default_action = "allow"
[[identities]]
name = "bot"
targets = ["db"]
[identities.process]
uid = 0
[[rules]]
name = "deletes"
action = "approve"
[rules.sql]
{limit}
"""


class EngineServices(DefaultServices):
    def __init__(self, engine: PolicyEngine):
        super().__init__(Credential(USER, PASSWORD), identity="bot")
        self.engine = engine

    def decide_sql(self, grant, target, sql, phase, *, probe=False):
        return self.engine.decide_sql("bot", (), "db", sql)

    def audit(self, kind, record):
        pass


def engine(limit: str) -> PolicyEngine:
    cfg = parse_config(POLICY.replace("{limit}", limit))
    return PolicyEngine(cfg.policy, cfg.targets, cfg.identities)


class Front:
    def __init__(self, pg: PostgresServer, services) -> None:
        self.loop = uvloop.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        settings = PgFrontSettings(target="db", upstream_host=pg.host, upstream_port=pg.port,
                                   upstream_tls="disable", allow_plaintext=True)
        self.front = PostgresFront(settings, services)
        server = asyncio.run_coroutine_threadsafe(self.front.serve("127.0.0.1", 0), self.loop).result(30)
        self.port = server.sockets[0].getsockname()[1]


def per_statement_us(dsn: str, sql: str, simple: bool, n: int) -> float:
    cursor = psycopg.ClientCursor if simple else psycopg.Cursor
    with psycopg.connect(dsn, autocommit=True, cursor_factory=cursor) as conn:
        cur = conn.cursor()
        for i in range(50):  # warm-up (policy caches, plans)
            cur.execute(sql, (-i,))
        t0 = time.perf_counter()
        for i in range(n):
            cur.execute(sql, (-i,))
        return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "row_guard.md"))
    args = ap.parse_args()
    pg = PostgresServer().start()
    try:
        pg.psql(f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text); "
                "INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 100000) i; ANALYZE t")
        plain, guarded = Front(pg, EngineServices(engine('kinds = ["TRUNCATE"]'))), \
            Front(pg, EngineServices(engine('kinds = ["DELETE"]\nmax_rows = 1000')))
        dsns = {"direct": f"host={pg.host} port={pg.port} user={USER} password={PASSWORD} dbname=postgres sslmode=disable",
                "front, no max_rows": f"host=127.0.0.1 port={plain.port} user=bot password=x dbname=postgres sslmode=disable",
                "front, max_rows = 1000": f"host=127.0.0.1 port={guarded.port} user=bot password=x dbname=postgres "
                                          "sslmode=disable"}
        cases = [("DELETE, simple protocol", "DELETE FROM t WHERE id = %s", True),
                 ("DELETE, extended protocol", "DELETE FROM t WHERE id = %s", False),
                 ("SELECT, extended protocol (control)", "SELECT v FROM t WHERE id = %s", False)]
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeat):
            for label, sql, simple in cases:
                for path, dsn in dsns.items():
                    results.setdefault((label, path), []).append(per_statement_us(dsn, sql, simple, args.n))
    finally:
        pg.stop()
    lines = [f"Affected-rows guard cost: µs per statement, median of {args.repeat} rounds of {args.n} "
             f"(`bench/row_guard.py`, {time.strftime('%Y-%m-%d')}, 2 vCPU)", "",
             "| statement | direct | front, no max_rows | front, max_rows = 1000 | guard adds | guarded / unguarded |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, _, _ in cases:
        d, p, g = (statistics.median(results[(label, path)]) for path in dsns)
        lines.append(f"| {label} | {d:.0f} | {p:.0f} | {g:.0f} | {g - p:+.0f} | {g / p:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
