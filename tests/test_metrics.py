"""Prometheus metrics scraped from a real daemon after real psql sessions.

The daemon (a subprocess running `botwarden run`) is wired to a real OpenBao and a real
PostgreSQL 15 and has two targets: `orders` and `closed`, whose address is a port nothing
listens on (its sessions fail upstream). Bots are plain `psql`. The scrape is parsed with
prometheus_client's own parser, from the control socket and from the opt-in TCP listener.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import parse_config
from tests.daemon_fixtures import DaemonProcess, fresh_setup, new_port, psql, seed_orders, write_config


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("metrics")
    seed_orders(pg_server)
    setup = fresh_setup(bao_server, pg_server, workdir)
    port, closed_listen, metrics_port = new_port(), new_port(), new_port()
    extra = f"""
[[targets]]
name = "closed"
protocol = "postgres"
address = "127.0.0.1:{new_port()}"
listen = "127.0.0.1:{closed_listen}"
allow_plaintext = true
[targets.tls]
mode = "disable"
[targets.credential]
source = "database"
mount = "{setup.db_mount}"
role = "{setup.db_role}"

[metrics]
listen = "127.0.0.1:{metrics_port}"
"""
    config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup, listen_port=port,
                          extra=extra)
    daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
    try:
        yield type("Env", (), {"bao": setup, "port": port, "closed_port": closed_listen,
                               "metrics_port": metrics_port, "daemon": daemon})
    finally:
        daemon.stop()


def scrape_socket(path: Path) -> tuple[str, str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: botwarden\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    ctype = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"content-type"))
    return ctype.decode(), body.decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(env, name: str, expected: float, **labels: str) -> dict:
    """Sessions end (and are counted) once the front has seen the bot go: poll until then."""
    deadline = time.monotonic() + 30
    while True:
        found = samples(scrape_socket(env.daemon.socket)[1])
        if value(found, name, **labels) == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_metrics_after_real_sessions(env):
    token = env.bao.mint_token()
    ok_sessions = 0
    for sql in (["SELECT count(*) FROM orders", "SELECT count(*) FROM orders"],  # the second: a cache hit
                ["SELECT email FROM customers WHERE id = 1"]):
        res = psql(env.port, token, *sql)
        assert res.returncode == 0, res.stderr
        ok_sessions += 1
    res = psql(env.port, token, "DROP TABLE orders", "SELECT 'still usable'")
    assert "no-drops" in res.stderr and "still usable" in res.stdout, res  # blocked; the session goes on
    ok_sessions += 1
    refused = psql(env.port, "not-a-token", "SELECT 1")
    assert refused.returncode != 0
    upstream = psql(env.closed_port, token, "SELECT 1")
    assert upstream.returncode != 0 and "could not connect to the target" in upstream.stderr, upstream.stderr

    # A held statement: pending while it waits, then denied.
    held = {}
    bot = threading.Thread(target=lambda: held.update(res=psql(env.port, token, "DELETE FROM orders")))
    bot.start()
    client = env.daemon.client()
    deadline = time.monotonic() + 30
    while not client.get("/v1/approvals")["approvals"] and time.monotonic() < deadline:
        time.sleep(0.05)
    (pending,) = client.get("/v1/approvals")["approvals"]
    found = samples(scrape_socket(env.daemon.socket)[1])
    assert value(found, "botwarden_approvals_pending") == 1
    assert value(found, "botwarden_sessions_active", target="orders") == 1
    client.post(f"/v1/approvals/{pending['approval_id']}/deny", {"reason": "not in business hours"})
    bot.join(60)
    assert "not in business hours" in held["res"].stderr
    ok_sessions += 1

    found = wait_for(env, "botwarden_sessions_total", ok_sessions, target="orders", identity="orders-bot",
                     outcome="ok")
    assert value(found, "botwarden_sessions_total", target="orders", identity="orders-bot", outcome="ok") \
        == ok_sessions
    assert value(found, "botwarden_sessions_total", target="orders", identity="none", outcome="refused") == 1
    assert value(found, "botwarden_sessions_total", target="closed", identity="orders-bot", outcome="error") == 1
    assert value(found, "botwarden_upstream_connect_errors_total", target="closed", stage="tcp") == 1
    assert value(found, "botwarden_upstream_connect_errors_total", target="orders", stage="tcp") == 0
    assert value(found, "botwarden_sessions_active", target="orders") == 0
    assert value(found, "botwarden_approvals_pending") == 0

    assert value(found, "botwarden_decisions_total", action="block", rule="no-drops") == 1
    assert value(found, "botwarden_decisions_total", action="mask", rule="mask-pii") == 1
    assert value(found, "botwarden_decisions_total", action="deny", rule="mass-delete-needs-approval") == 1
    assert value(found, "botwarden_decisions_total", action="allow", rule="") >= 2
    assert value(found, "botwarden_approval_events_total", event="requested") == 1
    assert value(found, "botwarden_approval_events_total", event="denied") == 1
    assert value(found, "botwarden_approval_decision_seconds_count", outcome="denied") == 1
    assert value(found, "botwarden_approval_decision_seconds_sum", outcome="denied") > 0

    assert value(found, "botwarden_policy_cache_lookups_total", result="exact_hit") >= 1
    assert value(found, "botwarden_policy_cache_lookups_total", result="miss") >= 3
    assert 0 < value(found, "botwarden_policy_cache_hit_ratio") < 1

    assert value(found, "botwarden_audit_healthy") == 1
    assert value(found, "botwarden_audit_events_lost_total") == 0
    assert value(found, "botwarden_audit_events_refused_total") == 0
    written = value(found, "botwarden_audit_events_written_total")
    submitted = value(found, "botwarden_audit_events_submitted_total")
    assert submitted >= written > 0
    assert value(found, "botwarden_audit_queue_depth") == submitted - written
    assert value(found, "botwarden_audit_chain_head_seq") > 0
    assert ("botwarden_probes_attached", ()) in found  # probes are off here: 0
    assert value(found, "botwarden_probes_attached") == 0
    # Neither statements nor tokens are in it.
    text = scrape_socket(env.daemon.socket)[1]
    assert "orders WHERE" not in text and "DELETE" not in text and token not in text


def test_the_tcp_listener_serves_the_same_and_only_metrics(env):
    ctype, text = scrape_socket(env.daemon.socket)
    assert ctype == CONTENT_TYPE_LATEST  # prometheus_client's text format
    with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == ctype
        tcp = samples(r.read().decode())
    assert {k for k in tcp if k[0] == "botwarden_sessions_total"} == \
        {k for k in samples(text) if k[0] == "botwarden_sessions_total"}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/v1/status", timeout=10)
    assert e.value.code == 404  # the control API is never on the network
    assert env.daemon.client().get("/v1/status")["metrics"] == f"127.0.0.1:{env.metrics_port}"


def test_the_tcp_listener_is_off_by_default():
    cfg = parse_config('[[targets]]\nname = "t"\nprotocol = "postgres"\naddress = "127.0.0.1:5432"\n'
                       'authentication = "attestation"\n')
    assert cfg.metrics.listen is None
