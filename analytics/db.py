"""Opening the DuckDB file and migrating its schema."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from . import schema
from .errors import AuditError, AuditSchemaError, AuditStoreBusy

log = logging.getLogger(__name__)

# No file access beyond the database file itself: a read-only query through the
# daemon (which runs as root) must not be able to read /etc/shadow with read_text()
# or a replacement scan, nor ATTACH/COPY anything. Exports go through Arrow instead.
_CONFIG = {"enable_external_access": False}


def connect(path: str | Path, *, read_only: bool) -> duckdb.DuckDBPyConnection:
    path = Path(path)
    if read_only and not path.exists():
        raise AuditError(f"audit store {path} does not exist")
    try:
        return duckdb.connect(str(path), read_only=read_only, config=dict(_CONFIG))
    except duckdb.IOException as e:
        if "lock" in str(e).lower():
            raise AuditStoreBusy(
                f"audit store {path} is locked by another process: a running botwarden daemon is "
                "its only writer and the only way in while it runs — use `botwarden audit ...`, "
                "which goes through the daemon's control API") from e
        raise AuditError(f"cannot open audit store {path}: {e}") from e
    except duckdb.Error as e:
        raise AuditError(f"cannot open audit store {path}: {e}") from e


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """0 for an empty file."""
    exists = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    v = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
    return int(v or 0)


def existing_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    names = {r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
    return [t for t in schema.CHAINED_TABLES if t in names]


def migrate(con: duckdb.DuckDBPyConnection) -> list[tuple[int, int]]:
    """Bring the file to schema.SCHEMA_VERSION. Returns the steps applied as (from, to).

    Each step runs in its own transaction; the views are recreated in the last one.
    """
    current = schema_version(con)
    if current > schema.SCHEMA_VERSION:
        raise AuditSchemaError(
            f"audit store schema version {current} is newer than this botwarden "
            f"understands ({schema.SCHEMA_VERSION}); upgrade botwarden")
    steps = []
    for version in range(current + 1, schema.SCHEMA_VERSION + 1):
        description, statements = schema.MIGRATIONS[version]
        con.begin()
        try:
            for stmt in statements:
                con.execute(stmt)
            if version == schema.SCHEMA_VERSION:
                for view in schema.VIEWS:
                    con.execute(view)
            con.execute("INSERT INTO schema_version VALUES (?, ?, ?)",
                        [version, dt.datetime.now(dt.timezone.utc), description])
            con.commit()
        except duckdb.Error as e:
            con.rollback()
            raise AuditSchemaError(f"migration to schema version {version} failed: {e}") from e
        log.info("audit store migrated to schema version %d", version)
        steps.append((version - 1, version))
    if not steps:
        # Views carry no data: refresh them so they always match this code.
        try:
            for view in schema.VIEWS:
                con.execute(view)
        except duckdb.Error as e:
            raise AuditSchemaError(f"cannot refresh the audit views: {e}") from e
    return steps


@contextlib.contextmanager
def reader(path_or_store: Any) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to read from: a cursor of a running AuditStore, or the file opened
    read-only (which fails with AuditStoreBusy while a daemon holds it)."""
    from .store import AuditStore

    if isinstance(path_or_store, AuditStore):
        with path_or_store.reading() as cur:
            yield cur
        return
    cur = connect(path_or_store, read_only=True)
    try:
        yield cur
    finally:
        cur.close()
