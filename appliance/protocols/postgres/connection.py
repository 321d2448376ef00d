"""h11-style sans-IO connection for PostgreSQL protocol 3.0.

Feed bytes with ``receive_data`` (``b""`` means the peer closed), pull events
with ``next_event`` (a message dataclass, ``NEED_DATA`` or ``ConnectionClosed``),
and turn messages you want to send into bytes with ``send``. The object holds
no socket; TLS, when negotiated, happens outside between the ``SSLResponse`` and
the next bytes fed in.

States (one parse method per state, see ``_PARSERS``):

SERVER role (we answer a client):
    STARTUP -> (SSLRequest|GSSENCRequest) -> NEGOTIATING -> send(SSLResponse) -> STARTUP
    STARTUP -> StartupMessage -> TYPED -> Terminate -> CLOSED
    STARTUP -> CancelRequest -> CLOSED
CLIENT role (we talk to a server):
    TYPED -> send(SSLRequest|GSSENCRequest) -> SSL_RESPONSE -> SSLResponse -> TYPED
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from . import messages as m
from .errors import LocalProtocolError, RemoteProtocolError, UnsupportedProtocol
from .framing import DEFAULT_MAX_MESSAGE_SIZE, check_length

# PostgreSQL's own limit for startup packets (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10000


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side cleanly between messages."""


class Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


class State(enum.Enum):
    STARTUP = "startup"
    NEGOTIATING = "negotiating"
    SSL_RESPONSE = "ssl_response"
    TYPED = "typed"
    CLOSED = "closed"


_I2 = struct.Struct("!ii")


class PgConnection:
    def __init__(self, role: Role, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        self.role = role
        self.max_message_size = max_message_size
        self.state = State.STARTUP if role is Role.SERVER else State.TYPED
        self._buf = bytearray()
        self._eof = False
        self._decode = m.decode_frontend if role is Role.SERVER else m.decode_backend

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes) -> None:
        if self._eof and data:
            raise LocalProtocolError("receive_data after the peer closed")
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not yet consumed as an event."""
        return bytes(self._buf)

    def next_event(self):
        if self.state is State.CLOSED:
            return ConnectionClosed()
        event = _PARSERS[self.state](self)
        if event is NEED_DATA and self._eof:
            if self._buf:
                raise RemoteProtocolError("peer closed the connection in the middle of a message")
            self.state = State.CLOSED
            return ConnectionClosed()
        return event

    def _parse_startup(self):
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        (length,) = struct.unpack_from("!i", buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise RemoteProtocolError(f"invalid startup packet length {length}")
        if len(buf) < length:
            return NEED_DATA
        body = bytes(buf[4:length])
        del buf[:length]
        (code,) = struct.unpack_from("!i", body, 0)
        if code == m.SSL_REQUEST_CODE or code == m.GSSENC_REQUEST_CODE:
            if length != 8:
                raise RemoteProtocolError("SSLRequest/GSSENCRequest must be 8 bytes long")
            self.state = State.NEGOTIATING
            return m.SSLRequest() if code == m.SSL_REQUEST_CODE else m.GSSENCRequest()
        if code == m.CANCEL_REQUEST_CODE:
            if length != 16:
                raise RemoteProtocolError("CancelRequest must be 16 bytes long")
            pid, secret = _I2.unpack_from(body, 4)
            self.state = State.CLOSED
            return m.CancelRequest(pid, secret)
        if code >> 16 != 3:
            raise UnsupportedProtocol(
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: botwarden speaks 3.0")
        try:
            startup = m.StartupMessage.decode(body)
        except ValueError as e:
            raise RemoteProtocolError(f"invalid startup packet: {e}") from e
        self.state = State.TYPED
        return startup

    def _parse_negotiating(self):
        # The client must wait for our one-byte answer; anything it sends early
        # would be read outside TLS (CVE-2021-23222), so it is kept and refused.
        return NEED_DATA

    def _parse_ssl_response(self):
        if not self._buf:
            return NEED_DATA
        b = self._buf[0]
        if b in (ord("S"), ord("G")):
            del self._buf[:1]
            self.state = State.TYPED
            if self._buf:
                raise RemoteProtocolError("server sent data after accepting encryption, before the handshake")
            return m.SSLResponse(True)
        if b == ord("N"):
            del self._buf[:1]
            self.state = State.TYPED
            return m.SSLResponse(False)
        if b == ord("E"):
            # Servers before 9.x answer with an ErrorResponse; parse it as a typed message.
            self.state = State.TYPED
            return self._parse_typed()
        raise RemoteProtocolError(f"invalid answer {bytes([b])!r} to an encryption request")

    def _parse_typed(self):
        buf = self._buf
        if len(buf) < 5:
            return NEED_DATA
        (length,) = struct.unpack_from("!i", buf, 1)
        check_length(buf[0], length, self.max_message_size)
        if len(buf) < length + 1:
            return NEED_DATA
        type_byte = bytes(buf[0:1])
        body = bytes(buf[5:length + 1])
        del buf[:length + 1]
        msg = self._decode(type_byte, body)
        if type(msg) is m.Terminate:
            self.state = State.CLOSED
        return msg

    def _parse_closed(self):
        return ConnectionClosed()

    # ------------------------------------------------------------------ output
    def send(self, msg: m.Message) -> bytes:
        """Bytes for ``msg``; checks it may be sent now and advances the state."""
        kind = type(msg)
        if self.role is Role.SERVER:
            if kind is m.SSLResponse:
                if self.state is not State.NEGOTIATING:
                    raise LocalProtocolError("SSLResponse only answers an SSLRequest or GSSENCRequest")
                if msg.accepted and self._buf:
                    raise RemoteProtocolError("client sent data before the TLS handshake")
                self.state = State.STARTUP
                return msg.encode()
            if kind not in m.BACKEND_MESSAGES.values() and kind.type != b"R":
                raise LocalProtocolError(f"a server does not send {kind.__name__}")
            return msg.encode()
        # CLIENT role
        if kind in (m.SSLRequest, m.GSSENCRequest):
            self.state = State.SSL_RESPONSE
            return msg.encode()
        if kind is m.StartupMessage or kind is m.CancelRequest:
            return msg.encode()
        if kind not in m.FRONTEND_MESSAGES.values():
            raise LocalProtocolError(f"a client does not send {kind.__name__}")
        return msg.encode()


_PARSERS = {
    State.STARTUP: PgConnection._parse_startup,
    State.NEGOTIATING: PgConnection._parse_negotiating,
    State.SSL_RESPONSE: PgConnection._parse_ssl_response,
    State.TYPED: PgConnection._parse_typed,
    State.CLOSED: PgConnection._parse_closed,
}


def negotiate_reply(startup: m.StartupMessage) -> m.NegotiateProtocolVersion | None:
    """What PostgreSQL answers a client asking for 3.x > 3.0 or for ``_pq_.`` options; None if nothing."""
    unrecognized = tuple(k for k, _ in startup.params if k.startswith("_pq_."))
    if startup.minor == 0 and not unrecognized:
        return None
    return m.NegotiateProtocolVersion(m.PROTOCOL_3_0, unrecognized)


def startup_for_server(startup: m.StartupMessage, user: str) -> m.StartupMessage:
    """The bot's startup parameters verbatim, protocol 3.0, only ``user`` replaced."""
    params = tuple((k, v) for k, v in startup.params if not k.startswith("_pq_."))
    return m.StartupMessage(params, m.PROTOCOL_3_0).replace("user", user)


def error_response(sqlstate: str, message: str, *, severity: str = "ERROR", detail: str | None = None,
                   hint: str | None = None) -> m.ErrorResponse:
    """An ErrorResponse that says botwarden, not the server, produced it."""
    return m.ErrorResponse(_fields(sqlstate, message, severity, detail, hint))


def notice_response(message: str, *, severity: str = "NOTICE", sqlstate: str = "00000",
                    detail: str | None = None, hint: str | None = None) -> m.NoticeResponse:
    return m.NoticeResponse(_fields(sqlstate, message, severity, detail, hint))


def _fields(sqlstate: str, message: str, severity: str, detail: str | None, hint: str | None):
    # Say once that botwarden produced it (many callers' messages already start with "botwarden").
    text = message if message.startswith("botwarden") else f"botwarden: {message}"
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", text)]
    if detail:
        fields.append(("D", detail))
    if hint:
        fields.append(("H", hint))
    return tuple(fields)


# The server's own switches in a startup packet's ``options`` (postgres.c,
# process_postgres_switches): letters followed by ":" take an argument; "-c name=value" and
# "--name=value" set a run-time setting.
_SWITCHES = "B:bc:C:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:"
_TAKES_ARGUMENT = frozenset(c for i, c in enumerate(_SWITCHES) if _SWITCHES[i + 1:i + 2] == ":")
_PROTOCOL_KEYS = frozenset({"user", "database", "options", "replication"})


def split_options(options: str) -> list[str]:
    """``options`` split as the server splits it (pg_split_opts): at whitespace, a backslash
    taking the next character literally."""
    out: list[str] = []
    word: list[str] | None = None
    escaped = False
    for ch in options:
        if escaped:
            word = (word or []) + [ch]
            escaped = False
        elif ch == "\\":
            escaped = True
            word = word or []
        elif ch.isspace():
            if word is not None:
                out.append("".join(word))
            word = None
        else:
            word = (word or []) + [ch]
    if word is not None:
        out.append("".join(word))
    return out


def startup_settings(startup: m.StartupMessage) -> list[tuple[str, str]]:
    """The run-time settings a startup packet makes before the session's first statement:
    ``-c name=value`` and ``--name=value`` in ``options`` (getopt's rules: switches may be
    grouped, an argument may follow in the next word), then every parameter that is not a
    protocol key, each as (lower-case name with "-" read as "_", value)."""
    out: list[tuple[str, str]] = []
    words = split_options(startup.get("options") or "")
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-") or word == "-":
            continue  # the server refuses a stray argument: nothing is set
        j = 1
        while j < len(word):
            ch = word[j]
            if ch not in _TAKES_ARGUMENT:
                j += 1
                continue
            arg = word[j + 1:]
            if not arg and i < len(words):
                arg = words[i]
                i += 1
            if ch in ("c", "-"):
                name, sep, value = arg.partition("=")
                if sep:
                    out.append((name.replace("-", "_").lower(), value))
            break
    out.extend((k.lower(), v) for k, v in startup.params
               if k not in _PROTOCOL_KEYS and not k.startswith("_pq_."))
    return out
