"""Bots and probes from the CLI: `botwarden bot run`, `botwarden probes status|attach|detach`.

The translation from botwarden.toml to the probes' own settings lives here, in one place:
the daemon and the CLI both call :func:`probe_settings`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import socket
import sys
from collections.abc import Mapping
from typing import Any

from appliance.config import Config, ProbeSettings as ProbeConfig, split_host_port
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


def probe_settings(cfg: Config, listeners: Mapping[str, tuple[str, int]] | None = None, *,
                   with_targets: bool = True):
    """probes.ProbeSettings for this config. ``listeners`` gives the bound (ip, port) of each
    target's listener when the config says port 0. ``with_targets=False`` is enough for status
    and detach, which need only the cgroup, the pins and the table (no listener ports, no DNS)."""
    import probes

    pc: ProbeConfig = cfg.probes
    try:
        targets, unix_targets = [], []
        for t in cfg.targets if with_targets else ():
            if t.unix_path is not None:
                unix_targets.append(probes.UnixTarget(t.unix_path, t.listen_unix_path))
                continue
            host, port = t.host_port
            lhost, lport = (listeners or {}).get(t.name, t.listen_host_port)
            if not lport:
                raise BotwardenError(f"target {t.name!r}: its listener port is not known yet (listen port 0)")
            for ip in _resolve(host):
                targets.append(probes.Target(ip, port, lhost, lport))
        passthrough = [probes.Passthrough(*split_host_port(p)) for p in pc.passthrough] if with_targets else []
        return probes.ProbeSettings(cgroup_parent=pc.bots_cgroup, targets=tuple(targets),
                                    passthrough=tuple(passthrough), max_connections=pc.map_entries,
                                    pin_dir=pc.pin_dir, mode="auto" if pc.mode == "off" else pc.mode,
                                    nft_table=pc.nft_table, unix_sockets=pc.unix_sockets,
                                    unix_allow=pc.unix_allow, unix_targets=tuple(unix_targets), watch_escapes=pc.watch_escapes,
                                    kill_escaped=pc.kill_escaped)
    except probes.ProbeError as e:  # e.g. a pin_dir outside /sys/fs/bpf, a passthrough that is a target
        raise BotwardenError(f"probes: {e}") from None


def run_bot(cfg: Config | None, name: str, command: list[str], *, user: str | None = None,
            allow_privileged: bool = False) -> int:
    """Exec ``command`` inside the bot's cgroup (created under the bots' parent cgroup).

    Fail closed: unless the config turns the probes off, the bot starts only when probes are
    attached to the bots' cgroup (by the daemon, or by `botwarden probes attach`); otherwise it
    would run unwatched and reach targets directly.

    Not privileged by accident: a bot that would run as uid 0 or with a capability that can undo
    the probes (leave its cgroup, change BPF programs or netfilter rules, ptrace the daemon) is
    refused, unless ``user`` names the unprivileged user to switch to after joining the cgroup,
    or ``allow_privileged`` says the operator means it (a warning; the daemon marks such sessions
    ``privileged`` in the audit from the process it attests)."""
    import probes
    from probes import cgroups
    from probes.attribution import privileges

    pc = cfg.probes if cfg else ProbeConfig()
    try:
        if user is not None:
            if os.geteuid() != 0:
                raise BotwardenError("bot run --user: switching users needs root")
            try:
                target = pwd.getpwnam(user)
            except KeyError:
                raise BotwardenError(f"bot run --user: no user {user!r}") from None
            why = ("uid 0",) if target.pw_uid == 0 else ()  # setuid() to another uid drops all capabilities
        else:
            why = privileges() or ()
        if why and not allow_privileged:
            raise BotwardenError(
                f"bot run: refusing to start a privileged bot ({', '.join(why)}): it could leave its cgroup "
                "or change the probes, and nothing it does would be contained. Use --user NAME to run it as "
                "an unprivileged user, or --allow-privileged if you mean it (docs/threat-model.md)")
        if why:
            print(f"botwarden: WARNING: bot {name!r} runs privileged ({', '.join(why)}): the kernel redirect "
                  "holds only while it does not undo it; its sessions are marked privileged in the audit",
                  file=sys.stderr, flush=True)
        if pc.mode != "off":
            settings = (probe_settings(cfg, with_targets=False) if cfg else
                        probes.ProbeSettings(cgroup_parent=pc.bots_cgroup, pin_dir=pc.pin_dir, nft_table=pc.nft_table))
            st = probes.status(settings)
            if st.path == "none":
                raise BotwardenError(f"bot run: no probes are attached to the bots' cgroup {st.cgroup_path}, so "
                                     "nothing would watch this bot; start the daemon (botwarden run) first")
        cgroups.run_bot(pc.bots_cgroup, name, command, user=user)  # does not return on success
    except probes.ProbeError as e:
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
    from appliance.daemon import StateLock

    daemon_pid = StateLock.holder(cfg.appliance.state_dir)
    if action == "status":
        st = probes.status(probe_settings(cfg, with_targets=False))
        doc: Any = st.as_dict()
        print(json.dumps(doc, indent=2, default=str) if json_out else _status_text(doc))
        return 0
    if action == "attach":
        if daemon_pid:
            # The running daemon owns the probes: it attaches them again itself, with the listeners
            # it really has (attaching from here would record this short-lived process as the owner,
            # and `status` would then call a healthy daemon's redirect "fail closed").
            from appliance.control import ControlClient

            doc = ControlClient(cfg.appliance.control_socket, timeout=120).post("/v1/probes/attach")
            print(f"probes attached by the daemon (pid {daemon_pid}): {doc['probes']}")
            return 0
        handle = probes.attach(probe_settings(cfg))
        print(f"probes attached: {handle.path} ({handle.reason})")
        print("no daemon is running: bots' connections to targets are refused (fail closed) until it starts")
        handle.close()
        return 0
    if action == "detach":
        result = probes.detach(probe_settings(cfg, with_targets=False))
        print(f"probes detached from {cfg.probes.bots_cgroup}: {result.event.detail}")
        if daemon_pid:
            print(f"the daemon (pid {daemon_pid}) keeps running, but bots are no longer sent to it: "
                  "`botwarden probes attach` or a restart puts the probes back")
        return 0
    raise BotwardenError(f"unknown probes action {action!r}")


def _status_text(doc: Mapping[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in doc.items())
