"""No standing secrets: per-session credentials from Vault/OpenBao (hvac, always off the event loop).

- :class:`SecretsBroker` — ``start()``, ``acquire(target, session_id)``, ``release(cred)``, ``close()``.
- :class:`SessionCredential` — username, password (never in ``repr``), lease, certificate;
  ``wait_ended()`` returns when its lease can no longer carry the session.
- :class:`SecretUnavailable` — Vault unreachable, sealed or forbidding; a clear message, no secret.
"""

from appliance.secrets.broker import LeaseWatch, SecretsBroker, SecretUnavailable, SessionCredential

__all__ = ["LeaseWatch", "SecretUnavailable", "SecretsBroker", "SessionCredential"]
