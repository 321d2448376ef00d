"""One call for the daemon: token (per the target's mode) + attribution → identity and expiry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from appliance.config import Config, TargetConfig
from appliance.identity.attestation import ProcessFacts, ResolvedIdentity, resolve_identity
from appliance.identity.errors import IdentityRefused
from appliance.identity.oidc import OIDCValidator, SessionExpiry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Authenticated:
    identity: ResolvedIdentity
    expiry: SessionExpiry | None  # None when the session is not bound to a token


class IdentityService:
    """Validates the token a bot presents (in the password field) and binds it to the process.

    ``authentication = "attestation"`` targets ignore the password field: whatever a bot puts
    there is not a credential botwarden checks (the upstream credential comes from Vault).
    """

    def __init__(self, config: Config, validator: OIDCValidator | None = None):
        self.config = config
        self.validator = validator or (OIDCValidator(config.oidc) if config.oidc else None)

    async def authenticate(self, target: TargetConfig, token: str | None, attribution: Any) -> Authenticated:
        facts = attribution if isinstance(attribution, ProcessFacts) else ProcessFacts.from_attribution(attribution)
        info = None
        if target.authentication != "attestation":
            if not token:
                raise IdentityRefused("no_identity", f"target {target.name!r} requires an OIDC token in the "
                                                     "password field; none was presented")
            if self.validator is None:
                raise IdentityRefused("issuer_unreachable", "no [oidc] issuer is configured")
            info = await self.validator.avalidate(token)
        try:
            resolved = resolve_identity(self.config.identities, info, facts, target.name,
                                        bots_cgroup=self.config.probes.bots_cgroup,
                                        authentication=target.authentication)
        except IdentityRefused as e:
            log.info("identity refused on target %r: %s (%s)", target.name, e.reason, e.message)
            if info is None:
                raise
            # The token itself was valid: the audit names whose token the wrong process presented.
            raise IdentityRefused(e.reason, e.message, audit_fields={
                **e.audit_fields, "token_subject": info.subject, "token_kid": info.kid}) from None
        expiry = self.validator.session_expiry(info) if info is not None and self.validator else None
        return Authenticated(resolved, expiry)
