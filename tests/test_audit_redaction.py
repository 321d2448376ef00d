"""What the audit keeps of a request: sensitive constants and parameters redacted (pure), and
end to end through the daemon: nothing a bot sends in a literal or a parameter lands unmasked."""

from __future__ import annotations

from unittest import mock

import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.policy import redact
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


def full_path(sql: str) -> str:
    """The token scan alone, without the fast path."""
    return AuditRedactor()._redact_tokens(sql)


def test_statements_with_only_short_numbers_skip_the_token_scan():
    assert redact._FAST_PATH  # every detector declares what it needs (masking.MIN_LENGTH / REQUIRED_TEXT)
    with mock.patch.object(redact, "scan", side_effect=AssertionError("scanned")):
        assert AuditRedactor().text("SELECT abalance FROM pgbench_accounts WHERE aid = 1234567") == \
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1234567"
    # What the fast path must leave to the scan: long numbers, strings, dollar quotes, and text the
    # scanner refuses (redacted whole: here a card number in groups, then an open comment).
    for sql, expected in [
        ("SELECT 4111111111111111", "SELECT ********"),
        ("SELECT x FROM t WHERE y = 'ada@example.com'", "SELECT x FROM t WHERE y = '********'"),
        ("SELECT $$4111111111111111$$", "SELECT ********"),
        ("SELECT 4111 1111 1111 1111 /* x", "SELECT ******** /* x"),
    ]:
        assert AuditRedactor().text(sql) == expected == full_path(sql)


_fragments = st.one_of(
    st.sampled_from(["SELECT", "FROM", "WHERE", "AND", "t", "pgbench_accounts", "aid", "col_2024", "x1", "ünï",
                     "=", "+", "-", "*", "(", ")", ",", ";", ".", "::", "--c\n", "/* c */", "/*", '"q', '"id"',
                     "'", "'ada@example.com'", "$1", "$$", "@", "e", "E", "0x", "_", "1x", "\n"]),
    st.from_regex(r"[0-9]{1,20}", fullmatch=True),
    st.from_regex(r"[0-9]{1,4}([ .-][0-9]{1,4}){1,4}", fullmatch=True),
    st.from_regex(r"[0-9]{1,6}\.[0-9]{1,6}(e[+-]?[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"0x[0-9A-F]{1,20}", fullmatch=True),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_fragments, min_size=1, max_size=12), st.sampled_from([" ", "", "  "]))
def test_the_fast_path_redacts_exactly_as_the_scan(parts, sep):
    sql = sep.join(parts)
    assert AuditRedactor().text(sql) == full_path(sql)


_values = st.one_of(
    st.text(max_size=14),
    st.text(st.sampled_from("0123456789@.-+ eyJabcAKIAxyz_=ü"), max_size=14),
    st.from_regex(r"[0-9]{1,12}", fullmatch=True),
    st.sampled_from(["a@b.co", "x@y.io", "eyJhbGciOi", "555-0100", "4111111111111111", "123-45-6789", "12345"]),
)


@settings(max_examples=600, deadline=None)
@given(_values)
def test_a_parameter_kept_without_the_detectors_is_one_they_would_keep(value):
    # The short-value fast path of AuditRedactor.params: whatever it keeps, the detectors keep.
    if redact._cannot_flag(value):
        assert redact.redact_value(value) == value
    assert AuditRedactor().params([value], masked_statement=False) == [redact.redact_value(value)]


def test_short_parameters_skip_the_detectors():
    with mock.patch.object(redact, "redact_value", side_effect=AssertionError("detectors ran")):
        assert AuditRedactor().params(["1234567", "emea", "", None], masked_statement=False) == \
            ["1234567", "emea", "", None]
    # Long enough for a detector, or holding what one needs: the detectors decide.
    assert AuditRedactor().params(["a@b.co", "4111111111111111", "123456789"], masked_statement=False) == \
        [MASK, MASK, "123456789"]


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
