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
(``on_full="refuse"``) or waits (``"block"``). If the child dies, every later submit is
refused and ``healthy`` is false, so the daemon refuses new sessions rather than run
unaudited (fail closed); a call in flight raises :class:`analytics.AuditWriterError`.
If the daemon dies, the child sees the events socket close, commits what it received,
writes its ``writer_stop`` row and exits.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
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
from analytics import schema
from analytics.errors import AuditClosedError, AuditError, AuditWriterError
from analytics.store import RecordValidator
from appliance.policy.masking import DetectorSettings
from appliance.policy.redact import AuditRedactor

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
_HIGH_WATER = 0.8
_SEND_BATCH = 512          # events that make the sender ship at once
_SEND_INTERVAL_S = 0.01    # otherwise it ships what accumulated this often
# Waking the sender per event would hand the GIL back and forth with the event loop thousands
# of times a second (measured: four futex calls per request); a timer wakes it a hundred times.
_START_TIMEOUT_S = 120.0   # migrations of a large file can take a while
_STOP_TIMEOUT_S = 60.0


# The child's entry: its CPU priority is set before anything is imported, because DuckDB and
# Arrow start native threads at import and a thread keeps the priority it was created with.
_CHILD_BOOT = """\
import json, os, sys
nice = json.loads(sys.argv[3]).get("nice")
if nice is not None and os.getpriority(os.PRIO_PROCESS, 0) != nice:
    os.setpriority(os.PRIO_PROCESS, 0, nice)
from appliance.auditproc import _child_main
sys.exit(_child_main(sys.argv[1:]))
"""


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


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
                 strict: bool = False, restart_after: float | None = 1.0, nice: int | None = None):
        """``restart_after``: seconds before a dead audit process is started again (doubling
        up to 30 s while it keeps failing); None leaves it dead. ``nice``: the child's CPU
        priority (the daemon passes the one it was started with; None inherits the caller's)."""
        if batch_max < 1 or queue_max < 1 or flush_interval <= 0:
            raise AuditError("batch_max and queue_max must be >= 1 and flush_interval > 0")
        if on_full not in ("refuse", "block"):
            raise AuditError("on_full must be 'refuse' or 'block'")
        self.path = Path(path)
        self.options = {"path": str(self.path), "batch_max": batch_max, "flush_interval": flush_interval,
                        "strict": strict, "log_level": logging.getLogger().getEffectiveLevel(), "nice": nice}
        self.queue_max = queue_max
        self.on_full = on_full
        self.strict = strict
        self._high_water = max(1, int(queue_max * _HIGH_WATER))
        self._lock = threading.Lock()
        self._ship = threading.Condition(self._lock)      # the sender waits here
        self._room = threading.Condition(self._lock)      # blocked producers and flush() wait here
        self._buf: list = []
        self._ship_now = False   # flush() and set_redaction() want the buffer shipped at once
        self._submitted = 0      # events accepted by submit
        self._sent = 0           # events handed to the child
        self._written = 0        # events the child committed
        self._lost = 0           # events the child could not accept (its store was failing)
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
        self._crash_lost = 0      # events handed to a child that died before committing them
        self._base_written = 0    # what earlier children committed (a child counts from zero)
        self._base_lost = 0
        self._base_sent = 0       # events handed to earlier children (flush targets are per child)
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
        self.pid: int | None = None

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Spawn the child and wait until its store is open (or raise its error)."""
        if self._proc is not None:
            raise AuditError("audit process already started")
        self._proc, self._events, self._rpc, info = self._spawn()  # sets self.pid
        self.epoch, self.migrations, self._child_stats = info["epoch"], info["migrations"], info["stats"]
        self._running = True
        self._reader = threading.Thread(target=self._read_loop, args=(self._proc, self._rpc),
                                        name="audit-process-reader", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="audit-process-sender", daemon=True)
        self._reader.start()
        self._sender.start()
        log.info("audit store %s runs in process %d (epoch %d)", self.path, self.pid, self.epoch)

    def _spawn(self) -> tuple[subprocess.Popen, socket.socket, socket.socket, dict[str, Any]]:
        ev_parent, ev_child = socket.socketpair()
        rpc_parent, rpc_child = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_BOOT, str(ev_child.fileno()), str(rpc_child.fileno()),
                 json.dumps(self.options)],
                pass_fds=(ev_child.fileno(), rpc_child.fileno()), stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)  # a Ctrl-C meant for the daemon must not kill the store first
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
        for s in (self._events, self._rpc):
            if s is not None:
                s.close()
        with self._lock:
            # Events lost when a child died were reported then (and verify shows the gap).
            unwritten = self._submitted - self._written - self._crash_lost
        if code != 0 and not unwritten:
            raise AuditWriterError(f"the audit process exited with code {code} while closing the store")
        if unwritten:
            raise AuditWriterError(f"audit store closed with {unwritten} events not written"
                                   + (f" ({self._lost} refused by the failing store)" if self._lost else "")
                                   + (f" ({self._dead})" if self._dead else ""))
        log.info("audit store %s closed (epoch %d)", self.path, self.epoch)

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
            if self._dead is not None or self._failing:
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

    def set_redaction(self, settings: Any) -> None:
        """Detector settings for request rows from now on (ordered with the events)."""
        with self._lock:
            self._redaction = settings
            self._buf.append(("!redaction", settings))
            self._ship_now = True
            self._ship.notify()

    def _send_loop(self) -> None:
        while True:
            with self._lock:
                if len(self._buf) < _SEND_BATCH and not self._closing and not self._ship_now:
                    self._ship.wait(_SEND_INTERVAL_S)
                if self._dead is not None and not self._closing:
                    continue  # keep them for the next child (submit refuses meanwhile)
                self._ship_now = False
                batch, self._buf = self._buf, []
                if not batch and self._closing:
                    return
                events_sock = self._events
            if not batch:
                continue
            if self._dead is not None:
                if not self._closing:  # died since the batch was taken: keep it for the next child
                    with self._lock:
                        self._buf[:0] = batch
                continue  # closing with a dead child: close() reports these as not written
            events = sum(1 for kind, _ in batch if kind[0] != "!")
            try:
                _send(events_sock, batch)
            except OSError as e:
                with self._lock:
                    if events_sock is not self._events:  # a new child took over meanwhile: it gets them
                        self._buf[:0] = batch
                        continue
                    # Handed to a child that is gone: they count as sent, so the restart books them
                    # as lost in the crash (otherwise they would stay pending and block flush forever).
                    self._sent += events
                self._mark_dead(f"sending events failed: {e}")
                continue
            with self._lock:
                self._sent += events
                self._room.notify_all()

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
            self._written = self._base_written + stats["written"]
            self._lost = self._base_lost + stats.get("dropped", 0)
            self._failing = bool(stats["failing"])
            self._room.notify_all()

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
        if restart:
            threading.Thread(target=self._restart_loop, name="audit-process-restart", daemon=True).start()
        with self._call_lock:
            calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(AuditWriterError(f"audit store unavailable: {why}"))

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
                    try:
                        proc, events, rpc, info = self._spawn()
                    except AuditError as e:
                        delay = min(delay * 2, 30.0)
                        log.error("the audit process could not be restarted: %s; next attempt in %gs", e, delay)
                        continue
                    with self._lock:
                        lost = self._sent - self._written - self._lost
                        self._crash_lost += lost
                        self._lost += lost
                        self._base_written, self._base_lost = self._written, self._lost
                        self._base_sent = self._sent
                        old_sockets = (self._events, self._rpc)
                        self._proc, self._events, self._rpc, self.pid = proc, events, rpc, proc.pid
                        self.epoch, self._child_stats, self._failing = info["epoch"], info["stats"], False
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
                    for sock in old_sockets:
                        if sock is not None:
                            sock.close()
                    log.warning("audit process restarted as pid %d (epoch %d); %d event(s) in flight when the "
                                "last one died were lost (`botwarden audit verify` shows the gap)",
                                proc.pid, self.epoch, lost)
                    return
        finally:
            with self._lock:
                self._restarting = False

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
                    "lost": self._lost, "lost_in_crashes": self._crash_lost, "restarts": self._restarts,
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
            child_target = target - self._base_sent  # this child counts from zero
        self._call("flush", child_target, max(0.1, deadline - time.monotonic()), timeout=timeout + 5)

    def query(self, sql: str, params: Sequence | None = None, *, max_rows: int | None = None,
              timeout: float | None = None) -> tuple[list[str], list[tuple]]:
        return self._call("query", sql, None if params is None else list(params), max_rows, timeout,
                          timeout=None if timeout is None else timeout + 30)

    def verify(self):
        return self._call("verify")

    def report(self, name: str) -> tuple[list[str], list[tuple]]:
        return self._call("report", name)

    def export(self, since: Any, out_dir: str | Path) -> list[Path]:
        return self._call("export", since, str(out_dir))

    def retention(self, older_than: Any):
        return self._call("retention", older_than)


# ------------------------------------------------------------------ the child

class _Child:
    def __init__(self, events: socket.socket, rpc: socket.socket, options: dict[str, Any]):
        from analytics import AuditStore

        self.events, self.rpc = events, rpc
        self.store = AuditStore(options["path"], batch_max=options["batch_max"],
                                flush_interval=options["flush_interval"], queue_max=max(options["batch_max"] * 8, 10_000),
                                on_full="block", strict=options["strict"])
        self.redactor = AuditRedactor(DetectorSettings())
        self._redactors: dict[Any, AuditRedactor] = {}
        req = schema.KINDS["request"]
        self._request = req
        self._ix = {n: req.names.index(n) for n in ("text", "params", "error", "decision")}
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
        self.reply(("ready", {"epoch": self.store.epoch, "migrations": self.store.migrations,
                              "stats": self.stats()}))
        threads = [threading.Thread(target=self._events_loop, name="audit-events", daemon=True),
                   threading.Thread(target=self._calls_loop, name="audit-calls", daemon=True),
                   threading.Thread(target=self._status_loop, name="audit-status", daemon=True)]
        for t in threads:
            t.start()
        threads[0].join()     # the daemon closed the events channel (close() or its own death)
        self._stop.set()
        code = 0
        try:
            self.store.close()
        except AuditError as e:
            log.error("%s", e)
            code = 1
        self.reply(("status", self.stats()))
        return code

    def stats(self) -> dict[str, Any]:
        return {**self.store.stats(), "dropped": self.dropped}

    def _redact(self, row: tuple) -> tuple:
        ix = self._ix
        r = list(row)
        red = self.redactor
        if r[ix["text"]]:
            r[ix["text"]] = red.text(r[ix["text"]])
        if r[ix["params"]] is not None:
            r[ix["params"]] = red.params(r[ix["params"]], masked_statement=r[ix["decision"]] == "mask")
        if r[ix["error"]] is not None:
            r[ix["error"]] = red.message(r[ix["error"]])
        return tuple(r)

    def _events_loop(self) -> None:
        kinds = schema.KINDS
        request = self._request
        submit = self.store.submit_row
        while True:
            try:
                batch = _recv(self.events)
            except (OSError, pickle.UnpicklingError, EOFError) as e:
                log.error("audit events channel failed: %s", e)
                return
            if batch is None:
                return
            n = 0
            for kind, row in batch:
                if kind == "!redaction":
                    red = self._redactors.get(row)
                    if red is None:
                        red = self._redactors[row] = AuditRedactor(row)
                    self.redactor = red
                    continue
                spec = kinds[kind]
                if spec is request:
                    row = self._redact(row)
                # on_full="block": waits for the writer rather than drop. False only while the
                # store is failing, which the daemon learns from the status and refuses from then on.
                if not submit(spec, row):
                    self.dropped += 1
                    log.error("audit store failing: a %s event in transit was not accepted", kind)
                n += 1
            with self._received_cv:
                self._received += n
                self._received_cv.notify_all()

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

    def _m_query(self, sql: str, params: list | None, max_rows: int | None, timeout: float | None):
        return self.store.query(sql, params, max_rows=max_rows, timeout=timeout)

    def _m_verify(self):
        return self.store.verify()

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
    logging.basicConfig(level=options.get("log_level", logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from appliance.daemon import tune_gc

    tune_gc()
    return _Child(events, rpc, options).run()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))


__all__ = ["AuditProcess"]
