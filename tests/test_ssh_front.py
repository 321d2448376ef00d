"""The SSH front end to end (issue 16, first slice): a real OpenSSH `ssh` client run as a bot
through `botwarden bot run` and the eBPF redirect, the real daemon, a real `sshd` (Debian's) in
a network namespace that trusts OpenBao's SSH CA, a certificate per session from OpenBao.

Covered: the bot's known_hosts trusts the appliance by one @cert-authority line and keeps
StrictHostKeyChecking=yes; an allowed command's output and exit status equal direct; a
blocked command exits 126 with the rule on stderr and never reaches sshd; the session and
each command are audit rows; the upstream certificate was made for this session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from appliance.sandbox import PostgresServer, config_header, configure_openbao, free_port
from probes import cgroups
from tests.daemon_fixtures import DaemonProcess
from tests.probes_fixtures import RUN_TAG
from tests.test_probes_e2e import PgNet, bot_run, cli

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BOTS = f"botwarden-ssh-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-ssh-{RUN_TAG}"
BOT = "deployer"
SSH = "/usr/bin/ssh"


class Sshd:
    """Debian's sshd in the namespace: its own host key, trusting the user CA it is given."""

    def __init__(self, net: PgNet, user_ca: str):
        self.dir = Path(tempfile.mkdtemp(prefix="bw-sshd-"))
        self.port = free_port()
        self.host = net.ip_a
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host")], check=True)
        (self.dir / "user_ca.pub").write_text(user_ca.strip() + "\n")
        (self.dir / "sshd_config").write_text(f"""Port {self.port}
ListenAddress {self.host}
HostKey {self.dir / 'host'}
PidFile {self.dir / 'sshd.pid'}
TrustedUserCAKeys {self.dir / 'user_ca.pub'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel VERBOSE
""")
        os.makedirs("/run/sshd", exist_ok=True)
        self.log = open(self.dir / "log", "w")
        self.proc = subprocess.Popen([*net.prefix, "/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while "Server listening" not in (self.dir / "log").read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sshd did not start: " + (self.dir / "log").read_text())
            time.sleep(0.1)

    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} " + (self.dir / "host.pub").read_text().strip()

    def logged(self) -> str:
        return (self.dir / "log").read_text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def world(bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ssh-front")
    os.chmod(workdir, 0o755)
    net = PgNet().start()
    pg = sshd = daemon = config = None
    try:
        pg = PostgresServer().start()  # only for configure_openbao's database mount
        tag = f"s{uuid.uuid4().hex[:6]}"
        bao = configure_openbao(bao_server, pg, workdir, tag=tag)
        root = bao_server.client()
        ssh_mount = f"{tag}-ssh"
        root.sys.enable_secrets_engine("ssh", path=ssh_mount)
        root.write(f"{ssh_mount}/config/ca", generate_signing_key=True)
        root.write(f"{ssh_mount}/roles/bot", key_type="ca", allow_user_certificates=True, allowed_users="root",
                   default_user="root", ttl="10m", algorithm_signer="rsa-sha2-256",
                   default_extensions={"permit-pty": ""})
        user_ca = root.read(f"{ssh_mount}/config/ca")["data"]["public_key"]
        policy = root.sys.read_policy(f"{tag}-appliance")["data"]["rules"]
        root.sys.create_or_update_policy(f"{tag}-appliance", policy + f'\npath "{ssh_mount}/sign/bot" '
                                                                      '{ capabilities = ["update"] }\n')
        sshd = Sshd(net, user_ca)
        known_hosts = workdir / "upstream_known_hosts"
        known_hosts.write_text(sshd.known_hosts_line() + "\n")
        config = workdir / "botwarden.toml"
        probes = f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "{PIN_DIR}"\nmap_entries = 4096'
        config.write_text(config_header(workdir, bao, probes=probes) + f"""
[[targets]]
name = "web-1"
protocol = "ssh"
address = "{sshd.host}:{sshd.port}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
known_hosts = "{known_hosts}"
[targets.credential]
source = "ssh"
mount = "{ssh_mount}"
role = "bot"
principals = ["root"]

[[identities]]
name = "deploy-bot"
targets = ["web-1"]
[identities.process]
cgroup = "{BOT}"

[[rules]]
name = "touch-needs-approval"
action = "approve"
[rules.ssh]
programs = ["touch"]

[[rules]]
name = "no-rm"
action = "block"
description = "deploy bots do not delete files"
[rules.ssh]
programs = ["rm"]
""")
        daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
        # The bot's side: one @cert-authority line, strict host key checking.
        bot_home = Path(tempfile.mkdtemp(prefix="bw-ssh-bot-"))
        os.chmod(bot_home, 0o755)
        line = cli(config, "ssh", "known-hosts").stdout.strip()
        (bot_home / "known_hosts").write_text(line + "\n")
        yield {"net": net, "sshd": sshd, "daemon": daemon, "config": config, "bot_home": bot_home,
               "bao": bao_server, "ssh_mount": ssh_mount, "known_hosts_line": line}
        shutil.rmtree(bot_home, ignore_errors=True)
    finally:
        try:
            if daemon is not None:
                daemon.stop()
                cli(config, "probes", "detach")
        finally:
            cgroups.remove(BOTS)
            if sshd is not None:
                sshd.stop()
            if pg is not None:
                pg.stop()
            net.stop()


def ssh_bot(world, command: str):
    sshd = world["sshd"]
    return bot_run(world["config"], BOT, [
        SSH, "-F", "/dev/null", "-o", f"UserKnownHostsFile={world['bot_home'] / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
        "-p", str(sshd.port), f"root@{sshd.host}", command], env={"HOME": str(world["bot_home"])})


def ssh_direct(world, command: str, workdir: Path):
    """The same command straight to sshd, with a certificate signed for the test."""
    sshd = world["sshd"]
    key = workdir / "id"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        signed = world["bao"].client().write(f"{world['ssh_mount']}/sign/bot",
                                              public_key=(workdir / "id.pub").read_text(), valid_principals="root")
        (workdir / "id-cert.pub").write_text(signed["data"]["signed_key"])
        (workdir / "known_hosts").write_text(sshd.known_hosts_line() + "\n")
    return subprocess.run([*world["net"].prefix, SSH, "-F", "/dev/null", "-i", str(key),
                           "-o", f"UserKnownHostsFile={workdir / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                           "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-p", str(sshd.port), f"root@{sshd.host}",
                           command], capture_output=True, text=True, timeout=60)


def test_known_hosts_line_is_a_cert_authority(world):
    assert world["known_hosts_line"].startswith("@cert-authority * ssh-ed25519 ")


def test_allowed_command_output_and_exit_status_equal_direct(world, tmp_path):
    command = "echo out-42; echo err-line >&2; exit 3"
    bot, direct = ssh_bot(world, command), ssh_direct(world, command, tmp_path)
    assert (direct.returncode, direct.stdout, direct.stderr) == (3, "out-42\n", "err-line\n"), world["sshd"].logged()[-3000:]
    assert (bot.returncode, bot.stdout, bot.stderr) == (direct.returncode, direct.stdout, direct.stderr)
    rows = world["daemon"].audit_sql("SELECT kind, text, decision, rows FROM requests WHERE text = ?", [command])
    assert rows == [{"kind": "ssh_exec", "text": command, "decision": "allow", "rows": 3}]
    # audit.mode = "strict" (the default): the command was journaled before it went to sshd, as a
    # request_starts row that its requests row completes (same id and seq; issue 23.4).
    started = world["daemon"].audit_sql(
        "SELECT s.request_id FROM request_starts s JOIN requests r USING (request_id) "
        "WHERE s.text = ? AND s.seq = r.seq AND s.chain_seq < r.chain_seq", [command])
    assert len(started) == 1, started
    s = world["daemon"].audit_sql("SELECT identity, protocol, attribution_source, credential_user, pid FROM sessions "
                                  "WHERE protocol = 'ssh' ORDER BY start_seq DESC LIMIT 1")[0]
    assert s == {"identity": "deploy-bot", "protocol": "ssh", "attribution_source": "ebpf",
                 "credential_user": "root", "pid": bot.pid}
    # sshd saw a certificate, not a standing key: OpenBao's CA signed it for this session.
    assert "Accepted publickey for root" in world["sshd"].logged() and "CA RSA" in world["sshd"].logged()


def test_blocked_command_exits_126_with_the_rule_and_never_reaches_sshd(world, tmp_path):
    marker = tmp_path / "victim"
    marker.write_text("keep me")
    before = world["sshd"].logged().count("Accepted publickey")
    bot = ssh_bot(world, f"rm -f {marker}")
    assert bot.returncode == 126 and "no-rm" in bot.stderr and "do not delete files" in bot.stderr, bot
    assert marker.exists()
    assert world["sshd"].logged().count("Accepted publickey") == before  # no upstream connection at all
    rows = world["daemon"].audit_sql("SELECT decision, rule FROM requests WHERE text = ?", [f"rm -f {marker}"])
    assert rows == [{"decision": "block", "rule": "no-rm"}]


@pytest.mark.parametrize("approve", [True, False])
def test_held_command_runs_once_approved_and_exits_126_when_denied(world, approve):
    # A plain path: a random temp name would look like a secret to the audit's redaction.
    workdir = Path(f"/tmp/bw-ssh-held-{'approve' if approve else 'deny'}")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    marker = workdir / "made"
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(ran=ssh_bot(world, f"touch {marker}")))
    t.start()
    item = None
    for _ in range(300):
        items = json.loads(cli(world["config"], "approvals", "list", "--json").stdout or "[]")
        if items:
            item = items[0]
            break
        time.sleep(0.1)
    assert item is not None and item["rule"] == "touch-needs-approval" and item["protocol"] == "ssh", item
    assert item["request"] == f"touch {marker}" and not marker.exists()  # nothing ran while it waited
    verb = ["approve", item["approval_id"], "--reason", "ok"] if approve else ["deny", item["approval_id"],
                                                                                  "--reason", "not now"]
    decided = cli(world["config"], "approvals", *verb)
    assert decided.returncode == 0, decided.stderr
    t.join(60)
    ran = result["ran"]
    assert f"botwarden: waiting for approval {item['approval_id']}" in ran.stderr, ran.stderr
    if approve:
        assert ran.returncode == 0 and marker.exists(), ran
    else:
        assert ran.returncode == 126 and "not now" in ran.stderr and not marker.exists(), ran
    rows = world["daemon"].audit_sql("SELECT decision FROM requests WHERE text = ?", [f"touch {marker}"])
    assert [r["decision"] for r in rows] == ["approve" if approve else "deny"]
    shutil.rmtree(marker.parent, ignore_errors=True)
