"""Statements that wait: held for approval, or for their durable record (strict audit)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Callable

from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres import sqlstate
from appliance.protocols.postgres.connection import error_response, notice_response

from ..services import HoldOutcome
from ..session import new_request_id as _request_id
from .settings import PROTOCOL, HOLD_KEEPALIVE_S
from .pending import _Request, OP_KEEPALIVE, _SYNC

log = logging.getLogger(__name__)


class HoldMixin:
    """Statements that wait: held for approval, or for their durable record (strict audit)
    (part of :class:`Session`)."""

    def withdraw_hold(self) -> bool:
        """The bot cancelled (CancelRequest, e.g. Ctrl-C in psql) while its statement is held:
        withdraw the request; the bot gets 57014 as for any cancelled statement."""
        if self.closed or not self._held:
            return False
        return self.core.withdraw_hold("the client cancelled the statement while it was held")

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
        if req.request_id is None:
            req.request_id = _request_id()  # the approval record names the request

        def notify(approval_id: str) -> None:
            notice = notice_response(
                f"statement held for approval {approval_id}"
                + (f" (rule {req.verdict.rule!r})" if req.verdict.rule else "") + "; waiting for an operator",
                hint=f"an operator decides with: botwarden approvals approve|deny {approval_id}").encode()
            self._to_bot(notice)  # on the loop's thread (the core sees to it)

        outcome = await self.core.hold(req.text, req.verdict, notify, req.request_id,
                                       withdrawn="the held statement was withdrawn before anyone decided")
        if self.closed:
            return
        discarded = self._skip_until_sync  # the batch failed while a human decided
        if outcome.approved:
            req.decision = "approve"
            req.reason = outcome.reason or req.reason
            out = original
            if req.kind == "query" and req.verdict.masked:
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

    def _record_start(self, req: _Request):
        """The request's start record, submitted to be durable: a future, or None (no wait). The
        record is built only when it is submitted (a plain read in strict mode is not)."""
        def record() -> dict:
            if req.request_id is None:
                req.request_id = _request_id()  # its requests row carries the same id
            return {"request_id": req.request_id, "session_id": self.core.session_id,
                    "ts": datetime.fromtimestamp(req.t0, timezone.utc), "protocol": PROTOCOL, "kind": req.kind,
                    "text": req.text, "params": req.params, "decision": req.decision or req.verdict.action,
                    "rule": req.verdict.rule}
        return self.core.record_start(record, req.verdict)

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
