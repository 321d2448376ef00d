"""Probe settings: a frozen, validated model the daemon builds from botwarden.toml."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Literal

from probes import records
from probes.errors import ProbeError

Mode = Literal["auto", "ebpf", "nftables"]
UnixSockets = Literal["filter", "unfiltered"]

BPFFS = "/sys/fs/bpf"
MAX_UNIX_ALLOW = 256
DEFAULT_PIN_DIR = "/sys/fs/bpf/botwarden"


class SettingsError(ProbeError):
    """A probe setting is invalid; the message names it."""


def _ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as e:
        raise SettingsError(f"{what}: {value!r} is not an IP address") from e


def _port(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise SettingsError(f"{what}: {value!r} is not a TCP port (1-65535)")
    return value


@dataclass(frozen=True)
class Target:
    """A registered target: bots asking for (ip, port) are sent to the listener."""

    ip: str
    port: int
    listener_ip: str
    listener_port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", _ip(self.ip, "target ip"))
        object.__setattr__(self, "listener_ip", _ip(self.listener_ip, "listener ip"))
        _port(self.port, "target port")
        _port(self.listener_port, "listener port")


@dataclass(frozen=True)
class Passthrough:
    """An address bots may reach unmodified and unrecorded (e.g. their DNS resolver)."""

    ip: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", _ip(self.ip, "passthrough ip"))
        _port(self.port, "passthrough port")


@dataclass(frozen=True)
class UnixTarget:
    """A Unix-socket target: bots' connects to ``path`` land on the inspector's ``listener``."""

    path: str
    listener: str

    def __post_init__(self) -> None:
        for what, value in (("path", self.path), ("listener", self.listener)):
            try:
                records.unix_dest(value)
            except ValueError as e:
                raise SettingsError(f"unix_targets: {what}: {e}") from None


@dataclass(frozen=True)
class ProbeSettings:
    """Everything attach/detach/status need.

    ``cgroup_parent`` is the bots' parent cgroup: absolute under the cgroup2
    mount, or relative to it. ``targets`` and ``passthrough`` accept plain
    tuples ``(ip, port, listener_ip, listener_port)`` / ``(ip, port)``.

    ``unix_sockets="filter"`` (the default) denies bots every Unix socket
    address but ``unix_allow`` (absolute paths, "@name" for abstract names)
    and refuses to attach where that cannot be enforced (kernel before 6.7,
    the nftables fallback); ``"unfiltered"`` is the operator's explicit opt-out.
    ``watch_escapes`` reports bots' processes that leave the bots' cgroups;
    ``kill_escaped`` also kills them.
    """

    cgroup_parent: str = "botwarden.bots"
    targets: tuple[Target, ...] = ()
    passthrough: tuple[Passthrough, ...] = ()
    max_connections: int = 16384
    max_targets: int = 1024
    ringbuf_pages: int = 64
    pin_dir: str = DEFAULT_PIN_DIR
    mode: Mode = "auto"
    emit_redirected: bool = True
    nft_table: str = "botwarden"
    unix_sockets: UnixSockets = "filter"
    unix_allow: tuple[str, ...] = ()
    unix_targets: tuple[UnixTarget, ...] = ()
    watch_escapes: bool = True
    kill_escaped: bool = False

    def __post_init__(self) -> None:
        targets = tuple(t if isinstance(t, Target) else Target(*t) for t in self.targets)
        passthrough = tuple(p if isinstance(p, Passthrough) else Passthrough(*p) for p in self.passthrough)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "passthrough", passthrough)
        if self.mode not in ("auto", "ebpf", "nftables"):
            raise SettingsError(f"mode: {self.mode!r} is not one of auto, ebpf, nftables")
        seen: set[tuple[str, int]] = set()
        for t in targets:
            if (t.ip, t.port) in seen:
                raise SettingsError(f"targets: {t.ip} port {t.port} is registered twice")
            seen.add((t.ip, t.port))
        for p in passthrough:
            if (p.ip, p.port) in seen:
                raise SettingsError(f"passthrough: {p.ip} port {p.port} is also a target")
        if len(targets) + len(passthrough) > self.max_targets:
            raise SettingsError(f"targets: more than max_targets={self.max_targets} entries")
        for name in ("max_connections", "max_targets", "ringbuf_pages"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name}: must be positive")
        if self.ringbuf_pages & (self.ringbuf_pages - 1):
            raise SettingsError("ringbuf_pages: must be a power of two")
        pin = PurePosixPath(self.pin_dir)
        if not pin.is_absolute() or pin.parent == pin or PurePosixPath(BPFFS) not in pin.parents:
            raise SettingsError(f"pin_dir: {self.pin_dir!r} must be a directory under {BPFFS}")
        if ".." in pin.parts or len(str(pin)) > 200:
            raise SettingsError(f"pin_dir: {self.pin_dir!r} is not a clean short path")
        if not self.cgroup_parent or ".." in PurePosixPath(self.cgroup_parent).parts:
            raise SettingsError(f"cgroup_parent: {self.cgroup_parent!r} is not a clean path")
        object.__setattr__(self, "unix_allow", tuple(self.unix_allow))
        object.__setattr__(self, "unix_targets", tuple(t if isinstance(t, UnixTarget) else UnixTarget(*t)
                                                       for t in self.unix_targets))
        if self.unix_targets and self.unix_sockets != "filter":
            raise SettingsError("unix_targets: a Unix-socket target needs unix_sockets = \"filter\" "
                                "(the hooks that redirect it)")
        if len({t.path for t in self.unix_targets}) != len(self.unix_targets):
            raise SettingsError("unix_targets: a path is registered twice")
        if self.unix_sockets not in ("filter", "unfiltered"):
            raise SettingsError(f"unix_sockets: {self.unix_sockets!r} is not one of filter, unfiltered")
        for address in self.unix_allow:
            if not (address.startswith("/") or address.startswith("@")):
                raise SettingsError(f"unix_allow: {address!r} must be an absolute path or @abstract-name")
            try:
                records.unix_key(address)
            except ValueError as e:
                raise SettingsError(f"unix_allow: {e}") from None
        if len(self.unix_allow) > MAX_UNIX_ALLOW:
            raise SettingsError(f"unix_allow: more than {MAX_UNIX_ALLOW} entries")
        if self.kill_escaped and not self.watch_escapes:
            raise SettingsError("kill_escaped: needs watch_escapes")
        if not self.nft_table.replace("_", "").replace("-", "").isalnum():
            raise SettingsError(f"nft_table: {self.nft_table!r} must be alphanumeric (with - or _)")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ProbeSettings":
        data = json.loads(text)
        data["targets"] = tuple(Target(**t) for t in data.get("targets", ()))
        data["passthrough"] = tuple(Passthrough(**p) for p in data.get("passthrough", ()))
        data["unix_allow"] = tuple(data.get("unix_allow", ()))
        data["unix_targets"] = tuple(UnixTarget(**t) for t in data.get("unix_targets", ()))
        return cls(**data)
