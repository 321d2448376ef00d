"""The session's recording: what the bot sent and what it received, in whole chunks.

Two buffers beside the relay, filled with the very bytes it reads from the bot and writes to the
bot (after masking, with botwarden's own notices and errors); no message is decoded here. The
buffers go to ``SessionCore.record`` (one "in" and one "out" row) FLUSH_INTERVAL after their first
byte, at CHUNK_BYTES, and when the session ends: a busy session makes a few rows a second, not
one per statement (each row costs the audit process a hash and a write), and a daemon killed
loses at most the last interval. "in" chunks end on a message boundary (the audit process redacts
each message of them: appliance/recordings/pgstream.py); "out" chunks too (a message streamed in
pieces is flushed once complete). Replay pairs the statements of one with the answers of the
other by protocol order, and times them with the requests rows.

The startup, with the bot's password/token, is never recorded: the session's ``pg_startup``
event says who connected and with which parameters.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from appliance.recordings.pgstream import complete_prefix

from ..session import now

if TYPE_CHECKING:
    from ..session import SessionCore
    from .session import Session

# A chunk is written at the latest at this size, or this long after its first byte.
CHUNK_BYTES = 64 * 1024
FLUSH_INTERVAL = 0.2


class PgRecorder:
    """One session's recording buffers (only when the target records its sessions' bytes)."""

    __slots__ = ("core", "session", "_in", "_in_ts", "_out", "_out_ts", "_timer", "_loop")

    def __init__(self, core: SessionCore, session: Session):
        self.core = core
        self.session = session
        self._in = bytearray()
        self._out = bytearray()
        self._in_ts = self._out_ts = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def sent(self, data: bytes) -> None:
        """Bytes the bot sent (relay phase)."""
        buf = self._in
        if not buf:
            self._in_ts = now()
            if self._timer is None:
                self._timer = self._loop.call_later(FLUSH_INTERVAL, self._due)
        buf += data
        if len(buf) >= CHUNK_BYTES:
            self._flush_in()

    def received(self, data: bytes) -> None:
        """Bytes written to the bot."""
        buf = self._out
        if not buf:
            self._out_ts = now()
            if self._timer is None:
                self._timer = self._loop.call_later(FLUSH_INTERVAL, self._due)
        buf += data
        if len(buf) >= CHUNK_BYTES and not self.session._stream_left:
            self.flush()

    def writer(self, write: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """``write`` (the bot transport's) that also records what it wrote."""
        received = self.received

        def write_and_record(data: bytes) -> None:
            write(data)
            received(data)
        return write_and_record

    def _due(self) -> None:
        self._timer = None
        if self.session._stream_left:   # inside a streamed message: once it is complete
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self._due)
            return
        self.flush()
        if self._in:   # a message the bot has not finished sending
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self._due)

    def flush(self, final: bool = False) -> None:
        """Both buffers to the recording: what the bot sent first (it was sent first)."""
        if final and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush_in(final)
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            self.core.record("out", data, self._out_ts)

    def _flush_in(self, final: bool = False) -> None:
        buf = self._in
        if not buf:
            return
        end = len(buf) if final else complete_prefix(buf)
        if not end:
            return
        data = bytes(buf[:end])
        del buf[:end]
        ts, self._in_ts = self._in_ts, (now() if buf else None)
        self.core.record("in", data, ts)
