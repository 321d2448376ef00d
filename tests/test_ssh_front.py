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
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest

from appliance.sandbox import PostgresServer, config_header, configure_openbao, free_port
from probes import cgroups
from tests.daemon_fixtures import DaemonProcess
from tests.probes_fixtures import RUN_TAG
from tests.servers import pause
from tests.test_probes_e2e import ROOT, PgNet, bot_run, cli

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BOTS = f"botwarden-ssh-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-ssh-{RUN_TAG}"
AGENT_DIR = Path(f"/tmp/bw-ssh-agent-{RUN_TAG}")  # the one Unix socket bots may reach (ssh -A's agent)
BOT = "deployer"
SHORT_TTL = 10  # seconds: web-short's certificates (the session starts well within them)
SSH = "/usr/bin/ssh"


class Sshd:
    """Debian's sshd in the namespace: its own host key, trusting the user CA it is given."""

    def __init__(self, net: PgNet, user_ca: str, extra_ports: int = 4):
        self.dir = Path(tempfile.mkdtemp(prefix="bw-sshd-"))
        self.port = free_port()
        # More ports on the same sshd: one target per port (attestation, token, token+attestation).
        self.extra_ports = [free_port() for _ in range(extra_ports)]
        self.host = net.ip_a
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host")], check=True)
        (self.dir / "user_ca.pub").write_text(user_ca.strip() + "\n")
        ports = "".join(f"Port {p}\n" for p in [self.port, *self.extra_ports])
        (self.dir / "sshd_config").write_text(f"""{ports}ListenAddress {self.host}
HostKey {self.dir / 'host'}
PidFile {self.dir / 'sshd.pid'}
TrustedUserCAKeys {self.dir / 'user_ca.pub'}
PermitRootLogin prohibit-password
AcceptEnv LANG LC_* BW_*
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
        key = (self.dir / "host.pub").read_text().strip()
        return "\n".join(f"[{self.host}]:{p} {key}" for p in [self.port, *self.extra_ports])

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
        # A short-lived certificate: the session must end with it (the validity window is the session's).
        root.write(f"{ssh_mount}/roles/short", key_type="ca", allow_user_certificates=True, allowed_users="root",
                   default_user="root", ttl=f"{SHORT_TTL}s", algorithm_signer="rsa-sha2-256")
        user_ca = root.read(f"{ssh_mount}/config/ca")["data"]["public_key"]
        policy = root.sys.read_policy(f"{tag}-appliance")["data"]["rules"]
        root.sys.create_or_update_policy(f"{tag}-appliance", policy + f'\npath "{ssh_mount}/sign/*" '
                                                                      '{ capabilities = ["update"] }\n')
        sshd = Sshd(net, user_ca, extra_ports=5)
        # A standing key in OpenBao's KV (credential.source = "kv"): a key pair with a certificate
        # signed once, as an operator would store it.
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "kv_key")], check=True)
        kv_cert = root.write(f"{ssh_mount}/sign/bot", public_key=(workdir / "kv_key.pub").read_text(),
                             valid_principals="root")["data"]["signed_key"]
        root.secrets.kv.v2.create_or_update_secret(path=f"{tag}-ssh-key", mount_point="secret", secret={
            "username": "root", "private_key": (workdir / "kv_key").read_text(), "certificate": kv_cert})
        (workdir / "kv_key").unlink()  # only OpenBao keeps it
        known_hosts = workdir / "upstream_known_hosts"
        known_hosts.write_text(sshd.known_hosts_line() + "\n")
        config = workdir / "botwarden.toml"
        credential = f'[targets.credential]\nsource = "ssh"\nmount = "{ssh_mount}"\nrole = "bot"\nprincipals = ["root"]\n'
        short_credential = credential.replace('role = "bot"', 'role = "short"')
        missing_credential = credential.replace('role = "bot"', 'role = "no-such-role"')
        # The upstream's host key as botwarden must not accept it: a fresh key for that port.
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "other_host")], check=True)
        wrong_known_hosts = workdir / "wrong_known_hosts"
        wrong_known_hosts.write_text(f"[{sshd.host}]:{sshd.extra_ports[3]} "
                                     + (workdir / "other_host.pub").read_text().strip() + "\n")
        down_port = free_port()  # nothing listens there
        nocred_port = free_port()
        probes = (f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "{PIN_DIR}"\nmap_entries = 4096\n'
                  f'unix_allow = ["{AGENT_DIR / "sock"}"]')
        config.write_text(config_header(workdir, bao, probes=probes) + f"""
[[targets]]
name = "web-1"
protocol = "ssh"
address = "{sshd.host}:{sshd.port}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
known_hosts = "{known_hosts}"
env_allow = ["LANG", "LC_*", "BW_OK"]
{credential}
[[targets]]
name = "web-tok"
protocol = "ssh"
address = "{sshd.host}:{sshd.extra_ports[0]}"
listen = "127.0.0.1:{free_port()}"
authentication = "token"
known_hosts = "{known_hosts}"
{credential}
[[targets]]
name = "web-both"
protocol = "ssh"
address = "{sshd.host}:{sshd.extra_ports[1]}"
listen = "127.0.0.1:{free_port()}"
authentication = "token+attestation"
known_hosts = "{known_hosts}"
{credential}
[[targets]]
name = "web-short"
protocol = "ssh"
address = "{sshd.host}:{sshd.extra_ports[2]}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
known_hosts = "{known_hosts}"
{short_credential}
[[targets]]
name = "web-badkey"
protocol = "ssh"
address = "{sshd.host}:{sshd.extra_ports[3]}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
known_hosts = "{wrong_known_hosts}"
{credential}
[[targets]]
name = "web-kv"
protocol = "ssh"
address = "{sshd.host}:{sshd.extra_ports[4]}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
known_hosts = "{known_hosts}"
[targets.credential]
source = "kv"
path = "{tag}-ssh-key"
password_key = "private_key"

[[targets]]
name = "web-down"
protocol = "ssh"
address = "{sshd.host}:{down_port}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
known_hosts = "{known_hosts}"
connect_timeout = 5
{credential}
[[targets]]
name = "web-nocred"
protocol = "ssh"
address = "{sshd.host}:{nocred_port}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
known_hosts = "{known_hosts}"
{missing_credential}
[[identities]]
name = "deploy-bot"
targets = ["web-1", "web-short", "web-badkey", "web-down", "web-nocred", "web-kv"]
[identities.process]
cgroup = "{BOT}"

[[identities]]
name = "token-bot"
targets = ["web-tok"]
[identities.token]
subject = "{bao.bot_entity_id()}"

[[identities]]
name = "both-bot"
targets = ["web-both"]
[identities.token]
subject = "{bao.bot_entity_id()}"
[identities.process]
cgroup = "{BOT}"

[[rules]]
name = "touch-needs-approval"
action = "approve"
[rules.ssh]
programs = ["touch"]

[[rules]]
name = "no-scp-into-locked"
action = "block"
description = "nothing is copied into /srv/locked"
[rules.ssh]
commands = ["scp -t /srv/locked*"]

[[rules]]
name = "no-shells-on-web-tok"
action = "block"
targets = ["web-tok"]
description = "token bots run commands, not shells"
[rules.ssh]
shell = true

[[rules]]
name = "mask-keys-in-head-output"
action = "mask"
[rules.ssh]
programs = ["head"]
[[rules.mask]]
detectors = ["aws_key"]

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
        yield {"net": net, "bao_setup": bao, "down_port": down_port, "nocred_port": nocred_port, "sshd": sshd, "daemon": daemon, "config": config, "bot_home": bot_home,
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


def ssh_bot(world, command: str | None, *, port: int | None = None, bot: str = BOT, token: str | None = None,
            auth: str = "password", options: tuple[str, ...] = (), log_level: str = "ERROR"):
    """The real ``ssh`` as a bot. With ``token``: it answers the password (or keyboard-interactive)
    prompt through SSH_ASKPASS, as a bot without a terminal does; otherwise BatchMode."""
    sshd = world["sshd"]
    env = {"HOME": str(world["bot_home"])}
    if token is not None:
        secrets = Path(tempfile.mkdtemp(prefix="bw-ssh-askpass-"))
        os.chmod(secrets, 0o755)
        (secrets / "token").write_text(token)
        askpass = secrets / "askpass"
        askpass.write_text(f"#!/bin/sh\ncat {secrets / 'token'}\n")
        os.chmod(askpass, 0o755)
        os.chmod(secrets / "token", 0o644)
        env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        how = ["-o", f"PreferredAuthentications={auth}", "-o", "NumberOfPasswordPrompts=1"]
    else:
        how = ["-o", "BatchMode=yes"]
    try:
        return bot_run(world["config"], bot, [
            SSH, "-F", "/dev/null", "-o", f"UserKnownHostsFile={world['bot_home'] / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", *how, "-o", f"LogLevel={log_level}", *options,
            "-p", str(port or sshd.port), f"root@{sshd.host}", *([command] if command is not None else [])],
            env=env)
    finally:
        if token is not None:
            shutil.rmtree(secrets, ignore_errors=True)


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


def session_of(world, pid: int) -> dict:
    """The session row of the bot process ``pid`` (its session_end may follow the exit)."""
    for _ in range(100):
        rows = world["daemon"].audit_sql("SELECT * FROM sessions WHERE pid = ? AND outcome <> 'open'", [pid])
        if rows:
            return rows[0]
        time.sleep(0.1)
    raise AssertionError(f"no ended session for pid {pid}: "
                         f"{world['daemon'].audit_sql('SELECT * FROM sessions WHERE pid = ?', [pid])}")


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


# -- bot authentication per target (item 1) ------------------------------------------------------


@pytest.mark.parametrize("auth", ["password", "keyboard-interactive"])
def test_token_target_accepts_the_token_as_password_or_keyboard_interactive_answer(world, auth):
    token = world["bao_setup"].mint_token()
    ran = ssh_bot(world, f"echo via-{auth}", port=world["sshd"].extra_ports[0], token=token, auth=auth)
    assert (ran.returncode, ran.stdout) == (0, f"via-{auth}\n"), ran
    s = session_of(world, ran.pid)
    assert (s["target"], s["identity"], s["outcome"]) == ("web-tok", "token-bot", "ok"), s


def test_bad_token_is_refused_naming_the_check_and_never_echoed(world):
    token = world["bao_setup"].mint_token()
    head, payload, signature = token.split(".")
    forged = f"{head}.{payload}.{signature[::-1]}"  # a well-formed token whose signature fails
    ran = ssh_bot(world, "echo never", port=world["sshd"].extra_ports[0], token=forged, log_level="INFO")
    assert ran.returncode == 255 and "never" not in ran.stdout, ran
    assert "botwarden refused the connection: token signature does not verify" in ran.stderr, ran.stderr
    s = session_of(world, ran.pid)
    assert (s["target"], s["outcome"], s["identity"]) == ("web-tok", "refused", None), s
    assert "token signature" in s["error"], s
    assert forged not in ran.stderr and forged not in world["daemon"].output()
    assert signature[::-1][:24] not in json.dumps(s, default=str)


def test_valid_token_from_the_wrong_process_is_refused_naming_the_process_check(world):
    token = world["bao_setup"].mint_token()
    ran = ssh_bot(world, "echo never", port=world["sshd"].extra_ports[1], token=token, bot="stranger-bot",
                  log_level="INFO")
    assert ran.returncode == 255 and "never" not in ran.stdout, ran
    assert "process not allowed: cgroup" in ran.stderr and "stranger-bot" in ran.stderr, ran.stderr
    assert token not in ran.stderr and token not in world["daemon"].output()
    s = session_of(world, ran.pid)
    assert (s["target"], s["outcome"], s["identity"]) == ("web-both", "refused", None), s
    assert s["cgroup_path"].endswith("/stranger-bot") and "process not allowed" in s["error"], s
    # The right process with the same token is let in: the refusal was the process check alone.
    ran = ssh_bot(world, "echo both-ok", port=world["sshd"].extra_ports[1], token=token)
    assert (ran.returncode, ran.stdout) == (0, "both-ok\n"), ran
    assert session_of(world, ran.pid)["identity"] == "both-bot"


def test_attestation_target_refuses_a_process_outside_its_identity(world):
    ran = ssh_bot(world, "echo never", bot="stranger-bot", log_level="INFO")
    assert ran.returncode == 255 and "never" not in ran.stdout, ran
    assert "process not allowed: cgroup" in ran.stderr, ran.stderr
    s = session_of(world, ran.pid)
    assert (s["target"], s["outcome"]) == ("web-1", "refused"), s


# -- scp's legacy protocol, signals and window changes (item 3) -----------------------------------


def scp_bot(world, *args: str):
    sshd = world["sshd"]
    return bot_run(world["config"], BOT, [
        "/usr/bin/scp", "-O", "-F", "/dev/null", "-o", f"UserKnownHostsFile={world['bot_home'] / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-P", str(sshd.port),
        *args], env={"HOME": str(world["bot_home"])})


def test_scp_legacy_protocol_is_an_exec_decided_by_policy(world):
    # Plain paths: a random temp name would look like a secret to the audit's redaction.
    local = Path("/tmp/bw-ssh-scp-local")
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir()
    os.chmod(local, 0o777)
    (local / "payload").write_bytes(os.urandom(200_000))
    os.chmod(local / "payload", 0o644)
    remote = "/tmp/bw-ssh-scp-uploaded"
    host = world["sshd"].host
    try:
        up = scp_bot(world, str(local / "payload"), f"root@{host}:{remote}")
        assert up.returncode == 0, up
        assert Path(remote).read_bytes() == (local / "payload").read_bytes()
        down = scp_bot(world, f"root@{host}:{remote}", str(local / "back"))
        assert down.returncode == 0, down
        assert (local / "back").read_bytes() == (local / "payload").read_bytes()
        refused = scp_bot(world, str(local / "payload"), f"root@{host}:/srv/locked-file")
        assert refused.returncode != 0 and "no-scp-into-locked" in refused.stderr, refused
        assert not Path("/srv/locked-file").exists()
        rows = world["daemon"].audit_sql("SELECT text, decision, rule, rows FROM requests WHERE text LIKE 'scp %' "
                                         "ORDER BY chain_seq")
        assert rows == [
            {"text": f"scp -t {remote}", "decision": "allow", "rule": None, "rows": 0},
            {"text": f"scp -f {remote}", "decision": "allow", "rule": None, "rows": 0},
            {"text": "scp -t /srv/locked-file", "decision": "block", "rule": "no-scp-into-locked", "rows": 126},
        ], rows
    finally:
        shutil.rmtree(local, ignore_errors=True)
        Path(remote).unlink(missing_ok=True)


def test_a_command_killed_by_a_signal_ends_as_it_does_direct(world, tmp_path):
    command = "echo before; kill -TERM $$"
    bot, direct = ssh_bot(world, command), ssh_direct(world, command, tmp_path)
    assert (bot.returncode, bot.stdout) == (direct.returncode, direct.stdout) == (255, "before\n"), (bot, direct)
    rows = world["daemon"].audit_sql("SELECT rows FROM requests WHERE text = ?", [command])
    assert rows == [{"rows": 128 + signal.SIGTERM}]


SIGNAL_PROBE = """
import asyncio, sys
import asyncssh

async def main(host, port, known_hosts):
    async with asyncssh.connect(host, int(port), username="root", known_hosts=known_hosts, client_keys=None,
                                agent_path=None, config=None) as conn:
        proc = await conn.create_process("echo ready; sleep 3")
        print(await proc.stdout.readline(), end="", flush=True)
        proc.send_signal("TERM")  # what OpenSSH's ssh never sends: only a library client can
        result = await proc.wait(check=False)
        print(result.exit_signal[0] if result.exit_signal else f"status {result.exit_status}")

asyncio.run(main(*sys.argv[1:]))
"""


def test_a_signal_request_from_the_bot_reaches_the_sshd(world):
    sshd = world["sshd"]
    # OpenSSH's sshd acts on signal requests only in privilege-separated (non-root) sessions; this
    # sshd's sessions are root's, so it answers with a log line: that line is the proof the bot's
    # request went through botwarden to the sshd.
    refusal = "session_signal_req: session signalling requires privilege separation"
    before = sshd.logged().count(refusal)
    # The venv's interpreter lives under /root: this bot runs as root, deliberately.
    ran = bot_run(world["config"], BOT, [sys.executable, "-c", SIGNAL_PROBE, sshd.host, str(sshd.port),
                                         str(world["bot_home"] / "known_hosts")], user=None, allow_privileged=True,
                  timeout=90)
    assert ran.returncode == 0 and ran.stdout.startswith("ready\n"), ran
    assert sshd.logged().count(refusal) == before + 1, sshd.logged()[-2000:]


def run_in_pty(world, argv: list[str], script, *, rows: int = 30, cols: int = 100, timeout: float = 60):
    """``bot run -- argv`` with a pseudo-terminal as its stdin/stdout/stderr (what a person at a
    terminal gives ssh). ``script(pid, master, read_until)`` drives it; returns all output."""
    master, slave = pty.openpty()
    termios_size = struct.pack("HHHH", rows, cols, 0, 0)
    import fcntl

    fcntl.ioctl(slave, termios.TIOCSWINSZ, termios_size)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(world["config"]), "bot", "run",
                             "--name", BOT, "--user", "nobody", "--", *argv], cwd=ROOT, stdin=slave, stdout=slave,
                            stderr=slave, env={**base, "PYTHONPATH": str(ROOT), "HOME": str(world["bot_home"]),
                                                 "TERM": "xterm-256color"},
                            start_new_session=True)
    os.close(slave)
    seen = bytearray()

    def read_until(marker: bytes, limit: float = timeout) -> bytes:
        deadline = time.monotonic() + limit
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{marker!r} not seen in {bytes(seen)!r}")
            ready, _, _ = select.select([master], [], [], left)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side closed
                    raise AssertionError(f"{marker!r} not seen before EOF in {bytes(seen)!r}") from None
                if not chunk:
                    raise AssertionError(f"{marker!r} not seen before EOF in {bytes(seen)!r}")
                seen.extend(chunk)
        return bytes(seen)

    try:
        script(proc.pid, master, read_until)
        proc.wait(timeout)
        while True:  # what is left after the exit
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen.extend(chunk)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, bytes(seen)


def ssh_tty_argv(world, *command: str) -> list[str]:
    sshd = world["sshd"]
    return [SSH, "-tt", "-F", "/dev/null", "-o", f"UserKnownHostsFile={world['bot_home'] / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-p", str(sshd.port), f"root@{sshd.host}", *command]


def test_window_changes_reach_the_commands_terminal(world):
    import fcntl

    def script(pid, master, read_until):
        read_until(b"size-1 30 100")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.kill(pid, signal.SIGWINCH)  # what the kernel sends ssh's foreground group on a resize
        time.sleep(1)  # let ssh send window-change before the line that asks for the size again
        os.write(master, b"go\r")
        read_until(b"size-2 40 120")

    status, out = run_in_pty(world, ssh_tty_argv(world, "echo size-1 $(stty size); read x; echo size-2 $(stty size)"),
                             script)
    assert status == 0, out


# -- shells: decided, recorded, typed lines (item 4) ---------------------------------------------


def recording_rows(world, session_id: str) -> list[dict]:
    """A session's recordings rows as the audit store has them (ts, direction, data bytes)."""
    import base64
    from datetime import datetime, timezone

    rows = world["daemon"].audit_sql("SELECT epoch_us(ts) AS us, direction, base64(data) AS data FROM recordings "
                                     "WHERE session_id = ? ORDER BY seq", [session_id])
    return [{"ts": datetime.fromtimestamp(r["us"] / 1e6, timezone.utc), "direction": r["direction"],
             "data": base64.b64decode(r["data"] or "")} for r in rows]


def test_shell_is_recorded_and_its_asciicast_parses(world, tmp_path):
    import fcntl

    from asciinema.asciicast import open_from_url

    from appliance.fronts.ssh_cast import asciicast

    secret = "hunter2-typed-secret"

    def script(pid, master, read_until):
        os.write(master, b"echo typed-$((6*7))X\x7f\r")  # a typo and its backspace: the line is without it
        read_until(b"typed-42")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.kill(pid, signal.SIGWINCH)
        time.sleep(1)  # ssh sends window-change before the next line
        os.write(master, b'read -s -p "Pass""word: " pw; echo got-${#pw}\r')
        read_until(b"Password: ")
        os.write(master, secret.encode() + b"\r")
        read_until(b"got-20")
        os.write(master, b"exit\r")

    status, out = run_in_pty(world, ssh_tty_argv(world), script)
    assert status == 0, out
    daemon = world["daemon"]
    shell = daemon.audit_sql("SELECT session_id, decision, rows FROM requests WHERE kind = 'ssh_shell' "
                             "ORDER BY chain_seq DESC LIMIT 1")[0]
    assert (shell["decision"], shell["rows"]) == ("allow", 0), shell
    sid = shell["session_id"]
    typed = daemon.audit_sql("SELECT text, reason FROM requests WHERE session_id = ? AND kind = 'ssh_typed' "
                             "ORDER BY chain_seq", [sid])
    assert [t["text"] for t in typed] == ["echo typed-$((6*7))", 'read -s -p "Pass""word: " pw; echo got-${#pw}',
                                          "exit"], typed
    assert "not decided" in typed[0]["reason"]
    rows = recording_rows(world, sid)
    first = json.loads(bytes(rows[0]["data"]))
    assert rows[0]["direction"] == "event" and first["event"] == "pty", rows[0]
    assert (first["width"], first["height"], first["term"]) == (100, 30, "xterm-256color")
    assert any(r["direction"] == "out" and b"typed-42" in bytes(r["data"]) for r in rows)
    assert not any(secret.encode() in bytes(r["data"]) for r in rows)  # the password prompt's answer is stars
    cast_file = tmp_path / "shell.cast"
    cast_file.write_text(asciicast(rows))
    with open_from_url(str(cast_file)) as cast:  # asciinema's own reader
        header = cast.v2_header
        events = list(cast.events())
    assert (header["version"], header["width"], header["height"]) == (2, 100, 30)
    assert header["env"]["TERM"] == "xterm-256color"
    assert any(e[1] == "o" and "typed-42" in e[2] for e in events)
    assert [e[2] for e in events if e[1] == "r"] == ["120x40"]
    typed_keys = "".join(e[2] for e in events if e[1] == "i")
    assert "echo typed-$((6*7))" in typed_keys and "*" * len(secret) + "\r" in typed_keys, typed_keys
    assert all(a[0] <= b[0] for a, b in zip(events, events[1:]))
    assert secret not in cast_file.read_text()
    # issue 18: `botwarden replay` plays the terminal output; `session export --cast` is the same reading.
    replayed = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(world["config"]), "replay",
                               "--no-wait", sid], cwd=ROOT, capture_output=True, timeout=60)
    assert replayed.returncode == 0, replayed.stderr
    assert b"typed-42" in replayed.stdout and b"got-20" in replayed.stdout and secret.encode() not in replayed.stdout
    exported = tmp_path / "export.cast"
    res = cli(world["config"], "session", "export", sid, "--cast", str(exported))
    assert res.returncode == 0, res.stderr
    with open_from_url(str(exported)) as cast:
        assert [e for e in cast.events()] == events


def test_a_shells_input_is_not_relayed_once_the_audit_process_is_gone_and_the_session_ends(world):
    """Each line typed into a shell is a request in all but name: with the audit process dead
    (SIGKILL) the next keystrokes never reach the shell, the session ends with the reason on the
    bot's terminal, as a PostgreSQL session ends at its next statement. Before, the shell went
    on running what was typed while its records were refused."""
    daemon = world["daemon"]

    def audit_pid_when_healthy() -> int | None:
        audit = daemon.client().get("/v1/status")["audit"]
        return audit["pid"] if audit["healthy"] else None

    def script(pid, master, read_until):
        os.write(master, b"echo before-$((1+1))\r")
        read_until(b"before-2")
        child = audit_pid_when_healthy()
        assert child is not None
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while daemon.client().get("/v1/status")["audit"]["healthy"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.write(master, b"echo after-$((2+2))\r")
        read_until(b"audit store is unavailable")

    try:
        status, out = run_in_pty(world, ssh_tty_argv(world), script)
        assert status == 255, out
        assert b"after-4" not in out and b"no session runs unaudited" in out, out
    finally:
        deadline = time.monotonic() + 60  # the daemon starts a new audit process: later tests need it
        while audit_pid_when_healthy() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    assert audit_pid_when_healthy() is not None


def test_shell_refused_by_policy_exits_126_with_the_rule(world):
    token = world["bao_setup"].mint_token()
    ran = ssh_bot(world, None, port=world["sshd"].extra_ports[0], token=token, options=("-T",))
    assert ran.returncode == 126 and "no-shells-on-web-tok" in ran.stderr, ran
    rows = world["daemon"].audit_sql("SELECT decision, rule, text FROM requests WHERE kind = 'ssh_shell' "
                                     "AND rule = 'no-shells-on-web-tok'")
    assert rows == [{"decision": "block", "rule": "no-shells-on-web-tok", "text": "[shell]"}]


# -- refused by design: forwarding, other subsystems, environment (item 6) -----------------------


def requests_of(world, pid: int) -> list[dict]:
    sid = session_of(world, pid)["session_id"]
    return world["daemon"].audit_sql("SELECT kind, text, decision, reason FROM requests WHERE session_id = ? "
                                     "ORDER BY chain_seq", [sid])


def test_local_port_forwarding_is_refused_and_audited(world):
    import socket

    sshd = world["sshd"]
    lport = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen([
        sys.executable, "-m", "appliance.cli", "--config", str(world["config"]), "bot", "run", "--name", BOT,
        "--user", "nobody", "--", SSH, "-N", "-L", f"127.0.0.1:{lport}:127.0.0.1:{sshd.port}", "-F", "/dev/null",
        "-o", f"UserKnownHostsFile={world['bot_home'] / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-p", str(sshd.port), f"root@{sshd.host}"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**base, "PYTHONPATH": str(ROOT), "HOME": str(world["bot_home"])})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", lport), timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.2)
        client.settimeout(20)
        # Nothing of the sshd's banner: the channel was refused (ssh logs the failure, then closes).
        assert client.recv(100) == b""
        client.close()
    finally:
        proc.kill()  # ssh -N runs until killed
        _, err = proc.communicate(timeout=30)
    assert "administratively prohibited: botwarden refuses local port forwarding" in err, err
    rows = [r for r in requests_of(world, proc.pid) if r["kind"] == "ssh_forward"]
    assert rows == [{"kind": "ssh_forward", "text": f"local port forwarding to 127.0.0.1:{sshd.port}",
                     "decision": "block", "reason": f"botwarden refuses local port forwarding to 127.0.0.1:"
                                                    f"{sshd.port} on SSH targets"}], rows


@pytest.mark.parametrize("kind", ["remote", "agent", "x11"])
def test_remote_agent_and_x11_forwarding_are_refused_and_audited(world, kind):
    rport = free_port()
    options, env, expected = {
        "remote": (("-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{rport}:127.0.0.1:9"), {},
                   f"remote port forwarding from 127.0.0.1:{rport}"),
        "agent": (("-A",), {}, "agent forwarding"),
        # (XAuthLocation: ssh sends fake X11 cookie data without running xauth first, which with
        # no X server here cost ~20 s in the bot cgroup; the request is what is tested)
        "x11": (("-X", "-o", "XAuthLocation=/nonexistent"), {"DISPLAY": "127.0.0.1:0"}, "X11 forwarding (screen 0)"),
    }[kind]
    agent_pid = None
    if kind == "agent":  # ssh asks for agent forwarding only with an agent it can reach
        agent_dir = AGENT_DIR
        shutil.rmtree(agent_dir, ignore_errors=True)
        agent_dir.mkdir()
        os.chmod(agent_dir, 0o777)
        env = {"SSH_AUTH_SOCK": str(agent_dir / "sock")}
        started = subprocess.run(["runuser", "-u", "nobody", "--", "ssh-agent", "-a", env["SSH_AUTH_SOCK"]],
                                 capture_output=True, text=True, check=True)
        agent_pid = int(started.stdout.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        ran = ssh_bot(world, "echo ran", options=(*options,), log_level="INFO") if not env else \
            _ssh_bot_env(world, "echo ran", options, env)
    finally:
        if agent_pid is not None:
            os.kill(agent_pid, signal.SIGTERM)
            shutil.rmtree(agent_dir, ignore_errors=True)
    if kind == "remote":  # ExitOnForwardFailure: ssh gives up before running the command
        assert ran.returncode == 255 and "remote port forwarding failed" in ran.stderr, ran
    else:  # the request is refused, the command still runs
        assert (ran.returncode, ran.stdout) == (0, "ran\n"), ran
    if kind == "x11":
        assert "X11 forwarding request failed" in ran.stderr, ran.stderr
    rows = [r for r in requests_of(world, ran.pid) if r["kind"] == "ssh_forward"]
    assert [(r["text"], r["decision"]) for r in rows] == [(expected, "block")], (rows, ran.stderr)


def _ssh_bot_env(world, command, options, env):
    sshd = world["sshd"]
    return bot_run(world["config"], BOT, [
        SSH, "-F", "/dev/null", "-o", f"UserKnownHostsFile={world['bot_home'] / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", *options, "-p", str(sshd.port),
        f"root@{sshd.host}", command], env={"HOME": str(world["bot_home"]), **env})


def test_subsystems_other_than_sftp_are_refused_and_audited(world):
    ran = ssh_bot(world, "othersubsystem", options=("-s",))
    assert ran.returncode == 126 and "refuses subsystem 'othersubsystem'" in ran.stderr, ran
    rows = requests_of(world, ran.pid)
    assert [(r["kind"], r["text"], r["decision"]) for r in rows] == [
        ("ssh_subsystem", "[subsystem othersubsystem]", "block")], rows


def test_environment_outside_the_allow_list_is_refused_and_audited_without_its_value(world, tmp_path):
    command = 'echo "[$BW_OK][$BW_NOPE]"'
    env = {"BW_OK": "yes", "BW_NOPE": "value-never-audited"}
    ran = _ssh_bot_env(world, command, ("-o", "SendEnv=BW_OK BW_NOPE"), env)
    assert (ran.returncode, ran.stdout) == (0, "[yes][]\n"), ran
    rows = requests_of(world, ran.pid)
    assert [(r["kind"], r["text"], r["decision"]) for r in rows] == [
        ("ssh_env", "environment variable BW_NOPE", "block"), ("ssh_exec", command, "allow")], rows
    assert "env_allow" in rows[0]["reason"] and "value-never-audited" not in json.dumps(rows)


# -- masking of output (item 7) -------------------------------------------------------------------


def test_output_is_masked_even_when_a_secret_straddles_ssh_packets(world, tmp_path):
    key = "AKIAIOSFODNN7EXAMPLE"
    # 32,759 bytes first: the key straddles the 32 KiB SSH channel packets and botwarden's reads.
    command = f"head -c 32759 /dev/zero | tr '\\0' x; echo ' {key} end'"
    bot, direct = ssh_bot(world, command), ssh_direct(world, command, tmp_path)
    assert direct.returncode == 0 and direct.stdout == "x" * 32759 + f" {key} end\n"
    assert bot.returncode == 0 and bot.stdout == "x" * 32759 + " ******** end\n", bot.stdout[-100:]
    # (the command's own text carries the key: the audit stores it redacted, hence LIKE)
    rows = world["daemon"].audit_sql("SELECT masked, text FROM requests WHERE text LIKE 'head -c 32759 %'")
    assert len(rows) == 1 and rows[0]["masked"] == {"output": 1} and key not in rows[0]["text"], rows
    recorded = b"".join(bytes(r["data"]) for r in recording_rows(world, session_of(world, bot.pid)["session_id"])
                        if r["direction"] == "out")
    assert recorded == ("x" * 32759 + " ******** end\n").encode()  # the recording is what the bot saw


def test_a_commands_output_is_recorded_and_exported_as_a_cast_but_not_its_stdin(world, tmp_path):
    from asciinema.asciicast import open_from_url

    from appliance.fronts.ssh_cast import asciicast

    piped = "stdin-secret-piped-to-the-command"
    ran = bot_run(world["config"], BOT, ["sh", "-c", f"echo {piped} | {SSH} -F /dev/null "
                                         f"-o UserKnownHostsFile={world['bot_home'] / 'known_hosts'} "
                                         "-o StrictHostKeyChecking=yes -o BatchMode=yes -o LogLevel=ERROR "
                                         f"-p {world['sshd'].port} root@{world['sshd'].host} "
                                         "'wc -c; echo recorded-out; echo recorded-err >&2'"],
                  env={"HOME": str(world["bot_home"])})
    assert ran.returncode == 0 and ran.stdout == f"{len(piped) + 1}\nrecorded-out\n", ran
    # (the pid is the shell's; ssh is its child in the pipe: the session is found by its command)
    request = world["daemon"].audit_sql("SELECT session_id, request_id FROM requests WHERE kind = 'ssh_exec' "
                                        "AND text = 'wc -c; echo recorded-out; echo recorded-err >&2'")
    assert len(request) == 1, request
    for _ in range(100):  # the exec_end event follows the command's exit
        rows = recording_rows(world, request[0]["session_id"])
        events = [json.loads(bytes(r["data"])) for r in rows if r["direction"] == "event"]
        if len(events) >= 2:
            break
        time.sleep(0.1)
    assert [e["event"] for e in events] == ["exec", "exec_end"], events
    assert events[0]["request_id"] == request[0]["request_id"] and events[1]["stdin_bytes"] == len(piped) + 1
    out = b"".join(bytes(r["data"]) for r in rows if r["direction"] == "out")
    assert b"recorded-out\n" in out and b"recorded-err\n" in out
    assert not any(r["direction"] == "in" for r in rows) and not any(piped.encode() in bytes(r["data"]) for r in rows)
    cast_file = tmp_path / "exec.cast"
    cast_file.write_text(asciicast(rows))
    with open_from_url(str(cast_file)) as cast:  # asciinema's own reader
        assert cast.v2_header["version"] == 2
        shown = "".join(e[2] for e in cast.events() if e[1] == "o")
    assert "recorded-out" in shown and "recorded-err" in shown


# -- lifecycle (item 8) ---------------------------------------------------------------------------


def test_the_session_ends_when_its_upstream_certificate_expires(world):
    # web-short's role signs for SHORT_TTL seconds: the session may not outlive its certificate.
    ran = ssh_bot(world, "echo started; sleep 50; echo never", port=world["sshd"].extra_ports[2])
    assert ran.returncode == 255 and ran.stdout == "started\n", ran
    assert "botwarden: the session's SSH certificate expired" in ran.stderr, ran.stderr
    s = session_of(world, ran.pid)
    assert (s["target"], s["outcome"]) == ("web-short", "terminated") and "certificate expired" in s["error"], s
    lived = (_ts(s["ended_at"]) - _ts(s["started_at"])).total_seconds()
    assert lived >= SHORT_TTL - 1, s  # not before the certificate's end (signed just before started_at)


def _ts(value):
    from datetime import datetime

    return datetime.fromisoformat(value) if isinstance(value, str) else value


def test_sshd_down_refuses_the_command_with_the_reason_and_an_audit_row(world):
    ran = ssh_bot(world, "echo never", port=world["down_port"])
    assert ran.returncode == 255 and "never" not in ran.stdout, ran
    assert "botwarden: could not run the command on 'web-down'" in ran.stderr, ran.stderr
    rows = requests_of(world, ran.pid)
    assert len(rows) == 1 and rows[0]["text"] == "echo never", rows
    row = world["daemon"].audit_sql("SELECT error, rows FROM requests WHERE session_id = ?",
                                    [session_of(world, ran.pid)["session_id"]])[0]
    assert row["rows"] == 255 and row["error"], row


def test_upstream_host_key_mismatch_refuses_the_command(world):
    before = world["sshd"].logged().count("Accepted publickey")
    ran = ssh_bot(world, "echo never", port=world["sshd"].extra_ports[3])
    assert ran.returncode == 255 and "never" not in ran.stdout, ran
    assert "the sshd's host key does not match the target's known_hosts" in ran.stderr, ran.stderr
    assert world["sshd"].logged().count("Accepted publickey") == before  # no login with the certificate
    row = world["daemon"].audit_sql("SELECT error FROM requests WHERE session_id = ?",
                                    [session_of(world, ran.pid)["session_id"]])[0]
    assert "host key does not match" in row["error"], row


def test_a_key_from_openbaos_kv_logs_in_upstream(world):
    ran = ssh_bot(world, "echo kv-key-works", port=world["sshd"].extra_ports[4])
    assert ran.returncode == 0 and ran.stdout == "kv-key-works\n", ran
    s = session_of(world, ran.pid)
    assert (s["target"], s["outcome"], s["credential_user"], s["lease_id"]) == ("web-kv", "ok", "root", None), s
    kv_key = (Path(world["config"]).parent / "kv_key")
    assert not kv_key.exists()  # the key lives in OpenBao only, never in a file botwarden wrote


def test_no_credential_from_openbao_refuses_the_session(world):
    # OpenBao answers but will not sign (no such role): fail closed, before any upstream connection.
    ran = ssh_bot(world, "echo never", port=world["nocred_port"], log_level="INFO")
    assert ran.returncode == 255 and "never" not in ran.stdout, ran
    assert "botwarden could not get a credential for 'web-nocred'" in ran.stderr, ran.stderr
    s = session_of(world, ran.pid)
    assert (s["target"], s["outcome"]) == ("web-nocred", "refused") and "credential" in s["error"], s


def test_a_bot_that_disconnects_mid_approval_withdraws_the_request(world):
    sshd = world["sshd"]
    marker = "/tmp/bw-ssh-withdrawn-marker"
    Path(marker).unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen([
        sys.executable, "-m", "appliance.cli", "--config", str(world["config"]), "bot", "run", "--name", BOT,
        "--user", "nobody", "--", SSH, "-F", "/dev/null", "-o", f"UserKnownHostsFile={world['bot_home'] / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(sshd.port), f"root@{sshd.host}",
        f"touch {marker}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**base, "PYTHONPATH": str(ROOT), "HOME": str(world["bot_home"])})
    item = None
    try:
        for _ in range(300):
            items = [i for i in json.loads(cli(world["config"], "approvals", "list", "--json").stdout or "[]")
                     if i["request"] == f"touch {marker}"]
            if items:
                item = items[0]
                break
            time.sleep(0.1)
        assert item is not None, proc.poll()
    finally:
        proc.kill()  # the bot goes away while its command waits
        proc.communicate(timeout=30)
    final = None
    for _ in range(100):
        rows = world["daemon"].audit_sql("SELECT event, reason FROM approvals WHERE approval_id = ? "
                                         "AND event NOT IN ('requested', 'notified')", [item["approval_id"]])
        if rows:
            final = rows[0]
            break
        time.sleep(0.1)
    assert final is not None and final["event"] == "abandoned" and final["reason"].startswith("withdrawn"), final
    assert not Path(marker).exists()
    left = json.loads(cli(world["config"], "approvals", "list", "--json").stdout or "[]")
    assert item["approval_id"] not in [i["approval_id"] for i in left]


def test_openbao_hung_at_session_start_refuses_the_session_with_the_reason(world):
    # OpenBao paused (a hung server: it accepts connections and answers nothing), the bot's new
    # session needs a certificate signed for it: fail closed, nothing reaches the sshd.
    bao = world["bao"]
    pause(bao.proc.pid, group=True)
    try:
        ran = ssh_bot(world, "echo never", log_level="INFO")
    finally:
        os.killpg(bao.proc.pid, signal.SIGCONT)  # never leave the shared server paused
    assert ran.returncode == 255 and "never" not in ran.stdout, ran
    assert "botwarden could not get a credential for 'web-1'" in ran.stderr, ran.stderr
    s = session_of(world, ran.pid)
    assert (s["target"], s["outcome"]) == ("web-1", "refused") and "credential" in s["error"], s
    again = ssh_bot(world, "echo back")  # OpenBao answers again: so does the target
    assert again.returncode == 0 and again.stdout == "back\n", again


# Stops the module's daemon: keep it the module's last test.
def test_daemon_sigterm_ends_ssh_sessions_with_a_message_on_stderr(world):
    import analytics
    from appliance.config import load_config

    ran: dict = {}
    runner = threading.Thread(target=lambda: ran.update(r=ssh_bot(world, "sleep 300", log_level="INFO")),
                              daemon=True)
    runner.start()
    daemon = world["daemon"]
    for _ in range(300):
        live = json.loads(cli(world["config"], "sessions", "--json").stdout or "[]")
        if any(s["target"] == "web-1" and "sleep 300" in (s.get("current") or "") for s in live):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the session never started: {live}")
    assert daemon.stop(timeout=60) == 0, daemon.output()[-3000:]
    runner.join(60)
    r = ran["r"]
    assert r.returncode == 255, r  # ssh's own status for a connection the server closed
    assert "botwarden is shutting down" in r.stderr, r.stderr
    path = load_config(world["config"]).audit.path
    cols, rows = analytics.query_readonly(path, "SELECT outcome, error FROM sessions WHERE pid = ?", [r.pid])
    assert [dict(zip(cols, row)) for row in rows] == [
        {"outcome": "terminated", "error": "botwarden is shutting down"}], rows
