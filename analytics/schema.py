"""The audit schema: event kinds, their tables and columns, and the migrations.

Every event kind lands in its own append-only table. Each row also carries the
integrity chain columns (``chain_seq``, ``chain_prev``, ``chain_hash``; see
:mod:`analytics.chain`). Nothing is ever updated in place: a session's end is its
own row in ``session_ends`` and the ``sessions`` view joins the two.

Migrations may only add tables, nullable columns and views: the row hash omits
NULL columns, so adding a column leaves every existing row's hash valid. A change
that would rewrite existing values needs a new chain segment (a retention-style
checkpoint) and is not done by a migration.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

from .compiled import load as load_compiled
from .errors import AuditRecordError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5

EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ONE_US = dt.timedelta(microseconds=1)

# Column "types" drive validation, the DuckDB type, the Arrow type and the
# canonical form used for hashing.
SQL_TYPES = {
    "str": "VARCHAR",
    "int": "BIGINT",
    "float": "DOUBLE",
    "bool": "BOOLEAN",
    "ts": "TIMESTAMPTZ",
    "bytes": "BLOB",
    "str_list": "VARCHAR[]",
    "count_map": "MAP(VARCHAR, BIGINT)",
}

CHAIN_COLUMNS = ("chain_seq", "chain_prev", "chain_hash")


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    required: bool = False
    choices: frozenset[str] | None = None


def _f(name: str, type_: str = "str", required: bool = False, choices: tuple[str, ...] | None = None) -> Field:
    return Field(name, type_, required, frozenset(choices) if choices else None)


@dataclass(frozen=True)
class Kind:
    """One event kind: the name producers submit and the table it is stored in."""

    kind: str
    table: str
    fields: tuple[Field, ...]

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @cached_property
    def spec(self) -> tuple[tuple[str, str, bool, frozenset[str] | None], ...]:
        # Plain tuples: normalize() runs on the producer's thread for every event.
        return tuple((f.name, f.type, f.required, f.choices) for f in self.fields)

    @cached_property
    def bytes_columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.type == "bytes")

    @cached_property
    def hash_row(self) -> Callable[[bytes, Sequence[Any]], bytes]:
        """``hash_row(chain_prev, row)``: the row's chain_hash (analytics.chain), BLOBs hashed
        without their canonical JSON."""
        from .chain import compile_row_hasher

        return compile_row_hasher(self.names, self.bytes_columns, self.hash_prefix,
                                  types=tuple(f.type for f in self.fields))

    @cached_property
    def hash_prefix(self) -> bytes:
        """What follows chain_prev in the hashed bytes (see analytics.chain)."""
        return self.table.encode() + b"\n"


KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind("session_start", "session_starts", (
            _f("session_id", required=True), _f("ts", "ts", True), _f("target", required=True),
            _f("protocol", required=True), _f("identity"), _f("token_subject"), _f("token_kid"),
            _f("client_addr"), _f("target_addr"), _f("pid", "int"), _f("uid", "int"), _f("gid", "int"),
            _f("cgroup_id", "int"), _f("cgroup_path"), _f("exe"), _f("comm"),
            _f("attribution_source", choices=("ebpf", "nftables", "peercred", "none")),
            _f("credential_user"), _f("lease_id"), _f("tls", "bool"),
            _f("credential_stale_s", "float"), _f("privileged", "bool"),
        )),
        Kind("session_end", "session_ends", (
            _f("session_id", required=True), _f("ts", "ts", True), _f("bytes_in", "int"),
            _f("bytes_out", "int"),
            _f("outcome", choices=("ok", "refused", "error", "terminated", "crashed", "revoke_failed")),
            _f("error"),
            # How many request events the session emitted (the last request's seq): verify checks
            # that every one of them is on record.
            _f("requests", "int"),
        )),
        Kind("request", "requests", (
            _f("request_id", required=True), _f("session_id", required=True), _f("ts", "ts", True),
            _f("protocol", required=True), _f("kind"), _f("text"), _f("params", "str_list"),
            _f("decision", choices=("allow", "block", "approve", "mask", "deny")), _f("rule"),
            _f("reason"), _f("duration_ms", "float"), _f("rows", "int"), _f("error"), _f("sqlstate"),
            _f("masked", "count_map"),
            # 1, 2, 3... per session in the order the requests were decided (a request_start and its
            # requests row share one): a seq on record in neither table is a lost event.
            _f("seq", "int"),
            # Affected-rows guard (rules with max_rows): the planner's estimate and the limit.
            _f("row_estimate", "int"), _f("row_limit", "int"),
        )),
        # audit.mode = "strict": written (and acknowledged by the audit process) before the
        # request is forwarded to the target; its `requests` row follows when it completes.
        Kind("request_start", "request_starts", (
            _f("request_id", required=True), _f("session_id", required=True), _f("ts", "ts", True),
            _f("protocol", required=True), _f("kind"), _f("text"), _f("params", "str_list"),
            _f("decision", choices=("allow", "block", "approve", "mask", "deny")), _f("rule"),
            _f("seq", "int"),   # the seq its requests row will carry
        )),
        # Events a crash may have cost, found when botwarden started again: per session, how
        # many request events were issued and how many reached the store.
        Kind("audit_loss", "audit_losses", (
            _f("ts", "ts", True), _f("cause", required=True, choices=("daemon_crash", "audit_crash", "worker_crash")),
            _f("session_id"), _f("issued_seq", "int"), _f("recorded_seq", "int"),
            _f("missing", "int", True), _f("session_end_missing", "bool"), _f("detail"),
        )),
        Kind("approval", "approvals", (
            _f("approval_id", required=True), _f("ts", "ts", True),
            _f("event", required=True, choices=(
                "requested", "notified", "approved", "denied", "expired", "abandoned",
                "cancelled_restart", "approved_partial", "notify_failed", "decision_refused")),
            _f("request_id"), _f("session_id"), _f("identity"), _f("target"), _f("rule"),
            _f("operator"), _f("operator_uid", "int"), _f("reason"), _f("waited_ms", "float"),
            _f("window_s", "int"),
        )),
        Kind("probe", "probes", (
            _f("ts", "ts", True),
            _f("event", required=True, choices=("denied_connect", "redirected", "attached", "detached",
                                                "admission_refused", "left_cgroup", "protocol_refused")),
            _f("pid", "int"), _f("uid", "int"), _f("gid", "int"), _f("cgroup_id", "int"),
            _f("cgroup_path"), _f("comm"), _f("exe"), _f("dst_addr"), _f("dst_port", "int"),
            _f("family", choices=("ipv4", "ipv6", "unix")), _f("detail"),
        )),
        Kind("recording", "recordings", (
            _f("session_id", required=True), _f("seq", "int", True), _f("ts", "ts", True),
            _f("direction", required=True, choices=("in", "out", "event")), _f("data", "bytes"),
        )),
        # Written by the store itself, never submitted by producers.
        Kind("writer_event", "writer_events", (
            _f("ts", "ts", True),
            _f("event", required=True, choices=("writer_start", "writer_stop", "migration", "retention")),
            _f("epoch", "int"), _f("pid", "int"), _f("host"), _f("schema_version", "int"),
            _f("batch_max", "int"), _f("flush_interval", "float"), _f("queue_max", "int"),
            _f("rows", "int"), _f("anchor_seq", "int"), _f("anchor_hash"), _f("removed_rows", "int"),
            _f("cutoff", "ts"), _f("detail"),
            # writer_stop: chain_seq of the epoch's last row before it. writer_start after an epoch
            # that ended abruptly: that epoch's number, the events it had committed, and how many
            # more this writer replayed from its journal (strict mode).
            _f("last_seq", "int"), _f("prev_epoch", "int"), _f("prev_epoch_rows", "int"),
            _f("replayed_rows", "int"),
        )),
    )
}

PRODUCER_KINDS = frozenset(k for k in KINDS if k != "writer_event")
CHAINED_TABLES: tuple[str, ...] = tuple(k.table for k in KINDS.values())
KIND_BY_TABLE = {k.table: k for k in KINDS.values()}


def to_epoch_us(value: dt.datetime) -> int:
    return (value - EPOCH_UTC) // _ONE_US


def from_epoch_us(value: int) -> dt.datetime:
    return EPOCH_UTC + dt.timedelta(microseconds=value)


def _bad(kind: str, field: str, why: str) -> AuditRecordError:
    # Never include the value: it may be sensitive.
    return AuditRecordError(f"{kind}.{field}: {why}")


def _utf8(kind: str, name: str, v: str) -> None:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(kind, name, "string is not valid UTF-8 (lone surrogate)") from None


def _check_int(kind: str, name: str, v: Any) -> int:
    if type(v) is not int:
        raise _bad(kind, name, f"expected int, got {type(v).__name__}")
    if not -(2**63) <= v < 2**63:
        raise _bad(kind, name, "integer out of 64-bit range")
    return v


def _check_float(kind: str, name: str, v: Any) -> float:
    if type(v) is int:
        return float(v)
    raise _bad(kind, name, f"expected float, got {type(v).__name__}")


def _check_bool(kind: str, name: str, v: Any) -> bool:
    if type(v) is not bool:
        raise _bad(kind, name, f"expected bool, got {type(v).__name__}")
    return v


def _check_bytes(kind: str, name: str, v: Any) -> bytes:
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if type(v) is not bytes:
        raise _bad(kind, name, f"expected bytes, got {type(v).__name__}")
    return v


def _check_str_list(kind: str, name: str, v: Any) -> list:
    if not isinstance(v, (list, tuple)) or any(x is not None and type(x) is not str for x in v):
        raise _bad(kind, name, "expected a list of str or None")
    for x in v:
        if x is not None and not x.isascii():
            _utf8(kind, name, x)
    return list(v)


def _check_count_map(kind: str, name: str, v: Any) -> dict:
    if not isinstance(v, Mapping) or any(type(k) is not str or type(c) is not int for k, c in v.items()):
        raise _bad(kind, name, "expected a mapping of str to int")
    for k in v:
        if not k.isascii():
            _utf8(kind, name, k)
    # Sorted, so the writer can encode rows without sorting keys (see chain.py).
    return dict(sorted(v.items()))


def _check_ts(kind: str, name: str, v: Any) -> int:
    if not isinstance(v, dt.datetime) or v.tzinfo is None or v.utcoffset() is None:
        raise _bad(kind, name, "expected a timezone-aware datetime")
    return (v - EPOCH_UTC) // _ONE_US


def _compile_normalizer(kind: Kind) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """Straight-line validation code for one kind.

    submit() runs this on the producer's thread for every event; generated code
    (as dataclasses and attrs do) is about 2.5x faster than looping over the
    field specs, which matters at 50,000 events/s on two cores.
    """
    ns: dict[str, Any] = {
        "_bad": _bad, "_utf8": _utf8, "_datetime": dt.datetime, "_EPOCH": EPOCH_UTC, "_US": _ONE_US,
        "_int": _check_int, "_float": _check_float, "_bool": _check_bool, "_bytes": _check_bytes,
        "_str_list": _check_str_list, "_count_map": _check_count_map, "_ts": _check_ts,
    }
    k = repr(kind.kind)
    lines = ["def normalize(record):", "    get = record.get"]
    out = []
    for i, (name, t, required, choices) in enumerate(kind.spec):
        v, n = f"v{i}", repr(name)
        out.append(v)
        lines.append(f"    {v} = get({n})")
        if required:
            lines.append(f"    if {v} is None: raise _bad({k}, {n}, 'required field is missing')")
        else:
            lines.append(f"    if {v} is None: pass")
        if t == "str":
            lines.append(f"    elif type({v}) is not str: raise _bad({k}, {n}, 'expected str, got ' + type({v}).__name__)")
            lines.append(f"    elif not {v}.isascii(): _utf8({k}, {n}, {v})")
            if choices:
                ns[f"_choices{i}"] = choices
                why = repr(f"must be one of {sorted(choices)}")
                lines.append(f"    if {v} is not None and {v} not in _choices{i}: raise _bad({k}, {n}, {why})")
        elif t == "ts":
            lines.append(f"    elif type({v}) is _datetime and {v}.tzinfo is not None and {v}.utcoffset() is not None:"
                         f" {v} = ({v} - _EPOCH) // _US")
            lines.append(f"    else: {v} = _ts({k}, {n}, {v})")
        elif t == "int":
            lines.append(f"    elif type({v}) is not int or not -9223372036854775808 <= {v} <= 9223372036854775807:"
                         f" {v} = _int({k}, {n}, {v})")
        elif t == "float":
            lines.append(f"    elif type({v}) is not float: {v} = _float({k}, {n}, {v})")
        else:
            lines.append(f"    else: {v} = _{t}({k}, {n}, {v})")
    lines.append(f"    return ({', '.join(out)},)")
    exec("\n".join(lines), ns)  # noqa: S102 - code built above from the static schema only
    return ns["normalize"]


_NORMALIZERS: dict[str, Callable[[Mapping[str, Any]], tuple[Any, ...]]] = {}

# The validator above runs for every record on the producer's thread (the daemon's event loop):
# compiled when analytics/_schema.pyx is built (setup.py), with the generated Python as its
# reference and fallback (tests/test_schema_compiled.py: the same rows, the same errors).
# BOTWARDEN_PURE_PYTHON=1 runs the reference (analytics.compiled).
_compiled = load_compiled("_schema")
COMPILED: bool = _compiled is not None

_HELPERS = {"bool": _check_bool, "bytes": _check_bytes, "str_list": _check_str_list, "count_map": _check_count_map}


def compiled_normalizer(kind: Kind, reference: Callable[[Mapping[str, Any]], tuple[Any, ...]],
                        module: Any = None) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """The compiled twin of ``reference`` (the kind's generated normalizer), which it falls back to
    for anything but the common cases. ``module``: analytics._schema (default: the one this
    process uses, ``COMPILED``)."""
    module = module or _compiled
    if module is None:
        raise RuntimeError("analytics/_schema.pyx is not built, or BOTWARDEN_PURE_PYTHON is set")
    helpers = [partial(_HELPERS[t], kind.kind, name) if t in _HELPERS else None
               for name, t, _, _ in kind.spec]
    return module.Normalizer(kind.spec, helpers, reference)


def normalize(kind: Kind, record: Mapping[str, Any]) -> tuple[tuple[Any, ...], list[str]]:
    """Validate ``record`` and return (row in column order, unknown field names).

    Timestamps become integer microseconds since the epoch (UTC), byte strings
    ``bytes``, lists ``list``, count maps ``dict`` (sorted by key). Raises
    AuditRecordError naming the field, never the value.
    """
    fn = _NORMALIZERS.get(kind.kind)
    if fn is None:
        fn = _compile_normalizer(kind)
        if COMPILED:
            fn = compiled_normalizer(kind, fn)
        _NORMALIZERS[kind.kind] = fn
    row = fn(record)
    names = _NAMESETS[kind.kind]
    unknown = [] if names.issuperset(record) else [k for k in record if k not in names]
    return row, unknown


_NAMESETS = {k.kind: frozenset(k.names) for k in KINDS.values()}


# --- DDL ------------------------------------------------------------------

def _table_ddl(table: str, columns: list[tuple[str, str]]) -> str:
    cols = ",\n  ".join(
        ["chain_seq BIGINT NOT NULL", "chain_prev BLOB NOT NULL", "chain_hash BLOB NOT NULL"]
        + [f"{name} {SQL_TYPES[t]}" for name, t in columns]
    )
    return f"CREATE TABLE {table} (\n  {cols}\n)"


# Columns later migrations add: migration 1 must create the table as version 1 had it.
_ADDED_AFTER_V1 = {
    "session_start": {"token_kid", "attribution_source", "cgroup_path",  # v2
                      "credential_stale_s",                               # v3
                      "privileged"},                                      # v4
    "writer_event": {"anchor_seq", "anchor_hash", "removed_rows", "cutoff",   # v2
                     "last_seq", "prev_epoch", "prev_epoch_rows", "replayed_rows"},  # v4
    "session_end": {"requests"},                                          # v4
    "request": {"sqlstate", "masked", "seq", "row_estimate", "row_limit"},  # v2, v4, v5
}


def _v1_columns(kind: str) -> list[tuple[str, str]]:
    """The layout of version 1 (before probes, token_kid, attribution_source,
    cgroup_path, sqlstate, masked counts, retention checkpoints and stale-credential
    ages existed)."""
    added = _ADDED_AFTER_V1.get(kind, set())
    return [(f.name, f.type) for f in KINDS[kind].fields if f.name not in added]


def _migration_1() -> list[str]:
    stmts = [
        "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL,"
        " description VARCHAR NOT NULL)",
    ]
    for kind in ("session_start", "session_end", "request", "approval", "recording", "writer_event"):
        stmts.append(_table_ddl(KINDS[kind].table, _v1_columns(kind)))
    return stmts


def _migration_2() -> list[str]:
    stmts = [
        "ALTER TABLE session_starts ADD COLUMN token_kid VARCHAR",
        "ALTER TABLE session_starts ADD COLUMN attribution_source VARCHAR",
        "ALTER TABLE session_starts ADD COLUMN cgroup_path VARCHAR",
        "ALTER TABLE requests ADD COLUMN sqlstate VARCHAR",
        "ALTER TABLE requests ADD COLUMN masked MAP(VARCHAR, BIGINT)",
        "ALTER TABLE writer_events ADD COLUMN anchor_seq BIGINT",
        "ALTER TABLE writer_events ADD COLUMN anchor_hash VARCHAR",
        "ALTER TABLE writer_events ADD COLUMN removed_rows BIGINT",
        "ALTER TABLE writer_events ADD COLUMN cutoff TIMESTAMPTZ",
        _table_ddl("probes", [(f.name, f.type) for f in KINDS["probe"].fields]),
    ]
    return stmts


def _migration_3() -> list[str]:
    # The approval event choices ('approved_partial', 'notify_failed') are checked in
    # Python only (the column is a plain VARCHAR), so they need no DDL.
    return ["ALTER TABLE session_starts ADD COLUMN credential_stale_s DOUBLE"]


def _migration_4() -> list[str]:
    return [
        "ALTER TABLE session_starts ADD COLUMN privileged BOOLEAN",
        "ALTER TABLE requests ADD COLUMN seq BIGINT",
        "ALTER TABLE session_ends ADD COLUMN requests BIGINT",
        "ALTER TABLE writer_events ADD COLUMN last_seq BIGINT",
        "ALTER TABLE writer_events ADD COLUMN prev_epoch BIGINT",
        "ALTER TABLE writer_events ADD COLUMN prev_epoch_rows BIGINT",
        "ALTER TABLE writer_events ADD COLUMN replayed_rows BIGINT",
        _table_ddl("request_starts", [(f.name, f.type) for f in KINDS["request_start"].fields]),
        _table_ddl("audit_losses", [(f.name, f.type) for f in KINDS["audit_loss"].fields]),
    ]


def _migration_5() -> list[str]:
    return ["ALTER TABLE requests ADD COLUMN row_estimate BIGINT",
            "ALTER TABLE requests ADD COLUMN row_limit BIGINT"]


# Views are recreated after every migration (they only ever describe the latest layout).
VIEWS = [
    """CREATE OR REPLACE VIEW sessions AS
SELECT s.session_id, s.identity, s.token_subject, s.token_kid, s.target, s.protocol,
       s.client_addr, s.target_addr, s.pid, s.uid, s.gid, s.cgroup_id, s.cgroup_path,
       s.exe, s.comm, s.attribution_source, s.credential_user, s.lease_id, s.tls,
       s.credential_stale_s, s.privileged, s.ts AS started_at, e.ts AS ended_at, e.bytes_in, e.bytes_out,
       coalesce(e.outcome, 'open') AS outcome, e.error,
       s.chain_seq AS start_seq, e.chain_seq AS end_seq
FROM session_starts s
LEFT JOIN (
    -- The first end row says when the session ended and its bytes; a later one (a credential
    -- not revoked at the end, a session closed after a crash) amends its outcome and error.
    SELECT session_id, min(ts) AS ts, arg_max(bytes_in, chain_seq) AS bytes_in,
           arg_max(bytes_out, chain_seq) AS bytes_out, arg_max_null(outcome, chain_seq) AS outcome,
           arg_max_null(error, chain_seq) AS error, max(chain_seq) AS chain_seq
    FROM session_ends GROUP BY session_id
) e USING (session_id)""",
    # unnest() of map_keys/map_values in the select list: ~25x faster than a lateral
    # unnest(map_entries(...)) join over millions of rows.
    """CREATE OR REPLACE VIEW masked_fields AS
SELECT request_id, session_id, ts, rule,
       unnest(map_keys(masked)) AS column_name, unnest(map_values(masked)) AS masked_count
FROM requests
WHERE masked IS NOT NULL""",
    """CREATE OR REPLACE VIEW chain AS
SELECT 'session_starts' AS "table", chain_seq, chain_prev, chain_hash, ts FROM session_starts
UNION ALL SELECT 'session_ends', chain_seq, chain_prev, chain_hash, ts FROM session_ends
UNION ALL SELECT 'requests', chain_seq, chain_prev, chain_hash, ts FROM requests
UNION ALL SELECT 'approvals', chain_seq, chain_prev, chain_hash, ts FROM approvals
UNION ALL SELECT 'probes', chain_seq, chain_prev, chain_hash, ts FROM probes
UNION ALL SELECT 'recordings', chain_seq, chain_prev, chain_hash, ts FROM recordings
UNION ALL SELECT 'request_starts', chain_seq, chain_prev, chain_hash, ts FROM request_starts
UNION ALL SELECT 'audit_losses', chain_seq, chain_prev, chain_hash, ts FROM audit_losses
UNION ALL SELECT 'writer_events', chain_seq, chain_prev, chain_hash, ts FROM writer_events""",
]

MIGRATIONS: dict[int, tuple[str, list[str]]] = {
    1: ("initial schema: sessions, requests, approvals, recordings, writer events", _migration_1()),
    2: ("probe attribution table, masked counts, sqlstate, token kid, attribution source, "
        "retention checkpoints", _migration_2()),
    3: ("session_starts.credential_stale_s (a cached credential used while the secrets store was "
        "unreachable)", _migration_3()),
    4: ("crash accounting: requests.seq, session_ends.requests, request_starts (strict mode), "
        "audit_losses, writer_events.last_seq / prev_epoch / prev_epoch_rows / replayed_rows; "
        "session_starts.privileged (the bot ran as uid 0 or with capabilities that can undo the probes)", _migration_4()),
    5: ("requests.row_estimate / row_limit (the affected-rows guard: the planner's estimate and "
        "the max_rows that applied)", _migration_5()),
}
assert max(MIGRATIONS) == SCHEMA_VERSION


class RecordValidator:
    """Checks a producer's record on the producer's thread (so a bug surfaces where it happens)
    and turns it into a row in column order. Unknown fields: ``strict`` raises, otherwise they
    are dropped with one warning per (kind, field name)."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._warned: set[tuple[str, str]] = set()

    def __call__(self, kind: str, record: Mapping[str, Any]) -> tuple[Kind, tuple[Any, ...]]:
        spec = KINDS.get(kind)
        if spec is None or kind not in PRODUCER_KINDS:
            raise AuditRecordError(f"unknown audit event kind {kind!r}")
        if type(record) is not dict and not isinstance(record, Mapping):  # (an ABC check costs)
            raise AuditRecordError(f"{kind}: record must be a mapping, got {type(record).__name__}")
        row, unknown = normalize(spec, record)
        if unknown:
            if self.strict:
                raise AuditRecordError(f"{kind}: unknown fields {sorted(map(str, unknown))}")
            for n in unknown:
                key = (kind, str(n))
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("audit %s: dropping unknown field %r", kind, str(n))
        return spec, row
