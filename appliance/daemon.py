"""The botwarden daemon: one process, one asyncio loop (uvloop), one listener per target.
(With ``appliance.workers`` > 1 the PostgreSQL fronts run in worker processes accepting on the
daemon's listeners: appliance/workerpool.py.)

Lifecycle
- start: take the state-dir lock (a second daemon on the same state dir refuses to start),
  open the audit store (its single writer thread), build the runtime (policy engine,
  identity, secrets) from the config, start one listener per target, the control socket,
  and attach the probes.
- SIGHUP: read the config again. If it is invalid, the old one keeps running and the error
  is logged and kept for `status`. If it is valid, a new runtime is built first and then
  swapped in at once; listeners whose settings changed are replaced, sessions already open
  keep the runtime they started with.
- SIGTERM / SIGINT: stop accepting, let in-flight requests finish up to
  ``appliance.drain_timeout``, end what is left with a protocol-native shutdown error,
  flush the audit store, remove the control socket, release the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.config import Config, TargetConfig, load_config
from appliance.control import ControlServer, Router
from appliance.errors import BotwardenError, ConfigError
from appliance.tasks import TaskSet

log = logging.getLogger(__name__)


class AlreadyRunning(BotwardenError):
    pass


class StateLock:
    """An exclusive flock on ``<state_dir>/daemon.lock`` holding the daemon's pid."""

    def __init__(self, state_dir: str):
        self.path = Path(state_dir) / "daemon.lock"
        self._fd: int | None = None

    def acquire(self) -> "StateLock":
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another botwarden daemon (pid {other}) is already running on state dir {self.path.parent}; "
                "stop it first or use another appliance.state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(state_dir: str) -> int | None:
        """The pid of the daemon holding the lock, or None."""
        path = Path(state_dir) / "daemon.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None


@dataclass
class Listener:
    target: TargetConfig
    server: asyncio.AbstractServer
    front: Any

    @property
    def address(self) -> tuple[str, int]:
        sock = self.server.sockets[0]
        return sock.getsockname()[:2]

    def describe(self) -> str:
        """Where it listens: ip:port, or unix:/path."""
        if self.target.listen_unix_path is not None:
            return self.target.listen
        return "%s:%d" % self.address


@dataclass
class DaemonState:
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    reloads: int = 0
    last_reload_error: str | None = None


def make_front(target: TargetConfig, config: Config, services: Any, admission: Any = None) -> Any:
    """The protocol front for one target. Each front has ``serve(host, port)``, ``drain(deadline)``
    and a ``services`` attribute the daemon swaps on reload."""
    if target.protocol == "postgres":
        from appliance.fronts.postgres import PgFrontSettings, PostgresFront

        host, port = target.host_port if target.unix_path is None else (target.unix_path, 0)
        settings = PgFrontSettings(
            target=target.name, upstream_host=host, upstream_port=port, upstream_unix=target.unix_path is not None,
            upstream_tls=target.tls.mode if target.unix_path is None else "disable",
            upstream_ca_file=target.tls.ca_file,
            tls_cert_file=config.tls.cert_file if config.tls else None,
            tls_key_file=config.tls.key_file if config.tls else None,
            # A Unix listener is local by construction: no network to protect the password from.
            allow_plaintext=target.allow_plaintext or target.listen_unix_path is not None, require_token=target.authentication != "attestation",
            authentication=target.authentication, max_message_size=target.max_message_size, connect_timeout=target.connect_timeout,
            message_timeout=config.limits.message_timeout_s, catalog_recheck_s=target.catalog_recheck_s)
        return PostgresFront(settings, services, admission)
    if target.protocol == "kubernetes":
        from appliance.fronts.k8s import K8sFrontSettings, KubernetesFront

        if config.tls is None:
            raise BotwardenError(f"target {target.name!r}: a Kubernetes target needs the [tls] section (kubectl "
                                 "speaks only TLS; the certificate must carry the API server's names)")
        host, port = target.host_port
        settings_k = K8sFrontSettings(
            target=target.name, upstream_host=host, upstream_port=port, tls_cert_file=config.tls.cert_file,
            tls_key_file=config.tls.key_file, upstream_ca_file=target.tls.ca_file,
            upstream_server_name=target.tls.server_name, require_token=target.authentication != "attestation",
            max_body_size=target.max_message_size, connect_timeout=target.connect_timeout)
        return KubernetesFront(settings_k, services, admission)
    if target.protocol == "ssh":
        from appliance.fronts.ssh import SshFront, SshFrontSettings, host_identity, load_or_make_host_ca

        if not target.known_hosts:
            raise BotwardenError(f"target {target.name!r}: an ssh target needs known_hosts (the sshd's host keys "
                                 "or its host CA): botwarden does not connect to an upstream it cannot verify")
        if target.credential is None or target.credential.source not in ("ssh", "kv"):
            raise BotwardenError(f"target {target.name!r}: an ssh target needs credential.source = \"ssh\" "
                                 "(a certificate per session) or \"kv\" (a private key, and optionally its "
                                 "certificate, kept in OpenBao's KV)")
        host, port = target.host_port
        ca = load_or_make_host_ca(str(Path(config.appliance.state_dir) / "ssh_host_ca"))
        key, cert = host_identity(ca, sorted({host, target.name}))
        return SshFront(SshFrontSettings(
            target=target.name, upstream_host=host, upstream_port=port, known_hosts=target.known_hosts,
            host_key=key, host_cert=cert, require_token=target.authentication != "attestation",
            connect_timeout=target.connect_timeout, env_allow=target.env_allow), services, admission)
    raise BotwardenError(f"target {target.name!r}: botwarden has no {target.protocol} front yet")


def classify_peer(handle: Any, sock: Any) -> Any:
    """Who holds the client end of an accepted connection: a bot the probes redirected (eBPF
    attribution, a map read; ``handle`` has ``path`` and ``lookup``), else the uid owning the
    local client socket (sock_diag)."""
    import probes

    from appliance.fronts.admission import Peer

    if handle is not None and handle.path == "ebpf":
        found = handle.lookup(sock)
        if found is not None:
            return Peer(f"uid:{found.uid}", found.uid, True)
    uid = probes.peer_uid(sock)
    if uid is not None:
        return Peer(f"uid:{uid}", uid, False)
    try:
        return Peer(f"addr:{sock.getpeername()[0]}", None, False)
    except OSError:
        return Peer("unknown", None, False)


class Daemon:
    def __init__(self, config_path: str | Path, *, config: Config | None = None):
        self.config_path = str(config_path)
        self.config = config or load_config(config_path)
        self.state = DaemonState()
        self.listeners: dict[str, Listener] = {}
        self.stopping = asyncio.Event()
        self._lock: StateLock | None = None
        self.audit: Any = None
        self.runtime: Any = None
        self.control: ControlServer | None = None
        self.probes: Any = None
        self.leases: Any = None  # appliance.secrets.LeaseLedger: leases held and not yet revoked, on disk
        self.leases_at_start: list[str] = []  # what the last run left in it
        from appliance.metrics import Metrics

        self.metrics = Metrics(self)
        self.metrics_address: tuple[str, int] | None = None
        self.bots_left_cgroup = 0  # probe events "left_cgroup" since start (status shows it)
        self.fleet_approvals: Any = None  # appliance.fleet_approvals.FleetApprovals with [fleet] approvals
        self.workers: Any = None  # appliance.workerpool.WorkerPool with appliance.workers > 1
        self._tasks = TaskSet()
        from appliance.fronts.admission import Admission

        # One set of caps on unauthenticated connections for every listener, kept across reloads.
        self.admission = Admission(admission_limits(self.config), classify=self._classify_peer,
                                   audit=self._audit_event)

    # -- helpers -------------------------------------------------------------------------

    def spawn(self, coro, name: str) -> asyncio.Task:
        return self._tasks.spawn(coro, name)

    def _audit_event(self, kind: str, record: Any) -> None:
        if self.runtime is not None:
            self.runtime.audit(kind, record)

    def _classify_peer(self, sock: Any) -> Any:
        return classify_peer(self.probes, sock)

    # -- lifecycle -----------------------------------------------------------------------


    async def start(self) -> None:
        cfg = self.config
        self._lock = StateLock(cfg.appliance.state_dir).acquire()
        try:
            from appliance.runtime import Runtime, open_audit_store

            self.audit = await asyncio.to_thread(open_audit_store, cfg)
            self.audit.attach(asyncio.get_running_loop())  # strict mode: read its acknowledgements from now on
            from appliance.secrets import LeaseLedger

            self.leases = await asyncio.to_thread(LeaseLedger.in_state_dir, cfg.appliance.state_dir)
            self.leases_at_start = self.leases.ids()
            self.runtime = await Runtime.create(cfg, self)
            self.audit.set_redaction(self.runtime.engine.detector_settings)
            if cfg.appliance.workers > 1:  # the daemon binds, its worker processes accept
                from appliance.workerpool import WorkerPool

                self.workers = WorkerPool(self)
                self.listeners.update(self.workers.bind(cfg.targets))
            else:
                for target in cfg.targets:
                    await self._start_listener(target, self.runtime)
            if cfg.probes.mode != "off":
                await self._attach_probes()
            if self.workers is not None:
                await self.workers.start()
            await self.runtime.started()
            if cfg.fleet is not None and cfg.fleet.approvals:
                from appliance.fleet_approvals import FleetApprovals

                self.fleet_approvals = FleetApprovals(self, cfg.fleet.approvals_dsn or cfg.fleet.catalog,
                                                      cfg.fleet.bastion)
                await self.fleet_approvals.start()
            if cfg.audit.retention_days:
                self.spawn(self._retention_loop(), "audit-retention")
            if cfg.metrics.listen:
                from appliance.config import split_host_port

                try:
                    self.metrics_address = await self.metrics.serve(*split_host_port(cfg.metrics.listen))
                except OSError as e:
                    raise BotwardenError(f"metrics.listen {cfg.metrics.listen}: {e.strerror or e}") from None
            from appliance.api import build_router

            # Last: a control socket that answers means everything above is in place.
            self.control = ControlServer(cfg.appliance.control_socket, build_router(self),
                                         mode=cfg.appliance.control_socket_mode,
                                         group=cfg.appliance.control_socket_group)
            await self.control.start()
        except BaseException:
            await self._teardown()
            raise
        log.info("botwarden daemon started (pid %d): %d target(s), control socket %s", os.getpid(),
                 len(self.listeners), cfg.appliance.control_socket)

    async def _start_listener(self, target: TargetConfig, runtime: Any) -> None:
        try:
            front = make_front(target, self.config, runtime, self.admission)
        except (ValueError, OSError) as e:  # e.g. TLS files that cannot be read
            raise BotwardenError(f"target {target.name!r}: {e}") from None
        if target.listen_unix_path is not None:
            server = await front.serve_unix(target.listen_unix_path)
        else:
            host, port = target.listen_host_port
            server = await front.serve(host, port)
        self.listeners[target.name] = Listener(target, server, front)

    async def _retention_loop(self) -> None:
        """Apply audit.retention_days at start and then every hour (the chain stays verifiable:
        the store records a checkpoint of what it removed; see docs/audit-schema.md)."""
        from datetime import timedelta

        from analytics import AuditError

        while True:
            days = self.config.audit.retention_days
            if days:
                try:
                    result = await asyncio.to_thread(self.audit.retention, timedelta(days=days))
                    log.info("audit retention (%d days): %s", days, result)
                except AuditError as e:
                    log.error("audit retention failed: %s", e)
            await asyncio.sleep(3600)

    async def _attach_probes(self, *, reattach: bool = False) -> None:
        """Attach (or atomically replace) the redirect for the current targets, and start the
        thread that turns probe events (denied connects, redirects) into audit rows.

        With probes already attached only the targets are updated, unless ``reattach``: then the
        programs (or table) are installed again with this daemon as their owner."""
        import probes

        from appliance.bots import probe_settings

        listeners = {name: li.address for name, li in self.listeners.items() if li.target.unix_path is None}
        settings = await asyncio.to_thread(probe_settings, self.config, listeners)
        if self.probes is not None and not reattach:
            await asyncio.to_thread(self.probes.update_targets, settings)
            return
        try:
            handle = await asyncio.to_thread(probes.attach, settings)
        except probes.ProbeError as e:
            raise BotwardenError(f"probes could not attach: {e}") from None
        if self.probes is not None:
            # One reader of the event ring at a time. The old handle keeps answering lookups (they
            # read the pins) until the new one replaces it, so sessions never see no handle at all.
            await asyncio.to_thread(self._stop_probe_reader)
        self.probes = handle
        log.info("probes attached: %s (%s)", self.probes.path, self.probes.reason)
        self._probe_stop = threading.Event()
        self._probe_thread = threading.Thread(target=self._poll_probe_events, name="probe-events", daemon=True)
        self._probe_thread.start()

    async def reattach_probes(self) -> str:
        """`botwarden probes attach` while the daemon runs: install the redirect again (restoring
        one an operator detached, or replacing it atomically) owned by this daemon, with the
        listeners it really has."""
        if self.config.probes.mode == "off":
            raise BotwardenError('probes.mode is "off" in the running config')
        await self._attach_probes(reattach=True)
        return f"{self.probes.path} ({self.probes.reason})"

    def _poll_probe_events(self) -> None:
        handle, stop, audit = self.probes, self._probe_stop, self.audit

        def record(event: Any) -> None:
            if event.event == "left_cgroup":  # probes logged the warning; status counts it
                self.bots_left_cgroup += 1
            if audit is not None and not audit.submit("probe", event.as_record()):
                log.error("audit queue full: a probe event was refused by the store")

        while not stop.is_set():
            try:
                handle.poll_events(record, timeout_ms=200)
            except Exception:  # a failing poll is logged, not fatal; the redirect stays in force
                log.exception("reading probe events failed")
                stop.wait(1)

    def _stop_probe_reader(self) -> None:
        """Stop the event thread and close the handle's event reader (lookups still work)."""
        self._probe_stop.set()
        self._probe_thread.join(5)
        self.probes.close()

    def _detach_probe_reader(self) -> None:
        """Stop reading events and release handles. The redirect itself stays (fail closed)."""
        if self.probes is None:
            return
        self._stop_probe_reader()
        self.probes = None

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain, stop. Returns the process exit code."""
        loop = asyncio.get_running_loop()
        await self.start()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload(), "reload"))
        try:
            await self.stopping.wait()
            log.info("stopping: draining in-flight requests (up to %.1fs)", self.config.appliance.drain_timeout)
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return 0

    async def stop(self) -> None:
        deadline = time.monotonic() + self.config.appliance.drain_timeout
        for listener in self.listeners.values():
            listener.server.close()
        if self.runtime is not None:
            # Held requests are denied first (recorded), so their bots hear why before the drain.
            await self.runtime.stopping()
        fronts = [listener.front for listener in self.listeners.values() if listener.front is not None]
        if fronts:
            await asyncio.gather(*(f.drain(deadline) for f in fronts), return_exceptions=True)
        if self.workers is not None:
            await self.workers.stop(deadline)
        await self._teardown()
        log.info("botwarden daemon stopped")

    async def _teardown(self) -> None:
        await asyncio.to_thread(self._detach_probe_reader)
        if self.workers is not None:  # a start that failed half-way; after stop() a no-op
            await self.workers.stop(time.monotonic())
        await self.metrics.close()
        if self.fleet_approvals is not None:
            await asyncio.to_thread(self.fleet_approvals.close)
        if self.runtime is not None:
            with contextlib.suppress(Exception):
                await self.runtime.close()
        if self.control is not None:
            await self.control.close()
        for listener in self.listeners.values():
            listener.server.close()
        self._tasks.cancel_all()
        try:
            if self.audit is not None:
                audit, self.audit = self.audit, None
                await asyncio.to_thread(audit.close)  # raises if accepted events were lost
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    async def flush_audit(self, timeout: float = 10.0) -> None:
        """Return once every event recorded before the call is committed to the audit store,
        including those a worker process (appliance.workers > 1) has not sent yet."""
        from analytics import AuditClosedError

        if self.workers is not None:
            await self.workers.collect_audit(timeout)
        audit = self.audit
        if audit is None:
            raise AuditClosedError("the audit store is closed")
        await asyncio.to_thread(audit.flush, timeout)

    async def reload(self) -> bool:
        """Re-read the config; keep the old one running if the new one is invalid."""
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            self._check_reloadable(new)
            from appliance.runtime import Runtime

            runtime = await Runtime.create(new, self)
        except (ConfigError, BotwardenError) as e:
            self.state.last_reload_error = str(e)
            log.error("reload refused, the running config stays in force: %s", e)
            return False
        old_targets = {t.name: t for t in self.config.targets}
        new_targets = {t.name: t for t in new.targets}
        old_runtime = self.runtime
        # Swap first so new sessions see the new policy at once; then fix the listeners.
        self.runtime, self.config = runtime, new
        self.admission.limits = admission_limits(new)
        if self.audit is not None:
            self.audit.set_redaction(runtime.engine.detector_settings)
        if self.workers is not None:  # same listeners (checked); each worker takes the new generation
            failed = await self.workers.reload(new)
            if failed:
                log.error("reload: %s", failed)
                self.state.last_reload_error = f"target workers: {failed}"
            for name, listener in self.listeners.items():
                listener.target = new_targets[name]
        else:
            for name, listener in list(self.listeners.items()):
                if name not in new_targets or new_targets[name] != old_targets[name]:
                    listener.server.close()
                    del self.listeners[name]
                    self.spawn(listener.front.drain(time.monotonic() + new.appliance.drain_timeout),
                               f"drain-{name}")
            for name, target in new_targets.items():
                if name in self.listeners:
                    self.listeners[name].front.services = runtime
                else:
                    try:
                        await self._start_listener(target, runtime)
                    except (OSError, BotwardenError) as e:
                        log.error("reload: listener for target %r could not start: %s", name, e)
                        self.state.last_reload_error = f"target {name!r}: {e}"
        if self.probes is not None:
            try:
                await self._attach_probes()
            except BotwardenError as e:
                log.error("reload: probe targets not updated: %s", e)
                self.state.last_reload_error = f"target probes: {e}"
        if old_runtime is not None:
            self.spawn(old_runtime.retire(), "retire-runtime")
        self.state.reloads += 1
        if self.state.last_reload_error and self.state.last_reload_error.startswith("target"):
            return False
        self.state.last_reload_error = None
        log.info("config reloaded from %s", self.config_path)
        return True

    def _check_reloadable(self, new: Config) -> None:
        old = self.config
        for key in ("state_dir", "control_socket"):
            if getattr(new.appliance, key) != getattr(old.appliance, key):
                raise ConfigError(f"appliance.{key} cannot change on reload; restart the daemon")
        # The audit process was started with (or without) its journal and acknowledgements, its
        # batches, queue, DuckDB threads and pacing: a reload that changed them would seem to apply.
        for key in ("path", "mode", "ack_timeout", "stream", "threads", "pace_mark", "pace_wait", "batch_max",
                    "flush_interval", "queue_max", "on_full", "journal_sync"):
            if getattr(new.audit, key) != getattr(old.audit, key):
                raise ConfigError(f"audit.{key} cannot change on reload; restart the daemon")
        if new.appliance.workers != old.appliance.workers:
            raise ConfigError("appliance.workers cannot change on reload; restart the daemon")
        if old.appliance.workers > 1 and ({t.name: (t.listen, t.protocol) for t in new.targets}
                                          != {t.name: (t.listen, t.protocol) for t in old.targets}):
            raise ConfigError("with appliance.workers > 1 the targets' names, listen addresses and protocols "
                              "cannot change on reload (the daemon bound their listeners for its workers); "
                              "restart the daemon")
        if new.logging != old.logging:
            raise ConfigError("logging.format cannot change on reload; restart the daemon")
        if new.metrics != old.metrics:
            raise ConfigError("metrics.listen cannot change on reload; restart the daemon")
        # The audit process ships with the [fleet] it was started with; fleet approvals likewise.
        if new.fleet != old.fleet:
            raise ConfigError("[fleet] cannot change on reload; restart the daemon")
        # The probes are attached to one cgroup with one set of pins/table; a reload only updates
        # their targets. Taking a new cgroup here would leave the bots in it unwatched.
        # (unix_allow and passthrough do change with the targets; these are compiled into the programs.)
        for key in ("mode", "bots_cgroup", "pin_dir", "nft_table", "map_entries", "unix_sockets", "watch_escapes",
                    "kill_escaped"):
            if getattr(new.probes, key) != getattr(old.probes, key):
                raise ConfigError(f"probes.{key} cannot change on reload; restart the daemon")

    # -- status --------------------------------------------------------------------------

    def _probe_status(self) -> str:
        handle = self.probes
        if handle is None:
            return "off" if self.config.probes.mode == "off" else "not attached"
        try:
            attached = handle.still_attached()
        except Exception as e:  # noqa: BLE001 - a status line must not fail the status call
            return f"{handle.path} ({handle.reason}); could not check the attachment: {e}"
        if not attached:
            return (f"{handle.path} programs were removed outside the daemon (botwarden probes detach?): "
                    "bots are not redirected; run `botwarden probes attach`")
        return f"{handle.path} ({handle.reason})"

    def fleet_status(self) -> dict[str, Any] | None:
        """The fleet shipper's progress (it writes it beside the store; analytics.fleet), or None
        without [fleet]. ``backlog``: committed rows not yet in the lake."""
        if self.config.fleet is None:
            return None
        from analytics.fleet import read_progress

        progress = read_progress(self.config.audit.path)
        if progress is None or progress.get("bastion") != self.config.fleet.bastion:
            return {"bastion": self.config.fleet.bastion, "lake": "connecting", "backlog": None}
        return progress

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self.state.started_at.isoformat(),
            "config": self.config_path,
            "reloads": self.state.reloads,
            "last_reload_error": self.state.last_reload_error,
            "targets": [
                {"name": name, "protocol": li.target.protocol, "address": li.target.address,
                 "listen": li.describe()}
                for name, li in self.listeners.items()
            ],
            "audit": {"path": self.config.audit.path,
                      "healthy": bool(self.audit is not None and self.audit.healthy),
                      "pid": self.audit.pid if self.audit is not None else None},
            "fleet": self.fleet_status(),
            "fleet_approvals": self.fleet_approvals.status() if self.fleet_approvals is not None else None,
            "probes": self._probe_status(),
            "admission": self.admission.stats(),
            "metrics": "%s:%d" % self.metrics_address if self.metrics_address else None,
            "bots_left_cgroup": self.bots_left_cgroup,
            "workers": self.workers.status() if self.workers is not None else None,
            **(self.runtime.status() if self.runtime is not None else {}),
        }


def admission_limits(cfg: Config) -> Any:
    from appliance.fronts.admission import AdmissionLimits

    lim = cfg.limits
    return AdmissionLimits(per_uid=lim.unauthenticated_per_uid, total=lim.unauthenticated_total,
                           timeout_s=lim.unauthenticated_timeout_s,
                           pressure_timeout_s=lim.unauthenticated_timeout_under_pressure_s)


def tune_gc() -> None:
    """The daemon keeps many long-lived objects and allocates many short-lived ones per request
    (and per audit event). CPython's default generation-0 threshold (700 allocations) runs the
    collector thousands of times a second under load, and every run walks the young objects
    the audit queue holds. Collect less often, and keep start-up objects out of its sight.
    Measured with bench/audit_ingest.py: about 50,000 → 60,000 events/s."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


STARTING_NICE: int | None = None  # the priority botwarden was started with (its audit process keeps it)
AUTOGROUPS = Path("/proc/sys/kernel/sched_autogroup_enabled")
AUTOGROUP = Path("/proc/self/autogroup")


def set_priority(nice: int) -> None:
    """Run the daemon at CPU priority ``nice``, before any thread starts (on Linux a priority is
    per thread, and new threads inherit their creator's). Under load the bots, the daemon and
    (on a shared host) the database compete for the cores; at the default priority the event
    loop that every session waits on gets a 1/N share and sessions stall. Measured with
    bench/pgbench_compare.py, 4 alternating rounds: transactions slower than 10 ms 37/28/29/37
    at -10 vs 79/75/93/86 at 0. Without the privilege to raise it, the daemon says so and runs."""
    global STARTING_NICE
    STARTING_NICE = os.getpriority(os.PRIO_PROCESS, 0)
    if nice != STARTING_NICE:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as e:
            log.warning("could not set the daemon's CPU priority to nice %d (%s); running at %d", nice,
                        e.strerror, STARTING_NICE)
            return
        log.info("daemon CPU priority: nice %d (was %d)", nice, STARTING_NICE)
    set_autogroup_nice(nice)


def autogroups_enabled() -> bool:
    """Whether the kernel schedules with autogroups (``kernel.sched_autogroup_enabled``)."""
    try:
        return AUTOGROUPS.read_text().strip() == "1"
    except OSError:
        return False  # a kernel without autogroups: nice values order every task


def autogroup_nice(path: Path) -> int | None:
    """The nice of the scheduler autogroup ``path`` (``/proc/PID/autogroup``) shows, or None when
    it shows none ("/autogroup-N nice M"; nothing for the root group, never made by setsid)."""
    shown = path.read_text().split()
    return int(shown[-1]) if shown else None


def set_autogroup_nice(nice: int) -> None:
    """With scheduler autogroups (``kernel.sched_autogroup_enabled``, tasks in the root cpu
    cgroup: Debian's default, systemd services included) a nice value orders threads within one
    session only; between sessions the scheduler shares the CPU by each session's autogroup
    nice. Bots, and PostgreSQL's backends (each calls setsid), are sessions of their own, so the
    daemon's -10 alone gave its loop no precedence over them: `perf sched` showed it preempted
    in its socket writes by the backends and pgbench it had just woken, ~1,800 times a second
    (docs/architecture.md, CPU priority). So the daemon also sets its autogroup's nice, when the
    autogroup is its own: it leads its session, as a systemd service does. Started from a shell
    (or a test), it shares the caller's session and leaves it alone."""
    if not autogroups_enabled():
        return
    if os.getsid(0) != os.getpid():
        if nice < 0:
            log.info("daemon CPU priority: nice %d counts within the session it was started in only "
                     "(scheduler autogroups); started as a session of its own (a systemd service, setsid) it "
                     "counts against other sessions too", nice)
        return
    try:
        current = autogroup_nice(AUTOGROUP)
        if current is None:
            return  # a session never made by setsid: the root group, whose weight cannot be set
        if current == nice:
            return
        AUTOGROUP.write_text(f"{nice}\n")
    except (OSError, ValueError, IndexError) as e:
        log.warning("could not set the daemon's scheduler autogroup to nice %d (%s); its nice value counts within "
                    "its session only", nice, getattr(e, "strerror", None) or e)
    else:
        log.info("daemon scheduler autogroup: nice %d (was %d)", nice, current)


def run_daemon(config_path: str) -> int:
    """Entry point of `botwarden run`: uvloop, logging, exit code."""
    import uvloop

    try:
        config = load_config(config_path)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    logging.getLogger().setLevel(config.appliance.log_level.upper())
    if config.logging.format != "text":
        from appliance.logs import use_format

        use_format(config.logging.format)
    set_priority(config.appliance.nice)
    daemon = Daemon(config_path, config=config)
    tune_gc()
    try:
        return uvloop.run(daemon.run())
    except AlreadyRunning as e:
        log.error("%s", e)
        return 3
    except BotwardenError as e:
        log.error("botwarden daemon could not start: %s", e)
        return 1


__all__ = ["Daemon", "StateLock", "AlreadyRunning", "make_front", "run_daemon"]
