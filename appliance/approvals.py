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
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from appliance.errors import BotwardenError

log = logging.getLogger(__name__)


class ApprovalError(BotwardenError):
    """An operator's decision could not be applied; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class HoldOutcome:
    approved: bool
    approval_id: str
    reason: str
    decided_by: str | None = None


@dataclass(frozen=True)
class Operator:
    name: str
    uid: int


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

    def public(self) -> dict[str, Any]:
        return {
            "approval_id": self.approval_id, "session_id": self.session_id, "identity": self.identity,
            "target": self.target, "protocol": self.protocol, "request": self.text, "rule": self.rule,
            "process": dict(self.process), "created": self.created.isoformat(),
            "expires": self.expires.isoformat(), "approvals": [o.name for o in self.approvals],
            "required": self.required,
        }


@dataclass(frozen=True)
class Window:
    identity: str
    target: str
    shape: str
    until: float  # monotonic
    granted_by: str
    approval_id: str


class ApprovalBroker:
    def __init__(self, *, timeout_s: float, required: int = 1, audit: Callable[[str, Mapping[str, Any]], None],
                 webhook_url: str | None = None, webhook_retries: int = 3):
        self.timeout_s = timeout_s
        self.required = max(1, required)
        self._audit = audit
        self.webhook_url = webhook_url
        self.webhook_retries = webhook_retries
        self.pending: dict[str, PendingApproval] = {}
        self.windows: list[Window] = []
        self._subscribers: set[asyncio.Queue] = set()
        self._closed = False

    # -- the front's side -------------------------------------------------------------

    async def hold(self, *, session_id: str, identity: str, target: str, protocol: str, text: str,
                   rule: str | None, shape: str, process: Mapping[str, Any] | None = None,
                   request_id: str | None = None, excluded_uids: frozenset[int] = frozenset(),
                   notify: Callable[[str], None] | None = None) -> HoldOutcome:
        """Hold one request until it is decided. Cancelling the awaiting task = abandoned."""
        approval_id = uuid.uuid4().hex[:12]
        if self._closed:
            return HoldOutcome(False, approval_id, "botwarden is shutting down; request not held")
        window = self._window_for(identity, target, shape)
        if window is not None:
            self._event("approved", approval_id, session_id=session_id, request_id=request_id, identity=identity,
                        target=target, rule=rule, operator=window.granted_by, waited_ms=0.0,
                        reason=f"within the approval window granted with {window.approval_id}")
            return HoldOutcome(True, approval_id, f"approved by window {window.approval_id}", window.granted_by)
        now = datetime.now(timezone.utc)
        item = PendingApproval(
            approval_id=approval_id, session_id=session_id, request_id=request_id, identity=identity,
            target=target, protocol=protocol, text=text, rule=rule, shape=shape, process=dict(process or {}),
            created=now, expires=now + timedelta(seconds=self.timeout_s), required=self.required,
            excluded_uids=excluded_uids, future=asyncio.get_running_loop().create_future())
        self.pending[approval_id] = item
        self._event("requested", approval_id, session_id=session_id, request_id=request_id, identity=identity,
                    target=target, rule=rule)
        self._publish({"event": "requested", "approval": item.public()})
        if notify is not None:
            notify(approval_id)
        if self.webhook_url:
            asyncio.get_running_loop().run_in_executor(None, self._post_webhook, item)
        started = time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), self.timeout_s)
        except asyncio.TimeoutError:
            outcome = HoldOutcome(False, approval_id, f"approval {approval_id} timed out after "
                                                      f"{self.timeout_s:g}s without a decision")
            self._finish(item, "expired", outcome, started, operator=None)
            return outcome
        except asyncio.CancelledError:
            if not item.future.done():
                outcome = HoldOutcome(False, approval_id, "the client disconnected while the request was held")
                self._finish(item, "abandoned", outcome, started, operator=None)
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
        if any(o.uid == operator.uid for o in item.approvals):
            raise ApprovalError(409, f"operator {operator.name} has already approved {approval_id}")
        item.approvals.append(operator)
        if window_s:
            item.window_s = max(item.window_s or 0, int(window_s))
        if len(item.approvals) < item.required:
            self._event("approved_partial", approval_id, session_id=item.session_id, identity=item.identity,
                        target=item.target, rule=item.rule, operator=operator.name, operator_uid=operator.uid,
                        reason=reason or None)
            self._publish({"event": "approved_partial", "approval": item.public()})
            return {"approval_id": approval_id, "state": "pending",
                    "approvals": len(item.approvals), "required": item.required}
        decided_by = ",".join(o.name for o in item.approvals)
        if item.window_s:
            self.windows.append(Window(item.identity, item.target, item.shape,
                                       time.monotonic() + item.window_s, decided_by, approval_id))
        outcome = HoldOutcome(True, approval_id, reason or "approved", decided_by)
        self._finish(item, "approved", outcome, None, operator=operator, reason=reason)
        return {"approval_id": approval_id, "state": "approved", "window_s": item.window_s}

    def deny(self, approval_id: str, operator: Operator, reason: str) -> dict[str, Any]:
        if not reason.strip():
            raise ApprovalError(400, "a denial needs a reason (the bot is told it)")
        item = self._get(approval_id)
        outcome = HoldOutcome(False, approval_id, f"denied by {operator.name}: {reason}", operator.name)
        self._finish(item, "denied", outcome, None, operator=operator, reason=reason)
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
        """Deny every pending request (recorded) and stop holding new ones."""
        self._closed = True
        for item in list(self.pending.values()):
            outcome = HoldOutcome(False, item.approval_id, f"{reason}; the held request was not run")
            self._finish(item, "cancelled_restart", outcome, None, operator=None, reason=reason)
        await asyncio.sleep(0)

    def adopt_windows(self, other: "ApprovalBroker") -> None:
        """On reload, approval windows and pending requests carry over to the new broker."""
        self.windows = [w for w in other.windows if w.until > time.monotonic()]
        self.pending = other.pending
        self._subscribers = other._subscribers

    # -- internals ----------------------------------------------------------------------

    def _get(self, approval_id: str) -> PendingApproval:
        item = self.pending.get(approval_id)
        if item is None or item.future.done():
            raise ApprovalError(404, f"no pending approval {approval_id!r} (decided, expired or withdrawn)")
        return item

    def _window_for(self, identity: str, target: str, shape: str) -> Window | None:
        now = time.monotonic()
        self.windows = [w for w in self.windows if w.until > now]
        for w in self.windows:
            if (w.identity, w.target, w.shape) == (identity, target, shape):
                return w
        return None

    def _finish(self, item: PendingApproval, event: str, outcome: HoldOutcome, started: float | None,
                operator: Operator | None, reason: str = "") -> None:
        waited = (datetime.now(timezone.utc) - item.created).total_seconds() * 1000
        self._event(event, item.approval_id, session_id=item.session_id, request_id=item.request_id,
                    identity=item.identity, target=item.target, rule=item.rule,
                    operator=operator.name if operator else None, operator_uid=operator.uid if operator else None,
                    reason=reason or outcome.reason, waited_ms=waited, window_s=item.window_s)
        self._publish({"event": event, "approval": item.public(), "reason": outcome.reason})
        if not item.future.done():
            item.future.set_result(outcome)
        self.pending.pop(item.approval_id, None)

    def _event(self, event: str, approval_id: str, **fields: Any) -> None:
        record = {"approval_id": approval_id, "ts": datetime.now(timezone.utc), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        self._audit("approval", record)

    def _publish(self, message: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(message)

    def _post_webhook(self, item: PendingApproval) -> None:
        """Slack-compatible incoming-webhook payload, without the request's text or values."""
        payload = {
            "text": (f":lock: botwarden approval {item.approval_id}: identity *{item.identity}* wants to run a "
                     f"request on *{item.target}* held by rule `{item.rule}`. Decide with "
                     f"`botwarden approvals approve {item.approval_id}` or `deny`. Expires {item.expires:%H:%M:%S}Z."),
            "botwarden": {"approval_id": item.approval_id, "identity": item.identity, "target": item.target,
                          "rule": item.rule, "expires": item.expires.isoformat()},
        }
        body = json.dumps(payload).encode()
        for attempt in range(1, self.webhook_retries + 1):
            try:
                req = urllib.request.Request(self.webhook_url, data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if 200 <= resp.status < 300:
                        self._event("notified", item.approval_id, session_id=item.session_id,
                                    identity=item.identity, target=item.target, rule=item.rule,
                                    reason=f"webhook HTTP {resp.status}")
                        return
            except OSError as e:
                log.warning("approval webhook attempt %d/%d failed: %s", attempt, self.webhook_retries,
                            type(e).__name__)
            time.sleep(min(2 ** attempt * 0.25, 4))
        self._event("notify_failed", item.approval_id, session_id=item.session_id, identity=item.identity,
                    target=item.target, rule=item.rule, reason=f"webhook failed {self.webhook_retries} times")
