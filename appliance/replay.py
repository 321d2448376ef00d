"""`botwarden replay SESSION_ID`: a recorded session played back from the audit store.

Reads through the daemon's control API while it runs, or the DuckDB file read-only when it does
not (appliance/recordings/load.py). A PostgreSQL session is shown the way psql showed it to the
bot (statements, result tables with the masked values the bot saw, notices, errors, row counts,
timings), with each statement's decision, rule and approvals inline; an SSH session is its
terminal output, written as it came; a Kubernetes session is its request log. ``--speed N``
plays N times faster than it happened, ``--no-wait`` at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from typing import Any, Iterable

from appliance.config import Config
from appliance.recordings.load import Reader, SessionRecord, load_session
from appliance.recordings.render import header_lines, pg_lines, request_log_lines, terminal_chunks

# Longest pause replay keeps between two moments of a session (an idle hour plays as this).
MAX_IDLE_S = 5.0


class _Clock:
    """Sleeps so that session time ``ts`` is played ``speed`` times faster than it happened."""

    def __init__(self, speed: float | None):
        self.speed = speed
        self.last: datetime | None = None

    def wait(self, ts: Any) -> None:
        if self.speed is None or not isinstance(ts, datetime):
            return
        if self.last is not None:
            gap = (ts - self.last).total_seconds() / self.speed
            if gap > 0:
                time.sleep(min(gap, MAX_IDLE_S))
        if self.last is None or ts > self.last:
            self.last = ts


def play_lines(lines: Iterable[tuple[Any, str]], clock: _Clock, out=None) -> None:
    out = out or sys.stdout
    for ts, line in lines:
        if ts is not None:
            out.flush()
            clock.wait(ts)
        out.write(line + "\n")
    out.flush()


def play_terminal(rec: SessionRecord, clock: _Clock) -> None:
    out = sys.stdout.buffer
    for line in header_lines(rec):
        out.write((line + "\r\n").encode())
    for ts, chunk in terminal_chunks(rec):
        out.flush()
        clock.wait(ts)
        out.write(chunk)
    out.write(b"\r\n")
    out.flush()


def replay_session(args: argparse.Namespace, cfg: Config | None) -> int:
    reader = Reader(cfg, getattr(args, "socket", None), getattr(args, "path", None))
    rec = load_session(reader, args.session_id)
    if rec is None:
        print(f"no session {args.session_id!r} in the audit store")
        return 1
    speed = None if getattr(args, "no_wait", False) else float(getattr(args, "speed", 1.0) or 1.0)
    clock = _Clock(speed)
    protocol = rec.protocol
    if protocol == "postgresql":
        play_lines(pg_lines(rec), clock)
    elif protocol == "ssh" and any(r["direction"] == "out" or (r["direction"] == "event" and b'"sftp' in r["data"])
                                   for r in rec.recordings):   # a terminal, a command's output, SFTP files
        play_terminal(rec, clock)
    else:   # Kubernetes, SSH exec without a terminal recording, anything else: the request log
        play_lines(request_log_lines(rec), clock)
    return 0
