"""Built-in functions that run SQL text or read whole relations, against a real PostgreSQL 15.

Each entry of appliance.policy.sql.SQL_TEXT_FUNCTIONS has a call here that, run by a
non-superuser, makes the server execute the text it was given (a sequence moved to 42 shows
it), and the same statement analyzed by botwarden shows the nested call; each entry of
RELATION_READING_FUNCTIONS returns rows of the relation it names, and the analysis reads it.
An entry added to either list without a case here fails test_every_listed_function_has_a_case.
"""

from __future__ import annotations

import pytest

from appliance.config import parse_config
from appliance.policy import PolicyEngine, analyze_sql
from appliance.policy.sql import RELATION_READING_FUNCTIONS, SQL_TEXT_FUNCTIONS, Relation

SCHEMA = "bw_policy_fn"
ROLE = "bw_policy_fn_bot"

# name -> a statement whose SQL text moves the sequence to 42 when the server runs it. fold(n) is
# an IMMUTABLE SQL function around setval: query_to_xmlschema only plans its query, and planning
# evaluates immutable calls with constant arguments.
SQL_TEXT_CALLS = {
    "query_to_xml": "select query_to_xml('select setval(''seq'', 42)', true, true, '')",
    "query_to_xmlschema": "select query_to_xmlschema('select fold(42)', true, true, '')",
    "query_to_xml_and_xmlschema": "select query_to_xml_and_xmlschema('select setval(''seq'', 42)', true, true, '')",
    "ts_stat": "select * from ts_stat('select to_tsvector(setval(''seq'', 42)::text)')",
    "ts_rewrite": "select ts_rewrite('a'::tsquery, 'select ''a''::tsquery, setval(''seq'', 42)::text::tsquery')",
}
NESTED = {"query_to_xmlschema": "fold"}  # the function the nested statement calls (else setval)

RELATION_CALLS = {
    name: f"select {name}({'' if scope == 'database' else repr('secrets') if scope == 'schema' else repr('secrets.vault')}"
          f"{'' if scope == 'database' else ', '}true, true, '')"
    for name, scope in RELATION_READING_FUNCTIONS.items()
}


@pytest.fixture(scope="module")
def pg(pg_server):
    pg_server.psql(f"""
        drop schema if exists {SCHEMA} cascade; drop schema if exists secrets cascade;
        drop role if exists {ROLE};
        create role {ROLE};
        create schema {SCHEMA}; create schema secrets;
        create table secrets.vault (code text); insert into secrets.vault values ('marker-7f3a');
        grant usage on schema {SCHEMA}, secrets to {ROLE}; grant select on secrets.vault to {ROLE};
        create sequence {SCHEMA}.seq; grant usage, select, update on sequence {SCHEMA}.seq to {ROLE};
        create function {SCHEMA}.fold(bigint) returns bigint immutable language sql
            as 'select setval(''{SCHEMA}.seq'', $1)';
    """)
    try:
        yield pg_server
    finally:
        pg_server.psql(f"drop schema if exists {SCHEMA} cascade; drop schema if exists secrets cascade; "
                       f"drop role if exists {ROLE}")


def run_as_bot(pg, sql: str) -> str:
    return pg.psql(f"set search_path = {SCHEMA}, public; set role {ROLE}; {sql}")


def test_every_listed_function_has_a_case() -> None:
    assert set(SQL_TEXT_CALLS) == set(SQL_TEXT_FUNCTIONS)
    assert set(RELATION_CALLS) == set(RELATION_READING_FUNCTIONS)


@pytest.mark.parametrize("name", sorted(SQL_TEXT_FUNCTIONS))
def test_function_runs_its_sql_text_and_botwarden_analyzes_it(pg, name: str) -> None:
    sql = SQL_TEXT_CALLS[name]
    pg.psql(f"select setval('{SCHEMA}.seq', 1)")
    run_as_bot(pg, sql)
    assert pg.psql(f"select last_value from {SCHEMA}.seq") == "42", f"{name} did not run its argument"
    stmt = analyze_sql(sql).statements[0]
    assert stmt.error is None
    assert {name, NESTED.get(name, "setval")} <= {f.name for f in stmt.functions}
    # Text botwarden cannot read before the server does: flagged, never trusted.
    dynamic = sql.replace("'select", "current_setting('x.q') || 'select", 1)
    assert "dynamic_sql" in analyze_sql(dynamic).statements[0].properties


@pytest.mark.parametrize("name", sorted(RELATION_READING_FUNCTIONS))
def test_function_reads_the_relation_it_names(pg, name: str) -> None:
    sql = RELATION_CALLS[name]
    out = run_as_bot(pg, sql)
    if not name.endswith("xmlschema") or name.endswith("_and_xmlschema"):
        assert "marker-7f3a" in out, f"{name} did not return the relation's rows"
    else:
        assert "secrets" in out  # an XML schema describing what it read (no rows)
    reads = analyze_sql(sql).statements[0].reads
    scope = RELATION_READING_FUNCTIONS[name]
    assert reads == {{"table": Relation("secrets", "vault"), "schema": Relation("secrets", "*"),
                      "database": Relation("*", "*")}[scope]}


POLICY = """
[[targets]]
name = "db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"

[[identities]]
name = "bot"
[identities.process]
uid = 1000

[[rules]]
name = "no-files"
action = "block"
[rules.sql]
functions = ["pg_read_file"]

[[rules]]
name = "no-secrets"
action = "block"
[rules.sql]
reads = ["secrets.*"]

[[rules]]
name = "no-dynamic"
action = "block"
[rules.sql]
properties = ["dynamic_sql"]
"""


def test_policy_sees_through_sql_text_and_relation_arguments() -> None:
    cfg = parse_config(POLICY)
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)

    def rule(sql: str) -> str | None:
        return engine.decide_sql("bot", (), "db", sql).rule

    assert rule("SELECT query_to_xml('select pg_read_file(''/etc/passwd'')', true, true, '')") == "no-files"
    assert rule("select * from ts_stat('select to_tsvector(pg_read_file(''/etc/hostname''))')") == "no-files"
    assert rule("select ts_rewrite('a'::tsquery, 'select pg_read_file(''x'')::tsquery, ''b''::tsquery')") == "no-files"
    assert rule("select ts_rewrite('a'::tsquery, 'b'::tsquery, 'c'::tsquery)") is None  # runs no SQL
    assert rule("select query_to_xml('select * from secrets.vault', true, true, '')") == "no-secrets"
    assert rule("select table_to_xml('secrets.vault', true, true, '')") == "no-secrets"
    assert rule("select schema_to_xml('secrets', true, true, '')") == "no-secrets"
    assert rule("select database_to_xml(true, true, '')") == "no-secrets"
    assert rule("select query_to_xml(current_setting('x.q'), true, true, '')") == "no-dynamic"
    assert rule("select table_to_xml(16384::oid::regclass, true, true, '')") == "no-dynamic"
    assert rule("select table_to_xml('public.t', true, true, '')") is None
