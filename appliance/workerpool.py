"""The supervisor's side of ``appliance.workers`` > 1 (docs/architecture.md, "appliance.workers").

The daemon binds each target's listening socket once and starts N worker processes
(appliance/worker.py) that all accept on it: the kernel hands each connection to one of the
workers' ``accept`` calls, and while a worker restarts the others keep accepting, so no
connection is refused. Each worker has a private socket pair to the daemon (a :class:`Link`);
what must stay single is served here, through the daemon's own runtime:

* ``open_session``: identity and the credential lease (one lease per session, revoked here);
  the session is a ``LiveSession`` of the daemon's runtime (listings, operator ends, lease and
  token expiry, all as with one process), marked with the worker that serves it.
* audit events and strict mode's acknowledgements: the worker numbers its sessions' requests and
  turns its records into rows; the daemon hands each worker's frame of rows unopened to its one
  audit process, which builds the one hash chain. A frame holding strict mode's start rows is
  queued with a waiter; once it is journaled each start's reply id is answered (``reply``).
* holds: the approval broker is the daemon's; a worker's hold is a call that returns the
  broker's decision (decided once, as always), withdrawn by cancelling the call.
* cancel keys: every worker registers the keys it gives out; a CancelRequest for a key it
  does not hold is handed to the owner, which answers once the server was signalled.

A worker that dies: its sessions get their ``session_end`` (outcome ``error``) and their leases
are revoked, its holds are withdrawn (abandoned), its cancel keys forgotten, and it is started
again (after 0.5 s, doubling up to 30 s while it keeps dying at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from appliance.errors import BotwardenError
from appliance.fronts.services import AuthRefused
from appliance.tasks import TaskSet
from appliance.worker import Link, LinkClosed, open_link

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)

_RESTART_FIRST_S = 0.5
_RESTART_MAX_S = 30.0
_START_TIMEOUT_S = 60.0
_HEALTH_INTERVAL_S = 0.02


class BoundListener:
    """A listening socket the daemon bound for its workers (``sockets`` and ``close`` as an
    asyncio server has them, for the daemon's listener table and the probes)."""

    def __init__(self, sock: socket.socket):
        self.sockets = [sock]

    def close(self) -> None:
        # The workers stop accepting when told to drain; the daemon's copy closes at teardown.
        pass

    def really_close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


def bind_listener(target: Any) -> socket.socket:
    """The target's listening socket (TCP, or a Unix socket world-connectable as a loopback
    port is: who calls is decided by attestation)."""
    if target.listen_unix_path is not None:
        path = target.listen_unix_path
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o666)
    else:
        host, port = target.listen_host_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass
class WorkerSlot:
    """One worker: its process, its link, what the daemon holds on its behalf."""

    worker_id: int
    proc: subprocess.Popen | None = None
    link: Link | None = None
    pid: int | None = None
    generation: int = 0
    restarts: int = 0
    started_at: float = 0.0
    sessions: set[str] = field(default_factory=set)
    holds: dict[int, asyncio.Task] = field(default_factory=dict)
    ready: bool = False
    cancels_forwarded: int = 0  # CancelRequests it accepted for another worker's key, delivered there

    def public(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "pid": self.pid, "generation": self.generation,
                "sessions": len(self.sessions), "restarts": self.restarts, "ready": self.ready,
                "cancels_forwarded": self.cancels_forwarded}


class WorkerPool:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.sockets: dict[str, socket.socket] = {}
        self.slots: list[WorkerSlot] = []
        self.generation = 1
        self.cancel_owner: dict[tuple[int, int], int] = {}
        self._stopping = False
        self._tasks = TaskSet()
        self._health: tuple[bool, str | None, bool] = (True, None, False)

    # -- start ---------------------------------------------------------------------------

    def bind(self, targets: Any) -> dict[str, Any]:
        """Bind every target's listener; the daemon's Listener table entries for them."""
        from appliance.daemon import Listener

        out = {}
        for target in targets:
            try:
                sock = bind_listener(target)
            except OSError as e:
                raise BotwardenError(f"target {target.name!r}: cannot listen on {target.listen}: "
                                     f"{e.strerror or e}") from None
            self.sockets[target.name] = sock
            out[target.name] = Listener(target, BoundListener(sock), None)
        return out

    async def start(self) -> None:
        n = self.daemon.config.appliance.workers
        self.slots = [WorkerSlot(i) for i in range(1, n + 1)]
        await asyncio.gather(*(self._start_worker(slot) for slot in self.slots))
        self._tasks.spawn(self._watch_health(), "workers-audit-health")

    async def _start_worker(self, slot: WorkerSlot) -> None:
        cfg = self.daemon.config
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {name: s.fileno() for name, s in self.sockets.items()}
        try:
            # A fresh interpreter (fork + exec): never a fork of this process's loop and threads.
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.worker", str(theirs.fileno()), str(slot.worker_id),
                 cfg.appliance.log_level, cfg.logging.format],
                pass_fds=[theirs.fileno(), *fds.values()], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        slot.pid = slot.proc.pid
        slot.started_at = time.monotonic()
        slot.link = await open_link(ours, methods=self._methods(slot), on_message=lambda msg: self._on_message(slot, msg),
                                    peer=f"the worker process {slot.worker_id} (pid {slot.pid})")
        self._tasks.spawn(self._run_link(slot, slot.link, slot.proc), f"worker-{slot.worker_id}-link")
        handle = self.daemon.probes
        probes = (handle.path, handle.settings.pin_dir, handle.settings.nft_table) if handle is not None else None
        marks = getattr(self.daemon.audit, "marks", None)
        doc = {"config": cfg, "listeners": fds, "probes": probes, "generation": self.generation,
               "audit_health": self._audit_health(), "marks": str(marks.path) if marks is not None else None}
        try:
            started = await asyncio.wait_for(slot.link.call("start", doc), _START_TIMEOUT_S)
        except (BotwardenError, asyncio.TimeoutError) as e:
            raise BotwardenError(f"worker {slot.worker_id} did not start: {e}") from None
        slot.generation = started["generation"]
        slot.ready = True

    def _methods(self, slot: WorkerSlot) -> dict[str, Any]:
        async def open_session(_call: int, target: str, ctx: Any, user: str, token: str | None) -> tuple:
            runtime = self.daemon.runtime
            try:
                grant = await runtime.open_session(target, ctx, user, token)
            except AuthRefused as e:
                return ("refused", e.sqlstate, e.message, dict(e.audit_fields))
            live = runtime.live.get(grant.session_id)
            if slot.link is None or slot.link.closed is not None:  # the worker died meanwhile
                await runtime.close_session(grant)
                raise LinkClosed("the worker is gone")
            if live is not None:
                live.worker = slot.worker_id
                link = slot.link
                live.terminate = lambda code, text, sid=grant.session_id: link.send(("terminate", sid, code, text))
            slot.sessions.add(grant.session_id)
            # The worker writes the session's issued seq into this high-water slot itself.
            return ("ok", grant, live.expiry if live is not None else None, live.mark if live is not None else None)

        async def hold(call_id: int, session_id: str, target: str, text: str, verdict: Any,
                       request_id: str | None, detail: Any) -> Any:
            runtime = self.daemon.runtime
            live = runtime.live.get(session_id)
            if live is None:
                raise BotwardenError(f"no live session {session_id}")
            link = slot.link
            slot.holds[call_id] = asyncio.current_task()  # type: ignore[assignment]
            try:
                return await runtime.hold(live.grant, target, text, verdict,
                                          lambda approval_id: link.event(call_id, approval_id),
                                          request_id=request_id, detail=detail)
            finally:
                slot.holds.pop(call_id, None)

        async def cancel(_call: int, pid: int, secret: int) -> bool:
            owner = self.cancel_owner.get((pid, secret))
            if owner is None or owner == slot.worker_id:
                log.info("cancel request for an unknown key ignored (pid %s)", pid)
                return False
            other = self.slots[owner - 1]
            if other.link is None:
                return False
            try:
                delivered = await asyncio.wait_for(other.link.call("cancel", pid, secret), 30)
                slot.cancels_forwarded += bool(delivered)
                return delivered
            except (BotwardenError, asyncio.TimeoutError) as e:
                log.warning("worker %d could not deliver a forwarded cancel: %s", owner, e)
                return False

        return {"open_session": open_session, "hold": hold, "cancel": cancel}

    def _on_message(self, slot: WorkerSlot, message: tuple) -> None:
        kind = message[0]
        runtime = self.daemon.runtime
        if kind == "audit_frame":
            acks = message[9]
            try:
                acked = runtime.audit_relayed(*message[1:])
            except Exception as e:
                if acks:  # the statements waiting for their record are refused, never left waiting
                    self._answer_acks(slot, slot.link, acks, f"the audit store cannot take the statement's record: {e}")
                raise
            if acked is not None:
                link = slot.link
                acked.add_done_callback(lambda f: self._answer_acks(slot, link, acks, _failure(f)))
        elif kind == "close_session":
            slot.sessions.discard(message[1])
            live = runtime.live.get(message[1])
            if live is not None:
                self._tasks.spawn(runtime.close_session(live.grant), "worker-close-session")
        elif kind == "cancel_key":
            key = tuple(message[1])
            if message[2]:
                self.cancel_owner[key] = slot.worker_id  # type: ignore[index]
            elif self.cancel_owner.get(key) == slot.worker_id:  # type: ignore[arg-type]
                del self.cancel_owner[key]  # type: ignore[arg-type]
        elif kind == "upstream_failed":
            runtime.upstream_connect_failed(message[1], message[2])
        else:
            log.warning("worker %d sent an unknown message %r", slot.worker_id, kind)

    @staticmethod
    def _answer_acks(slot: WorkerSlot, link: Link | None, acks: list[tuple[int, int]], failed: str | None) -> None:
        """Strict mode: a worker's rows are journaled (``failed`` None) or were refused; each
        statement waiting for one gets its reply on the link the frame came by (a worker
        restarted meanwhile has a new link: nothing is sent to it)."""
        if link is None or link is not slot.link:
            return
        for call_id, _ in acks:
            link.send(("reply", call_id, failed is None, failed))

    # -- a worker that dies ----------------------------------------------------------------

    async def _run_link(self, slot: WorkerSlot, link: Link, proc: subprocess.Popen) -> None:
        why = await link.run()
        code = await asyncio.to_thread(_reap, proc)
        if code is None:  # it closed its link but does not exit: it is no use to anyone now
            proc.kill()
            code = await asyncio.to_thread(_reap, proc)
        slot.ready = False
        if self._stopping:
            return
        log.error("worker %d (pid %s) died (%s, exit status %s); its %d session(s) ended, restarting it",
                  slot.worker_id, proc.pid, why, code, len(slot.sessions))
        self._bury(slot, f"the worker process (pid {proc.pid}) serving this session died (exit status {code})")
        delay = _RESTART_FIRST_S
        while not self._stopping:
            await asyncio.sleep(delay)
            if self._stopping:
                return
            slot.restarts += 1
            try:
                await self._start_worker(slot)
                return
            except (BotwardenError, OSError) as e:
                log.error("worker %d could not be restarted: %s", slot.worker_id, e)
                delay = min(delay * 2, _RESTART_MAX_S)

    def _bury(self, slot: WorkerSlot, why: str) -> None:
        """A dead worker's sessions end in the audit (their leases revoked), its holds are
        withdrawn and its cancel keys forgotten."""
        runtime = self.daemon.runtime
        for task in list(slot.holds.values()):
            task.cancel(msg=f"{why}; the held request was withdrawn")
        slot.holds.clear()
        for key in [k for k, owner in self.cancel_owner.items() if owner == slot.worker_id]:
            del self.cancel_owner[key]
        marks = getattr(self.daemon.audit, "marks", None)
        now = datetime.now(timezone.utc)
        for session_id in list(slot.sessions):
            live = runtime.live.get(session_id)
            if live is None:
                continue
            # What the worker issued (its mark) and never sent: records lost with it, counted.
            issued = marks.issued(live.mark) if marks is not None and live.mark is not None else 0
            if issued > live.requests:
                runtime.audit("audit_loss", {
                    "ts": now, "cause": "worker_crash", "session_id": session_id, "issued_seq": issued,
                    "recorded_seq": live.requests, "missing": issued - live.requests, "session_end_missing": False,
                    "detail": f"{why}; requests it had answered were not yet sent to the daemon"})
            runtime.audit("session_end", {"session_id": session_id, "ts": now, "outcome": "error", "error": why,
                                          "requests": max(issued, live.requests)})
            self._tasks.spawn(runtime.close_session(live.grant), "worker-dead-close-session")
        slot.sessions.clear()

    # -- health, reload, stop, status ------------------------------------------------------

    def _audit_health(self) -> tuple[bool, str | None, bool]:
        """(healthy, why unavailable, behind: past the pace mark, so workers pace their bots)."""
        store = self.daemon.audit
        if store is None:
            return False, "the audit store is closed", False
        return bool(store.healthy), store.unavailable, bool(getattr(store, "behind", False))

    async def _watch_health(self) -> None:
        """Workers refuse statements while the audit store cannot take them, and pace them while it
        is behind, as the daemon's runtime does: they learn its state from here within a few tens
        of milliseconds."""
        while True:
            health = self._audit_health()
            if health != self._health:
                self._health = health
                for slot in self.slots:
                    if slot.link is not None:
                        slot.link.send(("audit_health", *health))
            await asyncio.sleep(_HEALTH_INTERVAL_S)

    async def reload(self, config: Any) -> str | None:
        """Every worker builds the new generation; None once each has acknowledged it, else why not."""
        self.generation += 1
        generation = self.generation

        async def one(slot: WorkerSlot) -> None:
            if slot.link is None or not slot.ready:
                return  # a worker starting now gets the new config at its start
            slot.generation = await asyncio.wait_for(slot.link.call("reload", generation, config), _START_TIMEOUT_S)

        results = await asyncio.gather(*(one(s) for s in self.slots), return_exceptions=True)
        failed = [f"worker {s.worker_id}: {r}" for s, r in zip(self.slots, results) if isinstance(r, BaseException)]
        return "; ".join(failed) or None

    async def stop(self, deadline: float) -> None:
        """Drain every worker (the daemon's held requests were denied first), then reap them."""
        if self._stopping:
            return
        self._stopping = True
        left = max(0.0, deadline - time.monotonic())

        async def one(slot: WorkerSlot) -> None:
            if slot.link is not None and slot.link.closed is None:
                with contextlib.suppress(BotwardenError, asyncio.TimeoutError):
                    await asyncio.wait_for(slot.link.call("stop", left), left + 5)
            if slot.proc is not None:
                code = await asyncio.to_thread(_reap, slot.proc, 5.0)
                if code is None:
                    slot.proc.kill()
                    await asyncio.to_thread(_reap, slot.proc)
            slot.ready = False

        await asyncio.gather(*(one(s) for s in self.slots), return_exceptions=True)
        # Sessions whose worker could not say goodbye (it died during the drain).
        for slot in self.slots:
            if slot.sessions:
                self._bury(slot, "the worker process serving this session did not stop cleanly")
        self._tasks.cancel_all()
        for slot in self.slots:
            if slot.link is not None:
                slot.link.close("the daemon stopped")
        for sock in self.sockets.values():
            with contextlib.suppress(OSError):
                sock.close()

    async def collect_audit(self, timeout: float) -> None:
        """Every record a running worker has numbered so far is in the daemon's audit store's
        queue (workers send theirs lazily, within LAZY_FLUSH_S): each worker answers a ``flush``
        call behind its unsent records. A worker that dies meanwhile is skipped: what it had not
        sent is counted lost (``audit_loss``) when it is buried. One that does not answer within
        ``timeout`` fails the flush (AuditFlushTimeout): the caller must not be told all is in."""
        from analytics.errors import AuditFlushTimeout

        async def one(slot: WorkerSlot) -> str | None:
            link = slot.link
            if link is None or link.closed is not None or not slot.ready:
                return None
            try:
                await asyncio.wait_for(link.call("flush"), timeout)
            except LinkClosed:
                return None
            except asyncio.TimeoutError:
                return f"worker {slot.worker_id} (pid {slot.pid}) did not send its audit records within {timeout:g} s"
            return None

        late = [why for why in await asyncio.gather(*(one(s) for s in self.slots)) if why]
        if late:
            raise AuditFlushTimeout("; ".join(late))

    def status(self) -> list[dict[str, Any]]:
        return [s.public() for s in self.slots]


def _failure(fut: asyncio.Future) -> str | None:
    """Why a done future failed, None if it succeeded."""
    if fut.cancelled():
        return "the audit store's acknowledgement was cancelled (the daemon is stopping)"
    e = fut.exception()
    return None if e is None else str(e) or type(e).__name__


def _reap(proc: subprocess.Popen, timeout: float | None = 30.0) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
