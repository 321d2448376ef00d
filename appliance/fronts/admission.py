"""Admission: how many connections may wait unauthenticated, and for how long (issue 26.4).

Any local user can open TCP connections to a listener. Until such a connection has sent its
startup packet and credentials it costs the daemon a file descriptor, a session object and
buffers, and proves nothing. :class:`Admission` bounds that, protocol-neutrally, for every
front of one daemon:

- at most ``per_uid`` unauthenticated connections per peer (the uid that owns the client
  socket, from the kernel: the probes' attribution for a redirected bot, sock_diag otherwise);
- at most ``total`` unauthenticated connections in all from peers the probes did not redirect
  (bots are bounded per uid only, so a flood from ordinary local users cannot lock them out);
- beyond a cap the connection is refused at once with the front's native "too many
  connections" error, and a ``probe`` audit event (``admission_refused``, at most one per peer
  per ``REFUSAL_EVENT_INTERVAL_S``, counting the ones it stands for) records it;
- an unauthenticated connection is closed after ``timeout_s``; under pressure (either cap more
  than half used) after ``pressure_timeout_s``, which applies to connections already waiting.

A front asks :meth:`Admission.admit` when it accepts, and releases the ticket once the
connection has presented its credentials (from then on the daemon's own checks bound it).

:class:`PartialMessageTimer` is the other bound: after login, a message the client started
must be complete within a time limit, or a half-sent message would hold the session, its
upstream connection and its database user forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

REFUSAL_EVENT_INTERVAL_S = 10.0
SWEEP_INTERVAL_S = 0.5


@dataclass(frozen=True)
class AdmissionLimits:
    per_uid: int = 64
    total: int = 1024
    timeout_s: float = 10.0
    pressure_timeout_s: float = 2.0


@dataclass(frozen=True)
class Peer:
    """Who holds the client end of an accepted connection, as far as the kernel says."""

    key: str           # "uid:1000", or "addr:10.0.0.7" when the socket is not local
    uid: int | None
    bot: bool          # redirected by the probes (a process in a watched bots cgroup)


class Ticket:
    """One admitted unauthenticated connection. ``close(reason)`` ends it (the front's callback)."""

    __slots__ = ("admission", "peer", "started", "close", "released")

    def __init__(self, admission: "Admission", peer: Peer, close: Callable[[str], None]):
        self.admission = admission
        self.peer = peer
        self.started = time.monotonic()
        self.close = close
        self.released = False

    def refused(self, why: str, listener: str = "") -> None:
        """The connection was refused before it logged in (a malformed startup, silence): on
        record as a ``protocol_refused`` probe event, rate-limited per peer like admission's own."""
        self.admission._record(self.peer, "protocol_refused", why, listener)

    def release(self) -> None:
        """The connection presented its credentials (or ended): it no longer counts."""
        if not self.released:
            self.released = True
            self.admission._release(self)


class Admission:
    def __init__(self, limits: AdmissionLimits, *, classify: Callable[[Any], Peer],
                 audit: Callable[[str, Mapping[str, Any]], None] | None = None):
        self.limits = limits  # replaced on reload
        self._classify = classify
        self._audit = audit
        self._open: dict[Ticket, None] = {}  # insertion order = oldest first
        self._per_key: dict[str, int] = {}
        self._unredirected = 0
        self._sweeper: asyncio.TimerHandle | None = None
        # peer key -> (monotonic time of the last refusal event, refusals not yet reported)
        self._refusals: dict[str, tuple[float, int]] = {}
        self.refused_total = 0
        self.reaped_total = 0

    # -- the front's side ----------------------------------------------------------------

    def admit(self, sock: Any, close: Callable[[str], None], *, listener: str = "") -> Ticket | None:
        """A ticket for an accepted connection, or None: refuse it (the cap is reached)."""
        try:
            peer = self._classify(sock)
        except Exception:  # the kernel would not say: count it with everything unknown
            log.exception("could not identify the peer of an accepted connection")
            peer = Peer("unknown", None, False)
        limits = self.limits
        if self._under_pressure(peer):
            self._reap(limits.pressure_timeout_s)
        why = None
        if self._per_key.get(peer.key, 0) >= limits.per_uid:
            why = f"{peer.key} already has {limits.per_uid} unauthenticated connections (limits.unauthenticated_per_uid)"
        elif not peer.bot and self._unredirected >= limits.total:
            why = (f"{limits.total} unauthenticated connections are open in all "
                   "(limits.unauthenticated_total)")
        if why is not None:
            self._refused(peer, why, listener)
            return None
        ticket = Ticket(self, peer, close)
        self._open[ticket] = None
        self._per_key[peer.key] = self._per_key.get(peer.key, 0) + 1
        if not peer.bot:
            self._unredirected += 1
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL_S, self._sweep)
        return ticket

    def stats(self) -> dict[str, Any]:
        return {"unauthenticated": len(self._open), "unauthenticated_not_redirected": self._unredirected,
                "refused": self.refused_total, "timed_out": self.reaped_total}

    # -- internals -------------------------------------------------------------------------

    def _release(self, ticket: Ticket) -> None:
        if ticket in self._open:
            del self._open[ticket]
            key = ticket.peer.key
            left = self._per_key.get(key, 1) - 1
            if left > 0:
                self._per_key[key] = left
            else:
                self._per_key.pop(key, None)
            if not ticket.peer.bot:
                self._unredirected -= 1

    def _under_pressure(self, peer: Peer | None = None) -> bool:
        limits = self.limits
        if self._unredirected * 2 > limits.total:
            return True
        return peer is not None and self._per_key.get(peer.key, 0) * 2 > limits.per_uid

    def _pressure_anywhere(self) -> bool:
        return self._unredirected * 2 > self.limits.total or \
            any(n * 2 > self.limits.per_uid for n in self._per_key.values())

    def _reap(self, older_than_s: float) -> None:
        """Close unauthenticated connections waiting longer than ``older_than_s`` (oldest first)."""
        now = time.monotonic()
        for ticket in list(self._open):
            age = now - ticket.started
            if age < older_than_s:
                break  # the rest are younger
            ticket.release()
            self.reaped_total += 1
            try:
                ticket.close(f"the connection did not authenticate within {older_than_s:g}s"
                             + (" (botwarden is under connection pressure)"
                                if older_than_s < self.limits.timeout_s else ""))
            except Exception:
                log.exception("closing an unauthenticated connection failed")

    def _sweep(self) -> None:
        self._sweeper = None
        limits = self.limits
        self._reap(limits.pressure_timeout_s if self._pressure_anywhere() else limits.timeout_s)
        if self._open:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL_S, self._sweep)

    def _refused(self, peer: Peer, why: str, listener: str) -> None:
        self.refused_total += 1
        self._record(peer, "admission_refused", why, listener)

    def _record(self, peer: Peer, event: str, why: str, listener: str) -> None:
        """A probe event for a refusal before authentication: at most one per peer and kind per
        REFUSAL_EVENT_INTERVAL_S, counting the ones it stands for (a flood is not an audit flood)."""
        now = time.monotonic()
        key = f"{event}:{peer.key}:{why.split(':', 1)[0][:40]}"  # per kind of refusal, too
        last, pending = self._refusals.get(key, (-1e9, 0))
        pending += 1
        if now - last < REFUSAL_EVENT_INTERVAL_S:
            self._refusals[key] = (last, pending)
            return
        self._refusals[key] = (now, 0)
        if len(self._refusals) > 10_000:  # many peers (remote addresses): forget the oldest
            for old in list(self._refusals)[:1000]:
                del self._refusals[old]
        detail = f"{pending} connection(s) refused before authentication: {why}"
        log.warning("admission: %s", detail)
        if self._audit is None:
            return
        host, _, port = listener.rpartition(":")
        record: dict[str, Any] = {"ts": datetime.now(timezone.utc), "event": event, "detail": detail}
        if peer.uid is not None:
            record["uid"] = peer.uid
        if host and port.isdigit():
            record.update(dst_addr=host.strip("[]"), dst_port=int(port))
        try:
            self._audit("probe", record)
        except Exception:  # an audit hook that fails is logged; the refusal stands
            log.exception("admission: the refusal could not be audited")


class PartialMessageTimer:
    """Ends a session whose client leaves a message incomplete for ``timeout_s``.

    ``update(pending)`` after each read: armed when a partial message stays in the buffer,
    disarmed when none does. ``waiting()`` says whether the wait is ours (reading paused for
    back-pressure, or a statement held for approval): then the clock starts again."""

    __slots__ = ("timeout_s", "_expired", "_waiting", "_handle")

    def __init__(self, timeout_s: float, expired: Callable[[float], None], waiting: Callable[[], bool]):
        self.timeout_s = timeout_s
        self._expired = expired
        self._waiting = waiting
        self._handle: asyncio.TimerHandle | None = None

    def update(self, pending: bool) -> None:
        if pending:
            if self._handle is None and self.timeout_s > 0:
                self._handle = asyncio.get_running_loop().call_later(self.timeout_s, self._fire)
        elif self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def cancel(self) -> None:
        self.update(False)

    def _fire(self) -> None:
        self._handle = None
        if self._waiting():
            self.update(True)
            return
        self._expired(self.timeout_s)
