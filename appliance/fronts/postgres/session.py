"""One bot session: its lifecycle and the two relay directions (the hot path); the protocol's
special cases are the mixins beside it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from appliance.hotpath import skip_unhandled as _skip_unhandled
from appliance.policy.reading import DEFAULT_READING, TRACKED_PARAMETERS, Reading
from appliance.policy.sql import syntax_error
from appliance.policy.types import Verdict
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres import sqlstate
from appliance.protocols.postgres.connection import PgConnection, Role, error_response
from appliance.protocols.postgres.errors import PgProtocolError, RemoteProtocolError
from appliance.protocols.postgres.framing import check_length, unpack_len as _unpack_len

from ..admission import PartialMessageTimer
from ..session import SessionCore, format_addr as _addr, new_request_id as _request_id
from .settings import PROTOCOL, STREAM_THRESHOLD, SERVER_MAX_MESSAGE, HELD_BUFFER_LIMIT
from .wire import _cstring_at, _syntax_error
from .pending import (_time, _discard, _Request, _Statement, _Portal, OP_QUERY, OP_PARSE, OP_EXECUTE, OP_SYNC,
                      OP_FUNCTION, OP_KEEPALIVE, _EXTENDED_OPS, _HOLD, _UNKNOWN_STATEMENT)
from .transport import _Waiter, UpstreamProtocol
from .startup import StartupMixin
from .cancel import CancelKeyMixin
from .readings import ReadingMixin
from .extended import ExtendedProtocolMixin
from .masking import MaskingMixin
from .lookup import FunctionLookupMixin
from .guard import RowGuardMixin
from .holds import HoldMixin
from .recheck import CatalogRecheckMixin

# How long a bot sent a FATAL has to hang up before its connection is closed (see close).
LINGER_S = 2.0

if TYPE_CHECKING:
    from .front import PostgresFront
    from .transport import BotProtocol

log = logging.getLogger(__name__)

_NO_LIMIT = 0x7FFFFFFF  # the server side checks only that a length is at least 4 (as before)


class Session(StartupMixin, ReadingMixin, ExtendedProtocolMixin, MaskingMixin, FunctionLookupMixin,
              RowGuardMixin, HoldMixin, CancelKeyMixin, CatalogRecheckMixin):
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
        # Identity, grant, outcome, audit rows, holds and the end: what every protocol's session does.
        self.core = SessionCore(self.services, target=self.settings.target, protocol=PROTOCOL,
                                target_addr=(f"unix:{self.settings.upstream_host}" if self.settings.upstream_unix
                                             else f"{self.settings.upstream_host}:{self.settings.upstream_port}"),
                                spawn=front.spawn, terminate=self.shutdown)
        self.tls = False
        # The session's recording (recording.py): None when the target records metadata only.
        self.recorder = None
        self.bytes_in = 0
        self.bytes_out = 0
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
        self._message_timer = PartialMessageTimer(self.settings.message_timeout, self._message_timed_out,
                                                  lambda: self._held or bool(self._paused))
        self._hold_task: asyncio.Task | None = None
        self._held_req: _Request | None = None
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
        self._run_end = 0  # where a handler that took a run of messages left the server's buffer
        self._server_fatal = False
        self._terminated = False
        self._lookup_active = False   # a FunctionCall's OID is being resolved, or the catalog read, on this session
        self._recheck_task: asyncio.Task | None = None  # the catalog read again (recheck.py)
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
                      (b"E", self._on_error), (b"N", self._on_notice), (b"Z", self._on_ready),
                      (b"K", self._on_backend_key),
                      (b"H", self._on_copy_out), (b"W", self._on_copy_out),
                      (b"S", self._on_parameter_status)):
            self._handlers[ch[0]] = h
        # audit.mode = "strict": services.audit_durable(kind, record, verdict) -> future | None.
        self._audit_durable = self.core.durable
        # May a request decided earlier (a prepared statement's Execute) run now; pacing.
        self._refuse_now = self.core.refuse_now
        self._pace = self.core.audit_room
        self._paced = False   # the message processed again after its wait: decided without another
        self._pace_resume: Callable[..., None] | None = None   # ends the current wait (a cancel calls it)
        self._pace_cancelled = False   # the bot cancelled the waiting statement: refused, never run
        self._client_handlers: list[Callable | None] = [None] * 256
        for ch, h in ((b"Q", self._c_query), (b"P", self._c_parse), (b"B", self._c_bind),
                      (b"D", self._c_describe), (b"E", self._c_execute), (b"C", self._c_close),
                      (b"S", self._c_sync), (b"F", self._c_function_call), (b"X", self._c_terminate)):
            self._client_handlers[ch[0]] = h

    @property
    def busy_upstream(self) -> bool:
        """The server is working on something this session sent."""
        return any(op[0] != OP_KEEPALIVE for op in self._ops)

    @property
    def busy(self) -> bool:
        """A request is in flight (sent, its answer not complete) or held for approval."""
        return bool(self._ops) or self._held or (self._startup_task is not None and not self._startup_task.done())

    def admit(self) -> bool:
        """Count this connection against the daemon's caps on unauthenticated connections; beyond
        them it is refused at once with PostgreSQL's own 53300 (appliance/fronts/admission.py)."""
        transport = self.bot.transport
        if self.core.admit(self.front.admission, transport.get_extra_info("socket"), self._admission_closed,
                           listener=_addr(transport.get_extra_info("sockname")) or ""):
            return True
        self.closed = True
        transport.write(error_response(sqlstate.TOO_MANY_CONNECTIONS, "botwarden: too many connections waiting "
                                       "to authenticate; try again later").encode())
        transport.close()
        return False

    def _admission_closed(self, reason: str) -> None:
        self._refused_before_login(reason)
        self.fatal(sqlstate.CONNECTION_FAILURE, f"botwarden: {reason}; the connection is closed")

    def _refused_before_login(self, why: str) -> None:
        t = self.bot.transport
        self.core.refused_before_login(why, _addr(t.get_extra_info("sockname")) if t is not None else "")

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
            if self.relaying and self.recorder is not None:  # e.g. our FATAL: the bot saw it
                self.recorder.received(data)

    def write_server(self, data: bytes) -> None:
        u = self.upstream
        if u is not None and u.transport is not None and not u.transport.is_closing():
            u.transport.write(data)

    def fatal(self, code: str, message: str, *, outcome: str = "error") -> None:
        """Tell the bot why the session ends (FATAL, botwarden-made) and close it."""
        self.core.set_outcome(outcome, message)
        self.write_bot(error_response(code, message, severity="FATAL").encode())
        # Lingering only for an established session: a bot still starting up waits for our answer
        # (sends nothing meanwhile), and an unauthenticated flood must not hold descriptors longer.
        self.close(linger=self.relaying)

    def shutdown(self, code: str, message: str) -> None:
        self.fatal(code, message, outcome="terminated")

    def close(self, *, linger: bool = False) -> None:
        """End the session. ``linger``: the bot was just sent a FATAL; half-close its connection
        and read (and drop) what it still sends until it hangs up, for at most LINGER_S. Closed at
        once, a statement the bot sends meanwhile would make our kernel answer with a reset,
        which can reach the bot's driver before it read the FATAL: it would see "server closed
        the connection unexpectedly" instead of why (PostgreSQL's postmaster has the same race)."""
        if self.closed:
            return
        self.closed = True
        self._to_bot = self._to_server = _discard
        self._message_timer.cancel()
        if self._startup_task is not None and not self._startup_task.done():
            self._startup_task.cancel()
        if self._hold_task is not None and not self._hold_task.done():
            self._hold_task.cancel()
        if self._recheck_task is not None and not self._recheck_task.done():
            self._recheck_task.cancel()
        bot = self.bot.transport
        if bot is not None:
            if linger and not bot.is_closing() and bot.can_write_eof():
                bot.write_eof()   # after what is buffered, the FATAL
                asyncio.get_running_loop().call_later(LINGER_S, bot.close)
            else:
                bot.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self._finish_pending("session ended before the statement completed")
        if self.recorder is not None:
            self.recorder.flush(final=True)
        if self.cancel_key is not None:
            self.front.cancel_keys.pop(self.cancel_key, None)
        self.front.sessions.discard(self)
        self.core.end(self.bytes_in, self.bytes_out)  # session_end, admission ticket, grant released

    def bot_lost(self, exc: Exception | None) -> None:
        self.bot_waiter.wake(ConnectionResetError("bot closed the connection"))
        if self.closed:
            return
        if self._ops and self.backend_pid is not None and self.cancel_key is not None:
            # The server would run the statement to its end; ask it to stop now.
            secret, host, port = self.front.cancel_keys[self.cancel_key]
            self.front.spawn(self.front.cancel_upstream(self.backend_pid, secret, host, port),
                             "pg-cancel-on-disconnect")
            self.core.set_outcome("terminated", "bot disconnected during a statement")
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
            self.core.outcome = "terminated"
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
        if self._catalog_next and self._catalog_due():
            return self._recheck_catalog(buf, s, e)
        if self._pace is not None and (held := self._pace_first(buf, s, e)) is not None:
            return held
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

    def _pace_first(self, buf, s: int, e: int):
        """Pacing, before a Query, Execute or FunctionCall is decided: while the audit store is far
        behind, the message waits (as if held, _HOLD) until it has room or ``audit.pace_wait`` has
        passed, then is processed again from the start: decided then, and refused if the store is
        past its high water. None: go on now (no wait, or this is the message coming back from its
        wait). A CancelRequest meanwhile (:meth:`withdraw_paced`) ends the wait with 57014."""
        if self._paced:
            self._paced = False
            if self._pace_cancelled:
                self._pace_cancelled = False
                return self._cancelled_while_paced(buf, s, e)
            return None
        room = self._pace()
        if room is None:
            return None
        original = bytes(buf[s:e])

        def resume(_: Any = None) -> None:
            if self._pace_resume is not resume:
                return  # resumed already (a cancel)
            self._pace_resume = None
            if not self.closed:
                self._paced = True
                self._requeue(original)
        self._pace_resume = resume
        room.add_done_callback(resume)
        return _HOLD

    def withdraw_paced(self) -> bool:
        """The bot cancelled (CancelRequest) while its statement waited for the audit store: the
        statement goes on at once and is refused with 57014, as a cancelled statement is; it never
        reaches the server. False: nothing of this session is waiting."""
        resume = self._pace_resume
        if resume is None or self.closed:
            return False
        self._pace_cancelled = True
        resume()
        return True

    def _cancelled_while_paced(self, buf, s: int, e: int) -> bytes:
        """The refusal of a statement cancelled during its wait, put in the message's place (the
        server fails a nonce statement and recovers as from any error; we answer with 57014)."""
        v = Verdict("block", None, "the client cancelled the statement while it waited for the audit store to catch up")
        refusal = error_response(sqlstate.QUERY_CANCELED, "canceling statement due to user request",
                                 detail="botwarden held the statement while the audit store caught up; it did not run")
        kind = buf[s]
        if kind == 0x45:  # Execute
            name, _ = _cstring_at(buf, s + 5, e)
            portal = self._portals.get(name)
            stmt = portal.statement if portal is not None else _UNKNOWN_STATEMENT
            self._ext_open = True
            return self._blocked_execute(portal, _Request("execute", stmt.text, v,
                                                          portal.params if portal is not None else None), refusal)
        if kind == 0x46:  # FunctionCall
            req = self._function_call_request(m.FunctionCall.decode(bytes(buf[s + 5:e])), v)
            return self._refuse_function_call(req, v, refusal)
        req = _Request("query", bytes(buf[s + 5:e - 1]).decode("utf-8", "replace"), v)  # Query
        nonce = self._blocked_sql(req, refusal)
        self._ops.append((OP_QUERY, req))
        return m.Query(nonce).encode()

    def _c_terminate(self, buf, s: int, e: int):
        self._terminated = True
        return None

    def _requeue(self, original: bytes) -> None:
        """Process a held message again (after a lookup or an estimate), before what followed it."""
        self._cbuf = original + bytes(memoryview(self._cbuf)[self._cpos:])
        self._cpos = 0
        asyncio.get_running_loop().call_soon(self._release_client)

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
            self._stream_left = 0   # before the write: the recorder reads it (recording.py)
            self._to_bot(data[:left])
            data = data[left:]
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
                # Messages nobody inspects (DataRows of an unmasked result, ...) are stepped over
                # in one call, compiled where built: no Python per message (appliance/hotpath).
                pos = _skip_unhandled(handlers, buf, pos, _NO_LIMIT)
                if n - pos < 5:
                    break
                (length,) = _unpack_len(buf, pos + 1)
                if length < 4:
                    check_length(buf[pos], length, SERVER_MAX_MESSAGE)
                e = pos + 1 + length
                if e > n:
                    break
                h = handlers[buf[pos]]
                if h is not None:
                    r = h(buf, pos, e)
                    if self._run_end:  # the handler took a run of messages (masked DataRows)
                        e, self._run_end = self._run_end, 0
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
                if kind != OP_PARSE and req.verdict.masked:
                    # A masked statement's error may quote a masked value (MessageMasker).
                    masked = self._masked_message(req.verdict, err)
                    if masked is not None:
                        err, replacement = masked, masked.encode()
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

    def _finish(self, req: _Request) -> None:
        deferred = self._deferred
        if deferred is not None:
            # Its record goes after the server's bytes reach the bot, its number now: a daemon
            # killed in between leaves a high-water mark that counts the record as lost.
            req.request_id = rid = req.request_id or _request_id()
            req.seq = self.core.issue_seq(rid)
            deferred.append(req)
        else:
            self._emit(req)

    def _emit(self, req: _Request) -> None:
        v = req.verdict
        record = {
            "request_id": req.request_id or _request_id(), "session_id": self.core.session_id,
            "ts": datetime.fromtimestamp(req.t0, timezone.utc), "protocol": PROTOCOL,
            "kind": req.kind, "text": req.text, "params": req.params, "decision": req.decision or v.action,
            "rule": v.rule, "reason": req.reason or v.reason or None,
            "duration_ms": (_time() - req.t0) * 1000.0, "rows": req.rows, "error": req.error,
            "sqlstate": req.sqlstate, "masked": req.masked,
            "row_estimate": v.row_estimate, "row_limit": v.row_limit,
        }
        if req.seq is not None:
            record["seq"] = req.seq
        self.core.audit("request", record)

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
