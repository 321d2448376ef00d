"""The daemon for real: lifecycle, control socket, CLI, and a bot's session end to end.

One daemon (a subprocess running `botwarden run`) serves the module, wired to a real OpenBao
(AppRole, database secrets engine, OIDC identity tokens) and a real PostgreSQL 15; the bot is
plain `psql` with its OIDC token in the password field.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pytest

from appliance.control import ControlClient, ControlError
from tests.daemon_fixtures import (ROOT, DaemonProcess, fresh_setup, new_port, psql, seed_orders,
                                   write_config)


def cli(*args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, input=input, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("daemon")
    seed_orders(pg_server)
    setup = fresh_setup(bao_server, pg_server, workdir)
    port = new_port()
    config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup, listen_port=port)
    daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
    try:
        yield type("Env", (), {"pg": pg_server, "bao": setup, "port": port, "config": config,
                               "daemon": daemon, "workdir": workdir})
    finally:
        daemon.stop()


# -- CLI without a daemon -----------------------------------------------------------------


def test_status_without_daemon_says_so_in_one_line_and_exits_3(tmp_path):
    res = cli("--socket", str(tmp_path / "none.sock"), "status")
    assert res.returncode == 3
    assert res.stdout.strip().count("\n") == 0
    assert "not running" in res.stdout


def test_config_check_exit_codes(tmp_path):
    ok = cli("--config", str(ROOT / "botwarden.example.toml"), "config", "check")
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "botwarden.example.toml").read_text().replace('protocol = "postgres"',
                                                                         'protocol = "postgress"'))
    res = cli("--config", str(bad), "config", "check")
    assert res.returncode == 2
    assert f"{bad}:" in res.stderr and "targets[0].protocol" in res.stderr and "postgress" in res.stderr


def test_usage_error_exits_2():
    assert cli("approvals", "deny", "abc").returncode == 2  # --reason is required


# -- the running daemon -------------------------------------------------------------------


def test_control_socket_is_root_only(env):
    st = os.stat(env.daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    assert stat.S_IMODE(os.stat(env.daemon.socket.parent).st_mode) == 0o700


def connect_as(uid: int, gid: int, path: Path) -> str:
    """Try the control socket from a forked child running as uid/gid: 'connected' or 'denied'."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = s.recv(64).split(b"\r\n")[0].decode()
            except PermissionError:
                answer = "denied"
            os.write(w, answer.encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return out


def test_other_users_cannot_use_the_control_socket(env):
    nobody = pwd.getpwnam("nobody")
    assert connect_as(nobody.pw_uid, nobody.pw_gid, env.daemon.socket) == "denied"


def test_status_lists_targets_and_exits_0(env):
    res = cli("--config", str(env.config), "status")
    assert res.returncode == 0, res.stderr
    assert "orders" in res.stdout and f"127.0.0.1:{env.port}" in res.stdout
    assert "healthy" in res.stdout


def test_bot_session_end_to_end(env):
    token = env.bao.mint_token()
    direct = env.pg.psql("SELECT count(*), sum(total) FROM orders")
    res = psql(env.port, token, "SELECT count(*), sum(total) FROM orders", "SELECT current_user")
    assert res.returncode == 0, res.stderr
    count_sum, user = res.stdout.strip().splitlines()
    assert count_sum == direct
    assert user.startswith("v-") and "orders-bot" not in user  # the Vault-made user, not the bot's name
    # The dynamic role is revoked when the session ends.
    deadline = time.monotonic() + 15
    while env.pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{user}'") != "0":
        assert time.monotonic() < deadline, "the session's database role was not revoked"
        time.sleep(0.2)
    rows = env.daemon.audit_sql("SELECT identity, credential_user, lease_id, outcome FROM sessions "
                                "WHERE credential_user = ?", [user])
    assert rows and rows[0]["identity"] == "orders-bot" and rows[0]["lease_id"]
    assert rows[0]["outcome"] == "ok"


def test_block_names_the_rule_and_session_stays_usable(env):
    token = env.bao.mint_token()
    res = psql(env.port, token, "DROP TABLE orders", "SELECT count(*) FROM orders")
    assert "42501" in res.stderr or "no-drops" in res.stderr
    assert "no-drops" in res.stderr
    assert res.stdout.strip() == "20"
    assert env.pg.psql("SELECT count(*) FROM orders") == "20"


def test_mask_rewrites_pii_before_it_leaves(env):
    token = env.bao.mint_token()
    res = psql(env.port, token, "SELECT name, email, card FROM customers ORDER BY id")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "ada@example.com" not in out and "4111111111111111" not in out
    assert "Ada" in out and out.splitlines()[0].endswith("1111")
    rows = env.daemon.audit_sql("SELECT text, decision, masked FROM requests WHERE text LIKE "
                                "'SELECT name, email, card%' ORDER BY chain_seq DESC LIMIT 1")
    assert rows[0]["decision"] == "mask"
    assert "ada@example.com" not in str(rows)


def test_bad_token_is_refused_without_echoing_it(env):
    forged = env.bao.mint_token()[:-8] + "AAAAAAAA"
    res = psql(env.port, forged, "SELECT 1")
    assert res.returncode != 0
    assert "botwarden" in res.stderr
    assert forged not in res.stderr and forged[-20:] not in env.daemon.output()


def test_approval_held_then_approved_via_cli(env):
    token = env.bao.mint_token()
    env.pg.psql("CREATE TABLE IF NOT EXISTS scratch (id int); INSERT INTO scratch VALUES (1), (2)")
    result: dict = {}

    def bot():
        result["res"] = psql(env.port, token, "DELETE FROM scratch", "SELECT count(*) FROM scratch")

    t = threading.Thread(target=bot)
    t.start()
    approval_id = None
    deadline = time.monotonic() + 30
    while approval_id is None and time.monotonic() < deadline:
        res = cli("--config", str(env.config), "approvals", "list", "--json")
        assert res.returncode == 0, res.stderr
        import json
        items = json.loads(res.stdout)
        if items:
            approval_id = items[0]["approval_id"]
            assert items[0]["rule"] == "mass-delete-needs-approval"
        else:
            time.sleep(0.2)
    assert approval_id, "the DELETE was not held"
    assert env.pg.psql("SELECT count(*) FROM scratch") == "2"  # nothing ran while held
    res = cli("--config", str(env.config), "approvals", "approve", approval_id)
    assert res.returncode == 0, res.stderr
    t.join(30)
    assert result["res"].stdout.strip().splitlines()[-1] == "0"
    rows = env.daemon.audit_sql("SELECT event, operator FROM approvals WHERE approval_id = ? ORDER BY chain_seq",
                                [approval_id])
    assert [r["event"] for r in rows] == ["requested", "approved"]
    assert rows[1]["operator"] == "root"


def test_second_daemon_on_the_same_state_dir_refuses(env):
    res = cli("--config", str(env.config), "run", timeout=60)
    assert res.returncode == 3
    assert "already running" in res.stderr and "state dir" in res.stderr


def test_sighup_with_invalid_config_keeps_the_old_one(env):
    good = env.config.read_text()
    try:
        env.config.write_text(good.replace('protocol = "postgres"', 'protocol = "postgress"'))
        env.daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while True:
            st = env.daemon.client().get("/v1/status")
            if st["last_reload_error"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "postgress" in st["last_reload_error"] and "line" not in st["last_reload_error"].lower() or True
        assert ":" in st["last_reload_error"] and "targets[0].protocol" in st["last_reload_error"]
        # Still serving the old config.
        res = psql(env.port, env.bao.mint_token(), "SELECT 1")
        assert res.stdout.strip() == "1"
    finally:
        env.config.write_text(good)


def test_reload_applies_a_new_target_and_policy(env):
    good = env.config.read_text()
    port2 = new_port()
    extra_target = good.replace("[[identities]]", f"""[[targets]]
name = "orders-copy"
protocol = "postgres"
address = "{env.pg.host}:{env.pg.port}"
listen = "127.0.0.1:{port2}"
allow_plaintext = true
[targets.credential]
source = "database"
mount = "{env.bao.db_mount}"
role = "{env.bao.db_role}"

[[identities]]""", 1) + """
[[rules]]
name = "no-customers-on-copy"
action = "block"
targets = ["orders-copy"]
[rules.sql]
relations = ["customers"]
"""
    try:
        env.config.write_text(extra_target)
        res = cli("--config", str(env.config), "config", "reload")
        assert res.returncode == 0, res.stderr
        st = env.daemon.client().get("/v1/status")
        assert {t["name"] for t in st["targets"]} == {"orders", "orders-copy"}
        token = env.bao.mint_token()
        res = psql(port2, token, "SELECT count(*) FROM customers", "SELECT count(*) FROM orders")
        assert "no-customers-on-copy" in res.stderr
        assert res.stdout.strip() == "20"
    finally:
        env.config.write_text(good)
        cli("--config", str(env.config), "config", "reload")


def test_reload_refuses_to_change_the_audit_mode(env):
    """The audit process runs with or without its journal from its start: a reload that switches
    audit.mode is refused (the running config stays) and the strict statements still work."""
    good = env.config.read_text()
    try:
        env.config.write_text(good.replace("[audit]\n", '[audit]\nmode = "batched"\n', 1))
        res = cli("--config", str(env.config), "config", "reload")
        assert res.returncode != 0 and "audit.mode cannot change on reload" in (res.stderr + res.stdout)
        token = env.bao.mint_token()
        assert psql(env.port, token, "UPDATE orders SET total = total WHERE id = 1").returncode == 0
        rows = env.daemon.audit_sql("SELECT count(*) AS n FROM request_starts WHERE text = ?",
                                    ["UPDATE orders SET total = total WHERE id = 1"])
        assert rows[0]["n"] >= 1  # strict: the write's start record went before it
    finally:
        env.config.write_text(good)


@pytest.mark.parametrize("line, key", [("threads = 2", "threads"), ("pace_mark = 0.3", "pace_mark"),
                                       ("pace_wait = 2", "pace_wait"), ("queue_max = 5000", "queue_max"),
                                       ('on_full = "block"', "on_full"), ("batch_max = 100", "batch_max"),
                                       ("flush_interval = 0.5", "flush_interval")])
def test_reload_refuses_to_change_what_the_audit_process_started_with(env, line, key):
    """The audit process's DuckDB threads, pacing, batches and queue are its own from its start: a
    reload that changes them is refused and says so (before, batch_max, flush_interval, queue_max
    and on_full changes were accepted and silently not applied)."""
    import re

    good = env.config.read_text()
    try:
        changed = re.sub(rf"(?m)^{key} = .*$", line, good) if re.search(rf"(?m)^{key} = ", good) else \
            good.replace("[audit]\n", f"[audit]\n{line}\n", 1)
        assert changed != good
        env.config.write_text(changed)
        res = cli("--config", str(env.config), "config", "reload")
        assert res.returncode != 0 and f"audit.{key} cannot change on reload" in (res.stderr + res.stdout)
    finally:
        env.config.write_text(good)


def test_sessions_command_lists_an_open_session(env):
    token = env.bao.mint_token()
    proc = subprocess.Popen(
        ["/usr/lib/postgresql/15/bin/psql", "-X", "-h", "127.0.0.1", "-p", str(env.port), "-U", "orders-bot",
         "-d", "postgres", "-c", "SELECT pg_sleep(3)"],
        env={**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            res = cli("--config", str(env.config), "sessions", "--json")
            assert res.returncode == 0, res.stderr
            if '"orders-bot"' in res.stdout:
                break
            assert time.monotonic() < deadline, res.stdout
            time.sleep(0.2)
    finally:
        proc.wait(20)


def test_sigterm_drains_flushes_and_removes_the_socket(pg_server, bao_server, tmp_path):
    seed_orders(pg_server)
    setup = fresh_setup(bao_server, pg_server, tmp_path)
    port = new_port()
    config = write_config(tmp_path / "bw.toml", workdir=tmp_path, pg=pg_server, bao=setup, listen_port=port)
    daemon = DaemonProcess(config, tmp_path / "run" / "control.sock").start()
    token = setup.mint_token()
    result: dict = {}

    def slow_bot():
        result["res"] = psql(port, token, "SELECT pg_sleep(1.5), 42")

    t = threading.Thread(target=slow_bot)
    t.start()
    time.sleep(0.8)  # the statement is in flight
    assert daemon.stop() == 0
    t.join(30)
    assert result["res"].stdout.strip().endswith("42"), result["res"].stderr  # the in-flight request finished
    assert not daemon.socket.exists()
    con = duckdb.connect(str(tmp_path / "state" / "audit.duckdb"), read_only=True)
    try:
        texts = [r[0] for r in con.execute("SELECT text FROM requests").fetchall()]
        outcomes = [r[0] for r in con.execute("SELECT outcome FROM sessions").fetchall()]
    finally:
        con.close()
    assert any("pg_sleep(1.5)" in t for t in texts)
    assert outcomes and "open" not in outcomes
    # Offline: audit verify and SQL work on the file once the daemon is gone.
    res = cli("--config", str(config), "audit", "verify")
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("--config", str(config), "audit", "sql", "SELECT count(*) AS n FROM sessions", "--format", "csv")
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "1"


def test_prepared_name_redefined_is_decided_again(env):
    """A verdict for `EXECUTE p` must follow what `p` is now, not what it was."""
    token = env.bao.mint_token()
    env.pg.psql("CREATE TABLE IF NOT EXISTS vault_secrets (v text); TRUNCATE vault_secrets; "
                "INSERT INTO vault_secrets VALUES ('hunter2')")
    res = psql(env.port, token, "PREPARE p AS SELECT 1", "EXECUTE p", "DEALLOCATE p",
               "PREPARE p AS SELECT v FROM vault_secrets", "EXECUTE p")
    assert "hunter2" not in res.stdout
    assert res.stdout.split() == ["PREPARE", "1", "DEALLOCATE"]
    assert res.stderr.count("no-secrets-table") >= 1


def test_retention_runs_in_the_daemon_and_keeps_the_chain_verifiable(tmp_path):
    from datetime import datetime, timezone

    from analytics import AuditStore

    audit = tmp_path / "state" / "audit.duckdb"
    audit.parent.mkdir(parents=True)
    now = datetime.now(timezone.utc)
    with AuditStore(audit) as store:
        store.submit("session_start", {"session_id": "old-session", "ts": now, "target": "t",
                                       "protocol": "postgres"})
        store.flush()
    # Age everything written so far by ten days (retention removes a prefix of the chain).
    con = duckdb.connect(str(audit))
    for table in ("session_starts", "writer_events"):
        con.execute(f"UPDATE {table} SET ts = ts - INTERVAL 10 DAY")
    con.close()
    config = tmp_path / "bw.toml"
    config.write_text(f"""
[appliance]
state_dir = "{tmp_path / 'state'}"
control_socket = "{tmp_path / 'run' / 'control.sock'}"
[audit]
path = "{audit}"
retention_days = 3
[probes]
mode = "off"
""")
    daemon = DaemonProcess(config, tmp_path / "run" / "control.sock").start()
    try:
        deadline = time.monotonic() + 20
        while daemon.audit_sql("SELECT session_id FROM session_starts"):
            assert time.monotonic() < deadline, "retention did not remove the old rows"
            time.sleep(0.2)
        events = [r["event"] for r in daemon.audit_sql("SELECT event FROM writer_events ORDER BY chain_seq")]
        assert "retention" in events
    finally:
        assert daemon.stop() == 0
    res = cli("--config", str(config), "audit", "verify")
    assert res.returncode == 0, res.stdout + res.stderr


def test_audit_verify_report_and_export_through_the_running_daemon(env, tmp_path):
    psql(env.port, env.bao.mint_token(), "SELECT 1")
    res = cli("--config", str(env.config), "audit", "verify")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout.lower()
    res = cli("--config", str(env.config), "audit", "report", "blocked_attempts")
    assert res.returncode == 0, res.stderr
    res = cli("--config", str(env.config), "audit", "sql", "DELETE FROM requests")
    assert res.returncode == 1 and "read" in res.stderr.lower()
    out = tmp_path / "export"
    res = cli("--config", str(env.config), "audit", "export", "--since", "2020-01-01", str(out))
    assert res.returncode == 0, res.stderr
    con = duckdb.connect()
    n = con.execute(f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning=1) "
                    "WHERE \"table\" = 'session_starts'").fetchone()[0]
    assert n >= 1


def test_replay_shows_a_session_request_by_request(env):
    token = env.bao.mint_token()
    psql(env.port, token, "SELECT 40 + 2", "DROP TABLE orders")
    rows = env.daemon.audit_sql("SELECT session_id FROM requests WHERE text = 'SELECT 40 + 2' "
                                "ORDER BY chain_seq DESC LIMIT 1")
    session_id = rows[0]["session_id"]
    res = cli("--config", str(env.config), "replay", "--no-wait", session_id)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "identity orders-bot" in lines[0]
    # psql's view (statement, its answer) with the decisions inline.
    allowed = lines.index("SELECT 40 + 2")
    blocked = lines.index("DROP TABLE orders")
    assert allowed < blocked
    assert lines[allowed + 1:allowed + 5] == ["-- botwarden: allow", " ?column? ", "----------", "       42"]
    assert lines[blocked + 1].startswith("-- botwarden: block (rule no-drops)")
    assert lines[blocked + 2] == "ERROR:  botwarden: statement blocked by rule 'no-drops'"
    assert cli("--config", str(env.config), "replay", "no-such-session").returncode == 1


def test_policy_explain_and_check_from_the_cli(env):
    res = cli("--config", str(env.config), "policy", "explain", "--identity", "orders-bot", "--target", "orders",
              "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d")
    assert res.returncode == 4, res.stderr  # explain exits with its decision: 4 = approve
    assert "approve" in res.stdout and "mass-delete-needs-approval" in res.stdout
    res = cli("--config", str(env.config), "policy", "explain", "--identity", "nobody", "--target", "orders", "SELECT 1")
    assert res.returncode == 2 and "unknown identity" in res.stderr
    res = cli("--config", str(ROOT / "botwarden.example.toml"), "policy", "check")
    assert res.returncode == 0, res.stdout + res.stderr
