"""The PostgreSQL front: botwarden's Layer-7 inspector between a bot and its real database.

Data path
=========

One bot connection is one :class:`BotProtocol` (an ``asyncio.Protocol``, not
streams, so uvloop delivers bytes straight into our buffer) paired with one
:class:`UpstreamProtocol` to the real server. There is no pooling: the bot's
session *is* one server session, so backend PIDs, prepared statements,
LISTEN and temp tables behave exactly as they would directly.

1. **Startup** (a coroutine, ``Session.run_startup``): the sans-IO codec
   (:mod:`appliance.protocols.postgres`) parses SSLRequest / GSSENCRequest
   ('N') / CancelRequest / StartupMessage. SSLRequest gets 'S' and
   ``loop.start_tls`` with the appliance's certificate. The bot's password
   field carries its OIDC token (AuthenticationCleartextPassword), which goes
   to ``services.open_session``; the grant brings the real credential. We
   connect to the target (TLS per settings), send the bot's startup
   parameters verbatim with only ``user`` replaced, and answer SCRAM / MD5 /
   cleartext with the credential. From AuthenticationOk on, the server's
   ParameterStatus messages go to the bot as sent; BackendKeyData keeps the
   real PID and gets our own secret (the front maps it back for
   CancelRequest). The first ReadyForQuery switches both sides to relaying.

2. **Relay, bot -> server** (``Session.client_data``): message boundaries
   come from ``struct.unpack_from`` over the received buffer (the loop of
   :func:`split_messages`, inlined), no copies. Only the types that matter
   are decoded: Query and Parse are first read as the server will read them
   (``appliance.policy.reading``: the session's client_encoding and
   standard_conforming_strings, tracked from ParameterStatus; while a request
   that might change them is still in flight, every reading it could bring
   must agree) and then go through ``services.decide_sql`` (the
   policy engine caches what is safe to cache; a verdict may depend on
   session state and time windows); Bind/Describe/Execute/Close/Sync are
   recorded as pending operations. Unchanged runs of messages are written
   as the very bytes received.

   * *block*: the statement is replaced by a statement that fails in the
     server's parser (``botwarden_blocked_<nonce>``). The server then does
     its own error recovery - aborts the transaction like any failed
     statement, discards up to Sync, sends ReadyForQuery with the true
     status - and we swap its syntax error for our 42501 ErrorResponse.
     Responses stay in order even with pipelining, and the blocked text never
     reaches the server.
   * *approve*: reading from the bot pauses for this session only; the
     statement waits on ``services.hold`` (the bot gets a NoticeResponse
     naming the approval id) and is then sent or replaced as for *block*.
     Inside a transaction a keep-alive Sync (answer swallowed) keeps the
     server's idle timeout away; a CancelRequest withdraws the hold (57014).
   * *mask*: the statement runs; see below. COPY TO STDOUT of a masked
     statement is refused (CopyData cannot be masked).

3. **Relay, server -> bot** (``Session.server_data``): spans again; a table
   of handlers per message type, ``None`` for pass-through. Pending
   operations pop on ParseComplete / BindComplete / CommandComplete /
   ReadyForQuery ..., which gives each request its rows, error and duration
   for the audit record. DataRows are decoded only while a masked result is
   in flight: RowDescription (or a Describe we add after Bind) gives the
   columns to ``services.mask_plan``, and each DataRow is re-encoded with
   the plan's values. Large pass-through messages stream without being
   buffered whole.

4. **End**: a bot that disconnects mid-query gets its query cancelled and
   the upstream closed; an upstream that dies gives the bot a FATAL 08006
   from botwarden. ``session_end`` carries bytes each way and the outcome.

Back-pressure: each side pauses reading the other when its transport's
write buffer fills (``pause_writing``), so a 100 MB result never sits in
memory.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import ssl
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from appliance.errors import BotwardenError
from appliance.policy.reading import (DEFAULT_READING, TRACKED_PARAMETERS, Reading, UnreadableStatement,
                                      possible_readings, read_statement)
from appliance.policy.sql import syntax_error
from appliance.policy.engine import plan_rows, with_row_estimate
from appliance.policy.types import ACTION_STRENGTH, ColumnDesc, Verdict
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres import sqlstate
from appliance.protocols.postgres.auth import SCRAM_SHA_256, ScramClient, md5_password
from appliance.protocols.postgres.connection import (NEED_DATA, ConnectionClosed, PgConnection, Role,
                                                     error_response, negotiate_reply, notice_response,
                                                     startup_for_server)
from appliance.protocols.postgres.errors import PgProtocolError, RemoteProtocolError
from appliance.protocols.postgres.framing import DEFAULT_MAX_MESSAGE_SIZE, check_length, unpack_len as _unpack_len
from appliance.tasks import TaskSet

from .admission import Admission, PartialMessageTimer, Ticket
from .services import (AuthRefused, ColumnMaskPlan, ConnectionContext, FrontServices, HoldOutcome,
                       SessionGrant)

log = logging.getLogger(__name__)

PROTOCOL = "postgresql"
UpstreamTLS = Literal["disable", "prefer", "require", "verify-full"]

# Pass-through messages at least this large stream to the other side before they are complete.
STREAM_THRESHOLD = 64 * 1024
# While a statement inside a transaction is held, a Sync this often keeps the server's
# idle_in_transaction_session_timeout from ending the bot's session during the wait.
HOLD_KEEPALIVE_S = 1.0
# PostgreSQL's own ceiling for one message (MaxAllocSize); server messages are checked against it.
SERVER_MAX_MESSAGE = 0x3FFFFFFF + 5
# Bot bytes kept while a statement is held before reading from the bot pauses.
HELD_BUFFER_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class PgFrontSettings:
    """One listener in front of one PostgreSQL target."""

    target: str
    upstream_host: str                    # with upstream_unix: the server's Unix socket path
    upstream_port: int = 5432
    upstream_unix: bool = False
    upstream_tls: UpstreamTLS = "prefer"
    upstream_ca_file: str | None = None
    tls_cert_file: str | None = None      # bot side; None = no TLS offered to bots
    tls_key_file: str | None = None
    allow_plaintext: bool = False         # bots without TLS are refused unless this is set
    require_token: bool = True            # ask the bot for a password (its OIDC token)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    connect_timeout: float = 10.0
    startup_timeout: float = 30.0
    message_timeout: float = 60.0         # a message started after login must be complete by then (0: off)

    def __post_init__(self) -> None:
        if self.upstream_tls not in ("disable", "prefer", "require", "verify-full"):
            raise ValueError(f"upstream_tls must be disable|prefer|require|verify-full, not {self.upstream_tls!r}")
        if self.upstream_tls == "verify-full" and not self.upstream_ca_file:
            raise ValueError("upstream_tls = verify-full needs upstream_ca_file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_cert_file is None and not self.allow_plaintext:
            raise ValueError("without tls_cert_file the front can only serve bots with allow_plaintext = true")
        if not 1024 <= self.max_message_size <= SERVER_MAX_MESSAGE:
            raise ValueError("max_message_size must be between 1 KiB and 1 GiB")


class FrontError(BotwardenError):
    """A session ends with a FATAL error for the bot (``sqlstate``, ``message``)."""

    def __init__(self, sqlstate_: str, message: str, *, server_error: m.ErrorResponse | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate_
        self.message = message
        self.server_error = server_error


def _now() -> datetime:
    return datetime.now(timezone.utc)


_time = time.time
_urandom = os.urandom


def _discard(data: bytes) -> None:
    """Writer of a closed session."""


def _new_id() -> str:
    return _urandom(16).hex()


# Request ids: unique, not secret (only root reads them). A random per-process prefix and a
# counter cost no system call per statement, unlike 16 fresh random bytes.
_REQUEST_PREFIX = _urandom(8).hex()
_request_seq = itertools.count(1)


def _request_id() -> str:
    return f"{_REQUEST_PREFIX}{next(_request_seq):016x}"


def _addr(a: Any) -> str | None:
    if isinstance(a, tuple) and len(a) >= 2:
        return f"{a[0]}:{a[1]}"
    return str(a) if a else None


class PostgresFront:
    """Listener for one target: ``await PostgresFront(settings, services).serve(host, port)``."""

    def __init__(self, settings: PgFrontSettings, services: FrontServices, admission: Admission | None = None):
        self.settings = settings
        self.services = services
        self.admission = admission  # caps on unauthenticated connections (the daemon's, shared by its fronts)
        self.server_ssl: ssl.SSLContext | None = None
        if settings.tls_cert_file:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
            self.server_ssl = ctx
        self.upstream_ssl: ssl.SSLContext | None = None
        if settings.upstream_tls != "disable":
            if settings.upstream_tls == "verify-full":
                ctx = ssl.create_default_context(cafile=settings.upstream_ca_file)
            else:
                # require/prefer encrypt without verifying, as libpq does without a root cert.
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.upstream_ssl = ctx
        # FunctionCall OIDs resolved on the target (oid -> (schema, name)), for the policy.
        # Kept while the services (one config generation) stay the same: a reload re-resolves.
        self.function_names: dict[int, tuple[str, str]] = {}
        self._function_names_for: Any = services
        # (backend pid, secret we gave the bot) -> (real secret, upstream host, upstream port)
        self.cancel_keys: dict[tuple[int, int], tuple[int, str, int]] = {}
        self.sessions: set[Session] = set()
        self._tasks = TaskSet()
        self._server: asyncio.Server | None = None

    def protocol_factory(self) -> "BotProtocol":
        return BotProtocol(self)

    async def serve(self, host: str, port: int, **kwargs: Any) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.protocol_factory, host, port, **kwargs)
        return self._server

    async def serve_unix(self, path: str) -> asyncio.Server:
        """Listen on a Unix socket (a Unix-socket target: the kernel rewrites bots' connects to
        the database's socket into connects to this one). World-connectable like a loopback
        port: who is calling is decided by attestation (SO_PEERCRED), not by file modes."""
        loop = asyncio.get_running_loop()
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a previous run
        self._server = await loop.create_unix_server(self.protocol_factory, path)
        os.chmod(path, 0o666)
        return self._server

    async def _open_upstream(self, factory: Callable[[], Any]) -> tuple[Any, Any]:
        st = self.settings
        loop = asyncio.get_running_loop()
        if st.upstream_unix:
            return await loop.create_unix_connection(factory, st.upstream_host)
        return await loop.create_connection(factory, st.upstream_host, st.upstream_port)

    async def close(self) -> None:
        """Stop listening and end every session."""
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.shutdown(sqlstate.ADMIN_SHUTDOWN, "the appliance is shutting down")
        self._tasks.cancel_all()

    async def drain(self, deadline: float) -> None:
        """Stop listening; let requests in flight finish until ``deadline`` (monotonic), then end
        every session with a shutdown error (57P01) that says botwarden is stopping."""
        if self._server is not None:
            self._server.close()
        while any(s.busy for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            s.shutdown(sqlstate.ADMIN_SHUTDOWN, "botwarden is shutting down; reconnect to continue")
        await asyncio.sleep(0)

    def spawn(self, coro, name: str) -> asyncio.Task:
        return self._tasks.spawn(coro, name)

    async def cancel(self, req: m.CancelRequest) -> None:
        """Forward a bot's CancelRequest to the upstream that owns (pid, our secret)."""
        found = self.cancel_keys.get((req.pid, req.secret))
        if found is None:
            log.info("cancel request for an unknown key ignored (pid %s)", req.pid)
            return
        for session in list(self.sessions):
            if session.cancel_key == (req.pid, req.secret) and session.withdraw_hold():
                if not session.busy_upstream:
                    # The held statement never reached the server; a cancel forwarded now could
                    # hit the bot's next statement instead.
                    return
        await self.cancel_upstream(req.pid, *found)

    async def cancel_upstream(self, pid: int, secret: int, host: str, port: int) -> None:
        """Deliver the cancel and return only once the server has closed its end: PostgreSQL
        closes a CancelRequest connection after it has signalled the backend, and clients
        (asyncpg's timeouts) wait for that close before sending their next statement. The
        bot's own cancel connection is closed after this returns, keeping that order."""
        writer = None
        try:
            opened = (asyncio.open_unix_connection(host) if self.settings.upstream_unix
                      else asyncio.open_connection(host, port))
            reader, writer = await asyncio.wait_for(opened, self.settings.connect_timeout)
            writer.write(m.CancelRequest(pid, secret).encode())
            await writer.drain()
            await asyncio.wait_for(reader.read(), self.settings.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("could not forward a cancel request to %s:%s: %s", host, port, e)
        finally:
            if writer is not None:
                writer.close()


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


class BotProtocol(asyncio.Protocol):
    """The bot's side of one session."""

    def __init__(self, front: PostgresFront):
        self.front = front
        self.session = Session(front, self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:  # also called again by start_tls? no: we set it
        if self.transport is None:
            self.transport = transport
            if not self.session.admit():
                return
            self.session.start()

    def data_received(self, data: bytes) -> None:
        s = self.session
        s.bytes_in += len(data)
        if s.relaying:
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


class UpstreamProtocol(asyncio.Protocol):
    """The server's side of one session."""

    def __init__(self, session: "Session"):
        self.session = session
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        if self.transport is None:
            self.transport = transport

    def data_received(self, data: bytes) -> None:
        s = self.session
        s.bytes_out += len(data)
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
        self.session.server_lost(exc)

    def pause_writing(self) -> None:
        self.session.flow("server_full", True)

    def resume_writing(self) -> None:
        self.session.flow("server_full", False)


class _Request:
    """One statement's audit record while it runs."""

    # Class-level defaults: one request per statement is the hot path, so __init__ sets only
    # what every request has; the rest is written when it happens.
    request_id: str | None = None        # made when first needed (a hold names it, or the audit record)
    decision: str | None = None          # None: the verdict's action
    reason: str | None = None            # None: the verdict's reason
    rows: int | None = None
    error: str | None = None
    sqlstate: str | None = None
    masked: dict[str, int] | None = None
    nonce: str | None = None             # set when the statement was replaced by a failing one
    refusal: m.ErrorResponse | None = None

    def __init__(self, kind: str, text: str, verdict: Verdict, params: list | None = None):
        self.kind = kind
        self.text = text
        self.params = params
        self.verdict = verdict
        self.t0 = _time()


class _Statement:
    __slots__ = ("text", "verdict", "columns", "name", "guard")

    def __init__(self, text: str, verdict: Verdict, name: str = ""):
        self.text = text
        self.verdict = verdict
        self.columns: list[ColumnDesc] | None = None
        self.name = name
        # Affected-rows guard pending (verdict.row_guards): (query bytes, parameter type OIDs),
        # to have the server estimate the rows at Execute, with the portal's parameters.
        self.guard: tuple[bytes, tuple[int, ...]] | None = None


class _Portal:
    __slots__ = ("statement", "params", "result_formats", "columns", "bind")

    def __init__(self, statement: _Statement | None, params: list | None, result_formats: tuple[int, ...]):
        self.statement = statement
        self.params = params
        self.result_formats = result_formats
        self.columns: list[ColumnDesc] | None = None
        self.bind: bytes | None = None  # the Bind message, kept only for a guarded statement


_UNKNOWN_STATEMENT = _Statement("", Verdict("allow", None, "statement prepared before this session"))

# Pending-operation kinds (first item of each op tuple).
OP_QUERY, OP_PARSE, OP_BIND, OP_DESCRIBE, OP_EXECUTE, OP_CLOSE, OP_SYNC, OP_FUNCTION, OP_KEEPALIVE = range(9)
_EXTENDED_OPS = frozenset((OP_PARSE, OP_BIND, OP_DESCRIBE, OP_EXECUTE, OP_CLOSE))
_SYNC = m.Sync().encode()
_FLUSH = m.Flush().encode()
# The affected-rows guard's own statement and portal on the bot's session (closed right after).
_ESTIMATE = "botwarden_row_estimate"
_EXPLAIN_PREFIX = b"EXPLAIN (FORMAT JSON) "
_ESTIMATE_REPLIES = tuple(b"123DCENZ")

_I32 = struct.Struct("!i")
_H16 = struct.Struct("!H")  # counts are unsigned 16-bit, as PostgreSQL reads them
_HEADER = struct.Struct("!ci")


def _row_values(buf, start: int, end: int) -> list[bytes | None]:
    """Values of a DataRow at buf[start:end] (start = its type byte), as bytes."""
    if type(buf) is not bytes:
        buf = bytes(buf[start:end])  # one copy of the row, so values are immutable bytes
        end -= start
        start = 0
    try:
        (n,) = _H16.unpack_from(buf, start + 5)
        pos = start + 7
        out: list[bytes | None] = []
        append = out.append
        unpack = _I32.unpack_from
        for _ in range(n):
            (ln,) = unpack(buf, pos)
            pos += 4
            if ln < 0:
                append(None)
            else:
                append(buf[pos:pos + ln])
                pos += ln
    except struct.error as err:
        raise RemoteProtocolError(f"malformed DataRow: {err}") from err
    if pos != end:
        raise RemoteProtocolError("DataRow values do not match its length")
    return out


_NULL = b"\xff\xff\xff\xff"


def _encode_row(values) -> bytes:
    parts = [b"", _H16.pack(len(values))]
    append = parts.append
    pack = _I32.pack
    size = 6
    for v in values:
        if v is None:
            append(_NULL)
            size += 4
        else:
            append(pack(len(v)))
            append(v)
            size += 4 + len(v)
    parts[0] = _HEADER.pack(b"D", size)
    return b"".join(parts)


def _columns(desc: m.RowDescription, formats: tuple[int, ...] | None = None) -> list[ColumnDesc]:
    cols = []
    for i, f in enumerate(desc.fields):
        fmt = f.format
        if formats is not None:
            fmt = formats[i] if len(formats) > 1 else (formats[0] if formats else 0)
        cols.append(ColumnDesc(f.name, f.table_oid, f.attnum, f.type_oid, fmt))
    return cols


def _cstring_at(buf, pos: int, end: int) -> tuple[str, int]:
    z = buf.find(b"\x00", pos, end)
    if z < 0:
        raise RemoteProtocolError("string field is not NUL-terminated")
    return buf[pos:z].decode("utf-8", "surrogateescape"), z + 1


def _bind_fast(buf, s: int, e: int) -> tuple[str, str, list[str | None], tuple[int, ...]]:
    """(portal, statement, parameters rendered for the audit, result formats) of a Bind, without copies.

    The hot path of every extended-protocol execution; Bind.decode is the reference
    (the fuzz tests hold both to the same inputs through the front's tests).
    """
    try:
        portal, pos = _cstring_at(buf, s + 5, e)
        statement, pos = _cstring_at(buf, pos, e)
        (nf,) = _H16.unpack_from(buf, pos)
        pos += 2
        formats = struct.unpack_from(f"!{nf}h", buf, pos) if nf > 0 else ()
        pos += 2 * nf
        (np_,) = _H16.unpack_from(buf, pos)
        pos += 2
        if nf > 1 and nf != np_:
            raise RemoteProtocolError("Bind has inconsistent parameter counts")
        for f in formats:
            if f != 0 and f != 1:
                raise RemoteProtocolError(f"unknown format code {f}")
        params: list[str | None] = []
        for i in range(np_):
            (ln,) = _I32.unpack_from(buf, pos)
            pos += 4
            if ln == -1:
                params.append(None)
                continue
            if ln < 0 or pos + ln > e:
                raise RemoteProtocolError("Bind parameter runs past its message")
            fmt = formats[i] if nf > 1 else (formats[0] if nf else 0)
            raw = buf[pos:pos + ln]
            params.append(raw.decode("utf-8", "replace") if fmt == 0 else "\\x" + raw.hex())
            pos += ln
        (nr,) = _H16.unpack_from(buf, pos)
        pos += 2
        result_formats = struct.unpack_from(f"!{nr}h", buf, pos) if nr else ()
        for f in result_formats:
            if f != 0 and f != 1:
                raise RemoteProtocolError(f"unknown format code {f}")
        pos += 2 * nr
        if pos != e:
            raise RemoteProtocolError("Bind body length does not match its fields")
        return portal, statement, params, result_formats
    except struct.error as err:
        raise RemoteProtocolError(f"Bind message is truncated: {err}") from err


def _render_params(bind: m.Bind | m.FunctionCall) -> list[str | None]:
    params = bind.params if isinstance(bind, m.Bind) else bind.args
    formats = bind.param_formats if isinstance(bind, m.Bind) else bind.arg_formats
    out: list[str | None] = []
    for i, v in enumerate(params):
        if v is None:
            out.append(None)
        elif (formats[i] if len(formats) > 1 else formats[0] if formats else 0) == 0:
            out.append(v.decode("utf-8", "replace"))
        else:
            out.append("\\x" + v.hex())
    return out


class Session:
    """State of one bot session: startup coroutine, then two relay directions."""

    def __init__(self, front: PostgresFront, bot: BotProtocol):
        self.front = front
        self.services = front.services
        self.settings = front.settings
        self.bot = bot
        self.upstream: UpstreamProtocol | None = None
        self.bot_waiter = _Waiter(PgConnection(Role.SERVER, max_message_size=self.settings.max_message_size))
        self.server_waiter = _Waiter(PgConnection(Role.CLIENT, max_message_size=SERVER_MAX_MESSAGE))
        self.relaying = False
        self.closed = False
        self.grant: SessionGrant | None = None
        self.session_id: str | None = None
        self.tls = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.outcome = "ok"
        self.end_error: str | None = None
        self.cancel_key: tuple[int, int] | None = None
        self.backend_pid: int | None = None
        self.txn_status = "I"
        # How the server reads statement text (client_encoding, standard_conforming_strings), as
        # its ParameterStatus messages last said.
        self._reading: Reading = DEFAULT_READING
        self._paused: set[str] = set()
        # The relay's writers: the transports' own write methods once relaying, no-ops after close.
        self._to_bot: Callable[[bytes], None] = self.write_bot
        self._to_server: Callable[[bytes], None] = self.write_server
        self._startup_task: asyncio.Task | None = None
        self._admission: Ticket | None = None
        self._message_timer = PartialMessageTimer(self.settings.message_timeout, self._message_timed_out,
                                                  lambda: self._held or bool(self._paused))
        self._hold_task: asyncio.Task | None = None
        self._held_req: _Request | None = None
        self._hold_wait: asyncio.Future | None = None  # services.hold, while a statement is held
        self._withdrawn = False
        self._ext_open = False  # extended-protocol messages forwarded since the last Sync (bot -> server)
        # bot -> server
        self._cbuf = b""
        self._cpos = 0          # where the unrelayed bytes in _cbuf start (after a hold)
        self._cmore: list = []  # what the bot sent while a request was held, in order
        self._cmore_len = 0
        self._held = False
        self._skip_until_sync = False
        self._statements: dict[str, _Statement] = {}
        self._portals: dict[str, _Portal] = {}
        # server -> bot
        self._sbuf = b""
        self._stream_left = 0
        self._ops: deque = deque()
        self._plan = None
        self._plan_req: _Request | None = None
        self._server_fatal = False
        self._terminated = False
        self._lookup_active = False   # a FunctionCall's OID is being resolved on this session
        # Affected-rows guard: the EXPLAIN in flight (original message, extended?, request), the
        # estimate for the message processed again ((original, rows or None, why none)), and what
        # runs once the bot's earlier extended messages are all answered.
        self._estimating: tuple[bytes, bool, Any] | None = None
        self._estimate: tuple[bytes, int | None, str] | None = None
        self._after_drain: Callable[[], None] | None = None
        self._unknown_oids: set[int] = set()
        self._deferred: list | None = None  # requests completed during the current server read
        self._handlers: list[Callable | None] = [None] * 256
        for ch, h in ((b"1", self._on_parse_complete), (b"2", self._on_bind_complete),
                      (b"3", self._on_close_complete), (b"T", self._on_row_description),
                      (b"n", self._on_no_data), (b"C", self._on_command_complete),
                      (b"I", self._on_empty_query), (b"s", self._on_portal_suspended),
                      (b"E", self._on_error), (b"Z", self._on_ready), (b"K", self._on_backend_key),
                      (b"H", self._on_copy_out), (b"W", self._on_copy_out),
                      (b"S", self._on_parameter_status)):
            self._handlers[ch[0]] = h
        # audit.mode = "strict": services.audit_durable(kind, record, verdict) -> future | None.
        self._audit_durable = getattr(self.services, "audit_durable", None)
        self._client_handlers: list[Callable | None] = [None] * 256
        for ch, h in ((b"Q", self._c_query), (b"P", self._c_parse), (b"B", self._c_bind),
                      (b"D", self._c_describe), (b"E", self._c_execute), (b"C", self._c_close),
                      (b"S", self._c_sync), (b"F", self._c_function_call), (b"X", self._c_terminate)):
            self._client_handlers[ch[0]] = h

    @property
    def busy_upstream(self) -> bool:
        """The server is working on something this session sent."""
        return any(op[0] != OP_KEEPALIVE for op in self._ops)

    def withdraw_hold(self) -> bool:
        """The bot cancelled (CancelRequest, e.g. Ctrl-C in psql) while its statement is held:
        withdraw the request; the bot gets 57014 as for any cancelled statement."""
        wait = self._hold_wait
        if self.closed or not self._held or wait is None or wait.done():
            return False
        wait.cancel(msg="the client cancelled the statement while it was held")
        self._withdrawn = True
        return True

    @property
    def busy(self) -> bool:
        """A request is in flight (sent, its answer not complete) or held for approval."""
        return bool(self._ops) or self._held or (self._startup_task is not None and not self._startup_task.done())

    # ================================================================== lifecycle
    def admit(self) -> bool:
        """Count this connection against the daemon's caps on unauthenticated connections; beyond
        them it is refused at once with PostgreSQL's own 53300 (appliance/fronts/admission.py)."""
        admission = self.front.admission
        if admission is None:
            return True
        transport = self.bot.transport
        self._admission = admission.admit(transport.get_extra_info("socket"), self._admission_closed,
                                          listener=_addr(transport.get_extra_info("sockname")) or "")
        if self._admission is not None:
            return True
        self.closed = True
        transport.write(error_response(sqlstate.TOO_MANY_CONNECTIONS, "botwarden: too many connections waiting "
                                       "to authenticate; try again later").encode())
        transport.close()
        return False

    def _admission_closed(self, reason: str) -> None:
        self.fatal(sqlstate.CONNECTION_FAILURE, f"botwarden: {reason}; the connection is closed")

    def _message_timed_out(self, timeout: float) -> None:
        self.fatal(sqlstate.PROTOCOL_VIOLATION, f"botwarden: a message from the client stayed incomplete for "
                                                f"{timeout:g}s; the session is closed")

    def start(self) -> None:
        self.front.sessions.add(self)
        self._startup_task = self.front.spawn(self.run_startup(), "pg-startup")

    def write_bot(self, data: bytes) -> None:
        t = self.bot.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def write_server(self, data: bytes) -> None:
        u = self.upstream
        if u is not None and u.transport is not None and not u.transport.is_closing():
            u.transport.write(data)

    def fatal(self, code: str, message: str, *, outcome: str = "error") -> None:
        """Tell the bot why the session ends (FATAL, botwarden-made) and close it."""
        if self.outcome == "ok":
            self.outcome = outcome
            self.end_error = message
        self.write_bot(error_response(code, message, severity="FATAL").encode())
        self.close()

    def shutdown(self, code: str, message: str) -> None:
        self.fatal(code, message, outcome="terminated")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._to_bot = self._to_server = _discard
        self._message_timer.cancel()
        if self._admission is not None:
            self._admission.release()
        if self._startup_task is not None and not self._startup_task.done():
            self._startup_task.cancel()
        if self._hold_task is not None and not self._hold_task.done():
            self._hold_task.cancel()
        if self.bot.transport is not None:
            self.bot.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self._finish_pending("session ended before the statement completed")
        if self.cancel_key is not None:
            self.front.cancel_keys.pop(self.cancel_key, None)
        self.front.sessions.discard(self)
        if self.session_id is not None:
            self._audit("session_end", {
                "session_id": self.session_id, "ts": _now(), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "outcome": self.outcome, "error": self.end_error})
        if self.grant is not None:
            self.front.spawn(self._close_grant(self.grant), "pg-close-session")

    async def _close_grant(self, grant: SessionGrant) -> None:
        try:
            await self.services.close_session(grant)
        except Exception:
            log.exception("close_session failed for session %s", grant.session_id)

    def bot_lost(self, exc: Exception | None) -> None:
        self.bot_waiter.wake(ConnectionResetError("bot closed the connection"))
        if self.closed:
            return
        if self._ops and self.backend_pid is not None and self.cancel_key is not None:
            # The server would run the statement to its end; ask it to stop now.
            secret, host, port = self.front.cancel_keys[self.cancel_key]
            self.front.spawn(self.front.cancel_upstream(self.backend_pid, secret, host, port),
                             "pg-cancel-on-disconnect")
            if self.outcome == "ok":
                self.outcome = "terminated"
                self.end_error = "bot disconnected during a statement"
        self.close()

    def server_lost(self, exc: Exception | None) -> None:
        self.server_waiter.wake(ConnectionResetError("server closed the connection"))
        if self.closed or not self.relaying:
            return
        if self._terminated:
            self.close()  # the bot said goodbye; the server closing is the normal end
            return
        if self._server_fatal:
            # The server already told the bot why (e.g. pg_terminate_backend's 57P01).
            self.outcome = "terminated"
            self.close()
            return
        self.fatal(sqlstate.CONNECTION_FAILURE,
                   "lost the connection to the PostgreSQL server"
                   + (f" ({exc})" if exc else "") + "; the session is closed")

    def flow(self, reason: str, paused: bool) -> None:
        """Back-pressure: a full write buffer on one side pauses reading on the other."""
        if paused:
            self._paused.add(reason)
        else:
            self._paused.discard(reason)
        up = self.upstream.transport if self.upstream is not None else None
        if up is not None and not up.is_closing():
            (up.pause_reading if "bot_full" in self._paused else up.resume_reading)()
        bt = self.bot.transport
        if bt is not None and not bt.is_closing():
            stop = "server_full" in self._paused or "held" in self._paused
            (bt.pause_reading if stop else bt.resume_reading)()

    def _upstream_failed(self, stage: str) -> None:
        note = getattr(self.services, "upstream_connect_failed", None)  # the daemon counts it (/metrics)
        if note is not None:
            note(self.settings.target, stage)

    def _audit(self, kind: str, record: dict) -> None:
        try:
            self.services.audit(kind, record)
        except Exception:
            # Counted (and logged once) by the runtime; in strict mode the request itself was
            # refused before it ran. Here only once per kind, for services without that count.
            if kind not in _AUDIT_FAILURE_LOGGED:
                _AUDIT_FAILURE_LOGGED.add(kind)
                log.exception("audit hook failed for %s", kind)

    # ================================================================== startup
    async def run_startup(self) -> None:
        try:
            await asyncio.wait_for(self._startup(), self.settings.startup_timeout)
        except asyncio.TimeoutError:
            self.fatal(sqlstate.CONNECTION_FAILURE, "the session did not start in time", outcome="error")
        except FrontError as e:
            if e.server_error is not None:
                # The server's own words (e.g. 3D000 database does not exist) reach the bot unchanged.
                self.outcome, self.end_error = "refused", e.server_error.message
                self.write_bot(e.server_error.encode())
                self.close()
            else:
                self.fatal(e.sqlstate, e.message, outcome="refused" if e.sqlstate.startswith("28") else "error")
        except PgProtocolError as e:
            self.fatal(e.sqlstate, e.message)
        except (ConnectionError, OSError) as e:
            if not self.closed:
                log.info("session startup ended: %s", e)
                self.outcome = "error"
                self.end_error = str(e)
                self.close()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session startup failed")
            self.fatal(sqlstate.INTERNAL_ERROR, "internal error while starting the session")

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        codec = self.bot_waiter.codec
        ev = await self.bot_waiter.next()
        while isinstance(ev, (m.SSLRequest, m.GSSENCRequest)):
            if isinstance(ev, m.SSLRequest) and self.front.server_ssl is not None and not self.tls:
                self.write_bot(codec.send(m.SSLResponse(True)))
                self.bot.transport = await loop.start_tls(self.bot.transport, self.bot, self.front.server_ssl,
                                                          server_side=True)
                self.tls = True
            else:
                self.write_bot(codec.send(m.SSLResponse(False)))
            ev = await self.bot_waiter.next()
        if isinstance(ev, m.CancelRequest):
            await self.front.cancel(ev)
            self.close()
            return
        if isinstance(ev, ConnectionClosed):
            self.close()
            return
        startup: m.StartupMessage = ev
        if not self.tls and not self.settings.allow_plaintext:
            raise FrontError(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                             "this target requires TLS; connect with sslmode=require or stronger")
        reply = negotiate_reply(startup)
        if reply is not None:
            self.write_bot(reply.encode())
        user = startup.get("user")
        if not user:
            raise FrontError(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, "no user name in the startup packet")
        token: str | None = None
        if self.settings.require_token:
            self.write_bot(m.AuthenticationCleartextPassword().encode())
            ev = await self.bot_waiter.next()
            if not isinstance(ev, m.PasswordMessage):
                raise FrontError(sqlstate.PROTOCOL_VIOLATION, "expected a password message carrying the token")
            token = ev.password_text()
        if self._admission is not None:
            self._admission.release()  # credentials presented: the identity checks bound it from here
        transport = self.bot.transport
        ctx = ConnectionContext(transport.get_extra_info("peername"), transport.get_extra_info("sockname"),
                                self.tls, await _attribution(self.services, transport))
        try:
            grant = await self.services.open_session(self.settings.target, ctx, user, token)
        except AuthRefused as e:
            self.session_id = _new_id()
            self._session_start(ctx, None, e.audit_fields)
            raise FrontError(e.sqlstate, e.message) from None
        finally:
            token = None  # the token is not kept past this point
        self.grant = grant
        self.session_id = grant.session_id
        register = getattr(self.services, "register_terminate", None)
        if register is not None:  # the daemon ends sessions whose lease or token ran out
            register(grant.session_id, lambda code, message: self.fatal(code, message, outcome="terminated"))
        self._session_start(ctx, grant)
        await self._connect_upstream(grant, startup)

    def _session_start(self, ctx: ConnectionContext, grant: SessionGrant | None,
                       refused_fields: Any = None) -> None:
        rec: dict[str, Any] = {
            "session_id": self.session_id, "ts": _now(), "target": self.settings.target, "protocol": PROTOCOL,
            "client_addr": _addr(ctx.client_addr),
            "target_addr": (f"unix:{self.settings.upstream_host}" if self.settings.upstream_unix
                            else f"{self.settings.upstream_host}:{self.settings.upstream_port}"), "tls": ctx.tls,
        }
        a = ctx.attribution
        if a is not None:
            rec.update(pid=getattr(a, "tgid", a.pid), uid=a.uid, gid=a.gid, cgroup_id=a.cgroup_id, cgroup_path=a.cgroup_path,
                       exe=a.exe_path, comm=a.comm, attribution_source=a.source,
                       privileged=bool(getattr(a, "privileges", ())))
        else:
            rec["attribution_source"] = "none"
        if grant is not None:
            rec.update(identity=grant.identity, token_subject=grant.subject,
                       credential_user=grant.credential.username, lease_id=grant.credential.lease_id)
            rec.update(grant.audit_fields)
        elif refused_fields:
            rec.update(refused_fields)
        self._audit("session_start", rec)

    async def _connect_upstream(self, grant: SessionGrant, startup: m.StartupMessage) -> None:
        loop = asyncio.get_running_loop()
        st = self.settings
        try:
            _, proto = await asyncio.wait_for(self.front._open_upstream(lambda: UpstreamProtocol(self)),
                                              st.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self._upstream_failed("tcp")
            raise FrontError(sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                             f"could not connect to the target {st.target!r}: {e or 'timeout'}") from e
        self.upstream = proto
        if self.closed:
            proto.transport.close()
            return
        codec = self.server_waiter.codec
        if st.upstream_tls != "disable":
            proto.transport.write(codec.send(m.SSLRequest()))
            ev = await self.server_waiter.next()
            if isinstance(ev, m.SSLResponse) and ev.accepted:
                try:
                    proto.transport = await loop.start_tls(
                        proto.transport, proto, self.front.upstream_ssl,
                        server_hostname=st.upstream_host if st.upstream_tls == "verify-full" else None)
                except (ssl.SSLError, OSError) as e:
                    self._upstream_failed("tls")
                    raise FrontError(sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                                     f"TLS to the target {st.target!r} failed: {e}") from e
            elif isinstance(ev, m.ErrorResponse):
                raise FrontError(ev.sqlstate or sqlstate.CONNECTION_FAILURE, "", server_error=ev)
            elif st.upstream_tls != "prefer":
                raise FrontError(sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                                 f"the target {st.target!r} does not accept TLS (upstream_tls = {st.upstream_tls})")
        cred = grant.credential
        proto.transport.write(codec.send(startup_for_server(startup, cred.username)))
        await self._authenticate_upstream(cred.username, cred.password)
        self.write_bot(m.AuthenticationOk().encode())
        # Until ReadyForQuery: ParameterStatus/Notice as sent, BackendKeyData with our secret.
        while True:
            ev = await self.server_waiter.next()
            if isinstance(ev, m.ReadyForQuery):
                self.write_bot(ev.encode())
                self.txn_status = ev.status
                break
            if isinstance(ev, m.BackendKeyData):
                self.write_bot(self._remap_key(ev.pid, ev.secret))
            elif isinstance(ev, m.ErrorResponse):
                raise FrontError(ev.sqlstate or sqlstate.CONNECTION_FAILURE, "", server_error=ev)
            elif isinstance(ev, ConnectionClosed):
                raise FrontError(sqlstate.CONNECTION_FAILURE, "the server closed the connection during startup")
            elif isinstance(ev, (m.ParameterStatus, m.NoticeResponse, m.NegotiateProtocolVersion)):
                if isinstance(ev, m.ParameterStatus) and ev.name in TRACKED_PARAMETERS:
                    self._reading = self._reading.with_parameter(ev.name, ev.value)
                if not isinstance(ev, m.NegotiateProtocolVersion):
                    self.write_bot(ev.encode())
            else:
                raise FrontError(sqlstate.PROTOCOL_VIOLATION,
                                 f"the server sent {type(ev).__name__} during startup")
        self._to_bot = self.bot.transport.write
        self._to_server = self.upstream.transport.write
        self.relaying = True
        rest_server = self.server_waiter.codec.trailing_data
        rest_bot = self.bot_waiter.codec.trailing_data
        if rest_server:
            self.server_data(rest_server)
        if rest_bot:
            self.client_data(rest_bot)

    async def _authenticate_upstream(self, user: str, password: str | None) -> None:
        write = self.upstream.transport.write
        scram: ScramClient | None = None

        def need_password() -> str:
            if password is None:
                raise FrontError(sqlstate.INVALID_PASSWORD,
                                 "the target asks for a password but the session's credential has none")
            return password

        while True:
            ev = await self.server_waiter.next()
            if isinstance(ev, m.AuthenticationOk):
                return
            if isinstance(ev, m.AuthenticationCleartextPassword):
                write(m.PasswordMessage.password(need_password()).encode())
            elif isinstance(ev, m.AuthenticationMD5Password):
                write(m.PasswordMessage.password(md5_password(user, need_password(), ev.salt)).encode())
            elif isinstance(ev, m.AuthenticationSASL):
                if SCRAM_SHA_256 not in ev.mechanisms:
                    raise FrontError(sqlstate.FEATURE_NOT_SUPPORTED,
                                     f"the target offers SASL mechanisms {list(ev.mechanisms)}, none supported")
                scram = ScramClient(need_password())
                write(m.PasswordMessage.sasl_initial(SCRAM_SHA_256, scram.client_first()).encode())
            elif isinstance(ev, m.AuthenticationSASLContinue) and scram is not None:
                write(m.PasswordMessage(scram.client_final(ev.data)).encode())
            elif isinstance(ev, m.AuthenticationSASLFinal) and scram is not None:
                scram.verify_server_final(ev.data)
            elif isinstance(ev, m.ErrorResponse):
                raise FrontError(ev.sqlstate or sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, "",
                                 server_error=ev)
            elif isinstance(ev, m.NegotiateProtocolVersion):
                continue
            elif isinstance(ev, ConnectionClosed):
                raise FrontError(sqlstate.CONNECTION_FAILURE, "the server closed the connection during login")
            else:
                raise FrontError(sqlstate.FEATURE_NOT_SUPPORTED,
                                 f"the target asks for an authentication method botwarden does not speak "
                                 f"({type(ev).__name__})")

    def _remap_key(self, pid: int, secret: int) -> bytes:
        """BackendKeyData with the real pid and our own secret (the real one stays here)."""
        ours = struct.unpack("!i", os.urandom(4))[0]
        if self.cancel_key is not None:
            self.front.cancel_keys.pop(self.cancel_key, None)
        self.cancel_key = (pid, ours)
        self.backend_pid = pid
        self.front.cancel_keys[self.cancel_key] = (secret, self.settings.upstream_host, self.settings.upstream_port)
        return m.BackendKeyData(pid, ours).encode()

    # ================================================================== bot -> server
    def _decide(self, sql: str, phase: str, *, probe: bool = False) -> Verdict:
        # No cache here: a verdict can depend on session state (PREPARE names, search_path) and
        # on time windows; the policy engine caches what is safe to cache.
        try:
            if probe:  # a possible reading, not the one the session state follows
                return self.services.decide_sql(self.grant, self.settings.target, sql, phase, probe=True)
            return self.services.decide_sql(self.grant, self.settings.target, sql, phase)
        except Exception:
            log.exception("policy failed; statement refused")
            return Verdict("block", None, "the policy engine failed on this statement")

    def _read_and_decide(self, raw: bytes, phase: str) -> tuple[str, Verdict, m.ErrorResponse | None]:
        """(text as the server reads it, verdict, the refusal to send when blocked or None for
        the usual one). The hot path is the first two lines."""
        if self._reading is DEFAULT_READING and ((raw.isascii() and b"\\" not in raw) or self._settled()):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                return text, self._decide(text, phase), None
        try:
            text = read_statement(raw, self._reading)
        except UnreadableStatement as e:
            return self._unreadable(raw, e)
        verdict = self._decide(text, phase)
        if verdict.action == "block" or self._settled() or (raw.isascii() and b"\\" not in raw):
            return text, verdict, None
        return text, self._other_readings(raw, text, verdict, phase), None

    def _settled(self) -> bool:
        """Nothing this session sent is still unanswered: the settings the server last reported
        are the ones it will read the next statement with. (A SET, set_config() or ROLLBACK in
        flight changes them for the next message before its ParameterStatus arrives.)"""
        return not self._ext_open and not self.busy_upstream

    def _other_readings(self, raw: bytes, text: str, verdict: Verdict, phase: str) -> Verdict:
        """While a request in flight may still change client_encoding or standard_conforming_strings,
        the statement runs only if every reading the server might apply is decided alike."""
        seen = {text}
        for reading in possible_readings(raw, self._reading):
            try:
                other = read_statement(raw, reading)
            except UnreadableStatement:
                continue  # the server would refuse it under that reading: nothing runs
            if other in seen:
                continue
            seen.add(other)
            alt = self._decide(other, phase, probe=True)
            if alt.action != verdict.action or alt.mask_rules != verdict.mask_rules:
                return Verdict("block", "botwarden:reading",
                               f"a request still in flight may change how the server reads this statement "
                               f"({reading.describe()} reads it differently, and it would be "
                               f"{'allowed' if alt.action == 'allow' else alt.action + 'ed' if alt.action != 'block' else 'blocked'}"
                               f"); send it after the previous one completes", details=verdict.details)
        return verdict

    def _unreadable(self, raw: bytes, e: UnreadableStatement) -> tuple[str, Verdict, m.ErrorResponse]:
        text = raw.decode("utf-8", "replace")  # what the audit keeps: never a lone surrogate
        if e.syntax:
            return text, Verdict("block", None, f"botwarden blocks statements it cannot analyze: {e.message}"), \
                _syntax_error(e.message, e.position)
        return text, Verdict("block", "botwarden:reading", e.message), \
            error_response(e.sqlstate, e.message, detail=f"botwarden reads statements as the server does "
                                                         f"({self._reading.describe()})")

    def client_data(self, data: bytes) -> None:
        if self._held:
            # A request waits (approval, strict audit, a FunctionCall's lookup): what the bot sends
            # meanwhile queues in arrival order, and past HELD_BUFFER_LIMIT the bot is not read.
            self._cmore.append(data)
            self._cmore_len += len(data)
            self._limit_held()
            return
        buf = self._cbuf
        if buf:
            # bytearray: appending is amortised O(1) while a large message arrives in pieces
            buf += data
        else:
            buf = data
        self._consume(buf, 0, None)

    def _limit_held(self) -> None:
        if (len(self._cbuf) - self._cpos + self._cmore_len > HELD_BUFFER_LIMIT
                and "held" not in self._paused):
            self.flow("held", True)

    def _release_client(self) -> None:
        """The held request went on (or was refused): relay what the bot sent meanwhile, from
        where it stopped, then read the bot again unless another request holds in turn."""
        if self.closed:
            return
        self._held = False
        buf, pos, more = self._cbuf, self._cpos, self._cmore
        self._cbuf, self._cpos, self._cmore, self._cmore_len = b"", 0, [], 0
        self._consume(buf, pos, more)
        if not self._held and "held" in self._paused:
            self.flow("held", False)

    def _consume(self, buf, pos: int, more: list | None) -> None:
        """Relay the bot's messages in buf from pos on, then the chunks in ``more``. A hold keeps
        the buffer and the offset (no copy of the rest: a pipeline of many held requests would
        make that quadratic)."""
        handlers = self._client_handlers
        max_size = self.settings.max_message_size
        while True:
            out: list = []
            run = pos   # start of the pending run of unchanged bytes
            n = len(buf)
            # Framing inline (see framing.split_messages): this loop is the hot path.
            try:
                while n - pos >= 5:
                    (length,) = _unpack_len(buf, pos + 1)
                    if length < 4 or length > max_size:
                        check_length(buf[pos], length, max_size)
                    e = pos + 1 + length
                    if e > n:
                        break
                    h = handlers[buf[pos]]
                    if h is not None:
                        r = h(buf, pos, e)
                        if r is not None:
                            if run < pos:
                                out.append(buf[run:pos])
                            if r is _HOLD:
                                self._cbuf, self._cpos = buf, e
                                if more:
                                    self._cmore[:0] = more
                                    self._cmore_len += sum(map(len, more))
                                self._held = True
                                self._message_timer.cancel()  # no timeout of ours runs while a request is held
                                self._flush_out(out)
                                self._limit_held()
                                return
                            if r:
                                out.append(r)
                            run = e
                            if self.closed:
                                self._flush_out(out)
                                return
                    pos = e
            except PgProtocolError as err:
                self._flush_out(out)
                self.fatal(err.sqlstate, err.message)
                return
            if not out:
                if run == 0 and pos == n:
                    self._to_server(buf)
                elif run < pos:
                    self._to_server(buf[run:pos])
            else:
                if run < pos:
                    out.append(buf[run:pos])
                self._flush_out(out)
            if more:
                # What arrived while a request was held: after the partial message left here.
                tail = bytearray(memoryview(buf)[pos:])
                for chunk in more:
                    tail += chunk
                buf, pos, more = tail, 0, None
                continue
            break
        # A new object each time bytes were handed on (they are never mutated once the transport
        # has them); a message still arriving keeps growing in place.
        if pos == n:
            self._cbuf = b""
        elif pos == 0 and isinstance(buf, bytearray):
            self._cbuf = buf
        else:
            self._cbuf = bytearray(memoryview(buf)[pos:])
        self._message_timer.update(pos < n)  # a half-sent message may not hold the session forever

    def _flush_out(self, out: list) -> None:
        if out:
            self._to_server(b"".join(out))

    def _blocked_sql(self, req: _Request, refusal: m.ErrorResponse) -> str:
        # A statement that fails in the server's parser: the server then recovers exactly as
        # from any error (transaction state, discard-until-Sync) and we swap in our refusal.
        req.nonce = "botwarden_blocked_" + os.urandom(8).hex()
        req.refusal = refusal
        req.error = refusal.message
        req.sqlstate = refusal.sqlstate
        return req.nonce

    @staticmethod
    def _block_refusal(verdict: Verdict, text: str = "") -> m.ErrorResponse:
        if verdict.rule is None and verdict.details and verdict.details[0].kind == "UNPARSED":
            found = syntax_error(text)  # the server would refuse it too: answer as it would
            if found is not None:
                return _syntax_error(*found, why=verdict.reason)
        rule = f"rule {verdict.rule!r}" if verdict.rule else "the target's default policy"
        return error_response(sqlstate.INSUFFICIENT_PRIVILEGE, f"statement blocked by {rule}",
                              detail=verdict.reason or None)

    def _c_query(self, buf, s: int, e: int):
        # Inline decode: this runs for every simple-protocol statement.
        if buf[e - 1] != 0 or buf.find(b"\x00", s + 5, e - 1) >= 0:
            raise RemoteProtocolError("Query must carry exactly one NUL-terminated string")
        if self._skip_until_sync:
            return None  # inside a failed batch the server discards a Query too, up to Sync
        sql, v, refusal = self._read_and_decide(bytes(buf[s + 5:e - 1]), "query")
        req = _Request("query", sql, v)
        if v.row_guards:
            r = self._row_guard(req, bytes(buf[s:e]), bytes(buf[s + 5:e - 1]), (), None, extended=False)
            if r is not None:
                return r
            v = req.verdict
        action = v.action
        if action == "allow" or action == "mask":
            if action == "mask":
                self._handlers[68] = self._on_data_row
            if self._audit_durable is not None and self._wait_for_record(req, bytes(buf[s:e]), (OP_QUERY, req)):
                return _HOLD
            self._ops.append((OP_QUERY, req))
            return None
        if action == "block":
            nonce = self._blocked_sql(req, refusal or self._block_refusal(v, sql))
            self._ops.append((OP_QUERY, req))
            return m.Query(nonce).encode()
        self._start_hold(req, bytes(buf[s:e]), lambda: (OP_QUERY, req),
                         lambda nonce: m.Query(nonce).encode())
        return _HOLD

    def _c_parse(self, buf, s: int, e: int):
        body = bytes(buf[s + 5:e])
        msg = m.Parse.decode(body)
        if self._skip_until_sync:
            # The server discards this after our refusal: no decision, no response to expect.
            self._ext_open = True
            return None
        start = body.index(0) + 1
        query, v, refusal = self._read_and_decide(body[start:body.index(0, start)], "parse")
        ext_was_open, self._ext_open = self._ext_open, True
        stmt = _Statement(query, v, msg.name)
        if v.row_guards:
            stmt.guard = (body[start:body.index(0, start)], msg.param_types)
        self._statements[msg.name] = stmt
        action = v.action
        if action == "allow" or action == "mask":
            self._ops.append((OP_PARSE, None, stmt))
            return None
        req = _Request("parse", query, v)
        if action == "block":
            nonce = self._blocked_sql(req, refusal or self._block_refusal(v, query))
            self._skip_until_sync = True
            self._ops.append((OP_PARSE, req, stmt))
            return m.Parse(msg.name, nonce, ()).encode()

        def on_denied(nonce: str) -> bytes:
            self._skip_until_sync = True
            return m.Parse(msg.name, nonce, ()).encode()

        def op():
            # The held Parse is audited as its own request (the approval names its id); the
            # Executes of the prepared statement are audited as usual.
            return (OP_PARSE, req, stmt)

        self._ext_open = ext_was_open  # the held Parse is not forwarded yet
        self._start_hold(req, bytes(buf[s:e]), op, on_denied)
        return _HOLD

    def _c_bind(self, buf, s: int, e: int):
        if self._skip_until_sync:
            return None
        portal_name, stmt_name, params, result_formats = _bind_fast(buf, s, e)
        stmt = self._statements.get(stmt_name, _UNKNOWN_STATEMENT)
        portal = _Portal(stmt, params, result_formats)
        if stmt.guard is not None:
            portal.bind = bytes(buf[s + 5:e])
        self._portals[portal_name] = portal
        self._ext_open = True
        self._ops.append((OP_BIND,))
        if stmt.verdict.action == "mask":
            # Masking needs the result columns with their formats: ask for them, keep the answer.
            self._handlers[68] = self._on_data_row
            self._ops.append((OP_DESCRIBE, "P", portal, True))
            return bytes(buf[s:e]) + m.Describe("P", portal_name).encode()
        return None

    def _c_describe(self, buf, s: int, e: int):
        if self._skip_until_sync:
            return None
        msg = m.Describe.decode(bytes(buf[s + 5:e]))
        target = (self._statements.get(msg.name) if msg.kind == "S" else self._portals.get(msg.name))
        self._ext_open = True
        self._ops.append((OP_DESCRIBE, msg.kind, target, False))
        return None

    def _c_execute(self, buf, s: int, e: int):
        if self._skip_until_sync:
            return None
        name, pos = _cstring_at(buf, s + 5, e)
        if pos + 4 != e:
            raise RemoteProtocolError("Execute body length does not match its fields")
        portal = self._portals.get(name)
        stmt = portal.statement if portal is not None else _UNKNOWN_STATEMENT
        req = _Request("execute", stmt.text, stmt.verdict, portal.params if portal is not None else None)
        self._ext_open = True
        if stmt.guard is not None and portal is not None:
            original = bytes(buf[s:e])
            r = self._row_guard(req, original, stmt.guard[0], stmt.guard[1], portal.bind, extended=True)
            if r is not None:
                return r
            if req.verdict.action == "block":
                nonce = self._blocked_sql(req, self._block_refusal(req.verdict))
                self._ops.append((OP_EXECUTE, portal, req))
                return m.Execute(nonce).encode()  # no such portal: the server fails, we answer
            if req.verdict.action == "approve":
                self._start_hold(req, original, lambda: (OP_EXECUTE, portal, req),
                                 lambda nonce: m.Execute(nonce).encode())
                return _HOLD
        if self._audit_durable is not None and self._wait_for_record(req, bytes(buf[s:e]), (OP_EXECUTE, portal, req)):
            return _HOLD
        self._ops.append((OP_EXECUTE, portal, req))
        return None

    def _name_statement(self, name: str, verdict: Verdict | None) -> None:
        """A named protocol-level statement is also SQL's: ``EXECUTE name`` runs it."""
        if name:
            remember = getattr(self.services, "name_statement", None)
            if remember is not None:
                remember(self.grant, name, verdict)

    def _c_close(self, buf, s: int, e: int):
        if self._skip_until_sync:
            return None
        msg = m.Close.decode(bytes(buf[s + 5:e]))
        (self._statements if msg.kind == "S" else self._portals).pop(msg.name, None)
        if msg.kind == "S":
            self._name_statement(msg.name, None)
        self._ext_open = True
        self._ops.append((OP_CLOSE,))
        return None

    def _c_sync(self, buf, s: int, e: int):
        self._skip_until_sync = False
        self._ext_open = False
        self._ops.append((OP_SYNC,))
        return None

    def _c_function_call(self, buf, s: int, e: int):
        """A FunctionCall (libpq's large-object API) is decided as ``SELECT schema.f($1, ...)`` of
        the function its OID names, so function rules apply to it as to a SELECT. An OID not yet
        resolved is looked up on this very session first (pg_proc), then the call is decided."""
        msg = m.FunctionCall.decode(bytes(buf[s + 5:e]))
        if self._skip_until_sync:
            return None  # discarded by the server inside a failed batch, like a Query
        front = self.front
        if front._function_names_for is not self.services:  # a reload: resolve again
            front.function_names.clear()
            front._function_names_for = self.services
        name = front.function_names.get(msg.oid)
        if name is None and msg.oid not in self._unknown_oids:
            if self._settled() and self.txn_status != "E" and not self._lookup_active:
                self._lookup_function(msg.oid, bytes(buf[s:e]))
                return _HOLD
            v = Verdict("block", "botwarden:function_call",
                        f"FunctionCall of OID {msg.oid}, which botwarden could not resolve to a function now "
                        "(send it when no other request of this session is in flight)")
            return self._refuse_function_call(_Request("function_call", f"-- FunctionCall oid {msg.oid}", v), v)
        if name is None:  # pg_proc has no such function: the server refuses it
            text = f"-- FunctionCall oid {msg.oid} (no such function)"
            req = _Request("function_call", text, Verdict("allow", None, "no function has this OID: the server refuses it"))
        else:
            args = ", ".join(f"${i + 1}" for i in range(len(msg.args)))
            text = f"SELECT {_quote_ident(name[0])}.{_quote_ident(name[1])}({args})"
            v = self._decide(text, "function_call")
            req = _Request("function_call", text, v, _render_params(msg))
            if v.action == "block":
                return self._refuse_function_call(req, v)
            if v.action == "approve":
                self._start_hold(req, bytes(buf[s:e]), lambda: (OP_FUNCTION, req),
                                 lambda nonce: m.Query(nonce).encode())
                return _HOLD
        if self._audit_durable is not None and self._wait_for_record(req, bytes(buf[s:e]), (OP_FUNCTION, req)):
            return _HOLD  # strict audit: a function call runs once its record is durable, like a statement
        self._ops.append((OP_FUNCTION, req))
        return None

    def _refuse_function_call(self, req: _Request, v: Verdict) -> bytes:
        nonce = self._blocked_sql(req, self._block_refusal(v))
        self._ops.append((OP_FUNCTION, req))
        return m.Query(nonce).encode()

    def _lookup_function(self, oid: int, original: bytes) -> None:
        """Ask the server which function ``oid`` is, on this session (nothing else is in flight,
        so the answer is ours alone), then process the held FunctionCall again."""
        self._lookup_active = True
        self._lookup_found: tuple[str, str] | None = None
        saved = {c: self._handlers[c] for c in _LOOKUP_REPLIES}
        self._lookup_saved = saved
        for c in _LOOKUP_REPLIES:
            self._handlers[c] = self._on_lookup_reply
        self._lookup_oid = oid
        self._lookup_original = original
        self._to_server(m.Query(
            "SELECT n.nspname, p.proname FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n "
            f"ON n.oid = p.pronamespace WHERE p.oid = {int(oid)}").encode())

    def _on_lookup_reply(self, buf, s, e):
        kind = buf[s]
        if kind == 68:  # DataRow: (nspname, proname)
            values = _row_values(buf, s, e)
            if len(values) == 2 and None not in values:
                self._lookup_found = (bytes(values[0]).decode("utf-8", "replace"),
                                      bytes(values[1]).decode("utf-8", "replace"))
        elif kind == 90:  # ReadyForQuery: the lookup is over
            self.txn_status = chr(buf[s + 5])
            for c, h in self._lookup_saved.items():
                self._handlers[c] = h
            self._lookup_active = False
            if self._lookup_found is not None:
                self.front.function_names[self._lookup_oid] = self._lookup_found
            else:
                self._unknown_oids.add(self._lookup_oid)
            self._requeue(self._lookup_original)  # decided again, now that its name is known
        return b""  # the bot never asked for this

    def _c_terminate(self, buf, s: int, e: int):
        self._terminated = True
        return None

    # ------------------------------------------------------------------ affected-rows guard
    def _row_guard(self, req: _Request, original: bytes, query: bytes, param_types: tuple[int, ...],
                   bind: bytes | None, *, extended: bool):
        """A write some ``max_rows`` rule waits on: ask the server for the planner's estimate
        first (EXPLAIN on this session, its own statement and portal, the bot's parameters), then
        process the message again with it. None: decided now (req.verdict updated)."""
        found = self._estimate
        if found is not None and found[0] == original:
            self._estimate = None
            req.verdict = with_row_estimate(req.verdict, found[1], found[2])
            return None
        if self._lookup_active or self._estimating is not None or (not extended and not self._settled()):
            req.verdict = with_row_estimate(req.verdict, None, "another request of this session was still in "
                                                               "flight; send the write on its own")
            return None
        # Parse by hand: the statement stays in the bytes the bot sent (its client_encoding).
        body = (_ESTIMATE.encode() + b"\0" + _EXPLAIN_PREFIX + query + b"\0" + _H16.pack(len(param_types))
                + b"".join(struct.pack("!I", t) for t in param_types))
        b = m.Bind.decode(bind) if bind is not None else m.Bind(_ESTIMATE, _ESTIMATE)
        explain = b"P" + struct.pack("!I", len(body) + 4) + body + m.Bind(_ESTIMATE, _ESTIMATE, b.param_formats, b.params, ()).encode() \
            + m.Execute(_ESTIMATE).encode() + m.Close("S", _ESTIMATE).encode() + m.Close("P", _ESTIMATE).encode() \
            + (_FLUSH if extended else _SYNC)
        self._estimating = (original, extended, req)
        # After the messages before this one in the bot's buffer have gone out (call_soon: the
        # handler's caller sends them once it sees _HOLD).
        asyncio.get_running_loop().call_soon(self._ask_estimate, explain)
        return _HOLD

    def _ask_estimate(self, explain: bytes) -> None:
        if self.closed:
            return
        self._to_server(explain)
        if self._estimating[1] and self._ops:
            # The bot's earlier messages of this batch are not answered yet (our Flush has them
            # answered now): the replies are ours from the moment the last of them is in.
            self._after_drain = self._await_estimate
        else:
            self._await_estimate()

    def _await_estimate(self) -> None:
        if self._skip_until_sync:
            # The batch failed before our EXPLAIN: the server discarded it, and discards the held
            # message too; nothing to estimate.
            original = self._estimating[0]
            self._estimating = None
            self._requeue(original)
            return
        self._estimate_saved = {c: self._handlers[c] for c in _ESTIMATE_REPLIES}
        for c in _ESTIMATE_REPLIES:
            self._handlers[c] = self._on_estimate_reply
        self._estimate_plan: str | None = None
        self._estimate_error: bytes | None = None
        self._estimate_closes = 0

    def _on_estimate_reply(self, buf, s, e):
        kind = buf[s]
        extended = self._estimating[1]
        if kind == 68:  # DataRow: the plan as JSON text
            values = _row_values(buf, s, e)
            if values and values[0] is not None:
                self._estimate_plan = bytes(values[0]).decode("utf-8", "replace")
        elif kind == 69:  # ErrorResponse: the statement would fail the same way (EXPLAIN plans it)
            self._estimate_error = _shift_position(bytes(buf[s:e]), len(_EXPLAIN_PREFIX))
            if extended:  # the server now discards the bot's batch up to its Sync, as for the statement
                self._end_estimate()
            return self._estimate_error
        elif kind == 51:  # CloseComplete: the second one ends the extended variant
            self._estimate_closes += 1
            if extended and self._estimate_closes == 2:
                self._end_estimate()
        elif kind == 90:  # ReadyForQuery (simple variant, after our Sync)
            self.txn_status = chr(buf[s + 5])
            failed = self._estimate_error is not None
            self._end_estimate()
            return None if failed else b""  # after an error: the bot's Query ends with this one
        return b""  # the bot never asked for this

    def _end_estimate(self) -> None:
        for c, h in self._estimate_saved.items():
            self._handlers[c] = h
        original, extended, req = self._estimating
        self._estimating = None
        if self._estimate_error is not None:
            # Answered as the statement would have been; it was not sent.
            err = m.ErrorResponse.decode(self._estimate_error[5:])
            req.error, req.sqlstate = err.message, err.sqlstate
            if extended:
                self._skip_until_sync = True
            self._finish(req)
            asyncio.get_running_loop().call_soon(self._release_client)
            return
        try:
            rows, why = plan_rows(self._estimate_plan or ""), ""
        except (ValueError, KeyError, TypeError, IndexError) as e:
            rows, why = None, f"the server's plan could not be read ({type(e).__name__})"
        self._estimate = (original, rows, why)
        self._requeue(original)

    def _requeue(self, original: bytes) -> None:
        """Process a held message again (after a lookup or an estimate), before what followed it."""
        self._cbuf = original + bytes(memoryview(self._cbuf)[self._cpos:])
        self._cpos = 0
        asyncio.get_running_loop().call_soon(self._release_client)

    # ------------------------------------------------------------------ approvals
    def _start_hold(self, req: _Request, original: bytes, make_op: Callable[[], tuple],
                    on_denied: Callable[[str], bytes]) -> None:
        self._held_req = req
        self._hold_task = self.front.spawn(self._hold(req, original, make_op, on_denied), "pg-hold")
        self.front.spawn(self._keep_alive_while_held(self._hold_task), "pg-hold-keepalive")

    async def _keep_alive_while_held(self, hold: asyncio.Task) -> None:
        """Inside a transaction the server counts the wait as idle time: send a Sync now and
        then (a no-op inside a BEGIN block, answered by a ReadyForQuery we swallow) so its
        idle_in_transaction_session_timeout does not end the session while an operator decides.
        Only when nothing else is in flight and no extended-protocol batch is open, where a Sync
        would change the batch's meaning."""
        while not hold.done():
            await asyncio.sleep(HOLD_KEEPALIVE_S)
            if self.closed or hold.done() or not self._held:
                return
            if not self._ops and not self._ext_open and self.txn_status in ("T", "E"):
                self._ops.append((OP_KEEPALIVE,))
                self.write_server(_SYNC)

    async def _hold(self, req: _Request, original: bytes, make_op, on_denied) -> None:
        """The statement waits for an operator; reading from this bot pauses only if it keeps
        sending (HELD_BUFFER_LIMIT). No timeout of ours runs meanwhile: the approval's own
        expiry ends the wait, and a bot that hangs up withdraws the request (task cancelled)."""
        loop = asyncio.get_running_loop()
        thread = threading.get_ident()
        if req.request_id is None:
            req.request_id = _request_id()  # the approval record names the request

        def notify(approval_id: str) -> None:
            notice = notice_response(
                f"statement held for approval {approval_id}"
                + (f" (rule {req.verdict.rule!r})" if req.verdict.rule else "") + "; waiting for an operator",
                hint=f"an operator decides with: botwarden approvals approve|deny {approval_id}").encode()
            if threading.get_ident() == thread:
                self._to_bot(notice)
            else:
                loop.call_soon_threadsafe(self.write_bot, notice)

        self._withdrawn = False
        self._hold_wait = asyncio.ensure_future(self.services.hold(
            self.grant, self.settings.target, req.text, req.verdict, notify, request_id=req.request_id))
        try:
            outcome = await self._hold_wait
        except asyncio.CancelledError:
            if self.closed or not self._withdrawn:
                raise
            outcome = HoldOutcome(False, "", "the held statement was withdrawn before anyone decided", None,
                                  "withdrawn")
        except Exception as e:
            log.exception("approval hold failed; statement denied")
            outcome = HoldOutcome(False, "", f"the approval could not be held ({type(e).__name__})")
        if self.closed:
            return
        discarded = self._skip_until_sync  # the batch failed while a human decided
        if outcome.approved:
            req.decision = "approve"
            req.reason = outcome.reason or req.reason
            out = original
            if req.kind == "query" and req.verdict.action == "mask":
                self._handlers[68] = self._on_data_row
            # strict audit: an approved statement too runs only once its record is durable (a held
            # Parse runs nothing: its Executes wait for theirs).
            wait = self._record_start(req) if self._audit_durable is not None and req.kind != "parse" else None
            if wait is not None:
                try:
                    await wait
                except Exception as e:
                    self._refuse_unrecorded(req, e)
                    return
                if self.closed:
                    return
        else:
            req.decision = "deny"
            req.reason = outcome.reason or "denied"
            out = on_denied(self._blocked_sql(req, _hold_refusal(outcome)))
        self._held_req = None
        self._forward_held(req, out, make_op(), discarded)
        self._release_client()

    # ------------------------------------------------------------------ strict audit
    def _record_start(self, req: _Request):
        """The request's start record, submitted to be durable: a future, or None (no wait)."""
        if req.request_id is None:
            req.request_id = _request_id()  # its requests row carries the same id
        return self._audit_durable("request_start", {
            "request_id": req.request_id, "session_id": self.session_id,
            "ts": datetime.fromtimestamp(req.t0, timezone.utc), "protocol": PROTOCOL, "kind": req.kind,
            "text": req.text, "params": req.params, "decision": req.decision or req.verdict.action,
            "rule": req.verdict.rule}, req.verdict)

    def _wait_for_record(self, req: _Request, original: bytes, op: tuple) -> bool:
        """audit.mode = "strict": hold the message (as for an approval: the bytes after it wait in
        _cbuf) until the audit process has the request's record, then forward it. False: no wait."""
        try:
            wait = self._record_start(req)
        except Exception as e:  # the record was refused (malformed, store closed)
            log.exception("the audit store refused a request's start record")
            wait = asyncio.get_running_loop().create_future()
            wait.set_exception(e)
        if wait is None:
            return False
        wait.add_done_callback(lambda fut: self._forward_recorded(fut, req, original, op))
        return True

    def _forward_recorded(self, fut: asyncio.Future, req: _Request, original: bytes, op: tuple) -> None:
        if self.closed:
            return
        if fut.cancelled() or fut.exception() is not None:
            self._refuse_unrecorded(req, fut.exception() if not fut.cancelled() else None)
            return
        self._forward_held(req, original, op, self._skip_until_sync)
        self._release_client()

    def _forward_held(self, req: _Request, out: bytes, op: tuple, discarded: bool) -> None:
        """Send a request that waited (approval, strict audit). If the batch it belongs to failed
        meanwhile (``discarded``), the server discards it: recorded as not run, no answer to expect."""
        self._to_server(out)
        if discarded:
            req.error = req.error or "not run: an earlier message in the batch failed"
            self._finish(req)
        else:
            self._ops.append(op)

    def _refuse_unrecorded(self, req: _Request, error: BaseException | None) -> None:
        """Fail closed: a request whose record could not be made durable never runs."""
        log.error("a request's record could not be made durable; the request is refused and the session ends",
                  exc_info=error)
        why = f"the audit store could not record the statement ({error or 'cancelled'}); it was not run"
        req.error, req.sqlstate = why, sqlstate.CANNOT_CONNECT_NOW
        self._finish(req)
        self.fatal(sqlstate.CANNOT_CONNECT_NOW, f"botwarden ended the session: {why}")

    # ================================================================== server -> bot
    def server_data(self, data: bytes) -> None:
        # Requests that complete in this read are audited after the bytes went to the bot:
        # the bot is not kept waiting for our bookkeeping.
        self._deferred = deferred = []
        try:
            self._relay_server_data(data)
        finally:
            self._deferred = None
            for req in deferred:
                self._emit(req)

    def _relay_server_data(self, data: bytes) -> None:
        left = self._stream_left
        if left:
            if len(data) <= left:
                self._stream_left = left - len(data)
                self._to_bot(data)
                return
            self._to_bot(data[:left])
            data = data[left:]
            self._stream_left = 0
        if self._sbuf:
            self._sbuf += data
            buf = self._sbuf
        else:
            buf = data
        handlers = self._handlers
        out: list = []
        run = 0
        pos = 0
        n = len(buf)
        try:
            while n - pos >= 5:
                (length,) = _unpack_len(buf, pos + 1)
                if length < 4:
                    check_length(buf[pos], length, SERVER_MAX_MESSAGE)
                e = pos + 1 + length
                if e > n:
                    break
                h = handlers[buf[pos]]
                if h is not None:
                    r = h(buf, pos, e)
                    if r is not None:
                        if run < pos:
                            out.append(buf[run:pos])
                        if r:
                            out.append(r)
                        run = e
                    if self._after_drain is not None and not self._ops:
                        # The bot's last pending answer: what follows is ours (handlers swap here).
                        then, self._after_drain = self._after_drain, None
                        then()
                pos = e
        except PgProtocolError as err:
            self.fatal(sqlstate.PROTOCOL_VIOLATION, f"the server sent an invalid message ({err.message})")
            return
        if pos < n and n - pos >= STREAM_THRESHOLD and handlers[buf[pos]] is None:
            # A big message we do not inspect: send what we have, stream the rest as it comes.
            (length,) = _unpack_len(buf, pos + 1)
            self._stream_left = length + 1 - (n - pos)
            pos = n
        if not run:  # nothing replaced or dropped (a dropped message leaves `out` empty but moves `run`)
            if pos == n:
                self._to_bot(buf)
            elif pos:
                self._to_bot(buf[:pos])
        else:
            if run < pos:
                out.append(buf[run:pos])
            self._to_bot(b"".join(out))
        self._sbuf = bytearray(memoryview(buf)[pos:]) if pos < n else b""

    def _pop(self, kind: int):
        ops = self._ops
        if ops and ops[0][0] == kind:
            return ops.popleft()
        log.debug("server response out of step with pending operations (expected op %s, have %s)", kind,
                  ops[0][0] if ops else None)
        return None

    def _on_parse_complete(self, buf, s, e):
        op = self._pop(OP_PARSE)
        if op is not None:
            if op[2] is not None and op[2].name:
                # Known to SQL EXECUTE once the server has it (a duplicate name fails and keeps
                # the first statement, so nothing is named before ParseComplete).
                self._name_statement(op[2].name, op[2].verdict)
            if op[1] is not None:
                self._finish(op[1])  # a Parse held for approval and approved: its own audited request

    def _on_bind_complete(self, buf, s, e):
        self._pop(OP_BIND)

    def _on_close_complete(self, buf, s, e):
        self._pop(OP_CLOSE)

    def _on_row_description(self, buf, s, e):
        ops = self._ops
        if not ops:
            return None
        head = ops[0]
        kind = head[0]
        if kind == OP_QUERY:
            req = head[1]
            if req.verdict.action == "mask" and req.decision != "deny":
                self._end_plan()
                desc = m.RowDescription.decode(bytes(buf[s + 5:e]))
                self._plan = self._make_plan(req.verdict, _columns(desc)) or _NO_PLAN
                self._plan_req = req
            return None
        if kind == OP_DESCRIBE:
            ops.popleft()
            _, dkind, target, hidden = head
            if target is not None and target is not _UNKNOWN_STATEMENT:
                verdict = target.verdict if dkind == "S" else target.statement.verdict
                if verdict.action == "mask":
                    desc = m.RowDescription.decode(bytes(buf[s + 5:e]))
                    target.columns = _columns(desc)
            return b"" if hidden else None
        return None

    def _on_no_data(self, buf, s, e):
        ops = self._ops
        if ops and ops[0][0] == OP_DESCRIBE:
            head = ops.popleft()
            if head[3]:
                return b""
        return None

    def _make_plan(self, verdict: Verdict, columns: list[ColumnDesc]):
        try:
            return self.services.mask_plan(self.grant, self.settings.target, verdict, columns)
        except Exception:
            log.exception("mask_plan failed; every column of this result is masked")
            return ColumnMaskPlan(columns, range(len(columns)))

    def _end_plan(self) -> None:
        plan, req = self._plan, self._plan_req
        if plan is not None and plan is not _NO_PLAN and req is not None and plan.counts:
            masked = req.masked or {}
            for k, n in plan.counts.items():
                masked[k] = masked.get(k, 0) + n
            req.masked = masked
            plan.counts = {}
        self._plan = None
        self._plan_req = None

    def _on_data_row(self, buf, s, e):
        plan = self._plan
        if plan is _NO_PLAN:
            return None
        if plan is None:
            ops = self._ops
            if not ops or ops[0][0] != OP_EXECUTE:
                return None
            portal, req = ops[0][1], ops[0][2]
            if portal is None or req.verdict.action != "mask":
                return None
            cols = portal.columns
            if cols is None:
                stmt = portal.statement
                if stmt.columns is None:
                    # Columns unknown: fail closed, mask every value in the row.
                    (n,) = struct.unpack_from("!h", buf, s + 5)
                    cols = [ColumnDesc(f"column{i + 1}", 0, 0, 0, 0) for i in range(n)]
                    plan = ColumnMaskPlan(cols, range(n))
                else:
                    cols = [ColumnDesc(c.name, c.table_oid, c.attnum, c.type_oid,
                                       portal.result_formats[i] if len(portal.result_formats) > 1
                                       else (portal.result_formats[0] if portal.result_formats else 0))
                            for i, c in enumerate(stmt.columns)]
            if plan is None:
                plan = self._make_plan(req.verdict, cols) or _NO_PLAN
            self._plan = plan
            self._plan_req = req
            if plan is _NO_PLAN:
                return None
        values = _row_values(buf, s, e)
        new, changed = plan.apply(values)
        if not changed:
            return None
        return _encode_row(new)

    def _on_command_complete(self, buf, s, e):
        ops = self._ops
        if not ops:
            return None
        head = ops[0]
        tag = buf[s + 5:e - 1]
        i = tag.rfind(b" ")
        rows = int(tag[i + 1:]) if i > 0 and tag[i + 1:].isdigit() else None
        if head[0] == OP_QUERY:
            req = head[1]
            if rows is not None:
                req.rows = (req.rows or 0) + rows
            if self._plan is not None:
                self._end_plan()
        elif head[0] == OP_EXECUTE:
            ops.popleft()
            req = head[2]
            req.rows = rows
            self._end_plan()
            self._finish(req)
        return None

    def _on_empty_query(self, buf, s, e):
        ops = self._ops
        if ops and ops[0][0] == OP_EXECUTE:
            self._end_plan()
            self._finish(ops.popleft()[2])

    def _on_portal_suspended(self, buf, s, e):
        ops = self._ops
        if ops and ops[0][0] == OP_EXECUTE:
            self._end_plan()
            self._finish(ops.popleft()[2])

    def _on_error(self, buf, s, e):
        err = m.ErrorResponse.decode(bytes(buf[s + 5:e]))
        if err.severity in ("FATAL", "PANIC"):
            self._server_fatal = True
        ops = self._ops
        self._end_plan()
        if not ops:
            return None
        head = ops[0]
        kind = head[0]
        req = None
        if kind in (OP_QUERY, OP_FUNCTION):
            req = head[1]
        elif kind == OP_EXECUTE:
            req = head[2]
        elif kind == OP_PARSE:
            req = head[1]
            if req is None and head[2] is not None:
                # An allowed statement the server refused to prepare: still one audited request.
                req = _Request("parse", head[2].text, head[2].verdict)
                ops[0] = (OP_PARSE, req, head[2])
        replacement = None
        if req is not None:
            if req.nonce is not None and req.nonce in (err.message or ""):
                replacement = req.refusal.encode()
            else:
                req.error = err.message
                req.sqlstate = err.sqlstate
        if kind not in (OP_QUERY, OP_FUNCTION):
            # Extended protocol: the server skips everything up to Sync; so do our pending ops.
            while ops and ops[0][0] != OP_SYNC:
                op = ops.popleft()
                if op[0] == OP_EXECUTE:
                    if op[2] is not req:
                        op[2].error = op[2].error or "not run: an earlier message in the batch failed"
                    self._finish(op[2])
                elif op[0] == OP_PARSE and op[1] is not None:
                    self._finish(op[1])
            if not ops and kind in _EXTENDED_OPS:
                # No Sync of the bot's went out after the failed message: the server now discards
                # everything up to that Sync, so the rest of the batch is relayed at once (nothing
                # in it runs, nothing to decide or record), as after one of our own refusals. A
                # pipelining client (asyncpg's executemany) sees the error while it is still
                # sending and stops, as it does direct.
                self._skip_until_sync = True
        return replacement

    def _on_ready(self, buf, s, e):
        self.txn_status = chr(buf[s + 5])
        ops = self._ops
        if ops and ops[0][0] == OP_KEEPALIVE:
            ops.popleft()
            return b""  # the answer to our own keep-alive Sync; the bot never asked for it
        while ops:
            op = ops.popleft()
            kind = op[0]
            if kind == OP_QUERY or kind == OP_FUNCTION:
                if self._plan is not None:
                    self._end_plan()
                self._finish(op[1])
                break
            if kind == OP_SYNC:
                break
            if kind == OP_EXECUTE:
                self._finish(op[2])
            elif kind == OP_PARSE and op[1] is not None:
                self._finish(op[1])
        if not ops:
            self._handlers[68] = None
        return None

    def _on_parameter_status(self, buf, s, e):
        msg = m.ParameterStatus.decode(bytes(buf[s + 5:e]))
        if msg.name in TRACKED_PARAMETERS:
            self._reading = self._reading.with_parameter(msg.name, msg.value)
        return None

    def _on_copy_out(self, buf, s, e):
        """COPY ... TO STDOUT of a statement to be masked: CopyData cannot be masked, so refuse it."""
        ops = self._ops
        if not ops:
            return None
        head = ops[0]
        req = head[1] if head[0] == OP_QUERY else (head[2] if head[0] == OP_EXECUTE else None)
        if req is None or req.verdict.action != "mask":
            return None
        refusal = error_response(sqlstate.INSUFFICIENT_PRIVILEGE,
                                 f"COPY TO STDOUT is refused for statements masked by rule {req.verdict.rule!r}",
                                 detail="masking rewrites result rows; COPY data cannot be masked",
                                 hint="select the rows instead")
        req.decision = "block"
        req.error, req.sqlstate = refusal.message, refusal.sqlstate
        if head[0] == OP_EXECUTE:
            # In an extended batch the server would go on with the next messages while the bot,
            # having seen an error, expects them skipped: end the session rather than diverge.
            self.fatal(sqlstate.INSUFFICIENT_PRIVILEGE, refusal.message)
            return b""
        # Swallow the copy stream up to its CommandComplete; the bot sees our error instead.
        self._handlers[ord("d")] = self._handlers[ord("c")] = _swallow
        self._handlers[ord("C")] = self._on_copy_refused_complete
        return refusal.encode()

    def _on_copy_refused_complete(self, buf, s, e):
        self._handlers[ord("d")] = self._handlers[ord("c")] = None
        self._handlers[ord("C")] = self._on_command_complete
        return b""

    def _on_backend_key(self, buf, s, e):
        msg = m.BackendKeyData.decode(bytes(buf[s + 5:e]))
        return self._remap_key(msg.pid, msg.secret)

    # ------------------------------------------------------------------ audit
    def _finish(self, req: _Request) -> None:
        deferred = self._deferred
        if deferred is not None:
            deferred.append(req)
        else:
            self._emit(req)

    def _emit(self, req: _Request) -> None:
        v = req.verdict
        self._audit("request", {
            "request_id": req.request_id or _request_id(), "session_id": self.session_id,
            "ts": datetime.fromtimestamp(req.t0, timezone.utc), "protocol": PROTOCOL,
            "kind": req.kind, "text": req.text, "params": req.params, "decision": req.decision or v.action,
            "rule": v.rule, "reason": req.reason or v.reason or None,
            "duration_ms": (_time() - req.t0) * 1000.0, "rows": req.rows, "error": req.error,
            "sqlstate": req.sqlstate, "masked": req.masked,
            "row_estimate": v.row_estimate, "row_limit": v.row_limit,
        })

    def _finish_pending(self, why: str) -> None:
        held, self._held_req = self._held_req, None
        if held is not None:
            # The bot left while its statement waited for a human: it never ran.
            held.decision = "deny"
            held.error = "session ended while the statement waited for approval"
            self._finish(held)
        self._held = False
        for op in self._ops:
            req = None
            if op[0] in (OP_QUERY, OP_FUNCTION):
                req = op[1]
            elif op[0] == OP_EXECUTE:
                req = op[2]
            elif op[0] == OP_PARSE:
                req = op[1]
            if req is not None:
                req.error = req.error or why
                self._finish(req)
        self._ops.clear()


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _hold_refusal(outcome: HoldOutcome) -> m.ErrorResponse:
    """What the bot is told when its held statement does not run: who or what decided, and why."""
    state = getattr(outcome, "state", "")
    reason = outcome.reason or "no reason given"
    detail = f"approval {outcome.approval_id}" if outcome.approval_id else None
    if state == "withdrawn":
        return error_response(sqlstate.QUERY_CANCELED, f"canceling statement due to user request ({reason})")
    if state == "cancelled_restart":
        return error_response(sqlstate.ADMIN_SHUTDOWN, f"statement not run: {reason}", detail=detail)
    if state == "denied":
        return error_response(sqlstate.INSUFFICIENT_PRIVILEGE, f"statement {reason}", detail=detail)
    if state == "expired":
        return error_response(sqlstate.INSUFFICIENT_PRIVILEGE, f"statement not approved: {reason}", detail=detail,
                              hint="nobody decided in time; send it again and ask an operator")
    return error_response(sqlstate.INSUFFICIENT_PRIVILEGE, f"statement not approved: {reason}", detail=detail)


def _syntax_error(message: str, position: int | None, *, why: str = "") -> m.ErrorResponse:
    """The server's own answer to a statement it cannot parse (42601, with the Position psql
    turns into LINE/caret), with botwarden's part in DETAIL."""
    fields = [("S", "ERROR"), ("V", "ERROR"), ("C", sqlstate.SYNTAX_ERROR), ("M", message),
              ("D", "botwarden did not send this statement to the server: it cannot be parsed"
                    + (f" ({why})" if why and message not in why else ""))]
    if position:
        fields.append(("P", str(position)))
    return m.ErrorResponse(tuple(fields))


# Replies to the front's own pg_proc lookup (RowDescription, DataRow, CommandComplete,
# ErrorResponse, NoticeResponse, ReadyForQuery): swallowed while it runs.
_LOOKUP_REPLIES = tuple(b"TDCENZ")


def _shift_position(error: bytes, by: int) -> bytes:
    """An ErrorResponse about ``EXPLAIN ... <statement>``, its Position (P) made relative to the
    statement the bot sent, so psql's caret points where it would have."""
    fields, pos, out = error[5:], 0, bytearray()
    while pos < len(fields) and fields[pos] != 0:
        end = fields.index(0, pos + 1)
        code, value = fields[pos:pos + 1], fields[pos + 1:end]
        if code == b"P" and value.isdigit() and int(value) > by:
            value = str(int(value) - by).encode()
        out += code + value + b"\0"
        pos = end + 1
    out += b"\0"
    return error[:1] + struct.pack("!I", len(out) + 4) + bytes(out)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_AUDIT_FAILURE_LOGGED: set[str] = set()
_HOLD = _Marker("HOLD")          # a client handler's answer: stop here, the statement waits for approval
_NO_PLAN = _Marker("NO_PLAN")    # the current result needs no masking


def _swallow(buf, s, e) -> bytes:
    return b""


async def _attribution(services: Any, transport) -> Any:
    """The kernel-attested origin of this socket, from the daemon's probes (None without them).
    ``services.attribute`` may be a plain or an async function."""
    attribute = getattr(services, "attribute", None)
    sock = transport.get_extra_info("socket")
    if attribute is None or sock is None:
        return None
    try:
        found = attribute(sock)
        return await found if inspect.isawaitable(found) else found
    except Exception:  # no attribution: identities that need it refuse the session
        log.exception("attribution lookup failed")
        return None
