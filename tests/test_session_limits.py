"""Sessions end when what they rest on ends: the bot's token (oidc.on_expiry) or the
credential's lease (the database role's max TTL). Real daemon, OpenBao and PostgreSQL."""

from __future__ import annotations

import time
import uuid

import pytest

from appliance.sandbox import configure_openbao
from tests.daemon_fixtures import DaemonProcess, new_port, psql, seed_orders, write_config


def start(pg, bao_server, tmp_path, *, on_expiry: str = "end", token_ttl: str = "10m", default_ttl: int = 300,
          max_ttl: int = 3600):
    seed_orders(pg)
    setup = configure_openbao(bao_server, pg, tmp_path, tag=f"s{uuid.uuid4().hex[:6]}", token_ttl=token_ttl,
                              default_ttl=default_ttl, max_ttl=max_ttl)
    port = new_port()
    config = write_config(tmp_path / "bw.toml", workdir=tmp_path, pg=pg, bao=setup, listen_port=port)
    text = config.read_text().replace('algorithms = ["RS256"]',
                                      f'algorithms = ["RS256"]\nleeway_s = 0\non_expiry = "{on_expiry}"', 1)
    config.write_text(text)
    daemon = DaemonProcess(config, tmp_path / "run" / "control.sock").start()
    return setup, port, daemon


def test_session_ends_when_its_token_expires(pg_server, bao_server, tmp_path):
    setup, port, daemon = start(pg_server, bao_server, tmp_path, token_ttl="6s")
    try:
        token = setup.mint_token()
        t0 = time.monotonic()
        res = psql(port, token, "SELECT 1", "SELECT pg_sleep(20)", "SELECT 'after'")
        assert time.monotonic() - t0 < 18, "the session outlived its token"
        assert "OIDC token" in res.stderr and "expired" in res.stderr, res.stderr
        assert "after" not in res.stdout
        assert token not in res.stderr
        rows = daemon.audit_sql("SELECT outcome, error FROM sessions ORDER BY started_at DESC LIMIT 1")
        assert rows[0]["outcome"] == "terminated" and "expired" in rows[0]["error"]
    finally:
        daemon.stop()


def test_recheck_refuses_the_next_request_after_expiry(pg_server, bao_server, tmp_path):
    setup, port, daemon = start(pg_server, bao_server, tmp_path, on_expiry="recheck", token_ttl="5s")
    try:
        token = setup.mint_token()
        # The running request is not cut; the next one is refused and the session ends.
        res = psql(port, token, "SELECT pg_sleep(8), 'slept'", "SELECT 'refused'")
        assert "slept" in res.stdout
        assert "refused" not in res.stdout
        assert "expired" in res.stderr and "recheck" in res.stderr, res.stderr
    finally:
        daemon.stop()


def test_recheck_refuses_a_prepared_statements_next_run_after_expiry(pg_server, bao_server, tmp_path):
    """A statement prepared before the token expired (decided at Parse) is refused at its next
    Execute, as a new statement would be."""
    import psycopg

    setup, port, daemon = start(pg_server, bao_server, tmp_path, on_expiry="recheck", token_ttl="4s")
    try:
        conn = psycopg.connect(host="127.0.0.1", port=port, user="orders-bot", password=setup.mint_token(),
                               dbname="postgres", sslmode="disable", autocommit=True)
        assert conn.execute("SELECT %s::text", ("prepared",), prepare=True).fetchone() == ("prepared",)
        time.sleep(5)
        with pytest.raises(psycopg.Error, match="expired") as refused:
            conn.execute("SELECT %s::text", ("after expiry",), prepare=True).fetchone()
        assert "recheck" in str(refused.value)
        conn.close()
        rows = daemon.audit_sql("SELECT decision FROM requests WHERE kind = 'execute' ORDER BY chain_seq")
        assert [r["decision"] for r in rows] == ["allow", "block"], rows
    finally:
        daemon.stop()


def test_session_ends_when_its_lease_reaches_max_ttl(pg_server, bao_server, tmp_path):
    setup, port, daemon = start(pg_server, bao_server, tmp_path, default_ttl=3, max_ttl=8)
    try:
        token = setup.mint_token()
        t0 = time.monotonic()
        res = psql(port, token, "SELECT current_user", "SELECT pg_sleep(30)", "SELECT 'after'")
        user = res.stdout.split()[0]
        assert time.monotonic() - t0 < 25, "the session outlived its credential"
        assert "botwarden ended the session" in res.stderr, res.stderr
        assert "after" not in res.stdout
        # The role is gone with its lease.
        deadline = time.monotonic() + 15
        while pg_server.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{user}'") != "0":
            assert time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        daemon.stop()
