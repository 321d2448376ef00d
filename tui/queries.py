"""The SQL and report names the console sends to the daemon, in one place.

The audit schema is owned by analytics/; when it changes, this file is the only one in
the console to adjust.
"""

from __future__ import annotations

# One session's requests in the order they happened (Replay tab). `?` is bound by DuckDB.
REPLAY_SQL = ("SELECT ts, kind, text, decision, rule, rows, error FROM requests "
              "WHERE session_id = ? ORDER BY ts")

# The last decisions on held requests (Approvals tab, "recently decided"), read when the
# approvals stream (re)connects; the stream adds the ones that happen while the console runs.
# Only requests that were held: a statement passed by an approval window has no `requested`.
RECENT_DECISIONS_SQL = (
    "SELECT a.approval_id, a.event, a.operator, a.reason, a.window_s, a.ts, a.identity, a.target, "
    "r.text AS request FROM approvals a LEFT JOIN requests r ON r.request_id = a.request_id "
    "WHERE a.event IN ('approved', 'denied', 'expired', 'abandoned', 'cancelled_restart') "
    "AND a.approval_id IN (SELECT approval_id FROM approvals WHERE event = 'requested') "
    "ORDER BY a.ts DESC LIMIT ?")

# Canned reports served by GET /v1/audit/reports/{name}.
REPORTS: tuple[tuple[str, str], ...] = (
    ("destructive_by_identity", "Destructive statements by identity"),
    ("blocked_attempts", "Blocked attempts"),
    ("approval_latency", "Approval latency"),
    ("masked_fields_per_target", "Masked fields per target"),
    ("sessions_per_executable", "Sessions per executable"),
)
