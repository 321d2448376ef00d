"""The compiled hot paths (appliance/hotpath/_compiled.pyx) against their pure-Python reference
(appliance/hotpath/reference.py), byte for byte, and the switch between them.

Both implementations are imported directly, so every run of the suite tests both, whichever one
the rest of the suite uses (``BOTWARDEN_PURE_PYTHON=1`` makes it the reference).
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import hotpath
from appliance.hotpath import reference
from appliance.protocols.postgres.errors import RemoteProtocolError
from tests.daemon_fixtures import python_words

FORCED_PURE = os.environ.get("BOTWARDEN_PURE_PYTHON", "") not in ("", "0")

# The install (vagrant/provision.sh, pip) builds the extension: a missing one is a failure here,
# not a skip, or a broken build would only show as a slower relay. Imported directly, it is
# tested even while BOTWARDEN_PURE_PYTHON=1 makes the rest of the suite use the reference.
from appliance.hotpath import _compiled as compiled  # noqa: E402

values_st = st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=12)
HYPO = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(fn, *args):
    """The result, or the declared error type (messages may differ; the type may not)."""
    try:
        return ("ok", fn(*args))
    except RemoteProtocolError:
        return ("error", RemoteProtocolError)


def message(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


@HYPO
@given(values_st)
def test_encode_row_agrees(values):
    assert compiled.encode_row(values) == reference.encode_row(values)
    assert compiled.encode_row(tuple(values)) == reference.encode_row(tuple(values))


@HYPO
@given(values_st, st.binary(max_size=8), st.binary(max_size=8), st.sampled_from([bytes, bytearray]))
def test_row_values_agrees_on_rows_in_a_buffer(values, before, after, kind):
    row = reference.encode_row(values)
    buf = kind(before + row + after)
    s, e = len(before), len(before) + len(row)
    got = outcome(compiled.row_values, buf, s, e)
    assert got == outcome(reference.row_values, buf, s, e) == ("ok", values)


@HYPO
@given(st.binary(max_size=60), st.data())
def test_row_values_agrees_on_garbage(raw, data):
    buf = b"D" + raw
    end = data.draw(st.integers(0, len(buf)))
    assert outcome(compiled.row_values, buf, 0, end) == outcome(reference.row_values, buf, 0, end)


def test_row_values_refuses_a_value_past_its_row():
    row = b"D" + struct.pack("!ihi", 4 + 2 + 4 + 1, 1, 50) + b"x"
    for impl in (compiled, reference):
        with pytest.raises(RemoteProtocolError):
            impl.row_values(row + b"y" * 60, 0, len(row))


text_st = st.one_of(st.text(max_size=40), st.text(alphabet="abcXYZ019-@. _", max_size=40),
                    st.from_regex(r"[a-z0-9.]{1,12}@[a-z]{1,8}\.com", fullmatch=True))


@HYPO
@given(text_st, st.integers(-1, 8))
def test_partial_utf8_agrees(text, keep):
    raw = text.encode("utf-8")
    assert compiled.partial_utf8(raw, keep) == reference.partial_utf8(raw, keep)
    assert reference.partial_utf8(raw, keep) == reference.partial(text, keep).encode("utf-8")


@HYPO
@given(st.binary(max_size=30), st.integers(0, 6))
def test_partial_utf8_agrees_on_any_bytes(raw, keep):
    # invalid UTF-8 is withheld (None) by both
    assert compiled.partial_utf8(raw, keep) == reference.partial_utf8(raw, keep)


frames_st = st.lists(st.tuples(st.sampled_from(b"DTCZEHdcn"), st.binary(max_size=20)), max_size=10)


@HYPO
@given(frames_st, st.binary(max_size=8), st.sets(st.sampled_from(b"DTCZEHdcn")), st.integers(0, 64),
       st.sampled_from([bytes, bytearray]))
def test_skip_unhandled_agrees(frames, tail, handled, max_size, kind):
    handlers = [None] * 256
    for t in handled:
        handlers[t] = len
    buf = kind(b"".join(message(bytes([t]), body) for t, body in frames) + tail)
    for pos in range(0, min(len(buf), 12)):
        assert (compiled.skip_unhandled(handlers, buf, pos, max_size)
                == reference.skip_unhandled(handlers, buf, pos, max_size))


def test_skip_unhandled_stops_where_the_relay_must_look():
    handlers = [None] * 256
    handlers[ord("C")] = len
    rows = message(b"D", b"\x00\x01\x00\x00\x00\x01x") * 3
    buf = rows + message(b"C", b"SELECT 3\x00") + b"Z\x00\x00"
    for impl in (compiled, reference):
        assert impl.skip_unhandled(handlers, buf, 0, 1 << 30) == len(rows)            # a handled message
        assert impl.skip_unhandled(handlers, buf[:len(rows) - 2], 0, 1 << 30) == len(rows) - 12  # incomplete
        bad = rows + b"D\x00\x00\x00\x02"
        assert impl.skip_unhandled(handlers, bad, 0, 1 << 30) == len(rows)            # a bad length
        assert impl.skip_unhandled(handlers, rows, 0, 8) == 0                         # over max_size


def test_the_suite_uses_what_the_environment_asks_for():
    assert hotpath.COMPILED is not FORCED_PURE
    assert (hotpath.row_values is reference.row_values) is FORCED_PURE


def test_pure_python_is_forced_by_the_environment_variable():
    probe = ("import appliance.hotpath as h, appliance.fronts.postgres.wire as w, appliance.policy.masking as m;"
             "print(h.COMPILED, w._row_values is h.reference.row_values, m.partial_utf8 is h.reference.partial_utf8)")
    for value, expected in (("1", "False True True"), ("", "True False False"), ("0", "True False False")):
        out = python_words(probe, BOTWARDEN_PURE_PYTHON=value)
        assert " ".join(out) == expected, (value, out)


def test_partial_utf8_never_writes_into_a_shared_bytes_object():
    # CPython shares one-byte bytes objects; masking one in place would change b"a" everywhere.
    for impl in (compiled, reference):
        assert impl.partial_utf8(b"a", 0) == b"*"
        assert bytes([97]) == b"a" and b"a"[0] == 97


rows_st = st.lists(st.lists(st.one_of(st.none(), st.binary(max_size=12),
                                      st.text(max_size=12).map(lambda t: t.encode("utf-8"))), max_size=5),
                   max_size=8)


@HYPO
@given(rows_st, st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=3, unique_by=lambda s: s[0]),
       st.binary(max_size=7), st.sampled_from([bytes, bytearray]))
def test_mask_rows_agrees_and_masks_each_row_as_the_plan_does(rows, steps, tail, kind):
    encoded = [reference.encode_row(r) for r in rows]
    buf = kind(b"".join(encoded) + message(b"C", b"SELECT 1\x00") + tail)
    n = len(buf)
    got_counts, ref_counts = [0] * len(steps), [0] * len(steps)
    got = compiled.mask_rows(buf, 0, n, steps, got_counts)
    ref = reference.mask_rows(buf, 0, n, steps, ref_counts)
    assert got == ref and got_counts == ref_counts
    # the same as masking row by row (what RowMasker.apply + encode_row do for partial steps)
    expected, counts = [], [0] * len(steps)
    for r in rows:
        values = list(r)
        for k, (i, keep) in enumerate(steps):
            if i < len(values) and values[i] is not None:
                new = reference.partial_utf8(values[i], keep)
                if new != values[i]:
                    values[i] = new
                    counts[k] += 1
        expected.append(reference.encode_row(values))
    assert ref[0] == sum(map(len, encoded))  # stops at the CommandComplete
    assert (ref[1] or b"".join(encoded)) == b"".join(expected) and ref_counts == counts


def _bind(values, formats=()) -> bytes:
    return message(b"B", b"\x00s1\x00" + struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
                   + struct.pack("!h", len(values))
                   + b"".join(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in values)
                   + struct.pack("!h", 0))


bind_st = st.builds(_bind, st.lists(st.one_of(st.none(), st.binary(max_size=14)), max_size=4),
                    st.lists(st.sampled_from([0, 0, 1]), max_size=3))
recorded_st = st.lists(st.one_of(bind_st, st.builds(lambda t, b: message(bytes([t]), b), st.sampled_from(b"BQESD"),
                                                    st.binary(max_size=20))), max_size=10)


@HYPO
@given(recorded_st, st.binary(max_size=8), st.integers(0, 16), st.sampled_from([bytes, bytearray]))
def test_skip_recorded_agrees(frames, tail, shortest, kind):
    stops = [None] * 256
    for t in b"QB":
        stops[t] = True
    buf = kind(b"".join(frames) + tail)
    for pos in range(0, min(len(buf), 12)):
        assert compiled.skip_recorded(stops, buf, pos, shortest) == reference.skip_recorded(stops, buf, pos, shortest)


@HYPO
@given(st.lists(st.builds(lambda t, b: message(bytes([t]), b), st.sampled_from(b"DDDddCZ"), st.binary(max_size=20)),
                max_size=12),
       st.binary(max_size=8), st.integers(-1, 200), st.sampled_from([bytes, bytearray]), st.sampled_from(b"Dd"))
def test_skip_rows_agrees(frames, tail, budget, kind, row):
    buf = kind(b"".join(frames) + tail)
    for pos in range(0, min(len(buf), 12)):
        assert compiled.skip_rows(buf, pos, budget, row) == reference.skip_rows(buf, pos, budget, row)


def test_skip_rows_keeps_a_budget_of_whole_rows_and_counts_the_rest():
    row = message(b"D", b"\x00\x01\x00\x00\x00\x03abc")          # 14 bytes
    done = message(b"C", b"SELECT 5\x00")
    buf = row * 5 + done
    for impl in (compiled, reference):
        assert impl.skip_rows(buf, 0, -1) == (5 * len(row), 5)         # every row, up to the CommandComplete
        assert impl.skip_rows(buf, 0, 2 * len(row) + 5) == (2 * len(row), 2)   # whole rows only
        assert impl.skip_rows(buf, 0, 0) == (0, 0)
        assert impl.skip_rows(buf, 5 * len(row), -1) == (5 * len(row), 0)     # not a row: nothing stepped
        assert impl.skip_rows(row * 2 + row[:7], 0, -1) == (2 * len(row), 2)  # a row still arriving stays
        copy = message(b"d", b"1\tabc\n")
        assert impl.skip_rows(copy * 3 + done, 0, -1, 0x64) == (3 * len(copy), 3)   # a COPY's rows
        assert impl.skip_rows(copy * 3, 0, -1) == (0, 0)


def test_skip_recorded_steps_over_binds_of_short_text_values_only():
    stops = [None] * 256
    for t in b"QB":
        stops[t] = True
    run = (_bind([b"12345", None]) + message(b"E", b"\x00\x00\x00\x00\x00") + message(b"S", b"")) * 3
    for impl in (compiled, reference):
        assert impl.skip_recorded(stops, run, 0, 10) == len(run)
        assert impl.skip_recorded(stops, run, 0, 0) == 0                       # 0: no Bind stepped over
        for stop in (_bind([b"4111111111111111"]),                              # a value a detector may flag
                     _bind([b"1"], [1]),                                        # a binary value (never kept)
                     _bind([b"1", b"2"], [0, 1]),
                     message(b"Q", b"SELECT 1\x00"),                            # a statement: the caller reads it
                     message(b"B", b"\x00s1\x00\x00"),                          # a Bind it cannot read
                     message(b"B", b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x0912")):  # a value past its end
            buf = run + stop + run
            assert impl.skip_recorded(stops, buf, 0, 10) == len(run)
