"""The policy engine: (identity, target, request) -> Verdict, cached; mask plans for results.

Precedence (docs/policy.md): among the rules in scope that match, the strongest
action wins (block > approve > mask > allow) and the first such rule in file
order names the decision; no match -> the target's ``default_action``. A batch
gets the strongest verdict over its statements. A statement botwarden cannot
analyze is blocked unless a rule in scope says ``unparsed = "allow"`` (or
``"approve"``).

Caching: one engine per policy load (a reload builds a new engine, so the cache
dies with the old policy). Verdicts are cached by exact text, then by statement
shape (pglast's normalized text: constants replaced by ``$n``), both keyed by
identity, groups, target, the session's search path and the truth value of
every time window in scope, so a window opening or closing changes the key
instead of serving a stale verdict.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence
from zoneinfo import ZoneInfo

import hashlib

from pglast.parser import ParseError, fingerprint, normalize

from appliance.policy.config import PolicyConfig, Rule, TimeWindow, matcher_keys, parse_days, parse_hours
from appliance.policy.k8s import K8sRequest
from appliance.protocols.kubernetes import MaskPath, parse_mask_path
from appliance.policy.masking import (ColumnAction, DetectorSettings, MessageMasker, RowMasker, Strategy, TextMasker,
                                      column_is_maskable)
from appliance.policy.sql import (ANY_OUTPUT, BatchAnalysis, Function, Relation, StatementAnalysis, analyze_sql, kind_matches,
                                  only_stamps_its_row, resolve_execute, resolve_fetch, rule_row_fields,
                                  trigger_row_fields, unparsed)
from appliance.policy.ssh import UNKNOWN_PROGRAM, SshAnalysis, SshRequest, analyze_ssh
from appliance.policy.types import ACTION_STRENGTH, ColumnDesc, MaskPlan, PolicyError, RowGuard, Verdict
from appliance.policy.catalog import DDL, CatalogLookup, catalog_key

if TYPE_CHECKING:
    from appliance.config import IdentityConfig, TargetConfig


CACHE_MAX = 50_000
# Longer texts (bulk INSERT ... VALUES) are decided without caching: a cache of 50,000 of them
# would hold gigabytes, and they rarely repeat.
CACHE_TEXT_MAX = 16_384
DEFAULT_SEARCH_PATH = ("public",)

# --- session ---------------------------------------------------------------------------------------


@dataclass
class SqlSessionState:
    """What the engine remembers about one PostgreSQL session: prepared statements and cursors
    by name, and every schema ever put on the search path (kept as a union: a rolled-back SET
    cannot make the engine believe a narrower path than the server may have). A cursor is kept
    until CLOSE or DISCARD ALL, past the end of its transaction: a FETCH of one the server
    closed fails there anyway."""

    prepared: dict[str, StatementAnalysis] = field(default_factory=dict)
    search_path: frozenset[str] = frozenset(DEFAULT_SEARCH_PATH)
    cursors: dict[str, StatementAnalysis] = field(default_factory=dict)
    # Views and functions made before the session over relations rules name, learned at login
    # (catalog.py): (schema, name) -> the analysis of the view's query, of the function's body
    # (its overloads' merged); ``catalog_key`` for the verdict caches.
    views: dict[tuple[str, str], StatementAnalysis] = field(default_factory=dict)
    functions: dict[tuple[str, str], StatementAnalysis] = field(default_factory=dict)
    catalog_key: str = ""
    # (schema, name) of a relation -> what writing it runs besides (its triggers' functions, its
    # rules ON INSERT/UPDATE/DELETE, the functions its defaults, constraints, indexes and row
    # security policies call): (what, on which of I/U/D/T and S (a read), the analysis of its
    # body, which fields of the relation's rows (NEW, OLD) it reads: none (a default, a stamp),
    # some (sql.trigger_row_fields) or None, the whole row).
    effects: dict[tuple[str, str], tuple[tuple[str, frozenset[str], StatementAnalysis, frozenset[str] | None], ...]
                  ] = field(default_factory=dict)
    # Triggers made before the session that call pg_notify: what, the relations their bodies
    # read, the relation whose rows they see with the fields they read (None: all), and the
    # channels they notify (None: any): what a LISTEN receives when another session writes there.
    notifying: tuple[tuple[str, frozenset[Relation], tuple[Relation, frozenset[str] | None],
                           frozenset[str] | None], ...] = ()

    def copy(self) -> "SqlSessionState":
        return SqlSessionState(dict(self.prepared), self.search_path, dict(self.cursors), self.views,
                               self.functions, self.catalog_key, self.effects, self.notifying)

    def name_statement(self, name: str, statements: Sequence[StatementAnalysis] | None) -> None:
        """A protocol-level prepared statement (Parse ``name``): SQL ``EXECUTE name`` runs it too.
        None: it was closed."""
        if statements is None or len(statements) != 1 or statements[0].error is not None:
            self.prepared.pop(name, None)
        else:
            self.prepared[name] = statements[0]

    def apply(self, statements: Sequence[StatementAnalysis], verdict: Verdict) -> None:
        if verdict.action == "block":
            return  # it never reaches the server
        for stmt in statements:
            if stmt.error:
                continue
            if stmt.search_path is not None:
                self.search_path = self.search_path | frozenset(stmt.search_path)
            if stmt.prepare_name is not None and stmt.prepared_body is not None:
                self.prepared[stmt.prepare_name] = stmt.prepared_body
            if stmt.deallocate == "*":
                self.prepared.clear()
            elif stmt.deallocate:
                self.prepared.pop(stmt.deallocate, None)
            _cursor_effects(self.cursors, stmt)


def _cursor_effects(cursors: dict[str, StatementAnalysis], stmt: StatementAnalysis) -> None:
    if stmt.close_cursor == "*":
        cursors.clear()
    elif stmt.close_cursor:
        cursors.pop(stmt.close_cursor, None)
    if stmt.declare_name is not None:
        if stmt.declared_body is not None:
            cursors[stmt.declare_name] = stmt.declared_body
        else:
            cursors.pop(stmt.declare_name, None)


def resolve_batch(batch: BatchAnalysis, session: SqlSessionState | None
                  ) -> tuple[tuple[StatementAnalysis, ...], tuple[frozenset[str], ...]]:
    """Resolve EXECUTE against prepared statements, FETCH against cursors, and give each statement
    the search path it runs under: a SET search_path, PREPARE or DECLARE earlier in the same
    batch counts for later ones."""
    path = session.search_path if session is not None else frozenset(DEFAULT_SEARCH_PATH)
    if not batch.session_bound:
        if session is not None and session.catalog_key:
            return (tuple(resolve_catalog(s, session, path) for s in batch.statements),
                    (path,) * len(batch.statements))
        return batch.statements, (path,) * len(batch.statements)
    prepared = dict(session.prepared) if session is not None else {}
    cursors = dict(session.cursors) if session is not None else {}
    statements, paths = [], []
    for stmt in batch.statements:
        stmt = resolve_fetch(resolve_execute(stmt, prepared), cursors)
        if session is not None and session.catalog_key:
            stmt = resolve_catalog(stmt, session, path)
        statements.append(stmt)
        paths.append(path)
        if stmt.error is None:
            if stmt.search_path is not None:
                path = path | frozenset(stmt.search_path)
            if stmt.deallocate == "*":
                prepared.clear()
            elif stmt.deallocate:
                prepared.pop(stmt.deallocate, None)
            if stmt.prepare_name is not None and stmt.prepared_body is not None:
                prepared[stmt.prepare_name] = stmt.prepared_body
            _cursor_effects(cursors, stmt)
    return tuple(statements), tuple(paths)


def resolve_catalog(stmt: StatementAnalysis, session: SqlSessionState, path: frozenset[str]) -> StatementAnalysis:
    """``stmt`` as it runs over the views and functions learned at login (catalog.py). Reading a
    view reads what its query reads (through views of views), the view's result columns are
    computed from its query's, and writing through a view writes the relations beneath it; any
    other statement naming the view (a rename, a grant) is decided as naming those relations too,
    except dropping or refreshing it (or dropping a function), which gives no row to the bot.
    Calling a function does what its body does (reads, writes, sends, calls), and ``bodies`` says
    which relations each called body reads (masking cannot follow a value through a function's
    result). Writing a relation runs its triggers' functions and its rules too: their bodies are
    merged likewise, each counted as reading the relation and the fields of its rows it reads as
    NEW and OLD (a trigger that only stamps them: none); DDL runs the event triggers'; so
    are the functions its defaults, constraints, indexes and row security policies call (the
    policies' on a read too)."""
    if stmt.error is not None:
        return stmt
    # DDL runs the event triggers' functions (catalog.DDL): over-approximated, whatever their
    # events and tags (ddl_command_start/end, sql_drop, table_rewrite).
    events_run = session.effects.get(DDL, ())
    if events_run and not any(k.startswith(_DDL_PREFIXES) for k in stmt.kinds):
        events_run = ()
    dropping = all(k.startswith(("DROP_", "REFRESH_")) for k in stmt.kinds)
    if dropping and not events_run:
        return stmt
    views = session.views
    reads, writes, functions = set(stmt.reads), set(stmt.writes), set(stmt.functions)
    outputs, sent, properties = list(stmt.outputs), set(stmt.sent), set(stmt.properties)
    bodies = list(stmt.bodies)
    error = None
    seen: set[tuple[str, tuple[str, str], Any]] = set()
    # What the statement itself does to the relations it writes (INSERT ... ON CONFLICT DO UPDATE
    # updates too, MERGE does all three, COPY FROM inserts), and so to those beneath a view it
    # writes through; a write inside a body read at login, or a foreign key's action, may be any
    # of them. S: a read.
    direct = frozenset(e for k in stmt.kinds for e in _EVENTS.get(k, ""))
    if "upsert" in stmt.properties:
        direct |= {"U"}
    if "truncate_cascade" in stmt.properties:
        direct |= {"C"}  # (C: what a foreign key passes on to the referencing table, catalog.py)
    todo: list[tuple[Relation | Function, frozenset[str]]] = [] if dropping else [
        (r, direct if r in stmt.writes else _READ) for r in stmt.reads | stmt.writes]
    todo += [] if dropping else [(f, _READ) for f in stmt.functions | stmt.operators]
    used = set(stmt.operators)  # operators and casts: named so in a refusal
    # (an operator or a cast to one of the server's types is looked up in pg_catalog too, as the
    # server does whatever the path says; functions learned are never there)
    system_path = path | _PG_CATALOG

    def run(what: str, body: StatementAnalysis, rows: tuple[Relation, frozenset[str] | None] | None = None) -> None:
        """A body the statement runs (a function's, a trigger's, a rule's): what it does is done;
        ``rows``: the relation whose rows it sees as NEW and OLD, with the fields it reads (a read
        of that relation: a `block` rule on reads of it refuses the write, as a history trigger
        copying OLD rows somewhere else would hand them over)."""
        if rows is not None:
            reads.add(rows[0])
            todo.append((rows[0], _READ))
        reads.update(body.reads)
        writes.update(body.writes)
        functions.update(body.functions)
        used.update(body.operators)
        sent.update(body.sent)
        properties.update(body.properties & {"dynamic_sql"})
        bodies.append((what, _through_views(body.reads | body.writes, views, path),
                       *(_row_through_views(*rows, views, path) if rows else (frozenset(), frozenset()))))
        todo.extend([(r, _ANY_WRITE if r in body.writes else _READ) for r in body.reads | body.writes]
                    + [(f, _READ) for f in body.functions | body.operators])

    for what, _, body, _ in events_run:
        seen.add(("d", DDL, what))
        if body.error is not None:
            error = f"the statement is DDL, which runs {what}: {body.error}"
        else:
            run(what, body)
    while todo:
        item, events = todo.pop()
        if not isinstance(item, Function):
            for key in _catalog_names(item, path, session.effects):
                if ("e", key, events) in seen:
                    continue
                seen.add(("e", key, events))
                for what, on, body, fields in session.effects[key]:
                    if not on & events:
                        continue
                    if body.error is not None:
                        error = f"the statement writes {key[0]}.{key[1]}, which runs {what}: {body.error}"
                        continue
                    if body.kind == "CASCADE":  # rows of another table written: its own triggers and rules run
                        writes.update(body.writes)
                        todo.extend((r, _ANY_WRITE) for r in body.writes)
                        continue
                    run(what, body, (Relation(*key), fields) if fields is None or fields else None)
        if isinstance(item, Function):
            for key in _catalog_names(item, system_path if item in used else path, session.functions):
                if ("f", key, False) in seen:
                    continue
                seen.add(("f", key, False))
                body = session.functions[key]
                what = (f"function {key[0]}.{key[1]}" if item not in used else
                        f"operator {key[0]}.{key[1]}" if key[1][:1] in _OPERATOR_CHARS else f"a cast to {key[0]}.{key[1]}")
                if body.error is not None:
                    error = f"the statement calls {what}, whose body botwarden could not read: {body.error}"
                    continue
                run(what + ("()" if item not in used else ""), body)
            continue
        for key in _catalog_names(item, path, views):
            if ("v", key, events) in seen:
                continue
            seen.add(("v", key, events))
            body = views[key]
            if body.error is not None:
                error = f"the statement reads view {key[0]}.{key[1]}, whose query botwarden could not read: {body.error}"
                continue
            reads |= body.reads
            functions |= body.functions
            used |= body.operators
            outputs += body.outputs
            sent |= set(body.sent)
            properties |= body.properties - {"multi_statement"}
            if events != _READ:
                writes |= body.reads
            todo += [(r, events) for r in body.reads] + [(f, _READ) for f in body.functions | body.operators]
    heard = [(what, rels, rows) for what, rels, rows, channels in session.notifying
             if stmt.channel is None or channels is None or stmt.channel in channels] if "LISTEN" in stmt.kinds else []
    if heard:
        # Another session's write runs the trigger: its notification reaches this one unmasked.
        # LISTEN reads what those triggers see (a block rule on such a relation refuses it too).
        bodies += [(f"LISTEN, which receives what {what} sends with pg_notify", _through_views(rels, views, path),
                    *_row_through_views(*rows, views, path)) for what, rels, rows in heard]
        reads |= {r for _, rels, rows in heard for r in rels | {rows[0]}}
        seen.add(("l", ("", ""), None))
    if not seen:
        return stmt
    return replace(stmt, reads=frozenset(reads), writes=frozenset(writes), functions=frozenset(functions),
                   outputs=tuple(outputs), sent=tuple(sorted(sent)), properties=frozenset(properties),
                   bodies=tuple(bodies), error=error)


def _row_through_views(relation: Relation, fields: frozenset[str] | None, views: Mapping[tuple[str, str], StatementAnalysis],
                       path: frozenset[str]) -> tuple[frozenset[Relation], frozenset[str] | None]:
    """A trigger's rows (NEW, OLD of ``relation``, of which it reads ``fields``; None: all) as
    the relations beneath it and the columns the fields may carry: through a learned view (an
    INSTEAD OF trigger) its output columns are computed from the query's (``email AS contact``:
    contact carries email); a partition or inheritance child keeps its parents' names."""
    relations = _through_views(frozenset({relation}), views, path)
    if fields is None:
        return relations, None
    names = set(fields)
    for _ in range(len(relations)):  # views of views: each pass follows one level further
        before = len(names)
        for key in (k for r in relations for k in _catalog_names(r, path, views)):
            outputs, ranges = _outputs_by_name(views[key].outputs, {}), {r.name for r in views[key].reads}
            names |= set().union(*(_column_sources(n, outputs, ranges) for n in list(names)))
        if len(names) == before:
            break
    return relations, frozenset(names)


def _calls_notify(body: StatementAnalysis, learned: Mapping[tuple[str, str], StatementAnalysis]) -> bool:
    """Whether ``body`` calls pg_notify, itself or through the functions learned at login it calls."""
    seen: set[tuple[str, str]] = set()
    todo = [body]
    while todo:
        current = todo.pop()
        for f in current.functions | current.operators:
            if f.name == "pg_notify" and f.schema in (None, "pg_catalog"):
                return True
            for key in _catalog_names(f, _ANY_SCHEMA, learned):
                if key not in seen:
                    seen.add(key)
                    todo.append(learned[key])
    return False


_READ, _ANY_WRITE = frozenset("S"), frozenset("IUDT")
_PG_CATALOG = frozenset({"pg_catalog"})
_OPERATOR_CHARS = "+-*/<>=~!@#%^&|`?"  # (what an operator's symbol is made of: no name starts so)
# Statements that fire event triggers (PostgreSQL's event trigger firing matrix, widened: a kind
# of these that does not fire one is decided as if it did).
_DDL_PREFIXES = ("CREATE_", "ALTER_", "DROP_", "COMMENT", "GRANT", "REVOKE", "SECURITY_LABEL", "REFRESH_",
                 "IMPORT_FOREIGN_SCHEMA")
_ANY_SCHEMA = frozenset({"*"})  # (a body's bare name: the caller's path is not known when it is learned)
_NOTIFY_CALL = re.compile(r"pg_notify\s*\(", re.IGNORECASE)
_NOTIFY_LITERAL = re.compile(r"pg_notify\s*\(\s*'((?:[^']|'')*)'\s*,", re.IGNORECASE)


def _notified_channels(body: StatementAnalysis, learned: Mapping[tuple[str, str], StatementAnalysis],
                       texts: Sequence[str]) -> frozenset[str] | None:
    """The channels a trigger's function (its definitions ``texts``, analysed as ``body``)
    notifies when each of its own pg_notify calls names a constant one and the functions it calls
    notify none; else None (any channel)."""
    if not texts or any(_calls_notify(learned[k], learned) for f in body.functions | body.operators
                        for k in _catalog_names(f, _ANY_SCHEMA, learned)):
        return None
    channels: set[str] = set()
    for text in texts:
        literals = _NOTIFY_LITERAL.findall(text)
        if len(literals) != len(_NOTIFY_CALL.findall(text)):
            return None  # a channel built at run time
        channels.update(c.replace("''", "'") for c in literals)
    return frozenset(channels) or None


_EVENTS = {"INSERT": "I", "COPY": "I", "UPDATE": "U", "DELETE": "D", "MERGE": "IUD", "TRUNCATE": "T"}


def _through_views(relations: frozenset[Relation], views: Mapping[tuple[str, str], StatementAnalysis],
                   path: frozenset[str]) -> frozenset[Relation]:
    """``relations`` and those beneath the learned views among them (through views of views)."""
    found, todo = set(relations), list(relations)
    while todo:
        for key in _catalog_names(todo.pop(), path, views):
            for rel in views[key].reads - found:
                found.add(rel)
                todo.append(rel)
    return frozenset(found)


def _catalog_names(item: Relation | Function, path: frozenset[str], learned: Mapping[tuple[str, str], Any]
                   ) -> list[tuple[str, str]]:
    """The learned views (functions) ``item`` may name: itself when qualified, else one per schema
    of the path (any schema when botwarden could not read the path)."""
    if not learned:
        return []
    if item.schema is not None:
        return [(item.schema, item.name)] if (item.schema, item.name) in learned else []
    if "*" in path:
        return [key for key in learned if key[1] == item.name]
    return [(schema, item.name) for schema in sorted(path) if (schema, item.name) in learned]


# --- pattern matching ------------------------------------------------------------------------------


def _glob(pattern: str) -> Callable[[str], bool]:
    rx = re.compile(fnmatch.translate(pattern.lower()))
    return lambda value: rx.match(value.lower()) is not None


@dataclass(frozen=True)
class _QualifiedPattern:
    """``table``, ``schema.table`` (globs); the schema part None = any schema."""

    schema: Callable[[str], bool] | None
    name: Callable[[str], bool]
    schema_text: str | None
    name_text: str

    @classmethod
    def parse(cls, text: str) -> "_QualifiedPattern":
        schema, sep, name = text.rpartition(".")
        return cls(_glob(schema) if sep else None, _glob(name), schema if sep else None, name)


def _interpretations(schema: str | None, name: str, search_path: frozenset[str], system: bool) -> list[tuple[str | None, str]]:
    if schema is not None:
        return [(schema, name)]
    schemas = set(search_path)
    if system:
        schemas.add("pg_catalog")
    return [(s, name) for s in sorted(schemas)]


def _one(pattern: _QualifiedPattern, schema: str | None, name: str, any_mode: bool) -> bool:
    if name == "*":  # a whole schema
        if schema == "*":  # every schema (database_to_xml)
            return any_mode or (pattern.schema_text == "*" and pattern.name_text == "*")
        if pattern.schema is None:
            return any_mode
        return (schema is not None and pattern.schema(schema)) and (any_mode or pattern.name_text == "*")
    if not pattern.name(name):
        return False
    if pattern.schema is None:
        return True
    if schema == "*":  # set by a search_path botwarden could not read
        return any_mode or pattern.schema_text == "*"
    return schema is not None and pattern.schema(schema)


def _names_match(patterns: Sequence[_QualifiedPattern], items: Iterable[Relation | Function],
                 search_path: frozenset[str], any_mode: bool, is_function: bool) -> bool:
    items = list(items)
    if any_mode:
        for item in items:
            system = is_function or item.name.startswith("pg_")
            for schema, name in _interpretations(item.schema, item.name, search_path, system):
                if any(_one(p, schema, name, True) for p in patterns):
                    return True
        return False
    for item in items:
        system = is_function or item.name.startswith("pg_")
        for schema, name in _interpretations(item.schema, item.name, search_path, system):
            if is_function and item.schema is None and schema == "pg_catalog":
                # An unqualified call resolves to pg_catalog first only if such a function exists
                # there; bare patterns already cover the name, qualified ones must name pg_catalog.
                if any(p.schema is None and p.name(name) for p in patterns):
                    continue
            if not any(_one(p, schema, name, False) for p in patterns):
                return False
    return True


def _list_match(patterns: Sequence[Callable[[str], bool]], items: Iterable[str], any_mode: bool) -> bool:
    items = list(items)
    if any_mode:
        return any(p(i) for i in items for p in patterns)
    return all(any(p(i) for p in patterns) for i in items)


# --- compiled rules --------------------------------------------------------------------------------


class _Window:
    def __init__(self, window: TimeWindow):
        self.window = window
        self.days = parse_days(window.days)
        self.ranges = parse_hours(window.hours)
        self.tz = ZoneInfo(window.timezone)

    def contains(self, now: datetime) -> bool:
        local = now.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        for start, end in self.ranges:
            if start < end:
                if day in self.days and start <= minute < end:
                    return True
            elif (day in self.days and minute >= start) or ((day - 1) % 7 in self.days and minute < end):
                return True
        return False


@dataclass
class _Compiled:
    index: int
    rule: Rule
    strength: int
    window: _Window | None
    any_mode: bool
    generic: bool  # no content matcher: matches every request of its scope
    sql_capable: bool = False  # has SQL matchers (or masks every result of its scope)
    sql: dict[str, Any] = field(default_factory=dict)
    ssh: dict[str, Any] = field(default_factory=dict)
    k8s: dict[str, Any] = field(default_factory=dict)
    k8s_mask_paths: tuple[MaskPath, ...] = ()  # a Kubernetes mask rule's mask_paths, parsed
    k8s_exec: "_Compiled | None" = None  # programs / commands / constructs of a [rules.k8s]: the exec command
    # match_keys = "any": one compiled part per matcher key; the rule matches when one part does.
    parts: tuple["_Compiled", ...] = ()
    max_rows: int | None = None  # affected-rows guard: matches only above this estimate

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def action(self) -> str:
        return self.rule.action

    @property
    def masks_columns(self) -> bool:
        """A mask rule with column entries (not only detectors)."""
        return any(spec.columns for spec in self.rule.mask)


def _compile(index: int, rule: Rule) -> _Compiled:
    section = rule.sql or rule.ssh
    keys = matcher_keys(section)
    if section is not None and section.match_keys == "any" and len(keys) > 1:
        whole = _compile(index, replace(rule, sql=replace(rule.sql, match_keys=None) if rule.sql else None,
                                        ssh=replace(rule.ssh, match_keys=None) if rule.ssh else None))
        empty = {k: None for k in keys}
        parts = []
        for key in keys:
            one = replace(section, **{**empty, key: getattr(section, key)}, match_keys=None)
            parts.append(_compile(index, replace(rule, sql=one) if rule.sql is not None else replace(rule, ssh=one)))
        whole.parts = tuple(parts)
        return whole
    mode = getattr(section, "match", None) if section is not None else None
    any_mode = (mode or ("all" if rule.action == "allow" else "any")) == "any"
    c = _Compiled(index, rule, ACTION_STRENGTH[rule.action], _Window(rule.when) if rule.when else None,
                  any_mode, generic=(rule.sql is None and rule.ssh is None and rule.k8s is None
                                     and rule.unparsed == "block" and not rule.mask))
    c.sql_capable = rule.sql is not None or (bool(rule.mask) and rule.ssh is None)
    if rule.sql is not None and rule.sql.max_rows is not None:
        if rule.action not in ("block", "approve"):
            raise PolicyError(f"rule {rule.name!r}: max_rows needs action \"block\" or \"approve\" "
                              f"(it decides what happens above the limit), not {rule.action!r}")
        c.max_rows = rule.sql.max_rows
    if rule.sql is not None:
        s = rule.sql
        c.sql = {k: v for k, v in {
            "kinds": s.kinds,
            "relations": [_QualifiedPattern.parse(p) for p in s.relations] if s.relations is not None else None,
            "reads": [_QualifiedPattern.parse(p) for p in s.reads] if s.reads is not None else None,
            "writes": [_QualifiedPattern.parse(p) for p in s.writes] if s.writes is not None else None,
            "functions": [_QualifiedPattern.parse(p) for p in s.functions] if s.functions is not None else None,
            "properties": frozenset(s.properties) if s.properties is not None else None,
            "unless_properties": frozenset(s.unless_properties) if s.unless_properties is not None else None,
        }.items() if v is not None}
    if rule.ssh is not None:
        s2 = rule.ssh
        c.ssh = {k: v for k, v in {
            "programs": [_glob(p) for p in s2.programs] if s2.programs is not None else None,
            "commands": [_glob(p) for p in s2.commands] if s2.commands is not None else None,
            "constructs": frozenset(s2.constructs) if s2.constructs is not None else None,
            "shell": s2.shell,
            "forwarding": frozenset(s2.forwarding) if s2.forwarding is not None else None,
            "destinations": [_glob(p) for p in s2.destinations] if s2.destinations is not None else None,
            "subsystems": [_glob(p) for p in s2.subsystems] if s2.subsystems is not None else None,
            "sftp_paths": [_glob(p) for p in s2.sftp_paths] if s2.sftp_paths is not None else None,
            "sftp_ops": frozenset(s2.sftp_ops) if s2.sftp_ops is not None else None,
        }.items() if v is not None}
    if rule.k8s is not None:
        k = rule.k8s
        c.k8s = {name: [_glob(p) for p in value] for name, value in {
            "verbs": k.verbs, "resources": k.resources, "subresources": k.subresources,
            "namespaces": k.namespaces, "names": k.names, "api_groups": k.api_groups,
            "label_selectors": k.label_selectors, "field_selectors": k.field_selectors,
        }.items() if value is not None}
        if k.patch_types is not None:
            c.k8s["patch_types"] = frozenset(k.patch_types)
        if k.dry_run is not None:
            c.k8s["dry_run"] = k.dry_run
        c.k8s_mask_paths = tuple(parse_mask_path(p) for p in k.mask_paths or ())
        exec_keys = {key: v for key, v in {
            "programs": [_glob(p) for p in k.programs] if k.programs is not None else None,
            "commands": [_glob(p) for p in k.commands] if k.commands is not None else None,
            "constructs": frozenset(k.constructs) if k.constructs is not None else None,
        }.items() if v is not None}
        if exec_keys:
            # The exec command is matched exactly as an SSH command is (_ssh_matches).
            exec_any = (k.match or ("all" if rule.action == "allow" else "any")) == "any"
            c.k8s_exec = _Compiled(index, rule, c.strength, c.window, exec_any, generic=False, ssh=exec_keys)
    return c


def _sql_matches(c: _Compiled, stmt: StatementAnalysis, search_path: frozenset[str]) -> bool:
    if c.parts:
        return any(_sql_matches(p, stmt, search_path) for p in c.parts)
    m = c.sql
    unless = m.get("unless_properties")
    if unless is not None and unless & stmt.properties:
        return False
    any_mode = c.any_mode
    kinds = m.get("kinds")
    if kinds is not None:
        if any_mode:
            if not any(kind_matches(p, k) for k in stmt.kinds for p in kinds):
                return False
        elif not all(any(kind_matches(p, k) for p in kinds) for k in stmt.kinds):
            return False
    props = m.get("properties")
    if props is not None and not (props & stmt.properties):
        return False
    for key, items, is_fn in (("relations", stmt.reads | stmt.writes, False), ("reads", stmt.reads, False),
                              ("writes", stmt.writes, False), ("functions", stmt.functions, True)):
        patterns = m.get(key)
        if patterns is not None and not _names_match(patterns, items, search_path, any_mode, is_fn):
            return False
    return True


def _ssh_matches(c: _Compiled, a: SshAnalysis) -> bool:
    if c.parts:
        return any(_ssh_matches(p, a) for p in c.parts)
    m = c.ssh
    req = a.request
    any_mode = c.any_mode
    if "shell" in m and (req.kind == "shell") != m["shell"]:
        return False
    if "programs" in m or "commands" in m or "constructs" in m:
        if req.kind != "exec":
            return False
        # A program the shell computes at run time could be any program: it matches every
        # "any" list (block rules fire) and no "all" list (allow rules do not).
        unknown = UNKNOWN_PROGRAM in a.programs
        if "programs" in m and not (unknown if any_mode and unknown else
                                    (not unknown and _list_match(m["programs"], a.programs, any_mode))):
            return False
        if "commands" in m and not (unknown if any_mode and unknown else
                                    (not unknown and _list_match(m["commands"], a.command_lines, any_mode))):
            return False
        if "constructs" in m:
            allowed = m["constructs"]
            if any_mode:
                if not (("any" in allowed and a.constructs) or (allowed & a.constructs)):
                    return False
            elif not ("any" in allowed or a.constructs <= allowed):
                return False
    if not any_mode and req.kind == "exec" and "constructs" not in m and a.constructs:
        return False  # allow rules bless plain commands unless they list the constructs they accept
    if "forwarding" in m or "destinations" in m:
        if req.kind != "forward":
            return False
        if "forwarding" in m and not ("any" in m["forwarding"] or req.forward in m["forwarding"]):
            return False
        if "destinations" in m and not any(p(req.destination or "") for p in m["destinations"]):
            return False
    if "subsystems" in m:
        if req.kind not in ("subsystem", "sftp") or not any(p(req.subsystem or "sftp") for p in m["subsystems"]):
            return False
    if "sftp_paths" in m or "sftp_ops" in m:
        if req.kind != "sftp":
            return False
        if "sftp_ops" in m and req.sftp_op not in m["sftp_ops"]:
            return False
        if "sftp_paths" in m and not any(p(_norm_path(req.path or "")) for p in m["sftp_paths"]):
            return False
    return True


def _norm_path(path: str) -> str:
    import posixpath

    return posixpath.normpath("/" + path) if not path.startswith("/") else posixpath.normpath(path)


def _k8s_matches(c: _Compiled, req: K8sRequest, command: SshAnalysis | None) -> bool:
    """``command``: the analysis of an exec's command (None: the request runs none)."""
    if c.k8s_exec is not None and (command is None or command.error is not None
                                   or not _ssh_matches(c.k8s_exec, command)):
        return False
    values = {"verbs": req.verb, "resources": req.resource, "subresources": req.subresource,
              "namespaces": req.namespace, "names": req.name, "api_groups": req.api_group}
    for key, patterns in c.k8s.items():
        if key == "dry_run":
            if req.dry_run != patterns:
                return False
        elif key == "patch_types":
            if req.patch_type not in patterns:
                return False
        elif key in ("label_selectors", "field_selectors"):
            # Some requirement of the selector matches some pattern.
            reqs = req.label_selector if key == "label_selectors" else req.field_selector
            if not any(p(r) for r in reqs for p in patterns):
                return False
        else:
            value = values[key]
            if value is None or not any(p(value) for p in patterns):
                return False
    return True


# --- affected-rows guard -----------------------------------------------------------------------------

GUARDED_KINDS = frozenset(("UPDATE", "DELETE", "MERGE"))


def with_row_estimate(verdict: Verdict, estimate: int | None, missing: str = "") -> Verdict:
    """The verdict once the planner's row estimate is known (None: it could not be had, for the
    reason ``missing``, and every pending guard applies: fail closed). The estimate and the
    limit that decided go with the verdict into the audit row and the approval."""
    guards = verdict.row_guards
    if not guards:
        return verdict
    applying = [g for g in guards if estimate is None or estimate > g.max_rows]
    if not applying:
        return replace(verdict, row_guards=(), row_estimate=estimate, row_limit=min(g.max_rows for g in guards))
    top = max(ACTION_STRENGTH[g.action] for g in applying)
    g = next(g for g in applying if ACTION_STRENGTH[g.action] == top)  # file order among the strongest
    verb = "blocked" if g.action == "block" else "needs approval"
    desc = f" ({g.description})" if g.description else ""
    why = (f"the planner estimates {estimate} rows, more than max_rows = {g.max_rows}" if estimate is not None
           else f"no row estimate ({missing}), so max_rows = {g.max_rows} applies")
    return Verdict(g.action, g.rule, f"{verb} by botwarden rule {g.rule!r}{desc}: {why}", details=verdict.details,
                   matched=verdict.matched + (g.rule,), mask_rules=verdict.mask_rules if g.action != "block" else (),
                   row_estimate=estimate, row_limit=g.max_rows)


def plan_rows(explain_json: str) -> int:
    """Rows an EXPLAIN (FORMAT JSON) plan says its UPDATE/DELETE/MERGE touch: the estimated
    input rows of every ModifyTable node (data-modifying CTEs included), summed."""
    import json

    total = 0
    stack = [entry["Plan"] for entry in json.loads(explain_json)]
    while stack:
        node = stack.pop()
        children = node.get("Plans", ())
        if node.get("Node Type") == "ModifyTable" and node.get("Operation") != "Insert":
            total += int(children[0]["Plan Rows"]) if children else int(node.get("Plan Rows", 0))
        stack.extend(children)
    return total


# --- the engine --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleMatch:
    rule: str
    action: str
    statement: int  # index in the batch (0 for ssh/k8s)


@dataclass(frozen=True)
class _Scope:
    rules: tuple[_Compiled, ...]
    windows: tuple[_Window, ...]  # distinct windows of those rules, for cache keys
    default: str
    protocol: str


class PolicyEngine:
    def __init__(self, policy: PolicyConfig, targets: Sequence["TargetConfig"],
                 identities: Sequence["IdentityConfig"], salt: bytes = b"", *, cache: bool = True):
        self.policy = policy
        self.cache = cache  # False: every decision from scratch (benchmarks, explain)
        self.targets = {t.name: t for t in targets}
        self.identities = {i.name: i for i in identities}
        self.salt = salt
        self.rules = tuple(_compile(i, r) for i, r in enumerate(policy.rules))
        self._rule = {c.rule.name: c.rule for c in self.rules}  # rule name -> Rule (mask specs)
        self.detector_settings = DetectorSettings(policy.masking.secret_min_length, policy.masking.secret_entropy)
        needs_salt = [r.name for r in policy.rules for m in r.mask if m.strategy in ("hash", "format")]
        if needs_salt and not salt:
            raise PolicyError(f"rule {needs_salt[0]!r} hashes or format-masks values: set masking.salt_file "
                              "(random bytes) so masked values cannot be reversed by brute force")
        self._scopes: dict[tuple, _Scope] = {}
        self._exact: dict[tuple, Verdict] = {}
        self._shape: dict[tuple, Verdict] = {}
        self._analysis: dict[str, BatchAnalysis] = {}
        self._plans: dict[tuple, tuple[tuple, list[ColumnAction | None] | None]] = {}
        self._catalog_cache: dict[tuple, tuple[dict, dict]] = {}  # catalog.CatalogLookup's answers
        self._catalog_learned: dict[int | str, tuple] = {}  # id(views), catalog_key -> those answers, analysed
        self.stats = {"exact_hits": 0, "shape_hits": 0, "misses": 0}

    # -- scope --
    def scope(self, identity: str, groups: tuple[str, ...], target: str) -> _Scope:
        key = (identity, groups, target)
        found = self._scopes.get(key)
        if found is not None:
            return found
        t = self.targets.get(target)
        default = t.default_action if t is not None else "block"  # unknown target: fail closed
        protocol = t.protocol if t is not None else "postgres"
        gset = set(groups)
        rules = []
        for c in self.rules:
            r = c.rule
            if r.targets and target not in r.targets:
                continue
            if (r.identities or r.groups) and identity not in r.identities and not (gset & set(r.groups)):
                continue
            if r.protocol is not None and r.protocol != protocol:
                continue
            rules.append(c)
        windows: list[_Window] = []
        for c in rules:
            if c.window is not None and all(c.window.window != w.window for w in windows):
                windows.append(c.window)
        scope = _Scope(tuple(rules), tuple(windows), default, protocol)
        if len(self._scopes) > 10_000:
            self._scopes.clear()
        self._scopes[key] = scope
        return scope

    @staticmethod
    def _active(c: _Compiled, now: datetime | None) -> bool:
        return c.window is None or (now is not None and c.window.contains(now))

    @staticmethod
    def _now(now: datetime | None) -> datetime:
        if now is None:
            return datetime.now(timezone.utc)
        return now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)

    # -- SQL --
    def analyze(self, sql: str) -> BatchAnalysis:
        found = self._analysis.get(sql)
        if found is None:
            found = analyze_sql(sql)
            _put(self._analysis, sql, found)
        return found

    def catalog_lookup(self, identity: str, groups: tuple[str, ...], target: str) -> CatalogLookup | None:
        """What the PostgreSQL front asks the target's catalog at login about views and functions
        made before the session (catalog.py), or None: no rule of this scope names a relation or a
        column."""
        scope = self.scope(identity, tuple(groups), target)
        if scope.protocol != "postgres":
            return None
        patterns: list[_QualifiedPattern] = []
        every = False
        mentions: list[str] = []
        for c in scope.rules:
            for part in c.parts or (c,):
                for key in ("relations", "reads", "writes"):
                    patterns += part.sql.get(key, ())
            for spec in c.rule.mask:
                for column in spec.columns:
                    table_part, sep, name = column.rpartition(".")
                    if sep:
                        patterns.append(_QualifiedPattern.parse(table_part))
                    else:  # a column of any relation: every view may carry it
                        every = True
                        mentions.append(name)
        if any(c.masks_columns for c in scope.rules):
            # A view or function over the planner's statistics shows sample values of every column
            # (refused while a rule masks columns, _unfollowable_while_masking): read those too.
            patterns += [_QualifiedPattern.parse(f"pg_catalog.{name}") for name in sorted(_STATISTICS)]
        if not (patterns or every):
            return None
        # A function whose body sets search_path sets the caller's (learn_catalog): read those too.
        mentions += [p.name_text for p in patterns] + ["search_path"]
        key = (identity, tuple(groups), target)
        if every:
            return CatalogLookup(None, mentions, self._catalog_cache, key)
        return CatalogLookup(lambda schema, name: any(_one(p, schema, name, True) for p in patterns), mentions,
                             self._catalog_cache, key)

    def learn_catalog(self, session: SqlSessionState, views: Mapping[tuple[str | None, str], str | None],
                      functions: Mapping[tuple[str, str], Sequence[str]],
                      effects: Mapping[tuple[str, str], Sequence[tuple[str, ...]]] | None = None) -> None:
        """Give ``session`` the views, functions, triggers and rules :meth:`catalog_lookup` found
        (their queries and bodies analysed once per engine). One botwarden cannot analyse (a view
        dropped meanwhile, a PL/pgSQL body its parser cannot read) refuses the statements that
        read, call or write it. Answers the catalog cache gave again (the same objects) are not
        analysed again, nor are equal answers read after a catalog change that changed none of
        them (a temporary table made by another session moves the catalog's counters)."""
        if effects is None:
            effects = {}
        done = self._catalog_learned.get(id(views))
        if done is None or not (done[0] is views and done[1] is functions and done[2] is effects):
            digest = catalog_key(views, functions, effects)
            done = self._catalog_learned.get(digest)
            if done is not None:
                self._remember_learned(id(views), (views, functions, effects, *done[3:]))
        if done is not None:
            session.views, session.functions, session.effects, session.notifying, session.catalog_key = done[3:]
            self._unknown_path(session)
            return
        learned: dict[tuple[str, str], StatementAnalysis] = {}
        for (schema, name), text in views.items():
            batch = self.analyze(text) if text is not None else None
            if schema is None:
                continue  # a temporary view of another session's: never this session's to read
            if batch is None or len(batch.statements) != 1:
                learned[(schema, name)] = unparsed("the catalog gave no single query for it")
            else:
                learned[(schema, name)] = batch.statements[0]
        bodies: dict[tuple[str, str], StatementAnalysis] = {}
        for key, texts in functions.items():
            parts = [self.analyze(t).statements for t in texts]
            if any(len(p) != 1 for p in parts):
                bodies[key] = unparsed("the catalog gave no single definition for it")
                continue
            defs = [p[0] for p in parts]
            bad = next((d for d in defs if d.error is not None or "opaque_body" in d.properties), None)
            if bad is not None:
                bodies[key] = unparsed(bad.error or "its body, in a language other than SQL and PL/pgSQL or in PL/pgSQL "
                                       "botwarden's parser cannot read, could not be analysed")
                continue
            merged = defs[0]
            for d in defs[1:]:
                merged = replace(merged, reads=merged.reads | d.reads, writes=merged.writes | d.writes,
                                 functions=merged.functions | d.functions, operators=merged.operators | d.operators,
                                 properties=merged.properties | d.properties,
                                 sent=tuple(sorted(set(merged.sent) | set(d.sent))))
            bodies[key] = merged
        runs: dict[tuple[str, str], tuple[tuple[str, frozenset[str], StatementAnalysis, frozenset[str] | None], ...]] = {}
        notifying = []
        for (schema, name), entries in effects.items():
            found = []
            for entry in entries:
                events = frozenset(entry[1])
                if entry[0] == "cascade":  # a foreign key's ON DELETE / ON UPDATE writes that table
                    found.append((f"a foreign key's ON DELETE/UPDATE action on {entry[2]}.{entry[3]}", events,
                                  StatementAnalysis(kind="CASCADE", writes=frozenset({Relation(entry[2], entry[3])})),
                                  frozenset()))
                    continue
                if entry[0] in ("trigger", "call", "event"):
                    fkey = (entry[2], entry[3])
                    what = (f"trigger function {fkey[0]}.{fkey[1]}() of {schema}.{name}" if entry[0] == "trigger" else
                            f"event trigger function {fkey[0]}.{fkey[1]}()" if entry[0] == "event" else
                            f"function {fkey[0]}.{fkey[1]}(), which a default, constraint, index, row security "
                            f"policy or column type of {schema}.{name} calls")
                    # A trigger's function sees the rows (NEW, OLD) and reads the fields it names
                    # (all of them when it passes a whole row on, or in another language), none when
                    # all it does is stamp them (NEW.updated_at := now()); a default's or policy's
                    # function only its arguments.
                    texts = functions.get(fkey, ())
                    fields: frozenset[str] | None = frozenset()
                    if entry[0] == "trigger" and not (len(texts) == 1 and only_stamps_its_row(texts[0])):
                        fields = trigger_row_fields(texts[0]) if len(texts) == 1 else None
                    body = bodies.get(fkey, StatementAnalysis(kind="TRIGGER"))
                    found.append((what, events, body, fields))
                    if (fields is None or fields) and body.error is None and _calls_notify(body, bodies):
                        notifying.append((what, body.reads, (Relation(schema, name), fields),
                                          _notified_channels(body, bodies, texts)))
                    continue
                batch = self.analyze(entry[2]) if entry[2] else None
                rule = batch.statements[0] if batch is not None and len(batch.statements) == 1 else None
                what = f"a rule on {schema}.{name}"
                if rule is None or rule.error is not None or "CREATE_RULE" not in rule.kinds:
                    found.append((what, events, unparsed("botwarden could not read the rule"), None))
                else:  # (its condition and actions see the fields of NEW and OLD they name)
                    found.append((what, events, replace(rule, writes=rule.writes - {Relation(schema, name)}),
                                  rule_row_fields(entry[2])))
            runs[(schema, name)] = tuple(found)
        session.views, session.functions, session.effects = learned, bodies, runs
        session.notifying = tuple(notifying)
        session.catalog_key = digest
        self._unknown_path(session)
        done = (views, functions, effects, learned, bodies, runs, session.notifying, digest)
        self._remember_learned(id(views), done)
        self._remember_learned(digest, done)

    def _remember_learned(self, key: int | str, done: tuple) -> None:
        if len(self._catalog_learned) >= 256:
            self._catalog_learned.clear()
        self._catalog_learned[key] = done

    @staticmethod
    def _unknown_path(session: SqlSessionState) -> None:
        """A function made before the session whose body sets search_path (``SET search_path``,
        ``set_config``, with no SET clause of its own to restore it) sets the session's when the
        bot calls it, wherever the call hides (a view, a default, another function), and a
        verdict cached for another session applies no session effect: from login, the session's
        path counts as unknown (a relation a rule names in any schema matches its bare name)."""
        if any("body_sets_search_path" in body.properties for body in session.functions.values()):
            session.search_path = session.search_path | {"*"}

    @staticmethod
    def shape_of(sql: str) -> str:
        """The statement's shape for approval windows: pglast's fingerprint, which ignores
        constants, parameters, spacing and keyword/identifier case, so ``DELETE FROM t`` and
        ``delete  from T`` share it. Text the parser refuses has only its exact self as shape."""
        try:
            return "fp:" + fingerprint(sql)
        except (ParseError, UnicodeError):
            return "text:" + hashlib.sha256(sql.encode("utf-8", "surrogatepass")).hexdigest()

    def decide_sql(self, identity: str, groups: tuple[str, ...], target: str, sql: str, *,
                   now: datetime | None = None, session: SqlSessionState | None = None) -> Verdict:
        scope = self.scope(identity, tuple(groups), target)
        when = self._now(now) if scope.windows else None
        window_key = tuple(w.contains(when) for w in scope.windows) if when is not None else ()
        path = session.search_path if session is not None else frozenset(DEFAULT_SEARCH_PATH)
        key = (sql, identity, tuple(groups), target, path, window_key, session.catalog_key if session is not None else "")
        if not self.cache or len(sql) > CACHE_TEXT_MAX:
            self.stats["misses"] += 1
            statements, paths = resolve_batch(analyze_sql(sql), session)
            verdict = self._decide_statements(scope, statements, paths, when, target)
            if session is not None:
                session.apply(statements, verdict)
            return verdict
        verdict = self._exact.get(key)
        if verdict is not None:
            self.stats["exact_hits"] += 1
            return verdict
        shape_key = None
        if sql not in self._analysis:
            try:
                shape_key = (normalize(sql), *key[1:])
            except (ParseError, UnicodeError):
                shape_key = None
            if shape_key is not None:
                verdict = self._shape.get(shape_key)
                if verdict is not None:
                    self.stats["shape_hits"] += 1
                    _put(self._exact, key, verdict)
                    return verdict
        self.stats["misses"] += 1
        batch = self.analyze(sql)
        statements, paths = resolve_batch(batch, session)
        verdict = self._decide_statements(scope, statements, paths, when, target)
        if session is not None:
            session.apply(statements, verdict)
        if not batch.session_bound:
            _put(self._exact, key, verdict)
            if batch.shape_cacheable:
                if shape_key is None:
                    try:
                        shape_key = (normalize(sql), *key[1:])
                    except (ParseError, UnicodeError):
                        shape_key = None
                if shape_key is not None:
                    _put(self._shape, shape_key, verdict)
        return verdict

    def _decide_statements(self, scope: _Scope, statements: Sequence[StatementAnalysis],
                           paths: Sequence[frozenset[str]], when: datetime | None, target: str) -> Verdict:
        best: Verdict | None = None
        best_strength = -1
        matched: list[str] = []
        mask_rules: list[str] = []
        guards_of: list[RowGuard] = []
        for i, stmt in enumerate(statements):
            verdict, matches = self._decide_one(scope, stmt, paths[i], when, target, guards_of)
            for m in matches:
                if m.rule not in matched:
                    matched.append(m.rule)
                if m.action == "mask" and m.rule not in mask_rules:
                    mask_rules.append(m.rule)
            strength = ACTION_STRENGTH[verdict.action]
            if strength > best_strength:
                best, best_strength = verdict, strength
        assert best is not None
        if best.action != "block":
            unfollowable = self._unfollowable_while_masking(scope, statements, when)
            if unfollowable is not None:
                return Verdict("block", unfollowable[0], unfollowable[1], details=tuple(statements),
                               matched=tuple(matched))
        verdict = Verdict(best.action, best.rule, best.reason, details=tuple(statements),
                          matched=tuple(matched), mask_rules=tuple(mask_rules) if best.action != "block" else ())
        mask_names = verdict.mask_rules
        if verdict.action != "block":
            mask_names += self._masking_reads_of_restructured(scope, statements, paths, when, mask_names)
        if mask_names:  # masked, or to be approved and then masked, or restructuring what is masked
            leak = self._masking_cannot_follow(replace(verdict, mask_rules=mask_names))
            if leak is not None:
                return Verdict("block", leak[0], leak[1], details=verdict.details, matched=verdict.matched)
        guards = [g for g in guards_of if ACTION_STRENGTH[g.action] > best_strength]
        if not guards:
            return verdict
        verdict = replace(verdict, row_guards=tuple(guards))
        if len(statements) > 1:
            # The server is asked for the estimate of one statement at a time: a batch of several
            # with a guard in play gets the guard's action (fail closed).
            return with_row_estimate(verdict, None, "the request holds several statements; send the "
                                                    "guarded one on its own to have its rows estimated")
        return verdict

    def _decide_one(self, scope: _Scope, stmt: StatementAnalysis, path: frozenset[str], when: datetime | None,
                    target: str, guards: list[RowGuard] | None = None) -> tuple[Verdict, list[RuleMatch]]:
        matches: list[_Compiled] = []
        if stmt.error is not None:
            exemption = None
            for c in scope.rules:
                if not self._active(c, when):
                    continue
                if c.generic:
                    matches.append(c)
                elif c.rule.unparsed != "block" and exemption is None:
                    exemption = c
            if exemption is None:
                return (Verdict("block", None, f"botwarden blocks statements it cannot analyze: {stmt.error}"),
                        [RuleMatch(c.name, c.action, 0) for c in matches])
            # The exemption acts as a rule with its unparsed action; generic rules still count.
            candidates = [(ACTION_STRENGTH[exemption.rule.unparsed], exemption.index, exemption.rule.unparsed,
                           exemption.name)]
            candidates += [(c.strength, c.index, c.action, c.name) for c in matches if c.action != "mask"]
            strength, _, action, name = max(candidates, key=lambda x: (x[0], -x[1]))
            reason = (f"{action} by rule {name!r}: statement could not be analyzed ({stmt.error})")
            found = [RuleMatch(exemption.name, exemption.rule.unparsed, 0)] + [RuleMatch(c.name, c.action, 0) for c in matches]
            return Verdict(action, name, reason), found  # type: ignore[arg-type]
        for c in scope.rules:
            if not self._active(c, when):
                continue
            if c.generic or (c.sql_capable and _sql_matches(c, stmt, path)):
                if c.max_rows is not None:
                    # Only an UPDATE, DELETE or MERGE, and only above the estimate: decided
                    # once the server has estimated the rows (with_row_estimate).
                    if guards is not None and any(k in GUARDED_KINDS or k.startswith("MERGE.") for k in stmt.kinds):
                        guards.append(RowGuard(c.name, c.action, c.max_rows, c.rule.description or ""))  # type: ignore[arg-type]
                    continue
                matches.append(c)
        return self._pick(scope, matches, stmt.summary(), target), [RuleMatch(c.name, c.action, 0) for c in matches]

    @staticmethod
    def _pick(scope: _Scope, matches: Sequence[_Compiled], what: str, target: str) -> Verdict:
        if not matches:
            return Verdict(scope.default, None, f"{scope.default} by default for target {target!r}: {what}")  # type: ignore[arg-type]
        top = max(c.strength for c in matches)
        winner = next(c for c in matches if c.strength == top)
        verb = {"block": "blocked", "approve": "needs approval", "mask": "masked", "allow": "allowed"}[winner.action]
        desc = f" ({winner.rule.description})" if winner.rule.description else ""
        return Verdict(winner.action, winner.name, f"{verb} by botwarden rule {winner.name!r}{desc}: {what}")  # type: ignore[arg-type]

    # -- SSH / Kubernetes --
    def decide_ssh(self, identity: str, groups: tuple[str, ...], target: str, request: SshRequest | str, *,
                   now: datetime | None = None) -> Verdict:
        if isinstance(request, str):
            request = SshRequest.exec(request)
        scope = self.scope(identity, tuple(groups), target)
        when = self._now(now) if scope.windows else None
        analysis = analyze_ssh(request)
        matches = [c for c in scope.rules if c.action != "mask" and self._active(c, when)
                   and (c.generic or (c.rule.ssh is not None and analysis.error is None and _ssh_matches(c, analysis)))]
        if analysis.error is not None:
            return Verdict("block", None, f"botwarden blocks commands it cannot analyze: {analysis.error}",
                           details=(analysis,), matched=tuple(c.name for c in matches))
        verdict = self._pick(scope, matches, analysis.summary(), target)
        # Mask rules with a [rules.ssh] section mask the output of the requests they match.
        masks = tuple(c.name for c in scope.rules if c.action == "mask" and c.rule.ssh is not None
                      and self._active(c, when) and _ssh_matches(c, analysis))
        return replace(verdict, details=(analysis,), matched=tuple(c.name for c in matches),
                       mask_rules=masks if verdict.action != "block" else ())

    def decide_k8s(self, identity: str, groups: tuple[str, ...], target: str, request: K8sRequest, *,
                   now: datetime | None = None) -> Verdict:
        scope = self.scope(identity, tuple(groups), target)
        when = self._now(now) if scope.windows else None
        # Mask rules (a [rules.k8s] section, no entries) mask Secret values in the response; like
        # SQL masks they also apply to a request an operator approved.
        command = analyze_ssh(SshRequest.exec(request.command_line)) if request.command_line else None
        matches = [c for c in scope.rules if self._active(c, when)
                   and (c.generic or (c.rule.k8s is not None and _k8s_matches(c, request, command)))]
        if command is not None and command.error is not None:
            # As for SSH: a command botwarden cannot read is not run.
            return Verdict("block", None, f"botwarden blocks commands it cannot analyze: {command.error}",
                           details=(request,), matched=tuple(c.name for c in matches))
        verdict = self._pick(scope, matches, request.describe(), target)
        masks = tuple(c.name for c in matches if c.action == "mask")
        # details: the request, then the MaskPaths of the mask rules that matched (the front masks
        # the response's Secrets and these).
        paths = tuple(p for c in matches if c.action == "mask" for p in c.k8s_mask_paths)
        return replace(verdict, details=(request, *paths), matched=tuple(c.name for c in matches), mask_rules=masks)

    # -- masking --
    def text_masker(self, verdict: Verdict) -> TextMasker | None:
        """The content detectors an SSH request's output is masked with (its verdict's mask
        rules), or None: nothing to mask."""
        if not verdict.mask_rules or verdict.action == "block":
            return None
        detectors = [(d, Strategy(spec.strategy, spec.keep, self.salt)) for name in verdict.mask_rules
                     for spec in self._rule[name].mask for d in spec.detectors]
        return TextMasker(detectors, self.detector_settings) if detectors else None

    def message_masker(self, verdict: Verdict) -> MessageMasker | None:
        """How the server's errors and notices are masked while the verdict's statement runs
        (:class:`MessageMasker`), or None: they pass as they are."""
        if not verdict.masked:
            return None
        relations = [r for st in verdict.details if isinstance(st, StatementAnalysis) for r in st.relations]
        for name in verdict.mask_rules:
            if any(_spec_covers(p, relations) for spec in self._rule[name].mask for p in spec.columns):
                return MessageMasker(withhold=(
                    f"botwarden withheld the server's message: the statement reads columns rule {name!r} "
                    f"masks, and the message may quote their values (the SQLSTATE is the server's)"))
        text = self.text_masker(verdict)
        return MessageMasker(text=text) if text is not None else None

    def mask_plan(self, identity: str, groups: tuple[str, ...], target: str, verdict: Verdict,
                  columns: Sequence[ColumnDesc]) -> MaskPlan | None:
        if not verdict.mask_rules or verdict.action == "block":
            return None
        # Keyed by the identity of the analysis tuple (verdicts are cached and shared, so a
        # repeated statement brings the same one); the entry holds it, so the id stays unique.
        key = (verdict.mask_rules, id(verdict.details), tuple(columns))
        cached = self._plans.get(key)
        if cached is not None and cached[0] is verdict.details:
            actions = cached[1]
        else:
            actions = self._build_actions(verdict, columns)
            _put(self._plans, key, (verdict.details, actions))
        if actions is None:
            return None
        return RowMasker(actions, self.detector_settings)

    def _unfollowable_while_masking(self, scope: _Scope, statements: Sequence[StatementAnalysis],
                                    when: datetime | None) -> tuple[str, str] | None:
        """(rule, why) when a statement does what masking cannot follow while a rule masks columns
        for this identity and target, whichever relations the statement names: it reads the
        planner's statistics (pg_stats shows sample values of every column the bot may read:
        most_common_vals, histogram_bounds), or runs SQL text botwarden cannot read (``dynamic_sql``:
        it may read, copy or rename anything). None: no such statement, or no such rule."""
        statistics = _reads_statistics(statements)
        dynamic = any("dynamic_sql" in st.properties for st in statements)
        if not (statistics or dynamic):
            return None
        masking = next((c.name for c in scope.rules if c.masks_columns and self._active(c, when)), None)
        if masking is None:
            return None
        if statistics:
            return masking, (f"the planner's statistics (pg_stats, pg_stats_ext) hold sample values of the columns "
                             f"rule {masking!r} masks, which masking cannot follow there")
        return masking, (f"the statement runs SQL text botwarden cannot read (PL/pgSQL EXECUTE of a non-constant "
                         f"string, query_to_xml of an expression ...), which could read, copy or rename the columns "
                         f"rule {masking!r} masks: masking cannot follow it; use constant SQL text")

    def _masking_reads_of_restructured(self, scope: _Scope, statements: Sequence[StatementAnalysis],
                                       paths: Sequence[frozenset[str]], when: datetime | None,
                                       have: tuple[str, ...]) -> tuple[str, ...]:
        """Mask rules with column entries that would mask a *read* of a relation these statements
        restructure (ALTER ..., CREATE TRIGGER, CREATE RULE) or assign columns of (UPDATE's SET,
        ON CONFLICT DO UPDATE, a generated column), when they did not match the statement itself
        (a rule on ``reads`` does not match the UPDATE or ALTER that writes the relation):
        renaming the relation, or copying a masked column into another of its columns, escapes
        them just the same (:meth:`_masking_cannot_follow`)."""
        found: list[str] = []
        for st, path in zip(statements, paths):
            if not (st.assigned or any(k.startswith("ALTER_") or k in _REWIRING_KINDS for k in st.kinds)):
                continue
            probe = StatementAnalysis("SELECT", frozenset({"SELECT"}), reads=st.relations)
            for c in scope.rules:
                if (c.masks_columns and c.name not in have and c.name not in found and self._active(c, when)
                        and (c.generic or (c.sql_capable and _sql_matches(c, probe, path)))):
                    found.append(c.name)
        return tuple(found)

    def _masking_cannot_follow(self, verdict: Verdict) -> tuple[str, str] | None:
        """Why a statement to be masked is refused instead: masking follows values by the
        columns and relations a rule names, into the result's rows, and the statement takes
        them where it cannot follow. It writes masked columns into a relation or a server file
        (CREATE TABLE AS, SELECT INTO, CREATE VIEW, INSERT ... SELECT, COPY ... TO 'file', SET,
        a generated column or ALTER COLUMN ... USING), passes them to a function that keeps or
        sends them elsewhere (set_config, pg_notify, lo_from_bytea ...: sql.SENDING_FUNCTIONS),
        reads such a relation in a DO block or a function body (variables, results of a later
        call), or renames or rewires the relation (a rename, SET SCHEMA, a trigger or rule on it,
        INHERIT / ATTACH PARTITION: its rows read through another name). (rule, why), or None: it may
        run, masked."""
        specs = [spec for name in verdict.mask_rules for spec in self._rule[name].mask if spec.columns]
        if not specs:
            return None
        rule = next(name for name in verdict.mask_rules if any(spec.columns for spec in self._rule[name].mask))

        def covered(rels: Iterable[Relation]) -> bool:
            return any(_spec_covers(p, [r]) for r in rels for spec in specs for p in spec.columns)

        for st in verdict.details:
            if not isinstance(st, StatementAnalysis):
                continue
            relations = list(st.reads | st.writes)
            if st.properties & {"do_block", "function_body"}:
                if covered(relations):
                    what = "a DO block" if "do_block" in st.properties else "a function body"
                    return rule, (f"{what} reads a relation whose columns rule {rule!r} masks: masking cannot "
                                  f"follow values through its variables or results; read the columns with a plain SELECT")
                continue
            called = next((name for name, rels, row_rels, fields in st.bodies if covered(rels) or any(
                _column_spec_matches(p, {"*"} if fields is None else set(fields), list(row_rels))
                for spec in specs for p in spec.columns)), None)
            if called is not None:
                return rule, (f"the statement runs {called}, whose body reads a relation whose columns rule "
                              f"{rule!r} masks: masking cannot follow values through a function's, trigger's or "
                              f"rule's results or what it does with them; read the columns with a plain SELECT")
            rewiring = sorted(k for k in st.kinds if k in _REWIRING_KINDS or _renames(k))
            if rewiring and covered(st.writes if all(map(_renames, rewiring)) else relations):
                return rule, (f"{rewiring[0]} of a relation whose columns rule {rule!r} masks: masking follows the "
                              f"relation's and its columns' names, and masking cannot follow the values after this")
            to_file = st.properties & {"copy_file", "copy_program"}
            if to_file and "copy_to" in st.properties and not st.outputs and covered(st.reads):
                return rule, (f"COPY of a relation whose columns rule {rule!r} masks to a server file or program: "
                              f"masking cannot follow them there")
            if not (st.outputs or st.assigned or st.sent):
                continue
            range_names = {r.name for r in relations}
            outputs = _outputs_by_name(st.outputs, {})

            def masks(sources: set[str]) -> bool:
                return any(_column_spec_matches(p, sources, relations) for spec in specs for p in spec.columns)

            for function, sources in st.sent:
                carried = set().union(*(_column_sources(src, outputs, range_names) for src in sources))
                if masks(carried):
                    return rule, (f"the statement passes columns rule {rule!r} masks to {function}(), which "
                                  f"keeps or sends them where masking cannot follow them")
            if not (st.writes or to_file) or not (st.outputs or st.assigned):
                continue
            # DELETE's and UPDATE's RETURNING go to the bot, masked; UPDATE's SET is ``assigned``.
            written = outputs if to_file or st.kinds - _RETURNING_KINDS else {}
            masked = [name for name in written if masks(_column_sources(name, outputs, range_names))]
            # SET col = value: a masked value into a column that is not masked itself.
            masked += [name for name, sources in st.assigned
                       if not masks({name.lower()}) and masks(set(sources) - {name.lower()})]
            outputs.update((name, set(sources)) for name, sources in st.assigned)
            if masked:
                where = ", ".join(sorted(str(r) for r in st.writes)) or "a server file or program"
                what = ", ".join(sorted("*" if "*" in outputs[n] else n for n in masked))
                return rule, (f"the statement writes values of columns rule {rule!r} masks into {where} ({what}): "
                              f"masking cannot follow them there")
        return None

    def _build_actions(self, verdict: Verdict, columns: Sequence[ColumnDesc]) -> list[ColumnAction | None] | None:
        specs = [spec for name in verdict.mask_rules for spec in self._rule[name].mask]
        statements = [s for s in verdict.details if isinstance(s, StatementAnalysis)]
        relations = [r for s in statements for r in (s.reads | s.writes)]
        range_names = {r.name for r in relations}
        outputs: dict[str, set[str]] = {}
        for s in statements:
            _outputs_by_name(s.outputs, outputs)
        actions: list[ColumnAction | None] = []
        any_action = False
        for col in columns:
            sources = _column_sources(col.name, outputs, range_names, result=True)
            action = ColumnAction(col.name, col.type_oid, col.format)
            for spec in specs:
                strategy = Strategy(spec.strategy, spec.keep, self.salt)
                if spec.columns and any(_column_spec_matches(p, sources, relations) for p in spec.columns):
                    if spec.detectors:
                        if column_is_maskable(col):
                            action.detectors += [(d, strategy) for d in spec.detectors]
                        elif col.format == 1:
                            action.whole = action.whole or Strategy("null")
                    elif action.whole is None or spec.strategy == "null":
                        action.whole = strategy
                elif not spec.columns and column_is_maskable(col):
                    action.detectors += [(d, strategy) for d in spec.detectors]
            if action.whole is not None or action.detectors:
                actions.append(action)
                any_action = True
            else:
                actions.append(None)
        return actions if any_action else None


def _outputs_by_name(pairs: Iterable[tuple[str, Iterable[str]]], into: dict[str, set[str]]) -> dict[str, set[str]]:
    """Output name -> sources, names lower-cased as result columns are looked up (a quoted
    ``AS "X"`` is the same name to masking as ``x``: both may carry what either does)."""
    for name, sources in pairs:
        into.setdefault(name.lower(), set()).update(src.lower() for src in sources)
    return into


def _column_sources(name: str, outputs: dict[str, set[str]], range_names: set[str], *,
                    result: bool = False) -> set[str]:
    """The column names an output column may carry: its own name, what it is computed from
    (aliases, expressions, subqueries, transitively) and "*" for a whole-row reference.
    ``result``: ``name`` is a result column's (RowDescription): one the analysis has no output
    of that name for may be any expression it could not name ("?column?"), and any column when
    a set operation's names are unknown (sql.ANY_OUTPUT)."""
    seen: set[str] = set()
    todo = [name.lower()]
    if result:
        if todo[0] not in outputs:
            todo.append("?column?")
        todo.append(ANY_OUTPUT)
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for src in outputs.get(current, ()):
            todo.append(src.lower())
    return seen


# Statement kinds that rename a relation or its columns, or make its rows readable through
# another relation or copied by code that runs later: refused on a relation with masked columns.
# (A kind ending in .RENAME or .RENAME_COLUMN renames too: ALTER_TABLE.RENAME, ALTER_VIEW.RENAME ...)
_RENAMING_KINDS = frozenset({"ALTER_SCHEMA"})   # ALTER TABLE ... SET SCHEMA
_REWIRING_KINDS = _RENAMING_KINDS | frozenset({"CREATE_TRIGGER", "CREATE_RULE", "ALTER_TABLE.ADD_INHERIT",
                                               "ALTER_TABLE.ATTACH_PARTITION", "CREATE_TABLE.PARTITION_OF",
                                               "CREATE_TABLE.INHERITS"})


def _renames(kind: str) -> bool:
    return kind in _RENAMING_KINDS or kind.endswith((".RENAME", ".RENAME_COLUMN"))

# The planner's statistics: sample values of columns (refused while a rule masks columns).
_STATISTICS = frozenset({"pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data"})


def _reads_statistics(statements: Sequence[StatementAnalysis]) -> bool:
    # An unqualified pg_* name is pg_catalog's: pg_catalog comes first unless a path names it later.
    return any(r.name in _STATISTICS for st in statements for r in st.reads)


# Statement kinds whose outputs are what the bot reads (a SELECT, DELETE/UPDATE ... RETURNING),
# not what is written into a relation (INSERT ... SELECT, CREATE TABLE AS, a view ...).
_RETURNING_KINDS = frozenset({"SELECT", "DELETE", "UPDATE", "EXECUTE"})


def _spec_covers(pattern: str, relations: Sequence[Relation]) -> bool:
    """A column entry may name a column of one of ``relations`` (no table part, or one that
    matches one of them)."""
    table_part, sep, _ = pattern.rpartition(".")
    if not sep:
        return True
    tp = _QualifiedPattern.parse(table_part)
    return any(_one(tp, r.schema, r.name, True) or (r.schema is None and tp.name(r.name)) for r in relations)


def _column_spec_matches(pattern: str, sources: set[str], relations: Sequence[Relation]) -> bool:
    table_part, sep, column = pattern.rpartition(".")
    col_glob = _glob(column)
    if not ("*" in sources or any(col_glob(s) for s in sources)):
        return False
    return not sep or _spec_covers(pattern, relations)


def _put(cache: dict, key: Any, value: Any) -> None:
    if len(cache) >= CACHE_MAX and key not in cache:
        # FIFO (dicts keep insertion order), a hundredth at a time: dropping a tenth, found by
        # copying every key, held the event loop for about 3 ms twice a second under pgbench,
        # whose statements all differ; this takes about 0.1 ms, 20 times a second.
        # pop, not del: the front may have a second thread learning a big catalog
        # (fronts/postgres/startup.py), whose own eviction may have taken the key first.
        for old in list(islice(cache, CACHE_MAX // 100)):
            cache.pop(old, None)
    cache[key] = value
