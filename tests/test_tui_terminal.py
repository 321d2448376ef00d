"""The console in a real terminal (tmux) against a real daemon, real OpenBao and PostgreSQL 15.

The bot is psql, held on a DELETE; the operator is the console, driven with tmux
``send-keys`` (each call is one write to the terminal: a burst, as fast typing or a paste
delivers it) and read with ``capture-pane``. What the operator confirmed in the dialog is
what happens at the real psql; everything else typed never decides and never quits.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from appliance.control import ControlClient
from tests.approvals_fixtures import Bot, wait_until
from tests.daemon_fixtures import ROOT, DaemonProcess, fresh_setup, new_port, write_config

pytestmark = pytest.mark.timeout(240)

CONSOLE_RULE = """
[[rules]]
name = "console-deletes-need-approval"
action = "approve"
[rules.sql]
kinds = ["DELETE"]
relations = ["console_ledger"]
"""


class Tmux:
    """One tmux server of our own (its own socket name), one pane running ``command``; when the
    command ends the pane prints its exit status and the terminal's modes, and stays."""

    def __init__(self, command: str, *, width: int = 170, height: int = 50):
        self.name = f"bw-tui-{uuid.uuid4().hex[:8]}"
        shell = f"{command}; echo EXIT=$?; stty -a; sleep 600"
        subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", "new-session", "-d", "-s", "console",
                        "-x", str(width), "-y", str(height), shell], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"})

    def send(self, *keys: str) -> None:
        """One send-keys call: tmux key names (F8, Enter, Tab, BTab, Escape) and literal text."""
        subprocess.run(["tmux", "-L", self.name, "send-keys", "-t", "console", *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "-L", self.name, "capture-pane", "-p", "-t", "console"], check=True,
                              capture_output=True, text=True).stdout

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        return wait_until(lambda: text in (s := self.screen()) and s, timeout, f"{text!r} on the console")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True)


def exists(pg, row_id: int) -> bool:
    return pg.psql(f"SELECT count(*) FROM console_ledger WHERE id = {row_id}") == "1"


def pending_ids(client: ControlClient) -> set[str]:
    return {a["approval_id"] for a in client.get("/v1/approvals")["approvals"]}


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("console")
    pg_server.psql("DROP TABLE IF EXISTS console_ledger; CREATE TABLE console_ledger (id int PRIMARY KEY);"
                   "INSERT INTO console_ledger SELECT generate_series(1, 20)")
    setup = fresh_setup(bao_server, pg_server, workdir)
    port = new_port()
    socket_path = Path(tempfile.mkdtemp(prefix="bw-console-")) / "run" / "control.sock"
    config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup, listen_port=port,
                          rules=CONSOLE_RULE, socket_path=socket_path)
    config.write_text(config.read_text().replace("[approvals]\ntimeout_s = 20\n", "[approvals]\ntimeout_s = 180\n"))
    daemon = DaemonProcess(config, socket_path).start()
    try:
        yield type("Env", (), {"pg": pg_server, "bao": setup, "port": port, "config": config, "daemon": daemon,
                               "client": daemon.client(), "workdir": workdir})
    finally:
        daemon.stop()


def console(env, pidfile: Path) -> Tmux:
    python = shlex.quote(sys.executable)
    command = (f"sh -c 'echo $$ > {pidfile}; exec {python} -m appliance.cli --config "
               f"{shlex.quote(str(env.config))} tui'")
    term = Tmux(command)
    term.wait_for("approvals stream live")
    return term


def hold(env, row_id: int) -> tuple[Bot, str]:
    bot = Bot(env.port, env.bao.mint_token(), f"DELETE FROM console_ledger WHERE id = {row_id}",
              f"SELECT count(*) FROM console_ledger WHERE id = {row_id}")
    return bot, bot.wait_held()


def approvals_audit(env, approval_id: str) -> list[tuple]:
    rows = env.daemon.audit_sql("SELECT event, operator, reason FROM approvals WHERE approval_id = ? "
                                "AND event IN ('approved', 'denied', 'expired', 'abandoned', 'cancelled_restart') "
                                "ORDER BY chain_seq", [approval_id])
    return [(r["event"], r["operator"], r["reason"]) for r in rows]


def test_typed_bursts_decide_only_what_the_dialog_confirmed(env, tmp_path):
    term = console(env, tmp_path / "console.pid")
    try:
        # 1. Letters, digits and Tab typed at the queue decide nothing and quit nothing.
        bot, first = hold(env, 1)
        term.wait_for(first)
        term.send("adwq1234 qd", "Tab", "BTab", "q")
        time.sleep(1.5)
        assert first in pending_ids(env.client) and bot.proc.poll() is None
        assert "EXIT=" not in term.screen()

        # 2. F8, a reason full of former bindings, Tab to the Deny button, more letters (ignored
        # there), Enter on the button: one burst. The bot is told exactly that reason.
        term.send("F8", "no: a d q 1234", "Tab", "qad 9", "Enter")
        bot.finish()
        assert "ERROR:  botwarden: statement denied by root: no: a d q 1234\n" in bot.stderr, bot.stderr
        assert bot.lines[-1] == "1" and exists(env.pg, 1)
        assert approvals_audit(env, first) == [("denied", "root", "no: a d q 1234")]

        # 3. F6, a reason, Enter (to the button), Enter (approve), then stray letters.
        bot, second = hold(env, 2)
        term.wait_for(second)
        term.send("F6", "ok: checked a+d q=42", "Enter", "Enter", "dq")
        bot.finish()
        assert bot.proc.returncode == 0 and bot.lines[-1] == "0", bot.stderr
        assert not exists(env.pg, 2)
        assert approvals_audit(env, second) == [("approved", "root", "ok: checked a+d q=42")]

        # 4. Dialogs opened and escaped, with typing around them: nothing decided.
        bot, third = hold(env, 3)
        term.wait_for(third)
        term.send("F8", "q a d", "Escape")
        time.sleep(0.3)  # Escape then a letter at once is how a terminal sends alt+letter
        term.send("qad1234", "Enter", "F6", "d 1", "Escape")
        time.sleep(1.5)
        assert third in pending_ids(env.client) and bot.proc.poll() is None and exists(env.pg, 3)
        # The console learns of decisions from its event stream: wait for both lines to be drawn
        # in full rather than for a fixed time (a loaded machine drew them after 1.5 s once, and a
        # notification toast drawn over the table's right side hid the reason column once: toasts fade).
        def decided_lines(screen: str) -> list[str]:
            return [line for line in screen.splitlines() if first in line or second in line]

        def drawn(screen: str) -> bool:
            lines = decided_lines(screen)
            return (any("denied" in line and "root" in line and "no: a d q 1234" in line for line in lines)
                    and any("approved" in line and "root" in line and "ok: checked a+d q=42" in line
                            for line in lines))
        try:
            screen = wait_until(lambda: drawn(s := term.screen()) and s, 30, "both decisions in Recently decided")
        except AssertionError as e:  # what the console showed instead (it flaked once in CI, 7 December)
            raise AssertionError(f"{e}; the screen:\n{term.screen()}") from None
        assert "Recently decided" in screen and "EXIT=" not in screen
        assert "Approvals (1)" in screen and "1 pending" in screen and "pending 1 " in screen

        # 5. Quitting with a request pending asks; Enter on the focused "Stay" stays.
        term.send("F10")
        term.wait_for("Quit the console?")
        term.send("qy", "Enter")
        time.sleep(1.0)
        assert "EXIT=" not in term.screen() and "Quit the console?" not in term.screen()
        term.send("F10")
        term.wait_for("Quit the console?")
        term.send("Tab", "Enter")
        screen = term.wait_for("EXIT=0")
        # The request the operator never confirmed is still held after the console is gone.
        assert third in pending_ids(env.client) and bot.proc.poll() is None
        env.client.post(f"/v1/approvals/{third}/deny", {"reason": "cleanup"})
        bot.finish()
        assert exists(env.pg, 3)
    finally:
        term.close()

    # A console started afterwards shows those decisions too: read from the audit store.
    term = console(env, tmp_path / "console2.pid")
    try:
        screen = term.wait_for(second)
        lines = [line for line in screen.splitlines() if first in line or second in line or third in line]
        assert any(first in line and "denied" in line and "root" in line and "no: a d q 1234" in line
                   for line in lines), screen
        assert any(second in line and "approved" in line and "ok: checked a+d q=42" in line for line in lines)
        assert any(third in line and "denied" in line and "cleanup" in line for line in lines)
        assert "DELETE FROM console_ledger WHERE id = 2" in screen
    finally:
        term.close()


@pytest.fixture
def cpu_hog():
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_console_and_restores_the_terminal(env, tmp_path, cpu_hog, sig):
    pidfile = tmp_path / "console.pid"
    term = console(env, pidfile)
    try:
        bot, held = hold(env, 4)
        term.wait_for(held)
        term.send("F6", "half a reason")  # a dialog open, the stream and a status poll out
        term.wait_for("half a reason")
        os.kill(int(pidfile.read_text()), sig)
        # A generous bound only to tell a hang from a slow machine; exits take well under a second.
        term.wait_for("EXIT=", timeout=30)
        screen = term.wait_for("extproc")  # the last flags of stty -a: all of it is on screen
        assert f"EXIT={128 + sig}" in screen
        # The terminal is back: line editing and echo on (stty), the console's screen gone
        # (it drew on the alternate screen, which was left).
        modes = screen.split("EXIT=", 1)[1].split()
        assert "icanon" in modes and "echo" in modes and "-icanon" not in modes, screen
        assert "Approve once" not in screen and "half a reason" not in screen
        # The console going away decides nothing.
        assert held in pending_ids(env.client) and bot.proc.poll() is None
        env.client.post(f"/v1/approvals/{held}/deny", {"reason": "cleanup"})
        bot.finish()
        assert exists(env.pg, 4)
    finally:
        term.close()
