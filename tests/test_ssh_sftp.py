"""SFTP and scp through the SSH front end to end (issue 16 item 5): Debian's OpenSSH `sftp` and
`scp` (9.x: SFTP mode by default) run as a bot through `botwarden bot run` and the eBPF redirect,
the real daemon, a real `sshd` in a network namespace trusting OpenBao's SSH CA (the fixtures of
tests/test_ssh_front.py), every operation decided on its path by [rules.ssh].

Covered: put and get allowed, file content identical to the source and to a direct get; a put to
a refused path fails with "Permission denied" naming the rule and the sftp session goes on (a
later get in the same batch works); remove and rename refused by path, nothing changed on the
target; scp put/get allowed and refused; a held write waits for an operator; the audit rows
(path, size, bytes moved, decision, rule).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.sandbox import PostgresServer, config_header, configure_openbao, free_port
from probes import cgroups
from tests.daemon_fixtures import DaemonProcess
from tests.probes_fixtures import RUN_TAG
from tests.test_probes_e2e import PgNet, bot_run, cli
from tests.test_ssh_front import Sshd, ssh_direct

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BOTS = f"botwarden-sftp-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-sftp-{RUN_TAG}"
BOT = "copier"
# Plain names: a random temp name would look like a secret to the audit's redaction.
AREA = Path("/tmp/bw-sftp-area")
OPEN, LOCKED, HELD = AREA / "open", AREA / "locked", AREA / "held"
SSH_OPTS = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


def sftp_config(sshd: Sshd, known_hosts: Path, ssh_mount: str) -> str:
    return f"""
[[targets]]
name = "files-1"
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
name = "copy-bot"
targets = ["files-1"]
[identities.process]
cgroup = "{BOT}"

[[rules]]
name = "locked-is-read-only"
action = "block"
description = "nothing under locked/ changes"
[rules.ssh]
sftp_paths = ["{LOCKED}", "{LOCKED}/*"]
sftp_ops = ["write", "create", "remove", "rename", "mkdir", "rmdir", "setstat", "symlink"]

[[rules]]
name = "held-writes-need-approval"
action = "approve"
[rules.ssh]
sftp_paths = ["{HELD}/*"]
sftp_ops = ["write"]
"""


@contextmanager
def sftp_world(bao_server, workdir: Path):
    """The real daemon (eBPF probes, an SSH target with the rules above), a real sshd trusting
    OpenBao's SSH CA, the bot's home with its known_hosts line. Used by bench/ssh_compare.py too."""
    os.chmod(workdir, 0o755)
    net = PgNet().start()
    pg = sshd = daemon = config = None
    try:
        pg = PostgresServer().start()  # only for configure_openbao's database mount
        tag = f"f{uuid.uuid4().hex[:6]}"
        bao = configure_openbao(bao_server, pg, workdir, tag=tag)
        root = bao_server.client()
        ssh_mount = f"{tag}-ssh"
        root.sys.enable_secrets_engine("ssh", path=ssh_mount)
        root.write(f"{ssh_mount}/config/ca", generate_signing_key=True)
        root.write(f"{ssh_mount}/roles/bot", key_type="ca", allow_user_certificates=True, allowed_users="root",
                   default_user="root", ttl="10m", algorithm_signer="rsa-sha2-256")
        user_ca = root.read(f"{ssh_mount}/config/ca")["data"]["public_key"]
        policy = root.sys.read_policy(f"{tag}-appliance")["data"]["rules"]
        root.sys.create_or_update_policy(f"{tag}-appliance", policy + f'\npath "{ssh_mount}/sign/bot" '
                                                                      '{ capabilities = ["update"] }\n')
        sshd = Sshd(net, user_ca)
        known_hosts = workdir / "upstream_known_hosts"
        known_hosts.write_text(sshd.known_hosts_line() + "\n")
        config = workdir / "botwarden.toml"
        probes = f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "{PIN_DIR}"\nmap_entries = 4096'
        config.write_text(config_header(workdir, bao, probes=probes) + sftp_config(sshd, known_hosts, ssh_mount))
        daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
        bot_home = Path(tempfile.mkdtemp(prefix="bw-sftp-bot-"))
        os.chmod(bot_home, 0o777)  # the bot runs as nobody: its local files live here
        (bot_home / "known_hosts").write_text(cli(config, "ssh", "known-hosts").stdout.strip() + "\n")
        yield {"net": net, "sshd": sshd, "daemon": daemon, "config": config, "bot_home": bot_home,
               "bao": bao_server, "ssh_mount": ssh_mount}
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


@pytest.fixture(scope="module")
def world(bao_server, tmp_path_factory):
    with sftp_world(bao_server, tmp_path_factory.mktemp("ssh-sftp")) as w:
        yield w


@pytest.fixture
def area():
    shutil.rmtree(AREA, ignore_errors=True)
    for d in (OPEN, LOCKED, HELD):
        d.mkdir(parents=True)
    (LOCKED / "keep.txt").write_text("locked content\n")
    yield AREA
    shutil.rmtree(AREA, ignore_errors=True)


def bot_file(world, name: str, data: bytes) -> Path:
    path = world["bot_home"] / name
    path.write_bytes(data)
    os.chmod(path, 0o666)
    return path


def sftp_bot(world, batch: str):
    """`sftp -b batch root@target` as the bot: a line starting with '-' may fail without ending the batch."""
    sshd, home = world["sshd"], world["bot_home"]
    script = home / f"batch-{uuid.uuid4().hex[:8]}"
    script.write_text(batch)
    os.chmod(script, 0o644)
    return bot_run(world["config"], BOT, [
        "/usr/bin/sftp", *SSH_OPTS, "-o", f"UserKnownHostsFile={home / 'known_hosts'}", "-b", str(script),
        "-P", str(sshd.port), f"root@{sshd.host}"], env={"HOME": str(home)}, timeout=120)


def scp_bot(world, *args: str):
    sshd, home = world["sshd"], world["bot_home"]
    return bot_run(world["config"], BOT, [
        "/usr/bin/scp", *SSH_OPTS, *(["-v"] if os.environ.get("BW_SCP_DEBUG") else []), "-o", f"UserKnownHostsFile={home / 'known_hosts'}", "-P", str(sshd.port),
        *args], env={"HOME": str(home)}, timeout=120)


def remote(world, path: Path) -> str:
    return f"root@{world['sshd'].host}:{path}"


def rows(world, like: str) -> list[dict]:
    return world["daemon"].audit_sql(
        "SELECT text, params, decision, rule, rows, error FROM requests WHERE kind = 'sftp' AND text LIKE ? "
        "ORDER BY seq", [like])


def test_put_and_get_allowed_content_identical_and_recorded(world, area, tmp_path):
    data = os.urandom(300_000) + b"tail\n"
    src = bot_file(world, "payload.bin", data)
    back = world["bot_home"] / "payload.back"
    ran = sftp_bot(world, f"put {src} {OPEN}/payload.bin\nget {OPEN}/payload.bin {back}\n")
    assert ran.returncode == 0, ran
    assert (OPEN / "payload.bin").read_bytes() == data
    assert back.read_bytes() == data
    # A direct sftp get of the same file (no botwarden) returns the same bytes.
    direct = tmp_path / "direct.bin"
    ssh_direct(world, "true", tmp_path)  # makes the test's own certificate and known_hosts
    got = subprocess.run([*world["net"].prefix, "/usr/bin/sftp", *SSH_OPTS, "-i", str(tmp_path / "id"),
                          "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}", "-P", str(world["sshd"].port),
                          f"root@{world['sshd'].host}:{OPEN}/payload.bin", str(direct)],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert direct.read_bytes() == back.read_bytes()
    assert "Starting session: subsystem 'sftp' for root" in world["sshd"].logged()
    put = rows(world, f"sftp write '{OPEN}/payload.bin'")
    got_rows = rows(world, f"sftp read '{OPEN}/payload.bin'")
    assert [(r["decision"], r["rows"], r["params"]) for r in put] == [
        ("allow", len(data), [f"{OPEN}/payload.bin", f"size={len(data)}"])]
    assert [(r["decision"], r["rows"]) for r in got_rows] == [("allow", len(data))]


def test_refused_put_is_permission_denied_and_the_session_goes_on(world, area):
    src = bot_file(world, "evil.txt", b"overwrite\n")
    (OPEN / "later.txt").write_text("fetched after the refusal\n")
    later = world["bot_home"] / "later.txt"
    later.unlink(missing_ok=True)
    ran = sftp_bot(world, f"-put {src} {LOCKED}/keep.txt\nget {OPEN}/later.txt {later}\n")
    assert ran.returncode == 0, ran
    assert "Permission denied" in ran.stderr and "locked-is-read-only" in ran.stderr, ran.stderr
    assert (LOCKED / "keep.txt").read_text() == "locked content\n"
    assert later.read_text() == "fetched after the refusal\n"  # same sftp session, after the refusal
    refused = rows(world, f"sftp write '{LOCKED}/keep.txt'")
    assert [(r["decision"], r["rule"]) for r in refused] == [("block", "locked-is-read-only")]
    assert "nothing under locked/ changes" in refused[0]["error"]


def test_remove_and_rename_refused_by_path(world, area):
    (OPEN / "movable.txt").write_text("m\n")
    ran = sftp_bot(world, f"-rm {LOCKED}/keep.txt\n-rename {LOCKED}/keep.txt {OPEN}/stolen.txt\n"
                          f"-rename {OPEN}/movable.txt {LOCKED}/planted.txt\n"
                          f"rename {OPEN}/movable.txt {OPEN}/moved.txt\n")
    assert ran.returncode == 0, ran
    assert ran.stderr.count("Permission denied") == 3, ran.stderr
    assert (LOCKED / "keep.txt").exists() and not (OPEN / "stolen.txt").exists()
    assert not (LOCKED / "planted.txt").exists() and (OPEN / "moved.txt").read_text() == "m\n"
    assert [(r["decision"], r["rule"]) for r in rows(world, f"sftp remove '{LOCKED}/keep.txt'")] == [
        ("block", "locked-is-read-only")]
    renames = rows(world, f"sftp rename '{AREA}/%")
    assert [(r["params"], r["decision"]) for r in renames] == [
        ([f"{LOCKED}/keep.txt", f"{OPEN}/stolen.txt"], "block"),     # the source path is refused
        ([f"{OPEN}/movable.txt", f"{LOCKED}/planted.txt"], "block"),  # so is the destination
        ([f"{OPEN}/movable.txt", f"{OPEN}/moved.txt"], "allow")]


def test_scp_sftp_mode_put_get_and_refusal(world, area):
    data = os.urandom(100_000)
    src = bot_file(world, "scp.bin", data)
    back = world["bot_home"] / "scp.back"
    back.unlink(missing_ok=True)
    put = scp_bot(world, str(src), remote(world, OPEN / "scp.bin"))
    assert put.returncode == 0, put
    get = scp_bot(world, remote(world, OPEN / "scp.bin"), str(back))
    assert get.returncode == 0 and back.read_bytes() == data == (OPEN / "scp.bin").read_bytes(), get
    refused = scp_bot(world, str(src), remote(world, LOCKED / "keep.txt"))
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    assert (LOCKED / "keep.txt").read_text() == "locked content\n"
    # OpenSSH 9's scp spoke SFTP: the operations are sftp rows, no `scp -t` command ran.
    assert [r["decision"] for r in rows(world, f"sftp write '{OPEN}/scp.bin'")] == ["allow"]
    assert [r["decision"] for r in rows(world, f"sftp write '{LOCKED}/keep.txt'")][-1] == "block"


@pytest.mark.parametrize("approve", [True, False])
def test_held_write_waits_for_an_operator(world, area, approve):
    src = bot_file(world, "held.txt", b"held content\n")
    target = HELD / ("yes.txt" if approve else "no.txt")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(ran=sftp_bot(world, f"-put {src} {target}\n")))
    t.start()
    item = None
    for _ in range(300):
        items = json.loads(cli(world["config"], "approvals", "list", "--json").stdout or "[]")
        if items:
            item = items[0]
            break
        time.sleep(0.1)
    assert item is not None and item["rule"] == "held-writes-need-approval", item
    assert item["request"] == f"sftp write '{target}'" and not target.exists()
    verb = ["approve", item["approval_id"], "--reason", "ok"] if approve else ["deny", item["approval_id"],
                                                                                  "--reason", "not now"]
    assert cli(world["config"], "approvals", *verb).returncode == 0
    t.join(90)
    ran = result["ran"]
    assert f"botwarden: waiting for approval {item['approval_id']}" in ran.stderr, ran.stderr
    if approve:
        assert target.read_bytes() == b"held content\n", ran
    else:
        assert "Permission denied" in ran.stderr and not target.exists(), ran
    assert [r["decision"] for r in rows(world, f"sftp write '{target}'")] == ["approve" if approve else "deny"]


# A card number and an AWS key id (content detectors flag both); the rest of the file is plain text.
SECRET_CARD = "4111111111111111"
SECRET_AWS = "AKIAIOSFODNN7EXAMPLE"


def sftp_session(world, text: str) -> str:
    found = world["daemon"].audit_sql("SELECT session_id FROM requests WHERE kind = 'sftp' AND text = ? "
                                      "ORDER BY seq DESC LIMIT 1", [text])
    assert found, f"no requests row {text!r}"
    return found[0]["session_id"]


def recording(world, session_id: str) -> list[dict]:
    rows = world["daemon"].audit_sql("SELECT seq, direction, data FROM recordings WHERE session_id = ? ORDER BY seq",
                                     [session_id])
    return [{**r, "data": bytes.fromhex(r["data"])} for r in rows]


def test_downloads_are_recorded_through_the_detectors_uploads_counted(world, area, tmp_path):
    """Issue 18: SFTP file contents in the recording. A download's content is in it (and in the
    replay and the JSON lines export) with the card number and the AWS key starred; an upload's is
    not (counted, like an exec's stdin); both files' operations and sizes are events."""
    report = "".join(f"quarterly line {i} nothing secret here\n" for i in range(2000))
    content = f"{report}card {SECRET_CARD} key {SECRET_AWS}\nthe end of the report\n".encode()
    (OPEN / "report.txt").write_bytes(content)
    upload = b"uploaded-marker-7c1e " * 500
    src = bot_file(world, "upload.txt", upload)
    back = world["bot_home"] / "report.back"
    ran = sftp_bot(world, f"get {OPEN}/report.txt {back}\nput {src} {OPEN}/upload.txt\n")
    assert ran.returncode == 0, ran
    assert back.read_bytes() == content           # the bot got the file as it is
    sid = sftp_session(world, f"sftp read '{OPEN}/report.txt'")
    rows = recording(world, sid)
    out = b"".join(r["data"] for r in rows if r["direction"] == "out")
    assert b"quarterly line 1999 nothing secret here\n" in out and out.endswith(b"the end of the report\n")
    assert len(out) > len(report)
    for secret in (SECRET_CARD.encode(), SECRET_AWS.encode(), b"uploaded-marker"):
        assert all(secret not in r["data"] for r in rows), secret
    assert not any(r["direction"] == "in" for r in rows)
    events = [json.loads(r["data"]) for r in rows if r["direction"] == "event"]
    ends = {e["path"]: e for e in events if e.get("event") == "sftp_end"}
    assert ends[f"{OPEN}/report.txt"]["read_bytes"] == len(content)
    assert ends[f"{OPEN}/upload.txt"]["written_bytes"] == len(upload)
    assert ends[f"{OPEN}/upload.txt"]["size"] == len(upload)
    assert [e["op"] for e in events if e.get("event") == "sftp"] == ["read", "write"]

    replayed = cli(world["config"], "replay", "--no-wait", sid)
    assert replayed.returncode == 0, replayed.stderr
    assert f"-- sftp read '{OPEN}/report.txt' closed: {len(content)} bytes read, 0 bytes written" in replayed.stdout
    assert (f"-- sftp write '{OPEN}/upload.txt' closed: 0 bytes read, {len(upload)} bytes written "
            f"(uploads are counted, not recorded), size {len(upload)}") in replayed.stdout
    assert "quarterly line 1999 nothing secret here" in replayed.stdout
    jsonl = tmp_path / "sftp.jsonl"
    exported = cli(world["config"], "session", "export", sid, "--jsonl", str(jsonl))
    assert exported.returncode == 0, exported.stderr
    text = jsonl.read_text()
    assert "quarterly line 1999 nothing secret here" in text
    for secret in (SECRET_CARD, SECRET_AWS, "uploaded-marker"):
        assert secret not in text and secret not in replayed.stdout


def test_a_download_past_the_recording_cap_ends_in_the_truncated_marker(world, area):
    config = world["config"]
    base = config.read_text()
    daemon = world["daemon"]

    def reload(text: str) -> None:
        before = daemon.client().get("/v1/status")["reloads"]
        config.write_text(text)
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while daemon.client().get("/v1/status")["reloads"] == before:
            assert time.monotonic() < deadline, daemon.output()[-2000:]
            time.sleep(0.1)
        assert daemon.client().get("/v1/status")["last_reload_error"] is None

    (OPEN / "big.txt").write_bytes(b"".join(b"line %06d of a long log\n" % i for i in range(4000)))
    reload(base.replace("[audit]\n", "[audit]\nrecording_max_bytes = 4096\n", 1))
    try:
        back = world["bot_home"] / "big.back"
        ran = sftp_bot(world, f"get {OPEN}/big.txt {back}\n")
        assert ran.returncode == 0, ran
        assert back.read_bytes() == (OPEN / "big.txt").read_bytes()   # the bot's transfer is whole
    finally:
        reload(base)
    sid = sftp_session(world, f"sftp read '{OPEN}/big.txt'")
    rows = recording(world, sid)
    assert json.loads(rows[-1]["data"]) == {"type": "truncated", "reason": "recording_max_bytes", "max_bytes": 4096}
    assert sum(len(r["data"]) for r in rows[:-1]) == 4096
    assert b"line 000000 of a long log\n" in b"".join(r["data"] for r in rows if r["direction"] == "out")
    replayed = cli(world["config"], "replay", "--no-wait", sid)
    assert "-- botwarden: the recording stops here: the session reached [audit] recording_max_bytes (4096 bytes)" \
        in replayed.stdout
