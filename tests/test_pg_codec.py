"""The sans-IO PostgreSQL codec: every message round-trips, byte by byte, and only declared errors escape."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings, strategies as st

from appliance.errors import BotwardenError
from appliance.protocols.postgres import messages as m, sqlstate
from appliance.protocols.postgres.auth import ScramClient, md5_password
from appliance.protocols.postgres.connection import (NEED_DATA, ConnectionClosed, PgConnection, Role, State,
                                                     error_response, negotiate_reply, startup_for_server,
                                                     startup_settings)
from appliance.protocols.postgres.errors import (AuthenticationError, LocalProtocolError, MessageTooLarge,
                                                 PgProtocolError, RemoteProtocolError, UnsupportedProtocol)
from appliance.protocols.postgres.framing import split_messages

FRONTEND = [
    m.Query("SELECT 1; SELECT 'é'"),
    m.Parse("s1", "SELECT $1::int", (23,)),
    m.Parse("", "SELECT 1"),
    m.Bind("p1", "s1", (1,), (b"\x00\x00\x00\x07", None), (1,)),
    m.Bind("", "", (), (), ()),
    m.Describe("S", "s1"), m.Describe("P", ""),
    m.Execute("p1", 10),
    m.Close("S", "s1"), m.Close("P", "p1"),
    m.Sync(), m.Flush(),
    m.CopyData(b"1\tfoo\n"), m.CopyDone(), m.CopyFail("stop"),
    m.FunctionCall(1598, (0,), (b"x", None), 1),
    m.PasswordMessage.password("secret"),
    m.PasswordMessage.sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc"),
    m.Terminate(),
]
BACKEND = [
    m.AuthenticationOk(), m.AuthenticationCleartextPassword(), m.AuthenticationMD5Password(b"abcd"),
    m.AuthenticationSASL(("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")), m.AuthenticationSASLContinue(b"r=x,s=y,i=1"),
    m.AuthenticationSASLFinal(b"v=abc"), m.AuthenticationOther(7),
    m.BackendKeyData(1234, -5), m.ParseComplete(), m.BindComplete(), m.CloseComplete(), m.NoData(),
    m.PortalSuspended(), m.EmptyQueryResponse(), m.CommandComplete("INSERT 0 3"),
    m.CopyInResponse(0, (0, 0)), m.CopyOutResponse(1, (1,)), m.CopyBothResponse(0, ()),
    m.CopyData(b"x"), m.CopyDone(), m.DataRow((b"1", None, b"")),
    m.ErrorResponse((("S", "ERROR"), ("C", "42P01"), ("M", "nope"))), m.NoticeResponse((("M", "hi"),)),
    m.FunctionCallResponse(None), m.FunctionCallResponse(b"42"), m.NegotiateProtocolVersion(0, ("_pq_.x",)),
    m.NotificationResponse(99, "chan", "payload"), m.ParameterDescription((23, 25)),
    m.ParameterStatus("client_encoding", "UTF8"), m.ReadyForQuery("T"),
    m.RowDescription((m.FieldDescription("a", 16384, 1, 23, 4, -1, 0), m.FieldDescription("b", 0, 0, 25))),
]


def feed_bytewise(conn: PgConnection, data: bytes) -> list:
    events = []
    for i in range(len(data)):
        conn.receive_data(data[i:i + 1])
        while (ev := conn.next_event()) is not NEED_DATA:
            if isinstance(ev, ConnectionClosed):
                return events
            events.append(ev)
    return events


def test_frontend_messages_round_trip_byte_by_byte():
    server = PgConnection(Role.SERVER)
    startup = m.StartupMessage((("user", "bot"), ("database", "db"), ("options", "-c a=b")))
    wire = startup.encode() + b"".join(msg.encode() for msg in FRONTEND)
    events = feed_bytewise(server, wire)
    assert events == [startup, *FRONTEND]
    assert server.state is State.CLOSED  # Terminate closes
    assert events[-3].password_text() == "secret"
    assert events[-2].sasl_initial_parts() == ("SCRAM-SHA-256", b"n,,n=,r=abc")


def test_backend_messages_round_trip_byte_by_byte():
    client = PgConnection(Role.CLIENT)
    assert feed_bytewise(client, b"".join(msg.encode() for msg in BACKEND)) == BACKEND


def test_every_message_type_is_covered():
    assert {type(x) for x in FRONTEND} >= set(m.FRONTEND_MESSAGES.values())
    assert {type(x) for x in BACKEND} >= set(m.BACKEND_MESSAGES.values())


def test_ssl_and_gssenc_requests_then_startup():
    server = PgConnection(Role.SERVER)
    server.receive_data(m.GSSENCRequest().encode())
    assert server.next_event() == m.GSSENCRequest()
    assert server.send(m.SSLResponse(False)) == b"N"
    server.receive_data(m.SSLRequest().encode())
    assert server.next_event() == m.SSLRequest()
    assert server.state is State.NEGOTIATING
    assert server.send(m.SSLResponse(True)) == b"S"
    server.receive_data(m.StartupMessage((("user", "u"),)).encode())
    assert server.next_event() == m.StartupMessage((("user", "u"),))
    assert server.state is State.TYPED


def test_data_before_tls_handshake_is_refused():
    server = PgConnection(Role.SERVER)
    server.receive_data(m.SSLRequest().encode() + m.StartupMessage((("user", "u"),)).encode())
    assert server.next_event() == m.SSLRequest()
    with pytest.raises(RemoteProtocolError):
        server.send(m.SSLResponse(True))


def test_client_side_ssl_response():
    client = PgConnection(Role.CLIENT)
    assert client.send(m.SSLRequest()) == struct.pack("!ii", 8, 80877103)
    assert client.state is State.SSL_RESPONSE
    client.receive_data(b"N")
    assert client.next_event() == m.SSLResponse(False)
    assert client.state is State.TYPED


def test_cancel_request():
    server = PgConnection(Role.SERVER)
    assert feed_bytewise(server, m.CancelRequest(42, -7).encode()) == [m.CancelRequest(42, -7)]
    assert server.state is State.CLOSED


def test_protocol_3_2_gets_negotiate_protocol_version():
    startup = m.StartupMessage((("user", "u"), ("_pq_.foo", "1"), ("database", "d")), (3 << 16) | 2)
    server = PgConnection(Role.SERVER)
    server.receive_data(startup.encode())
    got = server.next_event()
    assert got == startup
    assert negotiate_reply(got) == m.NegotiateProtocolVersion(m.PROTOCOL_3_0, ("_pq_.foo",))
    assert negotiate_reply(m.StartupMessage((("user", "u"),))) is None
    upstream = startup_for_server(got, "real")
    assert upstream.version == m.PROTOCOL_3_0
    assert upstream.params == (("user", "real"), ("database", "d"))


def test_protocol_2_is_refused_as_unsupported():
    server = PgConnection(Role.SERVER)
    server.receive_data(struct.pack("!ii", 9, 2 << 16) + b"\x00")
    with pytest.raises(UnsupportedProtocol) as e:
        server.next_event()
    assert e.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED


def test_oversized_message_is_a_clear_error():
    server = PgConnection(Role.SERVER, max_message_size=1000)
    server.receive_data(m.StartupMessage((("user", "u"),)).encode())
    server.next_event()
    server.receive_data(m.Query("x" * 2000).encode()[:10])  # the header alone is enough to refuse
    with pytest.raises(MessageTooLarge) as e:
        server.next_event()
    assert e.value.sqlstate == sqlstate.PROGRAM_LIMIT_EXCEEDED
    assert "exceeds the maximum of 1000 bytes" in str(e.value)
    assert isinstance(e.value, BotwardenError)


def test_malformed_messages_are_remote_errors_with_08P01():
    for type_byte, body in [(b"Q", b"no terminator"), (b"Z", b"X"), (b"B", b"\x00\x00\x00\x05"),
                            (b"?", b""), (b"S", b"extra")]:
        server = PgConnection(Role.SERVER)
        server.receive_data(m.StartupMessage((("user", "u"),)).encode())
        server.next_event()
        server.receive_data(type_byte + struct.pack("!i", len(body) + 4) + body)
        with pytest.raises(RemoteProtocolError) as e:
            server.next_event()
        assert e.value.sqlstate == sqlstate.PROTOCOL_VIOLATION


def test_eof_mid_message():
    client = PgConnection(Role.CLIENT)
    client.receive_data(m.ReadyForQuery().encode()[:3])
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    clean = PgConnection(Role.CLIENT)
    clean.receive_data(b"")
    assert clean.next_event() == ConnectionClosed()


def test_split_messages_spans_without_copies():
    wire = m.RowDescription(()).encode() + m.DataRow((b"a",)).encode() + m.ReadyForQuery().encode()
    spans, end = split_messages(wire + b"C\x00\x00")
    assert [(chr(t), wire[s:e]) for t, s, e in spans] == [
        ("T", m.RowDescription(()).encode()), ("D", m.DataRow((b"a",)).encode()), ("Z", b"Z\x00\x00\x00\x05I")]
    assert end == len(wire)
    with pytest.raises(MessageTooLarge):
        split_messages(b"D\x7f\x00\x00\x00", 0, 1 << 20)
    with pytest.raises(RemoteProtocolError):
        split_messages(b"D\x00\x00\x00\x02")


def test_error_response_builder_says_botwarden():
    err = error_response(sqlstate.INSUFFICIENT_PRIVILEGE, "blocked by rule no-drop", detail="d")
    assert err.sqlstate == "42501" and err.message.startswith("botwarden: ") and err.severity == "ERROR"
    assert m.ErrorResponse.decode(err.encode()[5:]) == err


def test_command_complete_rows():
    assert m.CommandComplete("SELECT 5").rows == 5
    assert m.CommandComplete("INSERT 0 7").rows == 7
    assert m.CommandComplete("BEGIN").rows is None


def test_md5_password_matches_postgres_formula():
    inner = hashlib.md5(b"pwuser").hexdigest()
    assert md5_password("user", "pw", b"salt") == "md5" + hashlib.md5(inner.encode() + b"salt").hexdigest()


def test_scram_rfc7677_vector():
    # RFC 7677 section 3 test vector (user "user", password "pencil").
    c = ScramClient("pencil", nonce=b"")
    c._nonce = "rOprNGfwEbeRWgbNEkqO"
    c._first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = c.client_final(server_first)
    assert final == (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    c.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(AuthenticationError):
        c.verify_server_final(b"v=AAAA")
    with pytest.raises(AuthenticationError):
        ScramClient("x").client_final(b"garbage")


def _startup_then(data: bytes) -> bytes:
    return m.StartupMessage((("user", "u"),)).encode() + data


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.booleans(), st.integers(1, 17))
def test_fuzz_server_role_only_declared_errors(data, with_startup, chunk):
    conn = PgConnection(Role.SERVER, max_message_size=4096)
    wire = _startup_then(data) if with_startup else data
    try:
        for i in range(0, len(wire), chunk):
            conn.receive_data(wire[i:i + chunk])
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                    break
                if conn.state is State.NEGOTIATING:
                    conn.send(m.SSLResponse(False))
        conn.receive_data(b"")
        while not isinstance(conn.next_event(), ConnectionClosed):
            pass
    except PgProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(m.BACKEND_MESSAGES) + [b"R", b"?"]), st.binary(max_size=40)),
                max_size=6), st.integers(1, 9))
def test_fuzz_client_role_typed_messages_only_declared_errors(parts, chunk):
    wire = b"".join(t + struct.pack("!i", len(b) + 4) + b for t, b in parts)
    conn = PgConnection(Role.CLIENT, max_message_size=4096)
    try:
        for i in range(0, len(wire), chunk):
            conn.receive_data(wire[i:i + chunk])
            while conn.next_event() is not NEED_DATA:
                pass
    except PgProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(m.FRONTEND_MESSAGES)), st.binary(max_size=40)), max_size=6))
def test_fuzz_frontend_bodies_only_declared_errors(parts):
    for t, body in parts:
        try:
            msg = m.decode_frontend(t, body)
        except PgProtocolError:
            continue
        # whatever decodes must encode back to the same bytes
        assert msg.encode() == t + struct.pack("!i", len(body) + 4) + body


def test_client_and_server_back_to_back():
    """Two codecs wired together in memory: a login and a query round trip."""
    client, server = PgConnection(Role.CLIENT), PgConnection(Role.SERVER)

    def pump(src_bytes: bytes, dst: PgConnection) -> list:
        dst.receive_data(src_bytes)
        out = []
        while (ev := dst.next_event()) is not NEED_DATA and not isinstance(ev, ConnectionClosed):
            out.append(ev)
        return out

    assert pump(client.send(m.SSLRequest()), server) == [m.SSLRequest()]
    assert pump(server.send(m.SSLResponse(False)), client) == [m.SSLResponse(False)]
    startup = m.StartupMessage((("user", "u"), ("database", "d")))
    assert pump(client.send(startup), server) == [startup]
    assert pump(server.send(m.AuthenticationCleartextPassword()), client) == [m.AuthenticationCleartextPassword()]
    [pw] = pump(client.send(m.PasswordMessage.password("tok")), server)
    assert pw.password_text() == "tok"
    replies = [m.AuthenticationOk(), m.ParameterStatus("server_version", "15"), m.BackendKeyData(1, 2),
               m.ReadyForQuery("I")]
    assert pump(b"".join(server.send(r) for r in replies), client) == replies
    assert pump(client.send(m.Query("SELECT 1")), server) == [m.Query("SELECT 1")]
    result = [m.RowDescription((m.FieldDescription("x", type_oid=23),)), m.DataRow((b"1",)),
              m.CommandComplete("SELECT 1"), m.ReadyForQuery("I")]
    assert pump(b"".join(server.send(r) for r in result), client) == result
    with pytest.raises(LocalProtocolError):
        server.send(m.Query("servers do not send queries"))
    assert pump(client.send(m.Terminate()), server) == [m.Terminate()]
    assert server.state is State.CLOSED


def test_startup_packet_limits():
    too_long = struct.pack("!i", 20000) + b"\x00" * 8
    too_short = struct.pack("!i", 4)
    truncated = _startup_then(b"")[:4] + b"\x00\x03\x00\x00user\x00"  # closes before its announced end
    for packet in (too_long, too_short, truncated):
        server = PgConnection(Role.SERVER)
        server.receive_data(packet)
        with pytest.raises(RemoteProtocolError):
            while server.next_event() is not NEED_DATA:
                pass
            server.receive_data(b"")
            server.next_event()


def _settings(options: str | None = None, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    params = (("user", "u"), ("database", "d")) + ((("options", options),) if options is not None else ()) + extra
    return startup_settings(m.StartupMessage(params, m.PROTOCOL_3_0))


@pytest.mark.parametrize("options,expected", [
    ("-csearch_path=evil,public", [("search_path", "evil,public")]),
    ("-c search_path=evil", [("search_path", "evil")]),
    ("--search-path=evil -e -c ROLE=x", [("search_path", "evil"), ("role", "x")]),  # names as the server reads them
    ("-ec search_path=a", [("search_path", "a")]),  # grouped switches, the argument in the next word
    ("-B 100 -c role=y", [("role", "y")]),  # another switch's argument is not a setting
    ("-c search_path=a\\ b\\\\c", [("search_path", "a b\\c")]),  # backslash escapes, as pg_split_opts
    ("-F -cgeqo=off stray", [("geqo", "off")]),
    ("--search_path", []),  # no value: the server refuses the connection
    ("", []),
])
def test_startup_settings_read_options_as_the_server_does(options: str, expected: list) -> None:
    assert _settings(options) == expected


def test_startup_settings_include_parameters_that_are_settings() -> None:
    assert _settings(None, ("search_path", "x"), ("application_name", "psql"), ("_pq_.ext", "1"), ("replication", "0")) \
        == [("search_path", "x"), ("application_name", "psql")]
