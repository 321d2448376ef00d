"""Fast reads and writes of the messages the relay touches on its hot path (DataRow, Bind), and
the ErrorResponses botwarden makes as the server would."""

from __future__ import annotations

import functools
import struct

from appliance import hotpath
from appliance.policy.types import ColumnDesc
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres import sqlstate
from appliance.protocols.postgres.errors import RemoteProtocolError


_I32 = struct.Struct("!i")
_H16 = struct.Struct("!H")  # counts are unsigned 16-bit, as PostgreSQL reads them


# DataRow decode/encode: compiled when built, the pure-Python reference otherwise (appliance/hotpath).
_row_values = hotpath.row_values
_encode_row = hotpath.encode_row


def _columns(desc: m.RowDescription, formats: tuple[int, ...] | None = None) -> list[ColumnDesc]:
    cols = []
    for i, f in enumerate(desc.fields):
        fmt = f.format
        if formats is not None:
            fmt = formats[i] if len(formats) > 1 else (formats[0] if formats else 0)
        cols.append(ColumnDesc(f.name, f.table_oid, f.attnum, f.type_oid, fmt))
    return cols


@functools.lru_cache(maxsize=128)
def columns_of(body: bytes) -> tuple[ColumnDesc, ...]:
    """The columns of a RowDescription (its body: the bytes after type and length), decoded once
    per distinct description in this process: a bot's statements repeat theirs, and a prepared
    statement's Describe of each portal brings the same one every time."""
    return tuple(_columns(m.RowDescription.decode(body)))


def _cstring_at(buf, pos: int, end: int) -> tuple[str, int]:
    z = buf.find(b"\x00", pos, end)
    if z < 0:
        raise RemoteProtocolError("string field is not NUL-terminated")
    return buf[pos:z].decode("utf-8", "surrogateescape"), z + 1


def _bind_fast(buf, s: int, e: int) -> tuple[str, str, list[str | None], tuple[int, ...]]:
    """(portal, statement, parameters rendered for the audit, result formats) of a Bind, without copies.

    The hot path of every extended-protocol execution; Bind.decode is the reference
    (the fuzz tests hold both to the same inputs through the front's tests).
    """
    try:
        portal, pos = _cstring_at(buf, s + 5, e)
        statement, pos = _cstring_at(buf, pos, e)
        (nf,) = _H16.unpack_from(buf, pos)
        pos += 2
        formats = struct.unpack_from(f"!{nf}h", buf, pos) if nf > 0 else ()
        pos += 2 * nf
        (np_,) = _H16.unpack_from(buf, pos)
        pos += 2
        if nf > 1 and nf != np_:
            raise RemoteProtocolError("Bind has inconsistent parameter counts")
        for f in formats:
            if f != 0 and f != 1:
                raise RemoteProtocolError(f"unknown format code {f}")
        params: list[str | None] = []
        for i in range(np_):
            (ln,) = _I32.unpack_from(buf, pos)
            pos += 4
            if ln == -1:
                params.append(None)
                continue
            if ln < 0 or pos + ln > e:
                raise RemoteProtocolError("Bind parameter runs past its message")
            fmt = formats[i] if nf > 1 else (formats[0] if nf else 0)
            raw = buf[pos:pos + ln]
            params.append(raw.decode("utf-8", "replace") if fmt == 0 else "\\x" + raw.hex())
            pos += ln
        (nr,) = _H16.unpack_from(buf, pos)
        pos += 2
        result_formats = struct.unpack_from(f"!{nr}h", buf, pos) if nr else ()
        for f in result_formats:
            if f != 0 and f != 1:
                raise RemoteProtocolError(f"unknown format code {f}")
        pos += 2 * nr
        if pos != e:
            raise RemoteProtocolError("Bind body length does not match its fields")
        return portal, statement, params, result_formats
    except struct.error as err:
        raise RemoteProtocolError(f"Bind message is truncated: {err}") from err


def _render_params(bind: m.Bind | m.FunctionCall) -> list[str | None]:
    params = bind.params if isinstance(bind, m.Bind) else bind.args
    formats = bind.param_formats if isinstance(bind, m.Bind) else bind.arg_formats
    out: list[str | None] = []
    for i, v in enumerate(params):
        if v is None:
            out.append(None)
        elif (formats[i] if len(formats) > 1 else formats[0] if formats else 0) == 0:
            out.append(v.decode("utf-8", "replace"))
        else:
            out.append("\\x" + v.hex())
    return out


def _syntax_error(message: str, position: int | None, *, why: str = "") -> m.ErrorResponse:
    """The server's own answer to a statement it cannot parse (42601, with the Position psql
    turns into LINE/caret), with botwarden's part in DETAIL."""
    fields = [("S", "ERROR"), ("V", "ERROR"), ("C", sqlstate.SYNTAX_ERROR), ("M", message),
              ("D", "botwarden did not send this statement to the server: it cannot be parsed"
                    + (f" ({why})" if why and message not in why else ""))]
    if position:
        fields.append(("P", str(position)))
    return m.ErrorResponse(tuple(fields))


def _shift_position(error: bytes, by: int) -> bytes:
    """An ErrorResponse about ``EXPLAIN ... <statement>``, its Position (P) made relative to the
    statement the bot sent, so psql's caret points where it would have."""
    fields, pos, out = error[5:], 0, bytearray()
    while pos < len(fields) and fields[pos] != 0:
        end = fields.index(0, pos + 1)
        code, value = fields[pos:pos + 1], fields[pos + 1:end]
        if code == b"P" and value.isdigit() and int(value) > by:
            value = str(int(value) - by).encode()
        out += code + value + b"\0"
        pos = end + 1
    out += b"\0"
    return error[:1] + struct.pack("!I", len(out) + 4) + bytes(out)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _swallow(buf, s, e) -> bytes:
    return b""
