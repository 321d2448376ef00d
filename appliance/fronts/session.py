"""The protocol-neutral session core every front uses (PostgreSQL, SSH, Kubernetes).

What each front does around its protocol is the same: count a new connection against the
admission caps, find who is asking (kernel attestation + token) and open the grant (the
credential lease), write ``session_start`` / ``request`` / ``session_end`` rows (in strict audit
mode a request's start record first, durable before it runs), hold a request for an operator
and withdraw it when the bot gives up, end the session when the daemon says its lease or token
ran out, and drain on SIGTERM. That lives here once; a front keeps only what its protocol needs
(codec wiring, where requests are cut out of the stream, the protocol-native refusal, masking).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Coroutine, Iterable, Mapping

from appliance.policy.types import Verdict

from .admission import Admission, Ticket
from .services import AuthRefused, ConnectionContext, FrontServices, HoldOutcome, SessionGrant

log = logging.getLogger(__name__)


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_session_id() -> str:
    return os.urandom(16).hex()


# Request ids: unique, not secret (only root reads them). A random per-process prefix and a
# counter cost no system call per statement, unlike 16 fresh random bytes.
_REQUEST_PREFIX = os.urandom(8).hex()
_request_seq = itertools.count(1)


def new_request_id() -> str:
    return f"{_REQUEST_PREFIX}{next(_request_seq):016x}"


def format_addr(a: Any) -> str | None:
    """A socket address as the audit store keeps it ("host:port")."""
    if isinstance(a, tuple) and len(a) >= 2:
        return f"{a[0]}:{a[1]}"
    return str(a) if a else None


async def attribution(services: Any, transport) -> Any:
    """The kernel-attested origin of this socket, from the daemon's probes (None without them).
    ``services.attribute`` may be a plain or an async function."""
    attribute = getattr(services, "attribute", None)
    sock = transport.get_extra_info("socket")
    if attribute is None or sock is None:
        return None
    try:
        found = attribute(sock)
        return await found if inspect.isawaitable(found) else found
    except Exception:  # no attribution: identities that need it refuse the session
        log.exception("attribution lookup failed")
        return None


# A session's recording stops at this many bytes unless the services say otherwise
# ([audit] recording_max_bytes).
_HELD_INPUT_POLL_S = 0.05  # a bot's input held for the audit store is looked at again this often
DEFAULT_RECORDING_MAX_BYTES = 16 * 1024 * 1024
# A PostgreSQL result's rows are recorded up to this many bytes, the rest counted
# ([audit] recording_result_bytes; 0: no limit per result).
DEFAULT_RECORDING_RESULT_BYTES = 1024 * 1024

# Audit hook failures are logged once per kind (the runtime counts every one).
_AUDIT_FAILURE_LOGGED: set[str] = set()


class SessionCore:
    """What one session of any protocol does around its protocol, owned by the front's session.

    The front keeps its own I/O and hot path; it calls this for: the admission ticket
    (:meth:`admit`, released once credentials are presented and at the end), the identity and
    grant (:meth:`open`, :meth:`refuse`), the outcome, audit rows (:meth:`audit`, strict mode's
    :meth:`record_start`), holds for approval and their withdrawal (:meth:`hold`,
    :meth:`withdraw_hold`) and the end (:meth:`end`: ``session_end``, grant released).
    ``terminate(code, message)`` is how the daemon ends the session when its lease or token runs
    out (``code`` is a PostgreSQL SQLSTATE; other protocols use only the message).
    """

    __slots__ = ("services", "target", "protocol", "target_addr", "session_id", "grant", "outcome", "end_error",
                 "durable", "audit_room", "refuse_now", "_issue_seq", "_spawn", "_terminate", "_ticket", "_hold_wait", "_withdrawn", "_ended",
                 "_record_seq", "recording_full", "_record_left", "_record_cap", "recording_result_cap")

    def __init__(self, services: FrontServices, *, target: str, protocol: str, target_addr: str,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task],
                 terminate: Callable[[str, str], None]):
        self.services = services
        self.target = target
        self.protocol = protocol        # as the audit store names it
        self.target_addr = target_addr  # "host:port" for session_start
        self.session_id: str | None = None
        self.grant: SessionGrant | None = None
        self.outcome = "ok"
        self.end_error: str | None = None
        # audit.mode = "strict": services.audit_durable(kind, record, verdict) -> future | None.
        self.durable: Callable[..., Any] | None = getattr(services, "audit_durable", None)
        # Pacing and the checks before a request decided earlier runs (services.audit_room() ->
        # Future | None, services.refuse_now(grant) -> Verdict | None); None where not offered.
        self.audit_room: Callable[[], Any] | None = getattr(services, "audit_room", None)
        self.refuse_now: Callable[[Any], Any] | None = getattr(services, "refuse_now", None)
        self._issue_seq: Callable[[str, str], int | None] | None = getattr(services, "issue_seq", None)
        self._spawn = spawn
        self._terminate = terminate
        self._ticket: Ticket | None = None
        self._hold_wait: asyncio.Future | None = None
        self._withdrawn = False
        self._ended = False
        self._record_seq = 0
        # What the recording keeps (set at open from services.recording_policy(target)): the
        # session's bytes ("full") or only its events ("metadata"), how many bytes at most, and
        # how many bytes of one result's rows (a protocol's recorder applies it; 0: no limit).
        self.recording_full = True
        self._record_left = self._record_cap = DEFAULT_RECORDING_MAX_BYTES
        self.recording_result_cap = DEFAULT_RECORDING_RESULT_BYTES

    # ------------------------------------------------------------------ admission
    def admit(self, admission: Admission | None, sock: Any, on_closed: Callable[[str], None],
              listener: str) -> bool:
        """Count this connection against the daemon's caps on unauthenticated connections
        (appliance/fronts/admission.py). False: beyond them; the front refuses it its own way."""
        if admission is None:
            return True
        self._ticket = admission.admit(sock, on_closed, listener=listener)
        return self._ticket is not None

    def refused_before_login(self, why: str, listener: str) -> None:
        """Garbage, impossible lengths or silence before login: no session exists to carry a row,
        so the refusal is a probe event (rate-limited per peer by the admission)."""
        if self._ticket is not None and self.grant is None:
            self._ticket.refused(why, listener)

    def credentials_presented(self) -> None:
        """The identity checks bound the connection from here on, not the admission caps."""
        if self._ticket is not None:
            self._ticket.release()

    # ------------------------------------------------------------------ identity and grant
    async def open(self, ctx: ConnectionContext, user: str, token: str | None) -> SessionGrant:
        """Identity (token + attestation) and the session's credential. A refusal is recorded
        (:meth:`refuse`) and raised as AuthRefused; the front answers it in its protocol and sets
        the outcome."""
        try:
            grant = await self.services.open_session(self.target, ctx, user, token)
        except AuthRefused as e:
            self.refuse(ctx, e.audit_fields)
            raise
        self.grant = grant
        self.session_id = grant.session_id
        policy = getattr(self.services, "recording_policy", None)
        if policy is not None:
            self.recording_full, self._record_cap, self.recording_result_cap = policy(self.target)
            self._record_left = self._record_cap
        register = getattr(self.services, "register_terminate", None)
        if register is not None:  # the daemon ends sessions whose lease or token ran out
            register(grant.session_id, self._terminate)
        self.session_start(ctx, grant)
        return grant

    def refuse(self, ctx: ConnectionContext, audit_fields: Mapping[str, Any] | None = None) -> None:
        """A session refused before it had a grant: its own id and its session_start row (with the
        refusal's facts, e.g. the subject of a valid token from the wrong process; never a token)."""
        self.session_id = new_session_id()
        self.session_start(ctx, None, audit_fields)

    def session_start(self, ctx: ConnectionContext, grant: SessionGrant | None,
                      refused_fields: Mapping[str, Any] | None = None) -> None:
        rec: dict[str, Any] = {
            "session_id": self.session_id, "ts": now(), "target": self.target, "protocol": self.protocol,
            "client_addr": format_addr(ctx.client_addr), "target_addr": self.target_addr, "tls": ctx.tls,
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
        self.audit("session_start", rec)

    def set_outcome(self, outcome: str, error: str | None) -> None:
        """How the session ended, for session_end: the first cause wins."""
        if self.outcome == "ok":
            self.outcome = outcome
            self.end_error = error

    def upstream_failed(self, stage: str) -> None:
        note = getattr(self.services, "upstream_connect_failed", None)  # the daemon counts it (/metrics)
        if note is not None:
            note(self.target, stage)

    # ------------------------------------------------------------------ audit
    def issue_seq(self, request_id: str) -> int | None:
        """Number a completed request now, before its answer reaches the bot, when its record
        is submitted only after (the ``seq`` goes into that record). None: services that number
        records as they come."""
        issue = self._issue_seq
        return issue(self.session_id, request_id) if issue is not None else None

    def audit(self, kind: str, record: Mapping[str, Any]) -> None:
        try:
            self.services.audit(kind, record)
        except Exception:
            # Counted (and logged once) by the runtime; in strict mode the request itself was
            # refused before it ran. Here only once per kind, for services without that count.
            if kind not in _AUDIT_FAILURE_LOGGED:
                _AUDIT_FAILURE_LOGGED.add(kind)
                log.exception("audit hook failed for %s", kind)

    @property
    def recording_left(self) -> int:
        """Bytes the recording still takes (0: it stopped at the cap, or records metadata only)."""
        return self._record_left if self.recording_full else 0

    def record(self, direction: str, data: bytes, ts: datetime | None = None) -> None:
        """One chunk of the session's recording, as the bot saw it (after masking): ``direction``
        "in" (bot to target), "out" (target to bot) or "event" (a JSON document: terminal size,
        resize, exec command...). A ``recordings`` row in the session's chain; ``ts`` when the
        chunk began (default: now).

        A target with ``record = "metadata"`` keeps only the events. Every row counts against the
        session's ``[audit] recording_max_bytes``: the chunk that reaches it is cut there and
        followed by a ``{"type": "truncated"}`` event; nothing is recorded after it."""
        if self.session_id is None or not data:
            return
        if direction != "event" and not self.recording_full:
            return
        left = self._record_left
        if left <= 0:
            return
        cut = len(data) > left
        if cut:
            data = data[:left] if direction != "event" else b""
        self._record_left = left - len(data)
        if data:
            self._record_seq += 1
            self.audit("recording", {"session_id": self.session_id, "seq": self._record_seq, "ts": ts or now(),
                                     "direction": direction, "data": data})
        if cut:
            self._record_left = 0
            self._record_seq += 1
            self.audit("recording", {"session_id": self.session_id, "seq": self._record_seq, "ts": now(),
                                     "direction": "event", "data": json.dumps({
                                         "type": "truncated", "reason": "recording_max_bytes",
                                         "max_bytes": self._record_cap}).encode()})

    async def input_may_go_on(self, closing: Callable[[], bool]) -> bool:
        """Before what a bot sends into a running command reaches it (an SSH shell's or command's
        stdin, a Kubernetes exec's stream: each keystroke a request in all but name): wait while
        the audit store is past its pace mark (``services.audit_room``), and hold it while the
        store cannot take records (past its high water) or the token expired under
        ``oidc.on_expiry = "recheck"`` (``services.refuse_now``; the bot's flow-control window
        fills meanwhile). Where the store is gone or the token expired the runtime ends the
        session meanwhile. False once ``closing()`` says it has ended."""
        if self.audit_room is not None:
            wait = self.audit_room()
            if wait is not None:
                await wait
        refuse_now = self.refuse_now
        if refuse_now is None:
            return True
        while refuse_now(self.grant) is not None:
            await asyncio.sleep(_HELD_INPUT_POLL_S)
            if closing():
                return False
        return True

    def record_start(self, record: Mapping[str, Any] | Callable[[], Mapping[str, Any]], verdict: Verdict) -> Any:
        """audit.mode = "strict": submit the request's start record to be durable before the
        request runs. A future to wait on, or None (batched mode: no wait). Raises when the
        store refuses the record; the front then refuses the request (fail closed). ``record``
        may be a function that builds it, called only when the record is submitted."""
        if self.durable is None:
            return None
        return self.durable("request_start", record, verdict)

    # ------------------------------------------------------------------ holds
    async def hold(self, text: str, verdict: Verdict, notify: Callable[[str], None], request_id: str, *,
                   withdrawn: str = "the held request was withdrawn before anyone decided",
                   detail: Mapping[str, Any] | None = None) -> HoldOutcome:
        """Wait for an operator's decision on a request. ``notify(approval_id)`` runs on the event
        loop's thread (the broker may call it from another). Ends as withdrawn when the bot
        withdrew it (:meth:`withdraw_hold`; ``withdrawn`` is the outcome's reason); a broker failure
        denies. ``detail``: the protocol's facts the approval shows (Kubernetes: verb, resource...).
        Cancelling the caller's
        task (the bot hung up) cancels the hold, which the broker records as abandoned."""
        loop = asyncio.get_running_loop()
        thread = threading.get_ident()

        def on_loop(approval_id: str) -> None:
            if threading.get_ident() == thread:
                notify(approval_id)
            else:
                loop.call_soon_threadsafe(notify, approval_id)

        self._withdrawn = False
        self._hold_wait = asyncio.ensure_future(self.services.hold(
            self.grant, self.target, text, verdict, on_loop, request_id=request_id,
            **({"detail": detail} if detail else {})))
        try:
            return await self._hold_wait
        except asyncio.CancelledError:
            if self._ended or not self._withdrawn:
                raise
            return HoldOutcome(False, "", withdrawn, None, "withdrawn")
        except Exception as e:
            log.exception("approval hold failed; request denied")
            return HoldOutcome(False, "", f"the approval could not be held ({type(e).__name__})")

    def withdraw_hold(self, reason: str = "the client withdrew the request while it was held") -> bool:
        """The bot gave up on its held request (e.g. a CancelRequest): withdraw it (``reason`` is
        what the approval's record says). False: no hold is waiting."""
        wait = self._hold_wait
        if self._ended or wait is None or wait.done():
            return False
        wait.cancel(msg=reason)
        self._withdrawn = True
        return True

    # ------------------------------------------------------------------ end
    def end(self, bytes_in: int, bytes_out: int) -> None:
        """The session is over: its session_end row, its admission ticket and its grant released
        (the lease revoked, in a task). Once."""
        if self._ended:
            return
        self._ended = True
        if self._ticket is not None:
            self._ticket.release()
        if self.session_id is not None:
            self.audit("session_end", {
                "session_id": self.session_id, "ts": now(), "bytes_in": bytes_in, "bytes_out": bytes_out,
                "outcome": self.outcome, "error": self.end_error})
        if self.grant is not None:
            self._spawn(self._close_grant(self.grant), f"{self.protocol}-close-session")

    async def _close_grant(self, grant: SessionGrant) -> None:
        try:
            await self.services.close_session(grant)
        except Exception:
            log.exception("close_session failed for session %s", grant.session_id)


async def drain(server: Any, sessions: Iterable[Any], deadline: float, busy: Callable[[Any], bool],
                shutdown: Callable[[Any], None]) -> None:
    """A front's SIGTERM: stop listening; let requests in flight finish until ``deadline``
    (monotonic), then end every session (``shutdown``, with the protocol's own message)."""
    if server is not None:
        server.close()
    while any(busy(s) for s in list(sessions)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for s in list(sessions):
        shutdown(s)
    await asyncio.sleep(0)
