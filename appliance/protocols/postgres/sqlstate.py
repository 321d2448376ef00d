"""SQLSTATE codes botwarden uses, by name, in one table (PostgreSQL Appendix A).

Every error the inspector produces takes its code from here, never from a literal.
"""

from __future__ import annotations

SUCCESSFUL_COMPLETION = "00000"
CONNECTION_EXCEPTION = "08000"
CONNECTION_FAILURE = "08006"
SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001"
PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
INVALID_PASSWORD = "28P01"
SYNTAX_ERROR = "42601"
INSUFFICIENT_PRIVILEGE = "42501"
TOO_MANY_CONNECTIONS = "53300"
PROGRAM_LIMIT_EXCEEDED = "54000"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CRASH_SHUTDOWN = "57P02"
CANNOT_CONNECT_NOW = "57P03"
INTERNAL_ERROR = "XX000"

NAMES: dict[str, str] = {
    value: name.lower()
    for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, str) and len(value) == 5
}
