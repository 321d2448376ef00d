"""A worker process (``appliance.workers`` > 1): the PostgreSQL fronts on listeners the daemon bound.

The daemon (the supervisor, appliance/workerpool.py) starts ``python -m appliance.worker FD ID``
with a fresh interpreter (never a fork of a process that runs an event loop, DuckDB or threads);
FD is this worker's end of a private socket pair, the listening sockets come through
``pass_fds``. Everything that must stay single stays in the supervisor and is reached over that
socket (:class:`Link`): identity and the credential lease (``open_session``), holds (the approval
broker), the audit store (events, strict mode's acknowledgements), the registry of cancel keys.
What runs here is what a statement needs on its hot path: the protocol front, the policy engine
(pure, its own caches), per-session SQL state and request numbering. :class:`WorkerRuntime` is
the daemon's :class:`~appliance.runtime.Runtime` with those calls sent to the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from analytics.schema import RecordValidator
from appliance.auditproc import PACE_WAIT_S
from appliance.errors import BotwardenError
from appliance.fronts.services import AuthRefused, ConnectionContext, SessionGrant
from appliance.runtime import LiveSession, Runtime
from appliance.tasks import TaskSet

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
# How long a worker may keep audit records before they go to the supervisor (it wakes once per
# batch). A CancelRequest, a hold, strict mode's start record (calls) flush at once.
LAZY_FLUSH_S = 0.005


class LinkClosed(BotwardenError):
    """The other end of a supervisor–worker link went away (its process died or stopped)."""


class RemoteError(BotwardenError):
    """A call failed on the other end of the link (its type and message)."""


class Link:
    """One end of the supervisor–worker socket: ordered one-way messages, and calls answered by
    a reply. Everything sent in one event-loop turn goes as one pickled frame (a statement's
    audit record and its session's notes cost one write). Both ends trust each other (a private
    socket pair between processes of one daemon), as the audit process's link does.

    Messages are tuples: ``("call", id, method, args)`` → ``("reply", id, ok, value)``;
    ``("event", id, value)`` feeds the caller's ``on_event`` while a call runs (a hold's approval
    id); ``("cancel", id, reason)`` cancels a call (a withdrawn hold); anything else goes to
    ``on_message``. ``methods[name](*args)`` serves calls (a coroutine function)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 methods: Mapping[str, Callable[..., Any]], on_message: Callable[[tuple], None],
                 peer: str = "the other end"):
        self.peer = peer  # who is at the other end, for the reasons a closed link gives
        self._reader = reader
        self._writer = writer
        self._methods = methods
        self._on_message = on_message
        self._out: list[tuple] = []
        self._flush_scheduled = False
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[asyncio.Future, Callable[[Any], None] | None]] = {}
        self._serving: dict[int, asyncio.Task] = {}
        self._tasks = TaskSet()
        self.closed: str | None = None
        # What a sender keeps beside the queue (a worker's audit rows, StoreLink): called before
        # anything else is queued and at each flush, it returns the message that carries it, or
        # None. So that message keeps its place in the order of everything sent.
        self.seal: Callable[[], tuple | None] | None = None

    # -- sending -----------------------------------------------------------------------------

    def send(self, message: tuple, *, lazy: bool = False) -> None:
        """Queue ``message``; it goes at the end of this loop turn, or with ``lazy`` within
        LAZY_FLUSH_S. Anything sent later flushes it too: order holds."""
        if self.closed is not None:
            return
        if self.seal is not None:
            sealed = self.seal()
            if sealed is not None:
                self._out.append(sealed)
        self._out.append(message)
        self.wake(lazy=lazy)

    def wake(self, *, lazy: bool = False) -> None:
        """Have the queue flushed: at the end of this loop turn, or with ``lazy`` within
        LAZY_FLUSH_S (audit records: under load one write and one wake-up of the other end per
        few milliseconds instead of per statement)."""
        if self._flush_scheduled or self.closed is not None:
            return
        loop = asyncio.get_running_loop()
        if not lazy:
            self._flush_scheduled = True
            if self._lazy_timer is not None:
                self._lazy_timer.cancel()
                self._lazy_timer = None
            loop.call_soon(self._flush)
        elif self._lazy_timer is None:
            self._lazy_timer = loop.call_later(LAZY_FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self.seal is not None and self.closed is None:
            sealed = self.seal()
            if sealed is not None:
                self._out.append(sealed)
        out, self._out = self._out, []
        if not out or self.closed is not None:
            return
        data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._writer.write(_LEN.pack(len(data)) + data)
        except (OSError, RuntimeError) as e:
            self._close(f"writing to the link failed: {e}")

    async def drain(self) -> None:
        """Everything sent so far is written to the socket."""
        self._flush()
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.drain()

    def start_call(self, method: str, *args: Any, on_event: Callable[[Any], None] | None = None
                   ) -> tuple[int, asyncio.Future]:
        """Send a call; its id and the future of its reply (raises RemoteError or LinkClosed)."""
        fut = asyncio.get_running_loop().create_future()
        if self.closed is not None:
            fut.set_exception(LinkClosed(self.closed))
            return 0, fut
        call_id = next(self._ids)
        self._calls[call_id] = (fut, on_event)
        self.send(("call", call_id, method, args))
        return call_id, fut

    async def call(self, method: str, *args: Any, on_event: Callable[[Any], None] | None = None) -> Any:
        """Call ``method`` on the other end. Cancelling the caller cancels the remote call (its
        task gets the cancel message, e.g. the reason a hold was withdrawn)."""
        call_id, fut = self.start_call(method, *args, on_event=on_event)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError as e:
            if not fut.done():
                reason = e.args[0] if e.args and isinstance(e.args[0], str) else None
                self.send(("cancel", call_id, reason))
                self._calls.pop(call_id, None)
                fut.cancel()
            raise

    def expect(self) -> tuple[int, asyncio.Future]:
        """An id the other end will answer with a ``reply`` though no call was sent (a worker's
        acknowledged audit row, which travels in a frame): its future fails with LinkClosed if
        the link closes first, as a call's does."""
        fut = asyncio.get_running_loop().create_future()
        call_id = next(self._ids)
        self._calls[call_id] = (fut, None)
        return call_id, fut

    def forget(self, call_id: int) -> None:
        self._calls.pop(call_id, None)

    def event(self, call_id: int, value: Any) -> None:
        self.send(("event", call_id, value))

    # -- receiving ---------------------------------------------------------------------------

    async def run(self) -> str:
        """Read until the other end closes; returns why the link closed."""
        try:
            while True:
                head = await self._reader.readexactly(_LEN.size)
                batch = pickle.loads(await self._reader.readexactly(_LEN.unpack(head)[0]))
                for message in batch:
                    self._dispatch(message)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self._close(f"{self.peer} closed its link: it died or stopped ({type(e).__name__})")
        except asyncio.CancelledError:
            self._close("the link was stopped")
            raise
        return self.closed or "closed"

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "reply":
            _, call_id, ok, value = message
            entry = self._calls.pop(call_id, None)
            if entry is not None and not entry[0].done():
                if ok:
                    entry[0].set_result(value)
                else:
                    entry[0].set_exception(RemoteError(value))
        elif kind == "event":
            entry = self._calls.get(message[1])
            if entry is not None and entry[1] is not None:
                try:
                    entry[1](message[2])
                except Exception:
                    log.exception("a call's event handler failed")
        elif kind == "call":
            _, call_id, method, args = message
            self._serving[call_id] = self._tasks.spawn(self._serve(call_id, method, args), f"link-{method}")
        elif kind == "cancel":
            task = self._serving.get(message[1])
            if task is not None:
                task.cancel(msg=message[2])
        else:
            try:
                self._on_message(message)
            except Exception:
                log.exception("handling a %s message failed", kind)

    async def _serve(self, call_id: int, method: str, args: tuple) -> None:
        try:
            value = await self._methods[method](call_id, *args)
        except asyncio.CancelledError:
            self.send(("reply", call_id, False, "cancelled"))
            raise
        except Exception as e:
            log.debug("link call %s failed", method, exc_info=True)
            self.send(("reply", call_id, False, f"{type(e).__name__}: {e}"))
        else:
            self.send(("reply", call_id, True, value))
        finally:
            self._serving.pop(call_id, None)

    def _close(self, why: str) -> None:
        if self.closed is not None:
            return
        self.closed = why
        for fut, _ in self._calls.values():
            if not fut.done():
                fut.set_exception(LinkClosed(why))
        self._calls.clear()
        for task in list(self._serving.values()):
            task.cancel(msg=why)
        with contextlib.suppress(Exception):
            self._writer.close()

    def close(self, why: str = "closed") -> None:
        self._close(why)


async def open_link(sock: socket.socket, **kwargs: Any) -> Link:
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    return Link(reader, writer, **kwargs)


# ----------------------------------------------------------------------------------- worker side


class StoreLink:
    """The audit store as a worker sees it: the one audit process (which builds the one hash
    chain) is reached through the supervisor; its health is what the supervisor last said (it
    tells every worker when it changes).

    Records that do not wait are validated here into the rows the audit process takes and go to
    the supervisor as one pickled frame per flush (``audit_frame``), which it hands to the audit
    process unopened: the supervisor does no per-record work. Beside the frame go what it needs
    of them: each session's highest request seq (a dead worker's shortfall is counted from it),
    the sessions that ended (their high-water slots are freed once committed), decision counts and
    session/approval events for /metrics, each session's current request for listings, and how
    many requests waited for the store to catch up (pacing, counted in the supervisor's /metrics)."""

    def __init__(self, link: Link):
        self.link = link
        self.healthy = True
        self.unavailable: str | None = None
        self.behind = False     # the supervisor's store is past its pace mark: requests wait (room)
        self._paced: list[asyncio.Future] = []
        self._pace_waits = 0    # requests that waited since the last frame (the supervisor counts them)
        self.pace_wait = PACE_WAIT_S   # audit.pace_wait, from the config the supervisor sends
        # The daemon's high-water file, mapped here (analytics.highwater.SharedMarks): this worker
        # marks each request it numbers before the answer goes to the bot. None: no marks kept.
        self.marks: Any = None
        self._validate = RecordValidator()
        self._rows: list[tuple[str, tuple]] = []
        self._seqs: dict[str, int] = {}
        self._ends: list[str] = []
        self._decisions: dict[tuple[str, str], int] = {}
        self._observed: list[tuple[str, dict]] = []
        self._current: dict[str, tuple[str | None, float | None, bool]] = {}
        # Strict mode's rows (request_start) in _rows that wait for the audit process's journal:
        # (the reply id the supervisor answers once journaled, the row's index in the frame).
        self._acks: list[tuple[int, int]] = []
        link.seal = self._seal

    def release_mark(self, slot: int) -> None:
        """The daemon frees a session's mark once its session_end is committed, not the worker."""

    def set_health(self, healthy: bool, unavailable: str | None, behind: bool = False) -> None:
        """What the supervisor says of the audit store; requests waiting for room go on once it is
        no longer behind (or is gone: they are refused when decided)."""
        self.healthy, self.unavailable, self.behind = healthy, unavailable, behind
        if self._paced and (not behind or not healthy):
            self._release_paced()

    def _release_paced(self) -> None:
        paced, self._paced = self._paced, []
        for fut in paced:
            if not fut.done():
                fut.set_result(None)

    def room(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future | None:
        """Pacing in a worker (see AuditProcess.room): while the supervisor says the store is
        behind, a future resolved once it is not, or after ``pace_wait`` seconds."""
        if not self.behind:
            return None
        loop = loop or asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._paced:
            loop.call_later(self.pace_wait, self._release_paced)
        self._paced.append(fut)
        self._pace_waits += 1
        self.link.wake(lazy=True)
        return fut

    def submit(self, kind: str, record: Mapping[str, Any]) -> bool:
        if self.link.closed is not None:
            return False
        _, row = self._validate(kind, record)  # raises AuditRecordError here, where the bug is
        self._rows.append((kind, row))
        sid = record.get("session_id")
        if kind == "request" or kind == "request_start":
            seq = record.get("seq") or 0
            if seq > self._seqs.get(sid, 0):
                self._seqs[sid] = seq
        if kind == "request":
            key = (str(record.get("decision") or "?"), str(record.get("rule") or ""))
            self._decisions[key] = self._decisions.get(key, 0) + 1
            text, since, _ = self._current.get(sid, (None, None, False))
            self._current[sid] = (text, since, False)
        elif kind in _OBSERVED:
            self._observed.append((kind, {k: record[k] for k in _OBSERVED_FIELDS if k in record}))
            if kind == "session_end":
                self._ends.append(sid)
        self.link.wake(lazy=True)
        return True

    def note_current(self, session_id: str, text: str, since: float) -> None:
        """A session's current request, for the supervisor's session listing (sent lazily)."""
        if self.link.closed is None:
            self._current[session_id] = (text, since, True)
            self.link.wake(lazy=True)

    def _seal(self) -> tuple | None:
        if not self._rows and not self._current and not self._pace_waits:
            return None
        rows, self._rows = self._rows, []
        message = ("audit_frame", pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL) if rows else b"",
                   len(rows), self._seqs, self._ends, self._decisions, self._observed, self._current,
                   self._pace_waits, self._acks)
        self._seqs, self._ends, self._decisions, self._observed, self._current = {}, [], {}, [], {}
        self._pace_waits, self._acks = 0, []
        return message

    def submit_acked(self, kind: str, record: Mapping[str, Any], loop: Any) -> asyncio.Future | None:
        """Strict mode: resolves once the audit process has journaled the record. The row goes in
        this loop turn's frame, in order with the others (group commit: every session's rows
        decided meanwhile travel, and are acknowledged, together); the supervisor answers its
        reply id once the audit process journaled the frame, or fails it if the store refused it."""
        if self.link.closed is not None:
            return None
        call_id, fut = self.link.expect()
        try:
            self.submit(kind, record)
        except BaseException:
            self.link.forget(call_id)
            raise
        self._acks.append((call_id, len(self._rows) - 1))
        self.link.wake()
        return fut

    def stats(self) -> dict[str, Any]:
        return {"failing": not self.healthy}


# The records /metrics counts beside decisions (appliance.metrics.Metrics.observe), with the fields it reads.
_OBSERVED = frozenset({"session_start", "session_end", "approval"})
_OBSERVED_FIELDS = ("session_id", "target", "identity", "outcome", "event", "waited_ms")


class ProbeLookup:
    """The probes' attribution read by the worker itself: a map read from the pins (eBPF), or
    sock_diag and /proc (nftables), as the daemon's handle does (``probes.lookup``)."""

    def __init__(self, path: str, pin_dir: str, nft_table: str):
        self.path = path
        self.pin_dir = pin_dir
        self.nft_table = nft_table

    def lookup(self, sock: socket.socket) -> Any:
        import probes

        return probes.lookup(sock, pin_dir=self.pin_dir, nft_table=self.nft_table)


class _Metrics:
    """Runtime's metrics hooks: observed in the supervisor (the records pass there); the upstream
    failures are sent to it."""

    def __init__(self, link: Link):
        self.link = link

    def observe(self, kind: str, record: Mapping[str, Any]) -> None:
        pass

    def upstream_connect_failed(self, target: str, stage: str) -> None:
        self.link.send(("upstream_failed", target, stage))


class WorkerRuntime(Runtime):
    """The daemon's Runtime inside a worker: decisions, SQL state and request numbering here;
    sessions' identity and credentials, holds and audit in the supervisor."""

    def __init__(self, cfg: Any, host: "WorkerHost", generation: int):
        super().__init__(cfg, host)  # type: ignore[arg-type]  # its approval broker stays unused
        self.generation = generation

    @classmethod
    async def build(cls, cfg: Any, host: "WorkerHost", generation: int,
                    previous: "WorkerRuntime | None") -> "WorkerRuntime":
        rt = cls(cfg, host, generation)
        await asyncio.to_thread(rt._build_engine)
        if previous is not None:
            rt.live = previous.live
        return rt

    @property
    def link(self) -> Link:
        return self.daemon.link

    async def open_session(self, target: str, ctx: ConnectionContext, user: str, token: str | None) -> SessionGrant:
        _, fut = self.link.start_call("open_session", target, ctx, user, token)
        try:
            result = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The bot went away while the supervisor opened the session: release what it opens.
            fut.add_done_callback(self._release_orphan)
            raise
        except BotwardenError as e:
            raise AuthRefused("08006", f"botwarden could not open the session: {e}") from None
        if result[0] == "refused":
            raise AuthRefused(result[1], result[2], audit_fields=result[3])
        _, grant, expiry, mark = result
        live = LiveSession(grant, target, ctx, datetime.now(timezone.utc), expiry=expiry)
        live.mark = mark if self.daemon.audit.marks is not None else None
        self.live[grant.session_id] = live
        return grant

    def _release_orphan(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        result = fut.result()
        if result[0] == "ok":
            self.link.send(("close_session", result[1].session_id))

    async def close_session(self, grant: SessionGrant) -> None:
        live = self.live.pop(grant.session_id, None)
        if live is not None:
            self.link.send(("close_session", grant.session_id))

    async def hold(self, grant: SessionGrant, target: str, request_text: str, verdict: Any,
                   notify: Callable[[str], None], request_id: str | None = None,
                   detail: Mapping[str, Any] | None = None) -> Any:
        # The broker needs the rule, reason and row numbers; not the parse trees.
        slim = dataclasses.replace(verdict, details=(), row_guards=())
        return await self.link.call("hold", grant.session_id, target, request_text, slim, request_id,
                                    dict(detail) if detail else None, on_event=notify)

    def _note_current(self, live: LiveSession | None, text: str) -> None:  # type: ignore[override]
        Runtime._note_current(live, text)
        if live is not None:  # the supervisor's session listing shows it
            self.daemon.audit.note_current(live.session_id, text, live.current_since)

    async def forward_cancel(self, req: Any) -> None:
        """A CancelRequest for a key this worker does not hold: the supervisor hands it to the
        worker that does, which answers once the server was signalled."""
        try:
            await self.link.call("cancel", req.pid, req.secret)
        except BotwardenError as e:
            log.warning("a cancel request could not be forwarded: %s", e)

    async def started(self) -> None:
        pass

    async def retire(self) -> None:
        pass

    async def close(self) -> None:
        pass


class CancelKeys(dict):
    """A front's cancel keys, each registered with the supervisor, so a CancelRequest accepted
    by another worker finds its way here."""

    def __init__(self, link: Link):
        super().__init__()
        self.link = link

    def __setitem__(self, key: tuple[int, int], value: Any) -> None:
        super().__setitem__(key, value)
        self.link.send(("cancel_key", key, True))

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            self.link.send(("cancel_key", key, False))
        return super().pop(key, *default)


class WorkerHost:
    """What a worker process runs: the link, the runtime (the ``daemon`` the Runtime sees), the
    fronts on the supervisor's listening sockets."""

    def __init__(self, fd: int, worker_id: int):
        self.fd = fd
        self.worker_id = worker_id
        self.link: Link = None  # type: ignore[assignment]
        self.audit: StoreLink = None  # type: ignore[assignment]
        self.metrics: _Metrics = None  # type: ignore[assignment]
        self.probes: ProbeLookup | None = None
        self.runtime: WorkerRuntime | None = None
        self.config: Any = None
        self.fronts: dict[str, Any] = {}
        self.listen_fds: dict[str, int] = {}
        self.admission: Any = None
        self.done = asyncio.Event()
        self._tasks = TaskSet()

    def spawn(self, coro: Any, name: str) -> asyncio.Task:
        return self._tasks.spawn(coro, name)

    async def run(self) -> int:
        sock = socket.socket(fileno=self.fd)
        self.link = await open_link(sock, methods={"start": self._m_start, "reload": self._m_reload,
                                                   "stop": self._m_stop, "cancel": self._m_cancel,
                                                   "flush": self._m_flush},
                                    on_message=self._on_message)
        self.audit = StoreLink(self.link)
        self.metrics = _Metrics(self.link)
        reading = asyncio.ensure_future(self.link.run())
        stopped = asyncio.ensure_future(self.done.wait())
        await asyncio.wait([reading, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not self.done.is_set():
            # The supervisor is gone: nothing can be audited any more; end every session now.
            log.error("worker %d: the daemon closed the link; ending %d session(s)", self.worker_id,
                      len(self.runtime.live) if self.runtime else 0)
            for front in self.fronts.values():
                with contextlib.suppress(Exception):
                    await front.close()
            return 1
        await self.link.drain()
        reading.cancel()
        return 0

    def _make_front(self, target: Any, runtime: WorkerRuntime) -> Any:
        from appliance.daemon import make_front

        front = make_front(target, self.config, runtime, self.admission)
        front.cancel_keys = CancelKeys(self.link)
        return front

    async def _serve(self, target: Any, runtime: WorkerRuntime) -> None:
        front = self._make_front(target, runtime)
        # A duplicate: closing this front's server (a reload, the drain) leaves the daemon's socket.
        listening = socket.socket(fileno=os.dup(self.listen_fds[target.name]))
        await front.serve_socket(listening)
        self.fronts[target.name] = front

    async def _m_start(self, _call: int, doc: Mapping[str, Any]) -> dict[str, Any]:
        from appliance.daemon import admission_limits, classify_peer
        from appliance.fronts.admission import Admission

        self.config = doc["config"]
        self.audit.pace_wait = self.config.audit.pace_wait
        self.listen_fds = dict(doc["listeners"])
        if doc.get("probes"):
            self.probes = ProbeLookup(*doc["probes"])
        self.audit.set_health(*doc["audit_health"])
        if doc.get("marks"):
            from analytics.highwater import SharedMarks

            self.audit.marks = SharedMarks(doc["marks"])
        self.runtime = await WorkerRuntime.build(self.config, self, doc["generation"], None)
        # Caps on unauthenticated connections apply per worker (docs/architecture.md).
        self.admission = Admission(admission_limits(self.config), classify=lambda s: classify_peer(self.probes, s),
                                   audit=lambda kind, rec: self.runtime.audit(kind, rec))
        for target in self.config.targets:
            await self._serve(target, self.runtime)
        log.info("worker %d (pid %d) serving %d target(s)", self.worker_id, os.getpid(), len(self.fronts))
        return {"pid": os.getpid(), "generation": doc["generation"]}

    async def _m_reload(self, _call: int, generation: int, config: Any) -> int:
        """A new config generation: new sessions get the new policy; open ones keep theirs. A
        target whose settings changed gets a new front on the same listening socket."""
        from appliance.daemon import admission_limits

        runtime = await WorkerRuntime.build(config, self, generation, self.runtime)
        old = {t.name: t for t in self.config.targets}
        self.runtime, self.config = runtime, config
        self.admission.limits = admission_limits(config)
        for target in config.targets:
            front = self.fronts.get(target.name)
            if front is not None and old.get(target.name) == target:
                front.services = runtime
                continue
            if front is not None:
                self.spawn(front.drain(time.monotonic() + config.appliance.drain_timeout), f"drain-{target.name}")
            await self._serve(target, runtime)
        return generation

    async def _m_stop(self, _call: int, drain_timeout: float) -> bool:
        deadline = time.monotonic() + drain_timeout
        fronts = list(self.fronts.values())
        await asyncio.gather(*(f.drain(deadline) for f in fronts), return_exceptions=True)
        for _ in range(3):  # the sessions' close_session tasks send their last messages
            await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(self.done.set)
        return True

    async def _m_flush(self, _call: int) -> bool:
        """The supervisor's ``/v1/audit/flush``: the reply is queued behind every audit record
        this worker has not sent yet (the link seals them before anything else it sends), so once
        the supervisor reads the reply it has handed them to the audit store."""
        return True

    async def _m_cancel(self, _call: int, pid: int, secret: int) -> bool:
        """A CancelRequest another worker accepted, for a key of ours: deliver it upstream and
        answer once the server has signalled the backend."""
        from appliance.protocols.postgres import messages as m

        for front in list(self.fronts.values()):
            if (pid, secret) in front.cancel_keys:
                await front.cancel(m.CancelRequest(pid, secret))
                return True
        return False

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "terminate":  # the supervisor ends a session (lease, token, operator)
            _, session_id, code, text = message
            live = self.runtime.live.get(session_id) if self.runtime else None
            if live is not None and live.terminate is not None:
                live.terminate(code, text)
        elif kind == "audit_health":
            self.audit.set_health(*message[1:])
        else:
            log.warning("worker %d: unknown message %r", self.worker_id, kind)


def main(argv: list[str]) -> int:
    import uvloop

    from appliance.daemon import tune_gc

    fd, worker_id = int(argv[1]), int(argv[2])
    level = argv[3] if len(argv) > 3 else "info"
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker{worker_id} %(name)s: %(message)s")
    if len(argv) > 4 and argv[4] != "text":
        from appliance.logs import use_format

        use_format(argv[4])
    # The supervisor decides when workers stop (it drains them) and relays reloads; a signal
    # sent to the whole group (Ctrl-C, systemd's stop) must not cut sessions short here.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    tune_gc()
    return uvloop.run(WorkerHost(fd, worker_id).run())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
