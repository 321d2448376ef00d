"""attach / detach / status: which redirect path runs, and who owns it.

``attach`` picks eBPF or the nftables fallback ('auto'), installs it for the
bots' parent cgroup, and returns a ``ProbeHandle`` (events, lookups). A second
``attach`` (daemon restart, config reload) replaces the running programs or
table atomically. When the owner dies nothing is removed: bots keep being sent
to the (dead) listener and are refused — fail closed — and ``status`` says so.
``detach`` removes programs, pins, table and state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from probes import cgroups, loader, nft, records
from probes.attribution import Attribution, cgroup_path_for, proc_start_ticks, verified_exe
from probes.btf import kernel_features
from probes.attribution import lookup as _lookup
from probes.errors import ProbeError, ProbeUnavailable
from probes.ringbuf import RingBufferReader
from probes.settings import ProbeSettings

log = logging.getLogger(__name__)

Path_ = Literal["ebpf", "nftables"]


@dataclass(frozen=True)
class ProbeEvent:
    """One ``probe`` audit record (contract §1)."""

    ts: datetime
    event: Literal["denied_connect", "redirected", "attached", "detached", "left_cgroup"]
    pid: int | None = None  # process id (tgid)
    uid: int | None = None
    gid: int | None = None
    cgroup_id: int | None = None
    cgroup_path: str | None = None
    comm: str | None = None
    exe: str | None = None
    dst_addr: str | None = None
    dst_port: int | None = None
    family: Literal["ipv4", "ipv6", "unix"] | None = None  # unix: dst_addr is the socket path
    detail: str | None = None
    # left_cgroup: pid/uid/exe are the process that left, cgroup_* the bots' cgroup it was in,
    # dst_addr the cgroup it went to.

    def as_record(self) -> dict[str, Any]:
        """Fields for ``AuditStore.submit("probe", ...)``; unset ones left out."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _ebpf_unavailable_reason() -> str | None:
    """Cheap checks before paying for a compile; None when eBPF looks usable."""
    if os.geteuid() != 0:
        return "eBPF needs root"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        return f"no kernel headers at {build} (run probes/setup-host.sh)"
    try:
        cgroups.cgroup2_mount()
    except ProbeUnavailable as e:
        return str(e)
    with open("/proc/self/mounts") as f:
        bpffs = any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f)
    if not bpffs:
        return "bpffs is not mounted at /sys/fs/bpf (run probes/setup-host.sh)"
    if importlib.util.find_spec("bcc") is None:
        return "bcc is not importable (run probes/setup-host.sh)"
    if ctypes.util.find_library("bpf") is None:
        return "libbpf is not installed (apt install libbpf1)"
    return None


class ProbeHandle:
    """The running redirect path, owned by this process."""

    def __init__(self, settings: ProbeSettings, path: Path_, reason: str, prog_ids: tuple[int, ...] = ()):
        self.settings = settings
        self.path: Path_ = path
        self.reason = reason
        self.prog_ids = prog_ids
        self._events = (
            RingBufferReader(str(Path(settings.pin_dir) / "events"), ctypes.sizeof(records.Event))
            if path == "ebpf" else None
        )
        self._pending: list[ProbeEvent] = [
            ProbeEvent(ts=datetime.now(timezone.utc), event="attached", detail=f"{path}: {reason}")
        ]
        self._cgroup_parent = cgroups.relative(settings.cgroup_parent)

    def lookup(self, sock: socket.socket) -> Attribution | None:
        return _lookup(sock, pin_dir=self.settings.pin_dir, nft_table=self.settings.nft_table)

    def still_attached(self) -> bool:
        """Are this handle's eBPF programs still on the cgroup? (``botwarden probes detach`` from
        the CLI removes them behind the daemon's back.) A few bpf syscalls; the nftables path is
        not checked here (that needs the nft binary) and reports True."""
        if self.path != "ebpf":
            return True
        attached = {p.prog_id for p in loader.attached_programs(cgroups.resolve(self.settings.cgroup_parent))}
        return bool(self.prog_ids) and set(self.prog_ids) <= attached

    def update_targets(self, settings: ProbeSettings) -> None:
        """New targets/passthrough without a reload (same cgroup, pins and mode)."""
        if self.path == "ebpf":
            loader.sync_targets(settings)
        else:
            nft.attach(settings, self.reason)
        self.settings = settings

    def poll_events(self, callback: Callable[[ProbeEvent], None], timeout_ms: int = 0) -> int:
        """Deliver pending events to ``callback``; waits up to ``timeout_ms`` for the first.

        Call from one thread. ``timeout_ms=0`` never blocks (fine on the event
        loop after ``fileno()`` turned readable); with a timeout, use a worker
        thread. Returns how many were delivered.
        """
        count = 0
        pending, self._pending = self._pending, []
        for ev in pending:
            callback(ev)
            count += 1
        if self._events is None:
            if timeout_ms and not count:
                time.sleep(timeout_ms / 1000)  # the nftables path has no event source
            return count
        offset = time.time_ns() - time.monotonic_ns()  # kernel stamps are CLOCK_MONOTONIC

        def convert(raw: bytes) -> None:
            nonlocal count
            callback(self._event(records.Event.from_buffer_copy(raw), offset))
            count += 1

        self._events.poll(convert, 0 if count else timeout_ms)
        return count

    def fileno(self) -> int:
        """Readable when events are waiting (eBPF path), for ``loop.add_reader``; -1 otherwise."""
        return self._events.fileno() if self._events is not None else -1

    def events(self, timeout_ms: int = 100) -> Iterator[ProbeEvent]:
        """Iterate events as they come (blocking; stop by breaking out)."""
        while True:
            batch: list[ProbeEvent] = []
            self.poll_events(batch.append, timeout_ms)
            yield from batch

    def _event(self, raw: records.Event, offset: int) -> ProbeEvent:
        if raw.event == records.EV_LEFT_CGROUP:
            return self._left_cgroup(raw, offset)
        ident = raw.id
        exe_dev = records.kernel_dev_to_user(ident.exe_dev)
        detail = records.REASONS.get(raw.reason, f"reason {raw.reason}")
        dst_addr: str | None = records.unpack_ip(bytes(raw.dst_ip))
        dst_port: int | None = raw.dst_port
        family = "ipv4" if records.is_mapped(bytes(raw.dst_ip)) else "ipv6"
        if raw.family == socket.AF_UNIX:
            dst_addr, dst_port, family = records.unix_address(raw.path) or None, None, "unix"
        elif raw.reason == records.WHY_SOCKET_TYPE:  # socket() refused: there is no destination
            dst_addr = dst_port = None
            family = "ipv4" if raw.family == socket.AF_INET else "ipv6"
            detail = f"{detail}: protocol {raw.protocol}"
        else:
            if raw.protocol not in (0, socket.IPPROTO_TCP):
                detail = f"{detail} (protocol {raw.protocol})".strip()
            if raw.family == socket.AF_INET6 and family == "ipv4" and raw.reason != records.WHY_BIND_LISTENER:
                detail = f"{detail} (IPv4-mapped address on an IPv6 socket)".strip()
        return ProbeEvent(
            ts=datetime.fromtimestamp((ident.ktime_ns + offset) / 1e9, timezone.utc),
            event="denied_connect" if raw.event == records.EV_DENIED else "redirected",
            pid=ident.tgid,
            uid=ident.uid,
            gid=ident.gid,
            cgroup_id=ident.cgroup_id,
            cgroup_path=cgroup_path_for(ident.cgroup_id, self._cgroup_parent),
            comm=ident.comm.decode(errors="replace"),
            exe=verified_exe(ident.tgid, ident.start_boottime_ns, ident.exe_ino, exe_dev),
            dst_addr=dst_addr,
            dst_port=dst_port,
            family=family,  # type: ignore[arg-type]
            detail=detail or None,
        )

    def _left_cgroup(self, raw: records.Event, offset: int) -> ProbeEvent:
        """A bot's process outside the bots' cgroups: warn, and kill it when configured and
        the BPF program could not (it signals only a process that moved itself)."""
        ident = raw.id
        exe = verified_exe(ident.tgid, ident.start_boottime_ns, ident.exe_ino,
                           records.kernel_dev_to_user(ident.exe_dev))
        to = records.unix_address(raw.path) if raw.path.len else cgroup_path_for(ident.cgroup_id, "/")
        to = to or f"cgroup id {ident.cgroup_id}"
        came_from = cgroup_path_for(raw.other_cgroup_id, self._cgroup_parent)
        detail = f"moved from {came_from or f'cgroup id {raw.other_cgroup_id}'} to {to}"
        if raw.reason and raw.reason != records.WHY_KILLED:
            detail += f": {records.REASONS.get(raw.reason, raw.reason)}"
        if raw.reason == records.WHY_KILLED:
            detail += "; killed (probes.kill_escaped)"
        elif self.settings.kill_escaped:
            detail += "; " + _kill_if_same(ident.tgid, ident.start_boottime_ns)
        comm = ident.comm.decode(errors="replace")
        log.warning("bot process left the bots' cgroups: pid %d uid %d %s (%s) %s",
                    ident.tgid, ident.uid, exe or "?", comm, detail)
        return ProbeEvent(
            ts=datetime.fromtimestamp((ident.ktime_ns + offset) / 1e9, timezone.utc),
            event="left_cgroup", pid=ident.tgid, uid=ident.uid, gid=ident.gid,
            cgroup_id=raw.other_cgroup_id, cgroup_path=came_from, comm=comm, exe=exe,
            dst_addr=to, detail=detail,
        )

    def close(self) -> None:
        """Release this process's handles; the redirect stays in force (fail closed)."""
        if self._events is not None:
            self._events.close()
            self._events = None


def _kill_if_same(tgid: int, start_boottime_ns: int) -> str:
    """SIGKILL ``tgid`` through a pidfd, if it is still the process the kernel reported."""
    try:
        pidfd = os.pidfd_open(tgid)
    except OSError:
        return "already gone"
    try:
        if proc_start_ticks(tgid) != start_boottime_ns // (10**9 // os.sysconf("SC_CLK_TCK")):
            return "not killed: the pid now belongs to another process"
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return "killed (probes.kill_escaped)"
    except OSError as e:
        return f"not killed: {e.strerror}"
    finally:
        os.close(pidfd)


def unix_refusal(why: str) -> str:
    """The loud refusal when Unix sockets are to be filtered and cannot be."""
    return (f"bots' Unix-socket connections cannot be filtered: {why}. A bot could reach every local "
            "Unix socket (a database's socket directory, a container runtime's socket...) without "
            "passing the inspector. Refusing to attach; set probes.unix_sockets = \"unfiltered\" to "
            "accept that (docs/threat-model.md)")


def attach(settings: ProbeSettings) -> ProbeHandle:
    """Install the redirect for ``settings`` (or replace the running one atomically).

    With ``unix_sockets="filter"`` it refuses (ProbeUnavailable) rather than run a path that
    cannot filter Unix sockets: a kernel without the AF_UNIX cgroup hooks, or nftables."""
    cgroups.create(settings.cgroup_parent)
    reason: str
    if settings.mode in ("auto", "ebpf"):
        why_not = _ebpf_unavailable_reason()
        if why_not is None and settings.unix_sockets == "filter":
            missing = kernel_features().unix_missing
            if missing:
                log.error("%s", unix_refusal(missing))
                raise ProbeUnavailable(unix_refusal(missing))
            if settings.unix_targets and kernel_features().unix_kfuncs_missing:
                why = (f"Unix-socket targets cannot be redirected: {kernel_features().unix_kfuncs_missing}; "
                       "register the database by a TCP address instead")
                log.error("%s", why)
                raise ProbeUnavailable(why)
        if why_not is None:
            try:
                ids = loader.load_and_attach(settings)
                loader.write_meta(settings, os.getpid())
            except ProbeError as e:
                why_not = str(e)
            else:
                if nft.installed(settings.nft_table):
                    nft.detach(settings)  # eBPF rewrites first, so the old table never saw a gap
                reason = "mode=ebpf" if settings.mode == "ebpf" else "eBPF available"
                log.info("probes attached (ebpf) to %s: programs %s", settings.cgroup_parent, ids)
                return ProbeHandle(settings, "ebpf", reason, ids)
        if settings.mode == "ebpf":
            raise ProbeUnavailable(f"eBPF requested but unavailable: {why_not}")
        reason = f"eBPF unavailable: {why_not}"
    else:
        reason = "mode=nftables"
    if settings.unix_sockets == "filter":
        why = unix_refusal(f"the nftables path ({reason}) sees only IP traffic")
        log.error("%s", why)
        raise ProbeUnavailable(why)
    nft.attach(settings, reason)
    # Only now drop eBPF programs a previous run left: there was never a gap.
    loader.detach_programs(cgroups.resolve(settings.cgroup_parent))
    loader.unpin(settings.pin_dir)
    log.info("probes attached (nftables) to %s: %s", settings.cgroup_parent, reason)
    return ProbeHandle(settings, "nftables", reason)


@dataclass(frozen=True)
class DetachResult:
    programs: tuple[loader.AttachedProgram, ...]
    pins: tuple[str, ...]
    nft_table: bool
    event: ProbeEvent


def detach(settings: ProbeSettings) -> DetachResult:
    """Remove everything ``attach`` installed, whoever installed it. Bots are then unwatched."""
    cgroup = cgroups.resolve(settings.cgroup_parent)
    progs = tuple(loader.detach_programs(cgroup))
    pins = tuple(loader.unpin(settings.pin_dir))
    had_table = nft.detach(settings) if nft.available() is None else False
    detail = f"{len(progs)} programs detached, {len(pins)} pins removed" + (", nft table removed" if had_table else "")
    log.info("probes detached from %s: %s", cgroup, detail)
    ev = ProbeEvent(ts=datetime.now(timezone.utc), event="detached", detail=detail)
    return DetachResult(progs, pins, had_table, ev)


@dataclass(frozen=True)
class ProbeStatus:
    path: Literal["ebpf", "nftables", "none"]
    reason: str
    cgroup_path: str
    programs: tuple[loader.AttachedProgram, ...] = ()
    pinned_maps: tuple[str, ...] = ()
    nft_table: bool = False
    owner_pid: int | None = None
    owner_alive: bool = False
    fail_closed: bool = False  # redirect in force with no live owner: bots are refused

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "reason": self.reason,
            "cgroup_path": self.cgroup_path,
            "programs": [p.__dict__ for p in self.programs],
            "pinned_maps": list(self.pinned_maps),
            "nft_table": self.nft_table,
            "owner_pid": self.owner_pid,
            "owner_alive": self.owner_alive,
            "fail_closed": self.fail_closed,
        }


def status(settings: ProbeSettings) -> ProbeStatus:
    """What is in force for ``settings`` right now, readable from any root process."""
    cgroup = cgroups.resolve(settings.cgroup_parent)
    rel = cgroups.relative(cgroup)
    progs = tuple(loader.attached_programs(cgroup))
    pin_dir = Path(settings.pin_dir)
    pins = tuple(str(pin_dir / n) for n in loader.PINNED if (pin_dir / n).exists())
    has_table = nft.available() is None and nft.installed(settings.nft_table)
    if progs:
        meta = loader.read_meta(settings.pin_dir)
        owner = meta.owner_tgid if meta else None
        alive = bool(meta and loader.owner_alive(meta))
        hooks = {p.hook for p in progs}
        missing = sorted({short for *_, short in loader.plan(settings).cgroup_programs()} - hooks)
        if missing:
            reason = f"eBPF partially attached (missing {', '.join(missing)})"
        elif alive:
            reason = f"eBPF: {len(progs)} programs on {rel}, owner pid {owner} alive"
        else:
            reason = (f"eBPF: {len(progs)} programs on {rel}, owner pid {owner} is gone: "
                      "bots are sent to a dead listener and refused (fail closed)")
        return ProbeStatus("ebpf", reason, rel, progs, pins, has_table, owner, alive, not alive)
    if has_table:
        st = nft.state(settings.nft_table) or {}
        owner = st.get("owner_pid")
        alive = bool(owner) and nft.proc_start_ticks(owner) == st.get("owner_start_ticks")
        reason = f"nftables table inet {settings.nft_table}: {st.get('reason', 'no state recorded')}"
        if not alive:
            reason += "; owner is gone: bots are sent to a dead listener and refused (fail closed)"
        return ProbeStatus("nftables", reason, rel, (), pins, True, owner, alive, not alive)
    return ProbeStatus("none", "nothing attached: bots in this cgroup are not redirected", rel, (), pins)
