"""Sans-IO PostgreSQL protocol 3.0: messages, framing, connection state, auth helpers."""

from .connection import (NEED_DATA, ConnectionClosed, PgConnection, Role, State, error_response,
                         negotiate_reply, notice_response, startup_for_server)
from .errors import (AuthenticationError, LocalProtocolError, MessageTooLarge, PgProtocolError,
                     RemoteProtocolError, UnsupportedProtocol)
from .framing import DEFAULT_MAX_MESSAGE_SIZE, split_messages

__all__ = [
    "NEED_DATA", "ConnectionClosed", "PgConnection", "Role", "State", "error_response", "negotiate_reply",
    "notice_response", "startup_for_server", "AuthenticationError", "LocalProtocolError", "MessageTooLarge",
    "PgProtocolError", "RemoteProtocolError", "UnsupportedProtocol", "DEFAULT_MAX_MESSAGE_SIZE",
    "split_messages",
]
