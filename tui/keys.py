"""Keys act in the order they were typed, however fast they arrive.

Textual hands a key to the focused widget's queue and checks the widget's and screen's
own bindings (Tab, Enter on a button, Backspace in an input) only when the key has bubbled
back up to the App. A terminal read that holds several keys (a paste without bracketed
paste, tmux ``send-keys``, an operator typing fast on a loaded machine) puts them all in the
App's queue first, so a printable key behind a Tab could land in the field the Tab was
about to leave. :class:`OrderedKeys` sends the next key on only when the previous one has
been handled all the way up: it posts a :class:`KeyDone` marker behind each forwarded key,
to the same widget, which bubbles the same way and so reaches the App after the key did.

That covers what the key itself does. Anything a key starts through a message (a focus
change by ``widget.focus()``, a button's ``Pressed``) would still race the next key, so the
console changes focus and screens synchronously inside its key actions.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from textual import events
from textual.app import App
from textual.message import Message
from textual.timer import Timer


class KeyDone(Message, bubble=True):
    """Posted behind a forwarded key; reaching the App means that key has been handled."""

    def __init__(self, seq: int) -> None:
        super().__init__()
        self.seq = seq


class OrderedKeys(App[Any]):
    """An App whose keyboard input is handled one event at a time, in arrival order."""

    # A marker lost with a widget removed meanwhile must not stall the keyboard for long.
    KEY_SETTLE_S = 1.0

    def __init__(self) -> None:
        super().__init__()
        self._held_input: deque[events.Event] = deque()
        self._input_busy = False
        self._input_seq = 0
        self._settle: Timer | None = None

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, (events.Key, events.Paste)) and not event.is_forwarded:
            if self._input_busy:
                self._held_input.append(event)
                return
            await self._dispatch_input(event)
            return
        await super().on_event(event)

    async def _dispatch_input(self, event: events.Event) -> None:
        self._input_busy = True
        self._input_seq += 1
        await super().on_event(event)
        if event.is_forwarded:
            # It went to a widget (or the screen): wait until it has been handled up the DOM.
            target = self.focused or self.screen
            target.post_message(KeyDone(self._input_seq))
            self._settle = self.set_timer(self.KEY_SETTLE_S, self._release_input)
        else:
            self._release_input()  # a priority binding handled it, synchronously

    def _on_key_done(self, message: KeyDone) -> None:
        message.stop()
        if message.seq == self._input_seq and self._input_busy:  # not a marker the settle timer outran
            self._release_input()

    def _release_input(self) -> None:
        if self._settle is not None:
            self._settle.stop()
            self._settle = None
        if self._held_input:
            self.call_next(self._dispatch_input, self._held_input.popleft())
        else:
            self._input_busy = False
