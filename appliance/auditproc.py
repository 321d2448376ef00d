"""The audit store in a process of its own.

Hashing the chain, building Arrow batches and inserting them into DuckDB cost about as
much CPU per request as the whole protocol front, and in the daemon's process that work
holds the GIL the event loop needs: every batch the writer prepared stalled every
session. So the daemon runs :class:`analytics.AuditStore` in a child process
(``_child_main``, started through ``_CHILD_BOOT``) and talks to it over two private socket pairs:

* **events** (daemon → child): pickled lists of already-validated rows. ``submit``
  validates a record on the caller's thread, exactly as the store does, so a producer's
  bug still surfaces where it happens; a sender thread ships what accumulated every few
  milliseconds. The child also redacts request rows (statement constants, parameters and
  error texts a content detector flags) before they reach the store, off the event loop.
* **calls** (both ways): ``(id, method, args)`` requests — flush, query, verify, report,
  export, retention, close — answered by ``("reply", id, ok, value)``; the child also
  sends ``("status", stats)`` whenever what it has written changes.

Back-pressure and failure keep the store's contract: the daemon counts events it
accepted and the child has not committed; beyond ``queue_max`` a submit is refused
(``on_full="refuse"``) or waits (``"block"``). If the child dies, ``healthy`` is false, so
the daemon refuses statements and new sessions rather than run unaudited (fail closed); a
call in flight raises :class:`analytics.AuditWriterError`. The daemon keeps every event it
shipped until the child reports it committed, and re-sends what the dead child had not
committed to the next one (which counts what its predecessor's epoch holds), so a dead
audit process loses nothing while the daemon lives. If the daemon dies, the child sees
the events socket close, commits what it received, writes its ``writer_stop`` row and exits.

Strict mode (``journal=True``, ``audit.mode = "strict"``): the child appends each batch it
receives to a journal file (:mod:`analytics.journal`) and then acknowledges it
(an 8-byte count on the events socket, read by the event loop); :meth:`AuditProcess.submit_acked` gives the caller a future that resolves
on that acknowledgement, and ships at once. Whoever waits on it can rely on the event
surviving the death of the daemon, of the audit process, or of both.

The daemon's high-water file (:mod:`analytics.highwater`) holds what it issued per session
and the committed head, so a restart after the daemon died can record what was lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from analytics import errors as audit_errors
from analytics import highwater, schema
from analytics.errors import AuditClosedError, AuditError, AuditWriterError
from analytics.schema import RecordValidator
from appliance.policy.masking import DetectorSettings
from appliance.policy.redact import AuditRedactor

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
_ACK = struct.Struct(">Q")   # strict mode: the child's count of events journaled, on the events socket
# Group commit: batches already waiting on the events socket join the one just received, up to
# this many events, and are journaled (fdatasync-ed once with audit.journal_sync) and
# acknowledged together.
_GROUP_MAX = 2000
_HIGH_WATER = 0.8
# Past this share of queue_max (audit.pace_mark), new requests wait (up to audit.pace_wait
# seconds) for the backlog to fall below it again before they are decided: bots slow down to the
# pace the store commits at instead of running ahead of it until the high water refuses them.
PACE_MARK = 0.4
PACE_WAIT_S = 0.5
_FRAME = "#frame"          # the handle's buffer: (_FRAME, a worker's pickled rows, their count)
_SEND_BATCH = 512          # events that make the sender ship at once
_SEND_INTERVAL_S = 0.01    # otherwise it ships what accumulated this often
_RECENT_TEXTS = 32_768     # statement texts per generation the child keeps for recordings (~6 s of pgbench)
# Waking the sender per event would hand the GIL back and forth with the event loop thousands
# of times a second (measured: four futex calls per request); a timer wakes it a hundred times.
_FLEET_ENV = "BOTWARDEN_FLEET_SETTINGS"   # the lake's settings for the child (analytics.fleet)
_START_TIMEOUT_S = 120.0   # migrations of a large file can take a while
_STOP_TIMEOUT_S = 60.0
_EXIT_SEEN_S = 0.5         # a failed send waits this long to learn whether the child exited


# The child's entry: its CPU priority is set before anything is imported, because DuckDB and
# Arrow start native threads at import and a thread keeps the priority it was created with.
_CHILD_BOOT = """\
import json, os, signal, sys
signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background process group may log to the terminal
nice = json.loads(sys.argv[3]).get("nice")
if nice is not None and os.getpriority(os.PRIO_PROCESS, 0) != nice:
    os.setpriority(os.PRIO_PROCESS, 0, nice)
from appliance.auditproc import _child_main
sys.exit(_child_main(sys.argv[1:]))
"""


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def _events_in(batch: list) -> int:
    """The events in a batch of the handle's buffer: (kind, row) items, ("!…", settings) notes
    for the child (not events), and (_FRAME, pickled rows, count) from workers."""
    n = 0
    for item in batch:
        if item[0] is _FRAME:
            n += item[2]
        elif item[0][0] != "!":
            n += 1
    return n


def _frames(batch: list) -> bytes:
    """A batch as the child reads it: runs of items pickled as one frame each; a worker's frame
    goes as it came (it is already a pickled list of (kind, row))."""
    out: list[bytes] = []
    run: list = []
    for item in batch:
        if item[0] is _FRAME:
            if run:
                out.append(_frame(run))
                run = []
            out.append(_LEN.pack(len(item[1])) + item[1])
        else:
            run.append(item)
    if run:
        out.append(_frame(run))
    return b"".join(out)


def _opened(batch: list) -> list:
    """A batch with each worker frame unpickled into its items (re-sending after a crash)."""
    if not any(item[0] is _FRAME for item in batch):
        return batch
    items: list = []
    for item in batch:
        if item[0] is _FRAME:
            items.extend(pickle.loads(item[1]))  # noqa: S301 - a worker of this daemon pickled it
        else:
            items.append(item)
    return items


def _send(sock: socket.socket, obj: Any) -> None:
    sock.sendall(_frame(obj))


def _send_waiting(sock: socket.socket, data: bytes, while_waiting: Any = None) -> None:
    """sendall for the events socket, whose file is non-blocking once the event loop reads the
    child's acknowledgements from it (libuv and asyncio set O_NONBLOCK): wait until it is
    writable instead of failing with EAGAIN; ``while_waiting()`` runs every 50 ms meanwhile."""
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            select.select([], [sock], [], 0.05)
            if while_waiting is not None:
                while_waiting()
            continue
        view = view[n:]


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    """The next message, or None at end of stream."""
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    body = _recv_exact(sock, _LEN.unpack(head)[0])
    if body is None:
        return None
    return pickle.loads(body)  # noqa: S301 - our own child/parent over a private socket pair


def _error_from(payload: tuple[str, str]) -> AuditError:
    """The child's exception as the same analytics error class, or AuditError."""
    name, message = payload
    cls = getattr(audit_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, AuditError):
        return cls(message)
    return AuditError(message)


class AuditProcess:
    """The daemon's handle on the audit store running in a child process.

    The same surface the daemon uses of :class:`analytics.AuditStore` (submit, healthy,
    stats, flush, query, verify, close) plus report, export and retention, which run in
    the child because only it may open the file.
    """

    def __init__(self, path: str | Path, *, batch_max: int = 2000, flush_interval: float = 0.2,
                 queue_max: int = 100_000, on_full: Literal["refuse", "block"] = "refuse",
                 strict: bool = False, restart_after: float | None = 1.0, nice: int | None = None,
                 journal: bool | Literal["sync"] = False, highwater: bool = False, ack_timeout: float = 10.0,
                 stream: Mapping[str, Any] | None = None, log_format: str = "text",
                 fleet: Mapping[str, Any] | None = None, threads: int | None = None,
                 pace_mark: float = PACE_MARK, pace_wait: float = PACE_WAIT_S):
        """``restart_after``: seconds before a dead audit process is started again (doubling
        up to 30 s while it keeps failing); None leaves it dead. ``nice``: the child's CPU
        priority (the daemon passes the one it was started with; None inherits the caller's).
        ``journal``: the child journals and acknowledges what it receives (strict mode);
        ``"sync"``: each journal append is fdatasync-ed before its acknowledgement.
        ``highwater``: keep the daemon's high-water file beside the store (``self.marks``).
        ``ack_timeout``: a :meth:`submit_acked` future not acknowledged by then fails.
        ``stream``: ``[audit.stream]`` as a dict: the child sends each committed row to SIEMs
        (:mod:`appliance.auditstream`). ``log_format``: the child's log lines ("text" or "json").
        ``fleet``: the lake's settings (analytics.fleet.LakeSettings fields): the child ships
        committed rows there (analytics.fleet.shipping). ``threads``: DuckDB's threads for the
        store's writer (``audit.threads``; analytics.AuditStore). ``pace_mark``, ``pace_wait``: pacing
        (:meth:`room`; ``audit.pace_mark``, ``audit.pace_wait``)."""
        if batch_max < 1 or queue_max < 1 or flush_interval <= 0:
            raise AuditError("batch_max and queue_max must be >= 1 and flush_interval > 0")
        if on_full not in ("refuse", "block"):
            raise AuditError("on_full must be 'refuse' or 'block'")
        self.path = Path(path)
        self.options = {"path": str(self.path), "batch_max": batch_max, "flush_interval": flush_interval,
                        "strict": strict, "log_level": logging.getLogger().getEffectiveLevel(), "nice": nice,
                        "journal": journal, "accounted_by": None,
                        "stream": dict(stream) if stream else None, "log_format": log_format,
                        "threads": threads}
        # Not in the child's argv (any local user can read a command line): the catalog's DSN may
        # hold a password. The child's environment is readable by its own uid only.
        self._fleet = json.dumps(dict(fleet)) if fleet else None
        self.journal = journal
        self.ack_timeout = ack_timeout
        self._kick_pending = False   # a _kick is scheduled on the event loop (submit_acked)
        # Strict mode runs its round trip on the event loop: _kick sends the batch (non-blocking; the
        # sender thread finishes what does not fit) and the loop reads the child's acknowledgements
        # from the events socket itself, so no thread hand-off (and no GIL wait) sits in between.
        self._send_lock = threading.Lock()     # one frame at a time on the events socket
        self._partial: tuple[socket.socket, bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: socket.socket | None = None   # the events socket the loop reads acks from
        self._ackbuf = b""
        self.queue_max = queue_max
        self.on_full = on_full
        self.strict = strict
        self._high_water = max(1, int(queue_max * _HIGH_WATER))
        if not 0 < pace_mark < _HIGH_WATER or pace_wait <= 0:
            raise AuditError(f"pace_mark must be above 0 and below {_HIGH_WATER}, pace_wait above 0")
        self._pace_water = max(1, int(queue_max * pace_mark))
        self.pace_wait = pace_wait
        self._paced: collections.deque = collections.deque()   # (future, loop, since) waiting for room
        self._pace_waits = 0     # requests that waited for room (the status's audit.paced)
        self._lock = threading.Lock()
        self._ship = threading.Condition(self._lock)      # the sender waits here
        self._room = threading.Condition(self._lock)      # blocked producers and flush() wait here
        self._buf: list = []
        self._ship_now = False   # flush() and set_redaction() want the buffer shipped at once
        # Event counts are global (across children): the current child's own counts start after
        # _child_base, the events its predecessors' epochs hold.
        self._submitted = 0      # events accepted by submit
        self._sent = 0           # events handed to the current child (or its predecessors)
        self._written = 0        # events committed
        self._acked = 0          # events journaled and acknowledged (strict mode)
        self._lost = 0           # events the child could not accept (its store was failing)
        self._lost_before = 0    # ... of which by earlier children
        self._child_base = 0
        self._inflight: collections.deque = collections.deque()   # (last event index, batch) not yet committed
        self._waiters: collections.deque = collections.deque()    # (event index, future, loop) until acked
        self._resent = 0         # events re-sent to a new child after one died
        self._mark_releases: collections.deque = collections.deque()  # (event index, high-water slot)
        self._refused = 0
        self._child_stats: dict[str, Any] = {}
        self._failing = False
        self._dead: str | None = None       # why the child is gone, once it is
        self._closing = False
        self._running = False
        self._validate = RecordValidator(strict)
        self.restart_after = restart_after
        self._restart_lock = threading.Lock()   # held while a new child is spawned; close() waits
        self._restarting = False
        self._restarts = 0
        self._redaction: Any = None
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count(1)
        self._call_lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._events: socket.socket | None = None
        self._rpc: socket.socket | None = None
        self._sender: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self.epoch: int | None = None
        self.migrations: list[tuple[int, int]] = []
        self.recovered: tuple | None = None    # the child's store recovered an abrupt epoch: see AuditStore
        self.pid: int | None = None
        self._use_highwater = highwater
        self.marks: Any = None                 # analytics.highwater.HighWaterFile while running
        self.previous_marks: Any = None        # what the last daemon left, if it did not stop cleanly

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Spawn the child and wait until its store is open (or raise its error)."""
        if self._proc is not None:
            raise AuditError("audit process already started")
        if self._use_highwater:
            left = highwater.read(self.path)
            if left is not None and left.running:
                self.previous_marks = left
                self.options["accounted_by"] = (f"the high-water marks of daemon pid {left.pid}, which stopped "
                                                "abruptly (see audit_losses)")
        self._proc, self._events, self._rpc, info = self._spawn()  # sets self.pid
        self.options["accounted_by"] = None
        self.epoch, self.migrations, self._child_stats = info["epoch"], info["migrations"], info["stats"]
        self.recovered = info.get("recovered")
        self._running = True
        self._reader = threading.Thread(target=self._read_loop, args=(self._proc, self._rpc),
                                        name="audit-process-reader", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="audit-process-sender", daemon=True)
        self._reader.start()
        self._sender.start()
        log.info("audit store %s runs in process %d (epoch %d)", self.path, self.pid, self.epoch)

    def account_previous_crash(self) -> list[Any]:
        """After a daemon that stopped abruptly: record, per session its high-water marks name,
        what never reached the store (``audit_losses`` rows, and a ``session_end`` for a session
        that never got one), then start this daemon's own marks. Returns the shortfalls."""
        from datetime import datetime, timezone

        found: list[Any] = []
        self.crash_closed: list[str] = []  # sessions closed here; the runtime revokes their leases
        marks = self.previous_marks
        if marks is not None:
            found, open_sessions = self._call("shortfalls", marks, timeout=120)
            now = datetime.now(timezone.utc)
            issued = {m.session_id: m.issued_seq for m in marks.sessions}
            for sf in found:
                self.submit("audit_loss", {
                    "ts": now, "cause": "daemon_crash", "session_id": sf.session_id, "issued_seq": sf.issued_seq,
                    "recorded_seq": sf.recorded_seq, "missing": sf.missing,
                    "session_end_missing": sf.session_end_missing,
                    "detail": f"daemon pid {marks.pid} stopped abruptly; events it issued never reached the store"})
            for sid in open_sessions:  # cut by the crash: close the session's row (its lease: Runtime's sweep)
                self.submit("session_end", {
                    "session_id": sid, "ts": now, "outcome": "crashed", "requests": issued[sid],
                    "error": f"botwarden (pid {marks.pid}) stopped without ending this session "
                             "(killed, crashed or power loss); the session was cut"})
                self.crash_closed.append(sid)
            self.flush(60)
            if found:
                log.warning("the previous daemon (pid %d) stopped abruptly: %d session(s) lack %d audit "
                            "event(s) (recorded in audit_losses; `botwarden audit verify` lists them)",
                            self.previous_marks.pid, len(found), sum(f.missing for f in found))
            self.previous_marks = None
        if self._use_highwater and self.marks is None:
            self.marks = highwater.HighWaterFile(self.path)
            st = self._child_stats
            if st.get("head_seq") is not None:
                self.marks.set_head(self.epoch or 0, st["head_seq"])
        return found

    def _spawn(self) -> tuple[subprocess.Popen, socket.socket, socket.socket, dict[str, Any]]:
        ev_parent, ev_child = socket.socketpair()
        rpc_parent, rpc_child = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if self._fleet:
            env[_FLEET_ENV] = self._fleet
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOT, str(ev_child.fileno()), str(rpc_child.fileno()),
                 json.dumps({k: v for k, v in self.options.items()})],
                pass_fds=(ev_child.fileno(), rpc_child.fileno()), stdin=subprocess.DEVNULL, env=env,
                # Its own process group, so a Ctrl-C meant for the daemon does not reach it, but the
                # daemon's session: a new session is a new scheduler autogroup (Linux with
                # kernel.sched_autogroup_enabled, tasks in the root cpu cgroup), and between
                # autogroups nice values count for nothing, so `appliance.nice` would not put the
                # event loop ahead of this process's batches (docs/architecture.md, CPU priority).
                process_group=0)
        finally:
            ev_child.close()
            rpc_child.close()
        self.pid = proc.pid
        rpc_parent.settimeout(_START_TIMEOUT_S)
        try:
            first = _recv(rpc_parent)
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            first = ("error", ("AuditError", f"the audit process did not start: {e}"))
        if not first or first[0] != "ready":
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            ev_parent.close()
            rpc_parent.close()
            if first and first[0] == "error":
                raise _error_from(first[1])
            raise AuditWriterError(f"the audit process exited while starting (code {proc.returncode})")
        rpc_parent.settimeout(None)
        return proc, ev_parent, rpc_parent, first[1]

    def close(self) -> None:
        """Ship what is left, have the child write its stop row and exit; raise if events
        were left unwritten."""
        if self._proc is None or self._closing:
            return
        with self._lock:
            self._closing = True
            self._ship.notify_all()
            self._room.notify_all()
            self._release_paced(everyone=True)
        with self._restart_lock:
            pass  # a restart in progress finishes (or gives up) first
        self._sender.join()
        if self._dead is None:
            try:  # end of the events stream: the child commits what it has, writes its stop row, exits
                self._events.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        try:
            code = self._proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("the audit process did not exit within %ds; killing it", _STOP_TIMEOUT_S)
            self._kill()
            code = self._proc.returncode
        self._running = False
        self._reader.join(5)  # the child has exited: the reader takes its last status, then sees EOF
        self._unwatch()
        for s in (self._events, self._rpc):
            if s is not None:
                s.close()
        with self._lock:
            unwritten = self._submitted - self._written - self._lost
            waiters, self._waiters = list(self._waiters), collections.deque()
        self._fail_waiters(waiters, "the audit store closed")
        if code != 0 and not unwritten:
            raise AuditWriterError(f"the audit process exited with code {code} while closing the store")
        if unwritten:
            raise AuditWriterError(f"audit store closed with {unwritten} events not written"
                                   + (f" ({self._lost} refused by the failing store)" if self._lost else "")
                                   + (f" ({self._dead})" if self._dead else ""))
        if self.marks is not None:  # a clean stop: the next start has nothing to account for
            self.marks.close()
        log.info("audit store %s closed (epoch %d)", self.path, self.epoch)

    def _unwatch(self) -> None:
        """Take the events socket out of the event loop's selector before it is closed."""
        loop = self._loop
        if loop is None or self._watched is None:
            return
        done = threading.Event()

        def unwatch() -> None:
            self._watch(None)
            done.set()
        try:
            if loop.is_running() and threading.current_thread() is not threading.main_thread():
                loop.call_soon_threadsafe(unwatch)
                done.wait(5)
            else:
                unwatch()
        except (RuntimeError, ValueError):  # the loop (or the socket) is closed already
            pass

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> AuditProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- producers -----------------------------------------------------------

    def submit(self, kind: str, record: Mapping[str, Any]) -> bool:
        """Queue one event. False: too many events are not yet written or the audit process
        is failing — refuse the work that needed auditing. Raises AuditRecordError for a
        malformed record."""
        _, row = self._validate(kind, record)
        with self._lock:
            if not self._running or self._closing:
                raise AuditClosedError("audit store is not running")
            # While a dead child is being replaced, events wait for the next one (statements are
            # refused meanwhile: `healthy` is false); without a restart they would wait forever.
            if self._failing or (self._dead is not None and not self._restarting):
                self._refused += 1
                return False
            if self._submitted - self._written - self._lost >= self.queue_max:
                if self.on_full == "refuse":
                    self._refused += 1
                    return False
                while self._submitted - self._written - self._lost >= self.queue_max:
                    if self._dead is not None or self._closing:
                        self._refused += 1
                        return False
                    self._room.wait()
            self._buf.append((kind, row))
            self._submitted += 1
            if len(self._buf) == _SEND_BATCH:
                self._ship.notify()
        return True

    def submit_frame(self, frame: bytes, count: int) -> bool:
        """Queue ``count`` events another process (a worker) validated and pickled as the child
        takes them (a list of (kind, row)): sent on as they are, never opened here. All or none:
        False as :meth:`submit` refuses."""
        with self._lock:
            if not self._running or self._closing:
                raise AuditClosedError("audit store is not running")
            if self._failing or (self._dead is not None and not self._restarting):
                self._refused += count
                return False
            if self._submitted - self._written - self._lost >= self.queue_max:
                if self.on_full == "refuse":
                    self._refused += count
                    return False
                while self._submitted - self._written - self._lost >= self.queue_max:
                    if self._dead is not None or self._closing:
                        self._refused += count
                        return False
                    self._room.wait()
            self._buf.append((_FRAME, frame, count))
            self._submitted += count
            if len(self._buf) >= _SEND_BATCH:
                self._ship.notify()
        return True

    def submit_acked(self, kind: str, record: Mapping[str, Any],
                     loop: asyncio.AbstractEventLoop) -> asyncio.Future | None:
        """Queue one event and ship it at once; the future (of ``loop``) resolves once the audit
        process has journaled it (it then survives the death of either process), or fails if
        that process dies first. None: refused (as :meth:`submit` returning False)."""
        if not self.journal:
            raise AuditError("submit_acked needs the journal (audit.mode = 'strict')")
        _, row = self._validate(kind, record)
        fut = loop.create_future()
        with self._lock:
            if not self._running or self._closing:
                raise AuditClosedError("audit store is not running")
            if self._dead is not None or self._failing or self._submitted - self._written - self._lost >= self.queue_max:
                self._refused += 1
                return None
            self._buf.append((kind, row))
            self._submitted += 1
            self._waiters.append((self._submitted, fut, loop, time.monotonic()))
        self._ship_soon(loop)
        return fut

    def submit_frame_acked(self, frame: bytes, count: int, acked: int,
                           loop: asyncio.AbstractEventLoop) -> asyncio.Future | None:
        """:meth:`submit_frame` for a frame holding ``acked`` rows that wait for the journal (a
        worker's request_start rows): shipped at once, the future resolves once the audit process
        journaled the whole frame. None: refused whole, as :meth:`submit_acked` refuses (never
        waits for room); the ``acked`` rows are counted refused, the caller deals with the rest."""
        if not self.journal:
            raise AuditError("submit_frame_acked needs the journal (audit.mode = 'strict')")
        fut = loop.create_future()
        with self._lock:
            if not self._running or self._closing:
                raise AuditClosedError("audit store is not running")
            if self._dead is not None or self._failing or self._submitted - self._written - self._lost >= self.queue_max:
                self._refused += acked
                return None
            self._buf.append((_FRAME, frame, count))
            self._submitted += count
            self._waiters.append((self._submitted, fut, loop, time.monotonic()))
        self._ship_soon(loop)
        return fut

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``'s thread, once it runs: that loop reads the child's acknowledgements from now
        on. In strict mode the child acknowledges every frame it journals, waited for or not; left
        unread, those 8-byte counts fill the events socket after a few hundred frames, the child
        blocks sending the next one and stops reading events, and every session then waits for an
        audit store that never catches up. So they are read from the start, not from the first
        record that waits: a bot sending only plain reads never submits one."""
        if not self.journal:
            return
        self._loop = loop
        if self._watched is not self._events:
            self._watch(self._events)

    def _ship_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """After a record that waits for its acknowledgement was queued (the lock released)."""
        self.attach(self._loop or loop)  # a caller that did not attach a loop at its start
        if not self._kick_pending:
            # Group commit: the batch goes once the loop has run the callbacks of this round of I/O,
            # so the records of every session decided meanwhile travel (and are acked) together.
            self._kick_pending = True
            loop.call_soon(self._kick)

    @property
    def behind(self) -> bool:
        """Past the pace mark: new requests wait for room (:meth:`room`); workers learn it from the
        supervisor."""
        return self._submitted - self._written - self._lost >= self._pace_water

    def room(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Pacing: None while fewer than ``pace_mark`` of ``queue_max`` events wait to be
        committed; otherwise a future of ``loop`` (the running one when None) that resolves (never
        fails) once they are fewer again, once the store is gone or closing, or after ``pace_wait``
        seconds — the caller then decides its request as usual, refused past the high water. Read
        without the lock first: the hot path pays one comparison (no loop lookup either: asyncio's
        costs a getpid system call)."""
        if self._submitted - self._written - self._lost < self._pace_water:
            return None
        with self._lock:
            if (self._submitted - self._written - self._lost < self._pace_water or self._dead is not None
                    or self._closing or not self._running):
                return None
            loop = loop or asyncio.get_running_loop()
            fut = loop.create_future()
            self._paced.append((fut, loop, time.monotonic()))
            self._pace_waits += 1
        return fut

    def count_paced(self, n: int) -> None:
        """Requests a worker held for room (its own pacing, from what the supervisor told it)."""
        with self._lock:
            self._pace_waits += n

    def _release_paced(self, everyone: bool = False) -> None:
        """Under the lock: resolve the futures of requests waiting for room that may go now (all
        of them once there is room, the store is gone or ``everyone``; else those waiting longest)."""
        paced = self._paced
        if not paced:
            return
        if everyone or self._dead is not None or self._closing or (
                self._submitted - self._written - self._lost < self._pace_water):
            go, self._paced = list(paced), collections.deque()
        else:
            limit = time.monotonic() - self.pace_wait
            go = []
            while paced and paced[0][2] <= limit:
                go.append(paced.popleft())
        by_loop: dict[Any, list] = {}
        for fut, loop, _t in go:
            by_loop.setdefault(loop, []).append(fut)
        for loop, futs in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._resolve, futs)
            except RuntimeError:  # that loop is closed
                pass

    def _kick(self) -> None:
        """On the event loop: send what is buffered now, without blocking; the sender thread takes
        over when it is busy sending or the socket is full."""
        self._kick_pending = False
        if not self._send_lock.acquire(blocking=False):
            self._wake_sender()
            return
        try:
            with self._lock:
                if self._partial is not None or self._dead is not None or self._closing or not self._buf:
                    self._ship_now = True
                    self._ship.notify()
                    return
                batch, self._buf = self._buf, []
                events_sock = self._events
                self._sent += _events_in(batch)
                self._inflight.append((self._sent, batch))
            data = _frames(batch)
            try:
                n = events_sock.send(data, socket.MSG_DONTWAIT)
            except OSError:  # full (BlockingIOError) or broken: the sender thread sends it, or finds out
                n = 0
            if n < len(data):
                self._partial = (events_sock, data[n:])
                self._wake_sender()
        finally:
            self._send_lock.release()

    def _wake_sender(self) -> None:
        with self._lock:
            self._ship_now = True
            self._ship.notify()

    def _watch(self, sock: socket.socket | None) -> None:
        """On the event loop: read acknowledgements from ``sock`` (the current events socket)."""
        loop = self._loop
        old, self._watched = self._watched, sock
        self._ackbuf = b""
        if old is not None and old.fileno() >= 0:
            loop.remove_reader(old.fileno())
        if sock is not None:
            loop.add_reader(sock.fileno(), self._on_acks, sock)

    def _on_acks(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the child is gone: the reader thread handles that
            if self._watched is sock:
                self._loop.remove_reader(sock.fileno())
                self._watched = None
            return
        buf = self._ackbuf + data
        whole = len(buf) - len(buf) % _ACK.size
        self._ackbuf = buf[whole:]
        if whole and sock is self._events:
            (received,) = _ACK.unpack_from(buf, whole - _ACK.size)
            with self._lock:
                self._acked = acked = self._child_base + received
                waiters = self._waiters
                done = []
                while waiters and waiters[0][0] <= acked:
                    done.append(waiters.popleft()[1])
            self._resolve(done)

    @staticmethod
    def _resolve(futs: list) -> None:
        for f in futs:
            if not f.done():
                f.set_result(None)

    @staticmethod
    def _fail(futs: list, why: str) -> None:
        for f in futs:
            if not f.done():
                f.set_exception(AuditWriterError(why))

    def _fail_waiters(self, waiters: list, why: str) -> None:
        by_loop: dict[Any, list] = {}
        for _, fut, loop, _t in waiters:
            by_loop.setdefault(loop, []).append(fut)
        for loop, futs in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._fail, futs, why)
            except RuntimeError:  # that loop is closed
                pass

    def release_mark(self, slot: int) -> None:
        """Free a session's high-water slot once every event submitted so far is committed."""
        with self._lock:
            self._mark_releases.append((self._submitted, slot))

    def set_redaction(self, settings: Any) -> None:
        """Detector settings for request rows from now on (ordered with the events)."""
        with self._lock:
            self._redaction = settings
            self._buf.append(("!redaction", settings))
            self._ship_now = True
            self._ship.notify()

    def _expire_waiters(self) -> None:
        """Under the lock: fail the acknowledgements a stalled audit process has kept waiting (and
        let paced requests that waited their time go on to be decided)."""
        if self._paced:
            self._release_paced()
        waiters = self._waiters
        if waiters and time.monotonic() - waiters[0][3] > self.ack_timeout:
            limit = time.monotonic() - self.ack_timeout
            late = []
            while waiters and waiters[0][3] <= limit:
                late.append(waiters.popleft())
            self._fail_waiters(late, f"the audit process did not acknowledge the record within {self.ack_timeout:g}s")

    def _expire_waiters_locked(self) -> None:
        with self._lock:
            self._expire_waiters()

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                self._expire_waiters()
                if len(self._buf) < _SEND_BATCH and not self._closing and not self._ship_now:
                    self._ship.wait(_SEND_INTERVAL_S)
                if self._dead is not None:
                    if not self._closing:
                        self._ship.wait(_SEND_INTERVAL_S)
                        continue  # keep them for the next child
                    return  # closing with a dead child: close() reports what was not written
            with self._send_lock:
                if self._partial is not None:  # the rest of a frame the event loop began
                    sock, rest = self._partial
                    self._partial = None
                    if sock is self._events:
                        try:
                            _send_waiting(sock, rest, self._expire_waiters_locked)
                        except OSError as e:
                            self._mark_dead(self._send_failed(e))
                            continue
                with self._lock:
                    self._ship_now = False
                    batch, self._buf = self._buf, []
                    if not batch and self._closing:
                        return
                    if not batch or self._dead is not None:
                        if batch:
                            self._buf[:0] = batch
                        continue
                    events_sock = self._events
                    # Kept until the child reports it committed: if it dies first, the next one gets it.
                    self._sent += _events_in(batch)
                    self._inflight.append((self._sent, batch))
                try:
                    _send_waiting(events_sock, _frames(batch), self._expire_waiters_locked)
                except OSError as e:
                    with self._lock:
                        replaced = events_sock is not self._events
                    if not replaced:
                        self._mark_dead(self._send_failed(e))
                    continue
            with self._lock:
                self._room.notify_all()

    def _send_failed(self, e: OSError) -> str:
        """Why sending to the child failed: its exit, when that is what closed the socket (the
        operator and a refused bot are told "exited (code -9)", not "Broken pipe")."""
        proc = self._proc
        try:
            code = proc.wait(_EXIT_SEEN_S) if proc is not None else None
        except subprocess.TimeoutExpired:
            code = None
        return f"sending events failed: {e}" if code is None else f"the audit process exited (code {code})"

    # --- the child's answers -------------------------------------------------

    def _read_loop(self, proc: subprocess.Popen, rpc: socket.socket) -> None:
        while True:
            try:
                msg = _recv(rpc)
            except (OSError, pickle.UnpicklingError, EOFError) as e:
                msg = None
                why = f"its channel failed: {e}"
            else:
                why = None
            if msg is None:
                code = proc.poll()
                if code is None:
                    try:
                        code = proc.wait(5)
                    except subprocess.TimeoutExpired:
                        code = None
                if not self._closing or code not in (0, None):
                    self._mark_dead(why or f"the audit process exited (code {code})")
                else:
                    self._mark_dead("the audit process stopped")
                return
            if msg[0] == "status":
                self._update(msg[1])
            elif msg[0] == "reply":
                _, call_id, ok, value = msg
                with self._call_lock:
                    fut = self._calls.pop(call_id, None)
                if fut is not None:
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(_error_from(value))

    def _update(self, stats: dict[str, Any]) -> None:
        with self._lock:
            self._child_stats = stats
            self._written = self._child_base + stats["written"]
            dropped = stats.get("dropped", 0)
            self._lost = self._lost_before + dropped
            done = self._written + dropped
            inflight = self._inflight
            while inflight and inflight[0][0] <= done:
                inflight.popleft()
            self._failing = bool(stats["failing"])
            self._room.notify_all()
            if self._paced:
                self._release_paced()
            releases = self._mark_releases
            free = []
            while releases and releases[0][0] <= self._written:
                free.append(releases.popleft()[1])
        marks = self.marks
        if marks is not None:
            for slot in free:
                marks.free(slot)
            if stats.get("head_seq") is not None:
                marks.set_head(stats.get("epoch") or 0, stats["head_seq"])

    def _mark_dead(self, why: str) -> None:
        restart = False
        with self._lock:
            if self._dead is None:
                self._dead = why
                if not self._closing:
                    log.error("audit store unavailable: %s; statements and new sessions are refused%s", why,
                              "" if self.restart_after is None else f"; restarting it in {self.restart_after:g}s")
                    restart = self.restart_after is not None and not self._restarting
                    self._restarting = self._restarting or restart
            self._room.notify_all()
            self._ship.notify_all()
            self._release_paced(everyone=True)
        if restart:
            threading.Thread(target=self._restart_loop, name="audit-process-restart", daemon=True).start()
        with self._call_lock:
            calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(AuditWriterError(f"audit store unavailable: {why}"))
        with self._lock:
            # A statement waiting for its record's acknowledgement is refused (its record is
            # re-sent to the next process with everything else that was not committed).
            waiters, self._waiters = list(self._waiters), collections.deque()
        self._fail_waiters(waiters, f"audit store unavailable: {why}")

    def _restart_loop(self) -> None:
        delay = self.restart_after or 1.0
        try:
            while True:
                with self._lock:
                    if not self._closing:
                        self._room.wait(delay)  # close() wakes it
                    if self._closing:
                        return
                with self._restart_lock:
                    if self._closing:
                        return
                    if self._reader is not None:
                        self._reader.join(10)  # the old child's last status counts before the books close
                    old_proc = self._proc
                    if old_proc is not None and old_proc.poll() is None:
                        old_proc.kill()  # its channel broke but it lives: it must not hold the file
                        old_proc.wait()
                    self.options["accounted_by"] = ("the daemon re-sent the events the audit process had not "
                                                    "committed when it died")
                    try:
                        proc, events, rpc, info = self._spawn()
                    except AuditError as e:
                        delay = min(delay * 2, 30.0)
                        log.error("the audit process could not be restarted: %s; next attempt in %gs", e, delay)
                        continue
                    with self._lock:
                        resend, in_store = self._take_resend(info.get("recovered"))
                        self._resent += _events_in(resend)
                        self._child_base = self._written = self._acked = self._sent = in_store
                        self._lost_before = self._lost
                        self._buf[:0] = resend
                        old_sockets = (self._events, self._rpc)
                        self._proc, self._events, self._rpc, self.pid = proc, events, rpc, proc.pid
                        self.epoch, self._child_stats, self._failing = info["epoch"], info["stats"], False
                        self.recovered = info.get("recovered")
                        if self._redaction is not None:  # the new child starts with the current settings
                            self._buf.insert(0, ("!redaction", self._redaction))
                            self._ship_now = True
                        self._reader = threading.Thread(target=self._read_loop, args=(proc, rpc),
                                                        name="audit-process-reader", daemon=True)
                        self._reader.start()
                        self._restarts += 1
                        self._dead = None
                        self._ship.notify_all()
                        self._room.notify_all()
                    old_events, old_rpc = old_sockets
                    if old_rpc is not None:
                        old_rpc.close()
                    if old_events is not None and not self._rewatch(old_events, events):
                        old_events.close()
                    log.warning("audit process restarted as pid %d (epoch %d); %d event(s) it had not committed "
                                "were sent to it again", proc.pid, self.epoch, self._resent)
                    return
        finally:
            with self._lock:
                self._restarting = False

    def _rewatch(self, old: socket.socket, new: socket.socket) -> bool:
        """Once an event loop reads acks (:meth:`attach`, or a record that waited), have it read
        them from the new child's socket ``new`` and close the old one's ``old`` itself (a socket
        must leave the loop's selector before it is closed). True: done so. Whether the loop still
        watched ``old`` does not matter: it stops as soon as it reads the dead child's EOF, and the
        new child acknowledges every frame as the old one did."""
        loop = self._loop
        if loop is None or not self.journal:
            return False

        def switch() -> None:
            self._watch(new)
            old.close()
        try:
            loop.call_soon_threadsafe(switch)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def _take_resend(self, recovered: Any) -> tuple[list, int]:
        """Under the lock, once a new child is up: the events shipped to the dead one that its
        epoch does not hold (the new child counted them: committed, plus replayed from its
        journal), and the global count of events now in the store."""
        in_store = self._child_base
        if recovered is not None and recovered[0] == self.epoch:
            in_store += recovered[1] + (recovered[2] or 0)
        resend: list = []
        index = None
        for last, batch in self._inflight:
            index = last - _events_in(batch)
            for item in _opened(batch):
                if item[0][0] == "!":
                    resend.append(item)
                    continue
                index += 1
                if index > in_store:
                    resend.append(item)
        self._inflight.clear()
        return resend, in_store

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self._proc is None:
            raise AuditClosedError("audit store is not running")
        if self._dead is not None:
            raise AuditWriterError(f"audit store unavailable: {self._dead}")
        fut: Future = Future()
        with self._call_lock:
            call_id = next(self._call_ids)
            self._calls[call_id] = fut
            try:
                _send(self._rpc, (call_id, method, args))
            except OSError as e:
                self._calls.pop(call_id, None)
                raise AuditWriterError(f"audit store unavailable: {e}") from None
        try:
            return fut.result(timeout)
        except TimeoutError:
            raise AuditWriterError(f"the audit process did not answer {method!r} within {timeout:g}s") from None

    # --- the store's surface ---------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Taking events with room to spare (below 80 % of ``queue_max``). Read per request by
        the runtime, so without the lock: a stale answer by one event does not matter."""
        return (self._running and self._dead is None and not self._failing and not self._closing
                and self._submitted - self._written - self._lost < self._high_water)

    @property
    def unavailable(self) -> str | None:
        """Why the store is gone for good (its process died), else None."""
        return self._dead

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"epoch": self.epoch, "submitted": self._submitted, "written": self._written,
                    "pending": self._submitted - self._written - self._lost, "refused": self._refused,
                    "lost": self._lost, "resent_after_crash": self._resent, "restarts": self._restarts,
                    "acked": self._acked, "paced": self._pace_waits,
                    "head_seq": self._child_stats.get("head_seq"), "pid": self.pid,
                    "failing": self._failing or self._dead is not None}

    def flush(self, timeout: float = 10.0) -> None:
        """Return once every event submitted before the call is committed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._submitted
            self._ship_now = True
            self._ship.notify()
            while self._sent < target and self._dead is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise audit_errors.AuditFlushTimeout(
                        f"audit flush timed out with {target - self._written} events unwritten")
                self._room.wait(left)
            child_target = target - self._child_base  # this child counts from zero
        self._call("flush", child_target, max(0.1, deadline - time.monotonic()), timeout=timeout + 5)

    def query(self, sql: str, params: Sequence | None = None, *, max_rows: int | None = None,
              timeout: float | None = None) -> tuple[list[str], list[tuple]]:
        return self._call("query", sql, None if params is None else list(params), max_rows, timeout,
                          timeout=None if timeout is None else timeout + 30)

    def verify(self, anchors: dict[int, str] | None = None):
        return self._call("verify", anchors)

    def report(self, name: str) -> tuple[list[str], list[tuple]]:
        return self._call("report", name)

    def export(self, since: Any, out_dir: str | Path) -> list[Path]:
        return self._call("export", since, str(out_dir))

    def retention(self, older_than: Any):
        return self._call("retention", older_than)


# ------------------------------------------------------------------ the child

class RecentTexts:
    """Statement texts and their redaction, at least the last ``size`` put: two generations, the
    newer becoming the older when full. The audit process redacts a recording's statements with
    what it did for their request rows, which arrive up to a chunk's interval (1 s) earlier; one
    dict cleared when full made every chunk after the clear scan its statements again (a quarter
    of them at pgbench's rate)."""

    __slots__ = ("size", "_new", "_old")

    def __init__(self, size: int = _RECENT_TEXTS):
        self.size = size
        self._new: dict[str, str] = {}
        self._old: dict[str, str] = {}

    def put(self, text: str, redacted: str) -> None:
        if len(self._new) >= self.size:
            self._old, self._new = self._new, {}
        self._new[text] = redacted

    def get(self, text: str) -> str | None:
        done = self._new.get(text)
        return done if done is not None else self._old.get(text)


class _Child:
    def __init__(self, events: socket.socket, rpc: socket.socket, options: dict[str, Any]):
        from analytics import AuditStore

        self.events, self.rpc = events, rpc
        self.options = options
        self.fleet = json.loads(os.environ.pop(_FLEET_ENV, "null"))   # [fleet], or None
        self.store = AuditStore(options["path"], batch_max=options["batch_max"],
                                flush_interval=options["flush_interval"], queue_max=max(options["batch_max"] * 8, 10_000),
                                on_full="block", strict=options["strict"], journal=options.get("journal") or False,
                                accounted_by=options.get("accounted_by"), threads=options.get("threads"))
        self.redactor = AuditRedactor(DetectorSettings())
        self._redactors: dict[Any, AuditRedactor] = {}
        req = schema.KINDS["request"]
        self._request = req
        self._ix = {n: req.names.index(n) for n in ("text", "params", "error", "decision")}
        start = schema.KINDS["request_start"]
        self._ix_start = {**{n: start.names.index(n) for n in ("text", "params", "decision")}, "error": None}
        # Strict mode: a request's start and its completion carry the same text; the completion
        # reuses the start's redaction (request_id -> (text, redacted text)) instead of scanning again.
        self._start_texts: dict[str, tuple[str, str]] = {}
        # Recordings: a PostgreSQL session's chunks are redacted like its request rows (the
        # protocol of each open session, from its session_start row).
        self._recording = schema.KINDS["recording"]
        self._session_start = schema.KINDS["session_start"]
        self._session_end = schema.KINDS["session_end"]
        self._protocols: dict[str, str] = {}
        # Statement texts of recent request rows and their redaction: a recording's chunk holds the
        # same statements, redacted once.
        self._recent_texts = RecentTexts()
        self._send_lock = threading.Lock()
        self._received = 0
        self._received_cv = threading.Condition()
        self._calls = ThreadPoolExecutor(4, thread_name_prefix="audit-call")
        self._stop = threading.Event()
        self.dropped = 0

    def reply(self, msg: Any) -> None:
        with self._send_lock:
            try:
                _send(self.rpc, msg)
            except OSError:
                self._stop.set()

    def run(self) -> int:
        try:
            self.store.start()
        except BaseException as e:  # tell the daemon why, then exit
            self.reply(("error", (type(e).__name__ if isinstance(e, AuditError) else "AuditError",
                                  f"audit store {self.store.path}: {e}")))
            return 1
        from appliance.auditstream import start_stream

        # The SIEM stream tails what the store commits (after the start rows, replayed ones included).
        try:
            stream = start_stream(self.store, self.options.get("stream"))
        except OSError as e:  # e.g. its file cannot be created: the daemon does not start without it
            self.reply(("error", ("AuditError", f"[audit.stream] {e.filename or ''}: {e.strerror or e}")))
            with contextlib.suppress(AuditError):
                self.store.close()
            return 1
        self.reply(("ready", {"epoch": self.store.epoch, "migrations": self.store.migrations,
                              "stats": self.stats(), "recovered": self.store.recovered}))
        threads = [threading.Thread(target=self._events_loop, name="audit-events", daemon=True),
                   threading.Thread(target=self._calls_loop, name="audit-calls", daemon=True),
                   threading.Thread(target=self._status_loop, name="audit-status", daemon=True)]
        for t in threads:
            t.start()
        from analytics import fleet

        with fleet.shipping(self.store, self.fleet):  # to the fleet lake, if configured
            threads[0].join()     # the daemon closed the events channel (close() or its own death)
        self._stop.set()
        code = 0
        if stream is not None:  # what is committed goes out before the store closes (its stop row: next start)
            with contextlib.suppress(AuditError):
                self.store.flush(10)
            stream.close()
        try:
            self.store.close()
        except AuditError as e:
            log.error("%s", e)
            code = 1
        self.reply(("status", self.stats()))
        return code

    def stats(self) -> dict[str, Any]:
        # "written" counts this child's stream: the events its store replayed at start are its
        # predecessor's, already counted by the daemon.
        st = self.store.stats()
        replayed = (self.store.recovered[2] or 0) if self.store.recovered else 0
        return {**st, "written": st["written"] - replayed, "dropped": self.dropped}

    def _redact(self, row: tuple, ix: dict[str, int | None]) -> tuple:
        r = list(row)
        red = self.redactor
        text = r[ix["text"]]
        if text:
            starts = self._start_texts
            if ix is self._ix_start:
                r[ix["text"]] = red.text(text)
                if len(starts) > 10_000:  # starts whose completion never came (sessions cut short)
                    starts.clear()
                starts[r[0]] = (text, r[ix["text"]])
            else:
                seen = starts.pop(r[0], None) if starts else None
                r[ix["text"]] = seen[1] if seen is not None and seen[0] == text else red.text(text)
            self._recent_texts.put(text, r[ix["text"]])
        if r[ix["params"]] is not None:
            r[ix["params"]] = red.params(r[ix["params"]], masked_statement=r[ix["decision"]] == "mask")
        if ix["error"] is not None and r[ix["error"]] is not None:
            r[ix["error"]] = red.message(r[ix["error"]])
        return tuple(r)

    def _redact_recording(self, row: tuple) -> tuple:
        """A recording chunk as the store may keep it: a PostgreSQL session's messages redacted
        (appliance/recordings/pgstream.py). A session this process has not seen start (it
        replaced a dead one) is looked up; one not found is treated as PostgreSQL (fail closed)."""
        names = self._recording.names
        direction = row[names.index("direction")]
        if direction == "event":
            return row
        sid = row[0]
        protocol = self._protocols.get(sid)
        if protocol is None:
            try:
                _, found = self.store.query("SELECT protocol FROM sessions WHERE session_id = ?", [sid])
            except Exception:
                found = []
            protocol = self._protocols[sid] = found[0][0] if found else "postgresql"
        if protocol != "postgresql":
            return row
        from appliance.recordings.pgstream import redact_chunk

        recent, red = self._recent_texts.get, self.redactor

        def text(sql: str) -> str:
            done = recent(sql)
            return done if done is not None else red.text(sql)

        i = names.index("data")
        r = list(row)
        r[i] = redact_chunk(bytes(r[i] or b""), direction, red, text)
        return tuple(r)

    def _events_loop(self) -> None:
        kinds = schema.KINDS
        request = self._request
        request_start = kinds["request_start"]
        submit = self.store.submit_rows
        journal = self.store.journal
        replayed = (self.store.recovered[2] or 0) if self.store.recovered else 0
        waiting = select.poll()  # (not select.select: no limit on the descriptor's number)
        waiting.register(self.events, select.POLLIN)
        ended = False
        while not ended:
            try:
                batch = _recv(self.events)
            except (OSError, pickle.UnpicklingError, EOFError) as e:
                log.error("audit events channel failed: %s", e)
                return
            if batch is None:
                return
            try:
                while len(batch) < _GROUP_MAX and waiting.poll(0):
                    more = _recv(self.events)
                    if more is None:
                        ended = True  # the daemon is gone: what arrived is committed all the same
                        break
                    batch += more
            except (OSError, pickle.UnpicklingError, EOFError) as e:
                log.error("audit events channel failed: %s", e)
                ended = True
            rows = []
            for kind, row in batch:
                if kind == "!redaction":
                    red = self._redactors.get(row)
                    if red is None:
                        red = self._redactors[row] = AuditRedactor(row)
                    self.redactor = red
                    self._recent_texts = RecentTexts()
                    continue
                spec = kinds[kind]
                if spec is request:
                    row = self._redact(row, self._ix)
                elif spec is request_start:
                    row = self._redact(row, self._ix_start)
                elif spec is self._recording:
                    row = self._redact_recording(row)
                elif spec is self._session_start:
                    self._protocols[row[0]] = row[spec.names.index("protocol")]
                elif spec is self._session_end:
                    self._protocols.pop(row[0], None)
                rows.append((spec, row))
            if journal is not None and rows:
                # On disk (redacted, as the store would hold it) before the daemon is told.
                journal.append([(spec.kind, row) for spec, row in rows])
                try:
                    self.events.sendall(_ACK.pack(self._received + len(rows)))
                except OSError:
                    pass  # the daemon is gone: commit what arrived all the same
            # on_full="block": waits for the writer rather than drop. Not accepted only while the
            # store is failing, which the daemon learns from the status and refuses from then on.
            refused = submit(rows) if rows else 0
            if refused:
                self.dropped += refused
                log.error("audit store failing: %d event(s) in transit were not accepted", refused)
            with self._received_cv:
                self._received += len(rows)
                self._received_cv.notify_all()
            if journal is not None:
                journal.release(self.store.stats()["written"] - replayed)

    def _status_loop(self) -> None:
        last = None
        while not self._stop.wait(0.01):
            st = self.stats()
            # "written" here counts the daemon's events only: the child's own writer rows are
            # not in it (AuditStore counts submitted events, not the rows it writes itself).
            key = (st["written"], st["failing"], st["head_seq"], st["dropped"])
            if key != last:
                last = key
                self.reply(("status", st))

    def _calls_loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = _recv(self.rpc)
            except (OSError, pickle.UnpicklingError, EOFError):
                msg = None
            if msg is None:
                self._stop.set()
                self.events.shutdown(socket.SHUT_RDWR)  # the daemon is gone: stop taking events
                return
            call_id, method, args = msg
            self._calls.submit(self._answer, call_id, method, args)

    def _answer(self, call_id: int, method: str, args: tuple) -> None:
        try:
            value = getattr(self, "_m_" + method)(*args)
            self.reply(("reply", call_id, True, value))
        except BaseException as e:  # every error goes back to the caller, named
            name = type(e).__name__ if isinstance(e, AuditError) else "AuditError"
            self.reply(("reply", call_id, False, (name, str(e) or type(e).__name__)))

    # methods the daemon calls
    def _m_flush(self, target: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._received_cv:
            while self._received < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise audit_errors.AuditFlushTimeout("audit flush timed out waiting for events in transit")
                self._received_cv.wait(left)
        self.store.flush(max(0.1, deadline - time.monotonic()))
        self.reply(("status", self.stats()))

    def _m_shortfalls(self, marks: Any) -> tuple[list, list[str]]:
        """What the marks say was issued and the store lacks, and which of their sessions have
        no session_end row."""
        cur = self.store.cursor()
        try:
            found = highwater.shortfalls(cur, marks.sessions)
            ended = {r[0] for r in cur.execute("SELECT DISTINCT session_id FROM session_ends").fetchall()}
        finally:
            cur.close()
        return found, [m.session_id for m in marks.sessions if m.session_id not in ended]

    def _m_query(self, sql: str, params: list | None, max_rows: int | None, timeout: float | None):
        return self.store.query(sql, params, max_rows=max_rows, timeout=timeout)

    def _m_verify(self, anchors: dict[int, str] | None = None):
        return self.store.verify(anchors)

    def _m_report(self, name: str):
        from analytics import reports

        return reports.run_report(self.store, name)

    def _m_export(self, since: Any, out_dir: str):
        from analytics import export_parquet

        return export_parquet(self.store, since, out_dir)

    def _m_retention(self, older_than: Any):
        from analytics import apply_retention

        return apply_retention(self.store, older_than)


def _child_main(argv: list[str]) -> int:
    # The daemon decides when the store closes (end of the events stream, or its own death); a
    # SIGTERM or Ctrl-C sent to the whole group must not cut the stop row short.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    events = socket.socket(fileno=int(argv[0]))
    rpc = socket.socket(fileno=int(argv[1]))
    options = json.loads(argv[2])
    from appliance.logs import formatter

    logging.basicConfig(level=options.get("log_level", logging.INFO))
    logging.getLogger().handlers[0].setFormatter(formatter(options.get("log_format", "text")))
    from appliance.daemon import tune_gc

    tune_gc()
    return _Child(events, rpc, options).run()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))


__all__ = ["AuditProcess"]
