"""HTTP/1.1 (h11) and HTTP/2 (h2) wired to one bot connection.

Both libraries are sans-IO: bytes in, events out, bytes back. A driver reads the socket,
turns each complete request into a :class:`~appliance.fronts.k8s.front.BotRequest` and lets
:meth:`Session.exchange` answer it through a responder for its HTTP version. While a request
is in flight the driver keeps reading, so a bot that goes away cancels it (a held request is
withdrawn, a watch stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import h11
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from appliance.protocols.kubernetes import status_body

from .front import BotRequest

if TYPE_CHECKING:
    from .front import Session

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024


class BodyTooLarge(Exception):
    pass


# ====================================================================== HTTP/1.1
class Http1Driver:
    def __init__(self, session: "Session"):
        self.session = session
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._pending_read: asyncio.Future | None = None
        self.switched = False  # the connection was upgraded: the exchange's relay reads the bot

    def shutdown(self, reason: str) -> None:
        self.session.writer.close()

    async def _read(self) -> bytes:
        try:
            data = await self.session.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        return data

    async def run(self) -> None:
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                await self._bad_request(e)
                return
            if event is h11.NEED_DATA:
                data = await self._read()
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            try:
                body = await self._body()
            except h11.RemoteProtocolError as e:
                await self._bad_request(e)
                return
            except BodyTooLarge:
                await self._bad_request(None, 413, f"the request body is larger than botwarden's limit "
                                                   f"({self.session.settings.max_body_size} bytes)")
                return
            if body is None:
                return
            req = BotRequest(event.method.decode("ascii"), event.target.decode("latin-1"),
                             [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers], body)
            if not await self._exchange(req):
                return
            if conn.our_state is not h11.DONE or conn.their_state not in (h11.DONE, h11.MIGHT_SWITCH_PROTOCOL):
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _body(self) -> bytes | None:
        body = bytearray()
        limit = self.session.settings.max_body_size
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._read()
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise BodyTooLarge()
                continue
            if isinstance(event, h11.EndOfMessage):
                return bytes(body)
            return None  # ConnectionClosed mid-body

    async def _exchange(self, req: BotRequest) -> bool:
        task = asyncio.ensure_future(self.session.exchange(req, _H1Responder(self)))
        read = self._pending_read = asyncio.ensure_future(self._read())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task, read}, return_when=asyncio.FIRST_COMPLETED)
                if self.switched:
                    await task  # the relay owns the bot's bytes now (take_reader)
                    return False
                if read in done and not task.done():
                    data = read.result()
                    if not data:  # the bot left: stop the exchange (withdraws a hold, ends a watch)
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task
                        return False
                    self.conn.receive_data(data)  # the next request, parsed after this one
                    read = self._pending_read = asyncio.ensure_future(self._read())
            return task.result() and not self.switched
        finally:
            self._pending_read = None
            if not self.switched:  # once switched, what was read belongs to the relay (take_reader)
                if not read.done():
                    read.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await read  # the reader is free again before the next request is read
                if not read.cancelled() and task.done():
                    self.conn.receive_data(read.result())  # bytes (or the EOF) read as the exchange ended

    async def _bad_request(self, e: Exception | None, code: int = 400, message: str | None = None) -> None:
        status = getattr(e, "error_status_hint", code) if e is not None else code
        body = status_body(status, message or f"botwarden: malformed HTTP request ({e})")
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError, OSError):
            self.session.writer.write(self.conn.send(h11.Response(
                status_code=status, headers=[(b"content-type", b"application/json"),
                                             (b"content-length", str(len(body)).encode()),
                                             (b"connection", b"close")])))
            self.session.writer.write(self.conn.send(h11.Data(data=body)))
            self.session.writer.write(self.conn.send(h11.EndOfMessage()))
            await self.session.writer.drain()

    async def take_reader(self) -> bytes:
        """The connection switched protocols: the bot's bytes go to the relay from here. Returns
        what was already read past the request (h11's trailing data, a read that completed)."""
        self.switched = True
        pending = bytearray(self.conn.trailing_data[0])
        read = self._pending_read
        if read is not None:
            if not read.done():
                read.cancel()  # StreamReader.read keeps unread bytes in its buffer when cancelled
                with contextlib.suppress(asyncio.CancelledError):
                    await read
            if read.done() and not read.cancelled() and read.exception() is None:
                pending += read.result()
        return bytes(pending)


class _Switched:
    """The bot's side of an upgraded HTTP/1.1 connection."""

    def __init__(self, driver: "Http1Driver", pending: bytes):
        self.reader = driver.session.reader
        self.writer = driver.session.writer
        self._pending = pending

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        try:
            return await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


class _H1Responder:
    def __init__(self, driver: Http1Driver):
        self.driver = driver
        self.writer = driver.session.writer

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.writer.write(self.driver.conn.send(h11.Response(
            status_code=status, headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers])))

    async def send(self, data: bytes) -> None:
        self.writer.write(self.driver.conn.send(h11.Data(data=data)))
        await self.writer.drain()

    async def end(self) -> None:
        self.writer.write(self.driver.conn.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def switch(self, status: int, headers: list[tuple[str, str]]) -> _Switched:
        """Answer 101 (the API server switched protocols) and hand the raw connection over."""
        self.writer.write(self.driver.conn.send(h11.InformationalResponse(
            status_code=status, headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers])))
        await self.writer.drain()
        return _Switched(self.driver, await self.driver.take_reader())

    def abort(self) -> None:
        """The answer cannot be completed (a masked stream that cannot be read): the bot sees the
        connection end mid-body, never unmasked bytes."""
        self.writer.transport.abort()


# ====================================================================== HTTP/2
class _Stream:
    __slots__ = ("headers", "body", "task", "too_large")

    def __init__(self, headers: list[tuple[bytes, bytes]]):
        self.headers = headers
        self.body = bytearray()
        self.task: asyncio.Task | None = None
        self.too_large = False


class Http2Driver:
    def __init__(self, session: "Session"):
        self.session = session
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=True))
        self.streams: dict[int, _Stream] = {}
        self._window = asyncio.Event()
        self._closing = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.session.writer.write(data)

    def shutdown(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            self.conn.close_connection(h2.errors.ErrorCodes.NO_ERROR, reason.encode()[:200])
            self.flush()
        self._closing = True
        self.session.writer.close()

    async def run(self) -> None:
        self.conn.initiate_connection()
        self.flush()
        reader = self.session.reader
        try:
            while not self._closing:
                try:
                    data = await reader.read(READ_SIZE)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    log.info("HTTP/2 protocol error from the bot: %s", e)
                    self.flush()
                    break
                for event in events:
                    if not self._dispatch(event):
                        self._closing = True
                        break
                self.flush()
        finally:
            tasks = [s.task for s in self.streams.values() if s.task is not None and not s.task.done()]
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t

    def _dispatch(self, event: h2.events.Event) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            self.streams[event.stream_id] = _Stream(list(event.headers))
            if event.stream_ended is not None:
                self._start(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            st = self.streams.get(event.stream_id)
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if st is not None and not st.too_large:
                st.body += event.data
                if len(st.body) > self.session.settings.max_body_size:
                    st.too_large = True
                    st.body = bytearray()
            if event.stream_ended is not None:
                self._start(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            if self.streams.get(event.stream_id) is not None and self.streams[event.stream_id].task is None:
                self._start(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            st = self.streams.pop(event.stream_id, None)
            if st is not None and st.task is not None:
                st.task.cancel()  # the bot gave up on it: a held request is withdrawn, a watch ends
            self._wake()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _wake(self) -> None:
        self._window.set()
        self._window = asyncio.Event()

    def _start(self, stream_id: int) -> None:
        st = self.streams.get(stream_id)
        if st is None or st.task is not None:
            return
        st.task = self.session.front.spawn(self._exchange(stream_id, st), f"k8s-h2-{stream_id}")

    async def _exchange(self, stream_id: int, st: _Stream) -> None:
        out = _H2Responder(self, stream_id)
        try:
            pseudo = {n: v for n, v in st.headers if n.startswith(b":")}
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in st.headers if not n.startswith(b":")]
            authority = pseudo.get(b":authority")
            if authority is not None:
                headers.append(("host", authority.decode("latin-1")))
            if st.too_large:
                body = status_body(413, f"the request body is larger than botwarden's limit "
                                        f"({self.session.settings.max_body_size} bytes)")
                await out.start(413, [("content-type", "application/json"), ("content-length", str(len(body)))])
                await out.send(body)
                await out.end()
                return
            req = BotRequest(pseudo.get(b":method", b"GET").decode("ascii"), pseudo.get(b":path", b"/").decode("latin-1"),
                             headers, bytes(st.body))
            st.body = bytearray()
            keep = await self.session.exchange(req, out)
            if not keep:
                self.shutdown("the session was refused")
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, ConnectionError) as e:
            log.debug("HTTP/2 stream %d ended early: %s", stream_id, e)
        finally:
            self.streams.pop(stream_id, None)


class _H2Responder:
    def __init__(self, driver: Http2Driver, stream_id: int):
        self.driver = driver
        self.stream_id = stream_id

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.driver.conn.send_headers(self.stream_id, [(":status", str(status)), *headers])
        self.driver.flush()

    async def send(self, data: bytes) -> None:
        conn = self.driver.conn
        view = memoryview(data)
        while view:
            window = min(conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                await self.driver._window.wait()
                continue
            conn.send_data(self.stream_id, bytes(view[:window]))
            view = view[window:]
            self.driver.flush()
            await self.driver.session.writer.drain()

    async def end(self) -> None:
        self.driver.conn.end_stream(self.stream_id)
        self.driver.flush()
        await self.driver.session.writer.drain()

    def abort(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.driver.conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.driver.flush()
