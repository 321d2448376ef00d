"""The session's recording: what the bot sent and what it received, in whole chunks.

Two buffers beside the relay, filled with the very bytes it reads from the bot and writes to the
bot (after masking, with botwarden's own notices and errors); no message is decoded here. A
chunk goes to ``SessionCore.record`` when the server's answer ends with ReadyForQuery (one row
per direction per statement, not per message) or when a buffer reaches CHUNK_BYTES, and when the
session ends. "in" chunks end on a message boundary (the audit process redacts each message of
them: appliance/recordings/pgstream.py); "out" chunks too (a message streamed in pieces is
flushed once complete). The startup, with the bot's password/token, is never recorded: the
session's ``pg_startup`` event says who connected and with which parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from appliance.recordings.pgstream import complete_prefix

from ..session import now

if TYPE_CHECKING:
    from ..session import SessionCore
    from .session import Session

# A chunk is written at the latest at this size (the audit process takes rows, not a stream).
CHUNK_BYTES = 64 * 1024
_READY_LEN = b"\x00\x00\x00\x05"   # ReadyForQuery: 'Z', length 5, status


class PgRecorder:
    """One session's recording buffers (only when the target records its sessions' bytes)."""

    __slots__ = ("core", "session", "_in", "_in_ts", "_out", "_out_ts")

    def __init__(self, core: SessionCore, session: Session):
        self.core = core
        self.session = session
        self._in = bytearray()
        self._out = bytearray()
        self._in_ts = self._out_ts = None

    def sent(self, data: bytes) -> None:
        """Bytes the bot sent (relay phase)."""
        buf = self._in
        if not buf:
            self._in_ts = now()
        buf += data
        if len(buf) >= CHUNK_BYTES:
            self._flush_in()

    def received(self, data: bytes) -> None:
        """Bytes written to the bot."""
        buf = self._out
        if not buf:
            self._out_ts = now()
        buf += data
        n = len(data)
        if ((n >= 6 and data[n - 6] == 0x5A and data[n - 5:n - 1] == _READY_LEN)
                or (len(buf) >= CHUNK_BYTES and not self.session._stream_left)):
            self.flush()

    def writer(self, write: Callable[[bytes], None]) -> Callable[[bytes], None]:
        """``write`` (the bot transport's) that also records what it wrote."""
        received = self.received

        def write_and_record(data: bytes) -> None:
            write(data)
            received(data)
        return write_and_record

    def flush(self, final: bool = False) -> None:
        """Both buffers to the recording: what the bot sent first (it was sent first)."""
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
