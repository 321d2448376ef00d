"""A recorded session as text: PostgreSQL the way psql shows it, SSH as its terminal stream,
Kubernetes as a request log; with the audit's decisions, rules and approvals inline (pure).

``pg_lines`` yields (when, line) pairs: psql's own lines (``psql -e``: each statement echoed,
result tables in the aligned format, command tags, ``ERROR:``/``NOTICE:`` lines, ``Time:``) and
botwarden's lines, which start with ``-- `` (a SQL comment, so the transcript stays valid SQL
around them). ``when`` is the statement's start (from its requests row where one matches),
for pacing a replay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterator

from appliance.protocols.postgres import messages as m

from .load import SessionRecord
from .pgstream import Exchange, PgSession, Result, exchanges

# psql right-aligns these types (print.c column_type_alignment).
_NUMERIC_OIDS = frozenset({20, 21, 23, 26, 28, 29, 700, 701, 790, 1700, 5069})
NOTE = "-- "

Line = tuple["datetime | None", str]


def _center(text: str, width: int) -> str:
    pad = width - len(text)
    left = pad // 2
    return " " * left + text + " " * (pad - left)


def table_lines(res: Result) -> list[str]:
    """A result in psql's aligned format (border 1), with its row count footer."""
    cols = res.columns or []
    names = [c[0] for c in cols]
    right = [oid in _NUMERIC_OIDS for _, oid in cols]
    rows = [["" if v is None else v for v in r] for r in res.rows]
    widths = [max([len(n)] + [len(r[i]) for r in rows if i < len(r)]) for i, n in enumerate(names)]
    out = [" " + " | ".join(_center(n, w) for n, w in zip(names, widths)) + " ",
           "+".join("-" * (w + 2) for w in widths)]
    last = len(names) - 1
    for r in rows:
        cells = []
        for i, w in enumerate(widths):
            v = r[i] if i < len(r) else ""
            if right[i]:
                cells.append(v.rjust(w))
            else:
                cells.append(v if i == last else v.ljust(w))
        out.append(" " + " | ".join(cells))
    if res.not_recorded:
        out.append(_not_recorded_note(res))
    n = len(rows) + res.not_recorded
    out.append(f"({n} row{'' if n == 1 else 's'})")
    out.append("")
    return out


def _position_lines(query: str, position: str | None) -> list[str]:
    """psql's ``LINE n:`` and caret for an error with a position (short lines only)."""
    if not position or not position.isdigit() or not query:
        return []
    pos = int(position) - 1
    if pos > len(query):
        return []
    start = query.rfind("\n", 0, pos) + 1
    end = query.find("\n", pos)
    line = query[start:end if end >= 0 else len(query)]
    number = query.count("\n", 0, start) + 1
    prefix = f"LINE {number}: "
    return [prefix + line, " " * (len(prefix) + pos - start) + "^"]


def error_lines(err: m.ErrorResponse | m.NoticeResponse, query: str = "") -> list[str]:
    """An error or notice as psql prints it (default verbosity; CONTEXT for errors only)."""
    severity = err.get("S") or err.severity or "ERROR"
    out = [f"{severity}:  {err.message or ''}"]
    if isinstance(err, m.ErrorResponse):
        out += _position_lines(query, err.get("P"))
    for code, label in (("D", "DETAIL"), ("H", "HINT")):
        v = err.get(code)
        if v:
            out.append(f"{label}:  {v}")
    if isinstance(err, m.ErrorResponse) and err.get("W"):
        out.append(f"CONTEXT:  {err.get('W')}")
    return out


def _not_recorded_note(res: Result) -> str:
    return (f"{NOTE}botwarden: {res.not_recorded} {'more ' if res.rows else ''}row{'' if res.not_recorded == 1 else 's'} "
            f"({res.not_recorded_bytes} bytes) reached the bot but are not recorded: past "
            f"[audit] recording_result_bytes ({res.max_bytes} bytes of rows per result)")


def _result_lines(res: Result) -> list[str]:
    tag = res.tag or ""
    if res.columns is not None:
        lines = table_lines(res)
        if tag.split(" ")[0] in ("INSERT", "UPDATE", "DELETE", "MERGE"):
            lines.append(tag)   # psql shows the status of a RETURNING statement too
        return lines
    lines = [_not_recorded_note(res)] if res.not_recorded else []   # a COPY TO STDOUT's rows
    return lines + [tag] if tag else lines


def _decision_note(req: dict[str, Any]) -> str:
    decision = req.get("decision") or "?"
    text = f"{NOTE}botwarden: {decision}"
    if req.get("rule"):
        text += f" (rule {req['rule']})"
    if req.get("reason") and decision != "allow":
        text += f": {req['reason']}"
    masked = req.get("masked")
    if masked:
        if isinstance(masked, str):
            try:
                masked = json.loads(masked)
            except ValueError:
                pass
        if isinstance(masked, dict):
            text += "; masked " + ", ".join(f"{k}×{v}" for k, v in masked.items())
        elif isinstance(masked, list):
            text += "; masked " + ", ".join(f"{e.get('key')}×{e.get('value')}" if isinstance(e, dict) else str(e)
                                             for e in masked)
        else:
            text += f"; masked {masked}"
    return text


def _approval_notes(approvals: list[dict[str, Any]], request_id: str | None) -> list[str]:
    out = []
    for a in approvals:
        if request_id is None or a.get("request_id") != request_id:
            continue
        who = f" by {a['operator']}" if a.get("operator") else ""
        why = f": {a['reason']}" if a.get("reason") else ""
        out.append(f"{NOTE}approval {a['approval_id']} {a['event']}{who}{why}")
    return out


class _Requests:
    """The session's requests rows, matched to the recorded statements in order by their
    (redacted, identical) text."""

    LOOKAHEAD = 16

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows
        self.pos = 0

    def match(self, text: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """(requests passed over, the request for ``text`` or None)."""
        for i in range(self.pos, min(len(self.rows), self.pos + self.LOOKAHEAD)):
            if (self.rows[i].get("text") or "") == text:
                skipped = self.rows[self.pos:i]
                self.pos = i + 1
                return skipped, self.rows[i]
        return [], None

    def rest(self) -> list[dict[str, Any]]:
        out = self.rows[self.pos:]
        self.pos = len(self.rows)
        return out


def header_lines(rec: SessionRecord) -> list[str]:
    s = rec.session
    return [f"{NOTE}session {s['session_id']}: identity {s.get('identity')} → {s.get('target')} "
            f"({s.get('protocol')}) as {s.get('credential_user')}",
            f"{NOTE}process pid {s.get('pid')} exe {s.get('exe')} cgroup {s.get('cgroup_path')}",
            f"{NOTE}{s.get('started_at')} → {s.get('ended_at') or 'still open'} ({s.get('outcome') or 'active'})"]


def _event_note(doc: dict[str, Any]) -> str:
    if doc.get("type") == "truncated":
        return (f"{NOTE}botwarden: the recording stops here: the session reached [audit] recording_max_bytes "
                f"({doc.get('max_bytes')} bytes)")
    return f"{NOTE}event {json.dumps(doc, sort_keys=True)}"


def _request_note_lines(req: dict[str, Any], approvals: list[dict[str, Any]]) -> list[str]:
    """A request the recording does not show (metadata-only target, or beyond the cap)."""
    lines = [f"{NOTE}[{req.get('decision')}] {req.get('text')}" + (f" (rule {req['rule']})" if req.get("rule") else "")]
    if req.get("error"):
        lines.append(f"{NOTE}  error: {req['error']}")
    elif req.get("rows") is not None:
        lines.append(f"{NOTE}  {req['rows']} row(s)")
    return lines + _approval_notes(approvals, req.get("request_id"))


@dataclass
class Step:
    """One statement of a PostgreSQL session (or the session's header): its start, its text, the
    decision, and the lines psql showed for it with botwarden's notes."""

    ts: datetime | None
    title: str
    decision: str | None = None
    lines: list[str] = field(default_factory=list)

    def timed_lines(self) -> Iterator[Line]:
        for i, line in enumerate(self.lines):
            yield (self.ts if i == 0 else None), line


def pg_steps(rec: SessionRecord) -> list[Step]:
    """A PostgreSQL session as psql would have shown it, statement by statement (the first step
    is the session's header), with botwarden's notes."""
    ses: PgSession = exchanges(rec.recordings)
    head = Step(None, "session", lines=header_lines(rec))
    steps = [head]
    st = ses.startup
    if st:
        params = st.get("parameters", {})
        head.lines.append(f"{NOTE}connected: user={params.get('user')} database={params.get('database', params.get('user'))}"
                          f" application_name={params.get('application_name', '')} tls={'yes' if st.get('tls') else 'no'}"
                          f" authentication={st.get('authentication')} (the password is not recorded);"
                          f" recording {st.get('recording')}")
    elif not rec.recordings:
        head.lines.append(f"{NOTE}no recording for this session; its statements from the audit:")
    requests = _Requests(rec.requests)
    for item in ses.before:
        if item[0] in ("notice", "error"):
            head.lines += error_lines(item[1])
    truncated = [(ts, doc) for ts, doc in ses.events if doc.get("type") == "truncated"]

    def audit_only(req: dict[str, Any]) -> None:
        steps.append(Step(req.get("ts"), req.get("text") or "", req.get("decision"),
                          _request_note_lines(req, rec.approvals)))

    for ex in ses.exchanges:
        if ex.kind == "terminate":
            continue
        skipped, req = requests.match(ex.text)
        for other in skipped:
            audit_only(other)
        step = Step((req or {}).get("ts") or ex.sent_at, ex.text, (req or {}).get("decision"),
                    list(_exchange_lines(ex, req, rec.approvals)))
        steps.append(step)
        if ex.status is None and truncated:   # the answer is beyond the cap: say so where it stops
            step.lines.append(_event_note(truncated.pop(0)[1]))
    if st and st.get("recording") == "metadata" and rec.requests:
        head.lines.append(f"{NOTE}this target records metadata only (record = \"metadata\"); its statements "
                          "from the audit:")
    if truncated:
        steps.append(Step(truncated[0][0], "recording truncated", lines=[_event_note(d) for _, d in truncated]))
    for req in requests.rest():
        audit_only(req)
    others = [_event_note(doc) for _, doc in ses.events if doc.get("type") != "truncated"]
    if others:
        steps.append(Step(None, "events", lines=others))
    return steps


def pg_lines(rec: SessionRecord) -> Iterator[Line]:
    """A PostgreSQL session as psql would have shown it, with botwarden's notes."""
    for step in pg_steps(rec):
        yield from step.timed_lines()


def _exchange_lines(ex: Exchange, req: dict[str, Any] | None, approvals: list[dict[str, Any]]) -> Iterator[str]:
    yield from (ex.text or "").split("\n")
    if ex.params:
        yield f"{NOTE}parameters: " + ", ".join(f"${i + 1}={'NULL' if p is None else repr(p)}"
                                                for i, p in enumerate(ex.params))
    if req is not None:
        yield _decision_note(req)
        yield from _approval_notes(approvals, req.get("request_id"))
    for kind, value in ex.items:
        if kind == "result":
            lines = _result_lines(value)
        elif kind in ("error", "notice"):
            lines = error_lines(value, ex.text)
        elif kind == "notification":
            lines = [f'Asynchronous notification "{value.channel}" with payload "{value.payload}" received '
                     f"from server process with PID {value.pid}."]
        else:
            lines = []
        yield from lines
    if req is not None and req.get("duration_ms") is not None:
        yield f"Time: {float(req['duration_ms']):.3f} ms"
    if ex.status is None:
        yield f"{NOTE}(no complete answer recorded: the session or its recording ended here)"


def request_log_lines(rec: SessionRecord) -> Iterator[Line]:
    """Any session as its request log (Kubernetes; SSH commands), with approvals."""
    for line in header_lines(rec):
        yield None, line
    for req in rec.requests:
        yield from _request_log_entry(req, rec.approvals)


def terminal_chunks(rec: SessionRecord) -> Iterator[tuple[datetime | None, bytes]]:
    """An SSH (or exec) session's terminal output as the bot saw it: the "out" rows, in order.
    For Kubernetes only the rows of exec/attach streams (between an ``exec``/``attach`` event and
    its ``*_end``); the other "out" rows are response bodies."""
    streaming = rec.protocol != "k8s"
    for r in rec.recordings:
        if r["direction"] == "out":
            if streaming:
                yield r["ts"], r["data"]
        elif r["direction"] == "event":
            try:
                doc = json.loads(r["data"].decode())
            except ValueError:
                continue
            if rec.protocol == "k8s" and doc.get("type") in ("exec", "attach", "exec_end", "attach_end"):
                streaming = doc["type"] in ("exec", "attach")
            if doc.get("type") == "truncated":
                yield r["ts"], ("\r\n" + _event_note(doc) + "\r\n").encode()
            elif doc.get("event") in ("sftp", "sftp_end"):
                yield r["ts"], ("\r\n" + _sftp_note(doc) + "\r\n").encode()


def _sftp_note(doc: dict[str, Any]) -> str:
    """A file the bot opened over SFTP (appliance/fronts/ssh_sftp.py): what follows an ``sftp``
    note up to its ``sftp_end`` is the download's content, as recorded (detectors applied)."""
    what = f"{NOTE}sftp {doc.get('op')} {doc.get('path')!r}"
    if doc.get("event") == "sftp":
        return what
    note = f"{what} closed: {doc.get('read_bytes', 0)} bytes read, {doc.get('written_bytes', 0)} bytes written"
    if doc.get("written_bytes"):
        note += " (uploads are counted, not recorded)"
    return note + (f", size {doc['size']}" if doc.get("size") is not None else "")


def replay_document(rec: SessionRecord) -> dict[str, Any]:
    """What a console needs to step through or play a session (the control API's
    ``GET /v1/sessions/{id}/replay``): steps (PostgreSQL statements, or requests), and for a
    session with a terminal recording its output chunks, in order, with their times."""
    import codecs

    def iso(v: Any) -> Any:
        return v.isoformat() if isinstance(v, datetime) else v

    if rec.protocol == "postgresql":
        steps = pg_steps(rec)
    else:
        steps = [Step(None, "session", lines=header_lines(rec))]
        for req in rec.requests:
            steps.append(Step(req.get("ts"), req.get("text") or "", req.get("decision"),
                              [line for _, line in _request_log_entry(req, rec.approvals)]))
    terminal: list[dict[str, Any]] = []
    size = None
    if rec.protocol != "postgresql":
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for ts, chunk in terminal_chunks(rec):
            text = decoder.decode(chunk)
            if text:
                terminal.append({"ts": iso(ts), "text": text})
        for r in rec.recordings:
            if r["direction"] == "event":
                try:
                    doc = json.loads(r["data"].decode())
                except ValueError:
                    continue
                if (doc.get("type") or doc.get("event")) == "pty":   # the SSH front's key is "event"
                    size = [doc.get("width"), doc.get("height")]
                    break
    return {"session": {k: iso(v) for k, v in rec.session.items()}, "protocol": rec.protocol,
            "steps": [{"ts": iso(s.ts), "title": s.title, "decision": s.decision, "lines": s.lines} for s in steps],
            "terminal": terminal, "terminal_size": size}


def _request_log_entry(req: dict[str, Any], approvals: list[dict[str, Any]]) -> Iterator[Line]:
    line = f"{req.get('ts')}  [{req.get('decision'):>7}] {req.get('text')}"
    if req.get("rule"):
        line += f"   (rule {req['rule']})"
    if req.get("error"):
        line += f"   error: {req['error']}"
    elif req.get("rows") is not None:
        line += f"   → {req['rows']}"
    if req.get("duration_ms") is not None:
        line += f"   {float(req['duration_ms']):.1f} ms"
    yield req.get("ts"), line
    for note in _approval_notes(approvals, req.get("request_id")):
        yield None, note
