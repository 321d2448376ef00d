"""The console's two modal dialogs: decide one held request, and confirm quitting.

Both follow the same key rules (README, "The operator console"): the dialog owns the
keyboard while it is open (the app's global keys are skipped), typed characters only ever
land in a text field, and the only keys that act are Escape (cancel) and Enter — which in a
text field moves on to the next field or the button and never decides. Deciding takes Enter
on the confirm button. Enter and Escape are priority bindings of the screen, so they act in
the order they were typed even when keys arrive in one burst (see :mod:`tui.keys`).
"""

from __future__ import annotations

from typing import Any, Literal

from rich.table import Table as RichTable
from rich.text import Text
from textual import on
from textual.actions import SkipAction
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from tui.model import Decision, parse_window_minutes, request_noun

Mode = Literal["approve", "window", "deny"]

_TITLES = {"approve": "Approve once", "window": "Approve for a window", "deny": "Deny"}
_CONFIRM = {"approve": "Approve", "window": "Approve for window", "deny": "Deny"}


class DecisionScreen(ModalScreen[Decision | None]):
    """Ask the operator to confirm a decision on one held request.

    Opens with the reason field focused. ``approve``: optional reason; ``window``: optional
    reason and minutes (→ ``for_s``); ``deny``: a reason is required because the bot is told
    it. Enter walks reason → (minutes →) the confirm button; Enter there decides. Escape, or
    Enter on Cancel, returns None.
    """

    AUTO_FOCUS = "#reason"
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", priority=True),
        Binding("enter", "enter", "Next / confirm", priority=True, show=False),
    ]

    def __init__(self, approval: dict[str, Any], mode: Mode, *, default_minutes: int = 15):
        super().__init__()
        self.approval = approval
        self.mode = mode
        self.default_minutes = default_minutes

    def compose(self) -> ComposeResult:
        a = self.approval
        required = self.mode == "deny"
        with VerticalScroll(id="dialog", classes=self.mode):
            yield Label(f"{_TITLES[self.mode]} — {a.get('approval_id')}", id="dialog-title")
            yield Static(Text(f"identity {a.get('identity')}  target {a.get('target')}  rule {a.get('rule')}\n"
                              f"{a.get('request', '')}"), id="dialog-request")
            yield Static(Text(what_is_decided(a, self.mode)), id="dialog-what")
            yield Label("Reason (required, the bot is told it)" if required else "Reason (optional)")
            yield Input(placeholder="reason", id="reason")
            if self.mode == "window":
                yield Label(f"Window (minutes): same identity, target and {request_noun(a)} shape are approved")
                yield Input(str(self.default_minutes), id="minutes", type="integer")
            yield Static("", id="dialog-error")
            yield Static(Text("Enter: next field, then Enter on the button decides · Tab: move · Esc: cancel"),
                         id="dialog-help")
            with Horizontal(id="dialog-buttons"):
                yield Button(_CONFIRM[self.mode], id="confirm", variant="error" if required else "success")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.set_focus(self.query_one("#reason", Input))

    def action_enter(self) -> None:
        focused = self.focused.id if self.focused is not None else None
        if focused == "reason":
            self.set_focus(self.query_one("#minutes" if self.mode == "window" else "#confirm"))
        elif focused == "minutes":
            self.set_focus(self.query_one("#confirm"))
        elif focused == "confirm":
            self._confirm()
        elif focused == "cancel":
            self.dismiss(None)
        else:
            raise SkipAction()

    # A mouse click on a button; keys never get here (Enter is the screen's priority binding).
    @on(Button.Pressed, "#confirm")
    def _confirm_pressed(self) -> None:
        self._confirm()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _confirm(self) -> None:
        if not self.is_current:
            return  # already dismissed (a click and a key in the same instant)
        reason = self.query_one("#reason", Input).value.strip()
        try:
            if self.mode == "deny":
                if not reason:
                    raise ValueError("a denial needs a reason (the bot is told it)")
                decision = Decision(str(self.approval["approval_id"]), "deny", reason)
            elif self.mode == "window":
                for_s = parse_window_minutes(self.query_one("#minutes", Input).value)
                decision = Decision(str(self.approval["approval_id"]), "approve", reason, for_s)
            else:
                decision = Decision(str(self.approval["approval_id"]), "approve", reason)
        except ValueError as e:
            self.query_one("#dialog-error", Static).update(Text(str(e)))
            # Back to the field at fault, so what is typed next fixes it.
            self.set_focus(self.query_one("#minutes" if "window" in str(e) else "#reason"))
            return
        self.dismiss(decision)


def what_is_decided(a: dict[str, Any], mode: Mode) -> str:
    """The dialog's sentence that names exactly what confirming does."""
    who = f"identity {a.get('identity')} on target {a.get('target')}"
    so_far = a.get("approvals") or []
    required = int(a.get("required") or 1)
    noun = request_noun(a)  # statement, command (SSH) or request (Kubernetes)
    if a.get("login"):
        who += f" (as {a['login']})"
    if mode == "deny":
        return f"The {noun} above does not run; {who} gets your reason as its error."
    if mode == "window":
        what = (f"Runs the {noun} above now, and for the window below every {noun} of the same shape "
                f"from {who} runs without asking.")
    else:
        what = f"Runs the {noun} above once, for {who}; the next one like it is held again."
    if required > 1:
        after = len(so_far) + 1
        what += (f" Approval {after} of {required}" + (f" (so far: {', '.join(so_far)})" if so_far else "")
                 + (": it runs now." if after >= required else ": it keeps waiting for more operators."))
    return what


class EndSessionScreen(ModalScreen[str | None]):
    """Confirm ending one live session: the bot's connection is closed with the reason, and the
    audit row names the operator. Same keys as the decision dialog: Enter walks reason → the
    button, Enter on the button ends it, Escape cancels. Returns the reason, or None."""

    AUTO_FOCUS = "#reason"
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", priority=True),
        Binding("enter", "enter", "Next / confirm", priority=True, show=False),
    ]

    def __init__(self, session: dict[str, Any]):
        super().__init__()
        self.session = session

    def compose(self) -> ComposeResult:
        s = self.session
        with VerticalScroll(id="dialog", classes="deny"):
            yield Label(f"End session {s.get('session_id')}", id="dialog-title")
            yield Static(Text(f"identity {s.get('identity')}  target {s.get('target')}  pid {s.get('pid')}  "
                              f"exe {s.get('exe')}\n{s.get('current') or ''}"), id="dialog-request")
            yield Static(Text("The bot's connection is closed now (PostgreSQL error 57P01 with your reason); a "
                              "statement in flight is cancelled. The audit row names you."), id="dialog-what")
            yield Label("Reason (optional, the bot is told it)")
            yield Input(placeholder="reason", id="reason")
            yield Static(Text("Enter: to the button, then Enter on it ends the session · Esc: cancel"),
                         id="dialog-help")
            with Horizontal(id="dialog-buttons"):
                yield Button("End session", id="confirm", variant="error")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.set_focus(self.query_one("#reason", Input))

    def action_enter(self) -> None:
        focused = self.focused.id if self.focused is not None else None
        if focused == "reason":
            self.set_focus(self.query_one("#confirm"))
        elif focused == "confirm":
            self._confirm()
        elif focused == "cancel":
            self.dismiss(None)
        else:
            raise SkipAction()

    @on(Button.Pressed, "#confirm")
    def _confirm_pressed(self) -> None:
        self._confirm()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _confirm(self) -> None:
        if self.is_current:
            self.dismiss(self.query_one("#reason", Input).value.strip())


# What each tab's keys do, for the help screen (the footer shows the focused widget's).
HELP: dict[str, tuple[tuple[str, str], ...]] = {
    "everywhere": (
        ("F1 F2 F3 F4 F9", "Approvals, Sessions, Audit, Replay, Status tab"),
        ("F5", "refresh what the tab shows"),
        ("F6 / F7 / F8", "approve once / approve for a window / deny the selected held request"),
        ("F10, ctrl+q", "quit (asks first while requests are held)"),
        ("ctrl+p", "command palette (tabs, refresh, help, screenshot, quit)"),
        ("ctrl+r", "play the session whose id is in the Replay tab (asks for one there if empty)"),
        ("?", "this help (outside text fields)"),
        ("Tab, shift+Tab", "move between fields"),
    ),
    "approvals": (
        ("↑ ↓", "pick a held request; its details show below the queue"),
    ),
    "sessions": (
        ("/", "filter: words, identity=… target=… protocol=sql|ssh|k8s state=active|ended|… since=15m"),
        ("Enter (filter)", "back to the list"),
        ("ctrl+k", "end the selected live session (asks first)"),
        ("Enter", "replay the selected session"),
    ),
    "audit": (
        ("Enter", "run the read-only SQL"),
        ("ctrl+o", "pick a canned report"),
        ("ctrl+f", "switch between this bastion's audit and the fleet lake (read as you: docs/fleet.md)"),
    ),
    "replay": (
        ("Enter", "replay the session id typed"),
        ("ctrl+r", "open the player on it: → ← or n p step, Home End, space play/pause, + - speed, Esc q close"),
    ),
    "status": (
        ("↑ ↓ PgUp PgDn", "scroll; F5 asks the daemon again (also every 15 s here)"),
    ),
    "dialogs": (
        ("Enter", "next field, then Enter on the button decides"),
        ("Esc", "cancel: nothing is decided"),
    ),
}


class HelpScreen(ModalScreen[None]):
    """The keys of every tab, the current one first; arrows scroll it. Escape, Enter or ? closes it."""

    BINDINGS = [
        Binding("escape", "close", "Close", priority=True),
        Binding("enter", "close", "Close", priority=True, show=False),
        Binding("question_mark", "close", "Close", priority=True, show=False),
    ]

    def __init__(self, tab: str):
        super().__init__()
        self.tab = tab

    def compose(self) -> ComposeResult:
        order = ["everywhere", self.tab, *(t for t in HELP if t not in ("everywhere", self.tab))]
        # A grid, so a long description wraps in its own column at 80 columns.
        text = RichTable.grid(padding=(0, 2))
        text.add_column(style="bold", no_wrap=True)
        text.add_column(overflow="fold")
        for section in order:
            if section not in HELP:
                continue
            text.add_row(Text(f"{section}{' (this tab)' if section == self.tab else ''}", style="bold underline"),
                         "")
            for keys, what in HELP[section]:
                text.add_row(f"  {keys}", what)
        with VerticalScroll(id="dialog", classes="help"):
            yield Label("Keys", id="dialog-title")
            with VerticalScroll(id="help-body"):
                yield Static(text, id="help-text")
            with Horizontal(id="dialog-buttons"):
                yield Button("Close", id="help-close", variant="primary")

    def action_close(self) -> None:
        if self.is_current:
            self.dismiss(None)

    @on(Button.Pressed, "#help-close")
    def _close_pressed(self) -> None:
        self.action_close()


class QuitScreen(ModalScreen[bool]):
    """Asked before quitting while requests are held: they stay held, but nobody here sees them."""

    AUTO_FOCUS = "#stay"
    BINDINGS = [
        Binding("escape", "stay", "Stay", priority=True),
        Binding("enter", "enter", "Choose", priority=True, show=False),
    ]

    def __init__(self, pending: int):
        super().__init__()
        self.pending = pending

    def compose(self) -> ComposeResult:
        n = self.pending
        with VerticalScroll(id="dialog", classes="quit"):
            yield Label("Quit the console?", id="dialog-title")
            yield Static(Text(f"{n} request{'s are' if n != 1 else ' is'} waiting for a decision. "
                              "They stay held in the daemon (and are denied when they expire), "
                              "but this console will no longer show them."), id="dialog-request")
            with Horizontal(id="dialog-buttons"):
                yield Button("Stay", id="stay", variant="primary")
                yield Button("Quit", id="quit", variant="error")

    def on_mount(self) -> None:
        self.set_focus(self.query_one("#stay", Button))

    def action_enter(self) -> None:
        focused = self.focused.id if self.focused is not None else None
        if focused in ("stay", "quit"):
            self.dismiss(focused == "quit")
        else:
            raise SkipAction()

    def action_stay(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if self.is_current:
            self.dismiss(event.button.id == "quit")
