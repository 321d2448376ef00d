"""A PostgreSQL Unix socket as a target (issue 26.1), end to end: the real daemon, its eBPF
probes (connect_unix rewrites a bot's connect to the database's socket into a connect to the
inspector's socket, kernel 6.7+ kfunc), attestation from SO_PEERCRED, a dynamic credential from
OpenBao, the upstream connection over the database's own socket, policy and audit as for TCP.
The bot is real psql run as nobody through `botwarden bot run`, told nothing but the socket
directory it always used.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.probes_fixtures import RUN_TAG

from appliance.sandbox import PostgresServer, config_header, configure_openbao
from probes import cgroups
from tests.daemon_fixtures import DaemonProcess
from tests.test_probes_e2e import bot_run, cli

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

PSQL = "/usr/lib/postgresql/15/bin/psql"
BOTS = f"botwarden-unixt-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-unixt-{RUN_TAG}"
BOT = "local-reader"


@pytest.fixture(scope="module")
def world(bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("unix-target")
    os.chmod(workdir, 0o755)
    pg = PostgresServer().start()
    daemon = config = rundir = None
    try:
        pg.psql("CREATE TABLE accounts (id int, email text); INSERT INTO accounts VALUES (1, 'a@example.com'), "
                "(2, 'b@example.com')")
        bao = configure_openbao(bao_server, pg, workdir, tag=f"u{uuid.uuid4().hex[:6]}",
                                grants=("GRANT pg_read_all_data TO \"{{name}}\";",))
        socket_path = f"{pg.sockdir}/.s.PGSQL.{pg.port}"
        # Where bots' connects land: a directory they may traverse (as /run/botwarden would be).
        rundir = Path(tempfile.mkdtemp(prefix="bw-unixt-"))
        os.chmod(rundir, 0o755)
        listen = rundir / "db.sock"
        config = workdir / "botwarden.toml"
        probes = f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "{PIN_DIR}"\nmap_entries = 4096'
        config.write_text(config_header(workdir, bao, probes=probes) + f"""
[[targets]]
name = "local-db"
protocol = "postgres"
address = "unix:{socket_path}"
listen = "unix:{listen}"
authentication = "attestation"
[targets.credential]
source = "database"
mount = "{bao.db_mount}"
role = "{bao.db_role}"

[[identities]]
name = "reader-bot"
targets = ["local-db"]
[identities.process]
cgroup = "{BOT}"

[[rules]]
name = "no-drops"
action = "block"
[rules.sql]
properties = ["drop"]
""")
        daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
        yield {"pg": pg, "daemon": daemon, "config": config, "socket": socket_path, "listen": listen}
    finally:
        try:
            if daemon is not None:
                daemon.stop()
                cli(config, "probes", "detach")
        finally:
            cgroups.remove(BOTS)
            pg.stop()
            if rundir is not None:
                shutil.rmtree(rundir, ignore_errors=True)


def psql_bot(world, sql: str):
    pg = world["pg"]
    return bot_run(world["config"], BOT, [PSQL, "-X", "-A", "-t", "-h", str(pg.sockdir), "-p", str(pg.port),
                                          "-U", "reader-bot", "-d", "postgres", "-c", sql])


def test_a_bot_on_the_databases_socket_is_inspected_attested_and_audited(world):
    ran = psql_bot(world, "SELECT id, current_user <> 'reader-bot' FROM accounts ORDER BY id")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["1|t", "2|t"]  # as the dynamic user OpenBao made, not as the bot said
    rows = world["daemon"].audit_sql(
        "SELECT s.attribution_source, s.target_addr, s.uid, s.pid, s.cgroup_path, s.identity, s.outcome "
        "FROM sessions s ORDER BY start_seq DESC LIMIT 1")
    s = rows[0]
    assert s["attribution_source"] == "peercred" and s["target_addr"] == "unix:" + world["socket"]
    assert s["uid"] == 65534 and s["pid"] == ran.pid and s["identity"] == "reader-bot"
    assert s["cgroup_path"].endswith(f"/{BOT}")
    req = world["daemon"].audit_sql("SELECT decision FROM requests WHERE text LIKE 'SELECT id, current_user%'")
    assert [r["decision"] for r in req] == ["allow"]
    probe = world["daemon"].audit_sql("SELECT event, family, dst_addr FROM probes WHERE pid = ?", [ran.pid])
    assert {"event": "redirected", "family": "unix", "dst_addr": world["socket"]} in probe, probe


def test_policy_applies_on_the_socket_too(world):
    ran = psql_bot(world, "DROP TABLE accounts")
    assert ran.returncode == 1 and "no-drops" in ran.stderr, ran.stderr
    assert world["pg"].psql("SELECT count(*) FROM accounts") == "2"


def _startup(user: str) -> bytes:
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0postgres\0\0"
    return struct.pack("!I", len(body) + 4) + body


def test_a_process_outside_the_bots_cgroups_is_refused_on_the_inspectors_socket(world):
    # Root, not a bot: it may use the database's own socket (not the inspector's business), but
    # the inspector's socket gives it nothing: no attribution, no identity, no credential.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(world["listen"]))
        s.sendall(_startup("reader-bot"))
        reply = s.recv(4096)
    assert reply[:1] == b"E" and b"reader-bot" not in reply[:1], reply
    assert Path(world["socket"]).exists() and world["pg"].psql("SELECT 1") == "1"


def test_doctor_checks_the_databases_socket(world):
    import json

    res = cli(world["config"], "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    check = checks["target local-db reachable"]
    assert check["status"] == "ok" and "PostgreSQL answers SSLRequest with 'N'" in check["detail"], check
