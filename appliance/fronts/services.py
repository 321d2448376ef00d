"""What a protocol front needs from the daemon (contract §3), plus simple defaults for tests.

The daemon provides the real ``FrontServices`` (identity, secrets, policy,
approvals, audit store). ``DefaultServices`` is an allow-all implementation
with a static credential and an in-memory audit list, so a front can run on
its own in tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from appliance.errors import BotwardenError
from appliance.policy.types import ALLOW, ColumnDesc, MaskPlan, Verdict

if TYPE_CHECKING:  # the front only passes the probes' record through
    from probes import Attribution  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ConnectionContext:
    client_addr: tuple
    local_addr: tuple
    tls: bool
    attribution: "Attribution | None" = None


@dataclass(frozen=True)
class Credential:
    username: str
    password: str | None = field(default=None, repr=False)
    lease_id: str | None = None
    expires_at: datetime | None = None
    # SSH targets: the session's OpenSSH user certificate and its private key (never logged).
    cert: str | None = None
    private_key: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"Credential(username={self.username!r}, password=<hidden>, lease_id={self.lease_id!r}, "
                f"expires_at={self.expires_at!r})")


@dataclass(frozen=True)
class SessionGrant:
    session_id: str
    identity: str
    groups: tuple[str, ...]
    subject: str | None
    credential: Credential
    audit_fields: Mapping[str, Any] = field(default_factory=dict)


# The rule a request is refused by while the audit store cannot take its record (nothing runs
# unaudited): transient, so a front whose protocol says so answers "unavailable, try again"
# (the Kubernetes front: 503) rather than "forbidden".
AUDIT_RULE = "botwarden:audit"


class AuthRefused(BotwardenError):
    """The session is refused; ``message`` goes to the bot and never contains a token."""

    def __init__(self, sqlstate: str, message: str, *, audit_fields: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        # Facts for the refused session's session_start row (e.g. token_subject of a valid token
        # presented by the wrong process); never the token.
        self.audit_fields: Mapping[str, Any] = dict(audit_fields or {})


@dataclass(frozen=True)
class HoldOutcome:
    approved: bool
    approval_id: str
    reason: str = ""
    decided_by: str | None = None
    # How the hold ended: approved | denied | expired | abandoned | cancelled_restart, or withdrawn
    # (the front's own: the bot cancelled); "" unknown.
    state: str = ""


class FrontServices(Protocol):
    async def open_session(self, target: str, ctx: ConnectionContext, user: str,
                           token: str | None) -> SessionGrant: ...

    async def close_session(self, grant: SessionGrant) -> None: ...

    def decide_sql(self, grant: SessionGrant, target: str, sql: str, phase: str, *,
                   probe: bool = False) -> Verdict:
        """``probe``: decide without changing the session's SQL state (a reading of the
        statement the server may or may not apply)."""
        ...

    def decide_k8s(self, grant: SessionGrant, target: str, request: Any) -> Verdict:
        """One Kubernetes API request (appliance.policy.K8sRequest)."""
        ...

    def audit_room(self) -> asyncio.Future | None:
        """Optional. A future to wait on before deciding the next request while the audit store
        catches up (pacing), or None."""
        ...

    def refuse_now(self, grant: SessionGrant) -> Verdict | None:
        """Optional. Before a request decided earlier runs (a prepared statement's Execute): the
        verdict that refuses it now (audit store behind, token expired), or None."""
        ...

    def name_statement(self, grant: SessionGrant, name: str, verdict: Verdict | None) -> None:
        """A protocol-level Parse named ``name`` (verdict None: closed): SQL EXECUTE can run it."""
        ...

    def catalog_lookup(self, grant: SessionGrant, target: str) -> Any:
        """Optional. What to ask the target's catalog at login about views, functions, triggers
        and rules made before the session (appliance.policy.catalog.CatalogLookup), or None."""
        ...

    def learn_catalog(self, grant: SessionGrant, views: Mapping[Any, str | None],
                      functions: Mapping[tuple[str, str], Any], effects: Mapping[tuple[str, str], Any]) -> None:
        """Optional (with catalog_lookup). The views ((schema, name) -> query), functions
        ((schema, name) -> definitions) and what writing a relation runs besides (its triggers'
        functions and its rules: (schema, name) -> CatalogLookup.effects' entries) found."""
        ...

    def mask_plan(self, grant: SessionGrant, target: str, verdict: Verdict,
                  columns: Sequence[ColumnDesc]) -> MaskPlan | None: ...

    def message_masker(self, grant: SessionGrant, target: str, verdict: Verdict) -> Any:
        """How the server's errors and notices are masked while a masked statement runs
        (appliance.policy.masking.MessageMasker), or None."""
        ...

    async def hold(self, grant: SessionGrant, target: str, request_text: str, verdict: Verdict,
                   notify: Callable[[str], None], request_id: str | None = None,
                   detail: Mapping[str, Any] | None = None) -> HoldOutcome: ...

    def audit(self, kind: str, record: Mapping[str, Any]) -> None: ...


# Binary-format replacements that keep a value's length valid for its type (OID -> bytes).
_BINARY_MASKS: dict[int, bytes] = {
    16: b"\x00",            # bool
    20: b"\x00" * 8,        # int8
    21: b"\x00" * 2,        # int2
    23: b"\x00" * 4,        # int4
    700: b"\x00" * 4,       # float4
    701: b"\x00" * 8,       # float8
}
_NUMERIC = {20, 21, 23, 700, 701, 1700, 26}
_TEXT_LIKE = {25, 1043, 1042, 19, 114, 3802}  # text, varchar, bpchar, name, json, jsonb(text form)


class ColumnMaskPlan:
    """Masks the values of the columns at ``indexes``: text -> ``mask``, binary -> a type-safe blank.

    A simple MaskPlan for tests and the default services; the policy engine
    provides the real ones.
    """

    def __init__(self, columns: Sequence[ColumnDesc], indexes: Sequence[int], mask: bytes = b"***"):
        self.columns = list(columns)
        self.indexes = list(indexes)
        self.mask = mask
        self.counts: dict[str, int] = {}
        self._targets = [(i, self.columns[i].name, self._masked(self.columns[i])) for i in self.indexes]

    def _masked(self, col: ColumnDesc) -> bytes:
        # Keep the value parseable for its type so clients do not fail on a masked row.
        if col.format == 0:
            if col.type_oid in _NUMERIC:
                return b"0"
            if col.type_oid == 16:
                return b"f"
            return self.mask
        if col.type_oid in _TEXT_LIKE:
            return b"\x01***" if col.type_oid == 3802 else self.mask
        return _BINARY_MASKS.get(col.type_oid, b"")

    def apply(self, values: Sequence[bytes | None]) -> tuple[list[bytes | None], bool]:
        out = list(values)
        changed = False
        counts = self.counts
        n = len(out)
        for i, name, masked in self._targets:
            if i < n and out[i] is not None:
                out[i] = masked
                counts[name] = counts.get(name, 0) + 1
                changed = True
        return out, changed


class DefaultServices:
    """Allow-all policy, one static credential, audit records kept in a list (tests, benchmarks)."""

    def __init__(self, credential: Credential, *, identity: str = "test-bot",
                 mask_columns: Sequence[str] = ()):
        self.credential = credential
        self.identity = identity
        self.mask_columns = set(mask_columns)
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.closed: list[str] = []

    async def open_session(self, target: str, ctx: ConnectionContext, user: str,
                           token: str | None) -> SessionGrant:
        return SessionGrant(uuid.uuid4().hex, self.identity, (), None, self.credential, {})

    async def close_session(self, grant: SessionGrant) -> None:
        self.closed.append(grant.session_id)

    def decide_sql(self, grant: SessionGrant, target: str, sql: str, phase: str, *,
                   probe: bool = False) -> Verdict:
        return ALLOW

    def decide_k8s(self, grant: SessionGrant, target: str, request: Any) -> Verdict:
        return ALLOW

    def name_statement(self, grant: SessionGrant, name: str, verdict: Verdict | None) -> None:
        pass

    def mask_plan(self, grant: SessionGrant, target: str, verdict: Verdict,
                  columns: Sequence[ColumnDesc]) -> MaskPlan | None:
        idx = [i for i, c in enumerate(columns) if c.name in self.mask_columns]
        return ColumnMaskPlan(columns, idx) if idx else None

    def message_masker(self, grant: SessionGrant, target: str, verdict: Verdict) -> Any:
        return None

    async def hold(self, grant: SessionGrant, target: str, request_text: str, verdict: Verdict,
                   notify: Callable[[str], None], request_id: str | None = None,
                   detail: Mapping[str, Any] | None = None) -> HoldOutcome:
        approval_id = uuid.uuid4().hex
        notify(approval_id)
        await asyncio.sleep(0)
        return HoldOutcome(False, approval_id, "no approver in the default services", None, "denied")

    def audit(self, kind: str, record: Mapping[str, Any]) -> None:
        self.records.append((kind, dict(record)))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for k, r in self.records if k == kind]
