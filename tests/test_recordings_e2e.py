"""Session recording, replay and export (issue 18), end to end.

A real PostgreSQL 15 in a network namespace, OpenBao, the real daemon with its eBPF probes, and
psql started with `botwarden bot run` (so the kernel sends it to the inspector). What psql printed
live is compared with `botwarden replay`; the exports are read by the tools they are made for
(asciinema's own reader and `asciinema cat`, tshark's pgsql dissector); the size cap, the
metadata-only switch and a daemon killed mid-session are checked; and no secret the sessions
sent or saw unmasked is in any recording, export, replay or the DuckDB file's bytes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from appliance.sandbox import PostgresServer, config_header, configure_openbao, free_port
from probes import cgroups
from tests.daemon_fixtures import RULES, DaemonProcess, seed_orders
from tests.probes_fixtures import RUN_TAG
from tests.test_probes_e2e import PSQL_ENV, PgNet, bot_run, cli

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
BOTS = f"botwarden-rec-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-rec-{RUN_TAG}"
BOT = "recorded"
PSQL = "/usr/lib/postgresql/15/bin/psql"
ASCIINEMA = str(Path(sys.executable).parent / "asciinema")
CARDS = ("4111111111111111", "5500005555555559")   # customers.card: masked (partial, keep 4)


def psql_argv(host: str, port: int, *commands: str) -> list[str]:
    """psql as a bot would run it (aligned output, -e echoes each statement), stderr merged into
    stdout in the order psql wrote them."""
    args = [PSQL, "-X", "-e", "-v", "ON_ERROR_STOP=0", "-h", host, "-p", str(port), "-U", BOT, "-d", "postgres"]
    for c in commands:
        args += ["-c", c]
    return ["/bin/sh", "-c", 'exec "$0" "$@" 2>&1', *args]


@pytest.fixture(scope="module")
def world(bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recordings-e2e")
    os.chmod(workdir, 0o755)
    net = PgNet().start()
    pg = daemon = None
    config = workdir / "botwarden.toml"
    try:
        pg = PostgresServer(host=net.ip_a, prefix=net.prefix,
                            extra_conf={"listen_addresses": f"'{net.ip_a},{net.ip_b}'"}).start()
        seed_orders(pg)
        pg.psql("CREATE TABLE scratch (id int); INSERT INTO scratch SELECT generate_series(1, 5)")
        bao = configure_openbao(bao_server, pg, workdir, tag=f"rec{uuid.uuid4().hex[:6]}",
                                grants=("GRANT pg_read_all_data TO \"{{name}}\";",
                                        "GRANT pg_write_all_data TO \"{{name}}\";"))
        probes = f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "{PIN_DIR}"\nmap_entries = 4096'
        credential = f"""[targets.credential]
source = "database"
mount = "{bao.db_mount}"
role = "{bao.db_role}"
"""
        base = config_header(workdir, bao, probes=probes, approvals_timeout_s=60) + f"""
[[targets]]
name = "db"
protocol = "postgres"
address = "{net.ip_a}:{pg.port}"
listen = "127.0.0.1:{free_port()}"
authentication = "attestation"
allow_plaintext = true
{credential}
[[targets]]
name = "db-tok"
protocol = "postgres"
address = "{net.ip_b}:{pg.port}"
listen = "127.0.0.1:{free_port()}"
authentication = "token+attestation"
allow_plaintext = true
{credential}
[[identities]]
name = "rec-tok-bot"
targets = ["db-tok"]
[identities.token]
subject = "{bao.bot_entity_id()}"
[identities.process]
cgroup = "{BOT}"

[[identities]]
name = "rec-bot"
targets = ["db"]
[identities.process]
cgroup = "{BOT}"
{RULES}
"""
        config.write_text(base)
        daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
        yield {"net": net, "pg": pg, "bao": bao, "daemon": daemon, "config": config, "base": base,
               "workdir": workdir}
    finally:
        try:
            if daemon is not None:
                daemon.stop()
                cli(config, "probes", "detach")
        finally:
            cgroups.remove(BOTS)
            if pg is not None:
                pg.stop()
            net.stop()


def session_of(world, pid: int) -> str:
    """The session psql (pid) had, once its end is on record."""
    daemon = world["daemon"]
    deadline = time.monotonic() + 20
    while True:
        rows = daemon.audit_sql("SELECT session_id, outcome FROM sessions WHERE pid = ?", [pid])
        if rows and rows[0]["outcome"] != "open":
            return rows[0]["session_id"]
        assert time.monotonic() < deadline, f"no ended session for pid {pid}: {rows}"
        time.sleep(0.1)


def recordings(world, session_id: str) -> list[dict]:
    rows = world["daemon"].audit_sql("SELECT seq, direction, data FROM recordings WHERE session_id = ? ORDER BY seq",
                                     [session_id])
    return [{**r, "data": bytes.fromhex(r["data"])} for r in rows]


def reload(world, text: str) -> None:
    daemon = world["daemon"]
    before = daemon.client().get("/v1/status")["reloads"]
    world["config"].write_text(text)
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while daemon.client().get("/v1/status")["reloads"] == before:
        assert time.monotonic() < deadline, daemon.output()[-2000:]
        time.sleep(0.1)
    assert daemon.client().get("/v1/status")["last_reload_error"] is None


def replay(world, session_id: str) -> list[str]:
    res = cli(world["config"], "replay", "--no-wait", session_id)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def in_order(needles: list[str], haystack: list[str]) -> tuple[bool, str | None]:
    """Every needle appears in haystack, in this order (other lines may come between)."""
    i = 0
    for n in needles:
        while i < len(haystack) and haystack[i] != n:
            i += 1
        if i == len(haystack):
            return False, n
        i += 1
    return True, None


# -- a psql session with results, an error, a notice, a block and an approval --------------------

STATEMENTS = (
    "SELECT id, name, card FROM customers ORDER BY id",           # masked result
    "SELECT 1/0",                                                 # error
    "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$",             # notice
    "DROP TABLE orders",                                          # blocked
    "DELETE FROM scratch",                                        # held, approved by an operator
    "SELECT count(*) AS left_in_scratch FROM scratch",
)


@pytest.fixture(scope="module")
def session(world):
    """The session above, psql's live output, and the approval an operator gave."""
    net, pg, daemon = world["net"], world["pg"], world["daemon"]
    ran: dict = {}
    bot = threading.Thread(target=lambda: ran.update(r=bot_run(world["config"], BOT, psql_argv(
        net.ip_a, pg.port, *STATEMENTS), env=PSQL_ENV, timeout=120)))
    bot.start()
    deadline = time.monotonic() + 60
    while not (held := daemon.client().get("/v1/approvals")["approvals"]):
        assert time.monotonic() < deadline and bot.is_alive(), "the DELETE was not held"
        time.sleep(0.1)
    approval_id = held[0]["approval_id"]
    res = cli(world["config"], "approvals", "approve", approval_id, "--reason", "ticket 7")
    assert res.returncode == 0, res.stderr
    bot.join(120)
    r = ran["r"]
    assert r.returncode == 0, r.stdout + r.stderr
    return {"id": session_of(world, r.pid), "live": r.stdout, "approval": approval_id}


def test_replay_shows_what_psql_showed_with_decisions_inline(world, session):
    live = session["live"].splitlines()
    # What psql printed: the masked cards, the error, the notice, the block, the approval's notice.
    assert "  1 | Ada  | ************1111" in live and "ERROR:  division by zero" in live
    assert "NOTICE:  hello 42" in live and "ERROR:  botwarden: statement blocked by rule 'no-drops'" in live
    assert any(session["approval"] in line for line in live) and "DELETE 5" in live
    lines = replay(world, session["id"])
    ok, missing = in_order(live, lines)
    assert ok, f"replay lacks {missing!r} (in psql's order):\n" + "\n".join(lines) + "\n---- live:\n" + session["live"]
    # Decisions, rules and approvals inline, after their statement.
    drop = lines.index("DROP TABLE orders")
    assert lines[drop + 1].startswith("-- botwarden: block (rule no-drops)")
    delete = lines.index("DELETE FROM scratch")
    assert lines[delete + 1].startswith("-- botwarden: approve (rule mass-delete-needs-approval)")
    assert lines[delete + 2] == f"-- approval {session['approval']} requested"
    assert lines[delete + 3] == f"-- approval {session['approval']} approved by root: ticket 7"
    masked = lines.index("SELECT id, name, card FROM customers ORDER BY id")
    assert lines[masked + 1].startswith("-- botwarden: mask (rule mask-pii)")
    # Timings: one per statement, from its audit row.
    assert sum(1 for line in lines if line.startswith("Time: ") and line.endswith(" ms")) == len(STATEMENTS)
    assert not any(card in "\n".join(lines) for card in CARDS)


def test_replay_at_a_speed_prints_the_same_transcript(world, session):
    # The held DELETE waited for the operator: replayed at 1000x, that wait is a short pause,
    # and --no-wait does not pause at all; both print the same transcript.
    res = cli(world["config"], "replay", "--speed", "1000", session["id"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == replay(world, session["id"])


def test_asciicast_is_read_by_asciinema(world, session, tmp_path):
    from asciinema.asciicast import open_from_url

    cast = tmp_path / "session.cast"
    res = cli(world["config"], "session", "export", session["id"], "--cast", str(cast))
    assert res.returncode == 0, res.stderr
    with open_from_url(str(cast)) as a:
        assert a.v2_header["version"] == 2 and a.v2_header["width"] >= 80
        events = list(a.events())
    times = [e[0] for e in events]
    assert times == sorted(times) and {e[1] for e in events} == {"o"}
    text = "".join(e[2] for e in events).replace("\r\n", "\n").splitlines()
    ok, missing = in_order(session["live"].splitlines(), text)
    assert ok, missing
    cat = subprocess.run([ASCIINEMA, "cat", str(cast)], capture_output=True, text=True, timeout=60)
    assert cat.returncode == 0, cat.stderr
    shown = cat.stdout.replace("\r\n", "\n").splitlines()
    ok, missing = in_order([*STATEMENTS[:5], f"-- approval {session['approval']} approved by root: ticket 7",
                            STATEMENTS[5]], shown)
    assert ok, f"{missing!r} not in:\n" + "\n".join(shown)


def test_pcap_is_decoded_by_tshark_as_pgsql(world, session, tmp_path):
    pcap = tmp_path / "session.pcap"
    res = cli(world["config"], "session", "export", session["id"], "--pcap", str(pcap))
    assert res.returncode == 0, res.stderr
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "pgsql", "-T", "fields", "-E", "separator=/t",
                          "-E", "aggregator=|", "-e", "tcp.srcport", "-e", "pgsql.type", "-e", "pgsql.query",
                          "-e", "pgsql.message", "-e", "pgsql.val.data"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    queries = [q for r in rows if r[0] != "5432" for q in r[2].split("|") if q]
    assert queries == list(STATEMENTS), out.stdout
    # The server's side: the masked rows the bot saw (values in hex) and our refusal, decoded as pgsql.
    values = [v for r in rows if r[0] == "5432" for v in r[4].split("|") if v]
    assert "************1111".encode().hex() in values and "Ada".encode().hex() in values
    assert "botwarden: statement blocked by rule 'no-drops'" in [m for r in rows for m in r[3].split("|")]
    assert "Startup message" in out.stdout and "Authentication request" in out.stdout
    # A TCP connection with its handshake: tshark sees no broken sequence numbers.
    problems = subprocess.run(["tshark", "-r", str(pcap), "-Y", "tcp.analysis.flags && !tcp.analysis.window_update"],
                              capture_output=True, text=True, timeout=60)
    assert problems.stdout.strip() == "", problems.stdout
    flags = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "tcp.flags.str"],
                           capture_output=True, text=True, timeout=60).stdout.split()
    assert flags[:3] == ["··········S·", "·······A··S·", "·······A····"], flags[:3]


def test_jsonl_has_one_event_per_line(world, session, tmp_path):
    out = tmp_path / "session.jsonl"
    res = cli(world["config"], "session", "export", session["id"], "--jsonl", str(out))
    assert res.returncode == 0, res.stderr
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert docs[0]["type"] == "session" and docs[0]["session_id"] == session["id"]
    stmts = [d for d in docs if d["type"] == "statement"]
    assert [d["text"] for d in stmts] == list(STATEMENTS)
    assert [d["decision"] for d in stmts] == ["mask", "allow", "allow", "block", "approve", "allow"]
    assert stmts[0]["answers"][0]["result"]["rows"][0] == ["1", "Ada", "************1111"]
    assert stmts[1]["answers"] == [{"error": {"severity": "ERROR", "sqlstate": "22012", "message": "division by zero",
                                              "detail": None, "hint": None}}]
    assert [a["event"] for a in stmts[4]["approvals"]] == ["requested", "approved"]


def test_console_player_steps_through_the_session(world, session):
    import asyncio

    from textual.widgets import Input, Static

    from tests.test_tui import make_app, until
    from tui.replay import ReplayScreen

    app = make_app(str(world["daemon"].socket))
    seen: dict = {}

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f4")
            app.query_one("#replay-session", Input).value = session["id"]
            await pilot.press("ctrl+r")
            await until(pilot, lambda: isinstance(app.screen, ReplayScreen) and app.screen.doc is not None,
                        "the session in the player")
            screen = app.screen

            def view() -> str:
                return str(screen.query_one("#player-view", Static).content)

            def status() -> str:
                return str(screen.query_one("#player-status", Static).content)

            seen["header"] = view()
            for _ in range(4):
                await pilot.press("right")
            seen["drop"], seen["drop_status"] = view(), status()
            await pilot.press("n")
            seen["delete"] = view()
            await pilot.press("left")
            seen["back"] = view()
            for _ in range(4):
                await pilot.press("plus")
            await pilot.press("home")
            await pilot.press("space")
            seen["speed"] = screen.speed
            await until(pilot, lambda: screen.index == len(screen.frames) - 1 and not screen.playing,
                        "the session played to its end")
            seen["end"] = view()
            await pilot.press("escape")
            seen["closed"] = not isinstance(app.screen, ReplayScreen)

    asyncio.run(run())
    assert "identity rec-bot → db" in seen["header"]
    assert seen["drop"].splitlines()[0] == "DROP TABLE orders"
    assert "-- botwarden: block (rule no-drops)" in seen["drop"] and "statement 4/6 · block" in seen["drop_status"]
    assert f"-- approval {session['approval']} approved by root: ticket 7" in seen["delete"]
    assert "DELETE 5" in seen["delete"] and seen["back"] == seen["drop"]
    assert seen["speed"] == 16.0 and "left_in_scratch" in seen["end"] and seen["closed"]


# -- secrets never recorded --------------------------------------------------------------------------


def test_no_secret_in_any_recording_export_or_the_audit_file(world, tmp_path):
    net, pg, daemon, bao = world["net"], world["pg"], world["daemon"], world["bao"]
    token = bao.mint_token()
    password = "Zq8" + secrets.token_urlsafe(24)     # a credential a bot sets in a statement
    probe = "rec-visible-" + uuid.uuid4().hex[:6]    # stored as it is: the byte search finds it
    argv = psql_argv(net.ip_b, pg.port,
                     f"SELECT '{probe}' AS probe",
                     f"ALTER ROLE CURRENT_USER PASSWORD '{password}'",
                     "SELECT id, name, card FROM customers ORDER BY id",
                     f"SELECT id FROM customers WHERE card = '{CARDS[0]}'")
    ran = bot_run(world["config"], BOT, argv, env={**PSQL_ENV, "PGPASSWORD": token})
    assert ran.returncode == 0, ran.stdout
    assert "ALTER ROLE" in ran.stdout and "************1111" in ran.stdout and probe in ran.stdout
    sid = session_of(world, ran.pid)
    secrets_ = [token, password, *CARDS]
    blobs: dict[str, bytes] = {}
    rows = daemon.audit_sql("SELECT session_id, seq, data FROM recordings")
    for r in rows:
        blobs[f"recording {r['session_id']} {r['seq']}"] = bytes.fromhex(r["data"])
    assert any(probe.encode() in b for b in blobs.values())
    files = {"cast": tmp_path / "s.cast", "pcap": tmp_path / "s.pcap", "jsonl": tmp_path / "s.jsonl"}
    res = cli(world["config"], "session", "export", sid, *(f"--{k}={v}" for k, v in files.items()))
    assert res.returncode == 0, res.stderr
    for k, f in files.items():
        blobs[k] = f.read_bytes()
        assert probe.encode() in blobs[k], k
    blobs["replay"] = "\n".join(replay(world, sid)).encode()
    assert probe.encode() in blobs["replay"]
    # The store's own bytes: the file and its WAL, after a checkpoint of what is committed.
    daemon.client().post("/v1/audit/flush")
    store = world["workdir"] / "state" / "audit.duckdb"
    for p in (store, Path(str(store) + ".wal")):
        if p.exists():
            blobs[p.name] = p.read_bytes()
    assert any(probe.encode() in blobs[n] for n in (store.name, store.name + ".wal") if n in blobs)
    for name, data in blobs.items():
        for s in secrets_:
            for form in {s.encode(), s.encode().hex().encode()}:
                assert form not in data, f"{name} holds a secret ({secrets_.index(s)})"
    # The statement is there, its password masked; the startup is an event without the token.
    text = "\n".join(replay(world, sid))
    assert "ALTER ROLE CURRENT_USER PASSWORD '********'" in text
    assert "authentication=token+attestation (the password is not recorded)" in text   # target db-tok


# -- the size cap and metadata-only targets ---------------------------------------------------------


def test_recording_stops_at_the_cap_with_a_marker(world):
    net, pg = world["net"], world["pg"]
    reload(world, world["base"].replace("[audit]\n", "[audit]\nrecording_max_bytes = 4096\n", 1))
    try:
        ran = bot_run(world["config"], BOT, psql_argv(net.ip_a, pg.port,
                                                     "SELECT repeat('x', 100) AS filler FROM generate_series(1, 200)",
                                                     "SELECT 'after the cap' AS later"), env=PSQL_ENV)
        assert ran.returncode == 0, ran.stdout
        sid = session_of(world, ran.pid)
    finally:
        reload(world, world["base"])
    rows = recordings(world, sid)
    # Cut at 4096 bytes; the message the cut fell in is dropped whole when it is stored.
    assert 3000 < sum(len(r["data"]) for r in rows[:-1]) <= 4096
    assert rows[-1]["direction"] == "event"
    assert json.loads(rows[-1]["data"]) == {"type": "truncated", "reason": "recording_max_bytes", "max_bytes": 4096}
    lines = replay(world, sid)
    # The marker where the recording stops: the big answer is cut short there. The statements
    # keep their audit rows (decision, time) whatever the recording holds.
    first = lines.index("SELECT repeat('x', 100) AS filler FROM generate_series(1, 200)")
    stop = lines.index("-- botwarden: the recording stops here: the session reached [audit] recording_max_bytes "
                       "(4096 bytes)")
    assert first < stop and "(200 rows)" not in lines, "\n".join(lines)
    assert sum(1 for line in lines if line.startswith("Time: ")) == 2


def test_metadata_only_target_records_events_not_bytes(world):
    net, pg = world["net"], world["pg"]
    text = world["base"].replace('authentication = "attestation"\n', 'authentication = "attestation"\nrecord = "metadata"\n', 1)
    reload(world, text)
    try:
        ran = bot_run(world["config"], BOT, psql_argv(net.ip_a, pg.port, "SELECT 'metadata only' AS m"),
                      env=PSQL_ENV)
        assert ran.returncode == 0, ran.stdout
        sid = session_of(world, ran.pid)
    finally:
        reload(world, world["base"])
    rows = recordings(world, sid)
    assert [r["direction"] for r in rows] == ["event"]
    assert json.loads(rows[0]["data"])["recording"] == "metadata"
    lines = replay(world, sid)
    assert "-- [allow] SELECT 'metadata only' AS m" in lines


# -- a daemon killed mid-session (last: it stops the module's daemon, then starts it again) ----------


def test_killed_daemon_leaves_the_recording_complete_up_to_its_last_chunk(world):
    net, pg, daemon = world["net"], world["pg"], world["daemon"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    bot = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(world["config"]), "bot", "run",
                            "--name", BOT, "--user", "nobody", "--",
                            *psql_argv(net.ip_a, pg.port, "SELECT 'before the kill' AS one",
                                       "SELECT 'still before' AS two", "SELECT pg_sleep(60)")],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**base, **PSQL_ENV, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while True:
            rows = daemon.audit_sql("SELECT session_id FROM sessions WHERE pid = ?", [bot.pid])
            recs = recordings(world, rows[0]["session_id"]) if rows else []
            if any(b"still before" in r["data"] for r in recs if r["direction"] == "out") and \
                    any(b"pg_sleep" in r["data"] for r in recs if r["direction"] == "in"):
                break
            assert time.monotonic() < deadline and bot.poll() is None, recs
            time.sleep(0.1)
        sid, last = rows[0]["session_id"], recs[-1]["seq"]
        daemon.proc.kill()
        daemon.proc.wait()
        out, _ = bot.communicate(timeout=60)
    finally:
        if bot.poll() is None:
            bot.kill()
    # The audit process commits what reached it and exits; then the file is free to read.
    deadline = time.monotonic() + 30
    while "rows checked" not in (res := cli(world["config"], "audit", "verify")).stdout:
        assert time.monotonic() < deadline, res.stdout + res.stderr
        time.sleep(0.5)
    assert f"session {sid} has no end on record: its recording ends at chunk {last} (" in res.stdout, res.stdout
    assert "complete up to there" in res.stdout and "chunk(s) before it are missing" not in res.stdout
    lines = replay(world, sid)
    ok, missing = in_order(["SELECT 'still before' AS two", "     two      ", "--------------", " still before",
                            "(1 row)", "SELECT pg_sleep(60)",
                            "-- (no complete answer recorded: the session or its recording ended here)"], lines)
    assert ok, missing
    world["daemon"].start()   # the module's teardown stops it and detaches the probes
