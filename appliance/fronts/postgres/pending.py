"""What a session tracks per request: the audit record while a statement runs, prepared
statements and portals, and the queue of operations the server has still to answer."""

from __future__ import annotations

import time
from collections.abc import Sequence

from appliance.policy.types import ColumnDesc, Verdict
from appliance.protocols.postgres import messages as m


_time = time.time


def _discard(data: bytes) -> None:
    """Writer of a closed session."""


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
    seq: int | None = None               # numbered before its record is submitted (SessionCore.issue_seq)

    def __init__(self, kind: str, text: str, verdict: Verdict, params: list | None = None):
        self.kind = kind
        self.text = text
        self.params = params
        self.verdict = verdict
        self.t0 = _time()


class _Statement:
    __slots__ = ("text", "verdict", "columns", "name", "guard", "by_name", "redecide", "epoch")

    def __init__(self, text: str, verdict: Verdict, name: str = "", by_name: bool = False, epoch: int = 0):
        self.text = text
        self.verdict = verdict
        self.columns: Sequence[ColumnDesc] | None = None
        self.name = name
        # Not parsed in this session: prepared in SQL and decided as SQL's EXECUTE of its name,
        # at each Execute (as EXECUTE name would be), not once at Parse.
        self.by_name = by_name
        # What it runs depends on the session's state (EXECUTE name, FETCH from a cursor): decided
        # again at each Bind, as that state may have changed since the Parse.
        self.redecide = False
        # Affected-rows guard pending (verdict.row_guards): (query bytes, parameter type OIDs),
        # to have the server estimate the rows at Execute, with the portal's parameters.
        self.guard: tuple[bytes, tuple[int, ...]] | None = None
        # The session's catalog as it was decided with (recheck.py: _catalog_epoch); a Bind after
        # the catalog changed decides it again.
        self.epoch = epoch


class _Portal:
    __slots__ = ("statement", "params", "result_formats", "columns", "bind")

    def __init__(self, statement: _Statement | None, params: list | None, result_formats: tuple[int, ...]):
        self.statement = statement
        self.params = params
        self.result_formats = result_formats
        self.columns: Sequence[ColumnDesc] | None = None
        self.bind: bytes | None = None  # the Bind message, kept only for a guarded statement


_UNKNOWN_STATEMENT = _Statement("", Verdict("allow", None, "statement prepared before this session"))

# Pending-operation kinds (first item of each op tuple).
OP_QUERY, OP_PARSE, OP_BIND, OP_DESCRIBE, OP_EXECUTE, OP_CLOSE, OP_SYNC, OP_FUNCTION, OP_KEEPALIVE = range(9)
_EXTENDED_OPS = frozenset((OP_PARSE, OP_BIND, OP_DESCRIBE, OP_EXECUTE, OP_CLOSE))
_SYNC = m.Sync().encode()
_FLUSH = m.Flush().encode()


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_HOLD = _Marker("HOLD")          # a client handler's answer: stop here, the statement waits for approval
_NO_PLAN = _Marker("NO_PLAN")    # the current result needs no masking
