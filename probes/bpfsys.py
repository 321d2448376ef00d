"""The few bpf(2) commands probes needs, through ctypes.

Reading a pinned map or querying a cgroup's programs must work from any
process (the inspector, the CLI), without loading bcc and its compiler.
"""

from __future__ import annotations

import ctypes
import struct
import errno
import os
import platform
from dataclasses import dataclass

from probes.errors import ProbeError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)

MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
RAW_TRACEPOINT_OPEN = 17

BPF_ANY = 0
BPF_NOEXIST = 1


class BPFSyscallError(ProbeError):
    def __init__(self, what: str, err: int):
        self.errno = err
        super().__init__(f"bpf({what}): {os.strerror(err)}")


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    ret = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise BPFSyscallError(what, ctypes.get_errno())
    return ret


def _attr(*fields: tuple[str, int, int]) -> ctypes.Array:
    """A zeroed bpf_attr (128 bytes) with (format, offset, value) fields set."""
    buf = (ctypes.c_ubyte * 128)()
    for fmt, offset, value in fields:
        ctype = {"I": ctypes.c_uint32, "Q": ctypes.c_uint64}[fmt]
        ctype.from_buffer(buf, offset).value = value
    return buf


def obj_get(path: str) -> int:
    """fd of a pinned object."""
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(OBJ_GET, _attr(("Q", 0, ctypes.addressof(cpath))), f"OBJ_GET {path}")


def map_lookup(fd: int, key: ctypes.Structure | ctypes._SimpleCData, value: ctypes.Structure) -> bool:
    try:
        _bpf(
            MAP_LOOKUP_ELEM,
            _attr(("I", 0, fd), ("Q", 8, ctypes.addressof(key)), ("Q", 16, ctypes.addressof(value))),
            "MAP_LOOKUP_ELEM",
        )
    except BPFSyscallError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _bpf(
        MAP_UPDATE_ELEM,
        _attr(
            ("I", 0, fd), ("Q", 8, ctypes.addressof(key)), ("Q", 16, ctypes.addressof(value)), ("Q", 24, flags)
        ),
        "MAP_UPDATE_ELEM",
    )


def map_delete(fd: int, key) -> bool:
    try:
        _bpf(MAP_DELETE_ELEM, _attr(("I", 0, fd), ("Q", 8, ctypes.addressof(key))), "MAP_DELETE_ELEM")
    except BPFSyscallError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_type: type[ctypes.Structure]) -> list:
    """All keys (a snapshot; fine for the small targets map)."""
    keys = []
    prev = None
    while True:
        nxt = key_type()
        try:
            _bpf(
                MAP_GET_NEXT_KEY,
                _attr(("I", 0, fd), ("Q", 8, ctypes.addressof(prev) if prev is not None else 0),
                      ("Q", 16, ctypes.addressof(nxt))),
                "MAP_GET_NEXT_KEY",
            )
        except BPFSyscallError as e:
            if e.errno == errno.ENOENT:
                return keys
            raise
        keys.append(nxt)
        prev = nxt


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of programs attached directly (not inherited) to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr(("I", 0, target_fd), ("I", 4, attach_type), ("Q", 16, ctypes.addressof(ids)), ("I", 24, 64))
    _bpf(PROG_QUERY, attr, "PROG_QUERY")
    count = ctypes.c_uint32.from_buffer(attr, 24).value
    return list(ids[:count])


def prog_get_fd_by_id(prog_id: int) -> int:
    return _bpf(PROG_GET_FD_BY_ID, _attr(("I", 0, prog_id)), f"PROG_GET_FD_BY_ID {prog_id}")


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    info = (ctypes.c_ubyte * 80)()
    _bpf(OBJ_GET_INFO_BY_FD, _attr(("I", 0, fd), ("I", 4, 80), ("Q", 8, ctypes.addressof(info))), "OBJ_GET_INFO")
    raw = bytes(info)
    name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(id=int.from_bytes(raw[4:8], "little"), type=int.from_bytes(raw[0:4], "little"), name=name)


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = 0) -> None:
    _bpf(PROG_ATTACH, _attr(("I", 0, target_fd), ("I", 4, prog_fd), ("I", 8, attach_type), ("I", 12, flags)),
         "PROG_ATTACH")


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    _bpf(PROG_DETACH, _attr(("I", 0, target_fd), ("I", 4, prog_fd), ("I", 8, attach_type)), "PROG_DETACH")


def can_create_map() -> str | None:
    """None when this process may use bpf(2) (it creates and closes a one-entry array map),
    else why not. For `botwarden doctor`."""
    map_create, array = 0, 2
    try:
        fd = _bpf(map_create, _attr(("I", 0, array), ("I", 4, 4), ("I", 8, 4), ("I", 12, 1)), "MAP_CREATE")
    except BPFSyscallError as e:
        return str(e)
    os.close(fd)
    return None


PROG_LOAD = 5
BPF_PSEUDO_KFUNC_CALL = 2


def prog_load(prog_type: int, insns: bytes, expected_attach_type: int, name: str, license: str = "GPL") -> int:
    """BPF_PROG_LOAD of raw instructions (map fds already in them); returns the program fd. On a
    verifier refusal the error carries the verifier's last lines. ``name`` is what bpftool and
    `probes status` see (the kernel keeps 15 bytes)."""
    cinsns = ctypes.create_string_buffer(insns, len(insns))
    clicense = ctypes.create_string_buffer(license.encode())
    vlog = ctypes.create_string_buffer(1 << 20)
    attr = _attr(("I", 0, prog_type), ("I", 4, len(insns) // 8), ("Q", 8, ctypes.addressof(cinsns)),
                 ("Q", 16, ctypes.addressof(clicense)), ("I", 24, 1), ("I", 28, len(vlog)),
                 ("Q", 32, ctypes.addressof(vlog)), ("I", 68, expected_attach_type))
    raw_name = name.encode()[:15]
    ctypes.memmove(ctypes.addressof(attr) + 48, raw_name, len(raw_name))  # prog_name[16], NUL-terminated
    try:
        return _bpf(PROG_LOAD, attr, "PROG_LOAD")
    except BPFSyscallError as e:
        tail = vlog.value.decode(errors="replace").strip().splitlines()[-3:]
        raise BPFSyscallError(f"PROG_LOAD ({' / '.join(tail)})", e.errno) from None


def patch_kfunc_calls(insns: bytes, kfuncs: dict[int, int]) -> bytes:
    """Turn ``call <placeholder>`` instructions into kfunc calls: src_reg = BPF_PSEUDO_KFUNC_CALL,
    imm = the function's BTF id in vmlinux (``kfuncs``: placeholder -> BTF id)."""
    out = bytearray(insns)
    for i in range(0, len(out), 8):
        off, imm = struct.unpack_from("<hi", out, i + 2)
        if out[i] == 0x85 and imm in kfuncs:  # BPF_JMP | BPF_CALL
            out[i + 1] = (out[i + 1] & 0x0F) | (BPF_PSEUDO_KFUNC_CALL << 4)
            struct.pack_into("<hi", out, i + 2, 0, kfuncs[imm])
    return bytes(out)


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach a raw-tracepoint program; returns the link fd (detached when its last reference goes)."""
    cname = ctypes.create_string_buffer(name.encode())
    return _bpf(RAW_TRACEPOINT_OPEN, _attr(("Q", 0, ctypes.addressof(cname)), ("I", 8, prog_fd)),
                f"RAW_TRACEPOINT_OPEN {name}")


def obj_pin(fd: int, path: str) -> None:
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(OBJ_PIN, _attr(("Q", 0, ctypes.addressof(cpath)), ("I", 8, fd)), f"OBJ_PIN {path}")
