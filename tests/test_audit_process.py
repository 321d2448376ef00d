"""The audit store in its own process (appliance.auditproc): the same contract as the store —
nothing accepted is lost, nothing sensitive is stored, a failing store refuses work — across a
process boundary, including either side dying."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest

from analytics import AuditStore
from analytics.errors import (AuditClosedError, AuditError, AuditRecordError, AuditWriterError,
                              ReadOnlyViolation, UnknownReport)
from analytics.schema import RecordValidator
from appliance.auditproc import AuditProcess
from appliance.daemon import autogroups_enabled
from appliance.errors import BotwardenError
from appliance.policy.masking import DetectorSettings
from appliance.policy.redact import MASK
from tests.daemon_fixtures import ROOT
from tests.servers import pause

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)


def request(i: int, **extra) -> dict:
    return {"request_id": f"r{i}", "session_id": "s1", "ts": NOW, "protocol": "postgres", "kind": "query",
            "text": f"SELECT {i}", "decision": "allow", **extra}


def wait_for(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return stat[0] != "Z"


def test_events_round_trip_redacted_and_chained(tmp_path):
    with AuditProcess(tmp_path / "a.duckdb", flush_interval=0.02) as p:
        assert p.pid != os.getpid() and process_alive(p.pid)
        for i in range(500):
            assert p.submit("request", request(i))
        assert p.submit("request", request(
            1000, text="SELECT * FROM cards WHERE pan = '4111111111111111'", params=["ada@example.com", "ok"],
            error="Key (email)=(bob@example.org) already exists"))
        assert p.submit("request", request(1001, decision="mask", params=["plain"]))
        p.flush()
        assert p.stats()["written"] == 502 and p.stats()["pending"] == 0
        cols, rows = p.query("SELECT count(*) FROM requests")
        assert rows == [(502,)]
        _, rows = p.query("SELECT text, params, error FROM requests WHERE request_id = ?", ["r1000"])
        assert rows == [("SELECT * FROM cards WHERE pan = '********'", [MASK, "ok"], f"Key (email)=({MASK}) already exists")]
        _, rows = p.query("SELECT params FROM requests WHERE request_id = 'r1001'")
        assert rows == [([MASK],)]  # a masked statement's parameters are masked whole
        assert p.verify().ok
        cols, _ = p.report("blocked_attempts")
        assert "decision" in cols
        with pytest.raises(UnknownReport):
            p.report("no-such-report")
        with pytest.raises(ReadOnlyViolation):
            p.query("DELETE FROM requests")
        pid = p.pid
    assert not process_alive(pid)
    # Closed cleanly: the child wrote its stop row and released the file.
    with AuditStore(tmp_path / "a.duckdb") as store:
        _, rows = store.query("SELECT event FROM writer_events WHERE epoch = 1 ORDER BY chain_seq")
        assert [r[0] for r in rows][-1] == "writer_stop"
        assert store.verify().ok


def test_strict_start_records_are_journaled_acknowledged_and_redacted(tmp_path):
    """submit_acked resolves once the child journaled the record; the journal and both rows of a
    request (its start and its completion, which reuses the start's redaction) hold no secret."""
    import asyncio

    secret_sql = "SELECT * FROM cards WHERE pan = '4111111111111111'"

    async def run(p: AuditProcess) -> None:
        loop = asyncio.get_running_loop()
        start = {**request(7, text=secret_sql), "params": ["ada@example.com"]}
        start.pop("decision")
        fut = p.submit_acked("request_start", {**start, "decision": "allow", "seq": 1}, loop)
        await asyncio.wait_for(fut, 10)
        journal = b"".join(f.read_bytes() for f in tmp_path.glob("a.duckdb.journal-*"))
        assert b"pan = '" in journal and b"4111111111111111" not in journal and b"ada@example.com" not in journal
        assert p.submit("request", request(7, text=secret_sql, params=["ada@example.com"], seq=1))

    with AuditProcess(tmp_path / "a.duckdb", journal=True) as p:
        asyncio.run(run(p))
        p.flush()
        _, rows = p.query("SELECT s.text, s.params, r.text, r.params FROM request_starts s JOIN requests r "
                          "USING (request_id, seq)")
        masked = "SELECT * FROM cards WHERE pan = '********'"
        assert rows == [(masked, [MASK], masked, [MASK])]
    assert list(tmp_path.glob("a.duckdb.journal-*")) == []  # a clean stop leaves no journal


def _journal_syscalls(tmp_path: Path, journal) -> list[str]:
    """The audit process's journal writes, fdatasyncs and acknowledgements (sendto on the events
    socket) while 20 strict-mode records are acknowledged one by one, as strace saw them."""
    import asyncio
    import shutil

    assert shutil.which("strace"), "Debian package strace (vagrant/provision.sh installs it)"
    log = tmp_path / "strace.txt"

    async def run(p: AuditProcess) -> None:
        loop = asyncio.get_running_loop()
        for i in range(20):
            await asyncio.wait_for(p.submit_acked("request_start", {**request(i), "seq": i + 1}, loop), 10)

    with AuditProcess(tmp_path / "a.duckdb", journal=journal, flush_interval=0.05) as p:
        tracer = subprocess.Popen(["strace", "-f", "-y", "-e", "trace=write,fdatasync,fsync,sendto", "-p", str(p.pid),
                                   "-o", str(log)], stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)  # attached to every thread
            assert tracer.poll() is None, tracer.stderr.read()
            asyncio.run(run(p))
        finally:
            tracer.terminate()
            tracer.wait(10)
    calls = []
    for line in log.read_text().splitlines():
        if ".journal-" in line and ("write(" in line or "fdatasync(" in line or "fsync(" in line):
            calls.append("fdatasync" if "fdatasync(" in line else "write" if "write(" in line else "fsync")
        elif "sendto(" in line and "socket:" in line and "= 8" in line.rsplit(")", 1)[-1]:
            calls.append("ack")
    return calls


def test_journal_sync_fdatasyncs_each_batch_before_it_is_acknowledged(tmp_path):
    """audit.journal_sync: every journal append is fdatasync-ed before the audit process sends its
    acknowledgement (the statement that waits runs only then), so an acknowledged record
    survives a power loss; without it the journal is never synced (a process's death only)."""
    synced = _journal_syscalls(tmp_path / "sync", "sync")
    writes = [i for i, c in enumerate(synced) if c == "write"]
    assert len(writes) >= 20 and synced.count("ack") >= 20, synced
    for i in writes:  # each append: its fdatasync, then (before any other append) its acknowledgement
        assert synced[i + 1] == "fdatasync", (i, synced[i:i + 3])
        assert "ack" in synced[i + 2:i + 3], (i, synced[i:i + 3])
    plain = _journal_syscalls(tmp_path / "plain", True)
    assert plain.count("write") >= 20 and plain.count("ack") >= 20, plain
    assert "fdatasync" not in plain and "fsync" not in plain, plain
    # The setting reaches the audit process the daemon starts.
    from appliance.config import parse_config
    from appliance.runtime import open_audit_store

    for setting, journal in (("true", "sync"), ("false", True)):
        cfg = parse_config(f'[audit]\npath = "{tmp_path / setting / "b.duckdb"}"\njournal_sync = {setting}\n')
        store = open_audit_store(cfg)
        try:
            assert store.options["journal"] == journal
        finally:
            store.close()


def test_batches_waiting_on_the_socket_are_journaled_and_acknowledged_together(tmp_path):
    """Group commit: 40 strict-mode records sent in 40 batches while the audit process is stopped
    are journaled in far fewer appends (one write, and with journal_sync one fdatasync, each) once
    it runs again, and every one of them is acknowledged."""
    import asyncio
    import struct

    async def run(p: AuditProcess) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(p.submit_acked("request_start", {**request(0), "seq": 1}, loop), 10)
        pause(p.pid)
        try:
            waits = []
            for i in range(1, 41):
                waits.append(p.submit_acked("request_start", {**request(i), "seq": i + 1}, loop))
                await asyncio.sleep(0.005)  # a turn of the loop each: its own batch
        finally:
            os.kill(p.pid, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*waits), 10)

    with AuditProcess(tmp_path / "a.duckdb", journal="sync", flush_interval=60) as p:
        asyncio.run(run(p))
        (journal,) = tmp_path.glob("a.duckdb.journal-*")
        data, pos, frames = journal.read_bytes(), 0, []
        while pos < len(data):
            (n,) = struct.unpack_from(">I", data, pos)
            frames.append(len(pickle.loads(data[pos + 4:pos + 4 + n])))
            pos += 4 + n
        assert sum(frames) == 41 and frames[0] == 1, frames
        assert len(frames) <= 5, frames  # 40 batches, grouped (one per batch before)


def test_a_full_events_socket_waits_in_strict_mode(tmp_path):
    """Once the event loop reads acknowledgements from the events socket, the socket's file is
    non-blocking: a burst larger than its buffer while the audit process is briefly stopped must
    wait for room, not be taken for a dead audit process."""
    import asyncio

    async def run(p: AuditProcess) -> None:
        loop = asyncio.get_running_loop()
        start = {**request(0), "seq": 1}
        await asyncio.wait_for(p.submit_acked("request_start", start, loop), 10)  # the loop now reads acks
        pause(p.pid)
        try:
            for i in range(1, 3001):  # ~6 MB: far more than a socket buffer holds
                assert p.submit("request", request(i, text="SELECT '" + "x" * 2000 + f"' -- {i}"))
            await asyncio.sleep(1.0)
        finally:
            os.kill(p.pid, signal.SIGCONT)

    import uvloop  # the daemon's loop: libuv makes a watched file non-blocking

    with AuditProcess(tmp_path / "a.duckdb", journal=True, flush_interval=0.05) as p:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(p))
        p.flush(60)
        assert p.stats()["restarts"] == 0 and p.unavailable is None
        _, rows = p.query("SELECT count(*) FROM requests")
        assert rows == [(3000,)]


def test_acknowledgements_are_read_from_the_start_so_plain_events_never_stall_the_child(tmp_path, monkeypatch):
    """Strict mode: the child acknowledges every frame it journals, whether a record in it waits or
    not. Once attached, the event loop reads those acknowledgements even if no record ever waits (a
    bot that only sends plain reads): hundreds of frames later the child still takes events, and
    after a crash the loop reads the new child's. Unread, ~300 acknowledgements filled the events
    socket, the child blocked sending the next and stopped reading: every session then waited for
    an audit store that never caught up (a strict daemon serving only plain reads hung)."""
    import asyncio

    import uvloop

    import appliance.auditproc as auditproc

    monkeypatch.setattr(auditproc, "_SEND_INTERVAL_S", 0.001)  # a frame per event: hundreds a second

    async def burst(p: AuditProcess, first: int, n: int) -> None:
        for i in range(first, first + n):
            assert p.submit("request", request(i))
            await asyncio.sleep(0.002)
        await asyncio.to_thread(p.flush, 20)

    async def run(p: AuditProcess) -> None:
        p.attach(asyncio.get_running_loop())
        await burst(p, 0, 600)
        old = p.pid
        os.kill(old, signal.SIGKILL)
        assert await asyncio.to_thread(wait_for, lambda: p.pid != old and p.unavailable is None, 20)
        await burst(p, 600, 600)

    with AuditProcess(tmp_path / "a.duckdb", journal=True, flush_interval=0.02, restart_after=0.2) as p:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(p))
        assert p.stats()["restarts"] == 1
        _, rows = p.query("SELECT count(DISTINCT request_id) FROM requests")
        assert rows == [(1200,)]
        assert p.stats()["acked"] >= 1200  # the last acknowledgement was read: every frame journaled


def test_malformed_records_fail_in_the_caller(tmp_path):
    with AuditProcess(tmp_path / "a.duckdb", strict=True) as p:
        with pytest.raises(AuditRecordError, match="decision"):
            p.submit("request", request(1, decision="maybe"))
        with pytest.raises(AuditRecordError, match="unknown audit event kind"):
            p.submit("nonsense", {})
        with pytest.raises(AuditRecordError, match="unknown fields"):
            p.submit("request", request(2, colour="blue"))
        assert p.stats()["submitted"] == 0
    with pytest.raises(AuditClosedError):
        p.submit("request", request(3))


def test_redaction_settings_follow_the_policy(tmp_path):
    secret = "Zq8xV2mK9pL4rT7w"  # 16 characters of high entropy
    with AuditProcess(tmp_path / "a.duckdb") as p:
        p.submit("request", request(1, params=[secret]))
        p.set_redaction(DetectorSettings(secret_min_length=16, secret_entropy=3.0))
        p.submit("request", request(2, params=[secret]))
        p.flush()
        _, rows = p.query("SELECT request_id, params FROM requests ORDER BY request_id")
    assert rows == [("r1", [secret]), ("r2", [MASK])]


def test_a_stalled_store_refuses_beyond_the_queue_and_recovers(tmp_path):
    p = AuditProcess(tmp_path / "a.duckdb", queue_max=200, flush_interval=0.02)
    p.start()
    try:
        pause(p.pid)  # the writer stops making progress
        accepted = sum(p.submit("request", request(i)) for i in range(300))
        assert accepted == 200
        assert p.stats()["refused"] == 100
        assert not p.healthy
        os.kill(p.pid, signal.SIGCONT)
        p.flush()
        assert p.healthy
        assert p.query("SELECT count(*) FROM requests")[1] == [(200,)]
    finally:
        os.kill(p.pid, signal.SIGCONT)
        p.close()


def test_a_dead_audit_process_fails_closed(tmp_path):
    p = AuditProcess(tmp_path / "a.duckdb", flush_interval=0.02, restart_after=None)
    p.start()
    p.submit("request", request(1))
    p.flush()
    os.kill(p.pid, signal.SIGKILL)
    assert wait_for(lambda: not p.healthy)
    assert p.submit("request", request(2)) is False
    with pytest.raises(AuditWriterError, match="audit store unavailable"):
        p.query("SELECT 1")
    with pytest.raises(AuditWriterError):
        p.close()  # an event was accepted and never written: the loss is reported



def test_a_send_refused_by_a_dead_audit_process_names_its_exit(tmp_path):
    """Killed while the sender ships events: whichever thread notices first, the reason the
    operator and refused bots read is the exit ("code -9"); a send failing first said "Broken
    pipe" (1 run in 5 before)."""
    p = AuditProcess(tmp_path / "a.duckdb", flush_interval=0.02, restart_after=None)
    p.start()
    assert p._send_failed(BrokenPipeError(32, "Broken pipe")) == "sending events failed: [Errno 32] Broken pipe"
    stop = threading.Event()

    def submitting() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            p.submit("request", request(n))
    t = threading.Thread(target=submitting)
    t.start()
    try:
        time.sleep(0.2)
        os.kill(p.pid, signal.SIGKILL)
        assert wait_for(lambda: p.unavailable is not None)
    finally:
        stop.set()
        t.join()
    assert p.unavailable == "the audit process exited (code -9)"
    assert p._send_failed(BrokenPipeError(32, "Broken pipe")) == "the audit process exited (code -9)"
    with pytest.raises(AuditWriterError, match=r"audit store unavailable: the audit process exited \(code -9\)"):
        p.query("SELECT 1")
    with pytest.raises(AuditWriterError):
        p.close()

def test_a_dead_audit_process_is_restarted_and_gets_what_it_had_not_committed(tmp_path):
    """kill -9 of the audit process with events shipped but not committed (a long batch window):
    the daemon side keeps them, the new process counts what the dead epoch holds, and the rest
    is sent to it again: every event is on record once, and verify accounts for the epoch."""
    p = AuditProcess(tmp_path / "a.duckdb", flush_interval=5.0, restart_after=0.3)
    p.start()
    try:
        p.set_redaction(DetectorSettings(secret_min_length=16, secret_entropy=3.0))
        for i in range(10):
            assert p.submit("request", request(i))
        p.flush()
        for i in range(10, 310):   # shipped within 10 ms, committed only after 5 s: in flight
            assert p.submit("request", request(i))
        assert wait_for(lambda: p.stats()["resent_after_crash"] == 0 and p._sent == 310)
        first = p.pid
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: not p.healthy)
        assert p.submit("request", request(310))  # kept for the next process (statements are refused meanwhile)
        assert wait_for(lambda: p.healthy and p.pid != first)
        assert p.stats()["restarts"] == 1 and not process_alive(first)
        assert p.stats()["resent_after_crash"] == 300
        # The new process writes, and with the settings the daemon sent before the crash.
        assert p.submit("request", request(311, params=["Zq8xV2mK9pL4rT7w"]))
        p.flush()
        _, rows = p.query("SELECT count(*), count(DISTINCT request_id), "
                          "count(*) FILTER (WHERE params = ['********']) FROM requests")
        assert rows == [(312, 312, 1)]
        report = p.verify()
        # The first epoch has no stop row, but the next writer counted it and the rest was re-sent.
        assert report.clean, report.text()
        assert any("ended abruptly after committing 10 events" in n for n in report.notes), report.notes
    finally:
        p.close()  # nothing was lost: no error


def frame_of(*records: dict) -> bytes:
    """Rows as a worker sends them (appliance.worker.StoreLink): validated, pickled as one list."""
    validate = RecordValidator()
    return pickle.dumps([("request", validate("request", r)[1]) for r in records])


def test_worker_frames_are_sent_on_unopened_in_order_redacted_and_resent_after_a_crash(tmp_path):
    """A worker's frame (rows it validated and pickled) goes to the child as it came, in order
    with the daemon's own events, redacted there like any row; frames in flight when the child
    dies are opened and re-sent to the next one, each event once."""
    p = AuditProcess(tmp_path / "a.duckdb", flush_interval=5.0, restart_after=0.3)
    p.start()
    try:
        p.set_redaction(DetectorSettings(secret_min_length=16, secret_entropy=3.0))
        assert p.submit("request", request(0))
        assert p.submit_frame(frame_of(*(request(i) for i in range(1, 50))), 49)
        assert p.submit("request", request(50))
        assert p.submit_frame(frame_of(request(51, params=["Zq8xV2mK9pL4rT7w"]), request(52)), 2)
        p.flush()
        assert p.stats()["written"] == 53
        _, rows = p.query("SELECT request_id, params FROM requests ORDER BY chain_seq")
        assert [r[0] for r in rows] == [f"r{i}" for i in range(53)]
        assert rows[51][1] == [MASK]  # redacted by the child as the daemon's own rows are
        for n in range(3):   # shipped within 10 ms, committed only after 5 s: in flight
            assert p.submit_frame(frame_of(*(request(i) for i in range(100 + 100 * n, 200 + 100 * n))), 100)
        assert wait_for(lambda: p._sent == 353)
        first = p.pid
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: p.healthy and p.pid != first)
        assert p.stats()["resent_after_crash"] == 300
        p.flush()
        _, rows = p.query("SELECT count(*), count(DISTINCT request_id) FROM requests")
        assert rows == [(353, 353)]
        assert p.verify().clean
    finally:
        p.close()  # nothing was lost: no error
    p = AuditProcess(tmp_path / "b.duckdb", queue_max=10)
    p.start()
    try:  # all or none: a frame that does not fit under queue_max is refused whole
        pause(p.pid)
        assert p.submit_frame(frame_of(*(request(i) for i in range(8))), 8)
        assert p.submit_frame(frame_of(*(request(i) for i in range(8, 16))), 8)  # below the limit when it came
        assert not p.submit_frame(frame_of(*(request(i) for i in range(16, 24))), 8)
        assert p.stats()["refused"] == 8 and p.stats()["pending"] == 16
    finally:
        os.kill(p.pid, signal.SIGCONT)
        p.close()


def test_a_workers_frame_with_strict_rows_is_acknowledged_whole_or_refuses_only_them(tmp_path):
    """appliance.workers > 1, strict mode: a worker's request_start rows travel in its frame with
    its other rows; the supervisor's future resolves once the audit process journaled the frame.
    While the audit process is down (restarting) the waiting statements are refused and the
    frame's other rows (statements already answered) are kept for the next process."""
    import asyncio
    from types import SimpleNamespace

    from appliance.config import parse_config
    from appliance.runtime import Runtime
    from tests.test_approvals import RUNTIME_CONFIG

    validate = RecordValidator()

    def start(i: int) -> dict:
        return {"request_id": f"r{i}", "session_id": "s1", "ts": NOW, "protocol": "postgres", "kind": "query",
                "text": f"INSERT INTO t VALUES ({i})", "seq": i}

    def frame(*rows: tuple[str, dict]) -> bytes:
        return pickle.dumps([(kind, validate(kind, r)[1]) for kind, r in rows])

    p = AuditProcess(tmp_path / "a.duckdb", flush_interval=0.02, restart_after=0.3, journal=True)
    p.start()
    runtime = Runtime(parse_config(RUNTIME_CONFIG, "bw.toml"), SimpleNamespace(audit=p))

    def relay(data: bytes, count: int, acks: list) -> asyncio.Future | None:
        return runtime.audit_relayed(data, count, {}, [], {}, [], {}, 0, acks)

    async def until(cond) -> None:
        for _ in range(500):
            if cond():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("timed out")

    async def main() -> str:
        ok = relay(frame(("request", request(1)), ("request_start", start(2))), 2, [(7, 1)])
        assert ok is not None
        await asyncio.wait_for(ok, 10)  # journaled
        first = p.pid
        os.kill(first, signal.SIGKILL)
        await until(lambda: not p.healthy)
        fut = relay(frame(("request", request(3)), ("request_start", start(4)), ("request", request(5))), 3, [(8, 1)])
        with pytest.raises(BotwardenError) as e:
            await asyncio.wait_for(fut, 10)
        await until(lambda: p.healthy and p.pid != first)
        return str(e.value)

    try:
        assert "cannot take the statement's record" in asyncio.run(main())
        assert p.stats()["refused"] == 1
        p.flush()
        _, rows = p.query("SELECT request_id FROM requests UNION ALL SELECT request_id FROM request_starts "
                          "ORDER BY 1")
        assert [r[0] for r in rows] == ["r1", "r2", "r3", "r5"]  # r4 never ran: refused, not recorded
    finally:
        p.close()


def test_the_audit_process_outlives_a_killed_daemon_only_to_close_the_file(tmp_path):
    """The daemon dies (kill -9) after flushing 100 events: the child commits, writes its
    stop row, exits, and the file opens and verifies."""
    path = tmp_path / "a.duckdb"
    script = textwrap.dedent(f"""
        import datetime as dt, os, signal, sys
        from appliance.auditproc import AuditProcess
        p = AuditProcess({str(path)!r}, flush_interval=0.02)
        p.start()
        now = dt.datetime.now(dt.timezone.utc)
        for i in range(100):
            p.submit("request", {{"request_id": f"r{{i}}", "session_id": "s", "ts": now, "protocol": "postgres",
                                  "kind": "query", "text": "SELECT 1", "decision": "allow"}})
        p.flush()
        print(p.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == -signal.SIGKILL, res.stderr
    child = int(res.stdout.strip())
    assert wait_for(lambda: not process_alive(child)), "the audit process stayed behind"
    with AuditStore(path) as store:
        assert store.query("SELECT count(*) FROM requests")[1] == [(100,)]
        _, rows = store.query("SELECT event FROM writer_events WHERE epoch = 1 ORDER BY chain_seq")
        assert [r[0] for r in rows][-1] == "writer_stop"
        assert store.verify().ok


def test_the_pace_mark_is_a_share_of_queue_max(tmp_path):
    import asyncio

    with pytest.raises(AuditError, match="pace_mark"):
        AuditProcess(tmp_path / "x.duckdb", pace_mark=0.9)
    with AuditProcess(tmp_path / "a.duckdb", queue_max=100, pace_mark=0.1, pace_wait=0.05) as p:
        pause(p.pid)
        try:
            for i in range(9):
                assert p.submit("request", request(i))
            time.sleep(0.1)   # shipped (or not): either way nothing is committed while it is stopped
            assert not p.behind
            assert p.submit("request", request(9))
            assert p.behind   # 10 of 100 uncommitted: the mark

            async def wait() -> None:
                room = p.room(asyncio.get_running_loop())
                assert room is not None
                await asyncio.wait_for(room, 30)   # the store stays stopped: only pace_wait ends it
            asyncio.run(wait())
            assert p.stats()["paced"] == 1 and p.behind
        finally:
            os.kill(p.pid, signal.SIGCONT)


def test_the_writers_duckdb_threads_reach_the_audit_process(tmp_path):
    # More threads than CPUs, so a query (which gets at least one per CPU) shows the setting arrived.
    cpus = os.cpu_count() or 1
    with AuditProcess(tmp_path / "a.duckdb", threads=cpus + 1) as p:
        assert p.query("SELECT current_setting('threads')")[1] == [(cpus + 1,)]
    with AuditProcess(tmp_path / "b.duckdb") as p:  # not given: DuckDB's own default, a thread per CPU
        assert p.query("SELECT current_setting('threads')")[1] == [(cpus,)]


def test_a_store_that_cannot_open_says_why(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = AuditProcess(blocker / "a.duckdb")
    with pytest.raises(AuditError, match=str(blocker)):
        p.start()
    assert p.pid is not None and not process_alive(p.pid)


def _thread_nices(pid: int) -> set[int]:
    """The nice value of every thread of ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    nices = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        nices.add(int(stat.rpartition(")")[2].split()[16]))
    return nices


def _daemon_setup(pg_server, bao_server, tmp_path, tag: str, audit_extra: str = "", workers: int = 1):
    """A real daemon (`botwarden run`) on the orders data with OpenBao credentials: (setup, bot
    port, config path, DaemonProcess not yet started). ``audit_extra``: lines for [audit];
    ``workers``: appliance.workers."""
    import uuid

    from appliance.sandbox import configure_openbao
    from tests.daemon_fixtures import DaemonProcess, new_port, seed_orders, write_config

    seed_orders(pg_server)
    setup = configure_openbao(bao_server, pg_server, tmp_path, tag=f"{tag}{uuid.uuid4().hex[:6]}")
    port = new_port()
    config = write_config(tmp_path / "bw.toml", workdir=tmp_path, pg=pg_server, bao=setup, listen_port=port)
    if audit_extra:
        config.write_text(config.read_text().replace("[audit]\n", f"[audit]\n{audit_extra}\n", 1))
        assert audit_extra in config.read_text()
    if workers > 1:
        config.write_text(config.read_text().replace("[appliance]\n", f"[appliance]\nworkers = {workers}\n", 1))
        assert f"workers = {workers}" in config.read_text()
    return setup, port, config, DaemonProcess(config, tmp_path / "run" / "control.sock")


def test_daemon_fails_closed_while_its_audit_process_is_down_and_recovers(pg_server, bao_server, tmp_path):
    from appliance.control import ControlError
    from tests.daemon_fixtures import psql

    setup, port, _, daemon = _daemon_setup(pg_server, bao_server, tmp_path, "a")
    daemon.start()
    try:
        token = setup.mint_token()
        assert psql(port, token, "SELECT 'before'").stdout.strip() == "before"
        open_session = psycopg.connect(host="127.0.0.1", port=port, user="orders-bot", password=token,
                                       dbname="postgres", sslmode="disable", autocommit=True)
        assert open_session.execute("SELECT 1").fetchone() == (1,)
        audit = daemon.client().get("/v1/status")["audit"]
        assert audit["healthy"] and audit["pid"] != daemon.proc.pid
        # Every daemon thread runs at the configured priority (default nice -10); its audit
        # process at the one botwarden was started with (this test's).
        started = os.getpriority(os.PRIO_PROCESS, 0)
        assert _thread_nices(daemon.proc.pid) == {-10}
        assert _thread_nices(audit["pid"]) == {started}
        os.kill(audit["pid"], signal.SIGKILL)
        assert wait_for(lambda: not daemon.client().get("/v1/status")["audit"]["healthy"])
        # A session already open runs nothing more: its next statement is refused and the session ends.
        with pytest.raises(psycopg.Error, match="audit store is unavailable"):
            open_session.execute("SELECT 'unaudited'").fetchone()
        with pytest.raises(psycopg.OperationalError):
            open_session.execute("SELECT 1")
        open_session.close()
        res = psql(port, token, "SELECT 'meanwhile'")
        assert "meanwhile" not in res.stdout
        assert "audit store" in res.stderr and "no session runs unaudited" in res.stderr, res.stderr
        with pytest.raises(ControlError, match="audit store unavailable") as refused:
            daemon.client().post("/v1/audit/sql", {"sql": "SELECT 1"})
        assert refused.value.status == 503
        # The daemon starts a new audit process; bots are served again, and audited.
        assert wait_for(lambda: daemon.client().get("/v1/status")["audit"]["healthy"], timeout=30)
        restarted = daemon.client().get("/v1/status")["audit"]["pid"]
        assert restarted != audit["pid"]
        assert _thread_nices(restarted) == {started}  # started again from a daemon thread, at -10
        assert psql(port, token, "SELECT 'after'").stdout.strip() == "after"
        rows = daemon.audit_sql("SELECT count(*) AS n FROM requests WHERE text = ?", ["SELECT 'after'"])
        assert rows[0]["n"] == 1
    finally:
        code = daemon.stop()
    assert code == 0


def _small_queue_daemon(pg_server, bao_server, tmp_path, tag: str):
    """A started daemon whose audit store refuses past 16 events (queue_max 20, batched): (setup,
    bot port, daemon, its audit process's pid)."""
    setup, port, _, daemon = _daemon_setup(pg_server, bao_server, tmp_path, tag,
                                           audit_extra="queue_max = 20\nmode = \"batched\"")
    daemon.start()
    return setup, port, daemon, daemon.client().get("/v1/status")["audit"]["pid"]


def _bot_conn(setup, port: int) -> psycopg.Connection:
    """The orders bot's psycopg connection through the daemon (autocommit)."""
    return psycopg.connect(host="127.0.0.1", port=port, user="orders-bot", password=setup.mint_token(),
                           dbname="postgres", sslmode="disable", autocommit=True)


def _run_until_refused(run, tries: int = 40) -> tuple[int, str | None]:
    """``run(i)`` until botwarden refuses it: (how many ran, the refusal's text or None)."""
    for i in range(tries):
        try:
            run(i)
        except psycopg.errors.InsufficientPrivilege as e:
            return i, str(e)
    return tries, None


def test_statements_wait_for_an_audit_store_that_cannot_keep_up(pg_server, bao_server, tmp_path):
    """The audit process stalls (SIGSTOP) with a small queue: statements in an open session are
    refused with a clear reason instead of running unaudited, and run again once it catches up."""
    setup, port, daemon, child = _small_queue_daemon(pg_server, bao_server, tmp_path, "q")
    try:
        conn = _bot_conn(setup, port)
        pause(child)
        ran, refusal = _run_until_refused(lambda i: conn.execute(f"SELECT {i}").fetchone())
        assert refusal is not None and 0 < ran < 20, (ran, refusal)
        assert "cannot keep up" in refusal and "no statement runs unaudited" in refusal
        assert not daemon.client().get("/v1/status")["audit"]["healthy"]
        os.kill(child, signal.SIGCONT)
        assert wait_for(lambda: daemon.client().get("/v1/status")["audit"]["healthy"])
        assert conn.execute("SELECT 'again'").fetchone() == ("again",)  # the same session carries on
        conn.close()
        rows = daemon.audit_sql("SELECT count(*) AS n FROM requests WHERE text LIKE 'SELECT %'")
        assert rows[0]["n"] >= ran + 1
    finally:
        os.kill(child, signal.SIGCONT)
        daemon.stop()


def test_a_prepared_statement_is_refused_too_while_the_audit_store_cannot_keep_up(pg_server, bao_server, tmp_path):
    """A statement prepared while the store kept up (decided at Parse) is checked again at each
    Execute: with the audit process stalled its runs are refused like new statements, not run with
    their records refused later (holes in the session's request seq). Found by `audit verify` after
    a pinned pgbench -M prepared run: 11,333 requests missing, their statements had run."""
    setup, port, daemon, child = _small_queue_daemon(pg_server, bao_server, tmp_path, "p")
    try:
        conn = _bot_conn(setup, port)
        query = "SELECT %s::int AS n"
        assert conn.execute(query, (0,), prepare=True).fetchone() == (0,)  # Parse: decided now
        pause(child)
        ran, refusal = _run_until_refused(
            lambda i: conn.execute(query, (i + 1,), prepare=True).fetchone())  # Bind + Execute only
        assert refusal is not None and 0 < ran < 20, (ran, refusal)
        assert "cannot keep up" in refusal and "no statement runs unaudited" in refusal
        os.kill(child, signal.SIGCONT)
        assert wait_for(lambda: daemon.client().get("/v1/status")["audit"]["healthy"])
        assert conn.execute(query, (99,), prepare=True).fetchone() == (99,)  # the same prepared statement
        conn.close()
        daemon.client().post("/v1/audit/flush")
        rows = daemon.audit_sql("SELECT decision, rule, params FROM requests WHERE kind = 'execute' ORDER BY chain_seq")
        assert [r["decision"] for r in rows] == ["allow"] * (ran + 1) + ["block", "allow"], rows
        assert rows[-2]["rule"] == "botwarden:audit"
        report = daemon.client().post("/v1/audit/verify", {"allow_gaps": False})
        assert report["clean"], report["report"]   # no request the daemon numbered is missing
    finally:
        os.kill(child, signal.SIGCONT)
        daemon.stop()


def _duty_cycle(pid: int, stop: "threading.Event", stopped_s: float = 0.6, running_s: float = 0.2) -> None:
    """An audit process that gets a quarter of the time it needs: stopped, then let run, until ``stop``."""
    while not stop.is_set():
        pause(pid)
        stop.wait(stopped_s)
        os.kill(pid, signal.SIGCONT)
        stop.wait(running_s)


@pytest.mark.parametrize("protocol,workers", [("query", 1), ("execute", 1), ("prepared", 1), ("function_call", 1),
                                              ("prepared", 2)],
                         ids=["query", "execute", "prepared", "function_call", "prepared-2-workers"])
def test_a_bot_faster_than_the_audit_store_is_paced_not_refused(pg_server, bao_server, tmp_path, protocol, workers):
    """The audit process gets a quarter of the CPU time it needs (stopped 0.6 s, running 0.2 s) while
    one bot sends statements as fast as it can: past 40 % of queue_max the bot's next statement
    waits for the store to catch up (botwarden_audit_paced_requests_total) instead of running
    ahead until the high water (80 %) refuses it. Nothing refused, nothing missing. Before pacing
    this bot was refused within the first stop (a psycopg round trip is well under 1 ms). With
    workers, the supervisor tells them the store is behind and they pace their sessions alike."""
    import threading

    from tests.test_metrics import samples, scrape_socket, value

    setup, port, _, daemon = _daemon_setup(pg_server, bao_server, tmp_path, "c", workers=workers,
                                           audit_extra=f"queue_max = {200 if workers == 1 else 800}\nmode = \"batched\"")
    daemon.start()
    child = daemon.client().get("/v1/status")["audit"]["pid"]
    stop = threading.Event()
    # Workers learn the store is behind from the supervisor (records reach it in frames, its health
    # goes out every 20 ms): a wider margin between the pace mark and the refusal, longer stops.
    cycler = threading.Thread(target=_duty_cycle, args=(child, stop, 0.6 * workers), daemon=True)
    ran = 0
    try:
        if protocol == "function_call":
            # libpq's large-object API: each lo_write is a FunctionCall message (lowrite).
            import psycopg2

            conn = psycopg2.connect(host="127.0.0.1", port=port, user="orders-bot", password=setup.mint_token(),
                                    dbname="postgres", sslmode="disable")
            lo = conn.lobject(0, "wb")

            def step(i: int) -> None:
                assert lo.write(b"x") == 1
        else:
            conn = _bot_conn(setup, port)
            # Query: the simple protocol (client-side binding); execute: Parse/Bind/Execute each
            # time; prepared: Parse once, then Bind/Execute.
            cur = psycopg.ClientCursor(conn) if protocol == "query" else conn.cursor()

            def step(i: int) -> None:
                assert cur.execute("SELECT %s::int", (i,), prepare=protocol == "prepared").fetchone() == (i,)
        cycler.start()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            step(ran)
            ran += 1
        stop.set()
        cycler.join()
        os.kill(child, signal.SIGCONT)
        if protocol == "function_call":
            lo.close()
            conn.rollback()
        conn.close()
        metrics = samples(scrape_socket(daemon.socket)[1])
        assert value(metrics, "botwarden_audit_paced_requests_total") > 0   # workers' waits counted too
        assert value(metrics, "botwarden_audit_events_refused_total") == 0
        if protocol == "function_call":
            query = "SELECT kind, count(*) AS n FROM requests WHERE text LIKE '%\"lowrite\"(%' GROUP BY kind"
            want = [("function_call", ran)]
        else:
            query = "SELECT kind, count(*) AS n FROM requests WHERE text LIKE 'SELECT %::int' GROUP BY kind"
            want = [("query" if protocol == "query" else "execute", ran)]

        daemon.client().post("/v1/audit/flush")  # with workers: their unsent records first
        assert [(r["kind"], r["n"]) for r in daemon.audit_sql(query)] == want
        report = daemon.client().post("/v1/audit/verify", {"allow_gaps": False})
        assert report["clean"], report["report"]
    finally:
        stop.set()
        os.kill(child, signal.SIGCONT)
        daemon.stop()


@pytest.mark.parametrize("protocol,workers", [("query", 1), ("execute", 1), ("execute", 2), ("function_call", 1)],
                         ids=["query", "execute", "execute-2-workers", "function_call"])
def test_a_statement_cancelled_while_paced_is_refused_with_57014_and_never_runs(pg_server, bao_server, tmp_path,
                                                                                protocol, workers):
    """A CancelRequest (psycopg's cancel, psql's Ctrl-C) while the bot's statement waits for the
    audit store (pacing) ends the wait: the statement is refused as cancelled (57014) and never
    reaches the server, the session goes on, and its record says why. Before, the cancel went to
    the idle backend, did nothing, and the statement ran after the wait. With workers the cancel
    may reach either worker, which forwards it to the one serving the session."""
    import threading

    from tests.test_metrics import samples, scrape_socket, value

    pg_server.psql("DROP TABLE IF EXISTS paced_runs; CREATE TABLE paced_runs (i int)")
    # pace_wait = 30: the statement waits until it is cancelled (the store is stopped throughout).
    setup, port, _, daemon = _daemon_setup(pg_server, bao_server, tmp_path, "k", workers=workers,
                                           audit_extra=f'queue_max = {200 * workers}\nmode = "batched"\npace_wait = 30')
    daemon.start()
    child = daemon.client().get("/v1/status")["audit"]["pid"]
    outcome: dict = {}
    try:
        if protocol == "function_call":
            _cancel_a_paced_function_call(setup, port, daemon, child)
            return
        conn = _bot_conn(setup, port)
        cur = psycopg.ClientCursor(conn) if protocol == "query" else conn.cursor()
        pause(child)

        def bot() -> None:
            i = 0
            try:
                while i < 1000:
                    cur.execute("INSERT INTO paced_runs VALUES (%s)", (i,))
                    i += 1
            except psycopg.Error as e:
                outcome.update(error=e, at=i)

        t = threading.Thread(target=bot, daemon=True)
        t.start()
        assert wait_for(lambda: value(samples(scrape_socket(daemon.socket)[1]),
                                      "botwarden_audit_paced_requests_total") > 0)
        assert t.is_alive()   # its statement waits
        conn.cancel()
        t.join(20)
        assert not t.is_alive()
        err = outcome["error"]
        assert isinstance(err, psycopg.errors.QueryCanceled), err
        assert err.sqlstate == "57014" and "canceling statement due to user request" in str(err)
        os.kill(child, signal.SIGCONT)
        # It never ran; every statement before it did; the session goes on.
        ran = outcome["at"]
        assert 0 < ran < 200 * workers
        assert pg_server.psql("SELECT count(*), max(i) FROM paced_runs").strip() == f"{ran}|{ran - 1}"
        assert cur.execute("SELECT count(*) FROM paced_runs").fetchone() == (ran,)
        conn.close()
        daemon.client().post("/v1/audit/flush")
        rows = daemon.audit_sql("SELECT decision, reason, sqlstate FROM requests WHERE text LIKE 'INSERT INTO paced_runs%' "
                                "AND decision <> 'allow'")
        assert rows == [{"decision": "block", "sqlstate": "57014",
                         "reason": "the client cancelled the statement while it waited for the audit store to catch up"}]
        report = daemon.client().post("/v1/audit/verify", {"allow_gaps": False})
        assert report["clean"], report["report"]
    finally:
        os.kill(child, signal.SIGCONT)
        daemon.stop()


def _cancel_a_paced_function_call(setup, port: int, daemon, child: int) -> None:
    """The FunctionCall case (libpq's large-object API, psycopg2): the cancelled lo_write is
    refused with 57014 and its record names the function, as a decided FunctionCall's does."""
    import threading

    import psycopg2

    from tests.test_metrics import samples, scrape_socket, value

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="orders-bot", password=setup.mint_token(),
                            dbname="postgres", sslmode="disable")
    lo = conn.lobject(0, "wb")
    assert lo.write(b"x") == 1   # its OID resolved (pg_proc) while the store still keeps up
    pause(child)
    outcome: dict = {}

    def bot() -> None:
        i = 1
        try:
            while i < 1000:
                assert lo.write(b"x") == 1
                i += 1
        except psycopg2.Error as e:
            outcome.update(error=e, at=i)

    t = threading.Thread(target=bot, daemon=True)
    t.start()
    assert wait_for(lambda: value(samples(scrape_socket(daemon.socket)[1]), "botwarden_audit_paced_requests_total") > 0)
    assert t.is_alive()
    conn.cancel()
    t.join(20)
    assert not t.is_alive()
    err = outcome["error"]
    # psycopg2 raises a large-object call's error as OperationalError, without its SQLSTATE;
    # the record below has it.
    assert isinstance(err, psycopg2.Error) and "canceling statement due to user request" in str(err), err
    os.kill(child, signal.SIGCONT)
    conn.rollback()
    conn.close()
    daemon.client().post("/v1/audit/flush")
    rows = daemon.audit_sql("SELECT text, decision, reason, sqlstate, params FROM requests "
                            "WHERE kind = 'function_call' AND decision <> 'allow'")
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["decision"], row["sqlstate"]) == ("block", "57014")
    assert row["reason"] == "the client cancelled the statement while it waited for the audit store to catch up"
    assert row["text"] == 'SELECT "pg_catalog"."lowrite"($1, $2)', row   # not "-- FunctionCall oid ..."
    assert row["params"] is not None and len(row["params"]) == 2
    allowed = daemon.audit_sql("SELECT count(*) AS n FROM requests WHERE kind = 'function_call' AND decision = 'allow' "
                               "AND text LIKE '%\"lowrite\"(%'")
    assert allowed == [{"n": outcome["at"]}]
    report = daemon.client().post("/v1/audit/verify", {"allow_gaps": False})
    assert report["clean"], report["report"]


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_strict_mode_never_runs_a_statement_the_audit_process_has_not_acknowledged(pg_server, bao_server, tmp_path,
                                                                                   workers):
    """audit.mode = "strict": with the audit process stalled (SIGSTOP) a write waits for its record's
    acknowledgement, is not run, and its session ends once ack_timeout passes; nothing reached
    the database. The next session, once the process runs again, writes and is on record first.
    With workers the start record travels in the worker's frame, acknowledged by the supervisor."""
    setup, port, _, daemon = _daemon_setup(pg_server, bao_server, tmp_path, "s",
                                           audit_extra="mode = \"strict\"\nack_timeout = 2", workers=workers)
    pg_server.psql("DROP TABLE IF EXISTS strict_t; CREATE TABLE strict_t (v text); GRANT ALL ON strict_t TO PUBLIC")
    daemon.start()
    child = daemon.client().get("/v1/status")["audit"]["pid"]
    try:
        conn = _bot_conn(setup, port)
        conn.execute("INSERT INTO strict_t VALUES ('before')")
        pause(child)
        with pytest.raises(psycopg.OperationalError, match="did not acknowledge the record"):
            conn.execute("INSERT INTO strict_t VALUES ('stalled')")
        assert pg_server.psql("SELECT string_agg(v, ',') FROM strict_t") == "before"
        os.kill(child, signal.SIGCONT)
        token = setup.mint_token()
        with psycopg.connect(host="127.0.0.1", port=port, user="orders-bot", password=token, dbname="postgres",
                             sslmode="disable", autocommit=True) as again:
            again.execute("INSERT INTO strict_t VALUES ('after')")
        rows = daemon.audit_sql("SELECT s.text, r.seq = s.seq AS same_seq FROM request_starts s "
                                "LEFT JOIN requests r USING (request_id) WHERE s.text LIKE 'INSERT INTO strict_t%' "
                                "ORDER BY s.chain_seq")
        # Every write has its start record, with the seq its requests row carries (the stalled one's
        # record was journaled before the stall ended its session; it never ran).
        assert [r["text"] for r in rows] == ["INSERT INTO strict_t VALUES ('before')",
                                             "INSERT INTO strict_t VALUES ('stalled')",
                                             "INSERT INTO strict_t VALUES ('after')"], rows
        assert [r["same_seq"] for r in rows] == [True, True, True]
        err = daemon.audit_sql("SELECT error FROM requests WHERE text = ?", ["INSERT INTO strict_t VALUES ('stalled')"])
        assert "it was not run" in err[0]["error"]
    finally:
        os.kill(child, signal.SIGCONT)
        daemon.stop()


def test_a_strict_daemon_serving_only_plain_reads_keeps_serving(pg_server, bao_server, tmp_path):
    """audit.mode = "strict" (the default) and a bot that only reads: no record ever waits for its
    acknowledgement, yet the audit process acknowledges every frame it journals (one every 10 ms
    under load). The daemon reads them from its start: 8 seconds of plain reads (several hundred
    frames) all run and are all on record. It did not: after ~300 frames the unread acknowledgements
    filled the socket, the audit process stopped taking events and every statement waited."""
    setup, port, _, daemon = _daemon_setup(pg_server, bao_server, tmp_path, "p", audit_extra="mode = \"strict\"")
    daemon.start()
    child = daemon.client().get("/v1/status")["audit"]["pid"]
    try:
        ran = 0
        with _bot_conn(setup, port) as conn:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                assert conn.execute("SELECT id FROM orders WHERE id = %s", [ran % 3 + 1]).fetchone() is not None
                ran += 1
        assert ran > 1000
        status = daemon.client().get("/v1/status")["audit"]
        assert status["healthy"] and status["pid"] == child, status  # the same audit process throughout
        rows = daemon.audit_sql("SELECT count(*) AS n FROM requests WHERE text LIKE 'SELECT id FROM orders WHERE id = %'")
        assert rows[0]["n"] == ran
    finally:
        daemon.stop()


def test_the_audit_process_ignores_signals_meant_for_the_daemon(tmp_path):
    """systemd (KillMode=control-group) or a terminal's Ctrl-C can signal the whole group: the
    child waits for the daemon to close the events stream, so its stop row is still written."""
    with AuditProcess(tmp_path / "a.duckdb", flush_interval=0.02) as p:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(p.pid, sig)
        time.sleep(0.3)
        assert process_alive(p.pid) and p.healthy
        assert p.submit("request", request(1))
        p.flush()
    with AuditStore(tmp_path / "a.duckdb") as store:
        _, rows = store.query("SELECT event FROM writer_events WHERE epoch = 1 ORDER BY chain_seq")
        assert [r[0] for r in rows][-1] == "writer_stop"


def _autogroup(pid: int | str) -> tuple[str, int]:
    """A process's scheduler autogroup and its nice ("/autogroup-N nice M")."""
    name, _, nice = Path(f"/proc/{pid}/autogroup").read_text().split()
    return name, int(nice)


@pytest.mark.skipif(not autogroups_enabled(), reason="the kernel schedules without autogroups here "
                                                 "(kernel.sched_autogroup_enabled is 0 or absent): nothing to set")
def test_a_daemon_leading_its_session_gives_its_autogroup_its_nice(pg_server, bao_server, tmp_path):
    """Between sessions the scheduler shares the CPU by autogroup, and a nice value counts only
    within one: the daemon's -10 gave its loop no precedence over bots or PostgreSQL's backends
    (each a session of its own). Started as a session of its own (setsid, as systemd starts a
    service), the daemon gives its autogroup its nice; its audit process is in that group. A daemon
    started inside another session (a shell's, this test's) leaves that session's group alone."""
    from tests.daemon_fixtures import psql

    # "/autogroup-N nice M", or nothing when this test's session is the root group (never made by setsid)
    before = Path("/proc/self/autogroup").read_text()
    setup, port, _, daemon = _daemon_setup(pg_server, bao_server, tmp_path, "g")
    daemon.prefix = ["setsid"]  # exec'd in place: the daemon's pid is the session's
    daemon.start()
    try:
        assert os.getsid(daemon.proc.pid) == daemon.proc.pid
        group, nice = _autogroup(daemon.proc.pid)
        assert nice == -10 and group not in before.split()
        audit = daemon.client().get("/v1/status")["audit"]
        assert _autogroup(audit["pid"]) == (group, -10)
        assert psql(port, setup.mint_token(), "SELECT 'served'").stdout.strip() == "served"
        assert "daemon scheduler autogroup: nice -10 (was 0)" in daemon.output()
    finally:
        daemon.stop()
    # Not the session's leader: this test's session keeps its group's nice.
    (tmp_path / "inside").mkdir()
    setup, port, _, inside = _daemon_setup(pg_server, bao_server, tmp_path / "inside", "h")
    inside.start()
    try:
        assert Path(f"/proc/{inside.proc.pid}/autogroup").read_text() == before == Path("/proc/self/autogroup").read_text()
        assert "counts within the session it was started in only" in inside.output()
    finally:
        inside.stop()


def test_the_audit_process_shares_the_daemons_session_and_scheduler_group(tmp_path):
    """Its own process group (a Ctrl-C for the daemon's group does not reach it) in the daemon's
    session: a session of its own would be a scheduler autogroup of its own, where the daemon's
    nice value gives its event loop no precedence over the audit batches (measured: the loop waited
    up to a 4 ms tick behind them, 1,000+ times in a 10 s pgbench run)."""
    with AuditProcess(tmp_path / "a.duckdb", flush_interval=0.02) as p:
        assert os.getsid(p.pid) == os.getsid(0)
        assert os.getpgid(p.pid) == p.pid != os.getpgid(0)
        autogroups = Path("/proc/sys/kernel/sched_autogroup_enabled")
        if autogroups.exists() and autogroups.read_text().strip() == "1":
            # "/autogroup-N nice M", or nothing in the root group (a session never made by setsid,
            # as under some CI runners): either way the same text, the nice value aside.
            def group(pid: int | str) -> list[str]:
                return Path(f"/proc/{pid}/autogroup").read_text().split()[:1]
            assert group(p.pid) == group("self")
        assert p.submit("request", request(1))
        p.flush()


def test_a_reload_sends_new_detector_settings_to_the_audit_process(pg_server, bao_server, tmp_path):
    setup, port, config, daemon = _daemon_setup(pg_server, bao_server, tmp_path, "r")
    daemon.start()
    secret = "Zq8xV2mK9pL4rT7w"  # 16 characters: below the default secret_min_length of 20
    try:
        def run(tag: str) -> None:
            with psycopg.connect(host="127.0.0.1", port=port, user="orders-bot", password=setup.mint_token(),
                                 dbname="postgres", sslmode="disable") as conn:
                conn.execute(f"SELECT %s::text AS {tag}", [secret]).fetchone()

        run("before")
        config.write_text(config.read_text() + "\n[masking]\nsecret_min_length = 16\nsecret_entropy = 3.0\n")
        assert daemon.client().post("/v1/reload")["reloaded"] is True
        run("after")
        rows = {r["text"].split(" AS ")[1]: r["params"] for r in daemon.audit_sql(
            "SELECT text, params FROM requests WHERE text LIKE 'SELECT $1::text AS %'")}
        assert rows == {"before": [secret], "after": [MASK]}
    finally:
        daemon.stop()


def test_recent_statement_texts_keep_at_least_the_last_ones_put():
    """The audit process redacts a recording's statements with what it did for their request rows,
    which came up to a second earlier: the last ``size`` texts put are always found (a dict cleared
    when full lost them all at each clear)."""
    from appliance.auditproc import RecentTexts

    recent = RecentTexts(4)
    for i in range(30):
        recent.put(f"SELECT {i}", f"SELECT {i} -- redacted")
        for j in range(max(0, i - 3), i + 1):
            assert recent.get(f"SELECT {j}") == f"SELECT {j} -- redacted"
    assert recent.get("SELECT 0") is None   # bounded
