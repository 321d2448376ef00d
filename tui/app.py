"""The operator console: a Textual app that talks to the daemon only through the control API.

Layout: four tabs (Approvals with its "recently decided" list, Sessions, Audit, Replay)
above a status bar and the key footer. Every control API call is blocking
(:class:`appliance.control.ControlClient`), so each one runs on a worker thread with a
timeout and posts an :class:`Answer` message back; the UI thread never waits on the socket,
and a call that outlives its deadline is reported as unanswered. Pending approvals are kept
live from the daemon's NDJSON watch stream, read on a background thread that reconnects
while the daemon is away; that stream is the one source of the pending count shown in the
header, the Approvals tab and the status bar.

Keys (README, "The operator console"): global actions are F-keys (priority bindings that
are skipped while a dialog, the quit question or the command palette is open), so nothing
an operator types into a field can trigger them; keys are handled strictly in arrival
order (:mod:`tui.keys`); focus and screen changes made by keys happen synchronously.
SIGTERM, SIGINT and SIGHUP end the console within a second (:func:`run_tui`).

Errors from the daemon are shown (status bar, notifications, a message line per tab) and
never end the app; when the daemon is not running the console says so and keeps retrying.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar
from urllib.parse import quote

from rich.cells import cell_len
from rich.table import Table as RichTable
from rich.text import Text
from textual import on
from textual.actions import SkipAction
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.command import CommandPalette
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Header, Input, Label, Select, Static, TabbedContent, TabPane
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

from appliance.control import ControlClient, ControlError, DaemonNotRunning
from tui.dialogs import DecisionScreen, EndSessionScreen, HelpScreen, Mode, QuitScreen
from tui.fleet import QUERY_TIMEOUT_S as FLEET_QUERY_TIMEOUT_S
from tui.fleet import FleetUnavailable, OperatorLake
from tui.keys import OrderedKeys
from tui.model import (ApprovalBook, Decision, RecentDecisions, approval_detail, cell, current_statement,
                       health_lines, protocol_short, session_matches, status_line, time_left, window_text)
from tui.queries import RECENT_DECISIONS_SQL, REPLAY_SQL, REPORTS

log = logging.getLogger(__name__)

WATCH_PATH = "/v1/approvals/watch"
TABS = ("approvals", "sessions", "audit", "replay", "status")
TAB_KEYS = {"approvals": "F1", "sessions": "F2", "audit": "F3", "replay": "F4", "status": "F9"}
TAB_FOCUS = {"approvals": "#approvals-table", "sessions": "#sessions-table", "audit": "#sql",
             "replay": "#replay-session", "status": "#status-scroll"}
# The Status view asks the daemon for its live checks (targets, Vault, OIDC) this often while shown.
HEALTH_EVERY_S = 15.0
MAX_TABLE_ROWS = 2000  # a SELECT without LIMIT must not freeze the terminal
REQUEST_PREVIEW = 80
RECENT_KEEP = 10
# (label, key) of each table's columns.
APPROVAL_COLUMNS = (("id", "id"), ("identity", "identity"), ("target", "target"), ("proto", "protocol"),
                    ("rule", "rule"), ("request", "request"), ("left", "left"), ("ok", "ok"))
RECENT_COLUMNS = tuple((label, label) for label in ("time", "id", "outcome", "by", "window", "identity", "target",
                                                    "reason", "request"))
SESSION_COLUMNS = tuple((key, key) for key in ("session_id", "identity", "target", "protocol", "state", "current",
                                               "pid", "uid", "exe", "started", "ended", "client"))
# The stream sends a keepalive every 15 s; three missed ones mean the socket is dead.
WATCH_READ_TIMEOUT_S = 45.0
# After SIGTERM / SIGINT / SIGHUP, the console is gone within this long even if its loop is stuck.
SIGNAL_EXIT_S = 0.8


@dataclass
class Answer(Message):
    """The daemon's answer to one control API call made in a worker."""

    purpose: str
    value: Any = None
    error: str | None = None
    not_running: bool = False
    context: Any = None
    seq: int = 0
    call_id: int = 0


@dataclass
class Call:
    """One control API call that is out: what for, and until when its answer is awaited."""

    purpose: str
    method: str
    path: str
    deadline: float
    context: Any
    seq: int


@dataclass
class WatchEvent(Message):
    """One object from the approvals watch stream."""

    event: dict[str, Any] = field(default_factory=dict)


@dataclass
class WatchDown(Message):
    """The approvals watch stream ended or could not be opened."""

    why: str = ""
    not_running: bool = False


def fill_table(table: DataTable, columns: Sequence[tuple[str, str | None]],
               rows: Sequence[tuple[str | None, Sequence[Text]]], *, at_least: Mapping[str, int] | None = None) -> None:
    """Replace a table's columns (label, key: None for a query's, whose names may repeat) and rows
    (row key, cells), each column as wide as its widest cell.

    Textual sizes auto-width columns only when the table next goes idle, and lines it drew before
    that stay cached with the old widths: a decision added to "Recently decided" kept its outcome
    and reason cut at the previous row's widths until something else redrew the table (seen in CI).
    Widths given up front leave nothing to recompute."""
    widths = [max([cell_len(label), (at_least or {}).get(key or "", 0), *(cells[i].cell_len for _, cells in rows)])
              for i, (label, key) in enumerate(columns)]
    table.clear(columns=True)
    for (label, key), width in zip(columns, widths):
        table.add_column(label, key=key, width=width)
    for key, cells in rows:
        table.add_row(*cells, key=key)


class BotwardenApp(OrderedKeys):
    """The botwarden operator console."""

    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere find it too
    TITLE = "botwarden"

    # Every global key is an F-key (or a ctrl chord) and a priority binding: it cannot be
    # typed into a field, acts the same on every tab, and is skipped while any dialog is open.
    # The tab keys are on the tabs themselves ("F2 Sessions"), so the footer has room at 80 columns.
    BINDINGS: ClassVar = [
        Binding("f1", "show_tab('approvals')", "Approvals", priority=True, show=False),
        Binding("f2", "show_tab('sessions')", "Sessions", priority=True, show=False),
        Binding("f3", "show_tab('audit')", "Audit", priority=True, show=False),
        Binding("f4", "show_tab('replay')", "Replay", priority=True, show=False),
        Binding("f9", "show_tab('status')", "Status", priority=True, show=False),
        Binding("f5", "refresh", "Refresh", priority=True, show=False),
        Binding("f6", "approve", "Approve", priority=True),
        Binding("f7", "approve_window", "Window", priority=True),
        Binding("f8", "deny", "Deny", priority=True),
        Binding("f10", "quit", "Quit", priority=True),
        # Not a priority binding: in a text field "?" is typed, everywhere else it opens the help.
        Binding("question_mark", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),
        Binding("ctrl+o", "focus_reports", "Reports", priority=True, show=False),
        Binding("ctrl+r", "player", "Player", priority=True, show=False),   # tui/replay.py
        # Audit tab only (check_action): its source, this bastion's store or the fleet lake (tui.fleet).
        Binding("ctrl+f", "toggle_fleet", "Fleet/local", priority=True),
        # Enter on a session replays it; done here so the focus moves before the next key.
        Binding("enter", "enter", show=False, priority=True),
    ]

    def __init__(self, socket_path: str, *, status_every_s: float = 3.0, retry_s: float = 2.0,
                 call_timeout_s: float = 10.0, screenshot_dir: str | None = None, connect: bool = True,
                 clock: Callable[[], datetime] | None = None):
        """``connect=False`` and ``clock``: for snapshot tests, which hand the console the daemon's
        documents themselves and freeze its clock, so every render is the same."""
        super().__init__()
        self.connect = connect
        self._clock = clock
        self.socket_path = socket_path
        self.call_timeout_s = call_timeout_s
        self.client = ControlClient(socket_path, timeout=call_timeout_s)
        self.status_every_s = status_every_s
        self.retry_s = retry_s
        self.screenshot_dir = Path(screenshot_dir or os.getcwd())
        self.book = ApprovalBook()
        self.sessions: list[dict[str, Any]] = []
        self.health: dict[str, Any] | None = None
        self.health_error: str | None = None
        self.bells = 0  # terminal bells rung for new held requests
        self.recent = RecentDecisions(RECENT_KEEP)
        self.daemon_up: bool | None = None  # None until the first answer
        self.daemon_status: dict[str, Any] | None = None
        self.daemon_error: str | None = None
        self.watch_live = False
        self._stop_watch = threading.Event()
        self._watch_thread: threading.Thread | None = None
        self._calls: dict[int, Call] = {}
        self._call_ids = 0
        self._seq: dict[str, int] = {}
        # Notifications fade after a few seconds; the recent ones stay readable here.
        self.notices: deque[str] = deque(maxlen=50)
        # The Audit tab's source: "local" (the daemon's store, over the control socket) or "fleet"
        # (the lake, attached in this process with the operator's own settings: tui/fleet.py).
        self.audit_source = "local"
        self._tabs: TabbedContent | None = None
        self._widgets: list[Widget] = []

    # -- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="approvals", id="tabs"):
            with TabPane("F1 Approvals", id="approvals"):
                yield DataTable(id="approvals-table", cursor_type="row", zebra_stripes=True)
                with VerticalScroll(id="approval-detail-box", can_focus=False):
                    yield Static(Text("No pending approvals."), id="approval-detail")
                yield Label(f"Recently decided (last {RECENT_KEEP})", id="recent-title")
                yield DataTable(id="recent-table", cursor_type="row", zebra_stripes=True)
            with TabPane("F2 Sessions", id="sessions"):
                yield Input(placeholder="/ filter: words, identity=… target=… protocol=… state=… since=15m",
                            id="sessions-filter")
                yield SessionsTable(id="sessions-table", cursor_type="row", zebra_stripes=True)
                yield Static(Text(""), id="session-detail")
                yield Static(Text("Enter on a session replays it."), id="sessions-msg", classes="msg")
            with TabPane("F3 Audit", id="audit"):
                with Horizontal(id="audit-controls"):
                    yield Input(placeholder="SELECT … FROM requests LIMIT 100   (Enter runs)", id="sql")
                    yield Select([(label, name) for name, label in REPORTS], prompt="Canned report",
                                 id="report")
                yield Static(Text("Type a read-only query, or pick a canned report (Tab or ctrl+o)."),
                             id="audit-msg", classes="msg")
                yield DataTable(id="audit-table", zebra_stripes=True)
            with TabPane("F4 Replay", id="replay"):
                yield Input(placeholder="session id   (Enter replays)", id="replay-session")
                yield Static(Text("Pick a session here or press Enter on one in Sessions."),
                             id="replay-msg", classes="msg")
                yield DataTable(id="replay-table", zebra_stripes=True)
            with TabPane("F9 Status", id="status"):
                with VerticalScroll(id="status-scroll"):
                    yield Static(Text("asking the daemon …"), id="status-view")
        with Vertical(id="status"):
            yield Static(Text(f"connecting to {self.socket_path} …"), id="status-bar")
        yield Footer(compact=True)

    @property
    def _main(self) -> Screen:
        # The console's widgets live on the first screen; App.query_one would search the
        # dialog while it is open.
        return self.screen_stack[0]

    def _ui_ready(self) -> bool:
        # Answers and stream events can still arrive while the app is shutting down.
        return bool(self._widgets) and all(w.is_attached for w in self._widgets)

    def on_mount(self) -> None:
        self.sub_title = self.socket_path
        self._tabs = self._main.query_one("#tabs", TabbedContent)
        self._widgets = [self._tabs, *self._main.query("DataTable, Input, Select, Static.msg, #status-bar, "
                                                        "#approval-detail, #recent-title, #status-view, "
                                                        "#session-detail")]
        table = self._main.query_one("#approvals-table", DataTable)
        fill_table(table, APPROVAL_COLUMNS, [])
        fill_table(self._main.query_one("#recent-table", DataTable), RECENT_COLUMNS, [])
        fill_table(self._main.query_one("#sessions-table", DataTable), SESSION_COLUMNS, [])
        self._main.set_focus(table)
        self._render_pending()
        if not self.connect:
            return
        self.refresh_status()
        self.set_interval(self.status_every_s, self.refresh_status)
        self.set_interval(1.0, self._tick)
        self.set_interval(HEALTH_EVERY_S, self._health_tick)
        self._start_watch()

    def on_unmount(self) -> None:
        self._stop_watch.set()

    # -- talking to the daemon --------------------------------------------------------------

    def _request(self, purpose: str, method: str, path: str, body: Any = None, *, context: Any = None,
                 single: bool = False) -> None:
        """Make one control API call on a worker thread; the answer comes back as :class:`Answer`.

        The socket has ``call_timeout_s`` per operation; on top of that, an answer that has not
        arrived a little after it is reported as missing by :meth:`_expire_calls` (a daemon that
        trickles bytes must not keep a view "running …" forever). ``single``: skip if a call for
        the same purpose is still out (periodic polls must not pile up behind a slow daemon).

        A plain daemon thread, not a Textual thread worker: those run in the loop's default
        executor, which is joined at exit, so a call stuck on a dead daemon would hold up
        quitting (and a signal) for its whole timeout.
        """
        if not self.connect or (single and any(c.purpose == purpose for c in self._calls.values())):
            return
        seq = self._seq[purpose] = self._seq.get(purpose, 0) + 1
        self._call_ids += 1
        call_id = self._call_ids
        self._calls[call_id] = Call(purpose, method, path, time.monotonic() + self.call_timeout_s + 2.0,
                                    context, seq)

        def work() -> None:
            try:
                answer = Answer(purpose, self.client.call(method, path, body), context=context, seq=seq)
            except DaemonNotRunning as e:
                answer = Answer(purpose, error=e.message, not_running=True, context=context, seq=seq)
            except ControlError as e:
                answer = Answer(purpose, error=e.message, context=context, seq=seq)
            except Exception as e:  # whatever breaks in a call is shown, never fatal to the console
                log.debug("control call %s %s failed", method, path, exc_info=True)
                answer = Answer(purpose, error=f"{type(e).__name__}: {e}", context=context, seq=seq)
            answer.call_id = call_id
            self._post(answer)

        threading.Thread(target=work, name=f"botwarden-call {method} {path}", daemon=True).start()

    def _expire_calls(self) -> None:
        """Calls past their deadline are answered here with an error; a late answer is dropped."""
        now = time.monotonic()
        for call_id, call in list(self._calls.items()):
            if call.deadline <= now:
                why = f"no answer from the daemon within {self.call_timeout_s:g} s ({call.method} {call.path})"
                if call.method == "in this process:":
                    why = f"no answer from the fleet lake within {FLEET_QUERY_TIMEOUT_S + 15:g} s ({call.path})"
                if call.purpose == "decision":
                    why += "; it may still have been applied: see Recently decided"
                self.on_answer(Answer(call.purpose, error=why, context=call.context, seq=call.seq,
                                      call_id=call_id))

    def _post(self, message: Message) -> None:
        try:
            self.post_message(message)
        except RuntimeError:  # the app's loop is gone: we are exiting
            pass

    def _start_watch(self) -> None:
        # A plain daemon thread, not a Textual thread worker: those run in the loop's default
        # executor, which asyncio joins at exit, and a stream read only returns at the next
        # event or keepalive (up to 15 s) — quitting would hang that long.
        self._watch_thread = threading.Thread(target=self._watch_loop, name="botwarden-watch", daemon=True)
        self._watch_thread.start()

    def _watch_loop(self) -> None:
        while not self._stop_watch.is_set():
            not_running = False
            try:
                for event in self.client.stream(WATCH_PATH, timeout=WATCH_READ_TIMEOUT_S):
                    if self._stop_watch.is_set():
                        return
                    if isinstance(event, dict):
                        self._post(WatchEvent(event))
                why = "the daemon closed the approvals stream"
            except DaemonNotRunning as e:
                why, not_running = e.message, True
            except ControlError as e:
                why = e.message
            except Exception as e:  # a broken line or socket: say so and reconnect
                why = f"approvals stream failed: {type(e).__name__}: {e}"
            if self._stop_watch.is_set():
                return
            self._post(WatchDown(why, not_running))
            self._stop_watch.wait(self.retry_s)

    def refresh_status(self) -> None:
        if not self._ui_ready():
            return
        self._request("status", "GET", "/v1/status", single=True)
        if self._active_tab() == "sessions":
            self.refresh_sessions()

    def refresh_sessions(self) -> None:
        self._request("sessions", "GET", "/v1/sessions?all=1", single=True)

    def refresh_health(self) -> None:
        self._request("health", "GET", "/v1/health", single=True)

    def _health_tick(self) -> None:
        if self._ui_ready() and self._active_tab() == "status":
            self.refresh_health()

    def end_session(self, session_id: str, reason: str) -> None:
        self._request("end_session", "POST", f"/v1/sessions/{quote(session_id, safe='')}/end",
                      {"reason": reason}, context=session_id)

    def _in_thread(self, purpose: str, what: str, work: Callable[[], Any], *, context: Any = None,
                   timeout_s: float) -> None:
        """Like :meth:`_request`, for work done in this process (fleet queries): on a daemon
        thread, its answer (or error message) posted back as :class:`Answer`."""
        if not self.connect:
            return
        seq = self._seq[purpose] = self._seq.get(purpose, 0) + 1
        self._call_ids += 1
        call_id = self._call_ids
        self._calls[call_id] = Call(purpose, "in this process:", what, time.monotonic() + timeout_s + 2.0,
                                    context, seq)

        def run() -> None:
            try:
                answer = Answer(purpose, work(), context=context, seq=seq)
            except Exception as e:  # FleetUnavailable says what is wrong; anything else is shown too
                answer = Answer(purpose, error=str(e) or type(e).__name__, context=context, seq=seq)
            answer.call_id = call_id
            self._post(answer)

        threading.Thread(target=run, name=f"botwarden-{purpose}", daemon=True).start()

    def _fleet(self, what: str, query: Callable[[OperatorLake], tuple[list[str], list[tuple]]],
               context: str) -> None:
        def work() -> dict[str, Any]:
            columns, rows = query(OperatorLake.find())  # read again each time: a fixed file needs no restart
            return {"columns": columns, "rows": [list(r) for r in rows]}

        self._in_thread("audit", what, work, context=f"fleet: {context}", timeout_s=FLEET_QUERY_TIMEOUT_S + 15)

    def run_sql(self, sql: str, params: list[Any] | None = None) -> None:
        if self.audit_source == "fleet":
            self._set_msg("#audit-msg", "running on the fleet lake …")
            self._fleet("fleet sql", lambda lake: lake.sql(sql, params), sql)
            return
        body: dict[str, Any] = {"sql": sql}
        if params:
            body["params"] = params
        self._set_msg("#audit-msg", "running …")
        self._request("audit", "POST", "/v1/audit/sql", body, context=sql)

    def run_report(self, name: str) -> None:
        if self.audit_source == "fleet":
            self._set_msg("#audit-msg", f"running report {name} on the fleet lake …")
            self._fleet(f"fleet report {name}", lambda lake: lake.report(name), f"report {name}")
            return
        self._set_msg("#audit-msg", f"running report {name} …")
        self._request("audit", "GET", f"/v1/audit/reports/{name}", context=f"report {name}")

    def replay(self, session_id: str) -> None:
        session_id = session_id.strip()
        if not session_id:
            self._set_msg("#replay-msg", "Type a session id first.", error=True)
            return
        self._set_msg("#replay-msg", f"loading session {session_id} …")
        self._request("replay", "POST", "/v1/audit/sql", {"sql": REPLAY_SQL, "params": [session_id]},
                      context=session_id)

    def send_decision(self, decision: Decision) -> None:
        self._request("decision", "POST", decision.path, decision.body, context=decision)

    # -- answers ----------------------------------------------------------------------------

    def on_answer(self, answer: Answer) -> None:
        if self._calls.pop(answer.call_id, None) is None:
            return  # already reported as unanswered
        if not self._ui_ready():
            return
        if answer.purpose != "decision" and answer.seq != self._seq.get(answer.purpose):
            return  # a newer call for the same view is out; its answer wins
        if answer.not_running:
            self._daemon_down(answer.error or "the daemon is not running")
            if answer.purpose == "status":
                return
        handler: Callable[[Answer], None] = getattr(self, f"_answer_{answer.purpose}")
        try:
            handler(answer)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            # The daemon answered something this console does not understand: say so, go on.
            log.debug("unexpected answer to %s", answer.purpose, exc_info=True)
            self.notify(f"unexpected answer from the daemon ({type(e).__name__}: {e})", title=answer.purpose,
                        severity="error", markup=False)

    def _answer_status(self, answer: Answer) -> None:
        if answer.error:
            self.daemon_error = answer.error
            self._render_status()
            return
        was_down = self.daemon_up is False
        self.daemon_up, self.daemon_status, self.daemon_error = True, answer.value, None
        if was_down:
            self.notify("botwarden daemon is back", severity="information")
        self._render_status()

    def _answer_sessions(self, answer: Answer) -> None:
        if answer.error:
            self._set_msg("#sessions-msg", answer.error, error=True)
            return
        # Live sessions first, then the ended ones, newest first in each.
        found = sorted((s for s in answer.value.get("sessions", []) if isinstance(s, dict)),
                       key=lambda s: str(s.get("started", "")), reverse=True)
        self.sessions = ([s for s in found if s.get("state") == "active"]
                         + [s for s in found if s.get("state") != "active"])
        self._render_sessions()

    def _render_sessions(self) -> None:
        table = self._main.query_one("#sessions-table", DataTable)
        keep = self._selected_key(table)
        query = self._main.query_one("#sessions-filter", Input).value
        shown = [s for s in self.sessions if session_matches(s, query, self.now())]
        rows = []
        for s in shown:
            # The id's first 12 characters tell sessions apart; the detail line has all of it.
            row = {**s, "current": current_statement(s, self.now()), "session_id": str(s.get("session_id"))[:12],
                   "protocol": protocol_short(s.get("protocol"))}
            rows.append((str(s.get("session_id")), [Text(cell(row.get(key))) for _, key in SESSION_COLUMNS]))
        fill_table(table, SESSION_COLUMNS, rows)
        self._restore_cursor(table, keep)
        live = sum(1 for s in shown if s.get("state") == "active")
        text = f"{len(shown)} session{'s' if len(shown) != 1 else ''} ({live} live)"
        if query.strip():
            text += f" of {len(self.sessions)}, filter: {query.strip()}"
        self._set_msg("#sessions-msg", text + ". Enter replays · ctrl+k ends a live session · / filters.")
        self._render_session_detail()

    def selected_session(self) -> dict[str, Any] | None:
        key = self._selected_key(self._main.query_one("#sessions-table", DataTable))
        return next((s for s in self.sessions if str(s.get("session_id")) == key), None) if key else None

    def _render_session_detail(self) -> None:
        s = self.selected_session()
        detail = self._main.query_one("#session-detail", Static)
        if s is None:
            detail.update(Text(""))
            return
        line = (f"{s.get('session_id')}  {s.get('identity')} → {s.get('target')} ({cell(s.get('protocol'))})  "
                f"{s.get('state')}  "
                f"pid {cell(s.get('pid'))} uid {cell(s.get('uid'))} {cell(s.get('exe'))}")
        current = current_statement(s, self.now())
        detail.update(Text(line + (f"\n{'now' if s.get('current_running') else 'last'}: {current}" if current
                                   else "")))

    def _answer_health(self, answer: Answer) -> None:
        if answer.error:
            self.health_error = answer.error
        else:
            self.health, self.health_error = answer.value, None
        self._render_health()

    def _render_health(self) -> None:
        view = self._main.query_one("#status-view", Static)
        text = Text()
        if self.health_error:
            text.append(f"[FAIL] the daemon did not answer: {self.health_error}\n", style="bold red")
        if self.health is None:
            view.update(text or Text("asking the daemon …"))
            return
        if self.health_error:
            text.append("What it said last:\n", style="dim")
        marks = {"ok": ("  ok", "green"), "warn": ("WARN", "yellow"), "fail": ("FAIL", "bold red")}
        for label, level, line in health_lines(self.health):
            mark, style = marks[level]
            text.append(f"[{mark}] ", style=style)
            text.append(f"{label}: ", style="bold")
            text.append(f"{line}\n")
        view.update(text)

    def _answer_end_session(self, answer: Answer) -> None:
        if answer.error:
            self.notify(answer.error, title=f"ending session {answer.context} refused", severity="error",
                        markup=False)
            return
        self.notify(f"session {answer.context}: {answer.value.get('reason', 'ended')}", title="session ended",
                    markup=False)
        self.refresh_sessions()

    def _answer_audit(self, answer: Answer) -> None:
        self._fill_result("#audit-table", "#audit-msg", answer, what=str(answer.context))

    def _answer_replay(self, answer: Answer) -> None:
        # The session's protocol, when the sessions list knows it: SQL, SSH and Kubernetes
        # requests share the table (its `kind` column: query, ssh_exec, k8s ...).
        known = next((s for s in self.sessions if str(s.get("session_id")) == answer.context), None)
        what = f"session {answer.context}"
        if known is not None and known.get("protocol"):
            what += f" ({known['protocol']}, {cell(known.get('identity'))} → {cell(known.get('target'))})"
        self._fill_result("#replay-table", "#replay-msg", answer, what=what, noun="request")

    def _answer_recent(self, answer: Answer) -> None:
        title = self._main.query_one("#recent-title", Label)
        if answer.error:
            title.update(Text(f"Recently decided (last {RECENT_KEEP}; earlier ones unavailable: {answer.error})"))
            return
        columns = [str(c) for c in answer.value.get("columns", [])]
        self.recent.add_history(dict(zip(columns, row)) for row in answer.value.get("rows", []))
        title.update(Text(f"Recently decided (last {RECENT_KEEP})"))
        self._render_recent()

    def _answer_decision(self, answer: Answer) -> None:
        decision: Decision = answer.context
        if answer.error:
            self.notify(answer.error, title=f"{decision.action} {decision.approval_id} refused",
                        severity="error", markup=False)
        else:
            result = answer.value or {}
            state = result.get("state")
            if state == "pending":
                text = (f"{decision.approval_id}: your approval is recorded "
                        f"({result.get('approvals')}/{result.get('required')}); waiting for more operators")
            elif decision.for_s:
                text = f"{decision.approval_id} approved; window of {decision.for_s // 60} min granted"
            else:
                text = f"{decision.approval_id} {state}"
            self.notify(text, title="decision", markup=False)
        # What is pending (and what was decided) comes from the approvals stream only: a list
        # fetched here could be older than the stream's events and bring a decided request back.

    def on_watch_event(self, message: WatchEvent) -> None:
        if not self._ui_ready():
            return
        event = message.event
        if event.get("event") == "requested":
            # Someone who is not looking hears it: the terminal bell, and the count in the title.
            self.bells += 1
            self.bell()
        if event.get("event") == "hello" and not self.watch_live:
            self.watch_live = True
            self._render_pending()
            # What was decided before this console (re)connected comes from the audit store.
            self._request("recent", "POST", "/v1/audit/sql",
                          {"sql": RECENT_DECISIONS_SQL, "params": [RECENT_KEEP]}, single=True)
        if self.recent.apply(event):
            self._render_recent()
        if self.book.apply(event):
            self._render_approvals()

    def on_watch_down(self, message: WatchDown) -> None:
        if not self._ui_ready():
            return
        was_live = self.watch_live
        self.watch_live = False
        if message.not_running:
            self._daemon_down(message.why)
        elif was_live:
            self.notify(f"approvals stream lost: {message.why}; reconnecting", severity="warning",
                        markup=False)
        # Held requests live in the daemon; without the stream this list would be stale.
        if len(self.book):
            self.book.replace([])
            self._render_approvals()
        self._render_pending()

    def _daemon_down(self, why: str) -> None:
        if self.daemon_up is not False:
            self.notify(why, title="daemon not running", severity="warning", markup=False)
        self.daemon_up, self.daemon_error = False, why
        self._render_status()

    # -- rendering --------------------------------------------------------------------------

    def _render_status(self) -> None:
        bar = self._main.query_one("#status-bar", Static)
        if self.daemon_up is False:
            text = f"{self.daemon_error} — retrying every {self.status_every_s:g} s"
            bar.set_class(True, "down")
        elif self.daemon_status is None:
            text = self.daemon_error or f"connecting to {self.socket_path} …"
            bar.set_class(bool(self.daemon_error), "down")
        else:
            stream = "live" if self.watch_live else "reconnecting"
            text = f"{status_line(self.daemon_status, self.pending_count)} · approvals stream {stream}"
            if self.daemon_error:
                text += f" · last error: {self.daemon_error}"
            bar.set_class(False, "down")
        bar.update(Text(text))

    def _render_approvals(self) -> None:
        table = self._main.query_one("#approvals-table", DataTable)
        keep = self._selected_key(table)
        rows = []
        for a in self.book.items():
            request = " ".join(str(a.get("request", "")).split())
            if len(request) > REQUEST_PREVIEW:
                request = request[: REQUEST_PREVIEW - 1] + "…"
            rows.append((a["approval_id"], [
                Text(a["approval_id"]), Text(cell(a.get("identity"))), Text(cell(a.get("target"))),
                Text(protocol_short(a.get("protocol"))), Text(cell(a.get("rule"))), Text(request),
                Text(time_left(a.get("expires"), self.now())),
                Text(f"{len(a.get('approvals') or [])}/{a.get('required', 1)}")]))
        # "left" counts down every second (_tick) to "expired": as wide as that from the start.
        fill_table(table, APPROVAL_COLUMNS, rows, at_least={"left": len("expired")})
        self._restore_cursor(table, keep)
        self._render_detail()
        self._render_pending()

    @property
    def pending_count(self) -> int | None:
        """The one pending count the console shows; None while the approvals stream is down."""
        return len(self.book) if self.watch_live else None

    def _render_pending(self) -> None:
        """Header, Approvals tab and status bar: the same number, updated together."""
        n = self.pending_count
        shown = "?" if n is None else str(n)
        self.title = f"botwarden · {shown} pending" if n else "botwarden"
        self.sub_title = f"{self.socket_path} · {shown} pending"
        if self._tabs is not None:
            self._tabs.get_tab("approvals").label = f"F1 Approvals ({shown})"
        self._render_status()

    def _render_recent(self) -> None:
        rows = []
        for d in self.recent.items():
            request = d.request if len(d.request) <= REQUEST_PREVIEW else d.request[: REQUEST_PREVIEW - 1] + "…"
            rows.append((d.approval_id, [Text(d.when.astimezone().strftime("%H:%M:%S")), Text(d.approval_id),
                                         Text(d.outcome), Text(d.operator or "—"), Text(window_text(d.window_s)),
                                         Text(d.identity), Text(d.target), Text(d.reason), Text(request)]))
        fill_table(self._main.query_one("#recent-table", DataTable), RECENT_COLUMNS, rows)

    def _render_detail(self) -> None:
        detail = self._main.query_one("#approval-detail", Static)
        approval = self.selected_approval()
        if approval is None:
            detail.update(Text("No pending approvals." if not len(self.book) else ""))
            return
        # A grid, so a long line wraps inside its own column at 80 columns.
        grid = RichTable.grid(padding=(0, 1))
        grid.add_column(style="bold", justify="right", no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_row("held", Text(str(approval["approval_id"])))
        for label, line in approval_detail(approval, self.now()):
            grid.add_row(label, Text(line))
        detail.update(grid)

    def now(self) -> datetime:
        """The console's clock (snapshot tests freeze it)."""
        return self._clock() if self._clock is not None else datetime.now(timezone.utc)

    def _tick(self) -> None:
        if not self._ui_ready():
            return
        self._expire_calls()
        table = self._main.query_one("#approvals-table", DataTable)
        for a in self.book.items():
            try:
                table.update_cell(a["approval_id"], "left", Text(time_left(a.get("expires"), self.now())))
            except CellDoesNotExist:  # the row went away between the book and the table: next render fixes it
                pass
        if len(self.book):
            self._render_detail()  # its waited / left times

    def _fill_result(self, table_id: str, msg_id: str, answer: Answer, *, what: str, noun: str = "row") -> None:
        if answer.error:
            self._set_msg(msg_id, f"{what}: {answer.error}", error=True)
            self.notify(answer.error, title=what, severity="error", markup=False)
            return
        columns = [str(c) for c in answer.value.get("columns", [])]
        rows = answer.value.get("rows", [])
        table = self._main.query_one(table_id, DataTable)
        fill_table(table, [(c, None) for c in columns],
                   [(None, [Text(cell(v)) for v in row]) for row in rows[:MAX_TABLE_ROWS]])
        shown = f"{len(rows)} {noun}{'s' if len(rows) != 1 else ''}"
        if len(rows) > MAX_TABLE_ROWS:
            shown += f", showing the first {MAX_TABLE_ROWS}"
        self._set_msg(msg_id, f"{what}: {shown}")

    def _set_msg(self, selector: str, text: str, *, error: bool = False) -> None:
        widget = self._main.query_one(selector, Static)
        widget.update(Text(text))
        widget.set_class(error, "error")

    @staticmethod
    def _selected_key(table: DataTable) -> str | None:
        if not table.row_count:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except CellDoesNotExist:
            return None

    @staticmethod
    def _restore_cursor(table: DataTable, key: str | None) -> None:
        if key is None:
            return
        try:
            table.move_cursor(row=table.get_row_index(key))
        except RowDoesNotExist:  # the row is gone; the cursor stays where the table put it
            pass

    def selected_approval(self) -> dict[str, Any] | None:
        key = self._selected_key(self._main.query_one("#approvals-table", DataTable))
        return self.book.get(key) if key else None

    def _active_tab(self) -> str:
        return self._tabs.active if self._tabs is not None else ""

    # -- events from widgets ----------------------------------------------------------------

    @on(DataTable.RowHighlighted, "#approvals-table")
    def _approval_highlighted(self) -> None:
        self._render_detail()

    @on(DataTable.RowHighlighted, "#sessions-table")
    def _session_highlighted(self) -> None:
        self._render_session_detail()

    @on(Input.Changed, "#sessions-filter")
    def _filter_changed(self) -> None:
        self._render_sessions()

    @on(Input.Submitted, "#sessions-filter")
    def _filter_submitted(self) -> None:
        self._main.set_focus(self._main.query_one("#sessions-table"))

    @on(DataTable.RowSelected, "#sessions-table")
    def _session_selected(self, event: DataTable.RowSelected) -> None:
        self._replay_session(str(event.row_key.value))  # a mouse click; Enter is action_enter

    def _replay_session(self, session_id: str) -> None:
        self._main.query_one("#replay-session", Input).value = session_id
        self.action_show_tab("replay")
        self.replay(session_id)

    @on(Input.Submitted, "#sql")
    def _sql_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.run_sql(event.value)

    @on(Select.Changed, "#report")
    def _report_chosen(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL:
            self.run_report(str(event.value))

    @on(Input.Submitted, "#replay-session")
    def _replay_submitted(self, event: Input.Submitted) -> None:
        self.replay(event.value)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = event.pane
        self.refresh_bindings()
        if pane.id == "sessions":
            self.refresh_sessions()
        elif pane.id == "status":
            self.refresh_health()
        # A tab chosen with the mouse leaves focus on the tab bar: move it into the pane. A key
        # (F1-F4) has already done so synchronously, and whatever was typed since must stay put.
        focused = self._main.focused
        if pane.id in TAB_FOCUS and (focused is None or pane not in focused.ancestors):
            self._main.set_focus(self._main.query_one(TAB_FOCUS[pane.id]))

    # -- actions ----------------------------------------------------------------------------

    def _global_key(self) -> None:
        """Global keys act on the console only; in a dialog (or the palette) they do nothing."""
        if self.screen is not self._main:
            raise SkipAction()

    async def action_approve(self) -> None:
        self._global_key()
        await self._decide("approve")

    async def action_approve_window(self) -> None:
        self._global_key()
        await self._decide("window")

    async def action_deny(self) -> None:
        self._global_key()
        await self._decide("deny")

    async def _decide(self, mode: Mode) -> None:
        approval = self.selected_approval()
        if approval is None:
            self.notify("No pending approval is selected.", severity="warning", markup=False)
            return
        self.action_show_tab("approvals")  # the dialog names the request; the queue is behind it

        def decided(decision: Decision | None) -> None:
            if decision is not None:
                self.send_decision(decision)

        await self._open(DecisionScreen(approval, mode), decided, "#reason")

    def action_enter(self) -> None:
        focused = self._main.focused
        if self.screen is not self._main or focused is None or focused.id != "sessions-table":
            raise SkipAction()
        table = self._main.query_one("#sessions-table", DataTable)
        session_id = self._selected_key(table)
        if session_id is not None:
            self._replay_session(str(session_id))

    def action_refresh(self) -> None:
        self._global_key()
        self.refresh_status()
        tab = self._active_tab()
        if tab == "sessions":
            self.refresh_sessions()
        elif tab == "status":
            self.refresh_health()
        elif tab == "replay":
            value = self._main.query_one("#replay-session", Input).value
            if value.strip():
                self.replay(value)

    def action_show_tab(self, tab: str) -> None:
        self._global_key()
        self._main.query_one("#tabs", TabbedContent).active = tab
        self._main.set_focus(self._main.query_one(TAB_FOCUS[tab]))
        self.refresh_bindings()  # the Audit tab's own key (ctrl+f) shows in the footer there only

    async def action_help(self) -> None:
        self._global_key()
        await self._open(HelpScreen(self._active_tab()), None, "#help-body")

    async def action_end_session(self) -> None:
        """ctrl+k on the sessions table: end the selected live session, once confirmed."""
        self._global_key()
        session = self.selected_session()
        if session is None or session.get("state") != "active":
            self.notify("Select a live session to end.", severity="warning", markup=False)
            return
        session_id = str(session["session_id"])

        def confirmed(reason: str | None) -> None:
            if reason is not None:
                self.end_session(session_id, reason)

        await self._open(EndSessionScreen(session), confirmed, "#reason")

    def action_player(self) -> None:
        """The session in the Replay tab, stepped through or played (tui/replay.py)."""
        from tui.replay import ReplayScreen

        session_id = self._main.query_one("#replay-session", Input).value.strip()
        if not session_id:
            self.action_show_tab("replay")
            self._set_msg("#replay-msg", "Type a session id first, then ctrl+r plays it.", error=True)
            return
        self.push_screen(ReplayScreen(session_id, self.client))

    def action_focus_filter(self) -> None:
        self._global_key()
        self._main.set_focus(self._main.query_one("#sessions-filter", Input))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "toggle_fleet":  # in the footer (and acting) on the Audit tab only
            return self._active_tab() == "audit"
        return True

    def action_toggle_fleet(self) -> None:
        """ctrl+f on the Audit tab: queries and reports go to the fleet lake, or back here."""
        self._global_key()
        if self._active_tab() != "audit":
            raise SkipAction()
        self.audit_source = "local" if self.audit_source == "fleet" else "fleet"
        fleet = self.audit_source == "fleet"
        self._tabs.get_tab("audit").label = "F3 Audit (fleet)" if fleet else "F3 Audit"
        self._main.query_one("#sql", Input).placeholder = (
            "SELECT bastion, … FROM requests LIMIT 100   (fleet lake; Enter runs)" if fleet
            else "SELECT … FROM requests LIMIT 100   (Enter runs)")
        self._main.query_one("#audit-table", DataTable).clear(columns=True)
        if not fleet:
            self._set_msg("#audit-msg", "This bastion's audit store. ctrl+f: the fleet lake.")
            return
        try:
            lake = OperatorLake.find()
        except FleetUnavailable as e:
            self._set_msg("#audit-msg", f"{e}  (ctrl+f: back to this bastion)", error=True)
            return
        self._set_msg("#audit-msg", f"The fleet lake, read-only, as you (settings: {lake.source}): every "
                                    "bastion's rows, with a bastion column. ctrl+f: back to this bastion.")

    def action_focus_reports(self) -> None:
        self.action_show_tab("audit")
        self._main.set_focus(self._main.query_one("#report", Select))

    async def action_quit(self) -> None:
        self._global_key()
        await self._ask_quit()

    async def _ask_quit(self) -> None:
        pending = len(self.book)
        if not pending:
            self.exit()
            return

        def answered(quit_now: bool | None) -> None:
            if quit_now:
                self.exit()

        await self._open(QuitScreen(pending), answered, "#stay")

    async def _open(self, screen: Screen[Any], callback: Callable[[Any], None] | None, focus: str) -> None:
        """Push ``screen`` and return once it is composed with ``focus`` focused.

        Called from key actions: the key gate (tui.keys) handles the next key only after this
        returns, so whatever the operator typed after the key that opened the screen lands in
        its field instead of being lost while the screen was still being built.
        """
        self.push_screen(screen, callback)
        await screen._mounted_event.wait()  # set once compose and on_mount have run
        if screen.is_current:
            screen.set_focus(screen.query_one(focus))

    async def action_command_palette(self) -> None:
        self._global_key()
        if not self.use_command_palette or CommandPalette.is_open(self):
            return
        # Like the dialogs: what is typed after ctrl+p is the search.
        await self._open(CommandPalette(id="--command-palette"), None, "CommandInput")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette offers what the keys do, plus a screenshot; nothing else (no theme
        switching or maximizing in an incident console)."""
        for tab in TABS:
            yield SystemCommand(f"{tab.title()} tab", f"Show the {tab} tab",
                                lambda tab=tab: self.action_show_tab(tab))
        yield SystemCommand("Fleet audit", "Switch the Audit tab between this bastion and the fleet lake (ctrl+f)",
                            lambda: (self.action_show_tab("audit"), self.action_toggle_fleet()))
        yield SystemCommand("Refresh", "Ask the daemon for its status again", self.action_refresh)
        yield SystemCommand("Help", "The keys of every tab", self.action_help)
        # The palette runs a command after it has closed, so the console is what gets saved.
        yield SystemCommand("Screenshot", f"Save an SVG of the console in {self.screenshot_dir}",
                            self.save_console_screenshot)
        if screen.query("HelpPanel"):
            yield SystemCommand("Keys", "Hide the keys panel", self.action_hide_help_panel)
        else:
            yield SystemCommand("Keys", "Show the keys of the focused widget", self.action_show_help_panel)
        yield SystemCommand("Quit", "Quit the console (asks first while requests are pending)",
                            self._ask_quit)

    def save_console_screenshot(self) -> Path | None:
        """Write the console as SVG into ``screenshot_dir`` and say where (or why not)."""
        stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
        path = self.screenshot_dir / f"botwarden-console-{stamp}-{os.getpid()}-{time.monotonic_ns() % 10**6}.svg"
        try:
            path.write_text(self.export_screenshot(), encoding="utf-8")
        except OSError as e:
            self.notify(f"screenshot not saved: {e}", severity="error", markup=False)
            return None
        self.notify(f"screenshot saved to {path}", markup=False)
        return path

    def notify(self, message: str, *, title: str = "", severity: Any = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        self.notices.append(f"{title}: {message}" if title else message)
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)


class SessionsTable(DataTable):
    """The sessions list; its keys show in the footer while it has the focus."""

    BINDINGS: ClassVar = [
        Binding("slash", "app.focus_filter", "Filter"),
        Binding("ctrl+k", "app.end_session", "End session"),
        Binding("enter", "app.enter", "Replay", show=True),
    ]


def run_tui(socket_path: str) -> int:
    """Entry point of ``botwarden tui``.

    SIGTERM, SIGINT and SIGHUP ask the app to exit (which restores the terminal); if its loop
    has not finished within :data:`SIGNAL_EXIT_S`, a watchdog thread restores the terminal
    itself and ends the process. Either way the exit status is 128 + the signal.
    """
    app = BotwardenApp(socket_path)
    tty = sys.__stdin__.fileno() if sys.__stdin__ is not None and sys.__stdin__.isatty() else None
    saved = _terminal_attrs(tty)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        code = 128 + signum
        threading.Thread(target=_exit_after, args=(SIGNAL_EXIT_S, code, tty, saved), daemon=True,
                         name="botwarden-signal-exit").start()
        loop = app._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(app.exit, None, code)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    app.run()
    return app.return_code or 0


def _terminal_attrs(fd: int | None) -> list[Any] | None:
    if fd is None:
        return None
    import termios

    try:
        return termios.tcgetattr(fd)
    except termios.error:
        return None


# Leave the alternate screen, show the cursor, stop mouse reporting and bracketed paste,
# pop the kitty keyboard mode: what Textual's driver undoes when it stops normally.
_TERMINAL_RESET = "\x1b[<u\x1b[?1000l\x1b[?1003l\x1b[?1015l\x1b[?1006l\x1b[?2004l\x1b[?1049l\x1b[?25h"


def _exit_after(delay_s: float, code: int, tty: int | None, saved: list[Any] | None) -> None:
    """The last resort after a signal: the app did not finish in time (its loop is stuck)."""
    time.sleep(delay_s)
    if tty is not None and saved is not None:
        import termios

        try:
            os.write(sys.__stdout__.fileno(), _TERMINAL_RESET.encode())
            termios.tcsetattr(tty, termios.TCSANOW, saved)
        except (OSError, termios.error):
            pass
    os._exit(code)
