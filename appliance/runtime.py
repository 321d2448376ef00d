"""The daemon's runtime: everything built from one config, swapped whole on reload.

It is the ``services`` object every protocol front receives (contract: identity → the
session's credential → per-request decisions → holds → audit). A reload builds a new
Runtime; sessions already open keep the one they started with, so a policy change
applies to the next statement of new sessions and never half-way through a decision.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.approvals import ApprovalBroker, HoldOutcome
from appliance.config import Config, TargetConfig
from appliance.errors import BotwardenError
from appliance.fronts.services import AuthRefused, ConnectionContext, Credential, SessionGrant
from appliance.policy.types import ColumnDesc, MaskPlan, Verdict

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)


def open_audit_store(cfg: Config):
    """Open (create, migrate) the audit store and start its single writer. Blocking."""
    from analytics import AuditStore

    Path(cfg.audit.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = AuditStore(cfg.audit.path, batch_max=cfg.audit.batch_max, flush_interval=cfg.audit.flush_interval,
                       queue_max=cfg.audit.queue_max, on_full=cfg.audit.on_full)
    store.start()
    return store


@dataclass
class LiveSession:
    grant: SessionGrant
    target: str
    ctx: ConnectionContext
    started: datetime
    credential_handle: Any = None
    ended: datetime | None = None
    state: str = "active"

    def public(self) -> dict[str, Any]:
        facts = self.ctx.attribution
        return {
            "session_id": self.grant.session_id, "identity": self.grant.identity, "target": self.target,
            "subject": self.grant.subject, "credential_user": self.grant.credential.username,
            "lease_id": self.grant.credential.lease_id,
            "client": "%s:%s" % tuple(self.ctx.client_addr[:2]) if self.ctx.client_addr else None,
            "pid": getattr(facts, "pid", None), "uid": getattr(facts, "uid", None),
            "exe": getattr(facts, "exe_path", None), "cgroup": getattr(facts, "cgroup_path", None),
            "started": self.started.isoformat(), "ended": self.ended.isoformat() if self.ended else None,
            "state": self.state,
        }


class Runtime:
    """Policy, identity, secrets and approvals for one config generation."""

    def __init__(self, cfg: Config, daemon: "Daemon"):
        self.config = cfg
        self.daemon = daemon
        self.engine: Any = None
        self.oidc: Any = None
        self.secrets: Any = None
        self.approvals = ApprovalBroker(timeout_s=cfg.approvals.timeout_s, required=cfg.approvals.approvers_required,
                                        audit=self.audit, webhook_url=cfg.approvals.webhook_url)
        # Shared across generations so `sessions` sees every open session.
        self.live: dict[str, LiveSession] = {}
        self.recent: list[LiveSession] = []

    @classmethod
    async def create(cls, cfg: Config, daemon: "Daemon") -> "Runtime":
        rt = cls(cfg, daemon)
        await asyncio.to_thread(rt._build_blocking)
        previous: Runtime | None = getattr(daemon, "runtime", None)
        if previous is not None:
            rt.live = previous.live
            rt.recent = previous.recent
            rt.approvals.adopt_windows(previous.approvals)
        return rt

    def _build_blocking(self) -> None:
        """Everything that reads files or talks to the network at build time (a thread)."""
        from appliance.policy import PolicyEngine

        cfg = self.config
        salt = b""
        if cfg.policy.masking.salt_file:
            try:
                salt = Path(cfg.policy.masking.salt_file).read_bytes().strip()
            except OSError as e:
                raise BotwardenError(f"masking.salt_file: cannot read {cfg.policy.masking.salt_file}: "
                                     f"{e.strerror}") from None
        self.engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities, salt=salt)
        if cfg.oidc is not None:
            from appliance.identity import OIDCValidator

            self.oidc = OIDCValidator(cfg.oidc)
        if cfg.vault is not None:
            from appliance.secrets import SecretsBroker

            self.secrets = SecretsBroker(cfg.vault)

    async def started(self) -> None:
        if self.secrets is not None and hasattr(self.secrets, "start"):
            await self.secrets.start()

    async def retire(self) -> None:
        """An old generation after a reload: nothing new uses it; stop its background work."""
        if self.secrets is not None and hasattr(self.secrets, "close") and self.daemon.runtime is not self:
            # Credentials already issued by this broker are still released through it.
            pass

    async def close(self) -> None:
        await self.approvals.shutdown("botwarden is shutting down")
        if self.secrets is not None and hasattr(self.secrets, "close"):
            await self.secrets.close()

    # -- FrontServices ---------------------------------------------------------------

    def audit(self, kind: str, record: Mapping[str, Any]) -> None:
        store = self.daemon.audit
        if store is None:
            log.error("audit store is closed; %s event not recorded", kind)
            return
        if not store.submit(kind, record):
            log.error("audit queue full: %s event refused by the store", kind)

    async def open_session(self, target: str, ctx: ConnectionContext, user: str, token: str | None) -> SessionGrant:
        from appliance.identity import IdentityRefused, ProcessFacts, resolve_identity
        from appliance.secrets import SecretUnavailable

        store = self.daemon.audit
        if store is None or not store.healthy:
            raise AuthRefused("57P03", "botwarden refuses new sessions: the audit store cannot keep up "
                                       "(no session runs unaudited)")
        tcfg = self.config.target(target)
        token_info = None
        try:
            if tcfg.authentication in ("token", "token+attestation"):
                if not token:
                    raise AuthRefused("28000", "botwarden: this target needs an OIDC token in the password field")
                token_info = await self.oidc.avalidate(token)
            facts = ProcessFacts.from_attribution(ctx.attribution) if ctx.attribution is not None else None
            if tcfg.authentication in ("attestation", "token+attestation") and facts is None:
                raise AuthRefused("28000", "botwarden: this target needs kernel attestation, and this "
                                           "connection has none (not redirected by the probes)")
            ident = resolve_identity(self.config.identities, token_info, facts, target)
        except IdentityRefused as e:
            raise AuthRefused(e.sqlstate, f"botwarden refused the connection: {e}") from None
        session_id = uuid.uuid4().hex
        if tcfg.credential is None:
            raise AuthRefused("28000", f"botwarden: target {target!r} has no credential source configured")
        try:
            if self.secrets is not None:
                handle = await self.secrets.acquire(tcfg, session_id)
            else:
                from appliance.secrets import static_credential

                handle = await asyncio.to_thread(static_credential, tcfg)
        except SecretUnavailable as e:
            raise AuthRefused("08004", f"botwarden could not get a credential for {target!r}: {e}") from None
        cred = Credential(handle.username, handle.password, getattr(handle, "lease_id", None),
                          getattr(handle, "expires_at", None))
        audit_fields = dict(getattr(ident, "audit_fields", {}) or {})
        audit_fields.update(getattr(handle, "audit_fields", {}) or {})
        audit_fields.update(identity=ident.name, credential_user=handle.username,
                            lease_id=getattr(handle, "lease_id", None))
        if facts is not None:
            audit_fields.update(pid=facts.pid, uid=facts.uid, gid=facts.gid, cgroup_path=facts.cgroup_path,
                                exe=facts.exe_path, comm=facts.comm, attribution_source=facts.source,
                                cgroup_id=getattr(ctx.attribution, "cgroup_id", None))
        else:
            audit_fields.update(attribution_source="none")
        grant = SessionGrant(session_id=session_id, identity=ident.name, groups=tuple(ident.groups),
                             subject=getattr(ident, "subject", None), credential=cred, audit_fields=audit_fields)
        self.live[session_id] = LiveSession(grant, target, ctx, datetime.now(timezone.utc), handle)
        return grant

    async def close_session(self, grant: SessionGrant) -> None:
        live = self.live.pop(grant.session_id, None)
        if live is None:
            return
        live.ended = datetime.now(timezone.utc)
        live.state = "ended"
        self.recent.append(live)
        del self.recent[:-200]
        if self.secrets is not None and live.credential_handle is not None:
            try:
                await self.secrets.release(live.credential_handle)
            except BotwardenError as e:
                log.error("session %s: could not revoke its credential lease: %s", grant.session_id, e)

    def decide_sql(self, grant: SessionGrant, target: str, sql: str, phase: str,
                   session: Any = None) -> Verdict:
        return self.engine.decide_sql(grant.identity, grant.groups, target, sql, session=session)

    def mask_plan(self, grant: SessionGrant, target: str, verdict: Verdict,
                  columns: Sequence[ColumnDesc]) -> MaskPlan | None:
        return self.engine.mask_plan(grant.identity, grant.groups, target, verdict, columns)

    async def hold(self, grant: SessionGrant, target: str, request_text: str, verdict: Verdict,
                   notify: Callable[[str], None], request_id: str | None = None) -> HoldOutcome:
        live = self.live.get(grant.session_id)
        facts = live.ctx.attribution if live else None
        try:
            excluded = frozenset(self.config.identity(grant.identity).operator_uids)
        except KeyError:
            excluded = frozenset()
        shape = self.engine.shape_of(request_text) if hasattr(self.engine, "shape_of") else request_text
        return await self.approvals.hold(
            session_id=grant.session_id, identity=grant.identity, target=target,
            protocol=self.config.target(target).protocol, text=request_text, rule=verdict.rule, shape=shape,
            process={"pid": getattr(facts, "pid", None), "exe": getattr(facts, "exe_path", None),
                     "uid": getattr(facts, "uid", None)},
            request_id=request_id, excluded_uids=excluded, notify=notify)

    # -- status ---------------------------------------------------------------------

    def sessions(self, active_only: bool = True) -> list[dict[str, Any]]:
        items = list(self.live.values())
        if not active_only:
            items = self.recent + items
        return [s.public() for s in items]

    def status(self) -> dict[str, Any]:
        return {"sessions_active": len(self.live), "approvals_pending": len(self.approvals.pending)}
