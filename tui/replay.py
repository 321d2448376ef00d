"""The session player: a recorded session stepped through or played back in the console.

Opened from the Replay tab (ctrl+r on the session id there). It asks the daemon for
``GET /v1/sessions/{id}/replay`` (in a worker: the UI thread never blocks) and shows:

* a PostgreSQL session statement by statement, as psql showed it: the statement, its result
  table with the values the bot saw, errors and notices, the decision and rule, the approval;
* a session with a terminal recording (SSH) as its terminal output, played at the speed it
  happened (or faster), with pause.

Keys: →/n next, ←/p previous, Home/End first/last, space play/pause, +/- speed, Esc closes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import quote

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Static

from appliance.control import ControlClient, ControlError

SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
# The longest pause playback keeps between two moments of a session.
MAX_PAUSE_S = 2.0


def _ts(v: Any) -> datetime | None:
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v)
        except ValueError:
            return None
    return v if isinstance(v, datetime) else None


class ReplayScreen(Screen):
    """One recorded session (``doc``: the daemon's replay document, or fetched with ``client``)."""

    BINDINGS: ClassVar = [
        Binding("right,n", "step(1)", "Next"),
        Binding("left,p", "step(-1)", "Previous"),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("space", "play", "Play/pause"),
        Binding("plus,equals_sign", "speed(1)", "Faster"),
        Binding("minus", "speed(-1)", "Slower"),
        Binding("escape,q", "close", "Close"),
    ]

    index: reactive[int] = reactive(0)
    playing: reactive[bool] = reactive(False)
    speed: reactive[float] = reactive(1.0)

    def __init__(self, session_id: str, client: ControlClient | None = None, doc: dict[str, Any] | None = None):
        super().__init__()
        self.session_id = session_id
        self.client = client
        self.doc = doc
        self.error: str | None = None
        self.terminal = ""       # what the terminal shows so far (SSH)
        self._timer = None

    def compose(self) -> ComposeResult:
        yield Static(Text(f"session {self.session_id} · loading …"), id="player-title")
        with VerticalScroll(id="player-scroll"):
            yield Static(Text(""), id="player-view")
        yield Static(Text(""), id="player-status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self.doc is None:
            self.load()
        else:
            self._show_loaded()

    @work(thread=True, exclusive=True)
    def load(self) -> None:
        try:
            doc = self.client.get(f"/v1/sessions/{quote(self.session_id, safe='')}/replay")
            self.app.call_from_thread(self._loaded, doc, None)
        except ControlError as e:
            self.app.call_from_thread(self._loaded, None, str(e))

    def _loaded(self, doc: dict[str, Any] | None, error: str | None) -> None:
        self.doc, self.error = doc, error
        self._show_loaded()

    # -- what is shown ------------------------------------------------------------------------

    @property
    def is_terminal(self) -> bool:
        return bool(self.doc and self.doc.get("terminal"))

    @property
    def frames(self) -> list[dict[str, Any]]:
        """Statements (steps) or terminal chunks: what next/previous/play move through."""
        if not self.doc:
            return []
        return self.doc["terminal"] if self.is_terminal else self.doc["steps"]

    def _show_loaded(self) -> None:
        title = self.query_one("#player-title", Static)
        if self.doc is None:
            title.update(Text(f"session {self.session_id}: {self.error}", style="bold red"))
            return
        s = self.doc["session"]
        title.update(Text(f"session {self.session_id} · {s.get('identity')} → {s.get('target')} "
                          f"({self.doc['protocol']}) · {s.get('started_at')}", style="bold"))
        self.index = 0
        self._show_frame()

    def _show_frame(self) -> None:
        if not self.doc:
            return
        view = self.query_one("#player-view", Static)
        frames = self.frames
        if self.is_terminal:
            self.terminal = "".join(f["text"] for f in frames[:self.index + 1])
            view.update(Text.from_ansi(self.terminal.replace("\r\n", "\n")))
            where = f"output {self.index + 1}/{len(frames)}"
        else:
            step = frames[self.index] if frames else {"lines": [], "title": "", "decision": None}
            view.update(Text("\n".join(step["lines"])))
            what = "session" if self.index == 0 else f"statement {self.index}/{len(frames) - 1}"
            where = what + (f" · {step['decision']}" if step.get("decision") else "")
        state = "playing" if self.playing else "paused"
        self.query_one("#player-status", Static).update(
            Text(f"{where} · {state} at {self.speed:g}x · →/← step · space play/pause · +/- speed · Esc close"))

    def watch_index(self) -> None:
        self._show_frame()

    def watch_playing(self) -> None:
        self._show_frame()

    def watch_speed(self) -> None:
        self._show_frame()

    # -- keys -----------------------------------------------------------------------------------

    def action_step(self, delta: int) -> None:
        self.index = max(0, min(len(self.frames) - 1, self.index + delta))

    def action_jump(self, where: int) -> None:
        self.index = max(0, len(self.frames) - 1) if where < 0 else 0

    def action_speed(self, delta: int) -> None:
        i = min(range(len(SPEEDS)), key=lambda k: abs(SPEEDS[k] - self.speed))
        self.speed = SPEEDS[max(0, min(len(SPEEDS) - 1, i + delta))]

    def action_play(self) -> None:
        self.playing = not self.playing
        if self.playing:
            if self.index >= len(self.frames) - 1:
                self.index = 0
            self._schedule()
        elif self._timer is not None:
            self._timer.stop()
            self._timer = None

    def action_close(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.app.pop_screen()

    # -- playback -------------------------------------------------------------------------------

    def _gap(self) -> float:
        """Seconds until the next frame, at the current speed, as the session's clock says."""
        frames = self.frames
        a, b = _ts(frames[self.index].get("ts")), _ts(frames[self.index + 1].get("ts"))
        if a is None or b is None:
            return 0.3 / self.speed
        return max(0.0, min((b - a).total_seconds() / self.speed, MAX_PAUSE_S))

    def _schedule(self) -> None:
        if not self.playing or self.index >= len(self.frames) - 1:
            self.playing = False
            return
        self._timer = self.set_timer(self._gap(), self._advance)

    def _advance(self) -> None:
        self._timer = None
        if not self.playing:
            return
        self.index += 1
        self._schedule()
