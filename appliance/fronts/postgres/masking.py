"""Result masking: mask plans from the result's columns, DataRows rewritten, COPY TO refused."""

from __future__ import annotations

import logging
import struct

from appliance.policy.masking import MessageMasker
from appliance.policy.types import ColumnDesc, Verdict
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres import sqlstate
from appliance.protocols.postgres.connection import error_response

from ..services import ColumnMaskPlan
from appliance.hotpath import mask_rows

from .wire import _row_values, _encode_row, _swallow, columns_of
from .pending import _UNKNOWN_STATEMENT, OP_QUERY, OP_DESCRIBE, OP_EXECUTE, OP_FUNCTION, _NO_PLAN

log = logging.getLogger(__name__)

# What a masked statement's error or notice becomes when the policy cannot say how to mask it.
_WITHHOLD = MessageMasker(withhold="botwarden withheld the server's message (the statement's results are masked)")


class MaskingMixin:
    """Result masking: mask plans from the result's columns, DataRows rewritten, COPY TO refused
    (part of :class:`Session`)."""

    def _on_row_description(self, buf, s, e):
        ops = self._ops
        if not ops:
            return None
        head = ops[0]
        kind = head[0]
        if kind == OP_QUERY:
            req = head[1]
            if req.verdict.masked and req.decision != "deny":
                self._end_plan()
                self._plan = self._make_plan(req.verdict, columns_of(bytes(buf[s + 5:e]))) or _NO_PLAN
                self._plan_req = req
            return None
        if kind == OP_DESCRIBE:
            ops.popleft()
            _, dkind, target, hidden = head
            if target is not None and target is not _UNKNOWN_STATEMENT:
                verdict = target.verdict if dkind == "S" else target.statement.verdict
                if verdict.masked:
                    target.columns = columns_of(bytes(buf[s + 5:e]))
            return b"" if hidden else None
        return None

    def _make_plan(self, verdict: Verdict, columns: list[ColumnDesc]):
        try:
            return self.services.mask_plan(self.core.grant, self.settings.target, verdict, columns)
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
            if portal is None or not req.verdict.masked:
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
        steps = getattr(plan, "partial_steps", None)
        if steps is not None:
            # The whole run of DataRows from here in one call (compiled where built); the relay
            # loop resumes where the run ends (self._run_end).
            counts = [0] * len(steps)
            end, out = mask_rows(buf, s, len(buf), steps, counts)
            plan.add_counts(counts)
            self._run_end = end
            return out
        values = _row_values(buf, s, e)
        new, changed = plan.apply(values)
        if not changed:
            return None
        return _encode_row(new)

    def _on_notice(self, buf, s, e):
        """A notice while a masked statement runs: masked as its errors are (_masked_message)."""
        req = self._answered()
        if req is None or not req.verdict.masked:
            return None
        masked = self._masked_message(req.verdict, m.NoticeResponse.decode(bytes(buf[s + 5:e])))
        return None if masked is None else masked.encode()

    def _answered(self):
        """The request whose statement the server is running now (a Query's, a FunctionCall's,
        an Execute's), or None."""
        ops = self._ops
        if not ops:
            return None
        head = ops[0]
        kind = head[0]
        return head[1] if kind in (OP_QUERY, OP_FUNCTION) else (head[2] if kind == OP_EXECUTE else None)

    def _masked_message(self, verdict: Verdict, msg):
        """``msg`` (an ErrorResponse or NoticeResponse the server sent while ``verdict``'s
        statement ran) as the bot may see it, or None: as it is."""
        try:
            masker = self.services.message_masker(self.core.grant, self.settings.target, verdict)
            fields = masker.fields(msg.fields) if masker is not None else None
        except Exception:
            log.exception("masking a server message failed; its text is withheld")
            fields = _WITHHOLD.fields(msg.fields)
        return None if fields is None else type(msg)(fields)

    def _on_copy_out(self, buf, s, e):
        """COPY ... TO STDOUT of a statement to be masked: CopyData cannot be masked, so refuse it."""
        req = self._answered()
        if req is None or not req.verdict.masked:
            return None
        head = self._ops[0]
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
