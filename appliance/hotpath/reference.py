"""The reference implementation of the hot paths, in plain Python.

Each function here has a compiled twin in ``_compiled.pyx`` that must give the same bytes for
every input (tests/test_hotpath.py holds them together with Hypothesis). This module is what runs
where the extension is not built, and what ``BOTWARDEN_PURE_PYTHON=1`` forces.
"""

from __future__ import annotations

import struct

from appliance.protocols.postgres.errors import RemoteProtocolError

_I32 = struct.Struct("!i")
_H16 = struct.Struct("!H")  # counts are unsigned 16-bit, as PostgreSQL reads them
_HEADER = struct.Struct("!ci")
_NULL = b"\xff\xff\xff\xff"
_unpack_len = _I32.unpack_from


def skip_unhandled(handlers, buf, pos: int, max_size: int) -> int:
    """From ``pos``, step over every complete message whose type has no handler (``handlers[t] is
    None``) and whose length is valid; the offset of the first message that is incomplete, has a
    handler or announces a bad length (the caller's loop deals with it), or ``len(buf)``.

    This is what lets a result nobody inspects row by row pass with no Python per message."""
    n = len(buf)
    while n - pos >= 5:
        (length,) = _unpack_len(buf, pos + 1)
        if length < 4 or length > max_size:
            return pos
        e = pos + 1 + length
        if e > n or handlers[buf[pos]] is not None:
            return pos
        pos = e
    return pos


def skip_rows(buf, pos: int, budget: int, kind: int = 0x44) -> tuple[int, int]:
    """From ``pos``, step over consecutive complete messages of type ``kind`` (DataRow ``D``, or a
    COPY's CopyData ``d``; valid length) while their total size stays within ``budget`` bytes
    (negative: no limit). (offset of the first message not stepped over, or ``len(buf)``; how
    many were stepped over.)

    How a session's recording keeps a result's first rows and counts the rest without a Python
    step per row (appliance/fronts/postgres/recording.py)."""
    n = len(buf)
    start = pos
    rows = 0
    while n - pos >= 5 and buf[pos] == kind:
        (length,) = _unpack_len(buf, pos + 1)
        if length < 4:
            break
        e = pos + 1 + length
        if e > n or (budget >= 0 and e - start > budget):
            break
        pos = e
        rows += 1
    return pos, rows


_I16 = struct.Struct("!h")


def skip_recorded(stops, buf, pos: int, shortest: int) -> int:
    """:func:`skip_unhandled` for a recorded chunk of what a bot sent (appliance/recordings/pgstream.py),
    with no size limit: it also steps over a Bind whose parameters are all in text format and each
    NULL or shorter than ``shortest`` bytes (values no detector can flag when the caller found none
    of the text some detectors need in the chunk); ``shortest`` 0 steps over no Bind. It stops at any
    other message with a stop, and at a Bind it cannot read, for the caller's long way."""
    n = len(buf)
    while n - pos >= 5:
        (length,) = _unpack_len(buf, pos + 1)
        if length < 4:
            return pos
        e = pos + 1 + length
        if e > n:
            return pos
        if stops[buf[pos]] is not None and not (buf[pos] == 0x42 and shortest > 0
                                                 and _short_text_bind(buf, pos + 5, e, shortest)):
            return pos
        pos = e
    return pos


def _short_text_bind(buf, p: int, e: int, shortest: int) -> bool:
    """The Bind body at buf[p:e]: every format text (0) and every value NULL or < ``shortest`` bytes."""
    for _ in range(2):  # the portal's and the statement's names
        p = buf.find(b"\x00", p, e)
        if p < 0:
            return False
        p += 1
    if e - p < 2:
        return False
    (nf,) = _I16.unpack_from(buf, p)
    p += 2
    if nf < 0 or e - p < 2 * nf:
        return False
    if any(buf[p:p + 2 * nf]):
        return False   # a binary parameter
    p += 2 * nf
    if e - p < 2:
        return False
    (nv,) = _I16.unpack_from(buf, p)
    p += 2
    if nv < 0:
        return False
    for _ in range(nv):
        if e - p < 4:
            return False
        (ln,) = _unpack_len(buf, p)
        if ln >= shortest or ln < -1:
            return False
        p += 4
        if ln > 0:
            if e - p < ln:
                return False
            p += ln
    return True


def row_values(buf, start: int, end: int) -> list[bytes | None]:
    """Values of a DataRow at buf[start:end] (start = its type byte), as bytes."""
    if type(buf) is not bytes:
        buf = bytes(buf[start:end])  # one copy of the row, so values are immutable bytes
        end -= start
        start = 0
    try:
        (n,) = _H16.unpack_from(buf, start + 5)
        pos = start + 7
        out: list[bytes | None] = []
        append = out.append
        unpack = _I32.unpack_from
        for _ in range(n):
            (ln,) = unpack(buf, pos)
            pos += 4
            if ln < 0:
                append(None)
            else:
                if pos + ln > end:
                    raise RemoteProtocolError("DataRow values do not match its length")
                append(buf[pos:pos + ln])
                pos += ln
    except struct.error as err:
        raise RemoteProtocolError(f"malformed DataRow: {err}") from err
    if pos != end:
        raise RemoteProtocolError("DataRow values do not match its length")
    return out


def encode_row(values) -> bytes:
    """A DataRow message of ``values`` (bytes or None each)."""
    parts = [b"", _H16.pack(len(values))]
    append = parts.append
    pack = _I32.pack
    size = 6
    for v in values:
        if v is None:
            append(_NULL)
            size += 4
        else:
            append(pack(len(v)))
            append(v)
            size += 4 + len(v)
    parts[0] = _HEADER.pack(b"D", size)
    return b"".join(parts)


STARS = "********"
_ASCII_ALNUM_TO_STAR = str.maketrans({c: "*" for c in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"})


def _stars_for_alnum(text: str) -> str:
    if text.isascii():
        return text.translate(_ASCII_ALNUM_TO_STAR)
    return "".join("*" if ch.isalnum() else ch for ch in text)


def partial(value: str, keep: int) -> str:
    """Letters and digits become ``*`` except the last ``keep``; separators stay. A value with no
    more than ``keep`` of them is masked whole (keeping all of it would keep everything)."""
    # Find where the last ``keep`` letters/digits begin, walking back over the short tail only.
    i, seen = len(value), 0
    while i > 0 and seen < keep:
        i -= 1
        if value[i].isalnum():
            seen += 1
    head = _stars_for_alnum(value[:i])
    if seen < keep or head == value[:i]:  # no more than ``keep`` of them in all: mask it whole
        return _stars_for_alnum(value) if seen else STARS
    return head + value[i:]


def partial_utf8(raw: bytes, keep: int) -> bytes | None:
    """:func:`partial` of a UTF-8 value, as UTF-8; None (the value withheld) if it is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return partial(text, keep).encode("utf-8")


def mask_rows(buf, pos: int, n: int, steps, counts: list) -> tuple[int, bytes | None]:
    """The run of complete DataRows in buf[pos:n], each masked by ``steps`` ((column index, keep)
    each: :func:`partial_utf8` of that column's value, as the policy's RowMasker does); ``counts[k]``
    grows by the values step k changed. (end of the run, the rows as they go to the bot) — None
    if no value changed. The caller's loop resumes at the end (a message of another type, an
    incomplete one, a bad length)."""
    parts = []
    changed_any = False
    while n - pos >= 5 and buf[pos] == 68:  # 'D'
        (length,) = _unpack_len(buf, pos + 1)
        e = pos + 1 + length
        if length < 4 or e > n:
            break
        values = row_values(buf, pos, e)
        changed = False
        for k, (i, keep) in enumerate(steps):
            if i < len(values) and values[i] is not None:
                new = partial_utf8(values[i], keep)
                if new != values[i]:
                    values[i] = new
                    counts[k] += 1
                    changed = True
        parts.append(encode_row(values) if changed else bytes(buf[pos:e]))
        changed_any = changed_any or changed
        pos = e
    return pos, (b"".join(parts) if changed_any else None)
