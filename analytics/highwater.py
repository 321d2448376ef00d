"""The daemon's high-water marks: what it issued, in a file that outlives it.

A crash can only lose events that had not reached the store yet, and those are by
nature the last ones: the file alone cannot say they ever existed. So the daemon keeps,
in a small memory-mapped file beside the store (``<store>.hwm``), for every open
session the sequence number of the last request event it issued, whether it issued
the session's end, and the store's committed head (``chain_seq``) as last reported. A
store to a shared mapping is a memory write (no system call) and lands in the page
cache, which survives ``kill -9`` of any process (not a power loss).

When botwarden starts after a daemon that did not stop cleanly, it compares these marks
with the store and records each session's shortfall as an ``audit_losses`` row;
:func:`analytics.verify` reads the same file, so a check run before that restart also
sees the loss, and a store whose head is behind the recorded head was truncated.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

_MAGIC = b"BWHWM001"
_HEADER = struct.Struct("<8sQQQQQ")   # magic, running, store epoch, head seq, capacity, pid
_SLOT = struct.Struct("<32sQQ")       # session id, issued request seq, flags
_ISSUED = struct.Struct("<Q")
_USED, _ENDED = 1, 2
_SLOT_AREA = 64                       # the header is padded to this


def path_for(store_path: str | Path) -> Path:
    return Path(f"{store_path}.hwm")


@dataclass(frozen=True)
class SessionMark:
    session_id: str
    issued_seq: int     # requests the daemon issued for this session (the last one's seq)
    ended: bool         # it issued the session's session_end event


@dataclass(frozen=True)
class HighWater:
    running: bool       # the daemon that wrote it did not stop cleanly (or still runs)
    epoch: int
    head_seq: int
    pid: int
    sessions: tuple[SessionMark, ...]


def read(store_path: str | Path) -> HighWater | None:
    """The marks left beside ``store_path``, or None (no file, or not one of ours)."""
    try:
        data = path_for(store_path).read_bytes()
    except OSError:
        return None
    if len(data) < _SLOT_AREA:
        return None
    magic, running, epoch, head, capacity, pid = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC:
        return None
    sessions = []
    for i in range(min(capacity, (len(data) - _SLOT_AREA) // _SLOT.size)):
        sid, issued, flags = _SLOT.unpack_from(data, _SLOT_AREA + i * _SLOT.size)
        if flags & _USED:
            sessions.append(SessionMark(sid.rstrip(b"\0").decode("ascii", "replace"), issued,
                                        bool(flags & _ENDED)))
    return HighWater(bool(running), epoch, head, pid, tuple(sessions))


class HighWaterFile:
    """The daemon's writable marks. ``claim``/``issue``/``end`` run on the event loop thread;
    ``free`` and ``set_head`` on the audit process's reader thread."""

    def __init__(self, store_path: str | Path, *, capacity: int = 1024):
        self.path = path_for(store_path)
        self._lock = threading.Lock()        # set_head against a remap while growing
        self._slots = threading.RLock()      # claim (event loop) against free (the audit reader thread)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._capacity = 0
        self._mm: mmap.mmap | None = None
        self._free: list[int] = []
        self._grow(capacity)
        _HEADER.pack_into(self._mm, 0, _MAGIC, 1, 0, 0, self._capacity, os.getpid())

    def _grow(self, capacity: int) -> None:
        with self._lock:
            os.ftruncate(self._fd, _SLOT_AREA + capacity * _SLOT.size)
            old = self._mm
            self._mm = mmap.mmap(self._fd, _SLOT_AREA + capacity * _SLOT.size)
            if old is not None:
                old.close()
            self._free.extend(range(capacity - 1, self._capacity - 1, -1))
            self._capacity = capacity
            struct.pack_into("<Q", self._mm, 32, capacity)

    def claim(self, session_id: str) -> int:
        with self._slots:
            if not self._free:
                self._grow(self._capacity * 2)
            slot = self._free.pop()
            _SLOT.pack_into(self._mm, _SLOT_AREA + slot * _SLOT.size,
                            session_id.encode("ascii", "replace")[:32], 0, _USED)
            return slot

    def issue(self, slot: int, seq: int) -> None:
        _ISSUED.pack_into(self._mm, _SLOT_AREA + slot * _SLOT.size + 32, seq)

    def end(self, slot: int) -> None:
        _ISSUED.pack_into(self._mm, _SLOT_AREA + slot * _SLOT.size + 40, _USED | _ENDED)

    def issued(self, slot: int) -> int:
        """The issued request seq in ``slot`` (a worker process may have written it)."""
        with self._lock:
            return _ISSUED.unpack_from(self._mm, _SLOT_AREA + slot * _SLOT.size + 32)[0]

    def free(self, slot: int) -> None:
        """The session's events are all committed: its mark is no longer needed."""
        with self._slots:
            if self._mm is None:
                return
            _SLOT.pack_into(self._mm, _SLOT_AREA + slot * _SLOT.size, b"", 0, 0)
            self._free.append(slot)

    def set_head(self, epoch: int, head_seq: int) -> None:
        with self._lock:
            if self._mm is not None:
                struct.pack_into("<QQ", self._mm, 16, epoch, head_seq)

    def close(self) -> None:
        """A clean stop: every event is committed, nothing to account for at the next start."""
        with self._lock:
            if self._mm is None:
                return
            self._mm[_SLOT_AREA:] = bytes(len(self._mm) - _SLOT_AREA)
            struct.pack_into("<Q", self._mm, 8, 0)
            self._mm.flush()
            self._mm.close()
            self._mm = None
            os.close(self._fd)


class SharedMarks:
    """A worker process's view of the daemon's marks (``appliance.workers`` > 1): it writes the
    issued seq of the sessions it serves into the slots the daemon claimed for them, before their
    answers reach the bots, so a worker killed with records not yet sent leaves marks that count
    them. Only the worker writes a slot's issued seq while the session lives; the daemon claims,
    ends and frees slots (``end`` here does nothing: the daemon marks the end as its record arrives)."""

    def __init__(self, path: str | Path):
        self._fd = os.open(path, os.O_RDWR)
        self._mm = mmap.mmap(self._fd, os.fstat(self._fd).st_size)

    def issue(self, slot: int, seq: int) -> None:
        at = _SLOT_AREA + slot * _SLOT.size + 32
        if at + _ISSUED.size > len(self._mm):  # the daemon grew the file since: map all of it
            self._mm.close()
            self._mm = mmap.mmap(self._fd, os.fstat(self._fd).st_size)
        _ISSUED.pack_into(self._mm, at, seq)

    def end(self, slot: int) -> None:
        pass

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)


@dataclass(frozen=True)
class Shortfall:
    session_id: str
    issued_seq: int
    recorded_seq: int
    session_end_missing: bool

    @property
    def missing(self) -> int:
        return self.issued_seq - self.recorded_seq + self.session_end_missing


def shortfalls(con, marks: tuple[SessionMark, ...] | list[SessionMark]) -> list[Shortfall]:
    """What the store lacks of what the marks say was issued (``con``: a DuckDB connection)."""
    out = []
    for mark in marks:
        # A request's seq is on record in its request_starts row (strict mode) or its requests row.
        recorded = con.execute("SELECT coalesce(max(seq), 0) FROM (SELECT seq FROM requests WHERE session_id = ? "
                               "UNION ALL SELECT seq FROM request_starts WHERE session_id = ?)",
                               [mark.session_id, mark.session_id]).fetchone()[0]
        end_missing = mark.ended and not con.execute(
            "SELECT count(*) FROM session_ends WHERE session_id = ?", [mark.session_id]).fetchone()[0]
        if recorded < mark.issued_seq or end_missing:
            out.append(Shortfall(mark.session_id, mark.issued_seq, int(recorded), bool(end_missing)))
    return out
