"""AuditStore: records round-trip, validation, back-pressure, durability, no content in logs."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import uuid

import duckdb
import pytest

import analytics
from analytics import AuditClosedError, AuditRecordError, AuditStore

from .audit_fixtures import (
    T0, approval, probe, raw_rows, recording, request, session_end, session_start, sid,
)


def test_every_kind_is_stored_as_given(tmp_path):
    path = tmp_path / "a.duckdb"
    s = sid()
    given = {
        "session_starts": session_start(s),
        "requests": request(s, T0 + dt.timedelta(microseconds=7), params=["'***'", None, ""],
                            masked={"ssn": 3, "email": 1}, duration_ms=2),
        "approvals": approval("ap", "approved", operator="alice", operator_uid=1000, waited_ms=12.5,
                              window_s=300, request_id="r", session_id=s, reason="ok"),
        "probes": probe(),
        "recordings": recording(s, 9, data=bytes(range(256))),
        "session_ends": session_end(s, error="boom", outcome="error"),
    }
    kinds = {"session_starts": "session_start", "requests": "request", "approvals": "approval",
             "probes": "probe", "recordings": "recording", "session_ends": "session_end"}
    with AuditStore(path, strict=True) as store:
        for table, rec in given.items():
            assert store.submit(kinds[table], rec) is True
    con = duckdb.connect(str(path), read_only=True)
    try:
        for table, rec in given.items():
            rows = raw_rows(con, table)
            assert len(rows) == 1
            for k, v in rec.items():
                if k == "duration_ms":
                    v = float(v)
                assert rows[0][k] == v, (table, k)
    finally:
        con.close()


def test_a_column_null_in_every_row_of_a_batch_is_stored_null_and_verifies(tmp_path):
    """The writer leaves a column that is NULL in every row of a batch out of its INSERT (issue 20):
    those rows read back NULL there, a batch where the same column is mixed keeps every value, and
    the chain (which hashes the NULLs) verifies."""
    path = tmp_path / "a.duckdb"
    s = sid()
    all_null = [request(s, rule=None, error=None, masked=None, params=None) for _ in range(3)]
    mixed = [request(s, rule="r1", masked={"ssn": 2}, params=["1"]), request(s, rule=None, masked=None, params=None)]
    with AuditStore(path, strict=True) as store:
        for r in all_null:
            assert store.submit("request", r) is True
        store.flush()  # committed: the next ones are another batch
        for r in mixed:
            assert store.submit("request", r) is True
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = raw_rows(con, "requests")
    finally:
        con.close()
    assert len(rows) == 5
    for got, rec in zip(rows, all_null + mixed):
        for k in ("request_id", "rule", "error", "masked", "params", "text"):
            assert got[k] == rec.get(k), k
    assert [r["rule"] for r in rows] == [None, None, None, "r1", None]
    assert rows[3]["masked"] == {"ssn": 2} and rows[3]["params"] == ["1"]
    assert analytics.verify(path).clean


def test_sessions_view_joins_start_and_end(tmp_path):
    path = tmp_path / "a.duckdb"
    open_s, closed_s = sid(), sid()
    with AuditStore(path, strict=True) as store:
        store.submit("session_start", session_start(open_s))
        store.submit("session_start", session_start(closed_s, exe="/usr/bin/python3"))
        store.submit("session_end", session_end(closed_s, T0 + dt.timedelta(seconds=3), bytes_in=5, bytes_out=6))
        store.flush()
        cols, rows = store.query("SELECT session_id, outcome, bytes_in, bytes_out, ended_at - started_at "
                                 "FROM sessions ORDER BY outcome")
    assert rows == [(closed_s, "ok", 5, 6, dt.timedelta(seconds=3)), (open_s, "open", None, None, None)]


@pytest.mark.parametrize("kind, record, field", [
    ("request", {"request_id": "r", "session_id": "s", "protocol": "postgres"}, "ts"),
    ("request", {"request_id": "r", "session_id": "s", "protocol": "pg", "ts": dt.datetime(2026, 1, 1)}, "ts"),
    ("request", {"request_id": "r", "session_id": "s", "protocol": "pg", "ts": T0, "rows": "3"}, "rows"),
    ("request", {"request_id": "r", "session_id": "s", "protocol": "pg", "ts": T0, "decision": "maybe"}, "decision"),
    ("request", {"request_id": "r", "session_id": "s", "protocol": "pg", "ts": T0, "params": [1]}, "params"),
    ("recording", {"session_id": "s", "seq": 1, "ts": T0, "direction": "in", "data": "text"}, "data"),
    ("session_start", {"session_id": "s", "ts": T0, "target": "t", "protocol": "p", "tls": 1}, "tls"),
])
def test_malformed_records_raise_naming_the_field(tmp_path, kind, record, field):
    with AuditStore(tmp_path / "a.duckdb", strict=True) as store:
        with pytest.raises(AuditRecordError, match=rf"{kind}\.{field}"):
            store.submit(kind, record)
        with pytest.raises(AuditRecordError, match="unknown audit event kind"):
            store.submit("writer_event", {"ts": T0, "event": "writer_stop"})
        assert store.stats()["submitted"] == 0


def test_unknown_fields_error_when_strict_and_dropped_with_a_warning_otherwise(tmp_path, caplog):
    s = sid()
    with AuditStore(tmp_path / "strict.duckdb", strict=True) as store:
        with pytest.raises(AuditRecordError, match="extra"):
            store.submit("session_end", session_end(s, extra="x"))
    caplog.set_level(logging.WARNING, logger="analytics")
    with AuditStore(tmp_path / "lenient.duckdb") as store:
        assert store.submit("session_end", session_end(s, extra="x"))
        store.flush()
        assert store.query("SELECT count(*) FROM session_ends")[1] == [(1,)]
    assert any("extra" in r.getMessage() for r in caplog.records)


def test_submit_outside_start_close_raises(tmp_path):
    store = AuditStore(tmp_path / "a.duckdb")
    with pytest.raises(AuditClosedError):
        store.submit("probe", probe())
    store.start()
    with pytest.raises(AuditRecordError, match="mapping"):
        store.submit("probe", [("ts", T0)])
    store.close()
    with pytest.raises(AuditClosedError):
        store.submit("probe", probe())
    with pytest.raises(analytics.AuditError, match="new one"):
        store.start()


def _hold_writer(store: AuditStore) -> tuple[threading.Event, threading.Event, threading.Thread]:
    """Occupy the writer thread until the returned event is set, so the queue fills."""
    held, release = threading.Event(), threading.Event()

    def task(con, chain):
        held.set()
        release.wait(60)

    t = threading.Thread(target=store.run_in_writer, args=(task,), daemon=True)
    t.start()
    assert held.wait(30)
    return held, release, t


def test_refuse_policy_returns_false_when_full_and_loses_nothing_accepted(tmp_path):
    path = tmp_path / "a.duckdb"
    s = sid()
    with AuditStore(path, strict=True, queue_max=500, batch_max=100, on_full="refuse") as store:
        _, release, t = _hold_writer(store)
        accepted, refused = [], 0
        for i in range(800):
            rec = request(s, request_id=f"r{i}")
            if store.submit("request", rec):
                accepted.append(rec["request_id"])
            else:
                refused += 1
        assert len(accepted) == 500 and refused == 300
        assert store.healthy is False            # over the high-water mark
        release.set()
        t.join(30)
        store.flush()
        assert store.healthy is True
        assert store.submit("request", request(s, request_id="after"))
        store.flush()
        _, rows = store.query("SELECT request_id FROM requests ORDER BY chain_seq")
    assert [r[0] for r in rows] == accepted + ["after"]
    assert analytics.verify(path).clean


def test_submit_rows_queues_in_order_and_counts_what_a_full_queue_refused(tmp_path):
    path = tmp_path / "a.duckdb"
    s = sid()
    with AuditStore(path, strict=True, queue_max=500, batch_max=100, on_full="refuse") as store:
        _, release, t = _hold_writer(store)
        items = [store.validate("request", request(s, request_id=f"r{i}")) for i in range(800)]
        assert store.submit_rows(items[:450]) == 0
        assert store.submit_rows(items[450:]) == 300   # 50 fit, the rest refused
        assert store.stats()["refused"] == 300
        release.set()
        t.join(30)
        store.flush()
        _, rows = store.query("SELECT request_id FROM requests ORDER BY chain_seq")
    assert [r[0] for r in rows] == [f"r{i}" for i in range(500)]
    assert analytics.verify(path).clean


def test_block_policy_waits_for_room(tmp_path):
    path = tmp_path / "a.duckdb"
    s = sid()
    with AuditStore(path, strict=True, queue_max=50, batch_max=10, on_full="block") as store:
        _, release, t = _hold_writer(store)
        done = threading.Event()

        def producer():
            for i in range(120):
                assert store.submit("request", request(s, request_id=f"r{i}"))
            done.set()

        p = threading.Thread(target=producer, daemon=True)
        p.start()
        # The producer fills the queue and then waits; nothing is refused.
        while store.stats()["pending"] < 50:
            threading.Event().wait(0.01)
        assert not done.is_set()
        release.set()
        t.join(30)
        assert done.wait(30)
        store.flush()
        _, rows = store.query("SELECT request_id FROM requests ORDER BY chain_seq")
        assert store.stats()["refused"] == 0
    assert [r[0] for r in rows] == [f"r{i}" for i in range(120)]


def test_many_producers_under_load_nothing_accepted_is_lost(tmp_path):
    path = tmp_path / "a.duckdb"
    accepted: list[list[str]] = [[] for _ in range(4)]
    with AuditStore(path, strict=True, queue_max=2000, batch_max=500, flush_interval=0.01) as store:
        def producer(n: int) -> None:
            s = sid()
            for i in range(5000):
                rid = f"p{n}-{i}"
                if store.submit("request", request(s, request_id=rid)):
                    accepted[n].append(rid)

        threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = store.stats()
    con = duckdb.connect(str(path), read_only=True)
    try:
        stored = [r[0] for r in con.execute("SELECT request_id FROM requests ORDER BY chain_seq").fetchall()]
    finally:
        con.close()
    assert sorted(stored) == sorted(sum(accepted, []))
    assert stats["refused"] == 20000 - len(stored)
    for n in range(4):  # each producer's events keep their order
        assert [r for r in stored if r.startswith(f"p{n}-")] == accepted[n]
    assert analytics.verify(path).clean


def test_flush_makes_events_durable_for_other_readers(tmp_path):
    path = tmp_path / "a.duckdb"
    s = sid()
    with AuditStore(path, strict=True, flush_interval=60, batch_max=10_000) as store:
        store.submit("session_start", session_start(s))
        store.flush()
        # The batch window is a minute: only flush() can have written it.
        assert store.query("SELECT count(*) FROM session_starts")[1] == [(1,)]


def _threads(cur) -> int:
    try:
        return cur.execute("SELECT current_setting('threads')").fetchone()[0]
    finally:
        cur.close()


def test_the_writer_keeps_to_its_threads_and_an_operators_read_gets_every_cpu(tmp_path):
    """audit.threads (issue 20): inserts and checkpoints use ``threads``; a query, a verify or a
    report raises DuckDB to a thread per CPU while it runs, and the writer's count returns after."""
    cpus = os.cpu_count() or 1
    s = sid()
    with AuditStore(tmp_path / "a.duckdb", strict=True, threads=1, flush_interval=0.01) as store:
        assert _threads(store.cursor()) == 1
        for i in range(50):
            assert store.submit("request", request(s, request_id=f"r{i}"))
        store.flush()
        assert store.query("SELECT current_setting('threads'), count(*) FROM requests")[1] == [(cpus, 50)]
        assert _threads(store.cursor()) == 1
        with analytics.db.reader(store) as cur, store.reading() as other:
            assert _threads(store.cursor()) == cpus
            assert cur.execute("SELECT count(*) FROM requests").fetchone() == (50,)
            assert other.execute("SELECT count(*) FROM requests").fetchone() == (50,)
        assert _threads(store.cursor()) == 1   # back once the last of the two ended
        assert store.verify().clean
        assert _threads(store.cursor()) == 1
        _, rows = analytics.reports.run_report(store, analytics.reports.list_reports()[0].name)
        assert _threads(store.cursor()) == 1
    with AuditStore(tmp_path / "b.duckdb", threads=cpus + 2) as store:  # more than the CPUs: kept for reads too
        assert _threads(store.cursor()) == cpus + 2
        assert store.query("SELECT current_setting('threads')")[1] == [(cpus + 2,)]
    with pytest.raises(analytics.AuditError, match="threads"):
        AuditStore(tmp_path / "c.duckdb", threads=0)


def test_store_never_logs_or_echoes_record_contents(tmp_path, caplog):
    secret = "SECRET-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "a.duckdb"
    s = sid()
    errors = []
    with AuditStore(path) as store:
        store.submit("session_start", session_start(s, lease_id=secret, extra_field=secret))
        store.submit("request", request(s, text=f"SELECT '{secret}'", params=[secret], error=secret))
        store.submit("recording", recording(s, 1, data=secret.encode()))
        for bad in ({"rows": secret}, {"ts": secret}, {"decision": secret}, {"params": [secret, 1]}):
            with pytest.raises(AuditRecordError) as e:
                store.submit("request", request(s, **bad))
            errors.append(str(e.value))
        store.flush()
        store.verify()
    analytics.verify(path)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "extra_field" in logged        # the warning names the field...
    assert secret not in logged           # ...but no value appears anywhere
    assert all(secret not in e for e in errors)
    # and the store keeps what the producer gave it (masking is the producer's job)
    _, rows = analytics.query_readonly(path, "SELECT text, params, error FROM requests")
    assert rows == [(f"SELECT '{secret}'", [secret], secret)]
    _, rows = analytics.query_readonly(path, "SELECT data FROM recordings")
    assert rows == [(secret.encode(),)]


def test_schema_doc_lists_every_column_with_its_type():
    from pathlib import Path

    from analytics import schema

    doc = (Path(__file__).resolve().parent.parent / "docs" / "audit-schema.md").read_text()
    assert f"version **{schema.SCHEMA_VERSION}**" in doc
    for kind in schema.KINDS.values():
        section = doc.split(f"### {kind.table} ", 1)[1].split("\n### ", 1)[0]
        documented = {}
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 2 and cells[0] not in ("column", "") and not cells[0].startswith("---"):
                documented[cells[0]] = cells[1]
        assert documented == {f.name: schema.SQL_TYPES[f.type] for f in kind.fields}, kind.table


def test_commit_failures_refuse_new_events_and_lose_none(tmp_path):
    path = tmp_path / "a.duckdb"
    s = sid()
    with AuditStore(path, strict=True, flush_interval=0.01) as store:
        assert store.submit("request", request(s, request_id="before"))
        store.flush()
        # Break the real table under the writer: its inserts now fail in DuckDB.
        admin = store.cursor()
        admin.execute("ALTER TABLE requests RENAME TO requests_away")
        assert store.submit("request", request(s, request_id="during"))
        with pytest.raises(analytics.AuditFlushTimeout, match="not durable"):
            store.flush(timeout=1.0)
        assert store.healthy is False
        assert store.submit("request", request(s, request_id="refused")) is False
        admin.execute("ALTER TABLE requests_away RENAME TO requests")
        admin.close()
        store.flush(timeout=30)      # the kept batch is retried and lands
        assert store.healthy is True
        assert store.submit("request", request(s, request_id="after"))
        store.flush()
        _, rows = store.query("SELECT request_id FROM requests ORDER BY chain_seq")
    assert [r[0] for r in rows] == ["before", "during", "after"]
    assert analytics.verify(path).clean
