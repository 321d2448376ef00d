"""Views made before the session: a read of one is a read of what its query reads.

A view (or a materialized view) that botwarden did not see created selects from relations under
a name of its own: ``CREATE VIEW contacts AS SELECT id, email AS contact FROM accounts``, made by
an administrator last year, would let a bot read ``accounts.email`` past a rule that masks or
refuses it by reading ``contacts``. At login the PostgreSQL front asks the target's catalog
(on the bot's own session, before its first statement):

1. :data:`DEPENDENCIES_QUERY`: every view and materialized view not made by the system, with
   the relations its query depends on (``pg_depend`` of its ``_RETURN`` rule), in the same
   round trip as the session's defaults;
2. :meth:`ViewLookup.definitions_query`: for the views that reach, directly or through other
   views, a relation a rule of the session's scope names, their queries (``pg_get_viewdef``,
   every relation in them named with its schema); one more round trip, only when there are such
   views.

The engine then decides a statement reading such a view as reading what the view's query
reads, its result columns computed from the view's (:func:`appliance.policy.engine.resolve_views`),
so masking, refusals and the writes masking cannot follow see through it. Only relation
dependencies are looked at: a view over a function that reads a masked table is one of the
function bodies botwarden does not read (docs/policy.md).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable, Mapping, Sequence

# Both questions run with an empty search path (set for their own transaction only), so the
# catalog names every relation with its schema: in the view names below and in the queries
# pg_get_viewdef prints (only pg_catalog's and the session's temporary relations stay bare).
_QUALIFIED = "BEGIN; SET LOCAL search_path = ''; {}; COMMIT"

# (view oid, view, relation oid, relation), one row per relation a view's query depends on:
# pg_depend records those of the view's ON SELECT rule (ev_type 1: views and materialized
# views; other rules do not change what reading a table returns), and the view itself (left
# out). Views of the system (oids below 16384) are left out too.
DEPENDENCIES_QUERY = _QUALIFIED.format(
    "SELECT DISTINCT r.ev_class::text, r.ev_class::pg_catalog.regclass::text, d.refobjid::text, "
    "d.refobjid::pg_catalog.regclass::text FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d "
    "ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid "
    "AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> r.ev_class "
    "WHERE r.ev_class >= 16384 AND r.ev_type = '1'")

Row = Sequence[str | None]


def split_regclass(text: str) -> tuple[str | None, str]:
    """``schema.name`` as ``regclass`` prints it (quote_ident's quoting) -> (schema, name); a bare
    name has schema None."""
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


class ViewLookup:
    """One session's two questions to the catalog. ``guarded(schema, name)``: a rule of the
    session's scope names that relation (None: every view counts, as when a rule masks a column
    by its name alone, whatever relation it is in)."""

    query = DEPENDENCIES_QUERY

    def __init__(self, guarded: Callable[[str, str], bool] | None):
        self.guarded = guarded
        self.names: dict[str, tuple[str | None, str]] = {}  # oid -> (schema, name) of the views to read

    def definitions_query(self, rows: Iterable[Row]) -> str | None:
        """From :data:`DEPENDENCIES_QUERY`'s rows, the query for the definitions of the views that
        reach a guarded relation, or None: no view does."""
        depends: dict[str, set[str]] = {}
        names: dict[str, tuple[str | None, str]] = {}
        for row in rows:
            if len(row) != 4 or None in row:
                raise ValueError("unexpected row from the catalog's view dependencies")
            view, vname, ref, rname = row  # type: ignore[misc]
            names[view] = split_regclass(vname)  # type: ignore[arg-type]
            names.setdefault(ref, split_regclass(rname))  # type: ignore[arg-type]
            depends.setdefault(view, set()).add(ref)  # type: ignore[arg-type]
        reaches: dict[str, bool] = {}

        def guarded(oid: str) -> bool:
            if self.guarded is None:
                return False
            schema, name = names[oid]
            # A bare name is pg_catalog's or the session's temporary one.
            return any(self.guarded(s, name) for s in ((schema,) if schema else ("pg_catalog", "pg_temp")))

        def reach(oid: str, path: frozenset[str]) -> bool:
            if oid in reaches:
                return reaches[oid]
            found = (self.guarded is None and oid in depends) or guarded(oid)
            for ref in depends.get(oid, ()):
                if ref not in path and reach(ref, path | {oid}):
                    found = True
            reaches[oid] = found
            return found

        self.names = {oid: names[oid] for oid in depends if reach(oid, frozenset())}
        if not self.names:
            return None
        oids = ", ".join(str(int(oid)) for oid in sorted(self.names, key=int))
        return _QUALIFIED.format("SELECT c.oid::text, pg_catalog.pg_get_viewdef(c.oid) "
                                 f"FROM pg_catalog.pg_class c WHERE c.oid IN ({oids})")

    def definitions(self, rows: Iterable[Row]) -> dict[tuple[str | None, str], str | None]:
        """(schema, name) -> the view's query, from :meth:`definitions_query`'s rows. A view asked
        for and not answered (dropped in between) maps to None: decided as unreadable."""
        found: dict[tuple[str | None, str], str | None] = {name: None for name in self.names.values()}
        for row in rows:
            if len(row) != 2 or row[0] not in self.names:
                raise ValueError("unexpected row from the catalog's view definitions")
            found[self.names[row[0]]] = row[1]  # type: ignore[index]
        return found


def views_key(definitions: Mapping[tuple[str, str], str | None]) -> str:
    """What decisions over these views are cached under (sessions seeing the same views share):
    a digest, so the verdict caches' keys stay short."""
    text = json.dumps(sorted([k[0] or "", k[1], v or ""] for k, v in definitions.items()))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() if definitions else ""
