"""Recordings without servers (issue 18): what the audit process keeps of a PostgreSQL chunk, the
session core's cap and metadata switch, the parse back into statements, and terminal recordings
in replay, asciicast and the console's player. The end-to-end tests are in
tests/test_recordings_e2e.py."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from analytics.schema import KINDS, normalize
from appliance.fronts.session import SessionCore
from appliance.policy.redact import AuditRedactor
from appliance.protocols.postgres import messages as m
from appliance.recordings.export import cast_events, write_cast
from appliance.recordings.load import SessionRecord
from appliance.recordings.pgstream import exchanges, frames, redact_chunk
from appliance.recordings.render import replay_document

CARD = "4111111111111111"
EMAIL = "ada.lovelace@example.com"
SECRET = "Zq8-q3xVb7Kp0Lm2Rt9Yw4Hs6Jd1Nf5"
T0 = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def test_redaction_keeps_no_detected_value_and_leaves_the_rest_as_sent():
    red = AuditRedactor()
    plain = m.Query("SELECT id FROM t WHERE id = 42").encode() + m.Sync().encode()
    sent = (plain
            + m.Query(f"ALTER ROLE bot PASSWORD '{SECRET}'").encode()
            + m.Parse("s1", f"SELECT * FROM cards WHERE card = '{CARD}' AND id = $1", (23,)).encode()
            + m.Bind("", "s1", (0, 0, 1), (CARD.encode(), b"7", b"\x00\x01"), ()).encode()
            + m.Bind("", "s1", (), (b"12345",), ()).encode()
            + m.CopyData(f"1\t{EMAIL}\n".encode()).encode()
            + m.FunctionCall(1234, (0,), (SECRET.encode(),), 0).encode())
    kept = redact_chunk(sent, "in", red)
    for secret in (CARD, EMAIL, SECRET):
        assert secret.encode() not in kept
    msgs = [m.decode_frontend(bytes([t]), kept[s + 5:e]) for t, s, e in frames(kept)]
    assert msgs[0] == m.Query("SELECT id FROM t WHERE id = 42") and kept.startswith(plain)
    assert msgs[2] == m.Query("ALTER ROLE bot PASSWORD '********'")
    assert msgs[3].query == "SELECT * FROM cards WHERE card = '********' AND id = $1"
    assert msgs[4].params == (b"********", b"7", b"********")   # a binary value is never kept
    assert msgs[5].params == (b"12345",)
    assert msgs[6] == m.CopyData(b"1\t********\n")
    assert msgs[7].args == (b"********",)
    got = (m.ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "23505"),
                            ("M", "duplicate key value violates unique constraint \"u\""),
                            ("D", f"Key (email)=({EMAIL}) already exists."))).encode()
           + m.NoticeResponse((("S", "NOTICE"), ("M", f"card {CARD} seen"))).encode()
           + m.DataRow((b"1", b"************1111")).encode() + m.ReadyForQuery("I").encode())
    kept = redact_chunk(got, "out", red)
    assert EMAIL.encode() not in kept and CARD.encode() not in kept
    err = m.decode_backend(b"E", kept[5:1 + int.from_bytes(kept[1:5], "big")])
    assert err.get("D") == "Key (email)=(********) already exists." and err.sqlstate == "23505"
    assert kept.endswith(m.DataRow((b"1", b"************1111")).encode() + m.ReadyForQuery("I").encode())
    # A message cut short (the size cap) is dropped whole, never kept in part.
    partial = plain + m.Query(f"SELECT '{CARD}'").encode()[:12]
    assert redact_chunk(partial, "in", red) == plain


class _Services:
    def __init__(self, full: bool, cap: int) -> None:
        self.rows: list[tuple[str, dict]] = []
        self.policy = (full, cap)

    def audit(self, kind: str, record: dict) -> None:
        self.rows.append((kind, dict(record)))

    def recording_policy(self, target: str) -> tuple[bool, int, int]:
        return (*self.policy, 0)


def _core(services: _Services) -> SessionCore:
    core = SessionCore(services, target="db", protocol="postgresql", target_addr="127.0.0.1:5432",
                       spawn=lambda coro, name: asyncio.ensure_future(coro), terminate=lambda code, msg: None)
    core.session_id = "s1"
    policy = services.recording_policy("db")
    core.recording_full, core._record_cap, core.recording_result_cap = policy
    core._record_left = policy[1]
    return core


def test_the_cap_cuts_the_chunk_that_reaches_it_and_marks_the_stop():
    services = _Services(True, 100)
    core = _core(services)
    core.record("event", b'{"type": "pg_startup"}')   # 22 bytes
    core.record("in", b"x" * 50)
    core.record("out", b"y" * 50)                     # 28 of these fit
    core.record("in", b"z" * 10)                      # after the cap: nothing
    rows = [r for k, r in services.rows]
    assert [(r["direction"], len(r["data"])) for r in rows[:3]] == [("event", 22), ("in", 50), ("out", 28)]
    assert rows[3]["direction"] == "event"
    assert json.loads(rows[-1]["data"]) == {"type": "truncated", "reason": "recording_max_bytes", "max_bytes": 100}
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        normalize(KINDS["recording"], r)   # valid rows for the store


def test_metadata_only_keeps_events_not_bytes():
    services = _Services(False, 1 << 20)
    core = _core(services)
    core.record("event", b'{"type": "pg_startup"}')
    core.record("in", b"Q\x00\x00\x00\x05\x00")
    core.record("out", b"Z\x00\x00\x00\x05I")
    assert [r["direction"] for _, r in services.rows] == ["event"]


def _rows(*chunks: tuple[str, bytes]) -> list[dict]:
    return [{"seq": i + 1, "ts": T0 + timedelta(seconds=i), "direction": d, "data": data}
            for i, (d, data) in enumerate(chunks)]


def test_extended_protocol_batches_read_back_as_statements_with_their_parameters():
    sent = (m.Parse("s1", "SELECT name FROM people WHERE id = $1", (23,)).encode()
            + m.Bind("", "s1", (), (b"7",), ()).encode() + m.Describe("P", "").encode()
            + m.Execute("", 0).encode() + m.Sync().encode())
    got = (m.ParseComplete().encode() + m.BindComplete().encode()
           + m.RowDescription((m.FieldDescription("name", 0, 0, 25, -1, -1, 0),)).encode()
           + m.DataRow((b"ada",)).encode() + m.CommandComplete("SELECT 1").encode() + m.ReadyForQuery("I").encode())
    ses = exchanges(_rows(("in", sent), ("out", got)))
    (ex,) = ses.exchanges
    assert (ex.kind, ex.text, ex.params, ex.status) == ("extended", "SELECT name FROM people WHERE id = $1", ["7"], "I")
    (kind, result), = ex.items
    assert kind == "result" and result.rows == [("ada",)] and result.tag == "SELECT 1"


def _ssh_record() -> SessionRecord:
    from appliance.fronts.ssh_cast import pty_event, resize_event

    # Rows as the SSH front writes them; "é" split across two chunks, as a terminal's bytes can be.
    rows = _rows(("event", pty_event(100, 30, "xterm", T0.timestamp())),
                 ("in", b"ls\r"),
                 ("out", b"\x1b[1mcaf\xc3"), ("out", b"\xa9\x1b[0m\r\n$ "),
                 ("event", resize_event(120, 40)),
                 ("out", b"exit\r\n"))
    return SessionRecord({"session_id": "ssh1", "protocol": "ssh", "identity": "ops-bot", "target": "web",
                          "started_at": T0}, [], [], rows)


def test_terminal_recording_as_asciicast(tmp_path):
    from asciinema.asciicast import open_from_url

    header, events = cast_events(_ssh_record())
    assert (header["width"], header["height"]) == (100, 30)
    path = tmp_path / "ssh.cast"
    write_cast(_ssh_record(), path)
    with open_from_url(str(path)) as cast:
        got = list(cast.events())
    assert [e[1] for e in got] == ["i", "o", "o", "r", "o"]
    assert "".join(e[2] for e in got if e[1] == "o") == "\x1b[1mcafé\x1b[0m\r\n$ exit\r\n"
    assert got[3][2] == "120x40" and [e[0] for e in got] == sorted(e[0] for e in got)


def test_player_plays_a_terminal_recording_with_pause_and_speed():
    from textual.app import App
    from textual.widgets import Static

    from tests.test_tui import until
    from tui.replay import ReplayScreen

    doc = json.loads(json.dumps(replay_document(_ssh_record()), default=str))
    assert [c["text"] for c in doc["terminal"]] == ["\x1b[1mcaf", "é\x1b[0m\r\n$ ", "exit\r\n"]

    class Player(App):
        def on_mount(self) -> None:
            self.push_screen(ReplayScreen("ssh1", doc=doc))

    seen: dict = {}

    async def run() -> None:
        app = Player()
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, ReplayScreen), "the player")
            screen = app.screen
            seen["first"] = str(screen.query_one("#player-view", Static).content)
            await pilot.press("space")          # play
            await pilot.press("space")          # pause at once
            seen["paused"] = (screen.playing, screen.index)
            await pilot.pause()
            seen["still"] = screen.index
            for _ in range(3):
                await pilot.press("plus")
            seen["speed"] = screen.speed
            await pilot.press("space")
            await until(pilot, lambda: screen.index == 2 and not screen.playing, "played to the end")
            seen["end"] = str(screen.query_one("#player-view", Static).content)
            seen["status"] = str(screen.query_one("#player-status", Static).content)

    asyncio.run(run())
    assert seen["first"] == "caf"
    assert seen["paused"][0] is False and seen["still"] == seen["paused"][1]
    assert seen["speed"] == 8.0
    assert seen["end"] == "café\n$ exit\n" and seen["status"].startswith("output 3/3 · paused at 8x")


# -- the front's recorder, with a real PostgreSQL and psql (in-process front, no daemon) ----------


def test_front_records_whole_messages_in_bounded_chunks_and_stops_at_the_cap(pg_server):
    import subprocess

    from tests.pg_front_fixtures import BOT_TOKEN, FrontThread, default_services, plain_settings, setup_roles

    setup_roles(pg_server)
    services = default_services()
    services.recording_policy = lambda target: (True, 1_000_000, 0)
    ft = FrontThread(plain_settings(pg_server), services)
    try:
        # 20 rows of 100 kB: each DataRow is streamed to the bot in pieces (past STREAM_THRESHOLD).
        sql = "SELECT i, repeat('x', 100000) FROM generate_series(1, 20) i"
        res = subprocess.run(["psql", "-X", "-A", "-t", "-c", sql, "-c", "SELECT 'after'", ft.dsn()],
                             capture_output=True, text=True, timeout=60, env={"PGPASSWORD": BOT_TOKEN, "PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.splitlines()) == 21   # the bot got everything: the cap is the recording's
        ft.call(asyncio.sleep(0.5))
    finally:
        ft.stop()
    rows = [r for k, r in services.records if k == "recording"]
    assert len({r["session_id"] for r in rows}) == 1
    assert json.loads(rows[0]["data"])["type"] == "pg_startup" and rows[-1]["direction"] == "event"
    assert json.loads(rows[-1]["data"]) == {"type": "truncated", "reason": "recording_max_bytes", "max_bytes": 1_000_000}
    assert sum(len(r["data"]) for r in rows[:-1]) == 1_000_000
    body = rows[1:-2]   # every chunk before the one the cap cut: whole messages
    assert body and all(r["direction"] in ("in", "out") for r in body)
    for r in body:
        ends = [e for _, _, e in frames(r["data"])]
        assert ends and ends[-1] == len(r["data"])
        # Taken once 64 KiB are buffered, checked at each write to the bot (one relay read at most).
        assert len(r["data"]) <= 64 * 1024 + 512 * 1024
    assert not any(b"after" in r["data"] for r in rows)   # nothing recorded past the cap


def test_replay_writes_a_terminal_recording_as_it_came(capsysbinary):
    from appliance.replay import _Clock, play_terminal

    play_terminal(_ssh_record(), _Clock(None))
    out = capsysbinary.readouterr().out
    assert out.startswith(b"-- session ssh1: identity ops-bot \xe2\x86\x92 web (ssh)")
    assert out.endswith(b"\x1b[1mcaf\xc3\xa9\x1b[0m\r\n$ exit\r\n\r\n")


_VALUES = st.one_of(st.none(), st.sampled_from([b"7", b"12345", b"-42", CARD.encode(), EMAIL.encode(), b"a@b",
                                                 b"eyJhbGciOi", SECRET.encode(), b"\xff\xfe", b"555-12-3456"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.builds(lambda vals, fmts: m.Bind("", "s1", fmts, tuple(vals), ()).encode(),
              st.lists(_VALUES, min_size=1, max_size=3), st.sampled_from([(), (0,), (1,)])),
    st.builds(lambda sql: m.Query(sql).encode(), st.sampled_from(["SELECT 1", f"SELECT '{CARD}'", "SELECT $1"])),
    st.just(m.Execute("", 0).encode()), st.just(m.Sync().encode())), max_size=12))
def test_redaction_fast_paths_keep_what_the_long_way_keeps(chunk_messages):
    """Binds stepped over in the compiled loop (hotpath.skip_recorded): the chunk kept is byte for
    byte what redacting every message in Python, one by one, gives."""
    from appliance.recordings.pgstream import _FRONT_REDACTED, _redact_front

    chunk = b"".join(chunk_messages)
    red = AuditRedactor()
    fast = redact_chunk(chunk, "in", red)
    one_by_one = b"".join(
        (_redact_front(t, chunk[s + 5:e], red, red.text) or chunk[s:e]) if t in _FRONT_REDACTED else chunk[s:e]
        for t, s, e in frames(chunk))
    assert fast == one_by_one
    assert CARD.encode() not in fast and EMAIL.encode() not in fast


# -- a result's row budget ([audit] recording_result_bytes) ----------------------------------------


class _Relay:
    """What PgRecorder reads of the relay's session: whether the bytes it wrote end inside a
    streamed message, and whether it is still the session's recorder."""

    def __init__(self) -> None:
        self._stream_left = 0
        self._cbuf = b""
        self._held = None
        self._to_bot = lambda data: None
        self.recorder = None


_ROW_STREAM = st.lists(st.one_of(
    st.builds(lambda n: m.DataRow((b"x" * n,)).encode(), st.integers(0, 300)),
    st.sampled_from([m.RowDescription((m.FieldDescription("v", 0, 0, 25, -1, -1, 0),)).encode(),
                     m.CommandComplete("SELECT 9").encode(), m.ReadyForQuery("I").encode(),
                     m.NoticeResponse((("S", "NOTICE"), ("M", "n"))).encode()])), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_ROW_STREAM, st.lists(st.integers(1, 400), min_size=1, max_size=30), st.integers(1, 700))
def test_the_row_budget_keeps_every_other_message_and_counts_each_row_it_drops(messages, cuts, cap):
    """Whatever the writes (cut anywhere inside a message, as the relay streams a big one), the
    recording keeps every message that is not a row, in order, whole; each result's first rows up
    to the budget; and counts the rest in rows_not_recorded events placed before the message that
    ended them. Nothing beyond the budget is copied."""
    from appliance.fronts.postgres.recording import PgRecorder

    stream = b"".join(messages)
    services = _Services(True, 10**9)

    async def record() -> None:
        core = _core(services)
        core.recording_result_cap = cap
        relay = _Relay()
        rec = PgRecorder(core, relay)
        relay.recorder = rec
        ends = [e for _, _, e in frames(stream)]
        pos = 0
        for cut in itertools.cycle(cuts):
            if pos >= len(stream):
                break
            # The relay writes whole messages but a streamed one: a write starts at a boundary or
            # continues the message the last write ended in, and never cuts a message's header.
            end = min(len(stream), pos + cut)
            begun = max(e for e in [0, *ends] if e <= end)
            following = next((e for e in ends if e >= end), len(stream))
            if end - begun < 5 and end != begun:
                end = following
            relay._stream_left = following - end
            rec.received(stream[pos:end])
            pos = end
        rec.flush(final=True)

    asyncio.run(record())
    rows = [r for k, r in services.rows if k == "recording"]
    kept = b"".join(r["data"] for r in rows if r["direction"] == "out")
    got = [(t, kept[s:e]) for t, s, e in frames(kept)]
    assert sum(e - s for _, s, e in frames(kept)) == len(kept)   # whole messages only
    sent = [(t, stream[s:e]) for t, s, e in frames(stream)]
    assert [x for x in got if x[0] != 0x44] == [x for x in sent if x[0] != 0x44]
    # Replayed in place: each run of rows is its kept prefix plus the count of the rest.
    events = [json.loads(r["data"]) for r in rows if r["direction"] == "event"]
    assert all(e["type"] == "rows_not_recorded" and e["max_bytes"] == cap for e in events)
    def runs(sequence: list) -> list[tuple[list[bytes], int]]:
        """(rows, rows counted) of each run of DataRows up to the next other message."""
        out, run, counted = [], [], 0
        for item in sequence:
            if isinstance(item, int):
                counted += item
            elif item[0] == 0x44:
                run.append(item)
            else:
                out.append((run, counted))
                run, counted = [], 0
        return out + [(run, counted)]

    runs_sent = [r for r, _ in runs([body for _, body in sent])]
    order: list = []   # the recording as one sequence: messages, and each event's count
    for r in rows:
        if r["direction"] == "out":
            order += [r["data"][s:e] for _, s, e in frames(r["data"])]
        elif r["direction"] == "event":
            order.append(json.loads(r["data"])["rows"])
    runs_kept = runs(order)
    assert len(runs_kept) == len(runs_sent)
    for (k, skipped), s in zip(runs_kept, runs_sent):
        assert k == s[:len(k)] and len(k) + skipped == len(s)
        assert sum(len(x) for x in k) <= cap or len(k) == 0


def test_a_zero_row_budget_records_every_row():
    from appliance.fronts.postgres.recording import PgRecorder

    stream = (m.RowDescription((m.FieldDescription("v", 0, 0, 25, -1, -1, 0),)).encode()
              + m.DataRow((b"x" * 100,)).encode() * 50 + m.CommandComplete("SELECT 50").encode()
              + m.ReadyForQuery("I").encode())
    services = _Services(True, 10**9)

    async def record() -> None:
        core = _core(services)
        core.recording_result_cap = 0
        relay = _Relay()
        rec = PgRecorder(core, relay)
        relay.recorder = rec
        rec.received(stream)
        rec.flush(final=True)

    asyncio.run(record())
    assert b"".join(r["data"] for k, r in services.rows if k == "recording" and r["direction"] == "out") == stream


def test_front_records_a_bulk_reads_first_rows_counts_the_rest_and_keeps_recording(pg_server):
    """[audit] recording_result_bytes with a real PostgreSQL and psql: a big result's first rows
    are recorded and the rest counted; rows streamed in pieces too; an error that arrives after
    rows not recorded is; the session's later statements are; the replay's row count footer is
    the one psql printed."""
    import subprocess

    from appliance.recordings.render import _result_lines, table_lines
    from tests.pg_front_fixtures import BOT_TOKEN, FrontThread, default_services, plain_settings, setup_roles

    setup_roles(pg_server)
    services = default_services()
    budget = 256 * 1024
    services.recording_policy = lambda target: (True, 16 * 1024 * 1024, budget)
    ft = FrontThread(plain_settings(pg_server), services)
    statements = ["SELECT i, md5(i::text) FROM generate_series(1, 20000) i",          # ~1 MB of rows
                  "SELECT i, repeat('x', 100000) FROM generate_series(1, 5) i",       # rows streamed in pieces
                  "SELECT i, md5(i::text), 1 / (i - 15000) FROM generate_series(1, 20000) i",  # error after rows
                  "COPY (SELECT i, md5(i::text) FROM generate_series(1, 20000) i) TO STDOUT",   # CopyData rows
                  "SELECT 'after' AS last"]
    try:
        argv = ["psql", "-X"] + [a for sql in statements for a in ("-c", sql)] + [ft.dsn()]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             env={"PGPASSWORD": BOT_TOKEN, "PATH": "/usr/bin:/bin"})
        assert "(20000 rows)" in res.stdout and "(5 rows)" in res.stdout and "division by zero" in res.stderr
        assert res.stdout.count("\n") > 40000   # the COPY's rows reached psql
        ft.call(asyncio.sleep(0.5))
    finally:
        ft.stop()
    rows = [r for k, r in services.records if k == "recording"]
    recorded = sum(len(r["data"]) for r in rows if r["direction"] == "out")
    assert recorded < 5 * budget   # the bot received over 3 MB
    ses = exchanges([{**r, "data": r["data"]} for r in rows])
    results = [[v for kind, v in ex.items if kind == "result"] for ex in ses.exchanges]
    errors = [[v for kind, v in ex.items if kind == "error"] for ex in ses.exchanges]
    big, streamed, _, copy, last = results[:5]
    assert big[0].tag == "SELECT 20000" and 0 < len(big[0].rows) < 20000
    assert len(big[0].rows) + big[0].not_recorded == 20000 and big[0].rows[0] == ("1", "c4ca4238a0b923820dcc509a6f75849b")
    assert sum(len(i) + len(h) + 11 for i, h in big[0].rows) <= budget
    assert streamed[0].tag == "SELECT 5" and len(streamed[0].rows) + streamed[0].not_recorded == 5
    assert 0 < len(streamed[0].rows) < 5 and streamed[0].rows[0] == ("1", "x" * 100000)
    assert errors[2] and errors[2][0].message == "division by zero"
    assert last[0].rows == [("after",)]
    assert copy[0].tag == "COPY 20000" and copy[0].not_recorded > 0 and copy[0].columns is None
    assert _result_lines(copy[0]) == [f"-- botwarden: {copy[0].not_recorded} rows ({copy[0].not_recorded_bytes} bytes) "
                                      "reached the bot but are not recorded: past [audit] recording_result_bytes "
                                      "(262144 bytes of rows per result)", "COPY 20000"]
    table = table_lines(big[0])
    assert table[-2] == "(20000 rows)" and table[-3].startswith(
        f"-- botwarden: {big[0].not_recorded} more rows") and "recording_result_bytes (262144 bytes" in table[-3]
    events = [json.loads(r["data"]) for r in rows if r["direction"] == "event"]
    assert [e["type"] for e in events].count("rows_not_recorded") >= 3


@settings(max_examples=200, deadline=None)
@given(_ROW_STREAM, st.integers(0, 40))
def test_complete_prefix_ends_where_the_last_whole_message_does(messages, cut):
    from appliance.recordings.pgstream import complete_prefix

    stream = b"".join(messages)
    data = bytearray(stream[:max(0, len(stream) - cut)])
    assert complete_prefix(data) == max([0, *[e for _, _, e in frames(data)]])
