"""The SSH shell recording helpers (appliance/fronts/ssh_cast.py), byte by byte: typed lines from
keystrokes, password answers kept out, and the asciicast v2 document asciinema reads."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from appliance.fronts.ssh_cast import TypedLines, asciicast, pty_event, resize_event


def typed(*chunks: bytes, outputs: dict[int, bytes] | None = None) -> list[str]:
    lines = TypedLines()
    out: list[str] = []
    for i, chunk in enumerate(chunks):
        if outputs and i in outputs:
            lines.output(outputs[i])
        out += lines.feed(chunk)
    return out


def test_editing_keys_are_applied_and_escape_sequences_dropped():
    assert typed(b"lsX\x7f -l\r") == ["ls -l"]
    assert typed(b"rm -rf /\x15echo safe\r") == ["echo safe"]          # Ctrl-U drops the line
    assert typed(b"sleep 100\x03uptime\r") == ["uptime"]              # Ctrl-C too
    assert typed(b"\x1b[Adf -h\x1b[D\x1bOB\r") == ["df -h"]           # arrows (CSI and SS3)
    assert typed(b"\r\r  \r") == []


def test_keystrokes_split_at_every_offset_give_the_same_lines():
    keys = "echo héllo\x1b[Cx\x7f; ls\r".encode()
    for cut in range(len(keys) + 1):
        assert typed(keys[:cut], keys[cut:]) == ["echo héllo; ls"], cut


def test_the_answer_to_a_password_prompt_is_neither_a_line_nor_recorded():
    lines = TypedLines()
    lines.output(b"[sudo] password for deploy: ")
    assert lines.redact(b"s3cret\rwhoami\r") == b"******\rwhoami\r"
    assert lines.feed(b"s3cret\rwhoami\r") == ["whoami"]
    assert lines.redact(b"next") == b"next"


def test_asciicast_v2_from_recording_rows():
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    rows = [
        {"ts": t0, "direction": "event", "data": pty_event(80, 24, "xterm", t0.timestamp())},
        {"ts": t0 + timedelta(seconds=0.5), "direction": "out", "data": "é".encode()[:1]},
        {"ts": t0 + timedelta(seconds=0.6), "direction": "out", "data": "é".encode()[1:] + b"$ "},
        {"ts": t0 + timedelta(seconds=1), "direction": "in", "data": b"ls\r"},
        {"ts": t0 + timedelta(seconds=2), "direction": "event", "data": resize_event(120, 40)},
    ]
    lines = asciicast(rows).splitlines()
    assert json.loads(lines[0]) == {"version": 2, "width": 80, "height": 24, "timestamp": int(t0.timestamp()),
                                    "env": {"TERM": "xterm"}}
    assert [json.loads(x) for x in lines[1:]] == [[0.6, "o", "é$ "], [1.0, "i", "ls\r"], [2.0, "r", "120x40"]]


def test_rows_without_a_pty_are_not_a_cast():
    with pytest.raises(ValueError):
        asciicast([{"ts": datetime.now(timezone.utc), "direction": "out", "data": b"x"}])
