"""Affected-rows guard (issue 15.2), the pure part: rules with ``max_rows`` wait for the
planner's estimate; with it, they apply only above the limit; without it, they apply (fail
closed). The front's half (EXPLAIN on the bot's session) is in tests/test_pg_row_guard.py."""

from __future__ import annotations

import json

import pytest

from appliance.config import parse_config
from appliance.policy.engine import PolicyEngine, plan_rows, with_row_estimate
from appliance.policy.types import PolicyError

HEAD = """
[[targets]]
name = "db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"
default_action = "allow"

[[identities]]
name = "bot"
targets = ["db"]
[identities.process]
uid = 1000
"""

RULES = """
[[rules]]
name = "big-deletes-need-approval"
action = "approve"
description = "more than 1,000 rows at once needs a human"
[rules.sql]
kinds = ["DELETE", "UPDATE", "MERGE"]
max_rows = 1000

[[rules]]
name = "huge-writes-blocked"
action = "block"
[rules.sql]
writes = ["accounts"]
max_rows = 100000
"""


def engine(rules: str = RULES) -> PolicyEngine:
    cfg = parse_config(HEAD + rules)
    return PolicyEngine(cfg.policy, cfg.targets, cfg.identities)


def test_a_write_waits_for_the_estimate_and_the_limit_decides() -> None:
    v = engine().decide_sql("bot", (), "db", "DELETE FROM accounts WHERE id = id")
    assert v.action == "allow" and [g.rule for g in v.row_guards] == ["big-deletes-need-approval",
                                                                      "huge-writes-blocked"]
    small = with_row_estimate(v, 12)
    assert (small.action, small.row_estimate, small.row_limit, small.row_guards) == ("allow", 12, 1000, ())
    big = with_row_estimate(v, 5000)
    assert (big.action, big.rule, big.row_estimate, big.row_limit) == ("approve", "big-deletes-need-approval", 5000, 1000)
    assert "estimates 5000 rows, more than max_rows = 1000" in big.reason and "needs a human" in big.reason
    huge = with_row_estimate(v, 2_000_000)
    assert (huge.action, huge.rule, huge.row_limit) == ("block", "huge-writes-blocked", 100000)


def test_no_estimate_means_every_guard_applies() -> None:
    v = with_row_estimate(engine().decide_sql("bot", (), "db", "UPDATE accounts SET a = 1 WHERE b = 2"),
                          None, "the server could not plan it")
    assert (v.action, v.rule, v.row_estimate) == ("block", "huge-writes-blocked", None)
    assert "no row estimate (the server could not plan it)" in v.reason


def test_reads_inserts_and_unmatched_writes_have_no_guard() -> None:
    e = engine()
    for sql in ("SELECT * FROM accounts", "INSERT INTO accounts SELECT * FROM accounts", "COPY accounts TO STDOUT"):
        assert e.decide_sql("bot", (), "db", sql).row_guards == (), sql
    # The block guard names accounts only; elsewhere only the approval guard waits.
    v = e.decide_sql("bot", (), "db", "DELETE FROM other")
    assert [g.rule for g in v.row_guards] == ["big-deletes-need-approval"]


def test_a_stronger_verdict_already_decided_drops_the_guard() -> None:
    e = engine(RULES + """
[[rules]]
name = "no-deletes-on-audit"
action = "block"
[rules.sql]
writes = ["audit_log"]
""")
    v = e.decide_sql("bot", (), "db", "DELETE FROM audit_log")
    assert (v.action, v.rule, v.row_guards) == ("block", "no-deletes-on-audit", ())


def test_merge_and_a_data_modifying_cte_are_guarded() -> None:
    e = engine()
    for sql in ("MERGE INTO accounts a USING accounts b ON a.id = b.id WHEN MATCHED THEN DELETE",
                "WITH d AS (DELETE FROM accounts RETURNING *) SELECT count(*) FROM d"):
        assert e.decide_sql("bot", (), "db", sql).row_guards, sql


def test_a_batch_of_several_statements_fails_closed() -> None:
    v = engine().decide_sql("bot", (), "db", "SELECT 1; DELETE FROM accounts WHERE id = 4")
    assert v.action == "block" and v.rule == "huge-writes-blocked" and "several statements" in v.reason


def test_max_rows_needs_block_or_approve_and_a_number() -> None:
    with pytest.raises(PolicyError, match="max_rows needs action"):
        engine('[[rules]]\nname = "m"\naction = "allow"\n[rules.sql]\nmax_rows = 5\n')
    with pytest.raises(Exception, match="max_rows"):
        parse_config(HEAD + '[[rules]]\nname = "m"\naction = "block"\n[rules.sql]\nmax_rows = -1\n')


def test_plan_rows_reads_modify_table_inputs() -> None:
    plan = [{"Plan": {"Node Type": "ModifyTable", "Operation": "Delete", "Plan Rows": 0,
                      "Plans": [{"Node Type": "Seq Scan", "Plan Rows": 4321}]}}]
    assert plan_rows(json.dumps(plan)) == 4321
    cte = [{"Plan": {"Node Type": "Aggregate", "Plan Rows": 1, "Plans": [
        {"Node Type": "ModifyTable", "Operation": "Update", "Plans": [{"Node Type": "Seq Scan", "Plan Rows": 7}]},
        {"Node Type": "CTE Scan", "Plan Rows": 7}]}}]
    assert plan_rows(json.dumps(cte)) == 7


def test_policy_explain_says_which_guards_wait_for_the_estimate() -> None:
    from appliance.policy import explain

    e = explain(engine(), "bot", "db", "DELETE FROM accounts WHERE id = id")
    assert "row guard: approve by 'big-deletes-need-approval' if the server estimates more than 1000 rows" in str(e)
    assert e.to_json()["row_guards"] == [
        {"rule": "big-deletes-need-approval", "action": "approve", "max_rows": 1000},
        {"rule": "huge-writes-blocked", "action": "block", "max_rows": 100000}]
