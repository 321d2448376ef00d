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

A result's rows (DataRow, and a COPY TO STDOUT's CopyData) are recorded up to
``[audit] recording_result_bytes``; the rows past it are
counted, not copied, and a ``rows_not_recorded`` event stands where they were (before the message
that ended them: CommandComplete, an error...). Every other message is kept. A write that fits in
what the result still takes is kept whole without a look at its messages (the budget then counts
all its bytes, and starts again after a write that ends with ReadyForQuery); only a write that
would pass it is walked, its runs of rows stepped over in compiled code (appliance/hotpath). So a
bulk read costs the recording its first rows, not the whole session's cap, and later statements
of the session are still recorded.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Callable

from appliance.hotpath import skip_rows
from appliance.protocols.postgres.framing import unpack_len as _unpack_len
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

_READY_HEAD = b"Z\x00\x00\x00\x05"   # a ReadyForQuery message before its status byte


class PgRecorder:
    """One session's recording buffers (only when the target records its sessions' bytes)."""

    __slots__ = ("core", "session", "_in", "_in_ts", "_out", "_out_ts", "_timer", "_loop", "_write", "_wrapped",
                 "_rows_cap", "_rows_left", "_cont", "_cont_kept", "_skipped_rows", "_skipped_bytes")

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
        # The result's row budget: bytes it still takes, and the rows counted past it so far.
        self._rows_cap = self._rows_left = core.recording_result_cap
        self._skipped_rows = self._skipped_bytes = 0
        # Bytes of a message that began in an earlier write (a streamed one) still to come, and
        # whether it is kept.
        self._cont = 0
        self._cont_kept = True

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
        if self._rows_cap:
            # What the write charges the budget: its bytes after the end of a message an earlier
            # write began (charged then), and the rest of a message it begins and does not end.
            n, cont, streamed = len(data), self._cont, self.session._stream_left
            charge = n - cont + streamed if cont < n else 0
            if charge <= self._rows_left and self._cont_kept and not self._skipped_rows:
                self._rows_left -= charge
                if not streamed and data[-6:-1] == _READY_HEAD:
                    self._rows_left = self._rows_cap
                self._cont = streamed
            else:
                data = self._within_budget(data)
                if not data or self.session.recorder is not self:
                    return
        self._append_out(data)

    def _append_out(self, data: bytes) -> None:
        buf = self._out
        if not buf:
            self._out_ts = now()
            if self._timer is None:
                self._timer = self._loop.call_later(FLUSH_INTERVAL, self._due)
        buf += data
        if len(buf) >= CHUNK_BYTES:
            self.flush()

    def _within_budget(self, data: bytes) -> bytes:
        """``data`` without the rows past their result's budget (counted instead); a run of rows
        skipped ends with a ``rows_not_recorded`` event where the next message starts."""
        keep: list[bytes] = []
        n = len(data)
        pos = 0
        cont = self._cont
        if cont:
            pos = cont if cont < n else n
            if self._cont_kept:
                keep.append(data[:pos])
            else:
                self._skipped_bytes += pos
            self._cont = cont - pos
        left = self._rows_left
        while n - pos >= 5:
            t = data[pos]
            row = t == 0x44 or t == 0x64   # DataRow, or a COPY's CopyData row
            if row:  # a run of them in one compiled call, kept while the budget lasts
                if left > 0:
                    e, _ = skip_rows(data, pos, left, t)
                    if e > pos:
                        keep.append(data[pos:e])
                        left -= e - pos
                        pos = e
                        continue
                e, rows = skip_rows(data, pos, -1, t)
                left = 0   # the result's rows after the first one not kept are not kept either
                if e > pos:
                    self._skipped_rows += rows
                    self._skipped_bytes += e - pos
                    pos = e
                    continue
            (length,) = _unpack_len(data, pos + 1)
            if length < 4:   # the relay refuses such a message before it writes it
                break
            e = pos + 1 + length
            if row:   # a row that continues in the next writes (streamed)
                kept = length + 1 <= left
                if kept:
                    left -= length + 1
                else:
                    left = 0
                    self._skipped_rows += 1
            else:           # any other message ends the run of rows
                kept = True
                if self._skipped_rows:
                    self._append_out(b"".join(keep))
                    keep = []
                    self._mark_skipped()
                    if self.session.recorder is not self:   # the recording reached its cap
                        return b""
                left = self._rows_cap
            end = e if e <= n else n
            if kept:
                keep.append(data[pos:end])
            else:
                self._skipped_bytes += end - pos
            if e > n:
                self._cont, self._cont_kept = e - n, kept
            pos = end
        if pos < n:
            keep.append(data[pos:])
        self._rows_left = left
        if not self._cont:
            self._cont_kept = True
        return b"".join(keep)

    def _mark_skipped(self) -> None:
        """The rows counted past the budget, as an event after what was recorded before them."""
        core = self.core
        data = self._take(self._out, True)
        if data:
            ts, self._out_ts = self._out_ts, None
            core.record("out", data, ts)
        core.record("event", json.dumps({"type": "rows_not_recorded", "rows": self._skipped_rows,
                                         "bytes": self._skipped_bytes, "max_bytes": self._rows_cap}).encode())
        self._skipped_rows = self._skipped_bytes = 0
        if core.recording_left <= 0:
            self._stop()

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
        if final and self._skipped_rows:   # the session ended inside a run of rows not recorded
            self._mark_skipped()
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
