"""Views and functions made before the session (by an administrator, not through botwarden)
over relations a rule names: a read of a view is decided, masked and refused as a read of what
the view's query reads, a call of a function as what its body does. Through the real PostgreSQL front against a real PostgreSQL 15, with the policy engine
the daemon uses; each statement is first run against the server directly to show what it would
give away. The pure parts (which views are looked up, how a statement over them is decided)
are at the end."""

from __future__ import annotations

import time

import psycopg
import pytest

from appliance.config import parse_config
from appliance.policy import ColumnDesc, PolicyEngine
from appliance.policy.engine import SqlSessionState
from appliance.policy.catalog import CatalogLookup, like_fragment, names_matcher, split_regclass
from tests.pg_front_fixtures import (CLEAR_PASSWORD, CLEAR_USER, POLICY_HEAD, EngineServices, FrontThread,
                                     direct_connect, plain_settings, setup_roles)

POLICY = POLICY_HEAD + """
[[rules]]
name = "mask-account-emails"
action = "mask"
[[rules.mask]]
columns = ["bwv_accounts.email", "bwv_events.email", "bwv_people.email"]
strategy = "full"

[[rules]]
name = "no-vault"
action = "block"
[rules.sql]
reads = ["bwv_vault"]

[[rules]]
name = "no-hidden-pins"
action = "block"
[rules.sql]
reads = ["bwv_hidden.pins"]

[[rules]]
name = "keep-ledger"
action = "block"
[rules.sql]
writes = ["bwv_ledger"]
"""

EMAIL = "dora@example.com"
CODE = "vault-code-5512"

VIEWS = [
    "CREATE VIEW bwv_contacts AS SELECT id, email AS contact FROM bwv_accounts",
    "CREATE VIEW bwv_contacts_again AS SELECT contact AS c, id FROM bwv_contacts",  # a view of a view
    "CREATE VIEW bwv_renamed(i, e) AS SELECT id, email FROM bwv_accounts",
    "CREATE VIEW bwv_joined AS SELECT a.id, upper(a.email) AS shout FROM bwv_accounts a JOIN bwv_cities c USING (id)",
    "CREATE MATERIALIZED VIEW bwv_copy AS SELECT id, email FROM bwv_accounts",
    "CREATE SCHEMA bwv_other",
    "CREATE VIEW bwv_other.codes AS SELECT code FROM bwv_vault",
    "CREATE VIEW bwv_harmless AS SELECT id, city FROM bwv_cities",
    # A partition and an inheritance child: their rows are read through their own names too.
    "CREATE TABLE bwv_events (id int, email text, day date) PARTITION BY RANGE (day)",
    "CREATE TABLE bwv_events_2024 PARTITION OF bwv_events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    f"INSERT INTO bwv_events VALUES (7, '{EMAIL}', '2024-05-01')",
    "CREATE TABLE bwv_accounts_old () INHERITS (bwv_accounts)",
    f"INSERT INTO bwv_accounts_old VALUES (2, '{EMAIL}')",
]

FUNCTIONS = [
    "CREATE FUNCTION bwv_emails() RETURNS SETOF text LANGUAGE sql AS 'SELECT email FROM bwv_accounts'",
    "CREATE FUNCTION bwv_email_of(i int) RETURNS text LANGUAGE plpgsql AS "
    "$$ DECLARE x text; BEGIN SELECT email INTO x FROM bwv_accounts WHERE id = i; RETURN x; END $$",
    "CREATE FUNCTION bwv_atomic() RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT email FROM bwv_accounts LIMIT 1; END",
    "CREATE FUNCTION bwv_code() RETURNS text LANGUAGE sql AS 'SELECT code FROM bwv_vault'",
    "CREATE FUNCTION bwv_city(i int) RETURNS text LANGUAGE sql AS 'SELECT city FROM bwv_cities WHERE id = i'",
    "CREATE PROCEDURE bwv_keep_emails() LANGUAGE sql AS 'INSERT INTO bwv_log SELECT email FROM bwv_accounts'",
    # A view over an unguarded table that calls a function reading the masked one.
    "CREATE VIEW bwv_via_function AS SELECT id, bwv_email_of(id) AS e FROM bwv_cities",
    # Functions whose bodies name only another function or a view that reads it.
    "CREATE FUNCTION bwv_api() RETURNS SETOF text LANGUAGE sql AS 'SELECT bwv_emails()'",
    "CREATE FUNCTION bwv_api2() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY SELECT * FROM bwv_api(); END $$",
    "CREATE FUNCTION bwv_view_api() RETURNS SETOF text LANGUAGE sql AS 'SELECT contact FROM bwv_contacts'",
    # An aggregate whose state function reads the masked table.
    "CREATE FUNCTION bwv_agg_step(s text, v int) RETURNS text LANGUAGE sql AS "
    "$$ SELECT coalesce(s, '') || (SELECT email FROM bwv_accounts ORDER BY id LIMIT 1) $$",
    "CREATE AGGREGATE bwv_collect(int) (SFUNC = bwv_agg_step, STYPE = text)",
    # In another language (PL/Perl): botwarden cannot read its body; one that names no guarded name is not read.
    "CREATE EXTENSION IF NOT EXISTS plperl",
    "CREATE FUNCTION bwv_perl_email() RETURNS text LANGUAGE plperl AS "
    "$$ return spi_exec_query('SELECT email FROM bwv_accounts LIMIT 1')->{rows}[0]->{email}; $$",
    "CREATE FUNCTION bwv_perl_add(int, int) RETURNS int LANGUAGE plperl AS $$ return $_[0] + $_[1]; $$",
    # Operators and a cast whose functions read the masked table: no function name in the statement.
    "CREATE FUNCTION bwv_op_email(a int, b int) RETURNS text LANGUAGE sql AS 'SELECT email FROM bwv_accounts WHERE id = a'",
    "CREATE OPERATOR #@# (LEFTARG = int, RIGHTARG = int, FUNCTION = bwv_op_email)",
    "CREATE OPERATOR @#@ (RIGHTARG = int, FUNCTION = bwv_email_of)",
    "CREATE OPERATOR @~@ (RIGHTARG = int, FUNCTION = bwv_city)",  # a harmless one
    "CREATE TYPE bwv_badge AS (v text)",
    "CREATE FUNCTION bwv_badge_of(i int) RETURNS bwv_badge LANGUAGE sql AS "
    "'SELECT ROW(email)::bwv_badge FROM bwv_accounts WHERE id = i'",
    "CREATE CAST (int AS bwv_badge) WITH FUNCTION bwv_badge_of(int) AS ASSIGNMENT",
    "CREATE TABLE bwv_badges (id int, b bwv_badge)",  # an INSERT of an int into b runs the cast
    # Domains: a default reading the masked table, a CHECK copying it (the value is not needed).
    "CREATE DOMAIN bwv_tag AS text DEFAULT bwv_email_of(1)",
    "CREATE TABLE bwv_tagged (id int, t bwv_tag)",
    "CREATE TABLE bwv_trail (v text)",
    "CREATE FUNCTION bwv_tag_ok(v text) RETURNS bool LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_trail SELECT email FROM bwv_accounts; RETURN true; END $$",
    "CREATE DOMAIN bwv_checked_tag AS text CHECK (bwv_tag_ok(VALUE))",
    # ... and what holds one: a domain over it, an array of it, a composite type with a field of it.
    "CREATE DOMAIN bwv_checked_tag2 AS bwv_checked_tag",
    "CREATE TYPE bwv_tag_box AS (t bwv_checked_tag)",
    "CREATE TABLE bwv_tag_holders (id int, d bwv_checked_tag2, a bwv_checked_tag[], b bwv_tag_box)",
    # An AS IMPLICIT cast the server applies with no cast written: passing an int where a pass goes.
    "CREATE TYPE bwv_pass AS (v text)",
    "CREATE FUNCTION bwv_pass_of(i int) RETURNS bwv_pass LANGUAGE sql AS "
    "'SELECT ROW(email)::bwv_pass FROM bwv_accounts WHERE id = i'",
    "CREATE CAST (int AS bwv_pass) WITH FUNCTION bwv_pass_of(int) AS IMPLICIT",
    "CREATE FUNCTION bwv_pass_v(p bwv_pass) RETURNS text LANGUAGE sql AS 'SELECT p.v'",
    "CREATE FUNCTION bwv_pass_eq(a bwv_pass, b bwv_pass) RETURNS bool LANGUAGE sql AS 'SELECT a.v = b.v'",
    "CREATE OPERATOR =~= (LEFTARG = bwv_pass, RIGHTARG = bwv_pass, FUNCTION = bwv_pass_eq)",
    "CREATE TABLE bwv_passes (id int, p bwv_pass)",
    # A default operator class whose comparison copies the email: ORDER BY, DISTINCT, GROUP BY on
    # its type run it with no operator or function named.
    "CREATE TYPE bwv_rank AS (n int)",
    "CREATE FUNCTION bwv_rank_cmp(a bwv_rank, b bwv_rank) RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_trail SELECT email FROM bwv_accounts; "
    "RETURN CASE WHEN a.n < b.n THEN -1 WHEN a.n > b.n THEN 1 ELSE 0 END; END $$",
    *[f"CREATE FUNCTION bwv_rank_{name}(a bwv_rank, b bwv_rank) RETURNS bool LANGUAGE sql AS 'SELECT a.n {op} b.n'"
      for name, op in (("lt", "<"), ("le", "<="), ("eq", "="), ("ge", ">="), ("gt", ">"))],
    *[f"CREATE OPERATOR {op} (LEFTARG = bwv_rank, RIGHTARG = bwv_rank, FUNCTION = bwv_rank_{name})"
      for name, op in (("lt", "<<<"), ("le", "<<="), ("eq", "=="), ("ge", ">>="), ("gt", ">>>"))],
    "CREATE OPERATOR CLASS bwv_rank_ops DEFAULT FOR TYPE bwv_rank USING btree AS OPERATOR 1 <<<, "
    "OPERATOR 2 <<=, OPERATOR 3 ==, OPERATOR 4 >>=, OPERATOR 5 >>>, FUNCTION 1 bwv_rank_cmp(bwv_rank, bwv_rank)",
    "CREATE TABLE bwv_ranks (id int, r bwv_rank)",
    "INSERT INTO bwv_ranks VALUES (1, ROW(2)), (2, ROW(1))",
    "CREATE FUNCTION bwv_rank_of(i int) RETURNS bwv_rank LANGUAGE sql AS 'SELECT ROW(i)::bwv_rank'",
    # ... used by a view, a function's body and a column's default (each depends on the operator).
    "CREATE VIEW bwv_op_view AS SELECT id, id #@# id AS e FROM bwv_cities",
    "CREATE FUNCTION bwv_op_api() RETURNS text LANGUAGE sql AS 'SELECT 1 #@# 1'",
    "CREATE TABLE bwv_op_notes (id int, v text DEFAULT (1 #@# 1))",
    # A monitoring view and function over the planner's statistics (sample values of every column).
    "CREATE VIEW bwv_stats AS SELECT tablename, attname, most_common_vals::text AS common FROM pg_stats",
    "CREATE FUNCTION bwv_common(t text) RETURNS SETOF text LANGUAGE sql AS "
    "'SELECT most_common_vals::text FROM pg_stats WHERE tablename = t'",
]

# Triggers and rules made before the session: writing a relation runs them.
TRIGGERS = [
    "CREATE TABLE bwv_orders (id int, account int)",
    "CREATE TABLE bwv_shops (id int, note text, stamp timestamptz)",
    "CREATE TABLE bwv_tickets (id int)",
    # After an order, copy the customer's email into a table nobody guards.
    "CREATE FUNCTION bwv_order_trail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_trail SELECT email FROM bwv_accounts WHERE id = NEW.account; RETURN NEW; END $$",
    "CREATE TRIGGER bwv_order_trail AFTER INSERT ON bwv_orders FOR EACH ROW EXECUTE FUNCTION bwv_order_trail()",
    # On the masked table itself: the body names no guarded relation, it sees the rows as OLD.
    "CREATE FUNCTION bwv_keep_old() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_trail VALUES (OLD.email); RETURN NEW; END $$",
    "CREATE TRIGGER bwv_keep_old BEFORE UPDATE ON bwv_accounts FOR EACH ROW EXECUTE FUNCTION bwv_keep_old()",
    "ALTER TABLE bwv_accounts DISABLE TRIGGER bwv_keep_old",  # disabled: one ALTER TABLE from firing
    # A trigger calling a function that reads the masked table (found in a later round).
    "CREATE FUNCTION bwv_shop_stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "NEW.note := bwv_email_of(NEW.id); RETURN NEW; END $$",
    "CREATE TRIGGER bwv_shop_stamp BEFORE UPDATE ON bwv_shops FOR EACH ROW EXECUTE FUNCTION bwv_shop_stamp()",
    # A harmless one: stamps the row.
    "CREATE FUNCTION bwv_stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.stamp := now(); RETURN NEW; END $$",
    "CREATE TRIGGER bwv_stamp BEFORE INSERT ON bwv_shops FOR EACH ROW EXECUTE FUNCTION bwv_stamp()",
    # Rules: deleting a shop copies an email; a ticket copies the vault's code.
    "CREATE RULE bwv_shop_gone AS ON DELETE TO bwv_shops DO ALSO "
    "INSERT INTO bwv_trail SELECT email FROM bwv_accounts WHERE id = OLD.id",
    "CREATE RULE bwv_ticket_code AS ON INSERT TO bwv_tickets DO ALSO INSERT INTO bwv_trail SELECT code FROM bwv_vault",
    "INSERT INTO bwv_shops VALUES (1, 'n', now())",
    # Functions a table calls with no statement naming them: a column's default, a CHECK constraint.
    "CREATE TABLE bwv_notes (id int, v text DEFAULT bwv_email_of(1))",
    "CREATE FUNCTION bwv_note_code() RETURNS bool LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_trail SELECT code FROM bwv_vault; RETURN true; END $$",
    "CREATE TABLE bwv_checked (id int CHECK (bwv_note_code()))",
    # A foreign key's ON DELETE CASCADE runs the referencing table's trigger.
    "CREATE TABLE bwv_teams (id int PRIMARY KEY); INSERT INTO bwv_teams VALUES (1)",
    "CREATE TABLE bwv_members (team int REFERENCES bwv_teams ON DELETE CASCADE); INSERT INTO bwv_members VALUES (1)",
    "CREATE FUNCTION bwv_member_gone() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_trail SELECT email FROM bwv_accounts WHERE id = OLD.team; RETURN OLD; END $$",
    "CREATE TRIGGER bwv_member_gone AFTER DELETE ON bwv_members FOR EACH ROW EXECUTE FUNCTION bwv_member_gone()",
    # TRUNCATE ... CASCADE empties the tables whose foreign keys reference the one named.
    "CREATE TABLE bwv_clients (id int PRIMARY KEY); INSERT INTO bwv_clients VALUES (1)",
    "CREATE TABLE bwv_ledger (client int REFERENCES bwv_clients); INSERT INTO bwv_ledger VALUES (1)",
    # A stamp on the masked table itself: it does nothing with the row's values.
    "ALTER TABLE bwv_accounts ADD COLUMN touched timestamptz",
    "CREATE FUNCTION bwv_touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.touched := now(); RETURN NEW; END $$",
    "CREATE TRIGGER bwv_touch BEFORE INSERT ON bwv_accounts FOR EACH ROW EXECUTE FUNCTION bwv_touch()",
    # A notification of every changed row (row_to_json), on a masked table.
    "CREATE FUNCTION bwv_announce() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "PERFORM pg_notify('bwv_changes', row_to_json(NEW)::text); RETURN NEW; END $$",
    "CREATE TRIGGER bwv_announce AFTER UPDATE ON bwv_events FOR EACH ROW EXECUTE FUNCTION bwv_announce()",
    # Triggers on a masked table told apart by the fields of NEW and OLD they read: indexing the
    # name (and notifying the id) reads no masked column; keeping the deleted row reads them all.
    f"CREATE TABLE bwv_people (id int, name text, email text); INSERT INTO bwv_people VALUES (1, 'Dora', '{EMAIL}')",
    "CREATE TABLE bwv_index (id int, words tsvector)",
    "CREATE FUNCTION bwv_people_index() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_index VALUES (NEW.id, to_tsvector('simple', NEW.name)); "
    "PERFORM pg_notify('bwv_people_ids', NEW.id::text); RETURN NEW; END $$",
    "CREATE TRIGGER bwv_people_index AFTER INSERT ON bwv_people FOR EACH ROW EXECUTE FUNCTION bwv_people_index()",
    "CREATE FUNCTION bwv_people_gone() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_trail VALUES (row_to_json(OLD)::text); RETURN OLD; END $$",
    "CREATE TRIGGER bwv_people_gone AFTER DELETE ON bwv_people FOR EACH ROW EXECUTE FUNCTION bwv_people_gone()",
    # A rule reads the fields of NEW and OLD it names too (it must qualify them).
    "CREATE RULE bwv_people_renamed AS ON UPDATE TO bwv_people DO ALSO "
    "INSERT INTO bwv_trail VALUES ('renamed ' || new.name)",
    # An INSTEAD OF trigger on a view renaming the masked column: NEW.contact is the email.
    "CREATE VIEW bwv_people_contacts AS SELECT id, email AS contact FROM bwv_people",
    "CREATE FUNCTION bwv_contact_kept() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO bwv_trail VALUES (NEW.contact); RETURN NEW; END $$",
    "CREATE TRIGGER bwv_contact_kept INSTEAD OF UPDATE ON bwv_people_contacts FOR EACH ROW "
    "EXECUTE FUNCTION bwv_contact_kept()",
    # A function with a search_path of its own: its body's bare names are looked up there.
    "CREATE SCHEMA bwv_hidden",
    f"CREATE TABLE bwv_hidden.pins (pin text); INSERT INTO bwv_hidden.pins VALUES ('{CODE}')",
    "CREATE FUNCTION bwv_pins() RETURNS SETOF text LANGUAGE sql SET search_path = bwv_hidden AS 'SELECT pin FROM pins'",
]


@pytest.fixture(scope="module")
def front(pg_server):
    setup_roles(pg_server)
    _drop(pg_server)
    pg_server.psql(
        "CREATE TABLE bwv_accounts (id int primary key, email text); "
        f"INSERT INTO bwv_accounts VALUES (1, '{EMAIL}'); "
        "CREATE TABLE bwv_cities (id int primary key, city text); INSERT INTO bwv_cities VALUES (1, 'Bergen'); "
        f"CREATE TABLE bwv_vault (code text); INSERT INTO bwv_vault VALUES ('{CODE}'); "
        "CREATE TABLE bwv_log (v text); " + "; ".join(VIEWS + FUNCTIONS + TRIGGERS))
    ft = FrontThread(plain_settings(pg_server), EngineServices(POLICY))
    yield ft
    ft.stop()
    _drop(pg_server)


def _drop(pg_server) -> None:
    pg_server.psql("DROP VIEW IF EXISTS bwv_op_view; DROP TABLE IF EXISTS bwv_op_notes; "
                   "DROP FUNCTION IF EXISTS bwv_op_api(); DROP OPERATOR IF EXISTS #@# (int, int), @#@ (none, int), @~@ (none, int); "
                   "DROP TABLE IF EXISTS bwv_badges, bwv_tagged, bwv_tag_holders, bwv_passes, bwv_ranks; "
                   "DROP TYPE IF EXISTS bwv_tag_box, bwv_pass, bwv_rank CASCADE; "
                   "DROP DOMAIN IF EXISTS bwv_tag, bwv_checked_tag2, bwv_checked_tag; "
                   "DROP FUNCTION IF EXISTS bwv_tag_ok(text); "
                   "DROP CAST IF EXISTS (int AS bwv_badge); DROP FUNCTION IF EXISTS bwv_op_email(int, int), "
                   "bwv_badge_of(int); DROP TYPE IF EXISTS bwv_badge; "
                   "DROP SCHEMA IF EXISTS bwv_other, bwv_hidden CASCADE; DROP FUNCTION IF EXISTS bwv_go_hidden(); "
                   "DROP TABLE IF EXISTS bwv_accounts, bwv_cities, bwv_vault, bwv_log, bwv_events, bwv_trail, "
                   "bwv_orders, bwv_shops, bwv_tickets, bwv_notes, bwv_checked, bwv_teams, bwv_members, bwv_clients, "
                   "bwv_ledger, bwv_people, bwv_index CASCADE; "
                   "DROP FUNCTION IF EXISTS bwv_order_trail(), bwv_keep_old(), bwv_shop_stamp(), bwv_stamp(), "
                   "bwv_note_code(), bwv_announce(), bwv_touch(), bwv_member_gone(), bwv_people_index(), "
                   "bwv_people_gone(), bwv_contact_kept(); "
                   "DROP AGGREGATE IF EXISTS bwv_collect(int); DROP FUNCTION IF EXISTS bwv_agg_step(text, int); "
                   "DROP FUNCTION IF EXISTS bwv_api2(), bwv_api(), bwv_view_api(), bwv_common(text), bwv_emails(), "
                   "bwv_email_of(int), "
                   "bwv_atomic(), bwv_code(), bwv_city(int), bwv_perl_email(), bwv_perl_add(int, int); "
                   "DROP PROCEDURE IF EXISTS bwv_keep_emails()")



def _given_away(pg_server, sql: str, extended: bool) -> list:
    """The rows ``sql`` returns straight from the server, which carry the email in clear."""
    with direct_connect(pg_server) as conn:
        rows = conn.execute(sql, prepare=extended or None).fetchall()
    assert any(EMAIL in str(v).lower() for row in rows for v in row), rows
    return rows


READS = [
    "SELECT * FROM bwv_contacts",
    "SELECT contact FROM bwv_contacts WHERE id = 1",
    "SELECT c FROM bwv_contacts_again",
    "SELECT e FROM bwv_renamed",
    "SELECT x.e AS whatever FROM bwv_renamed x",
    "SELECT shout FROM bwv_joined",
    "SELECT email FROM bwv_copy",
    "SELECT * FROM public.bwv_copy",
    "SELECT email FROM bwv_events_2024",
    "SELECT * FROM bwv_accounts_old",
    "SELECT id, email FROM ONLY bwv_accounts_old",
]


@pytest.mark.parametrize("sql", READS)
@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
def test_a_masked_column_read_through_a_view_is_masked(front, pg_server, sql, extended):
    direct = _given_away(pg_server, sql, extended)
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        cur = conn.execute(sql, prepare=extended or None)
        rows = cur.fetchall()
    assert len(rows) == len(direct)
    assert not any(EMAIL in str(v).lower() for row in rows for v in row), rows
    # The view's other columns pass as they are.
    names = [d.name for d in cur.description]
    if "id" in names:
        assert [r[names.index("id")] for r in rows] == [r[names.index("id")] for r in direct]


def test_a_big_catalog_read_off_the_event_loop_is_learned_the_same(front, pg_server, monkeypatch):
    """A big catalog's answers are read, and its bodies analysed, in a thread while the event
    loop serves other sessions, and the rows are read a few at a time (startup.py; the stall it
    saves: bench/catalog_stall.py). With every threshold at its lowest, this catalog goes that
    way: the same masking and refusals, after the catalog changed (a temporary table)."""
    from appliance.fronts.postgres import startup

    monkeypatch.setattr(startup, "_OFF_LOOP_ROWS", 0)
    monkeypatch.setattr(startup, "_OFF_LOOP_TEXTS", 0)
    monkeypatch.setattr(startup, "_ROWS_PER_TURN", 1)
    threads = []
    real = startup.asyncio.to_thread

    async def counted(fn, *args):
        threads.append(getattr(fn, "__name__", fn))
        return await real(fn, *args)

    monkeypatch.setattr(startup.asyncio, "to_thread", counted)
    pg_server.psql("CREATE TABLE bwv_churn (i int); DROP TABLE bwv_churn")  # not the cached answers
    time.sleep(1.1)  # (the server flushes its counters at most once a second)
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT contact FROM bwv_contacts WHERE id = 1").fetchall()
        assert rows and EMAIL not in str(rows), rows
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT bwv_emails()")
    assert {"_first_round", "definitions", "learn_catalog"} <= set(threads), threads


def test_a_mid_session_answer_is_decoded_a_turn_of_the_loop_at_a_time(monkeypatch):
    """A re-read during the session keeps the DataRows as they came (inside the protocol's
    callbacks) and decodes them afterwards, giving the event loop a turn every
    _ROWS_PER_TURN rows, as the login's reads do."""
    import asyncio

    from appliance.fronts.postgres import startup
    from appliance.fronts.postgres.wire import _row_values
    from appliance.protocols.postgres import messages as m

    monkeypatch.setattr(startup, "_ROWS_PER_TURN", 2)
    answers = startup.OwnAnswers(2)
    for row in ((b"1", b"public.v"), (b"2", None), (b"3", "é".encode())):
        answers.raw_row(m.DataRow(tuple(row)).encode())
    assert not answers.ready()
    answers.raw_row(m.DataRow((b"x",)).encode())
    assert answers.ready()
    turns = []
    real_sleep = asyncio.sleep

    async def counted(delay):
        turns.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(startup.asyncio, "sleep", counted)
    asyncio.run(answers.decode(_row_values))
    assert answers.result("the test") == [[("1", "public.v"), ("2", None), ("3", "é")], [("x",)]]
    assert turns == [0, 0]  # after rows 2 and 4


def test_a_view_over_an_unguarded_table_is_untouched(front):
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT id, city FROM bwv_harmless").fetchall() == [(1, "Bergen")]


@pytest.mark.parametrize("sql", ["SELECT * FROM bwv_other.codes", "SELECT code FROM bwv_other.codes WHERE code <> ''"])
def test_a_refused_relation_read_through_a_view_is_refused(front, pg_server, sql):
    with direct_connect(pg_server) as conn:
        assert conn.execute(sql).fetchall() == [(CODE,)]
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert "no-vault" in str(e.value)
        conn.execute("SET search_path = bwv_other, public")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT code FROM codes")  # unqualified, found through the search path
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("sql", [
    "INSERT INTO bwv_log SELECT contact FROM bwv_contacts",
    "CREATE TABLE bwv_stolen AS SELECT * FROM bwv_contacts_again",
    "ALTER VIEW bwv_contacts RENAME TO bwv_contacts_elsewhere",
    "ALTER VIEW bwv_contacts RENAME COLUMN contact TO plain",
    "ALTER MATERIALIZED VIEW bwv_copy SET SCHEMA bwv_other",
    # Made in the session: a partition or child of a masked table is read by its own name after.
    "CREATE TABLE bwv_stolen PARTITION OF bwv_events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
    "CREATE TABLE bwv_stolen () INHERITS (bwv_accounts)",
])
def test_what_masking_cannot_follow_through_a_view_is_refused(front, pg_server, sql):
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert "mask-account-emails" in str(e.value)
    # Nothing of it reached the server.
    assert pg_server.psql("SELECT count(*) FROM bwv_log") == "0"
    assert pg_server.psql("SELECT count(*) FROM pg_class WHERE relname IN "
                          "('bwv_stolen', 'bwv_contacts_elsewhere')") == "0"


CALLS = [
    "SELECT bwv_emails()",
    "SELECT * FROM bwv_emails()",
    "SELECT upper(bwv_email_of(1)) AS shout",
    "SELECT bwv_atomic()",
    "SELECT e FROM bwv_via_function",
    "SELECT bwv_api()",
    "SELECT * FROM bwv_api2()",
    "SELECT bwv_view_api()",
    "SELECT bwv_collect(id) FROM bwv_cities",
    "SELECT 1 #@# 2",
    "SELECT 1 OPERATOR(public.#@#) 2 AS e",
    "SELECT @#@ id FROM bwv_cities",
    "SELECT (1::bwv_badge).v",
    "SELECT (CAST(id AS bwv_badge)).v FROM bwv_cities",
    "SELECT e FROM bwv_op_view",
    "SELECT bwv_op_api()",
    # An AS IMPLICIT cast with no cast written: a function's argument.
    "SELECT bwv_pass_v(1)",
    "SELECT bwv_pass_v(id) AS e FROM bwv_cities",
]


@pytest.mark.parametrize("sql", CALLS)
@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
def test_a_function_made_before_the_session_that_reads_a_masked_column_is_refused(front, pg_server, sql, extended):
    _given_away(pg_server, sql, extended)
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql, prepare=extended or None)
        assert "mask-account-emails" in str(e.value) and "masking cannot follow" in str(e.value), str(e.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_procedure_made_before_the_session_that_copies_a_masked_column_is_refused(front, pg_server):
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("CALL bwv_keep_emails()")
        assert "mask-account-emails" in str(e.value)
    assert pg_server.psql("SELECT count(*) FROM bwv_log") == "0"


@pytest.mark.parametrize("sql", ["ALTER FUNCTION bwv_emails() RENAME TO bwv_plain",
                                 "ALTER FUNCTION bwv_emails() SET SCHEMA bwv_other"])
def test_renaming_a_function_made_before_the_session_is_refused(front, pg_server, sql):
    # Under its new name the session would no longer know what it does.
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert "mask-account-emails" in str(e.value)
    assert pg_server.psql("SELECT count(*) FROM pg_proc WHERE proname = 'bwv_emails' "
                          "AND pronamespace = 'public'::regnamespace") == "1"


@pytest.mark.parametrize("sql", ["SELECT common FROM bwv_stats WHERE tablename = 'bwv_many'",
                                 "SELECT bwv_common('bwv_many')"])
def test_the_planners_statistics_read_through_a_view_or_function_are_refused(front, pg_server, sql):
    pg_server.psql("DROP TABLE IF EXISTS bwv_many; CREATE TABLE bwv_many (email text); "
                   f"INSERT INTO bwv_many SELECT '{EMAIL}' FROM generate_series(1, 50); "
                   "INSERT INTO bwv_many SELECT 'u' || i || '@example.org' FROM generate_series(1, 50) i; "
                   "ANALYZE bwv_many")
    try:
        with direct_connect(pg_server) as conn:
            assert EMAIL in str(conn.execute(sql).fetchall())
        with psycopg.connect(front.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(sql)
            assert "mask-account-emails" in str(e.value), str(e.value)
    finally:
        pg_server.psql("DROP TABLE IF EXISTS bwv_many")


def _given_then_refused(front, pg_server, sql: str, row: tuple, rule: str) -> psycopg.Connection:
    """``sql`` gives ``row`` straight from the server and is refused by ``rule`` through the
    front; the front's connection, still open, for what the test checks next."""
    with direct_connect(pg_server) as conn:
        assert conn.execute(sql).fetchone() == row
    conn = psycopg.connect(front.dsn(), autocommit=True)
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        conn.execute(sql)
    assert rule in str(e.value), str(e.value)
    return conn


def test_a_function_in_another_language_naming_a_guarded_relation_is_refused(front, pg_server):
    """PL/Perl's spi_exec_query reads the masked table: botwarden cannot analyse the body, so the
    call is refused (before: the email in clear); a PL/Perl function naming nothing guarded runs."""
    with _given_then_refused(front, pg_server, "SELECT bwv_perl_email()", (EMAIL,),
                             "public.bwv_perl_email, whose body botwarden could not read: its body, in a language "
                             "other than SQL and PL/pgSQL") as conn:
        assert conn.execute("SELECT bwv_perl_add(1, 2)").fetchone() == (3,)


def test_a_cast_from_a_user_type_to_text_is_followed(front, pg_server):
    """text is the server's own type (pinned: pg_depend names no dependency on it), so the cast is
    known by its function's return type; while it exists every ::text of the session counts as
    calling it (fail closed), so it is made and dropped here. Writing a table with a text column
    counts too only while the cast is one the server applies on its own (AS ASSIGNMENT)."""
    pg_server.psql("CREATE FUNCTION bwv_badge_text(b bwv_badge) RETURNS text LANGUAGE sql AS "
                   "'SELECT email FROM bwv_accounts LIMIT 1'; "
                   "CREATE CAST (bwv_badge AS text) WITH FUNCTION bwv_badge_text(bwv_badge); "
                   "INSERT INTO bwv_badges VALUES (7, ROW('x'))")
    try:
        with _given_then_refused(front, pg_server, "SELECT b::text FROM bwv_badges WHERE id = 7", (EMAIL,),
                                 "mask-account-emails") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            # Explicit only: a badge never reaches a text column without a cast the statement writes.
            conn.execute("INSERT INTO bwv_trail VALUES ('plain')")
        pg_server.psql("TRUNCATE bwv_trail; DROP CAST (bwv_badge AS text); "
                       "CREATE CAST (bwv_badge AS text) WITH FUNCTION bwv_badge_text(bwv_badge) AS ASSIGNMENT")
        with direct_connect(pg_server) as conn:  # now the server casts a badge written into a text column
            with conn.transaction(force_rollback=True):
                conn.execute("INSERT INTO bwv_trail SELECT b FROM bwv_badges WHERE id = 7")
                assert conn.execute("SELECT v FROM bwv_trail").fetchall() == [(EMAIL,)]
        with psycopg.connect(front.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute("INSERT INTO bwv_trail SELECT b FROM bwv_badges WHERE id = 7")
            assert "mask-account-emails" in str(e.value) and "bwv_badge_text" in str(e.value), str(e.value)
        assert pg_server.psql("SELECT count(*) FROM bwv_trail") == "0"
    finally:
        pg_server.psql("TRUNCATE bwv_trail; DELETE FROM bwv_badges WHERE id = 7; "
                       "DROP CAST IF EXISTS (bwv_badge AS text); DROP FUNCTION IF EXISTS bwv_badge_text(bwv_badge)")


def test_an_implicit_cast_is_followed_into_the_operators_and_functions_taking_its_type(front, pg_server):
    """``1 =~= 2``: the operator takes two passes, so the server casts each int with bwv_pass_of(),
    which reads the masked table (the operator's own function does not); the same operator's
    symbol, a function taking a pass, and reading a table with a pass column count; the
    server's own operators do not."""
    with direct_connect(pg_server) as conn:  # straight to the server: the cast runs (and reads the email)
        assert conn.execute("SELECT bwv_pass_v(1), (1 =~= 2) IS NOT NULL").fetchone() == (EMAIL, True)
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        for sql in ("SELECT 1 =~= 2", "SELECT * FROM bwv_passes", "SELECT bwv_pass_v(ROW('x'))"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(sql)
            assert "mask-account-emails" in str(e.value) and "bwv_pass_of" in str(e.value), (sql, str(e.value))
        assert conn.execute("SELECT 1 = 1, 2 > 1").fetchone() == (True, True)


def test_a_function_over_a_refused_relation_is_refused_and_a_harmless_one_runs(front, pg_server):
    with _given_then_refused(front, pg_server, "SELECT bwv_code()", (CODE,), "no-vault") as conn:
        assert conn.execute("SELECT bwv_city(1)").fetchone() == ("Bergen",)
        # An operator over a harmless function, and the built-in ones, run.
        assert conn.execute("SELECT @~@ 1, 1 + 1 = 2, 'a' BETWEEN 'a' AND 'b'").fetchone() == ("Bergen", True, True)


def test_the_catalogs_answers_are_reused_until_the_catalog_changes(front, pg_server):
    engine = front.services.engine
    known = []
    for _ in range(2):
        with psycopg.connect(front.dsn(), autocommit=True) as conn:
            rows = conn.execute("SELECT contact FROM bwv_contacts").fetchall()
        assert rows and EMAIL not in str(rows), rows
        known.append(len(engine._catalog_cache))
    assert known[0] >= 1 and known[1] == known[0], known  # the second login reused the first one's answers
    # A view made since (by another session) changes the catalog's counters: the next login reads
    # the catalog again and knows it (the other session's counts reach the server as it ends).
    pg_server.psql("CREATE VIEW bwv_late AS SELECT id, email AS late FROM bwv_accounts")
    try:
        deadline = time.monotonic() + 10
        while True:
            with psycopg.connect(front.dsn(), autocommit=True) as conn:
                rows = conn.execute("SELECT late FROM bwv_late").fetchall()
            if EMAIL not in str(rows) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert rows and EMAIL not in str(rows), rows
        assert len(engine._catalog_cache) > known[1]
    finally:
        pg_server.psql("DROP VIEW IF EXISTS bwv_late")


def _counters(pg_server) -> tuple:
    with direct_connect(pg_server) as conn:
        return conn.execute(CatalogLookup.probe_query).fetchone()


def _counted(pg_server, before: tuple) -> None:
    """Until the server's catalog change counters show another session's DDL (a session flushes
    its counts as it ends, shortly after its client is gone)."""
    deadline = time.monotonic() + 10
    while _counters(pg_server) == before:
        assert time.monotonic() < deadline, "the catalog's counters never moved"
        time.sleep(0.05)


@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
def test_a_view_or_trigger_made_after_the_session_logged_in_is_learned_at_its_next_check(pg_server, front, prepare):
    """A session open for hours would otherwise decide by the catalog as it was at login: a view
    an administrator makes later would read the email in clear, a trigger made later would copy
    it. After catalog_recheck_s the next statement sent while idle waits for the counters to be
    read again, and the catalog when they moved; the bot notices nothing else."""
    recheck = FrontThread(plain_settings(pg_server, catalog_recheck_s=0.3), EngineServices(POLICY))
    later = "CREATE VIEW bwv_later AS SELECT id, email AS later FROM bwv_accounts"
    trigger = ("CREATE FUNCTION bwv_later_keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
               "INSERT INTO bwv_trail VALUES (NEW.email); RETURN NEW; END $$; "
               "CREATE TRIGGER bwv_later_keep AFTER INSERT ON bwv_people FOR EACH ROW EXECUTE FUNCTION bwv_later_keep()")
    try:
        with psycopg.connect(recheck.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM bwv_cities", prepare=prepare).fetchone() == (1,)
            before = _counters(pg_server)
            pg_server.psql(f"{later}; {trigger}")
            with direct_connect(pg_server) as direct:  # straight to the server: the view gives it away
                assert direct.execute("SELECT later FROM bwv_later").fetchone() == (EMAIL,)
            _counted(pg_server, before)
            time.sleep(0.4)
            # The first statement after the interval: decided with the view and trigger known.
            assert conn.execute("SELECT later FROM bwv_later", prepare=prepare).fetchone() == ("********",)
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute("INSERT INTO bwv_people VALUES (3, 'Kari', 'kari@example.org')", prepare=prepare)
            assert "public.bwv_later_keep()" in str(e.value), str(e.value)
            # Nothing else changed for the bot: a transaction, a plain read.
            with conn.transaction():
                assert conn.execute("SELECT city FROM bwv_cities", prepare=prepare).fetchone() == ("Bergen",)
            assert conn.execute("SELECT count(*) FROM bwv_trail").fetchone() == (0,)
    finally:
        pg_server.psql("DROP VIEW IF EXISTS bwv_later; DROP TRIGGER IF EXISTS bwv_later_keep ON bwv_people; "
                       "DROP FUNCTION IF EXISTS bwv_later_keep()")
        recheck.stop()


def test_a_statement_prepared_before_a_view_was_replaced_is_decided_again_at_its_next_bind(pg_server, front):
    """A prepared statement's later runs are Bind/Execute only: the check is due before a Bind
    too, and a statement parsed before the catalog changed is decided again there. Before: a view
    over an unguarded table, replaced (same columns) to read the masked email, ran in clear
    through the statement the bot had prepared before."""
    recheck = FrontThread(plain_settings(pg_server, catalog_recheck_s=0.3), EngineServices(POLICY))
    pg_server.psql("CREATE VIEW bwv_swap AS SELECT id, city AS label FROM bwv_cities")
    query = "SELECT label FROM bwv_swap WHERE id = %s"
    try:
        with psycopg.connect(recheck.dsn(), autocommit=True, prepare_threshold=0) as conn:
            assert conn.execute(query, (1,)).fetchone() == ("Bergen",)
            assert conn.execute(query, (1,)).fetchone() == ("Bergen",)  # (prepared: Bind/Execute only)
            prepared = conn.execute("SELECT statement FROM pg_prepared_statements", prepare=False).fetchall()
            assert any("bwv_swap" in row[0] for row in prepared), prepared
            before = _counters(pg_server)
            pg_server.psql("CREATE OR REPLACE VIEW bwv_swap AS SELECT a.id, a.email AS label FROM bwv_accounts a")
            with direct_connect(pg_server) as direct:
                assert direct.execute("SELECT label FROM bwv_swap WHERE id = 1").fetchone() == (EMAIL,)
            _counted(pg_server, before)
            time.sleep(0.4)
            assert conn.execute(query, (1,)).fetchone() == ("********",)
            assert conn.execute(query, (1,)).fetchone() == ("********",)  # and its runs after that
            # Replaced again to read what a block rule refuses: each run refused, the session goes on.
            before = _counters(pg_server)
            pg_server.psql("CREATE OR REPLACE VIEW bwv_swap AS SELECT 1 AS id, code AS label FROM bwv_vault")
            _counted(pg_server, before)
            time.sleep(0.4)
            for _ in range(2):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                    conn.execute(query, (1,))
                assert "no-vault" in str(e.value), str(e.value)
            assert conn.execute("SELECT 1", prepare=False).fetchone() == (1,)
    finally:
        pg_server.psql("DROP VIEW IF EXISTS bwv_swap")
        recheck.stop()


def test_a_check_due_before_every_statement_lets_each_run_once(pg_server, front):
    """The statement held for its check comes back decided, not checked again (a check due again
    by then must not hold it forever)."""
    class Counting(EngineServices):
        learned = 0

        def learn_catalog(self, grant, views, functions, effects):
            Counting.learned += 1
            super().learn_catalog(grant, views, functions, effects)

    recheck = FrontThread(plain_settings(pg_server, catalog_recheck_s=1e-9), Counting(POLICY))
    try:
        with psycopg.connect(recheck.dsn(), autocommit=True) as conn:
            for i in range(10):
                assert conn.execute("SELECT %s::int", (i,), prepare=False).fetchone() == (i,)
                assert conn.execute(f"SELECT {i}").fetchone() == (i,)
            assert conn.execute("SELECT count(*) FROM bwv_log").fetchone() == (0,)
        assert Counting.learned >= 20, Counting.learned  # (at login, then before each statement)
    finally:
        recheck.stop()


def test_a_session_whose_catalog_cannot_be_read_again_ends_with_a_clear_error(pg_server, front):
    """Fail closed, as at login: the bot is told why (FATAL 08006) rather than decided by what the
    catalog said long ago."""
    recheck = FrontThread(plain_settings(pg_server, catalog_recheck_s=0.3),
                          EngineServices(POLICY, CLEAR_USER, CLEAR_PASSWORD))  # (not a superuser: REVOKE applies)
    revoke = "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_get_tuples_inserted(oid) FROM PUBLIC"
    try:
        with psycopg.connect(recheck.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            pg_server.psql(revoke)
            time.sleep(0.4)
            with pytest.raises(psycopg.OperationalError) as e:
                conn.execute("SELECT 1")
            assert "botwarden could not read the catalog's change counters" in str(e.value), str(e.value)
            assert "permission denied for function pg_stat_get_tuples_inserted" in str(e.value), str(e.value)
    finally:
        pg_server.psql(revoke.replace("REVOKE", "GRANT").replace("FROM PUBLIC", "TO PUBLIC"))
        recheck.stop()


TRIGGERED = [  # (statement, the rule refusing it, what it runs)
    ("INSERT INTO bwv_orders VALUES (1, 1)", "mask-account-emails", "trigger function public.bwv_order_trail()"),
    ("UPDATE bwv_accounts SET id = id WHERE id = 1", "mask-account-emails", "trigger function public.bwv_keep_old()"),
    ("UPDATE bwv_shops SET id = id", "mask-account-emails", "function public.bwv_email_of()"),  # the call in it
    ("DELETE FROM bwv_shops WHERE id = 1", "mask-account-emails", "a rule on public.bwv_shops"),
    ("INSERT INTO bwv_tickets VALUES (1)", "no-vault", None),
    ("INSERT INTO bwv_notes (id) VALUES (1)", "mask-account-emails",
     "function public.bwv_email_of(), which a default, constraint, index, row security policy or column type of public.bwv_notes"),
    ("INSERT INTO bwv_checked VALUES (1)", "no-vault", None),
    ("DELETE FROM bwv_teams WHERE id = 1", "mask-account-emails", "trigger function public.bwv_member_gone()"),
    ("INSERT INTO bwv_op_notes (id) VALUES (1)", "mask-account-emails",
     "function public.bwv_op_email(), which a default, constraint, index, row security policy or column type of public.bwv_op_notes"),
    ("INSERT INTO bwv_badges VALUES (1, 1)", "mask-account-emails", "function public.bwv_badge_of(), which"),
    ("INSERT INTO bwv_tagged (id) VALUES (1)", "mask-account-emails", "function public.bwv_email_of(), which"),
    ("SELECT 'x'::bwv_checked_tag", "mask-account-emails", "function public.bwv_tag_ok()"),
    # The domain's check runs for what holds the domain: a domain over it, an array, a composite type.
    ("SELECT 'x'::bwv_checked_tag2", "mask-account-emails", "function public.bwv_tag_ok()"),
    ("SELECT ARRAY['x']::bwv_checked_tag[]", "mask-account-emails", "function public.bwv_tag_ok()"),
    ("SELECT ROW('x')::bwv_tag_box", "mask-account-emails", "function public.bwv_tag_ok()"),
    ("INSERT INTO bwv_tag_holders (id, d) VALUES (1, 'x')", "mask-account-emails", "function public.bwv_tag_ok(), which"),
    ("INSERT INTO bwv_tag_holders (id, a) VALUES (1, ARRAY['x'])", "mask-account-emails",
     "function public.bwv_tag_ok(), which"),
    ("INSERT INTO bwv_tag_holders (id, b) VALUES (1, ROW('x'))", "mask-account-emails", "function public.bwv_tag_ok(), which"),
    # A default operator class's comparison: sorting, grouping, DISTINCT on values of its type.
    ("SELECT id FROM bwv_ranks ORDER BY r", "mask-account-emails", "function public.bwv_rank_cmp(), which"),
    ("SELECT DISTINCT r FROM bwv_ranks", "mask-account-emails", "function public.bwv_rank_cmp(), which"),
    ("SELECT r, count(*) FROM bwv_ranks GROUP BY r", "mask-account-emails", "function public.bwv_rank_cmp(), which"),
    ("SELECT DISTINCT bwv_rank_of(i) FROM generate_series(1, 3) i", "mask-account-emails",
     "function public.bwv_rank_cmp()"),
    ("SELECT x FROM (VALUES (ROW(2)::bwv_rank), (ROW(1)::bwv_rank)) v (x) ORDER BY 1", "mask-account-emails",
     "function public.bwv_rank_cmp()"),
]


@pytest.mark.parametrize("sql, rule, runs", TRIGGERED, ids=[t[0].split(" WHERE")[0] for t in TRIGGERED])
def test_a_write_that_runs_a_trigger_or_rule_made_before_the_session_is_decided_as_what_it_runs(
        front, pg_server, sql, rule, runs):
    """A trigger's function, a rule's actions, and a function a column default or a CHECK
    constraint calls."""
    secret = CODE if rule == "no-vault" else EMAIL
    with direct_connect(pg_server) as conn:  # straight to the server: the write leaves the value readable
        with conn.transaction(force_rollback=True):
            conn.execute("ALTER TABLE bwv_accounts ENABLE TRIGGER bwv_keep_old")
            conn.execute(sql)
            assert secret in str(conn.execute("SELECT (SELECT string_agg(v, ',') FROM bwv_trail), "
                                              "(SELECT string_agg(note, ',') FROM bwv_shops), "
                                              "(SELECT string_agg(v, ',') FROM bwv_notes), "
                                              "(SELECT string_agg(v, ',') FROM bwv_op_notes), "
                                              "(SELECT string_agg(b::text, ',') FROM bwv_badges), "
                                              "(SELECT string_agg(t, ',') FROM bwv_tagged)").fetchall())
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert rule in str(e.value), str(e.value)
        if runs:
            assert runs in str(e.value) and "masking cannot follow" in str(e.value), str(e.value)
        assert conn.execute("SELECT count(*) FROM bwv_trail").fetchone() == (0,)
        # A trigger that only stamps the row runs, on a masked table too; reading it stays masked.
        conn.execute("INSERT INTO bwv_shops (id, note) VALUES (2, 'fine')")
        assert conn.execute("SELECT stamp IS NOT NULL FROM bwv_shops WHERE id = 2").fetchone() == (True,)
        conn.execute("INSERT INTO bwv_accounts (id, email) VALUES (60, 'new@example.org')")
        assert conn.execute("SELECT touched IS NOT NULL, email FROM bwv_accounts WHERE id = 60").fetchone() == \
            (True, "********"), "the stamp ran and the email stays masked"
    pg_server.psql("DELETE FROM bwv_shops WHERE id = 2; TRUNCATE bwv_trail; DELETE FROM bwv_accounts WHERE id = 60")


def test_a_trigger_on_a_masked_table_is_decided_by_the_fields_of_its_rows_it_reads(front, pg_server):
    """Indexing the name (and notifying the id) of each new row reads no masked field: the write
    runs, through the front too, and LISTEN on its channel is let through; keeping a deleted row
    whole (row_to_json(OLD)) or a view's renamed email (NEW.contact) is refused."""
    with direct_connect(pg_server) as conn:  # straight to the server: what each trigger keeps
        with conn.transaction(force_rollback=True):
            conn.execute("DELETE FROM bwv_people WHERE id = 1")
            conn.execute(f"INSERT INTO bwv_people VALUES (1, 'Dora', '{EMAIL}')")
            conn.execute("UPDATE bwv_people_contacts SET contact = contact WHERE id = 1")
            assert conn.execute("SELECT count(*) FROM bwv_trail WHERE v LIKE %s", (f"%{EMAIL}%",)).fetchone() == (2,)
    with psycopg.connect(front.dsn(), autocommit=True) as conn, direct_connect(pg_server) as listener:
        conn.execute("LISTEN bwv_people_ids")
        listener.execute("LISTEN bwv_people_ids")
        conn.execute("INSERT INTO bwv_people VALUES (2, 'Ola', 'ola@example.org')")
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["2"]
        assert conn.execute("SELECT words::text FROM bwv_index WHERE id = 2").fetchone() == ("'ola':1",)
        assert conn.execute("SELECT email FROM bwv_people WHERE id = 2").fetchone() == ("********",)
        conn.execute("UPDATE bwv_people SET name = 'Olav' WHERE id = 2")  # (the rule reads new.name)
        assert conn.execute("SELECT v FROM bwv_trail").fetchall() == [("renamed Olav",)]
        conn.execute("TRUNCATE bwv_trail")
        for sql, runs in [("DELETE FROM bwv_people WHERE id = 2", "public.bwv_people_gone()"),
                          ("UPDATE bwv_people_contacts SET contact = contact", "public.bwv_contact_kept()")]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(sql)
            assert "mask-account-emails" in str(e.value) and runs in str(e.value), str(e.value)
        assert conn.execute("SELECT count(*) FROM bwv_trail").fetchone() == (0,)
    pg_server.psql("DELETE FROM bwv_people WHERE id = 2; TRUNCATE bwv_trail, bwv_index")


def test_a_write_firing_a_trigger_that_reads_the_rows_of_a_refused_relation_is_refused(front, pg_server):
    """A history trigger on a table a `block` rule keeps from reads copies its OLD rows into a
    table nobody guards: the bot's UPDATE would read the codes through it. The trigger's reading
    of the rows counts as a read of the relation; a write firing none of it still runs."""
    pg_server.psql("CREATE TABLE bwv_vault_history (code text); "
                   "CREATE FUNCTION bwv_vault_keep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "INSERT INTO bwv_vault_history VALUES (OLD.code); RETURN NEW; END $$; "
                   "CREATE TRIGGER bwv_vault_keep AFTER UPDATE ON bwv_vault FOR EACH ROW EXECUTE FUNCTION bwv_vault_keep()")
    try:
        with direct_connect(pg_server) as conn:  # straight to the server: the code lands in the history
            with conn.transaction(force_rollback=True):
                conn.execute("UPDATE bwv_vault SET code = code")
                assert conn.execute("SELECT code FROM bwv_vault_history").fetchall() == [(CODE,)]
        with psycopg.connect(front.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute("UPDATE bwv_vault SET code = code")
            assert "no-vault" in str(e.value), str(e.value)
            assert conn.execute("SELECT count(*) FROM bwv_vault_history").fetchone() == (0,)
    finally:
        pg_server.psql("DROP TRIGGER IF EXISTS bwv_vault_keep ON bwv_vault; DROP FUNCTION IF EXISTS bwv_vault_keep(); "
                       "DROP TABLE IF EXISTS bwv_vault_history")


def test_ddl_that_runs_an_event_trigger_made_before_the_session_is_decided_as_what_it_runs(front, pg_server):
    """An event trigger runs its function on any session's DDL (a bot's CREATE TEMP TABLE too):
    one copying the email into a table nobody guards is refused with the DDL under the mask rule;
    DDL is otherwise untouched. (Made here and dropped after: it fires on every test's DDL.)"""
    pg_server.psql("CREATE TABLE bwv_ddl_log (v text); "
                   "CREATE FUNCTION bwv_on_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "INSERT INTO bwv_ddl_log SELECT email FROM bwv_accounts; END $$; "
                   "CREATE EVENT TRIGGER bwv_on_ddl ON ddl_command_end EXECUTE FUNCTION bwv_on_ddl()")
    try:
        with direct_connect(pg_server) as conn:  # straight to the server: the DDL copies the email
            with conn.transaction(force_rollback=True):
                conn.execute("CREATE TEMP TABLE bwv_scratch (i int)")
                assert {v for (v,) in conn.execute("SELECT v FROM bwv_ddl_log")} == {EMAIL}
        with psycopg.connect(front.dsn(), autocommit=True) as conn:
            for ddl in ["CREATE TEMP TABLE bwv_scratch (i int)", "COMMENT ON TABLE bwv_cities IS 'x'"]:
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                    conn.execute(ddl)
                assert "mask-account-emails" in str(e.value), str(e.value)
                assert "event trigger function public.bwv_on_ddl()" in str(e.value), str(e.value)
            assert conn.execute("SELECT count(*) FROM bwv_ddl_log").fetchone() == (0,)
            assert conn.execute("SELECT city FROM bwv_cities").fetchone() == ("Bergen",)  # (not DDL)
    finally:
        pg_server.psql("DROP EVENT TRIGGER IF EXISTS bwv_on_ddl; DROP FUNCTION IF EXISTS bwv_on_ddl(); "
                       "DROP TABLE IF EXISTS bwv_ddl_log")


def test_truncate_cascade_is_a_write_of_the_tables_that_reference_the_one_named(front, pg_server):
    sql = "TRUNCATE bwv_clients CASCADE"
    with direct_connect(pg_server) as conn:  # straight to the server: the ledger goes too
        with conn.transaction(force_rollback=True):
            conn.execute(sql)
            assert conn.execute("SELECT count(*) FROM bwv_ledger").fetchone() == (0,)
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert "keep-ledger" in str(e.value), str(e.value)
        assert conn.execute("SELECT count(*) FROM bwv_ledger").fetchone() == (1,)


def test_listening_to_a_trigger_made_before_the_session_that_notifies_masked_rows_is_refused(front, pg_server):
    """Another session's write runs the trigger; its notification would reach the bot unmasked."""
    with direct_connect(pg_server) as listener, direct_connect(pg_server) as writer:
        listener.execute("LISTEN bwv_changes")
        writer.execute("UPDATE bwv_events SET id = id")
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert EMAIL in str(payloads), payloads
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("LISTEN bwv_changes")
        assert "mask-account-emails" in str(e.value) and "trigger function public.bwv_announce()" in str(e.value)
        conn.execute("NOTIFY bwv_other_channel")  # (notifying is not refused)
        conn.execute("LISTEN bwv_jobs")  # a channel no such trigger notifies


def test_a_function_with_a_search_path_of_its_own_is_decided_by_it(front, pg_server):
    _given_then_refused(front, pg_server, "SELECT bwv_pins()", (CODE,), "no-hidden-pins").close()


def test_a_function_made_before_the_session_that_sets_search_path_leaves_the_path_unknown(front, pg_server):
    """Calling it moves the session to another schema: a bare name read after it must be decided
    as naming a relation of any schema (the rule names bwv_hidden.pins)."""
    calls = ["SELECT bwv_go_hidden()", "SELECT pin FROM pins"]
    pg_server.psql("CREATE FUNCTION bwv_go_hidden() RETURNS text LANGUAGE sql AS "
                   "$$ SELECT set_config('search_path', 'bwv_hidden', false) $$")
    try:
        with direct_connect(pg_server) as conn:
            assert [conn.execute(sql).fetchone() for sql in calls][1] == (CODE,)
        deadline = time.monotonic() + 10  # (the catalog's counters reach the server within a second)
        while True:
            with psycopg.connect(front.dsn(), autocommit=True) as conn:
                conn.execute(calls[0])
                try:
                    rows = conn.execute(calls[1]).fetchall()
                except psycopg.errors.InsufficientPrivilege as e:
                    assert "no-hidden-pins" in str(e), str(e)
                    break
            assert time.monotonic() < deadline, rows
            time.sleep(0.2)
    finally:
        pg_server.psql("DROP FUNCTION IF EXISTS bwv_go_hidden()")


# --- the pure parts ----------------------------------------------------------------------------


def _engine(policy: str) -> PolicyEngine:
    cfg = parse_config(POLICY_HEAD + policy)
    return PolicyEngine(cfg.policy, cfg.targets, cfg.identities)


def test_views_are_looked_up_only_when_a_rule_names_a_relation_or_column():
    assert _engine("").catalog_lookup("test-bot", (), "pg-test") is None
    kinds_only = '[[rules]]\nname = "k"\naction = "approve"\n[rules.sql]\nkinds = ["DELETE"]\n'
    assert _engine(kinds_only).catalog_lookup("test-bot", (), "pg-test") is None
    bare = '[[rules]]\nname = "m"\naction = "mask"\n[[rules.mask]]\ncolumns = ["email"]\nstrategy = "full"\n'
    assert _engine(bare).catalog_lookup("test-bot", (), "pg-test").guarded is None  # any view may carry it
    lookup = _engine(POLICY[len(POLICY_HEAD):]).catalog_lookup("test-bot", (), "pg-test")
    assert lookup.guarded("public", "bwv_accounts") and lookup.guarded("x", "bwv_vault")
    assert not lookup.guarded("public", "bwv_cities")


def test_only_views_reaching_a_guarded_relation_are_read():
    lookup = CatalogLookup(lambda schema, name: name == "accounts", ["accounts"])
    rows = [("10", "public.contacts", "1", "public.accounts", "v", ""),
            ("11", "public.again", "10", "public.contacts", "v", ""),     # through another view
            ("12", "public.cities_v", "2", "public.cities", "v", ""),
            ("13", 's."Mixed ""Case"""', "2", "public.cities", "v", ""), ("13", 's."Mixed ""Case"""', "11", "public.again", "v", ""),
            # A partition of the guarded table, and a partition of that partition.
            ("30", "public.accounts_2024", "1", "public.accounts", "i", ""),
            ("31", "public.accounts_2024_q1", "30", "public.accounts_2024", "i", ""),
            ("32", "public.cities_old", "2", "public.cities", "i", "")]
    lookup.dependencies(rows)
    query = lookup.definitions_query()
    assert query is not None and "IN (10, 11, 13)" in query and "SET LOCAL search_path = ''" in query
    defs = lookup.definitions([("10", "SELECT 1"), ("13", "SELECT 2")])
    # A view asked for and not answered (dropped meanwhile) is kept, unreadable; a child reads as its parent.
    assert defs == {("public", "contacts"): "SELECT 1", ("public", "again"): None, ("s", 'Mixed "Case"'): "SELECT 2",
                    ("public", "accounts_2024"): 'SELECT * FROM "public"."accounts"',
                    ("public", "accounts_2024_q1"): 'SELECT * FROM "public"."accounts_2024"'}
    nothing = CatalogLookup(lambda s, n: False, [])
    nothing.dependencies(rows)
    assert nothing.definitions_query() is None and nothing.next_functions_query() is None
    only_children = CatalogLookup(lambda schema, name: name == "accounts", [])
    only_children.dependencies(rows[5:])
    assert only_children.definitions_query() is None  # nothing to ask, the children still known
    assert set(only_children.definitions([])) == {("public", "accounts_2024"), ("public", "accounts_2024_q1")}
    with pytest.raises(ValueError):
        lookup.definitions([("99", "SELECT 1")])
    with pytest.raises(ValueError):
        CatalogLookup(None, []).dependencies([("1", 'a."b', "2", "c", "v", "")])


@pytest.mark.parametrize("text, expected", [
    ("public.t", ("public", "t")), ("t", (None, "t")), ('"A b"."c.d"', ("A b", "c.d")),
    ('x."q""uote"', ("x", 'q"uote')), ('"x"', (None, "x")),
])
def test_regclass_names_are_split_as_the_server_quotes_them(text, expected):
    assert split_regclass(text) == expected


def test_a_statement_reading_a_view_botwarden_could_not_read_is_refused():
    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    engine.learn_catalog(session, {("public", "gone"): None,
                                   ("public", "contacts"): "SELECT bwv_accounts.email AS contact FROM bwv_accounts;"}, {})
    verdict = engine.decide_sql("test-bot", (), "pg-test", "SELECT * FROM gone", session=session)
    assert verdict.action == "block" and "public.gone" in verdict.reason
    masked = engine.decide_sql("test-bot", (), "pg-test", "SELECT contact FROM contacts", session=session)
    plan = engine.mask_plan("test-bot", (), "pg-test", masked, [ColumnDesc("contact", 0, 0, 25, 0)])
    assert plan is not None
    # The same statement in a session that knows no views shares no cached verdict with it.
    plain = engine.decide_sql("test-bot", (), "pg-test", "SELECT contact FROM contacts", session=SqlSessionState())
    assert engine.mask_plan("test-bot", (), "pg-test", plain, [ColumnDesc("contact", 0, 0, 25, 0)]) is None


def test_dropping_or_refreshing_a_view_is_not_a_read_of_what_it_reads():
    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    engine.learn_catalog(session, {("bwv_other", "codes"): "SELECT bwv_vault.code FROM bwv_vault;"}, {})
    for sql in ("DROP VIEW bwv_other.codes", "REFRESH MATERIALIZED VIEW bwv_other.codes"):
        assert engine.decide_sql("test-bot", (), "pg-test", sql, session=session).action != "block", sql
    # Renaming it is: the session would not know the view under its new name.
    renamed = engine.decide_sql("test-bot", (), "pg-test", "ALTER VIEW bwv_other.codes RENAME TO c2", session=session)
    assert renamed.action == "block" and renamed.rule == "no-vault"


def test_function_bodies_are_read_when_they_mention_a_guarded_name():
    lookup = _engine(POLICY[len(POLICY_HEAD):]).catalog_lookup("test-bot", (), "pg-test")
    query = lookup.functions_query()
    assert "strpos(lower(p.prosrc), E'bwv_accounts') > 0" in query, query
    assert "strpos(lower(p.prosrc), E'bwv_vault') > 0" in query, query
    globbed = CatalogLookup(None, ["acc*", "email"]).functions_query()
    assert "ILIKE ANY (ARRAY[E'%acc%%'])" in globbed and "strpos(lower(p.prosrc), E'email') > 0" in globbed, globbed
    assert "prosrc" not in CatalogLookup(None, []).functions_query()  # nothing named: every body
    assert like_fragment("acc*_x?") == "%acc%\\_x_%"
    lookup.functions([("16500", "public", "f", "CREATE FUNCTION public.f() ..."),
                      ("16501", "public", "f", "CREATE FUNCTION public.f(int) ...")])
    assert lookup.learned_functions == {("public", "f"): ["CREATE FUNCTION public.f() ...",
                                                          "CREATE FUNCTION public.f(int) ..."]}
    # A view calling one of those functions is read, whatever relations it reads.
    lookup.dependencies([("20", "public.v", "f16501", "", "v", ""), ("20", "public.v", "3", "public.cities", "v", ""),
                         ("21", "public.w", "f16999", "", "v", ""), ("21", "public.w", "3", "public.cities", "v", "")])
    # The next round reads the bodies naming what this one found (the view v, the function f) as
    # a word, leaving out those read already; then the round after, and so on until none is new.
    more = lookup.next_functions_query()
    assert more is not None and "NOT IN (16500, 16501)" in more, more
    assert "(strpos(lower(p.prosrc), E'f') > 0 OR strpos(lower(p.prosrc), E'v') > 0)" in more, more
    # The query matches substrings; only bodies naming a word of the round are kept.
    lookup.functions([("16600", "public", "g", "CREATE FUNCTION public.g() ... f() ..."),
                      ("16601", "public", "h", "CREATE FUNCTION public.h() ... SELECT of_v FROM fx ...")])
    assert set(lookup.learned_functions) == {("public", "f"), ("public", "g")}
    again = lookup.next_functions_query()
    assert again is not None and "E'g'" in again and "E'f'" not in again, again
    assert lookup.next_functions_query() is None  # nothing new
    assert "IN (20)" in lookup.definitions_query()


def test_a_call_of_a_function_botwarden_could_not_read_is_refused():
    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    body = ("CREATE FUNCTION public.odd() RETURNS int LANGUAGE plpgsql AS $$ DECLARE r bwv_accounts%ROWTYPE; "
            "BEGIN SELECT * INTO r FROM bwv_accounts; RETURN 1; END $$")
    engine.learn_catalog(session, {}, {("public", "odd"): [body]})
    verdict = engine.decide_sql("test-bot", (), "pg-test", "SELECT odd()", session=session)
    assert verdict.action == "block" and "public.odd" in verdict.reason, verdict.reason


def test_cached_answers_are_keyed_by_the_catalogs_counters():
    cache: dict = {}
    first = CatalogLookup(None, [], cache, ("bot", (), "db"))
    row = [("postgres", "on", "2026-12-06 10:00:00+00", "44,59,20,0,0,9")]
    assert first.cached(row) is None
    first.remember(({("public", "v"): "SELECT 1"}, {}, {}))
    again = CatalogLookup(None, [], cache, ("bot", (), "db"))
    assert again.cached(row) == ({("public", "v"): "SELECT 1"}, {}, {})
    # Another count, database, reset or scope: not the same answers.
    assert again.cached([("postgres", "on", "2026-12-06 10:00:00+00", "45,59,20,0,0,9")]) is None
    assert again.cached([("other", "on", "2026-12-06 10:00:00+00", "44,59,20,0,0,9")]) is None
    assert again.cached([("postgres", "on", None, "44,59,20,0,0,9")]) is None
    assert CatalogLookup(None, [], cache, ("bot2", (), "db")).cached(row) is None
    # A server that does not count catalog changes: never reused.
    off = CatalogLookup(None, [], cache, ("bot", (), "db"))
    assert off.cached([("postgres", "off", "2026-12-06 10:00:00+00", "0,0,0,0,0,0")]) is None
    off.remember(({}, {}))
    assert off.cached([("postgres", "off", "2026-12-06 10:00:00+00", "0,0,0,0,0,0")]) is None
    with pytest.raises(ValueError):
        off.cached([])


def test_equal_answers_read_again_are_not_analysed_again(monkeypatch):
    """A temporary table made by another session moves the catalog's counters: the answers read
    again are equal, and what was analysed from them is reused (the analysis runs on the front's
    event loop)."""
    engine = _engine(POLICY[len(POLICY_HEAD):])

    def answers():
        return ({("public", "contacts"): "SELECT id, email AS contact FROM public.bwv_accounts"},
                {("public", "emails"): ["CREATE FUNCTION public.emails() RETURNS SETOF text LANGUAGE sql "
                                        "AS 'SELECT email FROM public.bwv_accounts'"]},
                {("public", "bwv_accounts"): [("trigger", "U", "public", "emails")]})
    first, again = SqlSessionState(), SqlSessionState()
    engine.learn_catalog(first, *answers())
    analysed: list[str] = []
    analyze = engine.analyze
    monkeypatch.setattr(engine, "analyze", lambda sql: analysed.append(sql) or analyze(sql))
    engine.learn_catalog(again, *answers())
    assert analysed == [] and again.functions is first.functions and again.catalog_key == first.catalog_key
    changed = answers()
    changed[0][("public", "contacts")] = "SELECT id FROM public.bwv_accounts"
    engine.learn_catalog(SqlSessionState(), *changed)
    assert analysed  # another answer: analysed


def test_triggers_and_rules_on_a_guarded_relation_or_reaching_one_are_learned():
    lookup = CatalogLookup(lambda schema, name: name == "accounts", ["accounts"])
    lookup.functions([("500", "public", "copy_email", "CREATE FUNCTION public.copy_email() ... accounts ...")])
    lookup.dependencies([
        ("t1", "public.orders", "f500", "public.copy_email", "t", "I"),      # its function reads accounts
        ("t2", "public.accounts", "f501", "public.keep_old", "t", "U"),      # on the guarded table itself
        ("t3", "public.cities", "f502", "public.stamp", "t", "IU"),          # neither: left alone
        ("r9", "public.shops", "1", "public.accounts", "r", "D"),            # a rule whose action reads it
        ("ca40", "public.notes", "f500", "public.copy_email", "c", "IU"),    # a default calling a function read
        ("ca41", "public.accounts", "f503", "public.next_id", "c", "IU"),   # one that was not: left alone
        ("1", "public.accounts", "1", "public.accounts", "i", ""),
    ][:6])
    # The next round reads the function of the trigger on the guarded table by its oid (its body
    # sees the rows as OLD and NEW, whatever names it mentions).
    more = lookup.next_functions_query()
    assert more is not None and "p.oid IN (501)" in more and "NOT IN (500)" in more, more
    lookup.functions([("501", "public", "keep_old", "CREATE FUNCTION public.keep_old() ... OLD.email ..."),
                      ("777", "public", "unrelated", "CREATE FUNCTION public.unrelated() ...")])
    assert ("public", "keep_old") in lookup.learned_functions and ("public", "unrelated") not in lookup.learned_functions
    callers = lookup.next_functions_query()  # then those calling it, as for any function read
    assert callers is not None and "E'keep_old'" in callers and "p.oid IN" not in callers, callers
    lookup.functions([])
    assert lookup.next_functions_query() is None
    query = lookup.definitions_query()
    assert query is not None and "pg_get_ruledef" in query and "r.oid IN (9)" in query and "pg_get_viewdef" not in query
    assert lookup.definitions([("r9", "CREATE RULE gone AS ON DELETE TO public.shops DO ...")]) == {}
    assert lookup.effects == {
        ("public", "orders"): [("trigger", "I", "public", "copy_email")],
        ("public", "accounts"): [("trigger", "U", "public", "keep_old")],
        ("public", "shops"): [("rule", "D", "CREATE RULE gone AS ON DELETE TO public.shops DO ...")],
        ("public", "notes"): [("call", "IU", "public", "copy_email")]}


@pytest.mark.parametrize("text, named", [
    ("SELECT bwv_api()", True), ("select BWV_API()", True), ("SELECT $bwv_api$", True),
    ("SELECT xbwv_api()", False), ("SELECT bwv_apix", False), ("SELECT bwv_ap", False),
    ("SELECT 1 #@# 2", True), ("SELECT 1#@#2", True), ("SELECT 1 #@ 2", False),
    ('SELECT * FROM "My View"', True), ('SELECT * FROM "My Viewx"', False), ("-- nothing", False),
])
def test_a_later_round_reads_bodies_naming_what_was_found_as_a_word(text, named):
    """Names that are words are found among the body's words (no regular expression of hundreds
    of alternatives to compile), the others (an operator's symbol, a name with a space) by one."""
    assert names_matcher(["bwv_api", "#@#", "My View", "Emails"])(text) is named


def test_operators_and_casts_are_learned_as_calls_of_their_functions():
    """The rows DEPENDENCIES_QUERY gives for operators and casts (a cast: one row per type, as
    regtype prints it) and for a default using an operator; then the engine's decisions: the
    symbol, ``OPERATOR(schema.sym)``, a cast to either type (a server type by its pg_type name
    or its SQL name) run the function; other operators and casts do not."""
    lookup = CatalogLookup(lambda schema, name: name == "bwv_accounts", ["bwv_accounts"])
    lookup.functions([("500", "public", "leak", "CREATE FUNCTION public.leak(a int, b int) RETURNS text "
                       "LANGUAGE sql AS 'SELECT email FROM bwv_accounts LIMIT 1'"),
                      ("501", "public", "to_text", "CREATE FUNCTION public.to_text(b public.badge) RETURNS text "
                       "LANGUAGE sql AS 'SELECT email FROM bwv_accounts LIMIT 1'")])
    lookup.dependencies([
        ("o70", "public.#@#", "f500", "public.leak", "o", ""),
        ("o71", "public.##", "f502", "public.harmless", "o", ""),   # its function was not read
        ("x90.501", "public.badge", "f501", "public.to_text", "x", ""),
        ("x25.501", "text", "f501", "public.to_text", "x", ""),
        ("x23.502", "integer", "f502", "public.harmless", "x", ""),
        ("c2606.5", "public.notes", "o70", "", "c", "IU"),           # DEFAULT (1 #@# 1)
    ])
    while lookup.next_functions_query() is not None:
        lookup.functions([])
    # What the casts and domains calling a function read reach is asked for (the types holding
    # one, the tables writing which runs an assignment cast, a domain's default or check): by the
    # function's oid, not harmless()'s.
    query = lookup.definitions_query()
    assert query is not None and "c.castfunc IN (501)" in query and "pg_get_viewdef" not in query, query
    lookup.definitions([("ct501.700", "public.badges"), ("cx501.91", "public.badge[]")])
    assert lookup.effects == {("public", "notes"): [("call", "IU", "public", "leak")],
                              ("public", "badges"): [("call", "IU", "public", "to_text")]}
    learned = lookup.learned_functions
    assert learned[("public", "#@#")] == ['SELECT "public"."leak"()']
    assert learned[("public", "badge")] == learned[("pg_catalog", "text")] == ['SELECT "public"."to_text"()']
    assert learned[("public", "_badge")] == ['SELECT "public"."to_text"()']
    assert ("public", "##") not in learned and ("pg_catalog", "int4") not in learned

    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    engine.learn_catalog(session, {}, learned, lookup.effects)
    for sql in ("SELECT 1 #@# 2", "SELECT 1 OPERATOR(public.#@#) 2", "SELECT b::text FROM t",
                "SELECT CAST(b AS pg_catalog.text) FROM t", "SELECT 1::badge", "SELECT '{}'::badge[]",
                "INSERT INTO notes (id) VALUES (1)",
                "INSERT INTO badges VALUES (1)", "UPDATE badges SET b = NULL"):
        verdict = engine.decide_sql("test-bot", (), "pg-test", sql, session=session)
        assert verdict.action == "block" and "mask-account-emails" in verdict.reason, (sql, verdict.reason)
        assert "leak" in verdict.reason or "to_text" in verdict.reason, (sql, verdict.reason)
    for sql in ("SELECT 1 ## 2", "SELECT 1 + 2 = 3", "SELECT 1::integer, 2::int4, 3::bigint"):
        verdict = engine.decide_sql("test-bot", (), "pg-test", sql, session=session)
        assert verdict.action != "block", (sql, verdict.reason)


def test_implicit_casts_and_operator_classes_are_learned_where_values_of_their_type_go():
    """The definitions' rows _TYPES_REACHED gives (a table reading or writing which runs the
    function, a function or operator taking or returning the type) make those statements calls of
    it; a row for a function not asked about is not expected."""
    lookup = CatalogLookup(lambda schema, name: name == "bwv_accounts", ["bwv_accounts"])
    lookup.functions([("600", "public", "pass_of", "CREATE FUNCTION public.pass_of(i int) RETURNS public.pass "
                       "LANGUAGE sql AS 'SELECT ROW(email)::public.pass FROM bwv_accounts WHERE id = i'")])
    lookup.dependencies([("x95.600", "public.pass", "f600", "public.pass_of", "x", "")])
    while lookup.next_functions_query() is not None:
        lookup.functions([])
    query = lookup.definitions_query()
    assert query is not None and "SET LOCAL jit = off" in query and "p.amproc IN (600)" in query, query
    lookup.definitions([("cx600.95", "public.pass"), ("cu600.710", "public.passes"),
                        ("cp600.601", "public.pass_v"), ("co600.80", "public.=~=")])
    assert lookup.effects == {("public", "passes"): [("call", "SIUD", "public", "pass_of")]}
    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    engine.learn_catalog(session, {}, lookup.learned_functions, lookup.effects)
    for sql in ("SELECT pass_v(1)", "SELECT 1 =~= 2", "SELECT id FROM passes ORDER BY p", "INSERT INTO passes VALUES (1)"):
        verdict = engine.decide_sql("test-bot", (), "pg-test", sql, session=session)
        assert verdict.action == "block" and "pass_of" in verdict.reason, (sql, verdict.reason)
    for sql in ("SELECT 1 = 1", "SELECT upper('a')"):
        assert engine.decide_sql("test-bot", (), "pg-test", sql, session=session).action != "block", sql
    with pytest.raises(ValueError):
        lookup.add_definitions([("cu601.711", "public.other")])


def test_a_write_runs_only_the_triggers_and_rules_of_its_own_events():
    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    trail = ("CREATE FUNCTION public.trail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.log "
             "SELECT email FROM public.bwv_accounts; RETURN NEW; END $$")
    fill = "CREATE FUNCTION public.fill() RETURNS void LANGUAGE sql AS 'INSERT INTO public.shops VALUES (1)'"
    next_id = "CREATE FUNCTION public.next_id() RETURNS int LANGUAGE sql AS 'SELECT max(id) + 1 FROM public.bwv_cities'"
    engine.learn_catalog(session, {}, {("public", "trail"): [trail], ("public", "fill"): [fill],
                                       ("public", "next_id"): [next_id]}, {
        ("public", "shops"): [("trigger", "U", "public", "trail"),
                              ("rule", "D", "CREATE RULE r AS ON DELETE TO public.shops DO ALSO "
                                            "INSERT INTO public.log SELECT code FROM public.bwv_vault")],
        ("public", "tickets"): [("rule", "I", "")],  # a rule dropped meanwhile: no definition
        ("public", "pins"): [("call", "SIUD", "public", "trail")],  # a row security policy's function
        ("public", "bwv_accounts"): [("call", "IU", "public", "next_id")]})  # a default's, on a masked table

    def action(sql: str) -> tuple[str, str | None]:
        verdict = engine.decide_sql("test-bot", (), "pg-test", sql, session=session)
        return ("block", verdict.rule) if verdict.action == "block" else ("allow", None)

    assert action("INSERT INTO shops VALUES (1)") == ("allow", None)
    assert action("INSERT INTO shops VALUES (1) ON CONFLICT DO NOTHING") == ("allow", None)
    assert action("INSERT INTO shops VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 2") == ("block", "mask-account-emails")
    assert action("UPDATE shops SET id = 1") == ("block", "mask-account-emails")
    assert action("MERGE INTO shops s USING cities c ON s.id = c.id WHEN MATCHED THEN DELETE") == ("block", "no-vault")
    assert action("DELETE FROM shops") == ("block", "no-vault")
    assert action("TRUNCATE shops") == ("allow", None)
    assert action("ALTER TABLE shops ADD COLUMN note text") == ("allow", None)  # DDL fires no trigger
    assert action("SELECT * FROM shops") == ("allow", None)
    assert action("DO $$ BEGIN INSERT INTO shops VALUES (1); END $$") == ("allow", None)
    # A write inside a function botwarden read at login may be any of them.
    assert action("SELECT fill()")[0] == "block"
    unreadable = engine.decide_sql("test-bot", (), "pg-test", "INSERT INTO tickets VALUES (1)", session=session)
    assert unreadable.action == "block" and "runs a rule on public.tickets" in str(unreadable.reason), unreadable.reason
    assert action("DELETE FROM tickets") == ("allow", None)
    assert action("SELECT * FROM pins") == ("block", "mask-account-emails")
    assert action("SELECT * FROM bwv_cities JOIN pins USING (id)") == ("block", "mask-account-emails")
    # A default's function does not see the rows: on a masked table, only what it does counts.
    assert action("INSERT INTO bwv_accounts (email) VALUES ('x')") == ("allow", None)
    # Another session that learned no trigger decides the same statement on its own (the cache key).
    assert engine.decide_sql("test-bot", (), "pg-test", "UPDATE shops SET id = 1",
                             session=SqlSessionState()).action != "block"


def test_a_functions_own_search_path_qualifies_its_bodys_bare_names():
    from appliance.policy.sql import analyze_sql
    text = ("CREATE OR REPLACE FUNCTION public.f()\n RETURNS SETOF text\n LANGUAGE sql\n"
            " SET search_path TO 'secret', '$user', 'Odd Name'\nAS $function$SELECT code FROM vault$function$")
    st = analyze_sql(text).statements[0]
    assert {str(r) for r in st.reads} == {"vault", "secret.vault", "Odd Name.vault", "pg_catalog.vault"}
    assert "body_sets_search_path" not in st.properties  # (its SET clause restores the caller's)
    empty = analyze_sql("CREATE FUNCTION h() RETURNS bigint LANGUAGE sql SET search_path = '' "
                        "AS 'SELECT count(*) FROM pg_stats'").statements[0]
    assert {str(r) for r in empty.reads} == {"pg_stats", "pg_catalog.pg_stats"}
    for body in ("LANGUAGE plpgsql AS $$ BEGIN SET search_path = secret; END $$",
                 "LANGUAGE sql AS $$ SELECT set_config('search_path', 'secret', false) $$"):
        st = analyze_sql(f"CREATE FUNCTION k() RETURNS void {body}").statements[0]
        assert "body_sets_search_path" in st.properties and st.search_path is None, body


def test_view_definitions_known_before_a_round_are_asked_with_it():
    lookup = CatalogLookup(lambda schema, name: name == "accounts", ["accounts"])
    lookup.functions([("500", "public", "emails", "CREATE FUNCTION public.emails() ... accounts ...")])
    lookup.dependencies([("10", "public.contacts", "1", "public.accounts", "v", ""),
                         ("11", "public.api_v", "f600", "", "v", "")])  # calls a function not read yet
    assert lookup.next_functions_query() is not None
    early = lookup.definitions_query()  # sent with the round: the view known to reach accounts
    assert early is not None and "IN (10)" in early, early
    lookup.add_definitions([("10", "SELECT email AS contact FROM public.accounts")])
    # The round finds the function the other view calls: only that view is asked for after it.
    lookup.functions([("600", "public", "api", "CREATE FUNCTION public.api() ... emails() ...")])
    assert lookup.next_functions_query() is not None  # (those naming api: none)
    assert "IN (11)" in (lookup.definitions_query() or "")
    lookup.functions([])
    assert lookup.next_functions_query() is None and lookup.definitions_query() is None
    assert lookup.definitions([]) == {("public", "contacts"): "SELECT email AS contact FROM public.accounts",
                                      ("public", "api_v"): None}  # asked, not answered: unreadable


@pytest.mark.parametrize("body, stamps", [
    ("NEW.updated_at := now(); RETURN NEW;", True),
    ("NEW.version = NEW.version + 1; NEW.t := current_timestamp; RETURN NEW;", True),
    ("NEW.n := upper(NEW.n); RETURN NEW;", True),
    ("RETURN NULL;", True),
    ("NEW.city := NEW.email; RETURN NEW;", False),             # the value moves to another column
    ("NEW.n := upper(OLD.email); RETURN NEW;", False),
    ("NEW.n := row_to_json(NEW)::text; RETURN NEW;", False),
    ("NEW := OLD; RETURN NEW;", False),
    ("NEW.x := (SELECT email FROM accounts LIMIT 1); RETURN NEW;", False),
    ("INSERT INTO log VALUES (OLD.email); RETURN NEW;", False),
    ("RAISE NOTICE '%', NEW.email; RETURN NEW;", False),       # a notice the bot reads
    ("PERFORM pg_notify('c', NEW.email); RETURN NEW;", False),
    ("IF TG_OP = 'UPDATE' THEN NEW.t := now(); ELSIF TG_OP = 'INSERT' THEN NEW.c := now(); ELSE RETURN OLD; "
     "END IF; RETURN NEW;", True),
    ("IF NEW.email LIKE 'a%' THEN NEW.t := now(); END IF; RETURN NEW;", False),  # the field decides
    ("IF TG_OP = 'UPDATE' THEN NEW.t := NEW.email; END IF; RETURN NEW;", False),
    ("FOR i IN 1..2 LOOP NEW.t := now(); END LOOP; RETURN NEW;", False),  # (not a shape this reads)
])
def test_a_trigger_that_only_stamps_its_row_is_told_apart(body, stamps):
    from appliance.policy.sql import only_stamps_its_row
    text = f"CREATE OR REPLACE FUNCTION public.s() RETURNS trigger LANGUAGE plpgsql AS $function$ BEGIN {body} END $function$"
    assert only_stamps_its_row(text) is stamps
    assert not only_stamps_its_row("CREATE FUNCTION public.s() RETURNS int LANGUAGE sql AS 'SELECT 1'")


def test_a_rule_on_a_masked_table_is_decided_by_the_fields_of_new_and_old_it_names():
    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    rules = [("rule", "U", "CREATE RULE r AS ON UPDATE TO public.bwv_people DO ALSO INSERT INTO public.log "
                           "VALUES (new.name)"),
             ("rule", "D", "CREATE RULE r2 AS ON DELETE TO public.bwv_people DO ALSO INSERT INTO public.log "
                           "VALUES (old.email)"),
             ("rule", "I", "CREATE RULE r3 AS ON INSERT TO public.bwv_people DO ALSO INSERT INTO public.log "
                           "SELECT new.*")]
    engine.learn_catalog(session, {}, {}, {("public", "bwv_people"): rules})
    decide = lambda sql: engine.decide_sql("test-bot", (), "pg-test", sql, session=session)  # noqa: E731
    assert decide("UPDATE bwv_people SET name = 'x'").action != "block"
    for sql in ("DELETE FROM bwv_people", "INSERT INTO bwv_people (id) VALUES (1)"):
        verdict = decide(sql)
        assert verdict.action == "block" and "a rule on public.bwv_people" in str(verdict.reason), verdict.reason


@pytest.mark.parametrize("body, fields", [
    ("NEW.words := to_tsvector(NEW.title || ' ' || NEW.body); RETURN NEW;", {"words", "title", "body"}),
    ("INSERT INTO log VALUES (OLD.id, OLD.\"Email\"); RETURN NULL;", {"id", "email"}),
    ("IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; NEW.type := 1; RETURN NEW;", {"type"}),  # (a keyword)
    ("RAISE NOTICE '%', NEW.email; RETURN NEW;", {"email"}),
    ("EXECUTE format('INSERT INTO t VALUES (%L)', NEW.name); RETURN NEW;", {"name"}),
    ("INSERT INTO t SELECT x.new FROM x; -- NEW is not read here\n RETURN NEW;", set()),
    ("PERFORM pg_notify('c', row_to_json(NEW)::text); RETURN NEW;", None),  # the whole row
    ("INSERT INTO t SELECT NEW.*; RETURN NEW;", None),
    ("EXECUTE 'INSERT INTO t SELECT ($1).*' USING NEW; RETURN NEW;", None),
    ("IF NEW IS DISTINCT FROM OLD THEN RETURN NEW; END IF; RETURN NULL;", None),
    ("IF (NEW).email IS NULL THEN RETURN NULL; END IF; RETURN NEW;", None),
])
def test_the_fields_of_new_and_old_a_trigger_reads_are_told_apart(body, fields):
    from appliance.policy.sql import trigger_row_fields
    text = f"CREATE OR REPLACE FUNCTION public.s() RETURNS trigger LANGUAGE plpgsql AS $function$ BEGIN {body} END $function$"
    assert trigger_row_fields(text) == (None if fields is None else frozenset(fields))
    # Another name for the row, or a record copied from it: any field.
    for declare in ["r ALIAS FOR NEW", "r record := OLD"]:
        aliased = text.replace("BEGIN", f"DECLARE {declare}; BEGIN", 1)
        assert trigger_row_fields(aliased) is None
    assert trigger_row_fields("CREATE FUNCTION public.s() RETURNS trigger LANGUAGE plpython3u AS 'pass'") is None


def test_a_foreign_keys_cascade_is_followed_to_the_tables_whose_writes_matter():
    lookup = CatalogLookup(lambda schema, name: name == "accounts", ["accounts"])
    lookup.functions([("500", "public", "gone", "CREATE FUNCTION public.gone() ... accounts ...")])
    lookup.dependencies([
        ("t1", "public.grandchild", "f500", "public.gone", "t", "D"),
        ("k1", "public.child", "12", "public.grandchild", "k", "D"),     # child -> grandchild, ON DELETE
        ("k2", "public.parent", "11", "public.child", "k", "DU"),        # parent -> child
        ("k3", "public.other", "13", "public.plain", "k", "D"),          # nothing there matters
        ("k4", "public.teams", "1", "public.accounts", "k", "D"),        # into a guarded table
    ])
    assert lookup.definitions_query() is None
    lookup.definitions([])
    assert lookup.effects == {
        ("public", "grandchild"): [("trigger", "D", "public", "gone")],
        ("public", "child"): [("cascade", "D", "public", "grandchild")],
        ("public", "parent"): [("cascade", "DU", "public", "child")],
        ("public", "teams"): [("cascade", "D", "public", "accounts")]}
    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    engine.learn_catalog(session, {}, {("public", "gone"): [
        "CREATE FUNCTION public.gone() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO public.log SELECT email FROM public.bwv_accounts; RETURN OLD; END $$"]}, lookup.effects)
    deleted = engine.decide_sql("test-bot", (), "pg-test", "DELETE FROM parent", session=session)
    assert deleted.action == "block" and "public.gone()" in str(deleted.reason), deleted.reason
    assert engine.decide_sql("test-bot", (), "pg-test", "INSERT INTO parent VALUES (1)", session=session).action != "block"


@pytest.mark.parametrize("call, channel, refused", [
    ("pg_notify('changes', row_to_json(NEW)::text)", "changes", True),
    ("pg_notify('changes', row_to_json(NEW)::text)", "jobs", False),
    ("pg_notify(TG_TABLE_NAME, row_to_json(NEW)::text)", "jobs", True),  # a channel built at run time: any
    ("pg_notify('changes', NEW.id::text)", "changes", False),  # no masked field notified
    ("pg_notify('changes', NEW.email)", "changes", True),
])
def test_listen_is_refused_on_the_channels_a_trigger_notifies_masked_rows_on(call, channel, refused):
    engine = _engine(POLICY[len(POLICY_HEAD):])
    session = SqlSessionState()
    body = (f"CREATE FUNCTION public.n() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM {call}; "
            "RETURN NEW; END $$")
    engine.learn_catalog(session, {}, {("public", "n"): [body]}, {("public", "bwv_accounts"): [("trigger", "U", "public", "n")]})
    verdict = engine.decide_sql("test-bot", (), "pg-test", f"LISTEN {channel}", session=session)
    assert (verdict.action == "block") is refused, verdict.reason
    # Inside a DO block the channel is not read: any.
    assert engine.decide_sql("test-bot", (), "pg-test", f"DO $x$ BEGIN LISTEN {channel}; END $x$",
                             session=session).action == "block"
