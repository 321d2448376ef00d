"""Read-only SQL over the audit store, output formats and canned reports."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest

import analytics
from analytics import AuditQueryError, AuditStore, ReadOnlyViolation, reports

from .audit_fixtures import T0, approval, populate, request, session_end, session_start, sid

WRITES = [
    "UPDATE requests SET decision = 'allow'",
    "DELETE FROM requests",
    "INSERT INTO requests (chain_seq, chain_prev, chain_hash) VALUES (1, '', '')",
    "CREATE TABLE x (a INT)",
    "CREATE VIEW v AS SELECT 1",
    "DROP TABLE requests",
    "ALTER TABLE requests ADD COLUMN y INT",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY requests TO '/tmp/out.csv'",
    "COPY (SELECT * FROM requests) TO '/tmp/out.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '/tmp/dump'",
    "CHECKPOINT",
    "SET threads = 1",
    "PRAGMA enable_profiling",
    "INSTALL httpfs",
    "SELECT 1; DELETE FROM requests",
]


@pytest.fixture
def audit_file(tmp_path):
    path = tmp_path / "audit.duckdb"
    populate(path, n_requests=5)
    return path


@pytest.mark.parametrize("sql", WRITES)
def test_writes_are_refused_on_a_file(audit_file, sql):
    with pytest.raises((ReadOnlyViolation, AuditQueryError)):
        analytics.query_readonly(audit_file, sql)
    assert analytics.query_readonly(audit_file, "SELECT count(*) FROM requests")[1] == [(5,)]
    assert analytics.verify(audit_file).clean


@pytest.mark.parametrize("sql", WRITES)
def test_writes_are_refused_on_the_live_store(tmp_path, sql):
    with AuditStore(tmp_path / "a.duckdb", strict=True) as store:
        store.submit("request", request(sid()))
        store.flush()
        with pytest.raises((ReadOnlyViolation, AuditQueryError)):
            store.query(sql)
        assert store.query("SELECT count(*) FROM requests")[1] == [(1,)]
        assert store.verify().ok


def test_refusal_names_the_statement_kind(audit_file):
    with pytest.raises(ReadOnlyViolation, match="UPDATE"):
        analytics.query_readonly(audit_file, "UPDATE requests SET text = ''")
    with pytest.raises(AuditQueryError, match="exactly one statement"):
        analytics.query_readonly(audit_file, "SELECT 1; SELECT 2")


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM read_csv('/etc/passwd')",
])
def test_queries_cannot_read_other_files(audit_file, tmp_path, sql):
    with pytest.raises(AuditQueryError):
        analytics.query_readonly(audit_file, sql)
    with AuditStore(tmp_path / "live.duckdb") as store:
        with pytest.raises(AuditQueryError):
            store.query(sql)


def test_reads_work_with_parameters_and_describe(audit_file):
    cols, rows = analytics.query_readonly(
        audit_file, "SELECT text FROM requests WHERE text = ? OR text = $2 ORDER BY text", ["SELECT 1", "SELECT 3"])
    assert cols == ["text"] and rows == [("SELECT 1",), ("SELECT 3",)]
    cols, rows = analytics.query_readonly(audit_file, "DESCRIBE requests")
    assert "masked" in [r[0] for r in rows]
    cols, rows = analytics.query_readonly(audit_file, "WITH x AS (SELECT 2 AS n) FROM x")
    assert rows == [(2,)]


def test_format_table_csv_json():
    cols = ["name", "n", "ts", "data", "tags"]
    rows = [("a", 1, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), b"\x01\xff", ["x", None]),
            ("long name, with comma", None, None, None, None),
            ("multi\nline", 12345, None, None, None)]
    table = analytics.format_table(cols, rows)
    lines = table.splitlines()
    assert lines[0].split() == cols
    assert set(lines[1].replace(" ", "")) == {"-"}
    # numbers right-aligned under their header, text left-aligned
    n_end = lines[0].index(" n") + 2
    assert lines[2][:n_end].endswith("1") and lines[4][:n_end].endswith("12345")
    assert lines[2].startswith("a ") and "\\x01ff" in lines[2] and "multi\\nline" in lines[4]
    assert lines[-1] == "(3 rows)"

    back = list(csv.reader(io.StringIO(analytics.format_table(cols, rows, "csv"))))
    assert back[0] == cols
    assert back[1] == ["a", "1", "2026-01-02 03:04:05+00:00", "\\x01ff", '["x",null]']
    assert back[2] == ["long name, with comma", "", "", "", ""]
    assert back[3][0] == "multi\nline"

    doc = json.loads(analytics.format_table(cols, rows, "json"))
    assert doc[0] == {"name": "a", "n": 1, "ts": "2026-01-02T03:04:05+00:00", "data": "Af8=", "tags": ["x", None]}
    assert doc[1]["n"] is None
    with pytest.raises(ValueError):
        analytics.format_table(cols, rows, "xml")


# --- reports -------------------------------------------------------------------

def _report_data(store: AuditStore) -> None:
    a, b, c = sid(), sid(), sid()
    store.submit("session_start", session_start(a, identity="deploy-bot", target="orders-db", exe="/usr/bin/psql"))
    store.submit("session_start", session_start(b, identity="etl-bot", target="orders-db", exe="/usr/bin/python3",
                                                uid=2002))
    store.submit("session_start", session_start(c, identity="etl-bot", target="hr-db", exe="/usr/bin/python3",
                                                uid=2002))
    store.submit("session_end", session_end(a, outcome="ok", bytes_in=10, bytes_out=20))
    store.submit("session_end", session_end(b, outcome="error", bytes_in=1, bytes_out=2))
    store.submit("request", request(a, text="DELETE FROM orders WHERE id = $1", decision="block", rule="no-delete",
                                    masked=None))
    store.submit("request", request(a, text="DELETE FROM orders WHERE id = $1", decision="block", rule="no-delete",
                                    masked=None))
    store.submit("request", request(b, text="WITH d AS (DELETE FROM t RETURNING *) SELECT count(*) FROM d",
                                    decision="allow", rule=None, masked=None))
    store.submit("request", request(b, text="TRUNCATE audit_log", decision="deny", rule="hold-ddl", masked=None))
    store.submit("request", request(b, text="SELECT 'DELETE FROM x'", decision="allow", rule=None, masked=None))
    store.submit("request", request(c, text="SELECT ssn, email FROM people", masked={"ssn": 4, "email": 2}))
    store.submit("request", request(c, text="SELECT ssn FROM people", masked={"ssn": 1}))
    store.submit("request", request(c, kind="ssh_exec", protocol="ssh", text="rm -rf /", masked=None))
    for i, (outcome, wait) in enumerate([("approved", 2), ("approved", 4), ("denied", 10)]):
        store.submit("approval", approval(f"ap{i}", "requested", T0))
        store.submit("approval", approval(f"ap{i}", "notified", T0 + dt.timedelta(seconds=1)))
        store.submit("approval", approval(f"ap{i}", outcome, T0 + dt.timedelta(seconds=wait), operator="alice"))


def test_canned_reports(tmp_path):
    names = [r.name for r in reports.list_reports()]
    assert names == ["approval_latency", "blocked_attempts", "destructive_by_identity",
                     "masked_fields_per_target", "sessions_per_executable"]
    assert all(r.title and r.description for r in reports.list_reports())
    path = tmp_path / "a.duckdb"
    with AuditStore(path, strict=True) as store:
        _report_data(store)
        store.flush()
        live = {n: reports.run_report(store, n) for n in names}
    offline = {n: reports.run_report(path, n) for n in names}
    assert live == offline

    def rows(name, *cols):
        c, r = offline[name]
        idx = [c.index(x) for x in cols]
        return [tuple(row[i] for i in idx) for row in r]

    assert rows("blocked_attempts", "identity", "decision", "rule", "attempts") == [
        ("deploy-bot", "block", "no-delete", 2), ("etl-bot", "deny", "hold-ddl", 1)]
    assert sorted(rows("destructive_by_identity", "identity", "statement_types", "requests")) == [
        ("deploy-bot", ["DeleteStmt"], 2),
        ("etl-bot", ["DeleteStmt", "SelectStmt"], 1),
        ("etl-bot", ["TruncateStmt"], 1)]
    assert rows("approval_latency", "outcome", "approvals", "avg_s", "max_s") == [
        ("approved", 2, 3.0, 4.0), ("denied", 1, 10.0, 10.0)]
    assert rows("masked_fields_per_target", "target", "column_name", "values_masked", "requests") == [
        ("hr-db", "ssn", 5, 2), ("hr-db", "email", 2, 1)]
    assert rows("sessions_per_executable", "exe", "sessions", "identities", "not_ok") == [
        ("/usr/bin/python3", 2, ["etl-bot"], 1), ("/usr/bin/psql", 1, ["deploy-bot"], 0)]


def test_unknown_report(audit_file):
    with pytest.raises(analytics.UnknownReport, match="blocked_attempts"):
        reports.run_report(audit_file, "../../etc/passwd")


def test_statement_types_come_from_the_postgres_parser():
    assert reports.statement_types("delete from t") == ("DeleteStmt",)
    assert reports.statement_types("SELECT 'drop table x'") == ("SelectStmt",)
    assert reports.statement_types("rm -rf /") is None


def test_live_query_limits_rows_and_can_be_interrupted(tmp_path):
    with AuditStore(tmp_path / "a.duckdb") as store:
        cols, rows = store.query("SELECT * FROM range(1000)", max_rows=10)
        assert len(rows) == 10
        # A cross join far too big to finish: interrupted, and the store keeps working.
        with pytest.raises(AuditQueryError, match="interrupted"):
            store.query("SELECT count(*) FROM range(100000000) a, range(100000000) b WHERE a.range + b.range = -1",
                        timeout=0.5)
        assert store.submit("request", request(sid()))
        store.flush()
        assert store.query("SELECT count(*) FROM requests")[1] == [(1,)]
