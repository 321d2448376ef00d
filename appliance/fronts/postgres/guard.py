"""The affected-rows guard: the planner's estimate (EXPLAIN) for a write a max_rows rule waits on."""

from __future__ import annotations

import asyncio
import struct

from appliance.policy.engine import plan_rows, with_row_estimate
from appliance.protocols.postgres import messages as m

from .wire import _H16, _row_values, _shift_position
from .pending import _Request, _SYNC, _FLUSH, _HOLD


# The affected-rows guard's own statement and portal on the bot's session (closed right after).
_ESTIMATE = "botwarden_row_estimate"
_EXPLAIN_PREFIX = b"EXPLAIN (FORMAT JSON) "
_ESTIMATE_REPLIES = tuple(b"123DCENZ")


class RowGuardMixin:
    """The affected-rows guard: the planner's estimate (EXPLAIN) for a write a max_rows rule waits on
    (part of :class:`Session`)."""

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
