"""The integrity chain: how one row's hash is computed.

    chain_hash = sha256(chain_prev || table || "\\n" || canonical_json(row))

* ``chain_prev`` is the previous row's ``chain_hash`` (32 raw bytes) in global
  ``chain_seq`` order across every chained table; the first row uses 32 zero bytes
  (or, after retention, the hash of the last removed row, recorded by the
  retention checkpoint row).
* ``table`` is the table name in UTF-8.
* ``canonical_json`` is a JSON object of the row's columns except ``chain_seq``,
  ``chain_prev`` and ``chain_hash``, NULL columns omitted, keys sorted,
  separators ``,`` and ``:``, ASCII-escaped (``json.dumps(sort_keys=True,
  separators=(",", ":"))``). Values: TIMESTAMPTZ as integer microseconds since the
  Unix epoch; BLOB as lowercase hex; DOUBLE as a JSON number; MAP as an object;
  lists as arrays.

``chain_seq`` is not hashed: it is the row's position, and the links are what
prove the order. That lets ``verify`` tell a reordering (links intact, positions
swapped) from an edit.
"""

from __future__ import annotations

import hashlib
import json
from binascii import hexlify
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .compiled import load as load_compiled

GENESIS = bytes(32)

# The writer's row hash is compiled when analytics/_chain.pyx is built (setup.py); the Python
# below is its reference (tests/test_chain_compiled.py: the same bytes) and what verify uses.
# BOTWARDEN_PURE_PYTHON=1 runs the reference (analytics.compiled).
_compiled = load_compiled("_chain")
COMPILED: bool = _compiled is not None

# Column types (analytics.schema.SQL_TYPES) as the compiled hasher's codes.
TYPE_CODES = {"str": 0, "int": 1, "ts": 1, "float": 2, "bool": 3, "bytes": 4, "str_list": 5, "count_map": 6}

_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _no_default(o: Any) -> Any:
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if c_make_encoder is not None:
    # The C encoder built once: JSONEncoder.encode() builds a new one per call, which
    # is a third of the cost at ingest rates. Same output as _encoder.encode.
    _c_encode = c_make_encoder(None, _no_default, encode_basestring_ascii, None, ":", ",", True, False, True)

    _c_encode_unsorted = c_make_encoder(None, _no_default, encode_basestring_ascii, None, ":", ",", False,
                                        False, True)

    def dumps_canonical(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))

    def _dumps_presorted(obj: Any) -> str:
        return "".join(_c_encode_unsorted(obj, 0))
else:  # pragma: no cover - CPython always has the C encoder
    dumps_canonical = _dumps_presorted = _encoder.encode


def canonical(names: Iterable[str], values: Iterable[Any], bytes_columns: frozenset[str] = frozenset()) -> str:
    doc = {}
    for n, v in zip(names, values):
        if v is None:
            continue
        if n in bytes_columns:
            v = v.hex()
        doc[n] = v
    return dumps_canonical(doc)


def row_hash(prev: bytes, table: str, canonical_json: str) -> bytes:
    return hashlib.sha256(prev + table.encode() + b"\n" + canonical_json.encode()).digest()


def compile_row_encoder(names: Sequence[str], bytes_columns: Sequence[str] = ()) -> Callable[[Sequence[Any]], str]:
    """A fast ``canonical(names, row, bytes_columns)`` for the writer's hot loop.

    It builds the object with its keys already in sorted order, so the encoder
    need not sort (nested maps arrive sorted from schema.normalize); the output
    is byte-for-byte what :func:`canonical` gives, which verify uses.
    """
    order = sorted(range(len(names)), key=lambda i: names[i])
    lines = ["def encode(row):", "    d = {}"]
    for i in order:
        value = f"row[{i}].hex()" if names[i] in bytes_columns else f"row[{i}]"
        lines.append(f"    if row[{i}] is not None: d[{names[i]!r}] = {value}")
    lines.append("    return _dumps(d)")
    ns: dict[str, Any] = {"_dumps": _dumps_presorted}
    exec("\n".join(lines), ns)  # noqa: S102 - built from the static schema only
    return ns["encode"]


def row_plan(names: Sequence[str], types: Sequence[str]) -> tuple[tuple[int, bytes, int], ...]:
    """What the compiled hasher walks: (column index, its JSON key and colon, type code), in
    sorted key order (the canonical order)."""
    return tuple((i, (dumps_canonical(names[i]) + ":").encode("ascii"), TYPE_CODES[types[i]])
                 for i in sorted(range(len(names)), key=lambda i: names[i]))


def compile_row_hasher(names: Sequence[str], bytes_columns: Sequence[str], prefix: bytes,
                       types: Sequence[str] | None = None) -> Callable[[bytes, Sequence[Any]], bytes]:
    """The writer's ``hash_row(prev, row)``: compiled (given the columns' ``types``, when
    analytics/_chain.pyx is built), else :func:`reference_row_hasher`, which the compiled one
    hands any row with a value of an unexpected type."""
    reference = reference_row_hasher(names, bytes_columns, prefix)
    if not (COMPILED and types is not None):
        return reference
    return _compiled.RowHasher(row_plan(names, types), prefix, reference).hash


def reference_row_hasher(names: Sequence[str], bytes_columns: Sequence[str],
                         prefix: bytes) -> Callable[[bytes, Sequence[Any]], bytes]:
    """``row_hash(prev, table, canonical(names, row, bytes_columns))`` (``prefix``: the table and its
    newline) for the writer's hot loop, without the canonical JSON of the BLOB columns.

    A recording chunk is most of a row's bytes: as hex inside the JSON it was converted, escaped,
    joined and encoded again only to be hashed. Here the row is encoded with each BLOB as ``""``
    and the hash is fed the JSON up to that value, the BLOB's hex (one C pass), then the rest:
    the same bytes, so the same hash. Outside a string, ``"name":""`` can only be that column's
    key and value (a quote inside a string is escaped); a row where it is found twice (a map key
    of that name) takes the plain way."""
    plain = compile_row_encoder(names, bytes_columns)
    if not bytes_columns:
        def hash_plain(prev: bytes, row: Sequence[Any]) -> bytes:
            return hashlib.sha256(prev + prefix + plain(row).encode()).digest()
        return hash_plain
    blobs = sorted((names[i], i) for i in range(len(names)) if names[i] in bytes_columns)  # key order
    markers = [(i, f'"{name}":""') for name, i in blobs]
    encode = compile_row_encoder(names)   # the BLOBs given as ""
    sha256 = hashlib.sha256

    def hash_row(prev: bytes, row: Sequence[Any]) -> bytes:
        present = [(i, marker) for i, marker in markers if row[i] is not None]
        if not present:
            return sha256(prev + prefix + encode(row).encode()).digest()
        r = list(row)
        for i, _ in present:
            r[i] = ""
        doc = encode(r)
        h = sha256(prev + prefix)
        pos = 0
        for i, marker in present:
            at = doc.find(marker, pos)
            if at < 0 or doc.find(marker, at + 1) >= 0:
                return sha256(prev + prefix + plain(row).encode()).digest()
            cut = at + len(marker) - 1   # the BLOB's closing quote
            h.update(doc[pos:cut].encode())
            h.update(hexlify(row[i]))
            pos = cut
        h.update(doc[pos:].encode())
        return h.digest()
    return hash_row
