"""Settings of one PostgreSQL listener, its limits, and the error that ends a session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.errors import BotwardenError
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres.framing import DEFAULT_MAX_MESSAGE_SIZE


PROTOCOL = "postgresql"
UpstreamTLS = Literal["disable", "prefer", "require", "verify-full"]

# Pass-through messages at least this large stream to the other side before they are complete.
STREAM_THRESHOLD = 64 * 1024
# While a statement inside a transaction is held, a Sync this often keeps the server's
# idle_in_transaction_session_timeout from ending the bot's session during the wait.
HOLD_KEEPALIVE_S = 1.0
# PostgreSQL's own ceiling for one message (MaxAllocSize); server messages are checked against it.
SERVER_MAX_MESSAGE = 0x3FFFFFFF + 5
# Bot bytes kept while a statement is held before reading from the bot pauses.
HELD_BUFFER_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class PgFrontSettings:
    """One listener in front of one PostgreSQL target."""

    target: str
    upstream_host: str                    # with upstream_unix: the server's Unix socket path
    upstream_port: int = 5432
    upstream_unix: bool = False
    upstream_tls: UpstreamTLS = "prefer"
    upstream_ca_file: str | None = None
    tls_cert_file: str | None = None      # bot side; None = no TLS offered to bots
    tls_key_file: str | None = None
    allow_plaintext: bool = False         # bots without TLS are refused unless this is set
    require_token: bool = True            # ask the bot for a password (its OIDC token)
    # How the target establishes who is calling (the config's `authentication`), as the session's
    # recording reports it; None: "token" or "attestation" as require_token says.
    authentication: str | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    connect_timeout: float = 10.0
    startup_timeout: float = 30.0
    message_timeout: float = 60.0         # a message started after login must be complete by then (0: off)
    # A session whose rules need the catalog (views, functions, triggers made before it: policy/
    # catalog.py) reads its change counters again, before a statement sent when idle, once this
    # many seconds have passed since it last did (recheck.py); 0: at login only.
    catalog_recheck_s: float = 2.0

    def __post_init__(self) -> None:
        if self.upstream_tls not in ("disable", "prefer", "require", "verify-full"):
            raise ValueError(f"upstream_tls must be disable|prefer|require|verify-full, not {self.upstream_tls!r}")
        if self.upstream_tls == "verify-full" and not self.upstream_ca_file:
            raise ValueError("upstream_tls = verify-full needs upstream_ca_file")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_cert_file is None and not self.allow_plaintext:
            raise ValueError("without tls_cert_file the front can only serve bots with allow_plaintext = true")
        if self.catalog_recheck_s < 0:
            raise ValueError("catalog_recheck_s must be 0 (at login only) or more")
        if not 1024 <= self.max_message_size <= SERVER_MAX_MESSAGE:
            raise ValueError("max_message_size must be between 1 KiB and 1 GiB")


class FrontError(BotwardenError):
    """A session ends with a FATAL error for the bot (``sqlstate``, ``message``)."""

    def __init__(self, sqlstate_: str, message: str, *, server_error: m.ErrorResponse | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate_
        self.message = message
        self.server_error = server_error
