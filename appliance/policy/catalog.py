"""Views, functions, triggers and rules made before the session: a read of a view is a read of
what its query reads, a call of a function runs what its body does, a write runs the table's
triggers and rules.

A view (or a materialized view) that botwarden did not see created selects from relations under
a name of its own: ``CREATE VIEW contacts AS SELECT id, email AS contact FROM accounts``, made by
an administrator last year, would let a bot read ``accounts.email`` past a rule that masks or
refuses it by reading ``contacts``; a SQL or PL/pgSQL function made the same way
(``CREATE FUNCTION emails() RETURNS SETOF text AS 'SELECT email FROM accounts'``) likewise, and
so would a partition or inheritance child read by its own name. At login the PostgreSQL front
reads, with the session's defaults, the catalog's change counters (:data:`PROBE_QUERY`); when
the policy engine has answers for those counters, they serve (:meth:`CatalogLookup.cached`).
Otherwise it asks, on the bot's own session before its first statement:

1. :data:`DEPENDENCIES_QUERY`: every view and materialized view not made by the system, with
   the relations (and functions) its query depends on (``pg_depend`` of its ``_RETURN`` rule),
   every partition and inheritance child with its parents, every rule ON INSERT/UPDATE/DELETE
   with what its actions depend on, every trigger with its function, the functions tables'
   defaults, constraints, expression indexes and row security policies call (operators they use
   by their functions), every aggregate with its support functions, every operator and cast
   with its function, and every foreign key whose ON DELETE/UPDATE writes;
2. in the same round trip, :meth:`CatalogLookup.functions_query`: the SQL and PL/pgSQL
   functions and procedures not made by the system whose body mentions the name of a relation
   (or a column) a rule of the session's scope names, with their definitions
   (``pg_get_functiondef``); then, a round trip each, those whose bodies name a view or
   function found so far (:data:`ROUNDS`);
3. with each round of step 2 for those known by then, and in one more round trip for those
   the last round made relevant (only when there are such), :meth:`CatalogLookup.definitions_query`:
   the queries (``pg_get_viewdef``, every relation named with its schema) of the views that
   reach, directly or through other views, a relation a rule of the session's scope names or a
   function read, and the definitions (``pg_get_ruledef``) of such rules. The functions of
   triggers on such a relation are read by their oids in step 2's rounds.

The engine then decides a statement naming such a view as reading what the view's query reads,
its result columns computed from the view's, and a statement calling such a function as doing
what its body does, and a statement writing a table as also doing what the triggers and rules
its events fire do (:func:`appliance.policy.engine.resolve_catalog`), so masking, refusals and
the writes masking cannot follow see through them. What is not seen: views and functions made
or replaced by another session after this one logged in, a function body that names a relation
only through text it builds at run time, calls nested deeper than :data:`ROUNDS`, and functions
in other languages.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Callable, Iterable, Mapping, Sequence

# Both questions run with an empty search path (set for their own transaction only), so the
# catalog names every relation with its schema: in the view names below and in the queries
# pg_get_viewdef prints (only pg_catalog's and the session's temporary relations stay bare).
# Without JIT: the planner's estimate of a recursive query over the catalog (_TYPES_REACHED) can
# pass jit_above_cost, and compiling it cost a new backend ~1 s for a query that runs in 1 ms.
_QUALIFIED = "BEGIN; SET LOCAL search_path = ''; SET LOCAL jit = off; {}; COMMIT"

# (view oid, view, relation oid, relation, 'v', ''), one row per relation a view's query depends on:
# pg_depend records those of the view's ON SELECT rule (ev_type 1: views and materialized
# views), and the view itself (left out). Views of the system (oids below 16384) are left out
# too. A function made after the system's that the view calls is a row too: ('f' || its oid, '').
# A rule ON INSERT / UPDATE / DELETE (``DO ALSO`` or ``DO INSTEAD``) runs its actions whenever
# its relation is written: ('r' || the rule's oid, its relation, what its actions depend on,
# 'r', its event: I, U or D). A trigger runs its function: ('t' || the trigger's oid, its
# relation, 'f' || the function's oid, the function, 't', its events: I, U, D, T(runcate)); triggers of the system's (foreign keys) and trigger functions of
# the system's (tsvector_update_trigger, ...) are left out, disabled triggers are not (one
# ALTER TABLE away from firing).
# Functions a table calls without a statement naming them: its columns' defaults and generated
# expressions (pg_attrdef), its CHECK constraints, its expression indexes (pg_class), on INSERT
# and UPDATE; its row security policies on reads (S) too: ('c' || the object's catalog and oid,
# the table, 'f' || the function's oid, the function, 'c', the events). A domain's constraint
# depends on its type, not a table: read with the casts (kind 'x').
_IMPLICIT = ("pg_attrdef", "pg_constraint", "pg_policy", "pg_class")
_PG_CLASS = "'pg_catalog.pg_class'::pg_catalog.regclass"
_PG_PROC = "'pg_catalog.pg_proc'::pg_catalog.regclass"
_PG_OPERATOR = "'pg_catalog.pg_operator'::pg_catalog.regclass"
# A view's query, a rule's action, a default or constraint that uses an operator depends on the
# operator (pg_operator), not on its function: 'o' || the operator's oid stands for it there, and
# the operator's own row ('o', below) says which function it calls. (No join to pg_operator:
# planning one more catalog join cost a new backend ~0.8 ms.)
_CALLED = (f"CASE WHEN d.refclassid = {_PG_OPERATOR} THEN 'o' ELSE 'f' END || d.refobjid::text")
_CALLS_MADE = f"d.refclassid IN ({_PG_PROC}, {_PG_OPERATOR}) AND d.refobjid >= 16384"
_PG_TYPE = "'pg_catalog.pg_type'::pg_catalog.regclass"
# (type, function) of the casts, domain constraints, domain defaults and operator classes calling
# a function made after the system's (the DEPENDENCIES_QUERY arm of kind 'x' below)
_TYPE_FUNCTIONS = (
    "(SELECT t.refobjid AS typ, d.refobjid AS fn FROM pg_catalog.pg_depend d "
    f"JOIN pg_catalog.pg_depend t ON t.classid = d.classid AND t.objid = d.objid AND t.refclassid = {_PG_TYPE} "
    "WHERE d.classid IN ('pg_catalog.pg_cast'::pg_catalog.regclass, 'pg_catalog.pg_constraint'::pg_catalog.regclass) "
    f"AND d.objid >= 16384 AND d.refclassid = {_PG_PROC} AND d.refobjid >= 16384 "
    f"UNION SELECT d.objid, d.refobjid FROM pg_catalog.pg_depend d WHERE d.classid = {_PG_TYPE} AND d.objid >= 16384 "
    f"AND d.refclassid = {_PG_PROC} AND d.refobjid >= 16384 "
    # A cast to one of the server's types (pinned: no pg_depend row names it) is a cast to what
    # its function returns (pg_proc: a catalog every new backend has open).
    "UNION SELECT p.prorettype, d.refobjid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid "
    f"WHERE d.classid = 'pg_catalog.pg_cast'::pg_catalog.regclass AND d.objid >= 16384 AND d.refclassid = {_PG_PROC} "
    "AND d.refobjid >= 16384 "
    # An operator class's (or family's) support functions and operators' functions: sorting,
    # grouping, comparing values of its type runs them (_TYPES_REACHED says where). (pg_amproc
    # and pg_amop: +0.5 ms on a new backend's first round; through pg_depend, +0.7.)
    "UNION SELECT p.amproclefttype, p.amproc FROM pg_catalog.pg_amproc p WHERE p.amproc >= 16384 "
    "AND p.amproclefttype >= 16384 "
    "UNION SELECT a.amoplefttype, o.oprcode FROM pg_catalog.pg_amop a JOIN pg_catalog.pg_operator o "
    "ON o.oid = a.amopopr WHERE o.oprcode >= 16384 AND a.amoplefttype >= 16384) u")
# What the casts, domain checks and defaults and operator classes calling the functions {fns}
# (read, and found by the 'x' rows below) reach, asked in the definitions' round, as
# (typ, fn, cast_to, written, used) closed over what holds a type: a domain over it, an array of
# it, a range over it, a composite type with a field of it (not for the server's own types:
# every table's row type has a text field). A cast's target, a domain with such a check or
# default and the type of an operator class with such a member are cast_to: casting to one calls
# the function ('cx' || fn || '.' || the type's oid, the type as regtype prints it). Written: the
# domain's and the casts the server applies on its own (AS ASSIGNMENT or AS IMPLICIT, castcontext
# 'a' or 'i'; an explicit-only cast runs only where a statement writes it): writing a table with
# a column of one calls it ('ct' || fn || '.' || the table's oid, the table). Used (1): any value
# of the type may run it: an operator class's support function or operator sorts, groups and
# compares values of its type (ORDER BY, DISTINCT, GROUP BY, joins, indexes), with no operator
# named; reading or writing a table with a column of one ('cu' ...), and calling a function
# returning one ('cp' || fn || '.' || its oid, the function as regproc prints it) count. Used (2):
# an AS IMPLICIT cast runs where a value of its source meets its target (a function's argument,
# an operand, a UNION's column): calling a function or operator with one among its arguments
# counts too ('co' ... for operators, as regoper prints them); the cast counts by its target
# type, or by its source when only the source is a user type (cast from a user type to text:
# not every function taking text).
_REACHED = ("cx", "ct", "cu", "cp", "co")
_TYPES_REACHED = (
    "(WITH RECURSIVE w(typ, fn, cast_to, written, used) AS ("
    "SELECT c.casttarget, c.castfunc, true, c.castcontext <> 'e', CASE WHEN c.castcontext = 'i' "
    "AND (c.casttarget >= 16384 OR c.castsource < 16384) THEN 2 ELSE 0 END FROM pg_catalog.pg_cast c "
    "WHERE c.castfunc IN ({fns}) "
    "UNION SELECT c.castsource, c.castfunc, false, false, 2 FROM pg_catalog.pg_cast c WHERE c.castfunc IN ({fns}) "
    "AND c.castcontext = 'i' AND c.castsource >= 16384 "
    "UNION SELECT co.contypid, d.refobjid, true, true, 0 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_constraint co "
    "ON co.oid = d.objid AND co.contypid <> 0 WHERE d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass "
    f"AND d.refclassid = {_PG_PROC} AND d.refobjid IN ({{fns}}) "
    f"UNION SELECT d.objid, d.refobjid, true, true, 0 FROM pg_catalog.pg_depend d WHERE d.classid = {_PG_TYPE} "
    f"AND d.refclassid = {_PG_PROC} AND d.refobjid IN ({{fns}}) "
    "UNION SELECT v.typ, p.amproc, true, false, 1 FROM pg_catalog.pg_amproc p, "
    "LATERAL (VALUES (p.amproclefttype), (p.amprocrighttype)) v (typ) WHERE p.amproc IN ({fns}) AND v.typ >= 16384 "
    "UNION SELECT v.typ, o.oprcode, true, false, 1 FROM pg_catalog.pg_amop a JOIN pg_catalog.pg_operator o "
    "ON o.oid = a.amopopr, LATERAL (VALUES (a.amoplefttype), (a.amoprighttype)) v (typ) "
    "WHERE o.oprcode IN ({fns}) AND v.typ >= 16384 "
    "UNION SELECT h.oid, w.fn, w.cast_to, w.written, w.used FROM w, LATERAL ("
    "SELECT t.oid FROM pg_catalog.pg_type t WHERE t.typbasetype = w.typ OR t.typelem = w.typ "
    "UNION ALL SELECT t.oid FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.typrelid = a.attrelid "
    "WHERE w.typ >= 16384 AND a.atttypid = w.typ AND a.attnum > 0 AND NOT a.attisdropped "
    "UNION ALL SELECT r.rngtypid FROM pg_catalog.pg_range r WHERE r.rngsubtype = w.typ "
    "UNION ALL SELECT r.rngmultitypid FROM pg_catalog.pg_range r WHERE r.rngtypid = w.typ) h) "
    "SELECT DISTINCT 'cx' || w.fn::text || '.' || w.typ::text, w.typ::pg_catalog.regtype::text FROM w WHERE w.cast_to "
    "UNION ALL SELECT DISTINCT CASE WHEN w.used > 0 THEN 'cu' ELSE 'ct' END || w.fn::text || '.' || a.attrelid::text, "
    "a.attrelid::pg_catalog.regclass::text FROM w JOIN pg_catalog.pg_attribute a ON a.atttypid = w.typ "
    "WHERE (w.written OR w.used > 0) AND a.attrelid >= 16384 AND a.attnum > 0 AND NOT a.attisdropped "
    "UNION ALL SELECT DISTINCT 'cp' || w.fn::text || '.' || p.oid::text, p.oid::pg_catalog.regproc::text "
    "FROM w JOIN pg_catalog.pg_proc p ON p.oid >= 16384 AND p.oid <> w.fn AND (p.prorettype = w.typ "
    "OR w.typ = ANY (p.proallargtypes) OR w.used = 2 AND w.typ = ANY (p.proargtypes::pg_catalog.oid[])) WHERE w.used > 0 "
    "UNION ALL SELECT DISTINCT 'co' || w.fn::text || '.' || o.oid::text, o.oid::pg_catalog.regoper::text "
    "FROM w JOIN pg_catalog.pg_operator o ON o.oid >= 16384 AND w.typ IN (o.oprleft, o.oprright, o.oprresult) "
    "WHERE w.used = 2)")
DEPENDENCIES_QUERY = _QUALIFIED.format(
    "SELECT DISTINCT CASE WHEN r.ev_type = '1' THEN r.ev_class::text ELSE 'r' || r.oid::text END, "
    "r.ev_class::pg_catalog.regclass::text, "
    f"CASE WHEN d.refclassid = {_PG_CLASS} THEN d.refobjid::text ELSE {_CALLED} END, "
    f"CASE WHEN d.refclassid = {_PG_CLASS} THEN d.refobjid::pg_catalog.regclass::text ELSE '' END, "
    "CASE WHEN r.ev_type = '1' THEN 'v' ELSE 'r' END, "
    "CASE r.ev_type WHEN '2' THEN 'U' WHEN '3' THEN 'I' WHEN '4' THEN 'D' ELSE '' END "
    "FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d "
    "ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid AND d.refobjid <> r.ev_class "
    f"AND (d.refclassid = {_PG_CLASS} OR {_CALLS_MADE}) "
    "WHERE r.ev_class >= 16384 "
    # A partition or inheritance child: its rows are its parent's too (kind 'i').
    "UNION ALL SELECT i.inhrelid::text, i.inhrelid::pg_catalog.regclass::text, i.inhparent::text, "
    "i.inhparent::pg_catalog.regclass::text, 'i', '' FROM pg_catalog.pg_inherits i WHERE i.inhrelid >= 16384 "
    "UNION ALL SELECT 't' || t.oid::text, t.tgrelid::pg_catalog.regclass::text, 'f' || t.tgfoid::text, "
    "t.tgfoid::pg_catalog.regproc::text, 't', "
    + " || ".join(f"CASE WHEN t.tgtype::int & {bit} <> 0 THEN '{event}' ELSE '' END"
                  for bit, event in ((4, "I"), (8, "D"), (16, "U"), (32, "T"))) + " "
    "FROM pg_catalog.pg_trigger t WHERE NOT t.tgisinternal AND t.tgrelid >= 16384 AND t.tgfoid >= 16384"
    # The object (a default, ...) depends on the function and on its table: pg_depend alone says
    # both (opening pg_attrdef, pg_constraint, pg_policy and pg_index too cost ~0.9 ms more
    # on a new backend).
    " UNION ALL SELECT DISTINCT 'c' || d.classid::text || '.' || d.objid::text, "
    f"t.refobjid::pg_catalog.regclass::text, {_CALLED}, CASE WHEN d.refclassid = {_PG_OPERATOR} THEN '' "
    "ELSE d.refobjid::pg_catalog.regproc::text END, 'c', "
    "CASE WHEN d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass THEN 'SIUD' ELSE 'IU' END "
    "FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_depend t ON t.classid = d.classid AND t.objid = d.objid "
    f"AND t.refclassid = {_PG_CLASS} AND t.refobjid >= 16384 "
    f"WHERE {_CALLS_MADE} AND d.classid IN ("
    + ", ".join(f"'pg_catalog.{c}'::pg_catalog.regclass" for c in _IMPLICIT) + ")"
    # An aggregate runs its support functions (state transition, final ...): ('a' || its oid, the
    # aggregate, 'f' || the function's oid, the function, 'a', '').
    " UNION ALL SELECT 'a' || d.objid::text, d.objid::pg_catalog.regproc::text, 'f' || d.refobjid::text, "
    "d.refobjid::pg_catalog.regproc::text, 'a', '' FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_proc p "
    "ON p.oid = d.objid AND p.prokind = 'a' WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass "
    "AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid >= 16384 AND d.refobjid >= 16384"
    # An operator runs its function: ('o' || its oid, schema.symbol, 'f' || the function's oid, the
    # function, 'o', ''); learned like an aggregate: using the symbol calls the function.
    " UNION ALL SELECT 'o' || d.objid::text, d.objid::pg_catalog.regoper::text, 'f' || d.refobjid::text, "
    f"d.refobjid::pg_catalog.regproc::text, 'o', '' FROM pg_catalog.pg_depend d WHERE d.classid = {_PG_OPERATOR} "
    f"AND d.objid >= 16384 AND d.refclassid = {_PG_PROC} AND d.refobjid >= 16384"
    # A type calls functions: a cast's (from or to it: pg_depend does not tell the two types
    # apart), a domain's CHECK constraints' and its default's, its operator classes'. ('x' || the
    # type's oid || '.' || the function's oid, the type as regtype prints it, 'f' || the
    # function's oid, the function, 'x', ''): casting to the type calls them (fail closed); where
    # else they run (writing a table with a column of the type, reading one, calling a function
    # taking or returning it: _TYPES_REACHED) is asked only when such a function was read
    # (CatalogLookup.definitions_query). No join to pg_cast or pg_type: pg_depend alone.
    " UNION ALL SELECT 'x' || u.typ::text || '.' || u.fn::text, u.typ::pg_catalog.regtype::text, 'f' || u.fn::text, "
    "u.fn::pg_catalog.regproc::text, 'x', '' FROM " + _TYPE_FUNCTIONS +
    # A foreign key writes the referencing table when the referenced one is written: ON DELETE /
    # ON UPDATE CASCADE, SET NULL, SET DEFAULT (D, U), and TRUNCATE ... CASCADE whatever its
    # actions (C): ('k' || its oid, the referenced table, the referencing table's oid, the
    # referencing table, 'k', the events).
    " UNION ALL SELECT 'k' || k.oid::text, k.confrelid::pg_catalog.regclass::text, k.conrelid::text, "
    "k.conrelid::pg_catalog.regclass::text, 'k', CASE WHEN k.confdeltype IN ('c', 'n', 'd') THEN 'D' ELSE '' END || "
    "CASE WHEN k.confupdtype IN ('c', 'n', 'd') THEN 'U' ELSE '' END || 'C' FROM pg_catalog.pg_constraint k "
    "WHERE k.contype = 'f' AND k.conrelid >= 16384"
    # An event trigger runs its function on DDL (the bot's CREATE TEMP TABLE too), whoever runs
    # it, enabled or not: ('e' || its oid, its name, 'f' || the function's oid, the function, 'e',
    # 'E'). Counted when the function was read; learned under DDL (engine.resolve_catalog).
    " UNION ALL SELECT 'e' || e.oid::text, pg_catalog.quote_ident(e.evtname), 'f' || e.evtfoid::text, "
    "e.evtfoid::pg_catalog.regproc::text, 'e', 'E' FROM pg_catalog.pg_event_trigger e WHERE e.evtfoid >= 16384")
# What the event triggers' functions are learned under, as if it were a relation DDL writes.
DDL = ("", "")  # (no relation has an empty name)

# Whether the catalog changed since answers were cached: the database, whether the server
# counts catalog changes at all (track_counts), when the database's statistics were last reset,
# and how many rows were inserted, updated or deleted in the catalogs the answers come from
# (CREATE/REPLACE/RENAME of a view, a table, a column or a function each changes one; VACUUM
# and ANALYZE do not). Shared-memory counters: cheap on a new backend, where the catalog
# queries themselves cost milliseconds. A session flushes its counts when it goes idle, at
# most once a second: a change another session is still in the middle of can go unseen that
# long.
_COUNTED = ("pg_class", "pg_attribute", "pg_rewrite", "pg_proc", "pg_namespace", "pg_depend", "pg_inherits",
            "pg_trigger")
PROBE_QUERY = (
    "SELECT pg_catalog.current_database()::text, pg_catalog.current_setting('track_counts'), "
    "pg_catalog.pg_stat_get_db_stat_reset_time((SELECT oid FROM pg_catalog.pg_database "
    "WHERE datname = pg_catalog.current_database()))::text, "
    + " || ',' || ".join(f"(pg_catalog.pg_stat_get_tuples_inserted({o}) + pg_catalog.pg_stat_get_tuples_updated({o}) "
                         f"+ pg_catalog.pg_stat_get_tuples_deleted({o}))::text"
                         for o in (f"'pg_catalog.{c}'::pg_catalog.regclass" for c in _COUNTED)))

Row = Sequence[str | None]
# (views, functions, effects): CatalogLookup.definitions(), .learned_functions, .effects
Learned = tuple[dict, dict, dict]


def split_regclass(text: str) -> tuple[str | None, str]:
    """``schema.name`` as ``regclass`` prints it (quote_ident's quoting) -> (schema, name); a bare
    name has schema None."""
    if '"' not in text:  # (no quoting: the common case, thousands of rows on a big catalog)
        schema, dot, name = text.partition(".")
        if not dot and schema:
            return None, schema
        if dot and schema and name and "." not in name:
            return schema, name
        raise ValueError(f"unexpected relation name {text!r}")
    parts: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == '"':
            j, word = i + 1, []
            while j < len(text):
                if text[j] == '"':
                    if text[j + 1:j + 2] == '"':
                        word.append('"')
                        j += 2
                        continue
                    break
                word.append(text[j])
                j += 1
            else:
                raise ValueError(f"unterminated quoted name in {text!r}")
            parts.append("".join(word))
            i = j + 1
        else:
            j = text.find(".", i)
            j = len(text) if j < 0 else j
            parts.append(text[i:j])
            i = j
        if i < len(text):
            if text[i] != ".":
                raise ValueError(f"unexpected relation name {text!r}")
            i += 1
    if len(parts) == 1 and parts[0]:
        return None, parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise ValueError(f"unexpected relation name {text!r}")


# Names regtype prints for the server's types that are not their pg_type names (a statement's
# ``::integer`` is ``pg_catalog.int4`` in its parse tree).
_SQL_TYPE_NAMES = {"integer": "int4", "smallint": "int2", "bigint": "int8", "real": "float4",
                   "double precision": "float8", "boolean": "bool", "character varying": "varchar",
                   "character": "bpchar", "bit varying": "varbit", "timestamp without time zone": "timestamp",
                   "timestamp with time zone": "timestamptz", "time without time zone": "time",
                   "time with time zone": "timetz"}


def type_name(text: str) -> tuple[str, str]:
    """A type as ``regtype`` prints it under an empty search path -> (schema, its pg_type name):
    ``public.badge`` -> (public, badge), ``integer`` -> (pg_catalog, int4), ``public.badge[]`` ->
    (public, _badge), as a cast in a statement's parse tree names it."""
    array = text.endswith("[]")
    schema, name = split_regclass(text[:-2] if array else text)
    if schema is None:
        schema, name = "pg_catalog", _SQL_TYPE_NAMES.get(name, name)
    return schema, ("_" + name if array else name)


_WORD = re.compile(r"\w+")


def names_matcher(names: Iterable[str]) -> Callable[[str], bool]:
    """Whether a text names one of ``names`` as a word (case-insensitively, with no word character
    next to it; as PostgreSQL's \\m \\M, but a '$' next to a name may be a dollar quote; an
    operator's symbol anywhere, ``1#@#2`` too). Names
    that are words are looked up among the text's words; only the others (an operator's symbol,
    a quoted name with a space) make a regular expression: one alternative per name cost ~35 µs
    to compile, 24 ms for the 700 views and functions of a big catalog."""
    plain = {n.lower() for n in names if _WORD.fullmatch(n)}
    other = sorted(n for n in names if not _WORD.fullmatch(n))
    rx = re.compile("|".join((r"(?<!\w)" if _WORD.match(n[0]) else "") + re.escape(n) + (r"(?!\w)" if _WORD.match(n[-1]) else "")
                             for n in other), re.IGNORECASE) if other else None

    def names_one(text: str) -> bool:
        if plain and not plain.isdisjoint(w.lower() for w in _WORD.findall(text)):
            return True
        return rx is not None and rx.search(text) is not None
    return names_one


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def like_fragment(glob: str) -> str:
    """A name pattern's glob as an ILIKE pattern matching text that mentions it anywhere."""
    out = []
    for ch in glob:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "[]!":
            out.append("%")  # a character class: any text (wider, never narrower)
        else:
            out.append(ch)
    return "%" + "".join(out) + "%"


def _mentions_any(column: str, names: Sequence[str]) -> str:
    """SQL true when ``column`` contains one of ``names``, case-insensitively: ``strpos`` over the
    lower-cased text, ORed. (Neither a regular expression nor an ILIKE pattern: the planner
    compiles each pattern to estimate its selectivity, ~0.1 ms apiece on a new backend, and it
    does not look into ``strpos``; :meth:`CatalogLookup.functions` keeps only the bodies naming
    one as a word.)"""
    return "(" + " OR ".join(f"strpos(lower({column}), {_literal(name.lower())}) > 0" for name in names) + ")"


def _literal(text: str) -> str:
    """A string constant read the same whatever the server's standard_conforming_strings says."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


# Rounds of "functions whose bodies name what the previous round found" (views reaching a
# guarded relation, functions calling one that reads it): calls nested deeper are not followed.
ROUNDS = 4


class CatalogLookup:
    """One session's questions to the catalog. ``guarded(schema, name)``: a rule of the session's
    scope names that relation (None: every view counts, as when a rule masks a column by its name
    alone, whatever relation it is in). ``mentions``: the names (globs) a function body has to
    mention to be read (the guarded relations' and bare masked columns' names); later rounds
    read the bodies that name, as a word, a view or function an earlier round found
    (:meth:`next_functions_query`)."""

    def __init__(self, guarded: Callable[[str, str], bool] | None, mentions: Iterable[str],
                 cache: dict | None = None, scope: tuple = ()):
        self.guarded = guarded
        self.mentions = sorted(set(mentions))
        self.function_oids: set[str] = set()  # 'f' || oid of the functions read (functions())
        self.learned_functions: dict[tuple[str, str], list[str]] = {}
        self.names: dict[str, tuple[str | None, str]] = {}  # oid -> (schema, name) of the views to read
        self.inherited: dict[tuple[str | None, str], list] = {}  # child -> its parents (schema, name)
        # (schema, name) of a relation -> what writing it runs besides: ("rule", events, its
        # definition) and ("trigger", events, schema, name of its function), from definitions();
        # events: the letters of INSERT, UPDATE, DELETE, TRUNCATE that run it
        self.effects: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        self._rules: dict[str, tuple[str, str]] = {}  # 'r' || oid -> its relation, for definitions()
        self.cache = cache  # shared by the sessions of one engine: (scope, probe row) -> Learned
        self.scope = scope
        self._key: tuple | None = None
        self._depends: dict[str, set[str]] = {}
        self._oid_names: dict[str, tuple[str | None, str]] = {}
        self._children: set[str] = set()
        # 'r…' rules and 't…' triggers -> their events (_oid_names gives their relation)
        self._effects_on: dict[str, str] = {}
        self._called_functions: dict[str, tuple[str, str]] = {}  # 'f' || oid -> (schema, name): triggers', calls', aggregates'
        self._by_oid: set[str] = set()  # 'f' || oid of the functions a round asks for by oid (triggers')
        # 'a', 'o', 'x' || oid of the aggregates, operators and casts: each calls functions under a
        # name of its own (_oid_names gives it: the aggregate's, the symbol, the cast's target type)
        self._callers: set[str] = set()
        self._cascades: dict[str, str] = {}  # 'k' || oid of a writing foreign key -> the referenced table's events
        self._relevant_memo: tuple[int, list[str]] | None = None
        self._named: set[str] = set()  # names later rounds already asked for
        self._asked: set[str] = set()  # views' and rules' oids whose definitions were asked for
        self._type_fns_asked: set[str] = set()  # oids of the functions whose types were asked for (_TYPES_REACHED)
        self._types_reached: set[tuple[str, str, str]] = set()  # (x, t, u, p or o, 'f' || a function's oid, a name)
        self._answers: dict[str, str | None] = {}  # their definitions
        self._rounds = 0
        self._words: Callable[[str], bool] | None = None  # whether a body names this round's names (functions())

    # The front asks PROBE_QUERY with the session defaults; on a hit it is done, on a miss it asks
    # :attr:`queries` (given to :meth:`dependencies` and :meth:`functions`), then
    # :meth:`next_functions_query` until None, then :meth:`definitions_query` if there are views
    # to read, and gives the result of :meth:`learned` to :meth:`remember`.
    probe_query = PROBE_QUERY

    def cached(self, rows: Sequence[Row]) -> Learned | None:
        """The answers learned before under the same catalog counters (PROBE_QUERY's rows), or None."""
        if len(rows) != 1 or len(rows[0]) != 4 or None in (rows[0][0], rows[0][1]):
            raise ValueError("unexpected row from the catalog's change counters")
        database, counting, reset, counts = rows[0]
        if self.cache is None or counting != "on" or counts is None:
            return None  # without counters nothing says the catalog did not change
        self._key = (self.scope, database, reset, counts)
        return self.cache.get(self._key)

    def remember(self, learned: Learned) -> None:
        if self.cache is not None and self._key is not None:
            if len(self.cache) >= 256:
                self.cache.clear()
            self.cache[self._key] = learned

    @property
    def queries(self) -> list[str]:
        """The questions asked when :meth:`cached` has no answer, in one round trip."""
        return [DEPENDENCIES_QUERY, self.functions_query()]

    def functions_query(self, words: Sequence[str] = (), oids: Sequence[str] = ()) -> str:
        """(oid, schema, name, definition) of the functions and procedures whose body mentions
        one of :attr:`mentions` (a body in SQL-standard form, ``BEGIN ATOMIC``, always); with
        ``words`` or ``oids`` ('f' || oid), those not read yet whose body names one of the words
        as a word, or with one of those oids. SQL and PL/pgSQL bodies are analysed; one in
        another procedural language (PL/Perl, PL/Python ...: its source text is the body) is
        learned as unreadable, so calling it is refused (engine.learn_catalog); C and internal
        functions (extensions', the server's) have no body to read and are left out."""
        head = ("SELECT p.oid::text, n.nspname, p.proname, pg_catalog.pg_get_functiondef(p.oid) FROM pg_catalog.pg_proc p "
                "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
                "JOIN pg_catalog.pg_language l ON l.oid = p.prolang "
                "WHERE p.oid >= 16384 AND p.prokind IN ('f', 'p') AND l.lanname NOT IN ('c', 'internal') ")
        if words or oids:
            known = ", ".join(str(int(oid[1:])) for oid in sorted(self.function_oids)) or "0"
            tests = [_mentions_any("p.prosrc", words)] if words else []
            if oids:
                tests.append("p.oid IN (" + ", ".join(str(int(oid[1:])) for oid in oids) + ")")
            return head + f"AND p.oid NOT IN ({known}) AND (" + " OR ".join(tests) + ")"
        if not self.mentions:
            return head
        plain = [m for m in self.mentions if not any(ch in m for ch in "*?[]!")]
        tests = [_mentions_any("p.prosrc", plain)] if plain else []
        if len(plain) < len(self.mentions):
            likes = ", ".join(_literal(like_fragment(m)) for m in self.mentions if m not in plain)
            tests.append(f"p.prosrc ILIKE ANY (ARRAY[{likes}])")
        return head + "AND (p.prosqlbody IS NOT NULL OR " + " OR ".join(tests) + ")"

    def functions(self, rows: Iterable[Row]) -> None:
        """Read a :meth:`functions_query`'s rows: (schema, name) -> its overloads' definitions. In
        the later rounds, only bodies that name one of the round's words as a word count."""
        for row in rows:
            if len(row) != 4 or None in row:
                raise ValueError("unexpected row from the catalog's functions")
            if "f" + row[0] in self.function_oids:  # type: ignore[operator]
                continue
            if self._rounds and "f" + row[0] not in self._by_oid and (  # type: ignore[operator]
                    self._words is None or not self._words(row[3])):  # type: ignore[arg-type]
                continue
            self.function_oids.add("f" + row[0])  # type: ignore[operator]
            self.learned_functions.setdefault((row[1], row[2]), []).append(row[3])  # type: ignore[arg-type]

    def dependencies(self, rows: Iterable[Row]) -> None:
        """Read :data:`DEPENDENCIES_QUERY`'s rows."""
        self._relevant_memo = None
        for row in rows:
            if len(row) != 6 or None in row or row[4] not in ("v", "i", "r", "t", "c", "a", "k", "e", "o", "x"):
                raise ValueError("unexpected row from the catalog's view dependencies")
            view, vname, ref, rname, kind, events = row  # type: ignore[misc]
            self._oid_names[view] = type_name(vname) if kind == "x" else split_regclass(vname)  # type: ignore[arg-type]
            if ref.startswith("f"):  # type: ignore[union-attr]
                if kind in ("t", "c", "a", "e", "o", "x"):
                    schema, name = split_regclass(rname)  # type: ignore[arg-type]
                    self._called_functions[ref] = (schema or "pg_catalog", name)  # type: ignore[index]
            elif not ref.startswith("o"):  # type: ignore[union-attr]  (an operator: named by its own row)
                self._oid_names.setdefault(ref, split_regclass(rname))  # type: ignore[arg-type]
            self._depends.setdefault(view, set()).add(ref)  # type: ignore[arg-type]
            if kind == "i":
                self._children.add(view)  # type: ignore[arg-type]
            elif kind in ("a", "o", "x"):
                self._callers.add(view)  # type: ignore[arg-type]
            elif kind == "k":
                self._cascades[view] = events  # type: ignore[index]
            elif kind in ("r", "t", "c", "e"):
                self._effects_on[view] = events  # type: ignore[index]

    def _relevant(self) -> list[str]:
        """The views, children, rules, triggers, calls and aggregates that reach a guarded
        relation or call a function read (foreign keys: definitions_query). Kept until another
        function is read."""
        if self._relevant_memo is not None and self._relevant_memo[0] == len(self.function_oids):
            return self._relevant_memo[1]
        names, depends = self._oid_names, self._depends
        reaches: dict[str, bool] = {}
        relations: dict[tuple[str | None, str], list[str]] = {}  # (a trigger's table: by name)
        for oid in depends:
            if oid[0].isdigit():
                relations.setdefault(names[oid], []).append(oid)

        def guarded(oid: str) -> bool:
            if self.guarded is None:
                return False
            schema, name = names[oid]
            # A bare name is pg_catalog's or the session's temporary one.
            return any(self.guarded(s, name) for s in ((schema,) if schema else ("pg_catalog", "pg_temp")))

        def reach(oid: str, path: frozenset[str]) -> bool:
            if oid in reaches:
                return reaches[oid]
            if oid.startswith("f"):  # a function: one whose body was read
                return oid in self.function_oids
            # Every view may carry a column masked by its name alone; a trigger through its
            # function (whose body names it), as the function is read, or through the rows it
            # sees: those of a guarded relation, or of a view or child reaching one (an INSTEAD OF
            # trigger's NEW.contact is the view's column). A function a table calls (a default,
            # a constraint, a policy, an index), an aggregate and an event trigger count only when
            # the function was read.
            if oid.startswith(("c", "a", "e", "o", "x")):
                found = False
            elif oid.startswith("t"):
                found = guarded(oid) or any(reach(r, path | {oid}) for r in relations.get(names[oid], ()))
            else:
                found = (self.guarded is None and oid in depends) or guarded(oid)
            for ref in depends.get(oid, ()):
                if ref not in path and reach(ref, path | {oid}):
                    found = True
            reaches[oid] = found
            return found

        relevant = [oid for oid in depends if oid not in self._cascades and reach(oid, frozenset())]
        self._relevant_memo = (len(self.function_oids), relevant)
        return relevant

    def next_functions_query(self) -> str | None:
        """The next round: functions not read yet whose bodies name a view or child found so far
        or a function read so far (one calling another that reads a guarded relation), or None."""
        words = {self._oid_names[oid][1] for oid in self._relevant() if oid not in self._effects_on}
        words |= {name for _, name in self.learned_functions}
        words -= self._named
        # The functions of triggers on a guarded relation see its rows (NEW, OLD): read them too.
        unread = {ref for oid in self._relevant() if oid.startswith("t") for ref in self._depends[oid]}
        unread -= self.function_oids | self._named
        if not (words or unread) or self._rounds >= ROUNDS:
            return None
        self._rounds += 1
        self._named |= words | unread
        self._by_oid = unread
        # Word boundaries as PostgreSQL's \m \M (a '$' next to a name may be a dollar quote).
        self._words = names_matcher(words) if words else None
        return self.functions_query(sorted(words), sorted(unread))

    def definitions_query(self) -> str | None:
        """The query for the definitions of the views and rules that reach a guarded relation or
        call a function read and were not asked for yet, or None: none (children and triggers
        need none). Asked with each later round for those known so far (saving a round trip when
        the round finds nothing new), and once more after the last round."""
        relevant = self._relevant()
        names = self._oid_names
        self.names = {oid: names[oid] for oid in relevant if oid not in self._children and oid not in self._effects_on
                      and oid not in self._callers}
        self._rules = {oid: names[oid] for oid in relevant if oid.startswith("r")}  # type: ignore[misc]
        views = sorted((oid for oid in self.names if oid not in self._asked), key=int)
        rules = sorted(oid for oid in self._rules if oid not in self._asked)
        self._asked.update(views, rules)
        selects = []
        if views:
            selects.append("SELECT c.oid::text, pg_catalog.pg_get_viewdef(c.oid) FROM pg_catalog.pg_class c "
                           f"WHERE c.oid IN ({', '.join(str(int(oid)) for oid in views)})")
        if rules:
            selects.append("SELECT 'r' || r.oid::text, pg_catalog.pg_get_ruledef(r.oid) FROM pg_catalog.pg_rewrite r "
                           f"WHERE r.oid IN ({', '.join(str(int(oid[1:])) for oid in rules)})")
        # The types and tables a cast, domain default or check calling a function read reaches.
        fns = sorted({oid.partition(".")[2] for oid in relevant if oid[0] == "x"} - self._type_fns_asked, key=int)
        self._type_fns_asked.update(fns)
        if fns:
            selects.append(_TYPES_REACHED.format(fns=", ".join(str(int(fn)) for fn in fns)))
        return _QUALIFIED.format(" UNION ALL ".join(selects)) if selects else None

    def add_definitions(self, rows: Iterable[Row]) -> None:
        """Read the rows of a :meth:`definitions_query` asked with a round."""
        for row in rows:
            fn = row[0][2:].partition(".")[0] if len(row) == 2 and row[0] is not None else None
            if fn is not None and row[0][:2] in _REACHED and row[1] is not None and fn in self._type_fns_asked:
                # (_TYPES_REACHED: a type casting to which calls fn, a table writing or reading which
                # does, a function or operator calling which does)
                self._types_reached.add((row[0][1], "f" + fn, row[1]))  # type: ignore[index]
                continue
            if len(row) != 2 or row[0] not in self._asked:
                raise ValueError("unexpected row from the catalog's view definitions")
            self._answers[row[0]] = row[1]  # type: ignore[index]

    def definitions(self, rows: Iterable[Row]) -> dict[tuple[str | None, str], str | None]:
        """(schema, name) -> the view's query, from the rows of the last :meth:`definitions_query`
        (none when it asked nothing) and those :meth:`add_definitions` read, and a partition's or
        inheritance child's ``SELECT * FROM <its parents>``. A view asked for and not answered
        (dropped in between) maps to None: decided as unreadable. Sets :attr:`effects` and the
        aggregates' entries of :attr:`learned_functions`: once, after the last round."""
        self.add_definitions(rows)
        relevant, names = self._relevant(), self._oid_names
        found: dict[tuple[str | None, str], str | None] = {
            name: self._answers.get(oid) for oid, name in self.names.items()}
        # A child reads as its parents (the same column names): no definition to ask for.
        self.inherited = {names[oid]: sorted(names[p] for p in self._depends[oid] if not p.startswith("f"))
                          for oid in relevant if oid in self._children}
        for child, parents in self.inherited.items():
            found[child] = "SELECT * FROM " + ", ".join(".".join(_quoted(p) for p in parent if p is not None)
                                                        for parent in parents)
        self.effects = {}
        for oid in sorted(o for o in relevant if o.startswith(("t", "c"))):
            table = names[oid]
            # (a default using an operator calls the operator's function; a trigger on another
            # session's temporary table: not here)
            calls = {f for r in self._depends[oid] for f in (self._depends.get(r, ()) if r[0] == "o" else (r,))}
            for ref in sorted(calls):
                if table[0] is None or ref not in self._called_functions:
                    continue
                if oid.startswith("c") and ref not in self.function_oids:
                    continue  # (another function the same default or policy calls, not read)
                entry = ("trigger" if oid.startswith("t") else "call", self._effects_on[oid], *self._called_functions[ref])
                if entry not in self.effects.get(table, ()):  # type: ignore[arg-type]
                    self.effects.setdefault(table, []).append(entry)  # type: ignore[index]
        for kind, ref, table_text in sorted(self._types_reached):  # writing (reading) it runs a cast, a check ...
            if kind in "tu" and ref in self.function_oids:
                table, entry = split_regclass(table_text), ("call", "IU" if kind == "t" else "SIUD", *self._called_functions[ref])
                if table[0] is not None and entry not in self.effects.get(table, ()):  # type: ignore[arg-type]
                    self.effects.setdefault(table, []).append(entry)  # type: ignore[index]
        for oid in sorted(o for o in relevant if o.startswith("e")):
            for ref in sorted(self._depends[oid]):
                entry = ("event", "E", *self._called_functions[ref])
                if ref in self.function_oids and entry not in self.effects.get(DDL, ()):
                    self.effects.setdefault(DDL, []).append(entry)
        for oid, table in sorted(self._rules.items()):
            if table[0] is not None:  # (a rule on another session's temporary table: never written here)
                # A rule dropped in between gives no definition: writes to its table are refused.
                self.effects.setdefault(table, []).append(("rule", self._effects_on[oid], self._answers.get(oid) or ""))
        # A foreign key writing a table that is guarded, or has triggers or rules that count (or
        # cascades on to one that does), writes it with the statement that writes the referenced one.
        writes_matter = set(self.effects)
        added = True
        while added:
            added = False
            for oid, events in sorted(self._cascades.items()):
                parent, (child,) = names[oid], [names[r] for r in self._depends[oid]]
                entry = ("cascade", events, child[0] or "", child[1])
                if parent[0] is None or child[0] is None or entry in self.effects.get(parent, ()):  # type: ignore[arg-type]
                    continue
                if child in writes_matter or (self.guarded is not None and self.guarded(child[0], child[1])):
                    self.effects.setdefault(parent, []).append(entry)  # type: ignore[index]
                    writes_matter.add(parent)
                    added = True
        # An aggregate reading a guarded relation through its support functions: calling it calls
        # them; an operator or cast its function: using it calls it (the engine looks a statement's
        # operators and casts up among the functions, StatementAnalysis.operators).
        calls: dict[tuple[str | None, str], set[tuple[str, str]]] = {}
        for oid in (o for o in relevant if o in self._callers):
            calls.setdefault(names[oid], set()).update(
                self._called_functions[ref] for ref in self._depends[oid] if ref in self.function_oids)
        for kind, ref, text in self._types_reached:  # a cast to a domain over the type, an array of it ...
            if kind in "xpo" and ref in self.function_oids:
                calls.setdefault(type_name(text) if kind == "x" else split_regclass(text), set()).add(
                    self._called_functions[ref])
        for (schema, name), called in sorted(calls.items(), key=lambda item: (item[0][0] or "", item[0][1])):
            body = "SELECT " + ", ".join(f"{_quoted(s)}.{_quoted(n)}()" for s, n in sorted(called))
            if schema is not None and called and body not in self.learned_functions.get((schema, name), ()):
                self.learned_functions.setdefault((schema, name), []).append(body)
        return found


def catalog_key(views: Mapping[tuple[str | None, str], str | None],
                functions: Mapping[tuple[str, str], Sequence[str]],
                effects: Mapping[tuple[str, str], Sequence[tuple[str, ...]]] | None = None) -> str:
    """What decisions over these views, functions, triggers and rules are cached under (sessions
    that learned the same share): a digest, so the verdict caches' keys stay short."""
    if not (views or functions or effects):
        return ""
    text = json.dumps([sorted([k[0] or "", k[1], v or ""] for k, v in views.items()),
                       sorted([k[0], k[1], sorted(v)] for k, v in functions.items()),
                       sorted([k[0], k[1], sorted(map(list, v))] for k, v in (effects or {}).items())])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
