"""The test suite's real servers: the same ones the demo starts (appliance.sandbox)."""

import os
import signal
import time
from pathlib import Path

from appliance.sandbox import (  # noqa: F401
    PG_BIN,
    SUPERUSER_PASSWORD,
    OpenBaoServer,
    PostgresServer,
    bao_binary,
    free_port,
    wait_for_port,
)


def pause(pid: int, *, group: bool = False, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` (its process group with ``group``) and return once every thread of it is
    stopped. kill() returns when the signal is queued; a thread running on another CPU stops a
    moment later (on a loaded VM, milliseconds): long enough to answer one more request, which
    a test of "the server hangs" must not see."""
    (os.killpg if group else os.kill)(pid, signal.SIGSTOP)
    pids = [pid]
    if group:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == pid]
    deadline = time.monotonic() + timeout
    while True:
        running = [t for p in pids for t in _thread_states(p) if t not in ("T", "t", "Z", "X")]
        if not running:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {timeout:g}s (thread states {running})")
        time.sleep(0.005)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _thread_states(pid: int) -> list[str]:
    states = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return states  # gone: nothing runs
    for task in tasks:
        try:
            states.append(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue
    return states
