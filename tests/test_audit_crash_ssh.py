"""Audit durability under kill -9 through the SSH front (issue 23; tests/test_audit_crash.py
does the same for PostgreSQL under load).

A bot started with `botwarden bot run` runs three loops of the real ``ssh`` at once through the
daemon (the eBPF redirect, an OpenBao-signed certificate per session, the real sshd in its
namespace); each command appends its loop's and its own number to a file on the server's side. Mid-loop the test kills (SIGKILL) the
daemon, starts it again on the same state, and checks that every command sshd ran (every
number in the file, the ones the kill cut off too) has its ``request_starts`` row: in strict
mode (the default) a command is journaled before it is forwarded. The audit process is killed
too, with a batch window longer than the test, so nothing of the loop was committed: only the
journal can keep the records (batched mode loses them: checked by running this with
``mode = "batched"``). Killing the audit process alone, the daemon goes on: a command it cannot
have recorded meanwhile is refused, never runs, and the bot's ssh is told why; the loops carry on
once the daemon has started a new audit process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.daemon_fixtures import ROOT, DaemonProcess
from tests.test_audit_crash import _wait_gone
from tests.test_ssh_front import BOT, SSH, world  # noqa: F401  (world: this module's own, module-scoped)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

LOOPS = 3
COMMANDS = 300  # per loop: more than run before the kill and after it fails


@pytest.mark.parametrize("kill", ["both", "audit"])
def test_a_killed_daemon_loses_no_ssh_command_that_reached_sshd(world, kill: str):
    sshd, daemon = world["sshd"], world["daemon"]
    # The module's daemon, again with a batch window longer than the test.
    daemon.stop()
    config = world["config"].with_name("crash.toml")
    config.write_text(world["config"].read_text().replace("flush_interval = 0.05", "flush_interval = 60\nbatch_max = 50000"))
    crashed = DaemonProcess(config, daemon.socket).start()
    trail = Path(tempfile.mkdtemp(prefix="bw-ssh-crash-")) / "ran"
    trail.parent.chmod(0o755)
    errors = trail.parent / "errors"  # what each loop's ssh printed on stderr (the bot runs as nobody)
    for j in range(LOOPS):
        (errors.parent / f"{errors.name}-{j}").touch(0o666)
        (errors.parent / f"{errors.name}-{j}").chmod(0o666)
    ssh = (f"{SSH} -F /dev/null -o UserKnownHostsFile={world['bot_home'] / 'known_hosts'} "
           f"-o StrictHostKeyChecking=yes -o BatchMode=yes -p {sshd.port} root@{sshd.host}")
    loop = " ".join(f'(i=0; while [ $i -lt {COMMANDS} ]; do i=$((i+1)); '
                    f'if {ssh} "echo {j}-$i >> {trail}" 2>>{errors}-{j}; then echo "ok {j}-$i"; else echo "fail {j}-$i"; fi; done) &'
                    for j in range(LOOPS)) + " wait"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    bot = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(config), "bot", "run",
                            "--name", BOT, "--user", "nobody", "--", "/bin/sh", "-c", loop], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env={**base, "PYTHONPATH": str(ROOT), "HOME": str(world["bot_home"])})
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(line.strip() for line in bot.stdout), daemon=True)
    reader.start()
    restarted = None
    try:
        audit_pid = crashed.client().get("/v1/status")["audit"]["pid"]
        deadline = time.monotonic() + 120
        while min(sum(1 for s in list(said) if s.startswith(f"ok {j}-")) for j in range(LOOPS)) < 6:
            assert bot.poll() is None and time.monotonic() < deadline, (said[-5:], crashed.output()[-3000:])
            time.sleep(0.05)
        os.kill(audit_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        if kill == "both":
            crashed.proc.kill()  # mid-command: each loop is always inside one
            crashed.proc.wait()
            while {s.split()[1].split("-")[0] for s in list(said) if s.startswith("fail")} != {str(j) for j in range(LOOPS)}:
                assert bot.poll() is None and time.monotonic() < deadline, said[-5:]  # every loop saw the daemon gone
                time.sleep(0.05)
        else:  # the daemon starts a new audit process; the loops go on
            before = {j: sum(1 for s in list(said) if s.startswith(f"ok {j}-")) for j in range(LOOPS)}
            while min(sum(1 for s in list(said) if s.startswith(f"ok {j}-")) - before[j] for j in range(LOOPS)) < 4:
                assert bot.poll() is None and time.monotonic() < deadline, (said[-5:], crashed.output()[-3000:])
                time.sleep(0.05)
            assert crashed.client().get("/v1/status")["audit"]["pid"] != audit_pid
        bot.send_signal(signal.SIGTERM)
        bot.wait(30)
        reader.join(10)
        _wait_gone(audit_pid)
        restarted = DaemonProcess(config, daemon.socket).start() if kill == "both" else crashed
        ran = trail.read_text().split()
        ok = [s.split()[1] for s in said if s.startswith("ok")]
        assert ran and set(ok) <= set(ran), (ok, ran)
        assert all(sum(1 for n in ran if n.startswith(f"{j}-")) >= 6 for j in range(LOOPS)), ran
        # The record keeps the command whole, the temporary path too (the audit's secret detector
        # judges a path's segments one by one; it used to take the random path for a secret).
        started = {m.group(1) for r in restarted.audit_sql("SELECT text FROM request_starts WHERE kind = 'ssh_exec'")
                   if (m := re.fullmatch(rf"echo (\d+-\d+) >> {re.escape(str(trail))}", r["text"]))}
        # Every command sshd ran has its record, journaled before it went to sshd (the ones the
        # kill cut off too: their numbers are in the file whether or not the bot saw the answer).
        missing = [n for n in ran if n not in started]
        assert missing == [], (missing, len(ran), len(started))
        if kill == "audit":  # fail closed: a refused command never ran, and the bot was told why
            failed = [s.split()[1] for s in said if s.startswith("fail")]
            # (at most one per loop ran: the one inside sshd when the process died, its record
            # journaled before; the session it ran in was ended, so its ssh failed)
            assert len(set(failed) & set(ran)) <= LOOPS, sorted(set(failed) & set(ran))
            lines = [line for j in range(LOOPS) if (errors.parent / f"{errors.name}-{j}").exists()
                     for line in (errors.parent / f"{errors.name}-{j}").read_text().splitlines()]
            assert not failed or lines
            # Each refused session's ssh printed our banner, then its "Permission denied ()."
            # (botwarden answers before login: the banner is the one place SSH shows a reason).
            denied = [line for line in lines if line.endswith(": Permission denied ().")]
            told = [line for line in lines if line.startswith("botwarden refuses new sessions: the audit store is "
                                                              "unavailable (the audit process exited (code -9)); "
                                                              "no session runs unaudited")]
            assert len(told) >= len(denied), lines
            other = [line for line in lines if line not in denied and line not in told]
            # (a command refused in a session open when the process died, or that session's end)
            assert len([line for line in other if "audit store" not in line]) <= LOOPS, other
        report = restarted.client().post("/v1/audit/verify", {"allow_gaps": True}, timeout=300)["report"]
        assert "replayed from its journal" in report, report
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.wait()
        for d in {id(d): d for d in (restarted, crashed) if d is not None}.values():
            d.stop()
