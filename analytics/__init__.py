"""The audit store: DuckDB schema, the single writer, integrity checks, read-only SQL,
canned reports, Parquet export and retention. Imports nothing from ``appliance``.

Public API (see docs/audit-schema.md)::

    AuditStore(path, batch_max=2000, flush_interval=0.2, queue_max=100_000, on_full="refuse")
    verify(path) -> VerifyReport
    query_readonly(path, sql, params=None) -> (columns, rows)
    format_table(columns, rows, fmt="table" | "csv" | "json") -> str
    reports.list_reports() / reports.run_report(path_or_store, name)
    export_parquet(path_or_store, since, out_dir) -> list[Path]
    apply_retention(path_or_store, older_than) -> RetentionResult
"""

from . import reports
from .errors import (
    AuditClosedError,
    AuditError,
    AuditFlushTimeout,
    AuditQueryError,
    AuditRecordError,
    AuditSchemaError,
    AuditStoreBusy,
    AuditWriterError,
    ReadOnlyViolation,
    UnknownReport,
)
from .export import export_parquet
from .retention import RetentionResult, apply_retention
from .schema import SCHEMA_VERSION
from .sql import format_table, query_readonly
from .store import AuditStore
from .verify import Gap, Problem, VerifyReport, verify

__all__ = [
    "SCHEMA_VERSION", "AuditClosedError", "AuditError", "AuditFlushTimeout", "AuditQueryError",
    "AuditRecordError", "AuditSchemaError", "AuditStore", "AuditStoreBusy", "AuditWriterError", "Gap",
    "Problem", "ReadOnlyViolation", "RetentionResult", "UnknownReport", "VerifyReport", "apply_retention",
    "export_parquet", "format_table", "query_readonly", "reports", "verify",
]
