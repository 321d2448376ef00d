"""The console (Textual Pilot, in this process) against a real daemon: real eBPF redirect, real
OpenBao (a server of this module's own, stopped by the last test), real PostgreSQL 15, and
bots that are real psql processes started with ``botwarden bot run``.

What each test checks happens where it matters: the held statement completes or fails at the
real psql after the key press, the session ended from the console is gone at the real psql
and its audit row names the operator, and the Status tab says so when OpenBao is stopped.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance.control import ControlError
from appliance.sandbox import OpenBaoServer, config_header
from probes import cgroups
from tests.daemon_fixtures import PSQL, ROOT, DaemonProcess, fresh_setup, new_port
from tests.approvals_fixtures import wait_until
from tests.test_adversarial_daemon import bot_env
from tests.test_tui import make_app, table_rows, text_of, until
from tui.app import BotwardenApp
from tui.dialogs import DecisionScreen, EndSessionScreen, HelpScreen

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

TAG = uuid.uuid4().hex[:6]
BOTS = f"bw-tui-{TAG}.bots"
BOT = "tui-bot"
RULES = """
[[rules]]
name = "ledger-deletes-need-approval"
action = "approve"
description = "Deletes on the ledger need a second pair of eyes"
[rules.sql]
kinds = ["DELETE"]
relations = ["tui_ledger"]
"""


@pytest.fixture(scope="module")
def env(pg_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("console-daemon")
    bao = OpenBaoServer().start()  # this module's own: the last test stops it
    pg_server.psql("DROP TABLE IF EXISTS tui_ledger; CREATE TABLE tui_ledger (id int PRIMARY KEY, note text);"
                   "INSERT INTO tui_ledger SELECT g, 'row ' || g FROM generate_series(1, 20) g;"
                   "GRANT ALL ON tui_ledger TO PUBLIC")
    setup = fresh_setup(bao, pg_server, workdir)
    socket_path = Path(tempfile.mkdtemp(prefix="bw-tui-")) / "run" / "control.sock"
    port = new_port()
    probes = (f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "/sys/fs/bpf/bw-tui-{TAG}"\n'
              f'nft_table = "bw_tui_{TAG}"\nmap_entries = 1024')
    config = workdir / "botwarden.toml"
    config.write_text(config_header(workdir, setup, socket_path=socket_path, probes=probes,
                                    approvals_timeout_s=180) + f"""
[[targets]]
name = "ledger"
protocol = "postgres"
address = "{pg_server.host}:{pg_server.port}"
listen = "127.0.0.1:{port}"
allow_plaintext = true
authentication = "token+attestation"
[targets.tls]
mode = "require"
[targets.credential]
source = "database"
mount = "{setup.db_mount}"
role = "{setup.db_role}"

[[identities]]
name = "ledger-bot"
groups = ["bots", "ledger-writers"]
[identities.token]
subject = "{setup.bot_entity_id()}"
[identities.process]
cgroup = "{BOT}"
{RULES}
""")
    daemon = DaemonProcess(config, socket_path).start()
    try:
        yield type("Env", (), {"pg": pg_server, "bao": setup, "bao_server": bao, "config": config,
                               "daemon": daemon, "socket": str(socket_path)})
    finally:
        try:
            daemon.stop()
        finally:
            subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), "probes", "detach"],
                           cwd=ROOT, capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
            cgroups.remove(BOTS)
            bao.stop()


def psql_argv(env, *sql: str) -> list[str]:
    args = [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1", "-p", str(env.pg.port), "-U", BOT,
            "-d", "postgres"]
    for s in sql:
        args += ["-c", s]
    return args


class DetachedBot:
    """psql as the bot: `bot run` puts it in the bots' cgroup and runs it as nobody. Started
    through ``setsid -f``, so this test process (which is the operator here) is not one of the
    bot's ancestors: botwarden refuses a decision from a bot's own process tree. Its stdout and
    stderr still come here (the pipes are inherited); stderr is read as it comes."""

    def __init__(self, env, *sql: str):
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.proc = subprocess.Popen(
            ["setsid", "-f", sys.executable, "-m", "appliance.cli", "--config", str(env.config), "bot", "run",
             "--name", BOT, "--user", "nobody", "--", *psql_argv(env, *sql)], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env={**base, "PYTHONPATH": str(ROOT), **bot_env(env.bao.mint_token())})
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def held_id(self) -> str:
        marker = "held for approval "
        line = wait_until(lambda: next((x for x in list(self.err) if marker in x), None), 60,
                          f"the NOTICE of a held statement (stderr: {''.join(self.err)!r})")
        return line.split(marker, 1)[1].split()[0]

    def finish(self, timeout: float = 60) -> tuple[str, str]:
        """(stdout, stderr) once the bot has exited (its pipes closed)."""
        out = self.proc.stdout.read()
        self._reader.join(timeout)
        self.proc.wait(timeout)
        return out, "".join(self.err)


def bot(env, *sql: str) -> DetachedBot:
    return DetachedBot(env, *sql)


def exists(env, row_id: int) -> bool:
    return env.pg.psql(f"SELECT count(*) FROM tui_ledger WHERE id = {row_id}") == "1"


def detail(app: BotwardenApp) -> str:
    return text_of(app, "#approval-detail")


async def held(pilot, app: BotwardenApp, approval_id: str) -> dict[str, Any]:
    await until(pilot, lambda: app.book.get(approval_id) is not None
                and approval_id in [r[0] for r in table_rows(app, "#approvals-table")], "the held request", 30)
    return app.book.get(approval_id)  # type: ignore[return-value]


async def decide(pilot, app: BotwardenApp, approval_id: str, key: str, *typed: str) -> str:
    """Select the request, open the dialog with ``key``, type, Enter to the button, Enter: the
    dialog's sentence naming what is decided is returned."""
    table = app.query_one("#approvals-table")
    table.move_cursor(row=table.get_row_index(approval_id))
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, DecisionScreen), "the dialog")
    what = str(app.screen.query_one("#dialog-what").content)
    await pilot.press(*typed)
    await pilot.press("enter")
    if app.screen.focused is not None and app.screen.focused.id == "minutes":
        await pilot.press("enter")
    assert app.screen.focused.id == "confirm"
    await pilot.press("enter")
    await until(pilot, lambda: not isinstance(app.screen, DecisionScreen), "the dialog to close")
    return what


def test_held_requests_arrive_unasked_and_decide_at_the_real_psql(env):
    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        app = make_app(env.socket)
        rung: list[int] = []
        app.bell = lambda: rung.append(1)  # the terminal bell, counted instead of beeping at the test
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.watch_live, "the approvals stream", 30)
            # 1. A DELETE with an e-mail address in it: it shows without a key press, masked.
            first = bot(env, "DELETE FROM tui_ledger WHERE id = 1 AND note <> 'ada.lovelace@example.com'",
                        "SELECT count(*) FROM tui_ledger WHERE id = 1")
            first_id = await asyncio.to_thread(first.held_id)
            approval = await held(pilot, app, first_id)
            seen["title"], seen["bells"] = app.title, len(rung)
            seen["detail1"] = detail(app)
            seen["process"] = dict(approval["process"])
            pid = approval["process"]["pid"]
            seen["proc_of_pid"] = (os.readlink(f"/proc/{pid}/exe"), next(line for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                                        if line.startswith("0::")),
                                   os.stat(f"/proc/{pid}").st_uid)
            seen["what_once"] = await decide(pilot, app, first_id, "f6", *"checked")
            seen["first"] = await asyncio.to_thread(first.finish)
            # 2. The same statement shape again: its detail names the earlier approval; deny it.
            second = bot(env, "DELETE FROM tui_ledger WHERE id = 2 AND note <> 'bob@example.org'",
                         "SELECT count(*) FROM tui_ledger WHERE id = 2")
            second_id = await asyncio.to_thread(second.held_id)
            await held(pilot, app, second_id)
            seen["detail2"] = detail(app)
            seen["what_deny"] = await decide(pilot, app, second_id, "f8", *"not during the freeze")
            seen["second"] = await asyncio.to_thread(second.finish)
            # 3. Approve for a window: the dialog says what the window lets through.
            third = bot(env, "DELETE FROM tui_ledger WHERE id = 3", "DELETE FROM tui_ledger WHERE id = 4")
            third_id = await asyncio.to_thread(third.held_id)
            await held(pilot, app, third_id)
            seen["what_window"] = await decide(pilot, app, third_id, "f7", *"batch")
            seen["third"] = await asyncio.to_thread(third.finish)
            seen["bells_end"] = len(rung)
            await until(pilot, lambda: len(app.book) == 0, "the queue to empty")
            seen["title_end"] = app.title
        return seen

    seen = asyncio.run(scenario())
    me = getpass.getuser()
    assert seen["title"] == "botwarden · 1 pending" and seen["bells"] == 1
    d1 = seen["detail1"]
    # The statement as the audit keeps it: the address is masked, the shape is readable.
    assert "ada.lovelace" not in d1 and "DELETE FROM tui_ledger WHERE id = 1 AND note <> '********'" in d1
    assert "ledger-bot   groups: bots, ledger-writers" in d1
    proc = seen["process"]
    # The process is the real psql, as the kernel says: its executable, cgroup and uid.
    assert seen["proc_of_pid"] == (PSQL, f"0::{proc['cgroup']}", 65534)
    assert proc["uid"] == 65534 and proc["cgroup"].endswith(f"{BOTS}/{BOT}")
    assert f"pid {proc['pid']} uid 65534 exe {proc['exe']} cgroup {proc['cgroup']}" in d1 and proc["exe"] == PSQL
    assert "ledger (postgres)" in d1
    assert "ledger-deletes-need-approval — Deletes on the ledger need a second pair of eyes" in d1
    assert " held, " in d1 and " left" in d1 and "0 of 1" in d1
    assert "no earlier decision on this statement shape" in d1
    assert "Runs the statement above once, for identity ledger-bot on target ledger" in seen["what_once"]
    out, err = seen["first"]
    assert out.split()[-1] == "0", err  # the DELETE ran: the row is gone
    assert not exists(env, 1)
    # The second request's detail names the first decision (same shape, another constant).
    assert f"approved by {me}: checked — ledger-bot" in seen["detail2"]
    assert "does not run; identity ledger-bot on target ledger gets your reason" in seen["what_deny"]
    out, err = seen["second"]
    assert f"statement denied by {me}: not during the freeze" in err and out.split()[-1] == "1"
    assert exists(env, 2)
    assert "every statement of the same shape from identity ledger-bot on target ledger" in seen["what_window"]
    out, err = seen["third"]
    assert "ERROR" not in err and not exists(env, 3) and not exists(env, 4), err  # the second DELETE ran in the window
    assert seen["bells_end"] == 3 and seen["title_end"] == "botwarden"


def test_sessions_filter_and_end_a_live_session(env):
    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        app = make_app(env.socket)
        async with app.run_test(size=(120, 40)) as pilot:
            sleeper = bot(env, "SELECT 1", "SELECT pg_sleep(120)")
            await pilot.press("f2")
            await until(pilot, lambda: any(s.get("current_running") and "pg_sleep" in str(s.get("current"))
                                           for s in app.sessions), "the live session's current statement", 30)
            live = next(s for s in app.sessions if s.get("state") == "active")
            sid = live["session_id"]
            seen["row"] = table_rows(app, "#sessions-table")[0]
            # `/` goes to the filter; what is typed filters the list as it is typed.
            await pilot.press("slash")
            seen["focus"] = app.focused.id
            await pilot.press(*"state=active identity=ledger")
            await until(pilot, lambda: table_rows(app, "#sessions-table") and all(
                r[4] == "active" for r in table_rows(app, "#sessions-table")), "only live sessions")
            seen["filtered"] = [r[0] for r in table_rows(app, "#sessions-table")]
            await pilot.press(*" nosuchword")
            await until(pilot, lambda: not table_rows(app, "#sessions-table"), "nothing matches")
            for _ in " nosuchword":
                await pilot.press("backspace")
            await until(pilot, lambda: bool(table_rows(app, "#sessions-table")), "the live session again")
            await pilot.press("enter")  # back to the list
            seen["focus_after"] = app.focused.id
            table = app.query_one("#sessions-table")
            table.move_cursor(row=table.get_row_index(sid))
            seen["session_detail"] = text_of(app, "#session-detail")
            await pilot.press("ctrl+k")
            await until(pilot, lambda: isinstance(app.screen, EndSessionScreen), "the confirmation")
            seen["dialog"] = str(app.screen.query_one("#dialog-title").content)
            await pilot.press(*"runaway query", "enter")
            assert sleeper._reader.is_alive()  # Enter in the reason only moves to the button
            await pilot.press("enter")
            seen["sleeper"] = await asyncio.to_thread(sleeper.finish)
            seen["sid"] = sid
            await until(pilot, lambda: any(s["session_id"] == sid and s["state"] != "active" for s in app.sessions),
                        "the session to show as ended", 30)
        return seen

    seen = asyncio.run(scenario())
    sid = seen["sid"]
    assert seen["row"][0] == sid[:12] and "SELECT pg_sleep(120)  [running" in seen["row"][5]
    assert seen["focus"] == "sessions-filter" and sid[:12] in seen["filtered"]
    assert seen["focus_after"] == "sessions-table"
    assert "now: SELECT pg_sleep(120)" in seen["session_detail"]
    assert seen["dialog"] == f"End session {sid}"
    out, err = seen["sleeper"]
    me = getpass.getuser()
    assert f"botwarden ended the session: ended by operator {me} (uid {os.getuid()}): runaway query" \
        in err, err
    rows = env.daemon.audit_sql("SELECT outcome, error FROM sessions WHERE session_id = ?", [sid])
    assert rows and rows[0]["outcome"] == "terminated"
    assert f"ended by operator {me} (uid {os.getuid()}): runaway query" in rows[0]["error"]
    # Once ended it cannot be ended again; an unknown id is the same answer.
    for unknown in (sid, "no-such-session"):
        with pytest.raises(ControlError) as refused:
            env.daemon.client().post(f"/v1/sessions/{unknown}/end", {"reason": "again"})
        assert refused.value.status == 404 and "no live session" in refused.value.message


def status_text(app: BotwardenApp) -> str:
    return text_of(app, "#status-view")


def test_help_and_status_then_status_with_openbao_stopped(env):
    """Last in this module: it stops the module's OpenBao."""
    rooted = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(env.config), "bot", "run",
                               "--name", "root-sleeper", "--allow-privileged", "--", "sleep", "300"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        app = make_app(env.socket)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f9")
            await until(pilot, lambda: "Vault token" in status_text(app) and "root-sleeper" in status_text(app),
                        "the status view", 30)
            seen["up"] = status_text(app)
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help")
            seen["help"] = text_of(app.screen, "#help-text")
            await pilot.press("escape")
            await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "the help to close")
            await asyncio.to_thread(env.bao_server.stop)
            await pilot.press("f5")
            await until(pilot, lambda: "unreachable" in status_text(app), "OpenBao shown as down", 30)
            seen["down"] = status_text(app)
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        rooted.kill()
        rooted.wait()
    up, down = seen["up"], seen["down"]
    assert "[  ok] probes: ebpf" in up and "path ebpf" in up
    assert f"[FAIL] bots cgroup: /{BOTS}/root-sleeper: 1 process, 1 AS UID 0 ({rooted.pid} sleep)" in up
    assert "[  ok] target ledger reachable:" in up and "PostgreSQL answers SSLRequest" in up
    assert "[  ok] Vault reachable:" in up and "unsealed" in up
    assert "[  ok] Vault token:" in up and " s left (renewable" in up
    assert "[  ok] OIDC issuer:" in up and "JWKS" in up
    assert "[  ok] audit store: healthy" in up and "[  ok] chain head: seq " in up
    assert "[  ok] audit losses: 0 event(s) lost" in up and "audit queue:" in up
    assert "botwarden 0.1.0, pid " in up and ", up " in up
    assert "[FAIL] Vault reachable:" in down and "is unreachable" in down
    assert "Vault token" not in down  # not asked once Vault is unreachable
    assert "sessions (this tab)" in seen["help"] or "status (this tab)" in seen["help"]
    assert "ctrl+k" in seen["help"] and "F6 / F7 / F8" in seen["help"]
    assert "ctrl+r" in seen["help"]  # the player key, bound on every tab
