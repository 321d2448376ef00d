"""What the audit keeps of a request: sensitive constants and parameters redacted (pure), and
end to end through the daemon: nothing a bot sends in a literal or a parameter lands unmasked."""

from __future__ import annotations

import psycopg

from appliance.policy.redact import MASK, AuditRedactor
from tests.daemon_fixtures import psql


def test_only_flagged_constants_are_redacted_by_the_real_scanner():
    r = AuditRedactor()
    sql = ("SELECT name FROM customers WHERE email = 'ada@example.com' AND card = 4111111111111111 "
           "AND region = 'emea' AND id = 42 AND note = $1")
    assert r.text(sql) == ("SELECT name FROM customers WHERE email = '********' AND card = ******** "
                           "AND region = 'emea' AND id = 42 AND note = $1")
    # An identifier or comment that looks like an e-mail is not a constant: left as is.
    assert r.text('SELECT "ada@example.com" FROM t') == 'SELECT "ada@example.com" FROM t'
    # Non-ASCII text before and inside literals keeps offsets right.
    assert r.text("SELECT 'ünï', 'bob@example.org', 'ok'") == "SELECT 'ünï', '********', 'ok'"
    # Text the scanner refuses is redacted as one value.
    assert "ada@example.com" not in r.text("SELECT 'unterminated ada@example.com")


def test_parameters_and_errors_are_redacted():
    r = AuditRedactor()
    assert r.params(["bob@example.org", "hello", None], masked_statement=False) == [MASK, "hello", None]
    assert r.params(["hello", None], masked_statement=True) == [MASK, None]
    assert r.message("Key (email)=(ada@example.com) already exists") == f"Key (email)=({MASK}) already exists"


def test_nothing_sensitive_reaches_the_audit_store(env):
    token = env.bao.mint_token()
    env.pg.psql("CREATE TABLE IF NOT EXISTS contacts (email text UNIQUE)")
    psql(env.port, token, "INSERT INTO contacts VALUES ('carol@example.com')",
         "INSERT INTO contacts VALUES ('carol@example.com')")
    with psycopg.connect(host="127.0.0.1", port=env.port, user="orders-bot", password=token, dbname="postgres",
                         sslmode="disable") as conn:
        conn.execute("SELECT count(*) FROM contacts WHERE email = %s", ["dave@example.net"]).fetchone()
    rows = env.daemon.audit_sql("SELECT text, params, error FROM requests")
    dump = repr(rows)
    assert "carol@example.com" not in dump and "dave@example.net" not in dump
    assert any(r["params"] == [MASK] for r in rows)
    assert any(r["error"] and "duplicate" in r["error"] for r in rows)


# The module's daemon (OpenBao, PostgreSQL, `botwarden run`).
from tests.test_daemon import env  # noqa: E402,F401
