"""PostgreSQL recordings (pure): framing, redaction of recorded chunks, and the parse back.

The front records whole messages: "in" chunks are what the bot sent (cut at message boundaries),
"out" chunks what it received (after masking). The audit process runs :func:`redact_chunk` on
each before it is stored, with the redactor it uses for request rows, so a recording keeps no
more than a ``requests`` row: statement constants a detector flags become ``'********'``, Bind
and FunctionCall values are kept only when no detector flags them (binary ones never), CopyData
from the bot and the text of errors and notices go through the detectors. A message cut short
(the size cap) is dropped whole.

:func:`exchanges` turns a session's rows back into what the bot asked and what it got: one
:class:`Exchange` per simple Query or per extended batch (up to Sync), answered in order by the
server's messages up to each ReadyForQuery.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator

from appliance.hotpath import skip_recorded, skip_unhandled
from appliance.policy.masking import DETECTOR_FUNCTIONS, MIN_LENGTH, REQUIRED_TEXT
from appliance.policy.redact import MASK, AuditRedactor, redact_value
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres.errors import PgProtocolError

_LEN = struct.Struct("!i")
_MASK_BYTES = MASK.encode()
# Frontend messages whose payload can carry a secret; every other type is kept as sent.
_FRONT_REDACTED = frozenset(b"QPBdFp")
_BACK_REDACTED = frozenset(b"ENA")
# The same sets as skip_unhandled's tables (None: step over): the messages that cannot carry a
# secret — Execute, Sync, Describe..., and from the server DataRows (already masked by the front:
# the bot saw them), RowDescription, CommandComplete, ReadyForQuery... — are stepped over in one
# compiled call per run (hotpath.skip_recorded), not one Python iteration each; so are Binds whose
# values no detector can flag (see redact_chunk).
_FRONT_STOPS = [True if t in _FRONT_REDACTED else None for t in range(256)]
_BACK_STOPS = [True if t in _BACK_REDACTED else None for t in range(256)]


def frames(data: bytes | bytearray | memoryview, start: int = 0) -> Iterator[tuple[int, int, int]]:
    """(type byte, start, end) of each complete message in ``data``; stops at an incomplete one
    or at an impossible length."""
    n = len(data)
    pos = start
    while n - pos >= 5:
        (length,) = _LEN.unpack_from(data, pos + 1)
        if length < 4:
            return
        end = pos + 1 + length
        if end > n:
            return
        yield data[pos], pos, end
        pos = end


_NO_STOPS: list[None] = [None] * 256
_ANY_LENGTH = 2**31 - 1


def complete_prefix(data: bytes | bytearray, start: int = 0) -> int:
    """Where the last complete message in ``data`` ends (from ``start``, a message boundary); the
    walk of :func:`frames` in one compiled call (the recorder takes a chunk with it)."""
    return skip_unhandled(_NO_STOPS, data, start, _ANY_LENGTH)


# A value no detector can flag: shorter than any detector's minimum and without the text the
# others need (the reasoning of appliance/policy/redact.py's fast path, for Bind values).
_FAST_VALUES = set(DETECTOR_FUNCTIONS) <= set(MIN_LENGTH) | set(REQUIRED_TEXT)
_SHORTEST = min(MIN_LENGTH.values())
_REQUIRED = tuple(t.encode() for t in REQUIRED_TEXT.values())


def _cannot_flag(v: bytes) -> bool:
    if not _FAST_VALUES or len(v) >= _SHORTEST:
        return False
    for t in _REQUIRED:
        if t in v:
            return False
    return True


def _redact_values(values: Iterable[bytes | None], formats: tuple[int, ...],
                   redactor: AuditRedactor) -> tuple[bytes | None, ...]:
    out = []
    for i, v in enumerate(values):
        fmt = formats[i] if len(formats) > 1 else (formats[0] if formats else 0)
        if v is None:
            out.append(None)
        elif fmt != 0:
            out.append(_MASK_BYTES)  # binary: nothing a detector can read, so nothing is kept
        elif _cannot_flag(v):
            out.append(v)
        else:
            text = v.decode("utf-8", "replace")
            out.append(redact_value(text, redactor.settings).encode())
    return tuple(out)


_H = struct.Struct("!h")


def _bind_values_harmless(body: bytes) -> bool:
    """True when a Bind holds only values no detector can flag, read without decoding the
    message (the common case: short keys and numbers); False sends it the long way."""
    for t in _REQUIRED:   # one scan of the body for the text some detector needs
        if t in body:
            return False
    try:
        pos = body.index(b"\x00") + 1
        pos = body.index(b"\x00", pos) + 1
        (nf,) = _H.unpack_from(body, pos)
        if nf > 1:
            if any(struct.unpack_from(f"!{nf}h", body, pos + 2)):
                return False   # a binary value: never kept, the long way masks it
        elif nf == 1 and body[pos + 2:pos + 4] != b"\x00\x00":
            return False
        pos += 2 + 2 * nf
        (n,) = _H.unpack_from(body, pos)
        pos += 2
        shortest = _SHORTEST
        unpack = _LEN.unpack_from
        for _ in range(n):
            (length,) = unpack(body, pos)
            if length >= shortest:
                return False
            pos += 4 + (length if length > 0 else 0)
        return True
    except (ValueError, struct.error):
        return False


def _redact_front(t: int, body: bytes, redactor: AuditRedactor, text: Callable[[str], str]) -> bytes | None:
    """The message redacted, or None when it is kept as it is."""
    if t == 0x51:  # Q: one string (read without the codec's reader: one per statement of a session)
        if body.find(b"\x00") == len(body) - 1:
            sql = body[:-1].decode("utf-8", "surrogateescape")   # as Query.decode reads it
        else:
            sql = m.Query.decode(body).sql   # raises: not one string
        red = text(sql)
        return None if red == sql else m.Query(red).encode()
    if t == 0x50:  # P
        p = m.Parse.decode(body)
        red = text(p.query)
        return None if red == p.query else m.Parse(p.name, red, p.param_types).encode()
    if t == 0x42:  # B
        if _FAST_VALUES and _bind_values_harmless(body):
            return None
        b = m.Bind.decode(body)
        params = _redact_values(b.params, b.param_formats, redactor)
        if params == b.params:
            return None
        return m.Bind(b.portal, b.statement, b.param_formats, params, b.result_formats).encode()
    if t == 0x46:  # F
        f = m.FunctionCall.decode(body)
        args = _redact_values(f.args, f.arg_formats, redactor)
        return None if args == f.args else m.FunctionCall(f.oid, f.arg_formats, args, f.result_format).encode()
    if t == 0x64:  # d: COPY FROM STDIN data
        return m.CopyData(redact_value(body.decode("utf-8", "replace"), redactor.settings).encode()).encode()
    return m.PasswordMessage(_MASK_BYTES + b"\x00").encode()  # p: never kept


def _redact_back(t: int, body: bytes, redactor: AuditRedactor, text: Callable[[str], str]) -> bytes | None:
    if t == 0x41:  # A: NOTIFY payload
        n = m.NotificationResponse.decode(body)
        return m.NotificationResponse(n.pid, n.channel, redact_value(n.payload, redactor.settings)).encode()
    cls = m.ErrorResponse if t == 0x45 else m.NoticeResponse
    fields = cls.decode(body).fields
    return cls(tuple((c, v if c in "VSC" else redact_value(v, redactor.settings)) for c, v in fields)).encode()


def redact_chunk(data: bytes, direction: str, redactor: AuditRedactor,
                 text: Callable[[str], str] | None = None) -> bytes:
    """A recorded chunk as the audit store may keep it (see the module docstring). A message the
    codec cannot decode is dropped with the rest of the chunk (fail closed). ``text``: how a
    statement's text is redacted (default ``redactor.text``; the audit process passes one that
    reuses what it just did for the statement's request row)."""
    if direction not in ("in", "out"):
        return data
    text = text or redactor.text
    if direction == "in":
        stops, redact = _FRONT_STOPS, _redact_front
        # A Bind whose values are all text and shorter than any detector's minimum is stepped over
        # in the compiled loop, when none of the text the other detectors need is in the chunk (one
        # scan of it per text): what _bind_values_harmless decides, without a Python step per Bind.
        shortest = _SHORTEST if _FAST_VALUES and not any(t in data for t in _REQUIRED) else 0
    else:
        stops, redact, shortest = _BACK_STOPS, _redact_back, 0
    out: list[bytes] = []
    run = 0
    pos = 0
    n = len(data)
    unpack = _LEN.unpack_from
    # Framing inline (see frames()): the audit process runs this over every byte of a session.
    while n - pos >= 5:
        pos = skip_recorded(stops, data, pos, shortest)
        if n - pos < 5:
            break
        (length,) = unpack(data, pos + 1)
        e = pos + 1 + length
        if length < 4 or e > n:
            break
        if stops[data[pos]] is not None:
            try:
                new = redact(data[pos], data[pos + 5:e], redactor, text)
            except (PgProtocolError, ValueError, UnicodeError):
                out.append(data[run:pos])
                return b"".join(out)
            if new is not None:
                out.append(data[run:pos])
                out.append(new)
                run = e
        pos = e
    if not out:
        return data if pos == n else data[:pos]
    out.append(data[run:pos])
    return b"".join(out)


# ------------------------------------------------------------------ reading a session back

@dataclass
class Result:
    """One statement's answer inside an exchange: its columns (None for a command without rows),
    its rows as text (the bot's result format; binary values as hex), and its command tag."""

    columns: list[tuple[str, int]] | None = None
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    tag: str | None = None
    # Rows the bot received past [audit] recording_result_bytes: counted, not recorded.
    not_recorded: int = 0
    not_recorded_bytes: int = 0
    max_bytes: int | None = None


@dataclass
class Exchange:
    """What the bot sent up to one ReadyForQuery (a Query, or an extended batch up to Sync) and
    the server's answer, in order: ("result", Result) / ("error", ErrorResponse) /
    ("notice", NoticeResponse) / ("notification", NotificationResponse) / ("empty", None)."""

    kind: str                       # "query" | "extended" | "function" | "terminate"
    text: str = ""
    params: list[str | None] = field(default_factory=list)
    sent_at: datetime | None = None
    answered_at: datetime | None = None
    items: list[tuple[str, Any]] = field(default_factory=list)
    status: str | None = None       # the ReadyForQuery status after it (I, T, E), None: unanswered


@dataclass
class PgSession:
    startup: dict[str, Any] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    events: list[tuple[datetime, dict[str, Any]]] = field(default_factory=list)   # non-startup events
    before: list[tuple[str, Any]] = field(default_factory=list)   # server messages before any exchange


def _text_value(v: bytes | None, fmt: int) -> str | None:
    if v is None:
        return None
    if fmt != 0:
        return "\\x" + v.hex()
    return v.decode("utf-8", "replace")


ROWS_NOT_RECORDED = -1   # _messages' type for a "rows_not_recorded" event among the server's messages


def _messages(rows: Iterable[dict[str, Any]], direction: str) -> Iterator[tuple[datetime, int, bytes]]:
    """The messages of one direction in order; for "out", each ``rows_not_recorded`` event where
    it stands among them (type ROWS_NOT_RECORDED, its JSON as the body)."""
    for r in rows:
        if r["direction"] != direction:
            if direction == "out" and r["direction"] == "event" and b'"rows_not_recorded"' in bytes(r["data"]):
                yield r["ts"], ROWS_NOT_RECORDED, bytes(r["data"])
            continue
        data = bytes(r["data"] or b"")
        for t, s, e in frames(data):
            yield r["ts"], t, data[s + 5:e]


def exchanges(rows: list[dict[str, Any]]) -> PgSession:
    """A PostgreSQL session's recording rows (ordered by seq) as exchanges."""
    ses = PgSession()
    for r in rows:
        if r["direction"] == "event":
            doc = json.loads(bytes(r["data"]).decode())
            if doc.get("type") == "pg_startup" and not ses.startup:
                ses.startup = doc
            elif doc.get("type") == "rows_not_recorded":
                continue   # read in place among the server's messages (below)
            else:
                ses.events.append((r["ts"], doc))
    pending: list[Exchange] = []      # sent, not yet answered (in order)
    statements: dict[str, str] = {}   # prepared statement name -> text
    portals: dict[str, tuple[str, list[str | None], tuple[int, ...]]] = {}
    batch: Exchange | None = None
    for ts, t, body in _messages(rows, "in"):
        try:
            msg = m.decode_frontend(bytes([t]), body)
        except PgProtocolError:
            continue
        if isinstance(msg, m.Query):
            ex = Exchange("query", msg.sql, sent_at=ts)
            ses.exchanges.append(ex)
            pending.append(ex)
        elif isinstance(msg, m.FunctionCall):
            ex = Exchange("function", f"<function call oid {msg.oid}>", sent_at=ts)
            ses.exchanges.append(ex)
            pending.append(ex)
        elif isinstance(msg, (m.Parse, m.Bind, m.Describe, m.Execute, m.Close, m.Flush)):
            if batch is None:
                batch = Exchange("extended", sent_at=ts)
            if isinstance(msg, m.Parse):
                statements[msg.name] = msg.query
                batch.text = batch.text or msg.query
            elif isinstance(msg, m.Bind):
                fmts = msg.param_formats
                params = [_text_value(v, fmts[i] if len(fmts) > 1 else (fmts[0] if fmts else 0))
                          for i, v in enumerate(msg.params)]
                portals[msg.portal] = (statements.get(msg.statement, ""), params, msg.result_formats)
            elif isinstance(msg, m.Execute):
                text, params, _ = portals.get(msg.portal, ("", [], ()))
                if batch.text and batch.text != text and text:
                    batch.text += ";\n" + text
                else:
                    batch.text = text or batch.text
                batch.params.extend(params)
        elif isinstance(msg, m.Sync):
            if batch is None:
                batch = Exchange("extended", sent_at=ts)
            ses.exchanges.append(batch)
            pending.append(batch)
            batch = None
    # Result formats per column are per portal; replay shows binary values as hex.
    current: Result | None = None
    formats: tuple[int, ...] = ()
    for ts, t, body in _messages(rows, "out"):
        if t == ROWS_NOT_RECORDED:
            doc = json.loads(body.decode())
            if current is None:   # a COPY's rows: the command's result, without columns
                current = Result()
            current.not_recorded += int(doc.get("rows") or 0)
            current.not_recorded_bytes += int(doc.get("bytes") or 0)
            current.max_bytes = doc.get("max_bytes")
            continue
        try:
            msg = m.decode_backend(bytes([t]), body)
        except PgProtocolError:
            continue
        head = pending[0] if pending else None
        items = head.items if head is not None else ses.before
        if isinstance(msg, m.RowDescription):
            current = Result(columns=[(f.name, f.type_oid) for f in msg.fields])
            formats = tuple(f.format for f in msg.fields)
        elif isinstance(msg, m.DataRow):
            if current is None:
                current = Result(columns=[(f"?column{i}?", 25) for i in range(len(msg.values))])
            current.rows.append(tuple(_text_value(v, formats[i] if i < len(formats) else 0)
                                      for i, v in enumerate(msg.values)))
        elif isinstance(msg, m.CommandComplete):
            res = current or Result()
            res.tag = msg.tag
            items.append(("result", res))
            current = None
        elif isinstance(msg, m.PortalSuspended):
            if current is not None:
                items.append(("result", current))
                current = None
        elif isinstance(msg, m.EmptyQueryResponse):
            items.append(("empty", None))
        elif isinstance(msg, m.ErrorResponse):
            current = None
            items.append(("error", msg))
        elif isinstance(msg, m.NoticeResponse):
            items.append(("notice", msg))
        elif isinstance(msg, m.NotificationResponse):
            items.append(("notification", msg))
        elif isinstance(msg, m.ReadyForQuery):
            if head is not None:
                head.status = msg.status
                head.answered_at = ts
                pending.pop(0)
            current = None
    return ses
