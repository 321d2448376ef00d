"""How the server will read a statement's bytes, reproduced before the policy looks at it (pure).

PostgreSQL does not lex the bytes a client sends: it first converts them from the session's
``client_encoding`` to the server encoding, then lexes the result with the session's
``standard_conforming_strings``. Both settings can be changed by the client at any time, and
each changes where string literals end. An analysis that always assumed UTF-8 and standard
strings could be shown one statement while the server runs another:

- ``standard_conforming_strings = off``: in ``'a\\', 'b; DROP TABLE t; --'`` the backslash
  escapes the quote, so the server sees a SELECT and a DROP.
- ``client_encoding = 'SJIS'`` (also BIG5, GBK, GB18030, UHC, JOHAB, SHIFT_JIS_2004): the
  second byte of a two-byte character may be ``\\`` (0x5c) or other ASCII bytes. Read as
  UTF-8 it is a backslash that escapes the next quote; the server reads one character.

:func:`read_statement` returns the text the policy must analyze: the bytes decoded exactly as
the server converts them (checked character boundary by character boundary for the
encodings whose multibyte characters may hold ASCII bytes), and, when the session's strings
are not standard-conforming and the text holds a backslash, the server's parse tree
(PostgreSQL's own lexer with ``standard_conforming_strings`` off, through libpg_query's
parser options) rendered back as standard-conforming SQL and checked to parse to the same
tree. Where the server's reading cannot be reproduced the statement is refused
(:class:`UnreadableStatement`), never guessed.

``backslash_quote`` needs no tracking: it only makes the server reject ``\\'`` in some
literals (an error, so nothing runs); wherever the server accepts the statement its reading
is the one reproduced here.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from typing import Any

import pglast.parser as _pgparser
from pglast.parser import deparse_protobuf, parse_sql_json

from appliance.policy.types import PolicyError

# PostgreSQL's encoding names (as ParameterStatus reports them) -> Python codecs whose
# character boundaries and ASCII bytes are the server's for every sequence the server accepts.
# SJIS, BIG5, GBK, UHC: the Microsoft code pages PostgreSQL's conversion tables follow.
CODECS: dict[str, str] = {
    "UTF8": "utf-8", "SQL_ASCII": "utf-8",  # SQL_ASCII as client: no conversion, checked as the server encoding
    "LATIN1": "latin-1", "LATIN2": "iso8859_2", "LATIN3": "iso8859_3", "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9", "LATIN6": "iso8859_10", "LATIN7": "iso8859_13", "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15", "LATIN10": "iso8859_16", "ISO_8859_5": "iso8859_5", "ISO_8859_6": "iso8859_6",
    "ISO_8859_7": "iso8859_7", "ISO_8859_8": "iso8859_8", "WIN866": "cp866", "WIN874": "cp874",
    "WIN1250": "cp1250", "WIN1251": "cp1251", "WIN1252": "cp1252", "WIN1253": "cp1253", "WIN1254": "cp1254",
    "WIN1255": "cp1255", "WIN1256": "cp1256", "WIN1257": "cp1257", "WIN1258": "cp1258",
    "KOI8R": "koi8_r", "KOI8U": "koi8_u", "EUC_JP": "euc_jp", "EUC_CN": "gb2312", "EUC_KR": "euc_kr",
    "EUC_JIS_2004": "euc_jis_2004", "SJIS": "cp932", "SHIFT_JIS_2004": "shift_jis_2004", "BIG5": "cp950",
    "GBK": "gbk", "UHC": "cp949", "GB18030": "gb18030", "JOHAB": "johab",
}
# Client-only encodings (PostgreSQL refuses them as server encodings): a multibyte
# character's later bytes may be ASCII, so the boundaries are checked against PostgreSQL's
# own character-length rules (pg_wchar.c).
CLIENT_ONLY = frozenset({"SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "GB18030", "JOHAB"})

# libpg_query parser option (pg_query.h): lex with standard_conforming_strings = off.
_DISABLE_STANDARD_CONFORMING_STRINGS = 32


@dataclass(frozen=True, slots=True)
class Reading:
    """The session settings that decide how the server lexes a statement."""

    client_encoding: str = "UTF8"
    server_encoding: str = "UTF8"
    standard_conforming_strings: bool = True

    def with_parameter(self, name: str, value: str) -> "Reading":
        """This reading after a ParameterStatus (or a startup parameter) ``name = value``."""
        key = name.lower()
        if key == "client_encoding":
            new = Reading(_canonical(value), self.server_encoding, self.standard_conforming_strings)
        elif key == "server_encoding":
            new = Reading(self.client_encoding, _canonical(value), self.standard_conforming_strings)
        elif key == "standard_conforming_strings":
            new = Reading(self.client_encoding, self.server_encoding, value.strip().lower() in ("on", "true", "1"))
        else:
            return self
        return DEFAULT_READING if new == DEFAULT_READING else new  # the front tests `is DEFAULT_READING`

    def describe(self) -> str:
        scs = "on" if self.standard_conforming_strings else "off"
        return f"client_encoding {self.client_encoding}, standard_conforming_strings {scs}"


DEFAULT_READING = Reading()
TRACKED_PARAMETERS = frozenset({"client_encoding", "server_encoding", "standard_conforming_strings"})


def _canonical(name: str) -> str:
    return name.strip().upper().replace("-", "_")


class UnreadableStatement(PolicyError):
    """The statement cannot be read as the server will read it. ``syntax`` is set when the
    server's own lexer and parser reject it (then ``position`` is its 1-based character
    offset, as the server reports it)."""

    def __init__(self, message: str, *, sqlstate: str = "42501", syntax: bool = False, position: int | None = None):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.syntax = syntax
        self.position = position


def decode_statement(raw: bytes, reading: Reading = DEFAULT_READING) -> str:
    """``raw`` as the characters the server's lexer will see."""
    if reading.server_encoding == "SQL_ASCII":
        # No conversion at all: the server lexes the bytes; each byte is one character to it.
        return raw.decode("latin-1")
    enc = reading.client_encoding
    codec = CODECS.get(enc)
    if codec is None:
        if raw.isascii():
            return raw.decode("ascii")
        raise UnreadableStatement(f"botwarden cannot read client encoding {enc} (statements in it must be plain "
                                  "ASCII); set client_encoding to UTF8")
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 2].hex(" ")
        shown = "UTF8" if enc == "SQL_ASCII" else enc
        raise UnreadableStatement(f'invalid byte sequence for encoding "{shown}": 0x{bad}',
                                  sqlstate="22021") from None
    if codec != "utf-8" and not raw.isascii() and _ascii_skeleton(raw, enc) != text.encode("ascii", "ignore"):
        raise UnreadableStatement(f"botwarden cannot reproduce how the server reads this statement in client "
                                  f"encoding {enc}; set client_encoding to UTF8")
    return text


def _mblen(enc: str, raw: bytes, i: int) -> int:
    """PostgreSQL's character length at ``raw[i]`` (pg_wchar.c, the *_mblen functions)."""
    c = raw[i]
    if c < 0x80:
        return 1
    if enc in ("SJIS", "SHIFT_JIS_2004"):
        return 1 if 0xA1 <= c <= 0xDF else 2  # half-width katakana are one byte
    if enc == "GB18030":
        return 4 if i + 1 < len(raw) and 0x30 <= raw[i + 1] <= 0x39 else 2
    if enc == "JOHAB":  # pg_johab_mblen is pg_euc_mblen
        return 2 if c == 0x8E else 3 if c == 0x8F else 2
    return 2  # BIG5, GBK, UHC


def _ascii_skeleton(raw: bytes, enc: str) -> bytes:
    """The ASCII characters of ``raw`` as the server splits it into characters: the bytes that
    decide every token boundary (quotes, backslashes, dollars, dashes, operators, spaces).
    Compared with the ASCII characters of the decoded text, it also catches a codec that
    would turn a multibyte character into an ASCII one."""
    if enc not in CLIENT_ONLY:  # every byte of a multibyte character has its high bit set
        return raw.translate(None, _HIGH_BYTES)
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        step = _mblen(enc, raw, i)
        if step == 1:
            if raw[i] < 0x80:
                out.append(raw[i])
        elif i + step > n:
            return b"\x00incomplete"  # never equal to a decoded skeleton: refused
        i += step
    return bytes(out)


# --- PostgreSQL's lexer with standard_conforming_strings = off -------------------------------------

class _Error(ctypes.Structure):
    _fields_ = [("message", ctypes.c_char_p), ("funcname", ctypes.c_char_p), ("filename", ctypes.c_char_p),
                ("lineno", ctypes.c_int), ("cursorpos", ctypes.c_int), ("context", ctypes.c_char_p)]


class _Protobuf(ctypes.Structure):
    _fields_ = [("len", ctypes.c_size_t), ("data", ctypes.c_void_p)]


class _JsonResult(ctypes.Structure):
    _fields_ = [("parse_tree", ctypes.c_void_p), ("stderr_buffer", ctypes.c_void_p),
                ("error", ctypes.POINTER(_Error))]


class _ProtobufResult(ctypes.Structure):
    _fields_ = [("parse_tree", _Protobuf), ("stderr_buffer", ctypes.c_void_p), ("error", ctypes.POINTER(_Error))]


def _libpg_query() -> Any:
    # The parser pglast is built on, from pglast's own extension module: the same code that
    # parses every other statement, called with the parser options pglast does not expose.
    lib = ctypes.CDLL(_pgparser.__file__)
    lib.pg_query_parse_opts.restype = _JsonResult
    lib.pg_query_parse_opts.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.pg_query_free_parse_result.argtypes = [_JsonResult]
    lib.pg_query_parse_protobuf_opts.restype = _ProtobufResult
    lib.pg_query_parse_protobuf_opts.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.pg_query_free_protobuf_parse_result.argtypes = [_ProtobufResult]
    return lib


_LIB = _libpg_query()
_HIGH_BYTES = bytes(range(0x80, 0x100))


def _raise_parse_error(err: _Error) -> None:
    message = (err.message or b"syntax error").decode("utf-8", "replace")
    raise UnreadableStatement(message, sqlstate="42601", syntax=True, position=err.cursorpos or None)


def parse_json_nonstandard(sql: str) -> str:
    """libpg_query's JSON tree of ``sql`` lexed with standard_conforming_strings = off."""
    res = _LIB.pg_query_parse_opts(sql.encode("utf-8"), _DISABLE_STANDARD_CONFORMING_STRINGS)
    try:
        if res.error:
            _raise_parse_error(res.error.contents)
        return ctypes.string_at(res.parse_tree).decode("utf-8")
    finally:
        _LIB.pg_query_free_parse_result(res)


def _protobuf_nonstandard(sql: str) -> bytes:
    res = _LIB.pg_query_parse_protobuf_opts(sql.encode("utf-8"), _DISABLE_STANDARD_CONFORMING_STRINGS)
    try:
        if res.error:
            _raise_parse_error(res.error.contents)
        return ctypes.string_at(res.parse_tree.data, res.parse_tree.len)
    finally:
        _LIB.pg_query_free_protobuf_parse_result(res)


_POSITIONS = frozenset({"location", "stmt_location", "stmt_len"})


def _without_positions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_positions(v) for k, v in node.items() if k not in _POSITIONS}
    if isinstance(node, list):
        return [_without_positions(v) for v in node]
    return node


def standard_text(sql: str) -> str:
    """``sql`` as the server reads it with standard_conforming_strings = off, rendered as
    SQL that means the same with standard strings (the form the policy analyzes)."""
    if "\\" not in sql:
        return sql  # without a backslash both settings read every literal alike
    tree = _without_positions(json.loads(parse_json_nonstandard(sql)))
    try:
        rendered = deparse_protobuf(_protobuf_nonstandard(sql))
        same = _without_positions(json.loads(parse_sql_json(rendered))) == tree
    except Exception:  # pglast's deparser raises its own and plain errors; the re-parse ParseError
        same = False
    if not same:
        raise UnreadableStatement("botwarden cannot reproduce how the server reads this statement with "
                                  "standard_conforming_strings off; use E'...' strings or turn the setting on")
    return rendered


def read_statement(raw: bytes, reading: Reading = DEFAULT_READING) -> str:
    """The text the policy analyzes for ``raw`` sent under ``reading`` (see the module doc).
    Raises :class:`UnreadableStatement`."""
    text = decode_statement(raw, reading)
    if not reading.standard_conforming_strings:
        text = standard_text(text)
    return text


def possible_readings(raw: bytes, current: Reading) -> list[Reading]:
    """Every reading the server might apply to ``raw`` if a request still in flight changes
    client_encoding or standard_conforming_strings (the server encoding cannot change)."""
    scs = (True, False) if b"\\" in raw else (current.standard_conforming_strings,)
    encodings = list(CODECS) if not raw.isascii() else [current.client_encoding]
    return [Reading(enc, current.server_encoding, s) for enc in encodings for s in scs
            if (enc, s) != (current.client_encoding, current.standard_conforming_strings)]
