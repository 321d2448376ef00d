"""Decision types shared by the policy engine and the protocol fronts (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from appliance.errors import BotwardenError

Action = Literal["allow", "block", "approve", "mask"]

# Precedence among matching rules: the strongest kind wins.
ACTION_STRENGTH: dict[str, int] = {"allow": 0, "mask": 1, "approve": 2, "block": 3}


@dataclass(frozen=True)
class Verdict:
    """What happens to one request. ``rule`` is None when the target's default decided."""

    action: Action
    rule: str | None = None
    reason: str = ""
    # Pure analysis results the front may use (e.g. relations for masking); policy-defined:
    # for SQL one appliance.policy.sql.StatementAnalysis per statement of the batch.
    details: tuple = field(default=(), compare=False)
    # Names of every rule that matched (in file order), and of the mask rules among them:
    # masking also applies to a request an operator approved.
    matched: tuple[str, ...] = field(default=(), compare=False)
    mask_rules: tuple[str, ...] = field(default=(), compare=False)
    # Affected-rows guard (rules with max_rows): the guards still waiting for the planner's
    # estimate, as RowGuard; once it is known (appliance.policy.engine.with_row_estimate), the
    # estimate and the smallest limit that applied, for the audit row and the approval.
    row_guards: tuple["RowGuard", ...] = field(default=(), compare=False)
    row_estimate: int | None = field(default=None, compare=False)
    row_limit: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ACTION_STRENGTH:
            raise ValueError(f"unknown action {self.action!r}")

    @property
    def masked(self) -> bool:
        """The request's results are masked: a mask rule decided it, or one matched a request an
        operator approves (it runs masked)."""
        return self.action == "mask" or (self.action == "approve" and bool(self.mask_rules))


ALLOW = Verdict("allow", None, "allowed by default")


@dataclass(frozen=True)
class RowGuard:
    """A rule with ``max_rows`` whose other matchers matched an UPDATE/DELETE/MERGE: it applies
    when the statement is estimated to touch more than ``max_rows`` rows (or no estimate exists)."""

    rule: str
    action: Action
    max_rows: int
    description: str = ""


@dataclass(frozen=True)
class ColumnDesc:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 0
    format: int = 0  # 0 text, 1 binary


class PolicyError(BotwardenError):
    """The policy cannot be used as configured (e.g. hashing without a salt)."""


class MaskPlan(Protocol):
    """Rewrites the values of one DataRow; counts what it masked per column name."""

    counts: dict[str, int]

    def apply(self, values: Sequence[bytes | None]) -> tuple[list[bytes | None], bool]:
        """Return the new values and whether any value changed."""
        ...
