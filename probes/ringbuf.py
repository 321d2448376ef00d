"""Drain the pinned event ring buffer through libbpf (ctypes), without bcc.

The daemon never loads bcc itself (compiling costs ~150 MB that a process
does not give back): a short-lived child compiles and attaches, and the daemon
reads the pinned ``events`` ring with libbpf's ``ring_buffer__*``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

from probes import bpfsys
from probes.errors import ProbeUnavailable

log = logging.getLogger(__name__)

_SampleFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_lib = None


def _libbpf():
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise ProbeUnavailable(f"libbpf is not installed ({e}): apt install libbpf1") from e
        lib.ring_buffer__new.restype = ctypes.c_void_p
        lib.ring_buffer__new.argtypes = [ctypes.c_int, _SampleFn, ctypes.c_void_p, ctypes.c_void_p]
        lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ring_buffer__consume.argtypes = [ctypes.c_void_p]
        lib.ring_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
        lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


class RingBufferReader:
    """Calls ``callback(bytes)`` for each record of the ring buffer pinned at ``path``."""

    def __init__(self, path: str, record_size: int):
        self._lib = _libbpf()
        self._record_size = record_size
        self._callback: Callable[[bytes], None] | None = None
        self._fd = bpfsys.obj_get(path)
        self._sample = _SampleFn(self._on_sample)  # keep a reference: libbpf holds the pointer
        self._rb = self._lib.ring_buffer__new(self._fd, self._sample, None, None)
        if not self._rb:
            os.close(self._fd)
            raise ProbeUnavailable(f"ring_buffer__new({path}) failed: {os.strerror(ctypes.get_errno())}")

    def _on_sample(self, _ctx, data, size) -> int:
        if self._callback is not None and size >= self._record_size:
            try:
                self._callback(ctypes.string_at(data, self._record_size))
            except Exception:  # a failing consumer must not stop the drain
                log.exception("probe event callback failed")
        return 0

    def poll(self, callback: Callable[[bytes], None], timeout_ms: int) -> int:
        """Deliver what is there (waiting up to ``timeout_ms`` for something); returns the count or -errno."""
        if self._rb is None:
            raise ValueError("ring buffer reader is closed")
        self._callback = callback
        try:
            if timeout_ms == 0:
                return self._lib.ring_buffer__consume(self._rb)
            return self._lib.ring_buffer__poll(self._rb, timeout_ms)
        finally:
            self._callback = None

    def fileno(self) -> int:
        """An epoll fd that becomes readable when records arrive (for loop.add_reader)."""
        return self._lib.ring_buffer__epoll_fd(self._rb)

    def close(self) -> None:
        if self._rb is not None:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
            os.close(self._fd)
