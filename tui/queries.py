"""The SQL and report names the console sends to the daemon, in one place.

The audit schema is owned by analytics/; when it changes, this file is the only one in
the console to adjust.
"""

from __future__ import annotations

# One session's requests in the order they happened (Replay tab). `?` is bound by DuckDB.
REPLAY_SQL = ("SELECT ts, kind, text, decision, rule, rows, error FROM requests "
              "WHERE session_id = ? ORDER BY ts")

# Canned reports served by GET /v1/audit/reports/{name}.
REPORTS: tuple[tuple[str, str], ...] = (
    ("destructive_by_identity", "Destructive statements by identity"),
    ("blocked_attempts", "Blocked attempts"),
    ("approval_latency", "Approval latency"),
    ("masked_fields_per_target", "Masked fields per target"),
    ("sessions_per_executable", "Sessions per executable"),
)
