"""The control API: HTTP/1.1 with JSON bodies over a local Unix socket.

The convention is Docker's: a Unix socket owned by root, mode 0600 (or 0660
with an operator group), HTTP on top so that ``curl --unix-socket`` works for
scripts. Each request carries one JSON body (or none); each response is one
JSON document, except ``GET /v1/approvals/watch`` which streams one JSON
object per line (NDJSON) until the client hangs up. The calling operator is
identified by the socket peer's credentials (SO_PEERCRED), never by anything
the client says. See docs/control-api.md for the routes.

The server side runs on the daemon's event loop; the client side
(:class:`ControlClient`) is blocking, for the CLI and for the TUI's workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import http.client
import json
import logging
import os
import pwd
import re
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from appliance.errors import BotwardenError

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_HEADER = 16 << 10


class ControlError(BotwardenError):
    """A control API call failed; ``status`` is the HTTP status the daemon answered."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


class DaemonNotRunning(ControlError):
    def __init__(self, path: str, why: str):
        super().__init__(503, f"botwarden daemon is not running (no control socket at {path}: {why})")


@dataclass(frozen=True)
class Peer:
    """The process on the other end of the control socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid:{self.uid}"


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    peer: Peer
    params: dict[str, str]


@dataclass
class Response:
    status: int = 200
    body: Any = None  # JSON-able, or bytes sent as they are with ``content_type`` (GET /metrics)
    stream: AsyncIterator[Any] | None = None
    content_type: str = "application/json"


Handler = Callable[[Request], Awaitable[Response]]

_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


class Router:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
        self._routes.append((method, regex, handler))

    def match(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool]:
        path_matched = False
        for m, regex, handler in self._routes:
            found = regex.match(path)
            if found:
                path_matched = True
                if m == method:
                    return handler, found.groupdict(), True
        return None, {}, path_matched


class ControlServer:
    """Serves a :class:`Router` on a Unix socket with safe permissions."""

    def __init__(self, path: str, router: Router, *, mode: int = 0o600, group: str | None = None):
        self.path = path
        self.router = router
        self.mode = mode
        self.group = group
        self._server: asyncio.AbstractServer | None = None
        self._streams: set[asyncio.Task] = set()

    async def start(self) -> None:
        path = Path(self.path)
        gid = -1
        if self.group:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise BotwardenError(f"control socket group {self.group!r} does not exist") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        # The directory itself is not a way in for others either.
        os.chmod(path.parent, 0o750 if self.group else 0o700)
        if self.group:
            os.chown(path.parent, 0, gid)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise BotwardenError(f"{path} exists and is not a socket; refusing to replace it")
            path.unlink()
        # Bind under a restrictive umask so the socket is never briefly world-accessible.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(path), limit=MAX_HEADER)
        finally:
            os.umask(old)
        if gid >= 0:
            os.chown(path, 0, gid)
        os.chmod(path, self.mode)

    async def close(self) -> None:
        if self._server:
            self._server.close()
            for task in list(self._streams):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task:
            self._streams.add(task)
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            if peer.uid != 0 and not self._peer_allowed(peer):
                await self._send(writer, Response(403, {"error": "operator is not allowed on this control socket"}))
                return
            try:
                request = await self._read_request(reader, peer)
            except ControlError as e:
                await self._send(writer, Response(e.status, {"error": e.message}))
                return
            handler, params, path_known = self.router.match(request.method, request.path)
            if handler is None:
                status = 405 if path_known else 404
                await self._send(writer, Response(status, {"error": f"no route {request.method} {request.path}"}))
                return
            request.params = params
            try:
                response = await handler(request)
            except ControlError as e:
                response = Response(e.status, {"error": e.message})
            except BotwardenError as e:
                response = Response(400, {"error": str(e)})
            except Exception:  # a failing handler is logged, never fatal to the daemon
                log.exception("control API handler for %s %s failed", request.method, request.path)
                response = Response(500, {"error": "internal error in the daemon; see its log"})
            await self._send(writer, response)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task:
                self._streams.discard(task)
            writer.close()
            # Cancelled at shutdown (an open watch stream): closing is all that is left to do.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    def _peer_allowed(self, peer: Peer) -> bool:
        # The socket's mode already limits who can connect; this is the second check.
        if not self.group:
            return False
        try:
            gr = grp.getgrnam(self.group)
        except KeyError:
            return False
        if peer.gid == gr.gr_gid:
            return True
        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            return False
        return name in gr.gr_mem or gr.gr_gid in os.getgrouplist(name, peer.gid)

    async def _read_request(self, reader: asyncio.StreamReader, peer: Peer) -> Request:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise ControlError(413, "request headers too large") from None
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            raise ControlError(400, "malformed request line") from None
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY:
            raise ControlError(413, f"request body over {MAX_BODY} bytes")
        body: Any = None
        if length:
            raw = await reader.readexactly(length)
            try:
                body = json.loads(raw)
            except ValueError:
                raise ControlError(400, "request body is not valid JSON") from None
        url = urlsplit(target)
        return Request(method, url.path, parse_qs(url.query), body, peer, {})

    async def _send(self, writer: asyncio.StreamWriter, response: Response) -> None:
        reason = _REASONS.get(response.status, "OK")
        if response.stream is not None:
            writer.write(f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: application/x-ndjson\r\n"
                         f"Connection: close\r\n\r\n".encode())
            await writer.drain()
            async for item in response.stream:
                writer.write(json.dumps(item, default=str).encode() + b"\n")
                await writer.drain()
            return
        body = response.body
        payload = body if isinstance(body, bytes) else json.dumps(body, default=str).encode()
        writer.write(f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await writer.drain()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError as e:
            sock.close()
            if isinstance(e, PermissionError):
                raise ControlError(403, f"permission denied on the control socket {self._path} "
                                        "(root or the configured operator group only)") from None
            raise DaemonNotRunning(self._path, e.strerror or str(e)) from None
        self.sock = sock


class ControlClient:
    """Blocking client of the control API (CLI, TUI workers)."""

    def __init__(self, path: str, timeout: float | None = 30.0):
        self.path = path
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        conn = _UnixHTTPConnection(self.path, timeout if timeout is not None else self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except ControlError:
            raise
        except OSError as e:
            raise ControlError(503, f"control socket {self.path}: {e}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(data) if data else None
        except ValueError:
            raise ControlError(502, "the daemon answered something that is not JSON") from None
        if resp.status >= 400:
            raise ControlError(resp.status, (doc or {}).get("error", f"HTTP {resp.status}"))
        return doc

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.call("POST", path, body, **kw)

    def stream(self, path: str, timeout: float | None = None) -> Iterator[Any]:
        """Yield the JSON objects of an NDJSON stream until the daemon closes it.

        ``timeout``: longest wait for the next line (None: no limit); a socket.timeout
        (an OSError) ends the stream."""
        conn = _UnixHTTPConnection(self.path, timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            if resp.status >= 400:
                doc = json.loads(resp.read() or b"{}")
                raise ControlError(resp.status, doc.get("error", f"HTTP {resp.status}"))
            while True:
                line = resp.readline()
                if not line:
                    return
                yield json.loads(line)
        finally:
            conn.close()
