"""The console (Textual Pilot, in this process) deciding SSH and Kubernetes requests held by a
real daemon: a real OpenSSH `ssh` run as a bot through the eBPF redirect to a real sshd
(tests/test_ssh_front.py's world), and a real kubectl 1.20 against a real kube-apiserver
(tests/k8s_fixtures.py). They share the one approvals queue with SQL; what each test checks
happens at the real client after the key press: the command ran (its file exists, ssh exited
0), kubectl deleted the deployment or got botwarden's refusal.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_fixtures import ROOT
from tests.k8s_fixtures import K8sEnv, start_k8s_env
from tests.test_ssh_front import BOT as SSH_BOT
from tests.test_ssh_front import SSH, world  # noqa: F401  (the module's fixture: sshd, daemon, bot's known_hosts)
from tests.test_tui import make_app, table_rows, text_of, until
from tests.test_tui_daemon import decide, held
from tui.app import BotwardenApp

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


class DetachedSsh:
    """`ssh root@host CMD` as the bot (`bot run` in the bots' cgroup, as nobody), started through
    ``setsid -f`` so this test process (the operator) is not one of the bot's ancestors: botwarden
    refuses a decision from the bot's own process tree. A shell around ssh prints its exit status
    (``setsid -f`` does not hand it back); the pipes still come here."""

    def __init__(self, world: dict, command: str):
        sshd = world["sshd"]
        ssh = " ".join([SSH, "-F", "/dev/null", "-o", f"UserKnownHostsFile={world['bot_home'] / 'known_hosts'}",
                        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                        "-p", str(sshd.port), f"root@{sshd.host}", f"'{command}'"])
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.proc = subprocess.Popen(
            ["setsid", "-f", sys.executable, "-m", "appliance.cli", "--config", str(world["config"]), "bot", "run",
             "--name", SSH_BOT, "--user", "nobody", "--", "/bin/sh", "-c", f'{ssh}; echo "ssh exited $?"'],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**base, "PYTHONPATH": str(ROOT), "HOME": str(world["bot_home"])})
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def finish(self, timeout: float = 60) -> tuple[str, str]:
        out = self.proc.stdout.read()
        self._reader.join(timeout)
        self.proc.wait(timeout)
        return out, "".join(self.err)


async def held_of(pilot, app: BotwardenApp, protocol: str, limit_s: float = 60) -> dict[str, Any]:
    await until(pilot, lambda: any(a.get("protocol") == protocol for a in app.book.items()),
                f"a held {protocol} request", limit_s)
    item = next(a for a in app.book.items() if a.get("protocol") == protocol)
    return await held(pilot, app, item["approval_id"])


def row_of(app: BotwardenApp, approval_id: str) -> list[str]:
    return next(r for r in table_rows(app, "#approvals-table") if r[0] == approval_id)


def test_held_ssh_command_shows_its_command_line_and_runs_once_approved_in_the_console(world):  # noqa: F811
    # A plain path: a random temp name would look like a secret to the audit's redaction.
    workdir = Path("/tmp/bw-tui-ssh-held")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    marker = workdir / "made"
    command = f"touch {marker}"
    sshd = world["sshd"]

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        app = make_app(str(world["daemon"].socket))
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.watch_live, "the approvals stream", 30)
            bot = DetachedSsh(world, command)
            item = await held_of(pilot, app, "ssh")
            seen["item"], seen["row"], seen["detail"] = item, row_of(app, item["approval_id"]), \
                text_of(app, "#approval-detail")
            seen["ran_while_held"] = marker.exists()
            seen["what"] = await decide(pilot, app, item["approval_id"], "f6", *"restart ok")
            seen["bot"] = await asyncio.to_thread(bot.finish)
            # The session in the sessions list, with its protocol; Enter replays its commands.
            await pilot.press("f2")
            sid = item["session_id"]
            await until(pilot, lambda: any(s["session_id"] == sid for s in app.sessions), "the ssh session", 30)
            table = app.query_one("#sessions-table")
            table.move_cursor(row=table.get_row_index(sid))
            seen["session_row"] = table_rows(app, "#sessions-table")[table.get_row_index(sid)]
            seen["session_detail"] = text_of(app, "#session-detail")
            await pilot.press("enter")
            await until(pilot, lambda: any(command in r for r in table_rows(app, "#replay-table")),
                        "the replayed command", 30)
            seen["replay"], seen["replay_msg"] = table_rows(app, "#replay-table"), text_of(app, "#replay-msg")
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        ran = marker.exists()
        shutil.rmtree(workdir, ignore_errors=True)
    item = seen["item"]
    assert item["request"] == command and item["target"] == "web-1"
    row = seen["row"]
    assert row[1:6] == ["deploy-bot", "web-1", "ssh", "touch-needs-approval", command], row
    d = seen["detail"]
    # The command line, and where it runs: the session's login on the real sshd.
    assert f"command {command}" in d and f"runs as root@{sshd.host}:{sshd.port}" in d, d
    assert "web-1 (ssh)" in d and "exe /usr/bin/ssh" in d and "no earlier decision on this command shape" in d, d
    assert not seen["ran_while_held"]
    assert (f"Runs the command above once, for identity deploy-bot on target web-1 (as root@{sshd.host}:"
            f"{sshd.port})") in seen["what"]
    out, err = seen["bot"]
    # The command ran on the real host once approved: ssh exited 0 and the file is there.
    assert "ssh exited 0" in out and ran, (out, err)
    assert f"botwarden: waiting for approval {item['approval_id']}" in err
    srow = seen["session_row"]
    assert srow[1:4] == ["deploy-bot", "web-1", "ssh"], srow
    assert f"{item['session_id']}  deploy-bot → web-1 (ssh)" in seen["session_detail"]
    replayed = [r for r in seen["replay"] if r[2] == command]
    assert [r[1] for r in replayed] == ["ssh_exec"] and replayed[0][3] == "approve", seen["replay"]
    assert "(ssh, deploy-bot → web-1)" in seen["replay_msg"]
    rows = world["daemon"].audit_sql("SELECT a.operator FROM approvals a WHERE a.approval_id = ? "
                                     "AND a.event = 'approved'", [item["approval_id"]])
    assert rows == [{"operator": getpass.getuser()}]


@pytest.fixture(scope="module")
def k8s_env(kube, bao_server, pg_server):
    e = start_k8s_env(kube, bao_server, pg_server)
    try:
        yield e
    finally:
        e.close()


@pytest.mark.parametrize("approve", [True, False], ids=["approved", "denied"])
def test_held_kubectl_delete_shows_verb_resource_namespace_name_and_is_decided_in_the_console(
        k8s_env: K8sEnv, approve: bool) -> None:
    env = k8s_env
    ns = f"bw-{uuid.uuid4().hex[:8]}"
    direct = env.direct_kubeconfig()
    assert env.kubectl(direct, "create", "namespace", ns).returncode == 0
    res = env.kubectl(direct, "-n", ns, "create", "deployment", "web", "--image=registry.invalid/web:1")
    assert res.returncode == 0, res.stderr
    bot = env.bot_kubeconfig()
    home = bot.parent / "home"
    home.mkdir(exist_ok=True)

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        app = make_app(str(env.daemon.socket))
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.watch_live, "the approvals stream", 30)
            proc = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", ns, "delete", "deployment", "web"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={"HOME": str(home)})
            try:
                item = await held_of(pilot, app, "kubernetes", 30)
                seen["item"], seen["row"], seen["detail"] = item, row_of(app, item["approval_id"]), \
                    text_of(app, "#approval-detail")
                seen["waiting"] = proc.poll() is None
                seen["still_there"] = env.kubectl(direct, "-n", ns, "get", "deployment", "web").returncode == 0
                if approve:
                    seen["what"] = await decide(pilot, app, item["approval_id"], "f6", *"change 19")
                else:
                    seen["what"] = await decide(pilot, app, item["approval_id"], "f8", *"not in the window")
                seen["kubectl"] = await asyncio.to_thread(proc.communicate, timeout=60)
                seen["rc"] = proc.returncode
            finally:
                if proc.poll() is None:
                    proc.kill()
        return seen

    seen = asyncio.run(scenario())
    item, d = seen["item"], seen["detail"]
    assert item["target"] == "cluster" and f"delete deployments.apps web in {ns}" in item["request"]
    assert seen["row"][1:5] == ["deploy-bot", "cluster", "k8s", "deployment-deletes-need-approval"], seen["row"]
    # verb / resource / namespace / name, each named, from the front's parse of the request.
    assert f"kubernetes verb delete   resource deployments.apps   namespace {ns}   name web" in d, d
    # (The request line is the audit's redacted text: the long URL path may show masked.)
    assert f"request delete deployments.apps web in {ns} (DELETE " in d, d
    assert "cluster (kubernetes)" in d
    assert seen["waiting"] and seen["still_there"]  # nothing ran while it waited
    out, err = seen["kubectl"]
    gone = env.kubectl(direct, "-n", ns, "get", "deployment", "web")
    me = getpass.getuser()
    if approve:
        assert "Runs the request above once, for identity deploy-bot on target cluster" in seen["what"]
        assert seen["rc"] == 0 and 'deployment.apps "web" deleted' in out, err
        assert gone.returncode != 0 and "NotFound" in gone.stderr
    else:
        assert "The request above does not run; identity deploy-bot on target cluster gets your reason" \
            in seen["what"]
        # kubectl prints the API's Status message: botwarden's refusal with the operator's reason.
        assert seen["rc"] != 0 and "Forbidden" in err and f"denied by {me}: not in the window" in err, (out, err)
        assert gone.returncode == 0
    env.kubectl(direct, "delete", "namespace", ns, "--wait=false")
    decision = env.daemon.audit_sql("SELECT decision FROM requests WHERE protocol = 'k8s' AND text LIKE ?",
                                    [f"delete deployments.apps web in {ns}%"])
    assert [r["decision"] for r in decision] == ["approve" if approve else "deny"]
