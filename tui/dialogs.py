"""The approve / deny dialog: a modal screen that returns a :class:`Decision` (or None)."""

from __future__ import annotations

from typing import Any, Literal

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from tui.model import Decision, parse_window_minutes

Mode = Literal["approve", "window", "deny"]

_TITLES = {"approve": "Approve once", "window": "Approve for a window", "deny": "Deny"}


class DecisionScreen(ModalScreen[Decision | None]):
    """Ask the operator to confirm a decision on one held request.

    ``approve``: optional reason; ``window``: minutes (→ ``for_s``) and optional reason;
    ``deny``: a reason is required because the bot is told it. Escape cancels (None).
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, approval: dict[str, Any], mode: Mode, *, default_minutes: int = 15):
        super().__init__()
        self.approval = approval
        self.mode = mode
        self.default_minutes = default_minutes

    def compose(self) -> ComposeResult:
        a = self.approval
        with Vertical(id="dialog", classes=self.mode):
            yield Label(f"{_TITLES[self.mode]} — {a.get('approval_id')}", id="dialog-title")
            yield Static(Text(f"identity {a.get('identity')}  target {a.get('target')}  rule {a.get('rule')}\n"
                              f"{a.get('request', '')}"), id="dialog-request")
            if self.mode == "window":
                yield Label("Window (minutes): same identity, target and statement shape are approved")
                yield Input(str(self.default_minutes), id="minutes", type="integer")
            required = self.mode == "deny"
            yield Label("Reason (required, the bot is told it)" if required else "Reason (optional)")
            yield Input(placeholder="reason", id="reason")
            yield Static("", id="dialog-error")
            with Horizontal(id="dialog-buttons"):
                yield Button("Deny" if required else "Approve", id="confirm",
                             variant="error" if required else "success")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#minutes" if self.mode == "window" else "#reason", Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "minutes":
            self.query_one("#reason", Input).focus()
        else:
            self._confirm()

    @on(Button.Pressed, "#confirm")
    def _confirm_pressed(self) -> None:
        self._confirm()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _confirm(self) -> None:
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
            return
        self.dismiss(decision)
