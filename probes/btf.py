"""Member offsets of kernel structs, read from the running kernel's BTF.

The BPF programs are compiled against older kernel headers (bcc needs some),
so they never dereference kernel structs through those headers: the few
fields attribution needs (task start time, executable inode) are read with
``bpf_probe_read_kernel`` at offsets taken here from ``/sys/kernel/btf/vmlinux``
and passed in as compiler defines.

Only what the offset lookup needs is decoded: the type table and the string
section (see Documentation/bpf/btf.rst for the layout).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from probes.errors import ProbeError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

_MAGIC = 0xEB9F
_KIND_STRUCT = 4
_KIND_UNION = 5
_KIND_ENUM = 6
_KIND_ENUM64 = 19
_KIND_FUNC = 12
# Bytes that follow the 12-byte common header, per kind: fixed part and per-member part.
_EXTRA_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_EXTRA_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}

# (struct, member path) pairs the programs read; the define names derive from them.
ATTRIBUTION_FIELDS: dict[str, tuple[str, str]] = {
    "BW_OFF_TASK_GROUP_LEADER": ("task_struct", "group_leader"),
    "BW_OFF_TASK_START_BOOTTIME": ("task_struct", "start_boottime"),
    "BW_OFF_TASK_MM": ("task_struct", "mm"),
    "BW_OFF_MM_EXE_FILE": ("mm_struct", "exe_file"),
    "BW_OFF_FILE_INODE": ("file", "f_inode"),
    "BW_OFF_INODE_INO": ("inode", "i_ino"),
    "BW_OFF_INODE_SB": ("inode", "i_sb"),
    "BW_OFF_SB_DEV": ("super_block", "s_dev"),
}

# AF_UNIX filtering (Linux 6.7+): the kernel context behind bpf_sock_addr, and the
# caller's user namespace depth.
UNIX_FIELDS: dict[str, tuple[str, str]] = {
    "BW_OFF_SA_KERN_UADDR": ("bpf_sock_addr_kern", "uaddr"),
    "BW_OFF_SA_KERN_UADDRLEN": ("bpf_sock_addr_kern", "uaddrlen"),
    "BW_OFF_TASK_CRED": ("task_struct", "cred"),
    "BW_OFF_CRED_USER_NS": ("cred", "user_ns"),
    "BW_OFF_USER_NS_LEVEL": ("user_namespace", "level"),
}
# The attach type whose presence means the kernel has the AF_UNIX cgroup hooks.
UNIX_ATTACH_ENUM = "BPF_CGROUP_UNIX_CONNECT"
# Unix-socket targets (Linux 6.7+): connect_unix rewrites the address with these kfuncs.
UNIX_KFUNCS = ("bpf_cast_to_kern_ctx", "bpf_sock_addr_set_sun_path")

# Escape watch: another task's identity, and a cgroup's id, hierarchy and ancestors.
ESCAPE_FIELDS: dict[str, tuple[str, str]] = {
    "BW_OFF_TASK_PID": ("task_struct", "pid"),
    "BW_OFF_TASK_TGID": ("task_struct", "tgid"),
    "BW_OFF_TASK_COMM": ("task_struct", "comm"),
    "BW_OFF_TASK_REAL_CRED": ("task_struct", "real_cred"),
    "BW_OFF_CRED_UID": ("cred", "uid"),
    "BW_OFF_CRED_GID": ("cred", "gid"),
    "BW_OFF_TASK_CGROUPS": ("task_struct", "cgroups"),
    "BW_OFF_CSS_SET_DFL_CGRP": ("css_set", "dfl_cgrp"),
    "BW_OFF_CGROUP_KN": ("cgroup", "kn"),
    "BW_OFF_KERNFS_NODE_ID": ("kernfs_node", "id"),
    "BW_OFF_CGROUP_ROOT": ("cgroup", "root"),
    "BW_OFF_CGROUP_ROOT_HIERARCHY_ID": ("cgroup_root", "hierarchy_id"),
    "BW_OFF_CGROUP_LEVEL": ("cgroup", "level"),
    "BW_OFF_CGROUP_ANCESTORS": ("cgroup", "ancestors"),
}


@dataclass(frozen=True)
class _Member:
    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    members: tuple[_Member, ...]


class BTFError(ProbeError):
    """The kernel's BTF is missing or lacks a field the probes need."""


class BTF:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data, 0
        )
        if magic != _MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None]  # type id 0 is void
        self._by_name: dict[str, list[int]] = {}
        self.enumerators: dict[str, int] = {}
        self.functions: dict[str, int] = {}  # FUNC name -> type id (kfuncs are called by it)
        pos = 0
        while pos < len(types):
            name_off, info, _size = struct.unpack_from("<III", types, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kind_flag = info >> 31
            members: tuple[_Member, ...] = ()
            if kind in (_KIND_STRUCT, _KIND_UNION):
                out = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", types, pos + 12 * i)
                    # With kind_flag the low 24 bits are the offset, the high 8 a bitfield size.
                    bit_off = m_off & 0xFFFFFF if kind_flag else m_off
                    out.append(_Member(self._str(m_name), m_type, bit_off))
                members = tuple(out)
            elif kind in (_KIND_ENUM, _KIND_ENUM64):
                width = 8 if kind == _KIND_ENUM else 12
                for i in range(vlen):
                    e_name, e_val = struct.unpack_from("<Ii", types, pos + width * i)
                    self.enumerators[self._str(e_name)] = e_val
            pos += _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_MEMBER.get(kind, 0) * vlen
            type_id = len(self._types)
            name = self._str(name_off)
            self._types.append(_Type(kind, name, members))
            if name and kind in (_KIND_STRUCT, _KIND_UNION):
                self._by_name.setdefault(name, []).append(type_id)
            elif kind == _KIND_FUNC and name:
                self.functions.setdefault(name, type_id)

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def member_offset(self, struct_name: str, member: str) -> int:
        """Byte offset of ``member`` in ``struct struct_name``, looking through anonymous members."""
        for type_id in self._by_name.get(struct_name, []):
            typ = self._types[type_id]
            if typ is None or not typ.members:
                continue  # a forward declaration or an empty struct
            bits = self._find(typ, member)
            if bits is not None:
                if bits % 8:
                    raise BTFError(f"{struct_name}.{member} is a bitfield")
                return bits // 8
        raise BTFError(f"struct {struct_name} has no member {member} in the kernel's BTF")

    def _find(self, typ: _Type, member: str) -> int | None:
        for m in typ.members:
            if m.name == member:
                return m.bit_offset
            if not m.name:  # anonymous struct/union: search inside
                inner = self._types[m.type_id]
                if inner is not None and inner.kind in (_KIND_STRUCT, _KIND_UNION):
                    found = self._find(inner, member)
                    if found is not None:
                        return m.bit_offset + found
        return None


@lru_cache(maxsize=1)
def _kernel_btf(path: Path) -> BTF:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BTFError(f"cannot read kernel BTF at {path}: {e.strerror}") from e
    return BTF(data)


def _offsets(btf: BTF, fields: dict[str, tuple[str, str]]) -> dict[str, int]:
    return {define: btf.member_offset(s, m) for define, (s, m) in fields.items()}


@lru_cache(maxsize=1)
def kernel_offsets(path: Path = VMLINUX_BTF) -> dict[str, int]:
    """The ``BW_OFF_*`` defines attribution needs on the running kernel (always required)."""
    return _offsets(_kernel_btf(path), ATTRIBUTION_FIELDS)


@dataclass(frozen=True)
class KernelFeatures:
    """Optional program groups this kernel can run, their offsets, and why not when it cannot."""

    unix_offsets: dict[str, int] | None
    unix_missing: str | None
    # Unix-socket targets: the kfuncs that rewrite a Unix address (name -> BTF id), or why not.
    unix_kfuncs: dict[str, int] | None
    unix_kfuncs_missing: str | None
    escape_offsets: dict[str, int] | None
    escape_missing: str | None


@lru_cache(maxsize=1)
def kernel_features(path: Path = VMLINUX_BTF) -> KernelFeatures:
    btf = _kernel_btf(path)
    unix = escape = None
    unix_missing = escape_missing = None
    if UNIX_ATTACH_ENUM not in btf.enumerators:
        unix_missing = f"the kernel has no cgroup hooks for Unix sockets ({UNIX_ATTACH_ENUM}, Linux 6.7+)"
    else:
        try:
            unix = _offsets(btf, UNIX_FIELDS)
        except BTFError as e:
            unix_missing = str(e)
    try:
        escape = _offsets(btf, ESCAPE_FIELDS)
    except BTFError as e:
        escape_missing = str(e)
    kfuncs: dict[str, int] | None = {name: btf.functions[name] for name in UNIX_KFUNCS if name in btf.functions}
    kfuncs_missing = None
    if unix is None:
        kfuncs, kfuncs_missing = None, unix_missing
    elif len(kfuncs) != len(UNIX_KFUNCS):
        kfuncs_missing = ("the kernel lacks the kfuncs that rewrite a Unix address ("
                          + ", ".join(n for n in UNIX_KFUNCS if n not in kfuncs) + ")")
        kfuncs = None
    return KernelFeatures(unix, unix_missing, kfuncs, kfuncs_missing, escape, escape_missing)
