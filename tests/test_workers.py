"""appliance.workers = 2 for real: one daemon (`botwarden run`), two worker processes accepting on
its listener, a real PostgreSQL, a real OpenBao, psql and psycopg as the bots.

Which worker serves a session is the kernel's choice; the tests open connections until the
session listing (its ``worker`` field) shows the spread they need.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import psycopg
import pytest

from appliance.config import parse_config
from appliance.control import ControlError
from appliance.errors import ConfigError
from tests.approvals_fixtures import wait_until
from tests.daemon_fixtures import ROOT, RULES, DaemonProcess, fresh_setup, new_port, psql, seed_orders, write_config
from tests.test_metrics import samples, scrape_socket, value

WORKERS = 'workers = 2\n'


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


wait_for = functools.partial(wait_until, timeout=30.0)


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workers")
    seed_orders(pg_server)
    setup = fresh_setup(bao_server, pg_server, workdir)
    port = new_port()
    config = write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup, listen_port=port,
                          socket_group=None)
    text = config.read_text().replace("[appliance]\n", "[appliance]\n" + WORKERS, 1)
    config.write_text(text)
    daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
    try:
        yield type("Env", (), {"pg": pg_server, "bao": setup, "port": port, "config": config, "daemon": daemon,
                               "workdir": workdir})
    finally:
        daemon.stop()


def dsn(env, token: str) -> str:
    return (f"host=127.0.0.1 port={env.port} user=orders-bot dbname=postgres password={token} "
            "sslmode=disable connect_timeout=10")


def worker_of(env, conn: psycopg.Connection) -> int:
    """The worker serving this connection's session (matched by its Vault-made database user)."""
    user = conn.execute("SELECT current_user").fetchone()[0]
    sessions = env.daemon.client().get("/v1/sessions")["sessions"]
    (found,) = [s for s in sessions if s["credential_user"] == user]
    return found["worker"]


def connect_on_every_worker(env, stack: ExitStack, token: str, per_worker: int = 1) -> dict[int, list]:
    """Open connections until each worker serves at least ``per_worker`` of them."""
    by_worker: dict[int, list] = {1: [], 2: []}
    for _ in range(60):
        conn = stack.enter_context(psycopg.connect(dsn(env, token), autocommit=True))
        by_worker[worker_of(env, conn)].append(conn)
        if all(len(c) >= per_worker for c in by_worker.values()):
            return by_worker
    raise AssertionError(f"60 connections did not reach both workers: {[len(c) for c in by_worker.values()]}")


def workers_status(env) -> list[dict]:
    return env.daemon.client().get("/v1/status")["workers"]


# -- config -----------------------------------------------------------------------------------


def test_workers_setting_is_validated_with_the_key_named():
    assert parse_config("[appliance]\n").appliance.workers == 1
    assert parse_config("[appliance]\nworkers = 4\n").appliance.workers == 4
    for bad in ("0", "65", '"two"'):
        with pytest.raises(ConfigError, match=r"<memory>:2: appliance.workers"):
            parse_config(f"[appliance]\nworkers = {bad}\n")
    ssh = """[appliance]
workers = 2
[[targets]]
name = "box"
protocol = "ssh"
address = "10.0.0.5:22"
listen = "127.0.0.1:2222"
"""
    with pytest.raises(ConfigError, match=r"appliance.workers: workers > 1 serves PostgreSQL targets only"):
        parse_config(ssh)


# -- the running daemon ---------------------------------------------------------------------------


def test_status_shows_two_ready_workers(env):
    status = workers_status(env)
    assert [w["worker"] for w in status] == [1, 2]
    assert all(w["ready"] and w["pid"] and w["pid"] != env.daemon.proc.pid for w in status)


def test_sessions_on_both_workers_audit_into_one_verified_chain(env):
    token = env.bao.mint_token()
    users = {}
    with ExitStack() as stack:
        by_worker = connect_on_every_worker(env, stack, token)
        for worker, conns in by_worker.items():
            conn = conns[0]
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 20
            assert conn.execute("SELECT sum(total) FROM orders WHERE id < 3").fetchone()[0] == 30
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drops"):
                conn.execute("DROP TABLE orders")
            assert conn.execute("SELECT 1").fetchone()[0] == 1  # still usable after the block
            users[worker] = conn.execute("SELECT current_user").fetchone()[0]
    rows = wait_for(lambda: (r := env.daemon.audit_sql(
        "SELECT s.credential_user, s.outcome, e.requests, count(q.seq) AS n, max(q.seq) AS top "
        "FROM sessions s JOIN session_ends e USING (session_id) JOIN requests q USING (session_id) "
        "WHERE list_contains(?, s.credential_user) GROUP BY ALL", [list(users.values())])) and len(r) == 2 and all(x["outcome"] == "ok" for x in r) and r,
        what="both sessions ended in the audit")
    for row in rows:
        # Numbered by the worker, 1..n without a hole, and session_end counts them.
        assert row["n"] == row["top"] == row["requests"] >= 5
    res = cli("--config", str(env.config), "audit", "verify")
    assert res.returncode == 0, res.stdout + res.stderr


def test_what_workers_send_in_frames_reaches_the_listing_and_metrics(env):
    """A worker sends its records to the daemon as frames of rows the daemon hands on unopened,
    with what the daemon needs of them beside: each session's current statement (the listing),
    decision and session counts (/metrics), the highest request number (counted above)."""
    def metric(name: str, **labels: str) -> float:
        return value(samples(scrape_socket(env.daemon.socket)[1]), name, **labels)

    blocked_before = metric("botwarden_decisions_total", action="block", rule="no-drops")
    ended_before = metric("botwarden_sessions_total", target="orders", identity="orders-bot", outcome="ok")
    token = env.bao.mint_token()
    with ExitStack() as stack:
        by_worker = connect_on_every_worker(env, stack, token)
        opened = sum(len(c) for c in by_worker.values())
        for worker, conns in by_worker.items():
            conn = conns[0]
            user = conn.execute("SELECT current_user").fetchone()[0]
            marker = f"bw-current-{worker}"
            t = threading.Thread(target=lambda c=conn, m=marker: c.execute(f"SELECT pg_sleep(1.5) /* {m} */"))
            t.start()

            def listed(user: str = user) -> dict:
                return next(s for s in env.daemon.client().get("/v1/sessions")["sessions"]
                            if s["credential_user"] == user)

            # The listing follows the worker's frames (sent lazily): the statement before, already
            # answered, may still show as running for a frame; the marker's statement follows it.
            running = wait_for(lambda: s if (s := listed()).get("current_running") and marker in s["current"]
                               else None, what=f"worker {worker}'s statement as the session's current one")
            assert running["worker"] == worker
            t.join(30)
            assert not t.is_alive()
            done = wait_for(lambda: s if not (s := listed()).get("current_running") else None,
                            what="the statement no longer running")
            assert marker in done["current"]
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drops"):
                conn.execute("DROP TABLE orders")
    wait_for(lambda: metric("botwarden_decisions_total", action="block", rule="no-drops") == blocked_before + 2,
             what="both workers' blocks counted")
    wait_for(lambda: metric("botwarden_sessions_total", target="orders", identity="orders-bot", outcome="ok")
             == ended_before + opened, what="every session's end counted")


def _running(pg, marker: str) -> bool:
    return pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30) /* {marker} */%'") != "0"


def test_cancel_request_accepted_by_the_other_worker_cancels_the_query(env):
    """psycopg's cancel() opens a new connection, which the kernel gives to either worker: repeat
    until one landed on the worker that does not own the session (the daemon counts each cancel it
    forwarded), and check that every cancel stopped its pg_sleep."""
    token = env.bao.mint_token()
    forwarded_before = sum(w["cancels_forwarded"] for w in workers_status(env))
    with psycopg.connect(dsn(env, token), autocommit=True) as conn:
        for attempt in range(30):
            marker = f"bw-xcancel-{attempt}"
            result: dict = {}

            def run() -> None:
                try:
                    conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
                    result["ok"] = True
                except psycopg.Error as e:
                    result["error"] = e

            t = threading.Thread(target=run)
            t.start()
            wait_for(lambda: _running(env.pg, marker), what="the pg_sleep to run")
            conn.cancel()  # returns once botwarden closed the cancel connection
            t.join(20)
            assert not t.is_alive()  # the 30 s sleep was cancelled (QueryCanceled below), not waited out
            assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
            if sum(w["cancels_forwarded"] for w in workers_status(env)) > forwarded_before:
                break
        else:
            raise AssertionError("30 cancel connections all landed on the session's own worker")
        assert conn.execute("SELECT 1").fetchone()[0] == 1  # the session goes on

    def cancelled() -> int:  # the audit store commits the last record a moment after the session ended
        return env.daemon.audit_sql("SELECT count(*) AS n FROM requests WHERE text LIKE "
                                    "'SELECT pg_sleep(30) /* bw-xcancel-%' AND sqlstate = '57014'")[0]["n"]

    wait_for(lambda: cancelled() >= attempt + 1, what="every cancelled statement in the audit store")
    assert cancelled() == attempt + 1


def test_hold_approved_from_two_clients_at_once_runs_once(env):
    token = env.bao.mint_token()
    env.pg.psql("DROP TABLE IF EXISTS bumps; CREATE TABLE bumps (n int); INSERT INTO bumps VALUES (0)")
    result: dict = {}

    def bot() -> None:
        result["res"] = psql(env.port, token, "UPDATE bumps SET n = n + 1", "SELECT n FROM bumps")

    t = threading.Thread(target=bot)
    t.start()
    items = wait_for(lambda: env.daemon.client().get("/v1/approvals")["approvals"], what="the UPDATE to be held")
    (item,) = items
    barrier = threading.Barrier(2)
    answers: list = []

    def approve() -> None:
        client = env.daemon.client()
        barrier.wait()
        try:
            answers.append(client.post(f"/v1/approvals/{item['approval_id']}/approve", {}))
        except ControlError as e:
            answers.append(e.status)

    threads = [threading.Thread(target=approve) for _ in range(2)]
    for a in threads:
        a.start()
    for a in threads:
        a.join(30)
    t.join(30)
    assert sorted(str(a) for a in answers if isinstance(a, int)) in (["404"], ["409"])
    assert [a["state"] for a in answers if isinstance(a, dict)] == ["approved"]
    assert result["res"].stdout.strip().splitlines()[-1] == "1"
    assert env.pg.psql("SELECT n FROM bumps") == "1"
    rows = env.daemon.audit_sql("SELECT event FROM approvals WHERE approval_id = ? ORDER BY chain_seq",
                                [item["approval_id"]])
    assert [r["event"] for r in rows].count("approved") == 1
    # Strict mode across the link: the UPDATE ran after its start record was acknowledged.
    starts = env.daemon.audit_sql("SELECT s.seq, q.seq AS done FROM request_starts s JOIN requests q USING "
                                  "(request_id) WHERE s.text = 'UPDATE bumps SET n = n + 1'")
    assert len(starts) == 1 and starts[0]["seq"] == starts[0]["done"]


def test_operator_ends_a_session_served_by_a_worker(env):
    token = env.bao.mint_token()
    with ExitStack() as stack:
        by_worker = connect_on_every_worker(env, stack, token)
        for worker, conns in by_worker.items():
            user = conns[0].execute("SELECT current_user").fetchone()[0]
            (s,) = [s for s in env.daemon.client().get("/v1/sessions")["sessions"] if s["credential_user"] == user]
            env.daemon.client().post(f"/v1/sessions/{s['session_id']}/end", {"reason": f"test {worker}"})
            with pytest.raises(psycopg.OperationalError, match="ended by operator"):
                for _ in range(50):
                    conns[0].execute("SELECT 1")
                    time.sleep(0.1)
            rows = wait_for(lambda: (r := env.daemon.audit_sql("SELECT outcome FROM sessions WHERE session_id = ?",
                                                               [s["session_id"]])) and r[0]["outcome"] != "open" and r,
                            what="the ended session's row")
            assert rows[0]["outcome"] == "terminated"


def test_sighup_moves_every_worker_to_the_new_policy(env):
    token = env.bao.mint_token()
    before = {w["worker"]: w["generation"] for w in workers_status(env)}
    original = env.config.read_text()
    try:
        env.config.write_text(original + """
[[rules]]
name = "no-orders-after-reload"
action = "block"
[rules.sql]
relations = ["orders"]
""")
        env.daemon.signal(signal.SIGHUP)
        wait_for(lambda: all(w["generation"] > before[w["worker"]] for w in workers_status(env)),
                 what="every worker to acknowledge the new generation")
        assert env.daemon.client().get("/v1/status")["last_reload_error"] is None
        with ExitStack() as stack:
            by_worker = connect_on_every_worker(env, stack, token)
            for conns in by_worker.values():
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-orders-after-reload"):
                    conns[0].execute("SELECT count(*) FROM orders")
                assert conns[0].execute("SELECT count(*) FROM customers").fetchone()[0] == 2
    finally:
        env.config.write_text(original)
        gen = {w["worker"]: w["generation"] for w in workers_status(env)}
        env.daemon.signal(signal.SIGHUP)
        wait_for(lambda: all(w["generation"] > gen[w["worker"]] for w in workers_status(env)),
                 what="the original config back on every worker")


def test_a_killed_worker_ends_its_sessions_withdraws_its_holds_and_restarts(env):
    token = env.bao.mint_token()
    env.pg.psql("DROP TABLE IF EXISTS doomed; CREATE TABLE doomed (n int); INSERT INTO doomed VALUES (1)")
    with ExitStack() as stack:
        by_worker = connect_on_every_worker(env, stack, token)
        victim, survivor = by_worker[1][0], by_worker[2][0]
        victim_user = victim.execute("SELECT current_user").fetchone()[0]
        survivor_user = survivor.execute("SELECT current_user").fetchone()[0]
        held: dict = {}

        def hold() -> None:
            try:
                victim.execute("DELETE FROM doomed")
            except psycopg.Error as e:
                held["error"] = e

        t = threading.Thread(target=hold)
        t.start()
        (item,) = wait_for(lambda: env.daemon.client().get("/v1/approvals")["approvals"], what="the DELETE held")
        old = {w["worker"]: w for w in workers_status(env)}
        os.kill(old[1]["pid"], signal.SIGKILL)
        t.join(20)
        assert isinstance(held.get("error"), psycopg.OperationalError)  # its connection is gone
        # The bot sees its connection close when the kernel reaps the worker; the supervisor
        # withdraws the hold when it reads the link's end, a moment later.
        wait_for(lambda: env.daemon.client().get("/v1/approvals")["approvals"] == [], what="the hold withdrawn")
        # The other worker's session goes on.
        assert survivor.execute("SELECT count(*) FROM orders").fetchone()[0] == 20
        assert survivor.execute("SELECT current_user").fetchone()[0] == survivor_user
        restarted = wait_for(lambda: (w := workers_status(env)[0])["ready"] and w["pid"] != old[1]["pid"] and w,
                             what="worker 1 to restart")
        assert restarted["restarts"] == old[1]["restarts"] + 1
    assert env.pg.psql("SELECT n FROM doomed") == "1"
    rows = wait_for(lambda: env.daemon.audit_sql(
        "SELECT outcome, error FROM sessions WHERE credential_user = ?", [victim_user]), what="the victim's end")
    assert rows[0]["outcome"] == "error" and "died" in rows[0]["error"]
    events = env.daemon.audit_sql("SELECT event, reason FROM approvals WHERE approval_id = ? ORDER BY chain_seq",
                                  [item["approval_id"]])
    assert [e["event"] for e in events] == ["requested", "abandoned"] and "died" in events[1]["reason"]
    # Its credential was revoked: the database user is gone.
    wait_for(lambda: env.pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{victim_user}'") == "0",
             what="the dead worker's session's role to be revoked")
    # Both workers serve again, and the chain still verifies.
    with ExitStack() as stack:
        by_worker = connect_on_every_worker(env, stack, token)
        assert all(c[0].execute("SELECT 1").fetchone()[0] == 1 for c in by_worker.values())
    res = cli("--config", str(env.config), "audit", "verify")
    assert res.returncode == 0, res.stdout + res.stderr


def test_sigterm_drains_every_worker_and_exits_0(pg_server, bao_server, tmp_path):
    setup = fresh_setup(bao_server, pg_server, tmp_path)
    port = new_port()
    config = write_config(tmp_path / "botwarden.toml", workdir=tmp_path, pg=pg_server, bao=setup, listen_port=port)
    config.write_text(config.read_text().replace("[appliance]\n", "[appliance]\n" + WORKERS, 1))
    daemon = DaemonProcess(config, tmp_path / "run" / "control.sock").start()
    env = type("Env", (), {"port": port, "daemon": daemon})
    try:
        pids = [w["pid"] for w in workers_status(env)]
        token = setup.mint_token()
        with ExitStack() as stack:
            by_worker = connect_on_every_worker(env, stack, token)
            users = [c[0].execute("SELECT current_user").fetchone()[0] for c in by_worker.values()]
            daemon.signal(signal.SIGTERM)
            assert daemon.proc.wait(30) == 0
            for conns in by_worker.values():
                with pytest.raises(psycopg.OperationalError, match="botwarden is shutting down"):
                    conns[0].execute("SELECT 1")
    finally:
        daemon.stop()
    for pid in pids:  # no worker outlives the daemon
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    import duckdb

    con = duckdb.connect(str(tmp_path / "state" / "audit.duckdb"), read_only=True)
    ends = con.execute("SELECT outcome FROM sessions WHERE list_contains(?, credential_user)", [users]).fetchall()
    # Both ended by the drain (not buried as a dead worker's, not left open).
    assert len(ends) == 2 and {e[0] for e in ends} <= {"ok", "terminated"}, ends


def test_audit_flush_waits_for_the_records_each_worker_has_not_sent(env):
    """A worker sends its records to the daemon within 5 ms (lazily, one frame per batch);
    /v1/audit/flush asks each worker for what it still holds before it flushes the store, so a
    statement the bot has its answer for is in the store when the flush returns. Before, a query
    right after the flush could miss the last few statements (CI saw one missing)."""
    token = env.bao.mint_token()
    with ExitStack() as stack:
        conns = [c[0] for c in connect_on_every_worker(env, stack, token).values()]
        users = [c.execute("SELECT current_user").fetchone()[0] for c in conns]
        short = []
        for n in range(1, 41):
            for conn in conns:
                conn.execute(f"SELECT {n} AS flush_no").fetchone()
            env.daemon.client().post("/v1/audit/flush")
            rows = env.daemon.audit_sql(
                "SELECT s.credential_user AS u, count(*) AS n FROM requests q JOIN sessions s USING (session_id) "
                "WHERE q.text LIKE 'SELECT % AS flush_no' AND list_contains(?, s.credential_user) GROUP BY ALL",
                [users])
            got = {r["u"]: r["n"] for r in rows}
            if got != {u: n for u in users}:
                short.append((n, got))
        assert not short, f"rounds where a flush returned before a worker's records were in: {short[:5]}"


def test_a_killed_worker_leaves_the_records_it_had_not_sent_counted(env):
    # Plain reads go at once (strict_reads = false) and a worker sends their records to the daemon
    # within 5 ms: a worker killed meanwhile loses them. It marked each one issued (the daemon's
    # high-water file, before the answer went to the bot), so the daemon records the shortfall
    # (audit_losses, cause worker_crash) and verify counts at least every read the bot saw that
    # has no record. Last in this module: the store has a gap afterwards.
    token = env.bao.mint_token()
    seen: list[int] = []
    with ExitStack() as stack:
        victim = connect_on_every_worker(env, stack, token)[1][0]
        user = victim.execute("SELECT current_user").fetchone()[0]

        def reads() -> None:
            n = 0
            try:
                while True:
                    n += 1
                    victim.execute(f"SELECT {n} AS read_no").fetchone()
                    seen.append(n)
            except psycopg.Error:
                pass

        t = threading.Thread(target=reads)
        t.start()
        wait_for(lambda: len(seen) >= 300, what="300 reads")
        old = {w["worker"]: w for w in workers_status(env)}
        os.kill(old[1]["pid"], signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()
        wait_for(lambda: (w := workers_status(env)[0])["ready"] and w["pid"] != old[1]["pid"], what="the restart")
    (session,) = wait_for(lambda: env.daemon.audit_sql(
        "SELECT session_id FROM sessions WHERE credential_user = ? AND ended_at IS NOT NULL", [user]),
        what="the session's end")
    texts = [r["text"] for r in env.daemon.audit_sql("SELECT text FROM requests WHERE session_id = ?",
                                                      [session["session_id"]])]
    recorded = {int(t.split()[1]) for t in texts if t.endswith("AS read_no")}
    unrecorded = set(seen) - recorded
    losses = env.daemon.audit_sql("SELECT cause, missing FROM audit_losses WHERE session_id = ?",
                                  [session["session_id"]])
    assert sum(r["missing"] for r in losses) >= len(unrecorded), (len(unrecorded), losses)
    assert all(r["cause"] == "worker_crash" for r in losses)
    doc = env.daemon.client().post("/v1/audit/verify", {"allow_gaps": False}, timeout=120)
    assert doc["missing_events"] >= len(unrecorded), doc["report"]
    if unrecorded:
        assert not doc["passes"] and session["session_id"] in doc["report"], doc["report"]
