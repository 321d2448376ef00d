"""The SSH front: bots' ``ssh host cmd`` decided per command, on a certificate made for the session.

The bot connects to the target's real address (the eBPF probes redirect it here, as for
PostgreSQL). The appliance answers with a host certificate for the target's names, signed by
the appliance's host CA (bots trust it with one ``@cert-authority`` known_hosts line, printed
by ``botwarden ssh known-hosts``). The bot proves who it is by kernel attestation and/or its
OIDC token as the password; the runtime grants the session (identity, an OpenSSH user
certificate signed by OpenBao's SSH engine for this session alone). Each exec request is
decided by the policy (``appliance.policy.ssh``: argv-level, shell constructs): allowed
commands run on the real sshd over a connection authenticated with that certificate, their
streams and exit status relayed; blocked ones get a one-line reason on stderr and exit 126;
held ones wait for an operator. Every session and command is an audit row.

Not yet (issue 16): interactive shells and their recording, SFTP/scp, output masking; they
are refused with a message (forwarding of every kind too, by design).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncssh

from appliance.policy.ssh import SshRequest
from appliance.policy.types import Verdict

from .services import AuthRefused, ConnectionContext, HoldOutcome
from .ssh_sftp import sftp_relay

log = logging.getLogger(__name__)

PROTOCOL = "ssh"
REFUSED_EXIT = 126  # "command found but not executable": what a refused command exits with


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
    login_timeout: float = 30.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


class SshFront:
    """One listener in front of one SSH target."""

    def __init__(self, settings: SshFrontSettings, services: Any, admission: Any = None):
        self.settings = settings
        self.services = services
        self.admission = admission
        self._server: asyncssh.SSHAcceptor | None = None
        self.sessions: set[_BotConnection] = set()

    async def serve(self, host: str, port: int) -> Any:
        st = self.settings
        self._server = await asyncssh.create_server(
            lambda: _BotConnection(self), host, port,
            server_host_keys=[(st.host_key, st.host_cert)], process_factory=self._process,
            # The sftp subsystem (and OpenSSH 9's scp) is decided per operation (ssh_sftp.py);
            # allow_scp stays off: asyncssh's own scp server would serve the appliance's files.
            sftp_factory=sftp_relay,
            encoding=None, login_timeout=st.login_timeout, allow_scp=False, x509_trusted_certs=None,
            agent_forwarding=False, x11_forwarding=False, keepalive_interval=30)
        return self._server

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for bot in list(self.sessions):
            bot.end("botwarden is shutting down")

    async def drain(self, deadline: float) -> None:
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self.close()

    async def _process(self, process: asyncssh.SSHServerProcess) -> None:
        conn = process.get_extra_info("connection")
        bot = conn.get_owner() if conn is not None else None
        if not isinstance(bot, _BotConnection) or bot.grant is None:
            process.stderr.write(b"botwarden: this session was not granted\n")
            process.exit(REFUSED_EXIT)
            return
        await bot.run(process)


class _BotConnection(asyncssh.SSHServer):
    """One bot's SSH connection: its grant, its upstream connection, its commands."""

    def __init__(self, front: SshFront):
        self.front = front
        self.settings = front.settings
        self.services = front.services
        self.session_id = uuid.uuid4().hex
        self.conn: asyncssh.SSHServerConnection | None = None
        self.grant: Any = None
        self.attribution: Any = None
        self.username = ""
        self.upstream: asyncssh.SSHClientConnection | None = None
        self._upstream_lock = asyncio.Lock()
        self._started = False
        self._ended = False
        self.outcome, self.end_error = "ok", None
        self.bytes_in = self.bytes_out = 0
        self._seq = 0

    # -- asyncssh.SSHServer -----------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.front.sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.sessions.discard(self)
        if exc is not None and self.outcome == "ok" and self.grant is not None:
            self.outcome, self.end_error = "error", str(exc)
        asyncio.get_running_loop().create_task(self._close())

    async def begin_auth(self, username: str) -> bool:
        self.username = username
        if self.settings.require_token:
            return True  # the token comes as the password
        return not await self._grant(None)  # attestation alone: no further auth if granted

    def password_auth_supported(self) -> bool:
        return self.settings.require_token

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._grant(password)

    def public_key_auth_supported(self) -> bool:
        return False

    # -- the grant ----------------------------------------------------------------------
    async def _grant(self, token: str | None) -> bool:
        if self.grant is not None:
            return True
        sock = self.conn.get_extra_info("socket") if self.conn is not None else None
        if self.attribution is None and sock is not None:
            attribute = getattr(self.services, "attribute", None)
            if attribute is not None:
                try:
                    found = attribute(sock)
                    self.attribution = await found if asyncio.iscoroutine(found) else found
                except Exception:
                    log.exception("attribution lookup failed")
        ctx = ConnectionContext(self.conn.get_extra_info("peername"), self.conn.get_extra_info("sockname"),
                                True, self.attribution)
        try:
            self.grant = await self.services.open_session(self.settings.target, ctx, self.username, token)
        except AuthRefused as e:
            # SSH shows no reason on an authentication failure: the banner carries ours (never the token).
            self.conn.send_auth_banner(f"{e}\r\n")
            self._session_start(ctx, None, e.audit_fields)
            self.outcome, self.end_error = "refused", str(e)
            return False
        self.session_id = self.grant.session_id
        self._session_start(ctx, self.grant, None)
        register = getattr(self.services, "register_terminate", None)
        if register is not None:
            register(self.grant.session_id, lambda code, message: self.end(message))
        return True

    def end(self, why: str) -> None:
        """End the session from botwarden's side (lease or token expiry, shutdown, an operator)."""
        if self.conn is not None:
            self.outcome, self.end_error = "terminated", why
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"botwarden: {why}")

    # -- commands -----------------------------------------------------------------------
    async def run(self, process: asyncssh.SSHServerProcess) -> None:
        command = process.command
        subsystem = process.subsystem
        if subsystem is not None or command is None:
            what = f"subsystem {subsystem!r}" if subsystem else "an interactive shell"
            self._refuse(process, self._request_text(process), Verdict(
                "block", None, f"{what} is not supported by botwarden's SSH front yet; run commands instead"))
            return
        req_t0 = time.time()
        try:
            verdict = self.services.decide_ssh(self.grant, self.settings.target, SshRequest.exec(command))
        except Exception:
            log.exception("policy failed; command refused")
            verdict = Verdict("block", None, "the policy engine failed on this command")
        decision = verdict.action
        reason = verdict.reason
        if verdict.action == "block":
            self._refuse(process, command, verdict)
            return
        if verdict.action == "approve":
            outcome = await self._hold(process, command, verdict)
            if not outcome.approved:
                self._refuse(process, command, verdict, decision="deny",
                             why=outcome.reason or "denied", t0=req_t0)
                return
            decision, reason = "approve", outcome.reason or reason
        request_id = uuid.uuid4().hex
        if not await self._durable(process, command, verdict, decision, request_id, req_t0):
            return
        try:
            status = await self._relay(process, command)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            msg = f"botwarden: could not run the command on {self.settings.target!r}: {e}"
            process.stderr.write(msg.encode() + b"\n")
            process.exit(255)
            self._request(command, verdict, decision, reason, req_t0, error=str(e), exit_status=255,
                          request_id=request_id)
            return
        self._request(command, verdict, decision, reason, req_t0, exit_status=status, request_id=request_id)
        process.exit(status)

    async def _durable(self, process: asyncssh.SSHServerProcess, command: str, verdict: Verdict, decision: str,
                       request_id: str, t0: float) -> bool:
        """audit.mode = "strict": the command reaches the target only once its record is journaled
        by the audit process (issue 23.4); a record that cannot be made durable refuses it."""
        durable = getattr(self.services, "audit_durable", None)
        if durable is None:
            return True
        try:
            wait = durable("request_start", {
                "request_id": request_id, "session_id": self.session_id,
                "ts": datetime.fromtimestamp(t0, timezone.utc), "protocol": PROTOCOL, "kind": "ssh_exec",
                "text": command, "params": None, "decision": decision, "rule": verdict.rule}, verdict)
            if wait is not None:
                await wait
        except Exception as e:
            log.error("a command's record could not be made durable; it is refused: %s", e)
            self._refuse(process, command, verdict, decision="block", t0=t0,
                         why=f"the audit store could not record the command ({e}); it was not run")
            return False
        return True

    def _request_text(self, process: asyncssh.SSHServerProcess) -> str:
        return process.command or (f"[subsystem {process.subsystem}]" if process.subsystem else "[shell]")

    def _refuse(self, process: asyncssh.SSHServerProcess, text: str, verdict: Verdict, *,
                decision: str = "block", why: str | None = None, t0: float | None = None) -> None:
        rule = f"rule {verdict.rule!r}" if verdict.rule else "the target's default policy"
        reason = why or verdict.reason
        line = (f"botwarden: command {'denied' if decision == 'deny' else 'blocked by ' + rule}: {reason}"
                if decision == "deny" or verdict.rule or verdict.action == "block" else f"botwarden: {reason}")
        process.stderr.write(line.encode() + b"\n")
        process.exit(REFUSED_EXIT)
        self._request(text, verdict, decision, reason, t0 or time.time(), error=line, exit_status=REFUSED_EXIT)

    async def _hold(self, process: asyncssh.SSHServerProcess, command: str, verdict: Verdict) -> HoldOutcome:
        def notify(approval_id: str) -> None:
            process.stderr.write(f"botwarden: waiting for approval {approval_id}"
                                 f"{' (rule ' + repr(verdict.rule) + ')' if verdict.rule else ''}\n".encode())

        hold = asyncio.ensure_future(self.services.hold(self.grant, self.settings.target, command, verdict, notify))
        closed = asyncio.ensure_future(process.channel.wait_closed())
        done, _ = await asyncio.wait({hold, closed}, return_when=asyncio.FIRST_COMPLETED)
        if hold in done:
            closed.cancel()
            return hold.result()
        hold.cancel("the bot disconnected while the command waited for approval")  # withdraws it
        try:
            await hold
        except asyncio.CancelledError:
            pass
        return HoldOutcome(False, "", "the bot disconnected while the command waited for approval", None,
                           "abandoned")

    async def _upstream(self) -> asyncssh.SSHClientConnection:
        async with self._upstream_lock:
            if self.upstream is None:
                cred = self.grant.credential
                if not cred.cert or not cred.private_key:
                    raise OSError("the session's credential has no SSH certificate")
                key = asyncssh.import_private_key(cred.private_key)
                cert = asyncssh.import_certificate(cred.cert)
                st = self.settings
                self.upstream = await asyncio.wait_for(asyncssh.connect(
                    st.upstream_host, st.upstream_port, username=cred.username, client_keys=[(key, cert)],
                    known_hosts=st.known_hosts, agent_path=None, config=None, preferred_auth="publickey"),
                    st.connect_timeout)
            return self.upstream

    async def _relay(self, process: asyncssh.SSHServerProcess, command: str) -> int:
        upstream = await self._upstream()
        async with upstream.create_process(command, encoding=None, term_type=process.get_terminal_type(),
                                           env=None) as remote:
            await process.redirect(stdin=remote.stdin, stdout=remote.stdout, stderr=remote.stderr)
            result = await remote.wait(check=False)
        if result.exit_signal is not None:
            return 128 + _signal_number(result.exit_signal[0])
        return result.exit_status if result.exit_status is not None else 255

    # -- audit --------------------------------------------------------------------------
    def _audit(self, kind: str, record: dict) -> None:
        try:
            self.services.audit(kind, record)
        except Exception:
            log.exception("audit hook failed for %s", kind)

    def _session_start(self, ctx: ConnectionContext, grant: Any, refused_fields: Any) -> None:
        if self._started:
            return
        self._started = True
        peer = ctx.client_addr
        rec: dict[str, Any] = {
            "session_id": self.session_id, "ts": _now(), "target": self.settings.target, "protocol": PROTOCOL,
            "client_addr": f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None,
            "target_addr": f"{self.settings.upstream_host}:{self.settings.upstream_port}", "tls": True,
        }
        a = ctx.attribution
        if a is not None:
            rec.update(pid=getattr(a, "tgid", a.pid), uid=a.uid, gid=a.gid, cgroup_id=a.cgroup_id,
                       cgroup_path=a.cgroup_path, exe=a.exe_path, comm=a.comm, attribution_source=a.source,
                       privileged=bool(getattr(a, "privileges", ())))
        else:
            rec["attribution_source"] = "none"
        if grant is not None:
            rec.update(identity=grant.identity, token_subject=grant.subject,
                       credential_user=grant.credential.username, lease_id=grant.credential.lease_id)
            rec.update(grant.audit_fields)
        elif refused_fields:
            rec.update(refused_fields)
        self._audit("session_start", rec)

    def _request(self, text: str, verdict: Verdict, decision: str, reason: str | None, t0: float, *,
                 error: str | None = None, exit_status: int | None = None, request_id: str | None = None) -> None:
        self._audit("request", {
            "request_id": request_id or uuid.uuid4().hex, "session_id": self.session_id,
            "ts": datetime.fromtimestamp(t0, timezone.utc), "protocol": PROTOCOL, "kind": "ssh_exec",
            "text": text, "params": None, "decision": decision, "rule": verdict.rule, "reason": reason or None,
            "duration_ms": (time.time() - t0) * 1000.0, "rows": exit_status, "error": error,
            "sqlstate": None, "masked": None,
        })

    async def _close(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.upstream is not None:
            self.upstream.close()
        if self._started:
            self._audit("session_end", {"session_id": self.session_id, "ts": _now(), "bytes_in": self.bytes_in,
                                        "bytes_out": self.bytes_out, "outcome": self.outcome,
                                        "error": self.end_error})
        if self.grant is not None:
            try:
                await self.services.close_session(self.grant)
            except Exception:
                log.exception("closing the session's grant failed")


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
