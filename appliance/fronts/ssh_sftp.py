"""SFTP (and OpenSSH 9's ``scp``, which speaks SFTP) through the SSH front, decided per operation.

The bot's ``sftp`` subsystem is served here (an asyncssh ``SFTPServer``) and every operation is
relayed, one request for one request, to the real sshd's SFTP server over the session's upstream
connection (the certificate made for this session). Before an operation reaches the sshd, the
policy decides it on its path (``[rules.ssh]`` ``sftp_paths`` / ``sftp_ops``): open for read or
write (and ``create`` when the open may create the file), remove, rename (both paths), mkdir,
rmdir, setstat, symlink / hard link (both paths), and the reads: ``list`` (a directory's
names), ``stat`` (stat, lstat, realpath, statvfs), ``readlink``. Paths are made absolute
against the upstream's home directory and normalized before they are decided.

A blocked or denied operation gets SFTP's own ``FX_PERMISSION_DENIED`` with a message naming
the rule (also written to the channel's stderr, which OpenSSH's clients print), and the session
goes on. A held one waits for an operator (``botwarden: waiting for
approval <id>`` on the channel's stderr, which the bot's ``sftp`` prints). Each operation is a
``requests`` row: kind ``sftp``, text ``sftp <op> '<path>'``, params the path(s) and, for a file,
``size=<bytes>`` (its size when it was closed), rows = bytes moved through it (read + written).

Operations on an open handle (read, write, fstat, fsync) are not decided again: the open was.
Path rules see names, not where a symbolic link on the target leads (docs/ssh.md).

Recording (docs/recordings.md): each opened file is an ``sftp`` event (op, path, its requests
row) and, at close, an ``sftp_end`` event (bytes read, bytes written, size). What the bot
downloaded is recorded as "out" rows, through every content detector first (the bot got the file
as it is: SFTP has no result masking, but a recording keeps no secret); what it uploaded is
counted, not recorded, as an exec's stdin is (it may be a key or a secret being copied).
"""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

import asyncssh
from asyncssh import SFTPAttrs, SFTPName
from asyncssh.sftp import (FILEXFER_ATTR_DEFINED_V4, FXF_APPEND, FXF_CREAT, FXF_READ, FXF_TRUNC, FXF_WRITE,
                           SFTPEOFError)

from appliance.policy.masking import DETECTOR_FUNCTIONS, DetectorSettings, Strategy, TextMasker
from appliance.policy.ssh import SshRequest
from appliance.policy.types import Verdict

from .services import HoldOutcome
from .ssh_mask import StreamMasker
from .session import SessionCore, new_request_id

log = logging.getLogger(__name__)

PROTOCOL = "ssh"
KIND = "sftp"
_STRENGTH = {"allow": 0, "mask": 0, "approve": 1, "block": 2}
WITHDRAWN = "withdrawn: the bot closed its sftp session while the operation waited for approval"


@dataclass(frozen=True)
class SftpSession:
    """What the SFTP relay needs from the SSH session it runs in."""

    core: SessionCore                                                  # grant, audit, holds
    upstream: Callable[[], Any]                                        # async () -> SSHClientConnection


@dataclass
class _Open:
    """A file the bot opened: the upstream's handle and what the audit row needs at close."""

    handle: bytes
    path: str
    op: str                    # "read", "write" or "read+write"
    request_id: str
    verdict: Verdict
    decision: str
    reason: str | None
    t0: float
    moved: int = 0
    size: int | None = None
    audited: bool = False
    read_bytes: int = 0
    written_bytes: int = 0
    recording: StreamMasker | None = None  # downloads on their way to the recording (None: not recorded)


def _text(path: bytes) -> str:
    # Bytes that are not UTF-8 stay visible (and distinct) instead of failing the audit record.
    return path.decode("utf-8", "backslashreplace")


def open_ops(pflags: int) -> tuple[str, ...]:
    """What an SFTP open asks for, as policy operations."""
    write = bool(pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC))
    ops = []
    if pflags & FXF_READ or not write:
        ops.append("read")
    if write:
        ops.append("write")
    if pflags & FXF_CREAT:
        ops.append("create")
    return tuple(ops)


class SftpRelay(asyncssh.SFTPServer):
    """One bot's sftp subsystem: every request decided, then relayed to the sshd's SFTP server."""

    def __init__(self, chan: asyncssh.SSHServerChannel, session: SftpSession):
        super().__init__(chan)
        self.session = session
        self.core = session.core
        self._client: asyncssh.SFTPClient | None = None
        self._client_lock = asyncio.Lock()
        self._home: str | None = None

    # -- the upstream ------------------------------------------------------------------------------
    async def _upstream(self) -> Any:
        """The sshd's SFTP server, over the session's upstream connection (asyncssh's client
        handler: one request per request, paths and attributes as bytes, unchanged)."""
        async with self._client_lock:
            if self._client is None:
                try:
                    conn = await self.session.upstream()
                    self._client = await conn.start_sftp_client()
                    home = await self._client._handler.realpath(b".")
                except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
                    self.core.upstream_failed("sftp")
                    raise asyncssh.SFTPFailure(f"botwarden: the target's sftp server could not be reached: "
                                               f"{getattr(e, 'reason', None) or e}") from None
                self._home = _text(home[0][0].filename)
            return self._client._handler

    async def _absolute(self, path: bytes) -> str:
        """The path the sshd will act on, as the policy sees it: absolute (relative paths are the
        upstream's home directory's, as sftp-server reads them) and normalized."""
        if self.core.grant is None:
            raise asyncssh.SFTPPermissionDenied("botwarden: this session was not granted")
        await self._upstream()
        text = _text(path) or "."
        if not text.startswith("/"):
            text = posixpath.join(self._home or "/", text)
        text = posixpath.normpath(text)
        return "/" + text.lstrip("/")  # normpath keeps a leading "//"

    # -- decisions ---------------------------------------------------------------------------------
    async def _decide(self, op: str, paths: tuple[str, ...], ops: tuple[str, ...] | None = None
                      ) -> tuple[Verdict, str, str | None, str, float]:
        """Decide an operation (every (op, path) pair it needs; the strongest verdict wins), hold
        it if the policy says approve, journal it in strict mode. Returns (verdict, decision,
        reason, request_id, t0); raises SFTPPermissionDenied when refused (its row written)."""
        t0 = time.time()
        request_id = new_request_id()
        text = self._describe(op, paths)
        verdict: Verdict | None = None
        for one_op in ops or (op,):
            for path in paths:
                try:
                    v = self.core.services.decide_ssh(self.core.grant, self.core.target, SshRequest(
                        "sftp", subsystem="sftp", sftp_op=one_op, path=path))
                except Exception:
                    log.exception("policy failed; sftp operation refused")
                    v = Verdict("block", None, "the policy engine failed on this operation")
                if verdict is None or _STRENGTH.get(v.action, 2) > _STRENGTH.get(verdict.action, 2):
                    verdict = v
        assert verdict is not None
        decision, reason = verdict.action, verdict.reason
        if decision == "mask":
            decision = "allow"  # no result masking for files: a mask rule does not refuse them
        if decision == "block":
            self._refuse(op, paths, verdict, "block", reason, request_id, t0)
        if decision == "approve":
            outcome = await self._hold(text, verdict, request_id)
            if not outcome.approved:
                self._refuse(op, paths, verdict, "deny", outcome.reason or "denied", request_id, t0)
            reason = outcome.reason or reason
        try:
            wait = self.core.record_start({
                "request_id": request_id, "session_id": self.core.session_id,
                "ts": datetime.fromtimestamp(t0, timezone.utc), "protocol": PROTOCOL, "kind": KIND,
                "text": text, "params": list(paths), "decision": decision, "rule": verdict.rule}, verdict)
            if wait is not None:
                await wait
        except Exception as e:
            log.error("an sftp operation's record could not be made durable; it is refused: %s", e)
            self._refuse(op, paths, verdict, "block",
                         f"the audit store could not record the operation ({e}); it was not run", request_id, t0)
        return verdict, decision, reason, request_id, t0

    @staticmethod
    def _describe(op: str, paths: tuple[str, ...]) -> str:
        if len(paths) == 2:
            return f"sftp {op} {paths[0]!r} -> {paths[1]!r}"
        return SshRequest("sftp", subsystem="sftp", sftp_op=op, path=paths[0]).describe()

    def _refuse(self, op: str, paths: tuple[str, ...], verdict: Verdict, decision: str, reason: str | None,
                request_id: str, t0: float) -> None:
        rule = f"rule {verdict.rule!r}" if verdict.rule else "the target's default policy"
        what = f"sftp {op} {' -> '.join(repr(p) for p in paths)}"
        message = (f"botwarden: {what} denied: {reason}" if decision == "deny"
                   else f"botwarden: {what} blocked by {rule}: {reason}")
        self._row(op, paths, verdict, decision, reason, request_id, t0, error=message)
        # OpenSSH's sftp prints only "Permission denied" for the status; the channel's stderr,
        # which it does print, says which rule.
        self.channel.write_stderr(message.encode() + b"\n")
        raise asyncssh.SFTPPermissionDenied(message)

    async def _hold(self, text: str, verdict: Verdict, request_id: str) -> HoldOutcome:
        def notify(approval_id: str) -> None:
            rule = f" (rule {verdict.rule!r})" if verdict.rule else ""
            self.channel.write_stderr(f"botwarden: waiting for approval {approval_id}{rule}\n".encode())

        hold = asyncio.ensure_future(self.core.hold(text, verdict, notify, request_id, withdrawn=WITHDRAWN))
        closed = asyncio.ensure_future(self.channel.wait_closed())
        done, _ = await asyncio.wait({hold, closed}, return_when=asyncio.FIRST_COMPLETED)
        if hold not in done:  # the bot went away (requests are served one at a time: it cannot ask)
            self.core.withdraw_hold(WITHDRAWN)
        closed.cancel()
        try:
            return await hold
        except asyncio.CancelledError:
            return HoldOutcome(False, "", WITHDRAWN, None, "withdrawn")

    def _row(self, op: str, paths: tuple[str, ...], verdict: Verdict, decision: str, reason: str | None,
             request_id: str, t0: float, *, error: str | None = None, moved: int | None = None,
             size: int | None = None) -> None:
        params = list(paths) + ([f"size={size}"] if size is not None else [])
        self.core.audit("request", {
            "request_id": request_id, "session_id": self.core.session_id,
            "ts": datetime.fromtimestamp(t0, timezone.utc), "protocol": PROTOCOL, "kind": KIND,
            "text": self._describe(op, paths), "params": params, "decision": decision, "rule": verdict.rule,
            "reason": reason or None, "duration_ms": (time.time() - t0) * 1000.0, "rows": moved, "error": error,
            "sqlstate": None, "masked": None})

    async def _run(self, op: str, raw: tuple[bytes, ...], call: Callable[[Any], Any],
                   ops: tuple[str, ...] | None = None) -> Any:
        """Decide a path operation, run it on the sshd, write its row; the sshd's own error (no
        such file...) goes back to the bot unchanged."""
        paths = tuple([await self._absolute(p) for p in raw])
        verdict, decision, reason, request_id, t0 = await self._decide(op, paths, ops)
        try:
            result = await call(await self._upstream())
        except asyncssh.SFTPError as e:
            self._row(op, paths, verdict, decision, reason, request_id, t0, error=f"{type(e).__name__}: {e.reason}")
            raise
        except (OSError, asyncssh.Error) as e:
            self._row(op, paths, verdict, decision, reason, request_id, t0, error=str(e))
            raise asyncssh.SFTPConnectionLost(f"botwarden: the target's sftp server failed: {e}") from None
        self._row(op, paths, verdict, decision, reason, request_id, t0)
        return result

    # -- files -------------------------------------------------------------------------------------
    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> _Open:
        ops = open_ops(pflags)
        absolute = await self._absolute(path)
        op = "write" if "write" in ops else "read"
        verdict, decision, reason, request_id, t0 = await self._decide(op, (absolute,), ops)
        name = "+".join(o for o in ops if o != "create")
        try:
            handle = await (await self._upstream()).open(path, pflags, attrs)
        except asyncssh.SFTPError as e:
            self._row(name, (absolute,), verdict, decision, reason, request_id, t0,
                      error=f"{type(e).__name__}: {e.reason}")
            raise
        opened = _Open(handle, absolute, name, request_id, verdict, decision, reason, t0)
        self._record_event({"event": "sftp", "op": name, "path": absolute, "request_id": request_id})
        if "read" in ops and self.core.recording_left > 0:
            opened.recording = StreamMasker(self._recording_masker())
        return opened

    def _record_event(self, doc: dict[str, Any]) -> None:
        self.core.record("event", json.dumps(doc).encode())

    def _recording_masker(self) -> TextMasker:
        """Every content detector, starred: the recording's copy of a download keeps no secret
        whatever the rules say (the audit store's redaction, appliance/policy/redact.py)."""
        engine = getattr(self.core.services, "engine", None)
        settings = getattr(engine, "detector_settings", None) or DetectorSettings()
        return TextMasker([(d, Strategy("full")) for d in DETECTOR_FUNCTIONS], settings)

    def _record_download(self, file_obj: _Open, data: bytes, last: bool = False) -> None:
        masker = file_obj.recording
        if masker is None:
            return
        shown = masker.feed(data) if not last else masker.flush()
        if shown:
            self.core.record("out", shown)
        if last or self.core.recording_left <= 0:
            file_obj.recording = None   # the cap reached: nothing more is masked for nothing

    async def read(self, file_obj: _Open, offset: int, size: int) -> bytes:
        data, _ = await (await self._upstream()).read(file_obj.handle, offset, size)
        file_obj.moved += len(data)
        file_obj.read_bytes += len(data)
        self._record_download(file_obj, data)
        return data

    async def write(self, file_obj: _Open, offset: int, data: bytes) -> int:
        await (await self._upstream()).write(file_obj.handle, offset, data)
        file_obj.moved += len(data)
        file_obj.written_bytes += len(data)
        return len(data)

    async def close(self, file_obj: _Open) -> None:
        upstream = await self._upstream()
        error = None
        try:
            try:
                file_obj.size = (await upstream.fstat(file_obj.handle, FILEXFER_ATTR_DEFINED_V4)).size
            except (asyncssh.SFTPError, OSError):
                pass
            await upstream.close(file_obj.handle)
        except asyncssh.SFTPError as e:
            error = f"{type(e).__name__}: {e.reason}"
            raise
        finally:
            if not file_obj.audited:
                file_obj.audited = True
                self._record_download(file_obj, b"", last=True)
                self._record_event({"event": "sftp_end", "op": file_obj.op, "path": file_obj.path,
                                    "request_id": file_obj.request_id, "read_bytes": file_obj.read_bytes,
                                    "written_bytes": file_obj.written_bytes, "size": file_obj.size})
                self._row(file_obj.op, (file_obj.path,), file_obj.verdict, file_obj.decision, file_obj.reason,
                          file_obj.request_id, file_obj.t0, error=error, moved=file_obj.moved, size=file_obj.size)

    async def fstat(self, file_obj: _Open) -> SFTPAttrs:
        return await (await self._upstream()).fstat(file_obj.handle, FILEXFER_ATTR_DEFINED_V4)

    async def fsetstat(self, file_obj: _Open, attrs: SFTPAttrs) -> None:
        await self._run("setstat", (file_obj.path.encode(),), lambda up: up.fsetstat(file_obj.handle, attrs))

    async def fsync(self, file_obj: _Open) -> None:
        await (await self._upstream()).fsync(file_obj.handle)

    async def fstatvfs(self, file_obj: _Open) -> Any:
        return await (await self._upstream()).fstatvfs(file_obj.handle)

    # -- paths -------------------------------------------------------------------------------------
    async def stat(self, path: bytes) -> SFTPAttrs:
        return await self._run("stat", (path,), lambda up: up.stat(path, FILEXFER_ATTR_DEFINED_V4))

    async def lstat(self, path: bytes) -> SFTPAttrs:
        return await self._run("stat", (path,), lambda up: up.lstat(path, FILEXFER_ATTR_DEFINED_V4))

    async def realpath(self, path: bytes) -> bytes:
        async def call(up: Any) -> bytes:
            names, _ = await up.realpath(path)
            return names[0].filename
        return await self._run("stat", (path,), call)

    async def statvfs(self, path: bytes) -> Any:
        return await self._run("stat", (path,), lambda up: up.statvfs(path))

    async def readlink(self, path: bytes) -> bytes:
        async def call(up: Any) -> bytes:
            names, _ = await up.readlink(path)
            return names[0].filename
        return await self._run("readlink", (path,), call)

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._run("setstat", (path,), lambda up: up.setstat(path, attrs))

    async def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._run("setstat", (path,), lambda up: up.setstat(path, attrs, follow_symlinks=False))

    async def remove(self, path: bytes) -> None:
        await self._run("remove", (path,), lambda up: up.remove(path))

    async def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._run("mkdir", (path,), lambda up: up.mkdir(path, attrs))

    async def rmdir(self, path: bytes) -> None:
        await self._run("rmdir", (path,), lambda up: up.rmdir(path))

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._run("rename", (oldpath, newpath), lambda up: up.rename(oldpath, newpath, 0))

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._run("rename", (oldpath, newpath), lambda up: up.posix_rename(oldpath, newpath))

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # asyncssh hands the arguments over in SFTP's documented order (target, link name).
        await self._run("symlink", (oldpath, newpath), lambda up: up.symlink(oldpath, newpath))

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        # A hard link is decided as a symlink: both names, so it cannot alias a refused path.
        await self._run("symlink", (oldpath, newpath), lambda up: up.link(oldpath, newpath))

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        names = await self._run("list", (path,), lambda up: self._list(up, path))
        for name in names:
            yield name

    @staticmethod
    async def _list(up: Any, path: bytes) -> list[SFTPName]:
        handle = await up.opendir(path)
        out: list[SFTPName] = []
        try:
            while True:
                try:
                    names, at_end = await up.readdir(handle)
                except SFTPEOFError:
                    break
                out.extend(names)
                if at_end:
                    break
        finally:
            await up.close(handle)
        return out

    def exit(self) -> None:
        self.core.withdraw_hold(WITHDRAWN)
        if self._client is not None:
            self._client.exit()
        # As sshd does when sftp-server exits: scp (SFTP mode) fails a transfer without a status.
        try:
            self.channel.exit(0)
        except OSError:
            pass  # the bot already closed the channel


def sftp_relay(chan: asyncssh.SSHServerChannel) -> SftpRelay:
    """The SSH front's ``sftp_factory``: the relay for a bot's sftp channel, bound to its session."""
    bot = chan.get_connection().get_owner()
    return SftpRelay(chan, SftpSession(_session_core(bot), bot._upstream))


def _session_core(bot: Any) -> SessionCore:
    """The session's core. Until the SSH front keeps its own SessionCore (``bot.core``), one bound to
    the bot's grant and session id serves the relay's audit rows and holds."""
    core = getattr(bot, "core", None)
    if isinstance(core, SessionCore):
        return core
    st = bot.settings
    core = SessionCore(bot.services, target=st.target, protocol=PROTOCOL,
                       target_addr=f"{st.upstream_host}:{st.upstream_port}",
                       spawn=lambda coro, name: asyncio.ensure_future(coro),
                       terminate=lambda code, message: bot.end(message))
    core.grant, core.session_id = bot.grant, bot.session_id
    return core
