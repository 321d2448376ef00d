"""Integrity chain, tamper detection, migrations, crash recovery, retention, export."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import analytics
from analytics import AuditStore, AuditStoreBusy

from .audit_fixtures import T0, UTC, documented_hash, populate, raw_rows, request, session_start, sid

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("session_starts", "session_ends", "requests", "approvals", "probes", "recordings", "writer_events")


def _seq_of(con, table: str, text: str) -> int:
    return con.execute(f"SELECT chain_seq FROM {table} WHERE text = ?", [text]).fetchone()[0]


@pytest.fixture
def audit_file(tmp_path) -> Path:
    path = tmp_path / "audit.duckdb"
    populate(path)
    return path


def test_clean_file_verifies_and_hashes_follow_the_documented_algorithm(audit_file):
    report = analytics.verify(audit_file)
    assert report.ok and report.clean and report.problems == [] and report.gaps == []
    con = duckdb.connect(str(audit_file), read_only=True)
    try:
        rows = sorted(((r["chain_seq"], t, r) for t in TABLES for r in raw_rows(con, t)), key=lambda x: x[0])
    finally:
        con.close()
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert report.rows_checked == len(rows) and report.head_seq == len(rows)
    prev = bytes(32)
    for _, table, row in rows:
        assert row["chain_prev"] == prev
        assert documented_hash(prev, table, row) == row["chain_hash"], (table, row["chain_seq"])
        prev = row["chain_hash"]
    assert report.head_hash == prev.hex()


@settings(max_examples=300, deadline=None)
@example('{"data":""}', 1, "in", b"\x00\"", bytes(32))
@given(st.text(max_size=30), st.integers(0, 2**40), st.sampled_from(["in", "out", "event"]),
       st.one_of(st.none(), st.binary(max_size=300)), st.binary(min_size=32, max_size=32))
def test_the_writers_recording_hash_is_the_documented_one(session_id, seq, direction, data, prev):
    """The writer hashes a recording's BLOB without its canonical JSON (analytics.chain.
    compile_row_hasher); what it hashes must be the documented bytes, whatever the other values hold
    (quotes, a ``"data":""`` of their own) and with or without data."""
    from analytics.schema import KINDS, normalize

    kind = KINDS["recording"]
    row, _ = normalize(kind, {"session_id": session_id, "seq": seq, "ts": T0, "direction": direction, "data": data})
    assert kind.hash_row(prev, row) == documented_hash(prev, "recordings", {**dict(zip(kind.names, row)), "ts": T0})


def test_a_blob_hash_falls_back_to_the_canonical_json_when_its_key_is_found_twice():
    from analytics.chain import canonical, compile_row_hasher, row_hash

    hasher = compile_row_hasher(("data", "meta"), ("data",), b"t\n")
    row = (b"\x01\x02", {"data": ""})   # a map with a key named like the BLOB: "data":"" twice
    assert hasher(bytes(32), row) == row_hash(bytes(32), "t", canonical(("data", "meta"), row, frozenset({"data"})))


def _tamper(path: Path, *sql_and_params) -> None:
    con = duckdb.connect(str(path))
    try:
        for sql, params in sql_and_params:
            con.execute(sql, params)
    finally:
        con.close()


def test_edit_is_reported_as_modified(audit_file):
    con = duckdb.connect(str(audit_file))
    seq = _seq_of(con, "requests", "SELECT 7")
    con.close()
    _tamper(audit_file, ("UPDATE requests SET decision = 'allow' WHERE chain_seq = ?", [seq]))
    report = analytics.verify(audit_file)
    assert not report.ok
    assert [(p.table, p.seq, p.kind) for p in report.problems] == [("requests", seq, "modified")]


def test_edit_with_recomputed_hash_is_reported_as_modified(audit_file):
    con = duckdb.connect(str(audit_file))
    seq = _seq_of(con, "requests", "SELECT 7")
    row = [r for r in raw_rows(con, "requests") if r["chain_seq"] == seq][0]
    row["decision"] = "allow"
    forged = documented_hash(row["chain_prev"], "requests", row)
    con.execute("UPDATE requests SET decision = 'allow', chain_hash = ? WHERE chain_seq = ?", [forged, seq])
    con.close()
    report = analytics.verify(audit_file)
    assert not report.ok
    assert [(p.table, p.seq, p.kind) for p in report.problems] == [("requests", seq, "modified")]


def test_delete_is_reported_as_deleted(audit_file):
    con = duckdb.connect(str(audit_file))
    seq = _seq_of(con, "requests", "SELECT 7")
    con.close()
    _tamper(audit_file, ("DELETE FROM requests WHERE chain_seq IN (?, ?)", [seq, seq + 1]))
    report = analytics.verify(audit_file)
    assert not report.ok
    assert [(p.seq, p.kind) for p in report.problems] == [(seq, "deleted")]
    assert f"seq {seq}..{seq + 1}" in report.problems[0].detail


def test_insert_with_a_taken_sequence_number_is_reported_as_inserted(audit_file):
    con = duckdb.connect(str(audit_file))
    seq = _seq_of(con, "requests", "SELECT 7")
    con.execute("INSERT INTO requests SELECT * REPLACE ('DROP TABLE people' AS text, 'forged' AS request_id) "
                "FROM requests WHERE chain_seq = ?", [seq])
    con.close()
    report = analytics.verify(audit_file)
    assert not report.ok
    assert len(report.problems) == 1
    p = report.problems[0]
    assert (p.table, p.seq, p.kind) == ("requests", seq, "inserted")


def test_insert_at_the_end_is_reported_as_inserted(audit_file):
    con = duckdb.connect(str(audit_file))
    head = con.execute("SELECT max(chain_seq) FROM chain").fetchone()[0]
    con.execute("INSERT INTO requests SELECT * REPLACE (? AS chain_seq, 'forged' AS request_id) "
                "FROM requests WHERE text = 'SELECT 3'", [head + 1])
    con.close()
    report = analytics.verify(audit_file)
    assert [(p.table, p.seq, p.kind) for p in report.problems] == [("requests", head + 1, "inserted")]


def test_reorder_is_reported_as_reordered(audit_file):
    con = duckdb.connect(str(audit_file))
    a, b = _seq_of(con, "requests", "SELECT 4"), _seq_of(con, "requests", "SELECT 5")
    con.execute("UPDATE requests SET chain_seq = CASE chain_seq WHEN ? THEN ? ELSE ? END "
                "WHERE chain_seq IN (?, ?)", [a, b, a, a, b])
    con.close()
    report = analytics.verify(audit_file)
    assert not report.ok
    kinds = {p.kind for p in report.problems}
    assert kinds == {"reordered"}
    assert {a, b} <= {p.seq for p in report.problems}


def test_tampering_a_writer_marker_is_caught_too(audit_file):
    _tamper(audit_file, ("DELETE FROM writer_events WHERE event = 'writer_stop'", []))
    report = analytics.verify(audit_file)
    # Truncating the tail removes the epoch's stop row: the epoch shows as unclean.
    assert [g.epoch for g in report.gaps] == [1] and not report.clean


# --- migrations -------------------------------------------------------------

V1_DDL = """
CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL, description VARCHAR NOT NULL);
CREATE TABLE session_starts (chain_seq BIGINT NOT NULL, chain_prev BLOB NOT NULL, chain_hash BLOB NOT NULL,
  session_id VARCHAR, ts TIMESTAMPTZ, target VARCHAR, protocol VARCHAR, identity VARCHAR, token_subject VARCHAR,
  client_addr VARCHAR, target_addr VARCHAR, pid BIGINT, uid BIGINT, gid BIGINT, cgroup_id BIGINT, exe VARCHAR,
  comm VARCHAR, credential_user VARCHAR, lease_id VARCHAR, tls BOOLEAN);
CREATE TABLE session_ends (chain_seq BIGINT NOT NULL, chain_prev BLOB NOT NULL, chain_hash BLOB NOT NULL,
  session_id VARCHAR, ts TIMESTAMPTZ, bytes_in BIGINT, bytes_out BIGINT, outcome VARCHAR, error VARCHAR);
CREATE TABLE requests (chain_seq BIGINT NOT NULL, chain_prev BLOB NOT NULL, chain_hash BLOB NOT NULL,
  request_id VARCHAR, session_id VARCHAR, ts TIMESTAMPTZ, protocol VARCHAR, kind VARCHAR, text VARCHAR,
  params VARCHAR[], decision VARCHAR, rule VARCHAR, reason VARCHAR, duration_ms DOUBLE, rows BIGINT, error VARCHAR);
CREATE TABLE approvals (chain_seq BIGINT NOT NULL, chain_prev BLOB NOT NULL, chain_hash BLOB NOT NULL,
  approval_id VARCHAR, ts TIMESTAMPTZ, event VARCHAR, request_id VARCHAR, session_id VARCHAR, identity VARCHAR,
  target VARCHAR, rule VARCHAR, operator VARCHAR, operator_uid BIGINT, reason VARCHAR, waited_ms DOUBLE, window_s BIGINT);
CREATE TABLE recordings (chain_seq BIGINT NOT NULL, chain_prev BLOB NOT NULL, chain_hash BLOB NOT NULL,
  session_id VARCHAR, seq BIGINT, ts TIMESTAMPTZ, direction VARCHAR, data BLOB);
CREATE TABLE writer_events (chain_seq BIGINT NOT NULL, chain_prev BLOB NOT NULL, chain_hash BLOB NOT NULL,
  ts TIMESTAMPTZ, event VARCHAR, epoch BIGINT, pid BIGINT, host VARCHAR, schema_version BIGINT, batch_max BIGINT,
  flush_interval DOUBLE, queue_max BIGINT, "rows" BIGINT, detail VARCHAR);
INSERT INTO schema_version VALUES (1, TIMESTAMPTZ '2026-01-01 00:00:00+00', 'initial');
"""


def _insert_v1(con, table: str, seq: int, prev: bytes, row: dict) -> bytes:
    h = documented_hash(prev, table, row)
    cols = ", ".join(["chain_seq", "chain_prev", "chain_hash"] + [f'"{k}"' for k in row])
    marks = ", ".join("?" * (len(row) + 3))
    con.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", [seq, prev, h, *row.values()])
    return h


def test_v1_file_is_migrated_and_still_verifies(tmp_path):
    path = tmp_path / "v1.duckdb"
    s = sid()
    con = duckdb.connect(str(path))
    con.execute(V1_DDL)
    h = _insert_v1(con, "writer_events", 1, bytes(32), {"ts": T0, "event": "writer_start", "epoch": 1,
                                                        "pid": 1, "schema_version": 1})
    h = _insert_v1(con, "session_starts", 2, h, {"session_id": s, "ts": T0, "target": "db", "protocol": "postgres",
                                                 "identity": "bot", "pid": 10, "tls": False})
    h = _insert_v1(con, "requests", 3, h, {"request_id": "r1", "session_id": s, "ts": T0, "protocol": "postgres",
                                           "text": "SELECT 1", "params": ["a", None], "duration_ms": 0.25,
                                           "decision": "allow"})
    h = _insert_v1(con, "writer_events", 4, h, {"ts": T0, "event": "writer_stop", "epoch": 1, "rows": 2})
    con.close()
    assert analytics.verify(path).clean  # verify reads the old layout as it is

    with AuditStore(path, strict=True) as store:
        assert store.migrations == [(v - 1, v) for v in range(2, analytics.SCHEMA_VERSION + 1)]
        assert store.epoch == 2
        store.submit("request", request(s, masked={"ssn": 1}, sqlstate="00000"))
        store.submit("probe", {"ts": T0, "event": "attached"})
        store.flush()
        assert store.query("SELECT max(version) FROM schema_version")[1] == [(analytics.SCHEMA_VERSION,)]
        assert store.query("SELECT request_id, masked FROM requests ORDER BY chain_seq")[1][0] == ("r1", None)
        assert store.query("SELECT count(*) FROM sessions WHERE identity = 'bot'")[1] == [(1,)]
    report = analytics.verify(path)
    assert report.clean and report.schema_version == analytics.SCHEMA_VERSION and report.epochs == 2
    _, rows = analytics.query_readonly(path, "SELECT event, detail FROM writer_events ORDER BY chain_seq")
    assert ("migration", "schema 1 -> 2") in rows


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "a.duckdb"
    populate(path, n_requests=1)
    _tamper(path, ("INSERT INTO schema_version VALUES (99, now(), 'future')", []))
    with pytest.raises(analytics.AuditSchemaError, match="99"):
        AuditStore(path).start()


# --- kill -9 ----------------------------------------------------------------

CHILD = textwrap.dedent("""
    import datetime as dt, sys
    from analytics import AuditStore
    store = AuditStore(sys.argv[1], batch_max=200, flush_interval=0.05)
    store.start()
    ts = dt.datetime.now(dt.timezone.utc)
    store.submit("session_start", {"session_id": "s", "ts": ts, "target": "db", "protocol": "postgres"})
    i = 0
    while True:
        assert store.submit("request", {"request_id": str(i), "session_id": "s", "ts": ts, "protocol": "postgres"})
        if i % 500 == 499:
            store.flush()
            print(i, flush=True)
        i += 1
""")


def test_kill_9_loses_at_most_the_unflushed_tail_and_the_gap_is_reported(tmp_path):
    path = tmp_path / "crash.duckdb"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env,
                             cwd=ROOT, text=True)
    try:
        flushed = -1
        while flushed < 3000:
            line = child.stdout.readline()
            assert line, "writer child exited early"
            flushed = int(line)
        # While it runs, the file is the daemon's: readers are told to go through it.
        with pytest.raises(AuditStoreBusy, match="daemon"):
            analytics.query_readonly(path, "SELECT 1")
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    report = analytics.verify(path)
    assert report.ok
    assert [g.epoch for g in report.gaps] == [1]
    assert "did not end cleanly" in str(report)
    _, rows = analytics.query_readonly(path, "SELECT CAST(request_id AS BIGINT) FROM requests ORDER BY chain_seq")
    ids = [r[0] for r in rows]
    # Everything flush() confirmed is there, in order, without holes.
    assert ids == list(range(len(ids)))
    assert len(ids) > flushed

    # The next writer starts a new epoch; the gap stays visible and now says when it ended.
    with AuditStore(path) as store:
        assert store.epoch == 2
    report = analytics.verify(path)
    assert report.ok and not report.clean
    assert [g.epoch for g in report.gaps] == [1]
    gap = report.gaps[0]
    assert gap.next_epoch_started_at is not None and gap.flush_interval == 0.05 and gap.batch_max == 200
    assert gap.last_seq == report.head_seq - 2  # epoch 2 wrote only its start and stop rows


# --- retention ----------------------------------------------------------------

def _old_and_new(path: Path, now: dt.datetime) -> tuple[str, str]:
    old_s, new_s = sid(), sid()
    with AuditStore(path, strict=True) as store:
        store.submit("session_start", session_start(old_s, now - dt.timedelta(days=40)))
        for i in range(5):
            store.submit("request", request(old_s, now - dt.timedelta(days=40), text=f"old {i}"))
        store.submit("session_start", session_start(new_s, now - dt.timedelta(days=1)))
        store.submit("request", request(new_s, now - dt.timedelta(days=1), text="new"))
    return old_s, new_s


def test_retention_removes_a_prefix_and_the_chain_still_verifies(tmp_path):
    path = tmp_path / "a.duckdb"
    now = dt.datetime.now(UTC)
    _old_and_new(path, now)
    # The epoch's writer_start row is dated now and comes first: retention only ever
    # removes a prefix of the chain, so nothing is older than 30 days before it.
    result = analytics.apply_retention(path, dt.timedelta(days=30))
    assert result.removed_rows == 0
    result = analytics.apply_retention(path, dt.timedelta(0))
    # one migration row per schema version (new file), writer start and stop, and the events
    assert result.removed == {"session_starts": 2, "requests": 6,
                              "writer_events": analytics.SCHEMA_VERSION + 2}
    report = analytics.verify(path)
    assert report.ok and report.anchor_seq == result.anchor_seq == 10 + analytics.SCHEMA_VERSION
    _, rows = analytics.query_readonly(path, "SELECT event, anchor_seq, removed_rows FROM writer_events")
    n = 10 + analytics.SCHEMA_VERSION
    assert rows == [("retention", n, n)]   # the checkpoint row is all that is left
    with AuditStore(path) as store:           # and writing continues from it
        store.submit("request", request(sid(), now))
    assert analytics.verify(path).clean


def test_retention_on_a_live_store_keeps_the_chain_verifiable(tmp_path):
    path = tmp_path / "a.duckdb"
    now = dt.datetime.now(UTC)
    old_s, new_s = sid(), sid()
    with AuditStore(path, strict=True) as store:
        for i in range(10):
            store.submit("request", request(old_s, now - dt.timedelta(days=40), text=f"old {i}"))
        store.submit("request", request(new_s, now + dt.timedelta(seconds=5), text="new"))
        store.submit("request", request(old_s, now - dt.timedelta(days=40), text="late old"))
        result = analytics.apply_retention(store, dt.timedelta(0))
        # the migration and writer_start rows precede the cutoff too, so they go with the prefix
        assert result.removed == {"requests": 10, "writer_events": analytics.SCHEMA_VERSION + 1}
        _, rows = store.query("SELECT text FROM requests ORDER BY chain_seq")
        assert rows == [("new",), ("late old",)]   # only a prefix of the chain is removed
        live_report = store.verify()
        assert live_report.ok and live_report.gaps == []   # the running epoch is not a gap
        store.submit("request", request(new_s, now, text="after"))
    report = analytics.verify(path)
    assert report.ok and report.gaps == [] and report.anchor_seq == result.anchor_seq
    # deleting the first kept row is still caught
    con = duckdb.connect(str(path))
    first = con.execute("SELECT min(chain_seq) FROM chain").fetchone()[0]
    con.execute("DELETE FROM requests WHERE chain_seq = ?", [first])
    con.close()
    assert [p.kind for p in analytics.verify(path).problems] == ["deleted"]


# --- export -------------------------------------------------------------------

def test_parquet_export_round_trips_with_hive_partitions(tmp_path):
    path = tmp_path / "a.duckdb"
    s = sid()
    day1 = dt.datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)
    day2 = dt.datetime(2026, 3, 2, 0, 0, 0, tzinfo=UTC)
    with AuditStore(path, strict=True) as store:
        store.submit("session_start", session_start(s, day1 - dt.timedelta(days=3)))
        for i in range(3):
            store.submit("request", request(s, day1, text=f"d1 {i}"))
        for i in range(2):
            store.submit("request", request(s, day2, text=f"d2 {i}", masked={"a": i}))
        store.flush()
        # the daemon exports from the live store the same way
        live = analytics.export_parquet(store, dt.date(2026, 3, 2), tmp_path / "live")
        live = [f for f in live if "table=requests" in str(f)]
        assert [str(f.relative_to(tmp_path / "live")) for f in live] == [
            "table=requests/day=2026-03-02/part-0.parquet"]
        assert duckdb.sql(f"SELECT text FROM '{live[0]}' ORDER BY chain_seq").fetchall() == [("d2 0",), ("d2 1",)]
    out = tmp_path / "export"
    files = analytics.export_parquet(path, dt.date(2026, 3, 1), out)
    rel = sorted(str(f.relative_to(out)) for f in files)
    assert "table=requests/day=2026-03-01/part-0.parquet" in rel
    assert "table=requests/day=2026-03-02/part-0.parquet" in rel
    assert not any("session_starts/day=2026-02-26" in r for r in rel)  # before `since`
    con = duckdb.connect()
    try:
        back = con.execute(
            f"SELECT day, text, ts, params, masked, chain_hash FROM read_parquet('{out}/table=requests/*/*.parquet', "
            "hive_partitioning = 1) ORDER BY chain_seq").fetchall()
        src = duckdb.connect(str(path), read_only=True)
        orig = src.execute("SELECT text, ts, params, masked, chain_hash FROM requests ORDER BY chain_seq").fetchall()
        src.close()
    finally:
        con.close()
    assert [r[1:] for r in back] == orig
    assert [str(r[0]) for r in back] == ["2026-03-01"] * 3 + ["2026-03-02"] * 2
    # exporting again replaces the day's file instead of duplicating rows
    analytics.export_parquet(path, dt.date(2026, 3, 1), out)
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/table=requests/*/*.parquet')").fetchall() == [(5,)]


# --- any single tampering is caught (property) ------------------------------------

@pytest.fixture(scope="module")
def template_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tpl") / "audit.duckdb"
    populate(path, n_requests=6)
    return path


def _all_rows(path: Path) -> list[tuple[str, int, dict]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return sorted(((t, r["chain_seq"], r) for t in TABLES for r in raw_rows(con, t)), key=lambda x: x[1])
    finally:
        con.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["null", "append", "delete", "swap", "duplicate"]), a=st.integers(0, 10_000),
       b=st.integers(0, 10_000), c=st.integers(0, 10_000))
def test_any_single_tampering_is_caught(tmp_path_factory, template_file, op, a, b, c):
    path = tmp_path_factory.mktemp("t") / "audit.duckdb"
    shutil.copy(template_file, path)
    rows = _all_rows(path)
    table, seq, row = rows[a % len(rows)]
    con = duckdb.connect(str(path))
    try:
        if op in ("null", "append"):
            cols = [k for k, v in row.items() if v is not None and not k.startswith("chain_")]
            if op == "append":
                cols = [k for k in cols if isinstance(row[k], str)]
            col = cols[b % len(cols)]
            new = "NULL" if op == "null" else f"\"{col}\" || 'x'"
            con.execute(f'UPDATE {table} SET "{col}" = {new} WHERE chain_seq = ?', [seq])
        elif op == "delete":
            con.execute(f"DELETE FROM {table} WHERE chain_seq = ?", [seq])
        elif op == "swap":
            table2, seq2, _ = rows[b % len(rows)]
            if seq2 == seq:
                seq2 = rows[(b + 1) % len(rows)][1]
                table2 = rows[(b + 1) % len(rows)][0]
            con.execute(f"UPDATE {table} SET chain_seq = -1 WHERE chain_seq = ?", [seq])
            con.execute(f"UPDATE {table2} SET chain_seq = ? WHERE chain_seq = ?", [seq, seq2])
            con.execute(f"UPDATE {table} SET chain_seq = ? WHERE chain_seq = -1", [seq2])
        else:
            cols = [k for k, v in row.items() if isinstance(v, str)]
            col = cols[c % len(cols)]
            con.execute(f"INSERT INTO {table} SELECT * REPLACE (\"{col}\" || 'x' AS \"{col}\") "
                        "FROM {table} WHERE chain_seq = ?".replace("{table}", table), [seq])
    finally:
        con.close()
    report = analytics.verify(path)
    if op == "delete" and seq == rows[-1][1]:
        # removing the final writer_stop row leaves an intact, shorter chain: an unclean epoch
        assert report.ok and [g.epoch for g in report.gaps] == [1]
    else:
        assert not report.ok, (op, table, seq)
        assert report.problems


# --- truncation and per-session completeness (issue 26.5, issue 23) ------------------------------

def _verify_cli(path: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(tmp_path / "none.toml"),
                           "--socket", str(tmp_path / "no-daemon.sock"), "audit", "--path", str(path), "verify",
                           *extra], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})


def _two_epochs(path: Path) -> int:
    """Epoch 1 with 300 requests, epoch 2 with 40, written through the daemon's handle (which keeps
    the high-water file beside the store). Returns the head seq."""
    from appliance.auditproc import AuditProcess

    s = sid()
    for n in (300, 40):
        p = AuditProcess(path, flush_interval=0.02, highwater=True)
        p.start()
        p.account_previous_crash()
        for i in range(n):
            assert p.submit("request", request(s, text=f"SELECT {i}", seq=i + 1 if n == 300 else 300 + i + 1))
        p.close()
    con = duckdb.connect(str(path))
    head = con.execute("SELECT max(chain_seq) FROM chain").fetchone()[0]
    con.close()
    return head


def test_a_truncated_tail_fails_verify_with_the_size_of_the_cut(tmp_path):
    """Deleting the last 100 rows (all of epoch 2 and the end of epoch 1, its stop row with it):
    verify FAILS, says how many rows are gone (the high-water file saw the head), and exits 1;
    --allow-gaps accepts it (exit 0) and still prints the gap."""
    path = tmp_path / "a.duckdb"
    head = _two_epochs(path)
    assert analytics.verify(path).clean and _verify_cli(path, tmp_path).returncode == 0
    con = duckdb.connect(str(path))
    for table in analytics.schema.CHAINED_TABLES:
        con.execute(f"DELETE FROM {table} WHERE chain_seq > ?", [head - 100])
    con.close()
    report = analytics.verify(path)
    assert report.ok and not report.clean and report.epochs == 1
    assert [g.epoch for g in report.gaps] == [1] and report.gaps[0].missing == 100
    res = _verify_cli(path, tmp_path)
    assert res.returncode == 1, res.stdout
    assert res.stdout.startswith("FAILED") and "At least 100 committed row(s) after it are gone" in res.stdout
    allowed = _verify_cli(path, tmp_path, "--allow-gaps")
    assert allowed.returncode == 0 and "allowed by --allow-gaps" in allowed.stdout, allowed.stdout


def _cut_epoch_2(path: Path) -> int:
    """Delete epoch 2's rows exactly (from its writer_start on); returns that row's seq."""
    con = duckdb.connect(str(path))
    try:
        start2 = con.execute("SELECT chain_seq FROM writer_events WHERE event = 'writer_start' AND epoch = 2"
                             ).fetchone()[0]
        for table in analytics.schema.CHAINED_TABLES:
            con.execute(f"DELETE FROM {table} WHERE chain_seq >= ?", [start2])
    finally:
        con.close()
    return start2


def test_a_whole_last_epoch_cut_at_its_boundary_fails_verify(tmp_path):
    """The rows of epoch 2 exactly: epoch 1 still ends with its stop row and the chain is intact,
    but the high-water file knows the head was further: a deletion, FAILED even with --allow-gaps."""
    path = tmp_path / "a.duckdb"
    head = _two_epochs(path)
    start2 = _cut_epoch_2(path)
    report = analytics.verify(path)
    assert not report.ok and [p.kind for p in report.problems] == ["deleted"]
    assert f"{head - start2 + 1} row(s) cut off the end" in report.problems[0].detail
    assert _verify_cli(path, tmp_path, "--allow-gaps").returncode == 1


def test_a_row_chained_after_the_last_stop_row_lies_outside_any_epoch_and_fails(tmp_path):
    """A row appended after the last writer_stop, properly chained (its hash recomputed): the chain
    is intact, but the row lies outside any writer epoch."""
    from analytics.chain import canonical, row_hash

    path = tmp_path / "a.duckdb"
    _two_epochs(path)
    # Append a well-chained forged request after epoch 2's stop row.
    con = duckdb.connect(str(path))
    seq, h = con.execute("SELECT chain_seq, chain_hash FROM chain ORDER BY chain_seq DESC LIMIT 1").fetchone()
    con.execute("INSERT INTO requests SELECT * REPLACE (? AS chain_seq, ? AS chain_prev, 'forged' AS request_id) "
                "FROM requests WHERE seq = 1", [seq + 1, bytes(h)])
    cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'requests' "
                                      "ORDER BY column_index").fetchall()]
    names = [c for c in cols if c not in analytics.schema.CHAIN_COLUMNS]
    exprs = [f'epoch_us("{n}")' if n == "ts" else f'"{n}"' for n in names]
    row = con.execute(f"SELECT {', '.join(exprs)} FROM requests WHERE chain_seq = ?", [seq + 1]).fetchone()
    con.execute("UPDATE requests SET chain_hash = ? WHERE chain_seq = ?",
                [row_hash(bytes(h), "requests", canonical(names, row, frozenset())), seq + 1])
    con.close()
    report = analytics.verify(path)
    assert not report.ok
    assert any(p.kind == "inserted" and "outside any writer epoch" in p.detail for p in report.problems), report.text()
    assert _verify_cli(path, tmp_path).returncode == 1


def test_requests_a_session_end_counts_but_the_store_lacks_are_a_gap_with_its_size(tmp_path):
    """A session whose end counts 12 requests and whose store has 10: 2 events missing."""
    path = tmp_path / "a.duckdb"
    s = sid()
    with AuditStore(path, strict=True) as store:
        store.submit("session_start", session_start(s))
        for i in range(1, 11):
            store.submit("request", request(s, text=f"SELECT {i}", seq=i))
        store.submit("session_end", {"session_id": s, "ts": T0, "outcome": "ok", "requests": 12})
    report = analytics.verify(path)
    # The session's end counts 12 requests; 10 are on record: the last two are missing.
    assert report.ok and [(g.session_id, g.missing) for g in report.session_gaps] == [(s, 2)]
    assert "its session end counts 12 requests, the last on record is 10" in report.text()
    assert not report.passes() and report.passes(allow_gaps=True)


def _rechain_from(con, seq: int) -> None:
    """Recompute chain_prev/chain_hash of every row from ``seq`` on (what a forger able to rewrite
    the file would do after changing a row)."""
    from analytics.chain import canonical, row_hash

    prev = bytes(con.execute("SELECT chain_hash FROM chain WHERE chain_seq = ?", [seq - 1]).fetchone()[0])
    rows = con.execute('SELECT "table", chain_seq FROM chain WHERE chain_seq >= ? ORDER BY chain_seq', [seq]).fetchall()
    for table, s in rows:
        cols = con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? "
                           "ORDER BY column_index", [table]).fetchall()
        names = [c for c, _ in cols if c not in analytics.schema.CHAIN_COLUMNS]
        types = dict(cols)
        exprs = [f'epoch_us("{n}")' if types[n].startswith("TIMESTAMP WITH TIME ZONE") else f'"{n}"' for n in names]
        blobs = frozenset(n for n in names if types[n] == "BLOB")
        values = con.execute(f"SELECT {', '.join(exprs)} FROM {table} WHERE chain_seq = ?", [s]).fetchone()
        h = row_hash(prev, table, canonical(names, values, blobs))
        con.execute(f"UPDATE {table} SET chain_prev = ?, chain_hash = ? WHERE chain_seq = ?", [prev, h, s])
        prev = h


def test_a_stop_row_whose_count_was_rewritten_fails_even_with_a_consistent_chain(tmp_path):
    """Epoch 1's writer_stop says it wrote 250 rows (it wrote 300) and every hash from there on is
    recomputed: the chain verifies, the epoch check does not."""
    path = tmp_path / "a.duckdb"
    _two_epochs(path)
    con = duckdb.connect(str(path))
    stop = con.execute("SELECT chain_seq FROM writer_events WHERE event = 'writer_stop' AND epoch = 1").fetchone()[0]
    con.execute("UPDATE writer_events SET rows = 250 WHERE chain_seq = ?", [stop])
    _rechain_from(con, stop)
    con.close()
    report = analytics.verify(path)
    assert [(p.kind, p.seq) for p in report.problems] == [("inserted", stop)], report.text()
    assert "writer_stop counts 250 rows, 300 precede it" in report.problems[0].detail
    assert _verify_cli(path, tmp_path, "--allow-gaps").returncode == 1


# --- off-host chain positions (`audit verify --anchors`) ----------------------------------------

def _chain(path: Path) -> dict[int, str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {s: bytes(h).hex() for s, h in con.execute("SELECT chain_seq, chain_hash FROM chain").fetchall()}
    finally:
        con.close()


def test_anchors_are_read_from_stream_events_syslog_lines_and_verify_reports():
    from analytics.verify import parse_anchors

    h1, h2, h3 = "a" * 64, "b" * 64, "c" * 64
    text = "\n".join([
        json.dumps({"metadata": {"sequence": 1, "log_name": "requests"}, "chain_hash": h1}),  # the stream's file
        'local3 info botwarden requests [meta sequenceId="2"] '  # a syslog receiver's line
        + json.dumps({"metadata": {"sequence": 2}, "chain_hash": h2}),
        f"OK: 120 rows checked, head seq 3 hash {h3}, 2 writer epochs, schema v4",  # an earlier report
        "some other message {not json}", "", "head seq 0 hash " + "0" * 64,  # skipped: not a row
        json.dumps({"metadata": {"sequence": "4"}, "chain_hash": h1}),           # skipped: not a seq
        json.dumps({"metadata": {"sequence": 1}, "chain_hash": h1}),             # the same again: fine
    ])
    assert parse_anchors(text) == {1: h1, 2: h2, 3: h3}
    with pytest.raises(ValueError, match=r"copy.txt, line 2: seq 1 with hash b+, and earlier with a+"):
        parse_anchors(f"head seq 1 hash {h1}\nhead seq 1 hash {h2}", "copy.txt")


def test_a_rewrite_with_recomputed_hashes_is_caught_by_any_later_off_host_position(tmp_path):
    """The forger rewrites epoch 1's row and recomputes every hash after it: the chain alone
    verifies; a position kept off the host before the rewrite (even only the head of a report
    printed then) fails verify at the first rewritten row it holds."""
    path = tmp_path / "a.duckdb"
    head = _two_epochs(path)
    before = _chain(path)
    con = duckdb.connect(str(path))
    con.execute("UPDATE requests SET text = 'SELECT 1 -- harmless' WHERE chain_seq = 100")
    _rechain_from(con, 100)
    con.close()
    assert analytics.verify(path).clean  # the forger wins against the chain alone
    report = analytics.verify(path, {head: before[head]})
    assert not report.ok and report.anchors_checked == 1
    assert [(p.kind, p.seq, p.table) for p in report.problems] == [("modified", head, "writer_events")]
    assert before[head] in report.problems[0].detail
    # Every position: the first mismatch is the rewritten row; the earlier ones still match.
    report = analytics.verify(path, before)
    assert [p.seq for p in report.problems][:2] == [100, 101] and len(report.problems) == 20
    assert f"{head - 99 - 20} more off-host position(s) do not match the store" in report.notes
    assert analytics.verify(path, {s: h for s, h in before.items() if s < 100}).clean
    res = _verify_cli(path, tmp_path, "--anchors", str(_write(tmp_path / "heads.txt", f"head seq {head} hash {before[head]}")))
    assert res.returncode == 1 and res.stdout.startswith("FAILED"), res.stdout + res.stderr
    assert f"modified  writer_events seq {head}: its hash is" in res.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_cut_of_whole_epochs_with_the_high_water_file_gone_is_caught_by_an_off_host_position(tmp_path):
    """What the chain and the epochs cannot see (threat model, promise 5): epoch 2 cut off at its
    boundary and the .hwm file deleted. A position kept off the host past the cut catches it."""
    path = tmp_path / "a.duckdb"
    head = _two_epochs(path)
    before = _chain(path)
    start2 = _cut_epoch_2(path)
    from analytics import highwater

    highwater.path_for(path).unlink()
    assert analytics.verify(path).clean
    report = analytics.verify(path, {start2 - 1: before[start2 - 1], head: before[head]})
    assert [(p.kind, p.seq) for p in report.problems] == [("deleted", start2)]
    assert f"an off-host copy holds seq {head}" in report.problems[0].detail
    assert f"{head - start2 + 1} row(s) cut off the end" in report.problems[0].detail


def test_positions_before_a_retention_checkpoint_are_not_compared_but_its_anchor_is(tmp_path):
    path = tmp_path / "a.duckdb"
    now = dt.datetime.now(UTC)
    _old_and_new(path, now)
    before = _chain(path)
    result = analytics.apply_retention(path, dt.timedelta(0))
    report = analytics.verify(path, before)
    assert report.ok and report.anchors_checked == 1, report.text()  # the checkpoint's own seq
    assert (f"{result.anchor_seq - 1} off-host position(s) before the retention checkpoint at seq "
            f"{result.anchor_seq} not compared (their rows were removed)") in report.notes
    forged = dict(before)
    forged[result.anchor_seq] = "f" * 64
    assert [p.kind for p in analytics.verify(path, forged).problems] == ["modified"]


def test_the_cli_sends_at_most_the_apis_limit_of_positions_the_last_always(tmp_path):
    from appliance.api import MAX_ANCHORS, _anchors
    from appliance.cli import CliError, _read_anchors
    from appliance.control import ControlError

    n = MAX_ANCHORS * 3 + 7
    copy = _write(tmp_path / "copy.txt", "\n".join(f"head seq {s} hash {s:064x}" for s in range(1, n + 1)))
    picked = _read_anchors([str(copy)])
    assert len(picked) == MAX_ANCHORS and min(picked) == 1 and max(picked) == n
    assert all(picked[s] == f"{s:064x}" for s in picked)
    assert _anchors({str(s): h for s, h in picked.items()}) == picked
    for bad in ({"x": "a" * 64}, {"0": "a" * 64}, {"1": "A" * 64}, {"1": "a" * 63}, [1], {str(s): "a" * 64 for s in range(MAX_ANCHORS + 1)}):
        with pytest.raises(ControlError):
            _anchors(bad)
    with pytest.raises(CliError, match="no chain position in it"):
        _read_anchors([str(_write(tmp_path / "empty.txt", "nothing here\n"))])
    other = _write(tmp_path / "other.txt", f"head seq 1 hash {'e' * 64}")
    with pytest.raises(CliError, match=rf"seq 1 has two hashes in the copies given \(0+1 in {copy}, e+ in {other}\)"):
        _read_anchors([str(copy), str(other)])
    # The lake's batch heads (--anchors-from-fleet) join the files' positions; a contradiction names both.
    picked = _read_anchors([str(other)], {5: "f" * 64})
    assert picked == {1: "e" * 64, 5: "f" * 64}
    with pytest.raises(CliError, match=rf"seq 1 has two hashes .*e+ in {other}, 0+1 in the fleet lake"):
        _read_anchors([str(other)], {1: f"{1:064x}"})
    with pytest.raises(CliError, match="--anchors .*missing.txt"):
        _read_anchors([str(tmp_path / "missing.txt")])
