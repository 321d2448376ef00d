"""Who is behind an accepted connection: ``lookup(sock) -> Attribution | None``.

eBPF path: the programs stored a record keyed by the connection as the
inspector sees it (listener address, bot's source address); ``lookup`` reads
it from the pinned map with two syscalls, from any process.

nftables path (weaker): the original destination comes from SO_ORIGINAL_DST;
the owner is whoever holds the bot's end of the socket *now* (sock_diag gives
its inode, the bots' cgroups are searched for the fd). A process that passed
the fd on, or exec'd, is reported as it is at lookup time.

``exe_path`` comes from /proc only when the process's start time and the
executable's inode and device match what the kernel recorded at connect().
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from probes import bpfsys, cgroups, records
from probes.settings import DEFAULT_PIN_DIR

log = logging.getLogger(__name__)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_NS_PER_TICK = 1_000_000_000 // _CLK_TCK

SOL_IP = 0
SO_ORIGINAL_DST = 80
SOL_IPV6 = 41
IP6T_SO_ORIGINAL_DST = 80


@dataclass(frozen=True)
class Attribution:
    pid: int  # the thread that called connect() (kernel "pid")
    tgid: int  # the process (what ps shows as PID)
    uid: int
    gid: int
    cgroup_id: int
    cgroup_path: str | None  # as /proc/<pid>/cgroup shows it: /parent/bot
    comm: str  # set by the process itself: a hint, not proof
    start_time_ns: int  # process start, ns since boot (as /proc/<pid>/stat, in ns)
    exe_inode: int
    exe_dev: int  # st_dev encoding
    exe_path: str | None  # only when /proc/<pid> matches the kernel record
    original_dst: tuple[str, int]  # (ip, port) the bot asked for; ("unix:/path", 0) for a Unix socket
    source: Literal["ebpf", "nftables", "peercred"]
    # Why the process could undo its own containment ("uid 0", "CAP_SYS_ADMIN"...); empty: none.
    privileges: tuple[str, ...] = ()

    def audit_fields(self) -> dict[str, Any]:
        """The session_start fields this attribution fills (contract §1)."""
        return {
            "pid": self.tgid,
            "uid": self.uid,
            "gid": self.gid,
            "cgroup_id": self.cgroup_id,
            "cgroup_path": self.cgroup_path,
            "exe": self.exe_path,
            "comm": self.comm,
            "attribution_source": self.source,
            "target_addr": f"{self.original_dst[0]}:{self.original_dst[1]}",
            "privileged": bool(self.privileges),
        }


# -- /proc cross-checks ---------------------------------------------------------
# Capabilities that let a process leave its cgroup (write any cgroup.procs, chmod/chown it),
# change what watches it (BPF programs, netfilter rules, the daemon's memory, the kernel), or
# become root.
PRIVILEGED_CAPS = {
    0: "CAP_CHOWN", 1: "CAP_DAC_OVERRIDE", 3: "CAP_FOWNER", 6: "CAP_SETGID", 7: "CAP_SETUID",
    8: "CAP_SETPCAP", 12: "CAP_NET_ADMIN", 16: "CAP_SYS_MODULE", 17: "CAP_SYS_RAWIO",
    19: "CAP_SYS_PTRACE", 21: "CAP_SYS_ADMIN", 38: "CAP_PERFMON", 39: "CAP_BPF",
}


def privileges(pid: int | str = "self") -> tuple[str, ...] | None:
    """Why process ``pid`` is privileged: "uid 0" (any of its uids), and the PRIVILEGED_CAPS in its
    effective, permitted or ambient sets (permitted ones it can raise at will). None: no such process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    out: list[str] = []
    if "0" in fields.get("Uid", "").split():
        out.append("uid 0")
    caps = 0
    for name in ("CapEff", "CapPrm", "CapAmb"):
        caps |= int(fields.get(name, "0").strip() or "0", 16)
    out += [name for bit, name in sorted(PRIVILEGED_CAPS.items()) if caps >> bit & 1]
    return tuple(out)


def proc_start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def verified_exe(tgid: int, start_time_ns: int, exe_inode: int, exe_dev: int) -> str | None:
    """/proc/<tgid>/exe, if it is still the process and the binary the kernel recorded."""
    if tgid <= 0 or exe_inode == 0:
        return None
    try:
        path = os.readlink(f"/proc/{tgid}/exe")
        st = os.stat(f"/proc/{tgid}/exe")
    except OSError:
        return None
    if st.st_ino != exe_inode or st.st_dev != exe_dev:
        return None  # exec'd since, or another process reused the pid
    # Checked last: a pid reused between the reads above fails here.
    if proc_start_ticks(tgid) != start_time_ns // _NS_PER_TICK:
        return None
    return path


# -- cgroup id -> path, cached --------------------------------------------------
_cgroup_paths: dict[int, str] = {}
_cgroup_lock = threading.Lock()


def cgroup_path_for(cgroup_id: int, parent: str | None) -> str | None:
    with _cgroup_lock:
        cached = _cgroup_paths.get(cgroup_id)
    if cached is not None or not parent:
        return cached
    path = cgroups.path_for_id(parent, cgroup_id)
    if path is not None:
        with _cgroup_lock:
            if len(_cgroup_paths) > 4096:
                _cgroup_paths.clear()
            _cgroup_paths[cgroup_id] = path
    return path


# -- pinned map access, cached per pin dir --------------------------------------
class _PinnedMaps:
    """Open fds of one pin directory's maps; reopened when the pins are replaced."""

    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        self._fds: dict[str, tuple[int, int]] = {}  # name -> (fd, inode of the pin)
        self._lock = threading.Lock()
        self._parent: tuple[int, str | None] | None = None  # (meta pin inode, cgroup path)

    def fd(self, name: str) -> int | None:
        """fd of the map pinned as ``name``, reopened whenever the pin was replaced.

        Checked on every call (one stat): a cached fd of a map that was unpinned
        would keep answering with records nothing deletes any more.
        """
        path = f"{self.pin_dir}/{name}"
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            ino = None
        with self._lock:
            entry = self._fds.get(name)
            if entry is not None and entry[1] == ino:
                return entry[0]
            if entry is not None:
                os.close(entry[0])
                del self._fds[name]
            if ino is None:
                return None
            try:
                fd = bpfsys.obj_get(path)
            except bpfsys.BPFSyscallError:
                return None
            self._fds[name] = (fd, ino)
            return fd

    def cgroup_parent(self) -> str | None:
        try:
            ino = os.stat(f"{self.pin_dir}/meta").st_ino
        except FileNotFoundError:
            return None
        if self._parent is not None and self._parent[0] == ino:
            return self._parent[1]
        fd = self.fd("meta")
        meta = records.Meta()
        parent = None
        if fd is not None and bpfsys.map_lookup(fd, ctypes.c_uint32(0), meta) and meta.layout:
            parent = meta.cgroup_path.decode() or None
        self._parent = (ino, parent)
        return parent


_maps: dict[str, _PinnedMaps] = {}
_maps_lock = threading.Lock()


def _pinned(pin_dir: str) -> _PinnedMaps:
    with _maps_lock:
        m = _maps.get(pin_dir)
        if m is None:
            m = _maps[pin_dir] = _PinnedMaps(pin_dir)
        return m


def _ebpf_record(pin_dir: str, local: tuple, peer: tuple) -> records.Origin | None:
    fd = _pinned(pin_dir).fd("by_tuple")
    if fd is None:
        return None
    origin = records.Origin()
    try:
        if bpfsys.map_lookup(fd, records.tuple_key(local, peer), origin):
            return origin
    except bpfsys.BPFSyscallError as e:
        log.warning("reading %s/by_tuple failed: %s", pin_dir, e)
    return None


def attribution_from_identity(
    ident: records.Identity, original_dst: tuple[str, int], parent: str | None, source: str
) -> Attribution:
    exe_dev = records.kernel_dev_to_user(ident.exe_dev)
    return Attribution(
        pid=ident.pid,
        tgid=ident.tgid,
        uid=ident.uid,
        gid=ident.gid,
        cgroup_id=ident.cgroup_id,
        cgroup_path=cgroup_path_for(ident.cgroup_id, parent),
        comm=ident.comm.decode(errors="replace"),
        start_time_ns=ident.start_boottime_ns,
        exe_inode=ident.exe_ino,
        exe_dev=exe_dev,
        exe_path=verified_exe(ident.tgid, ident.start_boottime_ns, ident.exe_ino, exe_dev),
        original_dst=original_dst,
        source=source,  # type: ignore[arg-type]
        privileges=_privileges_of(ident.tgid, ident.uid, ident.start_boottime_ns),
    )


def _privileges_of(tgid: int, uid: int, start_time_ns: int) -> tuple[str, ...]:
    """The kernel-recorded uid 0, plus what /proc says while it is still the same process."""
    found = privileges(tgid) if proc_start_ticks(tgid) == start_time_ns // _NS_PER_TICK else None
    found = found or ()
    if uid == 0 and "uid 0" not in found:
        found = ("uid 0", *found)
    return found


# -- nftables path ----------------------------------------------------------------
def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """SO_ORIGINAL_DST of a NATed (REDIRECT/DNAT) connection; None when it was not NATed."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", raw, 2)[0]
            ip = socket.inet_ntop(socket.AF_INET, raw[4:8])
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EINVAL, errno.ENOTCONN):
            return None
        raise
    return ip, port


def _sock_diag_inode(src: tuple[str, int], dst: tuple[str, int]) -> tuple[int, int] | None:
    """(uid, inode) of the local TCP socket src -> dst, via NETLINK_SOCK_DIAG."""
    mapped_v4 = records.is_mapped(records.pack_ip(src[0])) and records.is_mapped(records.pack_ip(dst[0]))
    family = socket.AF_INET if mapped_v4 else socket.AF_INET6

    def addr(ip: str) -> bytes:
        packed = records.pack_ip(ip)
        return packed[12:] + b"\0" * 12 if family == socket.AF_INET else packed

    # inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
    req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
    req += struct.pack("!HH", src[1], dst[1]) + addr(src[0]) + addr(dst[0])
    req += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    SOCK_DIAG_BY_FAMILY = 20
    NLM_F_REQUEST = 1
    header = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.settimeout(1.0)
        nl.send(header + req)
        data = nl.recv(65536)
    length, msg_type = struct.unpack_from("=IH", data, 0)
    if msg_type != SOCK_DIAG_BY_FAMILY or length < 16 + 72:
        return None  # NLMSG_ERROR: no such socket
    # inet_diag_msg: 4 bytes, sockid (48), expires, rqueue, wqueue, uid, inode
    uid, inode = struct.unpack_from("=II", data, 16 + 4 + 48 + 12)
    return uid, inode


def peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the client end of an accepted TCP connection from this host (sock_diag),
    or None when no local socket is (the peer is remote, or already gone)."""
    if sock.family == socket.AF_UNIX:
        try:
            return _peercred(sock)[1]
        except OSError:
            return None
    try:
        local = sock.getsockname()[:2]
        peer = sock.getpeername()[:2]
        found = _sock_diag_inode(peer, local)
        if found is None:  # NAT'd (nftables fallback): the client socket still names the original dst
            orig = original_dst(sock)
            found = _sock_diag_inode(peer, orig) if orig is not None else None
    except OSError:
        return None
    return found[0] if found is not None else None


def _owner_pid(inode: int, candidates: list[int]) -> int | None:
    want = f"socket:[{inode}]"
    for pid in candidates:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                    return pid
            except OSError:
                continue
    return None


def _peercred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) the kernel recorded for the peer of a Unix socket when it connected."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))


def _unix_attribution(sock: socket.socket, cgroup_parent: str | None) -> Attribution | None:
    """A connection to a Unix-socket target's listener (the kernel rewrote the bot's connect):
    pid, uid and gid as the kernel recorded them at connect() (SO_PEERCRED); cgroup, executable
    and start time from /proc/<pid>, read while the process holds its end of the socket. Only a
    process inside the bots' parent cgroup is attributed (another local user reaching this socket
    directly is nobody's bot: None, and attestation refuses it)."""
    try:
        pid, uid, gid = _peercred(sock)
        listener = sock.getsockname()
    except OSError:
        return None
    if pid <= 0 or not cgroup_parent:
        return None
    try:
        start = proc_start_ticks(pid)
        cg_line = next(line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                       if line.startswith("0::"))
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        st = os.stat(f"/proc/{pid}/exe")
        exe = os.readlink(f"/proc/{pid}/exe")
    except (OSError, StopIteration):
        return None  # gone already: no attribution, the session is refused
    cg_rel = cg_line[3:]
    parent = "/" + cgroups.relative(cgroup_parent).strip("/")
    if start is None or not (cg_rel == parent or cg_rel.startswith(parent + "/")):
        return None
    try:
        cgid = cgroups.cgroup_id(cg_rel)
    except OSError:
        return None
    # Checked last: a pid reused between the reads above shows a start time after the connect.
    if proc_start_ticks(pid) != start:
        return None
    return Attribution(
        pid=pid, tgid=pid, uid=uid, gid=gid, cgroup_id=cgid, cgroup_path=cg_rel, comm=comm,
        start_time_ns=start * _NS_PER_TICK, exe_inode=st.st_ino, exe_dev=st.st_dev, exe_path=exe,
        original_dst=(f"unix:{listener}", 0), source="peercred",
        privileges=_privileges_of(pid, uid, start * _NS_PER_TICK),
    )


def _nft_attribution(sock: socket.socket, orig: tuple[str, int], cgroup_parent: str | None) -> Attribution | None:
    peer = sock.getpeername()[:2]
    found = _sock_diag_inode(peer, orig)
    if found is None:
        return None
    uid, inode = found
    candidates = cgroups.pids(cgroup_parent) if cgroup_parent else []
    pid = _owner_pid(inode, candidates)
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cg_lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        cg_line = next(line for line in cg_lines if line.startswith("0::"))
        st = os.stat(f"/proc/{pid}/exe")
        exe = os.readlink(f"/proc/{pid}/exe")
    except (OSError, StopIteration):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    start = proc_start_ticks(pid) or 0
    cg_rel = cg_line[3:]
    try:
        cgid = cgroups.cgroup_id(cg_rel)
    except OSError:
        cgid = 0
    return Attribution(
        pid=pid,
        tgid=pid,
        uid=uid,
        gid=int(fields["Gid"].split()[0]),
        cgroup_id=cgid,
        cgroup_path=cg_rel,
        comm=comm,
        start_time_ns=start * _NS_PER_TICK,
        exe_inode=st.st_ino,
        exe_dev=st.st_dev,
        exe_path=exe,
        original_dst=orig,
        source="nftables",
        privileges=_privileges_of(pid, uid, start * _NS_PER_TICK),
    )


# -- the public lookup --------------------------------------------------------------
def lookup(
    sock: socket.socket,
    *,
    pin_dir: str = DEFAULT_PIN_DIR,
    nft_table: str = "botwarden",
    cgroup_parent: str | None = None,
) -> Attribution | None:
    """Attribution for an accepted connection, or None if no probe saw it.

    ``pin_dir`` and ``nft_table`` must match the settings the probes were
    attached with (``ProbeHandle.lookup`` passes them). ``cgroup_parent``
    overrides the one recorded at attach time (nftables path only).
    None means: no probe saw this connection; do not trust it (fail closed).
    """
    if sock.family == socket.AF_UNIX:
        return _unix_attribution(sock, _pinned(pin_dir).cgroup_parent())
    try:
        local = sock.getsockname()[:2]
        peer = sock.getpeername()[:2]
    except OSError:
        return None
    origin = _ebpf_record(pin_dir, local, peer)
    if origin is not None:
        dst = (records.unpack_ip(bytes(origin.dst_ip)), origin.dst_port)
        return attribution_from_identity(origin.id, dst, _pinned(pin_dir).cgroup_parent(), "ebpf")
    orig = original_dst(sock)
    if orig is None or (orig[0], orig[1]) == (local[0], local[1]):
        return None
    from probes import nft  # noqa: PLC0415 - only the fallback needs it

    parent = cgroup_parent or nft.recorded_cgroup_parent(nft_table)
    return _nft_attribution(sock, orig, parent)
