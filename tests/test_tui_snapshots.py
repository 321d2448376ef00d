"""SVG snapshots of every console screen at 80×24 and 120×40 (pytest-textual-snapshot).

These check what the operator sees, cell by cell: layout, wrapping, which keys the footer
shows, what a dialog says. To keep each render the same run after run, the console is
started with ``connect=False`` and a frozen clock, and handed the daemon's documents (the
approvals stream's events and the answers of /v1/status, /v1/sessions, /v1/health, audit
SQL) through the same handlers the live console uses; text cursors do not blink. What the
console does with a real daemon is tested in test_tui_daemon.py and test_tui.py.

After an intended change to a screen: ``pytest tests/test_tui_snapshots.py --snapshot-update``,
look at the SVGs that changed (tests/__snapshots__/test_tui_snapshots/), commit them.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from textual.widgets import Input

from tui.app import Answer, BotwardenApp, WatchEvent

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2026, 11, 29, 3, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(seconds=75)
SOCKET = "/run/botwarden/control.sock"

APPROVAL = {
    "approval_id": "3cffbb72ac19", "session_id": "f3dcfce4f1484e45ac50c92028f87e4b", "request_id": "r-1",
    "identity": "ledger-bot", "target": "ledger", "protocol": "postgres",
    "request": "DELETE FROM tui_ledger WHERE id = 1 AND note <> '********'",
    "rule": "ledger-deletes-need-approval", "rule_description": "Deletes on the ledger need a second pair of eyes",
    "policy_reason": "needs approval by botwarden rule 'ledger-deletes-need-approval'",
    "groups": ["bots", "ledger-writers"],
    "process": {"pid": 2533, "uid": 65534, "gid": 65534, "exe": "/usr/lib/postgresql/15/bin/psql", "comm": "psql",
                "cgroup": "/botwarden.bots/tui-bot", "attribution": "ebpf", "client": "127.0.0.1:50412"},
    "created": T0.isoformat(), "expires": (T0 + timedelta(minutes=10)).isoformat(),
    "approvals": [], "required": 1, "row_estimate": 1, "row_limit": 100,
    "earlier": [{"approval_id": "0a1b2c3d4e5f", "identity": "ledger-bot", "event": "approved", "operator": "root",
                 "reason": "checked with the owner", "decided": (T0 - timedelta(minutes=30)).isoformat(),
                 "window_s": None}],
}
SECOND = {**APPROVAL, "approval_id": "9e8d7c6b5a41", "identity": "deploy-bot", "request": "TRUNCATE audit_tmp",
          "rule": "truncates-need-two", "rule_description": "", "required": 2, "approvals": ["alice"],
          "created": (T0 + timedelta(seconds=40)).isoformat(), "earlier": [], "row_estimate": None, "row_limit": None}
DECIDED = {"event": "denied", "approval": {**APPROVAL, "approval_id": "77aa88bb99cc", "request": "DELETE FROM orders"},
           "reason": "denied by root: not during the freeze", "recorded_reason": "not during the freeze",
           "operator": "root", "window_s": None, "decided": (T0 - timedelta(minutes=5)).isoformat()}
STATUS = {"pid": 2086, "started_at": (T0 - timedelta(hours=3)).isoformat(), "config": "/etc/botwarden/botwarden.toml",
          "reloads": 0, "last_reload_error": None,
          "targets": [{"name": "ledger", "protocol": "postgres", "address": "10.0.0.5:5432",
                       "listen": "127.0.0.1:6432"}],
          "audit": {"path": "/var/lib/botwarden/audit.duckdb", "healthy": True, "pid": 2161},
          "probes": "ebpf (mode=ebpf)", "sessions_active": 1, "approvals_pending": 2, "bots_left_cgroup": 0}
SESSIONS = [
    {"session_id": "f3dcfce4f1484e45ac50c92028f87e4b", "identity": "ledger-bot", "target": "ledger",
     "subject": "a1b2", "pid": 2533, "uid": 65534, "exe": "/usr/lib/postgresql/15/bin/psql",
     "client": "127.0.0.1:50412", "started": (T0 - timedelta(minutes=2)).isoformat(), "ended": None,
     "state": "active", "current": "SELECT pg_sleep(120)", "current_since": (T0 + timedelta(seconds=5)).isoformat(),
     "current_running": True},
    {"session_id": "0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a", "identity": "deploy-bot", "target": "ledger",
     "subject": "c3d4", "pid": 2101, "uid": 1001, "exe": "/usr/bin/python3.11", "client": "127.0.0.1:50398",
     "started": (T0 - timedelta(minutes=9)).isoformat(), "ended": (T0 - timedelta(minutes=8)).isoformat(),
     "state": "ended", "current": "COMMIT", "current_since": (T0 - timedelta(minutes=8)).isoformat(),
     "current_running": False},
]
# An SSH command and a Kubernetes request held, as the daemon describes them (appliance/runtime.py
# adds `login` for SSH and the front's `detail` for Kubernetes).
SSH_APPROVAL = {
    **APPROVAL, "approval_id": "5a5b5c5d5e5f", "session_id": "9a8b7c6d5e4f40312a1b2c3d4e5f6a7b", "identity": "deploy-bot",
    "target": "web-1", "protocol": "ssh", "request": "systemctl restart nginx", "rule": "restarts-need-approval",
    "rule_description": "Service restarts on production web hosts", "login": "root@10.0.0.21:22",
    "process": {"pid": 3310, "uid": 65534, "gid": 65534, "exe": "/usr/bin/ssh", "comm": "ssh",
                "cgroup": "/botwarden.bots/deployer", "attribution": "ebpf", "client": "127.0.0.1:50602"},
    "row_estimate": None, "row_limit": None, "earlier": [], "created": (T0 + timedelta(seconds=50)).isoformat()}
K8S_APPROVAL = {
    **APPROVAL, "approval_id": "6b6c6d6e6f60", "session_id": "7c6b5a4f3e2d41c0b9a8f7e6d5c4b3a2", "identity": "deploy-bot",
    "target": "cluster", "protocol": "kubernetes",
    "request": "delete deployments.apps web in shop (DELETE /apis/apps/v1/namespaces/shop/deployments/web)",
    "rule": "deployment-deletes-need-approval", "rule_description": "", "process": {"attribution": "none"},
    "detail": {"verb": "delete", "api_group": "apps", "resource": "deployments", "subresource": None,
               "namespace": "shop", "name": "web"},
    "row_estimate": None, "row_limit": None, "created": (T0 + timedelta(seconds=60)).isoformat(),
    "earlier": [{"approval_id": "1f2e3d4c5b6a", "identity": "deploy-bot", "event": "denied", "operator": "alice",
                 "reason": "not in the change window", "decided": (T0 - timedelta(hours=2)).isoformat(),
                 "window_s": None}]}
SESSIONS += [
    {"session_id": SSH_APPROVAL["session_id"], "identity": "deploy-bot", "target": "web-1", "protocol": "ssh",
     "subject": None, "pid": 3310, "uid": 65534, "exe": "/usr/bin/ssh", "client": "127.0.0.1:50602",
     "started": (T0 - timedelta(seconds=30)).isoformat(), "ended": None, "state": "active",
     "current": "systemctl restart nginx", "current_since": T0.isoformat(), "current_running": True},
    {"session_id": K8S_APPROVAL["session_id"], "identity": "deploy-bot", "target": "cluster", "protocol": "kubernetes",
     "subject": "e5f6", "pid": None, "uid": None, "exe": None, "client": "127.0.0.1:50710",
     "started": (T0 - timedelta(minutes=20)).isoformat(), "ended": (T0 - timedelta(minutes=19)).isoformat(),
     "state": "ended", "current": "list pods in shop", "current_since": (T0 - timedelta(minutes=19)).isoformat(),
     "current_running": False},
]
for _s in SESSIONS[:2]:
    _s["protocol"] = "postgres"
HEALTH = {**STATUS, "version": "0.1.0", "uptime_s": 10875, "probes_mode": "ebpf", "probes_path": "ebpf",
          "bots": [{"cgroup": "/botwarden.bots", "processes": 0, "uid0": 0, "uid0_pids": []},
                   {"cgroup": "/botwarden.bots/tui-bot", "processes": 1, "uid0": 0, "uid0_pids": []},
                   {"cgroup": "/botwarden.bots/root-sleeper", "processes": 1, "uid0": 1,
                    "uid0_pids": [{"pid": 3120, "comm": "sleep"}]}],
          "checks": [{"name": "target ledger reachable", "status": "ok",
                      "detail": "10.0.0.5:5432: PostgreSQL answers SSLRequest with 'S' (TLS offered)", "fix": ""},
                     {"name": "Vault reachable", "status": "fail",
                      "detail": "http://127.0.0.1:8200 is unreachable (ConnectionError)",
                      "fix": "start Vault/OpenBao, or fix vault.address (and vault.ca_file for TLS)"},
                     {"name": "OIDC issuer", "status": "ok",
                      "detail": "http://127.0.0.1:8200/v1/identity/oidc/.well-known/openid-configuration: discovery "
                                "and JWKS (1 keys)", "fix": ""}],
          "audit_stats": {"mode": "strict", "queue_depth": 3, "queue_max": 100000, "lost": 0, "refused": 0,
                          "restarts": 0, "head_seq": 4182, "epoch": 1, "failing": False},
          "oidc_issuer": "http://127.0.0.1:8200/v1/identity/oidc"}
REPLAY = {"columns": ["ts", "kind", "text", "decision", "rule", "rows", "error"],
          "rows": [["2026-11-29 02:58:01", "query", "SELECT 1", "allow", None, 1, None],
                   ["2026-11-29 02:58:02", "query", "SELECT email FROM customers", "mask", "mask-pii", 2, None],
                   ["2026-11-29 02:58:03", "query", "DROP TABLE orders", "block", "no-drops", 0,
                    "blocked by rule no-drops"]]}
AUDIT = {"columns": ["decision", "n"], "rows": [["allow", 120], ["block", 3], ["mask", 17]]}


class SnapshotConsole(BotwardenApp):
    """The console with a frozen clock, no daemon connection, and text cursors that do not blink."""

    def __init__(self) -> None:
        super().__init__(SOCKET, connect=False, clock=lambda: NOW)

    async def _open(self, screen: Any, callback: Any, focus: str) -> None:
        await super()._open(screen, callback, focus)
        for field in screen.query(Input):
            field.cursor_blink = False


async def fill(pilot) -> None:
    """Hand the console what a daemon would have said."""
    app: BotwardenApp = pilot.app
    for field in app.query(Input):
        field.cursor_blink = False
    app.on_watch_event(WatchEvent({"event": "hello", "pending": 2}))
    app.on_watch_event(WatchEvent({"event": "pending", "approval": APPROVAL}))
    app.on_watch_event(WatchEvent({"event": "pending", "approval": SECOND}))
    app.on_watch_event(WatchEvent(DECIDED))
    app._answer_status(Answer("status", STATUS))
    app._answer_sessions(Answer("sessions", {"sessions": SESSIONS}))
    app._answer_health(Answer("health", HEALTH))
    app._answer_replay(Answer("replay", REPLAY, context="0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a"))
    app.query_one("#replay-session", Input).value = "0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a"
    app.query_one("#sql", Input).value = "SELECT decision, count(*) AS n FROM requests GROUP BY 1 ORDER BY 1"
    app._answer_audit(Answer("audit", AUDIT, context="SELECT decision, count(*) AS n FROM requests GROUP BY 1"))
    await pilot.pause()


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Times are shown in local time: make it the same everywhere. (And no operator fleet settings:
    the fleet screens say which they found.)"""
    for name in ("BOTWARDEN_FLEET_CATALOG", "BOTWARDEN_FLEET_DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/operator/.config")
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


SCREENS = {
    "approvals": (),
    "approve_once": ("f6",),
    "approve_window": ("f7",),
    "deny": ("f8",),
    "sessions": ("f2",),
    "sessions_filtered": ("f2", "slash", *"state=active"),
    "end_session": ("f2", "ctrl+k"),
    "audit": ("f3",),
    "replay": ("f4",),
    "status": ("f9",),
    "help": ("question_mark",),
    "quit": ("f10",),
}


async def fill_fronts(pilot) -> None:
    """The SQL queue plus a held SSH command and a held Kubernetes request."""
    await fill(pilot)
    pilot.app.on_watch_event(WatchEvent({"event": "requested", "approval": SSH_APPROVAL}))
    pilot.app.on_watch_event(WatchEvent({"event": "requested", "approval": K8S_APPROVAL}))
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("held", ["ssh", "k8s"])
def test_detail_pane_of_a_held(snap_compare, held: str, size: tuple[int, int]) -> None:
    """The detail pane of an SSH command (its command line, user@host) and of a Kubernetes request
    (verb, resource, namespace, name), selected with the cursor keys in the one queue."""
    # The queue is ordered by arrival: the two SQL requests, then SSH, then Kubernetes.
    press = ("down", "down") if held == "ssh" else ("down", "down", "down")
    assert snap_compare(SnapshotConsole(), press=press, terminal_size=size, run_before=fill_fronts)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen(snap_compare, screen: str, size: tuple[int, int]) -> None:
    assert os.environ["TZ"] == "UTC"
    assert snap_compare(SnapshotConsole(), press=SCREENS[screen], terminal_size=size, run_before=fill)


FLEET = {"columns": ["bastion", "decision", "n"],
         "rows": [["eu-west-prod-1", "allow", 120], ["eu-west-prod-1", "block", 3], ["us-east-prod-2", "allow", 88],
                  ["us-east-prod-2", "approve", 2]]}


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
@pytest.mark.parametrize("configured", [True, False], ids=["configured", "unconfigured"])
def test_audit_tab_on_the_fleet(snap_compare, monkeypatch, configured: bool, size: tuple[int, int]) -> None:
    """ctrl+f on the Audit tab: the fleet lake with the operator's own settings (a result with its
    bastion column), or the message that says what to set."""
    if configured:
        monkeypatch.setenv("BOTWARDEN_FLEET_CATALOG", "host=lake-db dbname=botwarden_lake user=auditor")
        monkeypatch.setenv("BOTWARDEN_FLEET_DATA_PATH", "/mnt/botwarden-lake")

    async def run_before(pilot) -> None:
        await fill(pilot)
        await pilot.press("f3", "ctrl+f")
        if configured:
            pilot.app.query_one("#sql", Input).value = "SELECT bastion, decision, count(*) AS n FROM requests GROUP BY ALL"
            pilot.app._answer_audit(Answer("audit", FLEET, context="fleet: SELECT bastion, decision, count(*) …"))
        await pilot.pause()

    assert snap_compare(SnapshotConsole(), terminal_size=size, run_before=run_before)
