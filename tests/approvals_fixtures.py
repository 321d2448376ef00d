"""Helpers for the approval tests: a real local webhook receiver, a psql bot that is held,
the CLI as a subprocess, and control-API calls made as another uid from a forked child."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.daemon_fixtures import PSQL, ROOT


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.05)


class Hook:
    """A real HTTP server on 127.0.0.1 (a Slack incoming webhook's stand-in address) that
    answers `status` to the first `fail` attempts for each approval, 200 afterwards."""

    def __init__(self, fail: int = 1, status: int = 503):
        self.bodies: list[bytes] = []
        self.fail = fail
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                approval_id = json.loads(body)["botwarden"]["approval_id"]
                with outer._lock:
                    outer.bodies.append(body)
                    seen = len(outer.attempts(approval_id))
                code = status if seen <= outer.fail else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Hook":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def attempts(self, approval_id: str) -> list[dict]:
        return [json.loads(b) for b in list(self.bodies) if json.loads(b)["botwarden"]["approval_id"] == approval_id]


class Bot:
    """psql as the bot, running in the background: its stderr is read as it comes, so the
    NOTICE that names the approval id is seen while the statement is still held."""

    def __init__(self, port: int, token: str, *sql: str, script: str | None = None):
        args = [PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1", "-p", str(port),
                "-U", "orders-bot", "-d", "postgres"]
        for s in sql:
            args += ["-c", s]
        if script is not None:
            args += ["-q", "-f", "-"]  # quiet: no command tags between the results
        env = {**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE if script is not None else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if script is not None:
            self.proc.stdin.write(script)
            self.proc.stdin.close()
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.stdout = ""

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def held_ids(self) -> list[str]:
        marker = "held for approval "
        return [line.split(marker, 1)[1].split()[0] for line in list(self.err) if marker in line]

    def wait_held(self, n: int = 1, timeout: float = 20.0) -> str:
        ids = wait_until(lambda: len(self.held_ids()) >= n and self.held_ids(), timeout,
                         f"NOTICE about held statement #{n} (stderr so far: {self.stderr!r})")
        return ids[n - 1]

    def finish(self, timeout: float = 30.0) -> "Bot":
        self.stdout = self.proc.stdout.read() if self.proc.stdout else ""
        self.proc.wait(timeout)
        self._reader.join(5)
        return self

    @property
    def lines(self) -> list[str]:
        return self.stdout.strip().splitlines()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def as_user(uid: int, gid: int, socket_path: Path, method: str, path: str, body: dict | None = None,
            cgroup: Path | None = None) -> tuple[int, dict]:
    """One control-API call from a forked child that setuid()s to uid (the venv's python is not
    executable by other users, so no subprocess). HTTP by hand over the connected socket. With
    ``cgroup`` (a directory under /sys/fs/cgroup) the child joins it first, as a bot would be."""
    payload = json.dumps(body).encode() if body is not None else b""
    request = (f"{method} {path} HTTP/1.1\r\nHost: botwarden\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only plain syscalls, then _exit
        try:
            os.close(r)
            if cgroup is not None:
                with open(cgroup / "cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            try:
                s.connect(str(socket_path))
                s.sendall(request)
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    os.write(w, chunk)
            except PermissionError:
                os.write(w, b"DENIED")
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    data = b"".join(chunks)
    if data == b"DENIED":
        return 0, {"error": "permission denied on the socket"}
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest or b"null")
