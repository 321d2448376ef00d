"""Issue 24.2-24.4's bypasses end to end: a real PostgreSQL 15 in a network namespace, the real
daemon with its eBPF probes, a bot started with `botwarden bot run` whose database user may do
each of them (it owns the table through a role). Under a policy that names what each does, each
is refused with the rule's name and the server shows nothing happened; the harmless look-alikes
(ADD COLUMN under a DROP COLUMN rule, a plain EXPLAIN, a filtered DELETE, SET statement_timeout)
pass. tests/test_policy_front_bypasses.py runs the same through the front alone, quicker."""

from __future__ import annotations

import json
import sys

import pytest

from tests.probes_fixtures import RUN_TAG

from tests.test_pg_reading_e2e import (BOT, BOT_SCRIPT, RAW_CLIENT, _dsn, _steps, requests_of, run_bot, run_direct,
                                      start_world, table_exists)
from tests.test_probes_e2e import bot_run
from tests.test_pg_reading_e2e import accounts  # noqa: F401  (the fixture, on this module's world)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

RULES = """
[[rules]]
name = "no-server-files"
action = "block"
[rules.sql]
functions = ["pg_read_file", "pg_terminate_backend"]

[[rules]]
name = "no-mass-writes"
action = "block"
[rules.sql]
properties = ["no_where"]
unless_properties = ["explain_only"]

[[rules]]
name = "no-column-drops"
action = "block"
[rules.sql]
kinds = ["ALTER_TABLE.DROP_COLUMN", "ALTER_TABLE.RENAME"]

[[rules]]
name = "no-evil-secrets"
action = "block"
[rules.sql]
relations = ["evil.secrets"]

[[rules]]
name = "mask-emails"
action = "mask"
[rules.sql]
relations = ["accounts"]
[[rules.mask]]
columns = ["email"]
strategy = "full"

[[rules]]
name = "no-role-switch"
action = "block"
[rules.sql]
properties = ["set_role"]
"""


@pytest.fixture(scope="module")
def world(bao_server, tmp_path_factory):
    with start_world(bao_server, tmp_path_factory.mktemp("policy-e2e"), RULES, bots=f"botwarden-policy-{RUN_TAG}.bots",
                     pin_dir=f"/sys/fs/bpf/botwarden-policy-{RUN_TAG}") as w:
        yield w


BYPASSES = [
    ("CREATE OPERATOR ### (FUNCTION = pg_read_file, RIGHTARG = text)", "no-server-files"),
    ("CREATE AGGREGATE rf(text) (SFUNC = textcat, STYPE = text, FINALFUNC = pg_read_file)", "no-server-files"),
    ("CREATE OPERATOR !!! (FUNCTION = pg_terminate_backend, RIGHTARG = int)", "no-server-files"),
    ("SELECT query_to_xml('select pg_read_file(''/etc/hostname'')', true, true, '')", "no-server-files"),
    ("CREATE RULE r AS ON INSERT TO accounts DO ALSO DELETE FROM accounts WHERE new.id IS NOT NULL",
     "no-mass-writes"),
    ("MERGE INTO accounts a USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE", "no-mass-writes"),
    ("MERGE INTO accounts a USING (SELECT 1) s ON true WHEN MATCHED THEN UPDATE SET email = NULL", "no-mass-writes"),
    ("DELETE FROM accounts WHERE EXISTS (SELECT 1 FROM pg_class WHERE pg_class.oid > 0)", "no-mass-writes"),
    ("DELETE FROM accounts WHERE true OR id = 1", "no-mass-writes"),
    ("UPDATE accounts SET email = NULL WHERE id IS NOT NULL", "no-mass-writes"),
    ("ALTER TABLE accounts DROP COLUMN email", "no-column-drops"),
    ("ALTER TABLE accounts RENAME TO accounts_gone", "no-column-drops"),
]


def test_bypasses_are_refused_and_nothing_happens(world, accounts):  # noqa: F811
    out = run_bot(world, _steps(*(sql for sql, _ in BYPASSES), "SELECT count(*) FROM accounts"))
    for (sql, rule), got in zip(BYPASSES, out):
        assert not got["ok"] and got["sqlstate"] == "42501" and rule in got["message"], (sql, got)
    assert bytes.fromhex(out[-1]["rows"][0][0]) == b"1"  # the session stayed usable
    pg = world["pg"]
    assert table_exists(pg)
    assert pg.psql("SELECT count(*) FROM accounts WHERE email = 'a@example.com'") == "1"
    assert pg.psql("SELECT count(*) FROM pg_operator WHERE oprname IN ('###', '!!!')") == "0"
    assert pg.psql("SELECT count(*) FROM pg_proc WHERE proname = 'rf'") == "0"
    assert pg.psql("SELECT count(*) FROM pg_rules WHERE tablename = 'accounts'") == "0"


def test_look_alikes_pass(world, accounts):  # noqa: F811
    out = run_bot(world, _steps("ALTER TABLE accounts ADD COLUMN note text", "EXPLAIN DELETE FROM accounts",
                                "DELETE FROM accounts WHERE id = 2", "SET statement_timeout = 5000",
                                "UPDATE accounts SET note = 'x' WHERE id = 1"))
    assert all(step["ok"] for step in out), out
    assert any(b"Delete on accounts" in bytes.fromhex(row[0]) for row in out[1]["rows"])
    assert world["pg"].psql("SELECT note FROM accounts WHERE id = 1") == "x"


# A search_path set where the analysis did not look (a DO block's statement, a query run by
# query_to_xml, two set_config calls in one statement) made an unqualified name resolve, on the
# server, to a schema a rule names while botwarden matched it in public only.
SEARCH_PATH_SETTERS = [
    "DO $$ BEGIN PERFORM set_config('search_path', 'evil, public', false); END $$",
    "SELECT query_to_xml('select set_config(''search_path'', ''evil, public'', false)', true, true, '')",
    "SELECT set_config('search_path', 'evil, public', false) FROM pg_class "
    "WHERE set_config('search_path', 'public', false) IS NOT NULL LIMIT 1",
    # pg_settings' update rule runs set_config, and any user may update the view.
    "UPDATE pg_settings SET setting = 'evil, public' WHERE name = 'search_path'",
]


@pytest.mark.parametrize("setter", SEARCH_PATH_SETTERS)
def test_a_search_path_set_inside_a_statement_still_guards_unqualified_names(world, setter):
    pg = world["pg"]
    pg.psql("CREATE SCHEMA IF NOT EXISTS evil; CREATE TABLE IF NOT EXISTS evil.secrets (s text); "
            "TRUNCATE evil.secrets; INSERT INTO evil.secrets VALUES ('the-evil-secret')")
    steps = _steps(setter, "SELECT s FROM secrets")
    direct = run_direct(world, steps)  # what the server does: the unqualified name is evil.secrets
    assert direct[0]["ok"] and bytes.fromhex(direct[1]["rows"][0][0]) == b"the-evil-secret", direct
    out = run_bot(world, steps)
    assert out[0]["ok"], out
    got = out[1]
    assert not got["ok"] and got["sqlstate"] == "42501" and "no-evil-secrets" in got["message"], got
    rows = requests_of(world, "SELECT s FROM secrets")
    assert rows[-1]["decision"] == "block" and rows[-1]["rule"] == "no-evil-secrets", rows[-1]



def _evil_schema(pg) -> None:
    pg.psql("CREATE SCHEMA IF NOT EXISTS evil; CREATE TABLE IF NOT EXISTS evil.secrets (s text); "
            "TRUNCATE evil.secrets; INSERT INTO evil.secrets VALUES ('the-evil-secret')")


# The startup packet's settings (options=-c name=value, or a setting sent as a parameter of its
# own) apply before the first statement: they are decided as if the session's first statement
# set them.
@pytest.mark.parametrize("dsn_extra", [{"options": "-csearch_path=evil,public"},
                                       {"options": "--search-path=evil,public"}])
def test_a_search_path_set_at_startup_still_guards_unqualified_names(world, dsn_extra):
    _evil_schema(world["pg"])
    steps = _steps("SELECT s FROM secrets")
    direct = run_direct(world, steps, **dsn_extra)
    assert bytes.fromhex(direct[0]["rows"][0][0]) == b"the-evil-secret", direct
    got = run_bot(world, steps, **dsn_extra)[0]
    assert not got["ok"] and got["sqlstate"] == "42501" and "no-evil-secrets" in got["message"], got
    rows = requests_of(world, "SELECT s FROM secrets")
    assert rows[-1]["decision"] == "block" and rows[-1]["rule"] == "no-evil-secrets", rows[-1]


def test_a_search_path_default_of_the_database_still_guards_unqualified_names(world):
    # ALTER DATABASE/ROLE ... SET search_path applies at login, where neither the startup packet nor
    # a statement shows it: botwarden reads the session's path from the server first.
    pg = world["pg"]
    _evil_schema(pg)
    pg.psql("ALTER DATABASE postgres SET search_path = evil, public")
    try:
        steps = _steps("SELECT s FROM secrets")
        direct = run_direct(world, steps)
        assert bytes.fromhex(direct[0]["rows"][0][0]) == b"the-evil-secret", direct
        got = run_bot(world, steps)[0]
        assert not got["ok"] and got["sqlstate"] == "42501" and "no-evil-secrets" in got["message"], got
    finally:
        pg.psql("ALTER DATABASE postgres RESET search_path")


def test_a_role_set_at_startup_is_a_role_switch(world):
    steps = _steps("SELECT current_user")
    direct = run_direct(world, steps, options="-crole=pg_read_all_data")
    assert bytes.fromhex(direct[0]["rows"][0][0]) == b"pg_read_all_data", direct
    ran = bot_run(world["config"], BOT, [sys.executable, "-c", BOT_SCRIPT,
                                         _dsn(world, options="-crole=pg_read_all_data"), '[]'],
                  user=None, allow_privileged=True)
    assert ran.returncode != 0, (ran.stdout, ran.stderr)
    assert "setting role at connection start is refused: blocked by botwarden rule 'no-role-switch'" in ran.stderr, \
        ran.stderr


# A statement prepared in SQL is the same object as one prepared with Parse: the extended protocol's
# Bind/Execute can run it by name. Before, a name botwarden had not seen parsed ran as allowed
# ("prepared before this session": there is no such thing, each session has its own backend), and
# a name it had seen parsed kept that verdict after SQL DEALLOCATE and PREPARE gave it a new body.
PREPARED_BY_NAME = RAW_CLIENT + r"""
import json, struct, sys
import psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
pg = conn.pgconn
out = []
def run(sql):
    res = pg.exec_(sql.encode())
    out.append(res.error_message.decode() or "ok")
def run_prepared(name):
    pg.send_query_prepared(name.encode(), [])
    res = pg.get_result()
    while pg.get_result() is not None:
        pass
    out.append({"rows": [[res.get_value(r, c).decode() for c in range(res.nfields)] for r in range(res.ntuples)],
                "error": res.error_message.decode()})
for step in json.loads(sys.argv[2]):
    if step[0] == "sql":
        run(step[1])
    elif step[0] == "parse":
        pg.prepare(step[1].encode(), step[2].encode())
        out.append("parsed")
    elif step[0] == "named_cursor":  # psycopg's server-side cursor: DECLARE, then FETCH FORWARD
        with conn.transaction(), conn.cursor(name="bw_nc") as cur:
            cur.execute(step[1])
            out.append({"rows": [list(r) for r in cur.fetchall()], "error": ""})
    elif step[0] == "raw_execute_portal":  # SQL DECLARE, then the protocol's Execute of that portal
        raw = Raw(sys.argv[1])
        q = step[1].encode() + b"\0"
        name = step[2].encode() + b"\0"
        raw.s.sendall(b"Q" + struct.pack("!i", len(q) + 4) + q + b"E" + struct.pack("!i", len(name) + 8) + name
                      + struct.pack("!i", 0) + b"S" + struct.pack("!i", 4))
        rows, errors = [], []
        for kind, body in raw.messages(2):
            if kind == b"D":
                n = struct.unpack("!h", body[:2])[0]
                pos, row = 2, []
                for _ in range(n):
                    ln = struct.unpack("!i", body[pos:pos + 4])[0]
                    row.append(body[pos + 4:pos + 4 + ln].decode())
                    pos += 4 + ln
                rows.append(row)
            elif kind == b"E":
                errors.append(body.decode("utf-8", "replace"))
        raw.s.close()
        out.append({"rows": rows, "error": " ".join(errors)})
    else:
        run_prepared(step[1])
print(json.dumps(out))
"""


def _run_prepared(world, steps, *, direct=False):
    import json
    import subprocess
    if direct:
        pg = world["pg"]
        dsn = (f"host={pg.host} port={pg.port} dbname=postgres user={pg.superuser} password={pg.password} "
               f"sslmode=disable")
        res = subprocess.run([sys.executable, "-c", PREPARED_BY_NAME, dsn, json.dumps(steps)], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)
    ran = bot_run(world["config"], BOT, [sys.executable, "-c", PREPARED_BY_NAME, _dsn(world), json.dumps(steps)],
                  user=None, allow_privileged=True)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


@pytest.mark.parametrize("steps", [
    [["sql", "PREPARE s2 AS SELECT email FROM accounts"], ["execute", "s2"]],
    [["parse", "s3", "SELECT 'nothing to mask' AS email"], ["execute", "s3"], ["sql", "DEALLOCATE s3"],
     ["sql", "PREPARE s3 AS SELECT email FROM accounts"], ["execute", "s3"]],
], ids=["prepared-in-sql", "redefined-in-sql"])
def test_a_statement_run_by_name_is_decided_as_what_the_name_now_holds(world, accounts, steps):  # noqa: F811
    direct = _run_prepared(world, steps, direct=True)
    assert direct[-1]["rows"] == [["a@example.com"]], direct  # what the server runs under the name
    out = _run_prepared(world, steps)
    last = out[-1]
    assert "a@example.com" not in json.dumps(out), out
    assert last["rows"] == [["********"]], out  # masked, as the same read in SQL is
    rows = requests_of(world, "EXECUTE \"s3\"", "EXECUTE \"s2\"")
    assert rows[-1]["decision"] == "mask" and rows[-1]["rule"] == "mask-emails", rows


def test_a_name_botwarden_did_not_see_prepared_does_not_run(world, accounts):  # noqa: F811
    # Unknown to the server too: its own error, and the session goes on.
    out = _run_prepared(world, [["execute", "s9"], ["sql", "SELECT 1"]])
    assert 'prepared statement "s9" does not exist' in out[0]["error"] and out[1] == "ok", out
    # Prepared where botwarden does not follow names (inside a DO block): refused, not run.
    # (A DO block's dynamic SQL is refused itself while a rule masks columns: a function made
    # before the session stands for it here, one whose body names the table only in text it
    # builds at run time; botwarden reads the bodies of those that name it, below.)
    world["pg"].psql("CREATE OR REPLACE FUNCTION bw_prepare_s8() RETURNS int LANGUAGE plpgsql AS "
                     "$$ BEGIN EXECUTE 'PREPARE s8 AS SELECT e' || 'mail FROM acc' || 'ounts'; RETURN 1; END $$; "
                     "GRANT EXECUTE ON FUNCTION bw_prepare_s8() TO PUBLIC")
    steps = [["sql", "SELECT bw_prepare_s8()"], ["execute", "s8"]]
    assert _run_prepared(world, steps, direct=True)[-1]["rows"] == [["a@example.com"]]
    out = _run_prepared(world, steps)
    assert out[0] == "ok" and out[1]["rows"] == [] and "did not see prepared" in out[1]["error"], out


def test_a_cursors_rows_are_masked_as_its_query_is(world, accounts):  # noqa: F811
    # FETCH returns the rows of the query its cursor was declared for: before, it was decided on
    # its own (it reads nothing) and psycopg's server-side cursors returned masked columns in clear.
    steps = [["named_cursor", "SELECT email FROM accounts"]]
    assert _run_prepared(world, steps, direct=True)[-1]["rows"] == [["a@example.com"]]
    out = _run_prepared(world, steps)
    assert out[-1]["rows"] == [["********"]], out
    rows = requests_of(world, "%FETCH FORWARD%bw_nc%")
    assert rows and rows[-1]["decision"] == "mask" and rows[-1]["rule"] == "mask-emails", rows
    # In SQL, in one simple query: the DECLARE counts for the FETCH after it.
    out = run_bot(world, _steps("BEGIN; DECLARE c CURSOR FOR SELECT email FROM accounts; FETCH ALL FROM c", "COMMIT"))
    assert [bytes.fromhex(v) for v in out[0]["rows"][0]] == [b"********"], out
    # A cursor botwarden did not see declared: refused (one a function made before the session
    # opens, say, whose body names the table only in text it builds at run time).
    world["pg"].psql("CREATE OR REPLACE FUNCTION bw_open_h() RETURNS int LANGUAGE plpgsql AS "
                     "$$ BEGIN EXECUTE 'DECLARE h CURSOR WITH HOLD FOR SELECT e' || 'mail FROM acc' || 'ounts'; "
                     "RETURN 1; END $$; "
                     "GRANT EXECUTE ON FUNCTION bw_open_h() TO PUBLIC")
    out = run_bot(world, _steps("SELECT bw_open_h()", "FETCH ALL FROM h"))
    assert out[0]["ok"] and not out[1]["ok"] and "did not see declared" in out[1]["message"], out
    # A DO block that reads the masked relation is refused itself, and so is one whose SQL
    # botwarden cannot read while a rule masks columns.
    out = run_bot(world, _steps("DO $$ BEGIN EXECUTE 'DECLARE h CURSOR WITH HOLD FOR SELECT email FROM accounts'; END $$",
                                "SET bw.t = 'accounts'",
                                "DO $$ BEGIN EXECUTE 'DECLARE h CURSOR WITH HOLD FOR SELECT email FROM ' || "
                                "quote_ident(current_setting('bw.t')); END $$"))
    assert not out[0]["ok"] and "masking cannot follow" in out[0]["message"], out
    assert not out[2]["ok"] and "cannot read" in out[2]["message"] and "mask-emails" in out[2]["message"], out


def test_executing_a_sql_cursors_portal_is_decided_as_fetching_from_it(world, accounts):  # noqa: F811
    out = _run_prepared(world, [["raw_execute_portal", "DECLARE c CURSOR WITH HOLD FOR SELECT email FROM accounts", "c"]])
    assert out[0]["rows"] == [] and "masked: read them with FETCH" in out[0]["error"], out
    out = _run_prepared(world, [["raw_execute_portal", "DECLARE c CURSOR WITH HOLD FOR SELECT id FROM accounts", "c"]])
    assert out[0]["rows"] == [["1"]] and not out[0]["error"], out


@pytest.mark.parametrize("sql", [
    "SELECT query_to_xml('select email from accounts', true, true, '')",
    "SELECT table_to_xml('accounts', true, true, '')",
    "SELECT word FROM ts_stat('select to_tsvector(''simple'', email) from accounts')",
])
def test_functions_that_return_a_tables_rows_are_masked_whole(world, accounts, sql):  # noqa: F811
    # Before: decided as reading accounts but their output column was not a column of accounts,
    # so nothing was masked and the XML (or the words) carried the email in clear.
    direct = run_direct(world, _steps(sql))
    assert any(b"example.com" in bytes.fromhex(row[0]) for row in direct[0]["rows"]), direct
    out = run_bot(world, _steps(sql))
    assert out[0]["ok"] and out[0]["rows"], out
    # Masked whole: an xml value becomes NULL (a mask text would not be valid XML), text the mask.
    assert all(row[0] is None or b"example.com" not in bytes.fromhex(row[0]) for row in out[0]["rows"]), out


def test_cursor_to_xml_is_read_as_a_fetch_from_its_cursor(world, accounts):  # noqa: F811
    steps = _steps("BEGIN", "DECLARE c CURSOR FOR SELECT email FROM accounts",
                   "SELECT cursor_to_xml('c', 10, false, true, '')", "COMMIT")
    direct = run_direct(world, steps)
    assert b"a@example.com" in bytes.fromhex(direct[2]["rows"][0][0]), direct
    out = run_bot(world, steps)
    assert out[2]["ok"] and out[2]["rows"] == [[None]], out  # the xml value masked whole: NULL



@pytest.mark.parametrize("write", [
    "CREATE TEMP TABLE copied AS SELECT email FROM accounts",
    "CREATE TEMP VIEW copied AS SELECT a.email AS contact FROM accounts a",
    "CREATE TEMP TABLE copied (e text); INSERT INTO copied SELECT email FROM accounts",
    "CREATE TEMP TABLE copied (id int, e text); INSERT INTO copied VALUES (1, 'x'); "
    "UPDATE copied c SET e = a.email FROM accounts a WHERE a.id = c.id",
    "CREATE TEMP TABLE copied (id int, e text); "
    "MERGE INTO copied c USING accounts a ON a.id = c.id WHEN NOT MATCHED THEN INSERT VALUES (a.id, a.email)",
])
def test_masked_columns_are_not_written_where_masking_cannot_follow(world, accounts, write):  # noqa: F811
    # Before: the write was let through (its own result has no rows to mask), and reading the
    # copy back returned the email in clear.
    steps = _steps(write, "SELECT e FROM copied" if "copied (id int" in write else "SELECT * FROM copied")
    direct = run_direct(world, steps)
    assert bytes.fromhex(direct[1]["rows"][0][0]) == b"a@example.com", direct
    out = run_bot(world, steps)
    assert not out[0]["ok"] and out[0]["sqlstate"] == "42501" and "masking cannot follow" in out[0]["message"], out
    assert not out[1]["ok"], out  # nothing was copied
    rows = requests_of(world, write)
    assert rows[-1]["decision"] == "block" and rows[-1]["rule"] == "mask-emails", rows
    # A column the rule does not mask may be copied.
    out = run_bot(world, _steps("CREATE TEMP TABLE ids AS SELECT id FROM accounts", "SELECT * FROM ids"))
    assert out[0]["ok"] and [bytes.fromhex(v) for v in out[1]["rows"][0]] == [b"1"], out



def test_a_parsed_fetch_or_execute_is_decided_again_at_each_bind(world, accounts):  # noqa: F811
    # What "FETCH ALL FROM c" or "EXECUTE p" runs is the session's c or p at the time it runs.
    steps = [["sql", "DECLARE c CURSOR WITH HOLD FOR SELECT 'x' AS contact"],
             ["parse", "f1", "FETCH ALL FROM c"], ["execute", "f1"],
             ["sql", "CLOSE c"], ["sql", "DECLARE c CURSOR WITH HOLD FOR SELECT email AS contact FROM accounts"],
             ["execute", "f1"],
             ["sql", "PREPARE p AS SELECT 'x' AS contact"], ["parse", "e1", "EXECUTE p"], ["execute", "e1"],
             ["sql", "DEALLOCATE p"], ["sql", "PREPARE p AS SELECT email AS contact FROM accounts"], ["execute", "e1"]]
    direct = _run_prepared(world, steps, direct=True)
    assert direct[5]["rows"] == [["a@example.com"]] and direct[-1]["rows"] == [["a@example.com"]], direct
    out = _run_prepared(world, steps)
    assert out[2]["rows"] == [["x"]] and out[8]["rows"] == [["x"]], out
    assert out[5]["rows"] == [["********"]] and out[-1]["rows"] == [["********"]], out


def test_a_masked_statements_error_is_withheld_from_the_bot_and_the_audit(world, accounts):  # noqa: F811
    # Before: the server's "invalid input syntax for type integer: "a@example.com"" reached the bot
    # and the audit store's error column; set_config kept the email for a later statement to read.
    sql = "SELECT email::int FROM accounts"
    direct = run_direct(world, _steps(sql))
    assert "a@example.com" in direct[0]["message"], direct
    out = run_bot(world, _steps(sql, "SELECT set_config('bw.leak', email, false) FROM accounts",
                                "SELECT current_setting('bw.leak', true)"))
    assert not out[0]["ok"] and out[0]["sqlstate"] == "22P02", out
    assert "withheld" in out[0]["message"] and "example.com" not in out[0]["message"], out
    assert not out[1]["ok"] and out[1]["sqlstate"] == "42501" and "masking cannot follow" in out[1]["message"], out
    assert out[2]["rows"] == [[None]], out  # never set
    rows = world["daemon"].audit_sql("SELECT error, sqlstate, decision FROM requests WHERE text = ?", [sql])
    assert rows and all(r["sqlstate"] == "22P02" and "withheld" in r["error"] for r in rows), rows
    assert all("example.com" not in r["error"] for r in rows), rows


def test_a_view_made_before_the_session_is_decided_as_what_it_reads(world, accounts):  # noqa: F811
    # An administrator's view over the masked table, made before the bot's session (botwarden never
    # saw it created): the view's column was returned in clear under its own name.
    pg = world["pg"]
    pg.psql("CREATE VIEW acct_contacts AS SELECT id, email AS contact FROM accounts; "
            "ALTER VIEW acct_contacts OWNER TO acct_owner")
    try:
        sql = "SELECT contact, id FROM acct_contacts"
        direct = run_direct(world, _steps(sql))
        assert bytes.fromhex(direct[0]["rows"][0][0]) == b"a@example.com", direct
        out = run_bot(world, _steps(sql, "CREATE TABLE acct_copy AS SELECT * FROM acct_contacts"))
        assert out[0]["rows"] == [[b"********".hex(), b"1".hex()]], out
        assert not out[1]["ok"] and out[1]["sqlstate"] == "42501" and "mask-emails" in out[1]["message"], out
        assert not table_exists(pg, "acct_copy")
        rows = requests_of(world, sql)
        assert rows[-1]["decision"] == "mask" and rows[-1]["rule"] == "mask-emails", rows
    finally:
        pg.psql("DROP VIEW IF EXISTS acct_contacts; DROP TABLE IF EXISTS acct_copy")


def test_a_function_made_before_the_session_is_decided_as_what_its_body_does(world, accounts):  # noqa: F811
    # The function an earlier version of this file used as an unseen way to prepare a name: its
    # body reads the masked table, so calling it is refused now, and the name never exists.
    world["pg"].psql("CREATE OR REPLACE FUNCTION bw_prepare_s7() RETURNS int LANGUAGE plpgsql AS "
                     "$$ BEGIN EXECUTE 'PREPARE s7 AS SELECT email FROM accounts'; RETURN 1; END $$; "
                     "CREATE OR REPLACE FUNCTION bw_first_email() RETURNS text LANGUAGE sql AS "
                     "'SELECT email FROM accounts LIMIT 1'; "
                     "GRANT EXECUTE ON FUNCTION bw_prepare_s7(), bw_first_email() TO PUBLIC")
    try:
        assert run_direct(world, _steps("SELECT bw_first_email()"))[0]["rows"] == [[b"a@example.com".hex()]]
        out = run_bot(world, _steps("SELECT bw_first_email()", "SELECT bw_prepare_s7()"))
        for got in out:
            assert not got["ok"] and got["sqlstate"] == "42501" and "mask-emails" in got["message"], out
        rows = requests_of(world, "SELECT bw_first_email()")
        assert rows[-1]["decision"] == "block" and "bw_first_email" in rows[-1]["reason"], rows
    finally:
        world["pg"].psql("DROP FUNCTION IF EXISTS bw_prepare_s7(), bw_first_email()")


def test_a_trigger_made_before_the_session_is_decided_with_the_write_that_runs_it(world, accounts):  # noqa: F811
    # An administrator's audit trigger copies the customer's email into a trail table on every
    # order; the bot reads the trail, which no rule names.
    world["pg"].psql("CREATE TABLE IF NOT EXISTS bw_orders (account int); CREATE TABLE IF NOT EXISTS bw_trail (v text); "
                     "CREATE OR REPLACE FUNCTION bw_order_trail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                     "INSERT INTO bw_trail SELECT email FROM accounts LIMIT 1; RETURN NEW; END $$; "
                     "CREATE TRIGGER bw_order_trail AFTER INSERT ON bw_orders FOR EACH ROW "
                     "EXECUTE FUNCTION bw_order_trail(); GRANT ALL ON bw_orders, bw_trail TO PUBLIC")
    try:
        direct = run_direct(world, _steps("INSERT INTO bw_orders VALUES (1)", "SELECT v FROM bw_trail"))
        assert direct[1]["rows"] == [[b"a@example.com".hex()]], direct
        world["pg"].psql("TRUNCATE bw_trail")
        out = run_bot(world, _steps("INSERT INTO bw_orders VALUES (1)", "SELECT count(*) FROM bw_trail"))
        assert not out[0]["ok"] and out[0]["sqlstate"] == "42501" and "mask-emails" in out[0]["message"], out
        assert "trigger function public.bw_order_trail()" in out[0]["message"], out
        assert out[1]["rows"] == [[b"0".hex()]], out  # nothing copied
        rows = requests_of(world, "INSERT INTO bw_orders VALUES (1)")
        assert rows[-1]["decision"] == "block" and "bw_order_trail" in rows[-1]["reason"], rows
    finally:
        world["pg"].psql("DROP TABLE IF EXISTS bw_orders, bw_trail; DROP FUNCTION IF EXISTS bw_order_trail()")
