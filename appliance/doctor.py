"""`botwarden doctor`: everything a failing install needs checked, one line each.

Each :class:`Check` is ``ok``, ``warn`` (works, but worth knowing), ``fail`` (botwarden cannot
work like this) or ``skip`` (not configured), and a failed one says what to do. The exit status
is 1 when any check failed. ``--json`` prints the same as one JSON document for scripts.

What is checked, in order: the host (root, kernel BTF, cgroup2, bpffs, bpf(2) permission, nft,
bcc and the kernel headers it compiles against); the config; Vault/OpenBao (reachable, unsealed,
botwarden's AppRole or token logs in, and may use each target's credential path, asked through
sys/capabilities-self so nothing is issued); each target (TCP, then the protocol's greeting:
PostgreSQL answers an SSLRequest with 'S' or 'N', SSH sends its banner); the OIDC issuer
(discovery, JWKS with at least one key); the daemon and its CPU priority (with scheduler
autogroups, its session's too); the audit store (through the control API
while the daemon runs, else opened read-only: the whole chain up to its head verified; free
disk; a copy of the chain kept off the host: the audit stream or the fleet); the control socket
(a socket, owned by root, the configured mode and group, never other-accessible); the probes
(attached to the bots' cgroup, owned by the live daemon).

Nothing here prints a secret: Vault errors and file errors are the broker's own messages.
"""

from __future__ import annotations

import argparse
import grp
import importlib
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from appliance.config import Config, TargetConfig, load_config
from appliance.errors import BotwardenError, ConfigError

Status = Literal["ok", "warn", "fail", "skip"]

# Below this much free space on the audit store's file system the writer is close to failing,
# and then botwarden refuses every statement (nothing runs unaudited).
MIN_FREE_BYTES = 1 << 30


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"[{self.status.upper() if self.status != 'ok' else 'ok':>4}] {self.name}: {self.detail}"
        return text + (f"\n       → {self.fix}" if self.fix else "")


class _Failed(BotwardenError):
    """A check's own verdict: ``fix`` says what to do."""

    def __init__(self, detail: str, fix: str = "", status: Status = "fail"):
        super().__init__(detail)
        self.detail, self.fix, self.status = detail, fix, status


class Doctor:
    def __init__(self, config_path: str, socket_path: str | None = None, timeout: float = 5.0):
        self.config_path = config_path
        self.socket_path = socket_path
        self.timeout = timeout
        self.checks: list[Check] = []
        self.cfg: Config | None = None
        self.daemon_pid: int | None = None

    def check(self, name: str, fn: Callable[[], str]) -> bool:
        """Run one check: ``fn`` returns the OK detail or raises _Failed. A check that breaks in
        an unforeseen way is a failed check that names the exception."""
        try:
            detail = fn()
            result = Check(name, "ok", detail)
        except _Failed as e:
            result = Check(name, e.status, e.detail, e.fix)
        except Exception as e:  # noqa: BLE001 - the doctor reports, it never crashes
            result = Check(name, "fail", f"{type(e).__name__}: {e}", "this check itself failed; run with -v")
        self.checks.append(result)
        return result.status in ("ok", "warn", "skip")

    def skip(self, name: str, why: str) -> None:
        self.checks.append(Check(name, "skip", why))

    def run(self) -> list[Check]:
        self.host()
        if not self.check("config", self.config):
            return self.checks
        cfg = self.cfg
        assert cfg is not None
        self.vault(cfg)
        for target in cfg.targets:
            self.check(f"target {target.name} reachable", lambda t=target: self.target(t))
        if cfg.oidc is None:
            self.skip("OIDC issuer", "no [oidc] section: bots are identified by kernel attestation only")
        else:
            self.check("OIDC issuer", lambda: self.oidc(cfg))
        from appliance.daemon import StateLock

        self.daemon_pid = StateLock.holder(cfg.appliance.state_dir)
        self.check("daemon", lambda: self.daemon(cfg))
        if self.daemon_pid is None:
            self.skip("daemon CPU priority", "the daemon is not running")
        else:
            self.check("daemon CPU priority", lambda: self.priority(cfg, self.daemon_pid))
        self.check("audit store", lambda: self.audit(cfg))
        self.check("audit disk space", lambda: self.disk(cfg))
        self.check("audit chain off the host", lambda: self.off_host(cfg))
        self.check("control socket", lambda: self.control_socket(cfg))
        if cfg.probes.mode == "off":
            self.skip("probes", 'probes.mode = "off": bots\' connections are not redirected')
        else:
            self.check("probes", lambda: self.probes(cfg))
        return self.checks

    # -- the host ------------------------------------------------------------------------

    def host(self) -> None:
        def root() -> str:
            if os.geteuid() != 0:
                raise _Failed(f"running as uid {os.geteuid()}", "run `sudo botwarden doctor`: eBPF, cgroups, "
                                                                "nftables and the control socket need root")
            return "uid 0"

        def btf() -> str:
            if not Path("/sys/kernel/btf/vmlinux").exists():
                raise _Failed("/sys/kernel/btf/vmlinux is missing", "use a kernel built with CONFIG_DEBUG_INFO_BTF "
                                                                    "(Debian 12's is)")
            return "/sys/kernel/btf/vmlinux"

        def cgroup2() -> str:
            mount = _mount_of("cgroup2")
            if mount is None:
                raise _Failed("no cgroup2 file system mounted", "mount -t cgroup2 none /sys/fs/cgroup "
                                                                "(vagrant/provision.sh install does it)")
            return mount

        def bpffs() -> str:
            mount = _mount_of("bpf")
            if mount is None:
                raise _Failed("bpffs is not mounted", "mount -t bpf bpf /sys/fs/bpf")
            return mount

        def bpf_permission() -> str:
            from probes.bpfsys import can_create_map

            why = can_create_map()
            if why is not None:
                raise _Failed(why, "run as root (or with CAP_BPF and CAP_PERFMON); check "
                                   "kernel.unprivileged_bpf_disabled and any seccomp filter")
            return "bpf(2) may create maps"

        def nft() -> str:
            from probes import nft as nft_module

            why = nft_module.available()
            if why is not None:
                raise _Failed(why, "apt-get install nftables (the fallback when eBPF is not available)", "warn")
            res = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=self.timeout)
            if res.returncode != 0:
                raise _Failed(f"nft list tables: {res.stderr.strip()}", "check CAP_NET_ADMIN and nf_tables", "warn")
            return shutil.which("nft") or "nft"

        def bcc() -> str:
            try:
                mod = importlib.import_module("bcc")
            except ImportError as e:
                raise _Failed(f"bcc cannot be imported ({e})", "apt-get install python3-bpfcc and link it into "
                                                               "the venv (vagrant/provision.sh install)") from None
            return str(Path(mod.__file__).parent)

        def headers() -> str:
            release = platform.release()
            build = Path(f"/lib/modules/{release}/build")
            if not (build / "include").exists() and not (build / "Makefile").exists():
                raise _Failed(f"{build} has no kernel headers",
                              "apt-get install linux-headers-amd64 and link them there "
                              "(vagrant/provision.sh install does it)")
            return str(build.resolve())

        self.check("running as root", root)
        self.check("kernel BTF", btf)
        self.check("cgroup v2", cgroup2)
        self.check("bpffs", bpffs)
        self.check("BPF permission", bpf_permission)
        self.check("nft (fallback path)", nft)
        self.check("bcc", bcc)
        self.check("kernel headers for bcc", headers)

    # -- the config and what it points at ------------------------------------------------

    def config(self) -> str:
        try:
            self.cfg = load_config(self.config_path)
        except ConfigError as e:
            raise _Failed(str(e), "fix that key (`botwarden config check` says the same); "
                                  "the checks that need the config were not run") from None
        cfg = self.cfg
        return (f"{self.config_path}: {len(cfg.targets)} targets, {len(cfg.identities)} identities, "
                f"{len(cfg.policy.rules)} rules")

    def vault(self, cfg: Config) -> None:
        vault_targets = [t for t in cfg.targets if t.credential and t.credential.source != "static"]
        for t in cfg.targets:
            if t.credential is not None and t.credential.source == "static" and t.credential.password_file:
                self.check(f"target {t.name} password file", lambda t=t: _readable(t.credential.password_file))
        if cfg.vault is None:
            self.skip("Vault", "no [vault] section: only static credentials")
            return
        from appliance.secrets import SecretsBroker, SecretUnavailable

        broker = SecretsBroker(cfg.vault)

        def reachable() -> str:
            return self.vault_reachable(cfg)

        def login() -> str:
            try:
                broker.check_login()
            except SecretUnavailable as e:
                if e.kind == "file":
                    fix = "check the file exists, is readable by root and not empty"
                elif cfg.vault.auth == "approle":
                    fix = ("vault.role_id or the secret id is wrong or expired: write a new secret id "
                           "(bao write -f auth/approle/role/ROLE/secret-id) into vault.secret_id_file")
                else:
                    fix = "the token in vault.token_file is wrong or expired: write a valid one there"
                raise _Failed(e.message, fix) from None
            return f"{cfg.vault.auth} login as botwarden (token ttl {broker.token_ttl or 'none'}s)"

        if not self.check("Vault reachable", reachable) or not self.check("Vault login", login):
            for t in vault_targets:
                self.skip(f"target {t.name} credential", "Vault is not usable (above)")
            return

        def access(target: TargetConfig) -> str:
            try:
                path = broker.check_access(target)
            except SecretUnavailable as e:
                raise _Failed(e.message, "grant it in botwarden's Vault policy, e.g. "
                                         'path "MOUNT/creds/ROLE" { capabilities = ["read"] }') from None
            return f"may use {path}"

        for t in vault_targets:
            self.check(f"target {t.name} credential", lambda t=t: access(t))
        broker.check_logout()

    def vault_reachable(self, cfg: Config) -> str:
        import requests

        assert cfg.vault is not None
        url = cfg.vault.address.rstrip("/") + "/v1/sys/health?standbyok=true&perfstandbyok=true"
        try:
            resp = requests.get(url, timeout=self.timeout, verify=cfg.vault.ca_file or True)
        except requests.RequestException as e:
            raise _Failed(f"{cfg.vault.address} is unreachable ({type(e).__name__})",
                          "start Vault/OpenBao, or fix vault.address (and vault.ca_file for TLS)") from None
        if resp.status_code == 503:
            raise _Failed(f"{cfg.vault.address} is sealed", "unseal it (bao operator unseal)")
        if resp.status_code == 501:
            raise _Failed(f"{cfg.vault.address} is not initialised", "bao operator init, then unseal")
        if resp.status_code not in (200, 429, 472, 473):
            raise _Failed(f"{cfg.vault.address} answered HTTP {resp.status_code} to sys/health",
                          "check vault.address points at Vault/OpenBao")
        return f"{cfg.vault.address} unsealed"

    def live(self, cfg: Config, vault_token: Callable[[], str] | None) -> list[Check]:
        """The checks a running daemon's status view repeats (GET /v1/health): each target's
        greeting, Vault reachable and the daemon's own token (``vault_token`` says its TTL), the
        OIDC issuer. Nothing here logs in or issues anything."""
        for target in cfg.targets:
            self.check(f"target {target.name} reachable", lambda t=target: self.target(t))
        if cfg.vault is None:
            self.skip("Vault", "no [vault] section: only static credentials")
        elif self.check("Vault reachable", lambda: self.vault_reachable(cfg)) and vault_token is not None:
            self.check("Vault token", vault_token)
        if cfg.oidc is None:
            self.skip("OIDC issuer", "no [oidc] section: bots are identified by kernel attestation only")
        else:
            self.check("OIDC issuer", lambda: self.oidc(cfg))
        return self.checks

    def target(self, target: TargetConfig) -> str:
        timeout = min(self.timeout, target.connect_timeout)
        try:
            if target.unix_path is not None:  # a local database's socket
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(timeout)
                try:
                    sock.connect(target.unix_path)
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(target.host_port, timeout=timeout)
        except OSError as e:
            raise _Failed(f"{'Unix socket' if target.unix_path else 'TCP'} {target.address}: {e.strerror or e}",
                          f"start the {target.protocol} server or fix targets.address") from None
        with sock:
            sock.settimeout(timeout)
            try:
                if target.protocol == "postgres":
                    return self._postgres_greeting(sock, target)
                if target.protocol == "ssh":
                    banner = sock.recv(256).split(b"\r\n")[0]
                    if not banner.startswith(b"SSH-"):
                        raise _Failed(f"{target.address} does not greet as SSH ({banner[:40]!r})",
                                      "targets.address must be the SSH server's port")
                    return f"{target.address}: {banner.decode(errors='replace')}"
            except OSError as e:
                raise _Failed(f"{target.address} accepted TCP but then: {e}",
                              f"check it is a {target.protocol} server") from None
        return f"TCP {target.address}"

    def _postgres_greeting(self, sock: socket.socket, target: TargetConfig) -> str:
        from appliance.protocols.postgres.messages import SSLRequest

        sock.sendall(SSLRequest().encode())
        answer = sock.recv(1)
        if answer not in (b"S", b"N"):
            raise _Failed(f"{target.address} answered an SSLRequest with {answer!r}, not 'S' or 'N'",
                          "targets.address must be a PostgreSQL server's port")
        if answer == b"N" and target.tls.mode in ("require", "verify-full"):
            raise _Failed(f"{target.address} does not offer TLS but targets.tls.mode = {target.tls.mode!r}",
                          "turn on ssl in the server's postgresql.conf or lower targets.tls.mode")
        return f"{target.address}: PostgreSQL answers SSLRequest with {answer.decode()!r}" + (
            " (TLS offered)" if answer == b"S" else " (no TLS)")

    def oidc(self, cfg: Config) -> str:
        from appliance.identity import IdentityRefused, OIDCValidator

        assert cfg.oidc is not None
        validator = OIDCValidator(cfg.oidc)
        try:
            validator.refresh()
        except IdentityRefused as e:
            raise _Failed(e.message, "check oidc.issuer (and oidc.discovery_url, oidc.ca_file): "
                                     f"{validator.discovery_url} must answer") from None
        if validator.key_count == 0:
            raise _Failed(f"the JWKS of {cfg.oidc.issuer} has no usable key", "create a signing key at the issuer")
        return f"{validator.discovery_url}: discovery and JWKS ({validator.key_count} keys)"

    # -- the appliance itself ------------------------------------------------------------

    def _socket(self, cfg: Config) -> str:
        return self.socket_path or cfg.appliance.control_socket

    def _client(self, cfg: Config, timeout: float = 30.0):
        from appliance.control import ControlClient

        return ControlClient(self._socket(cfg), timeout=timeout)

    def daemon(self, cfg: Config) -> str:
        from appliance.control import ControlError

        if self.daemon_pid is None:
            raise _Failed(f"not running (no lock held on {cfg.appliance.state_dir})",
                          "start it: systemctl start botwarden (or botwarden run)", "warn")
        try:
            st = self._client(cfg, self.timeout).get("/v1/status")
        except ControlError as e:
            raise _Failed(f"pid {self.daemon_pid} holds the lock but its control API does not answer: {e.message}",
                          "see its log (journalctl -u botwarden); restart it") from None
        if st.get("last_reload_error"):
            raise _Failed(f"pid {st['pid']} runs, but its last reload was refused: {st['last_reload_error']}",
                          "fix the config and `botwarden config reload`", "warn")
        return f"pid {st['pid']} since {st['started_at']}, {len(st['targets'])} listeners"

    @staticmethod
    def priority(cfg: Config, pid: int) -> str:
        """The daemon's CPU priority as the scheduler applies it: its nice value and, with
        scheduler autogroups, its session's, which is what counts against bots and databases in
        other sessions (docs/architecture.md, CPU priority)."""
        from appliance.daemon import autogroup_nice, autogroups_enabled

        want = cfg.appliance.nice
        try:
            nice = os.getpriority(os.PRIO_PROCESS, pid)
            group_nice = autogroup_nice(Path(f"/proc/{pid}/autogroup")) if autogroups_enabled() else None
        except OSError as e:
            raise _Failed(f"pid {pid} cannot be read ({e.strerror})", "run `botwarden doctor` again", "warn") from None
        if nice != want:
            raise _Failed(f"pid {pid} runs at nice {nice}; appliance.nice is {want}",
                          "restart it to apply appliance.nice (without CAP_SYS_NICE it cannot raise its "
                          "priority: its log says so)", "warn")
        if group_nice is None:
            return f"nice {nice} (no scheduler autogroup of its own: it counts against every task)"
        if group_nice != want:
            raise _Failed(f"nice {nice} counts within its session only: the session's scheduler autogroup is at "
                          f"nice {group_nice}, so bots and database backends (sessions of their own) share the "
                          "CPU with it as equals",
                          "run it as the systemd service (or `setsid botwarden run`): leading its session, it "
                          "gives the session's autogroup appliance.nice", "warn")
        return f"nice {nice}, and its session's scheduler autogroup nice {group_nice}"

    def audit(self, cfg: Config) -> str:
        import analytics

        if self.daemon_pid is not None:
            from appliance.control import ControlError

            client = self._client(cfg, 600)
            try:
                st = client.get("/v1/status")
                doc = client.post("/v1/audit/verify")
            except ControlError as e:
                raise _Failed(f"the daemon could not verify it: {e.message}",
                              "see the daemon's log (journalctl -u botwarden)") from None
            if not st["audit"]["healthy"]:
                raise _Failed(f"{cfg.audit.path}: the daemon reports its audit store NOT healthy (statements "
                              "are refused)", "see the daemon's log: disk full? the audit process dying?")
            head = doc["report"].splitlines()[0]
            if not doc["ok"]:
                raise _Failed(f"{cfg.audit.path}: {doc['report']}", "the chain is broken: keep the file as "
                                                                    "evidence, see docs/audit-schema.md")
            return f"{cfg.audit.path} (via the daemon): {head}"
        path = Path(cfg.audit.path)
        if not path.exists():
            raise _Failed(f"{path} does not exist yet", "the daemon creates it at its first start", "warn")
        try:
            report = analytics.verify(path)
        except analytics.AuditError as e:
            raise _Failed(f"{path}: {e}", "is another process holding it open for writing?") from None
        head = report.text().splitlines()[0]
        if not report.ok:
            raise _Failed(f"{path}: {report.text()}", "the chain is broken: keep the file as evidence, "
                                                      "see docs/audit-schema.md")
        return f"{path} (read-only, daemon down): {head}"

    def off_host(self, cfg: Config) -> str:
        """Promise 5 (docs/threat-model.md): the chain is keyless, so only a copy of its hashes kept
        elsewhere catches a rewrite with recomputed hashes (`audit verify --anchors`)."""
        how = []
        stream = cfg.audit.stream
        if stream is not None and stream.syslog:
            how.append(f"the audit stream sends every row's hash to syslog {stream.syslog} as it is committed")
        elif stream is not None and stream.file:
            how.append(f"the audit stream writes every row's hash to {stream.file} (ship it off the host)")
        if cfg.fleet is not None:
            how.append("[fleet] ships the chain to the fleet lake (check with `audit verify --anchors-from-fleet`)")
        if not how:
            raise _Failed("nothing copies the audit chain off the host: someone with root could rewrite the file "
                          "and recompute its hashes unnoticed",
                          "configure [audit.stream] (syslog to a SIEM) or [fleet], or export the head `audit verify` "
                          "prints; check with `audit verify --anchors <the copy>` (docs/threat-model.md, promise 5)",
                          "warn")
        return "; ".join(how) + "; check with `audit verify --anchors <the copy>`"

    def disk(self, cfg: Config) -> str:
        where = Path(cfg.audit.path).parent
        while not where.exists() and where != where.parent:
            where = where.parent
        usage = shutil.disk_usage(where)
        text = f"{usage.free / (1 << 30):.1f} GiB free of {usage.total / (1 << 30):.1f} GiB on {where}"
        if usage.free < MIN_FREE_BYTES:
            raise _Failed(text, "free space there, or lower audit.retention_days: a full disk stops every statement")
        return text

    def control_socket(self, cfg: Config) -> str:
        path = Path(self._socket(cfg))
        if not (path.exists() or path.is_symlink()):
            if self.daemon_pid is None:
                raise _Failed(f"{path}: absent (the daemon is not running)", "", "skip")
            raise _Failed(f"{path}: absent although the daemon (pid {self.daemon_pid}) runs",
                          "restart the daemon; check nothing removes its run directory")
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        problems = []
        if not stat.S_ISSOCK(st.st_mode):
            problems.append("is not a socket")
        if st.st_uid != 0:
            problems.append(f"is owned by uid {st.st_uid}, not root")
        if mode & 0o007:
            problems.append(f"mode {mode:04o} lets every local user approve requests and read the audit")
        elif mode != cfg.appliance.control_socket_mode:
            problems.append(f"mode {mode:04o}, the config says {cfg.appliance.control_socket_mode:04o}")
        group = cfg.appliance.control_socket_group
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                gid = None
                problems.append(f"appliance.control_socket_group {group!r} does not exist")
            if gid is not None and st.st_gid != gid:
                problems.append(f"group gid {st.st_gid}, the config says {group!r} ({gid})")
        if problems:
            raise _Failed(f"{path} " + "; ".join(problems),
                          f"restart the daemon (it creates the socket {cfg.appliance.control_socket_mode:04o}"
                          f"{' group ' + group if group else ''}); find who changed it")
        return f"{path}: socket, root, mode {mode:04o}" + (f", group {group}" if group else "")

    def probes(self, cfg: Config) -> str:
        import probes as probes_module

        from appliance.bots import probe_settings

        st = probes_module.status(probe_settings(cfg, with_targets=False))
        if self.daemon_pid is None:
            if st.path == "none":
                raise _Failed("nothing attached (the daemon attaches them at start)", "", "warn")
            return f"{st.reason} (daemon down: bots are refused, fail closed)"
        if st.path == "none":
            raise _Failed(f"nothing attached to {st.cgroup_path} although the daemon runs: bots reach targets "
                          "unwatched if they are outside the bots' cgroup, or are not redirected",
                          "botwarden probes attach")
        if not st.owner_alive:
            raise _Failed(st.reason, "restart the daemon or `botwarden probes attach`")
        if st.owner_pid != self.daemon_pid:
            raise _Failed(f"{st.reason}; owned by pid {st.owner_pid}, the daemon is pid {self.daemon_pid}",
                          "botwarden probes attach (the daemon takes them over)")
        return st.reason


def _mount_of(fstype: str) -> str | None:
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] == fstype:
                return parts[1]
    except OSError:
        return None
    return None


def _readable(path: str | None) -> str:
    try:
        value = Path(path or "").read_text().strip()
    except OSError as e:
        raise _Failed(f"cannot read {path}: {e.strerror}", "create it (mode 0600, owned by root)") from None
    if not value:
        raise _Failed(f"{path} is empty", "write the password into it")
    return f"{path} readable"


def run_checks(config_path: str, socket_path: str | None = None) -> list[Check]:
    return Doctor(config_path, socket_path).run()


def run_doctor(args: argparse.Namespace) -> int:
    results = run_checks(args.config, getattr(args, "socket", None))
    failed = [c for c in results if c.status == "fail"]
    if getattr(args, "json", False):
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in results]}, indent=2))
    else:
        for c in results:
            print(c.line())
        counted = [c for c in results if c.status != "skip"]
        print(f"{len(counted) - len(failed)} of {len(counted)} checks passed"
              + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


# What a check raises to fail (or warn) with a fix; public for the daemon's live checks (appliance.health).
CheckFailed = _Failed

__all__ = ["Check", "CheckFailed", "Doctor", "run_checks", "run_doctor"]
