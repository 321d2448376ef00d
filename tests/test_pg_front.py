"""The PostgreSQL front's enforcement, TLS, authentication and failure handling against a real PostgreSQL 15."""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import struct
import threading
import time

import psycopg
import pytest

from appliance.fronts.services import AuthRefused, Credential, DefaultServices, HoldOutcome
from appliance.policy.types import Verdict
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres.connection import NEED_DATA, ConnectionClosed, PgConnection, Role
from probes.attribution import _sock_diag_inode
from tests.pg_front_fixtures import (APP_PASSWORD, APP_USER, BOT_TOKEN, CLEAR_PASSWORD, CLEAR_USER, MD5_PASSWORD,
                                     MD5_USER, FrontThread, default_services, make_ca, plain_settings, setup_roles)

BLOCKED = "DELETE FROM people WHERE id = 1"
BLOCKED_EXT = "INSERT INTO people (id, name) VALUES ($1, 'blocked')"
MASKED = "SELECT id, email, salary, note FROM people WHERE id <= 3 ORDER BY id"
MASKED_EXT = "SELECT id, email, salary, note FROM people WHERE id <= $1 ORDER BY id"
HELD = "SELECT 'held statement ran' AS r"


class PolicyServices(DefaultServices):
    """DefaultServices with verdicts by exact statement text and a hold() the test decides."""

    def __init__(self, **kw):
        super().__init__(Credential(APP_USER, APP_PASSWORD), mask_columns=("email", "salary", "note"), **kw)
        self.verdicts = {
            BLOCKED: Verdict("block", "no-delete", "deleting people is not allowed"),
            BLOCKED_EXT: Verdict("block", "no-insert", "inserting people is not allowed"),
            MASKED: Verdict("mask", "pii", "personal data"),
            MASKED_EXT: Verdict("mask", "pii", "personal data"),
            HELD: Verdict("approve", "needs-human", "a human must approve"),
        }
        self.held: queue.Queue = queue.Queue()
        self.decisions: dict[str, asyncio.Future] = {}
        self.refuse: AuthRefused | None = None
        self.tokens: list = []

    async def open_session(self, target, ctx, user, token):
        self.tokens.append(token)
        if self.refuse is not None:
            raise self.refuse
        return await super().open_session(target, ctx, user, token)

    def decide_sql(self, grant, target, sql, phase):
        return self.verdicts.get(sql.strip(), super().decide_sql(grant, target, sql, phase))

    async def hold(self, grant, target, request_text, verdict, notify, request_id=None):
        approval_id = f"appr-{len(self.decisions) + 1}"
        fut = asyncio.get_running_loop().create_future()
        self.decisions[approval_id] = fut
        notify(approval_id)
        self.held.put(approval_id)
        approved, reason = await fut
        return HoldOutcome(approved, approval_id, reason, "operator")


@pytest.fixture(scope="module")
def policy_front(pg_server):
    setup_roles(pg_server)
    ft = FrontThread(plain_settings(pg_server), PolicyServices())
    yield ft
    ft.stop()


def _decide(ft: FrontThread, approval_id: str, approved: bool, reason: str) -> None:
    fut = ft.services.decisions[approval_id]
    ft.soon(fut.set_result, (approved, reason))


def _wait_for(fn, timeout: float = 10.0):
    """Poll until fn() is truthy (the front finishes a session on its own thread)."""
    deadline = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def _requests(ft, text: str) -> list[dict]:
    return [r for r in ft.services.of_kind("request") if r["text"] == text]


# ---------------------------------------------------------------- block

def test_block_simple_query_keeps_session_usable(policy_front, pg_server):
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(BLOCKED)
        assert "botwarden" in str(e.value) and "no-delete" in str(e.value)
        assert e.value.diag.message_detail == "deleting people is not allowed"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT count(*) FROM people WHERE id = 1").fetchone() == (1,)
    assert pg_server.psql("SELECT count(*) FROM people WHERE id = 1") == "1"
    [rec] = _requests(policy_front, BLOCKED)
    assert (rec["decision"], rec["rule"], rec["sqlstate"]) == ("block", "no-delete", "42501")


def test_block_extended_query_keeps_session_usable(policy_front, pg_server):
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(BLOCKED_EXT.replace("$1", "%s"), (999,))
        assert "no-insert" in str(e.value)
        assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)
        # The same blocked statement in a pipeline with others: the ones before it in its own
        # Sync batch run, the session goes on afterwards.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.pipeline():
                ok = conn.execute("SELECT %s::text", ("before",))
                conn.execute(BLOCKED_EXT.replace("$1", "%s"), (998,))
        assert ok.fetchone() == ("before",)
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)
    assert pg_server.psql("SELECT count(*) FROM people WHERE id IN (998, 999)") == "0"
    recs = _requests(policy_front, BLOCKED_EXT)
    assert recs and all(r["kind"] == "parse" and r["decision"] == "block" for r in recs)


def test_block_inside_transaction_aborts_it_like_postgres(policy_front, pg_server):
    with psycopg.connect(policy_front.dsn()) as conn:
        conn.execute("INSERT INTO people (id, name) VALUES (777, 'in-tx')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(BLOCKED)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM people WHERE id = 777").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # extended, in a transaction
            conn.execute(BLOCKED_EXT.replace("$1", "%s"), (997,))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


# ---------------------------------------------------------------- mask

EXPECTED_MASKED = [(1, "***", 0, "***"), (2, "***", 0, None), (3, "***", 0, "***")]


def test_mask_text_and_binary(policy_front):
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        # simple query protocol, text format
        simple = conn.cursor().execute(MASKED, prepare=False)
        assert simple.fetchall() == EXPECTED_MASKED
        raw = conn.pgconn.exec_(MASKED.encode())  # the libpq simple path explicitly
        assert [raw.get_value(0, i) for i in range(4)] == [b"1", b"***", b"0", b"***"]
        # extended protocol, binary results (psycopg's binary cursor), NULL stays NULL
        binary = conn.cursor(binary=True).execute(MASKED_EXT.replace("$1", "%s"), (3,)).fetchall()
        assert binary == EXPECTED_MASKED
        # server-side prepared statement executed repeatedly
        for _ in range(3):
            assert conn.execute(MASKED_EXT.replace("$1", "%s"), (3,), prepare=True).fetchall() == EXPECTED_MASKED
        # an unmasked statement on the same table is untouched
        assert conn.execute("SELECT email FROM people WHERE id = 1").fetchone() == ("user1@example.com",)
    recs = _requests(policy_front, MASKED)
    assert recs[0]["decision"] == "mask" and recs[0]["masked"] == {"email": 3, "salary": 3, "note": 2}
    assert recs[0]["rows"] == 3
    ext = _requests(policy_front, MASKED_EXT)
    assert ext and all(r["masked"] == {"email": 3, "salary": 3, "note": 2} for r in ext)


def test_mask_with_asyncpg_statement_cache(policy_front):
    import asyncpg

    async def run():
        conn = await asyncpg.connect(host="127.0.0.1", port=policy_front.port, user="bot", password=BOT_TOKEN,
                                     database="postgres", ssl=False)
        try:
            return [[tuple(r) for r in await conn.fetch(MASKED_EXT, 3)] for _ in range(3)]
        finally:
            await conn.close()

    assert asyncio.run(run()) == [EXPECTED_MASKED] * 3


# ---------------------------------------------------------------- approve

def _run_in_thread(fn):
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, result


@pytest.mark.parametrize("approved", [True, False])
def test_hold_for_approval(policy_front, approved):
    notices: list[str] = []
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        t, result = _run_in_thread(lambda: conn.execute(HELD).fetchone())
        approval_id = policy_front.services.held.get(timeout=10)
        # While this session waits, another session is served.
        with psycopg.connect(policy_front.dsn(), autocommit=True) as other:
            assert other.execute("SELECT 'other session'").fetchone() == ("other session",)
        assert t.is_alive()
        _decide(policy_front, approval_id, approved, "looks fine" if approved else "not during business hours")
        t.join(10)
        if approved:
            assert result["value"] == ("held statement ran",)
        else:
            err = result["error"]
            assert isinstance(err, psycopg.errors.InsufficientPrivilege)
            assert "not during business hours" in str(err)
        assert any(approval_id in n and "botwarden" in n for n in notices)
        assert conn.execute("SELECT 'after hold'").fetchone() == ("after hold",)
    rec = [r for r in _requests(policy_front, HELD)][-1]
    assert rec["decision"] == ("approve" if approved else "deny")


def test_hold_in_extended_protocol_denied(policy_front):
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        t, result = _run_in_thread(lambda: conn.execute(HELD, prepare=True).fetchone())
        approval_id = policy_front.services.held.get(timeout=10)
        _decide(policy_front, approval_id, False, "no")
        t.join(10)
        assert isinstance(result["error"], psycopg.errors.InsufficientPrivilege)
        assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)


# ---------------------------------------------------------------- identity and login

def test_token_goes_to_open_session_and_refusal_is_fatal(policy_front):
    svc = policy_front.services
    svc.tokens.clear()
    with psycopg.connect(policy_front.dsn(password="tok-123")) as conn:
        conn.execute("SELECT 1")
    assert svc.tokens == ["tok-123"]
    svc.refuse = AuthRefused("28P01", "token rejected: expired")
    try:
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(policy_front.dsn(password="secret-token-xyz"))
        assert "token rejected: expired" in str(e.value) and "botwarden" in str(e.value)
        assert "secret-token-xyz" not in str(e.value)
    finally:
        svc.refuse = None
    end = _wait_for(lambda: [r for r in svc.of_kind("session_end") if r["outcome"] == "refused"])[-1]
    assert end["error"] == "token rejected: expired"
    assert all("secret-token-xyz" not in repr(r) for _, r in svc.records)


@pytest.mark.parametrize("user,password", [(MD5_USER, MD5_PASSWORD), (CLEAR_USER, CLEAR_PASSWORD)])
def test_upstream_md5_and_cleartext_credentials(pg_server, user, password):
    setup_roles(pg_server)
    ft = FrontThread(plain_settings(pg_server, upstream_tls="disable"),
                     DefaultServices(Credential(user, password)))
    try:
        with psycopg.connect(ft.dsn()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
    finally:
        ft.stop()


class _BrokenAdmission:
    def admit(self, *args, **kw):
        raise RuntimeError("admission bug")


@pytest.mark.parametrize("where", ["new_session", "admit"])
def test_a_session_that_cannot_be_set_up_is_refused_with_a_fatal_not_a_timeout(pg_server, where):
    # Our own bug while setting a session up (building it, or admitting the connection) must not
    # leave the bot's connect hanging until its timeout: it gets a FATAL that says so.
    ft = FrontThread(plain_settings(pg_server), DefaultServices(Credential(APP_USER, APP_PASSWORD)))
    try:
        if where == "new_session":
            def broken(bot):
                raise RuntimeError("session set-up bug")
            ft.front.new_session = broken
        else:
            ft.front.admission = _BrokenAdmission()
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(ft.dsn(connect_timeout="20"))
        assert "internal error setting up the session" in str(err.value)  # not "timeout expired"
    finally:
        ft.stop()


def test_upstream_verify_full_and_startup_parameters_verbatim(pg_server):
    setup_roles(pg_server)
    ft = FrontThread(plain_settings(pg_server, upstream_tls="verify-full", upstream_ca_file=str(pg_server.ca_file)),
                     default_services())
    try:
        with psycopg.connect(ft.dsn(application_name="bw-bot", options="'-c intervalstyle=iso_8601'"),
                             autocommit=True) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
            assert conn.execute("SHOW intervalstyle").fetchone() == ("iso_8601",)
            assert conn.info.parameter_status("application_name") == "bw-bot"
            assert conn.info.parameter_status("IntervalStyle") == "iso_8601"
            assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
        with pytest.raises(psycopg.OperationalError) as e:  # the server's own error, unchanged
            psycopg.connect(ft.dsn(db="no_such_db"))
        assert 'database "no_such_db" does not exist' in str(e.value)
    finally:
        ft.stop()


def test_bot_tls_verify_full(pg_server, tmp_path):
    setup_roles(pg_server)
    ca = make_ca(tmp_path)
    settings = plain_settings(pg_server, tls_cert_file=str(ca["cert"]), tls_key_file=str(ca["key"]),
                              allow_plaintext=False)
    ft = FrontThread(settings, default_services())
    try:
        with psycopg.connect(ft.dsn(sslmode="verify-full", sslrootcert=str(ca["ca"]))) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT 42").fetchone() == (42,)
            # libpq 17+ sends the cancel request over TLS too (SSLRequest, then CancelRequest)
            timer = threading.Timer(0.5, conn.cancel_safe)
            timer.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            conn.rollback()
            assert conn.execute("SELECT 43").fetchone() == (43,)
        with psycopg.connect(ft.dsn(sslmode="require")) as conn:
            assert conn.pgconn.ssl_in_use
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(ft.dsn(sslmode="disable"))
        assert "requires TLS" in str(e.value)
        starts = ft.services.of_kind("session_start")
        assert starts[0]["tls"] is True
    finally:
        ft.stop()


def test_protocol_3_2_client_is_negotiated_down(policy_front):
    with psycopg.connect(policy_front.dsn(max_protocol_version="3.2", min_protocol_version="3.0")) as conn:
        assert conn.execute("SELECT 7").fetchone() == (7,)
        assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]


# ---------------------------------------------------------------- raw protocol: bad input, disconnects

class RawBot:
    """A bot speaking the wire protocol with the codec, to send what real clients never would."""

    def __init__(self, port: int, token: str = BOT_TOKEN):
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.codec = PgConnection(Role.CLIENT)
        self.sock.sendall(m.StartupMessage((("user", "bot"), ("database", "postgres"))).encode())
        assert isinstance(self.next(), m.AuthenticationCleartextPassword)
        self.sock.sendall(m.PasswordMessage.password(token).encode())
        self.until(m.ReadyForQuery)

    def next(self):
        while True:
            ev = self.codec.next_event()
            if ev is not NEED_DATA:
                return ev
            self.codec.receive_data(self.sock.recv(65536))

    def until(self, kind):
        seen = []
        while True:
            ev = self.next()
            seen.append(ev)
            if isinstance(ev, (kind, ConnectionClosed)):
                return seen


def test_malformed_message_gets_protocol_violation(policy_front):
    bot = RawBot(policy_front.port)
    bot.sock.sendall(b"Q\x00\x00\x00\x02")  # length smaller than itself
    seen = bot.until(ConnectionClosed)
    errors = [e for e in seen if isinstance(e, m.ErrorResponse)]
    assert errors[0].sqlstate == "08P01" and errors[0].severity == "FATAL"
    assert errors[0].message.startswith("botwarden:")


def test_oversized_message_is_refused(pg_server):
    setup_roles(pg_server)
    ft = FrontThread(plain_settings(pg_server, max_message_size=64 * 1024), default_services())
    try:
        bot = RawBot(ft.port)
        bot.sock.sendall(m.Query("SELECT '" + "x" * 100_000 + "'").encode()[:5])
        seen = bot.until(ConnectionClosed)
        err = [e for e in seen if isinstance(e, m.ErrorResponse)][0]
        assert err.sqlstate == "54000" and "65536" in err.message
    finally:
        ft.stop()


def _backend_count(pg, marker: str) -> int:
    # Exact text: the admin query that counts contains the marker too, but is not equal to it.
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60) /* {marker} */'"))


def test_bot_disconnect_mid_query_stops_upstream(policy_front, pg_server):
    bot = RawBot(policy_front.port)
    bot.sock.sendall(m.Query("SELECT pg_sleep(60) /* bw-disconnect-probe */").encode())
    deadline = time.monotonic() + 10
    while _backend_count(pg_server, "bw-disconnect-probe") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _backend_count(pg_server, "bw-disconnect-probe") == 1
    bot.sock.close()
    deadline = time.monotonic() + 15
    while _backend_count(pg_server, "bw-disconnect-probe") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _backend_count(pg_server, "bw-disconnect-probe") == 0


def test_server_terminating_backend_reaches_bot(policy_front, pg_server):
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        pg_server.psql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(psycopg.OperationalError) as e:
            conn.execute("SELECT 1")
        assert "terminating connection due to administrator command" in str(e.value)


class CuttableRelay:
    """A TCP relay in front of the real server that the test can cut (asyncpg's fault-injection model)."""

    def __init__(self, target: tuple[str, int], chunk: int = 0):
        self.target = target
        self.chunk = chunk  # > 0: forward the server's bytes in pieces this small
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks += [a, b]
            for src, dst, chunk in ((a, b, 0), (b, a, self.chunk)):
                threading.Thread(target=self._pump, args=(src, dst, chunk), daemon=True).start()

    @staticmethod
    def _pump(src, dst, chunk=0):
        try:
            while data := src.recv(65536):
                if chunk:
                    for i in range(0, len(data), chunk):
                        dst.sendall(data[i:i + chunk])
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.cut()
        self.listener.close()


def test_upstream_dying_gives_bot_fatal_error(pg_server):
    setup_roles(pg_server)
    relay = CuttableRelay((pg_server.host, pg_server.port))
    ft = FrontThread(plain_settings(pg_server, upstream_port=relay.port, upstream_tls="disable"), default_services())
    try:
        with psycopg.connect(ft.dsn(), autocommit=True) as conn:
            t, result = _run_in_thread(lambda: conn.execute("SELECT pg_sleep(30)"))
            time.sleep(0.3)
            relay.cut()
            t.join(15)
            assert not t.is_alive()
            err = result["error"]
            assert isinstance(err, psycopg.OperationalError)
            assert "botwarden: lost the connection to the PostgreSQL server" in str(err)
            assert err.sqlstate == "08006"
        end = _wait_for(lambda: ft.services.of_kind("session_end"))[-1]
        assert end["outcome"] == "error"
    finally:
        ft.stop()
        relay.close()


class RaisingMaskServices(DefaultServices):
    """A policy whose mask plan breaks: no unmasked value may reach the bot."""

    def mask_plan(self, grant, target, verdict, columns):
        class Broken:
            counts: dict = {}

            def apply(self, values):
                raise RuntimeError("mask plan bug")
        return Broken()

    def decide_sql(self, grant, target, sql, phase):
        return Verdict("mask", "pii", "") if "people" in sql else super().decide_sql(grant, target, sql, phase)


def test_failing_mask_plan_fails_closed(pg_server):
    setup_roles(pg_server)
    ft = FrontThread(plain_settings(pg_server), RaisingMaskServices(Credential(APP_USER, APP_PASSWORD)))
    try:
        with psycopg.connect(ft.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InternalError_) as e:
                conn.execute("SELECT email FROM people WHERE id = 1").fetchall()
            assert e.value.sqlstate == "XX000"
            assert "user1@example.com" not in str(e.value) and "botwarden" in str(e.value)
    finally:
        ft.stop()


def test_session_audit_records(policy_front):
    svc = policy_front.services
    n0 = len(svc.records)
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1; SELECT 2")
        conn.execute("SELECT %s::int", (5,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM nope_table")
    recs = svc.records[n0:]
    start = [r for k, r in recs if k == "session_start"][0]
    sid = start["session_id"]
    assert start["protocol"] == "postgresql" and start["credential_user"] == APP_USER
    reqs = [r for k, r in recs if k == "request" and r["session_id"] == sid]
    texts = {r["text"]: r for r in reqs}
    assert texts["SELECT 1; SELECT 2"]["rows"] == 2
    assert texts["SELECT $1::int"]["params"] == ["\\x0005"] or texts["SELECT $1::int"]["params"] == ["5"]
    assert texts["SELECT * FROM nope_table"]["sqlstate"] == "42P01"
    end = _wait_for(lambda: [r for k, r in svc.records if k == "session_end" and r["session_id"] == sid])[0]
    assert end["outcome"] == "ok" and end["bytes_in"] > 0 and end["bytes_out"] > end["bytes_in"]
    for kind, rec in svc.records[n0:]:
        assert set(rec) <= _contract_fields[kind], (kind, set(rec) - _contract_fields[kind])


_contract_fields = {
    "session_start": {"session_id", "ts", "target", "protocol", "identity", "token_subject", "token_kid",
                      "client_addr", "target_addr", "pid", "uid", "gid", "cgroup_id", "cgroup_path", "exe", "comm",
                      "attribution_source", "credential_user", "lease_id", "tls"},
    "session_end": {"session_id", "ts", "bytes_in", "bytes_out", "outcome", "error"},
    "request": {"request_id", "session_id", "ts", "protocol", "kind", "text", "params", "decision", "rule",
                "reason", "duration_ms", "rows", "error", "sqlstate", "masked", "row_estimate", "row_limit"},
    "recording": {"session_id", "seq", "ts", "direction", "data"},   # the session as the bot saw it (issue 18)
}


# ---------------------------------------------------------------- FunctionCall and the fast Bind decoder

def test_function_call_is_decided_as_the_function_its_oid_names(pg_server):
    """Issue 13.4: the OID is resolved on the session (pg_proc) and the call decided as
    SELECT schema.f($1); an OID no function has is left for the server to refuse."""
    setup_roles(pg_server)
    abs_int4 = int(pg_server.psql("SELECT 'abs(int4)'::regprocedure::oid"))
    ft = FrontThread(plain_settings(pg_server), default_services())
    try:
        bot = RawBot(ft.port)
        for _ in range(2):  # the second call is decided from the cache
            bot.sock.sendall(m.FunctionCall(abs_int4, (0,), (b"-42",), 0).encode())
            seen = bot.until(m.ReadyForQuery)
            assert m.FunctionCallResponse(b"42") in seen, seen
            assert not any(isinstance(x, (m.RowDescription, m.DataRow, m.CommandComplete)) for x in seen)
        bot.sock.sendall(m.FunctionCall(4_000_000_000, (), (), 0).encode())
        err = [x for x in bot.until(m.ReadyForQuery) if isinstance(x, m.ErrorResponse)][0]
        assert err.sqlstate == "42883"  # the server's own "function with OID ... does not exist"
        bot.sock.sendall(m.Query("SELECT 'usable'").encode())
        assert m.DataRow((b"usable",)) in bot.until(m.ReadyForQuery)
        recs = _wait_for(lambda: [r for r in ft.services.of_kind("request") if r["kind"] == "function_call"][2:] and
                         [r for r in ft.services.of_kind("request") if r["kind"] == "function_call"])
        assert recs[0]["text"] == 'SELECT "pg_catalog"."abs"($1)' and recs[0]["params"] == ["-42"]
        assert recs[0]["decision"] == "allow" and recs[2]["sqlstate"] == "42883"
    finally:
        ft.stop()


from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

from appliance.fronts.postgres import _bind_fast, _render_params  # noqa: E402
from appliance.protocols.postgres.errors import PgProtocolError  # noqa: E402

_values = st.lists(st.one_of(st.none(), st.binary(max_size=8)), max_size=4)


@hsettings(max_examples=300, deadline=None)
@given(st.text(max_size=5).filter(lambda t: "\x00" not in t), _values, st.sampled_from([0, 1, 2]),
       st.lists(st.sampled_from([0, 1]), max_size=3), st.binary(max_size=6), st.integers(0, 40))
def test_fast_bind_decoder_agrees_with_codec(name, values, nformats, result_formats, junk, cut):
    formats = tuple([1] * len(values)) if nformats == 2 else ((1,) if nformats == 1 else ())
    wire = m.Bind(name, "s", formats, tuple(values), tuple(result_formats)).encode()
    for candidate in (wire, wire[:5] + wire[5:5 + cut] + junk):
        candidate = candidate[:1] + struct.pack("!i", len(candidate) - 1) + candidate[5:]
        try:
            ref = m.decode_frontend(b"B", candidate[5:])
        except PgProtocolError:
            with pytest.raises(PgProtocolError):
                _bind_fast(candidate, 0, len(candidate))
            continue
        assert _bind_fast(candidate, 0, len(candidate)) == (ref.portal, ref.statement, _render_params(ref),
                                                             ref.result_formats)


def test_gssenc_request_is_answered_no(policy_front):
    sock = socket.create_connection(("127.0.0.1", policy_front.port), 10)
    sock.sendall(m.GSSENCRequest().encode())
    assert sock.recv(1) == b"N"
    sock.sendall(m.StartupMessage((("user", "bot"), ("database", "postgres"))).encode())
    codec = PgConnection(Role.CLIENT)
    codec.receive_data(sock.recv(100))
    assert isinstance(codec.next_event(), m.AuthenticationCleartextPassword)
    sock.close()


def test_identity_from_attestation_alone_asks_no_password(pg_server):
    setup_roles(pg_server)
    svc = PolicyServices()
    ft = FrontThread(plain_settings(pg_server, require_token=False), svc)
    try:
        with psycopg.connect(ft.dsn(password=None)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert svc.tokens == [None]
    finally:
        ft.stop()


def test_upstream_verify_full_with_wrong_ca_is_refused(pg_server, tmp_path):
    setup_roles(pg_server)
    other_ca = make_ca(tmp_path)["ca"]
    ft = FrontThread(plain_settings(pg_server, upstream_tls="verify-full", upstream_ca_file=str(other_ca)),
                     default_services())
    try:
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(ft.dsn())
        assert "botwarden: TLS to the target 'pg-test' failed" in str(e.value)
        assert "certificate verify failed" in str(e.value)
    finally:
        ft.stop()


def test_bot_leaving_during_hold_abandons_the_statement(policy_front):
    bot = RawBot(policy_front.port)
    bot.sock.sendall(m.Query(HELD).encode())
    approval_id = policy_front.services.held.get(timeout=10)
    notice = bot.next()
    assert isinstance(notice, m.NoticeResponse) and approval_id in notice.message
    bot.sock.close()
    fut = policy_front.services.decisions[approval_id]
    assert _wait_for(lambda: fut.cancelled())  # the hold was withdrawn, not left waiting
    rec = _wait_for(lambda: [r for r in _requests(policy_front, HELD)
                             if r["error"] == "session ended while the statement waited for approval"])
    assert rec[0]["decision"] == "deny"


def test_copy_out_of_masked_statement_is_refused(policy_front, tmp_path):
    copy_sql = "COPY (SELECT id, email FROM people WHERE id <= 3 ORDER BY id) TO STDOUT"
    policy_front.services.verdicts[copy_sql] = Verdict("mask", "pii", "personal data")
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            with conn.cursor().copy(copy_sql) as cp:
                data = b"".join(bytes(b) for b in cp)
                assert b"example.com" not in data
        assert "COPY TO STDOUT is refused" in str(e.value) and "example.com" not in str(e.value)
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
    rec = _wait_for(lambda: _requests(policy_front, copy_sql))[0]
    assert rec["decision"] == "block" and rec["sqlstate"] == "42501"


def test_messages_split_at_every_byte_both_ways(pg_server):
    """Messages reassembled however TCP cuts them: bot bytes one at a time, server bytes in 3-byte pieces."""
    setup_roles(pg_server)
    relay = CuttableRelay((pg_server.host, pg_server.port), chunk=3)
    svc = PolicyServices()
    ft = FrontThread(plain_settings(pg_server, upstream_port=relay.port, upstream_tls="disable"), svc)
    try:
        bot = RawBot(ft.port)
        wire = (m.Query(MASKED).encode() + m.Parse("s1", "SELECT $1::text || 'x'", ()).encode()
                + m.Bind("", "s1", (), (b"a" * 300,), ()).encode() + m.Execute().encode() + m.Sync().encode())
        for i in range(len(wire)):
            bot.sock.sendall(wire[i:i + 1])
        seen = bot.until(m.ReadyForQuery)
        rows = [e.values for e in seen if isinstance(e, m.DataRow)]
        assert rows == [(b"1", b"***", b"0", b"***"), (b"2", b"***", b"0", None), (b"3", b"***", b"0", b"***")]
        seen = bot.until(m.ReadyForQuery)
        assert m.DataRow((b"a" * 300 + b"x",)) in seen and m.CommandComplete("SELECT 1") in seen
    finally:
        ft.stop()
        relay.close()


def _upstream_lowat(local: tuple[str, int], server: tuple[str, int]) -> int | None:
    """SO_RCVLOWAT of the front's socket ``local`` -> ``server`` (the front runs in this process:
    the kernel names the socket's inode, sock_diag as attribution asks it, and one of our
    descriptors is that inode)."""
    found = _sock_diag_inode(local, server)
    if found is None:
        return None
    want = f"socket:[{found[1]}]"
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == want:
                with socket.socket(fileno=os.dup(int(fd))) as s:
                    return s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        except OSError:
            continue
    return None


def test_a_bulk_result_is_read_in_large_chunks_and_the_next_statement_is_not_held_back(policy_front):
    """While the server streams a large result, the front's socket to it wakes the loop only once
    BULK_LOWAT bytes wait (SO_RCVLOWAT; fewer, larger reads); once the stream is over it wakes at
    any byte again, so the result's last bytes and the next statement's small answer arrive."""
    from appliance.fronts.postgres.transport import BULK_LOWAT

    rows, width = 20_000, 2_000  # 40 MB of values
    with psycopg.connect(policy_front.dsn(), autocommit=True) as conn:
        # the front's socket to the server, as the server sees it
        caddr, cport, saddr, sport = conn.execute(
            "SELECT host(inet_client_addr()), inet_client_port(), host(inet_server_addr()), inet_server_port()").fetchone()
        ends = ((caddr, cport), (saddr, sport))
        assert _upstream_lowat(*ends) == 1   # a session starts waking at any byte
        seen: set[int] = set()
        result: dict = {}

        def big() -> None:
            cur = conn.execute(f"SELECT i, repeat('x', {width}) FROM generate_series(1, {rows}) i")
            result["rows"] = cur.fetchall()

        t = threading.Thread(target=big, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while t.is_alive() and time.monotonic() < deadline:
            lowat = _upstream_lowat(*ends)
            if lowat is not None:
                seen.add(lowat)
            time.sleep(0.0005)
        assert not t.is_alive(), "the large result never finished (its last bytes were held back)"
        assert len(result["rows"]) == rows
        assert result["rows"][-1] == (rows, "x" * width)   # every byte arrived, the last ones too
        assert BULK_LOWAT in seen, seen                     # the stream was read in bulk

        # The stream is over: the socket wakes at any byte again, and a statement with a tiny
        # answer gets it (with the mark left at BULK_LOWAT it would wait forever).
        deadline = time.monotonic() + 5
        while _upstream_lowat(*ends) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _upstream_lowat(*ends) == 1
        answers: list = []
        small = threading.Thread(target=lambda: answers.append(conn.execute("SELECT 41 + 1").fetchone()[0]))
        small.start()
        small.join(10)
        assert answers == [42]
