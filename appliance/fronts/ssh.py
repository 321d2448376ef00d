"""The SSH front: bots' ``ssh host cmd`` decided per command, on a certificate made for the session.

The bot connects to the target's real address (the eBPF probes redirect it here, as for
PostgreSQL). The appliance answers with a host certificate for the target's names, signed by
the appliance's host CA (bots trust it with one ``@cert-authority`` known_hosts line, printed
by ``botwarden ssh known-hosts``). The bot proves who it is by kernel attestation and/or its
OIDC token (as the password or a keyboard-interactive answer); the session core
(``appliance.fronts.session.SessionCore``) grants the session (identity, an OpenSSH user
certificate signed by OpenBao's SSH engine for this session alone, which ends the session when
it expires) and keeps its audit rows, holds and end.

Each exec (``scp -O``'s ``scp -t/-f`` too) and shell request is decided by the policy
(``appliance.policy.ssh``): allowed ones run on the real sshd over a connection authenticated
with that certificate, relayed by botwarden both ways (stdin/EOF, stdout, stderr, window
changes, signals, exit status), output masked by the matching ``[rules.ssh]`` mask rules
(``ssh_mask``), shells recorded (``ssh_cast``); blocked ones get a one-line reason on stderr and
exit 126; held ones wait for an operator. Forwarding of every kind, subsystems other than sftp
and environment variables outside the target's ``env_allow`` are refused, each an audit row.

SFTP plugs in at ``SshFront.sftp_factory`` (appliance/fronts/ssh_sftp.py); until then the sftp
subsystem is refused with a message.
"""

from __future__ import annotations

import asyncio
import json
import fnmatch
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncssh

from appliance.policy.ssh import SshRequest
from appliance.policy.types import Verdict
from appliance.tasks import TaskSet

from .services import AuthRefused, ConnectionContext, HoldOutcome
from .ssh_cast import TypedLines, pty_event, resize_event
from .ssh_mask import StreamMasker
from .session import SessionCore, attribution, drain, format_addr, new_request_id
from .ssh_sftp import sftp_relay

log = logging.getLogger(__name__)

PROTOCOL = "ssh"
REFUSED_EXIT = 126  # "command found but not executable": what a refused command exits with
RELAY_CHUNK = 64 * 1024
IDLE_FLUSH_S = 0.2  # a masked interactive session shows a held partial line (a prompt) after this pause
SHELL_TEXT = "[shell]"  # a shell's requests row text
TYPED_REASON = "typed in an interactive shell: extracted best-effort from keystrokes, not decided"
CERT_EXPIRED = "the session's SSH certificate expired; the session ends with it"
WITHDRAWN = "withdrawn: the bot disconnected while the command waited for approval"


@dataclass(frozen=True)
class SshFrontSettings:
    target: str
    upstream_host: str
    upstream_port: int
    known_hosts: str            # OpenSSH known_hosts for the upstream (host keys or @cert-authority)
    host_key: Any               # the appliance's host key for this target (asyncssh.SSHKey)
    host_cert: Any              # its certificate from the appliance's host CA
    require_token: bool = False
    connect_timeout: float = 10.0
    env_allow: tuple[str, ...] = ("LANG", "LC_*")  # environment variables a session may pass on
    login_timeout: float = 30.0


class SshFront:
    """One listener in front of one SSH target."""

    def __init__(self, settings: SshFrontSettings, services: Any, admission: Any = None):
        self.settings = settings
        self.services = services
        self.admission = admission
        self._server: asyncssh.SSHAcceptor | None = None
        self.sessions: set[_BotConnection] = set()
        self._tasks = TaskSet()
        # The SFTP handler (appliance/fronts/ssh_sftp.py): asyncssh's sftp_factory, called with
        # the bot's channel (chan.get_connection().get_owner() is its _BotConnection: core, grant,
        # _upstream()). None: the sftp subsystem is refused like any other.
        self.sftp_factory: Any = sftp_relay

    def spawn(self, coro, name: str) -> asyncio.Task:
        return self._tasks.spawn(coro, name)

    async def serve(self, host: str, port: int) -> Any:
        st = self.settings
        self._server = await asyncssh.create_server(
            lambda: _BotConnection(self), host, port,
            server_host_keys=[(st.host_key, st.host_cert)], process_factory=self._process,
            sftp_factory=self.sftp_factory,
            # line_editor=False: a pty's echo and line editing are the real shell's, not asyncssh's.
            encoding=None, line_editor=False, login_timeout=st.login_timeout, allow_scp=False, x509_trusted_certs=None,
            agent_forwarding=False, x11_forwarding=False, keepalive_interval=30)
        return self._server

    async def close(self) -> None:
        await drain(self._server, self.sessions, 0.0, lambda s: False,
                    lambda s: s.end("botwarden is shutting down"))
        if self._server is not None:
            await self._server.wait_closed()

    async def drain(self, deadline: float) -> None:
        """SIGTERM: commands in flight may finish until ``deadline``; then every session ends with
        a disconnect message the bot's ssh prints."""
        await drain(self._server, self.sessions, deadline, lambda s: s.busy,
                    lambda s: s.end("botwarden is shutting down"))
        # The disconnect messages must reach the bots before the daemon exits: wait (briefly) for
        # the connections to close, which asyncssh does once the message is written out.
        until = time.monotonic() + 2.0
        while self.sessions and time.monotonic() < until:
            await asyncio.sleep(0.02)
        if self._server is not None:
            await self._server.wait_closed()

    async def _process(self, process: asyncssh.SSHServerProcess) -> None:
        conn = process.get_extra_info("connection")
        bot = conn.get_owner() if conn is not None else None
        if not isinstance(bot, _BotConnection) or bot.core.grant is None:
            process.stderr.write(b"botwarden: this session was not granted\n")
            process.exit(REFUSED_EXIT)
            return
        await bot.run(process)


class _BotConnection(asyncssh.SSHServer):
    """One bot's SSH connection: its session core (grant, audit, holds), its upstream connection,
    its commands."""

    def __init__(self, front: SshFront):
        self.front = front
        self.settings = front.settings
        self.services = front.services
        st = self.settings
        self.core = SessionCore(self.services, target=st.target, protocol=PROTOCOL,
                                target_addr=f"{st.upstream_host}:{st.upstream_port}", spawn=front.spawn,
                                terminate=lambda code, message: self.end(message))
        self.conn: asyncssh.SSHServerConnection | None = None
        self.username = ""
        self.upstream: asyncssh.SSHClientConnection | None = None
        self._upstream_lock = asyncio.Lock()
        self._refused = False
        self._ending = False   # end() ran: the channels have the reason, the disconnect follows
        self._expiry: asyncio.TimerHandle | None = None
        self.running = 0  # commands in flight or held (drain waits for them)
        self.processes: set[asyncssh.SSHServerProcess] = set()  # their channels, for end()
        self.bytes_in = self.bytes_out = 0

    @property
    def busy(self) -> bool:
        return self.running > 0

    @property
    def grant(self) -> Any:
        return self.core.grant

    @property
    def session_id(self) -> str | None:
        return self.core.session_id

    # -- asyncssh.SSHServer -----------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.front.sessions.add(self)
        # Agent and X11 forwarding requests reach the connection, not this object: asyncssh asks
        # these two methods whether to open a listener. Ours refuse, with an audit row each.
        conn.create_agent_listener = self._agent_requested
        conn.attach_x11_listener = self._x11_requested
        if not self.core.admit(self.front.admission, conn.get_extra_info("socket"), self._admission_closed,
                               listener=self._listener()):
            conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS,
                            "botwarden: too many connections waiting to authenticate; try again later")

    def _listener(self) -> str:
        return format_addr(self.conn.get_extra_info("sockname")) or "" if self.conn is not None else ""

    def _admission_closed(self, reason: str) -> None:
        self.core.refused_before_login(reason, self._listener())
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"botwarden: {reason}; the connection is closed")

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.sessions.discard(self)
        if exc is not None:
            if self.core.grant is None and not self._refused:
                self.core.refused_before_login(f"closed before login: {exc}", self._listener())
            elif self.core.grant is not None:
                self.core.set_outcome("error", str(exc))
        if self._expiry is not None:
            self._expiry.cancel()
        self.core.withdraw_hold(WITHDRAWN)  # before end: an ended core withdraws nothing
        if self.upstream is not None:
            self.upstream.close()
        self.core.end(self.bytes_in, self.bytes_out)  # session_end, admission ticket, grant released

    async def begin_auth(self, username: str) -> bool:
        self.username = username
        if self.settings.require_token:
            return True  # the token comes as the password
        return not await self._grant(None)  # attestation alone: no further auth if granted

    # The token (authentication = "token" or "token+attestation") comes as the password or as
    # the answer to one keyboard-interactive prompt: whichever the bot's client offers.
    def password_auth_supported(self) -> bool:
        return self.settings.require_token

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._grant(password)

    def kbdint_auth_supported(self) -> bool:
        return self.settings.require_token

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
        if self._refused:
            return False
        return ("botwarden", "", "", [(f"botwarden token for {self.settings.target}: ", False)])

    async def validate_kbdint_response(self, username: str, responses: Any) -> bool:
        if len(responses) != 1:
            return False
        return await self._grant(responses[0])

    def public_key_auth_supported(self) -> bool:
        return False

    # -- refused by design: forwarding of every kind --------------------------------------
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        what = f"local port forwarding to {dest_host}:{dest_port}"
        self._refused_request("ssh_forward", what)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"botwarden refuses {what}")

    def unix_connection_requested(self, dest_path: str) -> Any:
        what = f"local forwarding to the Unix socket {dest_path}"
        self._refused_request("ssh_forward", what)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"botwarden refuses {what}")

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._refused_request("ssh_forward", f"remote port forwarding from {listen_host or '*'}:{listen_port}")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refused_request("ssh_forward", f"remote forwarding from the Unix socket {listen_path}")
        return False

    async def _agent_requested(self) -> bool:
        self._refused_request("ssh_forward", "agent forwarding")
        return False

    async def _x11_requested(self, chan: Any, auth_proto: bytes, auth_data: bytes, screen: int) -> None:
        self._refused_request("ssh_forward", f"X11 forwarding (screen {screen})")
        return None

    def _refused_request(self, kind: str, what: str, reason: str | None = None) -> None:
        """A request botwarden refuses whatever the policy says (it would carry traffic no rule
        sees): a requests row; the bot sees SSH's own refusal."""
        log.info("ssh session %s: refused %s", self.core.session_id, what)
        self._request(what, Verdict("block", None, reason or f"botwarden refuses {what}"), "block",
                      reason or f"botwarden refuses {what} on SSH targets", time.time(), kind=kind)

    def _session_env(self, process: asyncssh.SSHServerProcess) -> dict[str, str]:
        """The variables the bot sent (SendEnv / setenv) that the target's env_allow lets through;
        each other one is refused with a row naming it (never its value)."""
        allowed: dict[str, str] = {}
        for name, value in process.channel.get_environment().items():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.settings.env_allow):
                allowed[name] = value
            else:
                self._refused_request("ssh_env", f"environment variable {name}",
                                      f"environment variable {name} is not in target "
                                      f"{self.settings.target!r}'s env_allow")
        return allowed

    # -- the grant ----------------------------------------------------------------------
    async def _grant(self, token: str | None) -> bool:
        if self.core.grant is not None:
            return True
        if self._refused:
            return False
        self.core.credentials_presented()
        ctx = ConnectionContext(self.conn.get_extra_info("peername"), self.conn.get_extra_info("sockname"),
                                True, await attribution(self.services, self.conn))
        try:
            await self.core.open(ctx, self.username, token)  # a refusal is recorded there
        except AuthRefused as e:
            # SSH shows no reason on an authentication failure: the banner carries ours (never the token).
            self._refused = True
            self.conn.send_auth_banner(f"{e}\r\n")
            self.core.set_outcome("refused", str(e))
            return False
        # The session lives as long as its certificate: an upstream connection made with it would
        # otherwise outlive it (sshd checks a certificate only at login).
        expires = self.core.grant.credential.expires_at
        if expires is not None:
            delay = max(0.0, (expires - datetime.now(timezone.utc)).total_seconds())
            self._expiry = asyncio.get_running_loop().call_later(delay, self.end, CERT_EXPIRED)
        return True

    def end(self, why: str) -> None:
        """End the session from botwarden's side (lease or token expiry, shutdown, an operator):
        each running command's channel gets the reason on stderr and exit status 255 (what ssh
        prints whatever its LogLevel), then the connection is closed with it as the disconnect
        message, a moment later so the channels' last bytes go out first."""
        if self.conn is None or self._ending:
            return
        self._ending = True
        self.core.set_outcome("terminated", why)
        message = f"botwarden: {why}"
        for process in list(self.processes):
            try:
                process.stderr.write(message.encode() + b"\n")
                process.exit(255)
            except (OSError, asyncssh.Error):
                pass  # the channel is already closing
        conn = self.conn
        asyncio.get_running_loop().call_later(
            0.3 if self.processes else 0.0, conn.disconnect, asyncssh.DISC_BY_APPLICATION, message)

    # -- commands -----------------------------------------------------------------------
    async def run(self, process: asyncssh.SSHServerProcess) -> None:
        self.running += 1
        self.processes.add(process)
        try:
            await self._run(process)
        finally:
            self.running -= 1
            self.processes.discard(process)

    async def _run(self, process: asyncssh.SSHServerProcess) -> None:
        command = process.command
        subsystem = process.subsystem
        if subsystem is not None:
            # sftp: appliance/fronts/ssh_sftp.py serves it (SshFront.sftp_factory; asyncssh then
            # runs it instead of this); without it, sftp is refused here like any other subsystem.
            why = ("sftp is not enabled on botwarden's SSH front; use scp -O or commands" if subsystem == "sftp"
                   else f"botwarden refuses subsystem {subsystem!r}: only sftp is relayed")
            self._session_env(process)
            self._refuse(process, self._request_text(process), Verdict("block", None, why), kind="ssh_subsystem")
            return
        env = self._session_env(process)
        shell = command is None
        request, text, kind = ((SshRequest("shell"), SHELL_TEXT, "ssh_shell") if shell
                               else (SshRequest.exec(command), command, "ssh_exec"))
        req_t0 = time.time()
        try:
            verdict = self.services.decide_ssh(self.core.grant, self.settings.target, request)
        except Exception:
            log.exception("policy failed; request refused")
            verdict = Verdict("block", None, "the policy engine failed on this request")
        decision = verdict.action
        reason = verdict.reason
        request_id = new_request_id()
        if verdict.action == "block":
            self._refuse(process, text, verdict, request_id=request_id, kind=kind)
            return
        if verdict.action == "approve":
            outcome = await self._hold(process, text, verdict, request_id)
            if not outcome.approved:
                self._refuse(process, text, verdict, decision="deny", why=outcome.reason or "denied",
                             t0=req_t0, request_id=request_id, kind=kind)
                return
            decision, reason = "approve", outcome.reason or reason
        if not await self._durable(process, text, verdict, decision, request_id, req_t0, kind):
            return
        relayed: dict[str, int] = {}  # what the relay counted (secrets masked)
        try:
            # exits the bot's channel with the command's status
            status = await self._relay(process, command, env, self._text_masker(verdict), relayed,
                                       recorded=shell and process.get_terminal_type() is not None,
                                       request_id=request_id)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            self.core.upstream_failed("ssh")
            if isinstance(e, asyncssh.HostKeyNotVerifiable):
                e = OSError(f"the sshd's host key does not match the target's known_hosts ({e}); "
                            "botwarden does not talk to an upstream it cannot verify")
            elif isinstance(e, asyncio.TimeoutError):
                e = OSError(f"no answer from the sshd within {self.settings.connect_timeout:g}s")
            msg = f"botwarden: could not run the command on {self.settings.target!r}: {e}"
            process.stderr.write(msg.encode() + b"\n")
            process.exit(255)
            self._request(text, verdict, decision, reason, req_t0, error=str(e), exit_status=255,
                          request_id=request_id, kind=kind)
            return
        self._request(text, verdict, decision, reason, req_t0, exit_status=status, request_id=request_id, kind=kind,
                      masked=relayed.get("masked"))

    async def _durable(self, process: asyncssh.SSHServerProcess, command: str, verdict: Verdict, decision: str,
                       request_id: str, t0: float, kind: str) -> bool:
        """audit.mode = "strict": the command reaches the target only once its record is journaled
        by the audit process (issue 23.4); a record that cannot be made durable refuses it."""
        try:
            wait = self.core.record_start({
                "request_id": request_id, "session_id": self.core.session_id,
                "ts": datetime.fromtimestamp(t0, timezone.utc), "protocol": PROTOCOL, "kind": kind,
                "text": command, "params": None, "decision": decision, "rule": verdict.rule}, verdict)
            if wait is not None:
                await wait
        except Exception as e:
            log.error("a command's record could not be made durable; it is refused: %s", e)
            self._refuse(process, command, verdict, decision="block", t0=t0, request_id=request_id, kind=kind,
                         why=f"the audit store could not record the command ({e}); it was not run")
            return False
        return True

    def _request_text(self, process: asyncssh.SSHServerProcess) -> str:
        return process.command or (f"[subsystem {process.subsystem}]" if process.subsystem else "[shell]")

    def _refuse(self, process: asyncssh.SSHServerProcess, text: str, verdict: Verdict, *,
                decision: str = "block", why: str | None = None, t0: float | None = None,
                request_id: str | None = None, kind: str = "ssh_exec") -> None:
        rule = f"rule {verdict.rule!r}" if verdict.rule else "the target's default policy"
        reason = why or verdict.reason
        line = (f"botwarden: command {'denied' if decision == 'deny' else 'blocked by ' + rule}: {reason}"
                if decision == "deny" or verdict.rule or verdict.action == "block" else f"botwarden: {reason}")
        process.stderr.write(line.encode() + b"\n")
        process.exit(REFUSED_EXIT)
        self._request(text, verdict, decision, reason, t0 or time.time(), error=line, exit_status=REFUSED_EXIT,
                      request_id=request_id, kind=kind)

    async def _hold(self, process: asyncssh.SSHServerProcess, command: str, verdict: Verdict,
                    request_id: str) -> HoldOutcome:
        def notify(approval_id: str) -> None:
            process.stderr.write(f"botwarden: waiting for approval {approval_id}"
                                 f"{' (rule ' + repr(verdict.rule) + ')' if verdict.rule else ''}\n".encode())

        hold = asyncio.ensure_future(self.core.hold(command, verdict, notify, request_id, withdrawn=WITHDRAWN))
        closed = asyncio.ensure_future(process.channel.wait_closed())
        done, _ = await asyncio.wait({hold, closed}, return_when=asyncio.FIRST_COMPLETED)
        if hold not in done:  # the bot gave up waiting: the approval's record says withdrawn
            self.core.withdraw_hold(WITHDRAWN)
        closed.cancel()
        try:
            return await hold
        except asyncio.CancelledError:  # the connection ended first (connection_lost withdrew it)
            return HoldOutcome(False, "", WITHDRAWN, None, "withdrawn")

    async def _upstream(self) -> asyncssh.SSHClientConnection:
        async with self._upstream_lock:
            if self.upstream is None:
                cred = self.core.grant.credential
                if not cred.private_key:
                    raise OSError("the session's credential has no SSH private key")
                key = asyncssh.import_private_key(cred.private_key)
                # A certificate from OpenBao's SSH engine, or a KV key with or without its own.
                client_key = (key, asyncssh.import_certificate(cred.cert)) if cred.cert else key
                st = self.settings
                self.upstream = await asyncio.wait_for(asyncssh.connect(
                    st.upstream_host, st.upstream_port, username=cred.username, client_keys=[client_key],
                    known_hosts=st.known_hosts, agent_path=None, config=None, preferred_auth="publickey"),
                    st.connect_timeout)
            return self.upstream

    def _text_masker(self, verdict: Verdict) -> Any:
        find = getattr(self.services, "text_masker", None)
        return find(self.core.grant, self.settings.target, verdict) if find is not None else None

    async def _relay(self, process: asyncssh.SSHServerProcess, command: str | None, env: dict[str, str],
                     text_masker: Any = None, counts: dict[str, int] | None = None, *,
                     recorded: bool = False, request_id: str | None = None) -> int:
        """Run ``command`` (None: a login shell) on the sshd and relay it both ways: stdin, stdout,
        stderr, EOF, window changes, signals and breaks from the bot; the exit status or the signal
        that ended the command back. Returns the exit status (128 + signal number for a signal)."""
        upstream = await self._upstream()
        term_type = process.get_terminal_type()
        shell: _ShellRecord | _ExecRecord
        if recorded:
            shell = _ShellRecord(self)
            width, height, _, _ = process.get_terminal_size()
            self.core.record("event", pty_event(width, height, term_type or "", time.time()))
        else:
            shell = _ExecRecord(self, request_id)
        remote = await upstream.create_process(
            command, encoding=None, term_type=term_type,
            term_size=process.get_terminal_size() if term_type else None,
            term_modes=process.term_modes if term_type else None, env=env or None)
        maskers = ([StreamMasker(text_masker), StreamMasker(text_masker)] if text_masker is not None
                   else [None, None])
        interactive = term_type is not None
        to_bot = [asyncio.ensure_future(self._pump_out(remote.stdout, process.stdout, shell, maskers[0], interactive)),
                  asyncio.ensure_future(self._pump_out(remote.stderr, process.stderr, shell, maskers[1], interactive))]
        from_bot = asyncio.ensure_future(self._pump_in(process, remote, shell))
        try:
            await asyncio.gather(*to_bot)
            result = await remote.wait(check=False)
        finally:
            from_bot.cancel()
            for t in to_bot:
                t.cancel()
            remote.close()
            if isinstance(shell, _ExecRecord):
                shell.close()
        if counts is not None:
            counts["masked"] = sum(m.masked for m in maskers if m is not None)
        if result.exit_signal is not None:
            name, core_dumped, message, lang = result.exit_signal
            process.exit_with_signal(name, core_dumped, message, lang)
            return 128 + _signal_number(name)
        status = result.exit_status if result.exit_status is not None else 255
        process.exit(status)
        return status

    async def _pump_in(self, process: asyncssh.SSHServerProcess, remote: asyncssh.SSHClientProcess,
                       shell: "_ShellRecord | _ExecRecord | None") -> None:
        """The bot's stdin to the command, with the out-of-band requests asyncssh hands over as
        exceptions in the stream's order (a resize between two keystrokes stays between them)."""
        while True:
            try:
                data = await process.stdin.read(RELAY_CHUNK)
            except asyncssh.TerminalSizeChanged as e:
                remote.change_terminal_size(e.width, e.height, e.pixwidth, e.pixheight)
                if isinstance(shell, _ShellRecord):
                    self.core.record("event", resize_event(e.width, e.height))
                continue
            except asyncssh.SignalReceived as e:
                remote.send_signal(e.signal)
                continue
            except asyncssh.BreakReceived as e:
                remote.send_break(e.msec)
                continue
            except asyncssh.SoftEOFReceived:
                continue
            if not data:
                remote.stdin.write_eof()
                return
            if not await self.core.input_may_go_on(lambda: self.conn is None or process.is_closing()):
                return
            self.bytes_in += len(data)
            if shell is not None:
                shell.typed(data)
            remote.stdin.write(data)
            await remote.stdin.drain()

    async def _pump_out(self, source: asyncssh.SSHReader, sink: asyncssh.SSHWriter,
                        shell: "_ShellRecord | _ExecRecord | None", masker: StreamMasker | None, interactive: bool) -> None:
        """The command's output to the bot (and the recording), masked when a mask rule matched
        the request. A masker holds back what could be the start of a secret; in an interactive
        session what it holds goes out after IDLE_FLUSH_S without more output (a prompt)."""
        loop = asyncio.get_running_loop()
        idle: asyncio.TimerHandle | None = None

        def send(data: bytes) -> None:
            if data:
                self.bytes_out += len(data)
                if shell is not None:
                    shell.shown(data)
                sink.write(data)

        try:
            while True:
                data = await source.read(RELAY_CHUNK)
                if idle is not None:
                    idle.cancel()
                    idle = None
                if not data:
                    if masker is not None:
                        send(masker.flush())
                    return
                send(masker.feed(data) if masker is not None else data)
                if masker is not None and interactive and masker.holding:
                    idle = loop.call_later(IDLE_FLUSH_S, lambda: send(masker.flush()))
                await sink.drain()
        finally:
            if idle is not None:
                idle.cancel()

    # -- audit --------------------------------------------------------------------------
    def _request(self, text: str, verdict: Verdict, decision: str, reason: str | None, t0: float, *,
                 error: str | None = None, exit_status: int | None = None, request_id: str | None = None,
                 kind: str = "ssh_exec", masked: int | None = None) -> None:
        self.core.audit("request", {
            "request_id": request_id or new_request_id(), "session_id": self.core.session_id,
            "ts": datetime.fromtimestamp(t0, timezone.utc), "protocol": PROTOCOL, "kind": kind,
            "text": text, "params": None, "decision": decision, "rule": verdict.rule, "reason": reason or None,
            "duration_ms": (time.time() - t0) * 1000.0, "rows": exit_status, "error": error,
            "sqlstate": None, "masked": {"output": masked} if masked else None,
        })


class _ExecRecord:
    """One recorded command (exec, ``scp -O``, a shell without a pty): an ``exec`` event naming
    its requests row, then what it printed (stdout and stderr, after masking) as "out" rows. Its
    stdin is not recorded, only counted (``stdin_bytes`` in the closing ``exec_end`` event): it
    may be a file being copied or a secret piped to the command."""

    def __init__(self, bot: _BotConnection, request_id: str | None):
        self.bot = bot
        self.request_id = request_id
        self.stdin_bytes = 0
        bot.core.record("event", json.dumps({"event": "exec", "request_id": request_id}).encode())

    def shown(self, data: bytes) -> None:
        self.bot.core.record("out", data)

    def typed(self, data: bytes) -> None:
        self.stdin_bytes += len(data)

    def close(self) -> None:
        self.bot.core.record("event", json.dumps({"event": "exec_end", "request_id": self.request_id,
                                                  "stdin_bytes": self.stdin_bytes}).encode())


class _ShellRecord:
    """One recorded shell: its terminal bytes as recording rows, typed lines as requests rows
    (kind ``ssh_typed``: extracted best-effort, an audit aid, not a decision; appliance/fronts/ssh_cast.py)."""

    def __init__(self, bot: _BotConnection):
        self.bot = bot
        self.lines = TypedLines()

    def shown(self, data: bytes) -> None:
        self.bot.core.record("out", data)
        self.lines.output(data)

    def typed(self, data: bytes) -> None:
        self.bot.core.record("in", self.lines.redact(data))
        for line in self.lines.feed(data):
            self.bot.core.audit("request", {
                "request_id": new_request_id(), "session_id": self.bot.core.session_id, "ts": datetime.now(timezone.utc),
                "protocol": PROTOCOL, "kind": "ssh_typed", "text": line, "params": None, "decision": "allow",
                "rule": None, "reason": TYPED_REASON, "duration_ms": None, "rows": None, "error": None,
                "sqlstate": None, "masked": None})


def _signal_number(name: str) -> int:
    import signal

    try:
        return int(signal.Signals["SIG" + name.upper()])
    except KeyError:
        return 1


def load_or_make_host_ca(path: str) -> Any:
    """The appliance's SSH host CA key (ed25519, 0600), made on first use."""
    if os.path.exists(path):
        return asyncssh.read_private_key(path)
    key = asyncssh.generate_private_key("ssh-ed25519", comment="botwarden host CA")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    return key


def host_identity(ca: Any, names: list[str], validity_s: int = 7 * 86400) -> tuple[Any, Any]:
    """A fresh host key for a target and its certificate for ``names`` from the host CA."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_host_certificate(key, "botwarden", principals=names, valid_after="-5m",
                                        valid_before=f"+{validity_s}s")
    return key, cert


def known_hosts_line(ca: Any, pattern: str = "*") -> str:
    """What bots put in known_hosts to trust every target's appliance host certificate."""
    return f"@cert-authority {pattern} " + ca.export_public_key("openssh").decode().strip()
