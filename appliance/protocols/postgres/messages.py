"""Every message of PostgreSQL protocol 3.0 as a small frozen dataclass that encodes itself.

``encode()`` returns the whole message (type byte, length, body). ``decode(body)``
builds a message from its body (the bytes after the length). Strings are decoded
as UTF-8 with ``surrogateescape`` so any byte sequence round-trips unchanged even
when the session's client_encoding is not UTF-8.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import RemoteProtocolError

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_I = struct.Struct("!i")
_H = struct.Struct("!h")
_UH = struct.Struct("!H")
_UI = struct.Struct("!I")   # OIDs are unsigned 32-bit   # counts: PostgreSQL reads them as unsigned 16-bit (pq_getmsgint(msg, 2)), up to 65,535
_IH = struct.Struct("!ih")
_HEADER = struct.Struct("!ci")


def _s(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\x00"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _frame(type_byte: bytes, body: bytes) -> bytes:
    return _HEADER.pack(type_byte, len(body) + 4) + body


class _Reader:
    """Cursor over a message body; every read checks bounds and raises RemoteProtocolError."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes):
        self.buf = buf
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise RemoteProtocolError("message body is shorter than its fields")

    def int32(self) -> int:
        self._need(4)
        (v,) = _I.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def int16(self) -> int:
        self._need(2)
        (v,) = _H.unpack_from(self.buf, self.pos)
        self.pos += 2
        return v

    def byte(self) -> bytes:
        self._need(1)
        self.pos += 1
        return self.buf[self.pos - 1:self.pos]

    def raw(self, n: int) -> bytes:
        self._need(n)
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def cstring(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise RemoteProtocolError("string field is not NUL-terminated")
        value = _text(bytes(self.buf[self.pos:end]))
        self.pos = end + 1
        return value

    def count(self) -> int:
        self._need(2)
        (n,) = _UH.unpack_from(self.buf, self.pos)
        self.pos += 2
        return n

    def value(self) -> bytes | None:
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise RemoteProtocolError("negative value length in message")
        return self.raw(n)

    def rest(self) -> bytes:
        return self.raw(len(self.buf) - self.pos)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise RemoteProtocolError("message body is longer than its fields")


def _values(values: tuple[bytes | None, ...]) -> bytes:
    parts = [_UH.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_I.pack(-1))
        else:
            parts.append(_I.pack(len(v)))
            parts.append(v)
    return b"".join(parts)


def _read_values(r: _Reader) -> tuple[bytes | None, ...]:
    return tuple(r.value() for _ in range(r.count()))


def _formats(r: _Reader) -> tuple[int, ...]:
    out = tuple(r.int16() for _ in range(r.count()))
    for f in out:
        if f not in (0, 1):
            raise RemoteProtocolError(f"unknown format code {f}")
    return out


def _pack_int16s(values: tuple[int, ...]) -> bytes:
    return _UH.pack(len(values)) + b"".join(_H.pack(v) for v in values)


def _check_format(f: int) -> None:
    if f not in (0, 1):
        raise ValueError(f"format code must be 0 or 1, not {f}")


class Message:
    """Base of all messages; ``type`` is the type byte (b'' for untyped startup-phase packets)."""

    type: ClassVar[bytes] = b""
    __slots__ = ()

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: bytes) -> "Message":
        raise NotImplementedError


class _Empty(Message):
    """A message without a body."""

    __slots__ = ()

    def encode(self) -> bytes:
        return self.type + b"\x00\x00\x00\x04"

    @classmethod
    def decode(cls, body: bytes):
        if body:
            raise RemoteProtocolError(f"{cls.__name__} must have an empty body")
        return cls()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------- startup phase (untyped)

@dataclass(frozen=True, slots=True)
class StartupMessage(Message):
    params: tuple[tuple[str, str], ...] = ()
    version: int = PROTOCOL_3_0

    def __post_init__(self) -> None:
        for k, v in self.params:
            if "\x00" in k or "\x00" in v or not k:
                raise ValueError("startup parameter names must be non-empty and without NUL")

    @property
    def major(self) -> int:
        return self.version >> 16

    @property
    def minor(self) -> int:
        return self.version & 0xFFFF

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == name:
                return v
        return default

    def replace(self, name: str, value: str) -> "StartupMessage":
        """The same parameters in the same order, with ``name`` set to ``value``."""
        params = tuple((k, value if k == name else v) for k, v in self.params)
        if not any(k == name for k, _ in params):
            params += ((name, value),)
        return StartupMessage(params, self.version)

    def encode(self) -> bytes:
        body = _I.pack(self.version) + b"".join(_s(k) + _s(v) for k, v in self.params) + b"\x00"
        return _I.pack(len(body) + 4) + body

    @classmethod
    def decode(cls, body: bytes) -> "StartupMessage":
        r = _Reader(body)
        version = r.int32()
        params: list[tuple[str, str]] = []
        while True:
            name = r.cstring()
            if not name:
                break
            params.append((name, r.cstring()))
        r.end()
        if len({k for k, _ in params}) != len(params):
            raise RemoteProtocolError("startup packet repeats a parameter")
        return cls(tuple(params), version)


@dataclass(frozen=True, slots=True)
class SSLRequest(Message):
    def encode(self) -> bytes:
        return _I.pack(8) + _I.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest(Message):
    def encode(self) -> bytes:
        return _I.pack(8) + _I.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    pid: int
    secret: int

    def encode(self) -> bytes:
        return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, self.pid, self.secret)


@dataclass(frozen=True, slots=True)
class SSLResponse(Message):
    """The server's one-byte answer to SSLRequest or GSSENCRequest: b'S'/b'G' yes, b'N' no."""

    accepted: bool

    def encode(self) -> bytes:
        return b"S" if self.accepted else b"N"


# ---------------------------------------------------------------- frontend (typed)

@dataclass(frozen=True, slots=True)
class Query(Message):
    type: ClassVar[bytes] = b"Q"
    sql: str

    def encode(self) -> bytes:
        return _frame(b"Q", _s(self.sql))

    @classmethod
    def decode(cls, body: bytes) -> "Query":
        r = _Reader(body)
        sql = r.cstring()
        r.end()
        return cls(sql)


@dataclass(frozen=True, slots=True)
class Parse(Message):
    type: ClassVar[bytes] = b"P"
    name: str
    query: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return _frame(b"P", _s(self.name) + _s(self.query) + _UH.pack(len(self.param_types))
                      + b"".join(_I.pack(t) for t in self.param_types))

    @classmethod
    def decode(cls, body: bytes) -> "Parse":
        r = _Reader(body)
        name, query = r.cstring(), r.cstring()
        types = tuple(r.int32() & 0xFFFFFFFF for _ in range(r.count()))
        r.end()
        return cls(name, query, types)


@dataclass(frozen=True, slots=True)
class Bind(Message):
    type: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in self.param_formats + self.result_formats:
            _check_format(f)

    def param_format(self, i: int) -> int:
        pf = self.param_formats
        return pf[i] if len(pf) > 1 else (pf[0] if pf else 0)

    def encode(self) -> bytes:
        return _frame(b"B", _s(self.portal) + _s(self.statement) + _pack_int16s(self.param_formats)
                      + _values(self.params) + _pack_int16s(self.result_formats))

    @classmethod
    def decode(cls, body: bytes) -> "Bind":
        r = _Reader(body)
        portal, stmt = r.cstring(), r.cstring()
        pf = _formats(r)
        params = _read_values(r)
        rf = _formats(r)
        r.end()
        if len(pf) > 1 and len(pf) != len(params):
            raise RemoteProtocolError("Bind has a format code count that matches neither 1 nor its parameters")
        return cls(portal, stmt, pf, params, rf)


@dataclass(frozen=True, slots=True)
class Describe(Message):
    type: ClassVar[bytes] = b"D"
    kind: str  # 'S' statement, 'P' portal
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("S", "P"):
            raise ValueError("Describe kind must be 'S' or 'P'")

    def encode(self) -> bytes:
        return _frame(b"D", self.kind.encode() + _s(self.name))

    @classmethod
    def decode(cls, body: bytes) -> "Describe":
        r = _Reader(body)
        kind = _text(r.byte())
        name = r.cstring()
        r.end()
        if kind not in ("S", "P"):
            raise RemoteProtocolError("Describe kind must be 'S' or 'P'")
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Close(Message):
    type: ClassVar[bytes] = b"C"
    kind: str
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("S", "P"):
            raise ValueError("Close kind must be 'S' or 'P'")

    def encode(self) -> bytes:
        return _frame(b"C", self.kind.encode() + _s(self.name))

    @classmethod
    def decode(cls, body: bytes) -> "Close":
        r = _Reader(body)
        kind = _text(r.byte())
        name = r.cstring()
        r.end()
        if kind not in ("S", "P"):
            raise RemoteProtocolError("Close kind must be 'S' or 'P'")
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Execute(Message):
    type: ClassVar[bytes] = b"E"
    portal: str = ""
    max_rows: int = 0

    def encode(self) -> bytes:
        return _frame(b"E", _s(self.portal) + _I.pack(self.max_rows))

    @classmethod
    def decode(cls, body: bytes) -> "Execute":
        r = _Reader(body)
        portal = r.cstring()
        n = r.int32()
        r.end()
        return cls(portal, n)


class Sync(_Empty):
    type = b"S"
    __slots__ = ()


class Flush(_Empty):
    type = b"H"
    __slots__ = ()


class Terminate(_Empty):
    type = b"X"
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    type: ClassVar[bytes] = b"d"
    data: bytes

    def encode(self) -> bytes:
        return _frame(b"d", self.data)

    @classmethod
    def decode(cls, body: bytes) -> "CopyData":
        return cls(bytes(body))


class CopyDone(_Empty):
    type = b"c"
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    type: ClassVar[bytes] = b"f"
    message: str

    def encode(self) -> bytes:
        return _frame(b"f", _s(self.message))

    @classmethod
    def decode(cls, body: bytes) -> "CopyFail":
        r = _Reader(body)
        m = r.cstring()
        r.end()
        return cls(m)


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    type: ClassVar[bytes] = b"F"
    oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def __post_init__(self) -> None:
        for f in self.arg_formats + (self.result_format,):
            _check_format(f)

    def encode(self) -> bytes:
        return _frame(b"F", _UI.pack(self.oid) + _pack_int16s(self.arg_formats) + _values(self.args)
                      + _H.pack(self.result_format))

    @classmethod
    def decode(cls, body: bytes) -> "FunctionCall":
        r = _Reader(body)
        oid = r.int32() & 0xFFFFFFFF
        af = _formats(r)
        args = _read_values(r)
        rf = r.int16()
        r.end()
        if rf not in (0, 1):
            raise RemoteProtocolError(f"unknown format code {rf}")
        return cls(oid, af, args, rf)


@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """'p': a password, or a SASL initial response / response (the content depends on the auth step)."""

    type: ClassVar[bytes] = b"p"
    data: bytes

    def encode(self) -> bytes:
        return _frame(b"p", self.data)

    @classmethod
    def decode(cls, body: bytes) -> "PasswordMessage":
        return cls(bytes(body))

    @classmethod
    def password(cls, text: str) -> "PasswordMessage":
        return cls(_s(text))

    def password_text(self) -> str:
        r = _Reader(self.data)
        value = r.cstring()
        r.end()
        return value

    @classmethod
    def sasl_initial(cls, mechanism: str, data: bytes | None) -> "PasswordMessage":
        tail = _I.pack(-1) if data is None else _I.pack(len(data)) + data
        return cls(_s(mechanism) + tail)

    def sasl_initial_parts(self) -> tuple[str, bytes | None]:
        r = _Reader(self.data)
        mechanism = r.cstring()
        data = r.value()
        r.end()
        return mechanism, data


# ---------------------------------------------------------------- backend

AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class AuthenticationOk(Message):
    type: ClassVar[bytes] = b"R"

    def encode(self) -> bytes:
        return _frame(b"R", _I.pack(AUTH_OK))


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(Message):
    type: ClassVar[bytes] = b"R"

    def encode(self) -> bytes:
        return _frame(b"R", _I.pack(AUTH_CLEARTEXT))


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(Message):
    type: ClassVar[bytes] = b"R"
    salt: bytes

    def __post_init__(self) -> None:
        if len(self.salt) != 4:
            raise ValueError("MD5 salt must be 4 bytes")

    def encode(self) -> bytes:
        return _frame(b"R", _I.pack(AUTH_MD5) + self.salt)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(Message):
    type: ClassVar[bytes] = b"R"
    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        return _frame(b"R", _I.pack(AUTH_SASL) + b"".join(_s(m) for m in self.mechanisms) + b"\x00")


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(Message):
    type: ClassVar[bytes] = b"R"
    data: bytes

    def encode(self) -> bytes:
        return _frame(b"R", _I.pack(AUTH_SASL_CONTINUE) + self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(Message):
    type: ClassVar[bytes] = b"R"
    data: bytes

    def encode(self) -> bytes:
        return _frame(b"R", _I.pack(AUTH_SASL_FINAL) + self.data)


@dataclass(frozen=True, slots=True)
class AuthenticationOther(Message):
    """Kerberos, GSS, SSPI: botwarden recognises them but does not speak them."""

    type: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return _frame(b"R", _I.pack(self.code) + self.data)


def _decode_authentication(body: bytes) -> Message:
    r = _Reader(body)
    code = r.int32()
    if code == AUTH_OK:
        r.end()
        return AuthenticationOk()
    if code == AUTH_CLEARTEXT:
        r.end()
        return AuthenticationCleartextPassword()
    if code == AUTH_MD5:
        salt = r.raw(4)
        r.end()
        return AuthenticationMD5Password(salt)
    if code == AUTH_SASL:
        mechs = []
        while True:
            m = r.cstring()
            if not m:
                break
            mechs.append(m)
        r.end()
        return AuthenticationSASL(tuple(mechs))
    if code == AUTH_SASL_CONTINUE:
        return AuthenticationSASLContinue(r.rest())
    if code == AUTH_SASL_FINAL:
        return AuthenticationSASLFinal(r.rest())
    if code in (AUTH_KERBEROS_V5, AUTH_GSS, AUTH_GSS_CONTINUE, AUTH_SSPI):
        return AuthenticationOther(code, r.rest())
    raise RemoteProtocolError(f"unknown authentication request code {code}")


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    type: ClassVar[bytes] = b"K"
    pid: int
    secret: int

    def encode(self) -> bytes:
        return _frame(b"K", struct.pack("!ii", self.pid, self.secret))

    @classmethod
    def decode(cls, body: bytes) -> "BackendKeyData":
        r = _Reader(body)
        pid, secret = r.int32(), r.int32()
        r.end()
        return cls(pid, secret)


class ParseComplete(_Empty):
    type = b"1"
    __slots__ = ()


class BindComplete(_Empty):
    type = b"2"
    __slots__ = ()


class CloseComplete(_Empty):
    type = b"3"
    __slots__ = ()


class NoData(_Empty):
    type = b"n"
    __slots__ = ()


class PortalSuspended(_Empty):
    type = b"s"
    __slots__ = ()


class EmptyQueryResponse(_Empty):
    type = b"I"
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    type: ClassVar[bytes] = b"C"
    tag: str

    @property
    def rows(self) -> int | None:
        """The row count at the end of the tag (SELECT 3, INSERT 0 3, COPY 3 ...), if any."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() and " " in self.tag else None

    def encode(self) -> bytes:
        return _frame(b"C", _s(self.tag))

    @classmethod
    def decode(cls, body: bytes) -> "CommandComplete":
        r = _Reader(body)
        tag = r.cstring()
        r.end()
        return cls(tag)


@dataclass(frozen=True, slots=True)
class _CopyResponse(Message):
    format: int = 0
    column_formats: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in (self.format,) + self.column_formats:
            _check_format(f)

    def encode(self) -> bytes:
        return _frame(self.type, bytes([self.format]) + _pack_int16s(self.column_formats))

    @classmethod
    def decode(cls, body: bytes):
        r = _Reader(body)
        fmt = r.byte()[0]
        cols = _formats(r)
        r.end()
        if fmt not in (0, 1):
            raise RemoteProtocolError(f"unknown copy format {fmt}")
        return cls(fmt, cols)


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    type: ClassVar[bytes] = b"G"


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    type: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    type: ClassVar[bytes] = b"W"


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    type: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        return _frame(b"D", _values(self.values))

    @classmethod
    def decode(cls, body: bytes) -> "DataRow":
        r = _Reader(body)
        values = _read_values(r)
        r.end()
        return cls(values)


@dataclass(frozen=True, slots=True)
class _Fields(Message):
    """ErrorResponse / NoticeResponse: (field code, value) pairs in the server's order."""

    fields: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for code, value in self.fields:
            if len(code) != 1 or code == "\x00" or "\x00" in value:
                raise ValueError("error fields need a one-character code and a value without NUL")

    def get(self, code: str, default: str | None = None) -> str | None:
        for c, v in self.fields:
            if c == code:
                return v
        return default

    @property
    def sqlstate(self) -> str | None:
        return self.get("C")

    @property
    def message(self) -> str | None:
        return self.get("M")

    @property
    def severity(self) -> str | None:
        # 'V' (never localised) exists from 9.6; 'S' may be translated.
        return self.get("V") or self.get("S")

    def encode(self) -> bytes:
        return _frame(self.type, b"".join(c.encode() + _s(v) for c, v in self.fields) + b"\x00")

    @classmethod
    def decode(cls, body: bytes):
        r = _Reader(body)
        fields = []
        while True:
            code = r.byte()
            if code == b"\x00":
                break
            fields.append((_text(code), r.cstring()))
        r.end()
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    type: ClassVar[bytes] = b"E"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    type: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    type: ClassVar[bytes] = b"V"
    value: bytes | None

    def encode(self) -> bytes:
        v = self.value
        return _frame(b"V", _I.pack(-1) if v is None else _I.pack(len(v)) + v)

    @classmethod
    def decode(cls, body: bytes) -> "FunctionCallResponse":
        r = _Reader(body)
        v = r.value()
        r.end()
        return cls(v)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    type: ClassVar[bytes] = b"v"
    # The newest protocol version the server speaks as a whole (3 << 16 | minor), which is
    # what PostgreSQL sends and libpq checks, although the docs call it the minor version.
    newest_version: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return _frame(b"v", _I.pack(self.newest_version) + _I.pack(len(self.unrecognized))
                      + b"".join(_s(o) for o in self.unrecognized))

    @classmethod
    def decode(cls, body: bytes) -> "NegotiateProtocolVersion":
        r = _Reader(body)
        minor = r.int32()
        n = r.int32()
        if n < 0:
            raise RemoteProtocolError("negative option count")
        opts = tuple(r.cstring() for _ in range(n))
        r.end()
        return cls(minor, opts)


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    type: ClassVar[bytes] = b"A"
    pid: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        return _frame(b"A", _I.pack(self.pid) + _s(self.channel) + _s(self.payload))

    @classmethod
    def decode(cls, body: bytes) -> "NotificationResponse":
        r = _Reader(body)
        pid, channel, payload = r.int32(), r.cstring(), r.cstring()
        r.end()
        return cls(pid, channel, payload)


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    type: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return _frame(b"t", _UH.pack(len(self.type_oids)) + b"".join(_I.pack(o) for o in self.type_oids))

    @classmethod
    def decode(cls, body: bytes) -> "ParameterDescription":
        r = _Reader(body)
        oids = tuple(r.int32() & 0xFFFFFFFF for _ in range(r.count()))
        r.end()
        return cls(oids)


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    type: ClassVar[bytes] = b"S"
    name: str
    value: str

    def encode(self) -> bytes:
        return _frame(b"S", _s(self.name) + _s(self.value))

    @classmethod
    def decode(cls, body: bytes) -> "ParameterStatus":
        r = _Reader(body)
        name, value = r.cstring(), r.cstring()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    type: ClassVar[bytes] = b"Z"
    status: str = "I"  # I idle, T in transaction, E failed transaction

    def __post_init__(self) -> None:
        if self.status not in ("I", "T", "E"):
            raise ValueError("ReadyForQuery status must be I, T or E")

    def encode(self) -> bytes:
        return _frame(b"Z", self.status.encode())

    @classmethod
    def decode(cls, body: bytes) -> "ReadyForQuery":
        if body not in (b"I", b"T", b"E"):
            raise RemoteProtocolError("ReadyForQuery status must be I, T or E")
        return cls(body.decode())


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 0
    type_size: int = -1
    type_mod: int = -1
    format: int = 0


_FIELD = struct.Struct("!IhIhih")


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    type: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...] = field(default=())

    def encode(self) -> bytes:
        parts = [_UH.pack(len(self.fields))]
        for f in self.fields:
            parts.append(_s(f.name))
            parts.append(_FIELD.pack(f.table_oid, f.attnum, f.type_oid, f.type_size, f.type_mod, f.format))
        return _frame(b"T", b"".join(parts))

    @classmethod
    def decode(cls, body: bytes) -> "RowDescription":
        r = _Reader(body)
        out = []
        for _ in range(r.count()):
            name = r.cstring()
            r._need(_FIELD.size)
            vals = _FIELD.unpack_from(r.buf, r.pos)
            r.pos += _FIELD.size
            if vals[5] not in (0, 1):
                raise RemoteProtocolError(f"unknown format code {vals[5]}")
            out.append(FieldDescription(name, *vals))
        r.end()
        return cls(tuple(out))


FRONTEND_MESSAGES: dict[bytes, type[Message]] = {
    m.type: m for m in (Query, Parse, Bind, Describe, Close, Execute, Sync, Flush, Terminate, CopyData,
                        CopyDone, CopyFail, FunctionCall, PasswordMessage)
}

_BACKEND_CLASSES = (BackendKeyData, ParseComplete, BindComplete, CloseComplete, NoData, PortalSuspended,
                    EmptyQueryResponse, CommandComplete, CopyInResponse, CopyOutResponse, CopyBothResponse,
                    CopyData, CopyDone, DataRow, ErrorResponse, NoticeResponse, FunctionCallResponse,
                    NegotiateProtocolVersion, NotificationResponse, ParameterDescription, ParameterStatus,
                    ReadyForQuery, RowDescription)
BACKEND_MESSAGES: dict[bytes, type[Message]] = {m.type: m for m in _BACKEND_CLASSES}

_BACKEND_DECODERS = {t: m.decode for t, m in BACKEND_MESSAGES.items()}
_BACKEND_DECODERS[b"R"] = _decode_authentication
_FRONTEND_DECODERS = {t: m.decode for t, m in FRONTEND_MESSAGES.items()}


def decode_frontend(type_byte: bytes, body: bytes) -> Message:
    """Decode one typed message a client sent; RemoteProtocolError if it is not valid."""
    return _decode(_FRONTEND_DECODERS, type_byte, body, "frontend")


def decode_backend(type_byte: bytes, body: bytes) -> Message:
    """Decode one typed message a server sent; RemoteProtocolError if it is not valid."""
    return _decode(_BACKEND_DECODERS, type_byte, body, "backend")


def _decode(table, type_byte: bytes, body: bytes, side: str) -> Message:
    decoder = table.get(type_byte)
    if decoder is None:
        raise RemoteProtocolError(f"unknown {side} message type {type_byte!r}")
    try:
        return decoder(body)
    except RemoteProtocolError:
        raise
    except (ValueError, struct.error, IndexError) as e:  # a field that fails its own validation
        raise RemoteProtocolError(f"invalid {side} message {type_byte!r}: {e}") from e
