"""Views made before the session: a read of one is a read of what its query reads.

A view (or a materialized view) that botwarden did not see created selects from relations under
a name of its own: ``CREATE VIEW contacts AS SELECT id, email AS contact FROM accounts``, made by
an administrator last year, would let a bot read ``accounts.email`` past a rule that masks or
refuses it by reading ``contacts``. At login the PostgreSQL front asks the target's catalog
(on the bot's own session, before its first statement):

1. :data:`DEPENDENCIES_QUERY`: every view and materialized view outside the system schemas, with
   the relations its query depends on (``pg_depend`` of its ``_RETURN`` rule);
2. :meth:`ViewLookup.definitions_query`: for the views that reach, directly or through other
   views, a relation a rule of the session's scope names, their queries (``pg_get_viewdef``).

The engine then decides a statement reading such a view as reading what the view's query
reads, its result columns computed from the view's (:func:`appliance.policy.sql.resolve_views`),
so masking, refusals and the writes masking cannot follow see through it. Only relation
dependencies are looked at: a view over a function that reads a masked table is one of the
function bodies botwarden does not read (docs/policy.md).
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable, Mapping, Sequence

# (view oid, view schema, view name, relation oid, relation schema, relation name), one row per
# relation a view's query depends on. pg_depend records those of the view's rewrite rule; a
# view's own rule depends on the view itself too (left out).
DEPENDENCIES_QUERY = (
    "SELECT DISTINCT v.oid::text, vn.nspname, v.relname, c.oid::text, cn.nspname, c.relname "
    "FROM pg_catalog.pg_rewrite r "
    "JOIN pg_catalog.pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm') "
    "JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace "
    "JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
    "AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid <> v.oid "
    "JOIN pg_catalog.pg_class c ON c.oid = d.refobjid "
    "JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace "
    "WHERE vn.nspname NOT IN ('pg_catalog', 'information_schema') AND vn.nspname !~ '^pg_toast'")

Row = Sequence[str | None]


class ViewLookup:
    """One session's two questions to the catalog. ``guarded(schema, name)``: a rule of the
    session's scope names that relation (None: every view counts, as when a rule masks a column
    by its name alone, whatever relation it is in)."""

    query = DEPENDENCIES_QUERY

    def __init__(self, guarded: Callable[[str, str], bool] | None):
        self.guarded = guarded
        self.names: dict[str, tuple[str, str]] = {}  # oid -> (schema, name) of the views to read

    def definitions_query(self, rows: Iterable[Row]) -> str | None:
        """From :data:`DEPENDENCIES_QUERY`'s rows, the query for the definitions of the views that
        reach a guarded relation, or None: no view does."""
        depends: dict[str, set[str]] = {}
        names: dict[str, tuple[str, str]] = {}
        for row in rows:
            if len(row) != 6 or None in row:
                raise ValueError("unexpected row from the catalog's view dependencies")
            view, vschema, vname, ref, rschema, rname = row  # type: ignore[misc]
            names[view] = (vschema, vname)  # type: ignore[assignment]
            names.setdefault(ref, (rschema, rname))  # type: ignore[arg-type]
            depends.setdefault(view, set()).add(ref)  # type: ignore[arg-type]
        reaches: dict[str, bool] = {}

        def reach(oid: str, path: frozenset[str]) -> bool:
            if oid in reaches:
                return reaches[oid]
            found = self.guarded is None and oid in depends or (self.guarded is not None and self.guarded(*names[oid]))
            for ref in depends.get(oid, ()):
                if ref not in path and reach(ref, path | {oid}):
                    found = True
            reaches[oid] = found
            return found

        self.names = {oid: names[oid] for oid in depends if reach(oid, frozenset())}
        if not self.names:
            return None
        oids = ", ".join(str(int(oid)) for oid in sorted(self.names, key=int))
        return ("SELECT c.oid::text, pg_catalog.pg_get_viewdef(c.oid) FROM pg_catalog.pg_class c "
                f"WHERE c.oid IN ({oids})")

    def definitions(self, rows: Iterable[Row]) -> dict[tuple[str, str], str | None]:
        """(schema, name) -> the view's query, from :meth:`definitions_query`'s rows. A view asked
        for and not answered (dropped in between) maps to None: decided as unreadable."""
        found: dict[tuple[str, str], str | None] = {name: None for name in self.names.values()}
        for row in rows:
            if len(row) != 2 or row[0] not in self.names:
                raise ValueError("unexpected row from the catalog's view definitions")
            found[self.names[row[0]]] = row[1]  # type: ignore[index]
        return found


def views_key(definitions: Mapping[tuple[str, str], str | None]) -> str:
    """What decisions over these views are cached under (sessions seeing the same views share):
    a digest, so the verdict caches' keys stay short."""
    text = json.dumps(sorted([list(k), v] for k, v in definitions.items()))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() if definitions else ""
