"""nftables fallback: REDIRECT the watched cgroup's connections where eBPF cannot be used.

One table (``inet <settings.nft_table>``), replaced in a single nft
transaction so a restart has no window:

- ``filter_out`` (filter, output, before NAT): for sockets in the bots' cgroup
  tree, registered targets and passthrough addresses are accepted, anything
  else is rejected (admin-prohibited: the bot sees EHOSTUNREACH, not EPERM).
- ``nat_out`` (nat, output): registered targets go to their listener
  (REDIRECT for a loopback listener, DNAT otherwise); the inspector reads
  SO_ORIGINAL_DST.

Weaker than eBPF: no per-connect identity record (attribution is the socket's
owner at lookup time), no deny events, no getpeername rewrite.

nft resolves ``socket cgroupv2`` paths under /sys/fs/cgroup when it parses
the rules; on hybrid hosts (cgroup2 elsewhere) it runs in a private mount
namespace with the cgroup2 mount bound there.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from probes import cgroups
from probes.attribution import proc_start_ticks
from probes.errors import ProbeError, ProbeUnavailable
from probes.settings import ProbeSettings

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/botwarden")
CGROUP_MOUNT_NFT_EXPECTS = Path("/sys/fs/cgroup")


class NftError(ProbeError):
    """nft refused a ruleset or a command; the message carries nft's error."""


def available() -> str | None:
    """None if the fallback can be used, else why not."""
    if shutil.which("nft") is None:
        return "nft is not installed"
    try:
        cgroups.cgroup2_mount()
    except ProbeUnavailable as e:
        return str(e)
    if os.geteuid() != 0:
        return "nftables needs root"
    return None


def _state_file(table: str) -> Path:
    return STATE_DIR / f"nft-{table}.json"


def _quote(s: str) -> str:
    if '"' in s or "\\" in s or "\n" in s:
        raise NftError(f"cgroup path {s!r} cannot be quoted for nft")
    return f'"{s}"'


def render_ruleset(settings: ProbeSettings) -> str:
    """The nft script ``attach`` would apply (replaces the table atomically)."""
    table = f"inet {settings.nft_table}"
    rel = cgroups.relative(settings.cgroup_parent).lstrip("/")
    match = f"socket cgroupv2 level {cgroups.level(settings.cgroup_parent)} {_quote(rel)}"
    v4 = [t for t in settings.targets if ipaddress.ip_address(t.ip).version == 4]
    v6 = [t for t in settings.targets if ipaddress.ip_address(t.ip).version == 6]
    pass4 = [p for p in settings.passthrough if ipaddress.ip_address(p.ip).version == 4]
    pass6 = [p for p in settings.passthrough if ipaddress.ip_address(p.ip).version == 6]
    lines = [f"table {table} {{}}", f"delete table {table}", f"table {table} {{"]
    lines += ["  chain filter_out {", "    type filter hook output priority -150; policy accept;"]
    lines += [f"    {match} jump bots", "  }"]
    lines += ["  chain bots {"]

    def elements(entries) -> str:
        return "{ " + ", ".join(f"{e.ip} . {e.port}" for e in entries) + " }"

    if v4:
        lines.append(f"    meta l4proto tcp ip daddr . tcp dport {elements(v4)} accept")
    if v6:
        lines.append(f"    meta l4proto tcp ip6 daddr . tcp dport {elements(v6)} accept")
    if pass4:
        lines.append(f"    ip daddr . th dport {elements(pass4)} accept")
    if pass6:
        lines.append(f"    ip6 daddr . th dport {elements(pass6)} accept")
    lines += ["    reject with icmpx admin-prohibited", "  }"]
    lines += ["  chain nat_out {", "    type nat hook output priority -100; policy accept;"]
    for t in settings.targets:
        fam = "ip" if ipaddress.ip_address(t.ip).version == 4 else "ip6"
        listener = ipaddress.ip_address(t.listener_ip)
        if (listener.version == 4) != (fam == "ip"):
            raise NftError(f"target {t.ip}:{t.port}: nftables cannot send it to a listener of the other family")
        if listener.is_loopback and str(listener) in ("127.0.0.1", "::1"):
            action = f"redirect to :{t.listener_port}"
        else:
            addr = str(listener) if fam == "ip" else f"[{listener}]"
            action = f"dnat {fam} to {addr}:{t.listener_port}"
        lines.append(f"    {match} {fam} daddr {t.ip} tcp dport {t.port} {action}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _nft(args: list[str], script: str | None = None, in_cgroup_ns: bool = False) -> str:
    cmd = ["nft", *args]
    mount = cgroups.cgroup2_mount()
    if in_cgroup_ns and mount != CGROUP_MOUNT_NFT_EXPECTS:
        # nft looks cgroup paths up under /sys/fs/cgroup: show it the cgroup2 mount there,
        # in a private mount namespace that disappears with the command.
        inner = f"mount --bind {mount} {CGROUP_MOUNT_NFT_EXPECTS} && exec nft " + " ".join(args)
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner]
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NftError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def attach(settings: ProbeSettings, reason: str) -> None:
    """Install (or atomically replace) the table, and record who owns it and why."""
    why = available()
    if why is not None:
        raise ProbeUnavailable(f"nftables fallback unavailable: {why}")
    _nft(["-f", "-"], render_ruleset(settings), in_cgroup_ns=True)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = {
        "owner_pid": os.getpid(),
        "owner_start_ticks": proc_start_ticks(os.getpid()),
        "cgroup_parent": cgroups.relative(settings.cgroup_parent),
        "reason": reason,
        "attached_unix": time.time(),
    }
    tmp = _state_file(settings.nft_table).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(_state_file(settings.nft_table))
    _state_cache.pop(settings.nft_table, None)


def installed(table: str) -> bool:
    try:
        _nft(["list", "table", "inet", table])
    except NftError:
        return False
    return True


def detach(settings: ProbeSettings) -> bool:
    """Remove the table and state; True if there was a table."""
    had = installed(settings.nft_table)
    if had:
        _nft(["delete", "table", "inet", settings.nft_table])
    _state_file(settings.nft_table).unlink(missing_ok=True)
    _state_cache.pop(settings.nft_table, None)
    return had


def state(table: str) -> dict | None:
    try:
        return json.loads(_state_file(table).read_text())
    except (OSError, ValueError):
        return None


_state_cache: dict[str, tuple[float, dict | None]] = {}


def recorded_cgroup_parent(table: str = "botwarden") -> str | None:
    """The bots' parent cgroup the table was installed for (cached briefly: lookups are hot)."""
    now = time.monotonic()
    cached = _state_cache.get(table)
    if cached is None or now - cached[0] > 2.0:
        cached = (now, state(table))
        _state_cache[table] = cached
    return cached[1].get("cgroup_parent") if cached[1] else None
