"""Helpers shared by the adversarial suite (issue 14.4): a bot session that stays open while
another bot attacks, and measurements of the daemon's process.

``LiveSession`` is a real psycopg client (run by the system Python, so any uid can run it: the
venv's interpreter lives under /root) that logs in once and then runs one statement per line
it is given, answering one JSON line each. Started through `botwarden bot run --user nobody`
it is a kernel-attested bot; started plainly it is an ordinary local client. Each adversarial
case asks it something after the attack: the daemon, and this other session, must be unaffected.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

from tests.daemon_fixtures import ROOT

SYSTEM_PYTHON = "/usr/bin/python3"  # executable by every user (the venv's is not)
VENV_SITE = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"), None)

LIVE_SESSION_BOT = r"""
import json, os, sys
import psycopg
conn = psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="live-bot", dbname="postgres",
                       password=os.environ["TOKEN"], sslmode="disable", connect_timeout=10, autocommit=True)
print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
for line in sys.stdin:
    try:
        rows = conn.execute(line).fetchall()
        print(json.dumps({"rows": [[str(v) for v in r] for r in rows]}), flush=True)
    except psycopg.Error as e:
        print(json.dumps({"error": e.sqlstate, "message": str(e)}), flush=True)
        if conn.closed:
            break
"""


def system_python_env(**extra: str) -> dict[str, str]:
    """Environment for the system Python to import psycopg (and botwarden) from the venv."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**base, "PYTHONPATH": f"{ROOT}:{VENV_SITE}", **extra}


class LiveSession:
    """One open bot session, asked a statement at a time (``ask``)."""

    def __init__(self, port: int, token: str, *, bot_run: tuple[Path, str] | None = None):
        argv = [SYSTEM_PYTHON, "-c", LIVE_SESSION_BOT, str(port)]
        if bot_run is not None:  # (config, bot name): a kernel-attested bot running as nobody
            config, name = bot_run
            argv = [sys.executable, "-m", "appliance.cli", "--config", str(config), "bot", "run", "--name", name,
                    "--user", "nobody", "--", *argv]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=system_python_env(TOKEN=token))
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self._next(60)
        if not first.get("ready"):
            raise RuntimeError(f"the live session did not start: {first} {self.proc.stderr.read()}")
        self.pid = first["pid"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))
        self._lines.put({"closed": True})

    def _next(self, timeout: float) -> dict:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return {"timeout": timeout}

    def ask(self, sql: str, timeout: float = 60) -> dict:
        self.proc.stdin.write(sql.replace("\n", " ") + "\n")
        self.proc.stdin.flush()
        return self._next(timeout)

    def alive(self) -> bool:
        """The session still answers, on the same connection, with the right result."""
        return self.ask("SELECT 'still here'") == {"rows": [["still here"]]}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def daemon_pid(daemon) -> int:
    return daemon.client().get("/v1/status")["pid"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def session_row(daemon, **where) -> dict | None:
    """The ended session's row matching ``where`` (column = value), or None while none has ended."""
    cond = " AND ".join(f"{k} = ?" for k in where)
    rows = daemon.audit_sql(f"SELECT * FROM sessions WHERE {cond} AND outcome <> 'open' ORDER BY start_seq",
                            list(where.values()))
    return rows[-1] if rows else None


class Sampler:
    """Samples a process's open file descriptors and RSS every ``interval`` seconds (a thread)."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid = pid
        self.before = (fd_count(pid), rss_kib(pid))
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((fd_count(self.pid), rss_kib(self.pid)))
            self._stop.wait(0.2)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak_fds(self) -> int:
        return max([s[0] for s in self.samples] or [self.before[0]])

    @property
    def peak_rss_kib(self) -> int:
        return max([s[1] for s in self.samples] or [self.before[1]])
