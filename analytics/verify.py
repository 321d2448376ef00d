"""Checking the integrity chain and the writer epochs.

One streaming pass reads every chained table ordered by ``chain_seq`` (merged),
recomputes each row's hash from its content and its ``chain_prev``, and checks that
``chain_prev`` is the hash of the row before it. Where the chain breaks, the hash
it points to is looked up to tell the cases apart:

* modified  — the content no longer matches the row's hash; or the row was
  rewritten with a recomputed hash, so the next row's link points nowhere
  while no ``chain_seq`` is missing.
* deleted   — the next row links to a hash that exists nowhere and ``chain_seq``
  values are missing in between.
* inserted  — a row with a ``chain_seq`` another row already has, or a row whose
  hash and link both fit nowhere, or a row before the retention checkpoint's anchor.
* reordered — the row's link points to a row that exists, but elsewhere.

Limits (documented in docs/audit-schema.md): the chain is keyless, so someone able
to rewrite the file and recompute every later hash is only caught by comparing
the head (``head_seq``/``head_hash``) with a copy kept elsewhere; appended forged
rows at the very end likewise. Truncating the tail removes the epoch's
``writer_stop`` row and shows up as an epoch that did not end cleanly.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import duckdb

from . import db, schema
from .chain import GENESIS, canonical, row_hash

ProblemKind = Literal["modified", "deleted", "inserted", "reordered"]
_MAX_LOOKUPS = 1000
_FETCH = 10_000


class Problem(NamedTuple):
    table: str | None      # None when the missing row's table cannot be known (deleted)
    seq: int               # chain_seq of the row (for deleted: the first missing seq)
    kind: ProblemKind
    detail: str


@dataclass(frozen=True)
class Gap:
    """A writer epoch that did not end with a writer_stop row."""

    epoch: int
    started_at: Any
    last_seq: int
    last_ts: Any
    next_epoch_started_at: Any | None
    flush_interval: float | None
    batch_max: int | None

    def describe(self) -> str:
        nxt = (f"the next writer started at {self.next_epoch_started_at}" if self.next_epoch_started_at
               else "no writer started since")
        window = (f"at most the last batch window ({self.flush_interval}s / {self.batch_max} events) "
                  "plus any queued events") if self.flush_interval else "the last batch"
        return (f"epoch {self.epoch} (started {self.started_at}) did not end cleanly: its last row is "
                f"seq {self.last_seq} at {self.last_ts}; {nxt}. Events submitted after that row may "
                f"be lost: {window}.")


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    problems: list[Problem]
    gaps: list[Gap]
    rows_checked: int
    head_seq: int
    head_hash: str
    anchor_seq: int
    schema_version: int
    epochs: int
    truncated: bool = False           # more problems existed than were classified
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Intact chain and every finished epoch ended with a writer_stop row."""
        return self.ok and not self.gaps

    def text(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: {self.rows_checked} rows checked, head seq "
                 f"{self.head_seq} hash {self.head_hash}, {self.epochs} writer epochs, schema "
                 f"v{self.schema_version}" + (f", chain anchored at seq {self.anchor_seq} by retention"
                                              if self.anchor_seq else "")]
        for p in self.problems:
            lines.append(f"  {p.kind:<9} {p.table or '?'} seq {p.seq}: {p.detail}")
        if self.truncated:
            lines.append("  ... more problems not classified")
        for g in self.gaps:
            lines.append(f"  gap: {g.describe()}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Row(NamedTuple):
    seq: int
    table: str
    prev: bytes
    hash: bytes
    canon: str


def verify(path: str | Path) -> VerifyReport:
    """Verify a file no daemon is writing (opened read-only)."""
    con = db.connect(path, read_only=True)
    try:
        return verify_connection(con)
    finally:
        con.close()


def _table_reader(con: duckdb.DuckDBPyConnection, table: str, max_seq: int) -> Iterator[_Row]:
    cols = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = 'main' AND table_name = ? "
        "ORDER BY column_index", [table]).fetchall()
    names, exprs, blobs = [], [], set()
    for name, typ in cols:
        if name in schema.CHAIN_COLUMNS:
            continue
        names.append(name)
        if typ.startswith("TIMESTAMP WITH TIME ZONE"):
            exprs.append(f'epoch_us("{name}")')
        else:
            exprs.append(f'"{name}"')
            if typ == "BLOB":
                blobs.add(name)
    blobs = frozenset(blobs)
    cur = con.cursor()
    try:
        cur.execute(f"SELECT chain_seq, chain_prev, chain_hash, {', '.join(exprs)} FROM {table} "
                    f"WHERE chain_seq <= ? ORDER BY chain_seq, chain_hash", [max_seq])
        while True:
            chunk = cur.fetchmany(_FETCH)
            if not chunk:
                return
            for r in chunk:
                yield _Row(r[0], table, bytes(r[1]), bytes(r[2]), canonical(names, r[3:], blobs))
    finally:
        cur.close()


def verify_connection(con: duckdb.DuckDBPyConnection, *, live_epoch: int | None = None) -> VerifyReport:
    """Verify through ``con`` (a read-only file connection or a live store's cursor).

    On a live store, rows committed after the head is read are left out; a
    retention run at the same moment would show as deleted rows (run it again).
    """
    tables = db.existing_tables(con)
    version = db.schema_version(con)
    union = " UNION ALL ".join(f"SELECT '{t}' AS t, chain_seq, chain_hash FROM {t}" for t in tables)
    head = con.execute(f"SELECT chain_seq, chain_hash FROM ({union}) ORDER BY chain_seq DESC LIMIT 1").fetchone()
    max_seq = head[0] if head else 0

    anchor_seq, anchor_hash = 0, GENESIS
    wcols = {r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'writer_events'").fetchall()}
    if "anchor_seq" in wcols:
        a = con.execute("SELECT anchor_seq, anchor_hash FROM writer_events WHERE event = 'retention' "
                        "AND anchor_seq IS NOT NULL ORDER BY anchor_seq DESC LIMIT 1").fetchone()
        if a is not None:
            anchor_seq, anchor_hash = int(a[0]), bytes.fromhex(a[1])

    lookups = 0
    lookup_cur = con.cursor()

    def locate(h: bytes) -> tuple[str, int] | None:
        nonlocal lookups
        lookups += 1
        r = lookup_cur.execute(f"SELECT t, chain_seq FROM ({union}) WHERE chain_hash = ? LIMIT 1", [h]).fetchone()
        return (r[0], r[1]) if r else None

    problems: list[Problem] = []
    truncated = False
    expected, last_seq, last_table = anchor_hash, anchor_seq, None
    checked = 0

    stream = heapq.merge(*(_table_reader(con, t, max_seq) for t in tables), key=lambda r: (r.seq, r.hash))
    groups = itertools.groupby(stream, key=lambda r: r.seq)
    pending = next(groups, None)
    while pending is not None:
        seq, rows = pending[0], list(pending[1])
        pending = next(groups, None)
        checked += len(rows)
        if lookups >= _MAX_LOOKUPS:
            truncated = True
            break
        oks = [row_hash(r.prev, r.table, r.canon) == r.hash for r in rows]
        if len(rows) > 1:
            # Duplicate chain_seq: keep the row that fits the chain, the others were inserted.
            nxt_prev = None
            if pending is not None:
                pending = (pending[0], list(pending[1]))
                nxt_prev = pending[1][0].prev
            score = [(ok and r.prev == expected) * 2 + (r.hash == nxt_prev) for r, ok in zip(rows, oks)]
            keep = max(range(len(rows)), key=lambda i: score[i])
            for i, r in enumerate(rows):
                if i != keep:
                    problems.append(Problem(r.table, r.seq, "inserted",
                                            "another row has the same chain_seq; this one is not part of the chain"))
            rows, oks = [rows[keep]], [oks[keep]]
        r, ok = rows[0], oks[0]
        if r.seq <= anchor_seq:
            problems.append(Problem(r.table, r.seq, "inserted",
                                    f"row precedes the retention checkpoint's anchor (seq {anchor_seq})"))
            continue
        if r.prev == expected:
            if not ok:
                problems.append(Problem(r.table, r.seq, "modified", "content does not match the row's hash"))
            if r.seq != last_seq + 1:
                problems.append(Problem(r.table, r.seq, "reordered",
                                        f"links directly to seq {last_seq} but chain_seq jumps from "
                                        f"{last_seq} to {r.seq} (renumbered)"))
        else:
            pred = None if not ok else locate(r.prev)
            if not ok:
                problems.append(Problem(r.table, r.seq, "inserted",
                                        "neither its hash nor its link fits the chain"))
                continue  # not part of the chain: the next row should link to the one before
            elif pred is not None:
                problems.append(Problem(r.table, r.seq, "reordered",
                                        f"the chain says it follows {pred[0]} seq {pred[1]}, but it is "
                                        f"stored after seq {last_seq}"))
            elif r.seq > last_seq + 1:
                missing = (f"seq {last_seq + 1}" if r.seq == last_seq + 2
                           else f"seq {last_seq + 1}..{r.seq - 1}")
                problems.append(Problem(None, last_seq + 1, "deleted",
                                        f"rows missing before {r.table} seq {r.seq}: {missing}"))
            else:
                problems.append(Problem(last_table, last_seq, "modified",
                                        f"the row was rewritten with a recomputed hash (or rows after it "
                                        f"were removed and renumbered): {r.table} seq {r.seq} links to a "
                                        "hash that no longer exists"))
        expected, last_seq, last_table = r.hash, r.seq, r.table
    lookup_cur.close()

    gaps, epochs = _epochs(con, union, live_epoch, anchor_seq)
    return VerifyReport(
        ok=not problems and not truncated, problems=problems, gaps=gaps, rows_checked=checked,
        head_seq=max_seq, head_hash=bytes(head[1]).hex() if head else GENESIS.hex(),
        anchor_seq=anchor_seq, schema_version=version, epochs=epochs, truncated=truncated)


def _epochs(con: duckdb.DuckDBPyConnection, union: str, live_epoch: int | None,
            anchor_seq: int) -> tuple[list[Gap], int]:
    rows = con.execute(
        "SELECT epoch, min(chain_seq) FILTER (event = 'writer_start'), min(ts) FILTER (event = 'writer_start'),"
        " bool_or(event = 'writer_stop'), any_value(flush_interval) FILTER (event = 'writer_start'),"
        " any_value(batch_max) FILTER (event = 'writer_start') "
        "FROM writer_events WHERE epoch IS NOT NULL GROUP BY epoch ORDER BY epoch").fetchall()
    gaps = []
    for i, (epoch, start_seq, started, stopped, interval, bmax) in enumerate(rows):
        if stopped or epoch == live_epoch:
            continue
        if start_seq is None:  # its writer_start row was removed by retention
            start_seq = anchor_seq + 1
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        bound = f"AND chain_seq < {int(nxt[1])}" if nxt and nxt[1] is not None else ""
        last = con.execute(f"SELECT chain_seq, t FROM ({union}) WHERE chain_seq >= ? {bound} "
                           "ORDER BY chain_seq DESC LIMIT 1", [start_seq]).fetchone()
        if last is None:  # retention removed everything the epoch wrote
            continue
        last_ts = con.execute(f"SELECT ts FROM {last[1]} WHERE chain_seq = ?", [last[0]]).fetchone()[0]
        gaps.append(Gap(epoch=epoch, started_at=started, last_seq=last[0], last_ts=last_ts,
                        next_epoch_started_at=nxt[2] if nxt else None, flush_interval=interval,
                        batch_max=bmax))
    return gaps, len(rows)
