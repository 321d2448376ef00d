"""AuditStore: the single writer of the audit file.

Producers (the daemon's event loop, protocol fronts, the approval manager) call
:meth:`AuditStore.submit` from any thread. It validates the record on the caller's
thread (so a producer bug surfaces where it happens), appends it to a bounded
in-memory queue and returns; it never touches DuckDB. A preparer thread drains the
queue in batches (``batch_max`` events, or whatever arrived within
``flush_interval`` of the oldest pending event) and computes their hash chain; one
writer thread, the only user of the read-write connection, commits each batch as
one transaction, in order.

When the queue is full, ``on_full="refuse"`` makes submit return False at once
(the daemon then refuses new sessions rather than run unaudited) and
``on_full="block"`` waits for room (only for producers that are not an event loop).
Nothing accepted is ever dropped: if a batch cannot be committed the writer keeps
it, retries with back-off, and reports unhealthy; flush()/close() raise if events
remain unwritten.

Each start() is a writer *epoch*: it writes a chained ``writer_start`` row and
close() a ``writer_stop`` row. An epoch without a stop row ended abruptly (kill -9,
power loss); what was queued or in flight is missing — the last batch window
while the writer keeps up — and :func:`analytics.verify` lists it as a gap.

Readers: :meth:`query` runs a read-only statement on a separate cursor of the same
database while the writer runs. DuckDB cannot open the file from another process
while this one holds it, so other processes read through the daemon.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

import duckdb

from . import db, schema
from . import journal as _journal
from .errors import AuditClosedError, AuditError, AuditFlushTimeout, AuditRecordError, AuditWriterError
from .schema import RecordValidator
from .writer import ChainWriter, IngestMethod, next_epoch, writer_event

log = logging.getLogger(__name__)

_HIGH_WATER = 0.8
# DuckDB checkpoints when the WAL reaches this size. Its 16MB default makes the
# writer rewrite the tail row group every ~50,000 events and stall commits meanwhile;
# at 256MB sustained ingest roughly doubles (bench/results/audit.md). The cost is a
# longer WAL replay (seconds) when the file is opened after a crash.
_CHECKPOINT_THRESHOLD = "256MB"
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 2.0


def _unclean_previous(con: duckdb.DuckDBPyConnection) -> tuple[int, int, int] | None:
    """The last epoch, if it ended without a writer_stop row: (epoch, producer rows it holds, how
    many of those it replayed itself at its start). The rest are the first events it received,
    in order (the chain keeps the order of arrival)."""
    row = con.execute(
        "SELECT epoch, bool_or(event = 'writer_stop'), min(chain_seq) FILTER (event = 'writer_start'), "
        "coalesce(max(replayed_rows) FILTER (event = 'writer_start'), 0) "
        "FROM writer_events WHERE epoch = (SELECT max(epoch) FROM writer_events) GROUP BY epoch").fetchone()
    if row is None or row[1]:
        return None
    start = row[2] if row[2] is not None else 0
    tables = [t for t in db.existing_tables(con) if t != "writer_events"]
    union = " UNION ALL ".join(f"SELECT count(*) AS n FROM {t} WHERE chain_seq > {int(start)}" for t in tables)
    return int(row[0]), int(con.execute(f"SELECT sum(n) FROM ({union})").fetchone()[0] or 0), int(row[3])


class AuditStore:
    def __init__(
        self,
        path: str | Path,
        *,
        batch_max: int = 2000,
        flush_interval: float = 0.2,
        queue_max: int = 100_000,
        on_full: Literal["refuse", "block"] = "refuse",
        strict: bool = False,
        ingest: IngestMethod = "arrow",
        journal: bool | Literal["sync"] = False,
        accounted_by: str | None = None,
        threads: int | None = None,
    ):
        """``strict``: unknown record fields raise AuditRecordError (tests) instead of
        being dropped with a warning naming the field (production).
        ``ingest``: how batches enter DuckDB; "executemany" exists for the benchmark.
        ``journal``: open a :class:`analytics.journal.Journal` for this epoch (the audit
        process appends what it receives before acknowledging it); ``"sync"``: each append
        fdatasync-ed (``audit.journal_sync``: acknowledged events survive a power loss).
        Whatever the setting, a start after an epoch that ended abruptly replays that epoch's
        journal, if any.
        ``accounted_by``: who accounts for what such an epoch had not committed when there is
        no journal (the daemon that re-sends it, or its high-water marks); recorded in the
        writer_start row so verify does not count the epoch as a gap of unknown size.
        ``threads``: DuckDB's worker threads while only the writer works (its inserts, the
        checkpoints); None: DuckDB's default, one per CPU. An operator's reads (:meth:`query`,
        :meth:`verify`, reports and exports through :func:`analytics.db.reader`) raise it to one per
        CPU while they run. On a bastion the audit process shares the cores with the daemon: a
        batch insert spread over threads costs more CPU than it saves time (README, issue 20)."""
        if batch_max < 1 or queue_max < 1 or flush_interval <= 0:
            raise AuditError("batch_max and queue_max must be >= 1 and flush_interval > 0")
        if on_full not in ("refuse", "block"):
            raise AuditError("on_full must be 'refuse' or 'block'")
        if ingest not in ("arrow", "executemany"):
            raise AuditError("ingest must be 'arrow' or 'executemany'")
        if threads is not None and not 1 <= threads <= 1024:
            raise AuditError("threads must be between 1 and 1024")
        self.path = Path(path)
        self.batch_max = batch_max
        self.flush_interval = flush_interval
        self.queue_max = queue_max
        self.on_full = on_full
        self.strict = strict
        self._ingest = ingest
        self._high_water = max(1, int(queue_max * _HIGH_WATER))

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)       # writer waits here
        self._room = threading.Condition(self._lock)       # blocked producers wait here
        self._progress = threading.Condition(self._lock)   # flush() waits here
        self._pending: collections.deque = collections.deque()
        self._oldest = 0.0           # monotonic time the oldest pending event arrived
        self._submitted = 0
        self._written = 0
        self._refused = 0
        self._flush_wanted = False
        self._stopping = False
        self._running = False
        self._failure: BaseException | None = None   # last commit error, cleared on success
        self._dead = False                            # writer thread exited abnormally
        self._tasks: collections.deque = collections.deque()
        self._validator = RecordValidator(strict)

        self._con: duckdb.DuckDBPyConnection | None = None
        self._reader_root: duckdb.DuckDBPyConnection | None = None
        self._reader_lock = threading.Lock()
        self._threads = threads
        self._threads_now = threads
        self._readers = 0            # operator reads running (they get a thread per CPU)
        self._chain: ChainWriter | None = None
        self._thread: threading.Thread | None = None       # the writer: owns the connection
        self._preparer: threading.Thread | None = None     # takes batches, hashes them
        self._handoff: queue.Queue = queue.Queue(maxsize=2)
        self._taken = 0            # events handed to the preparer
        self._use_journal = journal
        self._accounted_by = accounted_by
        self.journal: Any = None   # analytics.journal.Journal while running with journal=True
        self.epoch: int | None = None
        self.migrations: list[tuple[int, int]] = []
        # After an epoch that ended abruptly: (its number, events it had received and committed,
        # events this writer replayed from its journal, None: it had none); None after a clean stop.
        self.recovered: tuple[int, int, int] | None = None

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        if self._running or self._thread is not None:
            raise AuditError("audit store already started")
        if self._stopping:
            raise AuditError("a closed AuditStore cannot be restarted; create a new one")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = db.connect(self.path, read_only=False)
        try:
            con.execute(f"SET checkpoint_threshold = '{_CHECKPOINT_THRESHOLD}'")
            if self._threads is not None:
                con.execute(f"SET threads = {int(self._threads)}")
            self.migrations = db.migrate(con)
            chain = ChainWriter(con, ingest=self._ingest)
            self.epoch = next_epoch(con)
            unclean = _unclean_previous(con)
            replay: list = []
            if unclean is not None:
                prev_epoch, held, own_replayed = unclean
                committed = held - own_replayed   # of what that epoch received (its journal's order)
                had_journal = bool(_journal.epoch_files(self.path, prev_epoch))
                replay = _journal.read_events(self.path, prev_epoch)[committed:]
                self.recovered = (prev_epoch, committed, len(replay) if had_journal else None)
                log.warning("audit epoch %d did not end cleanly: %d events were committed%s", prev_epoch, committed,
                            f", {len(replay)} more replayed from its journal" if had_journal else
                            f" ({self._accounted_by})" if self._accounted_by else
                            "; what it had not committed is lost (no journal)")
            first = [writer_event("migration", detail=f"schema {a} -> {b}", schema_version=b)
                     for a, b in self.migrations]
            recovered = ({"prev_epoch": self.recovered[0], "prev_epoch_rows": unclean[1],
                          "replayed_rows": self.recovered[2]} if self.recovered else {})
            if self.recovered and self.recovered[2] is None and self._accounted_by:
                recovered["detail"] = f"accounted: {self._accounted_by}"
            first.append(writer_event(
                "writer_start", epoch=self.epoch, schema_version=schema.SCHEMA_VERSION,
                batch_max=self.batch_max, flush_interval=self.flush_interval, queue_max=self.queue_max,
                **recovered))
            # The replayed events belong to this epoch: they count in its writer_stop row.
            chain.write(first + replay)
            self._submitted = self._written = len(replay)
            for stale in _journal.all_files(self.path):  # replayed (or of epochs that stopped cleanly)
                stale.unlink(missing_ok=True)
            if self._use_journal:
                self.journal = _journal.Journal(self.path, self.epoch, sync=self._use_journal == "sync")
        except BaseException:
            con.close()
            raise
        self._con, self._chain = con, chain
        self._reader_root = con.cursor()
        self._running = True
        self._thread = threading.Thread(target=self._guard, args=(self._write_loop,),
                                        name=f"audit-writer-{self.path.name}", daemon=True)
        self._preparer = threading.Thread(target=self._guard, args=(self._prepare_loop,),
                                          name=f"audit-prepare-{self.path.name}", daemon=True)
        self._thread.start()
        self._preparer.start()
        log.info("audit store %s started: epoch %d, head seq %d", self.path, self.epoch, chain.seq)


    def close(self) -> None:
        """Flush, write the epoch's stop row, stop the writer and close the file."""
        if self._thread is None:
            return
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            self._room.notify_all()
        self._preparer.join()
        self._thread.join()
        self._thread = self._preparer = None
        self._running = False
        with self._reader_lock:
            if self._reader_root is not None:
                self._reader_root.close()
                self._reader_root = None
        con, self._con = self._con, None
        if con is not None:
            con.close()
        with self._lock:
            unwritten = self._submitted - self._written
        if self.journal is not None:  # everything is committed (else the stop row is missing: keep it)
            self.journal.close(delete=not unwritten and not self._dead)
        if unwritten:
            raise AuditWriterError(
                f"audit store closed with {unwritten} events not written "
                f"(last error: {type(self._failure).__name__})")
        log.info("audit store %s closed (epoch %d)", self.path, self.epoch)

    def __enter__(self) -> AuditStore:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- producers -----------------------------------------------------------

    def submit(self, kind: str, record: Mapping[str, Any]) -> bool:
        """Queue one event. False: the queue is full or the writer is failing — refuse
        the work that needed auditing. Raises AuditRecordError for a malformed record."""
        spec, row = self.validate(kind, record)
        return self.submit_row(spec, row)

    def validate(self, kind: str, record: Mapping[str, Any]) -> tuple[schema.Kind, tuple[Any, ...]]:
        """The record as a row in column order; raises AuditRecordError naming the field."""
        return self._validator(kind, record)

    def submit_row(self, spec: schema.Kind, row: tuple[Any, ...]) -> bool:
        """Queue a row :meth:`validate` (or :func:`schema.normalize`) produced."""
        with self._lock:
            return self._submit_locked(spec, row)

    def submit_rows(self, items: Sequence[tuple[schema.Kind, tuple[Any, ...]]]) -> int:
        """:meth:`submit_row` for each (kind, row) in order, taking the lock once (the audit
        process queues a whole received batch): how many were not accepted."""
        refused = 0
        with self._lock:
            for spec, row in items:
                refused += not self._submit_locked(spec, row)
        return refused

    def _submit_locked(self, spec: schema.Kind, row: tuple[Any, ...]) -> bool:
        if not self._running or self._stopping:
            raise AuditClosedError("audit store is not running")
        if self._failure is not None or self._dead:
            self._refused += 1
            return False
        if len(self._pending) >= self.queue_max:
            if self.on_full == "refuse":
                self._refused += 1
                return False
            while len(self._pending) >= self.queue_max:
                if self._dead or self._stopping:
                    self._refused += 1
                    return False
                self._room.wait()
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append((spec, row))
        self._submitted += 1
        if len(self._pending) == self.batch_max:
            self._wake.notify()
        return True

    @property
    def healthy(self) -> bool:
        with self._lock:
            return (self._running and not self._dead and self._failure is None
                    and len(self._pending) < self._high_water)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"epoch": self.epoch, "submitted": self._submitted, "written": self._written,
                    "pending": len(self._pending), "refused": self._refused,
                    "head_seq": self._chain.seq if self._chain else None,
                    "failing": self._failure is not None or self._dead}

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every event submitted before the call is committed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._thread is None:
                raise AuditClosedError("audit store is not running")
            target = self._submitted
            self._flush_wanted = True
            self._wake.notify()
            while self._written < target:
                if self._dead:
                    raise AuditWriterError("audit writer thread died; events are not durable")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f" (writer failing: {type(self._failure).__name__})" if self._failure else ""
                    raise AuditFlushTimeout(
                        f"{target - self._written} audit events not durable after {timeout}s{why}")
                self._progress.wait(remaining)

    # --- the writer threads ---------------------------------------------------
    #
    # The preparer takes batches off the queue, assigns chain_seq and hashes and
    # builds Arrow tables (Python, holds the GIL); the writer inserts and commits them
    # (DuckDB, releases the GIL) in the same order. A handoff of two batches lets the
    # next batch be hashed while the previous one commits. Maintenance tasks travel
    # the same handoff, so they run after every batch taken before them.

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as e:  # a bug: keep the error visible and fail closed
            # Frames only: an exception's message may quote a record value.
            log.error("audit %s thread died: %s\n%s", threading.current_thread().name, type(e).__name__,
                      "".join(traceback.format_tb(e.__traceback__)))
            with self._lock:
                self._dead = True
                self._progress.notify_all()
                self._room.notify_all()
                self._wake.notify_all()

    def _hand_over(self, item: tuple) -> bool:
        while True:
            try:
                self._handoff.put(item, timeout=0.5)
                return True
            except queue.Full:
                if self._dead:
                    return False

    def _prepare_loop(self) -> None:
        chain = self._chain
        while True:
            with self._lock:
                job = self._take_batch()
            if job is None:
                self._hand_over(("stop",))
                return
            if job[0] == "task":
                _, fn, fut = job
                if not self._hand_over(("task", fn, fut)):
                    fut.set_exception(AuditWriterError("audit writer died"))
                    return
                try:
                    fut.exception()   # wait: the task may append to the chain itself
                except BaseException:  # cancelled; nothing ran
                    pass
                chain.reset()
                continue
            batch = job[1]
            if not self._hand_over(("batch", chain.prepare(batch))):
                return

    def _write_loop(self) -> None:
        chain = self._chain
        backoff = _RETRY_MIN_S
        gave_up = False
        while True:
            try:
                item = self._handoff.get(timeout=0.5)
            except queue.Empty:
                if self._dead:
                    return
                continue
            if item[0] == "stop":
                break
            if item[0] == "task":
                _, fn, fut = item
                if gave_up:
                    fut.set_exception(AuditWriterError("audit writer gave up after commit failures"))
                elif fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self._con, chain))
                    except BaseException as e:
                        fut.set_exception(e)
                continue
            batch = item[1]
            while not gave_up:
                try:
                    chain.commit(batch)
                except duckdb.Error as e:
                    # Keep the batch and retry; producers are refused meanwhile.
                    with self._lock:
                        first = self._failure is None
                        self._failure = e
                        stopping = self._stopping
                    if first:
                        log.error("audit writer cannot commit a batch of %d events: %s; retrying",
                                  batch.events, type(e).__name__)
                    if stopping and backoff >= _RETRY_MAX_S:
                        log.error("audit writer giving up at close: events remain unwritten")
                        gave_up = True
                        break
                    time.sleep(backoff)
                    backoff = min(backoff * 2, _RETRY_MAX_S)
                    continue
                backoff = _RETRY_MIN_S
                with self._lock:
                    if self._failure is not None:
                        log.warning("audit writer recovered")
                    self._failure = None
                    self._written += batch.events
                    self._progress.notify_all()
                break
        with self._lock:
            clean = self._submitted == self._written
        if clean:
            chain.write([writer_event("writer_stop", epoch=self.epoch, rows=self._written, last_seq=chain.seq)])

    def _take_batch(self) -> tuple | None:
        """Under the lock: wait until a batch or a task is due and take it. None: stop."""
        while True:
            if self._dead:
                return None
            n = len(self._pending)
            if self._tasks and self._tasks[0][2] <= self._taken:
                fn, fut, _ = self._tasks.popleft()
                return ("task", fn, fut)
            if n >= self.batch_max or (n and (self._flush_wanted or self._stopping)):
                break
            if n and time.monotonic() - self._oldest >= self.flush_interval:
                break
            if not n and self._stopping:
                return None
            if not n:
                self._flush_wanted = False
            timeout = self.flush_interval if not n else self._oldest + self.flush_interval - time.monotonic()
            self._wake.wait(max(timeout, 0.001))
        if n <= self.batch_max:
            batch = list(self._pending)
            self._pending.clear()
        else:
            pop = self._pending.popleft
            batch = [pop() for _ in range(self.batch_max)]
            self._oldest = time.monotonic()
        self._taken += len(batch)
        self._room.notify_all()
        return ("batch", batch)

    def run_in_writer(self, fn: Callable[[duckdb.DuckDBPyConnection, ChainWriter], Any],
                      timeout: float | None = None) -> Any:
        """Run ``fn(con, chain)`` on the writer thread after everything submitted so far
        is written (maintenance such as retention). Blocks the caller."""
        fut: Future = Future()
        with self._lock:
            if not self._running or self._stopping:
                raise AuditClosedError("audit store is not running")
            self._tasks.append((fn, fut, self._submitted))
            self._flush_wanted = True
            self._wake.notify()
        return fut.result(timeout)

    # --- readers -----------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the live database for the calling thread (read it only)."""
        with self._reader_lock:
            if self._reader_root is None:
                raise AuditClosedError("audit store is not running")
            return self._reader_root.cursor()

    @contextlib.contextmanager
    def reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for an operator's read: DuckDB gets a thread per CPU while any such read
        runs, and ``threads`` again once the last one ends."""
        cur = self.cursor()
        try:
            self._reader_threads(+1)
            try:
                yield cur
            finally:
                self._reader_threads(-1)
        finally:
            cur.close()

    def _reader_threads(self, step: int) -> None:
        with self._reader_lock:
            self._readers += step
            if self._threads is None or self._reader_root is None:
                return   # DuckDB's default: a thread per CPU all along
            want = max(os.cpu_count() or 1, self._threads) if self._readers else self._threads
            if want != self._threads_now:
                self._reader_root.execute(f"SET threads = {int(want)}")
                self._threads_now = want

    def query(self, sql: str, params: Sequence | None = None, *, max_rows: int | None = None,
              timeout: float | None = None) -> tuple[list[str], list[tuple]]:
        """Run one read-only statement against the live store (any thread, not the
        event loop: it blocks). ``timeout`` interrupts it after that many seconds."""
        from .sql import run_readonly

        with self.reading() as cur:
            return run_readonly(cur, sql, params, max_rows=max_rows, timeout=timeout)

    def verify(self, anchors: dict[int, str] | None = None):
        """Verify the chain of the live file (rows committed so far); ``anchors``: chain positions
        kept off the host (analytics.verify.parse_anchors)."""
        from . import highwater
        from .verify import verify_connection

        with self.reading() as cur:
            return verify_connection(cur, live_epoch=self.epoch, marks=highwater.read(self.path), anchors=anchors)
