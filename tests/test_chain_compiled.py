"""The audit writer's compiled row hash (analytics/_chain.pyx) against its pure-Python reference
(analytics.chain) and against what ``audit verify`` recomputes, byte for byte.

The compiled module is imported directly: a missing one is a failure (the install builds it),
and it is tested even when ``BOTWARDEN_PURE_PYTHON=1`` makes the writer use the reference.
"""

from __future__ import annotations

import math
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytics import chain, schema
from analytics import _chain as compiled  # noqa: F401 - the build must have made it
from analytics.chain import GENESIS, canonical, reference_row_hasher, row_hash, row_plan
from analytics.verify import verify
from tests.daemon_fixtures import python_words

FORCED_PURE = os.environ.get("BOTWARDEN_PURE_PYTHON", "") not in ("", "0")
HYPO = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT64 = st.integers(-(2**63), 2**63 - 1)
# Valid UTF-8 only (normalize refuses a lone surrogate); every other character, escapes included.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
VALUES = {
    "str": TEXT,
    "int": INT64,
    "ts": INT64,
    "float": st.floats(allow_nan=True, allow_infinity=True),
    "bool": st.booleans(),
    "bytes": st.binary(max_size=64),
    "str_list": st.lists(st.one_of(st.none(), TEXT), max_size=5),
    "count_map": st.dictionaries(TEXT, INT64, max_size=4).map(lambda d: dict(sorted(d.items()))),
}


def compiled_hasher(kind: schema.Kind):
    return compiled.RowHasher(row_plan(kind.names, [f.type for f in kind.fields]), kind.hash_prefix,
                              reference_row_hasher(kind.names, kind.bytes_columns, kind.hash_prefix)).hash


@st.composite
def kind_and_row(draw):
    kind = draw(st.sampled_from(list(schema.KINDS.values())))
    row = tuple(draw(st.one_of(st.none(), VALUES[f.type])) for f in kind.fields)
    return kind, row


@HYPO
@given(kind_and_row(), st.binary(min_size=32, max_size=32))
def test_the_compiled_hash_is_the_reference_and_what_verify_recomputes(kind_row, prev):
    kind, row = kind_row
    got = compiled_hasher(kind)(prev, row)
    assert got == reference_row_hasher(kind.names, kind.bytes_columns, kind.hash_prefix)(prev, row)
    assert got == row_hash(prev, kind.table, canonical(kind.names, row, frozenset(kind.bytes_columns)))


ODD = st.one_of(st.integers(-(2**70), 2**70), st.booleans(), st.floats(), TEXT, st.binary(max_size=4),
                st.lists(st.one_of(st.integers(), TEXT), max_size=3),
                st.dictionaries(TEXT, st.one_of(st.integers(-(2**70), 2**70), TEXT), max_size=3))


@HYPO
@given(kind_and_row(), st.data())
def test_a_value_of_an_unexpected_type_is_hashed_as_the_reference_does(kind_row, data):
    # normalize never produces these, but a row the writer is handed must never hash differently
    # from the reference: the compiled hasher hands such a row to it.
    kind, row = kind_row
    i = data.draw(st.integers(0, len(row) - 1))
    odd = list(row)
    odd[i] = data.draw(ODD)
    odd = tuple(odd)
    reference = reference_row_hasher(kind.names, kind.bytes_columns, kind.hash_prefix)
    try:
        expected = reference(GENESIS, odd)
    except (TypeError, ValueError, AttributeError) as e:
        expected = type(e)
    try:
        got = compiled_hasher(kind)(GENESIS, odd)
    except (TypeError, ValueError, AttributeError) as e:
        got = type(e)
    assert got == expected


def test_rows_that_are_not_tuples_or_have_the_wrong_length_go_to_the_reference():
    kind = schema.KINDS["request"]
    row = tuple("x" if f.type == "str" else None for f in kind.fields)
    h = compiled_hasher(kind)
    reference = reference_row_hasher(kind.names, kind.bytes_columns, kind.hash_prefix)
    assert h(GENESIS, list(row)) == reference(GENESIS, list(row)) == h(GENESIS, row)
    assert h(bytearray(GENESIS), row) == reference(bytearray(GENESIS), row)
    short = row[:-1]
    try:
        expected = reference(GENESIS, short)
    except IndexError:
        expected = IndexError
    try:
        got = h(GENESIS, short)
    except IndexError:
        got = IndexError
    assert got == expected


def test_the_writer_uses_what_the_environment_asks_for():
    assert chain.COMPILED is not FORCED_PURE
    assert isinstance(getattr(schema.KINDS["request"].hash_row, "__self__", None), compiled.RowHasher) is not FORCED_PURE
    probe = ("import analytics.chain as c, analytics.schema as s, analytics._chain as k;"
             "print(c.COMPILED, isinstance(getattr(s.KINDS['request'].hash_row, '__self__', None), k.RowHasher))")
    for value, expected in (("1", "False False"), ("", "True True"), ("0", "True True")):
        out = python_words(probe, BOTWARDEN_PURE_PYTHON=value)
        assert " ".join(out) == expected, (value, out)


def test_a_store_written_with_the_compiled_hash_verifies_and_an_edit_is_found(tmp_path):
    import duckdb

    from analytics import AuditStore

    path = tmp_path / "audit.duckdb"
    req, rec = schema.KINDS["request"], schema.KINDS["recording"]
    rows = []
    for i, text in enumerate(["SELECT 1", 'SELECT "ünïcödé" \\ \n\t\x00\x7f \U0001F600', ""]):
        rows.append((req, schema.normalize(req, {
            "request_id": f"r{i}", "session_id": "s", "ts": schema.from_epoch_us(1_700_000_000_000_000 + i),
            "protocol": "postgresql", "text": text, "params": ["a", None, "é"], "duration_ms": [0.1, math.inf, 1e300][i],
            "masked": {"z": 1, "a": -(2**63)}, "rows": 2**63 - 1, "seq": i + 1})[0]))
        rows.append((rec, schema.normalize(rec, {"session_id": "s", "seq": i + 1, "ts": schema.from_epoch_us(i),
                                                 "direction": "in", "data": bytes(range(256)) * (i + 1)})[0]))
    with AuditStore(path) as store:
        for spec, row in rows:
            assert store.submit_row(spec, row)
        store.flush()
    report = verify(path)
    assert report.clean, report.text()
    assert report.rows_checked >= len(rows)
    con = duckdb.connect(str(path))
    try:
        con.execute("UPDATE requests SET text = 'SELECT 2' WHERE request_id = 'r0'")
    finally:
        con.close()
    report = verify(path)
    assert not report.ok
    assert [p.kind for p in report.problems if p.table == "requests"] == ["modified"]
