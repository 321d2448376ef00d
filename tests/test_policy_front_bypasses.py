"""Issue 24's bypasses, each run through the real PostgreSQL front against a real PostgreSQL 15
under a policy that names what it does: refused, and the server shows nothing happened; the
harmless look-alikes go through. (The decision path is the engine the daemon uses; the eBPF
redirect in front of it is tested in test_probes_e2e.)"""

from __future__ import annotations

import psycopg
import pytest

from appliance.config import parse_config
from appliance.fronts.services import Credential, DefaultServices
from appliance.policy import PolicyEngine
from tests.pg_front_fixtures import APP_PASSWORD, APP_USER, FrontThread, plain_settings, setup_roles

POLICY = """
[[targets]]
name = "pg-test"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"

[[identities]]
name = "test-bot"
[identities.process]
uid = 1000

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
"""


class EngineServices(DefaultServices):
    """The front's services with the real policy engine deciding."""

    def __init__(self) -> None:
        super().__init__(Credential(APP_USER, APP_PASSWORD))
        cfg = parse_config(POLICY)
        self.engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)

    def decide_sql(self, grant, target, sql, phase):
        return self.engine.decide_sql(grant.identity, grant.groups, target, sql)


@pytest.fixture(scope="module")
def front(pg_server):
    setup_roles(pg_server)
    pg_server.psql("DROP TABLE IF EXISTS bw_accounts, bw_log, bw_accounts_renamed; "
                   "CREATE TABLE bw_accounts (id int primary key, balance int, note text); "
                   "INSERT INTO bw_accounts SELECT i, 100, 'n' FROM generate_series(1, 5) i; "
                   "CREATE TABLE bw_log (id int)")
    ft = FrontThread(plain_settings(pg_server), EngineServices())
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
