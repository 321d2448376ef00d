"""The asyncio protocols of one session: the bot's socket and the server's, and the waiter
that lets the startup coroutine read events from the sans-IO codec."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from appliance.protocols.postgres import sqlstate
from appliance.protocols.postgres.connection import NEED_DATA, PgConnection, error_response
from appliance.protocols.postgres.errors import PgProtocolError

if TYPE_CHECKING:
    from .front import PostgresFront
    from .session import Session

log = logging.getLogger(__name__)


class _Waiter:
    """Feeds a sans-IO connection and lets a coroutine await its next event."""

    def __init__(self, codec: PgConnection):
        self.codec = codec
        self.fut: asyncio.Future | None = None
        self.error: BaseException | None = None

    def feed(self, data: bytes) -> None:
        self.codec.receive_data(data)
        self.wake()

    def wake(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    async def next(self):
        while True:
            ev = self.codec.next_event()
            if ev is not NEED_DATA:
                return ev
            if self.error is not None:
                raise self.error
            self.fut = asyncio.get_running_loop().create_future()
            await self.fut
            self.fut = None


def refuse_setup(transport) -> None:
    """A connection botwarden could not set a session up for (its own bug): one FATAL that says
    so, then close, rather than leaving the bot to its connect timeout."""
    transport.write(error_response(sqlstate.INTERNAL_ERROR, "botwarden: internal error setting up the session; "
                                   "the connection is refused", severity="FATAL").encode())
    transport.close()


class SetupRefused(asyncio.Protocol):
    """The protocol of an accepted connection whose session could not even be built."""

    def connection_made(self, transport) -> None:
        refuse_setup(transport)


class BotProtocol(asyncio.Protocol):
    """The bot's side of one session."""

    def __init__(self, front: PostgresFront):
        self.front = front
        self.session = front.new_session(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # also called again by start_tls? no: we set it
        if self.transport is None:
            self.transport = transport
            try:
                if not self.session.admit():
                    return
                self.session.start()
            except Exception:  # our bug: the bot gets a clear FATAL now, not a connect timeout
                log.exception("could not start a session for an accepted connection; refused")
                self.session.closed = True
                refuse_setup(transport)

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s.closed:  # a bot that was sent a FATAL and has not hung up yet (Session.close): dropped
            return
        s.bytes_in += len(data)
        if s.relaying:
            if s.recorder is not None:
                s.recorder.sent(data)
            try:
                s.client_data(data)
            except Exception:  # our bug or a hook's: fail closed, never forward unchecked bytes
                log.exception("relay failed (bot -> server); session closed")
                s.fatal(sqlstate.INTERNAL_ERROR, "internal error in the inspector; the session is closed")
        else:
            try:
                s.bot_waiter.feed(data)
            except PgProtocolError as e:
                s.bot_waiter.wake(e)

    def eof_received(self) -> bool | None:
        self.session.bot_waiter.wake(ConnectionResetError("bot closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.bot_lost(exc)

    def pause_writing(self) -> None:
        self.session.flow("bot_full", True)

    def resume_writing(self) -> None:
        self.session.flow("bot_full", False)


# Bulk reads (docs/architecture.md, "Bulk results"): a read of at least BULK_READ bytes from the
# server means it is streaming (a large result, a COPY TO STDOUT). While it does, the kernel wakes
# the event loop only once BULK_LOWAT bytes are waiting (SO_RCVLOWAT): a loop that runs ahead of
# the server (appliance.nice) otherwise wakes for every few kilobytes, and each wake-up, and each
# write of the small chunk to the bot, costs more than relaying the bytes (a 92 MB unmasked result:
# 2,800 reads of 33 KB, 0.65 of direct's MB/s). The stream is over once BULK_IDLE_S passes
# without a read: the socket goes back to waking at any byte, so the last bytes of a result (fewer
# than BULK_LOWAT) wait at most about two such intervals.
BULK_READ = 32 * 1024
BULK_LOWAT = 128 * 1024
BULK_IDLE_S = 0.002


class UpstreamProtocol(asyncio.Protocol):
    """The server's side of one session."""

    def __init__(self, session: Session):
        self.session = session
        self.transport: asyncio.Transport | None = None
        self._bulk: asyncio.TimerHandle | None = None  # the bulk stream's idle check, while one runs
        self._bulk_recent = False                      # a read since that check was armed

    def connection_made(self, transport) -> None:
        if self.transport is None:
            self.transport = transport

    def _lowat(self, n: int) -> bool:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        except OSError:  # closed meanwhile, or a socket without a low-water mark: nothing to undo
            return False
        return True

    def _bulk_start(self) -> None:
        if self._lowat(BULK_LOWAT):
            self._bulk_recent = False
            self._bulk = asyncio.get_running_loop().call_later(BULK_IDLE_S, self._bulk_check)

    def _bulk_check(self) -> None:
        if self._bulk_recent:
            self._bulk_recent = False
            self._bulk = asyncio.get_running_loop().call_later(BULK_IDLE_S, self._bulk_check)
            return
        # No read for BULK_IDLE_S (the stream ended, paused, or the bot is slow and reading is
        # paused): whatever is waiting, however little, wakes the loop again (setting the mark
        # re-checks the socket, so bytes already queued are reported now).
        self._bulk = None
        self._lowat(1)

    def data_received(self, data: bytes) -> None:
        s = self.session
        s.bytes_out += len(data)
        if self._bulk is not None:
            self._bulk_recent = True
        elif len(data) >= BULK_READ:
            self._bulk_start()
        if s.relaying:
            try:
                s.server_data(data)
            except Exception:  # e.g. a mask plan that raises: no unmasked row may pass
                log.exception("relay failed (server -> bot); session closed")
                s.fatal(sqlstate.INTERNAL_ERROR, "internal error in the inspector; the session is closed")
        else:
            try:
                s.server_waiter.feed(data)
            except PgProtocolError as e:
                s.server_waiter.wake(e)

    def eof_received(self) -> bool | None:
        self.session.server_waiter.wake(ConnectionResetError("server closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._bulk is not None:
            self._bulk.cancel()
            self._bulk = None
        self.session.server_lost(exc)

    def pause_writing(self) -> None:
        self.session.flow("server_full", True)

    def resume_writing(self) -> None:
        self.session.flow("server_full", False)
