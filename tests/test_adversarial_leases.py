"""Issue 26.3, adversarial: database users must not outlive failures.

A real daemon (`botwarden run`), a real PostgreSQL 15 and an OpenBao dev server of this module's
own (it is paused with SIGSTOP to play "Vault is down": a paused server accepts connections and
answers nothing, as a hung Vault does). The dynamic PostgreSQL role of each session is looked up
in pg_roles: it must be gone after a revocation that first failed, and after the daemon was
killed with SIGKILL and started again.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from appliance.sandbox import OpenBaoServer
from tests.approvals_fixtures import cli, wait_until
from tests.daemon_fixtures import PSQL, DaemonProcess, fresh_setup, new_port, write_config
from tests.servers import pause

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def own_bao():
    server = OpenBaoServer(root_token="bw-leases-root").start()
    try:
        yield server
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)  # never leave it paused
        server.stop()


@pytest.fixture
def env(pg_server, own_bao, tmp_path):
    setup = fresh_setup(own_bao, pg_server, tmp_path)
    port = new_port()
    config = write_config(tmp_path / "botwarden.toml", workdir=tmp_path, pg=pg_server, bao=setup, listen_port=port)
    # A hung Vault is noticed after a second, not after hvac's default.
    config.write_text(config.read_text().replace('auth = "approle"\n', 'auth = "approle"\ntimeout = 1.0\n', 1))
    daemon = DaemonProcess(config, tmp_path / "run" / "control.sock").start()
    try:
        yield type("Env", (), {"pg": pg_server, "bao": setup, "server": own_bao, "port": port, "config": config,
                               "daemon": daemon, "state": tmp_path / "state"})
    finally:
        os.killpg(own_bao.proc.pid, signal.SIGCONT)
        daemon.stop()


class IdleBot:
    """psql holding one session open (statements are written to its stdin)."""

    def __init__(self, port: int, token: str):
        env = {**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
        self.proc = subprocess.Popen([PSQL, "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U", "orders-bot",
                                      "-d", "postgres"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.proc.stdin.write("SELECT 1;\n")
        self.proc.stdin.flush()

    def end(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def role_exists(pg, name: str) -> bool:
    return pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "1"


def the_session(daemon: DaemonProcess) -> dict:
    return wait_until(lambda: (daemon.client().get("/v1/sessions")["sessions"] or [None])[0], 20, "an open session")


def ledger(state: Path) -> list[str]:
    path = state / "leases.json"
    return json.loads(path.read_text())["leases"] if path.exists() else []


def session_row(daemon: DaemonProcess, session_id: str) -> dict:
    rows = daemon.audit_sql("SELECT outcome, error, bytes_in, ended_at FROM sessions WHERE session_id = ?",
                            [session_id])
    return rows[0] if rows else {}


def test_vault_down_at_session_end_revocation_is_retried_until_the_role_is_gone(env):
    bot = IdleBot(env.port, env.bao.mint_token())
    live = the_session(env.daemon)
    user, lease, sid = live["credential_user"], live["lease_id"], live["session_id"]
    assert role_exists(env.pg, user)
    # Held on disk while the session runs: the lease id, never the credential.
    path = env.state / "leases.json"
    assert lease in ledger(env.state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(json.loads(path.read_text())) == {"leases"}
    pause(env.server.proc.pid, group=True)  # Vault hangs
    try:
        bot.end()
        status = wait_until(lambda: (s := env.daemon.client().get("/v1/status"))["revocations_pending"] and s,
                            30, "a pending revocation in status")
        assert [p["lease_id"] for p in status["revocations_pending"]] == [lease]
        assert status["revocations_pending"][0]["session_id"] == sid
        assert role_exists(env.pg, user)  # the database user is still there ...
        assert lease in ledger(env.state)  # ... and botwarden has not forgotten it
        row = wait_until(lambda: session_row(env.daemon, sid).get("outcome") == "revoke_failed"
                         and session_row(env.daemon, sid), 20, "the session row saying revoke_failed")
        assert lease in row["error"] and "not revoked at session end" in row["error"]
        assert row["bytes_in"] and row["bytes_in"] > 0  # the amending row keeps the session's own facts
    finally:
        os.killpg(env.server.proc.pid, signal.SIGCONT)  # Vault is back
    wait_until(lambda: not role_exists(env.pg, user), 90, f"role {user} revoked by a retry")
    wait_until(lambda: not env.daemon.client().get("/v1/status")["revocations_pending"], 20, "no pending revocation")
    assert lease not in ledger(env.state)
    row = wait_until(lambda: "revoked" in (session_row(env.daemon, sid).get("error") or "").split("; ")[-1]
                     and session_row(env.daemon, sid), 20, "the row saying the lease was revoked late")
    assert row["outcome"] == "revoke_failed" and "later, at attempt" in row["error"]


def test_status_lists_pending_revocations(env):
    bot = IdleBot(env.port, env.bao.mint_token())
    live = the_session(env.daemon)
    pause(env.server.proc.pid, group=True)
    try:
        bot.end()
        wait_until(lambda: env.daemon.client().get("/v1/status")["revocations_pending"], 30, "a pending revocation")
        res = cli("--config", str(env.config), "status")
        assert res.returncode == 0, res.stderr
        assert "credential revocations pending: 1" in res.stdout
        assert f"lease {live['lease_id']} session {live['session_id']}" in res.stdout
    finally:
        os.killpg(env.server.proc.pid, signal.SIGCONT)
    wait_until(lambda: not role_exists(env.pg, live["credential_user"]), 90, "role revoked by a retry")


def test_kill_9_orphan_lease_is_revoked_and_session_closed_at_restart(env):
    bot = IdleBot(env.port, env.bao.mint_token())
    live = the_session(env.daemon)
    user, lease, sid = live["credential_user"], live["lease_id"], live["session_id"]
    audit_pid = env.daemon.client().get("/v1/status")["audit"]["pid"]
    env.daemon.client().post("/v1/audit/flush")
    env.daemon.proc.kill()  # SIGKILL: nothing in the daemon runs
    env.daemon.proc.wait(10)
    wait_until(lambda: not Path(f"/proc/{audit_pid}").exists(), 30, "the audit process to finish")
    bot.end()  # psql notices the lost connection only now; nothing is left to revoke it
    assert role_exists(env.pg, user)  # nobody revoked it
    assert lease in ledger(env.state)
    started = time.monotonic()
    env.daemon.start()  # the same config and state dir
    wait_until(lambda: not role_exists(env.pg, user), 60, f"role {user} revoked at restart")
    print(f"orphan lease revoked {time.monotonic() - started:.1f}s after the restart began (its TTL: 300 s)")
    # The ledger entry goes once the revocation returned, just after the role is gone.
    wait_until(lambda: lease not in ledger(env.state), 20, "the lease out of the ledger")
    row = wait_until(lambda: session_row(env.daemon, sid).get("outcome") == "crashed" and session_row(env.daemon, sid),
                     20, "the session closed as crashed")
    assert "stopped without ending this session" in row["error"] and "lease was revoked then" in row["error"]
    assert row["ended_at"] is not None


def test_lease_ledger_is_atomic_private_and_survives_a_bad_file(tmp_path, caplog):
    from appliance.secrets import LeaseLedger

    old = os.umask(0)  # the file is 0600 whatever umask the daemon runs with
    try:
        ledger_ = LeaseLedger.in_state_dir(tmp_path / "state")
        ledger_.add("database/creds/r/abc")
        ledger_.add("database/creds/r/def")
        ledger_.remove("database/creds/r/abc")
    finally:
        os.umask(old)
    path = tmp_path / "state" / "leases.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"leases": ["database/creds/r/def"]}
    assert [p.name for p in path.parent.iterdir()] == ["leases.json"]  # no temporary file left
    assert LeaseLedger(path).ids() == ["database/creds/r/def"]  # what a restart reads
    path.write_text("{not json")
    assert LeaseLedger(path).ids() == []  # a damaged file does not keep the daemon from starting ...
    assert "lease ledger" in caplog.text and "not valid" in caplog.text  # ... and it says so
