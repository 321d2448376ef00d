"""`botwarden demo`: the whole appliance on one host, with real components only.

1. a real PostgreSQL 15 target on 127.0.0.10 (a loopback address bots think is "the database");
2. a real OpenBao dev server: database secrets engine (a user per session), an AppRole for the
   appliance, OIDC identity tokens for the bot;
3. a botwarden.toml written for them, and the daemon (`botwarden run`) with the eBPF probes
   attached to a demo bots cgroup;
4. a demo bot started with `botwarden bot run` inside its watched cgroup: plain `psql` to the
   real target address with its OIDC token as the password. It runs an allowed, a masked, a
   blocked and an approval-needing statement; the demo approves the held one as an operator
   would, through the control API. The bot also tries to reach another port directly and is
   refused by the kernel (deny by default);
5. then it prints what the audit store recorded and where to look.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from appliance.control import ControlClient, ControlError
from appliance.sandbox import PG_BIN, OpenBaoServer, PostgresServer, config_header, configure_openbao, free_port

TARGET_HOST = "127.0.0.10"
BOTS_CGROUP = "botwarden-demo.bots"
PIN_DIR = "/sys/fs/bpf/botwarden-demo"
BOT = "demo-bot"
BOT_USER = "nobody"  # the demo bot's unprivileged user

SEED_SQL = """
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card text);
INSERT INTO customers VALUES
  (1, 'Ada Lovelace', 'ada@example.com', '4111 1111 1111 1111'),
  (2, 'Alan Turing', 'alan@example.org', '5500 0055 5555 5559'),
  (3, 'Grace Hopper', 'grace@example.net', '3782 822463 10005');
CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers, total numeric, status text);
INSERT INTO orders SELECT g, 1 + g % 3, g * 12.5, CASE WHEN g % 4 = 0 THEN 'stale' ELSE 'open' END
  FROM generate_series(1, 40) g;
"""

# What the bot runs, one statement per psql -c (each is its own request in the audit).
BOT_STATEMENTS = [
    ("allowed", "SELECT status, count(*), sum(total) FROM orders GROUP BY status ORDER BY status"),
    ("masked", "SELECT id, name, email, card FROM customers ORDER BY id"),
    ("blocked", "DROP TABLE orders"),
    ("blocked", "SELECT pg_read_file('/etc/passwd')"),
    ("needs approval", "DELETE FROM orders WHERE status = 'stale'"),
    ("allowed", "SELECT count(*) AS orders_left FROM orders"),
]

RULES = """
[[rules]]
name = "no-drops-or-truncates"
action = "block"
description = "Nobody drops or truncates tables through botwarden"
[rules.sql]
properties = ["drop", "truncate"]

[[rules]]
name = "no-server-files"
action = "block"
description = "Functions that read or write the database server's files"
[rules.sql]
functions = ["pg_read_file", "pg_read_binary_file", "pg_ls_dir", "lo_export", "lo_import"]

[[rules]]
name = "deletes-need-a-human"
action = "approve"
description = "Every DELETE on orders is held for an operator"
[rules.sql]
kinds = ["DELETE"]
relations = ["orders"]

[[rules]]
name = "mask-customer-pii"
action = "mask"
[rules.sql]
relations = ["customers"]
[[rules.mask]]
columns = ["email"]
strategy = "partial"
keep = 4
[[rules.mask]]
columns = ["card"]
strategy = "partial"
keep = 4
"""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(n: int, text: str) -> None:
    _say(f"\n\033[1m[{n}] {text}\033[0m")


def _cli(config: Path, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), *args],
                         capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"botwarden {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def write_demo_config(path: Path, workdir: Path, pg: PostgresServer, bao, listen_port: int, entity_id: str) -> None:
    header = config_header(workdir, bao, probes=f'mode = "auto"\nbots_cgroup = "{BOTS_CGROUP}"\n'
                                                f'pin_dir = "{PIN_DIR}"\nnft_table = "botwarden_demo"',
                           approvals_timeout_s=120, flush_interval=0.1)
    path.write_text("# Written by `botwarden demo`. See botwarden.example.toml for every key.\n" + header
                    + textwrap.dedent(f"""
        [[targets]]
        name = "orders-db"
        protocol = "postgres"
        address = "{pg.host}:{pg.port}"
        listen = "127.0.0.1:{listen_port}"
        allow_plaintext = true
        authentication = "token+attestation"
        [targets.tls]
        mode = "require"
        [targets.credential]
        source = "database"
        mount = "{bao.db_mount}"
        role = "{bao.db_role}"

        [[identities]]
        name = "{BOT}"
        groups = ["demo-bots"]
        targets = ["orders-db"]
        [identities.token]
        subject = "{entity_id}"
        [identities.process]
        cgroup = "{BOT}"
        uid_not = [0]
        """) + RULES)


class _Approver(threading.Thread):
    """Plays the operator: approves the first held request it sees with `botwarden approvals approve`.

    A process of its own, not this one: the demo process started the bot, and a request is never
    approved by the process tree of the bot that asked (docs/approvals.md)."""

    def __init__(self, socket_path: str, config: Path):
        super().__init__(daemon=True, name="demo-approver")
        self.client = ControlClient(socket_path)
        self.config = config
        self.seen: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                items = self.client.get("/v1/approvals")["approvals"]
            except ControlError:
                items = []
            for item in items:
                if any(seen["approval_id"] == item["approval_id"] for seen in self.seen):
                    continue
                self.seen.append(item)
                _say(f"      operator: request {item['approval_id']} held by rule {item['rule']!r}: "
                     f"{item['request']!r} — approving")
                res = _cli(self.config, "approvals", "approve", item["approval_id"], "--reason",
                           "demo: stale orders may go", check=False)
                if res.returncode != 0:
                    _say(f"      operator: the approval was refused: {res.stderr.strip()}")
            self.stop.wait(0.3)


def run_demo(keep: bool = False, workdir: str | None = None) -> int:
    if os.geteuid() != 0:
        print("botwarden demo needs root (it loads eBPF programs and creates cgroups)", file=sys.stderr)
        return 1
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="botwarden-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    config = work / "botwarden.toml"
    pg = bao_server = daemon = None
    log = open(work / "daemon.log", "ab")
    try:
        _step(1, f"PostgreSQL 15 target on {TARGET_HOST} (a real server, initdb + pg_ctl)")
        pg = PostgresServer(host=TARGET_HOST, ssl=True).start()
        pg.psql(SEED_SQL)
        _say(f"      listening on {pg.host}:{pg.port}; tables customers (PII) and orders")

        _step(2, "OpenBao dev server: database secrets engine, AppRole for botwarden, OIDC tokens for bots")
        bao_server = OpenBaoServer(root_token=f"demo-root-{os.getpid()}").start()
        bao = configure_openbao(bao_server, pg, work, tag="demo")
        entity_id = bao.bot_entity_id()
        _say(f"      {bao_server.addr}; issuer {bao.issuer}")

        _step(3, "botwarden daemon with eBPF probes on the bots' cgroup")
        write_demo_config(config, work, pg, bao, free_port(), entity_id)
        _cli(config, "config", "check")
        daemon = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(config), "run"],
                                  stdout=log, stderr=subprocess.STDOUT)
        socket_path = str(work / "run" / "control.sock")
        client = ControlClient(socket_path)
        deadline = time.monotonic() + 90
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({daemon.returncode}); see {work / 'daemon.log'}")
            try:
                status = client.get("/v1/status")
                break
            except ControlError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not start; see {work / 'daemon.log'}") from None
                time.sleep(0.2)
        _say(f"      pid {status['pid']}; probes: {status.get('probes')}")
        for t in status["targets"]:
            _say(f"      target {t['name']}: bots connect to {t['address']}, the kernel sends them to {t['listen']}")

        _step(4, f"the demo bot: `botwarden bot run --name {BOT} --user {BOT_USER} -- psql` to {pg.host}:{pg.port}, "
                 "its OIDC token as the password")
        token = bao.mint_token()
        approver = _Approver(socket_path, config)
        approver.start()
        env = {**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
        psql_args = [str(PG_BIN / "psql"), "-X", "-h", pg.host, "-p", str(pg.port), "-U", BOT, "-d", "postgres",
                     "-v", "ON_ERROR_STOP=0", "-P", "pager=off"]
        for label, sql in BOT_STATEMENTS:
            psql_args += ["-c", f"\\echo '-- {label}: {sql.replace(chr(39), chr(39) * 2)}'", "-c", sql]
        # As an unprivileged user: a root bot could leave its cgroup (botwarden refuses to start one).
        res = _cli(config, "bot", "run", "--name", BOT, "--user", BOT_USER, "--", *psql_args, check=False, env=env,
                   timeout=180)
        approver.stop.set()
        for line in (res.stdout + res.stderr).splitlines():
            _say("      " + line)

        _step(5, "the same bot tries to go around botwarden (another port on the database host)")
        probe = (f"import socket\ntry:\n socket.create_connection(('{pg.host}', 22), 3)\n print('connected')\n"
                 f"except OSError as e:\n print('refused by the kernel:', e.strerror)")
        res = _cli(config, "bot", "run", "--name", BOT, "--user", BOT_USER, "--", "/usr/bin/python3", "-c", probe,
                   check=False)
        _say("      " + (res.stdout.strip() or res.stderr.strip()))

        _step(6, "what the audit store recorded (botwarden audit sql ...)")
        client.post("/v1/audit/flush")
        time.sleep(0.3)
        for title, sql in (
            ("sessions", "SELECT identity, pid, uid, privileged, exe, cgroup_path, credential_user, outcome FROM sessions "
                         "ORDER BY started_at"),
            ("requests", "SELECT decision, rule, left(text, 60) AS text, rows, masked FROM requests "
                         "ORDER BY chain_seq"),
            ("approvals", "SELECT event, operator, reason, round(waited_ms) AS waited_ms FROM approvals "
                          "ORDER BY chain_seq"),
            ("probes", "SELECT event, pid, comm, dst_addr, dst_port, detail FROM probes "
                       "WHERE event = 'denied_connect' ORDER BY chain_seq"),
        ):
            out = _cli(config, "audit", "sql", sql, check=False)
            _say(f"   {title}:")
            for line in (out.stdout or out.stderr).rstrip().splitlines():
                _say("      " + line)
        roles = pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-%'")
        _say(f"\n   database users made for bot sessions that still exist: {roles} (leases revoked at session end)")

        _say(textwrap.dedent(f"""
            Where to look next:
              botwarden --config {config} tui                 # approvals, sessions, audit SQL, replay
              botwarden --config {config} audit sql "SELECT * FROM requests"
              botwarden --config {config} sessions --all
              botwarden --config {config} probes status
            Files: {work} (config, daemon.log, state/audit.duckdb)"""))
        if keep:
            _say("\nThe demo keeps running (Ctrl-C to stop).")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(30)
        if config.exists():
            # The demo leaves nothing attached to the kernel behind.
            with contextlib.suppress(Exception):
                subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), "probes", "detach"],
                               capture_output=True, timeout=60)
        with contextlib.suppress(Exception):
            from probes import cgroups

            cgroups.remove(BOTS_CGROUP)
        if bao_server is not None:
            bao_server.stop()
        if pg is not None:
            pg.stop()
        log.close()
        if daemon is not None:
            _say(f"\nstopped the daemon, OpenBao and PostgreSQL; the audit store stays at "
                 f"{work / 'state' / 'audit.duckdb'}")
