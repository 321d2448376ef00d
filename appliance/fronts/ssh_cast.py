"""Interactive SSH shells as recordings: what the SSH front records, and the asciicast v2 reading of it.

The front records a shell through ``SessionCore.record``: first an ``event`` row (the pty: width,
height, term, timestamp: the asciicast header's facts), then ``out`` rows (terminal bytes to the
bot, after masking), ``in`` rows (the bot's keystrokes) and ``event`` rows for resizes.
:func:`asciicast` turns those rows back into an asciicast v2 document that ``asciinema play``
replays.

:class:`TypedLines` reads the keystrokes into the command lines a person typed, best-effort: it
applies backspace, Ctrl-U and Ctrl-C, drops escape sequences (arrow keys, history, completion
are the shell's and invisible here) and skips what is typed after a password prompt (the
recording keeps that answer as ``*``s). It is an
audit aid, not a security boundary: the shell decides what runs, and anything it expands, any
alias, history recall or pasted script is seen only as the keys that produced it.
"""

from __future__ import annotations

import codecs
import json
from datetime import datetime
from typing import Any, Iterable, Mapping

MAX_TYPED_LINE = 4096  # longer lines are cut: the recording keeps every byte anyway
_PASSWORD_PROMPTS = ("password", "passphrase", "passcode", "pin:")


def pty_event(width: int, height: int, term: str, timestamp: float) -> bytes:
    """The recording's first event: the asciicast header's facts."""
    return json.dumps({"event": "pty", "width": width, "height": height, "term": term,
                       "timestamp": int(timestamp)}).encode()


def resize_event(width: int, height: int) -> bytes:
    return json.dumps({"event": "resize", "width": width, "height": height}).encode()


class TypedLines:
    """Keystrokes in, typed command lines out (sans-IO, bounded)."""

    def __init__(self) -> None:
        self._line: list[str] = []
        self._escape = ""          # inside an escape sequence (ESC [ ... final byte)
        self._secret = False       # the current line answers a password prompt
        self._last_output = ""     # the tail of the terminal's output (for password prompts)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def output(self, data: bytes) -> None:
        """What the terminal showed: a password prompt at its end makes the next line a secret."""
        text = (self._last_output + data.decode("utf-8", "replace"))[-200:]
        self._last_output = text
        if not self._line:
            tail = text.rsplit("\n", 1)[-1].strip().lower()
            self._secret = tail.endswith(":") and any(p in tail for p in _PASSWORD_PROMPTS)

    def redact(self, data: bytes) -> bytes:
        """The keystrokes as the recording keeps them: an answer to a password prompt as ``*``s
        (call before :meth:`feed`, which ends the answer at Enter)."""
        if not self._secret:
            return data
        out = bytearray()
        for b in data:
            out.append(b if b in (0x0D, 0x0A) else 0x2A)
            if b in (0x0D, 0x0A):  # the rest is typed after the answer
                return bytes(out) + data[len(out):]
        return bytes(out)

    def feed(self, data: bytes) -> list[str]:
        """Keystrokes; returns the lines completed by them (Enter), secrets left out."""
        done: list[str] = []
        for ch in self._decoder.decode(data):
            if self._escape:
                self._escape += ch
                # CSI: ESC [ params final(0x40-0x7e); SS3: ESC O x; other: ESC x.
                if (len(self._escape) == 2 and ch not in "[O") or (len(self._escape) > 2 and "@" <= ch <= "~"):
                    self._escape = ""
                elif len(self._escape) > 32:
                    self._escape = ""
                continue
            if ch == "\x1b":
                self._escape = ch
            elif ch in "\r\n":
                line = "".join(self._line).strip()
                if line and not self._secret:
                    done.append(line)
                self._line.clear()
                self._secret = False
            elif ch in "\x7f\b":
                if self._line:
                    self._line.pop()
            elif ch in "\x15\x03":  # Ctrl-U, Ctrl-C: the line is gone
                self._line.clear()
            elif ch >= " " and len(self._line) < MAX_TYPED_LINE:
                self._line.append(ch)
        return done


def asciicast(rows: Iterable[Mapping[str, Any]]) -> str:
    """An asciicast v2 document (header line + one JSON event per line) from a session's
    ``recordings`` rows (``ts``, ``direction``, ``data``), in ``seq`` order. Rows before the
    pty event (there are none for a shell) are skipped; a session of commands without a
    terminal starts at its first ``exec`` event, at 80x24."""
    lines: list[str] = []
    start: datetime | None = None
    decoders = {"in": codecs.getincrementaldecoder("utf-8")("replace"),
                "out": codecs.getincrementaldecoder("utf-8")("replace")}
    for row in rows:
        direction, data, ts = row["direction"], bytes(row["data"] or b""), row["ts"]
        if direction == "event":
            event = json.loads(data)
            if event.get("event") == "pty" and start is None:
                start = ts
                lines.append(json.dumps({"version": 2, "width": event["width"], "height": event["height"],
                                         "timestamp": event["timestamp"], "env": {"TERM": event["term"]}}))
            elif event.get("event") == "exec" and start is None:
                # A command without a terminal: its output as a cast of the default size.
                start = ts
                lines.append(json.dumps({"version": 2, "width": 80, "height": 24,
                                         "timestamp": int(ts.timestamp()), "env": {"TERM": "dumb"}}))
            elif event.get("event") == "resize" and start is not None:
                lines.append(json.dumps([_offset(ts, start), "r", f"{event['width']}x{event['height']}"]))
            continue
        if start is None or direction not in decoders:
            continue
        text = decoders[direction].decode(data)
        if text:
            lines.append(json.dumps([_offset(ts, start), "o" if direction == "out" else "i", text]))
    if start is None:
        raise ValueError("no pty or exec event in these recording rows: not a terminal session")
    return "\n".join(lines) + "\n"


def _offset(ts: datetime, start: datetime) -> float:
    return round(max(0.0, (ts - start).total_seconds()), 6)
