"""The bots' cgroups: one parent the probes attach to, one child per bot.

A bot's identity is its cgroup: programs attached to the parent apply to
every child, and each child reports its own cgroup id. A process must be in
its cgroup *before* it creates sockets (sockets keep the cgroup they were
created in), so bots are started inside it: the child writes itself into
``cgroup.procs`` between fork and exec.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from probes.errors import ProbeError, ProbeUnavailable

log = logging.getLogger(__name__)


class CgroupError(ProbeError):
    """A cgroup operation failed; the message names the cgroup."""


def cgroup2_mount() -> Path:
    """The first cgroup2 mount (``/sys/fs/cgroup`` on v2 hosts, ``…/unified`` on hybrid ones)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1].replace("\\040", " "))
    raise ProbeUnavailable("no cgroup2 mount (run probes/setup-host.sh)")


def resolve(path: str | os.PathLike) -> Path:
    """Absolute cgroup directory for a path absolute under the mount or relative to it."""
    root = cgroup2_mount()
    p = Path(path)
    if p.is_absolute() and (p == root or root in p.parents):
        return p
    return root / str(path).lstrip("/")


def relative(path: str | os.PathLike) -> str:
    """The path as /proc/<pid>/cgroup shows it: ``/parent/child``."""
    return "/" + str(resolve(path).relative_to(cgroup2_mount())).lstrip(".")


def cgroup_id(path: str | os.PathLike) -> int:
    """A cgroup's id is its kernfs inode number (what bpf_get_current_cgroup_id returns)."""
    return os.stat(resolve(path)).st_ino


def level(path: str | os.PathLike) -> int:
    """Depth below the cgroup2 root (nft's ``socket cgroupv2 level``)."""
    rel = relative(path).strip("/")
    return len(rel.split("/")) if rel else 0


def create(path: str | os.PathLike) -> Path:
    """Create a cgroup (and its parents); existing ones are fine."""
    p = resolve(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {p}: {e.strerror}") from e
    return p


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name or name.startswith("cgroup."):
        raise CgroupError(f"invalid bot name {name!r} for a cgroup")


def bot_cgroup(parent: str | os.PathLike, name: str) -> Path:
    """``<parent>/<name>``, created if needed."""
    _check_name(name)
    create(parent)
    return create(resolve(parent) / name)


def pids(path: str | os.PathLike, recursive: bool = True) -> list[int]:
    """Processes in a cgroup (and its descendants)."""
    root = resolve(path)
    dirs = [root]
    if recursive:
        dirs += [Path(d) for d, _, _ in os.walk(root) if Path(d) != root]
    out: list[int] = []
    for d in dirs:
        try:
            out += [int(x) for x in (d / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def pids_with_cgroup(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(pid, cgroup id) of every process in a cgroup tree."""
    root = resolve(path)
    out: list[tuple[int, int]] = []
    for d, _, _ in os.walk(root):
        try:
            cgid = os.stat(d).st_ino
            out += [(int(x), cgid) for x in (Path(d) / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            continue
    return out


def path_for_id(parent: str | os.PathLike, cgid: int) -> str | None:
    """Relative path of the cgroup with id ``cgid`` at or under ``parent``."""
    root = resolve(parent)
    try:
        if os.stat(root).st_ino == cgid:
            return relative(root)
        for d, subdirs, _ in os.walk(root):
            for s in subdirs:
                p = Path(d) / s
                if os.stat(p).st_ino == cgid:
                    return relative(p)
    except FileNotFoundError:
        return None
    return None


def remove(path: str | os.PathLike, timeout: float = 5.0) -> None:
    """Kill everything in a cgroup tree and remove it, deepest first. Missing is fine."""
    root = resolve(path)
    if not root.exists():
        return
    kill = root / "cgroup.kill"
    if kill.exists():
        kill.write_text("1")
    else:
        for pid in pids(root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    dirs = sorted((Path(d) for d, _, _ in os.walk(root)), key=lambda p: len(p.parts), reverse=True)
    for d in dirs:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove cgroup {d}: {e.strerror}") from e
                time.sleep(0.02)  # killed processes take a moment to leave


def _user_ids(user: str | int | None) -> tuple[int, int, list[int]] | None:
    if user is None:
        return None
    try:
        pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError as e:
        raise CgroupError(f"unknown user {user!r}") from e
    return pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)


def _enter(cgroup: Path, ids: tuple[int, int, list[int]] | None) -> None:
    """Runs in the child (or the process about to exec): join, then drop privileges."""
    with open(cgroup / "cgroup.procs", "w") as f:
        f.write("0")  # "0" = the writing process
    if ids is not None:
        uid, gid, groups = ids
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)


def spawn(
    cgroup: str | os.PathLike, argv: Sequence[str], *, user: str | int | None = None, **popen_kwargs
) -> subprocess.Popen:
    """Start ``argv`` inside ``cgroup`` (as ``user`` if given); returns the Popen.

    The child joins the cgroup before exec, so its very first socket is already
    covered. Privileges are dropped after joining (joining needs root).
    """
    target = resolve(cgroup)
    if not (target / "cgroup.procs").exists():
        raise CgroupError(f"cgroup {target} does not exist")
    ids = _user_ids(user)
    if "preexec_fn" in popen_kwargs:
        raise CgroupError("spawn() owns preexec_fn")
    return subprocess.Popen(list(argv), preexec_fn=lambda: _enter(target, ids), **popen_kwargs)


def exec_in(cgroup: str | os.PathLike, argv: Sequence[str], *, user: str | int | None = None) -> NoReturn:
    """Move this process into ``cgroup`` and exec ``argv`` (for ``botwarden bot run``)."""
    target = resolve(cgroup)
    if not argv:
        raise CgroupError("no command to run")
    _enter(target, _user_ids(user))
    try:
        os.execvp(argv[0], list(argv))
    except OSError as e:
        raise CgroupError(f"cannot run {argv[0]!r}: {e.strerror}") from e


def run_bot(parent: str | os.PathLike, name: str, argv: Sequence[str], *, user: str | int | None = None) -> NoReturn:
    """``botwarden bot run --name NAME -- COMMAND...``: create ``<parent>/<name>`` and exec in it."""
    exec_in(bot_cgroup(parent, name), argv, user=user)
