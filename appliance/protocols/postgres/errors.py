"""Errors of the PostgreSQL codec. Each says whose fault it is and the SQLSTATE it suggests."""

from __future__ import annotations

from appliance.errors import BotwardenError

from . import sqlstate


class PgProtocolError(BotwardenError):
    """Root of the codec's errors; ``sqlstate`` is the code a reply to the peer should carry."""

    sqlstate: str = sqlstate.PROTOCOL_VIOLATION

    def __init__(self, message: str, *, sqlstate: str | None = None):
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate


class RemoteProtocolError(PgProtocolError):
    """The peer sent bytes that break protocol 3.0 (its fault); the connection cannot continue."""

    sqlstate = sqlstate.PROTOCOL_VIOLATION


class MessageTooLarge(RemoteProtocolError):
    """The peer announced a message larger than the configured maximum."""

    sqlstate = sqlstate.PROGRAM_LIMIT_EXCEEDED


class UnsupportedProtocol(RemoteProtocolError):
    """The peer asked for a protocol major version or feature botwarden does not speak."""

    sqlstate = sqlstate.FEATURE_NOT_SUPPORTED


class LocalProtocolError(PgProtocolError):
    """We tried to send something invalid or act in the wrong state (our bug)."""

    sqlstate = sqlstate.INTERNAL_ERROR


class AuthenticationError(PgProtocolError):
    """Authentication with a server failed on our side (bad server proof, unsupported method)."""

    sqlstate = sqlstate.INVALID_AUTHORIZATION_SPECIFICATION
