"""appliance.workers = 2 for real: one daemon (`botwarden run`), two worker processes accepting on
its listener, a real PostgreSQL, a real OpenBao, psql and psycopg as the bots.

Which worker serves a session is the kernel's choice; the tests open connections until the
session listing (its ``worker`` field) shows the spread they need.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import psycopg
import pytest

from appliance.config import parse_config
from appliance.control import ControlError
from appliance.errors import ConfigError
from tests.daemon_fixtures import ROOT, RULES, DaemonProcess, fresh_setup, new_port, psql, seed_orders, write_config

WORKERS = 'workers = 2\n'


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_for(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workers")
    seed_orders(pg_server)
    setup = fresh_setup(bao_server, pg_server, workdir)
    port = new_port()
    config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup, listen_port=port,
                          socket_group=None)
    text = config.read_text().replace("[appliance]\n", "[appliance]\n" + WORKERS, 1)
    config.write_text(text)
    daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
    try:
        yield type("Env", (), {"pg": pg_server, "bao": setup, "port": port, "config": config, "daemon": daemon,
                               "workdir": workdir})
    finally:
        daemon.stop()


def dsn(env, token: str) -> str:
    return (f"host=127.0.0.1 port={env.port} user=orders-bot dbname=postgres password={token} "
            "sslmode=disable connect_timeout=10")


def worker_of(env, conn: psycopg.Connection) -> int:
    """The worker serving this connection's session (matched by its Vault-made database user)."""
    user = conn.execute("SELECT current_user").fetchone()[0]
    sessions = env.daemon.client().get("/v1/sessions")["sessions"]
    (found,) = [s for s in sessions if s["credential_user"] == user]
    return found["worker"]


def connect_on_every_worker(env, stack: ExitStack, token: str, per_worker: int = 1) -> dict[int, list]:
    """Open connections until each worker serves at least ``per_worker`` of them."""
    by_worker: dict[int, list] = {1: [], 2: []}
    for _ in range(60):
        conn = stack.enter_context(psycopg.connect(dsn(env, token), autocommit=True))
        by_worker[worker_of(env, conn)].append(conn)
        if all(len(c) >= per_worker for c in by_worker.values()):
            return by_worker
    raise AssertionError(f"60 connections did not reach both workers: {[len(c) for c in by_worker.values()]}")


def workers_status(env) -> list[dict]:
    return env.daemon.client().get("/v1/status")["workers"]


# -- config -----------------------------------------------------------------------------------


def test_workers_setting_is_validated_with_the_key_named():
    assert parse_config("[appliance]\n").appliance.workers == 1
    assert parse_config("[appliance]\nworkers = 4\n").appliance.workers == 4
    for bad in ("0", "65", '"two"'):
        with pytest.raises(ConfigError, match=r"<memory>:2: appliance.workers"):
            parse_config(f"[appliance]\nworkers = {bad}\n")
    ssh = """[appliance]
workers = 2
[[targets]]
name = "box"
protocol = "ssh"
address = "10.0.0.5:22"
listen = "127.0.0.1:2222"
"""
    with pytest.raises(ConfigError, match=r"appliance.workers: workers > 1 serves PostgreSQL targets only"):
        parse_config(ssh)


# -- the running daemon ---------------------------------------------------------------------------


def test_status_shows_two_ready_workers(env):
    status = workers_status(env)
    assert [w["worker"] for w in status] == [1, 2]
    assert all(w["ready"] and w["pid"] and w["pid"] != env.daemon.proc.pid for w in status)


def test_sessions_on_both_workers_audit_into_one_verified_chain(env):
    token = env.bao.mint_token()
    users = {}
    with ExitStack() as stack:
        by_worker = connect_on_every_worker(env, stack, token)
        for worker, conns in by_worker.items():
            conn = conns[0]
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 20
            assert conn.execute("SELECT sum(total) FROM orders WHERE id < 3").fetchone()[0] == 30
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drops"):
                conn.execute("DROP TABLE orders")
            assert conn.execute("SELECT 1").fetchone()[0] == 1  # still usable after the block
            users[worker] = conn.execute("SELECT current_user").fetchone()[0]
    rows = wait_for(lambda: (r := env.daemon.audit_sql(
        "SELECT s.credential_user, s.outcome, e.requests, count(q.seq) AS n, max(q.seq) AS top "
        "FROM sessions s JOIN session_ends e USING (session_id) JOIN requests q USING (session_id) "
        "WHERE list_contains(?, s.credential_user) GROUP BY ALL", [list(users.values())])) and len(r) == 2 and all(x["outcome"] == "ok" for x in r) and r,
        what="both sessions ended in the audit")
    for row in rows:
        # Numbered by the worker, 1..n without a hole, and session_end counts them.
        assert row["n"] == row["top"] == row["requests"] >= 5
    res = cli("--config", str(env.config), "audit", "verify")
    assert res.returncode == 0, res.stdout + res.stderr
