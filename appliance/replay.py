"""`botwarden replay SESSION_ID`: a recorded session, request by request, from the audit store.

Reads through the daemon's control API while it runs, or the DuckDB file read-only when it
does not. What it shows is what the audit holds: statements as recorded (masked values stay
masked), each decision, the rule, rows and errors, and held requests with who decided them.
"""

from __future__ import annotations

import argparse
from typing import Any

from appliance.config import DEFAULT_CONTROL_SOCKET, Config
from appliance.control import ControlClient, DaemonNotRunning
from appliance.errors import BotwardenError

SESSION_SQL = ("SELECT session_id, identity, target, protocol, pid, exe, cgroup_path, credential_user, "
               "started_at, ended_at, outcome FROM sessions WHERE session_id = ?")
REQUESTS_SQL = ("SELECT ts, kind, text, decision, rule, rows, error, duration_ms FROM requests "
                "WHERE session_id = ? ORDER BY chain_seq")
APPROVALS_SQL = ("SELECT ts, approval_id, event, operator, reason FROM approvals "
                 "WHERE session_id = ? ORDER BY chain_seq")


class _Reader:
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


def replay_session(args: argparse.Namespace, cfg: Config | None) -> int:
    reader = _Reader(cfg, getattr(args, "socket", None), getattr(args, "path", None))
    cols, rows = reader.query(SESSION_SQL, [args.session_id])
    if not rows:
        print(f"no session {args.session_id!r} in the audit store")
        return 1
    session = dict(zip(cols, rows[0]))
    print(f"session {session['session_id']}: identity {session['identity']} → {session['target']} "
          f"({session['protocol']}) as {session['credential_user']}")
    print(f"  process pid {session['pid']} exe {session['exe']} cgroup {session['cgroup_path']}")
    print(f"  {session['started_at']} → {session['ended_at'] or 'still open'} ({session['outcome'] or 'active'})")
    events: list[tuple[Any, str]] = []
    cols, rows = reader.query(REQUESTS_SQL, [args.session_id])
    for r in rows:
        d = dict(zip(cols, r))
        line = f"[{d['decision']:>7}] {d['text']}"
        if d["rule"]:
            line += f"   (rule {d['rule']})"
        if d["error"]:
            line += f"   error: {d['error']}"
        elif d["rows"] is not None:
            line += f"   → {d['rows']} row(s)"
        events.append((d["ts"], line))
    cols, rows = reader.query(APPROVALS_SQL, [args.session_id])
    for r in rows:
        d = dict(zip(cols, r))
        who = f" by {d['operator']}" if d["operator"] else ""
        events.append((d["ts"], f"[approval] {d['approval_id']} {d['event']}{who}"
                                f"{': ' + d['reason'] if d['reason'] else ''}"))
    for ts, line in sorted(events, key=lambda e: str(e[0])):
        print(f"  {ts}  {line}")
    return 0
