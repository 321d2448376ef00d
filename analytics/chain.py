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
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from collections.abc import Iterable
from typing import Any

GENESIS = bytes(32)

_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _no_default(o: Any) -> Any:
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if c_make_encoder is not None:
    # The C encoder built once: JSONEncoder.encode() builds a new one per call, which
    # is a third of the cost at ingest rates. Same output as _encoder.encode.
    _c_encode = c_make_encoder(None, _no_default, encode_basestring_ascii, None, ":", ",", True, False, True)

    def dumps_canonical(obj: Any) -> str:
        return "".join(_c_encode(obj, 0))
else:  # pragma: no cover - CPython always has the C encoder
    dumps_canonical = _encoder.encode


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
