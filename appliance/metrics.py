"""Prometheus metrics: ``GET /metrics`` on the control socket, and on an opt-in TCP listener
(``[metrics] listen = "127.0.0.1:9187"``, off by default).

The text format comes from ``prometheus_client`` (its exposition and metric families); the
numbers come from two places:

* events, counted as they pass :meth:`Metrics.observe` (the runtime's audit hook: every
  session_start/session_end, request and approval record goes through it) and the fronts'
  upstream-connect hook. On the event loop thread, per request, a dict increment: cheaper
  than a labelled prometheus_client Counter (a lock and a label lookup per call) on the path
  every statement takes;
* state read when scraped (open sessions, pending approvals, the audit queue, the policy
  caches, the probes), so a scrape never sees a stale copy.

Label values are names from the config (targets, identities, rules) and the fixed outcome and
action words: bounded, and never a statement, a token or a client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)

# Approval waits are human: seconds to an hour (approvals.timeout_s defaults to 300).
APPROVAL_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
_OPEN_SESSIONS_MAX = 100_000  # session_start seen, session_end not yet: bounded against a leak
MAX_REQUEST_HEAD = 8192


class Metrics:
    """One per daemon; survives reloads (it reads the current runtime at each scrape)."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=False)
        self.sessions: Tally[tuple[str, str, str]] = Tally()     # (target, identity, outcome)
        self.decisions: Tally[tuple[str, str]] = Tally()         # (action, rule)
        self.approval_events: Tally[str] = Tally()
        self.upstream_errors: Tally[tuple[str, str]] = Tally()   # (target, stage)
        self._open: dict[str, tuple[str, str]] = {}              # session_id -> (target, identity)
        self.approval_wait = Histogram(
            "botwarden_approval_decision_seconds", "Time a held request waited for its decision, by outcome",
            ["outcome"], buckets=APPROVAL_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))
        self._server: asyncio.AbstractServer | None = None

    # -- events (event loop thread) ----------------------------------------------------

    def observe(self, kind: str, record: Mapping[str, Any]) -> None:
        if kind == "request":
            self.decisions[(str(record.get("decision") or "?"), str(record.get("rule") or ""))] += 1
        elif kind == "session_start":
            if len(self._open) < _OPEN_SESSIONS_MAX:
                # No identity: the connection was refused before anyone was identified.
                self._open[record["session_id"]] = (str(record.get("target") or "?"),
                                                    str(record.get("identity") or "none"))
        elif kind == "session_end":
            target, identity = self._open.pop(record.get("session_id"), ("?", "none"))
            self.sessions[(target, identity, str(record.get("outcome") or "?"))] += 1
        elif kind == "approval":
            event = str(record.get("event") or "?")
            self.approval_events[event] += 1
            waited = record.get("waited_ms")
            if isinstance(waited, (int, float)):  # only the events that end a hold carry it
                self.approval_wait.labels(event).observe(waited / 1000.0)

    def upstream_connect_failed(self, target: str, stage: str) -> None:
        """A front could not reach its target (``stage``: "tcp" or "tls")."""
        self.upstream_errors[(target, stage)] += 1

    # -- exposition ----------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> tuple[str, int]:
        """The opt-in TCP listener: ``GET /metrics`` only. Returns the bound address."""
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_HEAD)
        bound = self._server.sockets[0].getsockname()[:2]
        log.info("metrics listener on %s:%d", *bound)
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method != "GET" or path.split("?", 1)[0] != "/metrics":
                status, ctype, body = "404 Not Found", "text/plain", b"only GET /metrics here\n"
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.render()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Collector(Collector):
    """State read at scrape time, plus the event tallies as counter families."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m, daemon = self.m, self.m.daemon
        c = CounterMetricFamily("botwarden_sessions", "Sessions that ended, by target, identity and outcome",
                                labels=["target", "identity", "outcome"])
        for labels, n in sorted(m.sessions.items()):
            c.add_metric(list(labels), n)
        yield c
        c = CounterMetricFamily("botwarden_decisions", "Requests decided, by action and the rule that decided "
                                                       "(empty: no rule, the target's default)",
                                labels=["action", "rule"])
        for labels, n in sorted(m.decisions.items()):
            c.add_metric(list(labels), n)
        yield c
        c = CounterMetricFamily("botwarden_approval_events", "Approval events (requested, approved, denied, "
                                                             "expired, ...)", labels=["event"])
        for event, n in sorted(m.approval_events.items()):
            c.add_metric([event], n)
        yield c
        c = CounterMetricFamily("botwarden_upstream_connect_errors", "Sessions whose target could not be "
                                                                     "reached, by target and stage (tcp, tls)",
                                labels=["target", "stage"])
        for labels, n in sorted(m.upstream_errors.items()):
            c.add_metric(list(labels), n)
        yield c

        runtime = daemon.runtime
        g = GaugeMetricFamily("botwarden_sessions_active", "Sessions open now, by target", labels=["target"])
        if runtime is not None:
            open_by_target = Tally(s.target for s in list(runtime.live.values()))
            for target in (t.name for t in daemon.config.targets):
                g.add_metric([target], open_by_target.get(target, 0))
        yield g
        yield GaugeMetricFamily("botwarden_approvals_pending", "Requests held for a human now",
                                value=len(runtime.approvals.pending) if runtime is not None else 0)
        if runtime is not None and runtime.engine is not None:
            stats = dict(runtime.engine.stats)
            c = CounterMetricFamily("botwarden_policy_cache_lookups", "Policy decisions by cache result (this "
                                                                      "config generation: a reload starts at 0)",
                                    labels=["result"])
            for result, key in (("exact_hit", "exact_hits"), ("shape_hit", "shape_hits"), ("miss", "misses")):
                c.add_metric([result], stats.get(key, 0))
            yield c
            total = sum(stats.get(k, 0) for k in ("exact_hits", "shape_hits", "misses"))
            hits = stats.get("exact_hits", 0) + stats.get("shape_hits", 0)
            yield GaugeMetricFamily("botwarden_policy_cache_hit_ratio", "Share of policy decisions answered "
                                                                        "from a cache (this config generation)",
                                    value=hits / total if total else 0.0)
        yield from self._audit(daemon)
        yield GaugeMetricFamily("botwarden_probes_attached", "1 when the daemon's redirect is attached",
                                value=1 if getattr(daemon, "probes", None) is not None else 0)

    def _audit(self, daemon: "Daemon") -> Iterator[Any]:
        store = daemon.audit
        stats = store.stats() if store is not None else {}
        yield GaugeMetricFamily("botwarden_audit_healthy", "1 while the audit store takes events (0: statements "
                                                           "are refused)",
                                value=1 if store is not None and store.healthy else 0)
        yield GaugeMetricFamily("botwarden_audit_queue_depth", "Audit events accepted and not yet committed "
                                                               "(the store's lag, in events)",
                                value=stats.get("pending", 0))
        for name, key, doc in (
                ("botwarden_audit_events_submitted", "submitted", "Audit events accepted"),
                ("botwarden_audit_events_written", "written", "Audit events committed to the store"),
                ("botwarden_audit_events_refused", "refused", "Audit events refused (queue full or store "
                                                             "failing); their statements were refused"),
                ("botwarden_audit_paced_requests", "paced", "Requests that waited for the audit store to "
                                                            "catch up before they were decided (pacing)"),
                ("botwarden_audit_process_restarts", "restarts", "Times the audit process was started again")):
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        yield CounterMetricFamily("botwarden_audit_events_lost", "Accepted audit events that never reached the "
                                                                 "store (its process failed or died)",
                                  value=stats.get("lost", 0) + stats.get("lost_in_crashes", 0))
        if stats.get("head_seq") is not None:
            yield GaugeMetricFamily("botwarden_audit_chain_head_seq", "chain_seq of the last committed row",
                                    value=stats["head_seq"])
        fleet = daemon.fleet_status() if hasattr(daemon, "fleet_status") else None
        if fleet is not None:
            yield GaugeMetricFamily("botwarden_fleet_lake_up", "1 while the fleet lake takes this bastion's batches",
                                    value=1 if fleet.get("lake") == "up" else 0)
            if fleet.get("backlog") is not None:
                yield GaugeMetricFamily("botwarden_fleet_backlog_rows", "Committed audit rows not yet shipped to "
                                                                        "the fleet lake", value=fleet["backlog"])
            if fleet.get("shipped_seq") is not None:
                yield GaugeMetricFamily("botwarden_fleet_shipped_seq", "chain_seq of the last row in the fleet lake",
                                        value=fleet["shipped_seq"])
            yield GaugeMetricFamily("botwarden_fleet_lag_seconds", "Age of the oldest committed row not yet in "
                                                                   "the fleet lake", value=fleet.get("lag_s") or 0.0)


__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]
