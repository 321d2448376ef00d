"""SQL analysis through PostgreSQL's own parser (pglast); never regular expressions.

:func:`analyze_sql` turns the text of a simple Query (or of a Parse message, ``$n``
parameters included) into one :class:`StatementAnalysis` per statement: its kind
and every nested kind (DML inside CTEs, the statement under PREPARE / EXPLAIN /
DECLARE, the SQL inside DO blocks and function bodies), the relations read and
written (a CTE name is not a relation), every function called anywhere, and
properties such as ``no_where`` or ``copy_program``.

The walk runs over libpg_query's JSON tree (5x cheaper than pglast's Python
objects). Fields whose C type is a concrete node (``RangeVar*``) are not wrapped
in ``{"RangeVar": ...}`` there, so the field types are read once from
``pglast.ast`` to walk every field of every node: nothing is skipped by accident.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import orjson
import pglast
from pglast import ast as _ast
from pglast import enums as _enums
from pglast.parser import ParseError, parse_sql_json

# --- field types of every node, from pglast's own description -------------------------------

_WRAPPED = {"Node", "List", "Expr", "char", "Bitmapset"}


def _field_types() -> dict[str, dict[str, str | None]]:
    out: dict[str, dict[str, str | None]] = {}
    for name in dir(_ast):
        cls = getattr(_ast, name)
        slots = getattr(cls, "__slots__", None)
        if not (isinstance(cls, type) and issubclass(cls, _ast.Node) and isinstance(slots, dict)):
            continue
        fields: dict[str, str | None] = {}
        for fname, info in slots.items():
            ctype = getattr(info, "c_type", "")
            base = ctype[:-1] if ctype.endswith("*") else None
            fields[fname] = base if base and base not in _WRAPPED and hasattr(_ast, base) else None
        out[name] = fields
    return out


_FIELDS = _field_types()
_NODE_NAMES = frozenset(_FIELDS)

# --- kinds --------------------------------------------------------------------------------------

_TRANSACTION_KINDS = {
    "TRANS_STMT_BEGIN": "BEGIN", "TRANS_STMT_START": "BEGIN", "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK", "TRANS_STMT_SAVEPOINT": "SAVEPOINT", "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK_TO", "TRANS_STMT_PREPARE": "PREPARE_TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK_PREPARED",
}

# Node name -> kind where the default (CamelCase minus "Stmt" in UPPER_SNAKE) reads badly.
_KIND_NAMES = {
    "SelectStmt": "SELECT", "InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE", "CopyStmt": "COPY", "TruncateStmt": "TRUNCATE", "CreateStmt": "CREATE_TABLE",
    "IndexStmt": "CREATE_INDEX", "ViewStmt": "CREATE_VIEW", "CreateSeqStmt": "CREATE_SEQUENCE",
    "AlterSeqStmt": "ALTER_SEQUENCE", "CreateSchemaStmt": "CREATE_SCHEMA", "CreateTrigStmt": "CREATE_TRIGGER",
    "CreateEventTrigStmt": "CREATE_EVENT_TRIGGER", "CreatePLangStmt": "CREATE_LANGUAGE",
    "CreatedbStmt": "CREATE_DATABASE", "DropdbStmt": "DROP_DATABASE", "AlterDatabaseStmt": "ALTER_DATABASE",
    "AlterDatabaseSetStmt": "ALTER_DATABASE", "CreateRoleStmt": "CREATE_ROLE", "AlterRoleStmt": "ALTER_ROLE",
    "AlterRoleSetStmt": "ALTER_ROLE", "DropRoleStmt": "DROP_ROLE", "AlterSystemStmt": "ALTER_SYSTEM",
    "CreateExtensionStmt": "CREATE_EXTENSION", "AlterExtensionStmt": "ALTER_EXTENSION",
    "AlterExtensionContentsStmt": "ALTER_EXTENSION", "CreateFdwStmt": "CREATE_FOREIGN_DATA_WRAPPER",
    "CreateForeignServerStmt": "CREATE_SERVER", "CreateForeignTableStmt": "CREATE_FOREIGN_TABLE",
    "CreateUserMappingStmt": "CREATE_USER_MAPPING", "CreatePolicyStmt": "CREATE_POLICY",
    "AlterPolicyStmt": "ALTER_POLICY", "RuleStmt": "CREATE_RULE", "CompositeTypeStmt": "CREATE_TYPE",
    "CreateEnumStmt": "CREATE_TYPE", "CreateRangeStmt": "CREATE_TYPE", "CreateDomainStmt": "CREATE_DOMAIN",
    "DefineStmt": "CREATE_TYPE", "CreateTableSpaceStmt": "CREATE_TABLESPACE", "DropTableSpaceStmt": "DROP_TABLESPACE",
    "AlterOwnerStmt": "ALTER_OWNER", "AlterObjectSchemaStmt": "ALTER_SCHEMA", "RenameStmt": "RENAME",
    "AlterDefaultPrivilegesStmt": "ALTER_DEFAULT_PRIVILEGES", "AlterFunctionStmt": "ALTER_FUNCTION",
    "VariableShowStmt": "SHOW", "DeclareCursorStmt": "DECLARE_CURSOR", "FetchStmt": "FETCH",
    "ClosePortalStmt": "CLOSE", "DoStmt": "DO", "CallStmt": "CALL", "ExplainStmt": "EXPLAIN",
    "PrepareStmt": "PREPARE", "ExecuteStmt": "EXECUTE", "DeallocateStmt": "DEALLOCATE", "LockStmt": "LOCK",
    "ListenStmt": "LISTEN", "UnlistenStmt": "UNLISTEN", "NotifyStmt": "NOTIFY", "LoadStmt": "LOAD",
    "CheckPointStmt": "CHECKPOINT", "DiscardStmt": "DISCARD", "ClusterStmt": "CLUSTER", "ReindexStmt": "REINDEX",
    "CommentStmt": "COMMENT", "SecLabelStmt": "SECURITY_LABEL", "RefreshMatViewStmt": "REFRESH_MATERIALIZED_VIEW",
    "ReassignOwnedStmt": "REASSIGN_OWNED", "DropOwnedStmt": "DROP_OWNED", "ImportForeignSchemaStmt": "IMPORT_FOREIGN_SCHEMA",
    "CreateSubscriptionStmt": "CREATE_SUBSCRIPTION", "AlterSubscriptionStmt": "ALTER_SUBSCRIPTION",
    "DropSubscriptionStmt": "DROP_SUBSCRIPTION", "CreatePublicationStmt": "CREATE_PUBLICATION",
    "AlterPublicationStmt": "ALTER_PUBLICATION", "CreateConversionStmt": "CREATE_CONVERSION",
    "CreateCastStmt": "CREATE_CAST", "CreateOpClassStmt": "CREATE_OPERATOR_CLASS", "CreateStatsStmt": "CREATE_STATISTICS",
    "ConstraintsSetStmt": "SET_CONSTRAINTS", "DropUserMappingStmt": "DROP_USER_MAPPING",
}

_TABLE_OBJECTS = {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE",
                  "OBJECT_INDEX"}


def _default_kind(node: str) -> str:
    base = node[:-4] if node.endswith("Stmt") else node
    out = ""
    for i, ch in enumerate(base):
        if ch.isupper() and i and not base[i - 1].isupper():
            out += "_"
        out += ch.upper()
    return out


def _object_suffix(objtype: str | None) -> str:
    return (objtype or "OBJECT_TABLE").removeprefix("OBJECT_")


# CREATE OPERATOR / AGGREGATE / TYPE / COLLATION / TEXT SEARCH ... are one node (DefineStmt).
_DEFINE_KINDS = {"OBJECT_TSPARSER": "CREATE_TEXT_SEARCH_PARSER", "OBJECT_TSDICTIONARY": "CREATE_TEXT_SEARCH_DICTIONARY",
                 "OBJECT_TSTEMPLATE": "CREATE_TEXT_SEARCH_TEMPLATE",
                 "OBJECT_TSCONFIGURATION": "CREATE_TEXT_SEARCH_CONFIGURATION"}

# ALTER TABLE subcommands are sub-kinds: ``ALTER_TABLE.DROP_COLUMN`` (from AT_DropColumn). A kind
# pattern matches its sub-kinds (``ALTER_TABLE`` matches ``ALTER_TABLE.ADD_COLUMN``).
_ALTER_OBJECTS = ("TABLE", "INDEX", "VIEW", "MATVIEW", "FOREIGN_TABLE", "SEQUENCE", "TYPE")


def _alter_subkind(subtype: str) -> str:
    return _default_kind(subtype.removeprefix("AT_")).replace("UN_LOGGED", "UNLOGGED")


_RENAME_SUBKINDS = {"OBJECT_COLUMN": "RENAME_COLUMN", "OBJECT_ATTRIBUTE": "RENAME_COLUMN",
                    "OBJECT_TABCONSTRAINT": "RENAME_CONSTRAINT"}
_MERGE_SUBKINDS = ("MERGE.INSERT", "MERGE.UPDATE", "MERGE.DELETE")

# Sub-kinds that destroy data or schema (property ``destructive``), beside DROP_*, TRUNCATE,
# DROP_OWNED, REASSIGN_OWNED, MERGE.DELETE and no_where UPDATE/DELETE. ALTER COLUMN TYPE
# rewrites the table and its USING expression may replace every value.
_DESTRUCTIVE_SUBCOMMANDS = ("DROP_COLUMN", "DROP_CONSTRAINT", "ALTER_COLUMN_TYPE")
_DESTRUCTIVE_KINDS = {"TRUNCATE", "REASSIGN_OWNED", "MERGE.DELETE"}


def _all_kinds() -> frozenset[str]:
    kinds = {_KIND_NAMES.get(n, _default_kind(n)) for n in _NODE_NAMES if n.endswith("Stmt")}
    kinds.discard("RAW")
    kinds |= set(_TRANSACTION_KINDS.values()) | {"SET", "RESET", "GRANT", "REVOKE", "CREATE_TABLE_AS",
                                                 "CREATE_MATERIALIZED_VIEW", "CREATE_FUNCTION", "CREATE_PROCEDURE",
                                                 "VACUUM", "ANALYZE", "ALTER_TABLE", "CREATE_OPERATOR",
                                                 "CREATE_AGGREGATE", "CREATE_COLLATION", *_DEFINE_KINDS.values(),
                                                 *_MERGE_SUBKINDS, "CREATE_TABLE.PARTITION_OF",
                                                 "CREATE_TABLE.INHERITS"}
    for member in _enums.ObjectType:
        suffix = member.name.removeprefix("OBJECT_")
        kinds |= {"DROP_" + suffix, "ALTER_" + suffix}
    subs = {_alter_subkind(m.name) for m in _enums.AlterTableType} | {"RENAME", *_RENAME_SUBKINDS.values()}
    kinds |= {f"ALTER_{obj}.{sub}" for obj in _ALTER_OBJECTS for sub in subs}
    return frozenset(kinds)


KNOWN_KINDS = _all_kinds()

# Named groups of kinds a rule may use in ``kinds``.
KIND_CATEGORIES: dict[str, Any] = {
    "DML": lambda k: k in {"INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "TRUNCATE"},
    "DDL": lambda k: k.startswith(("CREATE_", "ALTER_", "DROP_")) or k in {"RENAME", "COMMENT", "SECURITY_LABEL"},
    "DCL": lambda k: k in {"GRANT", "REVOKE"},
    "TRANSACTION": lambda k: k in set(_TRANSACTION_KINDS.values()),
    "SESSION": lambda k: k in {"SET", "RESET", "SHOW", "DISCARD", "SET_CONSTRAINTS"},
    "DROP": lambda k: k.startswith("DROP_"),
    "CREATE": lambda k: k.startswith("CREATE_"),
    "ALTER": lambda k: k.startswith("ALTER_"),
}

PROPERTIES = frozenset({
    "no_where", "truncate", "drop", "copy_program", "copy_file", "copy_from", "copy_to", "alter_system",
    "set_role", "set_session_authorization", "do_block", "function_body", "multi_statement", "dynamic_sql",
    "opaque_body", "select_into", "role_grant", "explain_analyze", "locking", "writes", "prepared",
    "destructive", "explain_only",
})

# Options of CREATE OPERATOR / AGGREGATE / TYPE / TEXT SEARCH PARSER|TEMPLATE, CREATE TYPE AS RANGE,
# ALTER OPERATOR / ALTER TYPE ... SET (...) whose value is a function the server will call: each
# is a function of the statement, so a rule blocking pg_read_file also blocks an operator or an
# aggregate's final function that is pg_read_file under a new name.
_FUNCTION_OPTIONS = frozenset({
    "function", "procedure", "restrict", "join",  # operators
    "sfunc", "finalfunc", "combinefunc", "serialfunc", "deserialfunc", "msfunc", "minvfunc", "mfinalfunc",
    "input", "output", "receive", "send", "typmod_in", "typmod_out", "analyze", "subscript",  # types
    "canonical", "subtype_diff",  # ranges
    "start", "gettoken", "end", "lextypes", "headline", "init", "lexize",  # text search
    "handler", "validator",  # foreign-data wrappers
})

# Built-in functions that run SQL given as text, from PostgreSQL 15's pg_proc (the one list;
# tests/test_policy_pg_functions.py shows each running its argument on a real server): name ->
# (argument index, argument count or None for any). A constant argument is analyzed like any
# nested statement; another sets dynamic_sql. query_to_xmlschema only plans its query, but
# planning runs immutable functions (constant folding), so it is here too.
SQL_TEXT_FUNCTIONS: dict[str, tuple[int, int | None]] = {
    "query_to_xml": (0, None),
    "query_to_xmlschema": (0, None),
    "query_to_xml_and_xmlschema": (0, None),
    "ts_stat": (0, None),
    "ts_rewrite": (1, 2),  # ts_rewrite(query tsquery, select text); the 3-argument form runs nothing
}

# Built-ins that read whole relations named by an argument (SELECT * FROM it, through SPI): the
# relation is a read of the statement. "table": a regclass; "schema": every table of a schema;
# "database": every table. A non-constant name sets dynamic_sql. Each output of a statement that
# calls one of these, or a SQL_TEXT_FUNCTIONS one, may carry any column they read (masking).
# Built-ins that return the rows of a cursor named by their first argument: read as FETCH from it.
CURSOR_READING_FUNCTIONS = frozenset({"cursor_to_xml", "cursor_to_xmlschema"})

# An output name standing for every column of a result: what a set operation returns under
# names botwarden cannot know (its first branch has a *), it may carry in any column.
ANY_OUTPUT = "?any"

# Functions that keep or send their arguments somewhere a later statement, another session or
# another server reads them back (a setting, a notification's payload, a large object, a file,
# SQL run elsewhere): the column names in their arguments are recorded (``sent``), so a value
# masking hides is not passed to one (engine: the statement is refused).
SENDING_FUNCTIONS = frozenset({
    "set_config", "pg_notify", "lo_from_bytea", "lo_put", "pg_file_write", "pg_logical_emit_message",
    "dblink", "dblink_exec", "dblink_send_query", "dblink_open", "dblink_fetch",
})

RELATION_READING_FUNCTIONS: dict[str, str] = {
    "table_to_xml": "table", "table_to_xmlschema": "table", "table_to_xml_and_xmlschema": "table",
    "schema_to_xml": "schema", "schema_to_xmlschema": "schema", "schema_to_xml_and_xmlschema": "schema",
    "database_to_xml": "database", "database_to_xmlschema": "database", "database_to_xml_and_xmlschema": "database",
}

# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Relation:
    """``schema`` None = unqualified (resolved against the search path when matched);
    ``name`` "*" = a whole schema (``DROP SCHEMA``)."""

    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True, order=True)
class Function:
    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class StatementAnalysis:
    """What one statement does. ``error`` set = it could not be analyzed (fail closed)."""

    kind: str
    kinds: frozenset[str] = frozenset()
    reads: frozenset[Relation] = frozenset()
    writes: frozenset[Relation] = frozenset()
    functions: frozenset[Function] = frozenset()
    # Operators by their symbols (``=``, ``###``; BETWEEN's, IN's and the like's too) and casts
    # by their target types (``x::bwv_badge``: the type's name, ``_name`` for an array of it) the
    # statement uses: a user-defined one runs its function (engine.resolve_catalog), which no
    # function name in the statement shows.
    operators: frozenset[Function] = frozenset()
    properties: frozenset[str] = frozenset()
    error: str | None = None
    # Output column name -> the column names it is computed from ("*" = a whole row).
    outputs: tuple[tuple[str, frozenset[str]], ...] = ()
    # UPDATE's SET: assigned column -> the column names its value is computed from.
    assigned: tuple[tuple[str, frozenset[str]], ...] = ()
    # Calls of SENDING_FUNCTIONS: function name -> the column names in its arguments.
    sent: tuple[tuple[str, frozenset[str]], ...] = ()
    # Functions, triggers and rules made before the session that the statement runs
    # (engine.resolve_catalog): what -> the relations its body reads or writes, and the relations
    # whose rows it sees as NEW and OLD with the columns of them it reads (None: all).
    bodies: tuple[tuple[str, frozenset["Relation"], frozenset["Relation"], frozenset[str] | None], ...] = ()
    # Session effects (applied by SqlSessionState when the statement is let through).
    prepare_name: str | None = None
    prepared_body: "StatementAnalysis | None" = field(default=None, compare=False)
    execute_name: str | None = None
    deallocate: str | None = None  # a name, or "*" for ALL
    search_path: tuple[str, ...] | None = None  # schemas a SET search_path names; ("*",) = unknown
    reset_session: bool = False  # RESET ALL / DISCARD ALL
    # Cursors: DECLARE name (and what its query is), FETCH / MOVE name, CLOSE name ("*": ALL).
    declare_name: str | None = None
    declared_body: "StatementAnalysis | None" = field(default=None, compare=False)
    fetch_name: str | None = None
    close_cursor: str | None = None
    channel: str | None = None  # LISTEN's
    # The analysis read a constant's value (SQL text in query_to_xml, a LIKE pattern, a relation
    # name): another constant in the same place may mean something else, so no shape caching.
    reads_constants: bool = False

    @property
    def relations(self) -> frozenset[Relation]:
        return self.reads | self.writes

    def summary(self) -> str:
        parts = [self.kind]
        if self.writes:
            parts.append("writes " + ", ".join(sorted(map(str, self.writes))))
        if self.reads:
            parts.append("reads " + ", ".join(sorted(map(str, self.reads))))
        if self.functions:
            parts.append("calls " + ", ".join(sorted(map(str, self.functions))))
        if self.properties:
            parts.append("[" + ", ".join(sorted(self.properties)) + "]")
        return " ".join(parts)


@dataclass(frozen=True)
class BatchAnalysis:
    statements: tuple[StatementAnalysis, ...]
    # True when the verdict may be cached by statement shape (constants replaced): no
    # statement's meaning hangs on a literal (DO bodies, SET values, function bodies).
    shape_cacheable: bool = True
    # True when the verdict depends on or changes per-session state (PREPARE/EXECUTE/SET...).
    session_bound: bool = False


_SHAPE_SENSITIVE = {"DO", "CREATE_FUNCTION", "CREATE_PROCEDURE", "SET", "RESET", "PREPARE", "EXECUTE",
                    "DEALLOCATE", "DISCARD", "ALTER_FUNCTION"}
_SESSION_KINDS = {"SET", "RESET", "PREPARE", "EXECUTE", "DEALLOCATE", "DISCARD"}
_SESSION_FUNCTIONS = {"set_config"}


def unparsed(message: str) -> StatementAnalysis:
    return StatementAnalysis(kind="UNPARSED", error=message, properties=frozenset({"unparsed"}))


def _parse_error_message(e: ParseError) -> str:
    # The parser quotes the text near the error, which may be a secret literal: keep only the
    # message and the position.
    text = str(e.args[0]) if e.args else "syntax error"
    text = text.split(" at or near ", 1)[0].split(" at end of input", 1)[0]
    loc = e.args[1] if len(e.args) > 1 else None
    return f"{text} at character {loc + 1}" if isinstance(loc, int) else text


def syntax_error(sql: str) -> tuple[str, int | None] | None:
    """(message, 1-based character position) when PostgreSQL's parser rejects ``sql``, as the
    server would report it (the text near the error included: only the client sees it)."""
    try:
        parse_sql_json(sql)
    except ParseError as e:
        loc = e.args[1] if len(e.args) > 1 else None
        return str(e.args[0]) if e.args else "syntax error", (loc + 1 if isinstance(loc, int) else None)
    return None


DEEP_RECURSION_LIMIT = 12_000


def _tree(parsed: str) -> Any:
    """pglast's JSON parse tree as dicts and lists: orjson (twice as fast as json here, and every
    statement of a new shape pays it), json for a tree nested deeper than orjson's 1,024 levels."""
    try:
        return orjson.loads(parsed)
    except orjson.JSONDecodeError:
        return json.loads(parsed)


def analyze_sql(sql: str) -> BatchAnalysis:
    """Analyze every statement of ``sql``. Never raises on bad SQL: such a batch is one
    statement with ``error`` set. EXECUTE is left unresolved (see :func:`resolve_execute`)."""
    try:
        return _analyze_sql(sql)
    except RecursionError:
        pass
    # Deeply nested expressions (long generated a + b + c ... chains) exceed Python's default
    # recursion limit in the JSON decoder and the walk: retry once with more room, then refuse.
    old = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(max(old, DEEP_RECURSION_LIMIT))
        return _analyze_sql(sql)
    except RecursionError:
        return BatchAnalysis((unparsed("statement nested too deeply for botwarden to analyze"),),
                             shape_cacheable=False)
    finally:
        sys.setrecursionlimit(old)


def _analyze_sql(sql: str) -> BatchAnalysis:
    try:
        tree = _tree(parse_sql_json(sql))
    except ParseError as e:
        return BatchAnalysis((unparsed(_parse_error_message(e)),), shape_cacheable=False)
    except UnicodeEncodeError:
        # Undecodable bytes carried as surrogates (a command line, surrogateescape): the parser
        # takes UTF-8 only, and botwarden will not guess what the server would read.
        return BatchAnalysis((unparsed("statement is not valid UTF-8"),), shape_cacheable=False)
    raw = sql.encode("utf-8")
    stmts = tree.get("stmts", [])
    results = []
    for entry in stmts:
        start = entry.get("stmt_location", 0)
        length = entry.get("stmt_len", 0)
        text = raw[start:start + length] if length else raw[start:]
        results.append(_analyze_statement(entry.get("stmt", {}), text.decode("utf-8", "replace")))
    if not results:  # an empty query string: nothing is executed
        results.append(StatementAnalysis(kind="EMPTY", kinds=frozenset({"EMPTY"})))
    if len(results) > 1:
        results = [replace(r, properties=r.properties | {"multi_statement"}) for r in results]
    shape = all(r.error is None and not (r.kinds & _SHAPE_SENSITIVE) and not r.reads_constants
                and not any(f.name in _SESSION_FUNCTIONS for f in r.functions) for r in results)
    # Session-bound: its verdict is not cached, so every run changes the session's state (a cache
    # hit returns a verdict without applying the statement to the session).
    session = any((r.kinds & _SESSION_KINDS) or any(f.name in _SESSION_FUNCTIONS for f in r.functions)
                  or r.search_path is not None or r.deallocate is not None or r.prepare_name is not None
                  or r.execute_name is not None or r.reset_session or r.declare_name is not None
                  or r.fetch_name is not None or r.close_cursor is not None for r in results)
    return BatchAnalysis(tuple(results), shape_cacheable=shape, session_bound=session)


def resolve_fetch(stmt: StatementAnalysis, cursors: Mapping[str, StatementAnalysis]) -> StatementAnalysis:
    """FETCH / MOVE name: it returns the rows of the query ``name`` was declared for in this
    session, so it is decided (and masked) as that query too."""
    if stmt.fetch_name is None:
        return stmt
    body = cursors.get(stmt.fetch_name)
    if body is None:
        return replace(stmt, error=f"FETCH from cursor {stmt.fetch_name!r} that botwarden did not see declared")
    # FETCH's rows are the query's; cursor_to_xml's are its own columns (each may carry any).
    return _running(stmt, body, outputs=body.outputs if stmt.kind == "FETCH" else stmt.outputs)


def _running(stmt: StatementAnalysis, body: StatementAnalysis, **fields: Any) -> StatementAnalysis:
    """``stmt`` (EXECUTE, FETCH) as it runs ``body`` (a prepared statement, a cursor's query)."""
    return replace(stmt, kinds=stmt.kinds | body.kinds, reads=stmt.reads | body.reads,
                   writes=stmt.writes | body.writes, functions=stmt.functions | body.functions,
                   properties=stmt.properties | (body.properties - {"multi_statement"}) | fields.pop("properties", set()),
                   assigned=tuple(sorted(set(stmt.assigned) | set(body.assigned))),
                   sent=tuple(sorted(set(stmt.sent) | set(body.sent))), **fields)


def only_stamps_its_row(definition: str) -> bool:
    """Whether a PL/pgSQL trigger function (``CREATE FUNCTION`` text, as pg_get_functiondef prints
    it) does nothing with the row it is given but set fields of NEW from expressions that read no
    other field (``NEW.updated_at := now()``, ``NEW.version := NEW.version + 1``), maybe under an
    IF over the trigger's own variables (``IF TG_OP = 'UPDATE'``), and return NEW, OLD or NULL:
    then the row's values go nowhere (engine.learn_catalog). Anything else, or text this cannot
    read: False."""
    try:
        tree = pglast.parse_plpgsql(definition)
        function = tree[0]["PLpgSQL_function"]
        block = function["action"]["PLpgSQL_stmt_block"]
        return not block.get("exceptions") and _stamps(block.get("body", []), function["datums"])
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, ParseError, _Unanalyzable):
        return False


def _stamps(stmts: list[Any], datums: list[Any]) -> bool:
    for stmt in stmts:
        (kind, value), = stmt.items()
        if kind == "PLpgSQL_stmt_return":
            expr = value.get("expr")
            if (expr and expr["PLpgSQL_expr"]["query"].strip().lower() != "null") or value.get("retvarno", 0) not in (0, 1):
                return False
        elif kind == "PLpgSQL_stmt_assign":
            target = datums[value["varno"]].get("PLpgSQL_recfield")
            if target is None or datums[target.get("recparentno", 0)]["PLpgSQL_rec"].get("refname") != "new":
                return False
            rhs = _after_assignment(value["expr"]["PLpgSQL_expr"]["query"])
            field = target["fieldname"].lower()
            if any(ref != ["new", field] for ref in _column_refs(json.loads(parse_sql_json("SELECT " + rhs)))):
                return False
        elif kind == "PLpgSQL_stmt_if":
            branches = [(value["cond"], value.get("then_body", []))]
            branches += [(e["PLpgSQL_if_elsif"]["cond"], e["PLpgSQL_if_elsif"].get("stmts", []))
                         for e in value.get("elsif_list", [])]
            for cond, body in branches:
                refs = _column_refs(json.loads(parse_sql_json("SELECT " + cond["PLpgSQL_expr"]["query"])))
                if any(len(ref) != 1 or not ref[0].startswith("tg_") for ref in refs) or not _stamps(body, datums):
                    return False
            if not _stamps(value.get("else_body", []), datums):
                return False
        else:
            return False
    return True


def _routine_code(options: Iterable[Any], language: str = "sql") -> tuple[str, str | None]:
    """A CREATE FUNCTION's (its ``options``) or DO block's (its ``args``, ``language``
    plpgsql) language and its body's text (None: no single string, e.g. a C function's object
    file and symbol, or BEGIN ATOMIC)."""
    code = None
    for opt in options:
        elem = opt.get("DefElem", {}) if isinstance(opt, dict) else {}
        if elem.get("defname") == "language":
            language = (_sval(elem.get("arg")) or _const_string(elem.get("arg")) or "").lower()
        elif elem.get("defname") == "as":
            arg = elem.get("arg")
            items = arg["List"].get("items", []) if isinstance(arg, dict) and "List" in arg else (
                arg if isinstance(arg, list) else [arg])
            parts = _names(items or [])
            code = parts[0] if len(parts) == 1 else None
    return language, code


def trigger_row_fields(definition: str) -> frozenset[str] | None:
    """The fields of NEW and OLD a PL/pgSQL trigger function (``CREATE FUNCTION`` text, as
    pg_get_functiondef prints it) reads, lower-cased: ``NEW.title``, ``OLD.email``, wherever they
    appear (expressions, embedded SQL, RAISE, EXECUTE ... USING, declarations). None when it may
    read the whole row or botwarden cannot tell: NEW or OLD as a value (``row_to_json(NEW)``,
    ``f(OLD)``, ``NEW.*``, ``USING NEW``, ``r record := OLD``, ``x ALIAS FOR NEW``, ``(NEW).x``),
    another language, text this cannot read. ``RETURN NEW`` / ``RETURN OLD`` hand the row back to
    the executor and read nothing. Over-approximates: a table aliased ``new`` in an embedded
    query counts as NEW, and comments are skipped but string literals are not looked into (a
    dynamic query cannot see NEW or OLD)."""
    try:
        (entry,) = _tree(parse_sql_json(definition)).get("stmts", [])
        language, code = _routine_code(entry["stmt"]["CreateFunctionStmt"].get("options", []))
        if language != "plpgsql" or code is None:
            return None
        raw = code.encode("utf-8")
        tokens = [(t, raw[t.start:t.end + 1].decode("utf-8", "replace")) for t in pglast.parser.scan(code)
                  if t.name not in ("SQL_COMMENT", "C_COMMENT")]
    except (KeyError, TypeError, ValueError, ParseError, UnicodeError):
        return None
    fields: set[str] = set()
    for i, (_, text) in enumerate(tokens):
        if text.strip('"').lower() not in ("new", "old") or (i and tokens[i - 1][1] == "."):
            continue  # (t.new: a column named new)
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if after == "." and i + 2 < len(tokens):
            field, name = tokens[i + 2][1], tokens[i + 2][0].name
            if name == "IDENT" or tokens[i + 2][0].kind != "NO_KEYWORD":  # (a keyword: NEW.type)
                fields.add(field.strip('"').lower())
                continue
            return None  # NEW.*
        if after == ";" and i and tokens[i - 1][1].lower() == "return":
            continue
        return None
    return frozenset(fields)


def rule_row_fields(definition: str) -> frozenset[str] | None:
    """The fields of NEW and OLD a rule's condition and actions read (``CREATE RULE`` text, as
    pg_get_ruledef prints it), lower-cased: a rule must qualify them (``new.name``; PostgreSQL
    refuses a bare column of NEW or OLD there). None when it uses a whole row (``new.*``,
    ``old`` as a value, ``(new).x``) or the text does not parse. Over-approximates: a range
    variable aliased ``new`` or ``old`` in an action counts as the row."""
    try:
        refs = _column_refs(json.loads(parse_sql_json(definition)))
    except (ValueError, ParseError, UnicodeError):
        return None
    fields: set[str] = set()
    for ref in refs:
        if ref[0] in ("new", "old"):
            if len(ref) < 2 or ref[1] == "*":
                return None
            fields.add(ref[1])
    return frozenset(fields)


def _column_refs(node: Any) -> list[list[str]]:
    """Every ColumnRef's names (lower-cased; '*' for a star) in a parse tree."""
    found: list[list[str]] = []
    todo = [node]
    while todo:
        current = todo.pop()
        if isinstance(current, dict):
            ref = current.get("ColumnRef")
            if isinstance(ref, dict):
                found.append([n.lower() for n in _names(ref.get("fields", ()))] or ["*"])
            todo.extend(current.values())
        elif isinstance(current, list):
            todo.extend(current)
    return found


def _routine_search_path(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The schemas of a CREATE FUNCTION's ``SET search_path = ...`` clause (as
    pg_get_functiondef prints it, or as written), () for one botwarden cannot read, None for none."""
    for opt in body.get("options", []):
        elem = opt.get("DefElem", {}) if isinstance(opt, dict) else {}
        stmt = elem.get("arg", {}).get("VariableSetStmt") if elem.get("defname") == "set" and isinstance(
            elem.get("arg"), dict) else None
        if not stmt or str(stmt.get("name", "")).lower() != "search_path":
            continue
        if "VALUE" not in str(stmt.get("kind", "")):
            return ()  # DEFAULT / FROM CURRENT as written: the value is not in the text
        values = [v if (v := _const_string(a)) is not None else _sval(a) for a in stmt.get("args", [])]
        if any(v is None for v in values):
            return ()
        return tuple(p.strip().strip('"') for v in values for p in v.split(","))  # type: ignore[union-attr]
    return None


def _joined_path(path: tuple[str, ...] | None, more: tuple[str, ...]) -> tuple[str, ...]:
    """Both search paths a statement may leave (kept in order, each schema once)."""
    return more if path is None else tuple(dict.fromkeys(path + more))


def resolve_execute(stmt: StatementAnalysis, prepared: Mapping[str, StatementAnalysis]) -> StatementAnalysis:
    """EXECUTE name: what it runs is what ``name`` was prepared as in this session."""
    if stmt.execute_name is None:
        return stmt
    body = prepared.get(stmt.execute_name)
    if body is None:
        return replace(stmt, error=f"EXECUTE of prepared statement {stmt.execute_name!r} that botwarden did not see prepared")
    # What the body sets, it sets now.
    path = stmt.search_path if body.search_path is None else _joined_path(stmt.search_path, body.search_path)
    return _running(stmt, body, properties={"prepared"}, outputs=body.outputs, search_path=path)


def _analyze_statement(wrapped: Mapping[str, Any], text: str) -> StatementAnalysis:
    walker = _Walker(text)
    try:
        walker.top(wrapped)
    except _Unanalyzable as e:
        return unparsed(str(e))
    return walker.result()


class _Unanalyzable(Exception):
    pass


def _sval(node: Any) -> str | None:
    if isinstance(node, dict):
        if "String" in node:
            return node["String"].get("sval", "")
        if "sval" in node and isinstance(node["sval"], str):
            return node["sval"]
    return None


def _names(items: Iterable[Any]) -> list[str]:
    return [s for s in (_sval(i) for i in items or ()) if s is not None]


def _const_string(node: Any) -> str | None:
    """A string constant, or a || concatenation of them (folded), else None."""
    if not isinstance(node, dict):
        return None
    if "A_Const" in node:
        val = node["A_Const"].get("sval")
        return val.get("sval", "") if isinstance(val, dict) else None
    if "TypeCast" in node:
        return _const_string(node["TypeCast"].get("arg"))
    if "A_Expr" in node:
        expr = node["A_Expr"]
        if expr.get("kind") == "AEXPR_OP" and _names(expr.get("name", ())) == ["||"]:
            left, right = _const_string(expr.get("lexpr")), _const_string(expr.get("rexpr"))
            if left is not None and right is not None:
                return left + right
    return None


def _has_column_ref(node: Any) -> bool:
    """Any column reference at all (a select list item that is only constants and calls)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ColumnRef":
                return True
            if _has_column_ref(value):
                return True
    elif isinstance(node, list):
        return any(_has_column_ref(v) for v in node)
    return False


# --- does a WHERE (or MERGE's ON) filter the target's rows? ----------------------------------------
#
# Syntax alone cannot know how many rows a condition keeps; these are the shapes that keep every
# row (or every row with a non-null key) whatever the data: a condition that never mentions the
# target (``true``, ``$1``, ``EXISTS (SELECT 1 FROM other)``, ``new.id IS NOT NULL`` in a rule),
# ``x = x``, ``x IS NOT NULL`` (a key column is never null, and the parser cannot see constraints),
# ``x LIKE '%'``, an OR with such a branch, an AND of only such parts, and a self-join on the same
# column (``t.id = t2.id`` where t2 is the target table again).

_TAUTOLOGY_OPS = frozenset({"=", ">=", "<="})
_NO_COLUMNS = frozenset({"name", "funcname", "typeName"})  # lists of names only
_CONTRADICTION_OPS = frozenset({"<>", "!=", "<", ">"})


class _Target:
    """The names the target of an UPDATE / DELETE / MERGE goes by inside its condition."""

    def __init__(self, relation: Mapping[str, Any] | None, sources: Iterable[Any]):
        rel = relation.get("RangeVar", relation) if isinstance(relation, dict) else {}
        alias = rel.get("alias", {}).get("aliasname") if isinstance(rel.get("alias"), dict) else None
        self.names = frozenset({(alias or rel.get("relname", "")).lower()})
        # Other range entries that are the target table again (a self-join): t2.id is t.id.
        key = ((rel.get("schemaname") or "").lower(), rel.get("relname", "").lower())
        same = set()
        for src in _range_vars(sources):
            if ((src.get("schemaname") or "").lower(), src.get("relname", "").lower()) == key:
                src_alias = src.get("alias", {}).get("aliasname") if isinstance(src.get("alias"), dict) else None
                same.add((src_alias or src.get("relname", "")).lower())
        self.same = frozenset(same - self.names)
        self.read_constant = False  # a constant's value decided (LIKE '%'): no shape caching

    def keeps_every_row_of(self, walker: "_Walker", node: Any) -> bool:
        found = self.keeps_every_row(node)
        walker.reads_constants |= self.read_constant
        return found

    def mentioned(self, node: Any, nested: bool = False, names: frozenset[str] | None = None) -> bool:
        """A column of the target is referenced: unqualified at this level (inside a subquery an
        unqualified name belongs to the subquery's tables), or qualified by a target name that
        no subquery's FROM hides (``EXISTS (SELECT 1 FROM t WHERE t.x > 0)`` is the inner t)."""
        names = self.names if names is None else names
        if type(node) is list:
            return any(self.mentioned(v, nested, names) for v in node)
        if type(node) is not dict:
            return False
        for key, value in node.items():
            if (type(value) is not dict and type(value) is not list) or key in _NO_COLUMNS:
                continue  # positions, flags, operator and function names: nothing to look into
            if key == "ColumnRef":
                fields = value.get("fields", ()) if type(value) is dict else ()
                if len(fields) == 1:
                    if not nested:
                        return True
                elif len(fields) >= 2 and (_sval(fields[-2]) or "").lower() in names:
                    return True
            elif key == "SelectStmt" and type(value) is dict:
                inner = names - _from_names(value.get("fromClause", ()))
                if inner and self.mentioned({k: v for k, v in value.items() if k != "fromClause"}, True, inner):
                    return True
                if inner and self.mentioned(value.get("fromClause"), True, inner):
                    return True
            elif self.mentioned(value, nested, names):
                return True
        return False

    def canon(self, node: Any) -> Any:
        """The expression without positions, the target's aliases (and self-join aliases) removed."""
        if isinstance(node, dict):
            if "CollateClause" in node and isinstance(node["CollateClause"], dict):
                return self.canon(node["CollateClause"].get("arg"))  # x = x COLLATE "C" is x = x
            if "ColumnRef" in node and isinstance(node["ColumnRef"], dict):
                names = [(_sval(f) or "*").lower() for f in node["ColumnRef"].get("fields", ())]
                if len(names) == 2 and names[0] in (self.names | self.same):
                    names = names[1:]
                return ("col", tuple(names))
            return tuple(sorted((k, self.canon(v)) for k, v in node.items() if k != "location"))
        if isinstance(node, list):
            return tuple(self.canon(v) for v in node)
        return node

    def same_sides(self, expr: Mapping[str, Any]) -> bool:
        left, right = expr.get("lexpr"), expr.get("rexpr")
        if not (isinstance(left, dict) and isinstance(right, dict)):
            return False
        if left.keys() != right.keys() and "CollateClause" not in left and "CollateClause" not in right:
            return False  # different node types (id = 1): not the same expression, no need to compare
        return self.canon(left) == self.canon(right)

    def keeps_every_row(self, node: Any) -> bool:
        """True when ``node`` as a WHERE keeps every row of the target (see above)."""
        if node is None or not self.mentioned(node):
            return True
        if not isinstance(node, dict) or len(node) != 1:
            return False
        (kind, body), = node.items()
        if kind == "BoolExpr":
            args = body.get("args", [])
            op = body.get("boolop")
            if op == "OR_EXPR":
                return any(self.keeps_every_row(a) for a in args)
            if op == "AND_EXPR":
                return all(self.keeps_every_row(a) for a in args)
            if op == "NOT_EXPR":
                return any(self.keeps_no_row(a) for a in args)
            return False
        if kind == "A_Expr":
            op = _names(body.get("name", ()))
            ekind = body.get("kind")
            if ekind == "AEXPR_OP" and op and op[-1] in _TAUTOLOGY_OPS:
                return self.same_sides(body)
            if ekind == "AEXPR_OP" and op and op[-1] in ("~~", "~~*"):  # x ~~ '%' is x LIKE '%'
                ekind = "AEXPR_LIKE"
            if ekind == "AEXPR_NOT_DISTINCT":
                return self.same_sides(body)
            if ekind == "AEXPR_IN" and op == ["="]:
                left = self.canon(body.get("lexpr"))
                right = body.get("rexpr")
                items = right.get("List", {}).get("items", []) if isinstance(right, dict) and "List" in right else right
                return isinstance(items, list) and any(self.canon(i) == left for i in items)
            if ekind in ("AEXPR_LIKE", "AEXPR_ILIKE") and op and op[-1] in ("~~", "~~*"):
                pattern = _const_string(body.get("rexpr"))
                self.read_constant = True
                return pattern is not None and pattern != "" and set(pattern) == {"%"}
            if ekind == "AEXPR_BETWEEN" or ekind == "AEXPR_BETWEEN_SYM":
                bounds = body.get("rexpr")
                items = bounds.get("List", {}).get("items", []) if isinstance(bounds, dict) and "List" in bounds else bounds
                left = self.canon(body.get("lexpr"))
                return isinstance(items, list) and len(items) == 2 and all(self.canon(i) == left for i in items)
            return False
        if kind == "NullTest":
            return body.get("nulltesttype") == "IS_NOT_NULL"
        if kind == "BooleanTest":
            test = body.get("booltesttype")
            if test in ("IS_TRUE", "IS_NOT_FALSE"):
                return self.keeps_every_row(body.get("arg"))
            if test in ("IS_FALSE", "IS_NOT_TRUE"):
                return self.keeps_no_row(body.get("arg"))
            return False
        if kind == "TypeCast":
            return self.keeps_every_row(body.get("arg"))
        return False

    def keeps_no_row(self, node: Any) -> bool:
        """True when ``node`` is false for every row with non-null keys (x <> x, x IS NULL)."""
        if not isinstance(node, dict) or len(node) != 1 or not self.mentioned(node):
            return False
        (kind, body), = node.items()
        if kind == "BoolExpr":
            args = body.get("args", [])
            op = body.get("boolop")
            if op == "OR_EXPR":
                return all(self.keeps_no_row(a) for a in args)
            if op == "AND_EXPR":
                return any(self.keeps_no_row(a) for a in args)
            if op == "NOT_EXPR":
                return any(self.keeps_every_row(a) for a in args)
            return False
        if kind == "A_Expr":
            op = _names(body.get("name", ()))
            if body.get("kind") == "AEXPR_OP" and op and op[-1] in _CONTRADICTION_OPS:
                return self.same_sides(body)
            if body.get("kind") == "AEXPR_DISTINCT":
                return self.same_sides(body)
            return False
        if kind == "NullTest":
            return body.get("nulltesttype") == "IS_NULL"
        if kind == "TypeCast":
            return self.keeps_no_row(body.get("arg"))
        return False


def _from_names(items: Iterable[Any]) -> frozenset[str]:
    """The names a FROM list makes visible (aliases, or table names)."""
    out = set()
    for item in items or ():
        if not isinstance(item, dict) or len(item) != 1:
            continue
        (kind, body), = item.items()
        alias = body.get("alias", {}).get("aliasname") if isinstance(body.get("alias"), dict) else None
        if alias:
            out.add(alias.lower())
        elif kind == "RangeVar":
            out.add(body.get("relname", "").lower())
        if kind == "JoinExpr":
            out |= _from_names([body.get("larg"), body.get("rarg")])
    return frozenset(out)


def _regclass(text: str) -> Relation | None:
    """A regclass literal ('s.t', '"T"') as PostgreSQL reads it, by parsing it as a FROM item."""
    try:
        tree = _tree(parse_sql_json("SELECT * FROM " + text))
        stmts = tree.get("stmts", [])
        select = stmts[0]["stmt"]["SelectStmt"] if len(stmts) == 1 else {}
        (item,) = select.get("fromClause", [None])
        rel = item["RangeVar"]
    except (ParseError, KeyError, TypeError, ValueError, UnicodeError):
        return None
    if set(select) - {"targetList", "fromClause", "limitOption", "op"} or rel.get("alias") or not rel.get("inh", True):
        return None
    schema = rel.get("schemaname")
    return Relation(schema.lower() if schema else None, rel.get("relname", "").lower())


def _range_vars(items: Iterable[Any]) -> Iterable[Mapping[str, Any]]:
    for item in items or ():
        if not isinstance(item, dict):
            continue
        if "RangeVar" in item:
            yield item["RangeVar"]
        elif "JoinExpr" in item:
            join = item["JoinExpr"]
            yield from _range_vars([join.get("larg"), join.get("rarg")])
        elif "relname" in item:
            yield item


def _is_pg_settings(relation: Any) -> bool:
    """pg_settings or pg_catalog.pg_settings (unqualified pg_* names resolve to pg_catalog first)."""
    rel = relation.get("RangeVar", relation) if isinstance(relation, dict) else {}
    return (str(rel.get("relname", "")).lower() == "pg_settings"
            and str(rel.get("schemaname") or "pg_catalog").lower() == "pg_catalog")


def _figure_colname(node: Any) -> str:
    """The output column name PostgreSQL gives an unnamed select-list expression."""
    if isinstance(node, dict) and len(node) == 1:
        (kind, body), = node.items()
        if kind == "ColumnRef":
            names = _names(body.get("fields", ()))
            return names[-1] if names and len(names) == len(body.get("fields", ())) else "?column?"
        if kind == "FuncCall":
            names = _names(body.get("funcname", ()))
            return names[-1] if names else "?column?"
        if kind == "TypeCast":
            inner = _figure_colname(body.get("arg"))
            if inner != "?column?":
                return inner
            names = _names(body.get("typeName", {}).get("names", ()))
            return names[-1] if names else "?column?"
        if kind == "CoalesceExpr":
            return "coalesce"
        if kind == "CaseExpr":
            return "case"
        if kind == "CollateClause":
            return _figure_colname(body.get("arg"))
        if kind == "A_Indirection":
            fields = [_sval(i) for i in body.get("indirection", ()) if _sval(i) is not None]
            return fields[-1] if fields else _figure_colname(body.get("arg"))
        if kind == "SubLink":
            link = body.get("subLinkType")
            if link == "EXISTS_SUBLINK":
                return "exists"
            if link == "ARRAY_SUBLINK":
                return "array"
            if link in ("EXPR_SUBLINK", "MULTIEXPR_SUBLINK"):
                names = _select_names(body.get("subselect"))
                return names[0] if names else "?column?"
            return "?column?"
        if kind in _FIXED_COLNAMES:
            return _FIXED_COLNAMES[kind]
        if kind == "MinMaxExpr":
            return "greatest" if body.get("op") == "IS_GREATEST" else "least"
        if kind == "A_Expr" and body.get("kind") == "AEXPR_NULLIF":
            return "nullif"
        if kind == "XmlExpr":
            return _XML_COLNAMES.get(body.get("op", ""), "?column?")
        if kind == "SQLValueFunction":
            return str(body.get("op", "")).removeprefix("SVFOP_").lower() or "?column?"
    return "?column?"


_FIXED_COLNAMES = {"A_ArrayExpr": "array", "RowExpr": "row", "GroupingFunc": "grouping",
                   "XmlSerialize": "xmlserialize"}
_XML_COLNAMES = {"IS_XMLCONCAT": "xmlconcat", "IS_XMLELEMENT": "xmlelement", "IS_XMLFOREST": "xmlforest",
                 "IS_XMLPARSE": "xmlparse", "IS_XMLPI": "xmlpi", "IS_XMLROOT": "xmlroot",
                 "IS_XMLSERIALIZE": "xmlserialize", "IS_DOCUMENT": "?column?"}


def _is_star(node: Any) -> bool:
    return (isinstance(node, dict) and "ColumnRef" in node
            and any(isinstance(f, dict) and "A_Star" in f for f in node["ColumnRef"].get("fields", ())))


def _select_names(node: Any) -> list[str] | None:
    """The output names of a SELECT in order (of a set operation: its first branch's; of VALUES:
    column1, column2 ...), or None: unknown (a ``*`` among them)."""
    body = node.get("SelectStmt", node) if isinstance(node, dict) else None
    while isinstance(body, dict) and body.get("op") not in (None, "SETOP_NONE"):
        body = body.get("larg")
    if not isinstance(body, dict):
        return None
    values = body.get("valuesLists")
    if values:
        first = values[0].get("List", {}).get("items", []) if isinstance(values[0], dict) else []
        return [f"column{i + 1}" for i in range(len(first))]
    names = []
    for item in body.get("targetList") or ():
        res = item.get("ResTarget", {}) if isinstance(item, dict) else {}
        if _is_star(res.get("val")):
            return None
        names.append(res.get("name") or _figure_colname(res.get("val")))
    return names


def _alias_colnames(alias: Any) -> list[str]:
    return _names(alias.get("colnames")) if isinstance(alias, dict) else []


# Statements whose option list names functions (FUNCTION =, SFUNC =, INPUT =, HANDLER ...): node ->
# the field holding the options. Each named function becomes a function of the statement.
_FUNCTION_OPTION_FIELDS = {
    "DefineStmt": "definition", "CreateRangeStmt": "params", "AlterOperatorStmt": "options",
    "AlterTypeStmt": "options", "CreateFdwStmt": "func_options", "AlterFdwStmt": "func_options",
}


class _Walker:
    """Walks one statement's JSON tree, collecting kinds, relations, functions, properties."""

    def __init__(self, text: str, depth: int = 0):
        self.text = text
        self.depth = depth
        self.kind = "UNKNOWN"
        self.kinds: set[str] = set()
        self.reads: set[Relation] = set()
        self.writes: set[Relation] = set()
        self.functions: set[Function] = set()
        self.operators: set[Function] = set()  # operators and casts used (StatementAnalysis.operators)
        self.properties: set[str] = set()
        self.cte_scopes: list[frozenset[str]] = []
        self.outputs: dict[str, set[str]] = {}
        self.assigned: dict[str, set[str]] = {}  # UPDATE's SET: column -> the columns its value comes from
        self.sent: dict[str, set[str]] = {}  # SENDING_FUNCTIONS called -> the columns in their arguments
        self.collecting: list[set[str]] = []  # the outputs whose expressions are being walked
        self.range_names: set[str] = set()
        self.prepare_name: str | None = None
        self.prepared_body: StatementAnalysis | None = None
        self.execute_name: str | None = None
        self.deallocate: str | None = None
        self.declare_name: str | None = None
        self.declared_body: StatementAnalysis | None = None
        self.fetch_name: str | None = None
        self.channel: str | None = None
        self.close_cursor: str | None = None
        # A function returns rows of a query or table inside it (query_to_xml, table_to_xml,
        # cursor_to_xml ...): any output may carry any of their columns (result(): "*").
        self.embedded_rows = False
        self.search_path: tuple[str, ...] | None = None
        self.reset_session = False
        self.explain_only = False
        self.reads_constants = False

    # -- entry points --
    def top(self, wrapped: Mapping[str, Any]) -> None:
        (node, body), = wrapped.items()
        self.kind = self._kind_of(node, body)
        self.visit(node, body)

    def result(self) -> StatementAnalysis:
        if self.writes:
            self.properties.add("writes")
        kinds = self.kinds | {self.kind}
        if any(k.startswith("DROP_") for k in kinds):
            self.properties.add("drop")
        if ("drop" in self.properties or "truncate" in self.properties or "no_where" in self.properties
                or kinds & _DESTRUCTIVE_KINDS or any(k.endswith(_DESTRUCTIVE_SUBCOMMANDS) and "." in k for k in kinds)):
            self.properties.add("destructive")
        if self.explain_only:
            self.properties.add("explain_only")
        # "*?x": a bare name that is a whole row when x is a table or alias in this statement.
        whole = ("*",) if self.embedded_rows else ()
        outputs, assigned, sent = (tuple(sorted(
            (k, frozenset(["*" if src.startswith("*?") else src for src in v
                           if not src.startswith("*?") or src[2:].lower() in self.range_names] + list(whole)))
            for k, v in named.items())) for named in (self.outputs, self.assigned, self.sent))
        return StatementAnalysis(
            kind=self.kind, kinds=frozenset(kinds), reads=frozenset(self.reads),
            writes=frozenset(self.writes), functions=frozenset(self.functions), operators=frozenset(self.operators),
            properties=frozenset(self.properties), outputs=outputs, assigned=assigned, sent=sent, prepare_name=self.prepare_name,
            prepared_body=self.prepared_body, execute_name=self.execute_name, deallocate=self.deallocate,
            search_path=self.search_path, reset_session=self.reset_session, reads_constants=self.reads_constants,
            declare_name=self.declare_name, declared_body=self.declared_body, fetch_name=self.fetch_name,
            close_cursor=self.close_cursor, channel=self.channel)

    # -- generic walk --
    def visit_value(self, value: Any, typed: str | None) -> None:
        # Per node of every statement never seen before: exact type tests (the tree is json's
        # dicts and lists), and a node's single-key wrapper handled without another call.
        if type(value) is list:
            for item in value:
                if type(item) is dict or type(item) is list:
                    self.visit_value(item, None)
        elif type(value) is dict:
            if len(value) == 1:
                (key, body), = value.items()
                if type(body) is dict:
                    if key in _NODE_NAMES:
                        if key not in _LEAVES:
                            self.visit(key, body)
                        return
                    if key == "List":
                        self.visit_value(body.get("items", []), None)
                        return
            if typed:
                self.visit(typed, value)
            else:
                for item in value.values():  # defensive: never skip a subtree we do not know
                    if type(item) is dict or type(item) is list:
                        self.visit_value(item, None)

    def visit(self, node: str, body: Mapping[str, Any]) -> None:
        handler = _HANDLERS.get(node)
        if handler is not None:
            handler(self, body)
            return
        options = _FUNCTION_OPTION_FIELDS.get(node)
        if options is not None:  # statements that name functions in their options (CREATE OPERATOR ...)
            self._function_options(body.get(options, ()))
        self.generic(node, body)

    def generic(self, node: str, body: Mapping[str, Any], skip: tuple[str, ...] = ()) -> None:
        fields = _FIELDS.get(node, _NO_FIELDS)
        if node in _STATEMENT_NODES:
            self.kinds.add(self._kind_of(node, body))
        for key, value in body.items():
            if (type(value) is dict or type(value) is list) and key not in skip:
                self.visit_value(value, fields.get(key))

    def _kind_of(self, node: str, body: Mapping[str, Any]) -> str:
        if node == "SelectStmt" and body.get("intoClause"):
            return "CREATE_TABLE_AS"
        if node == "TransactionStmt":
            return _TRANSACTION_KINDS.get(body.get("kind", "TRANS_STMT_BEGIN"), "TRANSACTION")
        if node == "DropStmt":
            return "DROP_" + _object_suffix(body.get("removeType"))
        if node == "AlterTableStmt":
            return "ALTER_" + _object_suffix(body.get("objtype"))
        if node in ("GrantStmt", "GrantRoleStmt"):
            return "GRANT" if body.get("is_grant") else "REVOKE"
        if node == "VariableSetStmt":
            return "RESET" if str(body.get("kind", "")).startswith("VAR_RESET") else "SET"
        if node == "CreateFunctionStmt":
            return "CREATE_PROCEDURE" if body.get("is_procedure") else "CREATE_FUNCTION"
        if node == "CreateTableAsStmt":
            return "CREATE_MATERIALIZED_VIEW" if body.get("objtype") == "OBJECT_MATVIEW" else "CREATE_TABLE_AS"
        if node == "VacuumStmt":
            return "VACUUM" if body.get("is_vacuumcmd") else "ANALYZE"
        if node == "DefineStmt":
            objtype = body.get("kind", "OBJECT_TYPE")
            return _DEFINE_KINDS.get(objtype, "CREATE_" + _object_suffix(objtype))
        return _KIND_NAMES.get(node) or _default_kind(node)  # not eagerly: this runs per node

    # -- relations --
    def _relation(self, body: Mapping[str, Any]) -> Relation:
        schema = body.get("schemaname")
        if body.get("catalogname"):
            schema = f"{body['catalogname']}.{schema}"
        return Relation(schema.lower() if schema else None, body.get("relname", "").lower())

    def _is_cte(self, body: Mapping[str, Any]) -> bool:
        if body.get("schemaname") or body.get("catalogname"):
            return False
        name = body.get("relname", "")
        return any(name in scope for scope in self.cte_scopes)

    def _v_RangeVar(self, body: Mapping[str, Any]) -> None:
        alias = body.get("alias", {}).get("aliasname") if isinstance(body.get("alias"), dict) else None
        self.range_names.add((alias or body.get("relname", "")).lower())
        renamed = _alias_colnames(body.get("alias"))
        if renamed:  # accounts AS t(i, e): which column each is, only the catalog knows
            self._rename_outputs(renamed, None)
        if not self._is_cte(body):
            self.reads.add(self._relation(body))

    def _write(self, value: Any) -> None:
        """A write target (INSERT INTO x, UPDATE x ...): never a CTE reference."""
        if isinstance(value, dict):
            body = value.get("RangeVar", value)
            if "relname" in body:
                alias = body.get("alias", {}).get("aliasname") if isinstance(body.get("alias"), dict) else None
                self.range_names.add((alias or body["relname"]).lower())
                self.writes.add(self._relation(body))
                return
        self.visit_value(value, None)

    def _v_RangeFunction(self, body: Mapping[str, Any]) -> None:
        # Its columns are named by the alias's list, a column definition list, the alias, or the
        # functions.
        alias = body.get("alias")
        named = _alias_colnames(alias) or [
            c.get("ColumnDef", {}).get("colname", "?column?") for c in body.get("coldeflist") or ()
            if isinstance(c, dict)]
        names = list(named)
        if not names and isinstance(alias, dict) and alias.get("aliasname"):
            names = [alias["aliasname"]]
        if not names:
            for f in body.get("functions") or ():
                items = f.get("List", {}).get("items", []) if isinstance(f, dict) else []
                call = items[0].get("FuncCall") if items and isinstance(items[0], dict) else None
                if isinstance(call, dict):
                    names.append((_names(call.get("funcname", ())) or ["?column?"])[-1])
        sources = self._table_function("RangeFunction", body, names)
        if sources and not named:
            # Its columns are named by its OUT parameters (jsonb_each_text: key, value), which only
            # the catalog knows: any column of the result may be one of them.
            self.outputs.setdefault(ANY_OUTPUT, set()).update(sources)

    def _v_RangeTableFunc(self, body: Mapping[str, Any]) -> None:
        # XMLTABLE (... PASSING doc COLUMNS v ...)
        names = _alias_colnames(body.get("alias")) or [
            c.get("RangeTableFuncCol", {}).get("colname", "?column?") for c in body.get("columns") or ()
            if isinstance(c, dict)]
        self._table_function("RangeTableFunc", body, names)

    def _table_function(self, node: str, body: Mapping[str, Any], names: Sequence[str]) -> set[str]:
        """A function in FROM: walked, and each of its columns (``names``) carries what its
        arguments (document, expressions) are computed from; returns those sources."""
        alias = body.get("alias")
        if isinstance(alias, dict) and alias.get("aliasname"):
            self.range_names.add(alias["aliasname"].lower())
        sources: set[str] = set()
        self._collecting(sources, self.generic, node, body)
        for name in names:
            self.outputs.setdefault(name, set()).update(sources)
        return sources

    def _v_RangeSubselect(self, body: Mapping[str, Any]) -> None:
        alias = body.get("alias")
        if isinstance(alias, dict) and alias.get("aliasname"):
            self.range_names.add(alias["aliasname"].lower())
        renamed = _alias_colnames(alias)
        if renamed:  # (SELECT email FROM accounts) AS s(e)
            self._rename_outputs(renamed, _select_names(body.get("subquery")))
        self.generic("RangeSubselect", body)

    def _v_JoinExpr(self, body: Mapping[str, Any]) -> None:
        renamed = _alias_colnames(body.get("alias"))
        if renamed:
            self._rename_outputs(renamed, None)
        self.generic("JoinExpr", body)

    # -- functions --
    def _v_FuncCall(self, body: Mapping[str, Any]) -> None:
        names = [n.lower() for n in _names(body.get("funcname", ()))]
        if names:
            self.functions.add(Function(".".join(names[:-1]) or None, names[-1]))
            if names[-1] == "set_config":
                self._set_config(body.get("args", []))
            elif names[-1] in SQL_TEXT_FUNCTIONS and names[0] in (names[-1], "pg_catalog"):
                self._sql_text_argument(names[-1], body.get("args", []))
                self.embedded_rows = True
            elif names[-1] in RELATION_READING_FUNCTIONS and names[0] in (names[-1], "pg_catalog"):
                self._relation_argument(RELATION_READING_FUNCTIONS[names[-1]], body.get("args", []))
                self.embedded_rows = True
            elif names[-1] in CURSOR_READING_FUNCTIONS and names[0] in (names[-1], "pg_catalog"):
                self._cursor_argument(body.get("args", []))
                self.embedded_rows = True
            if names[-1] in SENDING_FUNCTIONS:
                self._collecting(self.sent.setdefault(names[-1], set()), self.generic, "FuncCall", body, ("funcname",))
                return
        self.generic("FuncCall", body, skip=("funcname",))

    # -- operators and casts: a user-defined one runs its function --
    def _v_A_Expr(self, body: Mapping[str, Any]) -> None:
        kind = body.get("kind")
        if kind in _BETWEEN_KINDS:  # a BETWEEN b AND c: a >= b AND a <= c (NOT: < and >)
            self.operators.update(_BETWEEN_OPERATORS)
        else:
            self._operator_named(body.get("name", ()))
        self.generic("A_Expr", body, skip=("name",))

    def _v_SubLink(self, body: Mapping[str, Any]) -> None:
        # x IN (SELECT ...) compares with =; x op ANY/ALL (SELECT ...) with op
        if body.get("operName"):
            self._operator_named(body["operName"])
        elif body.get("subLinkType") in ("ANY_SUBLINK", "ALL_SUBLINK"):
            self.operators.add(_EQUALS)
        self.generic("SubLink", body, skip=("operName",))

    def _v_CaseExpr(self, body: Mapping[str, Any]) -> None:
        if body.get("arg"):  # CASE x WHEN y: x = y
            self.operators.add(_EQUALS)
        self.generic("CaseExpr", body)

    def _v_SortBy(self, body: Mapping[str, Any]) -> None:
        if body.get("useOp"):  # ORDER BY x USING op
            self._operator_named(body["useOp"])
        self.generic("SortBy", body, skip=("useOp",))

    def _v_TypeCast(self, body: Mapping[str, Any]) -> None:
        type_name = body.get("typeName") or {}
        parts = [n.lower() for n in _names(type_name.get("names", ()))]
        if parts:
            if type_name.get("arrayBounds"):  # an array's type is named _ and its element type's name
                parts[-1] = "_" + parts[-1]
            self._uses(tuple(parts))
        self.generic("TypeCast", body)

    def _operator_named(self, names: list[Any]) -> None:
        self._uses(tuple(_names(names)))

    def _uses(self, parts: tuple[str, ...]) -> None:
        """An operator or a cast, by its name's parts (schema, symbol or type)."""
        found = _OPERATORS.get(parts)
        if found is None and parts:
            found = Function(".".join(p.lower() for p in parts[:-1]) or None, parts[-1])
            if len(_OPERATORS) < 4096:  # (symbols are few; a bound all the same)
                _OPERATORS[parts] = found
        if found is not None:
            self.operators.add(found)

    def _cursor_argument(self, args: list[Any]) -> None:
        """cursor_to_xml('c', ...) returns c's rows: read as FETCH from c (resolve_fetch)."""
        self.reads_constants = True
        name = _const_string(args[0]) if args else None
        if name is None:
            raise _Unanalyzable("a cursor named by an expression: botwarden cannot tell which query it reads")
        if self.fetch_name not in (None, name):
            raise _Unanalyzable("two cursors read in one statement")
        self.fetch_name = name

    def _function_named(self, names: Iterable[Any]) -> None:
        parts = [n.lower() for n in _names(names)]
        if parts:
            self.functions.add(Function(".".join(parts[:-1]) or None, parts[-1]))

    def _function_options(self, options: Iterable[Any]) -> None:
        """Options whose value is a function the server will call (see _FUNCTION_OPTIONS)."""
        for opt in options or ():
            elem = opt.get("DefElem", {}) if isinstance(opt, dict) else {}
            if elem.get("defname", "").lower() not in _FUNCTION_OPTIONS:
                continue
            arg = elem.get("arg")
            if isinstance(arg, dict) and "TypeName" in arg:
                self._function_named(arg["TypeName"].get("names", ()))
            elif isinstance(arg, dict) and "List" in arg:
                self._function_named(arg["List"].get("items", ()))
            elif _sval(arg) is not None:
                self._function_named([arg])

    def _v_CreateCastStmt(self, body: Mapping[str, Any]) -> None:
        if isinstance(body.get("func"), dict):
            self._function_named(body["func"].get("objname", ()))
        self.generic("CreateCastStmt", body)

    def _v_CreateTransformStmt(self, body: Mapping[str, Any]) -> None:
        for key in ("fromsql", "tosql"):
            if isinstance(body.get(key), dict):
                self._function_named(body[key].get("objname", ()))
        self.generic("CreateTransformStmt", body)

    def _v_CreateOpClassItem(self, body: Mapping[str, Any]) -> None:
        if body.get("itemtype") == 2 and isinstance(body.get("name"), dict):  # OPCLASS_ITEM_FUNCTION
            self._function_named(body["name"].get("objname", ()))
        self.generic("CreateOpClassItem", body)

    def _v_CreateConversionStmt(self, body: Mapping[str, Any]) -> None:
        self._function_named(body.get("func_name", ()))
        self.generic("CreateConversionStmt", body)

    def _v_CreatePLangStmt(self, body: Mapping[str, Any]) -> None:
        for key in ("plhandler", "plinline", "plvalidator"):
            self._function_named(body.get(key, ()))
        self.generic("CreatePLangStmt", body)

    def _v_CreateEventTrigStmt(self, body: Mapping[str, Any]) -> None:
        self._function_named(body.get("funcname", ()))
        self.generic("CreateEventTrigStmt", body, skip=("funcname",))

    def _sql_text_argument(self, name: str, args: list[Any]) -> None:
        """query_to_xml('DELETE ...', ...) runs its text: analyze a constant, flag anything else."""
        index, count = SQL_TEXT_FUNCTIONS[name]
        self.reads_constants = True
        if count is not None and len(args) != count:
            return
        if len(args) <= index:
            return
        text = _const_string(args[index])
        if text is None:
            self._dynamic_sql()
        else:
            self._sql_body(text)

    def _relation_argument(self, scope: str, args: list[Any]) -> None:
        """table_to_xml('billing.secrets', ...) reads billing.secrets; database_to_xml reads all."""
        self.reads_constants = True
        if scope == "database":
            self.reads.add(Relation("*", "*"))
            return
        name = _const_string(args[0]) if args else None
        if name is None:
            self.properties.add("dynamic_sql")
        elif scope == "schema":
            self.reads.add(Relation(name.lower(), "*"))  # a name, taken as written
        else:
            relation = _regclass(name)
            if relation is None:
                self.properties.add("dynamic_sql")  # an OID, or text botwarden cannot read as a name
            else:
                self.reads.add(relation)

    def _set_config(self, args: list[Any]) -> None:
        self._setting(_const_string(args[0]) if args else None, args[1] if len(args) > 1 else None)

    def _setting(self, setting: str | None, value: Any) -> None:
        """A run-time setting changed to ``value`` (a node): set_config, UPDATE pg_settings."""
        if setting is None:
            self.properties.add("set_role")  # unknown setting: assume the worst
            self._set_search_path(("*",))
            return
        setting = setting.lower()
        if setting in ("role", "session_authorization"):
            self.properties.add("set_role")
        if setting == "search_path":
            text = _const_string(value)
            self._set_search_path(split_search_path(text) if text is not None else ("*",))

    def _pg_settings_update(self, body: Mapping[str, Any]) -> None:
        """UPDATE pg_settings SET setting = v WHERE name = n runs set_config(n, v, false) for the
        row (the view's rule; any user may): read as that call when n is a constant and nothing
        else is in the statement, else as a search_path botwarden cannot read. (role and
        session_authorization are not rows of pg_settings: this never switches roles.)"""
        targets = body.get("targetList") or []
        res = targets[0].get("ResTarget", {}) if len(targets) == 1 and isinstance(targets[0], dict) else {}
        where = body.get("whereClause")
        expr = where.get("A_Expr", {}) if isinstance(where, dict) else {}
        name = None
        if (res.get("name") == "setting" and not res.get("indirection") and not body.get("fromClause")
                and expr.get("kind") == "AEXPR_OP" and _names(expr.get("name", ())) == ["="]):
            for column, constant in ((expr.get("lexpr"), expr.get("rexpr")), (expr.get("rexpr"), expr.get("lexpr"))):
                ref = column.get("ColumnRef", {}) if isinstance(column, dict) else {}
                fields = _names(ref.get("fields", ()))
                if fields and fields[-1] == "name" and len(fields) == len(ref.get("fields", ())):
                    name = _const_string(constant)
                    break
        if name is None:
            self._set_search_path(("*",))
        elif name.lower() == "search_path":
            self._setting(name, res.get("val"))

    def _set_search_path(self, schemas: tuple[str, ...]) -> None:
        """A statement that sets search_path in several places (set_config in its select list and
        its WHERE, a DO block's statements) may leave any of the values, in an order the analysis
        does not know: every one counts, as in the session's path (a union)."""
        self.search_path = _joined_path(self.search_path, schemas)

    # -- WITH scoping --
    def _with(self, body: Mapping[str, Any]) -> frozenset[str]:
        """Walk the CTE bodies with the names each may see; return every name of this WITH."""
        clause = body.get("withClause")
        if not isinstance(clause, dict):
            return frozenset()
        ctes = [c.get("CommonTableExpr", c) for c in clause.get("ctes", [])]
        names = [c.get("ctename", "") for c in ctes]
        recursive = bool(clause.get("recursive"))
        for i, cte in enumerate(ctes):
            renamed = _names(cte.get("aliascolnames"))
            if renamed:  # WITH c(e) AS (SELECT email ...)
                self._rename_outputs(renamed, _select_names(cte.get("ctequery")))
            # Without RECURSIVE a CTE sees only the ones before it; its own name is a table.
            visible = frozenset(names) if recursive else frozenset(names[:i])
            self.cte_scopes.append(visible)
            try:
                self.visit_value(cte.get("ctequery"), None)
                for key in ("search_clause", "cycle_clause"):
                    if key in cte:
                        self.visit_value(cte[key], None)
            finally:
                self.cte_scopes.pop()
        return frozenset(names)

    def _scoped(self, node: str, body: Mapping[str, Any], skip: tuple[str, ...], after: Any = None) -> None:
        names = self._with(body)
        self.cte_scopes.append(names)
        try:
            if after:
                after()
            self.generic(node, body, skip=("withClause", *skip))
        finally:
            self.cte_scopes.pop()

    # -- statements --
    def _v_SelectStmt(self, body: Mapping[str, Any]) -> None:
        into = body.get("intoClause")
        if isinstance(into, dict):
            self.properties.add("select_into")
            self.kinds.add("CREATE_TABLE_AS")
            self._write(into.get("rel"))
        if body.get("lockingClause"):
            self.properties.add("locking")

        if body.get("op") not in (None, "SETOP_NONE"):
            # The result's names are the first branch's; position i of every other branch is
            # returned under the first branch's i-th name.
            first = _select_names(body)
            if first is None:
                self.outputs.setdefault(ANY_OUTPUT, set()).add("*")
            else:
                self._rename_outputs(first, _select_names(body.get("rarg")))

        def outputs() -> None:
            self._outputs(body.get("targetList", []))
            for row in body.get("valuesLists") or ():
                items = row.get("List", {}).get("items", []) if isinstance(row, dict) else []
                for i, expr in enumerate(items):
                    self._collecting(self.outputs.setdefault(f"column{i + 1}", set()), self.visit_value, expr, None)

        self._scoped("SelectStmt", body, ("intoClause", "targetList", "valuesLists"), outputs)

    def _collecting(self, into: set[str], walk: Callable[..., None], *args: Any) -> None:
        """``walk(*args)`` with the column names it meets also gathered into ``into``."""
        self.collecting.append(into)
        try:
            walk(*args)
        finally:
            self.collecting.pop()

    def _rename_outputs(self, aliases: Sequence[str], names: Sequence[str] | None) -> None:
        """Columns renamed by position (an alias's column list, a set operation's later branch):
        each alias carries the column at its position, or any column when that is not known."""
        for i, alias in enumerate(aliases):
            self.outputs.setdefault(alias, set()).add(names[i] if names is not None and i < len(names) else "*")

    def _outputs(self, targets: list[Any]) -> None:
        """Walk a select or RETURNING list (the caller's walk skips it): each output's name, and
        every column it is computed from, those of subqueries in it too (:meth:`_v_ColumnRef`)."""
        for item in targets:
            res = item.get("ResTarget", {}) if isinstance(item, dict) else {}
            val = res.get("val")
            # "?column?" gathers what cannot be named; a "*" is the relations' own column names.
            name = res.get("name") or ("*" if _is_star(val) else _figure_colname(val))
            self.collecting.append(self.outputs.setdefault(name, set()))
            try:
                if res:
                    self.visit_value(val, None)
                    self.generic("ResTarget", res, skip=("val",))
                else:
                    self.visit_value(item, None)
            finally:
                self.collecting.pop()

    def _v_ColumnRef(self, body: Mapping[str, Any]) -> None:
        # Only names and * are in a column reference: nothing more to walk.
        if not self.collecting:
            return
        names = []
        for item in body.get("fields", ()):
            if type(item) is dict:
                if "A_Star" in item:
                    found: tuple[str, ...] = ("*",)
                    break
                name = _sval(item)
                if name is not None:
                    names.append(name)
        else:
            # A bare name may be a whole row ("*?x"): result() resolves it.
            found = (names[-1], "*?" + names[-1]) if len(names) == 1 else (names[-1],) if names else ()
        for sources in self.collecting:
            sources.update(found)

    def _dml(self, node: str, body: Mapping[str, Any]) -> None:
        self.kinds.add(self._kind_of(node, body))
        if node == "UpdateStmt" and _is_pg_settings(body.get("relation")):
            self._pg_settings_update(body)
        if node in ("UpdateStmt", "DeleteStmt"):
            sources = body.get("fromClause") or body.get("usingClause") or ()
            if _Target(body.get("relation"), sources).keeps_every_row_of(self, body.get("whereClause")):
                self.properties.add("no_where")
        elif node == "MergeStmt":
            self._merge_actions(body)
        key = "returningClause" if body.get("returningClause") else "returningList"
        returning = body.get(key)
        skip: tuple[str, ...] = ("relation", key)
        if node == "UpdateStmt":
            skip += ("targetList",)

        def targets() -> None:
            self._write(body.get("relation"))
            if node == "UpdateStmt":
                self._assignments(body.get("targetList") or [])
            if isinstance(returning, dict):
                self._outputs(returning.get("exprs", []))
                self.generic("ReturningClause", returning, skip=("exprs",))
            elif isinstance(returning, list):
                self._outputs(returning)
            else:
                self.visit_value(returning, None)

        self._scoped(node, body, skip, targets)

    def _assignments(self, targets: list[Any]) -> None:
        """Walk UPDATE's SET list (the caller's walk skips it): each assigned column and every
        column its value is computed from (masking: a masked value copied into another column)."""
        for item in targets:
            res = item.get("ResTarget", {}) if isinstance(item, dict) else {}
            if not res:
                self.visit_value(item, None)
                continue
            self.collecting.append(self.assigned.setdefault(res.get("name") or "?column?", set()))
            try:
                self.visit_value(res.get("val"), None)
                self.generic("ResTarget", res, skip=("val",))
            finally:
                self.collecting.pop()

    def _v_InsertStmt(self, body: Mapping[str, Any]) -> None:
        self._dml("InsertStmt", body)

    def _v_OnConflictClause(self, body: Mapping[str, Any]) -> None:
        # INSERT ... ON CONFLICT DO UPDATE SET x = ...: assignments, as UPDATE's (and the table's
        # ON UPDATE triggers fire: engine.resolve_catalog).
        if "UPDATE" in str(body.get("action", "")):
            self.properties.add("upsert")
        self._assignments(body.get("targetList") or [])
        self.generic("OnConflictClause", body, skip=("targetList",))

    def _v_UpdateStmt(self, body: Mapping[str, Any]) -> None:
        self._dml("UpdateStmt", body)

    def _v_DeleteStmt(self, body: Mapping[str, Any]) -> None:
        self._dml("DeleteStmt", body)

    def _v_MergeStmt(self, body: Mapping[str, Any]) -> None:
        self._dml("MergeStmt", body)

    def _v_MergeWhenClause(self, body: Mapping[str, Any]) -> None:
        """WHEN ... THEN UPDATE SET / INSERT (cols) VALUES: each column written and the columns
        its value comes from, as UPDATE's SET list (_assignments)."""
        command = str(body.get("commandType", ""))
        targets = body.get("targetList") or []
        if command == "CMD_UPDATE":
            self._assignments(targets)
            self.generic("MergeWhenClause", body, skip=("targetList",))
            return
        if command == "CMD_INSERT":
            names = [(t.get("ResTarget", {}) if isinstance(t, dict) else {}).get("name") for t in targets]
            for i, value in enumerate(body.get("values") or []):
                name = names[i] if i < len(names) and names[i] else "?column?"
                self.collecting.append(self.assigned.setdefault(name, set()))
                try:
                    self.visit_value(value, None)
                finally:
                    self.collecting.pop()
            self.generic("MergeWhenClause", body, skip=("values",))
            return
        self.generic("MergeWhenClause", body)

    def _merge_actions(self, body: Mapping[str, Any]) -> None:
        """MERGE's sub-kinds (MERGE.DELETE ...), and no_where when a WHEN MATCHED UPDATE/DELETE
        reaches every target row: its ON condition and its own AND condition filter nothing."""
        target = _Target(body.get("relation"), [body.get("sourceRelation")])
        every_row_matches = target.keeps_every_row_of(self, body.get("joinCondition"))
        for clause in body.get("mergeWhenClauses", []):
            when = clause.get("MergeWhenClause", {}) if isinstance(clause, dict) else {}
            command = str(when.get("commandType", "")).removeprefix("CMD_")
            if command in ("INSERT", "UPDATE", "DELETE"):
                self.kinds.add("MERGE." + command)
            if command not in ("UPDATE", "DELETE"):
                continue
            # NOT MATCHED BY SOURCE (PostgreSQL 17) acts on the target rows no source row matched.
            reaches_all = every_row_matches or when.get("matchKind") == "MERGE_WHEN_NOT_MATCHED_BY_SOURCE"
            if reaches_all and target.keeps_every_row_of(self, when.get("condition")):
                self.properties.add("no_where")

    def _v_CopyStmt(self, body: Mapping[str, Any]) -> None:
        is_from = bool(body.get("is_from"))
        self.properties.add("copy_from" if is_from else "copy_to")
        if body.get("is_program"):
            self.properties.add("copy_program")
        elif body.get("filename"):
            self.properties.add("copy_file")
        rel = body.get("relation")
        if rel:
            if is_from:
                self._write(rel)
            else:
                self.reads.add(self._relation(rel.get("RangeVar", rel)))
        self.generic("CopyStmt", body, skip=("relation",))

    def _v_ListenStmt(self, body: Mapping[str, Any]) -> None:
        self.channel = body.get("conditionname")
        self.generic("ListenStmt", body)

    def _v_TruncateStmt(self, body: Mapping[str, Any]) -> None:
        self.properties.add("truncate")
        if body.get("behavior") == "DROP_CASCADE":  # the tables whose foreign keys reference these, too
            self.properties.add("truncate_cascade")
        for rel in body.get("relations", []):
            self._write(rel)
        self.generic("TruncateStmt", body, skip=("relations",))

    def _v_DropStmt(self, body: Mapping[str, Any]) -> None:
        self.properties.add("drop")
        objtype = body.get("removeType", "OBJECT_TABLE")
        if objtype in _TABLE_OBJECTS or objtype == "OBJECT_SCHEMA":
            for obj in body.get("objects", []):
                items = obj.get("List", {}).get("items", []) if isinstance(obj, dict) and "List" in obj else [obj]
                names = [n.lower() for n in _names(items)]
                if objtype == "OBJECT_SCHEMA" and names:
                    self.writes.add(Relation(names[-1], "*"))
                elif names:
                    self.writes.add(Relation(".".join(names[:-1]) or None, names[-1]))
        self.generic("DropStmt", body, skip=("objects",))

    def _v_DropdbStmt(self, body: Mapping[str, Any]) -> None:
        self.properties.add("drop")
        self.generic("DropdbStmt", body)

    def _v_DropRoleStmt(self, body: Mapping[str, Any]) -> None:
        self.properties.add("drop")
        self.generic("DropRoleStmt", body)

    def _v_AlterTableStmt(self, body: Mapping[str, Any]) -> None:
        kind = self._kind_of("AlterTableStmt", body)
        for cmd in body.get("cmds", []):
            subtype = cmd.get("AlterTableCmd", {}).get("subtype") if isinstance(cmd, dict) else None
            if subtype:
                self.kinds.add(f"{kind}.{_alter_subkind(subtype)}")
                self._column_expressions(cmd["AlterTableCmd"])
        self._write(body.get("relation"))
        self.generic("AlterTableStmt", body, skip=("relation",))

    def _column_expressions(self, cmd: Mapping[str, Any]) -> None:
        """A column whose values an expression over the row computes (ADD COLUMN ... GENERATED
        ALWAYS AS (expr), ALTER COLUMN ... TYPE ... USING expr, SET EXPRESSION AS (expr)): the
        column names in it, as ``assigned`` (an UPDATE's SET copies the same way)."""
        subtype, d = cmd.get("subtype"), cmd.get("def")
        col = d.get("ColumnDef") if isinstance(d, dict) else None
        exprs = []
        if isinstance(col, dict):
            if subtype == "AT_AlterColumnType" and col.get("raw_default") is not None:
                exprs.append(col["raw_default"])
            for c in col.get("constraints") or ():
                con = c.get("Constraint", {}) if isinstance(c, dict) else {}
                if con.get("contype") == "CONSTR_GENERATED" and con.get("raw_expr") is not None:
                    exprs.append(con["raw_expr"])
        elif subtype == "AT_SetExpression" and d is not None:
            exprs.append(d)
        name = cmd.get("name") or (col.get("colname") if isinstance(col, dict) else None) or "?column?"
        for expr in exprs:
            self._collecting(self.assigned.setdefault(name, set()), self.visit_value, expr, None)

    def _targets_written(self, node: str, body: Mapping[str, Any], key: str) -> None:
        self._write(body.get(key))
        self.generic(node, body, skip=(key,))

    def _v_CreateStmt(self, body: Mapping[str, Any]) -> None:
        # CREATE TABLE ... PARTITION OF p / INHERITS (p): the new table's rows are read through p.
        if body.get("inhRelations"):
            self.kinds.add("CREATE_TABLE.PARTITION_OF" if body.get("partbound") else "CREATE_TABLE.INHERITS")
        self._targets_written("CreateStmt", body, "relation")

    def _v_IndexStmt(self, body: Mapping[str, Any]) -> None:
        self._targets_written("IndexStmt", body, "relation")

    def _v_ViewStmt(self, body: Mapping[str, Any]) -> None:
        self._targets_written("ViewStmt", body, "view")

    def _v_RefreshMatViewStmt(self, body: Mapping[str, Any]) -> None:
        self._targets_written("RefreshMatViewStmt", body, "relation")

    def _v_CreateTrigStmt(self, body: Mapping[str, Any]) -> None:
        names = [n.lower() for n in _names(body.get("funcname", ()))]
        if names:
            self.functions.add(Function(".".join(names[:-1]) or None, names[-1]))
        self._targets_written("CreateTrigStmt", body, "relation")

    def _v_CreatePolicyStmt(self, body: Mapping[str, Any]) -> None:
        self._targets_written("CreatePolicyStmt", body, "table")

    def _v_RuleStmt(self, body: Mapping[str, Any]) -> None:
        self._targets_written("RuleStmt", body, "relation")

    def _v_RenameStmt(self, body: Mapping[str, Any]) -> None:
        if body.get("renameType") == "OBJECT_SCHEMA" and body.get("subname"):
            self.writes.add(Relation(body["subname"].lower(), "*"))
        # ALTER TABLE x RENAME TO y names the object in renameType (relationType is then unset, and
        # unset reads as its enum's first member, OBJECT_ACCESS_METHOD); RENAME COLUMN / CONSTRAINT
        # name the column or constraint there and the table in relationType.
        rename, relation = body.get("renameType"), body.get("relationType")
        if rename in _TABLE_OBJECTS or rename == "OBJECT_TYPE":
            kind = "ALTER_" + _object_suffix(rename)
            self.kinds |= {kind, kind + ".RENAME"}
        elif rename in _RENAME_SUBKINDS and (relation in _TABLE_OBJECTS or relation == "OBJECT_TYPE"
                                             or rename == "OBJECT_TABCONSTRAINT"):
            kind = "ALTER_" + _object_suffix(relation if relation in _TABLE_OBJECTS or relation == "OBJECT_TYPE"
                                             else "OBJECT_TABLE")
            self.kinds |= {kind, f"{kind}.{_RENAME_SUBKINDS[rename]}"}
        self._targets_written("RenameStmt", body, "relation")
        self._routine_moved(body.get("renameType"), body)

    def _routine_moved(self, objtype: str | None, body: Mapping[str, Any]) -> None:
        """ALTER FUNCTION/PROCEDURE/ROUTINE ... RENAME TO / SET SCHEMA: the routine counts among the
        statement's functions (a rule naming it matches; one made before the session is no longer
        known under its new name, engine.resolve_catalog)."""
        if objtype in ("OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE", "OBJECT_AGGREGATE"):
            obj = body.get("object") or {}
            self._function_named((obj.get("ObjectWithArgs", obj) if isinstance(obj, dict) else {}).get("objname", []))

    def _v_ImportForeignSchemaStmt(self, body: Mapping[str, Any]) -> None:
        if body.get("local_schema"):
            self.writes.add(Relation(body["local_schema"].lower(), "*"))
        self.generic("ImportForeignSchemaStmt", body)

    def _v_CreateSchemaStmt(self, body: Mapping[str, Any]) -> None:
        if body.get("schemaname"):
            self.writes.add(Relation(body["schemaname"].lower(), "*"))
        self.generic("CreateSchemaStmt", body)

    def _v_AlterObjectSchemaStmt(self, body: Mapping[str, Any]) -> None:
        self._targets_written("AlterObjectSchemaStmt", body, "relation")
        self._routine_moved(body.get("objectType"), body)

    def _v_AlterOwnerStmt(self, body: Mapping[str, Any]) -> None:
        self._targets_written("AlterOwnerStmt", body, "relation")

    def _v_CreateTableAsStmt(self, body: Mapping[str, Any]) -> None:
        into = body.get("into") or {}
        self._write(into.get("rel"))
        self.generic("CreateTableAsStmt", body, skip=("into",))

    def _v_VacuumStmt(self, body: Mapping[str, Any]) -> None:
        for rel in body.get("rels", []):
            inner = rel.get("VacuumRelation", rel) if isinstance(rel, dict) else {}
            if inner.get("relation"):
                self._write(inner["relation"])
        self.generic("VacuumStmt", body, skip=("rels",))

    def _v_GrantStmt(self, body: Mapping[str, Any]) -> None:
        if body.get("objtype", "OBJECT_TABLE") == "OBJECT_TABLE" and body.get("targtype", "ACL_TARGET_OBJECT") == "ACL_TARGET_OBJECT":
            for obj in body.get("objects", []):
                self._write(obj)
        elif body.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA":
            for name in _names(body.get("objects", [])):
                self.writes.add(Relation(name.lower(), "*"))
        self.generic("GrantStmt", body, skip=("objects",))

    def _v_GrantRoleStmt(self, body: Mapping[str, Any]) -> None:
        self.properties.add("role_grant")
        self.generic("GrantRoleStmt", body)

    def _v_AlterSystemStmt(self, body: Mapping[str, Any]) -> None:
        self.properties.add("alter_system")
        self.generic("AlterSystemStmt", body)

    def _v_VariableSetStmt(self, body: Mapping[str, Any]) -> None:
        name = (body.get("name") or "").lower()
        kind = str(body.get("kind", "VAR_SET_VALUE"))
        if name in ("role", "session_authorization") and kind != "VAR_RESET":
            self.properties.add("set_role")
            if name == "session_authorization":
                self.properties.add("set_session_authorization")
        if kind == "VAR_RESET_ALL":
            self.reset_session = True
        elif name == "search_path":
            if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
                self._set_search_path(("public",))
            else:
                schemas: list[str] = []
                for arg in body.get("args", []):
                    value = _const_string(arg)
                    if value is None:
                        schemas.append("*")
                    else:
                        schemas.extend(split_search_path(value))
                self._set_search_path(tuple(schemas) or ("*",))
        self.generic("VariableSetStmt", body)

    def _v_DiscardStmt(self, body: Mapping[str, Any]) -> None:
        if body.get("target", "DISCARD_ALL") == "DISCARD_ALL":
            self.reset_session = True
            self.deallocate = "*"
            self.close_cursor = "*"
        self.generic("DiscardStmt", body)

    def _v_DeclareCursorStmt(self, body: Mapping[str, Any]) -> None:
        # FETCH from it returns its query's rows: what the query is, on its own, is kept for
        # FETCH to be decided (and masked) as (resolve_fetch). DECLARE itself counts as before.
        self.declare_name = body.get("portalname", "")
        query = body.get("query")
        if isinstance(query, dict) and len(query) == 1:
            inner = _Walker(self.text, self.depth + 1)
            inner.top(query)
            self.declared_body = inner.result()
        self.generic("DeclareCursorStmt", body)

    def _v_FetchStmt(self, body: Mapping[str, Any]) -> None:
        self.fetch_name = body.get("portalname", "")
        self.generic("FetchStmt", body)

    def _v_ClosePortalStmt(self, body: Mapping[str, Any]) -> None:
        self.close_cursor = body.get("portalname") or "*"
        self.generic("ClosePortalStmt", body)

    def _v_PrepareStmt(self, body: Mapping[str, Any]) -> None:
        self.prepare_name = body.get("name", "")
        inner = _Walker(self.text, self.depth + 1)
        query = body.get("query", {})
        if isinstance(query, dict) and len(query) == 1:
            inner.top(query)
            self.prepared_body = inner.result()
            self._merge(self.prepared_body, runs=False)
        self.generic("PrepareStmt", body, skip=("query",))

    def _v_ExecuteStmt(self, body: Mapping[str, Any]) -> None:
        self.execute_name = body.get("name", "")
        self.generic("ExecuteStmt", body)

    def _v_DeallocateStmt(self, body: Mapping[str, Any]) -> None:
        self.deallocate = "*" if body.get("isall") or not body.get("name") else body["name"]
        self.generic("DeallocateStmt", body)

    def _v_ExplainStmt(self, body: Mapping[str, Any]) -> None:
        analyze = False
        for opt in body.get("options", []):
            defname = opt.get("DefElem", {}).get("defname") if isinstance(opt, dict) else None
            if defname == "analyze":
                analyze = True  # also ANALYZE false: the safe side
                self.properties.add("explain_analyze")
        # What EXPLAIN shows counts as if it ran: fail closed (EXPLAIN ANALYZE does run it). A plain
        # EXPLAIN of a whole statement is marked explain_only, so a rule can exempt it
        # (unless_properties); never a nested one, which cannot speak for its outer statement.
        self.explain_only = not analyze and self.depth == 0 and self.kind == "EXPLAIN"
        self.generic("ExplainStmt", body)

    def _merge(self, other: StatementAnalysis, runs: bool = True) -> None:
        """A nested statement's analysis joins this one's. ``runs``: it runs with this one (a DO
        block's, query_to_xml's), so a search_path it sets is set; PREPARE's body does not run."""
        # A nested plain SELECT adds nothing a reads/functions matcher does not already see.
        self.kinds |= other.kinds - {"SELECT"}
        self.reads |= other.reads
        self.writes |= other.writes
        self.functions |= other.functions
        self.operators |= other.operators
        self.properties |= other.properties - {"explain_only"}
        self.reads_constants |= other.reads_constants
        if runs and other.search_path is not None:
            self._set_search_path(other.search_path)
        if runs and (other.prepare_name is not None or other.deallocate is not None):
            # A name prepared or deallocated inside (a DO block's EXECUTE 'PREPARE ...'): which
            # statement each name now holds is not followed; every name counts as gone.
            self.deallocate = "*"

    # -- code bodies --
    def _v_DoStmt(self, body: Mapping[str, Any]) -> None:
        self.properties.add("do_block")
        language, code = _routine_code(body.get("args", []), "plpgsql")
        if code is None:
            raise _Unanalyzable("DO block without a body botwarden can read")
        if language != "plpgsql":
            raise _Unanalyzable(f"DO block in language {language!r}: botwarden cannot analyze it")
        self._plpgsql_body(code)

    def _v_CreateFunctionStmt(self, body: Mapping[str, Any]) -> None:
        # The body does not run now, nor does a SET clause apply outside the function: neither
        # sets the session's search_path. A body that sets it sets it for the caller's session
        # when it runs, unless the function's own SET clause restores it (property
        # "body_sets_search_path": PolicyEngine._unknown_path).
        path, self.search_path = self.search_path, None
        own = _routine_search_path(body)
        before = (self.reads, self.writes, self.functions, self.operators)
        self.reads, self.writes, self.functions, self.operators = set(), set(), set(), set()
        try:
            self._create_function(body)
            if self.search_path is not None and own is None:
                self.properties.add("body_sets_search_path")
            if own:
                # SET search_path = ... on the function: the body's unqualified names are looked up
                # there (and in pg_catalog), whatever the caller's path; kept unqualified too.
                schemas = [s for s in own if s not in ("$user", "")] + ["pg_catalog"]
                self.reads |= {Relation(s, r.name) for r in self.reads if r.schema is None for s in schemas}
                self.writes |= {Relation(s, r.name) for r in self.writes if r.schema is None for s in schemas}
                self.functions |= {Function(s, f.name) for f in self.functions if f.schema is None for s in schemas}
                self.operators |= {Function(s, f.name) for f in self.operators if f.schema is None for s in schemas}
        finally:
            self.search_path = path
            self.reads |= before[0]
            self.writes |= before[1]
            self.functions |= before[2]
            self.operators |= before[3]

    def _create_function(self, body: Mapping[str, Any]) -> None:
        self.properties.add("function_body")
        language, code = _routine_code(body.get("options", []))
        if body.get("sql_body"):
            pass  # BEGIN ATOMIC ... END: already a parsed tree, walked below
        elif code is not None and language == "sql":
            self._sql_body(code)
        elif code is not None and language == "plpgsql":
            # The function's own text parses with its real signature (RETURN x needs it).
            try:
                self._plpgsql_body(code, self.text if self.depth == 0 and self.kind.startswith("CREATE_") else None)
            except _Unanalyzable:
                # The offline PL/pgSQL parser has no catalog (%TYPE, VARIADIC, record arrays): the
                # statement itself parsed, so its body is opaque, decided by rules like any other.
                self.properties.add("opaque_body")
        else:
            self.properties.add("opaque_body")
        self.generic("CreateFunctionStmt", body, skip=("funcname",))

    def _sql_body(self, code: str) -> None:
        if self.depth > 4:
            raise _Unanalyzable("code nested too deeply to analyze")
        batch = analyze_sql(code)
        for stmt in batch.statements:
            if stmt.error:
                raise _Unanalyzable(f"embedded SQL could not be analyzed: {stmt.error}")
            self._merge(stmt)

    def _plpgsql_body(self, code: str, wrapper: str | None = None) -> None:
        if self.depth > 4:
            raise _Unanalyzable("code nested too deeply to analyze")
        if wrapper is None:
            tag = "bw"
            while f"${tag}$" in code:
                tag += "x"
            wrapper = f"CREATE FUNCTION botwarden_do() RETURNS void LANGUAGE plpgsql AS ${tag}${code}${tag}$"
        try:
            tree = pglast.parse_plpgsql(wrapper)
        except ParseError as e:
            raise _Unanalyzable(f"PL/pgSQL body could not be parsed: {_parse_error_message(e)}") from None
        self._plpgsql_walk(tree)

    def _plpgsql_walk(self, node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                self._plpgsql_walk(item)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key == "PLpgSQL_stmt_dynexecute":
                self._dynamic(value.get("query", {}).get("PLpgSQL_expr", {}))
                self._plpgsql_walk({k: v for k, v in value.items() if k != "query"})
            elif key == "PLpgSQL_stmt_dynfors" or key == "PLpgSQL_stmt_open":
                if "query" in value and key == "PLpgSQL_stmt_dynfors":
                    self._dynamic(value["query"].get("PLpgSQL_expr", {}))
                    value = {k: v for k, v in value.items() if k != "query"}
                if key == "PLpgSQL_stmt_open" and "dynquery" in value:
                    self._dynamic(value["dynquery"].get("PLpgSQL_expr", {}))
                    value = {k: v for k, v in value.items() if k != "dynquery"}
                self._plpgsql_walk(value)
            elif key == "PLpgSQL_expr":
                self._plpgsql_expr(value)
            else:
                self._plpgsql_walk(value)

    def _plpgsql_expr(self, expr: Mapping[str, Any]) -> None:
        query = expr.get("query", "")
        mode = expr.get("parseMode", 0)
        if mode == 0:
            self._sql_body(query)
        elif mode in (1, 2):  # a type name / an expression
            if mode == 2:
                self._sql_body("SELECT " + query)
        else:  # assignment: "target := expression"; split with PostgreSQL's own lexer
            self._sql_body("SELECT " + _after_assignment(query))

    def _dynamic(self, expr: Mapping[str, Any]) -> None:
        query = expr.get("query", "")
        self._sql_body("SELECT " + query)  # functions called while building the string
        try:
            tree = _tree(parse_sql_json("SELECT " + query))
            target = tree["stmts"][0]["stmt"]["SelectStmt"]["targetList"][0]["ResTarget"]["val"]
        except (ParseError, KeyError, IndexError):
            target = None
        literal = _const_string(target)
        if literal is not None:
            self._sql_body(literal)  # EXECUTE 'constant text': analyze what it runs
        else:
            self._dynamic_sql()

    def _dynamic_sql(self) -> None:
        """SQL text botwarden cannot read is run: it may set search_path to anything."""
        self.properties.add("dynamic_sql")
        self._set_search_path(("*",))


# The walker's handlers by node name (``_v_<Node>``), looked up once per node.
_HANDLERS = {name[3:]: fn for name, fn in vars(_Walker).items() if name.startswith("_v_")}
_STATEMENT_NODES = frozenset(n for n in _NODE_NAMES if n.endswith("Stmt") and n != "SelectStmt")
_NO_FIELDS: dict[str, str | None] = {}
# Nodes that hold only names, numbers and constants: nothing for the walk (most of a tree's nodes).
_OPERATORS: dict[tuple[str, ...], Function] = {}  # an operator's name parts -> its Function, made once
_BETWEEN_KINDS = frozenset({"AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM"})
_BETWEEN_OPERATORS = frozenset(Function(None, op) for op in (">=", "<=", "<", ">"))
_EQUALS = Function(None, "=")
_LEAVES = frozenset({"String", "Integer", "Float", "Boolean", "BitString", "A_Const", "A_Star", "ParamRef"})


def _after_assignment(text: str) -> str:
    """The expression part of a PL/pgSQL assignment (``x := expr`` or ``x = expr``)."""
    depth = 0
    for token in pglast.parser.scan(text):
        piece = text.encode("utf-8")[token.start:token.end + 1].decode("utf-8", "replace")
        if piece in ("(", "["):
            depth += 1
        elif piece in (")", "]"):
            depth -= 1
        elif depth == 0 and piece in (":=", "="):
            return text.encode("utf-8")[token.end + 1:].decode("utf-8", "replace")
    raise _Unanalyzable("PL/pgSQL assignment botwarden cannot split")


def split_search_path(value: str) -> tuple[str, ...]:
    out = []
    for part in value.split(","):
        part = part.strip()
        if part.startswith('"') and part.endswith('"') and len(part) >= 2:
            out.append(part[1:-1])
        elif part:
            out.append(part.lower())
    return tuple(p for p in out if p != "$user") or ("public",)


def kind_matches(pattern: str, kind: str) -> bool:
    """A ``kinds`` entry (exact kind, category, or glob like ``CREATE_*``) against a kind."""
    pattern = pattern.upper()
    if pattern == kind or (kind.startswith(pattern) and kind[len(pattern):len(pattern) + 1] == "."):
        return True  # a kind matches its sub-kinds: ALTER_TABLE matches ALTER_TABLE.DROP_COLUMN
    category = KIND_CATEGORIES.get(pattern)
    if category is not None:
        return bool(category(kind))
    if any(c in pattern for c in "*?["):
        import fnmatch

        return fnmatch.fnmatchcase(kind, pattern)
    return False


def valid_kind_pattern(pattern: str) -> bool:
    return any(kind_matches(pattern, k) for k in KNOWN_KINDS) or pattern.upper() in KIND_CATEGORIES


