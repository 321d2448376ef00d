"""Why a bot's identity was refused: one reason code, one SQLSTATE, one safe message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from appliance.errors import BotwardenError

Reason = Literal[
    "expired", "not_yet_valid", "audience", "issuer", "signature", "algorithm", "unknown_kid",
    "malformed", "missing_claim", "process_mismatch", "no_identity", "issuer_unreachable",
]

# The token travels in the password field, so a bad token is PostgreSQL's "invalid password"
# (28P01); everything about *who* is connecting, or an issuer we cannot reach, is the broader
# "invalid authorization specification" (28000).
SQLSTATE_BY_REASON: dict[str, str] = {
    "expired": "28P01",
    "not_yet_valid": "28P01",
    "audience": "28P01",
    "issuer": "28P01",
    "signature": "28P01",
    "algorithm": "28P01",
    "unknown_kid": "28P01",
    "malformed": "28P01",
    "missing_claim": "28P01",
    "process_mismatch": "28000",
    "no_identity": "28000",
    "issuer_unreachable": "28000",
}


class IdentityRefused(BotwardenError):
    """A token or a process was refused. ``message`` never contains the token."""

    def __init__(self, reason: Reason, message: str, *, audit_fields: Mapping[str, Any] | None = None):
        if reason not in SQLSTATE_BY_REASON:
            raise ValueError(f"unknown refusal reason {reason!r}")
        self.reason: Reason = reason
        self.sqlstate: str = SQLSTATE_BY_REASON[reason]
        self.message = message
        # What is known for sure about the refused connection (e.g. the subject of a token that
        # was valid but presented by the wrong process), for its session_start row.
        self.audit_fields: Mapping[str, Any] = dict(audit_fields or {})
        super().__init__(message)

    def __repr__(self) -> str:
        return f"IdentityRefused(reason={self.reason!r}, sqlstate={self.sqlstate!r}, message={self.message!r})"
