"""Issue 14.4: protocol abuse on the listener, and the control socket, against the REAL daemon.

One daemon serves the module (`botwarden run`, a real PostgreSQL 15 target, a real OpenBao for
tokens and per-session database users, probes off: the attackers here are ordinary local
processes, which the listener must survive whoever they are). Its control socket is 0660
root:nogroup (an operator group), and the identity lists nobody in ``operator_uids``.

Each case asserts what the attacker gets (a protocol-native error, the connection closed), the
audit row where a session exists (after login), and that the daemon and a bot session opened
before the attack still work. Memory and descriptors are measured from /proc and printed
(``-s`` shows them); bounds are asserted, timings never.
"""

from __future__ import annotations

import json
import pwd
import random
import socket
import struct
import subprocess
import time

import psycopg
import pytest

from tests.adversarial_fixtures import (SYSTEM_PYTHON, LiveSession, Sampler, daemon_pid, fd_count, rss_kib,
                                        session_row, system_python_env)
from tests.approvals_fixtures import Bot, as_user, wait_until
from tests.daemon_fixtures import ROOT, DaemonProcess, fresh_setup, new_port
from tests.test_adversarial_daemon import FLOOD
from tests.test_approvals_daemon import make_config, seed_ledger
from tests.test_pg_front import RawBot

pytestmark = [pytest.mark.root, pytest.mark.timeout(400)]

PER_UID, TOTAL, TIMEOUT_S, PRESSURE_TIMEOUT_S = 100, 400, 4, 3
NOBODY = pwd.getpwnam("nobody")          # an operator (nogroup) the identity names in operator_uids
OTHER_OPERATOR = pwd.getpwnam("daemon")  # an operator of the same group the identity does not name
STRANGER = 42441                         # a local user in no operator group
FLOODERS = (42451, 42452, 42453, 42454, 42455)


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adversarial-listener")
    seed_ledger(pg_server)
    setup = fresh_setup(bao_server, pg_server, workdir)
    port = new_port()
    config, socket_path = make_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup,
                                      port=port, approvals="timeout_s = 120\n")
    config.write_text(config.read_text() + f"""
[limits]
unauthenticated_per_uid = {PER_UID}
unauthenticated_total = {TOTAL}
unauthenticated_timeout_s = {TIMEOUT_S}
unauthenticated_timeout_under_pressure_s = {PRESSURE_TIMEOUT_S}
""")
    daemon = DaemonProcess(config, socket_path).start()
    live = None
    try:
        live = LiveSession(port, setup.mint_token())
        yield type("Env", (), {"pg": pg_server, "bao": setup, "port": port, "config": config, "daemon": daemon,
                               "socket": socket_path, "live": live})
    finally:
        if live is not None:
            live.close()
        daemon.stop()


def unaffected(env) -> None:
    """The daemon runs, its audit store is healthy, the session open all along still answers."""
    assert env.daemon.proc.poll() is None
    assert env.daemon.client().get("/v1/status")["audit"]["healthy"]
    assert env.live.alive(), "another bot's open session was disturbed"


def answer_of(sock: socket.socket, timeout: float = 60) -> dict:
    """The first message the daemon sends (an ErrorResponse, parsed), and whether it then closed."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    if len(data) < 5:
        return {"type": None, "raw": data}
    length = struct.unpack("!i", data[1:5])[0]
    fields = {p[:1].decode(): p[1:].decode(errors="replace") for p in data[5:1 + length].split(b"\0") if p}
    return {"type": data[:1].decode(), "severity": fields.get("S"), "sqlstate": fields.get("C"),
            "message": fields.get("M"), "closed": True}


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """The daemon may close before it read everything: that is the point."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def logged_in(env) -> tuple[RawBot, str]:
    """A raw protocol client after login, and its session id."""
    bot = RawBot(env.port, env.bao.mint_token())
    port = bot.sock.getsockname()[1]
    live = wait_until(lambda: next((s for s in env.daemon.client().get("/v1/sessions")["sessions"]
                                    if s["client"] == f"127.0.0.1:{port}"), None), 20, "the raw client's session")
    return bot, live["session_id"]


# -- before login: garbage, lies about lengths, silence ---------------------------------------


@pytest.mark.parametrize("case", ["random_bytes", "startup_claiming_2_gb", "negative_startup_length"])
def test_garbage_before_login_is_refused_with_a_protocol_error(env, case):
    payload = {
        "random_bytes": random.Random(14).randbytes(64 * 1024),
        "startup_claiming_2_gb": struct.pack("!ii", 2**31 - 1, 196608) + b"user\0x\0" * 100,
        "negative_startup_length": struct.pack("!ii", -8, 196608) + b"user\0x\0\0",
    }[case]
    pid = daemon_pid(env.daemon)
    rss_before = rss_kib(pid)
    with socket.create_connection(("127.0.0.1", env.port), 10) as s:
        send_quietly(s, payload)
        answer = answer_of(s)
    assert (answer["type"], answer["severity"], answer["sqlstate"]) == ("E", "FATAL", "08P01"), answer
    assert "invalid startup packet length" in answer["message"] and answer["closed"]
    grew = rss_kib(pid) - rss_before
    print(f"{case}: daemon RSS grew by {grew} KiB")
    assert grew < 16 * 1024  # nothing was allocated for the length the packet claimed
    # No session exists before login: the refusal is a probe row (at most one per peer and kind
    # of refusal per 10 s, the count of those it stands for in the detail).
    assert_refusal_recorded(env, "protocol error: invalid startup packet length")
    unaffected(env)


def assert_refusal_recorded(env, text: str) -> None:
    def found() -> bool:
        rows = env.daemon.audit_sql("SELECT detail, uid FROM probes WHERE event = 'protocol_refused'")
        return any(text in (r["detail"] or "") and r["uid"] == 0 for r in rows)

    deadline = time.monotonic() + 10
    while not found():
        assert time.monotonic() < deadline, env.daemon.audit_sql("SELECT event, detail FROM probes")
        time.sleep(0.2)


def test_half_a_startup_packet_then_silence_is_closed_by_the_unauthenticated_timeout(env):
    startup = struct.pack("!ii", 40, 196608) + b"user\0half\0"  # announces 40 bytes, sends 18
    with socket.create_connection(("127.0.0.1", env.port), 10) as s:
        s.sendall(startup)
        answer = answer_of(s, timeout=60)
    assert (answer["type"], answer["severity"], answer["sqlstate"]) == ("E", "FATAL", "08006"), answer
    assert f"did not authenticate within {TIMEOUT_S:g}s" in answer["message"] and answer["closed"]
    assert env.daemon.client().get("/v1/status")["admission"]["timed_out"] >= 1
    assert_refusal_recorded(env, f"did not authenticate within {TIMEOUT_S:g}s")
    unaffected(env)


# -- after login: lies about lengths, garbage, floods of messages ---------------------------------


@pytest.mark.parametrize("case", ["negative_length", "message_claiming_2_gb", "random_bytes"])
def test_garbage_after_login_ends_that_session_only_and_is_audited(env, case):
    bot, session_id = logged_in(env)
    payload = {
        "negative_length": b"Q" + struct.pack("!i", -5) + b"SELECT 1\0",
        "message_claiming_2_gb": b"Q" + struct.pack("!i", 2**31 - 1) + b"SELECT 1",
        "random_bytes": b"\xfe" + random.Random(26).randbytes(64 * 1024),  # 0xfe: no message type
    }[case]
    expect = {"negative_length": ("08P01", "announces an invalid length -5"),
              "message_claiming_2_gb": ("54000", f"of {2**31 - 1} bytes exceeds the maximum"),
              "random_bytes": ("08P01", "")}[case]
    send_quietly(bot.sock, payload)
    answer = answer_of(bot.sock)
    assert (answer["type"], answer["severity"], answer["sqlstate"]) == ("E", "FATAL", expect[0]), answer
    assert expect[1] in answer["message"] and answer["closed"]
    row = wait_until(lambda: session_row(env.daemon, session_id=session_id), 20, "the session's end row")
    assert row["outcome"] == "error" and row["error"] and row["error"] in answer["message"], row
    # Its database user is revoked with it.
    wait_until(lambda: env.pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{row['credential_user']}'")
               == "0", 30, "the session's database user to be revoked")
    unaffected(env)


def test_ten_thousand_tiny_messages_in_one_write_are_all_answered_and_audited(env):
    bot, session_id = logged_in(env)
    n = 10_000
    burst = b"".join(b"Q" + struct.pack("!i", 4 + len(q) + 1) + q + b"\0"
                     for q in (f"SELECT {i}".encode() for i in range(n)))
    bot.sock.sendall(burst)  # 10,000 Query messages, ~150 KB, in one write
    answered = rows = 0
    bot.sock.settimeout(120)
    while answered < n:
        ev = bot.next()
        kind = type(ev).__name__
        assert kind != "ErrorResponse" and kind != "ConnectionClosed", ev
        rows += kind == "DataRow"
        answered += kind == "ReadyForQuery"
    assert rows == n
    audited = wait_until(lambda: (c := env.daemon.audit_sql("SELECT count(*) AS n, count(DISTINCT seq) AS seqs, "
                                                            "min(seq) AS lo, max(seq) AS hi FROM requests "
                                                            "WHERE session_id = ?", [session_id])[0])["n"] >= n and c,
                         60, "10,000 request rows")
    assert audited == {"n": n, "seqs": n, "lo": 1, "hi": n}  # every one, numbered without a hole
    bot.sock.close()
    unaffected(env)


# -- many idle connections -------------------------------------------------------------------------


def test_500_idle_connections_cost_bounded_descriptors_and_memory(env):
    pid = daemon_pid(env.daemon)
    flood_s, per_user = 12.0, 100
    with Sampler(pid) as sampler:
        flooders = [subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                                      SYSTEM_PYTHON, "-c", FLOOD, str(env.port), str(per_user), str(flood_s)],
                                     stdout=subprocess.PIPE, text=True) for uid in FLOODERS]
        reports = [json.loads(f.communicate(timeout=120)[0]) for f in flooders]
        assert env.live.alive()  # during the flood: an authenticated session does not count
    base_fds, base_rss = sampler.before
    after = wait_until(lambda: (n := fd_count(pid)) <= base_fds + 4 and n, 30, "the daemon's fds to come back")
    measured = {"fds_before": base_fds, "fds_peak": sampler.peak_fds, "fds_after": after,
                "rss_kib_before": base_rss, "rss_kib_peak": sampler.peak_rss_kib, "rss_kib_after": rss_kib(pid),
                "flooders": reports, "admission": env.daemon.client().get("/v1/status")["admission"]}
    print("500 idle connections:", json.dumps(measured))
    assert sum(r["opened"] for r in reports) >= len(FLOODERS) * per_user  # 500 connections, and more later
    # At most TOTAL unauthenticated connections at once (one descriptor each), however many try.
    assert sampler.peak_fds <= base_fds + TOTAL + 16, measured
    assert sampler.peak_rss_kib - base_rss < 64 * 1024, measured
    rows = env.daemon.audit_sql("SELECT uid, detail FROM probes WHERE event = 'admission_refused' AND uid IN "
                                f"({', '.join(map(str, FLOODERS))})")
    assert rows and all("limits.unauthenticated_total" in r["detail"] for r in rows), rows
    with psycopg.connect(host="127.0.0.1", port=env.port, user="orders-bot", password=env.bao.mint_token(),
                         dbname="postgres", sslmode="disable", connect_timeout=10) as conn:
        assert conn.execute("SELECT 'new session'").fetchone() == ("new session",)
    unaffected(env)


# -- a 1 GB result, read fast or not read at all ------------------------------------------------------

GIB_QUERY = "SELECT repeat('x', 1024) FROM generate_series(1, 1048576)"  # ~1.08 GB of DataRows


def _drain_result(sock: socket.socket) -> tuple[int, int]:
    """Read a simple query's answer, skipping message bodies: (DataRows, bytes) until ReadyForQuery."""
    sock.settimeout(300)
    buf, data_rows, total = bytearray(), 0, 0
    while True:
        chunk = sock.recv(1 << 20)
        assert chunk, "the connection closed during the result"
        total += len(chunk)
        buf += chunk
        pos = 0
        while len(buf) - pos >= 5:
            length = struct.unpack_from("!i", buf, pos + 1)[0]
            if len(buf) - pos < length + 1:
                break
            kind = buf[pos]
            assert kind != ord("E"), bytes(buf[pos:pos + length + 1])
            data_rows += kind == ord("D")
            pos += length + 1
            if kind == ord("Z"):
                return data_rows, total
        del buf[:pos]


@pytest.mark.parametrize("reader", ["fast", "stalled"])
def test_1_gb_unmasked_result_keeps_the_daemons_memory_bounded(env, reader):
    pid = daemon_pid(env.daemon)
    bot, session_id = logged_in(env)
    bot.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    with Sampler(pid) as sampler:
        bot.sock.sendall(b"Q" + struct.pack("!i", 4 + len(GIB_QUERY) + 1) + GIB_QUERY.encode() + b"\0")
        if reader == "stalled":
            time.sleep(10)  # the bot reads nothing: back-pressure must stop the daemon reading upstream
            stalled_peak = sampler.peak_rss_kib
        rows, wire_bytes = _drain_result(bot.sock)
    assert rows == 1048576 and wire_bytes > 2**30
    growth_mib = (sampler.peak_rss_kib - sampler.before[1]) / 1024
    print(f"1 GB result, {reader} reader: {wire_bytes} bytes; daemon RSS before {sampler.before[1] // 1024} MiB, "
          f"peak {sampler.peak_rss_kib // 1024} MiB (+{growth_mib:.0f} MiB)"
          + (f", peak while stalled {stalled_peak // 1024} MiB" if reader == "stalled" else ""))
    assert growth_mib < 128, growth_mib  # a bounded buffer, not the result
    bot.sock.close()
    row = wait_until(lambda: env.daemon.audit_sql("SELECT decision, rows FROM requests WHERE session_id = ? AND "
                                                  "text = ?", [session_id, GIB_QUERY]), 30, "the request row")[0]
    assert row == {"decision": "allow", "rows": 1048576}
    unaffected(env)


# -- the control socket -------------------------------------------------------------------------------


def _cli_as(uid: int, gid: int, env, *args: str) -> subprocess.CompletedProcess:
    """The botwarden CLI run by another user (the system Python: the venv's is root's only)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", SYSTEM_PYTHON,
                           "-m", "appliance.cli", "--socket", str(env.socket), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=system_python_env())


def test_a_local_user_outside_the_operator_group_decides_nothing_and_reads_nothing(env):
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 41")
    approval_id = bot.wait_held()
    for action in (["approvals", "approve", approval_id], ["approvals", "deny", approval_id, "--reason", "x"],
                   ["audit", "sql", "SELECT * FROM sessions"], ["approvals", "list"]):
        res = _cli_as(STRANGER, STRANGER, env, *action)
        assert res.returncode == 1 and "permission denied on the control socket" in res.stderr, (action, res)
        assert res.stdout == ""
    for method, path, body in (("POST", f"/v1/approvals/{approval_id}/approve", {"reason": "me"}),
                               ("POST", f"/v1/approvals/{approval_id}/deny", {"reason": "me"}),
                               ("POST", "/v1/audit/sql", {"sql": "SELECT * FROM sessions"})):
        status, doc = as_user(STRANGER, STRANGER, env.socket, method, path, body)
        assert (status, doc) == (0, {"error": "permission denied on the socket"})  # the kernel said no
    # Nothing was decided: still held, the row still there, no decision on record.
    assert approval_id in {a["approval_id"] for a in env.daemon.client().get("/v1/approvals")["approvals"]}
    assert env.pg.psql("SELECT count(*) FROM ledger WHERE id = 41") == "1"
    events = env.daemon.audit_sql("SELECT event FROM approvals WHERE approval_id = ? AND event NOT IN "
                                  "('notified', 'notify_failed')", [approval_id])
    assert [e["event"] for e in events] == ["requested"]
    env.daemon.client().post(f"/v1/approvals/{approval_id}/deny", {"reason": "test over"})
    bot.finish()
    unaffected(env)


def test_an_operator_named_in_operator_uids_cannot_approve_and_the_attempt_is_audited(env):
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 42")
    approval_id = bot.wait_held()
    res = _cli_as(NOBODY.pw_uid, NOBODY.pw_gid, env, "approvals", "approve", approval_id, "--reason", "mine")
    assert res.returncode == 1, res
    assert "operator nobody is mapped to identity 'orders-bot' and may not approve its requests" in res.stderr
    status, doc = as_user(NOBODY.pw_uid, NOBODY.pw_gid, env.socket, "POST", f"/v1/approvals/{approval_id}/approve",
                          {"reason": "mine"})
    assert status == 403 and "may not approve its requests" in doc["error"], doc
    assert env.pg.psql("SELECT count(*) FROM ledger WHERE id = 42") == "1"
    status, doc = as_user(OTHER_OPERATOR.pw_uid, NOBODY.pw_gid, env.socket, "POST",
                          f"/v1/approvals/{approval_id}/approve", {"reason": "checked"})
    assert status == 200 and doc["state"] == "approved", doc
    bot.finish()
    assert env.pg.psql("SELECT count(*) FROM ledger WHERE id = 42") == "0"
    events = env.daemon.audit_sql("SELECT event, operator, operator_uid, reason FROM approvals WHERE approval_id = ? "
                                  "AND event NOT IN ('notified', 'notify_failed') ORDER BY chain_seq", [approval_id])
    assert [(e["event"], e["operator_uid"]) for e in events] == [
        ("requested", None), ("decision_refused", NOBODY.pw_uid), ("decision_refused", NOBODY.pw_uid),
        ("approved", OTHER_OPERATOR.pw_uid)]
    assert all("operator_uids" in e["reason"] for e in events[1:3])
    unaffected(env)
