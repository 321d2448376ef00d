"""Appending chained rows to the DuckDB file (used only by the one writer).

A batch becomes one transaction: rows get consecutive ``chain_seq`` values and
hashes linked to the previous row, are grouped per table and inserted from Arrow
tables (or with executemany, kept for the benchmark's comparison). The in-memory
chain head only advances after the commit succeeds.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, Literal

import duckdb
import pyarrow as pa

from . import schema
from .chain import GENESIS, dumps_canonical as _dumps
from .schema import Kind

IngestMethod = Literal["arrow", "executemany"]

_ARROW_TYPES = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "ts": pa.timestamp("us", tz="UTC"),
    "bytes": pa.binary(),
    "str_list": pa.list_(pa.string()),
    "count_map": pa.map_(pa.string(), pa.int64()),
}

_sha256 = hashlib.sha256


class ChainWriter:
    """Owns the chain head of one open read-write connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection, *, ingest: IngestMethod = "arrow"):
        self.con = con
        self.ingest = ingest
        self.seq, self.head = self._load_head()

    def _load_head(self) -> tuple[int, bytes]:
        parts = [f"SELECT chain_seq, chain_hash FROM {t}" for t in schema.CHAINED_TABLES]
        row = self.con.execute(
            f"SELECT chain_seq, chain_hash FROM ({' UNION ALL '.join(parts)}) ORDER BY chain_seq DESC LIMIT 1"
        ).fetchone()
        return (0, GENESIS) if row is None else (int(row[0]), bytes(row[1]))

    def write(self, items: Sequence[tuple[Kind, tuple[Any, ...]]],
              before: Callable[[duckdb.DuckDBPyConnection], None] | None = None) -> None:
        """Append ``items`` (kind, normalized row) in order, in one transaction
        (``before(con)`` runs first in the same transaction: retention's deletes)."""
        groups: dict[str, list] = {}
        seq, prev = self.seq, self.head
        for kind, row in items:
            seq += 1
            doc = {n: v for n, v in zip(kind.names, row) if v is not None}
            if kind.bytes_columns:
                for n in kind.bytes_columns:
                    if n in doc:
                        doc[n] = doc[n].hex()
            h = _sha256(prev + kind.hash_prefix + _dumps(doc).encode()).digest()
            g = groups.get(kind.table)
            if g is None:
                g = groups[kind.table] = []
            g.append((seq, prev, h) + row)
            prev = h
        con = self.con
        con.begin()
        try:
            if before is not None:
                before(con)
            for table, rows in groups.items():
                kind = schema.KIND_BY_TABLE[table]
                if self.ingest == "arrow":
                    self._insert_arrow(kind, rows)
                else:
                    self._insert_executemany(kind, rows)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self.seq, self.head = seq, prev

    def _insert_arrow(self, kind: Kind, rows: list[tuple]) -> None:
        cols = list(zip(*rows))
        arrays = [pa.array(cols[0], pa.int64()), pa.array(cols[1], pa.binary()), pa.array(cols[2], pa.binary())]
        n = len(rows)
        arrays += [pa.nulls(n, _ARROW_TYPES[f.type]) if c.count(None) == n else pa.array(c, _ARROW_TYPES[f.type])
                   for c, f in zip(cols[3:], kind.fields)]
        batch = pa.Table.from_arrays(arrays, names=list(schema.CHAIN_COLUMNS) + list(kind.names))
        name = f"_batch_{kind.table}"
        self.con.register(name, batch)
        try:
            self.con.execute(self._insert_sql(kind, f"SELECT * FROM {name}"))
        finally:
            self.con.unregister(name)

    def _insert_executemany(self, kind: Kind, rows: list[tuple]) -> None:
        placeholders = ["?", "?", "?"]
        for f in kind.fields:
            if f.type == "ts":
                placeholders.append("make_timestamp(?::BIGINT)")
            elif f.type == "count_map":
                placeholders.append("?::MAP(VARCHAR, BIGINT)")
            else:
                placeholders.append("?")
        map_idx = [i + 3 for i, f in enumerate(kind.fields) if f.type == "count_map"]
        if map_idx:
            fixed = []
            for r in rows:
                r = list(r)
                for i in map_idx:
                    if r[i] is not None:
                        r[i] = {"key": list(r[i]), "value": list(r[i].values())}
                fixed.append(r)
            rows = fixed
        self.con.executemany(self._insert_sql(kind, f"VALUES ({', '.join(placeholders)})"), rows)

    def _insert_sql(self, kind: Kind, source: str) -> str:
        cols = ", ".join(schema.CHAIN_COLUMNS + kind.names)
        return f"INSERT INTO {kind.table} ({cols}) {source}"


def writer_event(event: str, **fields: Any) -> tuple[Kind, tuple[Any, ...]]:
    """A normalized ``writer_events`` row (written by the store, not by producers)."""
    import datetime as dt

    kind = schema.KINDS["writer_event"]
    record = {"ts": dt.datetime.now(dt.timezone.utc), "event": event, "pid": os.getpid(),
              "host": socket.gethostname(), **fields}
    row, unknown = schema.normalize(kind, record)
    assert not unknown, unknown
    return kind, row


def next_epoch(con: duckdb.DuckDBPyConnection) -> int:
    v = con.execute("SELECT max(epoch) FROM writer_events WHERE event = 'writer_start'").fetchone()[0]
    return int(v or 0) + 1
