"""How botwarden reads a statement (appliance.policy.reading): unit tests, and a property test
against a real PostgreSQL 15 that the statements and literals botwarden sees are the ones the
server runs, in every supported client encoding and both string modes (issue 24.1)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pglast.parser import ParseError, parse_sql_json

from appliance.policy.engine import SqlSessionState
from appliance.policy.reading import (CODECS, DEFAULT_READING, Reading, UnreadableStatement, decode_statement,
                                      possible_readings, read_statement)
from appliance.policy.sql import analyze_sql, resolve_execute

OFF = Reading(standard_conforming_strings=False)


def test_parameter_status_updates_the_reading_and_equal_readings_are_the_default_object():
    r = DEFAULT_READING.with_parameter("client_encoding", "SJIS")
    assert r == Reading("SJIS")
    assert r.with_parameter("client_encoding", "UTF8") is DEFAULT_READING  # the front's fast path tests `is`
    assert DEFAULT_READING.with_parameter("standard_conforming_strings", "off") == OFF
    assert DEFAULT_READING.with_parameter("TimeZone", "UTC") is DEFAULT_READING


def test_every_codec_reads_ascii_as_ascii_or_is_checked():
    for enc, codec in CODECS.items():
        if enc == "SHIFT_JIS_2004":
            continue  # its codec turns 0x5C into a yen sign: non-ASCII text in it is checked and refused
        assert bytes(range(128)).decode(codec) == bytes(range(128)).decode("ascii"), enc


def test_scs_off_shows_what_the_literal_hid():
    text = read_statement(b"SELECT 'a\\', 'b; DROP TABLE accounts; --'", OFF)
    kinds = [s.kind for s in analyze_sql(text).statements]
    assert kinds == ["SELECT", "DROP_TABLE"]
    # With standard strings the same bytes are two literals.
    assert [s.kind for s in analyze_sql(read_statement(b"SELECT 'a\\', 'b; DROP TABLE accounts; --'")).statements] \
        == ["SELECT"]


def test_scs_off_unterminated_literal_is_a_syntax_error_with_position():
    with pytest.raises(UnreadableStatement) as e:
        read_statement(b"select 'a\\'", OFF)
    assert e.value.syntax and e.value.sqlstate == "42601" and e.value.position == 8


def test_sjis_character_swallows_the_backslash():
    raw = b"SELECT E'\x81\\' ; DROP TABLE accounts; --'"
    kinds = [s.kind for s in analyze_sql(read_statement(raw, Reading("SJIS"))).statements]
    assert kinds == ["SELECT", "DROP_TABLE"]


def test_a_codec_that_maps_a_multibyte_character_to_ascii_is_refused():
    # shift_jis_2004 reads 0x5C alone as a yen sign; the server (and every boundary rule) says
    # backslash: the check of ASCII characters catches the disagreement.
    with pytest.raises(UnreadableStatement, match="cannot reproduce"):
        read_statement("SELECT 'あ\\'".encode("shift_jis_2004"), Reading("SHIFT_JIS_2004"))


def test_invalid_bytes_are_refused_like_the_server_does():
    with pytest.raises(UnreadableStatement) as e:
        decode_statement(b"SELECT '\xff'")
    assert e.value.sqlstate == "22021" and "UTF8" in e.value.message
    with pytest.raises(UnreadableStatement, match="cannot read client encoding MULE_INTERNAL"):
        decode_statement(b"SELECT '\xff'", Reading("MULE_INTERNAL"))
    assert decode_statement(b"SELECT 1", Reading("MULE_INTERNAL")) == "SELECT 1"


def test_sql_ascii_server_lexes_bytes():
    # No conversion: the server sees a backslash where SJIS would see a character.
    raw = b"SELECT E'\x81\\' ; DROP TABLE t; --'"
    kinds = [s.kind for s in analyze_sql(read_statement(raw, Reading("SJIS", "SQL_ASCII"))).statements]
    assert kinds == ["SELECT"]


def test_possible_readings():
    assert possible_readings(b"SELECT 1", DEFAULT_READING) == []
    assert possible_readings(b"SELECT '\\'", DEFAULT_READING) == [OFF]
    many = possible_readings("SELECT 'é'".encode(), DEFAULT_READING)
    assert Reading("SJIS") in many and Reading("LATIN1") in many and DEFAULT_READING not in many


def test_protocol_level_names_resolve_for_sql_execute_and_are_forgotten_on_close():
    state = SqlSessionState()
    state.name_statement("foobar", analyze_sql("DELETE FROM accounts").statements)
    execute = analyze_sql("EXECUTE foobar").statements[0]
    resolved = resolve_execute(execute, state.prepared)
    assert "DELETE" in resolved.kinds and resolved.error is None
    state.name_statement("foobar", None)
    assert resolve_execute(execute, state.prepared).error is not None


# -- the server is the oracle ---------------------------------------------------------------------

# Every client encoding botwarden decodes (SQL_ASCII as a client is checked as UTF8, so it is the same).
ENCODINGS = sorted(set(CODECS) - {"SQL_ASCII"})
MULTIBYTE = {"UTF8", "SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "GB18030", "UHC", "JOHAB", "EUC_JP", "EUC_CN",
             "EUC_KR", "EUC_JIS_2004"}


def _trail_chars(codec: str) -> list[str]:
    """Characters whose encoded form holds an ASCII byte after its first (the dangerous kind),
    plus a few ordinary ones."""
    found: list[str] = []
    for cp in list(range(0x3040, 0x30FF)) + list(range(0x4E00, 0x6000)) + list(range(0xAC00, 0xAD00)):
        try:
            raw = chr(cp).encode(codec)
        except UnicodeEncodeError:
            continue
        if len(raw) > 1 and any(b < 0x80 for b in raw[1:]) and len(found) < 12:
            found.append(chr(cp))
    for c in "éü€ЖあÆ":
        try:
            c.encode(codec)
            found.append(c)
        except UnicodeEncodeError:
            pass
    return found


PIECES = ["'", "''", "\\", "\\'", "\\\\", ";", " ", "a", "x", "--", "\n", "/*", "*/", "$$", "$q$", "E'", "', '",
          "; SELECT '", "0", "U&'"]


@st.composite
def statements(draw, chars):
    items = []
    for _ in range(draw(st.integers(1, 3))):
        prefix = draw(st.sampled_from(["", "E", "e", "N", "B"]))
        body = "".join(draw(st.lists(st.sampled_from(PIECES + chars), max_size=8)))
        items.append(f"{prefix}'{body}'")
    sep = draw(st.sampled_from([", ", ",\n", " , /* c */ "]))
    tail = draw(st.sampled_from(["", " -- end", ";", "; SELECT 'z'"]))
    return "SELECT " + sep.join(items) + tail


def _server_results(pgconn, raw: bytes):
    from psycopg import pq
    pgconn.send_query(raw)
    out = []
    while True:
        res = pgconn.get_result()
        if res is None:
            return out
        if res.status == pq.ExecStatus.TUPLES_OK:
            out.append([res.get_value(0, c) for c in range(res.nfields)] if res.ntuples else [])
        elif res.status == pq.ExecStatus.FATAL_ERROR:
            out.append(("error", (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()))
        else:
            out.append(("status", str(res.status)))


def _our_results(text: str):
    """Per statement, the constant values botwarden's reading gives its SELECT list (None for
    anything that is not a string constant)."""
    tree = json.loads(parse_sql_json(text))
    out = []
    for entry in tree.get("stmts", []):
        sel = entry["stmt"].get("SelectStmt")
        if sel is None:
            out.append(None)
            continue
        vals = []
        for t in sel.get("targetList", []):
            const = t["ResTarget"].get("val", {}).get("A_Const", {})
            vals.append(const["sval"].get("sval", "") if "sval" in const else None)
        out.append(vals)
    return out


@pytest.fixture(scope="module")
def oracle(pg_server):
    from psycopg import pq
    conn = pq.PGconn.connect(f"host={pg_server.host} port={pg_server.port} dbname=postgres "
                             f"user={pg_server.superuser} password={pg_server.password} sslmode=disable".encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    yield conn
    conn.finish()


@pytest.mark.parametrize("scs", [True, False], ids=["scs_on", "scs_off"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_statement_boundaries_and_literals_equal_the_servers(oracle, encoding, scs):
    codec = CODECS[encoding]
    chars = _trail_chars(codec)
    reading = Reading(encoding, "UTF8", scs)
    from psycopg import pq
    for setting in (f"client_encoding = '{encoding}'", f"standard_conforming_strings = {'on' if scs else 'off'}",
                    "escape_string_warning = off"):
        assert oracle.exec_(f"SET {setting}".encode()).status == pq.ExecStatus.COMMAND_OK
    agreed = []

    @settings(max_examples=120 if encoding in MULTIBYTE else 40, deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(statements(chars))
    def check(sql):
        raw = sql.encode(codec)
        server = _server_results(oracle, raw)
        ran = server and not any(isinstance(r, tuple) and r[0] == "error" for r in server)
        try:
            text = read_statement(raw, reading)
            ours = _our_results(text)
        except UnreadableStatement as e:
            # Refusing is safe; refusing what the server runs must be the "cannot reproduce" kind,
            # never a wrong syntax verdict.
            assert not (ran and e.syntax), (sql, server, e.message)
            return
        except ParseError:
            assert not ran, (sql, server)
            return
        if not ran:
            return  # the server refused it: nothing ran, whatever botwarden read
        # Every statement the server ran is one botwarden saw, with the same literals.
        assert len(ours) == len(server), (sql, ours, server)
        for mine, theirs in zip(ours, server):
            if mine is not None and all(v is not None for v in mine) and isinstance(theirs, list) and theirs:
                assert [v.encode(codec) for v in mine] == theirs, (sql, mine, theirs)
        agreed.append(sql)

    check()
    assert len(agreed) >= 5, f"too few statements the server ran in {encoding}: the generator needs work"
