"""Statements are read the way the server reads them (issue 24.1, issue 13.5/13.7), end to end.

A real PostgreSQL 15 in a network namespace, the real daemon with its eBPF probes, and bots
started with `botwarden bot run`: a Python bot that sends exact bytes through libpq
(psycopg's ``pgconn.exec_``, the simple query protocol; psycopg's pipeline mode) and a raw
socket that pipelines two Query messages in one write. Each bypass found on PostgreSQL 15
(a setting that changes where string literals end, then a literal that hides a DROP or a
SET ROLE) is run against the daemon and must be refused with the table still there; the
harmless look-alikes must pass with the answer PostgreSQL gives direct.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from tests.probes_fixtures import RUN_TAG

from appliance.sandbox import PostgresServer, config_header, configure_openbao, free_port
from probes import cgroups
from tests.daemon_fixtures import DaemonProcess
from tests.test_probes_e2e import PgNet, bot_run, cli

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BOTS = f"botwarden-read-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-read-{RUN_TAG}"
BOT = "reader"

RULES = """
[[rules]]
name = "no-drops"
action = "block"
description = "Nobody drops tables through botwarden"
[rules.sql]
properties = ["drop", "truncate"]

[[rules]]
name = "no-lo-unlink"
action = "block"
[rules.sql]
functions = ["lo_unlink"]

[[rules]]
name = "no-role-switch"
action = "block"
[rules.sql]
properties = ["set_role", "set_session_authorization"]
"""

# The bot: runs each step's exact bytes and prints what the server answered.
# A bare protocol client for the bot scripts (no libpq): the startup message without TLS or
# password (the front attests the bot), then the server's messages up to the n-th ReadyForQuery.
RAW_CLIENT = r"""
import socket, struct

class Raw:
    def __init__(self, dsn):
        params = dict(p.split("=", 1) for p in dsn.split())
        self.s = socket.create_connection((params["host"], int(params["port"])), timeout=20)
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in
                        (("user", params["user"]), ("database", params["dbname"]))) + b"\0"
        self.s.sendall(struct.pack("!ii", len(body) + 8, 196608) + body)
        self.buf = b""
        self.messages(1)

    def messages(self, ready):
        seen = []
        while True:
            while len(self.buf) >= 5 and len(self.buf) >= 1 + struct.unpack("!i", self.buf[1:5])[0]:
                n = struct.unpack("!i", self.buf[1:5])[0]
                seen.append((self.buf[:1], self.buf[5:1 + n]))
                self.buf = self.buf[1 + n:]
                if seen[-1][0] == b"Z":
                    ready -= 1
                    if ready == 0:
                        return seen
                if seen[-1][0] == b"R" and struct.unpack("!i", seen[-1][1][:4])[0] != 0:
                    return seen
            chunk = self.s.recv(65536)
            if not chunk:
                return seen
            self.buf += chunk
"""

BOT_SCRIPT = RAW_CLIENT + r"""
import json, struct, sys
import psycopg
from psycopg import pq

dsn, steps = sys.argv[1], json.loads(sys.argv[2])

def result(res):
    if res.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.EMPTY_QUERY):
        return {"ok": True, "rows": [[None if res.get_value(r, c) is None else res.get_value(r, c).hex()
                                      for c in range(res.nfields)] for r in range(res.ntuples)]}
    state = res.error_field(pq.DiagnosticField.SQLSTATE)
    pos = res.error_field(pq.DiagnosticField.STATEMENT_POSITION)
    return {"ok": False, "sqlstate": state.decode() if state else None, "position": pos.decode() if pos else None,
            "message": (res.error_message or b"").decode("utf-8", "replace")}

out = []
conn = psycopg.connect(dsn, autocommit=True)
for step in steps:
    if step["op"] == "exec":
        out.append(result(conn.pgconn.exec_(bytes.fromhex(step["sql"]))))
    elif step["op"] == "pipeline":  # psycopg pipeline mode: extended protocol, one Sync at the end
        got = []
        try:
            with conn.pipeline():
                for sql in step["sqls"]:
                    conn.execute(bytes.fromhex(sql))
        except psycopg.Error as e:
            got.append({"ok": False, "sqlstate": e.sqlstate, "message": str(e)})
        out.append(got or [{"ok": True}])
    elif step["op"] == "raw_pipeline":  # two simple Query messages in one write, then read both answers
        raw = Raw(dsn)
        raw.s.sendall(b"".join(b"Q" + struct.pack("!i", len(q) + 5) + q + b"\0"
                               for q in (bytes.fromhex(x) for x in step["sqls"])))
        got = []
        for kind, body in raw.messages(len(step["sqls"])):
            if kind == b"E":
                fields = dict((f[:1].decode(), f[1:].decode("utf-8", "replace")) for f in body.split(b"\0") if f)
                got.append({"ok": False, "sqlstate": fields.get("C"), "message": fields.get("M")})
            elif kind == b"C":
                got.append({"ok": True, "tag": body.rstrip(b"\0").decode()})
        raw.s.close()
        out.append(got)
    elif step["op"] == "asyncpg_named":  # issue 13.2: a protocol-level name, then SQL EXECUTE of it
        import asyncio, asyncpg
        async def named():
            p = dict(x.split("=", 1) for x in dsn.split())
            con = await asyncpg.connect(host=p["host"], port=int(p["port"]), user=p["user"],
                                        password=p.get("password"), database=p["dbname"], ssl=False)
            try:
                ps = await con.prepare(step["sql"], name="foobar")
                first = await ps.fetchval()
                try:
                    via_sql = await con.fetchval("EXECUTE foobar")
                except asyncpg.PostgresError as e:
                    via_sql = f"{e.sqlstate}: {e}"
                return [first, via_sql]
            finally:
                await con.close()
        out.append(asyncio.run(named()))
    elif step["op"] == "psycopg_params":  # extended protocol: one statement with bound parameters
        tx = step.get("transaction", False)
        c2 = psycopg.connect(dsn, autocommit=not tx)
        try:
            cur = c2.execute(step["sql"], step["params"])
            got = {"ok": True, "rowcount": cur.rowcount}
            if tx:
                c2.commit()
        except psycopg.Error as e:
            got = {"ok": False, "sqlstate": e.sqlstate, "message": e.diag.message_primary,
                   "detail": e.diag.message_detail}
        c2.close()
        out.append(got)
    elif step["op"] == "asyncpg_executemany":  # issue 13.3: an early error stops a pipelined executemany
        import asyncio, asyncpg
        class Counting:  # the socket under asyncpg's transport, counting the Bind messages sent
            def __init__(self, sock):
                self.sock, self.binds, self.tail = sock, 0, b""
            def _count(self, data):
                buf = self.tail + bytes(data)
                pos = 0
                while len(buf) - pos >= 5:
                    n = struct.unpack("!I", buf[pos + 1:pos + 5])[0]
                    if len(buf) - pos < 1 + n:
                        break
                    self.binds += buf[pos] == ord("B")
                    pos += 1 + n
                self.tail = buf[pos:]
            def send(self, data, *flags):
                sent = self.sock.send(data, *flags)
                self._count(memoryview(data)[:sent])
                return sent
            def sendmsg(self, buffers, *rest):
                sent = self.sock.sendmsg(buffers, *rest)
                self._count(b"".join(bytes(b) for b in buffers)[:sent])
                return sent
            def __getattr__(self, name):
                return getattr(self.sock, name)
        async def many():
            p = dict(x.split("=", 1) for x in dsn.split())
            con = await asyncpg.connect(host=p["host"], port=int(p["port"]), user=p["user"],
                                        password=p.get("password"), database=p["dbname"], ssl=False)
            try:
                table = step["table"]
                await con.execute(f"CREATE TEMP TABLE {table} (id int PRIMARY KEY, pad text)")
                transport = con._transport
                counting = transport._sock = Counting(transport._sock)
                rows = [(0 if i == 1 else i, "x" * step["width"]) for i in range(step["rows"])]
                try:
                    await con.executemany(f"INSERT INTO {table} VALUES ($1, $2)", rows)
                    error = None
                except asyncpg.PostgresError as e:
                    error = e.sqlstate
                return {"error": error, "binds": counting.binds,
                        "count": await con.fetchval(f"SELECT count(*) FROM {table}")}
            finally:
                await con.close()
        out.append(asyncio.run(many()))
    elif step["op"] == "asyncpg_cancel":  # issue 13.1: a timeout's cancel must not hit the next statement
        import asyncio, asyncpg
        async def timeouts():
            p = dict(x.split("=", 1) for x in dsn.split())
            con = await asyncpg.connect(host=p["host"], port=int(p["port"]), user=p["user"],
                                        password=p.get("password"), database=p["dbname"], ssl=False)
            got = []
            try:
                for i in range(step["rounds"]):
                    try:
                        await con.fetch("select pg_sleep(10)", timeout=step.get("timeout", 0.02))
                        got.append("no timeout")
                    except asyncio.TimeoutError:
                        pass
                    try:
                        got.append(await con.fetchval("select $1::int", i))
                    except asyncpg.PostgresError as e:
                        got.append(f"{e.sqlstate}: {e}")
            finally:
                await con.close()
            return got
        out.append(asyncio.run(timeouts()))
    elif step["op"] == "psycopg2_lobject":  # issue 13.4: libpq's large-object API is FunctionCall
        import psycopg2
        c2 = psycopg2.connect(dsn)
        got = {}
        try:
            lo = c2.lobject(0, "wb")
            got["oid"] = lo.oid > 0
            got["written"] = lo.write(b"hello large object " * 100)
            lo.seek(6)
            got["read"] = lo.read(12).decode()
            lo.truncate(5)
            lo.seek(0)
            got["after_truncate"] = lo.read().decode()
            lo.close()
            c2.commit()
            try:
                c2.lobject(lo.oid).unlink()
                c2.commit()
                got["unlink"] = "ok"
            except psycopg2.Error as e:
                c2.rollback()
                got["unlink"] = e.pgcode or str(e).splitlines()[0]  # libpq's lo_* report no SQLSTATE
            cur = c2.cursor()
            cur.execute("SELECT count(*) FROM pg_largeobject_metadata WHERE oid = %s", (lo.oid,))
            got["still_there"] = cur.fetchone()[0]
        finally:
            c2.close()
        out.append(got)
    elif step["op"] == "pg8000_params":  # issue 13.6: a Bind with more than 32,767 parameters
        import pg8000.dbapi  # its DB-API "format" style: native's :name rewriting is quadratic in Python
        p = dict(x.split("=", 1) for x in dsn.split())
        con = pg8000.dbapi.connect(p["user"], host=p["host"], port=int(p["port"]), database=p["dbname"],
                                   password=p.get("password"))
        cur = con.cursor()
        n = step["n"]
        cur.execute("SELECT count(*) FROM (VALUES (1)) v WHERE 1 IN (" + ", ".join(["%s"] * n) + ")", tuple(range(n)))
        out.append(cur.fetchall())
        con.close()
print(json.dumps(out))
"""


def _hex(sql: str | bytes) -> str:
    return (sql.encode("utf-8") if isinstance(sql, str) else sql).hex()


def _steps(*sqls: str | bytes) -> list[dict]:
    return [{"op": "exec", "sql": _hex(s)} for s in sqls]


@contextlib.contextmanager
def start_world(bao_server, workdir: Path, rules: str = RULES, bots: str = BOTS, pin_dir: str = PIN_DIR):
    """PostgreSQL in a namespace, OpenBao, the daemon with eBPF probes, one bot identity and ``rules``
    (also used by tests/test_policy_bypasses_e2e.py)."""
    os.chmod(workdir, 0o755)
    net = PgNet().start()
    pg = daemon = None
    try:
        pg = PostgresServer(host=net.ip_a, prefix=net.prefix).start()
        pg.psql("CREATE ROLE acct_owner NOLOGIN")
        bao = configure_openbao(bao_server, pg, workdir, tag=f"r{uuid.uuid4().hex[:6]}",
                                grants=("GRANT pg_read_all_data TO \"{{name}}\";",
                                        "GRANT pg_write_all_data TO \"{{name}}\";",
                                        "GRANT acct_owner TO \"{{name}}\";"))
        config = workdir / "botwarden.toml"
        probes = f'mode = "ebpf"\nbots_cgroup = "{bots}"\npin_dir = "{pin_dir}"\nmap_entries = 4096'
        config.write_text(config_header(workdir, bao, probes=probes) + f"""
[[targets]]
name = "db"
protocol = "postgres"
address = "{net.ip_a}:{pg.port}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
allow_plaintext = true
[targets.credential]
source = "database"
mount = "{bao.db_mount}"
role = "{bao.db_role}"

[[identities]]
name = "reader-bot"
targets = ["db"]
[identities.process]
cgroup = "{BOT}"
{rules}
""")
        daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
        yield {"net": net, "pg": pg, "daemon": daemon, "config": config}
    finally:
        try:
            if daemon is not None:
                daemon.stop()
                cli(config, "probes", "detach")
        finally:
            cgroups.remove(bots)
            if pg is not None:
                pg.stop()
            net.stop()


@pytest.fixture(scope="module")
def world(bao_server, tmp_path_factory):
    with start_world(bao_server, tmp_path_factory.mktemp("reading-e2e")) as w:
        yield w


@pytest.fixture()
def accounts(world):
    """A fresh ``accounts`` table the bot's database user may drop (it owns it through a role)."""
    pg = world["pg"]
    pg.psql("DROP TABLE IF EXISTS accounts; CREATE TABLE accounts (id int, email text); "
            "ALTER TABLE accounts OWNER TO acct_owner; INSERT INTO accounts VALUES (1, 'a@example.com')")
    return pg


def _dsn(world, **extra) -> str:
    return " ".join([f"host={world['net'].ip_a} port={world['pg'].port} dbname=postgres user=reader-bot "
                     f"sslmode=disable connect_timeout=10"] + [f"{k}={v}" for k, v in extra.items()])


def run_bot(world, steps: list[dict], **dsn_extra) -> list:
    """Through the daemon: the bot connects to the real address; the kernel redirects it."""
    # As root, deliberately: the venv's interpreter (psycopg) lives under /root, out of nobody's reach.
    ran = bot_run(world["config"], BOT, [sys.executable, "-c", BOT_SCRIPT, _dsn(world, **dsn_extra),
                                         json.dumps(steps)], user=None, allow_privileged=True)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def run_direct(world, steps: list[dict], **dsn_extra) -> list:
    """The same bytes straight to PostgreSQL, as its superuser, from outside the bots cgroup."""
    import subprocess
    pg = world["pg"]
    dsn = (f"host={pg.host} port={pg.port} dbname=postgres user={pg.superuser} password={pg.password} "
           f"sslmode=disable " + " ".join(f"{k}={v}" for k, v in dsn_extra.items()))
    res = subprocess.run([sys.executable, "-c", BOT_SCRIPT, dsn, json.dumps(steps)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def table_exists(pg: PostgresServer, name: str = "accounts") -> bool:
    return pg.psql(f"SELECT to_regclass('public.{name}') IS NOT NULL") == "t"


def requests_of(world, *texts_like: str) -> list[dict]:
    return world["daemon"].audit_sql(
        "SELECT text, decision, rule, reason, sqlstate FROM requests WHERE "
        + " OR ".join("text LIKE ?" for _ in texts_like) + " ORDER BY chain_seq", list(texts_like))


# -- standard_conforming_strings --------------------------------------------------------------

SCS_BYPASS = "SELECT 'a\\', 'b; DROP TABLE accounts; --'"


def test_scs_off_literal_hiding_a_drop_is_refused(world, accounts):
    out = run_bot(world, _steps("SET standard_conforming_strings = off", SCS_BYPASS))
    assert out[0]["ok"]
    assert not out[1]["ok"] and out[1]["sqlstate"] == "42501" and "no-drops" in out[1]["message"], out
    assert table_exists(accounts)
    rows = requests_of(world, "%DROP TABLE accounts%")
    assert rows and rows[-1]["decision"] == "block" and rows[-1]["rule"] == "no-drops"
    # The audit keeps the statement as the server reads it: a SELECT and a DROP.
    assert "AS b; DROP TABLE accounts" in rows[-1]["text"]


def test_scs_off_literal_hiding_set_role_is_refused(world, accounts):
    out = run_bot(world, _steps("SET standard_conforming_strings = off",
                                "SELECT 'x\\', 'y; SET ROLE acct_owner; --'", "SELECT current_user"))
    assert not out[1]["ok"] and "no-role-switch" in out[1]["message"], out
    assert bytes.fromhex(out[2]["rows"][0][0]).decode().startswith("v-")  # still the session's own user


def test_scs_off_in_the_startup_packet_is_tracked(world, accounts):
    out = run_bot(world, _steps(SCS_BYPASS), options="--standard_conforming_strings=off")
    assert not out[0]["ok"] and "no-drops" in out[0]["message"], out
    assert table_exists(accounts)


def test_scs_off_statements_the_server_accepts_run_and_equal_direct(world):
    # Issue 13.7: valid for the server with standard strings off; botwarden refused it as a syntax error.
    steps = _steps("set standard_conforming_strings = off", "select 'a\\\\b\\'cd'", "select E'\\'' || 'x'")
    assert run_bot(world, steps) == run_direct(world, steps)
    assert bytes.fromhex(run_bot(world, steps)[1]["rows"][0][0]) == b"a\\b'cd"


def test_harmless_look_alikes_pass(world, accounts):
    steps = _steps("SET statement_timeout = 5000", "SET client_encoding = 'UTF8'", "SELECT E'\\''",
                   "SELECT 'a\\', 'b; DROP TABLE accounts; --'")  # standard strings: two literals
    out = run_bot(world, steps)
    assert all(r["ok"] for r in out), out
    assert out == run_direct(world, steps)
    assert table_exists(accounts)


def test_setting_changed_by_a_request_still_in_flight_is_not_guessed(world, accounts):
    """Two Query messages in one write: the server reads the second with the first's setting,
    before botwarden sees its ParameterStatus. Every reading it could get must agree."""
    out = run_bot(world, [{"op": "raw_pipeline",
                           "sqls": [_hex("SET standard_conforming_strings = off"), _hex(SCS_BYPASS)]}])
    answers = out[0]
    assert answers[0] == {"ok": True, "tag": "SET"}
    assert not answers[1]["ok"] and answers[1]["sqlstate"] == "42501", answers
    assert table_exists(accounts)
    # psycopg's pipeline mode (extended protocol, one Sync): refused the same way.
    out = run_bot(world, [{"op": "pipeline", "sqls": [_hex("SET standard_conforming_strings = off"),
                                                      _hex("SELECT 'a\\', 'b; DROP TABLE accounts; --'")]}])
    assert not out[0][0]["ok"] and out[0][0]["sqlstate"] == "42501", out
    assert table_exists(accounts)
    # A statement with nothing to read differently is not held up by the same pipeline.
    out = run_bot(world, [{"op": "raw_pipeline", "sqls": [_hex("SET standard_conforming_strings = off"),
                                                          _hex("SELECT 1")]}])
    assert out[0] == [{"ok": True, "tag": "SET"}, {"ok": True, "tag": "SELECT 1"}]


# -- client encodings -------------------------------------------------------------------------

# In SJIS 0x81 0x5C is one character (U+2015); read as UTF-8 the 0x5C is a backslash that
# escapes the quote after it, and the DROP looks like part of a literal.
SJIS_BYPASS = b"SELECT E'\x81\\' ; DROP TABLE accounts; --'"


@pytest.mark.parametrize("how", ["set", "startup"])
def test_sjis_character_swallowing_a_backslash_is_read_as_the_server_reads_it(world, accounts, how):
    if how == "set":
        out = run_bot(world, _steps("SET client_encoding = 'SJIS'", SJIS_BYPASS))[1]
    else:
        out = run_bot(world, _steps(SJIS_BYPASS), client_encoding="SJIS")[0]
    assert not out["ok"] and out["sqlstate"] == "42501" and "no-drops" in out["message"], out
    assert table_exists(accounts)


def _swallowing(encoding: str) -> str | None:
    """A CJK character whose two-byte form in ``encoding`` ends in a backslash (0x5C)."""
    from appliance.policy.reading import CODECS
    for cp in range(0x4E00, 0xA000):
        try:
            raw = chr(cp).encode(CODECS[encoding])
        except UnicodeEncodeError:
            continue
        if len(raw) == 2 and raw[1:] == b"\\":
            return chr(cp)
    return None


# Each client-only encoding whose two-byte characters may end in a backslash (UHC's never do).
SWALLOWING = {enc: _swallowing(enc) for enc in ("SJIS", "BIG5", "GBK", "GB18030", "UHC")}


@pytest.mark.parametrize("encoding", sorted(SWALLOWING))
def test_every_client_only_encoding(world, accounts, encoding):
    from appliance.policy.reading import CODECS
    char = SWALLOWING[encoding]
    codec = CODECS[encoding]
    if char is None:
        # UHC's second bytes never include 0x5C or a quote: a plain round trip of Korean text.
        steps = _steps(f"SET client_encoding = '{encoding}'", "SELECT '한국어 \\ '' ok'".encode(codec))
        assert run_bot(world, steps) == run_direct(world, steps)
        return
    raw = char.encode(codec)
    assert raw[1:] == b"\\"
    attack = b"SELECT E'" + raw + b"' ; DROP TABLE accounts; --'"
    out = run_bot(world, _steps(f"SET client_encoding = '{encoding}'", attack))
    assert not out[1]["ok"] and "no-drops" in out[1]["message"], out
    assert table_exists(accounts)
    # The same character in an ordinary literal runs, with the server's answer.
    steps = _steps(f"SET client_encoding = '{encoding}'", b"SELECT '" + raw + b"', E'\\\\'")
    assert run_bot(world, steps) == run_direct(world, steps)


@pytest.mark.parametrize("encoding,text", [("LATIN1", "Grüße, Ærøskøbing"), ("KOI8R", "Привет"),
                                           ("WIN1252", "naïve café €")])
def test_single_byte_client_encodings_run_and_are_audited(world, encoding, text):
    # Issue 13.5: these raised UnicodeEncodeError in the policy and left no audit row.
    from appliance.policy.reading import CODECS
    marker = uuid.uuid4().hex[:8]
    sql = f"SELECT '{text}' AS v, '{marker}' AS m"
    steps = _steps(f"SET client_encoding = '{encoding}'", sql.encode(CODECS[encoding]))
    out = run_bot(world, steps)
    assert out == run_direct(world, steps)
    assert bytes.fromhex(out[1]["rows"][0][0]).decode(CODECS[encoding]) == text
    rows = world["daemon"].audit_sql("SELECT text, decision FROM requests WHERE text LIKE ?", [f"%{marker}%"])
    assert rows and rows[0]["text"] == sql and rows[0]["decision"] == "allow", rows


def test_bytes_the_server_cannot_decode_are_refused_as_the_server_would(world):
    out = run_bot(world, _steps(b"SELECT '\xff\xfe'"))
    direct = run_direct(world, _steps(b"SELECT '\xff\xfe'"))
    assert not out[0]["ok"] and out[0]["sqlstate"] == direct[0]["sqlstate"] == "22021"
    assert run_bot(world, _steps("SELECT 'still usable'"))[0]["ok"]


# -- syntax errors (issue 13.9) -------------------------------------------------------------------

def test_syntax_errors_answer_as_the_server_would(world):
    steps = _steps("SELECT 1 FROMM orders", "SELEC 1")
    out, direct = run_bot(world, steps), run_direct(world, steps)
    for got, want in zip(out, direct):
        assert (got["sqlstate"], got["position"]) == (want["sqlstate"], want["position"]) == ("42601", got["position"])
        assert got["position"] is not None
        assert got["message"].splitlines()[0] == want["message"].splitlines()[0]
        assert "botwarden" in got["message"]  # DETAIL says who answered
    rows = requests_of(world, "SELEC 1")
    assert rows[-1]["decision"] == "block" and rows[-1]["sqlstate"] == "42601"


# -- protocol-level fidelity through the redirect (issue 13.2, 13.6) ---------------------------------

def test_asyncpg_named_statement_runs_through_sql_execute(world):
    steps = [{"op": "asyncpg_named", "sql": "select 41 + 1"}]
    assert run_bot(world, steps) == run_direct(world, steps) == [[42, 42]]


def test_execute_of_a_named_statement_is_decided_as_what_it_runs(world, accounts):
    out = run_bot(world, [{"op": "asyncpg_named", "sql": "select count(*) from accounts"}])
    assert out == [[1, 1]]
    assert table_exists(accounts)


def test_pg8000_bind_with_60000_parameters(world):
    steps = [{"op": "pg8000_params", "n": 60000}]
    assert run_bot(world, steps) == run_direct(world, steps) == [[[1]]]


def test_asyncpg_timeout_cancel_does_not_hit_the_next_statement(world):
    # 0.1 s: long enough that the statement is surely running on a loaded machine when the cancel
    # lands (a cancel that arrives first is ignored by the server and the sleep runs its 10 s).
    steps = [{"op": "asyncpg_cancel", "rounds": 20, "timeout": 0.1}]
    assert run_bot(world, steps) == run_direct(world, steps) == [list(range(20))]


def test_asyncpg_executemany_stops_sending_after_an_early_error(world):
    # Issue 13.3: 2,000 rows of 20 kB, the second a duplicate key. The server discards the rest
    # of the batch up to Sync; so does botwarden, at once, without waiting for a record of each
    # Execute that will never run: asyncpg sees the error while it is still sending and stops
    # (then sends Sync), as it does direct, instead of pushing 40 MB through a dead pipeline.
    table = f"em_{uuid.uuid4().hex[:8]}"
    steps = [{"op": "asyncpg_executemany", "rows": 2000, "width": 20000, "table": table}]
    (bot,), (direct,) = run_bot(world, steps), run_direct(world, steps)
    print("Bind messages sent before stopping: botwarden", bot["binds"], "direct", direct["binds"])
    assert bot["error"] == direct["error"] == "23505" and bot["count"] == direct["count"] == 0
    assert direct["binds"] < 1000 and bot["binds"] < 1000, (bot, direct)
    # The audit says what ran: the first row (rolled back with the batch), the failing second;
    # every Execute the server discarded is either unrecorded or recorded as not run.
    rows = world["daemon"].audit_sql("SELECT error, sqlstate FROM requests WHERE text = ? AND kind = 'execute' "
                                     "ORDER BY chain_seq", [f"INSERT INTO {table} VALUES ($1, $2)"])
    assert rows[0]["error"] is None and rows[1]["sqlstate"] == "23505", rows[:3]
    assert all(r["error"] == "not run: an earlier message in the batch failed" for r in rows[2:]), rows


def test_plpgsql_bodies_the_offline_parser_cannot_read_are_opaque_not_unparsable(world):
    # Issue 13.8: the server accepts these; the statement parses, only the body needs the catalog.
    bodies = [
        "CREATE OR REPLACE FUNCTION pg_temp.bw_v(VARIADIC a int[]) RETURNS int LANGUAGE plpgsql AS "
        "$$ BEGIN RETURN array_length(a, 1); END $$",
        "CREATE OR REPLACE FUNCTION pg_temp.bw_t(x pg_class.oid%TYPE) RETURNS oid LANGUAGE plpgsql AS "
        "$$ DECLARE y pg_class.oid%TYPE; BEGIN y := x; RETURN y; END $$",
        "CREATE OR REPLACE FUNCTION pg_temp.bw_r() RETURNS int LANGUAGE plpgsql AS "
        "$$ DECLARE r record; rs pg_class[]; BEGIN FOREACH r IN ARRAY rs LOOP END LOOP; RETURN 1; END $$",
    ]
    steps = _steps(*bodies, "SELECT pg_temp.bw_v(1, 2, 3), pg_temp.bw_t(42)")
    out = run_bot(world, steps)
    assert out == run_direct(world, steps) and all(r["ok"] for r in out), out
    from appliance.policy.sql import analyze_sql
    assert all("opaque_body" in analyze_sql(b).statements[0].properties for b in bodies[:2])


def test_large_objects_through_function_call_and_function_rules_apply(world):
    steps = [{"op": "psycopg2_lobject"}]
    got, direct = run_bot(world, steps)[0], run_direct(world, steps)[0]
    assert direct == {"oid": True, "written": 1900, "read": "large object", "after_truncate": "hello",
                      "unlink": "ok", "still_there": 0}, direct
    # The same calls through botwarden, decided as SELECT pg_catalog.lo_*(...): lo_unlink is blocked.
    assert "no-lo-unlink" in got.pop("unlink") and direct.pop("unlink") == "ok"
    assert got == {**direct, "still_there": 1}
    rows = world["daemon"].audit_sql("SELECT text, decision, rule FROM requests WHERE kind = 'function_call' "
                                     "ORDER BY chain_seq")
    texts = {r["text"] for r in rows}
    assert 'SELECT "pg_catalog"."lo_open"($1, $2)' in texts and 'SELECT "pg_catalog"."lowrite"($1, $2)' in texts
    assert [r["rule"] for r in rows if "lo_unlink" in r["text"]] == ["no-lo-unlink"]
