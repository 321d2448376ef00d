"""Appending chained rows to the DuckDB file (used only by the one writer).

A batch becomes one transaction: rows get consecutive ``chain_seq`` values and
hashes linked to the previous row, are grouped per table and inserted from Arrow
record batches (or with executemany, kept for the benchmark's comparison). The committed
chain head only advances after the commit succeeds.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import pyarrow as pa

from . import schema
from .chain import GENESIS
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


def _arrow_batch(kind: Kind, rows: list[tuple]) -> pa.RecordBatch:
    """``rows`` (chain columns + the kind's fields) as one Arrow record batch, without the columns
    that are NULL in every row: the INSERT names only the batch's columns and the others get NULL
    (no column has another default). A record batch, not a table: DuckDB scans a registered table
    through a pyarrow dataset, which costs about a millisecond more per INSERT; each column left
    out saves its share of the insert too."""
    cols = list(zip(*rows))
    n = len(rows)
    arrays = [pa.array(cols[0], pa.int64()), pa.array(cols[1], pa.binary()), pa.array(cols[2], pa.binary())]
    names = list(schema.CHAIN_COLUMNS)
    for c, f in zip(cols[3:], kind.fields):
        if c.count(None) != n:
            arrays.append(pa.array(c, _ARROW_TYPES[f.type]))
            names.append(f.name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


@dataclass(frozen=True)
class PreparedBatch:
    """Rows with their chain columns, ready to insert; immutable so a failed commit
    can be retried as is."""

    first_seq: int
    last_seq: int
    head: bytes                                  # chain_hash of the last row
    parts: tuple[tuple[Kind, Any], ...]          # (kind, Arrow record batch | list of row tuples)
    events: int


class ChainWriter:
    """The chain head of one open read-write connection.

    ``prepare`` (pure Python: hashes, Arrow conversion) and ``commit`` (DuckDB, which
    releases the GIL) are separate so the store can hash the next batch while the
    previous one commits. ``seq``/``head`` are the committed head; prepare advances a
    provisional head, which ``reset`` brings back after a batch is abandoned.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, *, ingest: IngestMethod = "arrow"):
        self.con = con
        self.ingest = ingest
        self.seq, self.head = self._load_head()
        self._next_seq, self._next_head = self.seq, self.head

    def _load_head(self) -> tuple[int, bytes]:
        parts = [f"SELECT chain_seq, chain_hash FROM {t}" for t in schema.CHAINED_TABLES]
        row = self.con.execute(
            f"SELECT chain_seq, chain_hash FROM ({' UNION ALL '.join(parts)}) ORDER BY chain_seq DESC LIMIT 1"
        ).fetchone()
        return (0, GENESIS) if row is None else (int(row[0]), bytes(row[1]))

    def reset(self) -> None:
        self._next_seq, self._next_head = self.seq, self.head

    def prepare(self, items: Sequence[tuple[Kind, tuple[Any, ...]]]) -> PreparedBatch:
        """Assign ``chain_seq`` and hashes to ``items`` (kind, normalized row), in order."""
        groups: dict[str, list] = {}
        first = self._next_seq + 1
        seq, prev = self._next_seq, self._next_head
        for kind, row in items:
            seq += 1
            h = kind.hash_row(prev, row)
            g = groups.get(kind.table)
            if g is None:
                g = groups[kind.table] = []
            g.append((seq, prev, h) + row)
            prev = h
        parts = []
        for table, rows in groups.items():
            kind = schema.KIND_BY_TABLE[table]
            parts.append((kind, _arrow_batch(kind, rows) if self.ingest == "arrow" else rows))
        self._next_seq, self._next_head = seq, prev
        return PreparedBatch(first, seq, prev, tuple(parts), len(items))

    def commit(self, batch: PreparedBatch,
               before: Callable[[duckdb.DuckDBPyConnection], None] | None = None) -> None:
        """Insert a prepared batch in one transaction (``before(con)`` runs first in
        the same transaction: retention's deletes). It must follow the committed head."""
        if batch.first_seq != self.seq + 1:
            raise AssertionError(f"batch starts at seq {batch.first_seq}, head is {self.seq}")
        con = self.con
        con.begin()
        try:
            if before is not None:
                before(con)
            for kind, data in batch.parts:
                if self.ingest == "arrow":
                    self._insert_arrow(kind, data)
                else:
                    self._insert_executemany(kind, data)
            con.commit()
        except BaseException:
            con.rollback()
            raise
        self.seq, self.head = batch.last_seq, batch.head

    def write(self, items: Sequence[tuple[Kind, tuple[Any, ...]]],
              before: Callable[[duckdb.DuckDBPyConnection], None] | None = None) -> None:
        """prepare + commit, for callers that own the chain alone (start, stop, tasks)."""
        batch = self.prepare(items)
        try:
            self.commit(batch, before)
        except BaseException:
            self.reset()
            raise

    def _insert_arrow(self, kind: Kind, batch: pa.RecordBatch) -> None:
        name = f"_batch_{kind.table}"
        self.con.register(name, batch)
        try:
            self.con.execute(self._insert_sql(kind, f"SELECT * FROM {name}", batch.schema.names))
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

    def _insert_sql(self, kind: Kind, source: str, columns: Sequence[str] | None = None) -> str:
        cols = ", ".join(columns if columns is not None else schema.CHAIN_COLUMNS + kind.names)
        return f"INSERT INTO {kind.table} ({cols}) {source}"


def writer_event(event: str, **fields: Any) -> tuple[Kind, tuple[Any, ...]]:
    """A normalized ``writer_events`` row (written by the store, not by producers)."""
    kind = schema.KINDS["writer_event"]
    record = {"ts": dt.datetime.now(dt.timezone.utc), "event": event, "pid": os.getpid(),
              "host": socket.gethostname(), **fields}
    row, unknown = schema.normalize(kind, record)
    if unknown:
        raise AssertionError(f"writer_event fields not in the schema: {unknown}")
    return kind, row


def next_epoch(con: duckdb.DuckDBPyConnection) -> int:
    v = con.execute("SELECT max(epoch) FROM writer_events WHERE event = 'writer_start'").fetchone()[0]
    return int(v or 0) + 1
