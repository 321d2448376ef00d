"""A real botwarden daemon (subprocess) wired to a real OpenBao and a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from appliance.control import ControlClient, ControlError
from appliance.sandbox import OpenBaoSetup, PostgresServer, config_header, configure_openbao, free_port

ROOT = Path(__file__).resolve().parents[1]
PSQL = "/usr/lib/postgresql/15/bin/psql"


def python_words(code: str, **env: str) -> list[str]:
    """The words ``code`` prints, run by this Python in the repository with ``env`` added (how a
    fresh process sees an environment variable such as BOTWARDEN_PURE_PYTHON)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, check=True).stdout.split()

RULES = """
[[rules]]
name = "no-secrets-table"
action = "block"
[rules.sql]
relations = ["vault_secrets"]

[[rules]]
name = "no-drops"
action = "block"
description = "Nobody drops tables through botwarden"
[rules.sql]
properties = ["drop", "truncate"]

[[rules]]
name = "mass-delete-needs-approval"
action = "approve"
[rules.sql]
kinds = ["DELETE", "UPDATE"]
properties = ["no_where"]

[[rules]]
name = "mask-pii"
action = "mask"
[rules.sql]
relations = ["customers"]
[[rules.mask]]
columns = ["email"]
strategy = "full"
[[rules.mask]]
columns = ["card"]
strategy = "partial"
keep = 4
"""


def write_config(path: Path, *, workdir: Path, pg: PostgresServer, bao: OpenBaoSetup, listen_port: int,
                 extra: str = "", rules: str = RULES, probes_mode: str = "off", socket_path: Path | None = None,
                 socket_group: str | None = None, target_address: str | None = None,
                 authentication: str = "token") -> Path:
    group = f'control_socket_group = "{socket_group}"\ncontrol_socket_mode = "0660"\n' if socket_group else ""
    header = config_header(workdir, bao, socket_path=socket_path, probes=f'mode = "{probes_mode}"',
                           appliance_extra=group)
    path.write_text(header + f"""
[[targets]]
name = "orders"
protocol = "postgres"
address = "{target_address or f'{pg.host}:{pg.port}'}"
listen = "127.0.0.1:{listen_port}"
allow_plaintext = true
authentication = "{authentication}"
[targets.tls]
mode = "require"
[targets.credential]
source = "database"
mount = "{bao.db_mount}"
role = "{bao.db_role}"

[[identities]]
name = "orders-bot"
groups = ["bots"]
[identities.token]
subject = "{bao.bot_entity_id()}"
{extra}
{rules}
""")
    return path


@dataclass
class DaemonProcess:
    config: Path
    socket: Path
    log: Path = field(default_factory=lambda: Path(tempfile.mktemp(prefix="bw-daemon-", suffix=".log")))
    proc: subprocess.Popen | None = None
    prefix: list[str] = field(default_factory=list)  # e.g. setpriv with the systemd unit's restrictions

    def start(self, wait: bool = True) -> "DaemonProcess":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "appliance.cli", "--config", str(self.config),
                                      "run"],
                                     cwd=ROOT, stdout=self._logf, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.output()}")
            try:
                ControlClient(str(self.socket), timeout=2).get("/v1/status")
                return
            except ControlError:
                time.sleep(0.1)
        raise TimeoutError(f"daemon not ready after {timeout}s:\n{self.output()}")

    def client(self) -> ControlClient:
        return ControlClient(str(self.socket), timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def audit_sql(self, sql: str, params: list | None = None) -> list[dict]:
        self.client().post("/v1/audit/flush")
        doc = self.client().post("/v1/audit/sql", {"sql": sql, "params": params})
        return [dict(zip(doc["columns"], row)) for row in doc["rows"]]


def psql(port: int, token: str, *sql: str, user: str = "orders-bot", db: str = "postgres",
         extra_env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    args = [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", db]
    for s in sql:
        args += ["-c", s]
    env = {**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10", **(extra_env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def fresh_setup(bao, pg, workdir: Path) -> OpenBaoSetup:
    return configure_openbao(bao, pg, workdir, tag=f"t{uuid.uuid4().hex[:6]}")


def seed_orders(pg: PostgresServer) -> None:
    pg.psql("""
        DROP TABLE IF EXISTS customers, orders;
        CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card text);
        INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com', '4111111111111111'),
                                     (2, 'Bob', 'bob@example.org', '5500005555555559');
        CREATE TABLE orders (id int PRIMARY KEY, customer int, total numeric);
        INSERT INTO orders SELECT g, 1 + g % 2, g * 10 FROM generate_series(1, 20) g;
    """)


def new_port() -> int:
    return free_port()
