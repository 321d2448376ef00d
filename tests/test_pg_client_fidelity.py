"""A broad sample of what real client libraries do, through the front and direct: equal outcomes
(issue 13). psycopg2, pg8000, asyncpg and psycopg 3 against a real PostgreSQL 15, each scenario
run twice with the same code: once straight to the server, once through botwarden's front.

What cannot be equal by design is listed in the README ("Differences from a direct
connection"); the front here runs allow-all, so only protocol fidelity is compared.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.test_pg_front_clients import endpoints, front  # noqa: F401  (module fixtures)


def _psycopg2_scenario(dsn: str) -> dict:
    import psycopg2
    import psycopg2.extensions
    out: dict = {}
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        # Server-side (named) cursor: DECLARE / FETCH FORWARD in batches.
        named = conn.cursor(name="bw_named")
        named.itersize = 7
        named.execute("SELECT id, name FROM people ORDER BY id")
        out["named_cursor"] = list(named)
        named.close()
        conn.commit()
        # Encodings: the client encoding switches mid-session; non-ASCII text both ways.
        conn.set_client_encoding("LATIN1")
        cur.execute("SELECT %s || ' Grüße', length(%s)", ("Ærø", "çà"))
        out["latin1"] = cur.fetchone()
        conn.set_client_encoding("UTF8")
        cur.execute("SELECT 'naïve ✓'")
        out["utf8"] = cur.fetchone()
        conn.commit()
        # Large objects (FunctionCall).
        lo = conn.lobject(0, "wb")
        lo.write(b"x" * 100_000)
        lo.seek(99_990)
        out["lobject"] = (lo.read(), lo.tell())
        lo.unlink()
        conn.commit()
        # Two-phase commit: the server's own answer (prepared transactions may be disabled).
        xid = conn.xid(1, "bw-gtrid", "bw-bqual")
        try:
            conn.tpc_begin(xid)
            cur.execute("SELECT 1")
            conn.tpc_prepare()
            conn.tpc_commit()
            out["tpc"] = "committed"
        except psycopg2.Error as e:
            out["tpc"] = e.pgcode
            conn.tpc_rollback() if conn.status != psycopg2.extensions.STATUS_READY else conn.rollback()
        # Notices and errors keep their fields.
        cur.execute("DO $$ BEGIN RAISE WARNING 'careful' USING DETAIL = 'd', HINT = 'h'; END $$")
        out["notices"] = [n.strip() for n in conn.notices]
        try:
            cur.execute("SELECT * FROM people WHERE nonexistent_column = 1")
        except psycopg2.Error as e:
            out["error"] = (e.pgcode, e.diag.message_primary, e.diag.statement_position)
        conn.rollback()
        cur.execute("SELECT 'usable'")
        out["after_error"] = cur.fetchone()
    finally:
        conn.close()
    return out


def test_psycopg2_results_equal_direct(endpoints):  # noqa: F811
    direct = _psycopg2_scenario(endpoints["direct"].dsn())
    proxied = _psycopg2_scenario(endpoints["botwarden"].dsn())
    assert len(direct["named_cursor"]) == 50 and direct["lobject"] == (b"x" * 10, 100_000)
    assert direct["tpc"] == "committed"
    assert direct["error"][0] == "42703"
    assert proxied == direct


def _pg8000_scenario(ep) -> dict:
    import pg8000.dbapi
    import pg8000.native
    out: dict = {}
    con = pg8000.native.Connection(ep.user, host=ep.host, port=ep.port, database="postgres", password=ep.password)
    try:
        out["typed"] = con.run("SELECT :a::int + 1, :b::text, :c::numeric, :d::bytea, :e::timestamptz > now() - "
                               "interval '1 day'", a=41, b="ü", c="1.50", d=b"\x00\xff", e="now")
        out["people"] = con.run("SELECT id, email FROM people WHERE id < :n ORDER BY id", n=5)
        con.run("SET client_encoding TO 'WIN1252'")
        out["win1252"] = con.run("SELECT 'café €'")
        con.run("SET client_encoding TO 'UTF8'")
        try:
            con.run("SELECT 1/0")
        except pg8000.native.DatabaseError as e:
            out["error"] = e.args[0]["C"]
        out["after_error"] = con.run("SELECT 'usable'")
    finally:
        con.close()
    # Very many parameters: a Bind near the protocol's unsigned 16-bit limit.
    dbc = pg8000.dbapi.connect(ep.user, host=ep.host, port=ep.port, database="postgres", password=ep.password)
    try:
        cur = dbc.cursor()
        n = 65_000
        cur.execute("SELECT count(*) FROM (VALUES (1)) v WHERE 1 IN (" + ", ".join(["%s"] * n) + ")",
                    tuple(range(n)))
        out["many_params"] = [list(r) for r in cur.fetchall()]
    finally:
        dbc.close()
    return out


def test_pg8000_results_equal_direct(endpoints):  # noqa: F811
    direct = _pg8000_scenario(endpoints["direct"])
    proxied = _pg8000_scenario(endpoints["botwarden"])
    assert direct["many_params"] == [[1]] and direct["error"] == "22012"
    assert proxied == direct


async def _asyncpg_scenario(ep) -> dict:
    out: dict = {}
    con = await asyncpg.connect(host=ep.host, port=ep.port, user=ep.user, password=ep.password,
                                database="postgres", ssl=False)
    try:
        await con.execute("CREATE TEMP TABLE pipe (id int PRIMARY KEY)")
        # Pipelined writes with an error early on: the batch fails as a whole, nothing is kept.
        try:
            await con.executemany("INSERT INTO pipe VALUES ($1)", [(1,), (2,), (1,)] + [(i,) for i in range(3, 128)])
            out["executemany"] = "no error"
        except asyncpg.UniqueViolationError as e:
            out["executemany"] = e.sqlstate
        out["rows_after"] = await con.fetchval("SELECT count(*) FROM pipe")
        # Named statements, server-side cursors, binary formats (asyncpg decodes binary).
        ps = await con.prepare("SELECT id, salary, note FROM people WHERE id <= $1 ORDER BY id", name="bw_ps")
        out["named"] = [tuple(r) for r in await ps.fetch(3)]
        out["sql_execute"] = await con.fetchval("SELECT count(*) FROM (SELECT 1) x")
        async with con.transaction():
            out["cursor"] = [tuple(r) async for r in con.cursor("SELECT id FROM people ORDER BY id", prefetch=4)]
        # COPY both ways.
        await con.copy_records_to_table("pipe", records=[(i,) for i in range(1000, 1100)])
        buf = []

        class Sink:
            async def write(self, data):
                buf.append(bytes(data))

        await con.copy_from_query("SELECT id FROM pipe ORDER BY id", output=Sink().write)
        out["copy_out"] = b"".join(buf)
        # Huge values near a sensible message size, in both directions.
        big = "z" * (16 * 1024 * 1024)
        out["huge_in"] = await con.fetchval("SELECT length($1::text)", big)
        out["huge_out"] = len(await con.fetchval("SELECT repeat('q', 16 * 1024 * 1024)"))
        # Notifications carry the notifier's real pid.
        got: list = []
        await con.add_listener("bw_async", lambda c, pid, ch, payload: got.append((ch, payload)))
        await con.execute("NOTIFY bw_async, 'ping'")
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        out["notify"] = got
    finally:
        await con.close()
    return out


def test_asyncpg_broad_results_equal_direct(endpoints):  # noqa: F811
    direct = asyncio.run(_asyncpg_scenario(endpoints["direct"]))
    proxied = asyncio.run(_asyncpg_scenario(endpoints["botwarden"]))
    assert direct["executemany"] == "23505" and direct["rows_after"] == 0 and direct["notify"] == [("bw_async", "ping")]
    assert proxied == direct


def _psycopg3_scenario(dsn: str) -> dict:
    out: dict = {}
    with psycopg.connect(dsn) as conn:
        # Pipelining with an error in the middle: psycopg reports it at the end of the pipeline.
        cur = conn.cursor()
        cur.execute("CREATE TEMP TABLE p3 (id int PRIMARY KEY)")
        try:
            with conn.pipeline():
                for i in (1, 2, 2, 3):
                    cur.execute("INSERT INTO p3 VALUES (%s)", (i,))
            out["pipeline_error"] = None
        except psycopg.errors.UniqueViolation as e:
            out["pipeline_error"] = e.sqlstate
        conn.rollback()
        # Server-side cursor with binary results.
        with conn.cursor(name="bw3", binary=True) as named:
            named.execute("SELECT id, salary FROM people ORDER BY id")
            out["named_binary"] = named.fetchmany(10) + named.fetchall()
        conn.commit()
        # Two-phase commit through psycopg 3.
        try:
            conn.tpc_begin(conn.xid(7, "bw3-g", "bw3-b"))
            conn.execute("SELECT 1")
            conn.tpc_prepare()
            conn.tpc_commit()
            out["tpc"] = "committed"
        except psycopg.Error as e:
            out["tpc"] = e.sqlstate
            conn.tpc_rollback()
        out["encoding"] = conn.execute("SELECT %s::text", ("Привет",)).fetchone()
    return out


def test_psycopg3_extras_equal_direct(endpoints):  # noqa: F811
    direct = _psycopg3_scenario(endpoints["direct"].dsn())
    proxied = _psycopg3_scenario(endpoints["botwarden"].dsn())
    assert direct["pipeline_error"] == "23505" and len(direct["named_binary"]) == 50 and direct["tpc"] == "committed"
    assert proxied == direct
