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
    ("merge into t using s on true when matched then delete", "MERGE", {"MERGE"}),
    ("copy t from stdin", "COPY", {"COPY"}),
    ("truncate t", "TRUNCATE", {"TRUNCATE"}),
    ("create table t (a int)", "CREATE_TABLE", {"CREATE_TABLE"}),
    ("create table t as select 1", "CREATE_TABLE_AS", {"CREATE_TABLE_AS"}),
    ("drop table t", "DROP_TABLE", {"DROP_TABLE"}),
    ("drop schema s", "DROP_SCHEMA", {"DROP_SCHEMA"}),
    ("alter table t add b int", "ALTER_TABLE", {"ALTER_TABLE"}),
    ("alter index i set tablespace x", "ALTER_INDEX", {"ALTER_INDEX"}),
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
    assert outputs["?column?"] == {"*"}  # t.*: its columns arrive under their own names
    assert outputs["x"] == {"x", "ssn"}  # resolved through the subquery's alias


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
