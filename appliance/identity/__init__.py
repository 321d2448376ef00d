"""Who is asking: OIDC token validation and its binding to the kernel-attested process.

- :class:`OIDCValidator` — discovery, cached JWKS that follows rotation, strict checks
  (``validate`` blocks; ``avalidate`` runs it in a thread).
- :func:`resolve_identity` — token facts + :class:`ProcessFacts` → :class:`ResolvedIdentity`,
  first identity in config order that matches everything it requires.
- :class:`IdentityRefused` — ``.reason`` code, ``.sqlstate``, a message without the token.
"""

from appliance.identity.attestation import (
    ProcessFacts, ResolvedIdentity, from_attribution, normalize_cgroup, resolve_identity,
)
from appliance.identity.errors import SQLSTATE_BY_REASON, IdentityRefused
from appliance.identity.oidc import OIDCValidator, SessionExpiry, TokenInfo
from appliance.identity.service import Authenticated, IdentityService

__all__ = [
    "Authenticated", "IdentityRefused", "IdentityService", "OIDCValidator", "ProcessFacts",
    "ResolvedIdentity", "SQLSTATE_BY_REASON", "SessionExpiry", "TokenInfo", "from_attribution",
    "normalize_cgroup", "resolve_identity",
]
