"""No standing secrets: per-session credentials from Vault/OpenBao (hvac, always off the event loop).

- :class:`SecretsBroker` — ``start()``, ``acquire(target, session_id)``, ``release(cred)``, ``close()``.
- :class:`SessionCredential` — username, password (never in ``repr``), lease, certificate;
  ``wait_ended()`` returns when its lease can no longer carry the session.
- :class:`SecretUnavailable` — Vault unreachable, sealed or forbidding; a clear message, no secret.
- :class:`LeaseLedger` — the leases not yet revoked, on disk (``<state_dir>/leases.json``).
"""

from appliance.secrets.broker import (LeaseWatch, PendingRevocation, SecretsBroker, SecretUnavailable,
                                     SessionCredential)
from appliance.secrets.ledger import LeaseLedger

__all__ = ["LeaseLedger", "LeaseWatch", "PendingRevocation", "SecretUnavailable", "SecretsBroker",
           "SessionCredential"]
