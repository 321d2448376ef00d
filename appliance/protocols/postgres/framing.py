"""The hot path: find typed message boundaries in a buffer without copying or decoding.

The proxy forwards most messages unchanged; it only needs to know where each
one starts and ends and which type it is. ``split_messages`` returns spans
(type byte value, start, end) over the caller's buffer, computed with
``struct.unpack_from`` so no body is ever sliced.
"""

from __future__ import annotations

import struct

from .errors import MessageTooLarge, RemoteProtocolError

_LEN = struct.Struct("!i")
unpack_len = _LEN.unpack_from

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024


def check_length(type_byte: int, length: int, max_size: int) -> None:
    """Validate an announced message length (which counts itself, not the type byte)."""
    if length < 4:
        raise RemoteProtocolError(f"message {chr(type_byte)!r} announces an invalid length {length}")
    if length > max_size:
        raise MessageTooLarge(
            f"message {chr(type_byte)!r} of {length} bytes exceeds the maximum of {max_size} bytes")


def split_messages(buf, pos: int = 0, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
                   ) -> tuple[list[tuple[int, int, int]], int]:
    """Spans of the complete messages in ``buf[pos:]`` and the offset where the first incomplete one starts.

    Each span is (type byte as int, start of the message, end of the message);
    the body is ``buf[start + 5:end]``. Raises RemoteProtocolError or
    MessageTooLarge on a bad header.
    """
    spans = []
    n = len(buf)
    while n - pos >= 5:
        (length,) = unpack_len(buf, pos + 1)
        if length < 4 or length > max_size:
            check_length(buf[pos], length, max_size)
        end = pos + 1 + length
        if end > n:
            break
        spans.append((buf[pos], pos, end))
        pos = end
    return spans, pos
