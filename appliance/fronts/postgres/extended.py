"""Extended-protocol bookkeeping: Parse/Bind/Describe/Execute/Close/Sync and their answers."""

from __future__ import annotations


from appliance.policy.types import ColumnDesc, Verdict
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres.errors import RemoteProtocolError

from .wire import _cstring_at, _bind_fast
from .pending import (_Request, _Statement, _Portal, _UNKNOWN_STATEMENT, OP_PARSE, OP_BIND, OP_DESCRIBE,
                      OP_EXECUTE, OP_CLOSE, OP_SYNC, _HOLD)


class ExtendedProtocolMixin:
    """Extended-protocol bookkeeping: Parse/Bind/Describe/Execute/Close/Sync and their answers
    (part of :class:`Session`)."""

    def _c_parse(self, buf, s: int, e: int):
        body = bytes(buf[s + 5:e])
        msg = m.Parse.decode(body)
        if self._skip_until_sync:
            # The server discards this after our refusal: no decision, no response to expect.
            self._ext_open = True
            return None
        if self._catalog_next and self._catalog_due():
            return self._recheck_catalog(buf, s, e)
        start = body.index(0) + 1
        query, v, refusal = self._read_and_decide(body[start:body.index(0, start)], "parse")
        ext_was_open, self._ext_open = self._ext_open, True
        stmt = _Statement(query, v, msg.name, epoch=self._catalog_epoch)
        for st in v.details or ():
            if getattr(st, "execute_name", None) is not None or getattr(st, "fetch_name", None) is not None:
                stmt.redecide = True
                break
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
        if self._catalog_next and self._catalog_due():
            return self._recheck_catalog(buf, s, e)  # (a prepared statement's later runs too)
        portal_name, stmt_name, params, result_formats = _bind_fast(buf, s, e)
        stmt = self._statements.get(stmt_name)
        if stmt is None:
            stmt = self._prepared_in_sql(stmt_name) if stmt_name else _UNKNOWN_STATEMENT
        elif stmt.redecide:
            stmt = _Statement(stmt.text, self._decide(stmt.text, "bind"), stmt.name, by_name=True)
        elif stmt.epoch != self._catalog_epoch:
            # Parsed before the session learned what the catalog says now (a view replaced to read
            # the masked column, a function made): decided again, its refusals and holds applied
            # at each Execute as for a name prepared in SQL; its Parse's effects are not repeated.
            again = _Statement(stmt.text, self._decide(stmt.text, "bind", probe=True), stmt.name, by_name=True,
                               epoch=self._catalog_epoch)
            again.guard = stmt.guard
            stmt = self._statements[stmt_name] = again
        portal = _Portal(stmt, params, result_formats)
        if stmt.guard is not None:
            portal.bind = bytes(buf[s + 5:e])
        self._portals[portal_name] = portal
        self._ext_open = True
        self._ops.append((OP_BIND,))
        if stmt.verdict.masked:
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
        if self._pace is not None and (held := self._pace_first(buf, s, e)) is not None:
            return held
        name, pos = _cstring_at(buf, s + 5, e)
        if pos + 4 != e:
            raise RemoteProtocolError("Execute body length does not match its fields")
        portal = self._portals.get(name)
        if portal is None and name:
            portal = self._sql_cursor(name)
        stmt = portal.statement if portal is not None else _UNKNOWN_STATEMENT
        req = _Request("execute", stmt.text, stmt.verdict, portal.params if portal is not None else None)
        self._ext_open = True
        # The statement was decided at Parse; what may stop it since is checked per run: an audit
        # store that cannot take its record, a token that expired (oidc.on_expiry = "recheck").
        refused = self._refuse_now(self.core.grant) if self._refuse_now is not None else None
        if refused is not None:
            req.verdict = refused
            return self._blocked_execute(portal, req, self._block_refusal(refused))
        if stmt.by_name and stmt.verdict.action in ("block", "approve"):
            if stmt.verdict.action == "block":
                return self._blocked_execute(portal, req, self._block_refusal(stmt.verdict))
            self._start_hold(req, bytes(buf[s:e]), lambda: (OP_EXECUTE, portal, req),
                             lambda nonce: m.Execute(nonce).encode())
            return _HOLD
        if stmt.guard is not None and portal is not None:
            original = bytes(buf[s:e])
            r = self._row_guard(req, original, stmt.guard[0], stmt.guard[1], portal.bind, extended=True)
            if r is not None:
                return r
            if req.verdict.action == "block":
                return self._blocked_execute(portal, req, self._block_refusal(req.verdict))
            if req.verdict.action == "approve":
                self._start_hold(req, original, lambda: (OP_EXECUTE, portal, req),
                                 lambda nonce: m.Execute(nonce).encode())
                return _HOLD
        if self._audit_durable is not None and self._wait_for_record(req, bytes(buf[s:e]), (OP_EXECUTE, portal, req)):
            return _HOLD
        self._ops.append((OP_EXECUTE, portal, req))
        return None

    def _blocked_execute(self, portal, req: _Request, refusal) -> bytes:
        """An Execute refused in its place: a nonce portal the server fails, answered by ``refusal``."""
        nonce = self._blocked_sql(req, refusal)
        self._ops.append((OP_EXECUTE, portal, req))
        return m.Execute(nonce).encode()  # no such portal: the server fails, we answer

    def _prepared_in_sql(self, name: str) -> _Statement:
        """A statement Bind names that this session did not Parse: SQL's PREPARE shares the
        server's names, so it is decided as ``EXECUTE name`` (what the session's SQL prepared
        under it, or refused: a name botwarden never saw prepared)."""
        text = 'EXECUTE "' + name.replace('"', '""') + '"'
        stmt = _Statement(text, self._decide(text, "bind"), name, by_name=True)
        self._statements[name] = stmt
        return stmt

    def _sql_cursor(self, name: str) -> _Portal:
        """An Execute of a portal this session did not Bind: a cursor DECLAREd in SQL (SQL's
        cursors are the server's portals), decided as ``FETCH ALL FROM name`` at each Execute.
        One with a column to mask is refused: masking needs the rows' description, which an
        Execute does not bring (FETCH, as SQL, reads it masked)."""
        text = 'FETCH ALL FROM "' + name.replace('"', '""') + '"'
        verdict = self._decide(text, "execute")
        if verdict.masked and self._masks_a_column(verdict):
            verdict = Verdict("block", verdict.rule, f"{verdict.reason}; this cursor's rows are masked: read them "
                              f"with FETCH, not by executing its portal", details=verdict.details)
        portal = _Portal(_Statement(text, verdict, name, by_name=True), None, ())
        if verdict.masked:
            # A mask rule matched but masks none of its columns: its rows pass as they are. (Left
            # unknown, they were masked whole or not at all, as the DataRow handler happened to be
            # set from the request before.)
            portal.columns = ()
        return portal

    def _masks_a_column(self, verdict: Verdict) -> bool:
        """Whether a result of the verdict's statement may have a column masked, from its output
        names alone (a whole-row source, "*", may hold any column: yes)."""
        outputs = [out for st in verdict.details or () for out in getattr(st, "outputs", ())]
        if not outputs or any("*" in sources for _, sources in outputs):
            return True
        return self._make_plan(verdict, [ColumnDesc(out) for out, _ in outputs]) is not None

    def _sql_renamed(self, verdict: Verdict) -> None:
        """After SQL's DEALLOCATE or PREPARE (DISCARD ALL, DEALLOCATE ALL: every name), a name
        this session parsed may hold another statement: forget it, so that a Bind of it is
        decided by what it holds now (:meth:`_prepared_in_sql`)."""
        for st in verdict.details or ():  # per decided statement: one or two attribute reads
            gone = getattr(st, "deallocate", None)
            if gone == "*":
                for name in [k for k in self._statements if k]:
                    del self._statements[name]
            elif gone:
                self._statements.pop(gone, None)
            named = getattr(st, "prepare_name", None)
            if named is not None:
                self._statements.pop(named, None)

    def _name_statement(self, name: str, verdict: Verdict | None) -> None:
        """A named protocol-level statement is also SQL's: ``EXECUTE name`` runs it."""
        if name:
            remember = getattr(self.services, "name_statement", None)
            if remember is not None:
                remember(self.core.grant, name, verdict)

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

    def _on_no_data(self, buf, s, e):
        ops = self._ops
        if ops and ops[0][0] == OP_DESCRIBE:
            head = ops.popleft()
            if head[3]:
                return b""
        return None
