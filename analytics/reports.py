"""Canned reports: read-only queries kept as ``.sql`` files in ``analytics/reports/``.

Each file starts with comment headers::

    -- title: Blocked attempts
    -- description: ...
    -- needs: pg_statements        (optional)

``needs: pg_statements`` gives the query a relation ``pg_statements(text,
statement_types VARCHAR[], destructive BOOLEAN)`` built by parsing each distinct
request text once with the PostgreSQL parser (pglast) — SQL is never matched with
patterns. Texts that do not parse (masked beyond SQL, SSH commands) are absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
from pglast import parser as pg_parser

from . import db
from .errors import UnknownReport
from .sql import run_readonly

REPORTS_DIR = Path(__file__).with_name("reports")

# Statement node tags (pglast JSON) that change or remove data or schema objects.
DESTRUCTIVE = frozenset({
    "DeleteStmt", "UpdateStmt", "MergeStmt", "TruncateStmt", "DropStmt", "DropdbStmt",
    "DropRoleStmt", "DropTableSpaceStmt", "DropOwnedStmt", "DropSubscriptionStmt", "AlterTableStmt",
})


@dataclass(frozen=True)
class Report:
    name: str
    title: str
    description: str
    needs: tuple[str, ...]
    sql: str
    path: Path


def _load(path: Path) -> Report:
    text = path.read_text()
    headers: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        key, sep, value = line[2:].strip().partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    needs = tuple(n.strip() for n in headers.get("needs", "").split(",") if n.strip())
    return Report(path.stem, headers.get("title", path.stem), headers.get("description", ""), needs, text, path)


def list_reports() -> list[Report]:
    return [_load(p) for p in sorted(REPORTS_DIR.glob("*.sql"))]


def get_report(name: str) -> Report:
    path = REPORTS_DIR / f"{name}.sql"
    if "/" in name or not path.is_file():
        known = ", ".join(r.name for r in list_reports())
        raise UnknownReport(f"no report named {name!r} (known: {known})")
    return _load(path)


@lru_cache(maxsize=65536)
def statement_types(text: str) -> tuple[str, ...] | None:
    """Every statement node tag in ``text`` (CTE bodies included), or None if it does
    not parse as PostgreSQL."""
    try:
        tree = json.loads(pg_parser.parse_sql_json(text))
    except Exception:  # pglast raises ParseError, and others on odd input; both mean "not SQL"
        return None
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k.endswith("Stmt") and k not in found:
                    found.append(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree.get("stmts", []))
    return tuple(found)


def _register_pg_statements(con: Any) -> None:
    texts = [r[0] for r in con.execute(
        "SELECT DISTINCT text FROM requests WHERE text IS NOT NULL AND kind IN ('query', 'parse')").fetchall()]
    rows_text, rows_types, rows_destr = [], [], []
    for t in texts:
        types = statement_types(t)
        if types is None:
            continue
        rows_text.append(t)
        rows_types.append(list(types))
        rows_destr.append(any(x in DESTRUCTIVE for x in types))
    con.register("pg_statements", pa.table({
        "text": pa.array(rows_text, pa.string()),
        "statement_types": pa.array(rows_types, pa.list_(pa.string())),
        "destructive": pa.array(rows_destr, pa.bool_()),
    }))


def run_report(path_or_store: Any, name: str) -> tuple[list[str], list[tuple]]:
    """Run a canned report on a file (read-only) or a running AuditStore."""
    report = get_report(name)
    with db.reader(path_or_store) as con:
        if "pg_statements" in report.needs:
            _register_pg_statements(con)
        return run_readonly(con, report.sql)
