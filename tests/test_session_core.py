"""SessionCore's protocol-neutral parts that need no server: recording rows."""
from __future__ import annotations

import asyncio

from analytics.schema import KINDS, normalize
from appliance.fronts.session import SessionCore


class _Services:
    def __init__(self) -> None:
        self.rows: list[tuple[str, dict]] = []

    def audit(self, kind: str, record: dict) -> None:
        self.rows.append((kind, dict(record)))


def _core(services: _Services) -> SessionCore:
    return SessionCore(services, target="db", protocol="postgres", target_addr="127.0.0.1:5432",
                       spawn=lambda coro, name: asyncio.ensure_future(coro), terminate=lambda c, m: None)


def test_record_writes_numbered_rows_the_audit_schema_accepts():
    services = _Services()
    core = _core(services)
    core.record("out", b"before the session has an id")  # nothing to attach it to: dropped
    core.session_id = "s-1"
    core.record("event", b'{"type":"pty","width":80,"height":24}')
    core.record("in", b"ls\r")
    core.record("out", b"")  # empty chunks are not rows
    core.record("out", b"file\r\n")
    assert [(k, r["direction"], r["seq"], r["data"]) for k, r in services.rows] == [
        ("recording", "event", 1, b'{"type":"pty","width":80,"height":24}'),
        ("recording", "in", 2, b"ls\r"),
        ("recording", "out", 3, b"file\r\n"),
    ]
    for kind, rec in services.rows:
        row, unknown = normalize(KINDS[kind], rec)
        assert unknown == [] and rec["session_id"] == "s-1"
