"""Affected-rows guard end to end (issue 15.2): rules with ``max_rows`` through the real daemon,
eBPF redirect and PostgreSQL 15, with psql (simple protocol) and psycopg (extended protocol,
bound parameters). Before a guarded UPDATE/DELETE/MERGE runs, botwarden asks the server on the
bot's own session for the planner's estimate (EXPLAIN, never ANALYZE); above the limit the
rule's action applies: a held DELETE shows its estimate in `approvals list`; a blocked one
leaves the table as it was. The estimate and the limit are in the audit row.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from tests.probes_fixtures import RUN_TAG

from tests.test_pg_reading_e2e import BOT, _dsn, _steps, run_bot, run_direct, start_world
from tests.test_probes_e2e import bot_run, cli

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

PSQL = "/usr/lib/postgresql/15/bin/psql"

RULES = """
[[rules]]
name = "big-writes-need-approval"
action = "approve"
description = "a write touching more than 100 rows needs a human"
[rules.sql]
kinds = ["DELETE", "UPDATE", "MERGE"]
max_rows = 100

[[rules]]
name = "ledger-mass-writes"
action = "block"
[rules.sql]
writes = ["ledger"]
max_rows = 1000
"""


@pytest.fixture(scope="module")
def world(bao_server, tmp_path_factory):
    with start_world(bao_server, tmp_path_factory.mktemp("rowguard-e2e"), RULES, bots=f"botwarden-rowguard-{RUN_TAG}.bots",
                     pin_dir=f"/sys/fs/bpf/botwarden-rowguard-{RUN_TAG}") as w:
        yield w


@pytest.fixture()
def tables(world):
    pg = world["pg"]
    pg.psql("DROP TABLE IF EXISTS accounts, ledger; "
            "CREATE TABLE accounts (id int PRIMARY KEY, email text); "
            "INSERT INTO accounts SELECT i, 'u' || i || '@example.com' FROM generate_series(1, 500) i; "
            "CREATE TABLE ledger (id int PRIMARY KEY, v int); "
            "INSERT INTO ledger SELECT i, i FROM generate_series(1, 5000) i; "
            "ALTER TABLE accounts OWNER TO acct_owner; ALTER TABLE ledger OWNER TO acct_owner; "
            "ANALYZE accounts; ANALYZE ledger")
    return pg


def count(pg, table: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM {table}"))


def psql_bot(world, sql: str) -> subprocess.CompletedProcess:
    # As nobody: the operator (root) may not approve a request of its own uid (issue 26.2).
    return bot_run(world["config"], BOT, [PSQL, "-X", "-d", _dsn(world), "-c", sql])


def audit_row(world, text_like: str) -> dict:
    rows = world["daemon"].audit_sql("SELECT kind, decision, rule, reason, row_estimate, row_limit, error, sqlstate "
                                     "FROM requests WHERE text LIKE ? ORDER BY chain_seq", [text_like])
    assert rows, text_like
    return rows[-1]


def test_small_writes_run_with_their_estimate_on_record(world, tables):
    ran = psql_bot(world, "DELETE FROM accounts WHERE id <= 5")
    assert ran.returncode == 0 and "DELETE 5" in ran.stdout, ran.stderr
    row = audit_row(world, "DELETE FROM accounts WHERE id <= 5")
    assert row["decision"] == "allow" and row["row_limit"] == 100 and 1 <= row["row_estimate"] <= 20, row
    # Extended protocol, parameters bound: the estimate uses them.
    out = run_bot(world, [{"op": "psycopg_params", "sql": "UPDATE ledger SET v = v + 1 WHERE id = %s",
                           "params": [7]}])
    assert out == [{"ok": True, "rowcount": 1}]
    row = audit_row(world, "UPDATE ledger SET v = v + 1 WHERE id = $1")
    assert row["kind"] == "execute" and row["decision"] == "allow" and row["row_estimate"] == 1, row
    # Inside the bot's own transaction block too; the transaction is not disturbed.
    out = run_bot(world, [{"op": "psycopg_params", "sql": "DELETE FROM ledger WHERE id BETWEEN %s AND %s",
                           "params": [10, 19], "transaction": True}])
    assert out == [{"ok": True, "rowcount": 10}] and count(tables, "ledger") == 4990


def test_a_mass_delete_with_a_where_that_filters_nothing_is_blocked_extended(world, tables):
    out = run_bot(world, [{"op": "psycopg_params", "sql": "DELETE FROM ledger WHERE id = id OR id > %s",
                           "params": [0]}])
    assert out[0]["ok"] is False and out[0]["sqlstate"] == "42501", out
    assert "ledger-mass-writes" in out[0]["message"] and "more than max_rows = 1000" in out[0]["detail"], out
    assert count(tables, "ledger") == 5000
    row = audit_row(world, "DELETE FROM ledger WHERE id = id OR id > $1")
    assert row["decision"] == "block" and row["rule"] == "ledger-mass-writes" and row["row_limit"] == 1000
    assert row["row_estimate"] >= 4000, row
    # Simple protocol, the same.
    ran = psql_bot(world, "UPDATE ledger SET v = 0")
    assert ran.returncode == 1 and "ledger-mass-writes" in ran.stderr and count(tables, "ledger") == 5000


def test_a_held_delete_shows_its_estimate_and_runs_once_approved(world, tables):
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(ran=psql_bot(world, "DELETE FROM accounts WHERE email LIKE '%@example.com'")))
    t.start()
    item = None
    for _ in range(200):
        items = json.loads(cli(world["config"], "approvals", "list", "--json").stdout or "[]")
        if items:
            item = items[0]
            break
        time.sleep(0.1)
    assert item is not None and item["rule"] == "big-writes-need-approval", item
    assert item["row_limit"] == 100 and item["row_estimate"] >= 400, item
    table = cli(world["config"], "approvals", "list").stdout
    assert f"~{item['row_estimate']} > 100" in table, table
    assert count(tables, "accounts") == 500  # nothing ran while it waited
    approved = cli(world["config"], "approvals", "approve", item["approval_id"], "--reason", "cleanup")
    assert approved.returncode == 0, approved.stderr
    t.join(60)
    assert result["ran"].returncode == 0 and "DELETE 500" in result["ran"].stdout, result["ran"].stderr
    row = audit_row(world, "DELETE FROM accounts WHERE email LIKE %")
    assert row["decision"] == "approve" and row["row_estimate"] == item["row_estimate"] and row["row_limit"] == 100


def test_statements_the_server_refuses_answer_as_direct(world, tables):
    # The estimate's EXPLAIN fails exactly as the statement would: the bot gets the server's own
    # error (position shifted back onto its statement), nothing runs.
    for sql in ("DELETE FROM no_such_table WHERE a = 1", "UPDATE accounts SET nope = 1 WHERE id = 1"):
        got, direct = run_bot(world, _steps(sql)), run_direct(world, _steps(sql))
        assert got[0]["ok"] is False and got[0]["sqlstate"] == direct[0]["sqlstate"], (got, direct)
        assert got[0]["position"] == direct[0]["position"] and got[0]["message"] == direct[0]["message"]
    out = run_bot(world, [{"op": "psycopg_params", "sql": "DELETE FROM accounts WHERE nope = %s", "params": [1]}])
    assert out[0]["ok"] is False and out[0]["sqlstate"] == "42703", out
    assert count(tables, "accounts") == 500
