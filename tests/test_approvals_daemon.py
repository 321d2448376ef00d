"""Approvals end to end: a real daemon (subprocess) wired to a real OpenBao and PostgreSQL 15,
the bot is psql or psycopg, the operator is the `botwarden approvals` CLI (or a forked child
running as another uid on the group-accessible control socket), notifications go to a real
local HTTP server.

One daemon serves the module; the timeout and restart cases start their own.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import psycopg
import pytest

from appliance.control import ControlClient
from tests.approvals_fixtures import Bot, Hook, as_user, cli, wait_until
from tests.daemon_fixtures import RULES, ROOT, DaemonProcess, fresh_setup, new_port, write_config

LEDGER_RULE = """
[[rules]]
name = "ledger-deletes-need-approval"
action = "approve"
description = "Deleting ledger rows needs a human"
[rules.sql]
kinds = ["DELETE"]
relations = ["ledger"]
"""
NOBODY = pwd.getpwnam("nobody")          # mapped to the bot's identity: may not approve its requests
OTHER_OPERATOR = pwd.getpwnam("daemon")  # another member of the operator group
OPS_GROUP = grp.getgrgid(NOBODY.pw_gid).gr_name


def operator_socket_path() -> Path:
    """A control socket other uids can reach: pytest's tmp dirs are 0700 (root only), so the
    socket lives under a directory of its own that anyone may traverse (the daemon makes the
    socket's own directory 0750 root:<operator group>)."""
    top = Path(tempfile.mkdtemp(prefix="bw-approvals-"))
    top.chmod(0o711)
    return top / "run" / "control.sock"


def make_config(path, *, workdir, pg, bao, port, approvals: str) -> tuple[Path, Path]:
    socket_path = operator_socket_path()
    write_config(path, workdir=workdir, pg=pg, bao=bao, listen_port=port, rules=RULES + LEDGER_RULE,
                 socket_group=OPS_GROUP, socket_path=socket_path)
    text = path.read_text()
    text = text.replace("[approvals]\ntimeout_s = 20\n", "[approvals]\n" + approvals)
    text = text.replace('groups = ["bots"]\n', f'groups = ["bots"]\noperator_uids = [{NOBODY.pw_uid}]\n')
    path.write_text(text)
    return path, socket_path


def seed_ledger(pg) -> None:
    pg.psql("DROP TABLE IF EXISTS ledger; CREATE TABLE ledger (id int PRIMARY KEY, note text);"
            "INSERT INTO ledger SELECT g, 'row ' || g FROM generate_series(1, 60) g")


def exists(pg, row_id: int) -> bool:
    return pg.psql(f"SELECT count(*) FROM ledger WHERE id = {row_id}") == "1"


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("approvals")
    seed_ledger(pg_server)
    setup = fresh_setup(bao_server, pg_server, workdir)
    port = new_port()
    with Hook(fail=1) as hook:
        config, socket_path = make_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup,
                                          port=port, approvals=f'timeout_s = 60\nwebhook_url = "{hook.url}"\n')
        daemon = DaemonProcess(config, socket_path).start()
        try:
            yield type("Env", (), {"pg": pg_server, "bao": setup, "port": port, "config": config,
                                   "daemon": daemon, "hook": hook, "workdir": workdir,
                                   "client": daemon.client()})
        finally:
            daemon.stop()


def approval_events(daemon: DaemonProcess, approval_id: str) -> list[dict]:
    return daemon.audit_sql("SELECT event, operator, operator_uid, reason, waited_ms, window_s, request_id, "
                            "session_id, identity, target, rule FROM approvals WHERE approval_id = ? "
                            "ORDER BY chain_seq", [approval_id])


def final_events(daemon: DaemonProcess, approval_id: str) -> list[dict]:
    return [e for e in approval_events(daemon, approval_id) if e["event"] not in ("notified", "notify_failed")]


def pending(client: ControlClient) -> dict[str, dict]:
    return {a["approval_id"]: a for a in client.get("/v1/approvals")["approvals"]}


def wait_pending(client: ControlClient, before: set[str]) -> dict:
    found = wait_until(lambda: [a for i, a in pending(client).items() if i not in before], 20, "a held request")
    return found[0]


def connect(env, **kw) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=env.port, user="orders-bot", password=env.bao.mint_token(),
                           dbname="postgres", sslmode="disable", connect_timeout=10, **kw)


def in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join(timeout: float = 30):
        t.join(timeout)
        assert not t.is_alive(), "the bot is still waiting"
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return join


# -- held, listed, notified, approved ----------------------------------------------------------------


def test_held_delete_is_listed_notified_and_runs_once_approved_via_cli(env):
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 1",
              "SELECT count(*) FROM ledger WHERE id = 1")
    approval_id = bot.wait_held()  # the NoticeResponse reached psql while the statement waits
    item = pending(env.client)[approval_id]
    assert item["identity"] == "orders-bot" and item["target"] == "orders"
    assert item["request"] == "DELETE FROM ledger WHERE id = 1" and item["rule"] == "ledger-deletes-need-approval"
    assert item["process"]["client"].startswith("127.0.0.1:") and item["process"]["attribution"] == "none"
    created, expires = (time.mktime(time.strptime(item[k][:19], "%Y-%m-%dT%H:%M:%S")) for k in ("created", "expires"))
    assert expires - created == 60  # approvals.timeout_s
    assert exists(env.pg, 1)  # nothing ran while held
    res = cli("--config", str(env.config), "approvals", "list")
    assert res.returncode == 0 and approval_id in res.stdout and "ledger-deletes-need-approval" in res.stdout
    res = cli("--config", str(env.config), "approvals", "approve", approval_id, "--reason", "ticket 42")
    assert res.returncode == 0, res.stderr
    assert f"approved {approval_id}" in res.stdout
    bot.finish()
    assert bot.proc.returncode == 0 and bot.lines[-1] == "0"
    assert not exists(env.pg, 1)
    events = final_events(env.daemon, approval_id)
    assert [e["event"] for e in events] == ["requested", "approved"]
    approved = events[1]
    assert (approved["operator"], approved["operator_uid"], approved["reason"]) == ("root", 0, "ticket 42")
    assert approved["waited_ms"] > 0 and approved["identity"] == "orders-bot" and approved["target"] == "orders"
    # The approval names the audited request it held.
    req = env.daemon.audit_sql("SELECT text, decision, rows FROM requests WHERE request_id = ?",
                               [approved["request_id"]])
    assert req == [{"text": "DELETE FROM ledger WHERE id = 1", "decision": "approve", "rows": 1}]
    # The webhook: first attempt refused by the receiver, retried, then recorded as notified.
    attempts = wait_until(lambda: len(env.hook.attempts(approval_id)) >= 2 and env.hook.attempts(approval_id),
                          what="the webhook retry")
    for body in attempts:
        assert body["botwarden"]["identity"] == "orders-bot" and approval_id in body["text"]
        assert "DELETE" not in json.dumps(body) and "ledger WHERE" not in json.dumps(body)
    wait_until(lambda: any(e["event"] == "notified" and "webhook" in e["reason"]
                           for e in approval_events(env.daemon, approval_id)), what="notified row")


def test_watch_sees_the_request_at_once_then_deny_tells_the_bot_why(env):
    watch = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(env.config), "approvals",
                              "watch"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert json.loads(watch.stdout.readline())["event"] == "hello"
        bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 2",
                  "SELECT count(*) FROM ledger WHERE id = 2")
        while True:
            event = json.loads(watch.stdout.readline())
            if event["event"] == "requested":
                break
        approval_id = event["approval"]["approval_id"]
        assert event["approval"]["request"] == "DELETE FROM ledger WHERE id = 2"
        assert bot.wait_held() == approval_id
        res = cli("--config", str(env.config), "approvals", "deny", approval_id, "--reason",
                  "change freeze until friday")
        assert res.returncode == 0 and f"denied {approval_id}" in res.stdout
        while True:
            event = json.loads(watch.stdout.readline())
            if event["event"] == "denied":
                break
        assert event["approval"]["approval_id"] == approval_id
    finally:
        watch.terminate()
        watch.wait(10)
    bot.finish()
    assert "ERROR:  botwarden: statement denied by root: change freeze until friday" in bot.stderr
    assert bot.lines[-1] == "1"  # the next statement ran: the session stayed usable
    assert exists(env.pg, 2)
    events = final_events(env.daemon, approval_id)
    assert [(e["event"], e["operator"], e["reason"]) for e in events] == [
        ("requested", None, None), ("denied", "root", "change freeze until friday")]
    watchers = [e for e in approval_events(env.daemon, approval_id)
                if e["event"] == "notified" and "watcher" in (e["reason"] or "")]
    assert watchers, "delivery to the watcher was not recorded"
    req = env.daemon.audit_sql("SELECT decision, reason, sqlstate FROM requests WHERE request_id = ?",
                               [events[0]["request_id"]])
    assert req[0]["decision"] == "deny" and req[0]["sqlstate"] == "42501"
    assert "change freeze until friday" in req[0]["reason"]


# -- PostgreSQL resumes exactly where it was held ------------------------------------------------------


def test_simple_protocol_in_a_transaction_resumes_then_commits_or_rolls_back(env):
    # ROLLBACK: the approved DELETE ran inside the transaction and is undone with it.
    bot = Bot(env.port, env.bao.mint_token(), script=(
        "BEGIN;\nDELETE FROM ledger WHERE id = 6;\nSELECT count(*) FROM ledger WHERE id = 6;\nROLLBACK;\n"
        "SELECT count(*) FROM ledger WHERE id = 6;\n"))
    env.client.post(f"/v1/approvals/{bot.wait_held()}/approve", {})
    bot.finish()
    assert bot.lines == ["0", "1"], bot.stderr
    assert exists(env.pg, 6)
    # COMMIT, with the server's idle_in_transaction_session_timeout shorter than the wait: the
    # held session is kept alive and nothing else fires while the operator takes their time.
    bot = Bot(env.port, env.bao.mint_token(), script=(
        "BEGIN;\nSET LOCAL idle_in_transaction_session_timeout = '3s';\nDELETE FROM ledger WHERE id = 7;\n"
        "SELECT count(*) FROM ledger WHERE id = 7;\nCOMMIT;\nSELECT 'after', count(*) FROM ledger WHERE id = 7;\n"))
    approval_id = bot.wait_held()
    time.sleep(4.5)  # longer than the server's idle-in-transaction limit
    assert bot.proc.poll() is None and approval_id in pending(env.client)
    env.client.post(f"/v1/approvals/{approval_id}/approve", {})
    bot.finish()
    assert "terminating connection" not in bot.stderr and bot.proc.returncode == 0, bot.stderr
    assert bot.lines == ["0", "after|0"], bot.stderr
    assert not exists(env.pg, 7)


def test_extended_protocol_resumes_in_a_transaction(env):
    notices: list[str] = []
    with connect(env) as conn:  # psycopg: server-side binding, Parse/Bind/Execute/Sync
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        cur = conn.cursor()
        cur.execute("SELECT 1")  # the transaction is open
        before = set(pending(env.client))
        done = in_thread(lambda: cur.execute("DELETE FROM ledger WHERE id = %s", [4]).rowcount)
        item = wait_pending(env.client, before)
        assert item["request"] == "DELETE FROM ledger WHERE id = $1"  # the Parse was held, not a text
        env.client.post(f"/v1/approvals/{item['approval_id']}/approve", {})
        assert done() == 1
        assert exists(env.pg, 4)  # not committed yet
        conn.commit()
        assert not exists(env.pg, 4)
        assert any(item["approval_id"] in n and "held for approval" in n for n in notices)

        before = set(pending(env.client))
        done = in_thread(lambda: cur.execute("DELETE FROM ledger WHERE id = %s", [5]).rowcount)
        item = wait_pending(env.client, before)  # no window was granted: held again
        env.client.post(f"/v1/approvals/{item['approval_id']}/approve", {})
        assert done() == 1
        conn.rollback()
        assert exists(env.pg, 5)
        cur.execute("SELECT count(*) FROM ledger WHERE id IN (4, 5)")
        assert cur.fetchone() == (1,)


def test_denied_in_a_transaction_aborts_it_like_postgres_and_the_session_recovers(env):
    with connect(env) as conn:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        before = set(pending(env.client))
        done = in_thread(lambda: cur.execute("DELETE FROM ledger WHERE id = %s", [3]))
        item = wait_pending(env.client, before)
        env.client.post(f"/v1/approvals/{item['approval_id']}/deny", {"reason": "wrong ledger"})
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as denied:
            done()
        assert "denied by root: wrong ledger" in str(denied.value)
        assert denied.value.diag.message_detail == f"approval {item['approval_id']}"
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            cur.execute("SELECT 1")
        conn.rollback()
        cur.execute("SELECT count(*) FROM ledger WHERE id = 3")
        assert cur.fetchone() == (1,)
    assert exists(env.pg, 3)


# -- abandon, windows, operators, CLI --------------------------------------------------------------------


def test_client_disconnect_while_held_is_abandoned(env):
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 8")
    approval_id = bot.wait_held()
    bot.proc.kill()
    bot.finish()
    wait_until(lambda: approval_id not in pending(env.client), what="the request to be withdrawn")
    events = final_events(env.daemon, approval_id)
    assert [e["event"] for e in events] == ["requested", "abandoned"]
    assert "disconnected" in events[1]["reason"] and events[1]["operator"] is None
    assert exists(env.pg, 8)
    res = cli("--config", str(env.config), "approvals", "approve", approval_id)
    assert res.returncode == 1 and "no pending approval" in res.stderr


def test_ctrl_c_while_held_withdraws_the_request_and_the_session_goes_on(env):
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 9",
              "SELECT count(*) FROM ledger WHERE id = 9")
    approval_id = bot.wait_held()
    bot.proc.send_signal(signal.SIGINT)  # psql sends a CancelRequest on its own connection
    bot.finish()
    assert "ERROR:  botwarden: canceling statement due to user request" in bot.stderr, bot.stderr
    assert exists(env.pg, 9) and approval_id not in pending(env.client)
    events = final_events(env.daemon, approval_id)
    assert [(e["event"], e["reason"]) for e in events] == [
        ("requested", None), ("abandoned", "the client cancelled the statement while it was held")]
    # A driver's cancel does the same, and its session goes on.
    with connect(env, autocommit=True) as conn:
        before = set(pending(env.client))
        done = in_thread(lambda: conn.execute("DELETE FROM ledger WHERE id = %s", [9]))
        wait_pending(env.client, before)
        conn.cancel()
        with pytest.raises(psycopg.errors.QueryCanceled):
            done()
        assert conn.execute("SELECT count(*) FROM ledger WHERE id = 9").fetchone() == (1,)


def test_window_lets_the_same_shape_through_until_it_ends(env):
    # Shapes only this test uses (a window is per identity, target and statement shape).
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 10 AND note = 'row 10'")
    first = bot.wait_held()
    res = cli("--config", str(env.config), "approvals", "approve", first, "--for", "15m")
    assert res.returncode == 0 and "window 900s" in res.stdout
    bot.finish()
    # Same shape (other constants, spacing, case) in a new session: runs without asking.
    bot = Bot(env.port, env.bao.mint_token(), "delete  from LEDGER where id = 11 and NOTE = 'row 11'",
              "SELECT count(*) FROM ledger WHERE id = 11")
    bot.finish()
    assert "held for approval" not in bot.stderr and bot.lines == ["DELETE 1", "0"], bot.stderr
    through = [e for e in env.daemon.audit_sql(
        "SELECT approval_id, reason, window_s, operator FROM approvals WHERE event = 'approved' AND reason LIKE ?",
        [f"%granted with {first}%"])]
    assert len(through) == 1 and through[0]["window_s"] == 900 and through[0]["operator"] == "root"
    # Another shape is still held.
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE note = 'row 12'")
    other = bot.wait_held()
    env.client.post(f"/v1/approvals/{other}/deny", {"reason": "not in the window"})
    bot.finish()
    assert exists(env.pg, 12)
    # A short window ends: the same shape is held again afterwards.
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id > 58 AND note <> ''")
    short = bot.wait_held()
    assert cli("--config", str(env.config), "approvals", "approve", short, "--for", "2s").returncode == 0
    granted = time.monotonic()  # the window started before the CLI returned
    bot.finish()
    time.sleep(max(0.0, 2.2 - (time.monotonic() - granted)))
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id > 57 AND note <> 'x'")
    again = bot.wait_held()
    env.client.post(f"/v1/approvals/{again}/deny", {"reason": "window over"})
    bot.finish()
    assert exists(env.pg, 58)


def test_a_reload_keeps_pending_requests_and_windows(env):
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 14 AND note LIKE 'row%'")
    first = bot.wait_held()
    res = cli("--config", str(env.config), "config", "reload")
    assert res.returncode == 0, res.stderr
    assert first in pending(env.client)  # still held, and decided through the new runtime
    assert cli("--config", str(env.config), "approvals", "approve", first, "--for", "10m").returncode == 0
    bot.finish()
    assert not exists(env.pg, 14)
    assert cli("--config", str(env.config), "config", "reload").returncode == 0
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 15 AND note LIKE 'x%'")
    bot.finish()  # the window granted before the reload still applies
    assert "held for approval" not in bot.stderr and bot.proc.returncode == 0, bot.stderr


def test_operator_mapped_to_the_identity_cannot_approve_another_operator_can(env):
    st = os.stat(env.daemon.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY.pw_gid
    bot = Bot(env.port, env.bao.mint_token(), "DELETE FROM ledger WHERE id = 13")
    approval_id = bot.wait_held()
    status, doc = as_user(NOBODY.pw_uid, NOBODY.pw_gid, env.daemon.socket, "GET", "/v1/approvals")
    assert status == 200 and approval_id in {a["approval_id"] for a in doc["approvals"]}
    status, doc = as_user(NOBODY.pw_uid, NOBODY.pw_gid, env.daemon.socket, "POST",
                          f"/v1/approvals/{approval_id}/approve", {})
    assert status == 403 and "nobody" in doc["error"] and "orders-bot" in doc["error"]
    assert approval_id in pending(env.client)
    status, doc = as_user(OTHER_OPERATOR.pw_uid, NOBODY.pw_gid, env.daemon.socket, "POST",
                          f"/v1/approvals/{approval_id}/approve", {"reason": "checked"})
    assert status == 200 and doc["state"] == "approved"
    bot.finish()
    assert not exists(env.pg, 13)
    events = final_events(env.daemon, approval_id)
    assert [(e["event"], e["operator"], e["operator_uid"]) for e in events] == [
        ("requested", None, None), ("decision_refused", NOBODY.pw_name, NOBODY.pw_uid),
        ("approved", OTHER_OPERATOR.pw_name, OTHER_OPERATOR.pw_uid)]
    assert "(operator_uids)" in events[1]["reason"]


def test_cli_exit_codes(env):
    for args in (("approve", "nope0000"), ("deny", "nope0000", "--reason", "x")):
        res = cli("--config", str(env.config), "approvals", *args)
        assert res.returncode == 1 and "no pending approval 'nope0000'" in res.stderr
    assert cli("--config", str(env.config), "approvals", "deny", "nope0000").returncode == 2  # --reason
    assert cli("--config", str(env.config), "approvals", "approve", "x", "--for", "0m").returncode == 2
    assert cli("--config", str(env.config), "approvals", "approve", "x", "--for", "soon").returncode == 2
    res = cli("--config", str(env.config), "approvals", "approve", "x", "--for", "2d")
    assert res.returncode == 1 and "at most 86400 seconds" in res.stderr
    res = cli("--config", str(env.config), "approvals", "list", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []
    res = cli("--socket", str(env.workdir / "nothing.sock"), "approvals", "list")
    assert res.returncode == 3 and "not running" in res.stderr


# -- dedicated daemons: timeout, N-of-M, restart ------------------------------------------------------


def test_timeout_denies_and_the_session_stays_usable(pg_server, bao_server, tmp_path):
    seed_ledger(pg_server)
    setup = fresh_setup(bao_server, pg_server, tmp_path)
    port = new_port()
    config, socket_path = make_config(tmp_path / "bw.toml", workdir=tmp_path, pg=pg_server, bao=setup, port=port,
                                      approvals="timeout_s = 2\n")
    daemon = DaemonProcess(config, socket_path).start()
    try:
        bot = Bot(port, setup.mint_token(), "DELETE FROM ledger WHERE id = 20",
                  "SELECT count(*) FROM ledger WHERE id = 20")
        approval_id = bot.wait_held()
        bot.finish()
        assert f"statement not approved: approval {approval_id} timed out after 2s" in bot.stderr
        assert bot.lines[-1] == "1" and exists(pg_server, 20)
        events = final_events(daemon, approval_id)
        assert [e["event"] for e in events] == ["requested", "expired"]
        assert events[1]["operator"] is None and events[1]["waited_ms"] >= 2000
    finally:
        daemon.stop()


def test_two_operators_then_restart_denies_pending_and_kill_9_is_swept(pg_server, bao_server, tmp_path):
    seed_ledger(pg_server)
    setup = fresh_setup(bao_server, pg_server, tmp_path)
    port = new_port()
    config, socket_path = make_config(tmp_path / "bw.toml", workdir=tmp_path, pg=pg_server, bao=setup, port=port,
                                      approvals="timeout_s = 60\napprovers_required = 2\n")
    daemon = DaemonProcess(config, socket_path).start()
    try:
        # N-of-M: root alone is not enough, twice is refused, a second operator completes it.
        bot = Bot(port, setup.mint_token(), "DELETE FROM ledger WHERE id = 30")
        two = bot.wait_held()
        res = cli("--config", str(config), "approvals", "approve", two)
        assert res.returncode == 0 and "1 of 2 approvals recorded" in res.stdout
        assert bot.proc.poll() is None and exists(pg_server, 30)
        res = cli("--config", str(config), "approvals", "approve", two)
        assert res.returncode == 1 and "already approved" in res.stderr
        status, doc = as_user(OTHER_OPERATOR.pw_uid, NOBODY.pw_gid, daemon.socket, "POST",
                              f"/v1/approvals/{two}/approve", {})
        assert status == 200 and doc["state"] == "approved"
        bot.finish()
        assert not exists(pg_server, 30)
        assert [(e["event"], e["operator"]) for e in final_events(daemon, two)] == [
            ("requested", None), ("approved_partial", "root"), ("approved", OTHER_OPERATOR.pw_name)]

        # SIGTERM with a request pending: denied, recorded, and the bot is told why.
        bot = Bot(port, setup.mint_token(), "DELETE FROM ledger WHERE id = 31")
        restarted = bot.wait_held()
        assert daemon.stop() == 0
        bot.finish()
        assert "statement not run: botwarden is shutting down" in bot.stderr, bot.stderr
        assert exists(pg_server, 31)
        con = duckdb.connect(str(tmp_path / "state" / "audit.duckdb"), read_only=True)
        try:
            rows = con.execute("SELECT event, reason FROM approvals WHERE approval_id = ? ORDER BY chain_seq",
                               [restarted]).fetchall()
        finally:
            con.close()
        assert [r[0] for r in rows] == ["requested", "cancelled_restart"] and "shutting down" in rows[1][1]

        # kill -9 with a request pending: the next start records it as cancelled_restart.
        daemon.start()
        bot = Bot(port, setup.mint_token(), "DELETE FROM ledger WHERE id = 32")
        lost = bot.wait_held()
        daemon.client().post("/v1/audit/flush")  # the `requested` row is durable
        daemon.proc.kill()
        daemon.proc.wait(10)
        bot.finish()
        assert exists(pg_server, 32)
        daemon.start()
        events = wait_until(lambda: len(final_events(daemon, lost)) > 1 and final_events(daemon, lost),
                            what="the start-up sweep")
        assert [e["event"] for e in events] == ["requested", "cancelled_restart"]
        assert "did not shut down cleanly" in events[1]["reason"]
        assert [e["event"] for e in final_events(daemon, restarted)] == ["requested", "cancelled_restart"]
    finally:
        daemon.stop()
