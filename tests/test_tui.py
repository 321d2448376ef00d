"""The operator console driven with Textual's Pilot against a real control server.

The control server (appliance.control.ControlServer + appliance.api.build_router) runs on
the same asyncio loop as the app under ``run_test``; that works because every call the
console makes runs in a worker thread. Held requests come from a real ApprovalBroker, the
audit SQL path from a real DuckDB file opened read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import html
import io
import re
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text
from textual import events
from textual.command import CommandList, CommandPalette
from textual.keys import REPLACED_KEYS, _character_to_key, _get_unicode_name_from_key
from textual.pilot import Pilot
from textual.widgets import DataTable, HelpPanel, Input, Select, Static

from analytics import AuditStore
from appliance.api import build_router
from appliance.approvals import ApprovalBroker, HoldOutcome
from appliance.control import ControlClient, ControlError, ControlServer
from tui.app import BotwardenApp
from tui.dialogs import DecisionScreen, QuitScreen
from tui.model import (ApprovalBook, Decision, RecentDecisions, approval_detail, current_statement, parse_span,
                       parse_window_minutes, session_matches, status_line, time_left, window_text)

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 11, 29, 3, 0, tzinfo=timezone.utc)
SESSIONS = [
    {"session_id": "sess-active", "identity": "ci-bot", "target": "pg-prod", "subject": "ci", "pid": 4242,
     "uid": 1001, "exe": "/usr/bin/psql", "client": "127.0.0.1:50000", "started": T0.isoformat(),
     "ended": None, "state": "active"},
    {"session_id": "sess-ended", "identity": "deploy", "target": "pg-prod", "subject": "deploy", "pid": 777,
     "uid": 1002, "exe": "/usr/bin/python3", "client": "127.0.0.1:50001", "started": T0.isoformat(),
     "ended": (T0 + timedelta(minutes=1)).isoformat(), "state": "ended"},
]


def audit_store(path: Path) -> AuditStore:
    """The real audit store, with one ended session's requests (and one of an active session)."""
    store = AuditStore(path)
    store.start()
    # Submitted out of order so the replay's ORDER BY ts is what puts them in order.
    for rid, sid, secs, text, decision, rule, rows, error in (
        ("r3", "sess-ended", 3, "DROP TABLE orders", "block", "no-drop", 0, "blocked by rule no-drop"),
        ("r1", "sess-ended", 1, "SELECT 1", "allow", None, 1, None),
        ("r2", "sess-ended", 2, "SELECT email FROM users", "mask", "mask-email", 2, None),
        ("r9", "sess-active", 0, "SELECT now()", "allow", None, 1, None),
    ):
        store.submit("request", {"request_id": rid, "session_id": sid, "ts": T0 + timedelta(seconds=secs),
                                 "protocol": "postgres", "kind": "query", "text": text, "decision": decision,
                                 "rule": rule, "rows": rows, "error": error})
    store.flush()
    return store


class Runtime:
    def __init__(self, broker: ApprovalBroker):
        self.approvals = broker

    def sessions(self, active_only: bool = True) -> list[dict[str, Any]]:
        return [s for s in SESSIONS if s["state"] == "active" or not active_only]

    def status(self) -> dict[str, Any]:
        return {"sessions_active": 1, "approvals_pending": len(self.approvals.pending)}


class TestDaemon:
    """What the control API routes use of the daemon, around a real broker and audit file."""

    __test__ = False

    def __init__(self, broker: ApprovalBroker, audit: AuditStore):
        self.runtime = Runtime(broker)
        self.audit = audit
        self.stopping = asyncio.Event()
        self.state = SimpleNamespace(reloads=0, last_reload_error=None)

    def status(self) -> dict[str, Any]:
        return {"pid": 31337, "started_at": T0.isoformat(), "config": "/etc/botwarden/botwarden.toml",
                "reloads": 0, "last_reload_error": None,
                "targets": [{"name": "pg-prod", "protocol": "postgres", "address": "127.0.0.1:5432",
                             "listen": "127.0.0.1:6432"}],
                "audit": {"path": "audit.duckdb", "healthy": self.audit.healthy}, **self.runtime.status()}


@dataclass
class Served:
    socket: str
    broker: ApprovalBroker
    daemon: TestDaemon
    server: ControlServer
    audit_events: list[dict[str, Any]] = field(default_factory=list)

    def hold(self, text: str = "DELETE FROM orders WHERE id = 7", shape: str = "DELETE orders") -> asyncio.Task:
        return asyncio.create_task(self.broker.hold(
            session_id="sess-active", identity="ci-bot", target="pg-prod", protocol="postgres", text=text,
            rule="deletes-need-approval", shape=shape, process={"pid": 4242, "exe": "/usr/bin/psql"}))


@contextlib.asynccontextmanager
async def served(tmp_path: Path, socket: str | None = None, required: int = 1) -> AsyncIterator[Served]:
    events: list[dict[str, Any]] = []
    broker = ApprovalBroker(timeout_s=120, required=required, audit=lambda kind, record: events.append(dict(record)))
    audit = audit_store(tmp_path / "audit.duckdb")
    daemon = TestDaemon(broker, audit)
    path = socket or str(tmp_path / "run" / "control.sock")
    server = ControlServer(path, build_router(daemon))
    await server.start()
    try:
        yield Served(path, broker, daemon, server, events)
    finally:
        daemon.stopping.set()
        await broker.shutdown("test over")
        await server.close()
        audit.close()


async def until(pilot: Pilot, predicate: Callable[[], bool], what: str, limit_s: float = 15.0) -> None:
    """Let the app run until ``predicate`` holds (the limit only stops a broken test from hanging)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        # Not pilot.pause: it waits for every widget of the screen to go idle, and a widget
        # removed meanwhile (a dialog or the palette closing) never does.
        await asyncio.sleep(0.05)


def text_of(app: BotwardenApp, selector: str) -> str:
    """A Static's text; a rich renderable (the approval's detail grid) as the terminal shows it,
    wide enough that no line wraps."""
    content = app.query_one(selector, Static).content
    if isinstance(content, (str, Text)):
        return str(content)
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(content)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def table_rows(app: BotwardenApp, selector: str) -> list[list[str]]:
    table = app.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def make_app(path: str, **kw: Any) -> BotwardenApp:
    return BotwardenApp(path, status_every_s=0.3, retry_s=0.2, **kw)


def requests(app: BotwardenApp) -> list[str]:
    return [a["request"] for a in app.book.items()]


def key_event(key: str) -> events.Key:
    """The Key event a terminal read produces for ``key`` (as Pilot builds it)."""
    if len(key) == 1 and not key.isalnum():
        key = _character_to_key(key)
    try:
        char: str | None = unicodedata.lookup(_get_unicode_name_from_key(REPLACED_KEYS.get(key, key)))
    except KeyError:
        char = key if len(key) == 1 else None
    return events.Key(key, char)


async def burst(pilot: Pilot, *keys: str) -> None:
    """Keys as one terminal read delivers them (fast typing, tmux send-keys, an unbracketed
    paste): all in the app's queue before the first is handled. Pilot.press would wait for
    the app to go idle after each one, which is slow typing."""
    app = pilot.app
    handled_before = app._input_seq
    for key in keys:
        app.post_message(key_event(key))
    await until(pilot, lambda: not app.is_running or (app._input_seq >= handled_before + len(keys)
                                                      and not app._input_busy), "the keys", limit_s=30)
    await asyncio.sleep(0.1)


# -- pure model ------------------------------------------------------------------------------


def test_book_follows_the_watch_stream() -> None:
    book = ApprovalBook()
    a = {"approval_id": "a1", "created": "2026-11-29T03:00:00+00:00"}
    b = {"approval_id": "b2", "created": "2026-11-29T03:00:01+00:00"}
    assert book.apply({"event": "pending", "approval": b})
    assert book.apply({"event": "requested", "approval": a})
    assert [x["approval_id"] for x in book.items()] == ["a1", "b2"]
    assert not book.apply({"event": "keepalive"})
    assert book.apply({"event": "approved_partial", "approval": {**a, "approvals": ["alice"]}})
    assert book.get("a1")["approvals"] == ["alice"]
    assert book.apply({"event": "denied", "approval": a, "reason": "no"})
    assert not book.apply({"event": "expired", "approval": a})
    assert book.apply({"event": "hello", "pending": 0})
    assert len(book) == 0
    book.replace([a, {"no": "id"}, "junk"])  # type: ignore[list-item]
    assert [x["approval_id"] for x in book.items()] == ["a1"]


def test_recent_decisions_keep_the_newest_final_events() -> None:
    recent = RecentDecisions(keep=2)
    a = {"approval_id": "a1", "identity": "ci-bot", "target": "pg", "request": "DELETE  FROM t", "approvals": []}
    assert not recent.apply({"event": "requested", "approval": a})
    assert not recent.apply({"event": "approved_partial", "approval": a})
    assert recent.apply({"event": "denied", "approval": a, "reason": "denied by ann: no", "operator": "ann",
                         "window_s": None, "decided": T0.isoformat()})
    b = {**a, "approval_id": "b2", "approvals": ["bob"]}
    assert recent.apply({"event": "approved", "approval": b, "reason": "ok"}, now=T0)  # no operator field
    assert recent.apply({"event": "expired", "approval": {**a, "approval_id": "c3"}, "reason": "timed out",
                         "operator": None, "decided": "garbage"}, now=T0)
    assert [d.approval_id for d in recent.items()] == ["c3", "b2"]  # newest first, two kept
    expired, approved = recent.items()
    assert (expired.outcome, expired.operator, expired.when) == ("expired", None, T0)
    assert (approved.operator, approved.request, approved.window_s) == ("bob", "DELETE FROM t", None)
    assert window_text(300) == "5 min" and window_text(None) == "" and window_text(90) == "90 s"
    # Rows from the audit store fill in what happened before; the stream's word on an id wins.
    recent = RecentDecisions(keep=3)
    recent.apply({"event": "denied", "approval": a, "reason": "denied by ann: no", "recorded_reason": "no",
                  "operator": "ann", "decided": (T0 + timedelta(minutes=5)).isoformat()})
    recent.add_history([
        {"approval_id": "a1", "event": "denied", "operator": "ann", "reason": "old", "ts": T0.isoformat()},
        {"approval_id": "z9", "event": "approved", "operator": "bob", "reason": "ticket 7", "window_s": 900,
         "ts": (T0 + timedelta(minutes=1)).isoformat(), "identity": "ci-bot", "target": "pg", "request": None},
        {"approval_id": "y8", "event": "requested", "ts": T0.isoformat()},
        {"approval_id": "x7", "event": "expired", "ts": "not a time"},
    ])
    assert [(d.approval_id, d.reason, d.window_s) for d in recent.items()] == [("a1", "no", None),
                                                                             ("z9", "ticket 7", 900)]


def test_decision_body_and_validation() -> None:
    assert Decision("ab/c", "approve", " ok ", 300).path == "/v1/approvals/ab%2Fc/approve"
    assert Decision("x", "approve", " ok ", 300).body == {"reason": "ok", "for_s": 300}
    assert Decision("x", "deny", "freeze").body == {"reason": "freeze"}
    with pytest.raises(ValueError):
        Decision("x", "deny", "  ")
    with pytest.raises(ValueError):
        Decision("x", "deny", "r", 60)
    assert parse_window_minutes(" 5 ") == 300
    for bad in ("0", "-3", "abc", "100000"):
        with pytest.raises(ValueError):
            parse_window_minutes(bad)


def test_session_filter_and_current_statement() -> None:
    active, ended = SESSIONS[0], SESSIONS[1]
    now = T0 + timedelta(minutes=20)
    assert session_matches(active, "state=active ci-bot", now) and not session_matches(ended, "state=active", now)
    assert session_matches(ended, "identity=deploy target=pg", now) and not session_matches(ended, "target=x", now)
    assert session_matches(active, "psql", now) and not session_matches(active, "python", now)
    assert session_matches(active, "since=30m", now) and not session_matches(active, "since=15m", now)
    assert not session_matches(active, "since=soon", now)  # unreadable: matches nothing rather than all
    ssh, k8s = {**ended, "protocol": "ssh"}, {**ended, "protocol": "kubernetes"}
    assert session_matches(ssh, "protocol=ssh", now) and not session_matches(k8s, "protocol=ssh", now)
    assert session_matches(k8s, "protocol=k8s", now) and session_matches(k8s, "protocol=kubernetes", now)
    assert session_matches({**active, "protocol": "postgres"}, "protocol=sql", now)
    assert parse_span("90s") == 90 and parse_span("2h") == 7200 and parse_span("5") == 300
    running = {**active, "current": "SELECT  pg_sleep(9)", "current_running": True,
               "current_since": (now - timedelta(seconds=65)).isoformat()}
    assert current_statement(running, now) == "SELECT pg_sleep(9)  [running 1m 05s]"
    assert current_statement({**running, "current_running": False}, now) == "SELECT pg_sleep(9)  [done]"
    assert current_statement(ended, now) == ""


def test_approval_detail_lines() -> None:
    a = {"approval_id": "a1", "request": "DELETE  FROM t WHERE x = '********'", "identity": "ci-bot",
         "groups": ["bots"], "process": {"pid": 7, "uid": 1001, "exe": "/usr/bin/psql", "cgroup": "/b/ci",
                                         "attribution": "ebpf"},
         "target": "pg", "protocol": "postgres", "session_id": "s1", "rule": "r", "rule_description": "why",
         "created": T0.isoformat(), "expires": (T0 + timedelta(minutes=10)).isoformat(), "approvals": ["ann"],
         "required": 2, "earlier": [{"event": "denied", "operator": "bob", "reason": "no", "identity": "ci-bot",
                                     "decided": T0.isoformat()}]}
    lines = dict(approval_detail(a, T0 + timedelta(seconds=65)))
    assert lines["statement"] == "DELETE FROM t WHERE x = '********'"
    assert lines["identity"] == "ci-bot   groups: bots"
    assert lines["process"] == "pid 7 uid 1001 exe /usr/bin/psql cgroup /b/ci  (ebpf)"
    assert lines["rule"] == "r — why" and lines["waiting"] == "1m 05s held, 8m 55s left"
    assert lines["approvals"] == "1 of 2, so far: ann" and "denied by bob: no — ci-bot" in lines["earlier"]
    assert "rows" not in lines  # no estimate asked for: no line
    lines = dict(approval_detail({**a, "row_estimate": 5000, "row_limit": 1000, "process": {}, "earlier": []}, T0))
    assert lines["rows"] == "about 5000 rows (the rule allows 1000 without asking)"
    assert lines["process"].startswith("not attested") and lines["earlier"].startswith("no earlier decision")


def test_time_left_and_status_line() -> None:
    assert time_left((T0 + timedelta(seconds=245)).isoformat(), now=T0) == "4m 05s"
    assert time_left((T0 + timedelta(seconds=9)).isoformat(), now=T0) == "9s"
    assert time_left((T0 + timedelta(hours=2, minutes=3)).isoformat(), now=T0) == "2h 03m"
    assert time_left((T0 - timedelta(seconds=1)).isoformat(), now=T0) == "expired"
    assert time_left("garbage", now=T0) == "?"
    line = status_line({"pid": 12, "targets": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:1"}],
                        "audit": {"healthy": False}, "sessions_active": 3, "approvals_pending": 2}, 5)
    assert "pid 12" in line and "pg (postgres 127.0.0.1:1)" in line and "audit UNHEALTHY" in line
    assert "pending 5" in line  # the console's live count, not the daemon's polled one
    assert "pending ?" in status_line({}, None)
    assert "LEFT THEIR CGROUP" not in line
    assert "BOTS LEFT THEIR CGROUP: 2" in status_line({"bots_left_cgroup": 2}, None)


# -- the app against a real control server ------------------------------------------------------


def test_approve_once(tmp_path: Path) -> None:
    async def scenario() -> HoldOutcome:
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(140, 40)) as pilot:
                await until(pilot, lambda: "daemon pid 31337" in text_of(app, "#status-bar"), "status bar")
                task = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request to show")
                rows = table_rows(app, "#approvals-table")
                assert rows[0][1:6] == ["ci-bot", "pg-prod", "sql", "deletes-need-approval",
                                        "DELETE FROM orders WHERE id = 7"]
                assert "DELETE FROM orders WHERE id = 7" in text_of(app, "#approval-detail")
                await pilot.press("f6")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                await pilot.press("enter")  # reason (empty) → the Approve button; nothing decided yet
                await pilot.pause(0.2)
                assert not task.done() and app.screen.focused.id == "confirm"
                await pilot.press("enter")
                outcome = await asyncio.wait_for(task, 15)
                await until(pilot, lambda: len(app.book) == 0, "the decided request to leave the list")
                return outcome

    outcome = asyncio.run(scenario())
    assert outcome.approved
    assert outcome.decided_by == getpass.getuser()


def test_deny_needs_a_reason(tmp_path: Path) -> None:
    async def scenario() -> tuple[HoldOutcome, str]:
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(140, 40)) as pilot:
                task = env.hold("DROP TABLE orders", "DROP orders")
                await until(pilot, lambda: len(app.book) == 1, "the held request to show")
                await pilot.press("f8")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                assert app.screen.focused.id == "reason"
                await pilot.press("tab")  # inside the dialog tab moves focus, not the tabs underneath
                assert isinstance(app.screen, DecisionScreen) and app.query_one("#tabs").active == "approvals"
                assert app.screen.focused.id == "confirm"
                await pilot.press("enter")  # no reason yet: the dialog stays, says why, and goes back to it
                await pilot.pause()
                assert isinstance(app.screen, DecisionScreen) and app.screen.focused.id == "reason"
                complaint = str(app.screen.query_one("#dialog-error", Static).content)
                assert not task.done()
                await pilot.press(*"change freeze")
                await pilot.press("enter", "enter")
                outcome = await asyncio.wait_for(task, 15)
                return outcome, complaint

    outcome, complaint = asyncio.run(scenario())
    assert "reason" in complaint
    assert not outcome.approved
    assert "change freeze" in outcome.reason
    assert outcome.decided_by == getpass.getuser()


def test_approve_for_a_window(tmp_path: Path) -> None:
    async def scenario() -> tuple[HoldOutcome, HoldOutcome, Served]:
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(140, 40)) as pilot:
                task = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request to show")
                approval_id = app.book.items()[0]["approval_id"]
                await pilot.press("f7")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                await pilot.press(*"nightly batch", "enter")  # reason, on to the minutes
                await pilot.press("backspace", "backspace", "5", "enter", "enter")  # 15 → 5, the button, decide
                outcome = await asyncio.wait_for(task, 15)
                assert [w.approval_id for w in env.broker.windows] == [approval_id]
                # The window is real: the same identity, target and shape now pass unheld.
                again = await asyncio.wait_for(env.hold(text="DELETE FROM orders WHERE id = 8"), 5)
                return outcome, again, env

    outcome, again, env = asyncio.run(scenario())
    assert outcome.approved and outcome.decided_by == getpass.getuser()
    assert again.approved and "window" in again.reason
    window = env.broker.windows[0]
    assert (window.identity, window.target, window.shape) == ("ci-bot", "pg-prod", "DELETE orders")
    approved = [e for e in env.audit_events if e["event"] == "approved" and e.get("window_s")]
    assert approved[0]["window_s"] == 300 and approved[0]["reason"] == "nightly batch"


def test_a_refused_decision_is_shown_not_fatal(tmp_path: Path) -> None:
    async def scenario() -> tuple[HoldOutcome, list[str]]:
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(140, 40)) as pilot:
                task = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request to show")
                approval_id = app.book.items()[0]["approval_id"]
                await pilot.press("f6")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                # Someone else decides first (the CLI, another console) while the dialog is open.
                await asyncio.to_thread(ControlClient(env.socket).post, f"/v1/approvals/{approval_id}/deny",
                                        {"reason": "decided elsewhere"})
                await pilot.press("enter", "enter")
                await until(pilot, lambda: any("no pending approval" in n for n in app.notices), "the refusal")
                assert app.is_running and not isinstance(app.screen, DecisionScreen)
                outcome = await asyncio.wait_for(task, 15)
                return outcome, list(app.notices)

    outcome, notices = asyncio.run(scenario())
    assert not outcome.approved and "decided elsewhere" in outcome.reason
    refusal = [n for n in notices if "no pending approval" in n]
    assert refusal and refusal[0].startswith("approve ")  # says which decision was refused


def test_two_person_rule_shows_progress(tmp_path: Path) -> None:
    async def scenario() -> tuple[str, list[str], bool]:
        async with served(tmp_path, required=2) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(140, 40)) as pilot:
                task = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request to show")
                assert table_rows(app, "#approvals-table")[0][7] == "0/2"
                await pilot.press("f6")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                await pilot.press("enter", "enter")
                await until(pilot, lambda: table_rows(app, "#approvals-table")[0][7] == "1/2", "1 of 2")
                await until(pilot, lambda: any("waiting for more" in n for n in app.notices), "the notice")
                progress = table_rows(app, "#approvals-table")[0][7]
                # The detail pane and the next dialog name who has approved so far.
                assert f"1 of 2, so far: {getpass.getuser()}" in text_of(app, "#approval-detail")
                # The same operator approving again is refused by the daemon, and the console says so.
                await pilot.press("f6")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                what = str(app.screen.query_one("#dialog-what", Static).content)
                assert f"Approval 2 of 2 (so far: {getpass.getuser()}): it runs now." in what
                await pilot.press("enter", "enter")
                await until(pilot, lambda: any("already approved" in n for n in app.notices), "the refusal")
                held = not task.done()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return progress, list(app.notices), held

    progress, notices, held = asyncio.run(scenario())
    assert progress == "1/2" and held
    assert any("recorded (1/2)" in n for n in notices)


def test_sessions_and_replay(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[list[str]], list[list[str]], str]:
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(140, 40)) as pilot:
                await pilot.press("f2")  # Approvals → Sessions
                await until(pilot, lambda: app.query_one("#sessions-table", DataTable).row_count == 2,
                            "active and ended sessions")
                sessions = table_rows(app, "#sessions-table")
                table = app.query_one("#sessions-table", DataTable)
                table.move_cursor(row=table.get_row_index("sess-ended"))
                await pilot.press("enter")
                await until(pilot, lambda: app.query_one("#replay-table", DataTable).row_count == 3,
                            "the replayed requests")
                assert app.query_one("#tabs").active == "replay"
                return sessions, table_rows(app, "#replay-table"), text_of(app, "#replay-msg")

    sessions, replay, msg = asyncio.run(scenario())
    assert [r[0] for r in sessions] == ["sess-active", "sess-ended"]
    assert [r[2] for r in replay] == ["SELECT 1", "SELECT email FROM users", "DROP TABLE orders"]
    assert replay[2][3:5] == ["block", "no-drop"]
    assert "session sess-ended: 3 requests" in msg


def test_audit_sql_and_reports(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            seen: dict[str, Any] = {}
            async with app.run_test(size=(140, 40)) as pilot:
                await pilot.press("f3")
                sql = app.query_one("#sql", Input)
                assert app.focused is sql
                sql.value = "SELECT decision, count(*) AS n FROM requests GROUP BY decision ORDER BY decision"
                await pilot.press("enter")
                await until(pilot, lambda: app.query_one("#audit-table", DataTable).row_count == 3, "results")
                seen["rows"] = table_rows(app, "#audit-table")
                seen["columns"] = [str(c.label) for c in app.query_one("#audit-table", DataTable).ordered_columns]

                sql.value = "SELECT 1 AS n, 'two' AS n"  # a query's column names may repeat
                await pilot.press("enter")
                await until(pilot, lambda: "1 row" in text_of(app, "#audit-msg"), "the repeated names")
                seen["repeated"] = ([str(c.label) for c in app.query_one("#audit-table", DataTable).ordered_columns],
                                    table_rows(app, "#audit-table"))

                sql.value = "DELETE FROM requests"
                await pilot.press("enter")
                await until(pilot, lambda: "refused" in text_of(app, "#audit-msg"), "the refusal")
                seen["refusal"] = text_of(app, "#audit-msg")

                await pilot.press("ctrl+o")
                assert isinstance(app.focused, Select)
                # A canned report: whatever the daemon answers (a table, or its error text) is shown.
                app.query_one("#report", Select).value = "blocked_attempts"
                await until(pilot, lambda: "report blocked_attempts:" in text_of(app, "#audit-msg"), "the report")
                seen["report_msg"] = text_of(app, "#audit-msg")
                seen["report_table"] = table_rows(app, "#audit-table")
            try:
                seen["direct"] = await asyncio.to_thread(ControlClient(env.socket).get,
                                                         "/v1/audit/reports/blocked_attempts")
            except ControlError as e:
                seen["direct_error"] = e.message
            return seen

    seen = asyncio.run(scenario())
    assert seen["columns"] == ["decision", "n"]
    assert seen["rows"] == [["allow", "2"], ["block", "1"], ["mask", "1"]]
    assert seen["repeated"] == (["n", "n"], [["1", "two"]])
    assert "read-only" in seen["refusal"].lower() or "read only" in seen["refusal"].lower()
    if "direct_error" in seen:
        assert seen["direct_error"] in seen["report_msg"]
    else:
        assert len(seen["report_table"]) == len(seen["direct"]["rows"])


def test_daemon_not_running_then_back(tmp_path: Path) -> None:
    socket = str(tmp_path / "run" / "control.sock")

    async def scenario() -> tuple[str, str]:
        app = make_app(socket)
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: "not running" in text_of(app, "#status-bar"), "the not-running notice")
            down = text_of(app, "#status-bar")
            async with served(tmp_path, socket=socket) as env:
                await until(pilot, lambda: "daemon pid 31337" in text_of(app, "#status-bar"), "the retry")
                await until(pilot, lambda: app.watch_live, "the approvals stream")
                task = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request after reconnecting")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await until(pilot, lambda: len(app.book) == 0, "the withdrawn request to leave")
                up = text_of(app, "#status-bar")
                env.hold("DELETE FROM orders WHERE id = 9")
                await until(pilot, lambda: len(app.book) == 1, "a request held when the daemon stops")
            # The daemon went away under the console: it says so, drops what it can no longer
            # vouch for, and keeps running.
            await until(pilot, lambda: "not running" in text_of(app, "#status-bar"), "the daemon gone")
            await until(pilot, lambda: len(app.book) == 0, "the stale request to go")
            assert app.is_running
            await pilot.press("f10")  # nothing pending: quits without asking
            await until(pilot, lambda: not app.is_running, "F10 to quit")
            return down, up

    down, up = asyncio.run(scenario())
    assert socket in down and "retrying" in down
    assert "targets: pg-prod (postgres 127.0.0.1:6432)" in up and "audit ok" in up


# -- keys: where they land, and what they can (not) do --------------------------------------------


def test_fast_keys_land_where_slow_typing_would(tmp_path: Path) -> None:
    """Bursts with letters that used to be bindings (a, d, q, w, digits), Tab, Backspace and
    Enter: each decides exactly what the dialog showed when Enter hit its button, nothing else."""

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(140, 40)) as pilot:
                await until(pilot, lambda: app.watch_live, "the approvals stream")
                first = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request to show")
                # On the queue, typed letters and digits are nothing: no decision, no tab, no quit.
                await burst(pilot, *"adwq1234 qd", "tab", "shift+tab")
                seen["after_letters"] = (app.is_running, app.query_one("#tabs").active, type(app.screen))
                # F8, a reason with a Backspace in it, Tab to the Deny button, more letters (they land
                # on the button, which ignores them), Enter on the button: one burst.
                await burst(pilot, "f8", *"no: a d q 1234x", "backspace", "tab", *"qad 9", "enter")
                seen["first"] = await asyncio.wait_for(first, 15)
                await until(pilot, lambda: app.screen is app.screen_stack[0], "the dialog to close")
                seen["focus_after"] = app.focused.id if app.focused else None
                # Approve once: Enter in the reason moves to the button, the second Enter decides.
                second = env.hold("DELETE FROM orders WHERE id = 8")
                await until(pilot, lambda: requests(app) == ["DELETE FROM orders WHERE id = 8"], "the second")
                await burst(pilot, "f6", *"ok: checked w/ owner, a+d q=42", "enter", "enter", *"dq")
                seen["second"] = await asyncio.wait_for(second, 15)
                # Escape cancels, and what follows it is typed at the queue again: nothing decided.
                third = env.hold("DELETE FROM orders WHERE id = 9")
                await until(pilot, lambda: requests(app) == ["DELETE FROM orders WHERE id = 9"], "the third")
                await burst(pilot, "f8", *"q a d", "escape", *"qad1234", "enter", "f6", *"d 1", "escape")
                await pilot.pause(0.5)
                seen["third_done"] = third.done()
                seen["running"] = app.is_running
                seen["screen"] = type(app.screen)
                third.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await third
        return seen

    seen = asyncio.run(scenario())
    running, tab, screen = seen["after_letters"]
    assert running and tab == "approvals" and screen not in (DecisionScreen, QuitScreen)
    first: HoldOutcome = seen["first"]
    assert not first.approved and first.reason == f"denied by {getpass.getuser()}: no: a d q 1234"
    assert seen["focus_after"] == "approvals-table"
    second: HoldOutcome = seen["second"]
    assert second.approved and second.reason == "ok: checked w/ owner, a+d q=42"
    assert not seen["third_done"] and seen["running"] and seen["screen"] is not DecisionScreen


def test_a_dialog_owns_the_keyboard(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with served(tmp_path) as env:
            app = make_app(env.socket, screenshot_dir=str(tmp_path))
            async with app.run_test(size=(140, 40)) as pilot:
                task = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request to show")
                await pilot.press("f3")  # from another tab: F6-F8 act the same everywhere
                for key, mode in (("f6", "approve"), ("f7", "window"), ("f8", "deny")):
                    await pilot.press(key)
                    await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                    seen[mode] = (app.screen.mode, app.screen.focused.id if app.screen.focused else None)
                    # Every global key, the palette and quit: none of them acts while the dialog is open.
                    await pilot.press("f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f10", "ctrl+q",
                                      "ctrl+p", "ctrl+o", *"q1")
                    # A pasted line break is not Enter: the paste's first line lands in the field.
                    before = app._input_seq
                    app.post_message(events.Paste(" pasted\nsecond line\n"))
                    await until(pilot, lambda: app._input_seq > before and not app._input_busy, "the paste")
                    seen[f"{mode}_after_keys"] = (type(app.screen), app.screen.mode, app.is_running,
                                                  app.query_one("#tabs").active,
                                                  app.screen.query_one("#reason", Input).value)
                    await pilot.press("escape")
                    await until(pilot, lambda: not isinstance(app.screen, DecisionScreen), "the dialog to close")
                seen["decided"] = task.done()
                seen["palette_seen"] = False
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return seen

    seen = asyncio.run(scenario())
    for mode in ("approve", "window", "deny"):
        assert seen[mode] == (mode, "reason")
        assert seen[f"{mode}_after_keys"] == (DecisionScreen, mode, True, "approvals", "q1 pasted")
    assert not seen["decided"]


def test_quit_asks_while_requests_are_pending(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(140, 40)) as pilot:
                task = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request to show")
                await pilot.press("q")  # a letter: nothing
                seen["q"] = (app.is_running, type(app.screen))
                await pilot.press("f10")
                await until(pilot, lambda: isinstance(app.screen, QuitScreen), "the question")
                seen["focus"] = app.screen.focused.id
                await pilot.press(*"qy", "enter")  # Enter on the focused "Stay"
                await until(pilot, lambda: not isinstance(app.screen, QuitScreen), "the question to close")
                seen["stayed"] = app.is_running
                await pilot.press("ctrl+q")
                await until(pilot, lambda: isinstance(app.screen, QuitScreen), "the question again")
                await pilot.press("escape")
                await until(pilot, lambda: not isinstance(app.screen, QuitScreen), "escape to stay")
                await pilot.press("f10")
                await until(pilot, lambda: isinstance(app.screen, QuitScreen), "the question a third time")
                await pilot.press("tab", "enter")  # Quit
                await until(pilot, lambda: not app.is_running, "quitting")
                seen["held"] = not task.done()  # quitting the console decides nothing
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return seen

    seen = asyncio.run(scenario())
    assert seen["q"][0] and seen["q"][1] is not QuitScreen
    assert seen["focus"] == "stay" and seen["stayed"] and seen["held"]


# -- recently decided, and one pending count ---------------------------------------------------


def pending_shown(app: BotwardenApp) -> tuple[str, str, str]:
    """The pending count as the header, the Approvals tab and the status bar show it."""
    bar = text_of(app, "#status-bar")
    label = str(app.query_one("#tabs").get_tab("approvals").label)
    return (app.sub_title.rsplit("· ", 1)[-1].split()[0], label.split("(")[1].rstrip(")"),
            bar.split("pending ", 1)[1].split()[0])


def test_recently_decided_and_one_pending_count(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {"counts": []}
        async with served(tmp_path) as env:
            app = make_app(env.socket)
            async with app.run_test(size=(160, 45)) as pilot:
                await until(pilot, lambda: app.watch_live and app.daemon_status is not None, "the console")
                tasks = [env.hold(f"DELETE FROM orders WHERE id = {i}", f"DELETE orders {i}") for i in (1, 2, 3)]
                await until(pilot, lambda: len(app.book) == 3, "three held requests")
                seen["counts"].append(pending_shown(app))
                ids = [a["approval_id"] for a in app.book.items()]
                await pilot.press("f7", *"nightly batch", "enter", "backspace", "backspace", "5", "enter", "enter")
                await asyncio.wait_for(tasks[0], 15)
                await until(pilot, lambda: len(app.book) == 2, "two left")
                seen["counts"].append(pending_shown(app))
                await pilot.press("f8", *"not during the freeze", "enter", "enter")
                await asyncio.wait_for(tasks[1], 15)
                await until(pilot, lambda: len(app.book) == 1, "one left")
                seen["counts"].append(pending_shown(app))
                tasks[2].cancel("the bot hung up")
                with contextlib.suppress(asyncio.CancelledError):
                    await tasks[2]
                await until(pilot, lambda: len(app.recent) == 3, "three decided")
                seen["counts"].append(pending_shown(app))
                seen["recent"] = table_rows(app, "#recent-table")
                seen["ids"] = ids
        return seen

    seen = asyncio.run(scenario())
    assert seen["counts"] == [("3", "3", "3"), ("2", "2", "2"), ("1", "1", "1"), ("0", "0", "0")]
    me = getpass.getuser()
    rows = {r[1]: r for r in seen["recent"]}
    first, second, third = (rows[i] for i in seen["ids"])
    assert [r[1] for r in seen["recent"]] == [seen["ids"][2], seen["ids"][1], seen["ids"][0]]  # newest first
    assert first[2:5] == ["approved", me, "5 min"] and first[7] == "nightly batch"
    assert second[2:5] == ["denied", me, ""] and second[7] == "not during the freeze"
    assert third[2:4] == ["abandoned", "—"] and "hung up" in third[7]
    for row in (first, second, third):
        assert len(row[0]) == 8 and row[0][2] == ":"  # HH:MM:SS
        assert row[5:7] == ["ci-bot", "pg-prod"]



def test_a_row_added_on_screen_is_drawn_whole() -> None:
    """A decision whose outcome and reason are longer than the rows before it is drawn whole
    when the table is already on screen: Textual measured auto-width columns only when the table
    went idle, and the lines already drawn kept the old widths ("approve", "ok: checked a+" on the
    console in CI, 7 December)."""
    def decided(n: int, outcome: str, reason: str) -> dict[str, Any]:
        return {"event": outcome, "operator": "root", "reason": reason,
                "approval": {"approval_id": f"held-{n}", "identity": "orders-bot", "target": "orders",
                             "request": f"DELETE FROM ledger WHERE id = {n}"}}

    def screen(app: BotwardenApp) -> list[str]:
        """The screen as a terminal shows it (the text of the SVG screenshot, line by line)."""
        svg = app.export_screenshot()
        return [html.unescape(re.sub(r"<[^>]+>", "", line)).replace("\xa0", " ") for line in svg.splitlines()]

    async def scenario() -> list[str]:
        app = BotwardenApp("/nonexistent/control.sock", connect=False)
        async with app.run_test(size=(170, 50)) as pilot:
            for event in (decided(1, "denied", "no: a d q 1234"), decided(2, "approved", "ok: checked a+d q=42")):
                app.recent.apply(event)
                app._render_recent()
                screen(app)  # drawn before the table goes idle, as a terminal update can be
                await pilot.pause()
            return screen(app)

    lines = asyncio.run(scenario())
    assert any("held-2" in line and "approved" in line and "ok: checked a+d q=42" in line for line in lines), \
        [line for line in lines if "held-" in line]
    assert any("held-1" in line and "denied" in line and "no: a d q 1234" in line for line in lines)

# -- never hangs -------------------------------------------------------------------------------


@pytest.fixture
def cpu_hog():
    """Two busy processes: this machine's two cores are taken, as on a loaded bastion."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


async def run_command(pilot: Pilot, name: str) -> None:
    """ctrl+p, the command's name and Enter, as an operator types them."""
    app = pilot.app
    await burst(pilot, "ctrl+p", *name)
    assert isinstance(app.screen, CommandPalette)

    def best_match() -> str | None:
        found = app.screen.query(CommandList)
        if not found or found.first().highlighted is None:
            return None
        option = found.first().get_option_at_index(found.first().highlighted)
        return str(option.prompt).split("\n")[0]

    def settled() -> bool:
        # The palette searches in a worker and may re-sort while it runs: wait for it to finish.
        searching = any(w.node is app.screen and not w.is_finished for w in app.workers)
        return not searching and best_match() == name

    await until(pilot, settled, f"{name} to be the palette's choice", limit_s=30)
    # Not pilot.press: it waits for the palette's widgets, which Enter removes.
    await burst(pilot, "enter")
    await until(pilot, lambda: not isinstance(app.screen, CommandPalette), f"the palette to run {name}", limit_s=30)


@pytest.mark.timeout(240)  # a loaded machine, loaded further on purpose
def test_palette_commands_work_under_cpu_load(tmp_path: Path, cpu_hog: None) -> None:
    shots = tmp_path / "shots"
    shots.mkdir()

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with served(tmp_path) as env:
            app = make_app(env.socket, screenshot_dir=str(shots))
            async with app.run_test(size=(140, 40)) as pilot:
                await until(pilot, lambda: app.watch_live, "the approvals stream", limit_s=30)
                seen["offered"] = sorted(c.title for c in app.get_system_commands(app.screen))
                for tab in ("Sessions", "Audit", "Replay", "Approvals"):
                    await run_command(pilot, f"{tab} tab")
                    await until(pilot, lambda: app.query_one("#tabs").active == tab.lower(), tab, limit_s=30)
                    seen[tab] = (app.query_one("#tabs").active, app.focused.id if app.focused else None)
                await run_command(pilot, "Refresh")
                await run_command(pilot, "Keys")
                await until(pilot, lambda: bool(app.screen.query(HelpPanel)), "the keys panel", limit_s=30)
                await run_command(pilot, "Keys")
                await until(pilot, lambda: not app.screen.query(HelpPanel), "the keys panel to hide", limit_s=30)
                await run_command(pilot, "Screenshot")
                await until(pilot, lambda: any(shots.glob("*.svg")), "the screenshot", limit_s=30)
                await until(pilot, lambda: any("screenshot saved to" in n for n in app.notices), "its notice",
                            limit_s=30)
                task = env.hold()
                await until(pilot, lambda: len(app.book) == 1, "the held request", limit_s=30)
                await run_command(pilot, "Quit")
                await until(pilot, lambda: isinstance(app.screen, QuitScreen), "the quit question", limit_s=30)
                await pilot.press("escape")
                # Still answering keys after all of it.
                await pilot.press("f2")
                seen["after"] = app.query_one("#tabs").active
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await until(pilot, lambda: len(app.book) == 0, "the withdrawn request", limit_s=30)
                await run_command(pilot, "Quit")  # nothing pending: quits
                await until(pilot, lambda: not app.is_running, "quitting", limit_s=30)
        return seen

    seen = asyncio.run(scenario())
    assert seen["offered"] == ["Approvals tab", "Audit tab", "Fleet audit", "Help", "Keys", "Quit", "Refresh",
                               "Replay tab", "Screenshot", "Sessions tab", "Status tab"]
    assert seen["Sessions"] == ("sessions", "sessions-table") and seen["Audit"] == ("audit", "sql")
    assert seen["Replay"] == ("replay", "replay-session") and seen["Approvals"] == ("approvals", "approvals-table")
    assert seen["after"] == "sessions"
    (svg,) = shots.glob("*.svg")
    text = svg.read_text()
    assert text.startswith("<svg") and "Approvals" in text


class TricklingDaemon:
    """A real Unix socket whose peer answers one byte at a time, forever: each read succeeds
    well within the socket timeout, so only the console's own deadline ends the call."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            conn, _ = self.sock.accept()
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not self.stop.wait(0.1):
                    conn.sendall(b"X")  # a header line that never ends
            except OSError:
                pass


def test_an_unanswered_call_is_reported_and_keys_still_work(tmp_path: Path) -> None:
    trickle = TricklingDaemon(tmp_path / "control.sock")

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        app = make_app(str(trickle.path), call_timeout_s=0.5)
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: "no answer from the daemon within 0.5 s" in text_of(app, "#status-bar"),
                        "the missing answer")
            await pilot.press("f2")
            seen["tab"] = app.query_one("#tabs").active
            await until(pilot, lambda: "no answer" in text_of(app, "#sessions-msg"), "the sessions call too")
            await pilot.press("f10")
            await until(pilot, lambda: not app.is_running, "quitting")
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        trickle.stop.set()
    assert seen["tab"] == "sessions"
