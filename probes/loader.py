"""Compile, load and attach the BPF programs with bcc.

``render_program`` returns the source and compiler defines without loading
anything (no root needed). ``load_and_attach`` runs ``python -m probes.loader``
in a child: it compiles with bcc, fills the pinned targets map, attaches every
program to the bots' parent cgroup and exits. Everything after that (target
updates, meta, events, lookups, detach) works on the pinned maps with plain
bpf(2) calls, so the daemon never carries bcc's compiler in memory.

Attachment uses the legacy BPF_PROG_ATTACH with flags=0: it outlives this
process (bots fail closed when the daemon dies: their connects still go to
the dead listener), and attaching again replaces the running program
atomically, so a restart has no window without a program.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from probes import bpfsys, cgroups, records
from probes.btf import kernel_features, kernel_offsets
from probes.errors import ProbeError, ProbeUnavailable
from probes.settings import MAX_UNIX_ALLOW, ProbeSettings

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
PROGRAM_FILE = SOURCE_DIR / "redirect.bpf.c"
HEADER_FILE = SOURCE_DIR / "botwarden.h"

PROG_TYPE_CGROUP_SOCK = 9
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_RAW_TRACEPOINT = 17
PROG_TYPE_CGROUP_SOCK_ADDR = 18

ATTACH_INET_SOCK_CREATE = 2
ATTACH_SOCK_OPS = 3
ATTACH_INET4_BIND = 8
ATTACH_INET6_BIND = 9
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
ATTACH_UDP4_SENDMSG = 14
ATTACH_UDP6_SENDMSG = 15
ATTACH_INET4_GETPEERNAME = 29
ATTACH_INET6_GETPEERNAME = 30
ATTACH_UNIX_CONNECT = 49
ATTACH_UNIX_SENDMSG = 50

# (function, program type, attach type, short name for status)
PROGRAMS: tuple[tuple[str, int, int, str], ...] = (
    ("bw_connect4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT, "connect4"),
    ("bw_connect6", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT, "connect6"),
    ("bw_sendmsg4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_UDP4_SENDMSG, "sendmsg4"),
    ("bw_sendmsg6", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_UDP6_SENDMSG, "sendmsg6"),
    ("bw_bind4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_INET4_BIND, "bind4"),
    ("bw_bind6", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_INET6_BIND, "bind6"),
    ("bw_sock_create", PROG_TYPE_CGROUP_SOCK, ATTACH_INET_SOCK_CREATE, "sock_create"),
    ("bw_sockops", PROG_TYPE_SOCK_OPS, ATTACH_SOCK_OPS, "sockops"),
    ("bw_getpeername4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_INET4_GETPEERNAME, "getpeername4"),
    ("bw_getpeername6", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_INET6_GETPEERNAME, "getpeername6"),
)
# AF_UNIX hooks (Linux 6.7+), attached when settings.unix_sockets == "filter".
UNIX_PROGRAMS: tuple[tuple[str, int, int, str], ...] = (
    ("bw_connect_unix", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_UNIX_CONNECT, "connect_unix"),
    ("bw_sendmsg_unix", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_UNIX_SENDMSG, "sendmsg_unix"),
)
ALL_CGROUP_PROGRAMS = PROGRAMS + UNIX_PROGRAMS
ATTACH_NAMES = {attach: short for _, _, attach, short in ALL_CGROUP_PROGRAMS}
PROGRAM_PREFIX = "bw_"

# Escape watch: (function, raw tracepoint); each attachment is a BPF link pinned as link_<tracepoint>
# (a raw tracepoint lives as long as its link: the pin keeps it after the loader exits).
ESCAPE_PROGRAMS: tuple[tuple[str, str], ...] = (
    ("bw_cgroup_attach", "cgroup_attach_task"),
    ("bw_task_fork", "sched_process_fork"),
    ("bw_task_exit", "sched_process_exit"),
)
ESCAPE_LINKS = tuple(f"link_{tp}" for _, tp in ESCAPE_PROGRAMS)

# Pinned maps and links, relative to settings.pin_dir (names fixed in redirect.bpf.c).
PINNED_MAPS = ("targets", "listeners", "by_cookie", "by_tuple", "meta", "events", "unix_allow", "bot_tasks",
               "unix_targets")
MAX_UNIX_TARGETS = 64
# Placeholder helper ids bcc compiles the kfunc calls to; the loader patches them (load()).
KFUNC_PLACEHOLDERS = {"bpf_cast_to_kern_ctx": 0x7FFF_0001, "bpf_sock_addr_set_sun_path": 0x7FFF_0002}
PINNED = PINNED_MAPS + ESCAPE_LINKS


@dataclass(frozen=True)
class Plan:
    """Which optional program groups a load includes on this kernel, and why not."""

    unix: bool
    escapes: bool
    escapes_missing: str | None = None
    unix_redirect: bool = False  # Unix-socket targets can be redirected (kfuncs present)

    def cgroup_programs(self) -> tuple[tuple[str, int, int, str], ...]:
        return PROGRAMS + (UNIX_PROGRAMS if self.unix else ())


def plan(settings: ProbeSettings) -> Plan:
    """The optional groups for ``settings``. Unix filtering the kernel cannot do is refused by
    lifecycle.attach before this; a missing escape watch only degrades (it detects, not prevents)."""
    features = kernel_features()
    unix = settings.unix_sockets == "filter" and features.unix_offsets is not None
    escapes = settings.watch_escapes and features.escape_offsets is not None
    return Plan(unix, escapes, None if escapes or not settings.watch_escapes else features.escape_missing,
                unix_redirect=unix and features.unix_kfuncs is not None)


@dataclass(frozen=True)
class RenderedProgram:
    """What would be loaded: the C source, the header, and the clang flags."""

    source: str
    header: str
    cflags: tuple[str, ...]

    def __str__(self) -> str:
        return "// cflags: " + " ".join(self.cflags) + "\n" + self.source


def cflags(settings: ProbeSettings, offsets: dict[str, int] | None = None) -> tuple[str, ...]:
    if offsets is None:
        offsets = kernel_offsets()
    features = kernel_features()
    unix = settings.unix_sockets == "filter" and features.unix_offsets is not None
    escapes = settings.watch_escapes and features.escape_offsets is not None
    bots_id, bots_level = _bots_cgroup(settings)
    defines: dict[str, str | int] = {
        "BW_PIN_DIR": '"' + settings.pin_dir.rstrip("/") + '"',
        "BW_MAX_TARGETS": settings.max_targets,
        "BW_MAX_CONNS": settings.max_connections,
        "BW_RINGBUF_PAGES": settings.ringbuf_pages,
        "BW_EMIT_REDIRECTED": int(settings.emit_redirected),
        "BW_UNIX_HOOKS": int(unix),
        "BW_MAX_UNIX_ALLOW": MAX_UNIX_ALLOW,
        "BW_UNIX_REDIRECT": int(unix and features.unix_kfuncs is not None),
        "BW_MAX_UNIX_TARGETS": MAX_UNIX_TARGETS,
        "BW_KFUNC_CAST_TO_KERN_CTX": KFUNC_PLACEHOLDERS["bpf_cast_to_kern_ctx"],
        "BW_KFUNC_SET_SUN_PATH": KFUNC_PLACEHOLDERS["bpf_sock_addr_set_sun_path"],
        "BW_WATCH_ESCAPES": int(escapes),
        "BW_KILL_ESCAPED": int(escapes and settings.kill_escaped),
        "BW_BOTS_CGROUP_ID": bots_id,
        "BW_BOTS_LEVEL": bots_level,
        **offsets,
        **(features.unix_offsets if unix else {}),
        **(features.escape_offsets if escapes else {}),
        **records.size_defines(),
    }
    return (f"-I{SOURCE_DIR}",) + tuple(f"-D{k}={v}" for k, v in defines.items())


def _bots_cgroup(settings: ProbeSettings) -> tuple[int, int]:
    """(cgroup id, depth) of the bots' parent cgroup; (0, 0) when it does not exist yet (render only)."""
    try:
        return cgroups.cgroup_id(settings.cgroup_parent), cgroups.level(settings.cgroup_parent)
    except (OSError, ProbeError):
        return 0, 0


def render_program(settings: ProbeSettings, offsets: dict[str, int] | None = None) -> RenderedProgram:
    """The program set ``attach`` would load for ``settings``; needs no privileges."""
    return RenderedProgram(
        source=PROGRAM_FILE.read_text(), header=HEADER_FILE.read_text(), cflags=cflags(settings, offsets)
    )


def _import_bcc():
    try:
        import bcc  # noqa: PLC0415 - heavy (libbcc + LLVM): only in the loader child
    except ImportError as e:
        raise ProbeUnavailable(f"bcc is not importable ({e}); run probes/setup-host.sh") from e
    return bcc


def _proc_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields restart after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[19])


def _drop_stale_pins(pin_dir: Path) -> None:
    """Unpin maps another layout version left behind (they would not fit these programs)."""
    meta = read_meta(pin_dir)
    if meta is not None and meta.layout != records.LAYOUT_VERSION:
        log.warning("pinned maps in %s have layout %d, replacing them", pin_dir, meta.layout)
        for name in PINNED_MAPS:
            (pin_dir / name).unlink(missing_ok=True)


class _RawProgram:
    """A program loaded outside bcc (kfunc calls): its fd, as bcc's function objects have."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class EbpfPrograms:
    """Compile, load and attach one program set (runs in the short-lived loader child)."""

    def __init__(self, settings: ProbeSettings):
        self.settings = settings
        self.pin_dir = Path(settings.pin_dir)
        self.cgroup = cgroups.resolve(settings.cgroup_parent)
        self._bpf = None
        self._functions: dict[str, object] = {}

    def load(self) -> None:
        bcc = _import_bcc()
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        _drop_stale_pins(self.pin_dir)
        rendered = render_program(self.settings)
        self.plan = plan(self.settings)
        if self.plan.escapes_missing:
            log.warning("escape watch unavailable: %s", self.plan.escapes_missing)
        started = time.monotonic()
        try:
            self._bpf = bcc.BPF(src_file=str(PROGRAM_FILE).encode(), cflags=list(rendered.cflags))
            for func, prog_type, attach_type, _ in self.plan.cgroup_programs():
                if func == "bw_connect_unix" and self.plan.unix_redirect:
                    self._functions[func] = self._load_with_kfuncs(func, prog_type, attach_type)
                    continue
                self._functions[func] = self._bpf.load_func(func.encode(), prog_type, attach_type=attach_type)
            for func, _ in ESCAPE_PROGRAMS if self.plan.escapes else ():
                self._functions[func] = self._bpf.load_func(func.encode(), PROG_TYPE_RAW_TRACEPOINT)
        except Exception as e:  # bcc raises bare Exception on compile/verifier errors
            self.close()
            raise ProbeUnavailable(f"loading the BPF programs failed: {e}") from e
        log.info("BPF programs compiled and loaded in %.1f s", time.monotonic() - started)
        # Targets are in place before any program is attached: no window of blanket denial.
        sync_targets(self.settings)

    def _load_with_kfuncs(self, func: str, prog_type: int, attach_type: int) -> "_RawProgram":
        """bcc cannot emit kfunc calls: compile with placeholder helper ids, patch those calls
        into kfunc calls (BTF ids of the running kernel), load the instructions ourselves."""
        kfuncs = kernel_features().unix_kfuncs or {}
        insns = bpfsys.patch_kfunc_calls(self._bpf.dump_func(func.encode()),
                                         {KFUNC_PLACEHOLDERS[n]: kfuncs[n] for n in KFUNC_PLACEHOLDERS})
        return _RawProgram(bpfsys.prog_load(prog_type, insns, attach_type, func))

    def attach(self) -> list[int]:
        """Attach (or atomically replace) every program on the bots' parent cgroup."""
        if self.plan.escapes:
            self._attach_escape_watch()  # first: bots that move while the rest attaches are seen
        cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for func, _, attach_type, short in self.plan.cgroup_programs():
                try:
                    bpfsys.prog_attach(cg_fd, self._functions[func].fd, attach_type, 0)
                except bpfsys.BPFSyscallError as e:
                    raise ProbeError(f"attaching {short} to {self.cgroup} failed: {e}") from e
            if not self.plan.unix:  # the operator opted out: drop Unix filters a previous run left
                _detach_from(cg_fd, UNIX_PROGRAMS)
            if not self.plan.escapes:
                for name in ESCAPE_LINKS:
                    (self.pin_dir / name).unlink(missing_ok=True)
            return [bpfsys.prog_info(self._functions[f].fd).id for f, *_ in self.plan.cgroup_programs()]
        finally:
            os.close(cg_fd)

    def _attach_escape_watch(self) -> None:
        """Open one raw-tracepoint link per program and pin it in place of the previous run's
        (both are attached for a moment: an event may be reported twice, never missed). Then
        enter the bots' processes already running, which no tracepoint saw join."""
        for func, tracepoint in ESCAPE_PROGRAMS:
            try:
                link = bpfsys.raw_tracepoint_open(tracepoint, self._functions[func].fd)
            except bpfsys.BPFSyscallError as e:
                raise ProbeError(f"attaching {func} to raw tracepoint {tracepoint} failed: {e}") from e
            try:
                pin = self.pin_dir / f"link_{tracepoint}"
                pin.unlink(missing_ok=True)
                bpfsys.obj_pin(link, str(pin))
            finally:
                os.close(link)
        fd = _open_pinned(self.pin_dir, "bot_tasks")
        try:
            for pid, cgid in cgroups.pids_with_cgroup(self.cgroup):
                bpfsys.map_update(fd, ctypes.c_uint32(pid), ctypes.c_uint64(cgid), bpfsys.BPF_NOEXIST)
        except bpfsys.BPFSyscallError:
            pass  # already known (BPF_NOEXIST keeps the kernel's own record)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release the loader's handles. Programs stay attached, maps stay pinned."""
        for prog in self._functions.values():
            if isinstance(prog, _RawProgram):
                prog.close()
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None
                self._functions = {}


def load_and_attach(settings: ProbeSettings) -> tuple[int, ...]:
    """Compile, load and attach in a child process; returns the attached program ids.

    The compile grows a process by ~150 MB it never returns; a child takes
    that cost and exits. Programs stay attached, maps pinned, after it exits.
    """
    package_root = str(SOURCE_DIR.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "probes.loader", settings.to_json()],
        capture_output=True, text=True, env=env, timeout=120, cwd=package_root,
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        log.warning("BPF loader failed:\n%s", proc.stderr.strip()[-4000:])
        if why.startswith("probes: "):
            why = why[len("probes: "):]
        raise ProbeUnavailable(why)
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1])["prog_ids"])


def _open_pinned(pin_dir: str | Path, name: str) -> int:
    try:
        return bpfsys.obj_get(str(Path(pin_dir) / name))
    except bpfsys.BPFSyscallError as e:
        raise ProbeError(f"pinned map {name} missing in {pin_dir}: {e}") from e


def sync_targets(settings: ProbeSettings) -> None:
    """Make the pinned targets/listeners maps equal the settings (entries updated in place)."""
    wanted: dict[bytes, records.TargetValue] = {}
    for index, t in enumerate(settings.targets):
        value = records.TargetValue()
        value.listener_ip = records.Ip16.from_buffer_copy(records.pack_ip(t.listener_ip))
        value.listener_port = t.listener_port
        value.flags = records.TARGET_REDIRECT
        value.index = index
        wanted[bytes(records.addr_key(t.ip, t.port))] = value
    for p in settings.passthrough:
        value = records.TargetValue()
        value.flags = records.TARGET_PASSTHROUGH
        wanted[bytes(records.addr_key(p.ip, p.port))] = value
    fd = _open_pinned(settings.pin_dir, "targets")
    try:
        for raw, value in wanted.items():
            bpfsys.map_update(fd, records.AddrKey.from_buffer_copy(raw), value)
        for key in bpfsys.map_keys(fd, records.AddrKey):
            if bytes(key) not in wanted:
                bpfsys.map_delete(fd, key)
    finally:
        os.close(fd)
    _sync_unix_allow(settings)
    _sync_unix_targets(settings)
    # Listener ports bots may not bind (new ones added before stale ones go).
    ports = {t.listener_port for t in settings.targets}
    fd = _open_pinned(settings.pin_dir, "listeners")
    try:
        for port in ports:
            bpfsys.map_update(fd, ctypes.c_uint32(port), ctypes.c_uint32(1))
        for key in bpfsys.map_keys(fd, ctypes.c_uint32):
            if key.value not in ports:
                bpfsys.map_delete(fd, key)
    finally:
        os.close(fd)


def _sync_unix_allow(settings: ProbeSettings) -> None:
    """The pinned unix_allow map equals settings.unix_allow (absent when the kernel has no hooks)."""
    path = Path(settings.pin_dir) / "unix_allow"
    if not path.exists():
        return
    wanted = {bytes(records.unix_key(a)) for a in settings.unix_allow}
    fd = _open_pinned(settings.pin_dir, "unix_allow")
    try:
        for raw in wanted:
            bpfsys.map_update(fd, records.UnixKey.from_buffer_copy(raw), ctypes.c_uint32(1))
        for key in bpfsys.map_keys(fd, records.UnixKey):
            if bytes(key) not in wanted:
                bpfsys.map_delete(fd, key)
    finally:
        os.close(fd)


def _sync_unix_targets(settings: ProbeSettings) -> None:
    """The pinned unix_targets map equals settings.unix_targets (absent without the kfuncs: then
    a Unix-socket target is refused before this, see lifecycle.attach)."""
    path = Path(settings.pin_dir) / "unix_targets"
    if not path.exists():
        return
    wanted = {bytes(records.unix_key(t.path)): records.unix_dest(t.listener) for t in settings.unix_targets}
    fd = _open_pinned(settings.pin_dir, "unix_targets")
    try:
        for raw, dest in wanted.items():
            bpfsys.map_update(fd, records.UnixKey.from_buffer_copy(raw), dest)
        for key in bpfsys.map_keys(fd, records.UnixKey):
            if bytes(key) not in wanted:
                bpfsys.map_delete(fd, key)
    finally:
        os.close(fd)


def write_meta(settings: ProbeSettings, owner_pid: int) -> None:
    """Record the owning daemon (status checks it is alive) and the bots' parent cgroup."""
    meta = records.Meta()
    meta.owner_tgid = owner_pid
    meta.owner_start_ticks = _proc_start_ticks(owner_pid) or 0
    meta.attached_unix_ns = time.time_ns()
    meta.layout = records.LAYOUT_VERSION
    meta.cgroup_path = cgroups.relative(settings.cgroup_parent).encode()[:239]
    fd = _open_pinned(settings.pin_dir, "meta")
    try:
        bpfsys.map_update(fd, ctypes.c_uint32(0), meta)
    finally:
        os.close(fd)


# -- detach / inspect from any process ----------------------------------------
@dataclass(frozen=True)
class AttachedProgram:
    hook: str
    prog_id: int
    name: str


def attached_programs(cgroup: Path) -> list[AttachedProgram]:
    """Our programs attached directly to ``cgroup`` (by name prefix)."""
    out: list[AttachedProgram] = []
    try:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return out
    try:
        for _, _, attach_type, short in ALL_CGROUP_PROGRAMS:
            for prog_id in _query(cg_fd, attach_type):
                try:
                    fd = bpfsys.prog_get_fd_by_id(prog_id)
                except bpfsys.BPFSyscallError:
                    continue  # gone meanwhile
                try:
                    info = bpfsys.prog_info(fd)
                finally:
                    os.close(fd)
                if info.name.startswith(PROGRAM_PREFIX):
                    out.append(AttachedProgram(short, prog_id, info.name))
    finally:
        os.close(cg_fd)
    return out


def detach_programs(cgroup: Path) -> list[AttachedProgram]:
    """Detach our programs from ``cgroup`` (whoever loaded them); returns what was detached."""
    try:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return []
    try:
        return _detach_from(cg_fd, ALL_CGROUP_PROGRAMS)
    finally:
        os.close(cg_fd)


def _query(cg_fd: int, attach_type: int) -> list[int]:
    """Attached program ids; none for an attach type this kernel does not know (EINVAL)."""
    try:
        return bpfsys.prog_query(cg_fd, attach_type)
    except bpfsys.BPFSyscallError as e:
        if e.errno == errno.EINVAL:
            return []
        raise


def _detach_from(cg_fd: int, programs: tuple[tuple[str, int, int, str], ...]) -> list[AttachedProgram]:
    done: list[AttachedProgram] = []
    for _, _, attach_type, short in programs:
        for prog_id in _query(cg_fd, attach_type):
            try:
                fd = bpfsys.prog_get_fd_by_id(prog_id)
            except bpfsys.BPFSyscallError:
                continue
            try:
                info = bpfsys.prog_info(fd)
                if info.name.startswith(PROGRAM_PREFIX):
                    bpfsys.prog_detach(cg_fd, fd, attach_type)
                    done.append(AttachedProgram(short, prog_id, info.name))
            finally:
                os.close(fd)
    return done


def read_meta(pin_dir: str | Path) -> records.Meta | None:
    try:
        fd = bpfsys.obj_get(str(Path(pin_dir) / "meta"))
    except bpfsys.BPFSyscallError:
        return None
    try:
        meta = records.Meta()
        if not bpfsys.map_lookup(fd, ctypes.c_uint32(0), meta) or meta.layout == 0:
            return None
        return meta
    finally:
        os.close(fd)


def owner_alive(meta: records.Meta) -> bool:
    return meta.owner_tgid > 0 and _proc_start_ticks(meta.owner_tgid) == meta.owner_start_ticks


def unpin(pin_dir: str | Path) -> list[str]:
    """Remove our pins (maps, and the escape watch's links: that detaches it) and the pin directory."""
    removed = []
    d = Path(pin_dir)
    for name in PINNED:
        p = d / name
        if p.exists():
            p.unlink()
            removed.append(str(p))
    try:
        d.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("pin directory %s not removed: %s", d, e.strerror)
    return removed


def _child_main(argv: list[str]) -> int:
    """``python -m probes.loader SETTINGS_JSON``: load + attach, print the program ids."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    settings = ProbeSettings.from_json(argv[0])
    programs = EbpfPrograms(settings)
    try:
        programs.load()
        ids = programs.attach()
    except ProbeError as e:
        print(f"probes: {e}", file=sys.stderr)
        return 1
    finally:
        programs.close()
    print(json.dumps({"prog_ids": ids}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
