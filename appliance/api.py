"""Routes of the control API (see docs/control-api.md). Thin: each route calls the daemon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from appliance.approvals import ApprovalError, Operator
from appliance.control import ControlError, Request, Response, Router

if TYPE_CHECKING:
    from appliance.daemon import Daemon

MAX_WINDOW_S = 24 * 3600  # the TUI's limit too (tui.model.MAX_WINDOW_MINUTES)


AUDIT_MAX_ROWS = 100_000
AUDIT_QUERY_TIMEOUT_S = 60.0


def _operator(request: Request) -> Operator:
    return Operator(request.peer.user, request.peer.uid, request.peer.pid)


def build_router(daemon: "Daemon") -> Router:
    router = Router()

    async def status(request: Request) -> Response:
        return Response(200, daemon.status())

    async def health(request: Request) -> Response:
        from appliance.health import health as gather

        return Response(200, await gather(daemon))

    async def reload(request: Request) -> Response:
        ok = await daemon.reload()
        if not ok:
            raise ControlError(400, f"reload refused: {daemon.state.last_reload_error}")
        return Response(200, {"reloaded": True, "reloads": daemon.state.reloads})

    async def sessions(request: Request) -> Response:
        active_only = request.query.get("all", ["0"])[0] in ("0", "false", "")
        return Response(200, {"sessions": daemon.runtime.sessions(active_only=active_only)})

    async def session_end(request: Request) -> Response:
        from appliance.runtime import SessionNotLive

        body = request.body or {}
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise ControlError(400, "reason must be a string")
        operator = _operator(request)
        try:
            result = daemon.runtime.end_session(request.params["session_id"], operator.name, operator.uid,
                                                reason.strip())
        except SessionNotLive as e:
            raise ControlError(404, str(e)) from None
        return Response(200, result)

    async def approvals_list(request: Request) -> Response:
        items = daemon.runtime.approvals.list()
        fleet = getattr(daemon, "fleet_approvals", None)  # None without [fleet] approvals
        if fleet is None:
            return Response(200, {"approvals": items})
        items = [{**i, "bastion": fleet.bastion} for i in items] + await fleet.pending_elsewhere()
        return Response(200, {"approvals": items, "fleet": fleet.status()})

    async def _decide(request: Request, state: str, window: int | None, reason: str, apply: Any) -> dict[str, Any]:
        """Decide here (``apply()``), or with fleet approvals claim the decision in the fleet store
        first (exactly one decision wins) and apply it here only for a request held here."""
        fleet, broker = getattr(daemon, "fleet_approvals", None), daemon.runtime.approvals
        approval_id, operator = request.params["approval_id"], _operator(request)
        item = broker.pending.get(approval_id)
        if fleet is None or (item is not None and len(item.approvals) + 1 < item.required):
            return apply()   # no fleet, or an N-of-M approval that is not the last one
        if item is None:
            from appliance.approvals import caller_is_part_of_the_bot

            why = caller_is_part_of_the_bot({}, operator.pid, operator.uid, broker.bots_cgroups, check_uid=False)
            if why is not None:
                raise ApprovalError(403, f"{state} refused: {why}; a bot may not decide held requests")
        row = await fleet.claim(approval_id, state, operator, reason, window)
        if item is not None:
            try:
                return apply()
            except ApprovalError:
                if row is not None:   # refused here after all: the request is decidable again
                    await fleet.release(approval_id, still_held=approval_id in broker.pending)
                raise
        fleet.record_remote_decision(row, operator)
        return {"approval_id": approval_id, "state": state, "bastion": row["bastion"], "window_s": window,
                "approvals": 1, "required": 1}

    async def approve(request: Request) -> Response:
        body = request.body or {}
        window = body.get("for_s")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise ControlError(400, "for_s must be a positive number of seconds")
        if window is not None and window > MAX_WINDOW_S:
            # A typo should not let a statement shape through unasked for a week.
            raise ControlError(400, f"for_s may be at most {MAX_WINDOW_S} seconds (24h)")
        reason = str(body.get("reason", ""))
        try:
            result = await _decide(request, "approved", window, reason, lambda: daemon.runtime.approvals.approve(
                request.params["approval_id"], _operator(request), window_s=window, reason=reason))
        except ApprovalError as e:
            raise ControlError(e.status, e.message) from None
        return Response(200, result)

    async def deny(request: Request) -> Response:
        body = request.body or {}
        reason = str(body.get("reason", ""))
        try:
            if not reason.strip():
                raise ApprovalError(400, "a denial needs a reason (the bot is told it)")
            result = await _decide(request, "denied", None, reason, lambda: daemon.runtime.approvals.deny(
                request.params["approval_id"], _operator(request), reason))
        except ApprovalError as e:
            raise ControlError(e.status, e.message) from None
        return Response(200, result)

    async def watch(request: Request) -> Response:
        broker = daemon.runtime.approvals
        queue = broker.subscribe()

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                yield {"event": "hello", "pending": len(broker.pending)}
                stopping = asyncio.ensure_future(daemon.stopping.wait())
                try:
                    while not daemon.stopping.is_set():
                        getter = asyncio.ensure_future(queue.get())
                        done, _ = await asyncio.wait({getter, stopping}, timeout=15,
                                                     return_when=asyncio.FIRST_COMPLETED)
                        if getter in done:
                            yield getter.result()
                        else:
                            getter.cancel()
                            if stopping not in done:
                                yield {"event": "keepalive"}
                    yield {"event": "daemon_stopping"}
                finally:
                    stopping.cancel()
            finally:
                broker.unsubscribe(queue)

        return Response(200, stream=events())

    async def session_replay(request: Request) -> Response:
        """A recorded session for the console's player (appliance/recordings/render.py)."""
        from analytics import AuditError
        from appliance.recordings.load import load_session
        from appliance.recordings.render import replay_document

        session_id = request.params["session_id"]

        def build() -> dict | None:
            rec = load_session(lambda sql, params: daemon.audit.query(sql, params, max_rows=AUDIT_MAX_ROWS,
                                                                      timeout=AUDIT_QUERY_TIMEOUT_S), session_id)
            return None if rec is None else replay_document(rec)

        try:
            doc = await asyncio.to_thread(build)
        except AuditError as e:
            raise _audit_failure(e) from None
        if doc is None:
            raise ControlError(404, f"no session {session_id!r} in the audit store")
        return Response(200, doc)

    async def audit_sql(request: Request) -> Response:
        body = request.body or {}
        sql = body.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise ControlError(400, "body must be {\"sql\": \"SELECT ...\"}")
        cols, rows = await _audit_query(daemon, sql, body.get("params"))
        return Response(200, {"columns": cols, "rows": rows})

    async def audit_report(request: Request) -> Response:
        from analytics import AuditError, UnknownReport

        name = request.params["name"]
        try:
            cols, rows = await asyncio.to_thread(daemon.audit.report, name)
        except UnknownReport as e:
            raise ControlError(404, str(e)) from None
        except AuditError as e:
            raise _audit_failure(e) from None
        return Response(200, {"columns": cols, "rows": _jsonable_rows(rows)})

    async def audit_verify(request: Request) -> Response:
        from analytics import AuditError

        body = request.body or {}
        anchors = _anchors(body.get("anchors"))
        try:
            report = await asyncio.to_thread(daemon.audit.verify, anchors)
        except AuditError as e:
            raise _audit_failure(e) from None
        allow_gaps = bool(body.get("allow_gaps", False))
        return Response(200, {"ok": report.ok, "clean": report.clean, "passes": report.passes(allow_gaps),
                              "missing_events": report.missing_events, "report": report.text(allow_gaps)})

    async def audit_export(request: Request) -> Response:
        from datetime import date
        from pathlib import Path

        from analytics import AuditError

        body = request.body or {}
        try:
            since = date.fromisoformat(str(body.get("since")))
        except ValueError:
            raise ControlError(400, "since must be a date (YYYY-MM-DD)") from None
        out_dir = Path(str(body.get("dir") or ""))
        if not out_dir.is_absolute():
            raise ControlError(400, "dir must be an absolute path")
        try:
            files = await asyncio.to_thread(daemon.audit.export, since, out_dir)
        except AuditError as e:
            raise _audit_failure(e) from None
        return Response(200, {"files": [str(f) for f in files]})

    async def flush(request: Request) -> Response:
        from analytics import AuditError

        try:
            await daemon.flush_audit()
        except AuditError as e:  # the store is down or behind: say so, it is not the daemon's bug
            raise _audit_failure(e) from None
        return Response(200, {"flushed": True})

    async def probes_attach(request: Request) -> Response:
        from appliance.errors import BotwardenError

        try:
            probes = await daemon.reattach_probes()
        except BotwardenError as e:
            raise ControlError(409, str(e)) from None
        return Response(200, {"probes": probes})

    async def metrics(request: Request) -> Response:
        from appliance.metrics import CONTENT_TYPE_LATEST

        return Response(200, daemon.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    router.add("GET", "/metrics", metrics)
    router.add("GET", "/v1/status", status)
    router.add("GET", "/v1/health", health)
    router.add("POST", "/v1/probes/attach", probes_attach)
    router.add("POST", "/v1/reload", reload)
    router.add("GET", "/v1/sessions", sessions)
    router.add("GET", "/v1/sessions/{session_id}/replay", session_replay)
    router.add("POST", "/v1/sessions/{session_id}/end", session_end)
    router.add("GET", "/v1/approvals", approvals_list)
    router.add("GET", "/v1/approvals/watch", watch)
    router.add("POST", "/v1/approvals/{approval_id}/approve", approve)
    router.add("POST", "/v1/approvals/{approval_id}/deny", deny)
    router.add("POST", "/v1/audit/sql", audit_sql)
    router.add("POST", "/v1/audit/flush", flush)
    router.add("POST", "/v1/audit/verify", audit_verify)
    router.add("POST", "/v1/audit/export", audit_export)
    router.add("GET", "/v1/audit/reports/{name}", audit_report)
    return router


async def _audit_query(daemon: "Daemon", sql: str, params: Any) -> tuple[list[str], list[list[Any]]]:
    from analytics import AuditError

    try:
        # Bounded, so one operator's query cannot occupy the daemon.
        cols, rows = await asyncio.to_thread(daemon.audit.query, sql, params, max_rows=AUDIT_MAX_ROWS,
                                             timeout=AUDIT_QUERY_TIMEOUT_S)
    except AuditError as e:  # read-only violations, SQL errors: the operator's to fix (400)
        raise _audit_failure(e) from None
    return cols, _jsonable_rows(rows)


MAX_ANCHORS = 5_000  # chain positions per verify request (the CLI picks which: the last always)


def _anchors(value: Any) -> dict[int, str] | None:
    """``anchors`` of a verify request: {"<seq>": "<64 hex digits>", ...} (None when absent)."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_ANCHORS:
        raise ControlError(400, f"anchors must be an object of at most {MAX_ANCHORS} seq: hash pairs")
    out: dict[int, str] = {}
    for seq, h in value.items():
        if not (isinstance(seq, str) and seq.isdigit() and int(seq) > 0 and isinstance(h, str) and len(h) == 64
                and all(c in "0123456789abcdef" for c in h)):
            raise ControlError(400, f"anchors: {str(seq)[:20]!r} must be a chain seq with a 64-digit lowercase hex hash")
        out[int(seq)] = h
    return out


def _audit_failure(e: Exception) -> ControlError:
    """An audit call failed: 503 when the store itself is down or closed (try again later),
    400 when the request was at fault (a write in audit SQL, a bad SQL statement, ...)."""
    from analytics import AuditClosedError, AuditWriterError

    return ControlError(503 if isinstance(e, (AuditWriterError, AuditClosedError)) else 400, str(e))


def _jsonable_rows(rows: list[tuple]) -> list[list[Any]]:
    out = []
    for row in rows:
        out.append([v.hex() if isinstance(v, (bytes, bytearray, memoryview)) else v for v in row])
    return out
