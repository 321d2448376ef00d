"""``GET /v1/health``: what the console's Status view shows, gathered by the running daemon.

The daemon's own state (``Daemon.status``: probes, targets, audit health, sessions, pending
approvals) plus what an operator otherwise runs ``botwarden doctor`` for, asked live: each
target's greeting, Vault/OpenBao reachable and the daemon's own token TTL, the OIDC issuer
(the doctor's checks, :meth:`appliance.doctor.Doctor.live`); the bots' cgroups with their
process counts and the processes running as uid 0; the audit process's queue depth, lost
events and chain head; uptime and version. The network checks run in a thread with short
timeouts and never log in or issue anything.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import __version__

if TYPE_CHECKING:
    from appliance.daemon import Daemon

CHECK_TIMEOUT_S = 2.0    # per connection of a live check
CHECKS_BUDGET_S = 10.0   # all live checks together; past it the view says so instead of waiting
TOKEN_LOW_S = 600        # a Vault token with less left that cannot be renewed is a warning
UID0_LISTED = 20         # uid-0 processes named per cgroup (the count is always complete)


async def health(daemon: "Daemon") -> dict[str, Any]:
    cfg = daemon.config
    status = daemon.status()
    started = daemon.state.started_at
    handle = daemon.probes
    stats = daemon.audit.stats() if daemon.audit is not None else {}
    try:
        checks = await asyncio.wait_for(asyncio.to_thread(_live_checks, daemon), CHECKS_BUDGET_S)
    except asyncio.TimeoutError:
        checks = [{"name": "live checks", "status": "fail", "fix": "see the daemon's log",
                   "detail": f"targets, Vault and the OIDC issuer did not all answer within {CHECKS_BUDGET_S:g} s"}]
    return {
        **status,
        "version": __version__,
        "uptime_s": int((datetime.now(timezone.utc) - started).total_seconds()),
        "probes_mode": cfg.probes.mode,
        "probes_path": handle.path if handle is not None else None,
        "bots": await asyncio.to_thread(bots_processes, _watched(cfg)),
        "checks": checks,
        "audit_stats": {"mode": cfg.audit.mode, "queue_depth": stats.get("pending"), "queue_max": getattr(
            daemon.audit, "queue_max", None), "lost": stats.get("lost", 0), "refused": stats.get("refused", 0),
                        "restarts": stats.get("restarts", 0), "head_seq": stats.get("head_seq"),
                        "epoch": stats.get("epoch"), "failing": stats.get("failing", False)},
        "oidc_issuer": cfg.oidc.issuer if cfg.oidc is not None else None,
    }


def _watched(cfg: Any) -> tuple[str, ...]:
    from appliance.runtime import watched_cgroups

    return watched_cgroups(cfg)


def _live_checks(daemon: "Daemon") -> list[dict[str, Any]]:
    from appliance.doctor import CheckFailed, Doctor
    from appliance.secrets import SecretUnavailable

    cfg = daemon.config
    broker = daemon.runtime.secrets if daemon.runtime is not None else None

    def token() -> str:
        try:
            ttl, renewable = broker.token_lookup()
        except SecretUnavailable as e:
            raise CheckFailed(e.message, "see the daemon's log; it logs in again when the token cannot be "
                                         "renewed") from None
        if not ttl:
            return "no expiry"
        text = f"{ttl} s left ({'renewable, the daemon renews it' if renewable else 'not renewable'})"
        if ttl < TOKEN_LOW_S and not renewable:
            raise CheckFailed(text, "the daemon logs in again when it ends (AppRole) or reads the token "
                                    "file again: make sure a fresh token is there", "warn")
        return text

    doctor = Doctor("", timeout=CHECK_TIMEOUT_S)
    return [asdict(c) for c in doctor.live(cfg, token if broker is not None else None)]


def bots_processes(cgroups: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per bots' cgroup (and each non-empty cgroup below it): the processes in it, and those
    running as uid 0 (effective uid), which can undo the probes if they hold capabilities."""
    from probes import cgroups as cg
    from probes.errors import ProbeError

    out: list[dict[str, Any]] = []
    for name in cgroups:
        try:
            root = cg.resolve(name)
        except ProbeError as e:
            out.append({"cgroup": name, "error": str(e)})
            continue
        if not root.is_dir():
            out.append({"cgroup": name, "error": f"{root} does not exist"})
            continue
        for directory, _, _ in os.walk(root):
            path = Path(directory)
            try:
                pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            except (FileNotFoundError, ValueError):
                continue
            if not pids and path != root:
                continue
            uid0 = [p for p in pids if _euid(p) == 0]
            out.append({"cgroup": cg.relative(path), "processes": len(pids), "uid0": len(uid0),
                        "uid0_pids": [{"pid": p, "comm": _comm(p)} for p in uid0[:UID0_LISTED]]})
    return out


def _euid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


__all__ = ["bots_processes", "health"]
