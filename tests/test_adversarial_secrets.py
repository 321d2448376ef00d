"""Issue 14.4, secrets: OpenBao killed (SIGKILL) before and during a bot's session, against the
REAL daemon.

A dev server keeps everything in memory, so killing one loses its leases for good: these tests
run OpenBao as a deployment does, with file storage, initialised and unsealed, so that it can be
killed and started again with the same leases (``PersistentOpenBao``). The target is a real
PostgreSQL 15 whose per-session users OpenBao's database engine makes; each user is looked up
in ``pg_roles``. A hung (SIGSTOP) OpenBao at session end and ``kill -9`` of the daemon itself are
in tests/test_adversarial_leases.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import hvac
import psycopg
import pytest

from appliance.sandbox import OpenBaoServer, bao_binary, free_port, wait_for_port
from tests.adversarial_fixtures import LiveSession, session_row
from tests.approvals_fixtures import wait_until
from tests.daemon_fixtures import DaemonProcess, fresh_setup, new_port, psql, write_config

pytestmark = pytest.mark.timeout(400)


class PersistentOpenBao(OpenBaoServer):
    """A real OpenBao with file storage: initialised once (one unseal key), unsealed at each start,
    so a kill -9 and a start keep its leases, as in production."""

    def start(self) -> "PersistentOpenBao":
        if not self.port:
            self.port, cluster_port = free_port(), free_port()
            self.dir = Path(tempfile.mkdtemp(prefix="bw-bao-persistent-"))
            (self.dir / "data").mkdir()
            # Integrated storage (raft, one node): OpenBao's storage for production; it has no "file".
            (self.dir / "bao.hcl").write_text(f"""
storage "raft" {{
  path = "{self.dir / 'data'}"
  node_id = "bw-adv"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{self.port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
""")
            self.unseal_key = None
        self._log = tempfile.NamedTemporaryFile(prefix="bw-bao-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([bao_binary(), "server", f"-config={self.dir / 'bao.hcl'}"], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "HOME": tempfile.gettempdir()},
                                     start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout=30)
        client = hvac.Client(url=self.addr)
        if self.unseal_key is None:
            init = client.sys.initialize(secret_shares=1, secret_threshold=1)
            self.unseal_key, self.root_token = init["keys"][0], init["root_token"]
        client.sys.submit_unseal_key(self.unseal_key)
        self._wait_unsealed()
        return self

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def env(pg_server, tmp_path):
    bao = PersistentOpenBao().start()
    daemon = None
    try:
        setup = fresh_setup(bao, pg_server, tmp_path)
        port = new_port()
        config = write_config(tmp_path / "botwarden.toml", workdir=tmp_path, pg=pg_server, bao=setup, listen_port=port)
        # A dead Vault is noticed after a second, not after hvac's default.
        config.write_text(config.read_text().replace('auth = "approle"\n', 'auth = "approle"\ntimeout = 1.0\n', 1))
        daemon = DaemonProcess(config, tmp_path / "run" / "control.sock").start()
        yield type("Env", (), {"pg": pg_server, "bao": setup, "server": bao, "port": port, "daemon": daemon})
    finally:
        if daemon is not None:
            daemon.stop()
        if bao.proc.poll() is None:
            bao.stop()


def role_exists(pg, name: str) -> bool:
    return pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "1"


def connect(env, token: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=env.port, user="orders-bot", password=token, dbname="postgres",
                           sslmode="disable", connect_timeout=10, autocommit=True)


def test_the_sessions_database_user_exists_only_while_it_lasts(env):
    with connect(env, env.bao.mint_token()) as conn:
        user = conn.execute("SELECT current_user").fetchone()[0]
        assert user.startswith("v-") and role_exists(env.pg, user)
    wait_until(lambda: not role_exists(env.pg, user), 30, f"role {user} dropped at session end")
    row = wait_until(lambda: session_row(env.daemon, credential_user=user), 20, "the session row")
    assert row["outcome"] == "ok" and row["lease_id"]


def test_openbao_killed_before_a_session_refuses_it_and_the_open_session_goes_on(env):
    live = LiveSession(env.port, env.bao.mint_token())
    try:
        token = env.bao.mint_token()  # minted while OpenBao is up (its key is already in the daemon's cache)
        env.server.kill()
        res = psql(env.port, token, "SELECT 'should not run'")
        assert res.returncode != 0 and res.stdout == ""
        assert "botwarden could not get a credential for 'orders'" in res.stderr, res.stderr
        row = wait_until(lambda: env.daemon.audit_sql("SELECT * FROM sessions WHERE error LIKE "
                                                      "'%could not get a credential%'"), 30,
                         "the refused session's row")[0]
        assert row["outcome"] == "error" and "could not get a credential" in row["error"]
        assert row["credential_user"] is None
        assert live.alive(), "the session opened before OpenBao died was disturbed"
        assert env.daemon.client().get("/v1/status")["audit"]["healthy"]

        env.server.start()  # the same storage: unsealed again, nothing lost
        with connect(env, env.bao.mint_token()) as conn:
            assert conn.execute("SELECT 'back'").fetchone() == ("back",)
        assert live.alive()
    finally:
        live.close()


def test_openbao_killed_during_a_session_its_user_is_revoked_once_openbao_is_back(env):
    conn = connect(env, env.bao.mint_token())
    user = conn.execute("SELECT current_user").fetchone()[0]
    live = next(s for s in env.daemon.client().get("/v1/sessions")["sessions"] if s["credential_user"] == user)
    env.server.kill()
    # The session keeps working: its upstream connection is open, it needs nothing from OpenBao.
    assert conn.execute("SELECT count(*) FROM generate_series(1, 20)").fetchone() == (20,)
    conn.close()
    # Its end cannot revoke the lease: said in the row and in status; the user still exists.
    row = wait_until(lambda: (r := session_row(env.daemon, session_id=live["session_id"])) and
                     r["outcome"] == "revoke_failed" and r, 30, "the session row saying revoke_failed")
    assert live["lease_id"] in row["error"] and "not revoked at session end" in row["error"]
    pending = env.daemon.client().get("/v1/status")["revocations_pending"]
    assert [p["lease_id"] for p in pending] == [live["lease_id"]]
    assert role_exists(env.pg, user)
    time.sleep(3)  # OpenBao stays down across a few retries
    assert role_exists(env.pg, user)

    env.server.start()
    started = time.monotonic()
    wait_until(lambda: not role_exists(env.pg, user), 120, f"role {user} revoked by a retry once OpenBao is back")
    print(f"role revoked {time.monotonic() - started:.1f}s after OpenBao came back (retry back-off 1 s doubling "
          "to at most 60 s)")
    wait_until(lambda: not env.daemon.client().get("/v1/status")["revocations_pending"], 20, "nothing pending")
    row = wait_until(lambda: "later, at attempt" in (session_row(env.daemon, session_id=live["session_id"])["error"])
                     and session_row(env.daemon, session_id=live["session_id"]), 20, "the row amended")
    assert row["outcome"] == "revoke_failed"
