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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Select, Static

from analytics import AuditStore
from appliance.api import build_router
from appliance.approvals import ApprovalBroker, HoldOutcome
from appliance.control import ControlClient, ControlError, ControlServer
from tui.app import BotwardenApp
from tui.dialogs import DecisionScreen
from tui.model import ApprovalBook, Decision, parse_window_minutes, status_line, time_left

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
        await pilot.pause(0.05)


def text_of(app: BotwardenApp, selector: str) -> str:
    return str(app.query_one(selector, Static).content)


def table_rows(app: BotwardenApp, selector: str) -> list[list[str]]:
    table = app.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def make_app(path: str) -> BotwardenApp:
    return BotwardenApp(path, status_every_s=0.3, retry_s=0.2)


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


def test_time_left_and_status_line() -> None:
    assert time_left((T0 + timedelta(seconds=245)).isoformat(), now=T0) == "4m 05s"
    assert time_left((T0 + timedelta(seconds=9)).isoformat(), now=T0) == "9s"
    assert time_left((T0 + timedelta(hours=2, minutes=3)).isoformat(), now=T0) == "2h 03m"
    assert time_left((T0 - timedelta(seconds=1)).isoformat(), now=T0) == "expired"
    assert time_left("garbage", now=T0) == "?"
    line = status_line({"pid": 12, "targets": [{"name": "pg", "protocol": "postgres", "listen": "127.0.0.1:1"}],
                        "audit": {"healthy": False}, "sessions_active": 3, "approvals_pending": 2})
    assert "pid 12" in line and "pg (postgres 127.0.0.1:1)" in line and "audit UNHEALTHY" in line
    assert "pending 2" in line and "LEFT THEIR CGROUP" not in line
    assert "BOTS LEFT THEIR CGROUP: 2" in status_line({"bots_left_cgroup": 2})


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
                assert rows[0][1:5] == ["ci-bot", "pg-prod", "deletes-need-approval", "DELETE FROM orders WHERE id = 7"]
                assert "DELETE FROM orders WHERE id = 7" in text_of(app, "#approval-detail")
                await pilot.press("a")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
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
                await pilot.press("d")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                await pilot.press("tab")  # inside the dialog tab moves focus, not the tabs underneath
                assert isinstance(app.screen, DecisionScreen) and app.query_one("#tabs").active == "approvals"
                await pilot.press("shift+tab")
                await pilot.press("enter")  # no reason yet: the dialog stays and says why
                await pilot.pause()
                assert isinstance(app.screen, DecisionScreen)
                complaint = str(app.screen.query_one("#dialog-error", Static).content)
                assert not task.done()
                await pilot.press(*"change freeze")
                await pilot.press("enter")
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
                await pilot.press("w")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                await pilot.press("backspace", "backspace", "5", "enter")  # 15 → 5 minutes, on to reason
                await pilot.press(*"nightly batch", "enter")
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
                await pilot.press("a")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                # Someone else decides first (the CLI, another console) while the dialog is open.
                await asyncio.to_thread(ControlClient(env.socket).post, f"/v1/approvals/{approval_id}/deny",
                                        {"reason": "decided elsewhere"})
                await pilot.press("enter")
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
                assert table_rows(app, "#approvals-table")[0][6] == "0/2"
                await pilot.press("a")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                await pilot.press("enter")
                await until(pilot, lambda: table_rows(app, "#approvals-table")[0][6] == "1/2", "1 of 2")
                await until(pilot, lambda: any("waiting for more" in n for n in app.notices), "the notice")
                progress = table_rows(app, "#approvals-table")[0][6]
                # The same operator approving again is refused by the daemon, and the console says so.
                await pilot.press("a")
                await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
                await pilot.press("enter")
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
                await pilot.press("tab")  # Approvals → Sessions
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
                await pilot.press("3")
                sql = app.query_one("#sql", Input)
                assert app.focused is sql
                sql.value = "SELECT decision, count(*) AS n FROM requests GROUP BY decision ORDER BY decision"
                await pilot.press("enter")
                await until(pilot, lambda: app.query_one("#audit-table", DataTable).row_count == 3, "results")
                seen["rows"] = table_rows(app, "#audit-table")
                seen["columns"] = [str(c.label) for c in app.query_one("#audit-table", DataTable).ordered_columns]

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
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, "q to quit")
            return down, up

    down, up = asyncio.run(scenario())
    assert socket in down and "retrying" in down
    assert "targets: pg-prod (postgres 127.0.0.1:6432)" in up and "audit ok" in up
