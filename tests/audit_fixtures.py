"""Records and stores shared by the audit tests (tests/test_audit*.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import duckdb

from analytics import AuditStore

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def sid() -> str:
    return uuid.uuid4().hex


def session_start(session_id: str, ts: dt.datetime = T0, **over: Any) -> dict:
    rec = {
        "session_id": session_id, "ts": ts, "target": "orders-db", "protocol": "postgres",
        "identity": "deploy-bot", "token_subject": "system:deploy", "token_kid": "k1",
        "client_addr": "127.0.0.1:50000", "target_addr": "127.0.0.1:5432", "pid": 4242, "uid": 1001,
        "gid": 1001, "cgroup_id": 77, "cgroup_path": "/bots/deploy", "exe": "/usr/bin/psql",
        "comm": "psql", "attribution_source": "ebpf", "credential_user": "v-deploy-abc",
        "lease_id": "database/creds/ro/xyz", "tls": True,
    }
    rec.update(over)
    return rec


def request(session_id: str, ts: dt.datetime = T0, **over: Any) -> dict:
    rec = {
        "request_id": uuid.uuid4().hex, "session_id": session_id, "ts": ts, "protocol": "postgres",
        "kind": "query", "text": "SELECT name, ssn FROM people WHERE id = $1", "params": ["***", None],
        "decision": "mask", "rule": "mask-ssn", "reason": "ssn is masked", "duration_ms": 1.5,
        "rows": 3, "error": None, "sqlstate": None, "masked": {"ssn": 3},
    }
    rec.update(over)
    return rec


def session_end(session_id: str, ts: dt.datetime = T0, **over: Any) -> dict:
    rec = {"session_id": session_id, "ts": ts, "bytes_in": 100, "bytes_out": 2000, "outcome": "ok"}
    rec.update(over)
    return rec


def approval(approval_id: str, event: str, ts: dt.datetime = T0, **over: Any) -> dict:
    rec = {"approval_id": approval_id, "ts": ts, "event": event, "target": "orders-db",
           "rule": "approve-ddl", "identity": "deploy-bot"}
    rec.update(over)
    return rec


def probe(ts: dt.datetime = T0, **over: Any) -> dict:
    rec = {"ts": ts, "event": "redirected", "pid": 4242, "uid": 1001, "gid": 1001, "cgroup_id": 77,
           "cgroup_path": "/bots/deploy", "comm": "psql", "exe": "/usr/bin/psql",
           "dst_addr": "10.0.0.5", "dst_port": 5432, "family": "ipv4", "detail": "connect4"}
    rec.update(over)
    return rec


def recording(session_id: str, seq: int, ts: dt.datetime = T0, **over: Any) -> dict:
    rec = {"session_id": session_id, "seq": seq, "ts": ts, "direction": "in", "data": b"Q\x00\x00\x00\x0eSELECT 1\x00"}
    rec.update(over)
    return rec


def populate(path: Path, n_requests: int = 20) -> dict[str, Any]:
    """A closed audit file with one session of every kind of event."""
    s = sid()
    with AuditStore(path, strict=True, flush_interval=0.01) as store:
        assert store.submit("session_start", session_start(s))
        assert store.submit("probe", probe())
        for i in range(n_requests):
            assert store.submit("request", request(s, T0 + dt.timedelta(milliseconds=i), text=f"SELECT {i}"))
        assert store.submit("approval", approval("a1", "requested"))
        assert store.submit("approval", approval("a1", "approved", T0 + dt.timedelta(seconds=2)))
        assert store.submit("recording", recording(s, 1))
        assert store.submit("session_end", session_end(s, T0 + dt.timedelta(seconds=5)))
    return {"session_id": s}


# --- an independent implementation of the documented hash (docs/audit-schema.md) ----

def documented_hash(prev: bytes, table: str, row: dict[str, Any]) -> bytes:
    doc = {}
    for k, v in row.items():
        if v is None or k in ("chain_seq", "chain_prev", "chain_hash"):
            continue
        if isinstance(v, dt.datetime):
            v = (v - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1)
        elif isinstance(v, bytes):
            v = v.hex()
        doc[k] = v
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(prev + table.encode() + b"\n" + text.encode()).digest()


def raw_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[dict[str, Any]]:
    cur = con.execute(f"SELECT * FROM {table} ORDER BY chain_seq")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]
