"""SQL analysis through pglast and shell command analysis, statement by statement."""

from __future__ import annotations

import pytest

from appliance.policy.sql import KNOWN_KINDS, Relation, analyze_sql, kind_matches, valid_kind_pattern
from appliance.policy.ssh import SshRequest, analyze_ssh


def one(sql: str):
    batch = analyze_sql(sql)
    assert len(batch.statements) == 1, batch
    return batch.statements[0]


def names(rels) -> set[str]:
    return {str(r) for r in rels}


@pytest.mark.parametrize("sql,kind,kinds", [
    ("select 1", "SELECT", {"SELECT"}),
    ("insert into t values (1)", "INSERT", {"INSERT"}),
    ("update t set a = 1", "UPDATE", {"UPDATE"}),
    ("delete from t", "DELETE", {"DELETE"}),
    ("merge into t using s on true when matched then delete", "MERGE", {"MERGE", "MERGE.DELETE"}),
    ("copy t from stdin", "COPY", {"COPY"}),
    ("truncate t", "TRUNCATE", {"TRUNCATE"}),
    ("create table t (a int)", "CREATE_TABLE", {"CREATE_TABLE"}),
    ("create table t as select 1", "CREATE_TABLE_AS", {"CREATE_TABLE_AS"}),
    ("drop table t", "DROP_TABLE", {"DROP_TABLE"}),
    ("drop schema s", "DROP_SCHEMA", {"DROP_SCHEMA"}),
    ("alter table t add b int", "ALTER_TABLE", {"ALTER_TABLE", "ALTER_TABLE.ADD_COLUMN"}),
    ("alter index i set tablespace x", "ALTER_INDEX", {"ALTER_INDEX", "ALTER_INDEX.SET_TABLE_SPACE"}),
    ("grant select on t to u", "GRANT", {"GRANT"}),
    ("revoke select on t from u", "REVOKE", {"REVOKE"}),
    ("set x = 1", "SET", {"SET"}),
    ("reset x", "RESET", {"RESET"}),
    ("begin", "BEGIN", {"BEGIN"}),
    ("start transaction", "BEGIN", {"BEGIN"}),
    ("commit", "COMMIT", {"COMMIT"}),
    ("rollback to savepoint s", "ROLLBACK_TO", {"ROLLBACK_TO"}),
    ("prepare transaction 'x'", "PREPARE_TRANSACTION", {"PREPARE_TRANSACTION"}),
    ("prepare p as delete from t", "PREPARE", {"PREPARE", "DELETE"}),
    ("explain analyze update t set a = 1", "EXPLAIN", {"EXPLAIN", "UPDATE"}),
    ("with d as (delete from t returning *) select * from d", "SELECT", {"SELECT", "DELETE"}),
    ("do $$ begin delete from t; end $$", "DO", {"DO", "DELETE"}),
    ("create function f() returns void language sql as 'delete from t'", "CREATE_FUNCTION",
     {"CREATE_FUNCTION", "DELETE"}),
    ("vacuum t", "VACUUM", {"VACUUM"}),
    ("analyze t", "ANALYZE", {"ANALYZE"}),
    ("create event trigger e on ddl_command_start execute function f()", "CREATE_EVENT_TRIGGER",
     {"CREATE_EVENT_TRIGGER"}),
])
def test_kinds(sql: str, kind: str, kinds: set[str]) -> None:
    stmt = one(sql)
    assert stmt.error is None
    assert stmt.kind == kind and stmt.kinds == kinds
    assert kind in KNOWN_KINDS


def test_kind_patterns() -> None:
    assert kind_matches("DDL", "CREATE_TABLE") and kind_matches("ddl", "DROP_VIEW")
    assert kind_matches("DROP", "DROP_TABLE") and not kind_matches("DROP", "SELECT")
    assert kind_matches("CREATE_*", "CREATE_INDEX") and not kind_matches("CREATE_*", "ALTER_TABLE")
    assert kind_matches("DML", "MERGE") and kind_matches("TRANSACTION", "SAVEPOINT")
    assert valid_kind_pattern("DROP_*") and not valid_kind_pattern("SELEKT") and not valid_kind_pattern("FOO_*")


def test_reads_and_writes() -> None:
    s = one("insert into audit.log select a.x from public.a join b using (id) where c_id in (select id from c)")
    assert names(s.writes) == {"audit.log"}
    assert names(s.reads) == {"public.a", "b", "c"}
    s = one("update t set x = u.x from u where t.id = u.id")
    assert names(s.writes) == {"t"} and names(s.reads) == {"u"}
    s = one("merge into t using s on t.id = s.id when not matched then insert values (s.id)")
    assert names(s.writes) == {"t"} and names(s.reads) == {"s"}
    s = one("copy t to stdout")
    assert names(s.reads) == {"t"} and not s.writes
    s = one("copy t from stdin")
    assert names(s.writes) == {"t"}
    s = one("select * from db1.s.t")
    assert s.reads == {Relation("db1.s", "t")}
    s = one('select * from "MiXed"."T"')
    assert s.reads == {Relation("mixed", "t")}  # matched case-insensitively
    s = one("drop schema billing cascade")
    assert s.writes == {Relation("billing", "*")}


def test_cte_names_are_not_relations_but_scoping_is_exact() -> None:
    assert not one("with x as (select 1) select * from x").reads
    assert names(one("with x as (select * from x) select * from x").reads) == {"x"}  # inner x is a table
    assert not one("with recursive x as (select * from x) select * from x").reads
    assert names(one("with a as (select 1), b as (select * from a) select * from b").reads) == set()
    assert names(one("with b as (select * from a), a as (select 1) select * from b").reads) == {"a"}
    assert names(one("select * from (with x as (select 1) select * from x) s, x").reads) == {"x"}  # outer x: table
    assert names(one("with x as (select 1) select * from public.x").reads) == {"public.x"}
    s = one("with t as (select 1) delete from t")
    assert names(s.writes) == {"t"}  # a write target is never a CTE


def test_functions_anywhere() -> None:
    s = one("select a(b(c.d(1))), e() over (order by f()) from g(h()) where i() filter (where j()) is null")
    assert {str(f) for f in s.functions} >= {"a", "b", "c.d", "e", "f", "g", "h", "i"}
    s = one("insert into t values (default) on conflict (id) do update set x = k()")
    assert "k" in {f.name for f in s.functions}
    s = one("create table t (id int default nextval('s'), x text check (length(x) < 5))")
    assert {"nextval", "length"} <= {f.name for f in s.functions}


@pytest.mark.parametrize("sql,prop", [
    ("delete from t", "no_where"), ("update t set a = 1 where true", "no_where"),
    ("delete from t where $1", "no_where"), ("delete from t where exists (select 1)", "no_where"),
    ("truncate t", "truncate"), ("drop view v", "drop"), ("copy t to program 'x'", "copy_program"),
    ("copy t from '/f'", "copy_file"), ("alter system set x = 1", "alter_system"), ("set role r", "set_role"),
    ("set session authorization u", "set_session_authorization"), ("do $$ begin end $$", "do_block"),
    ("create function f() returns int language sql as 'select 1'", "function_body"),
    ("do $$ begin execute current_setting('x'); end $$", "dynamic_sql"),
    ("create function f() returns int language c as 'x', 'y'", "opaque_body"),
    ("select * into t2 from t", "select_into"), ("grant r to u", "role_grant"),
    ("explain (analyze) select 1", "explain_analyze"), ("select * from t for share", "locking"),
    ("insert into t values (1)", "writes"),
])
def test_properties(sql: str, prop: str) -> None:
    assert prop in one(sql).properties


def test_no_where_is_not_flagged_for_real_conditions() -> None:
    for sql in ("delete from t where id = 1", "update t set a = 1 where a is null",
                "delete from t where id = any($1)", "delete from t where exists (select 1 from u where u.id = t.id)"):
        assert "no_where" not in one(sql).properties, sql


def test_multi_statement_batch() -> None:
    batch = analyze_sql("select 1; delete from t where id = 2; commit")
    assert [s.kind for s in batch.statements] == ["SELECT", "DELETE", "COMMIT"]
    assert all("multi_statement" in s.properties for s in batch.statements)


def test_output_columns_track_their_sources() -> None:
    s = one("select email as e, lower(name), t.*, x from t, (select ssn as x from p) q")
    outputs = dict(s.outputs)
    assert outputs["e"] == {"email"}
    assert outputs["lower"] == {"name"}
    assert outputs["*"] == {"*"}  # t.*: its columns arrive under their own names
    assert outputs["x"] == {"x", "ssn"}  # resolved through the subquery's alias



def test_output_sources_reach_into_subqueries_and_returning_lists() -> None:
    s = one("select (select max(s.ssn) from secrets s where s.owner = t.id) as m, "
            "case when a > 0 then b else c end as k, t from t")
    outputs = dict(s.outputs)
    assert outputs["m"] == {"ssn", "owner", "id"}  # every column the scalar subquery touches
    assert outputs["max"] == {"ssn"}  # the subquery's own output
    assert outputs["k"] == {"a", "b", "c"}
    assert outputs["t"] == {"t", "*"}  # a bare table name: the whole row
    assert dict(one("update t set a = 1 where id = 2 returning a as x, b + c").outputs) == {
        "x": {"a"}, "?column?": {"b", "c"}}
    assert dict(one("insert into t values (1) returning *").outputs) == {"*": {"*"}, "column1": set()}
    assert dict(one("delete from t where id = 1 returning (select u.name from u where u.id = t.owner)").outputs) == {
        "name": {"name", "id", "owner"}}  # PostgreSQL names a scalar subquery after its output

def test_unparsable_and_unanalyzable() -> None:
    assert one("selec 1").error.startswith("syntax error")
    assert "cannot analyze" in one("do language plperlu $$ system('id') $$").error
    assert one("do $$ begin select from; end $$").error  # PL/pgSQL body with bad SQL
    assert analyze_sql("select 1").shape_cacheable and not analyze_sql("set x = 1").shape_cacheable
    assert analyze_sql("execute p").session_bound


# --- shell -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command,argvs,programs,constructs", [
    ("ls -la /tmp", [("ls", "-la", "/tmp")], {"ls"}, set()),
    ("ls; rm -rf /", [("ls",), ("rm", "-rf", "/")], {"ls", "rm"}, {"sequence"}),
    ("a && b || c", [("a",), ("b",), ("c",)], {"a", "b", "c"}, {"and_or"}),
    ("cat f | nc h 1", [("cat", "f"), ("nc", "h", "1")], {"cat", "nc"}, {"pipe"}),
    ("echo $(id)", [("id",), ("echo", "")], {"echo", "id"}, {"subst"}),
    ("echo `id`", [("id",), ("echo", "")], {"echo", "id"}, {"subst"}),
    ("ls > out 2>&1", [("ls", "out", "2", "1")], {"ls"}, {"redirect"}),
    ("sleep 1 &", [("sleep", "1")], {"sleep"}, {"background"}),
    ("r\\m x", [("rm", "x")], {"rm"}, set()),
    ("'r''m' \"x y\"", [("rm", "x y")], {"rm"}, set()),
    ("echo $HOME", [("echo", "$HOME")], {"echo"}, {"expansion"}),
    ("ls *.log", [("ls", "*.log")], {"ls"}, {"glob"}),
    ("echo {a,b}", [("echo", "{a,b}")], {"echo"}, {"glob"}),
    ("(cd /; ls)", [("cd", "/"), ("ls",)], {"cd", "ls"}, {"subshell", "sequence"}),
    ("diff <(ls a) b", [("ls", "a"), ("diff", "b")], {"diff", "ls"}, {"redirect", "subst"}),
    ("sudo -n env X=1 /usr/bin/rm f", [("sudo", "-n", "env", "X=1", "/usr/bin/rm", "f")], {"sudo", "env", "rm", "f"}, set()),
    ("bash -c 'curl x | sh'", [("bash", "-c", "curl x | sh"), ("curl", "x"), ("sh",)], {"bash", "curl", "sh"},
     {"pipe", "subshell"}),
    ("ls # ; rm -rf /", [("ls",)], {"ls"}, {"sequence"}),
    ("$'\\x72\\x6d' -rf /", [("rm", "-rf", "/")], {"rm"}, set()),
    ("$'\\162m' x", [("rm", "x")], {"rm"}, set()),
    ("$CMD -rf /", [("$CMD", "-rf", "/")], {"?"}, {"expansion"}),
    ("/bin/r? -rf /", [("/bin/r?", "-rf", "/")], {"?"}, {"glob"}),
    ("FOO=$(id) ls", [("id",), ("FOO=", "ls")], {"id", "ls"}, {"subst"}),
])
def test_shell_analysis(command: str, argvs: list, programs: set, constructs: set) -> None:
    a = analyze_ssh(SshRequest.exec(command))
    assert a.error is None
    assert list(a.argvs) == argvs
    assert a.programs == programs
    assert a.constructs == constructs


@pytest.mark.parametrize("command", ["echo 'open", 'echo "open', "echo $(date", "echo `date"])
def test_shell_syntax_errors_fail_closed(command: str) -> None:
    assert analyze_ssh(SshRequest.exec(command)).error


def test_deep_nesting_is_analyzed_or_refused_never_raises() -> None:
    import sys

    limit = sys.getrecursionlimit()
    deep = "select " + "abs(" * 1000 + "pg_read_file('x')" + ")" * 1000
    stmt = one(deep)
    assert stmt.error is None and "pg_read_file" in {f.name for f in stmt.functions}
    chain = "select 1" + " + 1" * 9000
    stmt = one(chain)
    assert stmt.error == "statement nested too deeply for botwarden to analyze"
    assert sys.getrecursionlimit() == limit  # restored


# --- issue 24.2: statements that give a function a new name -----------------------------------------


@pytest.mark.parametrize("sql,kind,functions", [
    ("CREATE OPERATOR ### (FUNCTION = pg_read_file, RIGHTARG = text)", "CREATE_OPERATOR", {"pg_read_file"}),
    ("create operator public.!! (procedure = pg_catalog.pg_terminate_backend, rightarg = int, restrict = eqsel)",
     "CREATE_OPERATOR", {"pg_catalog.pg_terminate_backend", "eqsel"}),
    ("CREATE AGGREGATE rf(text) (SFUNC = textcat, STYPE = text, FINALFUNC = pg_read_file)", "CREATE_AGGREGATE",
     {"textcat", "pg_read_file"}),
    ("create aggregate a(int) (sfunc = s, stype = int, combinefunc = c, serialfunc = se, deserialfunc = de, "
     "msfunc = ms, minvfunc = mi, mstype = int, mfinalfunc = mf)", "CREATE_AGGREGATE",
     {"s", "c", "se", "de", "ms", "mi", "mf"}),
    ("create cast (int as text) with function myf(int)", "CREATE_CAST", {"myf"}),
    ("create type t (input = myin, output = myout, receive = r, send = s, typmod_in = ti, analyze = an)",
     "CREATE_TYPE", {"myin", "myout", "r", "s", "ti", "an"}),
    ("create type r as range (subtype = int, canonical = c, subtype_diff = d)", "CREATE_TYPE", {"c", "d"}),
    ("create trigger t before insert on x for each row execute function pg_read_file()", "CREATE_TRIGGER",
     {"pg_read_file"}),
    ("create event trigger e on ddl_command_start execute function lo_export()", "CREATE_EVENT_TRIGGER",
     {"lo_export"}),
    ("create policy p on t using (pg_read_file('x') is not null)", "CREATE_POLICY", {"pg_read_file"}),
    ("create policy p on t with check (pg_ls_dir('/') is not null)", "CREATE_POLICY", {"pg_ls_dir"}),
    ("create operator class c for type int using btree as function 1 myf(int, int)", "CREATE_OPERATOR_CLASS",
     {"myf"}),
    ("create transform for int language plpgsql (from sql with function f1(internal), to sql with function f2(int))",
     "CREATE_TRANSFORM", {"f1", "f2"}),
    ("create conversion c for 'UTF8' to 'LATIN1' from myconv", "CREATE_CONVERSION", {"myconv"}),
    ("create language l handler h inline i validator v", "CREATE_LANGUAGE", {"h", "i", "v"}),
    ("create foreign data wrapper w handler h validator v", "CREATE_FOREIGN_DATA_WRAPPER", {"h", "v"}),
    ("alter operator ### (none, text) set (restrict = f)", "ALTER_OPERATOR", {"f"}),
    ("alter type t set (receive = r, send = s)", "ALTER_TYPE", {"r", "s"}),
    ("create text search parser p (start = a, gettoken = b, end = c, lextypes = d)", "CREATE_TEXT_SEARCH_PARSER",
     {"a", "b", "c", "d"}),
])
def test_function_references_are_functions_of_the_statement(sql: str, kind: str, functions: set[str]) -> None:
    stmt = one(sql)
    assert stmt.error is None
    assert stmt.kind == kind and kind in KNOWN_KINDS
    assert {str(f) for f in stmt.functions} >= functions


# --- issue 24.3 / 15.2: WHEREs that filter nothing, rule actions, MERGE -----------------------------


@pytest.mark.parametrize("sql", [
    "delete from accounts where id = id",
    "update accounts set balance = 0 where balance = balance",
    "delete from accounts where id is not null",
    "delete from accounts a where a.id is not null",
    "delete from accounts where true or id = 1",
    "delete from accounts where id = 1 or true",
    "delete from accounts where id = 1 or $1",
    "delete from accounts where id = id and balance >= balance",
    "delete from accounts where accounts.id = id",
    "delete from accounts where not (id <> id)",
    "delete from accounts where not (id is null)",
    "delete from accounts where (id = id) is true",
    "delete from accounts where id is not distinct from id",
    "delete from accounts where name like '%'",
    "delete from accounts where name ~~ '%%'",
    "delete from accounts where name = name collate \"C\"",
    "delete from accounts where (id, name) = (id, name)",
    "delete from accounts where current_user = current_user",
    "delete from accounts where id in (id)",
    "delete from accounts where id between id and id",
    "delete from accounts where id::text = id::text",
    "delete from accounts where coalesce(id, 0) = coalesce(id, 0)",
    "DELETE FROM accounts WHERE EXISTS (SELECT 1 FROM log WHERE log.id > 0)",
    "delete from accounts where exists (select 1 from accounts where accounts.id > 0)",
    "delete from accounts where exists (select 1 from log where id > 0)",
    "delete from accounts using accounts b where accounts.id = b.id",
    "update accounts set x = 1 from log where log.id > 0",
    "CREATE RULE r AS ON INSERT TO log DO ALSO DELETE FROM accounts WHERE new.id IS NOT NULL",
    "create rule r as on update to log do also update accounts set balance = 0 where old.id = old.id",
    "MERGE INTO accounts a USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE",
    "MERGE INTO accounts a USING (SELECT 1) s ON true WHEN MATCHED THEN UPDATE SET balance = 0",
    "merge into accounts a using accounts b on a.id = b.id when matched then delete",
    "merge into accounts a using log s on s.id > 0 when matched then delete",
    "merge into accounts a using log s on a.id = s.id or true when matched then delete",
    "merge into accounts a using (select 1) s on true when matched and a.id is not null then delete",
    "with d as (delete from accounts where id = id returning *) select * from d",
])
def test_where_that_filters_nothing_is_no_where(sql: str) -> None:
    stmt = one(sql)
    assert stmt.error is None
    assert {"no_where", "destructive"} <= stmt.properties, sql


@pytest.mark.parametrize("sql", [
    "delete from accounts where id = 1",
    "delete from accounts a where a.id = $1",
    "delete from accounts where id is null",
    "delete from accounts where id = 1 and true",
    "delete from accounts where exists (select 1 from log where log.account_id = accounts.id)",
    "delete from accounts a where exists (select 1 from log l where l.account_id = a.id)",
    "delete from accounts where id in (select account_id from log)",
    "delete from accounts using log where log.account_id = accounts.id",
    "update accounts set x = 1 from log where log.id = accounts.id",
    "delete from accounts where name like 'a%'",
    "create rule r as on delete to log do also delete from accounts where id = old.account_id",
    "merge into accounts a using log s on a.id = s.account_id when matched then delete",
    "merge into accounts a using (select 1) s on true when matched and a.id = 5 then delete",
    "merge into accounts a using (select 1) s on true when not matched then insert values (1)",
])
def test_where_that_filters_is_not_no_where(sql: str) -> None:
    assert "no_where" not in one(sql).properties, sql


def test_merge_sub_kinds_and_rule_actions_are_analyzed() -> None:
    s = one("merge into t using s on t.id = s.id when matched and s.gone then delete "
            "when matched then update set x = s.x when not matched then insert values (s.id)")
    assert s.kinds == {"MERGE", "MERGE.DELETE", "MERGE.UPDATE", "MERGE.INSERT"}
    assert "destructive" in s.properties and "no_where" not in s.properties
    assert kind_matches("MERGE", "MERGE.DELETE") and not kind_matches("DELETE", "MERGE.DELETE")
    r = one("create rule r as on insert to log do also delete from accounts where new.id is not null")
    assert r.kinds == {"CREATE_RULE", "DELETE"} and names(r.writes) == {"log", "accounts"}


# --- issue 24.4 / 15.3: ALTER sub-kinds, RENAME, EXPLAIN, destructive -------------------------------


@pytest.mark.parametrize("sql,kinds", [
    ("alter table x rename to y", {"RENAME", "ALTER_TABLE", "ALTER_TABLE.RENAME"}),
    ("alter view v rename to w", {"RENAME", "ALTER_VIEW", "ALTER_VIEW.RENAME"}),
    ("alter table x rename column a to b", {"RENAME", "ALTER_TABLE", "ALTER_TABLE.RENAME_COLUMN"}),
    ("alter table x rename constraint a to b", {"RENAME", "ALTER_TABLE", "ALTER_TABLE.RENAME_CONSTRAINT"}),
    ("alter table t drop column c", {"ALTER_TABLE", "ALTER_TABLE.DROP_COLUMN"}),
    ("alter table t add column c int, drop constraint k", {"ALTER_TABLE", "ALTER_TABLE.ADD_COLUMN",
                                                             "ALTER_TABLE.DROP_CONSTRAINT"}),
    ("alter table t alter column c type bigint using null", {"ALTER_TABLE", "ALTER_TABLE.ALTER_COLUMN_TYPE"}),
    ("alter table t set unlogged", {"ALTER_TABLE", "ALTER_TABLE.SET_UNLOGGED"}),
    ("alter table t disable trigger all", {"ALTER_TABLE", "ALTER_TABLE.DISABLE_TRIG_ALL"}),
    ("alter foreign table f drop column c", {"ALTER_FOREIGN_TABLE", "ALTER_FOREIGN_TABLE.DROP_COLUMN"}),
])
def test_alter_sub_kinds(sql: str, kinds: set[str]) -> None:
    stmt = one(sql)
    assert stmt.kinds == kinds
    assert kinds <= KNOWN_KINDS
    assert "ALTER_ACCESS_METHOD" not in stmt.kinds


def test_kind_patterns_match_sub_kinds() -> None:
    assert kind_matches("ALTER_TABLE", "ALTER_TABLE.DROP_COLUMN")
    assert kind_matches("alter_table.drop_*", "ALTER_TABLE.DROP_CONSTRAINT")
    assert not kind_matches("ALTER_TABLE.DROP_COLUMN", "ALTER_TABLE.ADD_COLUMN")
    assert not kind_matches("ALTER_TAB", "ALTER_TABLE.DROP_COLUMN")
    assert kind_matches("DDL", "ALTER_TABLE.DROP_COLUMN") and not kind_matches("DROP", "ALTER_TABLE.DROP_COLUMN")
    assert valid_kind_pattern("ALTER_TABLE.DROP_COLUMN") and not valid_kind_pattern("ALTER_TABLE.DROP_COLUMNS")


@pytest.mark.parametrize("sql,destructive", [
    ("drop table t", True), ("drop index i", True), ("drop role r", True), ("drop database d", True),
    ("drop owned by bob", True), ("reassign owned by a to b", True), ("truncate t", True),
    ("alter table t drop column c", True), ("alter table t drop constraint k", True),
    ("alter table t alter column c type int", True), ("delete from t", True), ("update t set a = 1", True),
    ("delete from t where id = id", True), ("merge into t using s on t.id = s.id when matched then delete", True),
    ("with d as (delete from t returning 1) select * from d", True), ("drop tablespace x", True),
    ("delete from t where id = 1", False), ("alter table t add column c int", False),
    ("alter table t rename to u", False), ("merge into t using s on t.id = s.id when matched then update set a = 1",
                                           False),
    ("insert into t values (1)", False), ("create table t (a int)", False), ("select 1", False),
])
def test_destructive(sql: str, destructive: bool) -> None:
    assert ("destructive" in one(sql).properties) is destructive, sql


def test_explain_only_is_plain_explain_of_the_whole_statement() -> None:
    plain = one("explain delete from t")
    assert {"explain_only", "no_where", "destructive"} <= plain.properties and "DELETE" in plain.kinds
    assert "explain_only" in one("explain (costs off, verbose) update t set a = 1").properties
    assert "explain_only" not in one("explain analyze delete from t").properties
    assert "explain_only" not in one("explain (analyze false) delete from t").properties  # the safe side
    assert "explain_only" not in one("delete from t").properties
    # A nested EXPLAIN never marks its outer statement.
    assert "explain_only" not in one("do $$ begin execute 'explain select 1'; delete from t; end $$").properties
    assert "explain_only" not in one("create function f() returns setof text language sql as "
                                     "'explain select 1'").properties


# --- property: whatever the condition, OR true filters nothing and AND id = 5 filters ----------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ATOMS = st.sampled_from(["id = id", "id = 1", "t.id = t.id", "x is not null", "x is null", "true", "$1", "x like '%'",
                          "x ~~ 'a%'", "exists (select 1 from u where u.a = t.id)", "exists (select 1 from u)",
                          "(a, b) = (a, b)", "x <> x", "x = x collate \"C\"", "id in (select id from u)",
                          "coalesce(x, 0) = 0", "new.id is not null", "s.id = t.id", "x between x and x"])
_CONDITIONS = st.recursive(_ATOMS, lambda inner: st.one_of(
    st.tuples(inner, inner).map(lambda p: f"({p[0]} and {p[1]})"),
    st.tuples(inner, inner).map(lambda p: f"({p[0]} or {p[1]})"),
    inner.map(lambda c: f"not ({c})"),
    inner.map(lambda c: f"({c}) is true")), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(_CONDITIONS)
def test_no_where_invariants(condition: str) -> None:
    for template in ("delete from t where {}", "update t set a = 1 where {}",
                     "merge into t using s on {} when matched then delete"):
        plain = one(template.format(condition))
        assert plain.error is None
        assert "no_where" in one(template.format(f"({condition}) or true")).properties
        assert "no_where" not in one(template.format(f"({condition}) and t.id = 5")).properties
        # no_where depends on the condition, not on how the target is written
        assert ("no_where" in one(template.replace("t ", "public.t ", 1).format(condition)).properties) == \
            ("no_where" in plain.properties)


@pytest.mark.parametrize("sql,column,source", [
    ("select e from accounts as t(i, e)", "e", "*"),                       # which column: the catalog's
    ("with c(e) as (select email from accounts) select e from c", "e", "email"),
    ("select e from (select email from accounts) as s(e)", "e", "email"),
    ("select 'x' as e union all select email from accounts", "e", "email"),  # the first branch names it
    ("select 'x' as e union select 'y' except select email from accounts", "e", "email"),
    ("select 'x' as e union all select * from accounts", "e", "*"),
    ("values ((select email from accounts limit 1))", "column1", "email"),
    ("select e from accounts a join lateral (values (a.email)) v(e) on true", "e", "email"),
    ("select unnest from unnest(array(select email from accounts))", "unnest", "email"),
    ("select e from rows from (unnest(array(select email from accounts))) as r(e)", "e", "email"),
    ("select a from f((select email from accounts limit 1)) as t(a text, b int)", "a", "email"),
    ("with recursive r(e) as (select email from accounts union select e from r) select e from r", "e", "email"),
    # A function's columns named by its OUT parameters (key, value): any result column may be one.
    ("select value from accounts a, jsonb_each_text(to_jsonb(a))", "?any", "*"),
    ("select t.v from accounts a, xmltable('/r' passing xmlelement(name r, a.email) columns v text path '.') t",
     "v", "email"),
])
def test_renamed_outputs_keep_their_sources(sql, column, source):
    # Before: each of these returned the email under a name the masking did not follow.
    outputs = {k: set(v) for k, v in one(sql).outputs}
    seen, todo = set(), [column]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += outputs.get(name, ())
    assert source in seen, outputs


@pytest.mark.parametrize("sql,name", [
    ("select array(select 1)", "array"), ("select exists(select 1)", "exists"),
    ("select (select x from t)", "x"), ("select (a).b from t a", "b"), ("select x collate \"C\" from t", "x"),
    ("select greatest(1, 2)", "greatest"), ("select nullif(1, 2)", "nullif"), ("select row(1)", "row"),
    ("select array[1]", "array"), ("select current_user", "current_user"),
    ("select xmlelement(name a)", "xmlelement"),
])
def test_output_names_are_the_servers(sql, name):
    assert name in dict(one(sql).outputs), one(sql).outputs


@pytest.mark.parametrize("sql,operators", [
    ("select 1 ### 2", {"###"}),
    ("select 1 operator(public.###) 2", {"public.###"}),
    ("select @#@ 1", {"@#@"}),
    ("select a between 1 and 2 from t", {"<", "<=", ">", ">="}),
    ("select x in (1, 2), x is distinct from 1, nullif(a, b) from t", {"="}),
    ("select case a when 1 then 2 end from t", {"="}),
    ("select a in (select 1), b ### all (select 1) from t order by a using @@@", {"=", "###", "@@@"}),
    ("select a like b, a ilike b from t", {"~~", "~~*"}),
    ("select 1::badge, cast(1 as public.badge), array[1]::badge[], int '1'",
     {"badge", "public.badge", "_badge", "pg_catalog.int4"}),
    # Inside bodies and prepared statements too.
    ("create function f() returns int language plpgsql as $$ begin if 1 ### 2 then return 1; end if; "
     "return 0; end $$", {"###"}),
    ("prepare p as select 1 #%# 2", {"#%#"}),
    ("do $$ begin perform 1 %% 2; end $$", {"%%"}),
    ("select id from t", set()),
])
def test_operators_and_casts_a_statement_uses_are_collected(sql, operators):
    """A user-defined operator or cast runs its function with no function named in the statement:
    the engine looks these up among the functions learned at login (test_catalog_before_session)."""
    assert {str(f) for f in one(sql).operators} == operators
