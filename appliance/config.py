"""``botwarden.toml``: read with tomllib into validated, frozen models.

Every error names the file, the key and the line, e.g.::

    botwarden.toml:14: targets[0].protocol: must be one of 'postgres', 'ssh', 'kubernetes', not 'postgress'

The models are plain frozen dataclasses built by :mod:`appliance.schema`.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from appliance.errors import ConfigError, ConfigKeyError, dotted
from appliance.policy.config import PolicyConfig
from appliance.schema import TomlLocator, build, check

DEFAULT_STATE_DIR = "/var/lib/botwarden"
DEFAULT_CONTROL_SOCKET = "/run/botwarden/control.sock"


def _octal_mode(value: str | int) -> int:
    try:
        mode = value if isinstance(value, int) else int(value, 8)
    except ValueError:
        raise ValueError(f"must be an octal file mode such as \"0600\", not {value!r}") from None
    if mode & 0o007:
        raise ValueError(f"{value} gives other users access to the control socket; use 0600 or 0660 with a group")
    if mode & ~0o777:
        raise ValueError(f"{value} is not a file permission mode")
    return mode


UNIX_PREFIX = "unix:"


def _address(value: str) -> str:
    """``host:port``, or ``unix:/absolute/path`` for a Unix socket (a local database's socket)."""
    if value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX):]
        if not path.startswith("/") or len(path.encode()) >= 108 or "\0" in path:
            raise ValueError(f"{value!r}: a Unix socket address is unix: and an absolute path under 108 bytes")
        return value
    return _host_port(value)


def _host_port(value: str) -> str:
    host, port = split_host_port(value)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """``"10.0.0.5:5432"`` / ``"[::1]:5432"`` / ``"db.example:5432"`` → (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"must be HOST:PORT, not {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"must be HOST:PORT with a numeric port, not {value!r}") from None
    if not host:
        raise ValueError(f"must be HOST:PORT, not {value!r}")
    return host, port


def _nice(value: int) -> int:
    if not -20 <= value <= 19:
        raise ValueError(f"must be a nice value from -20 (first) to 19 (last), not {value}")
    return value


def _workers(value: int) -> int:
    if not 1 <= value <= 64:
        raise ValueError(f"must be a number of worker processes from 1 to 64, not {value}")
    return value


def _audit_threads(value: int) -> int:
    if not 1 <= value <= 1024:
        raise ValueError(f"must be a number of DuckDB threads from 1 to 1024, not {value}")
    return value


def _pace_mark(value: float) -> float:
    if not 0 < value < 0.8:
        raise ValueError(f"must be a share of queue_max above 0 and below 0.8 (where statements are refused), not {value}")
    return value


def _pace_wait(value: float) -> float:
    if not 0 < value <= 60:
        raise ValueError(f"must be a number of seconds above 0 and at most 60, not {value}")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be greater than zero, not {value}")
    return value


def _not_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be zero or more, not {value}")
    return value


@dataclass(frozen=True)
class ApplianceSettings:
    state_dir: str = DEFAULT_STATE_DIR
    control_socket: str = DEFAULT_CONTROL_SOCKET
    # Octal string; never world-accessible (checked).
    control_socket_mode: int | str = field(default=0o600, metadata=check(_octal_mode))
    control_socket_group: str | None = None
    drain_timeout: float = field(default=10.0, metadata=check(_positive))
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # CPU priority of the daemon's threads (every bot's statements wait on its event loop, so it
    # runs ahead of the bots); its audit process keeps the priority botwarden was started with.
    nice: int = field(default=-10, metadata=check(_nice))
    # Processes that run the protocol fronts (docs/architecture.md, "appliance.workers"): 1 runs
    # them in the daemon's own event loop; N > 1 starts N worker processes sharing each listener.
    workers: int = field(default=1, metadata=check(_workers))


@dataclass(frozen=True)
class AuditSettings:
    path: str = f"{DEFAULT_STATE_DIR}/audit.duckdb"
    on_full: Literal["refuse", "block"] = "refuse"
    batch_max: int = 2000
    flush_interval: float = field(default=0.2, metadata=check(_positive))
    queue_max: int = 100_000
    retention_days: int | None = None
    # false: every target records metadata only (as `record = "metadata"` on each target).
    record_sessions: bool = True
    # A session's recording stops here, with a "truncated" event (docs/recordings.md).
    recording_max_bytes: int = field(default=16 * 1024 * 1024, metadata=check(_positive))
    # PostgreSQL: a result's rows are recorded up to this many bytes; the rest are counted (a
    # "rows_not_recorded" event), so one bulk read neither fills the session's recording nor
    # slows the relay. 0: no limit per result (docs/recordings.md).
    recording_result_bytes: int = field(default=1024 * 1024, metadata=check(_not_negative))
    # "strict": a request is forwarded to its target only once the audit process has journaled
    # its record (it then survives kill -9 of the daemon, of the audit process, or of both).
    # "batched": records are shipped every 10 ms; a crash of the daemon can lose what it had not
    # shipped yet, and the next start records how much (audit_losses). See docs/audit-schema.md.
    mode: Literal["strict", "batched"] = "strict"
    # strict mode: plain reads (a SELECT the policy allows as it is, no functions, no locks) wait
    # for their record too. Off by default: it costs about half the throughput of a read-only
    # load (README); their record then follows as in batched mode.
    strict_reads: bool = False
    # strict mode: the journal is fdatasync-ed before a batch is acknowledged, so a record a
    # statement waited for survives a power loss too, not only any process's death (DuckDB syncs
    # its commits itself). Costs one fdatasync per batch the audit process receives (README).
    journal_sync: bool = False
    # strict mode: a statement whose record the audit process has not acknowledged after this many
    # seconds (the process is stalled) is not run, and its session ends (57P03).
    ack_timeout: float = field(default=10.0, metadata=check(_positive))
    # DuckDB's threads for the store's inserts and checkpoints. The audit process shares the
    # cores with the daemon, and a batch insert spread over threads costs more CPU than it saves
    # time; an operator's query, report, verify or export gets a thread per CPU while it runs.
    threads: int = field(default=1, metadata=check(_audit_threads))
    # Pacing: past pace_mark of queue_max events not yet committed, a new statement (Query,
    # Execute, FunctionCall; a stream's input) waits up to pace_wait seconds for the store to
    # catch up before it is decided, so a bot faster than the store slows down instead of being
    # refused at the high water (0.8 of queue_max). A CancelRequest ends the wait: 57014.
    pace_mark: float = field(default=0.4, metadata=check(_pace_mark))
    pace_wait: float = field(default=0.5, metadata=check(_pace_wait))
    # Every committed audit event, as one JSON line, to SIEMs ([audit.stream]; off when absent).
    stream: AuditStreamSettings | None = None

    def __post_init__(self) -> None:
        if self.journal_sync and self.mode != "strict":
            raise ValueError('audit.journal_sync applies to mode = "strict" only (batched mode keeps no journal)')


SYSLOG_FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
                     **{f"local{i}": 16 + i for i in range(8)}}


def _syslog_address(value: str) -> str:
    scheme, sep, rest = value.partition(":")
    if not sep or scheme not in ("unix", "udp", "tcp"):
        raise ValueError(f'must be "unix:/path/to/socket", "udp:HOST:PORT" or "tcp:HOST:PORT", not {value!r}')
    if scheme == "unix":
        if not rest.startswith("/"):
            raise ValueError(f"unix: needs an absolute socket path, not {rest!r}")
    else:
        _host_port(rest)
    return value


def _at_least_one(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


@dataclass(frozen=True)
class AuditStreamSettings:
    """The audit stream for SIEMs: the audit process sends each committed audit row, once, in
    chain order, as one JSON line (docs/audit-schema.md, "Audit stream") to a file it rotates
    and/or to syslog (RFC 5424)."""

    file: str | None = None
    file_max_bytes: int = field(default=100 * 1024 * 1024, metadata=check(_at_least_one))
    file_backups: int = field(default=10, metadata=check(_at_least_one))
    syslog: str | None = field(default=None, metadata=check(_syslog_address))
    syslog_facility: Literal["kern", "user", "daemon", "auth", "syslog", "authpriv", "local0", "local1", "local2",
                             "local3", "local4", "local5", "local6", "local7"] = "authpriv"
    # Longer events are shortened for syslog (the longest texts cut, "truncated": true); the file
    # keeps them whole. 8000 fits rsyslog's default maxMessageSize (8k).
    syslog_max_bytes: int = field(default=8000, metadata=check(_at_least_one))

    def __post_init__(self) -> None:
        if not self.file and not self.syslog:
            raise ValueError("[audit.stream] needs file or syslog (or remove the section)")


@dataclass(frozen=True)
class LoggingSettings:
    """``format = "json"``: one JSON object per log line on stderr (journald keeps each as one entry)."""

    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class BotTLS:
    """The appliance's own certificate, presented to bots that ask for TLS."""

    cert_file: str
    key_file: str


@dataclass(frozen=True)
class OIDCSettings:
    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: int = 30
    required_claims: tuple[str, ...] = ("sub", "exp", "iat")
    groups_claim: str = "groups"
    jwks_cache_s: int = 300
    # A token naming an unknown key id forces a JWKS refresh at most this often (key rotation
    # works without a restart; forged key ids cannot hammer the issuer).
    jwks_min_refresh_s: float = 10.0
    http_timeout_s: float = 5.0
    # What happens when a session outlives its token.
    on_expiry: Literal["end", "recheck"] = "end"
    # Where discovery and JWKS are fetched from, when it differs from the issuer (e.g. OpenBao's
    # issuer is http://addr/v1/identity/oidc and discovery lives there too). Empty = the issuer.
    discovery_url: str = ""
    ca_file: str | None = None

    def __post_init__(self) -> None:
        bad = {a for a in self.algorithms if a.lower() == "none" or a.startswith("HS")}
        if bad:
            raise ValueError(f"oidc.algorithms: {', '.join(sorted(bad))} not allowed (no 'none', no HMAC)")
        if not self.audience:
            raise ValueError("oidc.audience: at least one audience is required")


@dataclass(frozen=True)
class VaultSettings:
    address: str
    auth: Literal["approle", "token"] = "token"
    token_file: str | None = None
    role_id: str | None = None
    secret_id_file: str | None = None
    approle_mount: str = "approle"
    ca_file: str | None = None
    timeout: float = 5.0
    # Seconds a cached secret may be used when Vault cannot be reached. 0 = never (fail closed).
    max_staleness_s: int = 0

    def __post_init__(self) -> None:
        if self.auth == "token" and not self.token_file:
            raise ValueError("vault.token_file is required when vault.auth = \"token\"")
        if self.auth == "approle" and not (self.role_id and self.secret_id_file):
            raise ValueError("vault.role_id and vault.secret_id_file are required when vault.auth = \"approle\"")


@dataclass(frozen=True)
class CredentialSource:
    source: Literal["static", "kv", "database", "ssh", "kubernetes"]
    # static: a username and a file holding the password (never the password inline).
    username: str | None = None
    password_file: str | None = None
    # kv: KV v2 mount + path; the keys holding username and password.
    mount: str | None = None
    path: str | None = None
    username_key: str = "username"
    password_key: str = "password"
    # database / ssh: the secrets engine role.
    role: str | None = None
    principals: tuple[str, ...] = ()
    # kubernetes: the namespace the service-account token is issued for (OpenBao's kubernetes engine).
    kubernetes_namespace: str | None = None

    def __post_init__(self) -> None:
        need = {"static": ("username",), "kv": ("path",), "database": ("role",), "ssh": ("role",),
                "kubernetes": ("role", "kubernetes_namespace")}[self.source]
        missing = [k for k in need if not getattr(self, k)]
        if missing:
            raise ValueError(f"credential.{missing[0]} is required for source = \"{self.source}\"")


@dataclass(frozen=True)
class UpstreamTLS:
    mode: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    ca_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class TargetConfig:
    name: str
    protocol: Literal["postgres", "ssh", "kubernetes"]
    # The real address bots connect to (and botwarden connects to upstream): host:port, or
    # unix:/path for a PostgreSQL Unix socket (then listen is a unix:/path too).
    address: str = field(metadata=check(_address))
    # Where botwarden's listener for this target accepts (redirected) connections.
    listen: str = field(default="127.0.0.1:0", metadata=check(_address))
    credential: CredentialSource | None = None
    tls: UpstreamTLS = UpstreamTLS()
    # Bot side: plaintext is accepted only when this is true (e.g. loopback redirects).
    allow_plaintext: bool = False
    # How bots prove who they are: an OIDC token in the password field, kernel attestation alone, or both.
    authentication: Literal["token", "attestation", "token+attestation"] = "token"
    default_action: Literal["allow", "block", "approve"] = "allow"
    max_message_size: int = 64 * 1024 * 1024
    connect_timeout: float = 5.0
    # postgres targets: how often a long session reads the catalog's change counters again, to
    # learn views, functions and triggers made after it logged in (seconds; 0: at login only).
    catalog_recheck_s: float = field(default=2.0, metadata=check(_not_negative))
    # What the session recording keeps: the session's bytes as the bot saw them ("full") or only
    # its events (startup, sizes, truncation: "metadata"). docs/recordings.md
    record: Literal["full", "metadata"] = "full"
    # ssh targets: the upstream sshd's host keys (OpenSSH known_hosts format: key lines or an
    # @cert-authority line). Required: an unverified upstream would be a man in the middle.
    known_hosts: str | None = None
    # ssh targets: environment variables (names, globs) a bot's session may pass to the sshd
    # (SendEnv / setenv); every other one is refused and an audit row.
    env_allow: tuple[str, ...] = ("LANG", "LC_*")

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.address)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return split_host_port(self.listen)

    @property
    def unix_path(self) -> str | None:
        """The target's Unix socket path (address = "unix:/path"), None for a TCP target."""
        return self.address[len(UNIX_PREFIX):] if self.address.startswith(UNIX_PREFIX) else None

    @property
    def listen_unix_path(self) -> str | None:
        return self.listen[len(UNIX_PREFIX):] if self.listen.startswith(UNIX_PREFIX) else None


@dataclass(frozen=True)
class TokenMatch:
    """Claims a bot's token must carry to be this identity."""

    subject: str | None = None
    groups_any: tuple[str, ...] = ()
    claims: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProcessMatch:
    """Kernel-attested facts the connecting process must have."""

    cgroup: str | None = None  # bot name (child of the bots cgroup) or an absolute cgroup path
    uid: int | None = None
    uid_not: tuple[int, ...] = ()  # e.g. [0]: never a root process (root can undo the probes)
    exe: str | None = None


@dataclass(frozen=True)
class IdentityConfig:
    name: str
    groups: tuple[str, ...] = ()
    token: TokenMatch | None = None
    process: ProcessMatch | None = None
    targets: tuple[str, ...] = ()  # empty = any target
    operator_uids: tuple[int, ...] = ()  # operators mapped to this identity may not approve its requests

    def __post_init__(self) -> None:
        if self.token is None and self.process is None:
            raise ValueError(f"identity {self.name!r} needs [identities.token] and/or [identities.process]")


def _ip_ports(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        host, port = split_host_port(value)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: must be IP:PORT (an address, not a name: bots cannot resolve "
                             "names without it)") from None
        if not 0 < port < 65536:
            raise ValueError(f"{value!r}: port {port} is out of range")
    return values


def _unix_addresses(value: tuple[str, ...]) -> tuple[str, ...]:
    for address in value:
        if not (address.startswith("/") or address.startswith("@")) or "\0" in address:
            raise ValueError(f"{address!r} must be an absolute socket path or @abstract-name")
        if len(address.encode()) > 108:
            raise ValueError(f"{address!r} is longer than a Unix socket address (108 bytes)")
    return value


@dataclass(frozen=True)
class ProbeSettings:
    mode: Literal["auto", "ebpf", "nftables", "off"] = "auto"
    bots_cgroup: str = "botwarden.bots"  # relative to the cgroup2 mount, or absolute
    map_entries: int = 65536
    pin_dir: str = "/sys/fs/bpf/botwarden"
    nft_table: str = "botwarden"  # the nftables fallback's table (inet family); one per bots cgroup
    # IP:PORT bots may reach unmodified (TCP and UDP), e.g. their DNS resolver: deny by default
    # refuses everything that is neither a target nor listed here.
    passthrough: tuple[str, ...] = field(default=(), metadata=check(_ip_ports))
    # Unix sockets: "filter" denies bots every Unix socket address but unix_allow, and refuses to
    # start where the kernel cannot (before Linux 6.7, or the nftables fallback); "unfiltered" is
    # the explicit opt-out (bots then reach every local socket, a database's included).
    unix_sockets: Literal["filter", "unfiltered"] = "filter"
    # Absolute socket paths exactly as clients pass them (or "@name" for an abstract name).
    unix_allow: tuple[str, ...] = field(default=(), metadata=check(_unix_addresses))
    # Report bots' processes that leave the bots' cgroups (probe event left_cgroup); kill them too.
    watch_escapes: bool = True
    kill_escaped: bool = False


def _webhook_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Never echo the URL: a Slack webhook URL is itself a secret.
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


@dataclass(frozen=True)
class ApprovalSettings:
    timeout_s: int = field(default=300, metadata=check(_positive))
    approvers_required: int = field(default=1, metadata=check(_at_least_one))
    webhook_url: str | None = field(default=None, metadata=check(_webhook_url))


@dataclass(frozen=True)
class LimitSettings:
    """What a connection may cost the daemon before it proves anything (docs: botwarden.example.toml)."""

    # Connections that have not presented their credentials yet, per peer uid and in all (the
    # total counts connections the probes did not redirect: a flood cannot lock bots out).
    unauthenticated_per_uid: int = field(default=64, metadata=check(_at_least_one))
    unauthenticated_total: int = field(default=1024, metadata=check(_at_least_one))
    unauthenticated_timeout_s: float = field(default=10.0, metadata=check(_positive))
    # Used instead once either cap is more than half used, for connections already waiting too.
    unauthenticated_timeout_under_pressure_s: float = field(default=2.0, metadata=check(_positive))
    # After login, a message the client started must be complete within this many seconds.
    message_timeout_s: float = field(default=60.0, metadata=check(_positive))


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics: always at GET /metrics on the control socket; also on this TCP
    address when set (off by default; the names of targets, identities and rules are in it)."""

    listen: str | None = field(default=None, metadata=check(_host_port))


def _bastion_name(value: str) -> str:
    if not value or len(value) > 64 or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError("must be 1-64 letters, digits, '-', '_' or '.' (it names this bastion in the lake)")
    return value


def _catalog_dsn(value: str) -> str:
    # Never echo the value: it may hold the catalog's password.
    if "=" not in value:
        raise ValueError("must be a libpq connection string such as \"dbname=lake host=10.0.0.9 user=botwarden\"")
    return value


@dataclass(frozen=True)
class FleetSettings:
    """The fleet lake (docs/fleet.md): where this bastion ships its audit, under which name."""

    catalog: str = field(metadata=check(_catalog_dsn))   # libpq string of DuckLake's PostgreSQL catalog
    data_path: str                                        # shared directory for the lake's Parquet files
    bastion: str = field(metadata=check(_bastion_name))  # unique across the fleet
    batch_rows: int = field(default=10_000, metadata=check(_at_least_one))
    interval: float = field(default=1.0, metadata=check(_positive))
    # Held requests published to a PostgreSQL table every bastion reaches (appliance/fleet_approvals.py):
    # operators on any bastion see and decide them. approvals_dsn defaults to the catalog's server.
    approvals: bool = False
    approvals_dsn: str | None = field(default=None, metadata=check(_catalog_dsn))

    def lake(self):
        from analytics.fleet import LakeSettings

        return LakeSettings(catalog=self.catalog, data_path=self.data_path, bastion=self.bastion,
                            batch_rows=self.batch_rows, interval=self.interval)


@dataclass(frozen=True)
class Config:
    appliance: ApplianceSettings = ApplianceSettings()
    audit: AuditSettings = AuditSettings()
    tls: BotTLS | None = None
    oidc: OIDCSettings | None = None
    vault: VaultSettings | None = None
    probes: ProbeSettings = ProbeSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    limits: LimitSettings = LimitSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    fleet: FleetSettings | None = None
    targets: tuple[TargetConfig, ...] = ()
    identities: tuple[IdentityConfig, ...] = ()
    policy: PolicyConfig = PolicyConfig()
    source: str = field(default="<memory>", compare=False)

    def target(self, name: str) -> TargetConfig:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    def identity(self, name: str) -> IdentityConfig:
        for i in self.identities:
            if i.name == name:
                return i
        raise KeyError(name)


def _check_unix_target(t: TargetConfig, i: int) -> None:
    """A Unix-socket target: PostgreSQL only, a Unix listener, no TLS to its socket."""
    if t.unix_path is None:
        raise ConfigKeyError(("targets", i, "listen"), "a unix: listener is for a unix: target address")
    if t.listen_unix_path is None:
        raise ConfigKeyError(("targets", i, "listen"), "a Unix-socket target needs listen = \"unix:/path\" "
                                                         "(the inspector's own socket, e.g. /run/botwarden/NAME.sock)")
    if t.protocol != "postgres":
        raise ConfigKeyError(("targets", i, "address"), "only postgres targets can be Unix sockets")
    if t.listen_unix_path == t.unix_path:
        raise ConfigKeyError(("targets", i, "listen"), "listen must not be the target's own socket")
    if t.tls.mode in ("require", "verify-full"):
        raise ConfigKeyError(("targets", i, "tls", "mode"),
                             "PostgreSQL does not speak TLS on its Unix socket: use \"disable\" or \"prefer\"")


def _cross_check(cfg: Config) -> None:
    """Checks that span sections; raise ConfigKeyError with the offending path."""
    seen: dict[str, int] = {}
    for i, t in enumerate(cfg.targets):
        if t.name in seen:
            raise ConfigKeyError(("targets", i, "name"), f"duplicate target name {t.name!r}")
        seen[t.name] = i
        if cfg.appliance.workers > 1 and t.protocol != "postgres":
            raise ConfigKeyError(("appliance", "workers"),
                                 f"workers > 1 serves PostgreSQL targets only; target {t.name!r} is {t.protocol} "
                                 "(use workers = 1)")
        if t.credential and t.credential.source in ("kv", "database", "ssh", "kubernetes") and cfg.vault is None:
            raise ConfigKeyError(("targets", i, "credential", "source"),
                                 f"source = \"{t.credential.source}\" needs a [vault] section")
        if t.authentication != "attestation" and cfg.oidc is None:
            raise ConfigKeyError(("targets", i, "authentication"),
                                 f"authentication = \"{t.authentication}\" needs an [oidc] section")

        if t.credential and t.credential.source == "ssh" and t.protocol != "ssh":
            raise ConfigKeyError(("targets", i, "credential", "source"), "source = \"ssh\" is for ssh targets")
        if t.credential and t.credential.source == "kubernetes" and t.protocol != "kubernetes":
            raise ConfigKeyError(("targets", i, "credential", "source"),
                                 "source = \"kubernetes\" is for kubernetes targets")
        if t.unix_path is not None or t.listen_unix_path is not None:
            _check_unix_target(t, i)
            continue
        host, _ = t.listen_host_port
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigKeyError(("targets", i, "listen"), f"listen must be an IP address, not {host!r}") from None
    names = set(seen)
    idents: set[str] = set()
    for i, ident in enumerate(cfg.identities):
        if ident.name in idents:
            raise ConfigKeyError(("identities", i, "name"), f"duplicate identity name {ident.name!r}")
        idents.add(ident.name)
        for j, tname in enumerate(ident.targets):
            if tname not in names:
                raise ConfigKeyError(("identities", i, "targets", j), f"unknown target {tname!r}")
    cfg.policy.cross_check(target_names=names, identity_names=idents,
                           group_names={g for ident in cfg.identities for g in ident.groups})


def parse_config(text: str, source: str = "<memory>") -> Config:
    """Parse and validate TOML text. Raises ConfigError naming source, line and key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    locator = TomlLocator(text)
    try:
        raw_policy = {k: raw.pop(k) for k in ("rules", "masking") if k in raw}
        policy = build(PolicyConfig, raw_policy, ())
        cfg = build(Config, raw, ())
        cfg = Config(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "policy": policy, "source": source})
        _cross_check(cfg)
    except ConfigKeyError as e:
        line = locator.line_of(e.path)
        where = f"{source}:{line}" if line else source
        raise ConfigError(f"{where}: {dotted(e.path)}: {e.message}") from None
    return cfg


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    return parse_config(text, str(path))
