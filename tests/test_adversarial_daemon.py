"""Issue 26 (items 2, 4 and 6), adversarial, against the REAL daemon with its eBPF probes.

One daemon serves the module: `botwarden run` with the probes attached to its own bots cgroup
(``botwarden-adv.bots``), a real PostgreSQL 15 as the target (token + attestation), a real
OpenBao (database secrets engine, OIDC tokens). Bots are started with `botwarden bot run`, as
the unprivileged user ``nobody`` (``setpriv``) where the case needs a bot of its own uid. The
control socket belongs to nobody's group, as an operator group that a bot's uid is in would.

- 26.2: the bot (its uid, its cgroup, the CLI run from its cgroup) cannot approve its own held
  statement; an operator outside it can. The process-tree rule is checked on real processes.
- 26.4: two ordinary local users flood the listener with idle connections; a bot's psql still
  works, the daemon's file descriptors stay bounded, refusals are audited (rate-limited).
- 26.6: a half-sent message after login ends the session (08P01), its upstream backend and its
  database user; a valid token from the wrong process leaves its subject in the session row.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import tempfile
import threading
import signal
import time
from pathlib import Path

import pytest

from tests.probes_fixtures import RUN_TAG

from appliance.approvals import caller_is_part_of_the_bot
from appliance.fronts.admission import REFUSAL_EVENT_INTERVAL_S
from appliance.sandbox import config_header
from probes import cgroups
from tests.adversarial_fixtures import fd_count, rss_kib
from tests.approvals_fixtures import as_user, wait_until
from tests.daemon_fixtures import PSQL, ROOT, DaemonProcess, fresh_setup, new_port

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BOTS = f"botwarden-adv-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-adv-{RUN_TAG}"
BOT = "adv-bot"
NOBODY = pwd.getpwnam("nobody")
OTHER_UID = pwd.getpwnam("daemon").pw_uid  # not the bot's uid, but in the operator group below
AS_NOBODY: list[str] = []  # `bot run --user nobody` (BotProcess) switches user after joining the cgroup
SYSTEM_PYTHON = "/usr/bin/python3"  # executable by every user (the venv's is not)
PER_UID, TOTAL, PRESSURE_TIMEOUT_S, MESSAGE_TIMEOUT_S = 8, 12, 3, 3
FLOODERS = (42421, 42422)  # two ordinary local users (uids without a passwd entry)

RULES = """
[[rules]]
name = "ledger-deletes-need-approval"
action = "approve"
[rules.sql]
kinds = ["DELETE"]
relations = ["adv_ledger"]
"""


def write_adv_config(path: Path, *, workdir: Path, pg, bao, socket_path: Path, port: int) -> Path:
    import grp

    ops = grp.getgrgid(NOBODY.pw_gid).gr_name
    probes = (f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "{PIN_DIR}"\nnft_table = "botwarden_adv_{RUN_TAG}"\n'
              f'map_entries = 4096\nunix_allow = ["{socket_path}"]')  # the self-approval cases call the control socket
    header = config_header(workdir, bao, socket_path=socket_path, probes=probes, approvals_timeout_s=120,
                           appliance_extra=f'control_socket_group = "{ops}"\ncontrol_socket_mode = "0660"\n')
    path.write_text(header + f"""
[limits]
unauthenticated_per_uid = {PER_UID}
unauthenticated_total = {TOTAL}
unauthenticated_timeout_s = 30
unauthenticated_timeout_under_pressure_s = {PRESSURE_TIMEOUT_S}
message_timeout_s = {MESSAGE_TIMEOUT_S}

[[targets]]
name = "ledger"
protocol = "postgres"
address = "{pg.host}:{pg.port}"
listen = "127.0.0.1:{port}"
allow_plaintext = true
authentication = "token+attestation"
[targets.tls]
mode = "require"
[targets.credential]
source = "database"
mount = "{bao.db_mount}"
role = "{bao.db_role}"

[[identities]]
name = "adv-bot"
[identities.token]
subject = "{bao.bot_entity_id()}"
[identities.process]
cgroup = "{BOT}"
{RULES}
""")
    return path


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adversarial")
    pg_server.psql("DROP TABLE IF EXISTS adv_ledger; CREATE TABLE adv_ledger (id int PRIMARY KEY, note text);"
                   "INSERT INTO adv_ledger SELECT g, 'row ' || g FROM generate_series(1, 20) g;"
                   "GRANT ALL ON adv_ledger TO PUBLIC")
    setup = fresh_setup(bao_server, pg_server, workdir)
    top = Path(tempfile.mkdtemp(prefix="bw-adv-"))
    top.chmod(0o711)  # other uids may reach the control socket's own directory (0750 root:<group>)
    socket_path = top / "run" / "control.sock"
    port = new_port()
    config = write_adv_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup,
                              socket_path=socket_path, port=port)
    daemon = DaemonProcess(config, socket_path).start()
    try:
        yield type("Env", (), {"pg": pg_server, "bao": setup, "port": port, "config": config, "daemon": daemon,
                               "socket": socket_path, "entity_id": setup.bot_entity_id()})
    finally:
        try:
            daemon.stop()
        finally:
            subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), "probes", "detach"],
                           cwd=ROOT, capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
            cgroups.remove(BOTS)


class BotProcess:
    """`botwarden bot run --name NAME -- ARGV` in the background; it execs ARGV in place, so the
    pid is the bot's. stderr is read as it comes (the NOTICE naming a held statement's id)."""

    def __init__(self, config: Path, name: str, argv: list[str], env: dict | None = None):
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(config), "bot", "run",
                                      "--name", name, "--user", NOBODY.pw_name, "--", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**base, "PYTHONPATH": str(ROOT), **(env or {})})
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def held_id(self) -> str:
        marker = "held for approval "
        line = wait_until(lambda: next((x for x in list(self.err) if marker in x), None), 30,
                          f"the NOTICE of a held statement (stderr: {''.join(self.err)!r})")
        return line.split(marker, 1)[1].split()[0]

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out = self.proc.stdout.read()
        self.proc.wait(timeout)
        self._reader.join(5)
        return self.proc.returncode, out, "".join(self.err)


def psql_argv(port: int, *sql: str) -> list[str]:
    args = [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1", "-p", str(port), "-U", BOT,
            "-d", "postgres"]
    for s in sql:
        args += ["-c", s]
    return args


def bot_env(token: str) -> dict:
    return {"PGPASSWORD": token, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}


def role_exists(pg, name: str) -> bool:
    return pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "1"


# -- 26.2: a bot cannot approve its own held request -------------------------------------------


def test_bot_cannot_approve_its_own_held_statement_over_http_or_the_cli(env):
    bot = BotProcess(env.config, BOT, AS_NOBODY + psql_argv(env.pg.port, "DELETE FROM adv_ledger WHERE id = 1"),
                     bot_env(env.bao.mint_token()))
    approval_id = bot.held_id()
    held = next(a for a in env.daemon.client().get("/v1/approvals")["approvals"] if a["approval_id"] == approval_id)
    assert held["process"]["uid"] == NOBODY.pw_uid and held["process"]["cgroup"] == f"/{BOTS}/{BOT}"
    bot_cgroup = cgroups.bot_cgroup(BOTS, BOT)
    path = f"/v1/approvals/{approval_id}/approve"

    # The bot's own uid, from inside its cgroup: raw HTTP on the control socket.
    status, doc = as_user(NOBODY.pw_uid, NOBODY.pw_gid, env.socket, "POST", path, {"reason": "me"}, cgroup=bot_cgroup)
    assert status == 403, doc
    assert f"uid {NOBODY.pw_uid} is the uid of the process whose request is held" in doc["error"]
    # Another uid of the operator group, but running in the bots cgroup.
    status, doc = as_user(OTHER_UID, NOBODY.pw_gid, env.socket, "POST", path, {"reason": "me"}, cgroup=bot_cgroup)
    assert status == 403, doc
    assert f"runs in the bots cgroup /{BOTS}/{BOT}" in doc["error"]
    # Root, but the CLI started inside the bot's cgroup (as a compromised bot would run it).
    cli_in_cgroup = cgroups.spawn(bot_cgroup, [sys.executable, "-m", "appliance.cli", "--config", str(env.config),
                                               "approvals", "approve", approval_id], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = cli_in_cgroup.communicate(timeout=60)
    assert cli_in_cgroup.returncode == 1, (out, err)
    assert "approve refused" in err and "bots cgroup" in err and "a bot may not decide its own held request" in err
    # Nothing ran: the row is still there, the statement still held.
    assert env.pg.psql("SELECT count(*) FROM adv_ledger WHERE id = 1") == "1"
    assert approval_id in {a["approval_id"] for a in env.daemon.client().get("/v1/approvals")["approvals"]}

    # An ordinary operator (root, outside every bots cgroup, not the bot's uid) approves.
    res = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(env.config), "approvals", "approve",
                          approval_id, "--reason", "checked"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    code, out, err = bot.finish()
    assert code == 0 and "DELETE 1" in out, (out, err)
    assert env.pg.psql("SELECT count(*) FROM adv_ledger WHERE id = 1") == "0"

    rows = env.daemon.audit_sql("SELECT event, operator_uid, reason FROM approvals WHERE approval_id = ? "
                                "AND event NOT IN ('notified', 'notify_failed') ORDER BY chain_seq", [approval_id])
    assert [(r["event"], r["operator_uid"]) for r in rows] == [
        ("requested", None), ("decision_refused", NOBODY.pw_uid), ("decision_refused", OTHER_UID),
        ("decision_refused", 0), ("approved", 0)]
    assert all("a bot may not decide its own held request" in r["reason"] for r in rows[1:4])


def test_bot_in_its_cgroup_cannot_deny_either_but_an_operator_of_its_uid_may(env):
    """Denying runs nothing, so sharing the bot's uid does not stop an operator from saying no;
    a process in the bots cgroup decides nothing at all."""
    bot = BotProcess(env.config, BOT, AS_NOBODY + psql_argv(env.pg.port, "DELETE FROM adv_ledger WHERE id = 2"),
                     bot_env(env.bao.mint_token()))
    approval_id = bot.held_id()
    path = f"/v1/approvals/{approval_id}/deny"
    status, doc = as_user(NOBODY.pw_uid, NOBODY.pw_gid, env.socket, "POST", path, {"reason": "no"},
                          cgroup=cgroups.bot_cgroup(BOTS, BOT))
    assert status == 403 and "deny refused" in doc["error"] and "bots cgroup" in doc["error"], doc
    status, doc = as_user(NOBODY.pw_uid, NOBODY.pw_gid, env.socket, "POST", path, {"reason": "not today"})
    assert status == 200, doc
    code, out, err = bot.finish()
    assert "statement denied by nobody: not today" in err
    assert env.pg.psql("SELECT count(*) FROM adv_ledger WHERE id = 2") == "1"


def test_the_session_process_tree_may_not_decide(tmp_path):
    """The rule's process-tree part on real processes: a descendant of the session's process and
    an ancestor of it (the supervisor that started it) are refused; an unrelated one is not."""
    parent = subprocess.Popen(["/bin/sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    unrelated = subprocess.Popen(["sleep", "60"])
    child = int(parent.stdout.readline())
    try:
        bots = ("/botwarden-none.bots",)
        session = {"pid": parent.pid, "uid": 12345}
        assert "belongs to the process tree of the session's process" in caller_is_part_of_the_bot(
            session, child, 0, bots)
        assert "started the session's process" in caller_is_part_of_the_bot({"pid": child, "uid": 12345},
                                                                            parent.pid, 0, bots)
        assert caller_is_part_of_the_bot(session, unrelated.pid, 0, bots) is None
        assert "uid 12345" in caller_is_part_of_the_bot(session, unrelated.pid, 12345, bots)
        assert caller_is_part_of_the_bot(session, unrelated.pid, 12345, bots, check_uid=False) is None
        assert "cannot be identified" in caller_is_part_of_the_bot(session, 0, 0, bots)
        in_bots = cgroups.spawn(cgroups.bot_cgroup(BOTS, "tree-check"), ["sleep", "60"])
        try:
            assert f"runs in the bots cgroup /{BOTS}/tree-check" in caller_is_part_of_the_bot(
                session, in_bots.pid, 0, (f"/{BOTS}",))
        finally:
            in_bots.kill()
            in_bots.wait()
            cgroups.remove(f"{BOTS}/tree-check")
    finally:
        os.kill(child, signal.SIGKILL)
        for p in (parent, unrelated):
            p.kill()
            p.wait()


# -- 26.6: token_subject of a valid token refused for the wrong process ------------------------


def test_valid_token_from_the_wrong_process_names_its_subject_in_the_session_row(env):
    bot = BotProcess(env.config, "stranger", psql_argv(env.pg.port, "SELECT 1"), bot_env(env.bao.mint_token()))
    code, out, err = bot.finish()
    assert code != 0 and "process not allowed" in err, err

    def row():
        got = env.daemon.audit_sql("SELECT outcome, identity, token_subject, token_kid, cgroup_path FROM sessions "
                                   "WHERE pid = ?", [bot.pid])
        return got[0] if got and got[0]["outcome"] != "open" else None

    r = wait_until(row, 20, "the refused session's row")
    assert r["outcome"] == "refused" and r["identity"] is None and r["cgroup_path"] == f"/{BOTS}/stranger"
    assert r["token_subject"] == env.entity_id and r["token_kid"]


# -- 26.6: a half-sent message after login --------------------------------------------------------

HALF_MESSAGE_BOT = r"""
import json, os, socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 10)
params = b"user\0adv-bot\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
def read_exactly(n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
def read_msg():
    head = read_exactly(5)
    if head is None:
        return None, b""
    return head[:1], read_exactly(struct.unpack("!i", head[1:])[0] - 4) or b""
kind, _ = read_msg()  # AuthenticationCleartextPassword
password = os.environ["TOKEN"].encode() + b"\0"
s.sendall(b"p" + struct.pack("!i", 4 + len(password)) + password)
while kind not in (b"Z", b"E", None):
    kind, body = read_msg()
if kind != b"Z":
    print(json.dumps({"login": False}), flush=True)
    sys.exit(1)
print(json.dumps({"login": True}), flush=True)
s.sendall(b"Q" + struct.pack("!i", 200) + b"SELECT 1")  # announces 200 bytes, sends 12
s.settimeout(60)
kind, body = read_msg()
fields = {p[:1].decode(): p[1:].decode() for p in body.split(b"\0") if p}
closed = read_exactly(1) is None
print(json.dumps({"type": kind.decode() if kind else None, "severity": fields.get("S"),
                  "sqlstate": fields.get("C"), "message": fields.get("M"), "closed": closed}), flush=True)
"""


def test_half_sent_message_after_login_ends_the_session_its_backend_and_its_user(env):
    bot = BotProcess(env.config, BOT, AS_NOBODY + [SYSTEM_PYTHON, "-c", HALF_MESSAGE_BOT, str(env.pg.port)],
                     {"TOKEN": env.bao.mint_token()})
    live = wait_until(lambda: next((s for s in env.daemon.client().get("/v1/sessions")["sessions"]
                                    if s["pid"] == bot.pid), None), 30, "the bot's session")
    user = live["credential_user"]
    code, out, err = bot.finish(timeout=90)
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0] == {"login": True}, (out, err)
    answer = lines[1]
    assert (answer["type"], answer["severity"], answer["sqlstate"]) == ("E", "FATAL", "08P01"), answer
    assert f"stayed incomplete for {MESSAGE_TIMEOUT_S}s" in answer["message"] and answer["closed"]
    # The upstream backend is gone, and the session's database user with it (lease revoked).
    wait_until(lambda: env.pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}'") == "0", 20,
               "the upstream backend to end")
    wait_until(lambda: not role_exists(env.pg, user), 30, f"role {user} revoked")
    row = wait_until(lambda: (r := env.daemon.audit_sql("SELECT outcome, error FROM sessions WHERE session_id = ?",
                                                        [live["session_id"]])) and r[0]["outcome"] != "open" and r[0],
                     20, "the session's end")
    assert row["outcome"] == "error" and "stayed incomplete" in row["error"]


# -- 26.4: a local user floods the listener ----------------------------------------------------------

FLOOD = r"""
import json, socket, sys, time
port, want, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks, opened, ended, failed = [], 0, 0, 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    while len(socks) < want and time.monotonic() < deadline:
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            failed += 1
            s.close()
            continue
        s.setblocking(False)
        socks.append(s)
        opened += 1
    time.sleep(0.2)
    alive = []
    for s in socks:
        try:
            s.recv(4096)  # anything (the refusal, an error) or EOF: the daemon let go of it
        except BlockingIOError:
            alive.append(s)
            continue
        except OSError:
            pass
        s.close()
        ended += 1
    socks = alive
print(json.dumps({"opened": opened, "ended_by_daemon": ended, "connect_failed": failed, "held_at_end": len(socks)}))
"""


def test_flood_of_idle_connections_is_capped_and_bots_keep_working(env):
    daemon_pid = env.daemon.client().get("/v1/status")["pid"]
    base_fds, base_rss = fd_count(daemon_pid), rss_kib(daemon_pid)
    flood_s, per_flooder = 14.0, 150
    def flood(uid: int) -> subprocess.Popen:
        return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                                 SYSTEM_PYTHON, "-c", FLOOD, str(env.port), str(per_flooder), str(flood_s)],
                                stdout=subprocess.PIPE, text=True)

    # The first user fills its own cap; the second then meets the total (each cap in turn).
    flooders = [flood(FLOODERS[0])]
    wait_until(lambda: env.daemon.client().get("/v1/status")["admission"]["unauthenticated"] >= PER_UID, 20,
               "the first user at its cap")
    flooders.append(flood(FLOODERS[1]))
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((fd_count(daemon_pid), rss_kib(daemon_pid)))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        time.sleep(4)  # the flood is on: both users at their caps, the total reached
        ran = BotProcess(env.config, BOT, AS_NOBODY + psql_argv(env.pg.port, "SELECT count(*) FROM adv_ledger"),
                         bot_env(env.bao.mint_token()))
        code, out, err = ran.finish()
        assert code == 0 and out.strip().isdigit(), (out, err)  # the bot's session worked during the flood
        reports = [json.loads(f.communicate(timeout=60)[0]) for f in flooders]
    finally:
        stop.set()
        sampler.join(5)
        for f in flooders:
            if f.poll() is None:
                f.kill()
                f.wait()
    peak_fds, peak_rss = max(s[0] for s in samples), max(s[1] for s in samples)
    after = wait_until(lambda: (n := fd_count(daemon_pid)) <= base_fds + 4 and n, 30, "the daemon's fds to come back")
    status = env.daemon.client().get("/v1/status")["admission"]
    measured = {"fds_before": base_fds, "fds_peak": peak_fds, "fds_after": after, "rss_kib_before": base_rss,
                "rss_kib_peak": peak_rss, "rss_kib_after": rss_kib(daemon_pid), "flooders": reports,
                "admission": status}
    print("flood measurements:", json.dumps(measured))
    Path(tempfile.gettempdir(), "botwarden-flood-measurements.json").write_text(json.dumps(measured))
    # Each flooder tried far more connections than the caps allow; the daemon held at most
    # PER_UID per user and TOTAL in all (each admitted one is one fd), plus the bot's session.
    assert all(r["opened"] > 2 * PER_UID for r in reports), reports
    assert peak_fds <= base_fds + TOTAL + 16, measured
    assert status["refused"] > 0 and status["timed_out"] > 0, status
    assert peak_rss - base_rss < 100 * 1024, measured  # bounded: no per-connection growth to hundreds of MB
    # Audited, rate-limited: at most one admission_refused event per user and kind of refusal
    # (which cap, or a timeout) per REFUSAL_EVENT_INTERVAL_S, each counting the ones it stands for.
    # Checked on the rows' own times, so a loaded machine stretching the flood changes nothing.
    rows = env.daemon.audit_sql("SELECT uid, detail, epoch_ms(ts) AS ms FROM probes "
                                "WHERE event = 'admission_refused' AND uid IN (?, ?) ORDER BY ts", list(FLOODERS))
    for uid in FLOODERS:
        mine = [r for r in rows if r["uid"] == uid]
        assert mine, rows
        by_kind: dict[str, list[int]] = {}
        for r in mine:
            why = r["detail"].split("refused before authentication: ", 1)[1]
            by_kind.setdefault(why.split(":", 1)[0][:40], []).append(r["ms"])
        for kind, times in by_kind.items():
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert all(g >= REFUSAL_EVENT_INTERVAL_S * 1000 - 50 for g in gaps), (uid, kind, gaps, rows)
    details = " ".join(r["detail"] for r in rows)
    assert "limits.unauthenticated_per_uid" in details and "refused before authentication" in details
    assert "limits.unauthenticated_total" in details


def test_a_refused_connection_gets_postgresqls_too_many_connections_error(env):
    """Beyond the cap a client gets 53300 at once, as from PostgreSQL itself, not a hang."""
    script = (f"import socket,sys,time\nsocks=[socket.create_connection(('127.0.0.1',{env.port}),5) for _ in "
              f"range({PER_UID})]\ntime.sleep(0.5)\ns=socket.create_connection(('127.0.0.1',{env.port}),5)\n"
              "s.settimeout(10)\nsys.stdout.write(s.recv(4096).decode('latin-1'))\n")
    uid = 42423
    res = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", SYSTEM_PYTHON,
                          "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("E") and "C53300" in res.stdout and "too many connections" in res.stdout, res.stdout


# -- 26.6: output to a reader that went away ------------------------------------------------------


@pytest.mark.parametrize("args", [["status"], ["sessions", "--all"], ["audit", "sql", "SELECT * FROM chain"]])
def test_cli_output_into_a_closed_pipe_ends_quietly(env, args):
    """`botwarden status | head -1`: the reader is gone before the output is flushed. A pipe whose
    read end is already closed makes that certain (every write gets EPIPE)."""
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(env.config), *args], cwd=ROOT,
                             stdout=w, stderr=subprocess.PIPE, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(w)
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, res.stderr
    assert res.stderr == "" and res.returncode == 141


def test_cli_status_piped_into_head(env):
    res = subprocess.run(f"{sys.executable} -m appliance.cli --config {env.config} status | head -1", shell=True,
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.stdout.startswith("botwarden daemon running") and res.stdout.count("\n") == 1
    assert res.stderr == "", res.stderr
