"""Just-in-time approvals: a held request waits here until a human decides.

A protocol front that gets an ``approve`` verdict calls :meth:`ApprovalBroker.hold`; the
bot's connection waits on a future (no idle timeout runs meanwhile), other sessions go
on. Operators decide through the control API (CLI or TUI): approve once, approve for a
window (same identity, target and statement shape for N seconds), or deny with a reason.
Undecided requests are denied when they expire; a bot that hangs up withdraws its request
(abandoned); a daemon shutdown denies every pending request and records it. Every step is
an ``approval`` audit event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from appliance.errors import BotwardenError
from appliance.fronts.services import HoldOutcome

# Events that end an approval (any other event leaves it pending).
FINAL_EVENTS = ("approved", "denied", "expired", "abandoned", "cancelled_restart")
# Final decisions remembered (since the daemon started) to show an operator what was decided
# before on the same statement shape; each held request carries the last EARLIER_SHOWN of them.
HISTORY_KEEP = 2000
EARLIER_SHOWN = 5

log = logging.getLogger(__name__)


class ApprovalError(BotwardenError):
    """An operator's decision could not be applied; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Operator:
    name: str
    uid: int
    pid: int | None = None  # the caller's process (SO_PEERCRED): the self-approval rule looks at it


def _proc_cgroup(pid: int) -> str | None:
    """The cgroup2 path of a process as /proc/<pid>/cgroup names it ("0::/a/b"), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 4 after the command, which sits in parentheses and may itself contain ") ".
    try:
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (ValueError, IndexError):
        return None


def _ancestors(pid: int) -> list[int]:
    """pid's parent, grandparent, ... up to (excluding) pid 0."""
    out: list[int] = []
    seen = {pid}
    current: int | None = pid
    while current:
        current = _ppid(current)
        if not current or current in seen:
            break
        out.append(current)
        seen.add(current)
    return out


def _under(path: str, parent: str) -> bool:
    return parent != "/" and (path == parent or path.startswith(parent.rstrip("/") + "/"))


def caller_is_part_of_the_bot(item_process: Mapping[str, Any], caller_pid: int | None, caller_uid: int,
                              bots_cgroups: tuple[str, ...], *, check_uid: bool = True) -> str | None:
    """Why the process calling the control API counts as the bot whose request is held, or None.

    A bot may not decide its own held request (issue 26.2): the caller is refused when its uid is
    the held request's attested uid (``check_uid``), when it runs in a watched bots cgroup, or
    when it belongs to the requesting session's process tree (a descendant of the attested
    process, or one of its ancestors: the supervisor that started it). Reads /proc; a caller
    whose process cannot be inspected is refused (fail closed)."""
    attested_uid = item_process.get("uid")
    if check_uid and attested_uid is not None and caller_uid == attested_uid:
        return f"the caller's uid {caller_uid} is the uid of the process whose request is held"
    if caller_pid is None:  # an in-process caller (no control socket): nothing more to look at
        return None
    if caller_pid <= 0:  # SO_PEERCRED says 0 for a peer in a pid namespace it cannot map
        return "the caller's process cannot be identified (no pid from SO_PEERCRED)"
    cgroup = _proc_cgroup(caller_pid)
    if cgroup is None:
        return f"the caller's process {caller_pid} cannot be inspected (/proc/{caller_pid}/cgroup)"
    for bots in bots_cgroups:
        if _under(cgroup, bots):
            return f"the caller (pid {caller_pid}) runs in the bots cgroup {cgroup}"
    session_pid = item_process.get("pid")
    if session_pid:
        if caller_pid == session_pid or session_pid in _ancestors(caller_pid):
            return (f"the caller (pid {caller_pid}) belongs to the process tree of the session's process "
                    f"{session_pid}")
        if caller_pid in _ancestors(session_pid):
            return (f"the caller (pid {caller_pid}) started the session's process {session_pid} "
                    "(it is one of its ancestors)")
    return None


@dataclass
class PendingApproval:
    approval_id: str
    session_id: str
    request_id: str | None
    identity: str
    target: str
    protocol: str
    text: str  # as the audit stores it (masked by the caller)
    rule: str | None
    shape: str
    process: Mapping[str, Any]
    created: datetime
    expires: datetime
    required: int
    excluded_uids: frozenset[int]
    future: asyncio.Future = field(repr=False, default=None)  # type: ignore[assignment]
    approvals: list[Operator] = field(default_factory=list)
    window_s: int | None = None
    # What the operator needs beside the request (the runtime's: groups, the rule's description,
    # the policy's reason, an affected-rows estimate): shown as it is, never decides anything.
    context: Mapping[str, Any] = field(default_factory=dict)
    # Final decisions on the same target and statement shape before this one was held, newest first.
    earlier: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            **self.context,
            "approval_id": self.approval_id, "session_id": self.session_id, "request_id": self.request_id,
            "identity": self.identity, "target": self.target, "protocol": self.protocol, "request": self.text,
            "rule": self.rule, "process": dict(self.process), "created": self.created.isoformat(),
            "expires": self.expires.isoformat(), "approvals": [o.name for o in self.approvals],
            "required": self.required, "earlier": list(self.earlier),
        }


@dataclass(frozen=True)
class Window:
    identity: str
    target: str
    shape: str
    until: float  # monotonic
    granted_by: str
    approval_id: str
    window_s: int | None = None
    granted_uid: int | None = None  # the operator whose approval completed the grant


class ApprovalBroker:
    def __init__(self, *, timeout_s: float, required: int = 1, audit: Callable[[str, Mapping[str, Any]], None],
                 webhook_url: str | None = None, webhook_retries: int = 3, webhook_backoff_s: float = 0.5,
                 webhook_timeout_s: float = 5.0, bots_cgroups: tuple[str, ...] = ()):
        self.timeout_s = timeout_s
        # cgroup2 paths ("/botwarden.bots") whose processes are bots: they decide no request.
        self.bots_cgroups = bots_cgroups
        self.required = max(1, required)
        self._audit = audit
        self.webhook_url = webhook_url
        self.webhook_retries = max(1, webhook_retries)
        self.webhook_backoff_s = webhook_backoff_s
        self.webhook_timeout_s = webhook_timeout_s
        self.pending: dict[str, PendingApproval] = {}
        self.windows: list[Window] = []
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_KEEP)
        self._subscribers: set[asyncio.Queue] = set()
        self._webhooks: set[asyncio.Future] = set()
        self._stop = threading.Event()  # wakes webhook threads waiting to retry
        self._closed = False

    # -- the front's side -------------------------------------------------------------

    async def hold(self, *, session_id: str, identity: str, target: str, protocol: str, text: str,
                   rule: str | None, shape: str, process: Mapping[str, Any] | None = None,
                   request_id: str | None = None, excluded_uids: frozenset[int] = frozenset(),
                   notify: Callable[[str], None] | None = None,
                   context: Mapping[str, Any] | None = None) -> HoldOutcome:
        """Hold one request until it is decided. Cancelling the awaiting task = abandoned
        (the bot hung up, or withdrew the request: a ``task.cancel(msg)`` message becomes the
        recorded reason); the caller's connection has no idle timeout meanwhile."""
        approval_id = uuid.uuid4().hex[:12]
        ids = dict(session_id=session_id, request_id=request_id, identity=identity, target=target, rule=rule)
        if self._closed:
            reason = "botwarden is shutting down; the request was not held and did not run"
            self._event("requested", approval_id, **ids)
            self._event("cancelled_restart", approval_id, **ids, reason=reason, waited_ms=0.0)
            return HoldOutcome(False, approval_id, reason, None, "cancelled_restart")
        window = self._window_for(identity, target, shape)
        if window is not None:
            self._event("approved", approval_id, **ids, operator=window.granted_by,
                        operator_uid=window.granted_uid, waited_ms=0.0, window_s=window.window_s,
                        reason=f"within the approval window granted with {window.approval_id}")
            return HoldOutcome(True, approval_id, f"approved by the window granted with {window.approval_id}",
                               window.granted_by, "approved")
        now = datetime.now(timezone.utc)
        item = PendingApproval(
            approval_id=approval_id, session_id=session_id, request_id=request_id, identity=identity,
            target=target, protocol=protocol, text=text, rule=rule, shape=shape, process=dict(process or {}),
            created=now, expires=now + timedelta(seconds=self.timeout_s), required=self.required,
            excluded_uids=excluded_uids, future=asyncio.get_running_loop().create_future(),
            context=dict(context or {}), earlier=self._earlier(target, shape))
        self.pending[approval_id] = item
        self._event("requested", approval_id, **ids)
        watchers = self._publish({"event": "requested", "approval": item.public()})
        if watchers:
            self._event("notified", approval_id, **ids, reason=f"sent to {watchers} watcher(s) of the control API")
        if notify is not None:
            try:
                notify(approval_id)
            except Exception:  # the bot not hearing about the hold must not lose the request
                log.exception("approval %s: the front could not tell its client about the hold", approval_id)
        if self.webhook_url:
            hook = asyncio.get_running_loop().run_in_executor(None, self._post_webhook, item)
            self._webhooks.add(hook)
            hook.add_done_callback(self._webhooks.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), self.timeout_s)
        except asyncio.TimeoutError:
            if item.future.done():  # decided in the very last moment
                return item.future.result()
            outcome = HoldOutcome(False, approval_id, f"approval {approval_id} timed out after "
                                                      f"{self.timeout_s:g}s without a decision", None, "expired")
            self._finish(item, "expired", outcome, operator=None)
            return outcome
        except asyncio.CancelledError as e:
            if not item.future.done():
                why = e.args[0] if e.args and isinstance(e.args[0], str) else \
                    "the client disconnected while the request was held"
                outcome = HoldOutcome(False, approval_id, why, None, "abandoned")
                self._finish(item, "abandoned", outcome, operator=None)
            raise
        finally:
            self.pending.pop(approval_id, None)

    # -- the operators' side ----------------------------------------------------------

    def approve(self, approval_id: str, operator: Operator, *, window_s: int | None = None,
                reason: str = "") -> dict[str, Any]:
        item = self._get(approval_id)
        if operator.uid in item.excluded_uids:
            raise ApprovalError(403, f"operator {operator.name} is mapped to identity {item.identity!r} "
                                     "and may not approve its requests")
        self._refuse_the_bot(item, operator, "approve")
        if any(o.uid == operator.uid for o in item.approvals):
            raise ApprovalError(409, f"operator {operator.name} has already approved {approval_id}")
        item.approvals.append(operator)
        if window_s:
            item.window_s = max(item.window_s or 0, int(window_s))
        if len(item.approvals) < item.required:
            self._event("approved_partial", approval_id, session_id=item.session_id, request_id=item.request_id,
                        identity=item.identity,
                        target=item.target, rule=item.rule, operator=operator.name, operator_uid=operator.uid,
                        reason=reason or None)
            self._publish({"event": "approved_partial", "approval": item.public()})
            return {"approval_id": approval_id, "state": "pending",
                    "approvals": len(item.approvals), "required": item.required}
        decided_by = ",".join(o.name for o in item.approvals)
        if item.window_s:
            self.windows.append(Window(item.identity, item.target, item.shape,
                                       time.monotonic() + item.window_s, decided_by, approval_id, item.window_s,
                                       operator.uid))
        outcome = HoldOutcome(True, approval_id, reason or f"approved by {decided_by}", decided_by, "approved")
        self._finish(item, "approved", outcome, operator=operator, reason=reason)
        return {"approval_id": approval_id, "state": "approved", "window_s": item.window_s,
                "approvals": len(item.approvals), "required": item.required}

    def deny(self, approval_id: str, operator: Operator, reason: str) -> dict[str, Any]:
        if not reason.strip():
            raise ApprovalError(400, "a denial needs a reason (the bot is told it)")
        item = self._get(approval_id)
        # Saying no never runs anything, so an operator who shares the bot's uid may deny; a
        # process of the bot itself (its cgroup, its process tree) decides nothing.
        self._refuse_the_bot(item, operator, "deny", check_uid=False)
        outcome = HoldOutcome(False, approval_id, f"denied by {operator.name}: {reason}", operator.name, "denied")
        self._finish(item, "denied", outcome, operator=operator, reason=reason)
        return {"approval_id": approval_id, "state": "denied"}

    def list(self) -> list[dict[str, Any]]:
        return [p.public() for p in sorted(self.pending.values(), key=lambda p: p.created)]

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        for item in self.list():
            queue.put_nowait({"event": "pending", "approval": item})
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers.discard(queue)

    async def shutdown(self, reason: str = "botwarden is shutting down") -> None:
        """Deny every pending request (recorded as ``cancelled_restart``) and stop holding new
        ones. The daemon calls this before it drains its sessions, so each held bot is told why
        while its connection is still open."""
        self._closed = True
        self._stop.set()
        for item in list(self.pending.values()):
            if item.future.done():
                continue
            outcome = HoldOutcome(False, item.approval_id, f"{reason}; the held request was not run, send it "
                                                           "again once botwarden is back", None, "cancelled_restart")
            self._finish(item, "cancelled_restart", outcome, operator=None, reason=reason)
        await asyncio.sleep(0)
        for hook in list(self._webhooks):  # a webhook still retrying is not waited for
            hook.cancel()

    def record_orphans(self, query: Callable[..., tuple[list[str], list[tuple]]]) -> list[str]:
        """After an unclean stop (kill -9, power loss), approvals the audit store shows as
        requested with no final event were never decided: record them as ``cancelled_restart``
        so nothing is silently lost. Blocking (DuckDB): run it in a thread, at start-up."""
        finals = ", ".join(f"'{e}'" for e in FINAL_EVENTS)
        _, rows = query(
            "SELECT approval_id, any_value(session_id), any_value(request_id), any_value(identity), "
            "any_value(target), any_value(rule), min(ts) FILTER (WHERE event = 'requested') "
            "FROM approvals GROUP BY approval_id "
            f"HAVING bool_or(event = 'requested') AND NOT bool_or(event IN ({finals})) ORDER BY 7")
        recorded = []
        now = datetime.now(timezone.utc)
        for approval_id, session_id, request_id, identity, target, rule, requested in rows:
            if approval_id in self.pending:
                continue
            waited = (now - requested).total_seconds() * 1000 if isinstance(requested, datetime) else None
            self._event("cancelled_restart", approval_id, session_id=session_id, request_id=request_id,
                        identity=identity, target=target, rule=rule, waited_ms=waited,
                        reason="botwarden stopped without deciding it (the daemon did not shut down cleanly); "
                               "the held request was not run")
            recorded.append(approval_id)
        if recorded:
            log.warning("%d approval(s) left undecided by an unclean stop recorded as cancelled_restart",
                        len(recorded))
        return recorded

    def adopt_windows(self, other: "ApprovalBroker") -> None:
        """On reload, approval windows and pending requests carry over to the new broker."""
        # The same objects, not copies: sessions opened before the reload keep the old broker,
        # and a window granted through either broker must count for both.
        other.windows[:] = [w for w in other.windows if w.until > time.monotonic()]
        self.windows = other.windows
        self.history = other.history
        self.pending = other.pending
        self._subscribers = other._subscribers
        self._stop = other._stop

    # -- internals ----------------------------------------------------------------------

    def _get(self, approval_id: str) -> PendingApproval:
        item = self.pending.get(approval_id)
        if item is None or item.future.done():
            raise ApprovalError(404, f"no pending approval {approval_id!r} (decided, expired or withdrawn)")
        return item

    def _refuse_the_bot(self, item: PendingApproval, operator: Operator, action: str, *,
                        check_uid: bool = True) -> None:
        """403 (audited as ``decision_refused``) when the caller is the bot that asked."""
        why = caller_is_part_of_the_bot(item.process, operator.pid, operator.uid, self.bots_cgroups,
                                        check_uid=check_uid)
        if why is None:
            return
        message = f"{action} refused: {why}; a bot may not decide its own held request"
        self._event("decision_refused", item.approval_id, session_id=item.session_id, request_id=item.request_id,
                    identity=item.identity, target=item.target, rule=item.rule, operator=operator.name,
                    operator_uid=operator.uid, reason=message)
        log.warning("approval %s: %s (caller %s, pid %s)", item.approval_id, message, operator.name, operator.pid)
        raise ApprovalError(403, message)

    def _earlier(self, target: str, shape: str) -> list[dict[str, Any]]:
        found = []
        for h in reversed(self.history):
            if h["target"] == target and h["shape"] == shape:
                found.append({k: v for k, v in h.items() if k not in ("target", "shape")})
                if len(found) == EARLIER_SHOWN:
                    break
        return found

    def _window_for(self, identity: str, target: str, shape: str) -> Window | None:
        now = time.monotonic()
        self.windows[:] = [w for w in self.windows if w.until > now]  # in place: shared across reloads
        for w in self.windows:
            if (w.identity, w.target, w.shape) == (identity, target, shape):
                return w
        return None

    def _finish(self, item: PendingApproval, event: str, outcome: HoldOutcome,
                operator: Operator | None, reason: str = "") -> None:
        waited = (datetime.now(timezone.utc) - item.created).total_seconds() * 1000
        self._event(event, item.approval_id, session_id=item.session_id, request_id=item.request_id,
                    identity=item.identity, target=item.target, rule=item.rule,
                    operator=operator.name if operator else None, operator_uid=operator.uid if operator else None,
                    reason=reason or outcome.reason, waited_ms=waited, window_s=item.window_s)
        decided = datetime.now(timezone.utc).isoformat()
        self.history.append({"target": item.target, "shape": item.shape, "approval_id": item.approval_id,
                             "identity": item.identity, "event": event, "operator": outcome.decided_by,
                             "reason": reason or outcome.reason, "decided": decided,
                             "window_s": item.window_s if outcome.approved else None})
        # Watchers (the TUI's "recently decided" list) see who decided, when, any window, and
        # the reason as the audit row records it (the operator's own words, when given).
        self._publish({"event": event, "approval": item.public(), "reason": outcome.reason,
                       "recorded_reason": reason or outcome.reason, "operator": outcome.decided_by,
                       "window_s": item.window_s if outcome.approved else None,
                       "decided": decided})
        if not item.future.done():
            item.future.set_result(outcome)
        self.pending.pop(item.approval_id, None)

    def _event(self, event: str, approval_id: str, **fields: Any) -> None:
        record = {"approval_id": approval_id, "ts": datetime.now(timezone.utc), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        try:
            self._audit("approval", record)
        except Exception:  # an audit hook that fails is logged; the decision still stands
            log.exception("approval %s: the %s event could not be audited", approval_id, event)

    def _publish(self, message: dict[str, Any]) -> int:
        """Send to every watcher; the number that got it."""
        sent = 0
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
                sent += 1
            except asyncio.QueueFull:
                log.warning("an approvals watcher is not reading; it missed a %s event", message.get("event"))
        return sent

    def webhook_payload(self, item: PendingApproval) -> dict[str, Any]:
        """Slack-compatible incoming-webhook payload. It names who, where and which rule, never
        the request's text or values (they stay behind the control socket)."""
        summary = (f"botwarden approval {item.approval_id}: identity {item.identity} wants to run a request on "
                   f"{item.target}, held by rule {item.rule or '(default)'}. Expires {item.expires:%H:%M:%S} UTC.")
        return {
            "text": summary,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": (
                    f":lock: *botwarden approval* `{item.approval_id}`\nidentity *{item.identity}* wants to run "
                    f"a request on *{item.target}*, held by rule `{item.rule or '(default)'}`.")}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": (
                    f"decide with `botwarden approvals approve {item.approval_id}` or "
                    f"`botwarden approvals deny {item.approval_id} --reason ...`; expires "
                    f"{item.expires:%H:%M:%S} UTC")}]},
            ],
            "botwarden": {"approval_id": item.approval_id, "identity": item.identity, "target": item.target,
                          "rule": item.rule, "session_id": item.session_id, "expires": item.expires.isoformat()},
        }

    def _post_webhook(self, item: PendingApproval) -> None:
        """POST the payload, retrying with back-off; runs in a worker thread."""
        body = json.dumps(self.webhook_payload(item)).encode()
        ids = dict(session_id=item.session_id, request_id=item.request_id, identity=item.identity,
                   target=item.target, rule=item.rule)
        last, tried = "", 0
        while tried < self.webhook_retries:
            if tried and self._stop.wait(min(self.webhook_backoff_s * 2 ** (tried - 1), 8.0)):
                last += "; not retried: botwarden is stopping"
                break
            tried += 1
            try:
                req = urllib.request.Request(self.webhook_url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "botwarden-approvals"})
                with urllib.request.urlopen(req, timeout=self.webhook_timeout_s) as resp:
                    self._event("notified", item.approval_id, **ids,
                                reason=f"webhook answered HTTP {resp.status} (attempt {tried})")
                    return
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (OSError, ValueError) as e:  # refused, timeout, bad URL
                last = type(e).__name__
            # The URL may embed a token (Slack's do): it is never logged.
            log.warning("approval %s: webhook attempt %d/%d failed: %s", item.approval_id, tried,
                        self.webhook_retries, last)
        self._event("notify_failed", item.approval_id, **ids, reason=f"webhook failed {tried} time(s), last: {last}")
