"""The fleet lake: every bastion's audit chain, shipped to one DuckLake and queried as one.

DuckLake keeps its catalog as plain tables in a PostgreSQL database and its data as Parquet
files under a shared data path; any number of DuckDB writers commit to it at once and any
engine reads the Parquet files (docs/fleet.md). The extensions come from PyPI packages
(``duckdb-ext-ducklake``, ``duckdb-ext-postgres``) because a bastion cannot download them at
run time; they are built for exactly one DuckDB version (see pyproject.toml).

Shipping (:class:`FleetShipper`, a thread in the audit process): committed rows of the local
chain are copied in *batches* of consecutive ``chain_seq`` values. One batch is one DuckLake
transaction: its rows in every table plus one ``fleet_batches`` row (bastion, ``seq_lo`` ..
``seq_hi``, row count, the chain hash at ``seq_hi``). The shipping high-water mark is therefore
the lake's own ``max(seq_hi)`` for this bastion, read again whenever the shipper (re)connects:
a batch is either wholly in the lake or not at all, so an outage, a kill or a lost reply
can neither leave a gap nor ship a row twice. The mark file beside the store
(``<store>.fleet.json``) only reports progress (``status``, metrics) and says nothing
authoritative.

The shipper never touches the audit writer: it reads committed rows on its own cursor
(a snapshot per batch), so a lake that is down or slow costs the bots nothing; it retries
with back-off and catches up afterwards.

Recordings are shipped as metadata (``data_bytes`` instead of ``data``): their bytes stay on
the bastion. ``fleet verify`` therefore checks a recording row's links but not its content.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import duckdb

from . import schema
from .chain import canonical, row_hash
from .errors import AuditError, AuditQueryError

log = logging.getLogger(__name__)

DUCKDB_VERSION = "1.4.4"        # the version the extension packages are built for (pyproject.toml)
EXTENSIONS = ("postgres_scanner", "ducklake")
BATCHES = "fleet_batches"
_NOT_SHIPPED = {"recordings": {"data"}}          # bytes that stay on the bastion
_METADATA = {"recordings": [("data_bytes", "BIGINT", "octet_length(data)")]}
_RETRY_MIN_S = 1.0
_RETRY_MAX_S = 30.0
_MARK_EVERY_S = 2.0
_CONNECT_TIMEOUT_S = 10


class FleetError(AuditError):
    """The lake cannot be reached or used (names the cause, never the catalog's password)."""


_SECRET = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)


def redact_dsn(text: str) -> str:
    """``text`` with any libpq ``password=...`` value replaced (error messages quote the DSN)."""
    return _SECRET.sub(r"\1***", text)


@dataclass(frozen=True)
class LakeSettings:
    """Where the lake is and who this bastion is in it (``[fleet]`` in botwarden.toml)."""

    catalog: str                 # libpq connection string of the catalog database
    data_path: str               # the shared directory (or object store URL) for Parquet files
    bastion: str                 # this bastion's name in the lake: unique across the fleet
    batch_rows: int = 10_000     # chain positions per shipped batch (one lake transaction)
    interval: float = 1.0        # seconds between looks at the chain once caught up

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> LakeSettings:
        return cls(**{k: raw[k] for k in ("catalog", "data_path", "bastion", "batch_rows", "interval") if k in raw})


def extension_dir() -> Path:
    """Where the duckdb-ext-* packages put their ``.duckdb_extension`` files."""
    try:
        import duckdb_ext
    except ImportError as e:
        raise FleetError("the DuckLake extension packages are not installed "
                         "(pip install duckdb-ext-ducklake duckdb-ext-postgres)") from e
    found = Path(next(iter(duckdb_ext.__path__))) / "extensions" / f"v{duckdb.__version__}" / "linux_amd64"
    if not found.is_dir():
        raise FleetError(f"no DuckDB extensions for duckdb {duckdb.__version__} under {found.parent}: the "
                         f"extension packages are built for duckdb {DUCKDB_VERSION}")
    return found


def connect(settings: LakeSettings, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake attached as ``lake`` (and used as the default catalog)."""
    ext = extension_dir()
    con = duckdb.connect()
    try:
        for name in EXTENSIONS:
            con.execute(f"LOAD '{ext / (name + '.duckdb_extension')}'")
        options = ", READ_ONLY" if read_only else ""
        catalog = settings.catalog
        if "connect_timeout" not in catalog:   # an unreachable catalog fails, rather than hangs
            catalog += f" connect_timeout={_CONNECT_TIMEOUT_S}"
        con.execute(f"ATTACH 'ducklake:postgres:{_quote(catalog)}' AS lake "
                    f"(DATA_PATH '{_quote(settings.data_path)}'{options})")
        con.execute("USE lake")
    except duckdb.Error as e:
        con.close()
        raise FleetError(f"cannot attach the fleet lake: {redact_dsn(str(e))}") from None
    return con


def _quote(text: str) -> str:
    return text.replace("'", "''")


# --- the lake's tables --------------------------------------------------------

def _shipped_columns(kind: schema.Kind) -> list[tuple[str, str, str]]:
    """(lake column, SQL type, expression over the local table) for one kind."""
    cols = [("chain_seq", "BIGINT", "chain_seq"), ("chain_prev", "BLOB", "chain_prev"),
            ("chain_hash", "BLOB", "chain_hash")]
    skip = _NOT_SHIPPED.get(kind.table, set())
    cols += [(f.name, schema.SQL_TYPES[f.type], f'"{f.name}"') for f in kind.fields if f.name not in skip]
    cols += _METADATA.get(kind.table, [])
    return cols


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the lake's tables if they are not there (any writer may be first)."""
    for kind in schema.KINDS.values():
        cols = ", ".join(f'"{n}" {t}' for n, t, _ in _shipped_columns(kind))
        con.execute(f"CREATE TABLE IF NOT EXISTS lake.{kind.table} (bastion VARCHAR NOT NULL, {cols})")
    con.execute(f"CREATE TABLE IF NOT EXISTS lake.{BATCHES} (bastion VARCHAR NOT NULL, seq_lo BIGINT NOT NULL, "
                "seq_hi BIGINT NOT NULL, rows BIGINT NOT NULL, head_hash VARCHAR NOT NULL, "
                "shipped_at TIMESTAMPTZ NOT NULL)")


class Mark(NamedTuple):
    seq: int            # the last chain_seq in the lake for this bastion (0: none yet)
    hash: str | None    # its chain hash (hex)


def lake_mark(con: duckdb.DuckDBPyConnection, bastion: str) -> Mark:
    row = con.execute(f"SELECT seq_hi, head_hash FROM lake.{BATCHES} WHERE bastion = ? "
                      "ORDER BY seq_hi DESC LIMIT 1", [bastion]).fetchone()
    return Mark(0, None) if row is None else Mark(int(row[0]), row[1])


# --- shipping ---------------------------------------------------------------------

def mark_path(store_path: str | Path) -> Path:
    return Path(str(store_path) + ".fleet.json")


def read_progress(store_path: str | Path) -> dict[str, Any] | None:
    """What the shipper last wrote about itself, or None if it never ran here."""
    try:
        return json.loads(mark_path(store_path).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class _Progress:
    bastion: str
    shipped_seq: int | None = None      # None until the lake has been reached once
    shipped_hash: str | None = None
    head_seq: int | None = None
    lake: str = "connecting"            # connecting | up | down
    last_error: str | None = None
    last_shipped_at: str | None = None
    batches: int = 0                    # shipped by this process
    rows: int = 0
    lag_s: float = 0.0                  # age of the oldest committed row not yet in the lake
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    def document(self) -> dict[str, Any]:
        backlog = None
        if self.head_seq is not None and self.shipped_seq is not None:
            backlog = max(0, self.head_seq - self.shipped_seq)
        return {**self.__dict__, "backlog": backlog, "pid": os.getpid(),
                "updated_at": dt.datetime.now(dt.timezone.utc).isoformat()}


class FleetShipper:
    """Ships an :class:`analytics.AuditStore`'s committed rows to the lake, in its own thread."""

    def __init__(self, store: Any, settings: LakeSettings):
        self.store = store
        self.settings = settings
        self.progress = _Progress(settings.bastion)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._mark_written = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-shipper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in flight (an interrupted one is simply not in the lake)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._disconnect()
        self._write_mark(force=True)

    def __enter__(self) -> FleetShipper:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _disconnect(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            with contextlib.suppress(duckdb.Error):
                con.close()

    def _run(self) -> None:
        backoff = _RETRY_MIN_S
        while not self._stop.is_set():
            try:
                if self._con is None:
                    self._con = connect(self.settings)
                    ensure_schema(self._con)
                    mark = lake_mark(self._con, self.settings.bastion)
                    self.progress.shipped_seq, self.progress.shipped_hash = mark
                    if self.progress.lake != "up":
                        log.info("fleet lake reached: bastion %s shipped up to seq %d",
                                 self.settings.bastion, mark.seq)
                    self.progress.lake, self.progress.last_error = "up", None
                shipped = self.ship_once()
                backoff = _RETRY_MIN_S
                self._write_mark(force=shipped > 0)
                if not shipped:
                    self._stop.wait(self.settings.interval)
            except Exception as e:  # a lake that is down (or any failure) costs a retry, never the audit
                why = redact_dsn(f"{type(e).__name__}: {e}")
                if self.progress.lake != "down" or self.progress.last_error != why:
                    log.warning("fleet shipping paused (retrying every %.0f s at most): %s", _RETRY_MAX_S, why)
                self.progress.lake, self.progress.last_error = "down", why
                self._disconnect()
                self._refresh_head()
                self._write_mark(force=True)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _RETRY_MAX_S)

    def _refresh_head(self) -> None:
        with contextlib.suppress(Exception):
            self.progress.head_seq = self.store.stats()["head_seq"]

    def _write_mark(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._mark_written < _MARK_EVERY_S:
            return
        self._mark_written = now
        path = mark_path(self.store.path)
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(self.progress.document()))
            os.replace(tmp, path)

    def _read_window(self, after: int) -> dict[str, Any]:
        """Committed rows with chain_seq in (after, after + batch_rows], one Arrow table per table,
        read in one transaction (one snapshot: the writer commits whole batches)."""
        hi = after + self.settings.batch_rows
        cur = self.store.cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            tables = {}
            for kind in schema.KINDS.values():
                exprs = ", ".join(f"{e} AS \"{n}\"" for n, _, e in _shipped_columns(kind))
                t = cur.execute(f"SELECT {exprs} FROM {kind.table} WHERE chain_seq > ? AND chain_seq <= ? "
                                "ORDER BY chain_seq", [after, hi]).fetch_arrow_table()
                if t.num_rows:
                    tables[kind.table] = t
            cur.execute("COMMIT")
            return tables
        finally:
            cur.close()

    def ship_once(self) -> int:
        """Ship the next batch; returns its row count (0: nothing new)."""
        self._refresh_head()
        after = self.progress.shipped_seq or 0
        tables = self._read_window(after)
        if not tables:
            self.progress.lag_s = 0.0
            return 0
        seqs = sorted(s for t in tables.values() for s in t.column("chain_seq").to_pylist())
        lo, hi, rows = seqs[0], seqs[-1], len(seqs)
        if lo != after + 1 or hi - lo + 1 != rows:
            # Retention removed rows before they were shipped: ship what exists; verify shows the hole.
            log.warning("fleet shipping: chain positions %d..%d hold %d rows (expected %d after seq %d)",
                        lo, hi, rows, hi - lo + 1, after)
        oldest = min(t.column("ts")[0].as_py() for t in tables.values())
        self.progress.lag_s = round(max(0.0, (dt.datetime.now(dt.timezone.utc) - oldest).total_seconds()), 3)
        head_hash = None
        for t in tables.values():
            col = t.column("chain_seq").to_pylist()
            if col[-1] == hi:
                head_hash = t.column("chain_hash")[len(col) - 1].as_py().hex()
        con = self._con
        bastion = self.settings.bastion
        con.execute("BEGIN TRANSACTION")
        try:
            mark = lake_mark(con, bastion)
            if mark.seq != after:
                # The lake moved (a reply lost after a commit, another shipper): follow it.
                con.execute("ROLLBACK")
                log.warning("fleet lake holds bastion %s up to seq %d, not %d: resuming from there",
                            bastion, mark.seq, after)
                self.progress.shipped_seq, self.progress.shipped_hash = mark
                return 0
            for table, arrow in tables.items():
                cols = ", ".join(f'"{c}"' for c in arrow.column_names)
                con.register("fleet_batch", arrow)
                try:
                    con.execute(f"INSERT INTO lake.{table} (bastion, {cols}) SELECT ?, {cols} FROM fleet_batch",
                                [bastion])
                finally:
                    con.unregister("fleet_batch")
            con.execute(f"INSERT INTO lake.{BATCHES} VALUES (?, ?, ?, ?, ?, ?)",
                        [bastion, after + 1, hi, rows, head_hash, dt.datetime.now(dt.timezone.utc)])
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        p = self.progress
        p.shipped_seq, p.shipped_hash = hi, head_hash
        p.batches += 1
        p.rows += rows
        p.last_shipped_at = dt.datetime.now(dt.timezone.utc).isoformat()
        if p.head_seq is not None and hi >= p.head_seq:
            p.lag_s = 0.0
        return rows


@contextlib.contextmanager
def shipping(store: Any, settings: Mapping[str, Any] | None) -> Iterator[FleetShipper | None]:
    """Ship ``store`` to the lake while the block runs; nothing without ``[fleet]`` settings."""
    if not settings:
        yield None
        return
    shipper = FleetShipper(store, LakeSettings.from_mapping(settings))
    shipper.start()
    try:
        yield shipper
    finally:
        shipper.stop()


# --- reading the lake ----------------------------------------------------------------

def run_sql(settings: LakeSettings, sql: str, params: list | None = None, *,
            timeout: float | None = None) -> tuple[list[str], list[tuple]]:
    """One read-only statement over the lake (attached read-only)."""
    from .sql import run_readonly

    con = connect(settings, read_only=True)
    try:
        return run_readonly(con, sql, params, timeout=timeout)
    finally:
        con.close()


def run_report(settings: LakeSettings, name: str) -> tuple[list[str], list[tuple]]:
    """A canned report (analytics/reports/) over every bastion, with a leading ``bastion`` column.

    The report's SQL runs unchanged once per bastion, over temporary views that show that
    bastion's rows under the local table names (and the local views on top of them)."""
    from . import reports
    from .sql import run_readonly

    report = reports.get_report(name)
    con = connect(settings, read_only=True)
    try:
        con.execute("USE memory")
        columns: list[str] = []
        out: list[tuple] = []
        bastions = [r[0] for r in con.execute(
            f"SELECT DISTINCT bastion FROM lake.{BATCHES} ORDER BY bastion").fetchall()]
        for bastion in bastions:
            for kind in schema.KINDS.values():
                skip = _NOT_SHIPPED.get(kind.table, set())
                extra = ", NULL::BLOB AS data" if skip else ""
                con.execute(f"CREATE OR REPLACE TEMP VIEW {kind.table} AS SELECT * EXCLUDE (bastion){extra} "
                            f"FROM lake.{kind.table} WHERE bastion = '{_quote(bastion)}'")
            for view in schema.VIEWS:
                con.execute(view.replace("CREATE OR REPLACE VIEW", "CREATE OR REPLACE TEMP VIEW", 1))
            if "pg_statements" in report.needs:
                reports._register_pg_statements(con)
            cols, rows = run_readonly(con, report.sql)
            columns = ["bastion", *cols]
            out += [(bastion, *r) for r in rows]
        if not columns:
            columns = ["bastion"]
        return columns, out
    except duckdb.Error as e:
        raise AuditQueryError(f"fleet report {name} failed: {e}") from e
    finally:
        con.close()


def compact(settings: LakeSettings, keep_days: int = 7) -> dict[str, int]:
    """Lake upkeep, from any one machine: merge the many small Parquet files that batches leave
    (one per table per batch) into larger ones, forget snapshots older than ``keep_days`` (time
    travel before that is gone) and delete the files only those snapshots used."""
    con = connect(settings)
    try:
        before = con.execute("SELECT count(*) FROM ducklake_list_files('lake', ?)", ["requests"]).fetchone()[0]
        con.execute("CALL ducklake_merge_adjacent_files('lake')")
        expired = con.execute("CALL ducklake_expire_snapshots('lake', older_than => now() - to_days(?))",
                              [int(keep_days)]).fetchall()
        removed = con.execute("CALL ducklake_cleanup_old_files('lake', cleanup_all => true)").fetchall()
        after = con.execute("SELECT count(*) FROM ducklake_list_files('lake', ?)", ["requests"]).fetchone()[0]
    except duckdb.Error as e:
        raise FleetError(f"fleet compact failed: {redact_dsn(str(e))}") from None
    finally:
        con.close()
    return {"requests_files_before": int(before), "requests_files_after": int(after),
            "snapshots_expired": len(expired), "files_deleted": len(removed)}


# --- verifying the lake ------------------------------------------------------------------

class FleetProblem(NamedTuple):
    bastion: str
    table: str | None
    seq: int
    kind: str       # modified | missing | duplicate | relinked | batch | head
    detail: str


@dataclass(frozen=True)
class FleetVerifyReport:
    bastions: dict[str, tuple[int, int, str | None]]   # bastion -> (rows checked, shipped up to seq, its hash)
    problems: list[FleetProblem]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: {len(self.bastions)} bastion(s) in the lake"]
        for b, (rows, seq, h) in sorted(self.bastions.items()):
            lines.append(f"  {b}: {rows} rows checked, shipped up to seq {seq} hash {h}")
        for p in self.problems:
            lines.append(f"  {p.kind:<9} bastion {p.bastion} {p.table or '?'} seq {p.seq}: {p.detail}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _LakeRow(NamedTuple):
    seq: int
    table: str
    prev: bytes
    hash: bytes
    canon: str | None     # None: content not shipped (recordings), only the links can be checked


def _lake_rows(con: duckdb.DuckDBPyConnection, table: str, bastion: str) -> Iterator[_LakeRow]:
    kind = schema.KIND_BY_TABLE[table]
    skip = _NOT_SHIPPED.get(table, set())
    names = [f.name for f in kind.fields if f.name not in skip]
    exprs = [f'epoch_us("{f.name}")' if f.type == "ts" else f'"{f.name}"' for f in kind.fields if f.name not in skip]
    blobs = frozenset(kind.bytes_columns)
    cur = con.cursor()
    try:
        cur.execute(f"SELECT chain_seq, chain_prev, chain_hash, {', '.join(exprs)} FROM lake.{table} "
                    "WHERE bastion = ? ORDER BY chain_seq", [bastion])
        while True:
            chunk = cur.fetchmany(10_000)
            if not chunk:
                return
            for r in chunk:
                canon = None if skip else canonical(names, r[3:], blobs)
                yield _LakeRow(r[0], table, bytes(r[1]), bytes(r[2]), canon)
    finally:
        cur.close()


def verify_lake(settings: LakeSettings, local_heads: Mapping[str, Mapping[int, str]] | None = None,
                *, max_problems: int = 1000) -> FleetVerifyReport:
    """Check every bastion's shipped chain in the lake: batches contiguous; each chain position
    present once; each row's content matches its hash and links to the row before; each batch's
    head hash is the hash of its last row. ``local_heads``: {bastion: {seq: hash hex}} from that
    bastion's own store (the batches' heads there), compared with what the lake holds."""
    con = connect(settings, read_only=True)
    problems: list[FleetProblem] = []
    summary: dict[str, tuple[int, int, str | None]] = {}
    notes: list[str] = []

    def problem(*args: Any) -> None:
        if len(problems) < max_problems:
            problems.append(FleetProblem(*args))

    try:
        bastions = [r[0] for r in con.execute(
            f"SELECT DISTINCT bastion FROM lake.{BATCHES} ORDER BY bastion").fetchall()]
        for bastion in bastions:
            batches = con.execute(f"SELECT seq_lo, seq_hi, rows, head_hash FROM lake.{BATCHES} WHERE bastion = ? "
                                  "ORDER BY seq_lo, seq_hi", [bastion]).fetchall()
            heads = {hi: (lo, n, h) for lo, hi, n, h in batches}
            expected_lo = batches[0][0]
            for lo, hi, n, _ in batches:
                if lo != expected_lo:
                    kind = "duplicate" if lo < expected_lo else "missing"
                    problem(bastion, BATCHES, lo, kind, f"batch {lo}..{hi} follows a batch ending at seq "
                            f"{expected_lo - 1}")
                expected_lo = max(expected_lo, hi + 1)
            if batches[0][0] != 1:
                notes.append(f"{bastion}: the lake starts at seq {batches[0][0]} (earlier rows were removed "
                             "by retention before shipping, or shipped elsewhere)")
            merged = heapq.merge(*(_lake_rows(con, t, bastion) for t in schema.CHAINED_TABLES),
                                 key=lambda r: r.seq)
            prev: _LakeRow | None = None
            count = 0
            in_batch = 0
            for row in merged:
                count += 1
                in_batch += 1
                if row.canon is not None and row_hash(row.prev, row.table, row.canon) != row.hash:
                    problem(bastion, row.table, row.seq, "modified",
                            "the lake's row no longer matches its chain hash (content changed after shipping)")
                if prev is not None:
                    if row.seq == prev.seq:
                        problem(bastion, row.table, row.seq, "duplicate", "this chain position is in the lake twice")
                    elif row.seq != prev.seq + 1:
                        problem(bastion, row.table, prev.seq + 1, "missing",
                                f"chain positions {prev.seq + 1}..{row.seq - 1} are not in the lake")
                    elif row.prev != prev.hash:
                        problem(bastion, row.table, row.seq, "relinked",
                                f"its link does not match the hash of seq {prev.seq} ({prev.table}): one of them "
                                "was rewritten after shipping")
                head = heads.get(row.seq)
                if head is not None:
                    lo, n, h = head
                    if row.hash.hex() != h:
                        problem(bastion, row.table, row.seq, "head",
                                f"batch {lo}..{row.seq} recorded head hash {h}, the lake's row has {row.hash.hex()}")
                    if local_heads and bastion in local_heads and row.seq in local_heads[bastion] \
                            and local_heads[bastion][row.seq] != h:
                        problem(bastion, row.table, row.seq, "head",
                                f"the bastion's own chain has hash {local_heads[bastion][row.seq]} at this seq, "
                                f"the lake's batch {h}")
                    if in_batch != n:
                        problem(bastion, BATCHES, lo, "batch",
                                f"batch {lo}..{row.seq} shipped {n} rows, the lake holds {in_batch}")
                    in_batch = 0
                prev = row
            last = batches[-1]
            if prev is None or prev.seq < last[1]:
                problem(bastion, None, (prev.seq + 1) if prev else last[0], "missing",
                        f"the batches reach seq {last[1]}, the lake's rows stop at {prev.seq if prev else 'nothing'}")
            summary[bastion] = (count, last[1], last[3])
    except duckdb.Error as e:
        raise FleetError(f"fleet verify failed: {redact_dsn(str(e))}") from None
    finally:
        con.close()
    return FleetVerifyReport(summary, problems, notes)


__all__ = ["FleetError", "FleetShipper", "FleetVerifyReport", "LakeSettings", "compact", "connect", "ensure_schema",
           "lake_mark", "read_progress", "run_report", "run_sql", "shipping", "verify_lake"]
