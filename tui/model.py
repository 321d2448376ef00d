"""What the console knows, kept apart from widgets so it can be tested without a terminal.

Everything here is pure: the pending approvals as the watch stream describes them, the
decision an operator takes in the dialog, and the text of the status bar.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import quote

# Watch-stream events that end a held request (see appliance/approvals.py).
TERMINAL_EVENTS = frozenset({"approved", "denied", "expired", "abandoned", "cancelled_restart"})
# Events that carry a still-pending request (new, already pending at connect, or waiting for
# more operators under an N-of-M rule).
PENDING_EVENTS = frozenset({"pending", "requested", "approved_partial"})

MAX_WINDOW_MINUTES = 24 * 60  # a typo should not grant a week-long window


class ApprovalBook:
    """Pending held requests, kept current from ``/v1/approvals/watch`` events."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Any]] = {}

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Apply one stream event; True when the set of pending requests changed."""
        kind = event.get("event")
        if kind == "hello":
            # The daemon replays every pending request after hello, so start from empty.
            changed = bool(self._items)
            self._items.clear()
            return changed
        approval = event.get("approval")
        if not isinstance(approval, Mapping) or "approval_id" not in approval:
            return False  # keepalive, or an event this console does not show
        approval_id = str(approval["approval_id"])
        if kind in PENDING_EVENTS:
            self._items[approval_id] = dict(approval)
            return True
        if kind in TERMINAL_EVENTS:
            return self._items.pop(approval_id, None) is not None
        return False

    def replace(self, approvals: Iterable[Mapping[str, Any]]) -> None:
        """Take the daemon's full list (``GET /v1/approvals``) as the truth."""
        self._items = {str(a["approval_id"]): dict(a) for a in approvals
                       if isinstance(a, Mapping) and "approval_id" in a}

    def get(self, approval_id: str) -> dict[str, Any] | None:
        return self._items.get(approval_id)

    def items(self) -> list[dict[str, Any]]:
        return sorted(self._items.values(), key=lambda a: (str(a.get("created", "")), a["approval_id"]))

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Decided:
    """One held request that left the queue: how, by whom, why, and when."""

    approval_id: str
    outcome: str  # the final event: approved, denied, expired, abandoned, cancelled_restart
    operator: str | None
    reason: str
    window_s: int | None
    when: datetime
    identity: str
    target: str
    request: str


class RecentDecisions:
    """The last ``keep`` final events of the approvals stream, newest first."""

    def __init__(self, keep: int = 10) -> None:
        self.keep = keep
        self._items: list[Decided] = []

    def apply(self, event: Mapping[str, Any], now: datetime | None = None) -> bool:
        """Record one stream event; True when it was a final one."""
        kind = event.get("event")
        approval = event.get("approval")
        if kind not in TERMINAL_EVENTS or not isinstance(approval, Mapping) or "approval_id" not in approval:
            return False
        when = now or datetime.now(timezone.utc)
        if isinstance(event.get("decided"), str):
            try:
                when = datetime.fromisoformat(event["decided"])
            except ValueError:
                pass
        operator = event.get("operator")
        if operator is None and kind == "approved":  # a daemon older than the operator field
            operator = ",".join(approval.get("approvals") or []) or None
        window = event.get("window_s")
        item = Decided(str(approval["approval_id"]), str(kind), str(operator) if operator else None,
                       str(event.get("recorded_reason") or event.get("reason") or ""),
                       int(window) if isinstance(window, (int, float)) else None,
                       when, str(approval.get("identity", "")), str(approval.get("target", "")),
                       " ".join(str(approval.get("request", "")).split()))
        self._items = [item, *(i for i in self._items if i.approval_id != item.approval_id)][: self.keep]
        return True

    def add_history(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Decisions read from the audit store (``RECENT_DECISIONS_SQL``); what the stream has
        already said about an approval wins."""
        known = {i.approval_id for i in self._items}
        for row in rows:
            approval_id = str(row.get("approval_id"))
            if approval_id in known or row.get("event") not in TERMINAL_EVENTS:
                continue
            try:
                when = datetime.fromisoformat(str(row.get("ts")))
            except ValueError:
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            window = row.get("window_s")
            self._items.append(Decided(
                approval_id, str(row["event"]), str(row["operator"]) if row.get("operator") else None,
                str(row.get("reason") or ""), int(window) if isinstance(window, (int, float)) and window else None,
                when, cell(row.get("identity")), cell(row.get("target")), " ".join(cell(row.get("request")).split())))
            known.add(approval_id)
        self._items = sorted(self._items, key=lambda i: i.when, reverse=True)[: self.keep]

    def items(self) -> list[Decided]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


def window_text(window_s: int | None) -> str:
    if not window_s:
        return ""
    minutes, secs = divmod(window_s, 60)
    return f"{minutes} min" if not secs else f"{window_s} s"


@dataclass(frozen=True)
class Decision:
    """What the operator chose in the decision dialog."""

    approval_id: str
    action: Literal["approve", "deny"]
    reason: str = ""
    for_s: int | None = None

    def __post_init__(self) -> None:
        if self.action not in ("approve", "deny"):
            raise ValueError(f"unknown decision {self.action!r}")
        if self.action == "deny" and not self.reason.strip():
            raise ValueError("a denial needs a reason")
        if self.for_s is not None and (self.action != "approve" or self.for_s <= 0):
            raise ValueError("a window is a positive number of seconds on an approval")

    @property
    def path(self) -> str:
        return f"/v1/approvals/{quote(self.approval_id, safe='')}/{self.action}"

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.reason.strip():
            body["reason"] = self.reason.strip()
        if self.for_s is not None:
            body["for_s"] = self.for_s
        return body


def parse_window_minutes(text: str) -> int:
    """Minutes typed in the dialog → seconds for ``for_s``; ValueError says what is wrong."""
    try:
        minutes = int(text.strip())
    except ValueError:
        raise ValueError("the window is a whole number of minutes") from None
    if not 1 <= minutes <= MAX_WINDOW_MINUTES:
        raise ValueError(f"the window is between 1 and {MAX_WINDOW_MINUTES} minutes")
    return minutes * 60


def time_left(expires: str | None, now: datetime | None = None) -> str:
    """``expires`` (ISO 8601 from the daemon) as "4m 05s", or "expired"."""
    if not expires:
        return "?"
    try:
        when = datetime.fromisoformat(expires)
    except ValueError:
        return "?"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = int((when - (now or datetime.now(timezone.utc))).total_seconds())
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def status_line(status: Mapping[str, Any], pending: int | None) -> str:
    """One line for the status bar from ``GET /v1/status``.

    ``pending`` is the console's own count (the approvals stream, live); the daemon's
    ``approvals_pending`` is a poll that lags, so it is not shown. None: unknown (no stream).
    """
    targets = status.get("targets") or []
    names = ", ".join(f"{t.get('name')} ({t.get('protocol')} {t.get('listen')})" for t in targets) or "none"
    audit = status.get("audit") or {}
    health = "ok" if audit.get("healthy") else "UNHEALTHY"
    parts = [
        f"daemon pid {status.get('pid', '?')}",
        f"targets: {names}",
        f"audit {health}",
        f"sessions {status.get('sessions_active', 0)}",
        f"pending {'?' if pending is None else pending}",
    ]
    if status.get("bots_left_cgroup"):
        parts.append(f"BOTS LEFT THEIR CGROUP: {status['bots_left_cgroup']}")
    if status.get("last_reload_error"):
        parts.append(f"last reload refused: {status['last_reload_error']}")
    return " · ".join(parts)


def cell(value: Any) -> str:
    """A value from the daemon as table text (None shows as empty, not "None")."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def waited(created: str | None, now: datetime | None = None) -> str:
    """How long a request has been held, from its ``created`` (ISO 8601), as "1m 05s"."""
    if not created:
        return "?"
    try:
        when = datetime.fromisoformat(created)
    except ValueError:
        return "?"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return _span(max(0, int(((now or datetime.now(timezone.utc)) - when).total_seconds())))


def _span(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _clock(iso: str | None) -> str:
    try:
        return datetime.fromisoformat(str(iso)).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return "?"


# What one request is called, per target protocol (the daemon's config names).
REQUEST_NOUNS = {"ssh": "command", "kubernetes": "request", "k8s": "request"}
# The short protocol names the lists show (the audit store's names).
PROTOCOL_SHORT = {"postgres": "sql", "ssh": "ssh", "kubernetes": "k8s", "k8s": "k8s"}


def request_noun(a: Mapping[str, Any]) -> str:
    """"statement" (SQL), "command" (SSH) or "request" (Kubernetes)."""
    return REQUEST_NOUNS.get(str(a.get("protocol")), "statement")


def protocol_short(protocol: Any) -> str:
    return PROTOCOL_SHORT.get(str(protocol), cell(protocol))


def k8s_detail(d: Mapping[str, Any]) -> str:
    """A Kubernetes request's verb/resource/namespace/name, each named."""
    resource = cell(d.get("resource"))
    if d.get("api_group"):
        resource += f".{d['api_group']}"
    if d.get("subresource"):
        resource += f"/{d['subresource']}"
    return (f"verb {cell(d.get('verb'))}   resource {resource}   namespace {cell(d.get('namespace')) or '(cluster)'}"
            f"   name {cell(d.get('name')) or '(all)'}")


def approval_detail(a: Mapping[str, Any], now: datetime | None = None) -> list[tuple[str, str]]:
    """The detail pane of one held request: (label, text) lines, everything a decision needs.

    The statement (SSH: the command line; Kubernetes: the request) is the daemon's redacted
    text (constants a detector flags are masked); an SSH command says where it runs
    (user@host), a Kubernetes request its verb, resource, namespace and name; the
    affected-rows lines appear only where the policy asked for an estimate."""
    p = a.get("process") or {}
    proc = " ".join(f"{k} {p[k]}" for k in ("pid", "uid", "exe", "cgroup") if p.get(k) is not None)
    if p.get("attribution") and p.get("attribution") != "none":
        proc += f"  ({p['attribution']})"
    rule = cell(a.get("rule")) or "(the target's default)"
    if a.get("rule_description"):
        rule += f" — {a['rule_description']}"
    so_far = a.get("approvals") or []
    lines = [(request_noun(a), " ".join(str(a.get("request", "")).split()))]
    if a.get("login"):
        lines.append(("runs as", cell(a["login"])))
    detail = a.get("detail")
    if isinstance(detail, Mapping) and detail.get("verb"):
        lines.append(("kubernetes", k8s_detail(detail)))
    lines += [
        ("identity", f"{cell(a.get('identity'))}" + (f"   groups: {', '.join(a['groups'])}" if a.get("groups") else
                                                    "   groups: none")),
        ("process", proc or "not attested (the connection was not redirected by the probes)"),
        ("target", f"{cell(a.get('target'))} ({cell(a.get('protocol'))})   session {cell(a.get('session_id'))}"),
        ("rule", rule),
    ]
    if a.get("row_estimate") is not None or a.get("row_limit") is not None:
        rows = f"about {a['row_estimate']} rows" if a.get("row_estimate") is not None else "no estimate"
        if a.get("row_limit") is not None:
            rows += f" (the rule allows {a['row_limit']} without asking)"
        lines.append(("rows", rows))
    lines.append(("waiting", f"{waited(a.get('created'), now)} held, {time_left(a.get('expires'), now)} left"))
    lines.append(("approvals", f"{len(so_far)} of {a.get('required', 1)}"
                  + (f", so far: {', '.join(so_far)}" if so_far else "")))
    earlier = a.get("earlier") or []
    if earlier:
        for i, e in enumerate(earlier):
            who = f" by {e['operator']}" if e.get("operator") else ""
            why = f": {e['reason']}" if e.get("reason") else ""
            window = f" (window {window_text(e.get('window_s'))})" if e.get("window_s") else ""
            lines.append(("earlier" if i == 0 else "", f"{_clock(e.get('decided'))} {e.get('event')}{who}{window}"
                                                       f"{why} — {cell(e.get('identity'))}"))
    else:
        lines.append(("earlier", f"no earlier decision on this {request_noun(a)} shape since the daemon started"))
    return lines


def session_matches(session: Mapping[str, Any], query: str, now: datetime | None = None) -> bool:
    """The sessions filter: every word must match. ``identity=…``, ``target=…``, ``state=…``
    (active, ended; a session's outcome), ``protocol=…`` (postgres or sql, ssh, kubernetes or
    k8s) and ``since=15m`` (started within; s, m, h, d) look at one field; any other word
    matches the id, identity, target, protocol, state, executable or statement."""
    for word in query.split():
        key, sep, value = word.partition("=")
        value = value.lower()
        if sep and key in ("identity", "target", "state"):
            if value not in cell(session.get(key)).lower():
                return False
        elif sep and key == "protocol":
            if value not in (cell(session.get(key)).lower(), protocol_short(session.get(key))):
                return False
        elif sep and key == "since":
            limit = parse_span(value)
            if limit is None:
                return False
            try:
                started = datetime.fromisoformat(str(session.get("started")))
            except ValueError:
                return False
            if started.tzinfo is None:
                started = started.replace(tzinfo=timezone.utc)
            if ((now or datetime.now(timezone.utc)) - started).total_seconds() > limit:
                return False
        else:
            hay = " ".join(cell(session.get(k)) for k in ("session_id", "identity", "target", "protocol", "state",
                                                          "exe", "subject", "current")).lower()
            if word.lower() not in hay:
                return False
    return True


def parse_span(text: str) -> int | None:
    """"15m" → 900 seconds (s, m, h, d; a bare number is minutes); None when unreadable."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    unit = units.get(text[-1:], None)
    number = text[:-1] if unit else text
    try:
        return int(number) * (unit or 60)
    except ValueError:
        return None


def current_statement(session: Mapping[str, Any], now: datetime | None = None) -> str:
    """A live session's current (or last) statement, as the sessions table shows it."""
    text = " ".join(cell(session.get("current")).split())
    if not text:
        return ""
    if session.get("current_running"):
        return f"{text}  [running {waited(session.get('current_since'), now)}]"
    return f"{text}  [done]" if session.get("state") == "active" else text


def health_lines(h: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``GET /v1/health`` as the Status view's lines: (label, level, text); level is ok, warn or
    fail (shown as a marker, not only a colour, so it reads on any terminal)."""
    out: list[tuple[str, str, str]] = []
    uptime = h.get("uptime_s")
    out.append(("daemon", "ok", f"botwarden {h.get('version', '?')}, pid {h.get('pid', '?')}, up "
                                f"{_span(int(uptime)) if isinstance(uptime, int) else '?'} (since "
                                f"{_clock(h.get('started_at'))}), config {h.get('config', '?')}"
                + (f", {h['reloads']} reload(s)" if h.get("reloads") else "")))
    if h.get("last_reload_error"):
        out.append(("reload", "warn", f"last reload refused: {h['last_reload_error']}"))
    probes = str(h.get("probes") or "")
    mode = h.get("probes_mode")
    probes_level = "ok" if h.get("probes_path") and "removed" not in probes else ("warn" if mode == "off" else "fail")
    out.append(("probes", probes_level, f"{probes}  (mode {mode}, path {h.get('probes_path') or 'none'})"))
    for b in h.get("bots") or []:
        if b.get("error"):
            out.append(("bots cgroup", "warn", f"{b.get('cgroup')}: {b['error']}"))
            continue
        level = "fail" if b.get("uid0") else "ok"
        text = f"{b.get('cgroup')}: {b.get('processes', 0)} process{'es' if b.get('processes') != 1 else ''}"
        if b.get("uid0"):
            named = ", ".join(f"{p['pid']} {p['comm']}" for p in b.get("uid0_pids") or [])
            text += f", {b['uid0']} AS UID 0 ({named})"
        out.append(("bots cgroup", level, text))
    if h.get("bots_left_cgroup"):
        out.append(("bots", "fail", f"{h['bots_left_cgroup']} bot process(es) left their cgroup"))
    for t in h.get("targets") or []:
        out.append(("listener", "ok", f"{t.get('name')} ({t.get('protocol')}) on {t.get('listen')} → "
                                      f"{t.get('address')}"))
    for c in h.get("checks") or []:
        level = {"ok": "ok", "warn": "warn", "skip": "ok"}.get(str(c.get("status")), "fail")
        text = str(c.get("detail", ""))
        if c.get("status") == "skip":
            text = f"not configured: {text}"
        if c.get("fix") and level != "ok":
            text += f"  → {c['fix']}"
        out.append((str(c.get("name", "")), level, text))
    if h.get("oidc_issuer"):
        out.append(("OIDC issuer url", "ok", str(h["oidc_issuer"])))
    audit = h.get("audit") or {}
    stats = h.get("audit_stats") or {}
    healthy = bool(audit.get("healthy"))
    out.append(("audit store", "ok" if healthy else "fail",
                f"{'healthy' if healthy else 'NOT HEALTHY: statements are refused'}, {audit.get('path')}, "
                f"mode {stats.get('mode')}, audit process pid {audit.get('pid')}, writer epoch {stats.get('epoch')}"))
    depth = stats.get("queue_depth")
    out.append(("audit queue", "ok", f"{depth if depth is not None else '?'} event(s) not yet committed"
                                     + (f" (limit {stats['queue_max']})" if stats.get("queue_max") else "")))
    lost = int(stats.get("lost") or 0)
    refused = int(stats.get("refused") or 0)
    out.append(("audit losses", "fail" if lost else ("warn" if refused else "ok"),
                f"{lost} event(s) lost, {refused} refused, {stats.get('restarts', 0)} audit process restart(s)"))
    out.append(("chain head", "ok", f"seq {stats.get('head_seq') if stats.get('head_seq') is not None else '?'}"))
    out.append(("sessions", "ok", f"{h.get('sessions_active', 0)} active, "
                                  f"{h.get('approvals_pending', 0)} request(s) held"))
    revocations = h.get("revocations_pending") or []
    if revocations:
        out.append(("leases", "warn", f"{len(revocations)} credential lease(s) not revoked yet"))
    return out
