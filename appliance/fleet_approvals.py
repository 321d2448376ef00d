"""Fleet approvals: held requests any operator of the fleet sees and decides, exactly once.

Every bastion publishes the requests it holds to one PostgreSQL table (the lake's catalog
server or another: ``[fleet] approvals``), listens on a channel for decisions, and answers
decisions from its operators about other bastions' requests:

* publish — a request held here becomes a ``pending`` row (bastion, who, what, expires);
  ending it here (expired, abandoned, restart) closes the row.
* decide — an operator on any bastion decides through its own daemon. The decision is a
  transaction that locks the row (``SELECT ... FOR UPDATE``), refuses it unless the row is
  still ``pending``, writes the decision and ``NOTIFY``s the channel at commit: two operators
  deciding at once are serialised by the lock, so exactly one decision wins and the other is
  told who won. A decision taken on the requesting bastion itself claims the row the same way
  before it is applied.
* apply — the requesting bastion wakes on the notification (LISTEN), reads the row and applies
  the decision to the held request, recording it in its audit under ``operator@bastion``; the
  deciding bastion records the decision in its own audit too.

Partition: when this bastion cannot reach the store, its held requests are decided here only
(CLI/TUI of this bastion), ``status`` and ``approvals list`` say so, and decisions taken meanwhile
are written to the store once it is back. Nothing is ever approved because the store is away:
an undecided request expires and is denied as before. Decisions from elsewhere about a bastion
that has not reached the store for ``_STALE_S`` seconds are refused (its operators decide).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from appliance.approvals import FINAL_EVENTS, ApprovalError, Operator

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)

TABLE = "botwarden_fleet_approvals"
BASTIONS = "botwarden_fleet_bastions"
CHANNEL = "botwarden_approvals"
_CONNECT_TIMEOUT_S = 3
_HEARTBEAT_S = 5.0
_STALE_S = 20.0

_DDL = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        approval_id text PRIMARY KEY, bastion text NOT NULL, session_id text, request_id text,
        identity text, target text, rule text, request text, bot_uid integer, excluded_uids integer[],
        required integer NOT NULL DEFAULT 1, created timestamptz NOT NULL, expires timestamptz NOT NULL,
        state text NOT NULL DEFAULT 'pending', decided_by text, decided_uid integer, decided_on text,
        reason text, window_s integer, decided_at timestamptz)""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_pending ON {TABLE} (state, expires)",
    f"CREATE TABLE IF NOT EXISTS {BASTIONS} (bastion text PRIMARY KEY, seen_at timestamptz NOT NULL)",
)
_COLUMNS = ("approval_id", "bastion", "session_id", "request_id", "identity", "target", "rule", "request",
            "bot_uid", "required", "created", "expires", "state", "decided_by", "decided_uid", "decided_on",
            "reason", "window_s")


def _redact(text: str) -> str:
    from analytics.fleet import redact_dsn

    return redact_dsn(text)


class FleetApprovals:
    """The daemon's link to the fleet approvals store (one per daemon, across reloads)."""

    def __init__(self, daemon: Daemon, dsn: str, bastion: str):
        self.daemon = daemon
        self.dsn = dsn
        self.bastion = bastion
        self.available = False
        self.problem: str | None = "not connected yet"
        self.since: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._unsynced: dict[str, tuple[str, str | None]] = {}   # decided here while the store was away

    @property
    def broker(self) -> Any:
        return self.daemon.runtime.approvals

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = self.broker.subscribe(internal=True)
        self.daemon.spawn(self._consume(), "fleet-approvals-publish")
        self._thread = threading.Thread(target=self._listen, name="fleet-approvals-listen", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self.broker.unsubscribe(self._queue)
        if self._thread is not None:
            self._thread.join(5)

    def status(self) -> dict[str, Any]:
        return {"bastion": self.bastion, "available": self.available, "message": self.message()}

    def message(self) -> str | None:
        if self.available:
            return None
        since = f" since {self.since:%H:%M:%S} UTC" if self.since else ""
        return (f"fleet approvals store unreachable{since} ({self.problem}): requests held on {self.bastion} are "
                f"decided on {self.bastion} only and operators of other bastions cannot see them; nothing is "
                "approved automatically (an undecided request expires and is denied)")

    def _connect(self) -> Any:
        import psycopg

        # Keepalives and a TCP user timeout: a partition that drops packets is noticed in seconds.
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S, keepalives=1,
                               keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                               tcp_user_timeout=10_000)

    def _down(self, e: BaseException) -> None:
        why = _redact(f"{type(e).__name__}: {e}".strip().splitlines()[0])
        if self.available or self.problem != why:
            self.since = self.since if not self.available and self.since else datetime.now(timezone.utc)
            self.available, self.problem = False, why
            log.warning("%s", self.message())

    # -- the listener thread -------------------------------------------------------------

    def _listen(self) -> None:
        import psycopg

        backoff = 1.0
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    for ddl in _DDL:
                        conn.execute(ddl)
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._beat(conn)
                    was = self.available
                    self.available, self.problem, self.since = True, None, None
                    backoff = 1.0
                    if not was:
                        log.info("fleet approvals store reached: bastion %s publishes its held requests", self.bastion)
                    self._call(self._resync())
                    beat_at = 0.0
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._call(self._on_notify(note.payload))
                        beat_at += 1.0
                        if beat_at >= _HEARTBEAT_S:
                            beat_at = 0.0
                            self._beat(conn)
            except (psycopg.Error, OSError) as e:
                self._down(e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _beat(self, conn: Any) -> None:
        conn.execute(f"INSERT INTO {BASTIONS} VALUES (%s, now()) ON CONFLICT (bastion) DO UPDATE SET seen_at = now()",
                     [self.bastion])

    def _call(self, coro: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: self.daemon.spawn(coro, "fleet-approvals"))
        else:
            coro.close()

    # -- publishing (the event loop's side) ------------------------------------------------

    async def _consume(self) -> None:
        while True:
            msg = await self._queue.get()
            event, item = msg.get("event"), msg.get("approval") or {}
            try:
                if event in ("requested", "pending"):
                    held = self.broker.pending.get(item["approval_id"])
                    excluded = sorted(held.excluded_uids) if held is not None else []
                    await asyncio.to_thread(self._publish, item, excluded)
                    if event == "requested" and held is not None:
                        self.broker._event("notified", held.approval_id, session_id=held.session_id,
                                           request_id=held.request_id, identity=held.identity, target=held.target,
                                           rule=held.rule, reason="published to the fleet approvals store: "
                                                                  "operators of every bastion see it")
                elif event in FINAL_EVENTS:
                    await asyncio.to_thread(self._close_row, item["approval_id"], event, msg.get("operator"))
            except Exception as e:  # the store is away: the request stays decidable here
                if event in FINAL_EVENTS:
                    self._unsynced[item["approval_id"]] = (event, msg.get("operator"))
                self._down(e)

    def _publish(self, item: Mapping[str, Any], excluded: list[int]) -> None:
        with self._connect() as conn:
            conn.execute(
                f"INSERT INTO {TABLE} (approval_id, bastion, session_id, request_id, identity, target, rule, request, "
                "bot_uid, excluded_uids, required, created, expires) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (approval_id) DO NOTHING",
                [item["approval_id"], self.bastion, item.get("session_id"), item.get("request_id"),
                 item.get("identity"), item.get("target"), item.get("rule"), item.get("request"),
                 (item.get("process") or {}).get("uid"), excluded, item.get("required", 1),
                 item["created"], item["expires"]])

    def _close_row(self, approval_id: str, event: str, operator: str | None) -> None:
        """A request that ended here: its row is no longer pending (a decision claimed it already)."""
        with self._connect() as conn:
            conn.execute(f"UPDATE {TABLE} SET state = %s, decided_by = coalesce(decided_by, %s), "
                         "decided_on = coalesce(decided_on, %s), decided_at = coalesce(decided_at, now()) "
                         "WHERE approval_id = %s AND state = 'pending'", [event, operator, self.bastion, approval_id])

    async def _resync(self) -> None:
        """After (re)connecting: publish what is held here, write what was decided here meanwhile,
        close rows this bastion no longer holds, and apply decisions taken while we were away."""
        held = [(p.public(), sorted(p.excluded_uids)) for p in list(self.broker.pending.values())]
        unsynced, self._unsynced = self._unsynced, {}
        try:
            for item, excluded in held:
                await asyncio.to_thread(self._publish, item, excluded)
            for approval_id, (event, operator) in unsynced.items():
                await asyncio.to_thread(self._close_row, approval_id, event, operator)
            stale = await asyncio.to_thread(self._mine_pending)
            for approval_id in stale:
                if approval_id not in self.broker.pending:
                    await asyncio.to_thread(self._close_row, approval_id, "cancelled_restart", None)
            for item, _ in held:
                await self._on_notify(f"{self.bastion}:{item['approval_id']}")
        except Exception as e:
            self._unsynced.update(unsynced)
            self._down(e)

    def _mine_pending(self) -> list[str]:
        with self._connect() as conn:
            return [r[0] for r in conn.execute(f"SELECT approval_id FROM {TABLE} WHERE bastion = %s AND "
                                               "state = 'pending'", [self.bastion]).fetchall()]

    # -- applying decisions taken elsewhere ----------------------------------------------------

    def _row(self, approval_id: str) -> dict[str, Any] | None:
        with self._connect() as conn:
            row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM {TABLE} WHERE approval_id = %s",
                               [approval_id]).fetchone()
        return None if row is None else dict(zip(_COLUMNS, row))

    async def _on_notify(self, payload: str) -> None:
        bastion, _, approval_id = payload.partition(":")
        if bastion != self.bastion or approval_id not in self.broker.pending:
            return
        row = await asyncio.to_thread(self._row, approval_id)
        if row is None or row["state"] not in ("approved", "denied") or row["decided_on"] == self.bastion:
            return   # still pending, or decided here (the deciding route applied it)
        operator = Operator(f"{row['decided_by']}@{row['decided_on']}", row["decided_uid"] or -1, None)
        try:
            if row["state"] == "approved":
                self.broker.approve(approval_id, operator, window_s=row["window_s"],
                                    reason=row["reason"] or f"approved on {row['decided_on']} (fleet)")
            else:
                self.broker.deny(approval_id, operator, row["reason"] or f"denied on {row['decided_on']} (fleet)")
        except ApprovalError as e:   # checked on the deciding bastion too; say so if it still happens
            log.error("approval %s: the fleet decision by %s could not be applied: %s", approval_id,
                      operator.name, e.message)

    # -- decisions from this bastion's operators ----------------------------------------------------

    async def claim(self, approval_id: str, state: str, operator: Operator, reason: str,
                    window_s: int | None) -> dict[str, Any] | None:
        """Claim the decision in the store before it is applied here. Returns the row decided, or
        None when the store cannot be reached (the decision is then taken here only and written to
        the store later). Raises ApprovalError when another decision won, or for a request held
        elsewhere that this operator may not decide."""
        local = approval_id in self.broker.pending
        if local and not self.available:
            return None
        try:
            return await asyncio.to_thread(self._claim, approval_id, state, operator, reason, window_s, local)
        except ApprovalError:
            raise
        except Exception as e:
            self._down(e)
            if local:
                return None
            raise ApprovalError(503, self.message() or "fleet approvals store unreachable") from None

    def _claim(self, approval_id: str, state: str, operator: Operator, reason: str, window_s: int | None,
               local: bool) -> dict[str, Any]:
        with self._connect() as conn, conn.transaction():
            row = conn.execute(f"SELECT {', '.join(_COLUMNS)}, excluded_uids, expires < now() FROM {TABLE} "
                               "WHERE approval_id = %s FOR UPDATE", [approval_id]).fetchone()
            if row is None:
                if local:
                    # Held here, not published yet (the store just came back): publish, then claim.
                    item = self.broker.pending[approval_id]
                    self._publish(item.public(), sorted(item.excluded_uids))
                    row = conn.execute(f"SELECT {', '.join(_COLUMNS)}, excluded_uids, expires < now() FROM {TABLE} "
                                       "WHERE approval_id = %s FOR UPDATE", [approval_id]).fetchone()
                if row is None:
                    raise ApprovalError(404, f"no pending approval {approval_id!r} on this bastion or in the fleet")
            found = dict(zip(_COLUMNS, row))
            excluded, expired = row[-2] or [], row[-1]
            if found["state"] != "pending":
                who = f" by {found['decided_by']}" if found["decided_by"] else ""
                raise ApprovalError(409, f"approval {approval_id} is already {found['state']}{who} on "
                                         f"{found['decided_on'] or found['bastion']}")
            if not local:
                self._check_remote(found, excluded, expired, state, operator, conn)
            conn.execute(f"UPDATE {TABLE} SET state = %s, decided_by = %s, decided_uid = %s, decided_on = %s, "
                         "reason = %s, window_s = %s, decided_at = now() WHERE approval_id = %s",
                         [state, operator.name, operator.uid, self.bastion, reason or None, window_s, approval_id])
            conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, f"{found['bastion']}:{approval_id}"])
        found.update(state=state, decided_by=operator.name, decided_on=self.bastion)
        return found

    def _check_remote(self, row: dict[str, Any], excluded: list[int], expired: bool, state: str,
                      operator: Operator, conn: Any) -> None:
        """What the requesting bastion would refuse, refused here before the row is claimed."""
        if expired:
            raise ApprovalError(409, f"approval {row['approval_id']} has expired on {row['bastion']}")
        if row["required"] > 1:
            raise ApprovalError(409, f"approval {row['approval_id']} needs {row['required']} approvers: decide it "
                                     f"on {row['bastion']}")
        if state == "approved" and (operator.uid in excluded or operator.uid == row["bot_uid"]):
            raise ApprovalError(403, f"operator {operator.name} (uid {operator.uid}) may not approve requests of "
                                     f"identity {row['identity']!r}")
        seen = conn.execute(f"SELECT now() - seen_at < make_interval(secs => %s) FROM {BASTIONS} WHERE bastion = %s",
                            [_STALE_S, row["bastion"]]).fetchone()
        if not seen or not seen[0]:
            raise ApprovalError(409, f"bastion {row['bastion']} has not reached the fleet approvals store for "
                                     f"{_STALE_S:g}s: its held requests are decided on {row['bastion']}")

    def record_remote_decision(self, row: Mapping[str, Any], operator: Operator) -> None:
        """The deciding bastion's own audit row for a decision about another bastion's request."""
        self.daemon.runtime.audit("approval", {
            "approval_id": row["approval_id"], "ts": datetime.now(timezone.utc), "event": row["state"],
            "session_id": row["session_id"], "request_id": row["request_id"], "identity": row["identity"],
            "target": row["target"], "rule": row["rule"], "operator": operator.name, "operator_uid": operator.uid,
            "reason": f"fleet: decided for {row['bastion']}" + (f": {row['reason']}" if row.get("reason") else ""),
            "window_s": row.get("window_s")})

    async def release(self, approval_id: str, *, still_held: bool) -> None:
        """Undo a claim whose local application was refused: the row is decidable again, or closed
        if the request is no longer held here."""
        def undo() -> None:
            with self._connect() as conn:
                conn.execute(f"UPDATE {TABLE} SET state = %s, decided_by = NULL, decided_uid = NULL, "
                             "decided_on = NULL, reason = NULL, window_s = NULL, decided_at = NULL "
                             "WHERE approval_id = %s AND decided_on = %s",
                             ["pending" if still_held else "expired", approval_id, self.bastion])
        with contextlib.suppress(Exception):
            await asyncio.to_thread(undo)

    async def pending_elsewhere(self) -> list[dict[str, Any]]:
        """Other bastions' pending requests (empty while the store is away)."""
        if not self.available:
            return []

        def fetch() -> list[dict[str, Any]]:
            with self._connect() as conn:
                rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM {TABLE} WHERE state = 'pending' AND "
                                    "bastion <> %s AND expires > now() ORDER BY created", [self.bastion]).fetchall()
            return [dict(zip(_COLUMNS, r)) for r in rows]

        try:
            rows = await asyncio.to_thread(fetch)
        except Exception as e:
            self._down(e)
            return []
        return [{"approval_id": r["approval_id"], "bastion": r["bastion"], "session_id": r["session_id"],
                 "request_id": r["request_id"], "identity": r["identity"], "target": r["target"],
                 "request": r["request"], "rule": r["rule"], "process": {"uid": r["bot_uid"]},
                 "created": r["created"].isoformat(), "expires": r["expires"].isoformat(), "approvals": [],
                 "required": r["required"]} for r in rows]
