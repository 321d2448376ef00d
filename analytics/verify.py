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
rows at the very end likewise. ``anchors`` makes that comparison part of the check:
chain positions (seq -> hash) kept off the host — the audit stream's events in a SIEM,
or heads ``audit verify`` printed — read by :func:`parse_anchors`; each must match the
store's row at that seq (a rewrite with recomputed hashes changes every hash after the
first row it touched, so any later position kept elsewhere catches it). Truncating the
tail removes the epoch's ``writer_stop`` row and shows up as an epoch that did not end
cleanly.

Writer epochs: every chained row must lie inside a ``writer_start`` … ``writer_stop``
epoch (migration rows just before a start excepted); a stop row's ``rows`` and
``last_seq`` must match the rows that precede it in its epoch; an epoch without a stop
row is a gap unless the next writer accounted for it (``prev_epoch``: it counted what
that epoch committed and replayed its journal, or the daemon re-sent the rest).

Crash-time loss (see :mod:`analytics.highwater`): each session's requests carry
``seq`` 1, 2, 3…, so a hole is a lost event; ``session_ends.requests`` and the
``audit_losses`` rows a restart records say how many events a session's tail lacks;
and the daemon's high-water file beside the store gives the committed head the store
must reach (a shorter file was truncated) and, before a restart has accounted for a
crash, what each open session had issued. Every such gap is listed with its size.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import duckdb

from . import db, highwater, schema
from .chain import GENESIS, canonical, row_hash

ProblemKind = Literal["modified", "deleted", "inserted", "reordered"]
_MAX_LOOKUPS = 200          # each is a scan of every table: bound the cost on a wrecked file
_MAX_PROBLEMS = 10_000
_FETCH = 10_000
_ANCHOR_CHUNK = 2_000       # anchored seqs looked up per query
_HASH = re.compile(r"[0-9a-f]{64}")
_HEAD_LINE = re.compile(r"\bhead seq (\d+) hash ([0-9a-f]{64})\b")


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
    # Rows known to be missing at the end (from the daemon's high-water file), None: unknown.
    missing: int | None = None

    def describe(self) -> str:
        nxt = (f"the next writer started at {self.next_epoch_started_at}" if self.next_epoch_started_at
               else "no writer started since")
        window = (f"what was queued or in flight: the last batch window ({self.flush_interval}s / "
                  f"{self.batch_max} events) while the writer kept up") if self.flush_interval else "the last batch"
        # The first missing seq is named: where an investigation starts.
        size = (f" At least {self.missing} committed row(s) after it are gone: seq {self.last_seq + 1}.."
                f"{self.last_seq + self.missing} (the daemon saw the head at seq {self.last_seq + self.missing})."
                if self.missing else "")
        return (f"epoch {self.epoch} (started {self.started_at}) did not end cleanly: its last row is "
                f"seq {self.last_seq} at {self.last_ts}; {nxt}. Events submitted after that row may "
                f"be lost: {window}.{size}")


@dataclass(frozen=True)
class SessionGap:
    """Request events of one session that are not on record."""

    session_id: str
    missing: int
    detail: str

    def describe(self) -> str:
        return f"session {self.session_id}: {self.missing} event(s) missing ({self.detail})"


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
    truncated: bool = False           # stopped early: too many problems to classify
    notes: list[str] = field(default_factory=list)
    session_gaps: list[SessionGap] = field(default_factory=list)
    anchors_checked: int = 0          # off-host chain positions compared (``anchors``)

    @property
    def clean(self) -> bool:
        """Intact chain, every finished epoch ended (or was accounted for), no session lacks events."""
        return self.ok and not self.gaps and not self.session_gaps

    def passes(self, allow_gaps: bool = False) -> bool:
        """What ``audit verify`` exits 0 on: a gap fails it unless gaps are allowed."""
        return self.clean or (allow_gaps and self.ok)

    @property
    def missing_events(self) -> int:
        return sum(g.missing for g in self.session_gaps) + sum(g.missing or 0 for g in self.gaps)

    def __str__(self) -> str:
        return self.text()

    def text(self, allow_gaps: bool = False) -> str:
        head = "OK" if self.passes(allow_gaps) else "FAILED"
        lines = [f"{head}: {self.rows_checked} rows checked, head seq "
                 f"{self.head_seq} hash {self.head_hash}, {self.epochs} writer epochs, schema "
                 f"v{self.schema_version}" + (f", chain anchored at seq {self.anchor_seq} by retention"
                                              if self.anchor_seq else "")]
        for p in self.problems:
            lines.append(f"  {p.kind:<9} {p.table or '?'} seq {p.seq}: {p.detail}")
        if self.truncated:
            lines.append("  ... stopped after too many problems; the rest of the chain was not checked")
        for g in self.gaps:
            lines.append(f"  gap: {g.describe()}")
        for sg in self.session_gaps:
            lines.append(f"  gap: {sg.describe()}")
        if self.gaps or self.session_gaps:
            unknown = sum(1 for g in self.gaps if not g.missing)
            lines.append(f"  {len(self.gaps) + len(self.session_gaps)} gap(s): {self.missing_events} event(s) "
                         "known missing" + (f", plus what {unknown} abrupt epoch end(s) held" if unknown else "")
                         + ("" if not allow_gaps else " (allowed by --allow-gaps)"))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Row(NamedTuple):
    seq: int
    table: str
    prev: bytes
    hash: bytes
    canon: str


def verify(path: str | Path, anchors: dict[int, str] | None = None) -> VerifyReport:
    """Verify a file no daemon is writing (opened read-only), with the daemon's high-water
    file beside it if there is one."""
    con = db.connect(path, read_only=True)
    try:
        return verify_connection(con, marks=highwater.read(path), anchors=anchors)
    finally:
        con.close()


def parse_anchors(text: str, source: str = "anchors") -> dict[int, str]:
    """Chain positions kept off the host, seq -> hex hash, from ``text``: lines holding an audit
    stream event (its JSON, after a syslog header or not: ``metadata.sequence`` and
    ``chain_hash``), or the ``head seq N hash H`` an ``audit verify`` report begins with. Other
    lines are skipped (a SIEM's export holds other messages too). Raises ValueError when the
    same seq comes with two hashes (the copy contradicts itself)."""
    anchors: dict[int, str] = {}
    for no, line in enumerate(text.splitlines(), 1):
        found: list[tuple[int, str]] = []
        brace = line.find("{")
        if brace >= 0:
            try:
                doc = json.loads(line[brace:])
            except (ValueError, RecursionError):
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
                seq, h = doc["metadata"].get("sequence"), doc.get("chain_hash")
                if type(seq) is int and seq > 0 and isinstance(h, str) and _HASH.fullmatch(h):
                    found.append((seq, h))
        if not found:
            found = [(int(m.group(1)), m.group(2)) for m in _HEAD_LINE.finditer(line) if int(m.group(1)) > 0]
        for seq, h in found:
            if anchors.setdefault(seq, h) != h:
                raise ValueError(f"{source}, line {no}: seq {seq} with hash {h}, and earlier with {anchors[seq]}: "
                                 "the copy contradicts itself")
    return anchors


def _check_anchors(con: duckdb.DuckDBPyConnection, union: str, anchors: dict[int, str], max_seq: int,
                   anchor_seq: int, anchor_hash: bytes, problems: list[Problem], notes: list[str]) -> int:
    """Compare the off-host chain positions with the store; returns how many were compared."""
    seqs = sorted(anchors)
    retained = [s for s in seqs if s < anchor_seq]
    inside = [s for s in seqs if anchor_seq <= s <= max_seq]
    beyond = [s for s in seqs if s > max_seq]
    found: dict[int, dict[bytes, str]] = {}
    for i in range(0, len(inside), _ANCHOR_CHUNK):
        chunk = inside[i:i + _ANCHOR_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for t, seq, h in con.execute(f"SELECT t, chain_seq, chain_hash FROM ({union}) WHERE chain_seq IN ({marks})",
                                     chunk).fetchall():
            found.setdefault(seq, {})[bytes(h)] = t
    if anchor_seq in anchors:  # the retention checkpoint keeps the hash of the last row it removed
        found.setdefault(anchor_seq, {})[anchor_hash] = "writer_events"
    mismatched = 0
    for seq in inside:
        want = bytes.fromhex(anchors[seq])
        rows = found.get(seq, {})
        if want in rows:
            continue
        mismatched += 1
        if mismatched > 20:
            continue  # named below as a count: a rewrite changes every later hash
        if not rows:
            problems.append(Problem(None, seq, "deleted", f"an off-host copy holds seq {seq} (hash {anchors[seq]}); "
                                                          "the store has no row there"))
        else:
            tables = set(rows.values())
            problems.append(Problem(tables.pop() if len(tables) == 1 else None, seq, "modified",
                                    f"its hash is {next(iter(rows)).hex()}, an off-host copy holds {anchors[seq]}: "
                                    "the chain was rewritten (hashes recomputed) after the copy was made"))
    if mismatched > 20:
        notes.append(f"{mismatched - 20} more off-host position(s) do not match the store")
    if beyond:
        problems.append(Problem(None, max_seq + 1, "deleted",
                                f"the store ends at seq {max_seq}, but an off-host copy holds seq {beyond[-1]} "
                                f"(hash {anchors[beyond[-1]]}): {beyond[-1] - max_seq} row(s) cut off the end"))
    if retained:
        notes.append(f"{len(retained)} off-host position(s) before the retention checkpoint at seq {anchor_seq} "
                     "not compared (their rows were removed)")
    if inside and not mismatched:
        notes.append(f"{len(inside)} off-host chain position(s) match the store, the last at seq {inside[-1]}")
    return len(inside) + len(beyond)


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


def verify_connection(con: duckdb.DuckDBPyConnection, *, live_epoch: int | None = None,
                      marks: highwater.HighWater | None = None,
                      anchors: dict[int, str] | None = None) -> VerifyReport:
    """Verify through ``con`` (a read-only file connection or a live store's cursor).

    On a live store, rows committed after the head is read are left out; a
    retention run at the same moment would show as deleted rows (run it again).
    ``marks``: the daemon's high-water file; its open sessions count as losses only on a
    file no daemon is writing (``live_epoch`` None). ``anchors``: chain positions kept off
    the host (:func:`parse_anchors`), each compared with the store's row at its seq.
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
        if lookups >= _MAX_LOOKUPS or len(problems) >= _MAX_PROBLEMS:
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

    notes: list[str] = []
    anchors_checked = _check_anchors(con, union, anchors, max_seq, anchor_seq, anchor_hash, problems, notes) \
        if anchors else 0
    gaps, epochs = _epochs(con, union, live_epoch, anchor_seq, problems, notes)
    if marks is not None and marks.head_seq > max_seq:
        # The daemon saw rows committed up to marks.head_seq: the file lost its tail.
        if gaps and gaps[-1].last_seq == max_seq:
            gaps[-1] = replace(gaps[-1], missing=marks.head_seq - max_seq)
        else:
            problems.append(Problem(None, max_seq + 1, "deleted",
                                    f"the store ends at seq {max_seq}, but the daemon saw it committed up to seq "
                                    f"{marks.head_seq} ({highwater.path_for('<store>').name}): "
                                    f"{marks.head_seq - max_seq} row(s) cut off the end"))
    session_gaps = _session_gaps(con, anchor_seq, tables)
    if live_epoch is None and "recordings" in tables and "session_ends" in tables:
        notes += _unended_recordings(con)
    if marks is not None and marks.running and live_epoch is None and marks.sessions:
        seen = {g.session_id for g in session_gaps}
        for sf in highwater.shortfalls(con, marks.sessions):
            if sf.session_id not in seen:
                session_gaps.append(SessionGap(
                    sf.session_id, sf.missing,
                    f"the daemon (pid {marks.pid}) stopped abruptly after issuing request {sf.issued_seq}"
                    f"{' and the session end' if sf.session_end_missing else ''}; the store has up to "
                    f"request {sf.recorded_seq}; botwarden records this as audit_losses at its next start"))
    return VerifyReport(
        ok=not problems and not truncated, problems=problems, gaps=gaps, rows_checked=checked,
        head_seq=max_seq, head_hash=bytes(head[1]).hex() if head else GENESIS.hex(),
        anchor_seq=anchor_seq, schema_version=version, epochs=epochs, truncated=truncated,
        notes=notes, session_gaps=session_gaps, anchors_checked=anchors_checked)


def _unended_recordings(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Where the recording of each session without an end row stops (a daemon that died mid-session:
    each chunk is committed whole, so the recording is complete up to its last chunk)."""
    rows = con.execute(
        "SELECT session_id, max(seq), count(*), max(ts) FROM recordings WHERE session_id NOT IN "
        "(SELECT session_id FROM session_ends) GROUP BY session_id ORDER BY min(chain_seq)").fetchall()
    notes = []
    for sid, last, n, ts in rows:
        holes = f"; {last - n} chunk(s) before it are missing" if n < last else ""
        notes.append(f"session {sid} has no end on record: its recording ends at chunk {last} ({ts}), "
                     f"complete up to there{holes}")
    return notes


def _session_gaps(con: duckdb.DuckDBPyConnection, anchor_seq: int, tables: list[str]) -> list[SessionGap]:
    """Holes in a session's request seq, a tail its session_end or an audit_losses row says
    is missing. Sessions that started before the retention anchor are left out (retention
    removes rows by time, possibly half a session)."""
    if "requests" not in tables:
        return []
    cols = {r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'requests'").fetchall()}
    if "seq" not in cols:
        return []
    losses = "audit_losses" in tables
    # A request's seq is on record in its requests row or (strict mode) its request_starts row.
    seqs = "SELECT session_id, seq FROM requests" + (
        " UNION ALL SELECT session_id, seq FROM request_starts" if "request_starts" in tables else "")
    rows = con.execute(f"""
        WITH r AS (SELECT session_id, count(DISTINCT seq) AS n, max(seq) AS hi FROM ({seqs})
                   WHERE seq IS NOT NULL GROUP BY session_id),
             e AS (SELECT session_id, max(requests) AS declared FROM session_ends GROUP BY session_id),
             l AS ({"SELECT session_id, max(issued_seq) AS issued, bool_or(session_end_missing) AS end_missing "
                   "FROM audit_losses WHERE session_id IS NOT NULL GROUP BY session_id" if losses else
                   "SELECT NULL::VARCHAR AS session_id, NULL::BIGINT AS issued, NULL::BOOLEAN AS end_missing "
                   "WHERE false"}),
             s AS (SELECT session_id FROM session_starts WHERE chain_seq > {int(anchor_seq)}
                   UNION SELECT session_id FROM r UNION SELECT session_id FROM l)
        SELECT s.session_id, coalesce(r.n, 0), coalesce(r.hi, 0), e.declared, l.issued, coalesce(l.end_missing, false)
        FROM s LEFT JOIN r USING (session_id) LEFT JOIN e USING (session_id) LEFT JOIN l USING (session_id)
        WHERE s.session_id NOT IN (SELECT session_id FROM session_starts WHERE chain_seq <= {int(anchor_seq)})
        ORDER BY s.session_id""").fetchall()
    out = []
    for sid, n, hi, declared, issued, end_missing in rows:
        holes = hi - n
        tail_to = max(x for x in (hi, declared or 0, issued or 0))
        tail = tail_to - hi
        missing = holes + tail + bool(end_missing)
        if missing <= 0:
            continue
        why = []
        if holes:
            why.append(f"{holes} hole(s) in its request seq 1..{hi}")
        if tail and declared and declared >= tail_to:
            why.append(f"its session end counts {declared} requests, the last on record is {hi}")
        elif tail:
            why.append(f"recorded at restart: request {issued} was issued, the last on record is {hi}")
        if end_missing:
            why.append("its session end was issued and is not on record")
        out.append(SessionGap(sid, missing, "; ".join(why)))
    return out


def _epochs(con: duckdb.DuckDBPyConnection, union: str, live_epoch: int | None,
            anchor_seq: int, problems: list[Problem], notes: list[str]) -> tuple[list[Gap], int]:
    rows = con.execute(
        "SELECT epoch, min(chain_seq) FILTER (event = 'writer_start'), min(ts) FILTER (event = 'writer_start'),"
        " bool_or(event = 'writer_stop'), any_value(flush_interval) FILTER (event = 'writer_start'),"
        " any_value(batch_max) FILTER (event = 'writer_start') "
        "FROM writer_events WHERE epoch IS NOT NULL GROUP BY epoch ORDER BY epoch").fetchall()
    accounted = _check_epoch_bounds(con, union, live_epoch, anchor_seq, problems, notes)
    gaps = []
    for i, (epoch, start_seq, started, stopped, interval, bmax) in enumerate(rows):
        if stopped or epoch == live_epoch or epoch in accounted:
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


def _check_epoch_bounds(con: duckdb.DuckDBPyConnection, union: str, live_epoch: int | None, anchor_seq: int,
                        problems: list[Problem], notes: list[str]) -> set[int]:
    """Every row inside an epoch; stop rows match what precedes them. Returns the epochs that
    ended abruptly and that the next writer accounted for (not gaps)."""
    wcols = {r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'writer_events'").fetchall()}
    extra = ", ".join(c if c in wcols else f"NULL AS {c}"
                      for c in ("last_seq", "prev_epoch", "prev_epoch_rows", "replayed_rows"))
    events = con.execute(f"SELECT chain_seq, event, epoch, rows, detail, {extra} FROM writer_events "
                         "WHERE event IN ('writer_start', 'writer_stop') ORDER BY chain_seq").fetchall()
    producer = " UNION ALL ".join(f"SELECT chain_seq FROM {t}" for t in db.existing_tables(con)
                                  if t != "writer_events")

    def rows_between(lo: int, hi: int | None) -> tuple[int, int | None, int | None, tuple]:
        """Producer rows with lo < seq < hi: count, first and last seq."""
        bound = "" if hi is None else f" AND chain_seq < {int(hi)}"
        n, first, last = con.execute(f"SELECT count(*), min(chain_seq), max(chain_seq) FROM ({producer}) "
                                     f"WHERE chain_seq > {int(lo)}{bound}").fetchone()
        w = con.execute(f"SELECT count(*), min(chain_seq), max(chain_seq) FROM writer_events WHERE chain_seq > "
                        f"{int(lo)}{bound} AND event NOT IN ('migration', 'writer_start', 'writer_stop')").fetchone()
        return n, first, last, w

    starts = [e for e in events if e[1] == "writer_start"]
    counted: dict[int, int] = {}
    # Rows before the first epoch (after the retention anchor).
    first_start = starts[0][0] if starts else None
    if first_start is not None and first_start > anchor_seq + 1:
        n, lo_seq, _, w = rows_between(anchor_seq, first_start)
        if n:
            problems.append(Problem(None, lo_seq, "inserted",
                                    f"{n} row(s) lie before the first writer_start (seq {first_start})"))
    for i, (seq, event, epoch, _rows, _detail, *_rest) in enumerate(starts):
        nxt = starts[i + 1][0] if i + 1 < len(starts) else None
        stop = next((e for e in events if e[1] == "writer_stop" and e[2] == epoch and seq < e[0]
                     and (nxt is None or e[0] < nxt)), None)
        end = stop[0] if stop is not None else nxt
        n, _, last, w = rows_between(seq, end)
        counted[epoch] = n
        if stop is None:
            continue
        # Counted only where the chain itself found nothing wrong in the epoch: the counts catch a
        # rewrite that kept the chain consistent (rows removed, later ones renumbered and re-hashed).
        chain_found = any(p.seq is not None and seq < p.seq <= stop[0] for p in problems)
        if seq > anchor_seq and not chain_found:
            if stop[3] is not None and stop[3] != n:
                problems.append(Problem("writer_events", stop[0], "deleted" if n < stop[3] else "inserted",
                                        f"epoch {epoch}'s writer_stop counts {stop[3]} rows, {n} precede it"))
            inside = max(x for x in (last or 0, w[2] or 0, seq))
            if stop[5] is not None and stop[5] != inside:
                problems.append(Problem("writer_events", stop[0], "deleted",
                                        f"epoch {epoch}'s writer_stop says its last row is seq {stop[5]}, "
                                        f"the last row before it is seq {inside}"))
        n_out, first_out, _, w_out = rows_between(stop[0], nxt)
        flagged = any(p.seq is not None and p.seq > stop[0] and (nxt is None or p.seq < nxt) for p in problems)
        if (n_out or w_out[0]) and not flagged:
            problems.append(Problem(None, min(x for x in (first_out, w_out[1]) if x is not None), "inserted",
                                    f"{n_out + w_out[0]} row(s) lie after epoch {epoch}'s writer_stop "
                                    f"(seq {stop[0]}) outside any writer epoch"))
    accounted: set[int] = set()
    for seq, event, epoch, _rows, detail, _last, prev_epoch, prev_rows, replayed in starts:
        if prev_epoch is None or prev_epoch not in counted:
            continue
        if prev_rows is not None and prev_rows != counted[prev_epoch]:
            problems.append(Problem("writer_events", seq, "deleted" if counted[prev_epoch] < prev_rows else "inserted",
                                    f"epoch {epoch} found {prev_rows} rows of epoch {prev_epoch} when it started; "
                                    f"{counted[prev_epoch]} are there now"))
        if replayed is not None or (detail or "").startswith("accounted:"):
            accounted.add(prev_epoch)
            how = (f"{replayed} event(s) it had not committed were replayed from its journal"
                   if replayed is not None else (detail or "")[len("accounted:"):].strip())
            notes.append(f"epoch {prev_epoch} ended abruptly after committing {prev_rows} events; {how}")
    return accounted
