"""The protocol-neutral session core every front uses (PostgreSQL, SSH, Kubernetes).

What each front does around its protocol is the same: count a new connection against the
admission caps, find who is asking (kernel attestation + token) and open the grant (the
credential lease), write ``session_start`` / ``request`` / ``session_end`` rows (in strict audit
mode a request's start record first, durable before it runs), hold a request for an operator
and withdraw it when the bot gives up, end the session when the daemon says its lease or token
ran out, and drain on SIGTERM. That lives here once; a front keeps only what its protocol needs
(codec wiring, where requests are cut out of the stream, the protocol-native refusal, masking).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_session_id() -> str:
    return os.urandom(16).hex()


# Request ids: unique, not secret (only root reads them). A random per-process prefix and a
# counter cost no system call per statement, unlike 16 fresh random bytes.
_REQUEST_PREFIX = os.urandom(8).hex()
_request_seq = itertools.count(1)


def new_request_id() -> str:
    return f"{_REQUEST_PREFIX}{next(_request_seq):016x}"


def format_addr(a: Any) -> str | None:
    """A socket address as the audit store keeps it ("host:port")."""
    if isinstance(a, tuple) and len(a) >= 2:
        return f"{a[0]}:{a[1]}"
    return str(a) if a else None


async def attribution(services: Any, transport) -> Any:
    """The kernel-attested origin of this socket, from the daemon's probes (None without them).
    ``services.attribute`` may be a plain or an async function."""
    attribute = getattr(services, "attribute", None)
    sock = transport.get_extra_info("socket")
    if attribute is None or sock is None:
        return None
    try:
        found = attribute(sock)
        return await found if inspect.isawaitable(found) else found
    except Exception:  # no attribution: identities that need it refuse the session
        log.exception("attribution lookup failed")
        return None

