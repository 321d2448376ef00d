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
            pos += _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_MEMBER.get(kind, 0) * vlen
            type_id = len(self._types)
            name = self._str(name_off)
            self._types.append(_Type(kind, name, members))
            if name and kind in (_KIND_STRUCT, _KIND_UNION):
                self._by_name.setdefault(name, []).append(type_id)

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
def kernel_offsets(path: Path = VMLINUX_BTF) -> dict[str, int]:
    """The ``BW_OFF_*`` defines for the running kernel."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BTFError(f"cannot read kernel BTF at {path}: {e.strerror}") from e
    btf = BTF(data)
    return {define: btf.member_offset(s, m) for define, (s, m) in ATTRIBUTION_FIELDS.items()}
