"""Ways a masked value could leave other than in the result's rows, each through the real
PostgreSQL front against a real PostgreSQL 15, with the policy engine the daemon uses deciding:
the server's error and notice texts for a masked statement, functions that keep or send their
arguments elsewhere (set_config, pg_notify, large objects), DO blocks and function bodies that
read masked columns, and a statement an operator approved (masked as well). Each case was seen
to leak against the server directly. tests/test_policy_bypasses_e2e.py runs some through the
daemon and its audit store."""

from __future__ import annotations

import contextlib
import os

import psycopg
import pytest

from tests.pg_front_fixtures import (POLICY_HEAD, EngineServices, FrontThread, direct_connect, plain_settings,
                                     setup_roles)

POLICY = POLICY_HEAD + """
[[rules]]
name = "mask-contacts"
action = "mask"
[rules.sql]
relations = ["bw_contacts"]
[[rules.mask]]
columns = ["email", "bw_contacts.secret_note"]
strategy = "full"

[[rules]]
name = "hold-contact-ids"
action = "approve"
[rules.sql]
relations = ["bw_contacts"]
functions = ["bw_hold_me"]
match = "all"

[[rules]]
name = "scan-notes"
action = "mask"
[rules.sql]
relations = ["bw_free_notes"]
[[rules.mask]]
detectors = ["email"]
strategy = "full"
"""

EMAIL = "carol@example.com"
NOTE = "the vault code is 4471"


@pytest.fixture(scope="module")
def front(pg_server):
    setup_roles(pg_server)
    pg_server.psql(
        "DROP TABLE IF EXISTS bw_contacts, bw_free_notes CASCADE; "
        "CREATE TABLE bw_contacts (id int primary key, email text, secret_note text, city text); "
        f"INSERT INTO bw_contacts VALUES (1, '{EMAIL}', '{NOTE}', 'Oslo'); "
        "CREATE TABLE bw_free_notes (id int, body text); "
        f"INSERT INTO bw_free_notes VALUES (1, 'write to {EMAIL} today'); "
        # Functions that exist before the session (botwarden did not see them created): they say
        # their argument in a notice or an error.
        "CREATE OR REPLACE FUNCTION bw_shout(v text) RETURNS text LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE NOTICE 'got %', v; RETURN 'ok'; END $$; "
        "CREATE OR REPLACE FUNCTION bw_fail(v text) RETURNS text LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'bad value %', v USING DETAIL = 'value ' || v, HINT = v; END $$; "
        "CREATE OR REPLACE FUNCTION bw_hold_me(v text) RETURNS text LANGUAGE sql AS 'SELECT v'")
    ft = FrontThread(plain_settings(pg_server), EngineServices(POLICY, approve=True))
    yield ft
    ft.stop()
    pg_server.psql("DROP TABLE IF EXISTS bw_contacts, bw_free_notes CASCADE; "
                   "DROP FUNCTION IF EXISTS bw_shout(text), bw_fail(text), bw_hold_me(text), bw_leaky()")



def _error_texts(e: psycopg.Error) -> str:
    d = e.diag
    return " | ".join(str(x) for x in (d.message_primary, d.message_detail, d.message_hint, d.context,
                                       d.internal_query, str(e)))


ERRORS = [
    "SELECT email::int FROM bw_contacts",
    "SELECT id FROM bw_contacts WHERE secret_note::int > 0",
    "SELECT email::regclass FROM bw_contacts",
    "SELECT bw_fail(email) FROM bw_contacts",
]


@pytest.mark.parametrize("sql", ERRORS)
@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
def test_a_masked_statements_error_does_not_say_the_value(front, pg_server, sql, extended):
    with direct_connect(pg_server) as conn, pytest.raises(psycopg.Error) as direct:
        conn.execute(sql, prepare=extended or None)
    leaked = _error_texts(direct.value)
    assert "carol@example" in leaked or "4471" in leaked, leaked  # what the front must not pass on
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as got:
            conn.execute(sql, prepare=extended or None)
        said = _error_texts(got.value)
        assert "carol@example" not in said and "4471" not in said, said
        # The same class of error, and a message that says why its text is missing.
        assert got.value.sqlstate == direct.value.sqlstate
        assert "withheld" in got.value.diag.message_primary and "mask-contacts" in got.value.diag.message_primary
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    records = [r for r in front.services.of_kind("request") if r.get("text") == sql]
    assert records and all(EMAIL not in (r.get("error") or "") for r in records), records


def test_an_integrity_violation_of_a_masked_write_says_which_constraint_not_which_value(front, pg_server):
    """A bot writing into a masked table learns why its write failed (as directly); the detail,
    which quotes the key or the row, goes. A RAISE made to look like one is still withheld."""
    sql = f"INSERT INTO bw_contacts (id, email) VALUES (1, '{EMAIL}')"
    with direct_connect(pg_server) as conn, pytest.raises(psycopg.errors.UniqueViolation) as direct:
        conn.execute(sql)
    assert "Key (id)=(1)" in direct.value.diag.message_detail
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation) as got:
            conn.execute(sql)
        d = got.value.diag
        assert d.message_primary == direct.value.diag.message_primary == \
            'duplicate key value violates unique constraint "bw_contacts_pkey"'
        assert d.constraint_name == "bw_contacts_pkey" and d.table_name == "bw_contacts"
        assert d.message_detail is None and EMAIL not in _error_texts(got.value)
    pg_server.psql("CREATE OR REPLACE FUNCTION bw_fake_dup(v text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
                   "RAISE EXCEPTION USING ERRCODE = '23505', CONSTRAINT = v, "
                   "MESSAGE = format('duplicate key value violates unique constraint \"%s\"', v); END $$")
    try:
        fake = "SELECT bw_fake_dup(email) FROM bw_contacts"
        with direct_connect(pg_server) as conn, pytest.raises(psycopg.errors.UniqueViolation) as direct:
            conn.execute(fake)
        assert EMAIL in direct.value.diag.message_primary
        with psycopg.connect(front.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.UniqueViolation) as got:
                conn.execute(fake)
            assert EMAIL not in _error_texts(got.value) and "withheld" in got.value.diag.message_primary
    finally:
        pg_server.psql("DROP FUNCTION IF EXISTS bw_fake_dup(text)")


def test_a_masked_statements_notices_do_not_say_the_value(front, pg_server):
    sql = "SELECT bw_shout(email) AS shouted FROM bw_contacts"
    with direct_connect(pg_server) as conn:
        heard: list[str] = []
        conn.add_notice_handler(lambda d: heard.append(f"{d.message_primary} {d.message_detail} {d.context}"))
        conn.execute(sql)
    assert any(EMAIL in n for n in heard), heard
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        heard = []
        conn.add_notice_handler(lambda d: heard.append(f"{d.message_primary} {d.message_detail} {d.context}"))
        assert conn.execute(sql).fetchall() == [("********",)]
        assert heard and all(EMAIL not in n for n in heard), heard
        assert "withheld" in heard[0]


def test_an_unmasked_statements_errors_and_notices_are_untouched(front):
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        heard: list[str] = []
        conn.add_notice_handler(lambda d: heard.append(d.message_primary))
        conn.execute("SELECT bw_shout('plain words')")
        assert heard == ["got plain words"]
        with pytest.raises(psycopg.errors.RaiseException) as e:
            conn.execute("SELECT bw_fail('plain words')")
        assert e.value.diag.message_primary == "bad value plain words"
        assert e.value.diag.message_detail == "value plain words"
        # A masked relation, a column masking does not cover: the server's words, untouched.
        with pytest.raises(psycopg.errors.UndefinedColumn) as e:
            conn.execute("SELECT emial FROM bw_contacts")
        assert 'column "emial" does not exist' in e.value.diag.message_primary


def test_detector_masks_apply_to_error_texts(front, pg_server):
    sql = "SELECT body::int FROM bw_free_notes"
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as e:
            conn.execute(sql)
    msg = e.value.diag.message_primary
    assert EMAIL not in msg and msg.startswith('invalid input syntax for type integer: "write to '), msg


SENDS = [
    ("SELECT set_config('bw.leak', email, false) FROM bw_contacts", "SELECT current_setting('bw.leak', true)"),
    ("SELECT 1 FROM bw_contacts WHERE set_config('bw.leak', secret_note, false) IS NOT NULL",
     "SELECT current_setting('bw.leak', true)"),
    ("SELECT pg_notify('bw_chan', c.email) FROM (SELECT email FROM bw_contacts) c", None),
    ("SELECT lo_from_bytea(4242, convert_to(email, 'UTF8')) FROM bw_contacts",
     "SELECT convert_from(lo_get(oid), 'UTF8') FROM pg_largeobject_metadata WHERE oid = 4242"),
]


@pytest.mark.parametrize("send,read", SENDS)
def test_masked_values_are_not_sent_where_masking_cannot_follow(front, pg_server, send, read):
    pg_server.psql("SELECT lo_unlink(4242) FROM pg_largeobject_metadata WHERE oid = 4242")
    with direct_connect(pg_server) as conn:  # against the server: the value comes back in clear
        conn.execute("LISTEN bw_chan")
        conn.execute(send)
        back = conn.execute(read).fetchone()[0] if read else next(conn.notifies(timeout=5)).payload
        assert back in (EMAIL, NOTE), back
    pg_server.psql("SELECT lo_unlink(4242) FROM pg_largeobject_metadata WHERE oid = 4242")
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        conn.execute("LISTEN bw_chan")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(send)
        assert "mask-contacts" in str(e.value) and "masking cannot follow" in str(e.value)
        if read:
            row = conn.execute(read).fetchone()
            assert row is None or row[0] in (None, ""), row
        else:
            assert list(conn.notifies(timeout=0.5)) == []
    # A column the rule does not mask may be sent.
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT set_config('bw.city', city, false) FROM bw_contacts").fetchone() == ("Oslo",)


BODIES = [
    "DO $$ BEGIN RAISE NOTICE '%', (SELECT email FROM bw_contacts LIMIT 1); END $$",
    "DO $$ DECLARE v text; BEGIN SELECT secret_note INTO v FROM bw_contacts; "
    "PERFORM set_config('bw.leak', v, false); END $$",
    "CREATE FUNCTION bw_leaky() RETURNS text LANGUAGE sql AS 'SELECT email FROM bw_contacts LIMIT 1'",
    # SQL text botwarden cannot read (it could copy the column anywhere): refused while columns are masked.
    "DO $$ BEGIN EXECUTE 'CREATE TABLE bw_dyn AS SELECT email FROM ' || quote_ident(chr(98) || 'w_contacts'); END $$",
]


@pytest.mark.parametrize("sql", BODIES)
def test_do_blocks_and_function_bodies_reading_masked_columns_are_refused(front, pg_server, sql):
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert "mask-contacts" in str(e.value) and "masking cannot follow" in str(e.value)
        assert conn.execute("SELECT current_setting('bw.leak', true)").fetchone()[0] in (None, "")
    assert pg_server.psql("SELECT count(*) FROM pg_proc WHERE proname = 'bw_leaky'") == "0"
    assert pg_server.psql("SELECT count(*) FROM pg_class WHERE relname = 'bw_dyn'") == "0"
    # Reading only columns nobody masks in a DO block is still fine.
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        conn.execute("DO $$ BEGIN PERFORM count(*) FROM pg_class; END $$")


def test_an_approved_statement_is_masked_too(front):
    # hold-contact-ids holds it; the test's approver lets it run: its rows are still masked.
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT bw_hold_me(email) AS e, email, city FROM bw_contacts").fetchall()
        assert rows == [("********", "********", "Oslo")], rows
        rows = conn.execute("SELECT bw_hold_me(email) AS e, city FROM bw_contacts", prepare=True).fetchall()
        assert rows == [("********", "Oslo")], rows
    decided = [r for r in front.services.of_kind("request") if "bw_hold_me" in (r.get("text") or "")]
    assert decided and all(r["decision"] == "approve" for r in decided), decided


# DDL that renames a masked relation or column, computes another column from a masked one, or has
# its rows copied or read elsewhere: masking follows names, so each is refused. (Against the
# server each is run in a transaction rolled back afterwards.)
REWIRES = [
    ([], "ALTER TABLE bw_contacts RENAME email TO e", ["SELECT e FROM bw_contacts"]),
    ([], "ALTER TABLE bw_contacts RENAME TO bw_renamed", ["SELECT email FROM bw_renamed"]),
    ([], "ALTER TABLE bw_contacts SET SCHEMA bw_elsewhere", ["SELECT email FROM bw_elsewhere.bw_contacts"]),
    ([], "ALTER TABLE bw_contacts ADD COLUMN c text GENERATED ALWAYS AS (email) STORED",
     ["SELECT c FROM bw_contacts"]),
    ([], "ALTER TABLE bw_contacts ALTER COLUMN city TYPE text USING email", ["SELECT city FROM bw_contacts"]),
    (["CREATE TABLE bw_leak (v text)",
      "CREATE FUNCTION bw_cp() RETURNS trigger LANGUAGE plpgsql AS "
      "$$ BEGIN INSERT INTO bw_leak VALUES (NEW.email); RETURN NEW; END $$"],
     "CREATE TRIGGER bw_t BEFORE UPDATE ON bw_contacts FOR EACH ROW EXECUTE FUNCTION bw_cp()",
     ["UPDATE bw_contacts SET id = id", "SELECT v FROM bw_leak"]),
    (["CREATE TABLE bw_parent (id int, email text, secret_note text, city text)"],
     "ALTER TABLE bw_contacts INHERIT bw_parent", ["SELECT email FROM bw_parent"]),
]


def _cleanup(pg_server):
    pg_server.psql("DROP TABLE IF EXISTS bw_leak, bw_parent CASCADE; DROP FUNCTION IF EXISTS bw_cp() CASCADE; "
                   "DROP SCHEMA IF EXISTS bw_elsewhere CASCADE; CREATE SCHEMA bw_elsewhere")


@pytest.mark.parametrize("setup,ddl,reads", REWIRES, ids=[r[1][:48] for r in REWIRES])
def test_renaming_or_rewiring_a_masked_relation_is_refused(front, pg_server, setup, ddl, reads):
    _cleanup(pg_server)
    with direct_connect(pg_server) as conn:
        with conn.transaction():  # psycopg.Rollback: rolled back, not raised
            for sql in setup + [ddl] + reads:
                cur = conn.execute(sql)
            assert cur.fetchone()[0] == EMAIL  # against the server: the email in clear
            raise psycopg.Rollback()
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        for sql in setup:
            conn.execute(sql)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(ddl)
        assert "mask-contacts" in str(e.value) and "masking cannot follow" in str(e.value), str(e.value)
        try:
            for sql in reads:
                cur = conn.execute(sql)
            row = cur.fetchone()
        except psycopg.Error:
            row = None  # the renamed column or relation does not exist: nothing ran
        assert row is None or row[0] != EMAIL, row
    _cleanup(pg_server)
    # Structure changes masking can follow still run: a plain column, an index.
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        conn.execute("ALTER TABLE bw_contacts ADD COLUMN IF NOT EXISTS bw_extra int")
        conn.execute("CREATE INDEX IF NOT EXISTS bw_contacts_email ON bw_contacts (email)")
    pg_server.psql("ALTER TABLE bw_contacts DROP COLUMN bw_extra; DROP INDEX bw_contacts_email")


def test_the_planners_statistics_are_not_read_while_columns_are_masked(front, pg_server):
    # pg_stats' most_common_vals / histogram_bounds are values of the columns, readable by anyone
    # who may read the column.
    pg_server.psql("DROP TABLE IF EXISTS bw_stats; CREATE TABLE bw_stats (email text); "
                   f"INSERT INTO bw_stats SELECT '{EMAIL}' FROM generate_series(1, 50); "
                   "INSERT INTO bw_stats SELECT 'u' || i || '@example.org' FROM generate_series(1, 50) i; "
                   "ANALYZE bw_stats")
    sql = "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'bw_stats' AND attname = 'email'"
    try:
        with direct_connect(pg_server) as conn:
            assert EMAIL in conn.execute(sql).fetchone()[0]
        with psycopg.connect(front.dsn(), autocommit=True) as conn:
            for read in (sql, "SELECT * FROM pg_catalog.pg_stats_ext"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                    conn.execute(read)
                assert "mask-contacts" in str(e.value) and "statistics" in str(e.value)
    finally:
        pg_server.psql("DROP TABLE IF EXISTS bw_stats")


def test_copying_a_masked_relation_to_a_server_file_is_refused(front, pg_server, tmp_path):
    path = f"/tmp/bw-copy-{tmp_path.name}.csv"
    copy, read = f"COPY bw_contacts TO '{path}'", f"SELECT pg_read_file('{path}')"
    try:
        with direct_connect(pg_server) as conn:  # the server writes the file, and reads it back in clear
            conn.execute(copy)
            assert EMAIL in conn.execute(read).fetchone()[0]
            conn.execute(f"COPY (SELECT 1) TO '{path}'")
        with psycopg.connect(front.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(copy)
            assert "mask-contacts" in str(e.value) and "masking cannot follow" in str(e.value)
            assert EMAIL not in conn.execute(read).fetchone()[0]  # the file was not rewritten
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


RENAMED = [
    "SELECT 'x' AS e UNION ALL SELECT email FROM bw_contacts",
    "SELECT e FROM bw_contacts AS t(i, e)",
    "WITH c(e) AS (SELECT email FROM bw_contacts) SELECT e FROM c",
    "SELECT e FROM (SELECT email FROM bw_contacts) AS s(e)",
    "VALUES ((SELECT email FROM bw_contacts LIMIT 1))",
    "SELECT * FROM unnest(ARRAY(SELECT email FROM bw_contacts))",
    "SELECT e FROM bw_contacts a JOIN LATERAL (VALUES (a.email)) v(e) ON true",
    "SELECT ARRAY(SELECT email FROM bw_contacts)::text",
    'SELECT lower(email) AS "X" FROM bw_contacts',  # a quoted name: looked up as x before
    "SELECT value FROM bw_contacts c, jsonb_each_text(to_jsonb(c))",  # columns named by OUT parameters
    "SELECT t.v FROM bw_contacts c, xmltable('/r' PASSING xmlelement(name r, c.email) COLUMNS v text PATH '.') t",
]


@pytest.mark.parametrize("sql", RENAMED)
def test_a_masked_column_returned_under_another_name_is_masked(front, pg_server, sql):
    # Before: the result column's name (the first branch's, an alias list's, column1, unnest)
    # was not one the analysis followed back to email, and the email came back in clear.
    with direct_connect(pg_server) as conn:
        assert any(EMAIL in str(v) for row in conn.execute(sql).fetchall() for v in row)
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        for prepare in (False, True):
            rows = conn.execute(sql, prepare=prepare).fetchall()
            assert rows and not any(EMAIL in str(v) for row in rows for v in row), rows


def test_execute_runs_what_the_prepared_body_does(front, pg_server):
    # Before: a prepared body's pg_notify or SET copying the email ran at EXECUTE unchecked (only
    # the body's result columns were followed).
    prepare = "PREPARE bw_n AS SELECT pg_notify('bw_chan', email) FROM bw_contacts"
    with direct_connect(pg_server) as conn:
        conn.execute("LISTEN bw_chan")
        conn.execute(prepare)
        conn.execute("EXECUTE bw_n")
        assert next(conn.notifies(timeout=5)).payload == EMAIL
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        conn.execute("LISTEN bw_chan")
        conn.execute(prepare)  # preparing runs nothing
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("EXECUTE bw_n")
        assert "masking cannot follow" in str(e.value) and "pg_notify" in str(e.value)
        assert list(conn.notifies(timeout=0.5)) == []
