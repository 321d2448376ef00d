"""The audit writer's journal: events it has received but not yet committed, on disk.

``audit.mode = "strict"`` forwards a request only once the audit process has the
request's record. Held in memory, that record would die with the audit process; so
the process appends each batch it receives to this journal (after redaction: the
journal holds nothing the store would not) *before* it acknowledges it, and a writer
that starts after an epoch ended abruptly replays the journal's events that epoch had
not committed. An append is one ``write`` to the page cache: the journal survives the
death of any botwarden process. With ``sync`` (``audit.journal_sync``) each append is
also ``fdatasync``-ed, and each new file's directory entry ``fsync``-ed, before the
append returns (so before the batch is acknowledged): it survives a power loss too
(see docs/audit-schema.md). DuckDB syncs its own write-ahead log at each commit.

Files: ``<store>.journal-<epoch>-<n>``, frames of ``length (4 bytes) + pickle(list of
(kind name, row))``. A new file starts once the current one passes ``segment_bytes``;
a file is deleted once the store has committed every event in it. A torn last frame
(killed mid-write) was never acknowledged and is ignored.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import Any

from . import schema

_LEN = struct.Struct(">I")
_SEGMENT_BYTES = 8 << 20


def epoch_files(store_path: Path, epoch: int) -> list[Path]:
    prefix = f"{store_path.name}.journal-{epoch}-"
    found = []
    for p in store_path.parent.glob(f"{store_path.name}.journal-{epoch}-*"):
        tail = p.name[len(prefix):]
        if tail.isdigit():
            found.append((int(tail), p))
    return [p for _, p in sorted(found)]


def all_files(store_path: Path) -> list[Path]:
    return sorted(store_path.parent.glob(f"{store_path.name}.journal-*"))


def read_events(store_path: Path, epoch: int) -> list[tuple[schema.Kind, tuple[Any, ...]]]:
    """Every complete event the journal of ``epoch`` holds, in the order received."""
    out: list = []
    kinds = schema.KINDS
    for path in epoch_files(store_path, epoch):
        data = path.read_bytes()
        pos = 0
        while pos + 4 <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if pos + 4 + n > len(data):
                break  # torn: written when the process died, never acknowledged
            try:
                frame = pickle.loads(data[pos + 4:pos + 4 + n])  # noqa: S301 - our own file, mode 0600
            except Exception:
                break
            out.extend((kinds[k], row) for k, row in frame)
            pos += 4 + n
    return out


class Journal:
    """Appends for one writer epoch; ``release(committed)`` deletes what the store has."""

    def __init__(self, store_path: Path, epoch: int, *, segment_bytes: int = _SEGMENT_BYTES, sync: bool = False):
        self.store_path = store_path
        self.epoch = epoch
        self.segment_bytes = segment_bytes
        self.sync = sync
        self._n = 0
        self._fd = -1
        self._size = 0
        self._appended = 0                      # events appended so far
        self._closed_segments: list[tuple[int, Path]] = []   # (events appended at its end, path)
        self._path: Path | None = None
        self._open_next()

    def _open_next(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._closed_segments.append((self._appended, self._path))
        self._n += 1
        self._path = self.store_path.parent / f"{self.store_path.name}.journal-{self.epoch}-{self._n}"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self._size = 0
        if self.sync:  # the new file's name, durable before anything in it is acknowledged
            dir_fd = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def append(self, frame: list[tuple[str, tuple[Any, ...]]]) -> None:
        """One write of the frame (whole, or torn only if this process dies meanwhile)."""
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        buf = _LEN.pack(len(data)) + data
        view = memoryview(buf)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self.sync:
            os.fdatasync(self._fd)
        self._size += len(buf)
        self._appended += len(frame)
        if self._size >= self.segment_bytes:
            self._open_next()

    def release(self, committed: int) -> None:
        """The store committed the first ``committed`` journaled events: drop files wholly behind."""
        segs = self._closed_segments
        while segs and segs[0][0] <= committed:
            _, path = segs.pop(0)
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def close(self, *, delete: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            for _, path in self._closed_segments:
                path.unlink(missing_ok=True)
            if self._path is not None:
                self._path.unlink(missing_ok=True)


def delete_epoch(store_path: Path, epoch: int) -> None:
    for p in epoch_files(store_path, epoch):
        p.unlink(missing_ok=True)
