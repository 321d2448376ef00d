"""A session's audit rows, read for replay and export: through the daemon's control API while it
runs, or from the DuckDB file read-only when it does not (the one reader both use)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from appliance.config import DEFAULT_CONTROL_SOCKET, Config
from appliance.control import ControlClient, DaemonNotRunning
from appliance.errors import BotwardenError

SESSION_SQL = ("SELECT session_id, identity, target, protocol, pid, exe, cgroup_path, credential_user, "
               "started_at, ended_at, outcome, error, client_addr, target_addr FROM sessions WHERE session_id = ?")
REQUESTS_SQL = ("SELECT request_id, ts, kind, text, params, decision, rule, reason, rows, error, sqlstate, "
                "duration_ms, masked FROM requests WHERE session_id = ? ORDER BY chain_seq")
APPROVALS_SQL = ("SELECT ts, approval_id, request_id, event, operator, reason, rule FROM approvals "
                 "WHERE session_id = ? ORDER BY chain_seq")
# Paged: a long session has many chunks, and the control API bounds each answer.
RECORDINGS_SQL = ("SELECT seq, ts, direction, data FROM recordings WHERE session_id = ? AND seq > ? "
                  "ORDER BY seq LIMIT 500")


class Reader:
    """Read-only queries on the audit store: the daemon's API first, the file when none runs."""

    def __init__(self, cfg: Config | None, socket: str | None, path: str | None):
        self.client = ControlClient(socket or (cfg.appliance.control_socket if cfg else DEFAULT_CONTROL_SOCKET))
        self.path = path or (cfg.audit.path if cfg else None)
        self.offline = False

    def query(self, sql: str, params: list[Any]) -> tuple[list[str], list[list[Any]]]:
        if not self.offline:
            try:
                doc = self.client.post("/v1/audit/sql", {"sql": sql, "params": params})
                return doc["columns"], doc["rows"]
            except DaemonNotRunning:
                self.offline = True
        if not self.path:
            raise BotwardenError("no daemon running and no audit store path (--path or a config)")
        from analytics import query_readonly

        cols, rows = query_readonly(self.path, sql, params)
        return cols, [list(r) for r in rows]



def _ts(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v)
        except ValueError:
            return v
    return v


@dataclass
class SessionRecord:
    """Everything the audit holds about one session, as replay and export use it."""

    session: dict[str, Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)
    recordings: list[dict[str, Any]] = field(default_factory=list)   # seq, ts, direction, data (bytes)

    @property
    def protocol(self) -> str:
        return self.session.get("protocol") or ""


Query = Callable[[str, list[Any]], "tuple[list[str], list[Any]]"]


def load_session(reader: Reader | Query, session_id: str) -> SessionRecord | None:
    """The session's rows; ``reader`` a Reader, or any ``query(sql, params) -> (columns, rows)``
    (the daemon's own audit store, for the control API)."""
    query = reader.query if isinstance(reader, Reader) else reader

    def dicts(sql: str, params: list[Any]) -> list[dict[str, Any]]:
        cols, rows = query(sql, params)
        return [dict(zip(cols, r)) for r in rows]

    rows = dicts(SESSION_SQL, [session_id])
    if not rows:
        return None
    rec = SessionRecord({k: _ts(v) for k, v in rows[0].items()})
    rec.requests = [{**r, "ts": _ts(r["ts"])} for r in dicts(REQUESTS_SQL, [session_id])]
    rec.approvals = [{**r, "ts": _ts(r["ts"])} for r in dicts(APPROVALS_SQL, [session_id])]
    last = 0
    while True:
        page = dicts(RECORDINGS_SQL, [session_id, last])
        for r in page:
            data = r["data"]
            if isinstance(data, str):       # the control API sends bytes as hex
                data = bytes.fromhex(data)
            rec.recordings.append({"seq": r["seq"], "ts": _ts(r["ts"]), "direction": r["direction"],
                                   "data": bytes(data or b"")})
        if len(page) < 500:
            break
        last = page[-1]["seq"]
    return rec
