"""Bots and probes from the CLI: `botwarden bot run`, `botwarden probes status|attach|detach`.

The translation from botwarden.toml to the probes' own settings lives here, in one place:
the daemon and the CLI both call :func:`probe_settings`.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Mapping
from typing import Any

from appliance.config import Config, ProbeSettings as ProbeConfig
from appliance.errors import BotwardenError


def _resolve(host: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise BotwardenError(f"target address {host!r} does not resolve: {e}") from None
    return sorted({info[4][0] for info in infos})


def probe_settings(cfg: Config, listeners: Mapping[str, tuple[str, int]] | None = None):
    """probes.ProbeSettings for this config. ``listeners`` gives the bound (ip, port) of each
    target's listener when the config says port 0."""
    import probes

    pc: ProbeConfig = cfg.probes
    targets = []
    for t in cfg.targets:
        host, port = t.host_port
        lhost, lport = (listeners or {}).get(t.name, t.listen_host_port)
        if not lport:
            raise BotwardenError(f"target {t.name!r}: its listener port is not known yet (listen port 0)")
        for ip in _resolve(host):
            targets.append(probes.Target(ip, port, lhost, lport))
    mode = "auto" if pc.mode == "off" else pc.mode
    return probes.ProbeSettings(cgroup_parent=pc.bots_cgroup, targets=tuple(targets),
                                max_connections=pc.map_entries, pin_dir=pc.pin_dir, mode=mode)


def run_bot(cfg: Config | None, name: str, command: list[str]) -> int:
    """Exec ``command`` inside the bot's cgroup (created under the bots' parent cgroup)."""
    from probes import cgroups

    parent = cfg.probes.bots_cgroup if cfg else ProbeConfig().bots_cgroup
    try:
        cgroups.run_bot(parent, name, command)  # does not return on success
    except cgroups.ProbeError as e:
        raise BotwardenError(f"bot run: {e}") from None
    except OSError as e:
        raise BotwardenError(f"bot run: {e}") from None
    return 1


def probes_command(cfg: Config, action: str, json_out: bool = False) -> int:
    import probes

    try:
        return _probes_command(probes, cfg, action, json_out)
    except probes.ProbeError as e:
        raise BotwardenError(f"probes {action}: {e}") from None


def _probes_command(probes: Any, cfg: Config, action: str, json_out: bool) -> int:
    settings = probe_settings(cfg)
    if action == "status":
        st = probes.status(settings)
        doc: Any = st.as_dict()
        print(json.dumps(doc, indent=2, default=str) if json_out else _status_text(doc))
        return 0
    if action == "attach":
        handle = probes.attach(settings)
        print(f"probes attached: {handle.path} ({handle.reason})")
        handle.close()
        return 0
    if action == "detach":
        result = probes.detach(settings)
        print(f"probes detached: {result}")
        return 0
    raise BotwardenError(f"unknown probes action {action!r}")


def _status_text(doc: Mapping[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in doc.items())
