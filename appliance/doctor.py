"""`botwarden doctor`: can this host run botwarden? Each check says what is wrong and how to fix it."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

from appliance.config import load_config
from appliance.errors import ConfigError


def _cgroup2_mount() -> str | None:
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    except OSError:
        return None
    return None


def _bpffs_mounted() -> bool:
    try:
        return any(line.split()[2] == "bpf" for line in Path("/proc/self/mounts").read_text().splitlines())
    except OSError:
        return False


def checks(config_path: str) -> list[tuple[str, bool, str]]:
    out: list[tuple[str, bool, str]] = []

    def add(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as e:  # a check that breaks is a failed check, with its reason
            ok, detail = False, f"{type(e).__name__}: {e}"
        out.append((name, ok, detail))

    add("running as root", lambda: (os.geteuid() == 0, "eBPF, cgroups and the control socket need root"))
    add("kernel BTF", lambda: (Path("/sys/kernel/btf/vmlinux").exists(), "/sys/kernel/btf/vmlinux"))
    rel = platform.release()
    add("kernel headers for bcc", lambda: (Path(f"/lib/modules/{rel}/build").exists(),
                                           f"/lib/modules/{rel}/build (vagrant/provision.sh links Debian's)"))
    add("cgroup v2 mounted", lambda: (_cgroup2_mount() is not None, _cgroup2_mount() or "mount -t cgroup2 none DIR"))
    add("bpffs at /sys/fs/bpf", lambda: (_bpffs_mounted(), "mount -t bpf bpf /sys/fs/bpf"))

    def bcc() -> tuple[bool, str]:
        mod = importlib.import_module("bcc")
        return True, str(Path(mod.__file__).parent)

    add("bcc importable", bcc)
    add("nft (fallback path)", lambda: (shutil.which("nft") is not None, shutil.which("nft") or "apt-get install nftables"))

    def config() -> tuple[bool, str]:
        try:
            cfg = load_config(config_path)
        except ConfigError as e:
            return False, str(e)
        return True, f"{config_path}: {len(cfg.targets)} targets"

    add("config", config)
    return out


def run_doctor(args: argparse.Namespace) -> int:
    results = checks(args.config)
    for name, ok, detail in results:
        print(f"[{'ok' if ok else 'FAIL':>4}] {name}: {detail}")
    failed = [r for r in results if not r[1]]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    return 1 if failed else 0
