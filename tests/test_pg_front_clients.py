"""Real clients, unchanged, through the inspector against a real PostgreSQL 15: results equal direct."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest

from tests.pg_front_fixtures import (APP_PASSWORD, APP_USER, BOT_TOKEN, FrontThread, default_services,
                                     plain_settings, setup_roles)

PSQL = "/usr/lib/postgresql/15/bin/psql"
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"


@pytest.fixture(scope="module")
def front(pg_server):
    setup_roles(pg_server)
    ft = FrontThread(plain_settings(pg_server), default_services())
    yield ft
    ft.stop()


class Endpoint:
    def __init__(self, host, port, user, password):
        self.host, self.port, self.user, self.password = host, port, user, password

    def dsn(self, db="postgres", **extra) -> str:
        return " ".join([f"host={self.host} port={self.port} dbname={db} user={self.user} "
                         f"password={self.password} sslmode=disable"] + [f"{k}={v}" for k, v in extra.items()])

    def env(self) -> dict:
        return {**os.environ, "PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
                "PGPASSWORD": self.password, "PGSSLMODE": "disable", "PGDATABASE": "postgres"}


@pytest.fixture(scope="module")
def endpoints(pg_server, front):
    direct = Endpoint(pg_server.host, pg_server.port, APP_USER, APP_PASSWORD)
    proxied = Endpoint("127.0.0.1", front.port, "bot", BOT_TOKEN)
    return {"direct": direct, "botwarden": proxied}


def _psql_run(ep: Endpoint, tmp_path, tag: str) -> tuple[str, str]:
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("".join(f"{i},row {i}\n" for i in range(1, 201)))
    out = tmp_path / f"out-{tag}.csv"
    script = tmp_path / f"script-{tag}.sql"
    script.write_text(f"""
CREATE TEMP TABLE t (a int, b text); INSERT INTO t VALUES (1000, 'x'), (1001, 'y'); SELECT * FROM t ORDER BY a;
\\copy t from '{csv_in}' csv
\\copy (SELECT * FROM t ORDER BY a) to '{out}' csv
SELECT count(*), sum(a) FROM t;
SELECT 1 AS one; SELECT 1 AS one; SELECT 1 AS one;
SELECT * FROM nonexistent_table;
SELECT 'still usable' AS status;
""")
    res = subprocess.run([PSQL, "-X", "-f", str(script)], capture_output=True, text=True, env=ep.env(), timeout=60)
    multi = subprocess.run([PSQL, "-X", "-c", "SELECT 1 AS a; SELECT 2 AS b; SELECT current_user = current_user"],
                           capture_output=True, text=True, env=ep.env(), timeout=60)
    stderr = re.sub(r"script-\w+\.sql", "script.sql", res.stderr)
    return res.stdout + multi.stdout + stderr, out.read_text()


def test_psql_results_equal_direct(endpoints, tmp_path):
    direct = _psql_run(endpoints["direct"], tmp_path, "direct")
    proxied = _psql_run(endpoints["botwarden"], tmp_path, "proxied")
    assert "COPY 200" in direct[0] and 'relation "nonexistent_table" does not exist' in direct[0]
    assert proxied == direct


def _psql_watch(ep: Endpoint) -> tuple[int, list[str], str]:
    """psql's own \\watch (psql 15 repeats until interrupted): a query re-run every 0.2 s on
    one session, stopped with SIGINT like a person at the keyboard; then the script goes on."""
    proc = subprocess.Popen([PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ep.env())
    proc.stdin.write("SELECT 'tick', count(*) FROM people WHERE id <= 3 \\watch 0.2\n"
                     "SELECT 'after watch';\n")
    proc.stdin.flush()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line]  # -t: no "Every 0.2s" headers
    return proc.returncode, lines, err


def test_psql_watch_repeats_equal_direct(endpoints):
    results = {name: _psql_watch(ep) for name, ep in endpoints.items()}
    for name, (code, lines, err) in results.items():
        assert code == 0, (name, err)
        ticks = [line for line in lines if line.startswith("tick|")]
        assert len(ticks) >= 3 and set(ticks) == {"tick|3"}, (name, lines)
        assert lines[-1] == "after watch", (name, lines)  # the session stayed usable after the interrupt


def _psycopg_scenario(dsn: str) -> dict:
    out: dict = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor()
        out["prepared"] = [cur.execute("SELECT id, name, salary FROM people WHERE id = %s", (i,),
                                       prepare=True).fetchall() for i in range(1, 8)]
        out["binary"] = conn.cursor(binary=True).execute(
            "SELECT id, email, salary, note, now() > '2000-01-01'::timestamptz FROM people ORDER BY id").fetchall()
        with conn.pipeline():
            curs = [conn.cursor() for _ in range(5)]
            for i, c in enumerate(curs):
                c.execute("SELECT %s::int * 2, %s::text", (i, f"p{i}"))
        out["pipeline"] = [c.fetchall() for c in curs]
        cur.execute("CREATE TEMP TABLE c (a int, b text)")
        with cur.copy("COPY c FROM STDIN") as cp:
            for i in range(500):
                cp.write_row((i, f"v{i}"))
        with cur.copy("COPY (SELECT * FROM c ORDER BY a) TO STDOUT") as cp:
            out["copy_out"] = b"".join(bytes(b) for b in cp)
        out["large"] = cur.execute("SELECT length(repeat('x', 3000000)), md5(repeat('ab', 2000000))").fetchone()
        out["big_row"] = len(cur.execute("SELECT repeat('y', 2500000)").fetchone()[0])
        out["error"] = None
        try:
            cur.execute("SELECT 1/0")
        except psycopg.errors.DivisionByZero as e:
            out["error"] = (e.sqlstate, str(e).splitlines()[0])
        out["after_error"] = cur.execute("SELECT 'ok'").fetchone()
        out["params"] = (conn.info.parameter_status("server_encoding"),
                         conn.info.parameter_status("standard_conforming_strings"))
        out["pid_matches"] = cur.execute("SELECT pg_backend_pid()").fetchone()[0] == conn.info.backend_pid
        # ParameterStatus as the server sends it, NoticeResponse relayed
        cur.execute("SET application_name = 'changed-mid-session'")
        out["param_after_set"] = conn.info.parameter_status("application_name")
        notices: list = []
        conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
        cur.execute("DO $$ BEGIN RAISE NOTICE 'notice from the server'; END $$")
        out["notices"] = notices

        # LISTEN/NOTIFY: the notification names the notifier's real backend pid.
        with psycopg.connect(dsn, autocommit=True) as other:
            conn.execute("LISTEN bw_chan")
            other.execute("NOTIFY bw_chan, 'hello'")
            note = next(conn.notifies(timeout=10, stop_after=1))
            out["notify"] = (note.channel, note.payload, note.pid == other.info.backend_pid)

        # Cancel: a CancelRequest on a new connection to the listener stops the running query.
        # (cancel_safe: the blocking cancel() holds the GIL, and the front runs in this process.)
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        try:
            cur.execute("SELECT pg_sleep(20)")
            out["cancel"] = "not cancelled"
        except psycopg.errors.QueryCanceled as e:
            out["cancel"] = e.sqlstate
        out["after_cancel"] = cur.execute("SELECT 2").fetchone()
    return out


def test_psycopg_results_equal_direct(endpoints):
    direct = _psycopg_scenario(endpoints["direct"].dsn())
    proxied = _psycopg_scenario(endpoints["botwarden"].dsn())
    assert direct["cancel"] == "57014" and direct["notify"] == ("bw_chan", "hello", True)
    assert direct["pid_matches"] and len(direct["copy_out"]) > 3000
    assert proxied == direct


async def _asyncpg_scenario(ep: Endpoint) -> dict:
    out: dict = {}
    conn = await asyncpg.connect(host=ep.host, port=ep.port, user=ep.user, password=ep.password,
                                 database="postgres", ssl=False)
    try:
        out["cached"] = [await conn.fetchrow("SELECT id, name, email FROM people WHERE id = $1", i)
                         for i in (1, 2, 3, 1, 2, 3)]
        stmt = await conn.prepare("SELECT id, salary, note FROM people WHERE id <= $1 ORDER BY id")
        out["prepared"] = [list(await stmt.fetch(n)) for n in (2, 4)]
        out["many"] = await conn.executemany("SELECT $1::int", [(i,) for i in range(20)])
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE a (x int)")
            await conn.copy_records_to_table("a", records=[(i,) for i in range(100)])
            out["copied"] = await conn.fetchval("SELECT sum(x) FROM a")
        try:
            await conn.fetch("SELECT pg_sleep(20)", timeout=0.5)
            out["timeout"] = "no timeout"
        except asyncio.TimeoutError:
            out["timeout"] = "timeout"
        out["after_timeout"] = await conn.fetchval("SELECT 'usable'")
        out["idle"] = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'")
    finally:
        await conn.close()
    return out


def test_asyncpg_results_equal_direct(endpoints):
    direct = asyncio.run(_asyncpg_scenario(endpoints["direct"]))
    proxied = asyncio.run(_asyncpg_scenario(endpoints["botwarden"]))
    assert direct["timeout"] == "timeout" and direct["copied"] == sum(range(100)) and direct["idle"] == 0
    assert proxied == direct


@pytest.fixture(scope="module")
def bench_db(pg_server):
    pg_server.psql("DROP DATABASE IF EXISTS bench")
    pg_server.psql("CREATE DATABASE bench")
    env = {**os.environ, "PGPASSWORD": APP_PASSWORD}
    subprocess.run([PGBENCH, "-i", "-q", "-s", "1", "-h", pg_server.host, "-p", str(pg_server.port), "-U", APP_USER,
                    "bench"], check=True, capture_output=True, env=env)
    return "bench"


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_modes(endpoints, bench_db, mode):
    results = {}
    for name, ep in endpoints.items():
        res = subprocess.run([PGBENCH, "-n", "-c", "2", "-j", "1", "-t", "60", "-M", mode, "-d", bench_db],
                             capture_output=True, text=True, env=ep.env(), timeout=120)
        assert res.returncode == 0, res.stderr
        results[name] = re.search(r"number of transactions actually processed: (\S+)", res.stdout).group(1)
    assert results["botwarden"] == results["direct"] == "120/120"
