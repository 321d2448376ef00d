"""Issue 24's bypasses, each run through the real PostgreSQL front against a real PostgreSQL 15
under a policy that names what it does: refused, and the server shows nothing happened; the
harmless look-alikes go through. (The decision path is the engine the daemon uses; the eBPF
redirect in front of it is tested in test_probes_e2e.)"""

from __future__ import annotations

import psycopg
import pytest

from tests.pg_front_fixtures import POLICY_HEAD, EngineServices, FrontThread, plain_settings, setup_roles

POLICY = POLICY_HEAD + """
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
relations = ["bw_evil.secrets"]

[[rules]]
name = "no-role-switch"
action = "block"
[rules.sql]
properties = ["set_role"]
"""


@pytest.fixture(scope="module")
def front(pg_server):
    setup_roles(pg_server)
    pg_server.psql("DROP TABLE IF EXISTS bw_accounts, bw_log, bw_accounts_renamed; "
                   "CREATE TABLE bw_accounts (id int primary key, balance int, note text); "
                   "INSERT INTO bw_accounts SELECT i, 100, 'n' FROM generate_series(1, 5) i; "
                   "CREATE TABLE bw_log (id int)")
    ft = FrontThread(plain_settings(pg_server), EngineServices(POLICY))
    yield ft
    ft.stop()
    pg_server.psql("DROP TABLE IF EXISTS bw_accounts, bw_log, bw_accounts_renamed; DROP OPERATOR IF EXISTS ### (none, text)")


BYPASSES = [
    ("CREATE OPERATOR ### (FUNCTION = pg_read_file, RIGHTARG = text)", "no-server-files",
     "SELECT count(*) FROM pg_operator WHERE oprname = '###'", "0"),
    ("CREATE AGGREGATE bw_rf(text) (SFUNC = textcat, STYPE = text, FINALFUNC = pg_read_file)", "no-server-files",
     "SELECT count(*) FROM pg_proc WHERE proname = 'bw_rf'", "0"),
    ("CREATE OPERATOR !!! (FUNCTION = pg_terminate_backend, RIGHTARG = int)", "no-server-files",
     "SELECT count(*) FROM pg_operator WHERE oprname = '!!!'", "0"),
    ("SELECT query_to_xml('select pg_read_file(''/etc/hostname'')', true, true, '')", "no-server-files", None, None),
    ("CREATE RULE bw_r AS ON INSERT TO bw_log DO ALSO DELETE FROM bw_accounts WHERE new.id IS NOT NULL",
     "no-mass-writes", "SELECT count(*) FROM pg_rules WHERE rulename = 'bw_r'", "0"),
    ("MERGE INTO bw_accounts a USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE", "no-mass-writes",
     "SELECT count(*) FROM bw_accounts", "5"),
    ("MERGE INTO bw_accounts a USING (SELECT 1) s ON true WHEN MATCHED THEN UPDATE SET balance = 0", "no-mass-writes",
     "SELECT count(*) FROM bw_accounts WHERE balance = 100", "5"),
    ("DELETE FROM bw_accounts WHERE EXISTS (SELECT 1 FROM bw_log WHERE bw_log.id > 0)", "no-mass-writes",
     "SELECT count(*) FROM bw_accounts", "5"),
    ("DELETE FROM bw_accounts WHERE true OR id = 1", "no-mass-writes", "SELECT count(*) FROM bw_accounts", "5"),
    ("DELETE FROM bw_accounts WHERE id = id", "no-mass-writes", "SELECT count(*) FROM bw_accounts", "5"),
    ("UPDATE bw_accounts SET balance = 0 WHERE id IS NOT NULL", "no-mass-writes",
     "SELECT count(*) FROM bw_accounts WHERE balance = 100", "5"),
    ("ALTER TABLE bw_accounts DROP COLUMN note", "no-column-drops",
     "SELECT count(*) FROM information_schema.columns WHERE table_name = 'bw_accounts' AND column_name = 'note'", "1"),
    ("ALTER TABLE bw_accounts RENAME TO bw_accounts_renamed", "no-column-drops",
     "SELECT count(*) FROM pg_class WHERE relname = 'bw_accounts'", "1"),
]


@pytest.mark.parametrize("sql,rule,check,expected", BYPASSES, ids=[b[0][:40] for b in BYPASSES])
def test_bypass_is_refused_and_nothing_happens(front, pg_server, sql, rule, check, expected):
    pg_server.psql("INSERT INTO bw_log VALUES (1)")  # the EXISTS condition holds
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        assert f"rule '{rule}'" in str(e.value) or rule in str(e.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session stays usable
    if check is not None:
        assert pg_server.psql(check) == expected


def test_look_alikes_still_pass(front, pg_server):
    with psycopg.connect(front.dsn(), autocommit=True) as conn:
        conn.execute("ALTER TABLE bw_accounts ADD COLUMN extra int")  # under a DROP COLUMN rule
        conn.execute("DELETE FROM bw_accounts WHERE id = 5")
        conn.execute("UPDATE bw_accounts SET balance = 99 WHERE id = 4")
        plan = conn.execute("EXPLAIN DELETE FROM bw_accounts").fetchall()  # plain EXPLAIN runs nothing
        assert any("Delete on bw_accounts" in row[0] for row in plan)
        conn.execute("DELETE FROM bw_accounts WHERE EXISTS (SELECT 1 FROM bw_log WHERE bw_log.id = bw_accounts.id)")
        conn.execute("SET statement_timeout = 5000")
    assert pg_server.psql("SELECT count(*) FROM bw_accounts") == "3"  # ids 2, 3, 4: 1 (in bw_log) and 5 deleted
    assert pg_server.psql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'bw_accounts' "
                          "AND column_name = 'extra'") == "1"


# Defaults the server applies at login, which neither the startup packet nor a statement shows:
# botwarden reads them from the server before the bot's first statement.
DEFAULTS_USER, DEFAULTS_PASSWORD = "bw_defaults", "bw-defaults-secret-pw"


@pytest.fixture()
def defaults_front(pg_server):
    pg_server.psql(f"DROP ROLE IF EXISTS {DEFAULTS_USER}; CREATE ROLE {DEFAULTS_USER} LOGIN PASSWORD "
                   f"'{DEFAULTS_PASSWORD}'; GRANT pg_read_all_data TO {DEFAULTS_USER}; "
                   "CREATE SCHEMA IF NOT EXISTS bw_evil; CREATE TABLE IF NOT EXISTS bw_evil.secrets (s text); "
                   "TRUNCATE bw_evil.secrets; INSERT INTO bw_evil.secrets VALUES ('the-evil-secret')")
    ft = FrontThread(plain_settings(pg_server), EngineServices(POLICY, DEFAULTS_USER, DEFAULTS_PASSWORD))
    yield ft
    ft.stop()
    pg_server.psql(f"DROP OWNED BY {DEFAULTS_USER}; DROP ROLE {DEFAULTS_USER}; DROP SCHEMA bw_evil CASCADE")


def _direct_as_defaults_user(pg_server):
    return psycopg.connect(host=pg_server.host, port=pg_server.port, user=DEFAULTS_USER,
                           password=DEFAULTS_PASSWORD, dbname="postgres", sslmode="disable", autocommit=True)


def test_a_search_path_default_of_the_role_still_guards_unqualified_names(defaults_front, pg_server):
    pg_server.psql(f"ALTER ROLE {DEFAULTS_USER} SET search_path = bw_evil, public")
    with _direct_as_defaults_user(pg_server) as conn:  # the server: the unqualified name is bw_evil's
        assert conn.execute("SELECT s FROM secrets").fetchone() == ("the-evil-secret",)
    with psycopg.connect(defaults_front.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("SELECT s FROM secrets")
        assert "no-evil-secrets" in str(e.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # nothing else changed for the bot


def test_a_role_default_of_the_login_role_is_a_role_switch(defaults_front, pg_server):
    pg_server.psql(f"ALTER ROLE {DEFAULTS_USER} SET role = pg_read_all_data")
    with _direct_as_defaults_user(pg_server) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("pg_read_all_data",)
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(defaults_front.dsn(), autocommit=True)
    assert "the session's default role" in str(e.value) and "no-role-switch" in str(e.value)
    pg_server.psql(f"ALTER ROLE {DEFAULTS_USER} RESET role")
    with psycopg.connect(defaults_front.dsn(), autocommit=True) as conn:  # without it: served
        assert conn.execute("SELECT current_user").fetchone() == (DEFAULTS_USER,)
