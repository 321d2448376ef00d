"""The probes end to end, through the REAL daemon (issue 8).

One network namespace holds a real PostgreSQL 15 at non-loopback addresses (two IPv4
addresses and one IPv6 address on a veth); one OpenBao setup serves the module. The daemon
(`botwarden run`, a subprocess) attaches the eBPF probes to its own bots cgroup
(``botwarden-e2e.bots``, pins under ``/sys/fs/bpf/botwarden-e2e``), and bots started with
`botwarden bot run` use plain ``psql`` against the real target address: the kernel sends them
to the inspector, which knows which process asked.

- target ``orders`` (address A) uses ``authentication = "attestation"``: the identity
  ``e2e-bot`` is whoever runs psql in the ``e2e-bot`` cgroup;
- target ``orders-tok`` (address B, same server) uses ``"token+attestation"``: an OIDC token
  and the same cgroup; identity ``uid-bot`` there also requires uid 65534.

The nftables fallback runs the same main flow with a second daemon on a second bots cgroup;
`botwarden probes status|attach|detach` are tested from the CLI on a third one.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.probes_fixtures import RUN_TAG
from pyroute2 import IPRoute, NetNS, netns

from appliance.sandbox import (SUPERUSER_PASSWORD, OpenBaoSetup, PostgresServer, config_header, configure_openbao,
                               free_port)
from probes import cgroups
from tests.daemon_fixtures import PSQL, ROOT, DaemonProcess
from tests.probes_fixtures import bpftool_json, unique, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BOTS = f"botwarden-e2e-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-e2e-{RUN_TAG}"
NFT_BOTS = f"botwarden-e2e-nft-{RUN_TAG}.bots"
NFT_PIN_DIR = f"/sys/fs/bpf/botwarden-e2e-nft-{RUN_TAG}"
NFT_TABLE = f"botwarden_e2e_nft_{RUN_TAG}"
CLI_BOTS = f"botwarden-e2e-cli-{RUN_TAG}.bots"
CLI_PIN_DIR = f"/sys/fs/bpf/botwarden-e2e-cli-{RUN_TAG}"
CLI_NFT_TABLE = f"botwarden_e2e_cli_{RUN_TAG}"
BOT = "e2e-bot"
PASSTHROUGH_PORT = 5999  # nothing listens there: a bot reaching it gets ECONNREFUSED, not EPERM
BOT_PYTHON = "/usr/bin/python3"

# A bot that tries connections and prints, per attempt, "connected" or the errno's name.
CONNECT_PROBE = r"""
import errno, json, socket, sys
out = {}
for label, family, host, port, *source_port in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        if source_port:  # a known source port, to look for in the server's log
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", source_port[0]))
        s.connect((host, port))
        out[label] = "connected"
    except OSError as e:
        out[label] = errno.errorcode.get(e.errno, repr(e))
    finally:
        s.close()
print(json.dumps(out), flush=True)
"""

# A bot using a driver that exposes the SQLSTATE of a connection-time refusal.
ASYNCPG_PROBE = r"""
import asyncio, json, sys
import asyncpg
async def main():
    try:
        conn = await asyncpg.connect(host=sys.argv[1], port=int(sys.argv[2]), user="e2e-bot",
                                     database="postgres", ssl=False, timeout=10)
    except asyncpg.PostgresError as e:
        print(json.dumps({"sqlstate": e.sqlstate, "severity": e.severity, "message": e.message}))
    else:
        await conn.close()
        print(json.dumps({"sqlstate": None, "severity": None, "message": "connected"}))
asyncio.run(main())
"""

RULES = """
[[rules]]
name = "no-drops"
action = "block"
description = "Nobody drops tables through botwarden"
[rules.sql]
properties = ["drop", "truncate"]
"""


# -- the target network --------------------------------------------------------------------


@dataclass
class PgNet:
    """A netns + veth with a /29: the host side at .1, the namespace at .2 (A) and .3 (B), plus
    an IPv6 address in the namespace. Nothing in it is loopback."""

    name: str = field(default_factory=lambda: unique("bwe2e-"))
    host_ip: str = ""
    ip_a: str = ""
    ip_b: str = ""
    ip_unused: str = ""
    ip6: str = ""
    host_if: str = ""

    def start(self) -> "PgNet":
        tag = self.name[-6:]
        self.host_if, peer_if = f"bweh{tag}", f"bwen{tag}"
        third, base = random.randrange(256), random.randrange(32) * 8
        prefix = f"10.215.{third}."
        self.host_ip, self.ip_a, self.ip_b, self.ip_unused = (f"{prefix}{base + i}" for i in (1, 2, 3, 4))
        # In normal form (no leading zeros), as the audit writes addresses.
        self.ip6 = str(ipaddress.ip_address(f"fd00:b2:{tag[:4]}::2"))
        host_ip6 = str(ipaddress.ip_address(f"fd00:b2:{tag[:4]}::1"))
        netns.create(self.name)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.host_if, kind="veth", peer={"ifname": peer_if, "net_ns_fd": self.name})
                idx = ipr.link_lookup(ifname=self.host_if)[0]
                ipr.addr("add", index=idx, address=self.host_ip, prefixlen=29)
                ipr.addr("add", index=idx, address=host_ip6, prefixlen=64, flags=0x02)  # IFA_F_NODAD
                ipr.link("set", index=idx, state="up")
            with NetNS(self.name) as ns:
                idx = ns.link_lookup(ifname=peer_if)[0]
                for ip in (self.ip_a, self.ip_b):
                    ns.addr("add", index=idx, address=ip, prefixlen=29)
                ns.addr("add", index=idx, address=self.ip6, prefixlen=64, flags=0x02)
                ns.link("set", index=idx, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def stop(self) -> None:
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=self.host_if) if self.host_if else []
            if links:
                ipr.link("del", index=links[0])
        try:
            netns.remove(self.name)
        except OSError:
            pass


# -- config, daemon, bots ------------------------------------------------------------------


def write_e2e_config(path: Path, *, workdir: Path, net: PgNet, pg: PostgresServer, bao: OpenBaoSetup,
                     entity_id: str, mode: str, bots: str, pin_dir: str, nft_table: str,
                     extra_probes: str = "") -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    target_tail = f"""allow_plaintext = true
[targets.tls]
mode = "require"
[targets.credential]
source = "database"
mount = "{bao.db_mount}"
role = "{bao.db_role}"
"""
    probes = (f'mode = "{mode}"\nbots_cgroup = "{bots}"\npin_dir = "{pin_dir}"\nnft_table = "{nft_table}"\n'
              f'map_entries = 4096\npassthrough = ["{net.ip_a}:{PASSTHROUGH_PORT}"]'
              + ('\nunix_sockets = "unfiltered"' if mode == "nftables" else "") + extra_probes)
    path.write_text(config_header(workdir, bao, probes=probes) + f"""
[[targets]]
name = "orders"
protocol = "postgres"
address = "{net.ip_a}:{pg.port}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
{target_tail}
[[targets]]
name = "orders-tok"
protocol = "postgres"
address = "{net.ip_b}:{pg.port}"
listen = "127.0.0.1:{free_port()}"
authentication = "token+attestation"
{target_tail}
# Listed first: a token-holding bot in another cgroup is told about uid-bot's requirements.
[[identities]]
name = "uid-bot"
targets = ["orders-tok"]
[identities.token]
subject = "{entity_id}"
[identities.process]
cgroup = "uid-bot"
uid = 65534

[[identities]]
name = "e2e-tok-bot"
targets = ["orders-tok"]
[identities.token]
subject = "{entity_id}"
[identities.process]
cgroup = "{BOT}"

[[identities]]
name = "e2e-bot"
targets = ["orders"]
[identities.process]
cgroup = "{BOT}"
exe = "{PSQL}"
{RULES}
""")
    return path


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@dataclass
class Ran:
    pid: int
    returncode: int
    stdout: str
    stderr: str


def bot_run(config: Path, name: str, argv: list[str], env: dict | None = None, timeout: float = 60, *,
            user: str | None = "nobody", allow_privileged: bool = False) -> Ran:
    """`botwarden bot run --name NAME [--user USER] -- ARGV`: it execs ARGV in place, so the pid is ARGV's.
    Bots run as ``user`` (nobody) unless told otherwise: root bots are refused without --allow-privileged."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    opts = (["--user", user] if user else []) + (["--allow-privileged"] if allow_privileged else [])
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(config), "bot", "run",
                             "--name", name, *opts, "--", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**base, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"bot {name} did not finish: {out}\n{err}") from None
    return Ran(proc.pid, proc.returncode, out, err)


def spawn_probe(bots: str, name: str, attempts: list) -> dict:
    """CONNECT_PROBE in ``<bots>/<name>`` without `bot run` (which refuses to start an unwatched bot):
    what the kernel does to that cgroup's connects."""
    proc = cgroups.spawn(cgroups.bot_cgroup(bots, name), [BOT_PYTHON, "-c", CONNECT_PROBE, json.dumps(attempts)],
                         stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    return json.loads(out)


def psql_args(host: str, port: int, *sql: str, user: str = BOT) -> list[str]:
    args = [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-h", host, "-p", str(port), "-U", user,
            "-d", "postgres"]
    for s in sql:
        args += ["-c", s]
    return args


PSQL_ENV = {"PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}


def connection_lines(pg: PostgresServer) -> int:
    """How many connections PostgreSQL has seen (log_connections)."""
    return pg_log(pg).count("connection received:")


def pg_log(pg: PostgresServer) -> str:
    return (pg._tmp / "log").read_text(errors="replace")


@dataclass
class E2E:
    net: PgNet
    pg: PostgresServer
    bao: OpenBaoSetup
    entity_id: str
    workdir: Path
    config: Path
    daemon: DaemonProcess
    bots: str
    direct: str  # the query's answer straight from PostgreSQL


QUERY = "SELECT count(*), sum(total) FROM orders"


@pytest.fixture(scope="module")
def world(bao_server, tmp_path_factory):
    """The namespace, PostgreSQL in it, and one OpenBao setup, for the whole module."""
    workdir = tmp_path_factory.mktemp("probes-e2e")
    os.chmod(workdir, 0o755)
    net = PgNet().start()
    pg = None
    try:
        pg = PostgresServer(host=net.ip_a, prefix=net.prefix, ssl=True,
                            extra_conf={"listen_addresses": f"'{net.ip_a},{net.ip_b},{net.ip6}'",
                                        "log_connections": "on"}).start()
        pg.psql("""
            CREATE TABLE orders (id int PRIMARY KEY, customer int, total numeric);
            INSERT INTO orders SELECT g, 1 + g % 2, g * 10 FROM generate_series(1, 20) g;
        """)
        bao = configure_openbao(bao_server, pg, workdir, tag=f"e{uuid.uuid4().hex[:6]}")
        yield {"net": net, "pg": pg, "bao": bao, "entity_id": bao.bot_entity_id(), "workdir": workdir,
               "direct": pg.psql(QUERY)}
    finally:
        if pg is not None:
            pg.stop()
        net.stop()


def _start(world, name: str, *, mode: str, bots: str, pin_dir: str, nft_table: str, extra_probes: str = "") -> E2E:
    workdir = world["workdir"] / name
    config = write_e2e_config(workdir / "botwarden.toml", workdir=workdir, net=world["net"], pg=world["pg"],
                              bao=world["bao"], entity_id=world["entity_id"], mode=mode, bots=bots,
                              pin_dir=pin_dir, nft_table=nft_table, extra_probes=extra_probes)
    daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
    return E2E(world["net"], world["pg"], world["bao"], world["entity_id"], workdir, config, daemon, bots,
               world["direct"])


def _finish(env: E2E) -> None:
    try:
        env.daemon.stop()
    finally:
        try:
            res = cli(env.config, "probes", "detach")
            assert res.returncode == 0, res.stderr
        finally:
            cgroups.remove(env.bots)


@pytest.fixture(scope="module")
def env(world):
    e = _start(world, "ebpf", mode="ebpf", bots=BOTS, pin_dir=PIN_DIR, nft_table=f"botwarden_e2e_{RUN_TAG}")
    try:
        yield e
    finally:
        _finish(e)


def sessions_for_pid(env: E2E, pid: int, want_ended: bool = True) -> list[dict]:
    def rows():
        got = env.daemon.audit_sql("SELECT session_id, identity, target, pid, exe, cgroup_path, comm, uid, "
                                   "attribution_source, credential_user, outcome, error, privileged FROM sessions "
                                   "WHERE pid = ?", [pid])
        return got if got and (not want_ended or got[0]["outcome"] != "open") else None
    return wait_for(rows, timeout=10, interval=0.1) or []


def main_flow(env: E2E, source: str) -> None:
    """The bot's psql to the real address lands in the inspector, and the audit knows the process."""
    pg, net = env.pg, env.net
    ran = bot_run(env.config, BOT, psql_args(net.ip_a, pg.port, QUERY, "DROP TABLE orders", "SELECT current_user"),
                  env=PSQL_ENV)
    assert ran.returncode == 0, ran.stderr
    out = ran.stdout.strip().splitlines()
    assert out[0] == env.direct  # the right answer, from the real server
    assert out[1].startswith("v-")  # the session ran as the Vault-made user, not as "e2e-bot"
    assert "no-drops" in ran.stderr  # the inspector was in the path: the DROP was refused by policy
    assert pg.psql("SELECT count(*) FROM orders") == "20"
    rows = sessions_for_pid(env, ran.pid)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["identity"] == "e2e-bot" and row["target"] == "orders" and row["outcome"] == "ok"
    assert row["pid"] == ran.pid
    assert row["exe"] == PSQL
    assert row["cgroup_path"] == f"/{env.bots}/{BOT}"
    assert row["uid"] == 65534 and row["comm"] == "psql" and row["attribution_source"] == source
    assert row["privileged"] is False  # bot run --user nobody: no uid 0, no capabilities
    assert row["credential_user"] == out[1]
    reqs = env.daemon.audit_sql("SELECT decision, rule FROM requests WHERE session_id = ? ORDER BY chain_seq",
                                [row["session_id"]])
    assert [(r["decision"], r["rule"]) for r in reqs] == [("allow", None), ("block", "no-drops"), ("allow", None)]


# -- eBPF, through the daemon ----------------------------------------------------------------


def test_bot_with_attestation_lands_in_the_inspector_and_is_audited(env):
    main_flow(env, "ebpf")


def test_token_plus_attestation(env):
    token = env.bao.mint_token()
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_b, env.pg.port, QUERY), env={**PSQL_ENV, "PGPASSWORD": token})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == env.direct
    row = sessions_for_pid(env, ran.pid)[0]
    assert (row["identity"], row["target"], row["exe"], row["cgroup_path"]) == (
        "e2e-tok-bot", "orders-tok", PSQL, f"/{env.bots}/{BOT}")
    # Without the token the same process is refused: both are required.
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_b, env.pg.port, QUERY), env={**PSQL_ENV, "PGPASSWORD": "x"})
    assert ran.returncode != 0 and "botwarden" in ran.stderr


def test_cgroup_mismatch_is_refused_naming_it(env):
    ran = bot_run(env.config, "stranger-bot", psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV)
    assert ran.returncode != 0
    assert "FATAL" in ran.stderr
    assert (f"FATAL:  botwarden refused the connection: process not allowed: cgroup /{env.bots}/stranger-bot, "
            f"identity 'e2e-bot' requires cgroup /{env.bots}/{BOT}") in ran.stderr, ran.stderr
    row = sessions_for_pid(env, ran.pid)[0]
    assert row["outcome"] == "refused" and row["identity"] is None
    assert row["cgroup_path"] == f"/{env.bots}/stranger-bot"
    assert row["credential_user"] is None  # refused before a credential was fetched or upstream opened
    # The refusal is protocol-native: a FATAL with SQLSTATE 28000 (psql does not print the code at
    # connect time; a driver that parses the ErrorResponse shows it).
    # (The venv's interpreter lives under /root: this bot runs as root, deliberately.)
    ran = bot_run(env.config, "stranger-bot", [sys.executable, "-c", ASYNCPG_PROBE, env.net.ip_a, str(env.pg.port)],
                  user=None, allow_privileged=True)
    refusal = json.loads(ran.stdout)
    assert (refusal["sqlstate"], refusal["severity"]) == ("28000", "FATAL"), refusal
    assert "identity 'e2e-bot' requires cgroup" in refusal["message"]


def test_uid_mismatch_is_refused_naming_it(env):
    token = env.bao.mint_token()
    ran = bot_run(env.config, "uid-bot", psql_args(env.net.ip_b, env.pg.port, QUERY, user="uid-bot"),
                  env={**PSQL_ENV, "PGPASSWORD": token}, user="daemon")
    assert ran.returncode != 0
    assert "FATAL" in ran.stderr
    assert "process not allowed: uid 1, identity 'uid-bot' requires uid 65534" in ran.stderr, ran.stderr
    assert token not in ran.stderr and token not in env.daemon.output()
    row = sessions_for_pid(env, ran.pid)[0]
    assert row["outcome"] == "refused" and row["cgroup_path"] == f"/{env.bots}/uid-bot"


def test_unregistered_addresses_get_eperm_and_are_audited(env):
    net, port = env.net, env.pg.port
    attempts = [
        ("other-port", 4, net.ip_a, 22),
        ("other-address", 4, net.ip_unused, port),
        ("ipv6", 6, net.ip6, port),
        ("v4-mapped", 6, f"::ffff:{net.ip_a}", 22),
    ]
    passthrough = [("passthrough", 4, net.ip_a, PASSTHROUGH_PORT)]  # [probes] passthrough: reached unmodified
    ran = bot_run(env.config, "prober", [BOT_PYTHON, "-c", CONNECT_PROBE, json.dumps(attempts + passthrough)])
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == {**{label: "EPERM" for label, *_ in attempts}, "passthrough": "ECONNREFUSED"}

    def denied():
        rows = env.daemon.audit_sql("SELECT dst_addr, dst_port, family, cgroup_path, comm, detail FROM probes "
                                    "WHERE event = 'denied_connect' AND pid = ?", [ran.pid])
        return rows if len(rows) >= len(attempts) else None
    rows = wait_for(denied, timeout=10, interval=0.1)
    assert rows, "no denied_connect rows in the audit"
    got = {(r["dst_addr"], r["dst_port"], r["family"]) for r in rows}
    assert got >= {(net.ip_a, 22, "ipv4"), (net.ip_unused, port, "ipv4"), (net.ip6, port, "ipv6")}
    assert any("IPv4-mapped" in (r["detail"] or "") and r["dst_addr"] == net.ip_a for r in rows)
    assert {r["cgroup_path"] for r in rows} == {f"/{env.bots}/prober"}, rows


def test_v4_mapped_address_of_a_target_goes_through_the_inspector(env):
    """An AF_INET6 socket to ::ffff:A never hits connect4; it is redirected all the same."""
    ran = bot_run(env.config, BOT, psql_args(f"::ffff:{env.net.ip_a}", env.pg.port, QUERY), env=PSQL_ENV)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == env.direct
    row = sessions_for_pid(env, ran.pid)[0]
    assert (row["identity"], row["exe"], row["cgroup_path"]) == ("e2e-bot", PSQL, f"/{env.bots}/{BOT}")


def test_process_outside_the_bots_cgroup_is_untouched(env):
    sessions_before = env.daemon.audit_sql("SELECT count(*) AS n FROM sessions")[0]["n"]
    lines_before = connection_lines(env.pg)
    res = subprocess.run(psql_args(env.net.ip_a, env.pg.port, "SELECT 'direct:' || current_user", user="postgres"),
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, **PSQL_ENV, "PGPASSWORD": SUPERUSER_PASSWORD})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "direct:postgres"  # the superuser password worked: it reached PostgreSQL itself
    assert connection_lines(env.pg) > lines_before
    # A connect from a known source port shows in PostgreSQL's connection log (the daemon-killed test
    # relies on this to show that PostgreSQL never saw a bot).
    for sport in random.sample(range(30000, 40000), 5):
        res = subprocess.run([BOT_PYTHON, "-c", CONNECT_PROBE,
                              json.dumps([("target", 4, env.net.ip_a, env.pg.port, sport)])],
                             capture_output=True, text=True, timeout=60)
        if json.loads(res.stdout)["target"] != "EADDRINUSE":
            break
    assert json.loads(res.stdout) == {"target": "connected"}
    assert wait_for(lambda: f"connection received: host={env.net.host_ip} port={sport}" in pg_log(env.pg))
    assert env.daemon.audit_sql("SELECT count(*) AS n FROM sessions")[0]["n"] == sessions_before


def test_inspectors_upstream_is_not_redirected(env):
    """PostgreSQL sees the session's connection coming from the daemon's own socket on the veth."""
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(env.config), "bot", "run",
                             "--name", BOT, "--user", "nobody", "--", *psql_args(env.net.ip_a, env.pg.port, "SELECT pg_sleep(4)")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **PSQL_ENV})
    try:
        def backend():
            out = env.pg.psql("SELECT host(client_addr) || ' ' || client_port || ' ' || usename "
                              "FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(4)' AND usename LIKE 'v-%'")
            return out.split() if out else None
        found = wait_for(backend, timeout=15, interval=0.1)
        assert found, "the bot's session never reached PostgreSQL"
        client_addr, client_port, user = found
        assert client_addr == env.net.host_ip  # the daemon's veth address, not a loopback listener
        ss = subprocess.run(["ss", "-Htnp", "state", "established", "src", f"{client_addr}:{client_port}"],
                            capture_output=True, text=True, check=True).stdout
        assert f"pid={env.daemon.proc.pid}," in ss, ss  # the upstream socket is the daemon's own
        assert f"{env.net.ip_a}:{env.pg.port}" in ss  # and it goes to the real address
    finally:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    row = sessions_for_pid(env, proc.pid)[0]
    assert row["credential_user"] == user and row["identity"] == "e2e-bot"


def test_reload_cannot_move_the_probes_to_another_cgroup(env):
    """A reload only updates targets; a new bots cgroup would leave the bots in it unwatched."""
    good = env.config.read_text()
    try:
        env.config.write_text(good.replace(f'bots_cgroup = "{BOTS}"', f'bots_cgroup = "botwarden-e2e-moved-{RUN_TAG}.bots"'))
        res = cli(env.config, "config", "reload")
        assert res.returncode != 0
        assert "probes.bots_cgroup cannot change on reload" in res.stderr, res.stderr
    finally:
        env.config.write_text(good)
    assert not cgroups.resolve("botwarden-e2e-moved.bots").exists()
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV)
    assert ran.returncode == 0 and ran.stdout.strip() == env.direct, ran.stderr


def test_daemon_killed_fails_closed_then_restart_redirects_again(env):
    st = json.loads(cli(env.config, "probes", "status", "--json").stdout)
    assert st["path"] == "ebpf" and st["owner_alive"] and not st["fail_closed"]
    assert st["owner_pid"] == env.daemon.proc.pid

    env.daemon.proc.send_signal(signal.SIGKILL)
    env.daemon.proc.wait(10)
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV)
    assert ran.returncode != 0
    # Refused: PostgreSQL listens at that address, so only the redirect to the dead listener refuses.
    assert "Connection refused" in ran.stderr, ran.stderr
    assert env.direct not in ran.stdout
    # From a known source port: PostgreSQL's connection log never shows it.
    for sport in random.sample(range(20000, 30000), 5):
        ran = bot_run(env.config, BOT, [BOT_PYTHON, "-c", CONNECT_PROBE,
                                        json.dumps([("target", 4, env.net.ip_a, env.pg.port, sport)])])
        if json.loads(ran.stdout)["target"] != "EADDRINUSE":
            break
    assert json.loads(ran.stdout) == {"target": "ECONNREFUSED"}
    assert f"connection received: host={env.net.host_ip} port={sport}" not in pg_log(env.pg)
    # Unregistered destinations are still refused by the kernel while the daemon is down.
    denied = bot_run(env.config, "prober", [BOT_PYTHON, "-c", CONNECT_PROBE,
                                            json.dumps([("other-port", 4, env.net.ip_a, 22)])])
    assert json.loads(denied.stdout) == {"other-port": "EPERM"}
    res = cli(env.config, "probes", "status")
    assert res.returncode == 0, res.stderr
    assert "fail_closed: True" in res.stdout and "owner_alive: False" in res.stdout
    assert "fail closed" in res.stdout  # the reason says what it means

    env.daemon = DaemonProcess(env.config, env.daemon.socket).start()  # the fixture stops this one
    st = json.loads(cli(env.config, "probes", "status", "--json").stdout)
    assert st["owner_alive"] and not st["fail_closed"] and st["owner_pid"] == env.daemon.proc.pid
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == env.direct
    assert sessions_for_pid(env, ran.pid)[0]["exe"] == PSQL
    # What was refused while the daemon was down is audited once it is back (the pinned event ring).
    assert wait_for(lambda: env.daemon.audit_sql("SELECT count(*) AS n FROM probes WHERE pid = ? AND "
                                                 "event = 'denied_connect'", [denied.pid])[0]["n"], timeout=10)


# -- the nftables fallback -------------------------------------------------------------------


def test_nftables_fallback_passes_the_main_flow(world):
    env = _start(world, "nft", mode="nftables", bots=NFT_BOTS, pin_dir=NFT_PIN_DIR, nft_table=NFT_TABLE)
    try:
        st = json.loads(cli(env.config, "probes", "status", "--json").stdout)
        assert st["path"] == "nftables" and st["owner_alive"], st
        main_flow(env, "nftables")
        # Deny by default holds on this path too (the kernel answers with a reject, not EPERM).
        ran = bot_run(env.config, "prober", [BOT_PYTHON, "-c", CONNECT_PROBE,
                                             json.dumps([("other-port", 4, env.net.ip_a, 22)])])
        assert json.loads(ran.stdout)["other-port"] in ("EHOSTUNREACH", "EACCES", "ECONNREFUSED"), ran.stdout
    finally:
        _finish(env)
    assert NFT_TABLE not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert not Path(NFT_PIN_DIR).exists()


# -- `botwarden probes status|attach|detach` ---------------------------------------------------


def test_probes_cli_status_attach_detach(world):
    workdir = world["workdir"] / "cli"
    config = write_e2e_config(workdir / "botwarden.toml", workdir=workdir, net=world["net"], pg=world["pg"],
                              bao=world["bao"], entity_id=world["entity_id"], mode="auto", bots=CLI_BOTS,
                              pin_dir=CLI_PIN_DIR, nft_table=CLI_NFT_TABLE)
    try:
        res = cli(config, "probes", "status")
        assert res.returncode == 0, res.stderr
        assert "path: none" in res.stdout
        # Nothing attached: `bot run` does not start a bot nothing would watch (fail closed).
        ran = bot_run(config, "cli-bot", [BOT_PYTHON, "-c", "print('ran')"])
        assert ran.returncode == 1 and "ran" not in ran.stdout
        assert "start the daemon" in ran.stderr, ran.stderr

        res = cli(config, "probes", "attach")
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("probes attached: ebpf"), res.stdout
        st = json.loads(cli(config, "probes", "status", "--json").stdout)
        assert st["path"] == "ebpf" and st["programs"] and st["cgroup_path"] == f"/{CLI_BOTS}"
        # No daemon owns the redirect: in force, and failing closed.
        assert st["fail_closed"] and not st["owner_alive"]
        ran = bot_run(config, "cli-bot", [BOT_PYTHON, "-c", CONNECT_PROBE, json.dumps(
            [("target", 4, world["net"].ip_a, world["pg"].port), ("other", 4, world["net"].ip_a, 22)])])
        assert json.loads(ran.stdout) == {"target": "ECONNREFUSED", "other": "EPERM"}

        res = cli(config, "probes", "detach")
        assert res.returncode == 0, res.stderr
        assert "programs detached" in res.stdout and "pins removed" in res.stdout, res.stdout
        cgroup_dir = cgroups.resolve(CLI_BOTS)
        assert bpftool_json("cgroup", "show", str(cgroup_dir)) == []
        assert not Path(CLI_PIN_DIR).exists()
        assert CLI_NFT_TABLE not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        res = cli(config, "probes", "status")
        assert res.returncode == 0 and "path: none" in res.stdout
        # Detached: the cgroup is no longer watched (its processes reach the server itself).
        assert spawn_probe(CLI_BOTS, "cli-bot", [("target", 4, world["net"].ip_a, world["pg"].port)]) == {
            "target": "connected"}
    finally:
        cli(config, "probes", "detach")
        cgroups.remove(CLI_BOTS)


def test_probes_detach_and_attach_from_the_cli_while_the_daemon_runs(env):
    """Detach leaves the daemon running but unwatched bots; attach asks the daemon to put the
    probes back, owned by the daemon (not by the short-lived CLI process)."""
    res = cli(env.config, "probes", "detach")
    assert res.returncode == 0, res.stderr
    assert f"the daemon (pid {env.daemon.proc.pid}) keeps running" in res.stdout
    assert bpftool_json("cgroup", "show", str(cgroups.resolve(BOTS))) == []
    assert not Path(PIN_DIR).exists()
    # The daemon's status says so (it checks the cgroup, not only its own handle).
    probes_line = env.daemon.client().get("/v1/status")["probes"]
    assert "removed outside the daemon" in probes_line and "botwarden probes attach" in probes_line, probes_line
    # Unwatched: a connect the probes would refuse with EPERM now reaches the namespace (closed port),
    # so `bot run` refuses to start bots until the probes are back.
    assert spawn_probe(BOTS, "prober", [("other-port", 4, env.net.ip_a, 22)]) == {"other-port": "ECONNREFUSED"}
    attempt = json.dumps([("other-port", 4, env.net.ip_a, 22)])
    ran = bot_run(env.config, "prober", [BOT_PYTHON, "-c", CONNECT_PROBE, attempt])
    assert ran.returncode == 1 and not ran.stdout
    assert f"no probes are attached to the bots' cgroup /{BOTS}" in ran.stderr, ran.stderr

    res = cli(env.config, "probes", "attach")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"probes attached by the daemon (pid {env.daemon.proc.pid}): ebpf"), res.stdout
    st = json.loads(cli(env.config, "probes", "status", "--json").stdout)
    assert st["owner_pid"] == env.daemon.proc.pid and st["owner_alive"] and not st["fail_closed"], st
    assert env.daemon.client().get("/v1/status")["probes"].startswith("ebpf (")
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == env.direct
    assert sessions_for_pid(env, ran.pid)[0]["cgroup_path"] == f"/{BOTS}/{BOT}"
    # The daemon reads the new event ring: a refused connect is audited again.
    ran = bot_run(env.config, "prober", [BOT_PYTHON, "-c", CONNECT_PROBE, attempt])
    assert json.loads(ran.stdout) == {"other-port": "EPERM"}
    assert wait_for(lambda: env.daemon.audit_sql("SELECT count(*) AS n FROM probes WHERE pid = ? AND "
                                                 "event = 'denied_connect'", [ran.pid])[0]["n"], timeout=10)
