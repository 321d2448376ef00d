"""FunctionCall decided as the SELECT of the function its OID names (looked up in pg_proc)."""

from __future__ import annotations


from appliance.policy.types import Verdict
from appliance.protocols.postgres import messages as m

from .wire import _row_values, _render_params, _quote_ident
from .pending import _Request, OP_FUNCTION, _HOLD


class FunctionLookupMixin:
    """FunctionCall decided as the SELECT of the function its OID names (looked up in pg_proc)
    (part of :class:`Session`)."""

    def _c_function_call(self, buf, s: int, e: int):
        """A FunctionCall (libpq's large-object API) is decided as ``SELECT schema.f($1, ...)`` of
        the function its OID names, so function rules apply to it as to a SELECT. An OID not yet
        resolved is looked up on this very session first (pg_proc), then the call is decided."""
        msg = m.FunctionCall.decode(bytes(buf[s + 5:e]))
        if self._skip_until_sync:
            return None  # discarded by the server inside a failed batch, like a Query
        if self._catalog_next and self._catalog_due():
            return self._recheck_catalog(buf, s, e)
        if self._pace is not None and (held := self._pace_first(buf, s, e)) is not None:
            return held  # the audit store is far behind: wait for it, as a Query or Execute does
        name = self._function_name(msg.oid)
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
            text = _function_text(name, msg)
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

    def _function_name(self, oid: int) -> tuple[str, str] | None:
        """(schema, name) of the function ``oid`` names, if already resolved (pg_proc) since the
        last reload; None: not yet."""
        front = self.front
        if front._function_names_for is not self.services:  # a reload: resolve again
            front.function_names.clear()
            front._function_names_for = self.services
        return front.function_names.get(oid)

    def _function_call_request(self, msg: m.FunctionCall, v: Verdict) -> _Request:
        """The request a FunctionCall refused before its decision is recorded as: the SELECT of
        its function with the arguments when the OID is already resolved, else the OID."""
        name = self._function_name(msg.oid)
        if name is None:
            return _Request("function_call", f"-- FunctionCall oid {msg.oid}", v)
        return _Request("function_call", _function_text(name, msg), v, _render_params(msg))

    def _refuse_function_call(self, req: _Request, v: Verdict, refusal=None) -> bytes:
        nonce = self._blocked_sql(req, refusal or self._block_refusal(v))
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


def _function_text(name: tuple[str, str], msg: m.FunctionCall) -> str:
    """``SELECT schema.function($1, ...)``: what a FunctionCall is decided and recorded as."""
    args = ", ".join(f"${i + 1}" for i in range(len(msg.args)))
    return f"SELECT {_quote_ident(name[0])}.{_quote_ident(name[1])}({args})"


# Replies to the front's own pg_proc lookup (RowDescription, DataRow, CommandComplete,
# ErrorResponse, NoticeResponse, ReadyForQuery): swallowed while it runs.
_LOOKUP_REPLIES = tuple(b"TDCENZ")
