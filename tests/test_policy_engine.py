"""Engine behaviour: precedence, defaults, caching (time windows, shapes), sessions, explain, fuzzing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import parse_config
from appliance.policy import (ACTION_STRENGTH, K8sRequest, PolicyEngine, SqlSessionState, SshRequest, Verdict,
                              analyze_sql, explain)
from appliance.policy.sql import Function, Relation

CONFIG = """
[[targets]]
name = "db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"

[[targets]]
name = "locked"
protocol = "postgres"
address = "127.0.0.1:5433"
authentication = "attestation"
default_action = "block"

[[identities]]
name = "bot"
groups = ["ci"]
[identities.process]
uid = 1000

[[rules]]
name = "allow-selects"
action = "allow"
[rules.sql]
kinds = ["SELECT"]

[[rules]]
name = "mask-a"
action = "mask"
targets = ["db"]
[rules.sql]
reads = ["a"]
[[rules.mask]]
columns = ["secret"]

[[rules]]
name = "approve-a"
action = "approve"
[rules.sql]
reads = ["a"]

[[rules]]
name = "approve-a-again"
action = "approve"
[rules.sql]
relations = ["a", "b"]

[[rules]]
name = "block-b"
action = "block"
[rules.sql]
reads = ["b"]

[[rules]]
name = "office-hours-only"
action = "block"
targets = ["db"]
[rules.sql]
kinds = ["INSERT"]
[rules.when]
hours = ["17:00-09:00"]
timezone = "UTC"
"""

NOON = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def engine() -> PolicyEngine:
    cfg = parse_config(CONFIG)
    return PolicyEngine(cfg.policy, cfg.targets, cfg.identities)


def test_strongest_kind_wins_and_first_of_that_kind_names_it() -> None:
    e = engine()
    v = e.decide_sql("bot", ("ci",), "db", "select * from a")
    assert (v.action, v.rule) == ("approve", "approve-a")
    assert v.matched == ("allow-selects", "mask-a", "approve-a", "approve-a-again")
    assert v.mask_rules == ("mask-a",)  # masking still applies once approved
    v = e.decide_sql("bot", ("ci",), "db", "select * from a join b on true")
    assert (v.action, v.rule) == ("block", "block-b")
    assert v.mask_rules == ()


def test_target_default_when_nothing_matches() -> None:
    e = engine()
    v = e.decide_sql("bot", ("ci",), "locked", "insert into c values (1)")
    assert (v.action, v.rule) == ("block", None) and "by default for target 'locked'" in v.reason
    v = e.decide_sql("bot", ("ci",), "db", "insert into c values (1)", now=NOON)
    assert (v.action, v.rule) == ("allow", None)


def test_unknown_target_fails_closed() -> None:
    v = engine().decide_sql("bot", ("ci",), "not-configured", "insert into c values (1)")
    assert v.action == "block"


def test_batch_takes_the_strongest_statement() -> None:
    v = engine().decide_sql("bot", ("ci",), "locked", "select 1; select * from a; insert into c values (1)")
    assert (v.action, v.rule) == ("block", None)
    assert [s.kind for s in v.details] == ["SELECT", "SELECT", "INSERT"]


def test_time_window_changes_the_cached_verdict() -> None:
    e = engine()
    sql = "insert into c values (1)"
    assert e.decide_sql("bot", ("ci",), "db", sql, now=NOON).action == "allow"
    assert e.decide_sql("bot", ("ci",), "db", sql, now=NOON + timedelta(hours=6)).action == "block"
    assert e.decide_sql("bot", ("ci",), "db", sql, now=NOON + timedelta(hours=1)).action == "allow"
    assert e.decide_sql("bot", ("ci",), "db", sql, now=NOON + timedelta(hours=20)).action == "block"
    assert e.stats["exact_hits"] >= 1  # the repeated daytime decision came from the cache


def test_exact_and_shape_cache_hits() -> None:
    e = engine()
    e.decide_sql("bot", ("ci",), "db", "select * from b where id = 1")
    e.decide_sql("bot", ("ci",), "db", "select * from b where id = 1")
    assert e.stats["exact_hits"] == 1
    v = e.decide_sql("bot", ("ci",), "db", "select * from b where id = 42")
    assert e.stats["shape_hits"] == 1 and v.action == "block"
    # Different identity or groups: never someone else's cached verdict.
    v = e.decide_sql("other", (), "locked", "select * from b where id = 42")
    assert v.action == "block" and e.stats["misses"] == 2


def test_do_bodies_are_not_shape_cached() -> None:
    e = engine()
    assert e.decide_sql("bot", ("ci",), "locked", "do $$ begin perform 1; end $$").action == "block"
    body = "do $$ begin perform * from b; end $$"
    v = e.decide_sql("bot", ("ci",), "db", body)
    assert (v.action, v.rule) == ("block", "block-b")
    assert e.stats["shape_hits"] == 0


def test_session_state_is_per_session() -> None:
    e = engine()
    s1, s2 = SqlSessionState(), SqlSessionState()
    assert e.decide_sql("bot", ("ci",), "db", "prepare q as select * from b", session=s1).action == "block"
    assert e.decide_sql("bot", ("ci",), "db", "prepare q as select * from c", session=s1).action == "allow"
    assert "q" in s1.prepared and not s2.prepared
    assert e.decide_sql("bot", ("ci",), "db", "execute q", session=s1).action == "allow"
    v = e.decide_sql("bot", ("ci",), "db", "execute q", session=s2)
    assert v.action == "block" and "did not see prepared" in v.reason
    e.decide_sql("bot", ("ci",), "db", "set search_path = x, public", session=s1)
    assert s1.search_path == frozenset({"public", "x"}) and s2.search_path == frozenset({"public"})



SEARCH_PATH_CONFIG = CONFIG.split("[[rules]]")[0] + """
[[rules]]
name = "no-evil-secrets"
action = "block"
[rules.sql]
relations = ["evil.secrets"]
"""


@pytest.mark.parametrize("first,path", [
    ("set search_path = evil", {"evil"}),
    # Each of these set the server's search_path to evil too, and was missed: the unqualified
    # `secrets` that follows was read as public.secrets and evil.secrets was served.
    ("do $$ begin perform set_config('search_path', 'evil', false); end $$", {"evil"}),
    ("do $$ begin set search_path = evil; end $$", {"evil"}),
    ("do $$ begin execute 'set search_path = evil'; end $$", {"evil"}),
    ("do $$ begin execute 'set search_path = ' || current_user; end $$", {"*"}),
    ("select query_to_xml('select set_config(''search_path'', ''evil'', false)', true, true, '')", {"evil"}),
    ("prepare p as select set_config('search_path', 'evil', false); execute p", {"evil"}),
    # Several settings in one statement: the server runs WHERE before the select list, and an
    # unreadable setting name may be search_path; no order the walk happens to take may hide one.
    ("select set_config('search_path', 'evil', false) from pg_class "
     "where set_config('search_path', 'public', false) is not null", {"evil"}),
    ("select set_config('search_path', 'public', false) from pg_class "
     "where set_config('search_path', 'evil', false) is not null", {"evil"}),
    ("select set_config(lower('SEARCH_PATH'), 'evil', false), set_config('search_path', 'public', false)", {"*"}),
    # pg_settings' update rule calls set_config (any user may update the view).
    ("update pg_settings set setting = 'evil' where name = 'search_path'", {"evil"}),
    ("update pg_catalog.pg_settings s set setting = 'evil' where 'search_path' = s.name", {"evil"}),
    ("update pg_settings set setting = current_user where name = 'search_path'", {"*"}),
    ("update pg_settings set setting = 'evil' where name in ('search_path', 'work_mem')", {"*"}),
    ("with u as (update pg_settings set setting = 'evil' where name = 'search_path' returning 1) select * from u",
     {"evil"}),
])
def test_every_search_path_a_statement_may_set_joins_the_session_path(first: str, path: set[str]) -> None:
    cfg = parse_config(SEARCH_PATH_CONFIG)
    e = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    for _ in range(2):  # the second session sends the same text: no cached verdict may skip the path
        session = SqlSessionState()
        assert e.decide_sql("bot", ("ci",), "db", first, session=session).action == "allow"
        assert path <= session.search_path
        v = e.decide_sql("bot", ("ci",), "db", "select * from secrets", session=session)
        assert (v.action, v.rule) == ("block", "no-evil-secrets"), first


@pytest.mark.parametrize("sql,path", [
    ("update pg_settings set setting = '5s' where name = 'statement_timeout'", None),
    ("update pg_settings set setting = 'admin' where name = 'role'", None),  # not a row of pg_settings
    ("update pg_settings set setting = 'x'", ("*",)),  # every row: search_path among them
    ("update pg_settings set setting = 'x' where name like 'search%'", ("*",)),
    ("update my.pg_settings set setting = 'evil' where name = 'search_path'", None),  # a table of that name
])
def test_updating_pg_settings_is_read_as_the_set_config_it_runs(sql: str, path: tuple[str, ...] | None) -> None:
    stmt = analyze_sql(sql).statements[0]
    assert stmt.search_path == path and "set_role" not in stmt.properties


def test_a_prepared_body_sets_its_search_path_when_executed_not_when_prepared() -> None:
    cfg = parse_config(SEARCH_PATH_CONFIG)
    e = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    session = SqlSessionState()
    e.decide_sql("bot", ("ci",), "db", "prepare p as select set_config('search_path', 'evil', false)", session=session)
    assert session.search_path == frozenset({"public"})
    assert e.decide_sql("bot", ("ci",), "db", "select * from secrets", session=session).action == "allow"
    e.decide_sql("bot", ("ci",), "db", "execute p", session=session)
    assert e.decide_sql("bot", ("ci",), "db", "select * from secrets", session=session).action == "block"

def test_parse_errors_do_not_leak_literals() -> None:
    v = engine().decide_sql("bot", ("ci",), "db", "selec 'hunter2-password'")
    assert v.action == "block" and "hunter2" not in v.reason
    assert "syntax error at character 1" in v.reason


def test_extended_protocol_parse_text_with_params() -> None:
    e = engine()
    v = e.decide_sql("bot", ("ci",), "db", "select * from b where id = $1 and name = $2")
    assert (v.action, v.rule) == ("block", "block-b")
    v = e.decide_sql("bot", ("ci",), "locked", "select $1::int + $2")
    assert (v.action, v.rule) == ("allow", "allow-selects")


def test_ssh_and_k8s_without_matching_rules_use_the_default() -> None:
    cfg = parse_config(CONFIG + """
[[targets]]
name = "box"
protocol = "ssh"
address = "127.0.0.1:22"
authentication = "attestation"
default_action = "approve"
""")
    e = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    v = e.decide_ssh("bot", ("ci",), "box", SshRequest.exec("uptime"))
    assert (v.action, v.rule) == ("approve", None)
    v = e.decide_ssh("bot", ("ci",), "box", SshRequest.exec("echo 'open"))
    assert v.action == "block" and "cannot analyze" in v.reason


def test_k8s_request_parsing() -> None:
    r = K8sRequest.from_http("GET", "/api/v1/namespaces/dev/pods/web/exec?command=ls&stdout=1")
    assert (r.verb, r.resource, r.subresource, r.namespace, r.name) == ("create", "pods", "exec", "dev", "web")
    r = K8sRequest.from_http("DELETE", "/apis/apps/v1/namespaces/prod/deployments")
    assert (r.verb, r.resource, r.api_group, r.namespace, r.name) == ("deletecollection", "deployments", "apps", "prod", None)
    r = K8sRequest.from_http("GET", "/api/v1/pods?watch=1")
    assert (r.verb, r.resource, r.namespace) == ("watch", "pods", None)
    r = K8sRequest.from_http("GET", "/api/v1/namespaces/kube-system")
    assert (r.verb, r.resource, r.name, r.namespace) == ("get", "namespaces", "kube-system", "kube-system")
    assert not K8sRequest.from_http("GET", "/healthz").resource_request


def test_explain_is_readable() -> None:
    e = engine()
    text = str(explain(e, "bot", "db", "with d as (delete from b where id = 1 returning *) select lower(x) from a, d"))
    assert "decision:  approve (rule 'approve-a')" in text  # b is written, block-b is about reads
    assert "identity:  bot (groups: ci)" in text
    assert "kinds:      DELETE, SELECT" in text
    assert "reads:      a" in text and "writes:     b" in text
    assert "functions:  lower" in text
    assert "matching rules: mask-a (mask), approve-a (approve), approve-a-again (approve)" in text


# --- fuzzing: nothing but verdicts comes out, whatever the text -------------------------------------

SQL_BITS = st.sampled_from(["select", "SELECT", "*", "from", "a", "b", "pg_read_file", "(", ")", "'x'", "$1", ";",
                            "with", "as", "delete", "do", "$$", "begin", "end", "/*", "*/", "--", "\n", ",", "\"q\"",
                            "execute", "prepare", "set", "search_path", "=", "drop", "table", "where", "1", "E'\\''"])


@settings(max_examples=300, deadline=None)
@given(st.lists(SQL_BITS, max_size=25).map(" ".join))
def test_fuzz_sql_tokens(sql: str) -> None:
    v = engine().decide_sql("bot", ("ci",), "db", sql, session=SqlSessionState())
    assert isinstance(v, Verdict) and v.action in ACTION_STRENGTH and v.reason


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text: str) -> None:
    batch = analyze_sql(text)
    assert batch.statements
    for stmt in batch.statements:
        assert all(isinstance(r, Relation) for r in stmt.reads | stmt.writes)
        assert all(isinstance(f, Function) for f in stmt.functions)
    v = engine().decide_ssh("bot", ("ci",), "db", SshRequest.exec(text))
    assert v.action in ACTION_STRENGTH


def test_long_statements_are_decided_but_not_cached() -> None:
    e = engine()
    sql = "insert into c values " + ", ".join(f"({i}, 'x')" for i in range(3000))
    assert len(sql) > 16_384
    assert e.decide_sql("bot", ("ci",), "locked", sql).action == "block"
    assert e.decide_sql("bot", ("ci",), "locked", sql).action == "block"
    assert e.stats["exact_hits"] == 0 and not e._exact and not e._analysis


def test_decision_caches_stay_bounded_and_evict_their_oldest_hundredth() -> None:
    # A hundredth at a time: evicting a tenth at once (copying all 50,000 keys) held the event
    # loop for ~3 ms.
    from appliance.policy.engine import CACHE_MAX, _put

    cache: dict = {}
    for i in range(CACHE_MAX):
        _put(cache, i, i)
    _put(cache, 1, "updated")  # an update adds nothing, so evicts nothing
    assert len(cache) == CACHE_MAX and 0 in cache and cache[1] == "updated"
    _put(cache, "new", 1)
    chunk = CACHE_MAX // 100
    assert len(cache) == CACHE_MAX - chunk + 1 and cache["new"] == 1
    assert not any(i in cache for i in range(chunk)) and chunk in cache


# --- issue 15.4 / 24.4: match_keys, unless_properties -------------------------------------------------

KEYS_CONFIG = """
[[targets]]
name = "db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"

[[targets]]
name = "box"
protocol = "ssh"
address = "127.0.0.1:22"
authentication = "attestation"

[[identities]]
name = "bot"
[identities.process]
uid = 1000

[[rules]]
name = "either"
action = "block"
targets = ["db"]
[rules.sql]
functions = ["pg_read_file"]
properties = ["copy_program"]
match_keys = "any"

[[rules]]
name = "both"
action = "approve"
targets = ["db"]
[rules.sql]
kinds = ["DELETE"]
relations = ["billing.*"]

[[rules]]
name = "no-mass-writes"
action = "block"
targets = ["db"]
[rules.sql]
properties = ["no_where"]
unless_properties = ["explain_only"]

[[rules]]
name = "ssh-either"
action = "block"
targets = ["box"]
[rules.ssh]
programs = ["curl"]
constructs = ["pipe"]
match_keys = "any"
"""


def keys_engine() -> PolicyEngine:
    cfg = parse_config(KEYS_CONFIG)
    return PolicyEngine(cfg.policy, cfg.targets, cfg.identities)


def test_match_keys_any_matches_on_either_key() -> None:
    e = keys_engine()
    assert e.decide_sql("bot", (), "db", "select pg_read_file('/etc/passwd')").rule == "either"
    assert e.decide_sql("bot", (), "db", "copy t to program 'id'").rule == "either"
    assert e.decide_sql("bot", (), "db", "select 1").action == "allow"
    # Without match_keys the keys still combine with AND.
    assert e.decide_sql("bot", (), "db", "delete from billing.x where id = 1").rule == "both"
    assert e.decide_sql("bot", (), "db", "delete from public.x where id = 1").action == "allow"
    assert e.decide_sql("bot", (), "db", "select * from billing.x").action == "allow"
    assert e.decide_ssh("bot", (), "box", SshRequest.exec("curl x")).rule == "ssh-either"
    assert e.decide_ssh("bot", (), "box", SshRequest.exec("ls | wc")).rule == "ssh-either"
    assert e.decide_ssh("bot", (), "box", SshRequest.exec("ls")).action == "allow"


def test_unless_properties_lets_a_policy_allow_plain_explain() -> None:
    e = keys_engine()
    assert e.decide_sql("bot", (), "db", "delete from t").rule == "no-mass-writes"
    assert e.decide_sql("bot", (), "db", "explain delete from t").action == "allow"
    assert e.decide_sql("bot", (), "db", "explain analyze delete from t").rule == "no-mass-writes"
    assert e.decide_sql("bot", (), "db", "explain (analyze) delete from t").rule == "no-mass-writes"
    # A nested plain EXPLAIN does not exempt what runs around it.
    assert e.decide_sql("bot", (), "db", "do $$ begin execute 'explain select 1'; delete from t; end $$"
                        ).rule == "no-mass-writes"


def test_shape_cache_never_carries_a_verdict_that_hung_on_a_constant() -> None:
    """query_to_xml's SQL text, table_to_xml's relation and a LIKE '%' pattern are constants:
    the same shape with another constant must be decided afresh."""
    cfg = parse_config(KEYS_CONFIG.replace('functions = ["pg_read_file"]\nproperties = ["copy_program"]',
                                           'functions = ["pg_read_file"]\nreads = ["billing.*"]'))
    e = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    for harmless, dangerous, rule in [
        ("select query_to_xml('select 1', true, true, '')",
         "select query_to_xml('select pg_read_file(''/etc/passwd'')', true, true, '')", "either"),
        ("select table_to_xml('public.t', true, true, '')", "select table_to_xml('billing.cards', true, true, '')",
         "either"),
        ("delete from t where name like 'a%'", "delete from t where name like '%'", "no-mass-writes"),
    ]:
        assert e.decide_sql("bot", (), "db", harmless).action == "allow", harmless
        assert e.decide_sql("bot", (), "db", dangerous).rule == rule, dangerous
