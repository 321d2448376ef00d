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

from rich.text import Text
from textual import on
from textual.actions import SkipAction
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from tui.model import Decision, parse_window_minutes

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
        with Vertical(id="dialog", classes=self.mode):
            yield Label(f"{_TITLES[self.mode]} — {a.get('approval_id')}", id="dialog-title")
            yield Static(Text(f"identity {a.get('identity')}  target {a.get('target')}  rule {a.get('rule')}\n"
                              f"{a.get('request', '')}"), id="dialog-request")
            yield Label("Reason (required, the bot is told it)" if required else "Reason (optional)")
            yield Input(placeholder="reason", id="reason")
            if self.mode == "window":
                yield Label("Window (minutes): same identity, target and statement shape are approved")
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
        with Vertical(id="dialog", classes="quit"):
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
