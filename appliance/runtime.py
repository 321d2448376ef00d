"""The daemon's runtime: everything built from one config, swapped whole on reload.

It is the ``services`` object every protocol front receives (contract: identity → the
session's credential → per-request decisions → holds → audit). A reload builds a new
Runtime; sessions already open keep the one they started with, so a policy change
applies to the next statement of new sessions and never half-way through a decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from appliance.approvals import ApprovalBroker, HoldOutcome
from appliance.config import Config, TargetConfig
from appliance.errors import BotwardenError
from appliance.fronts.services import AUDIT_RULE, AuthRefused, ConnectionContext, Credential, SessionGrant
from appliance.policy import SqlSessionState
from appliance.policy.types import ColumnDesc, MaskPlan, Verdict

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)


def _audit_gone(store: Any) -> str | None:
    """Why the audit store cannot take events at all (its process died, or it is closed), else
    None (it may only be behind)."""
    return "the audit store is closed" if store is None else store.unavailable


def open_audit_store(cfg: Config):
    """Open (create, migrate) the audit store in its own process (appliance.auditproc) and
    start its single writer. Blocking."""
    from appliance import daemon as daemon_module
    from appliance.auditproc import AuditProcess

    Path(cfg.audit.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = AuditProcess(cfg.audit.path, batch_max=cfg.audit.batch_max, flush_interval=cfg.audit.flush_interval,
                         queue_max=cfg.audit.queue_max, on_full=cfg.audit.on_full, nice=daemon_module.STARTING_NICE,
                         journal=("sync" if cfg.audit.journal_sync else True) if cfg.audit.mode == "strict" else False,
                         highwater=True, ack_timeout=cfg.audit.ack_timeout,
                         stream=dataclasses.asdict(cfg.audit.stream) if cfg.audit.stream else None,
                         log_format=cfg.logging.format, threads=cfg.audit.threads,
                         pace_mark=cfg.audit.pace_mark, pace_wait=cfg.audit.pace_wait,
                         fleet=dataclasses.asdict(cfg.fleet.lake()) if cfg.fleet else None)
    store.start()
    try:
        store.account_previous_crash()  # what a daemon that died left unrecorded, before anything new
    except BaseException:
        with contextlib.suppress(Exception):
            store.close()
        raise
    return store


def watched_cgroups(cfg: Config) -> tuple[str, ...]:
    """Every cgroup whose processes are bots: the bots' parent cgroup and any cgroup an identity
    names outside it (as /proc/<pid>/cgroup shows them)."""
    from appliance.identity.attestation import normalize_cgroup, required_cgroup

    found = [normalize_cgroup(cfg.probes.bots_cgroup)]
    for ident in cfg.identities:
        if ident.process is not None and ident.process.cgroup:
            found.append(required_cgroup(ident.process.cgroup, cfg.probes.bots_cgroup))
    return tuple(dict.fromkeys(p for p in found if p != "/"))


def _plain_read(verdict: Verdict) -> bool:
    """A statement the policy allows as it is and that only reads: every statement of it a
    SELECT without functions, locks, INTO or writes (a function may have side effects)."""
    if verdict.action != "allow" or not verdict.details:
        return False
    for d in verdict.details:
        if (getattr(d, "kind", None) != "SELECT" or d.error is not None or d.writes or d.functions
                or d.properties - {"prepared"}):
            return False
    return True


def _failed(why: str) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(BotwardenError(why))
    return fut


class SessionNotLive(BotwardenError):
    """An operator asked to end a session that is not (or not yet) live."""


@dataclass
class LiveSession:
    grant: SessionGrant
    target: str
    ctx: ConnectionContext
    started: datetime
    credential_handle: Any = None
    broker: Any = None  # the SecretsBroker that issued the credential (releases it)
    ended: datetime | None = None
    state: str = "active"
    watcher: asyncio.Task | None = None
    terminate: Callable[[str, str], None] | None = None
    sql_state: SqlSessionState = field(default_factory=SqlSessionState)
    expiry: Any = None  # appliance.identity.SessionExpiry when the session rests on a token
    # The kernel-attested process (appliance.identity.ProcessFacts: pid is the process id), None
    # when the connection was not redirected by the probes.
    facts: Any = field(init=False, default=None)
    requests: int = 0          # requests numbered so far: the last one's `seq`
    mark: int | None = None    # its slot in the daemon's high-water file
    marked: int = 0            # the highest seq written there
    pending_starts: dict = field(default_factory=dict)  # request_id -> seq of a request_start not completed yet
    # The last statement decided for this session (text as sent, shown redacted), when (epoch
    # seconds), and whether its request record has not come yet (still running or held).
    current: str | None = None
    current_since: float | None = None
    current_running: bool = False
    # appliance.workers > 1: the worker process that serves the session (it numbers its requests).
    worker: int | None = None

    def __post_init__(self) -> None:
        from appliance.identity import ProcessFacts

        self.facts = ProcessFacts.from_attribution(self.ctx.attribution)

    @property
    def client(self) -> str | None:
        return "%s:%s" % tuple(self.ctx.client_addr[:2]) if self.ctx.client_addr else None

    @property
    def session_id(self) -> str:
        return self.grant.session_id

    def public(self) -> dict[str, Any]:
        facts = self.facts
        return {
            "session_id": self.grant.session_id, "identity": self.grant.identity, "target": self.target,
            "subject": self.grant.subject, "credential_user": self.grant.credential.username,
            "lease_id": self.grant.credential.lease_id, "client": self.client,
            "pid": getattr(facts, "pid", None), "uid": getattr(facts, "uid", None),
            "exe": getattr(facts, "exe_path", None), "cgroup": getattr(facts, "cgroup_path", None),
            "started": self.started.isoformat(), "ended": self.ended.isoformat() if self.ended else None,
            "state": self.state, "worker": self.worker,
        }


class Runtime:
    """Policy, identity, secrets and approvals for one config generation."""

    def __init__(self, cfg: Config, daemon: "Daemon"):
        self.config = cfg
        self.daemon = daemon
        self.engine: Any = None
        self.identity: Any = None
        self.secrets: Any = None
        self._owns_secrets = True
        self.approvals = ApprovalBroker(timeout_s=cfg.approvals.timeout_s, required=cfg.approvals.approvers_required,
                                        audit=self.audit, webhook_url=cfg.approvals.webhook_url,
                                        bots_cgroups=watched_cgroups(cfg))
        # Shared across generations so `sessions` sees every open session.
        self.live: dict[str, LiveSession] = {}
        self._refused_events = 0
        self._refused_logged_at = -1e9
        self.audit_record_failures: dict[str, int] = {}  # kind -> records that could not be submitted
        self._record_failures_logged: set[tuple[str, str]] = set()
        self._crashed: set[str] = set()  # sessions the last run left open, closed as crashed at this start
        self.recent: list[LiveSession] = []
        self._redactor: Any = None

    @classmethod
    async def create(cls, cfg: Config, daemon: "Daemon") -> "Runtime":
        rt = cls(cfg, daemon)
        previous: Runtime | None = getattr(daemon, "runtime", None)
        await asyncio.to_thread(rt._build_blocking, previous)
        if rt._owns_secrets and cfg.vault is not None:
            await rt.secrets.start()
        if previous is not None:
            rt.live = previous.live
            rt.recent = previous.recent
            rt.approvals.adopt_windows(previous.approvals)
        return rt

    def _build_blocking(self, previous: "Runtime | None") -> None:
        """Everything that reads files at build time (runs in a thread)."""
        from appliance.identity import IdentityService, OIDCValidator
        from appliance.secrets import SecretsBroker

        cfg = self.config
        self._build_engine()
        # The OIDC validator (its JWKS cache) and the secrets broker (its Vault token, leases) live
        # on across reloads unless their own settings changed.
        same_oidc = previous is not None and previous.config.oidc == cfg.oidc
        validator = previous.identity.validator if same_oidc else (OIDCValidator(cfg.oidc) if cfg.oidc else None)
        self.identity = IdentityService(cfg, validator)
        if previous is not None and previous.config.vault == cfg.vault:
            self.secrets = previous.secrets
            self._owns_secrets = False
        else:
            # Without [vault] the broker serves only static credentials (password files).
            self.secrets = SecretsBroker(cfg.vault, ledger=getattr(self.daemon, "leases", None),  # type: ignore[arg-type]
                                         on_revoked_late=self._revoked_late)
            self._owns_secrets = True

    def _build_engine(self) -> None:
        """The policy engine (reads the masking salt file: call it in a thread)."""
        from appliance.policy import PolicyEngine

        cfg = self.config
        salt = b""
        if cfg.policy.masking.salt_file:
            try:
                salt = Path(cfg.policy.masking.salt_file).read_bytes().strip()
            except OSError as e:
                raise BotwardenError(f"masking.salt_file: cannot read {cfg.policy.masking.salt_file}: "
                                     f"{e.strerror}") from None
        self.engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities, salt=salt)

    async def started(self) -> None:
        """Called once, when the daemon serves: approvals an unclean stop (kill -9) left
        undecided in the audit store are recorded as ``cancelled_restart``."""
        store = self.daemon.audit
        if store is None:
            return
        try:
            await asyncio.to_thread(self.approvals.record_orphans, store.query)
        except Exception:  # the sweep failing must not keep the daemon from serving
            log.exception("could not check the audit store for approvals left undecided by the last stop")
        self.daemon.spawn(self._sweep_unclean_stop(), "sweep-unclean-stop")

    async def _sweep_unclean_stop(self) -> None:
        """After kill -9, a crash or a power loss: revoke the credential leases the last run left
        behind (the lease ledger, plus the leases of sessions the audit store shows as still open)
        and close those sessions' rows (outcome ``crashed``)."""
        store = self.daemon.audit
        started = self.daemon.state.started_at
        # Sessions still open, and those the audit process just closed from its high-water marks.
        closed = list(getattr(store, "crash_closed", None) or ())
        try:
            _, rows = await asyncio.to_thread(
                store.query, "SELECT session_id, lease_id FROM sessions WHERE (outcome = 'open' AND started_at < ?) "
                             "OR list_contains(?, session_id) ORDER BY started_at", [started, closed])
        except Exception:
            log.exception("could not look for sessions the last stop left open")
            rows = []
        open_sessions = [(sid, lease) for sid, lease in rows if sid not in self.live]
        session_of = {lease: sid for sid, lease in open_sessions if lease}
        # The ledger as the daemon found it at start: leases of sessions this run opens are not in it.
        orphans = dict.fromkeys([*getattr(self.daemon, "leases_at_start", ()), *session_of])
        results: dict[str, str | None] = {}
        if orphans and self.config.vault is not None:
            results = await self.secrets.revoke_orphans(list(orphans), session_of)
            log.warning("%d credential lease(s) left by the last run: %d revoked, %d pending", len(orphans),
                        sum(1 for r in results.values() if r is None), sum(1 for r in results.values() if r))
        for sid, lease in open_sessions:
            error = ("botwarden stopped without ending this session (killed, crashed or power loss); "
                     "closed at the next start")
            if lease and lease in results:
                why = results[lease]
                error += ("; its credential lease was revoked then" if why is None else
                          f"; revoking its credential lease failed ({why}), botwarden retries")
            self.audit("session_end", {"session_id": sid, "ts": datetime.now(timezone.utc), "outcome": "crashed",
                                       "error": error})
            self._crashed.add(sid)
        if open_sessions:
            log.warning("%d session(s) the last run left open closed as crashed", len(open_sessions))

    def _revoked_late(self, pending: Any) -> None:
        """A lease Vault could not revoke at session end (or at the sweep) is revoked at last: the
        session's row says so (its outcome stays ``revoke_failed``)."""
        if pending.session_id is None:
            return
        late = (datetime.now(timezone.utc) - pending.since).total_seconds()
        crashed = pending.session_id in self._crashed
        self.audit("session_end", {
            "session_id": pending.session_id, "ts": datetime.now(timezone.utc),
            "outcome": "crashed" if crashed else "revoke_failed",
            "error": ("botwarden stopped without ending this session; " if crashed else "") +
                     f"the credential lease was not revoked when the session ended ({pending.first_error}); "
                     f"revoked {late:.0f}s later, at attempt {pending.attempts}"})

    async def stopping(self, reason: str = "botwarden is shutting down (restart or stop)") -> None:
        """Before the fronts drain: deny every held request, so each bot still connected is
        told why (and nothing waits for a decision that can no longer come)."""
        await self.approvals.shutdown(reason)

    async def retire(self) -> None:
        """An old generation after a reload. Its secrets broker, if the new generation does not
        share it, closes once the sessions it issued credentials to have ended."""
        if not self._owns_secrets or self.daemon.runtime.secrets is self.secrets:
            return
        while any(s.broker is self.secrets for s in self.live.values()):
            await asyncio.sleep(1)
        await self.secrets.close()

    async def close(self) -> None:
        await self.approvals.shutdown("botwarden is shutting down (restart or stop)")
        brokers = {id(s.broker): s.broker for s in self.live.values() if s.broker is not None}
        brokers[id(self.secrets)] = self.secrets
        for broker in brokers.values():
            await broker.close()

    # -- FrontServices ---------------------------------------------------------------

    async def attribute(self, sock: Any) -> Any:
        """The probes' record of who opened this accepted connection (None: not redirected)."""
        handle = self.daemon.probes
        if handle is None:
            return None
        if handle.path == "ebpf":
            return handle.lookup(sock)  # a map read and a /proc check: tens of microseconds
        # nftables: sock_diag plus a scan of the bots' open files, milliseconds: off the loop. On a
        # duplicate, so a close meanwhile cannot hand the fd number to another connection.
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            return await asyncio.to_thread(handle.lookup, dup)
        finally:
            dup.close()

    def audit(self, kind: str, record: Mapping[str, Any]) -> None:
        # No sensitive value reaches the audit store: the audit process redacts request records
        # (constants and parameters a content detector flags; a masked statement's parameters
        # whole) with the detector settings this runtime sent it (set_redaction).
        metrics = getattr(self.daemon, "metrics", None)
        if metrics is not None:
            metrics.observe(kind, record)
        store = self.daemon.audit
        if store is None:
            log.error("audit store is closed; %s event not recorded", kind)
            return
        ended = None
        if kind == "request" or kind == "session_end":
            if kind == "request":
                live = self.live.get(record.get("session_id"))
                if live is not None:
                    live.current_running = False
            record, ended = self._count(store, kind, record)
        try:
            submitted = store.submit(kind, record)
        except Exception as e:
            self._record_failed(kind, e)
            raise
        finally:
            if ended is not None:  # freed once everything submitted so far, its session_end too, is committed
                store.release_mark(ended)
        if not submitted:
            self._refused(store, kind, 1)

    def _refused(self, store: Any, kind: str, n: int) -> None:
        # Under back-pressure this happens per event: one line per 10 s, with the count.
        self._refused_events += n
        now = time.monotonic()
        if now - self._refused_logged_at >= 10.0:
            log.error("audit store refused %d event(s) (last: %s; %s); statements are refused until it "
                      "recovers", self._refused_events, kind,
                      "store failing" if store.stats()["failing"] else "queue full")
            self._refused_events, self._refused_logged_at = 0, now

    def audit_relayed(self, frame: bytes, count: int, seqs: Mapping[str, int], ends: list[str],
                      decisions: Mapping[tuple[str, str], int], observed: list[tuple[str, dict]],
                      current: Mapping[str, tuple[str | None, float | None, bool]], paced: int = 0,
                      acks: list[tuple[int, int]] = ()) -> asyncio.Future | None:
        """A worker's records (appliance.worker.StoreLink): ``count`` rows it validated, pickled as
        the audit process takes them (handed on unopened), and what this process needs of them:
        each session's highest request seq, the sessions that ended, /metrics' counts, each
        session's current request, and how many of its requests waited for the store (pacing).
        ``acks``: the rows strict mode holds until they are journaled ((reply id, row index) each);
        then a future that resolves once the audit process journaled the frame, or fails if the
        store refused them (the frame's other rows are then submitted as any frame is)."""
        if paced and self.daemon.audit is not None:
            self.daemon.audit.count_paced(paced)
        metrics = getattr(self.daemon, "metrics", None)
        if metrics is not None:
            metrics.decisions.update(decisions)
            for kind, record in observed:
                metrics.observe(kind, record)
        live_sessions = self.live
        for session_id, (text, since, running) in current.items():
            live = live_sessions.get(session_id)
            if live is not None:
                if text is not None:
                    live.current, live.current_since = text, since
                live.current_running = running
        for session_id, seq in seqs.items():
            live = live_sessions.get(session_id)
            if live is not None and seq > live.requests:
                live.requests = seq
        store = self.daemon.audit
        if not count:
            return None
        if store is None:
            log.error("audit store is closed; %d event(s) of a worker not recorded", count)
            return _failed("the audit store is closed") if acks else None
        acked = None
        try:
            if acks:
                acked = store.submit_frame_acked(frame, count, len(acks), asyncio.get_running_loop())
            if acked is None:
                if acks:  # refused: the statements waiting for it are refused, the rest goes as ever
                    held = {i for _, i in acks}
                    rows = [r for i, r in enumerate(pickle.loads(frame)) if i not in held]
                    frame, count = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL), len(rows)
                    acked = _failed("the audit store cannot take the statement's record")
                submitted = store.submit_frame(frame, count) if count else True
            else:
                submitted = True
        except Exception as e:
            self._record_failed("worker frame", e)
            raise
        if not submitted:
            self._refused(store, "a worker's frame", count)
        for session_id in ends:  # after the frame that holds their session_end
            live = live_sessions.get(session_id)
            slot = self._end_mark(store.marks, live) if live is not None else None
            if slot is not None:
                store.release_mark(slot)
        return acked

    def _count(self, store: Any, kind: str, record: Mapping[str, Any]) -> tuple[Mapping[str, Any], int | None]:
        """Number a session's requests (1, 2, 3...: verify finds a lost one as a hole) and keep
        the daemon's high-water marks, so a crash's loss can be counted at the next start. With
        the record, the high-water slot a session_end ended, for the caller to release once the
        record is submitted."""
        live = self.live.get(record.get("session_id"))
        if live is None:
            return record, None
        marks = store.marks
        if live.worker is not None:
            return self._count_relayed(marks, kind, record, live)
        if kind == "request" or kind == "request_start":
            if kind == "request" and "seq" in record:
                return record, None  # numbered and marked by issue_seq before its answer reached the bot
            # A request's start (strict mode) and its completion share one seq.
            seq = live.pending_starts.pop(record.get("request_id"), None) if kind == "request" and live.pending_starts else None
            if seq is None:
                live.requests += 1
                seq = live.requests
                if kind == "request_start":  # marked once acknowledged (audit_durable): it runs only then
                    live.pending_starts[record.get("request_id")] = seq
                    return {**record, "seq": seq}, None
            self._mark(marks, live, seq)
            return {**record, "seq": seq}, None
        return {**record, "requests": live.requests}, self._end_mark(marks, live)

    @staticmethod
    def _end_mark(marks: Any, live: LiveSession) -> int | None:
        """A session's end: its high-water slot says so; the slot, to release once the record is
        submitted (it is freed when everything submitted by then is committed)."""
        slot = live.mark
        if marks is None or slot is None:
            return None
        marks.end(slot)
        live.mark = None
        return slot

    def _count_relayed(self, marks: Any, kind: str, record: Mapping[str, Any],
                       live: LiveSession) -> tuple[Mapping[str, Any], int | None]:
        """A worker's session (appliance.workers > 1): the worker numbered the record and wrote its
        high-water mark itself (analytics.highwater.SharedMarks) before the answer reached the bot;
        here ``live.requests`` counts what arrived (a dead worker's shortfall is the difference)."""
        if kind == "request" or kind == "request_start":
            live.requests = max(live.requests, record.get("seq") or 0)
        elif kind == "session_end":
            return record, self._end_mark(marks, live)
        return record, None

    def issue_seq(self, session_id: str, request_id: str) -> int | None:
        """Number a completed request and mark it issued now, before its answer goes to the bot
        (the record, submitted a moment later, carries the seq): a daemon killed in between
        leaves a mark that counts the lost record. None: not a live session, no numbering."""
        live = self.live.get(session_id)
        store = self.daemon.audit
        if live is None or store is None:
            return None
        seq = live.pending_starts.pop(request_id, None) if live.pending_starts else None
        if seq is None:
            live.requests += 1
            seq = live.requests
        self._mark(store.marks, live, seq)
        return seq

    @staticmethod
    def _mark(marks: Any, live: LiveSession, seq: int) -> None:
        if marks is not None and live.mark is not None and seq > live.marked:
            live.marked = seq
            marks.issue(live.mark, seq)

    def recording_policy(self, target: str) -> tuple[bool, int, int]:
        """What a session's recording keeps: (its bytes too, or only its events; at most how many
        bytes; at most how many bytes of one result's rows, 0: no limit). SessionCore asks once,
        when the session opens."""
        audit = self.config.audit
        return (audit.record_sessions and self.config.target(target).record == "full",
                audit.recording_max_bytes, audit.recording_result_bytes)

    def audit_durable(self, kind: str, record: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                      verdict: Verdict | None = None) -> Any:
        """audit.mode = "strict": submit ``record`` and return a future that resolves once the
        audit process has journaled it; the front forwards the request only then. None: no wait
        (batched mode, or a plain read with ``strict_reads = false``), nothing submitted. A refused
        record gives a future that fails (the front refuses the request). ``record`` may be a
        function that builds it: called only when it is submitted."""
        cfg = self.config.audit
        if cfg.mode != "strict" or (not cfg.strict_reads and verdict is not None and _plain_read(verdict)):
            return None
        if callable(record):
            record = record()
        loop = asyncio.get_running_loop()
        store = self.daemon.audit
        if store is not None:
            record, _ = self._count(store, kind, record)  # a request's start: no session_end
        try:
            fut = store.submit_acked(kind, record, loop) if store is not None else None
        except Exception as e:  # a record the store cannot take: the front refuses the request
            self._record_failed(kind, e)
            raise
        if fut is None:
            return _failed("the audit store cannot take the statement's record")
        live = self.live.get(record.get("session_id"))
        if live is not None and store.marks is not None:
            # The high-water mark counts a start once it is journaled: one never acknowledged was
            # never forwarded (its completion row, with the same seq, marks it then).
            seq = record["seq"]
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() is not None
                                  else self._mark(store.marks, live, seq))
        return fut

    async def open_session(self, target: str, ctx: ConnectionContext, user: str, token: str | None) -> SessionGrant:
        from appliance.identity import IdentityRefused
        from appliance.secrets import SecretUnavailable

        store = self.daemon.audit
        if store is None or not store.healthy:
            gone = _audit_gone(store)
            why = f"the audit store is unavailable ({gone})" if gone is not None else "the audit store cannot keep up"
            raise AuthRefused("57P03", f"botwarden refuses new sessions: {why}; no session runs unaudited, "
                                       "try again later")
        tcfg = self.config.target(target)
        try:
            auth = await self.identity.authenticate(tcfg, token, ctx.attribution)
        except IdentityRefused as e:
            raise AuthRefused(e.sqlstate, f"botwarden refused the connection: {e.message}",
                              audit_fields=e.audit_fields) from None
        ident = auth.identity
        if tcfg.credential is None:
            raise AuthRefused("28000", f"botwarden: target {target!r} has no credential source configured")
        session_id = uuid.uuid4().hex
        try:
            handle = await self.secrets.acquire(tcfg, session_id)
        except SecretUnavailable as e:
            raise AuthRefused("08004", f"botwarden could not get a credential for {target!r}: {e.message}") from None
        cred = Credential(handle.username, handle.password, handle.lease_id, handle.expires_at,
                          cert=getattr(handle, "cert", None), private_key=getattr(handle, "private_key", None))
        audit_fields = {**ident.audit_fields, **handle.audit_fields, "identity": ident.name,
                        "credential_user": handle.username, "lease_id": handle.lease_id}
        grant = SessionGrant(session_id=session_id, identity=ident.name, groups=tuple(ident.groups),
                             subject=ident.subject, credential=cred, audit_fields=audit_fields)
        live = LiveSession(grant, target, ctx, datetime.now(timezone.utc), handle, self.secrets,
                           expiry=auth.expiry)
        if store.marks is not None:
            live.mark = store.marks.claim(session_id)
        self.live[session_id] = live
        live.watcher = self.daemon.spawn(self._watch_session(live, auth.expiry), f"watch-{session_id[:8]}")
        return grant

    async def _watch_session(self, live: LiveSession, expiry: Any) -> None:
        """End a session whose credential lease ended (max TTL, revoked) or whose token expired."""
        waits = [asyncio.ensure_future(live.credential_handle.wait_ended())]
        if expiry is not None and expiry.policy == "end":
            waits.append(asyncio.ensure_future(expiry.wait()))
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            reason = next(iter(done)).result()
        finally:
            for w in waits:
                w.cancel()
        if live.session_id in self.live and live.terminate is not None:
            live.terminate("57P01", f"botwarden ended the session: {reason}")

    def upstream_connect_failed(self, target: str, stage: str) -> None:
        """A front could not reach its target (``stage``: "tcp" or "tls"): counted for /metrics."""
        metrics = getattr(self.daemon, "metrics", None)
        if metrics is not None:
            metrics.upstream_connect_failed(target, stage)

    def register_terminate(self, session_id: str, terminate: Callable[[str, str], None]) -> None:
        """A front tells the runtime how to end one of its sessions (lease or token expiry)."""
        live = self.live.get(session_id)
        if live is not None:
            live.terminate = terminate

    async def close_session(self, grant: SessionGrant) -> None:
        live = self.live.pop(grant.session_id, None)
        if live is None:
            return
        live.ended = datetime.now(timezone.utc)
        live.state = "ended"
        self.recent.append(live)
        del self.recent[:-200]
        if live.watcher is not None:
            live.watcher.cancel()
        if live.broker is not None and live.credential_handle is not None:
            try:
                why = await live.broker.release(live.credential_handle)
            except BotwardenError as e:
                why = str(e)
            if why is not None:
                # The front wrote the session's end already; this row corrects its outcome: a
                # database user outlives the session until a retry revokes it (`status` lists it).
                log.error("session %s: could not revoke its credential lease: %s", grant.session_id, why)
                self.audit("session_end", {
                    "session_id": grant.session_id, "ts": datetime.now(timezone.utc), "outcome": "revoke_failed",
                    "error": f"the credential lease {live.credential_handle.lease_id} was not revoked at session "
                             f"end ({why}); botwarden retries with back-off"})

    def decide_sql(self, grant: SessionGrant, target: str, sql: str, phase: str, *,
                   probe: bool = False) -> Verdict:
        # Per-session SQL state (prepared statement names, search_path) lives with the session.
        live = self.live.get(grant.session_id)
        refused = self._refuse_before_deciding(live)
        if refused is not None:
            return refused
        if not probe:
            self._note_current(live, sql)
        state = live.sql_state if live is not None else None
        if probe and state is not None:
            state = state.copy()
        return self.engine.decide_sql(grant.identity, grant.groups, target, sql, session=state)

    def catalog_lookup(self, grant: SessionGrant, target: str) -> Any:
        """What the PostgreSQL front asks the catalog at login about views, functions, triggers
        and rules (policy/catalog.py)."""
        return self.engine.catalog_lookup(grant.identity, grant.groups, target)

    def learn_catalog(self, grant: SessionGrant, views: Mapping[Any, str | None],
                      functions: Mapping[tuple[str, str], Any], effects: Mapping[tuple[str, str], Any]) -> None:
        live = self.live.get(grant.session_id)
        if live is not None:
            self.engine.learn_catalog(live.sql_state, views, functions, effects)

    def decide_k8s(self, grant: SessionGrant, target: str, request: Any) -> Verdict:
        """One Kubernetes API request (an appliance.policy.K8sRequest), under the same audit and
        token-expiry checks as a statement."""
        live = self.live.get(grant.session_id)
        refused = self._refuse_before_deciding(live)
        if refused is not None:
            return refused
        self._note_current(live, request.describe())
        return self.engine.decide_k8s(grant.identity, grant.groups, target, request)

    def audit_room(self) -> asyncio.Future | None:
        """Pacing: while the audit store's backlog is past its pace mark, a future to wait on before
        the next request is decided (:meth:`AuditProcess.room`; in a worker, its store link's, from
        what the supervisor says); None: go on."""
        room = getattr(self.daemon.audit, "room", None)
        return None if room is None else room()

    def refuse_now(self, grant: SessionGrant) -> Verdict | None:
        """For a request decided earlier (an Execute of a statement prepared with Parse): the
        verdict that refuses it now, as :meth:`decide_sql` would refuse a new one (the audit store
        cannot take its record, the token expired), or None: it may run."""
        return self._refuse_before_deciding(self.live.get(grant.session_id))

    def _refuse_before_deciding(self, live: LiveSession | None) -> Verdict | None:
        """Nothing runs unaudited, nor on an expired token (oidc.on_expiry = "recheck"): the
        verdict that refuses the request, or None."""
        store = self.daemon.audit
        if store is None or not store.healthy:
            return self._audit_refusal(store, live)
        if live is not None and live.expiry is not None and live.expiry.policy == "recheck":
            expired = live.expiry.check()
            if expired is not None:  # refuse this request, then end the session
                if live.terminate is not None:
                    asyncio.get_running_loop().call_soon(live.terminate, "57P01", expired)
                return Verdict("block", None, expired)
        return None

    def decide_ssh(self, grant: SessionGrant, target: str, request: Any) -> Verdict:
        """An SSH request (exec, shell, subsystem...), decided like a statement: refused while the
        audit store cannot take its record, nor on an expired token."""
        live = self.live.get(grant.session_id)
        refused = self._refuse_before_deciding(live)
        if refused is not None:
            return refused
        self._note_current(live, request.command if request.command is not None else request.describe())
        return self.engine.decide_ssh(grant.identity, grant.groups, target, request)

    @staticmethod
    def _note_current(live: LiveSession | None, text: str) -> None:
        """The session's current request, as the sessions view shows it (any protocol)."""
        if live is not None:
            live.current, live.current_since, live.current_running = text, time.time(), True

    def name_statement(self, grant: SessionGrant, name: str, verdict: Verdict | None) -> None:
        live = self.live.get(grant.session_id)
        if live is not None:
            live.sql_state.name_statement(name, verdict.details if verdict is not None else None)

    def _audit_refusal(self, store: Any, live: LiveSession | None) -> Verdict:
        """Nothing runs unaudited: while the store cannot take events, statements are refused;
        once it is gone for good (its process died), the session ends too."""
        gone = _audit_gone(store)
        if gone is not None:
            if live is not None and live.terminate is not None:
                asyncio.get_running_loop().call_soon(
                    live.terminate, "57P03",
                    f"botwarden ended the session: the audit store is unavailable ({gone}); "
                    "no session runs unaudited")
            why = f"the audit store is unavailable ({gone})"
        else:
            why = "the audit store cannot keep up (its queue is nearly full)"
        return Verdict("block", AUDIT_RULE, f"{why}; no statement runs unaudited, try again later")

    def text_masker(self, grant: SessionGrant, target: str, verdict: Verdict) -> Any:
        """The detectors an SSH request's output is masked with (None: no mask rule matched it)."""
        return self.engine.text_masker(verdict)

    def mask_plan(self, grant: SessionGrant, target: str, verdict: Verdict,
                  columns: Sequence[ColumnDesc]) -> MaskPlan | None:
        return self.engine.mask_plan(grant.identity, grant.groups, target, verdict, columns)

    def message_masker(self, grant: SessionGrant, target: str, verdict: Verdict) -> Any:
        return self.engine.message_masker(verdict)

    async def hold(self, grant: SessionGrant, target: str, request_text: str, verdict: Verdict,
                   notify: Callable[[str], None], request_id: str | None = None,
                   detail: Mapping[str, Any] | None = None) -> HoldOutcome:
        live = self.live.get(grant.session_id)
        facts = live.facts if live else None
        try:
            excluded = frozenset(self.config.identity(grant.identity).operator_uids)
        except KeyError:
            excluded = frozenset()
        shape = self.engine.shape_of(request_text)
        process = {"pid": getattr(facts, "pid", None), "uid": getattr(facts, "uid", None),
                   "gid": getattr(facts, "gid", None), "exe": getattr(facts, "exe_path", None),
                   "comm": getattr(facts, "comm", None), "cgroup": getattr(facts, "cgroup_path", None),
                   "attribution": getattr(facts, "source", None) or "none",
                   "client": live.client if live else None}
        # The operator sees the statement as the audit keeps it: constants a detector flags masked.
        context = {"groups": list(grant.groups), "rule_description": self._rule_description(verdict.rule),
                   "policy_reason": verdict.reason}
        if verdict.row_limit is not None:  # the affected-rows guard held it: its numbers
            context.update(row_estimate=verdict.row_estimate, row_limit=verdict.row_limit)
        tcfg = self.config.target(target)
        if tcfg.protocol == "ssh":  # where the command runs: the session's login on the real host
            context["login"] = f"{grant.credential.username}@{tcfg.address}"
        if detail:  # the front's protocol facts (Kubernetes: verb, resource, namespace, name)
            context["detail"] = dict(detail)
        return await self.approvals.hold(
            session_id=grant.session_id, identity=grant.identity, target=target,
            protocol=tcfg.protocol, text=self.redacted(request_text), rule=verdict.rule,
            shape=shape, process=process, request_id=request_id, excluded_uids=excluded, notify=notify,
            context=context)

    def redacted(self, text: str) -> str:
        """``text`` as the audit store keeps it (appliance.policy.redact), for operators' eyes."""
        if self._redactor is None:
            from appliance.policy.redact import AuditRedactor

            self._redactor = AuditRedactor(self.engine.detector_settings)
        return self._redactor.text(text)

    def _rule_description(self, rule: str | None) -> str:
        for r in self.config.policy.rules:
            if r.name == rule:
                return r.description
        return ""

    # -- status ---------------------------------------------------------------------

    def sessions(self, active_only: bool = True) -> list[dict[str, Any]]:
        items = list(self.live.values())
        if not active_only:
            items = self.recent + items
        out = []
        protocols = {t.name: t.protocol for t in self.config.targets}
        for s in items:
            doc = s.public()
            doc["protocol"] = protocols.get(s.target)  # None: a target a reload has since removed
            if s.current is not None:
                doc["current"] = self.redacted(s.current)
                doc["current_since"] = datetime.fromtimestamp(s.current_since or 0, timezone.utc).isoformat()
                doc["current_running"] = s.current_running and s.state == "active"
            out.append(doc)
        return out

    def end_session(self, session_id: str, operator: str, operator_uid: int, reason: str = "") -> dict[str, Any]:
        """An operator ends a live session: the bot is told why (57P01, FATAL), the front closes it
        and its ``session_end`` row (outcome ``terminated``) names the operator."""
        live = self.live.get(session_id)
        if live is None:
            raise SessionNotLive(f"no live session {session_id!r} (ended, or never opened)")
        if live.terminate is None:
            raise SessionNotLive(f"session {session_id!r} is still starting; try again in a moment")
        why = f"ended by operator {operator} (uid {operator_uid})" + (f": {reason}" if reason else "")
        live.terminate("57P01", f"botwarden ended the session: {why}")
        return {"session_id": session_id, "state": "ending", "reason": why}

    def _record_failed(self, kind: str, error: BaseException) -> None:
        """An audit record that could not even be submitted (a malformed record is botwarden's bug):
        counted for `status`, logged once per kind and error type; the caller refuses the request."""
        key = (kind, type(error).__name__)
        self.audit_record_failures[key[0]] = self.audit_record_failures.get(key[0], 0) + 1
        if key not in self._record_failures_logged:
            self._record_failures_logged.add(key)
            log.error("audit %s record could not be submitted (%s: %s); its request is refused (logged once, "
                      "counted in status)", kind, type(error).__name__, error)

    def status(self) -> dict[str, Any]:
        brokers = {id(s.broker): s.broker for s in self.live.values() if s.broker is not None}
        if self.secrets is not None:
            brokers[id(self.secrets)] = self.secrets
        pending = [p for b in brokers.values() for p in b.pending_revocations()]
        return {"sessions_active": len(self.live), "approvals_pending": len(self.approvals.pending),
                "revocations_pending": pending, "audit_record_failures": dict(self.audit_record_failures)}
