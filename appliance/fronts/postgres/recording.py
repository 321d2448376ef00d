"""The session's recording: what the bot sent and what it received, in whole chunks.

Two buffers beside the relay, filled with the very bytes it reads from the bot and writes to the
bot (after masking, with botwarden's own notices and errors); no message is decoded here. The
buffers go to ``SessionCore.record`` (one "in" and one "out" row) FLUSH_INTERVAL after their first
byte, at CHUNK_BYTES, and when the session ends: a busy session makes a few rows a second, not
one per statement (each row costs the audit process a hash and a write), and a daemon killed
loses at most the last interval. Chunks end on message boundaries (found when a chunk is taken,
not per write; when the timer fires between two reads the relay's own state says so without a
walk; the audit process redacts each message: appliance/recordings/pgstream.py): a message still
arriving waits for its end, up to what the session's cap still takes. Replay pairs the statements of one with the answers of the
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
# Each row costs the audit process a redaction, a hash and a share of a DuckDB commit: at 0.2 s
# recording cost pgbench 9 % of its throughput, at 1 s it is within the noise (README).
FLUSH_INTERVAL = 1.0


class PgRecorder:
    """One session's recording buffers (only when the target records its sessions' bytes)."""

    __slots__ = ("core", "session", "_in", "_in_ts", "_out", "_out_ts", "_timer", "_loop", "_write", "_wrapped")

    def __init__(self, core: SessionCore, session: Session):
        self.core = core
        self.session = session
        self._in = bytearray()
        self._out = bytearray()
        self._in_ts = self._out_ts = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._write: Callable[[bytes], None] | None = None     # the bot transport's write, unwrapped
        self._wrapped: Callable[[bytes], None] | None = None

    def sent(self, data: bytes) -> None:
        """Bytes the bot sent (relay phase)."""
        buf = self._in
        if not buf:
            self._in_ts = now()
            if self._timer is None:
                self._timer = self._loop.call_later(FLUSH_INTERVAL, self._due)
        buf += data
        if len(buf) >= CHUNK_BYTES:
            self.flush()

    def received(self, data: bytes) -> None:
        """Bytes written to the bot."""
        buf = self._out
        if not buf:
            self._out_ts = now()
            if self._timer is None:
                self._timer = self._loop.call_later(FLUSH_INTERVAL, self._due)
        buf += data
        if len(buf) >= CHUNK_BYTES:
            self.flush()

    def writer(self, write: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """``write`` (the bot transport's) that also records what it wrote."""
        received = self.received

        def write_and_record(data: bytes) -> None:
            write(data)
            received(data)
        self._write, self._wrapped = write, write_and_record
        return write_and_record

    def _due(self) -> None:
        self._timer = None
        self.flush(at_rest=True)
        if self._in or self._out:   # a message not complete yet (the bot's, or one streamed to it)
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self._due)

    def flush(self, final: bool = False, at_rest: bool = False) -> None:
        """The complete messages of both buffers to the recording, what the bot sent first (it was
        sent first); ``final`` (the session ended) everything. A message still arriving stays, unless
        it is already more than the cap takes (it is cut there). ``at_rest``: called between two
        reads (the timer), when the relay says whether it is inside a message — then the buffers
        need no walk over their messages to find where the last one ends."""
        s = self.session
        left = self.core.recording_left
        whole = at_rest and not s._cbuf and not s._held   # the relay consumed all the bot sent
        data = self._take(self._in, final or whole or len(self._in) > left)
        if data:
            ts, self._in_ts = self._in_ts, (now() if self._in else None)
            self.core.record("in", data, ts)
        # Every write to the bot is whole messages but a streamed one, which the relay tracks.
        whole = at_rest and not s._stream_left
        data = self._take(self._out, final or whole or len(self._out) > self.core.recording_left)
        if data:
            ts, self._out_ts = self._out_ts, (now() if self._out else None)
            self.core.record("out", data, ts)
        if final or self.core.recording_left <= 0:
            self._stop()

    @staticmethod
    def _take(buf: bytearray, everything: bool) -> bytes:
        """What is flushed of ``buf`` (its complete messages, or all of it), removed from it."""
        if not buf:
            return b""
        end = len(buf) if everything else complete_prefix(buf)
        data = bytes(buf[:end])
        del buf[:end]
        return data

    def _stop(self) -> None:
        """Nothing more is recorded (the session ended, or its recording reached the cap): the
        relay writes to the bot directly again and the bot's bytes are no longer copied."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        s = self.session
        if s.recorder is self:
            s.recorder = None
        if self._wrapped is not None and s._to_bot is self._wrapped:
            s._to_bot = self._write
        self._in.clear()
        self._out.clear()
