"""Read-only SQL over the audit store, and rendering results as table, CSV or JSON.

Only ``SELECT`` statements run (this includes ``WITH``, ``FROM``-first, ``VALUES``,
``DESCRIBE``, ``SHOW`` and ``SUMMARIZE``, which DuckDB's parser classifies as
SELECT). The check uses DuckDB's own parser (``extract_statements``), never a
pattern over the text. On a file no daemon holds, the connection is also opened
with ``read_only=True``; on the live store the statement check is what keeps a
query from writing, and the database has external (file) access disabled, so a
query can neither read other files nor ATTACH/COPY.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import io
import json
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import duckdb

from . import db
from .errors import AuditQueryError, ReadOnlyViolation

_ALLOWED = {duckdb.StatementType.SELECT}


def check_readonly(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """Return the single statement in ``sql`` if it is a read; raise otherwise."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise AuditQueryError(f"cannot parse query: {e}") from e
    if len(statements) != 1:
        raise AuditQueryError(f"expected exactly one statement, got {len(statements)}")
    st = statements[0]
    if st.type not in _ALLOWED:
        raise ReadOnlyViolation(
            f"refused: {st.type.name} statement; the audit store only accepts read-only "
            "queries (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE)")
    return st.query


def run_readonly(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence | None = None,
                 *, max_rows: int | None = None, timeout: float | None = None) -> tuple[list[str], list[tuple]]:
    """Check and run one read on ``con``. ``timeout`` (seconds) interrupts a long query
    so an operator's query cannot occupy the daemon indefinitely."""
    query = check_readonly(con, sql)
    timer = None
    if timeout is not None:
        timer = threading.Timer(timeout, con.interrupt)
        timer.daemon = True
        timer.start()
    try:
        cur = con.execute(query, params) if params is not None else con.execute(query)
        if cur.description is None:
            return [], []
        columns = [d[0] for d in cur.description]
        rows = cur.fetchall() if max_rows is None else cur.fetchmany(max_rows)
    except duckdb.InterruptException as e:
        raise AuditQueryError(f"query interrupted after {timeout}s") from e
    except duckdb.Error as e:
        raise AuditQueryError(f"query failed: {e}") from e
    finally:
        if timer is not None:
            timer.cancel()
    return columns, rows


def query_readonly(path: str | Path, sql: str, params: Sequence | None = None,
                   *, max_rows: int | None = None, timeout: float | None = None) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement on an audit file no daemon holds.

    Raises AuditStoreBusy while the daemon holds the file: go through the daemon then.
    """
    con = db.connect(path, read_only=True)
    try:
        return run_readonly(con, sql, params, max_rows=max_rows, timeout=timeout)
    finally:
        con.close()


# --- output ------------------------------------------------------------------

Format = Literal["table", "csv", "json"]


def _json_value(v: Any) -> Any:
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, (decimal.Decimal, uuid.UUID)):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(_json_value(v), separators=(",", ":"))
    return str(v)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: Format = "table") -> str:
    """Render a query result. ``table``: aligned columns with a header rule (numbers
    right-aligned, NULL empty); ``csv``: RFC 4180 with a header row; ``json``: a list
    of objects (timestamps ISO 8601, bytes base64)."""
    if fmt == "json":
        return json.dumps([{c: _json_value(v) for c, v in zip(columns, r)} for r in rows], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([_text(v) for v in r])
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r} (table, csv, json)")
    cells = [[_text(v).replace("\n", "\\n") for v in r] for r in rows]
    numeric = [all(isinstance(r[i], (int, float, decimal.Decimal)) and not isinstance(r[i], bool)
                   for r in rows if r[i] is not None) and any(r[i] is not None for r in rows)
               for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out) + "\n"
