"""Retention: drop the oldest rows while keeping the chain verifiable.

The chain is global, so retention removes a *prefix* of it: every row with
``chain_seq <= S``, where S is the last row before the first row (in chain order)
whose ``ts`` is within the retention period. Rows older than the cutoff that come
after a newer row stay until the next run. In the same transaction it appends a
chained ``writer_events`` row with ``event = 'retention'``, ``anchor_seq = S`` and
``anchor_hash`` = the hex hash of row S. ``verify`` starts the chain at the newest
such anchor instead of the genesis hash, so the first remaining row must link to
it — deleting further rows afterwards is still caught.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import duckdb

from . import db
from .errors import AuditError
from .writer import ChainWriter, writer_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionResult:
    cutoff: dt.datetime
    anchor_seq: int                 # the chain now starts after this seq
    removed: dict[str, int]         # table -> rows removed (empty: nothing to do)

    @property
    def removed_rows(self) -> int:
        return sum(self.removed.values())


def apply_retention(path_or_store: Any, older_than: dt.timedelta) -> RetentionResult:
    """Remove rows older than ``older_than``. On a running AuditStore this runs on
    its writer thread; on a path the file must not be held by a daemon."""
    from .store import AuditStore

    if older_than < dt.timedelta(0):
        raise AuditError("retention period must not be negative")
    cutoff = dt.datetime.now(dt.timezone.utc) - older_than
    if isinstance(path_or_store, AuditStore):
        return path_or_store.run_in_writer(lambda con, chain: _retain(con, chain, cutoff))
    con = db.connect(path_or_store, read_only=False)
    try:
        db.migrate(con)
        result = _retain(con, ChainWriter(con), cutoff)
        con.execute("CHECKPOINT")
        return result
    finally:
        con.close()


def _retain(con: duckdb.DuckDBPyConnection, chain: ChainWriter, cutoff: dt.datetime) -> RetentionResult:
    tables = db.existing_tables(con)
    union = " UNION ALL ".join(f"SELECT chain_seq, chain_hash, ts FROM {t}" for t in tables)
    first_kept = con.execute(f"SELECT min(chain_seq) FROM ({union}) WHERE ts >= ?", [cutoff]).fetchone()[0]
    cut = int(first_kept) - 1 if first_kept is not None else chain.seq
    current = con.execute("SELECT max(anchor_seq) FROM writer_events WHERE event = 'retention'").fetchone()[0] or 0
    if cut <= current:
        return RetentionResult(cutoff, int(current), {})
    anchor_hash = bytes(con.execute(f"SELECT chain_hash FROM ({union}) WHERE chain_seq = ?", [cut]).fetchone()[0])
    counts = {t: con.execute(f"SELECT count(*) FROM {t} WHERE chain_seq <= ?", [cut]).fetchone()[0] for t in tables}

    def delete(c: duckdb.DuckDBPyConnection) -> None:
        for t in tables:
            if counts[t]:
                c.execute(f"DELETE FROM {t} WHERE chain_seq <= ?", [cut])

    chain.write([writer_event("retention", anchor_seq=cut, anchor_hash=anchor_hash.hex(),
                              removed_rows=sum(counts.values()), cutoff=cutoff,
                              detail=f"removed chain_seq <= {cut}")], before=delete)
    log.info("audit retention removed %d rows (chain now anchored at seq %d)", sum(counts.values()), cut)
    return RetentionResult(cutoff, cut, {t: n for t, n in counts.items() if n})
