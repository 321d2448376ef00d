"""`botwarden sessions --all`, `replay` and `audit report` with the daemon stopped.

A real daemon (real OpenBao, real PostgreSQL 15) records real psql sessions, one of them with
a blocked statement; then it is stopped, and the CLI reads the audit file read-only (its bytes
do not change).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.daemon_fixtures import ROOT, DaemonProcess, fresh_setup, new_port, psql, seed_orders, write_config


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def stopped(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("offline")
    seed_orders(pg_server)
    setup = fresh_setup(bao_server, pg_server, workdir)
    port = new_port()
    config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup, listen_port=port)
    daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
    try:
        token = setup.mint_token()
        assert psql(port, token, "SELECT count(*) FROM orders").returncode == 0
        res = psql(port, token, "SELECT 41 + 1", "DROP TABLE orders")
        assert "no-drops" in res.stderr, res.stderr
        rows = daemon.audit_sql("SELECT session_id FROM sessions ORDER BY started_at")
    finally:
        assert daemon.stop() == 0
    audit = workdir / "state" / "audit.duckdb"
    yield type("Stopped", (), {"config": config, "socket": daemon.socket, "audit": audit,
                               "sessions": [r["session_id"] for r in rows], "digest": digest(audit)})


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_daemon_is_really_down(stopped):
    assert not stopped.socket.exists()
    assert cli("--config", str(stopped.config), "status").returncode == 3


def test_sessions_all_reads_the_audit_file(stopped):
    res = cli("--config", str(stopped.config), "sessions", "--all", "--json")
    assert res.returncode == 0, res.stderr
    assert "not running" in res.stderr and "read-only" in res.stderr
    sessions = json.loads(res.stdout)
    assert [s["session_id"] for s in sessions] == stopped.sessions and len(sessions) == 2
    assert {s["identity"] for s in sessions} == {"orders-bot"}
    assert {s["target"] for s in sessions} == {"orders"}
    assert all(s["state"] == "ok" and s["ended"] for s in sessions)
    table = cli("--config", str(stopped.config), "sessions", "--all")
    assert table.returncode == 0 and all(sid in table.stdout for sid in stopped.sessions), table.stdout
    latest = json.loads(cli("--config", str(stopped.config), "sessions", "--all", "--json", "--limit", "1").stdout)
    assert [s["session_id"] for s in latest] == stopped.sessions[-1:]
    # Without --all there is nothing to show: no daemon, no active session.
    assert cli("--config", str(stopped.config), "sessions").returncode == 3


def test_replay_reads_the_audit_file(stopped):
    res = cli("--config", str(stopped.config), "replay", "--no-wait", stopped.sessions[-1])
    assert res.returncode == 0, res.stderr
    assert "identity orders-bot → orders" in res.stdout
    lines = res.stdout.splitlines()
    assert "SELECT 41 + 1" in lines
    blocked = lines.index("DROP TABLE orders")
    assert lines[blocked + 1].startswith("-- botwarden: block (rule no-drops)")
    assert cli("--config", str(stopped.config), "replay", "no-such-session").returncode == 1


def test_audit_report_reads_the_audit_file(stopped):
    res = cli("--config", str(stopped.config), "audit", "report", "blocked_attempts", "--format", "json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 1
    assert rows[0]["identity"] == "orders-bot" and rows[0]["rule"] == "no-drops" and rows[0]["attempts"] == 1


def test_the_audit_file_was_only_read(stopped):
    # Last in this module: none of the commands above changed a byte of the file.
    assert digest(stopped.audit) == stopped.digest
