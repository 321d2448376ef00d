"""Errors raised by the audit store.

``analytics`` may not import ``appliance``, so the root here is :class:`AuditError`;
the appliance wraps it where it crosses into code that expects
``appliance.errors.BotwardenError``. Messages name fields, tables and files — never a
record's values, which may be sensitive even after masking.
"""

from __future__ import annotations


class AuditError(Exception):
    """Root of every error the audit store raises on purpose."""


class AuditRecordError(AuditError):
    """A submitted record does not match its kind's schema (the producer's bug)."""


class AuditClosedError(AuditError):
    """The store is not running (submit before start() or after close())."""


class AuditWriterError(AuditError):
    """The writer thread could not make events durable."""


class AuditFlushTimeout(AuditWriterError):
    """flush() did not see every submitted event written within its timeout."""


class AuditSchemaError(AuditError):
    """The file's schema is newer than this code, or a migration failed."""


class AuditStoreBusy(AuditError):
    """The file is held by a writer (the daemon); read it through the daemon instead."""


class ReadOnlyViolation(AuditError):
    """A statement other than a read was refused."""


class AuditQueryError(AuditError):
    """A read-only query failed (syntax error, unknown table, ...)."""


class UnknownReport(AuditError):
    """No canned report has that name."""
