"""ctypes twins of the structs in botwarden.h, and address packing.

Addresses are 16 bytes in network order with IPv4 stored IPv4-mapped, the
same normal form the BPF programs use, so one key type serves both families.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

LAYOUT_VERSION = 2  # 2: events carry a Unix path / cgroup move; unix_allow, bot_tasks maps

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

TARGET_REDIRECT = 1
TARGET_PASSTHROUGH = 2

EV_DENIED = 1
EV_REDIRECTED = 2
EV_LEFT_CGROUP = 3

REASONS = {
    0: "",
    1: "not a registered target",
    2: "registered target, but not TCP",
    3: "IPv4 socket cannot reach an IPv6-only listener",
    4: "UDP send to an address that is not passthrough",
    5: "socket type not allowed (only TCP and UDP)",
    6: "bind to an inspector listener port",
    7: "Unix socket not in probes.unix_allow",
    8: "Unix socket from inside a user namespace",
    9: "forked straight into another cgroup (clone3 CLONE_INTO_CGROUP)",
    10: "killed (probes.kill_escaped)",
}
WHY_SOCKET_TYPE = 5
WHY_BIND_LISTENER = 6
WHY_KILLED = 10

UNIX_PATH_MAX = 108

Ip16 = ctypes.c_ubyte * 16


class AddrKey(ctypes.Structure):
    _fields_ = [("ip", Ip16), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class TargetValue(ctypes.Structure):
    _fields_ = [
        ("listener_ip", Ip16),
        ("listener_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("index", ctypes.c_uint32),
    ]


class Identity(ctypes.Structure):
    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("start_boottime_ns", ctypes.c_uint64),
        ("exe_ino", ctypes.c_uint64),
        ("ktime_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("exe_dev", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
    ]


class Origin(ctypes.Structure):
    _fields_ = [
        ("id", Identity),
        ("dst_ip", Ip16),
        ("dst_port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("target_index", ctypes.c_uint32),
    ]


class TupleKey(ctypes.Structure):
    _fields_ = [
        ("local_ip", Ip16),
        ("peer_ip", Ip16),
        ("local_port", ctypes.c_uint16),
        ("peer_port", ctypes.c_uint16),
    ]


class UnixKey(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("path", ctypes.c_ubyte * UNIX_PATH_MAX)]


class UnixDest(ctypes.Structure):
    """Value of the unix_targets map: the inspector's socket path for a Unix-socket target."""
    _fields_ = [("len", ctypes.c_uint32), ("path", ctypes.c_ubyte * 128)]


def unix_dest(path: str) -> UnixDest:
    raw = path.encode()
    if not raw.startswith(b"/") or len(raw) >= UNIX_PATH_MAX or b"\0" in raw:
        raise ValueError(f"{path!r} is not a Unix socket path the kernel can connect to")
    dest = UnixDest()
    dest.len = len(raw)
    ctypes.memmove(dest.path, raw, len(raw))
    return dest


class Event(ctypes.Structure):
    _fields_ = [
        ("id", Identity),
        ("dst_ip", Ip16),
        ("dst_port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("event", ctypes.c_uint16),
        ("reason", ctypes.c_uint16),
        ("protocol", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("other_cgroup_id", ctypes.c_uint64),
        ("path", UnixKey),
    ]


class Meta(ctypes.Structure):
    _fields_ = [
        ("owner_start_ticks", ctypes.c_uint64),
        ("attached_unix_ns", ctypes.c_uint64),
        ("owner_tgid", ctypes.c_uint32),
        ("layout", ctypes.c_uint32),
        ("cgroup_path", ctypes.c_char * 240),
    ]


def size_defines() -> dict[str, int]:
    """BW_SIZEOF_* for the static asserts in botwarden.h."""
    return {
        "BW_SIZEOF_ADDR_KEY": ctypes.sizeof(AddrKey),
        "BW_SIZEOF_TARGET": ctypes.sizeof(TargetValue),
        "BW_SIZEOF_ORIGIN": ctypes.sizeof(Origin),
        "BW_SIZEOF_TUPLE_KEY": ctypes.sizeof(TupleKey),
        "BW_SIZEOF_EVENT": ctypes.sizeof(Event),
        "BW_SIZEOF_META": ctypes.sizeof(Meta),
        "BW_SIZEOF_UNIX_KEY": ctypes.sizeof(UnixKey),
        "BW_SIZEOF_UNIX_DEST": ctypes.sizeof(UnixDest),
    }


def pack_ip(ip: str) -> bytes:
    """16-byte normal form: IPv6 as is, IPv4 as ::ffff:a.b.c.d."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 4:
        return b"\0" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def unpack_ip(raw: bytes) -> str:
    """Inverse of pack_ip: IPv4-mapped addresses come back as dotted IPv4."""
    addr = ipaddress.IPv6Address(bytes(raw))
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def is_mapped(raw: bytes) -> bool:
    return bytes(raw[:12]) == b"\0" * 10 + b"\xff\xff"


def addr_key(ip: str, port: int) -> AddrKey:
    key = AddrKey()
    key.ip = Ip16.from_buffer_copy(pack_ip(ip))
    key.port = port
    return key


def unix_key(address: str) -> UnixKey:
    """A Unix socket address as the BPF programs normalize it: a path, or "@name" for an
    abstract name (its bytes after the leading NUL)."""
    raw = b"\0" + address[1:].encode() if address.startswith("@") else address.encode()
    if not raw or len(raw) > UNIX_PATH_MAX or (raw[0] and b"\0" in raw):
        raise ValueError(f"{address!r} is not a Unix socket address")
    key = UnixKey()
    key.len = len(raw)
    ctypes.memmove(key.path, raw, len(raw))
    return key


def unix_address(key: UnixKey) -> str:
    """Inverse of unix_key (abstract names as "@name", non-text bytes escaped)."""
    raw = bytes(key.path[: min(key.len, UNIX_PATH_MAX)])
    if raw[:1] == b"\0":
        return "@" + raw[1:].decode(errors="backslashreplace")
    return raw.decode(errors="backslashreplace")


def tuple_key(local: tuple, peer: tuple) -> TupleKey:
    """Key for an accepted socket: local = getsockname(), peer = getpeername()."""
    key = TupleKey()
    key.local_ip = Ip16.from_buffer_copy(pack_ip(local[0]))
    key.peer_ip = Ip16.from_buffer_copy(pack_ip(peer[0]))
    key.local_port = local[1]
    key.peer_port = peer[1]
    return key


def kernel_dev_to_user(dev: int) -> int:
    """Kernel-internal dev_t (major << 20 | minor) to the st_dev encoding stat() returns."""
    import os

    return os.makedev(dev >> 20, dev & 0xFFFFF)
