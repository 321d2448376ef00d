"""The audit record's compiled validator (analytics/_schema.pyx) against its reference, the
straight-line Python ``analytics.schema._compile_normalizer`` generates: for any record, the same
row (value for value, type for type) or the same AuditRecordError naming the same field.

The compiled module is imported directly: a missing one is a failure (the install builds it),
and it is tested even when ``BOTWARDEN_PURE_PYTHON=1`` makes producers use the reference.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
import os
import zoneinfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytics import schema
from analytics import _schema as compiled  # noqa: F401 - the build must have made it
from analytics.errors import AuditRecordError
from tests.daemon_fixtures import python_words

FORCED_PURE = os.environ.get("BOTWARDEN_PURE_PYTHON", "") not in ("", "0")
HYPO = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UTC = dt.timezone.utc


class Subclass(str):
    pass


class DateTimeSub(dt.datetime):
    pass


def _both(kind: schema.Kind):
    reference = schema._compile_normalizer(kind)
    return schema.compiled_normalizer(kind, reference, compiled), reference


SURROGATES = st.sampled_from(["\ud800", "ok\udfffok", "é\udc80"])   # lone surrogates: not UTF-8

# Every type a field may meet: the right ones (ASCII and not, the edges of int64, NaN, UTC and
# other zones, before the epoch), and the wrong ones (bool for int, int for float, naive times,
# subclasses, lone surrogates, mappings and sequences of the wrong things).
ANY = st.one_of(
    st.none(),
    st.text(max_size=12),                                    # non-ASCII
    SURROGATES,
    st.text(st.characters(max_codepoint=127), max_size=12),
    st.text(max_size=8).map(Subclass),
    st.integers(-(2**64), 2**64),
    st.sampled_from([-(2**63), 2**63 - 1, 2**63, -(2**63) - 1]),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
                 timezones=st.sampled_from([UTC, None, dt.timezone(dt.timedelta(hours=-5)),
                                            zoneinfo.ZoneInfo("Europe/Paris")])),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: DateTimeSub.combine(d.date(), d.timetz())),
    st.binary(max_size=8),
    st.binary(max_size=8).map(bytearray),
    st.lists(st.one_of(st.none(), st.text(max_size=6), st.integers(), SURROGATES, st.text(max_size=6).map(Subclass)),
             max_size=4),
    st.lists(st.text(max_size=6), max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=3)), max_size=3),
)


@st.composite
def records(draw):
    kind = draw(st.sampled_from([k for name, k in schema.KINDS.items()]))
    record = {}
    for f in kind.fields:
        if draw(st.booleans()):   # a right value for the field, or anything at all
            record[f.name] = draw(_right(f.type, f.choices))
        elif draw(st.integers(0, 3)):
            record[f.name] = draw(ANY)
    if draw(st.integers(0, 9)) == 0:
        record["not_a_field"] = 1
    return kind, record


def _right(t: str, choices):
    if choices:
        return st.sampled_from(sorted(choices))
    return {
        "str": st.text(st.characters(max_codepoint=127), max_size=20),
        "int": st.integers(-(2**63), 2**63 - 1),
        "ts": st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=st.just(UTC)),
        "float": st.floats(allow_nan=True, allow_infinity=True),
        "bool": st.booleans(),
        "bytes": st.binary(max_size=16),
        "str_list": st.lists(st.one_of(st.none(), st.text(max_size=8)), max_size=4),
        "count_map": st.dictionaries(st.text(max_size=6), st.integers(0, 100), max_size=3),
    }[t]


def _outcome(fn, record):
    try:
        return "row", fn(record)
    except AuditRecordError as e:
        return "error", str(e)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a.items()) == list(b.items())
    return a == b


@HYPO
@given(records())
def test_the_compiled_validator_gives_the_references_row_or_error(kind_record):
    kind, record = kind_record
    fast, reference = _both(kind)
    got, want = _outcome(fast, record), _outcome(reference, record)
    assert got[0] == want[0], (got, want)
    assert _same(got[1], want[1]), (got, want)


@pytest.mark.parametrize("when", [
    dt.datetime(1, 1, 1, tzinfo=UTC), dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    dt.datetime(1970, 1, 1, tzinfo=UTC), dt.datetime(2000, 2, 29, 12, 0, 0, 1, tzinfo=UTC),
    dt.datetime(2100, 3, 1, tzinfo=UTC), dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
])
def test_times_in_utc_become_the_same_microseconds(when):
    fast, reference = _both(schema.KINDS["session_end"])
    record = {"session_id": "s", "ts": when}
    assert fast(record) == reference(record)
    assert fast(record)[schema.KINDS["session_end"].names.index("ts")] == schema.to_epoch_us(when)


def test_a_mapping_that_is_not_a_dict_and_a_missing_field_go_to_the_reference():
    kind = schema.KINDS["session_end"]
    fast, reference = _both(kind)
    record = collections.OrderedDict(session_id="s", ts=dt.datetime.now(UTC))
    assert fast(record) == reference(record)
    with pytest.raises(AuditRecordError, match=r"session_end\.session_id: required field is missing"):
        fast({"ts": dt.datetime.now(UTC)})
    with pytest.raises(AuditRecordError, match=r"request\.decision: must be one of"):
        _both(schema.KINDS["request"])[0]({"request_id": "r", "session_id": "s", "ts": dt.datetime.now(UTC),
                                           "protocol": "postgresql", "decision": "maybe"})


def test_producers_use_what_the_environment_asks_for():
    assert schema.COMPILED is not FORCED_PURE
    schema.normalize(schema.KINDS["request"], {"request_id": "r", "session_id": "s", "ts": dt.datetime.now(UTC),
                                               "protocol": "postgresql"})
    assert isinstance(schema._NORMALIZERS["request"], compiled.Normalizer) is not FORCED_PURE


def test_pure_python_is_forced_by_the_environment_variable():
    probe = ("import datetime as d; from analytics import schema as s;"
             "s.normalize(s.KINDS['session_end'], {'session_id': 'x', 'ts': d.datetime.now(d.timezone.utc)});"
             "print(s.COMPILED, type(s._NORMALIZERS['session_end']).__name__)")
    for value, expected in (("1", "False function"), ("", "True Normalizer"), ("0", "True Normalizer")):
        assert " ".join(python_words(probe, BOTWARDEN_PURE_PYTHON=value)) == expected, value


@HYPO
@given(st.one_of(st.lists(st.one_of(st.none(), st.text(max_size=6), SURROGATES, st.integers(),
                                    st.text(max_size=4).map(Subclass)), max_size=4),
                 st.tuples(st.text(max_size=4), SURROGATES), st.text(max_size=6), SURROGATES),
       st.one_of(st.text(max_size=8), SURROGATES))
def test_a_requests_bound_values_and_text_are_checked_as_the_reference_does(params, text):
    # The fields every statement fills: the bound values (a list of str) and the text.
    fast, reference = _both(schema.KINDS["request"])
    record = {"request_id": "r", "session_id": "s", "ts": dt.datetime.now(UTC), "protocol": "postgresql",
              "text": text, "params": params}
    got, want = _outcome(fast, record), _outcome(reference, record)
    assert got[0] == want[0] and _same(got[1], want[1]), (got, want)
