"""Masking: content detectors (true positives and look-alikes), strategies, and mask plans."""

from __future__ import annotations

import base64
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import parse_config
from appliance.errors import ConfigError
from appliance.policy import ColumnDesc, PolicyEngine, PolicyError
from appliance.policy.masking import (DETECTOR_FUNCTIONS, ColumnAction, DetectorSettings, RowMasker, Strategy, find,
                                      format_preserving, iban_ok, luhn_ok, partial, shannon_entropy, ssn_ok)

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1c\n-----END RSA PRIVATE KEY-----"

POSITIVES = [
    ("email", "contact alice@example.com now", "alice@example.com"),
    ("email", "bob.smith+tag@mail.co.uk", "bob.smith+tag@mail.co.uk"),
    ("card", "card 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
    ("card", "4111-1111-1111-1111", "4111-1111-1111-1111"),
    ("card", "5500005555555559", "5500005555555559"),
    ("card", "amex 378282246310005", "378282246310005"),
    ("iban", "pay to DE89 3704 0044 0532 0130 00 today", "DE89 3704 0044 0532 0130 00"),
    ("iban", "GB82WEST12345698765432", "GB82WEST12345698765432"),
    ("iban", "FR1420041010050500013M02606", "FR1420041010050500013M02606"),
    ("phone", "call +1 415 555 2671", "+1 415 555 2671"),
    ("phone", "+49 30 1234567", "+49 30 1234567"),
    ("phone", "(415) 555-2671", "(415) 555-2671"),
    ("phone", "415-555-2671", "415-555-2671"),
    ("ssn", "ssn 123-45-6789.", "123-45-6789"),
    ("ssn", "078-05-1120", "078-05-1120"),
    ("aws_key", "key=AKIAIOSFODNN7EXAMPLE;", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_key", "ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
    ("private_key", f"x {PEM} y", PEM),
    ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----",
     "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----"),
    ("jwt", f"Bearer {JWT}", JWT),
    ("secret", "token=Zx8kP2mQ9vR4tY7wB1nC5dF3gH6jK0lA", "Zx8kP2mQ9vR4tY7wB1nC5dF3gH6jK0lA"),
    ("secret", "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    # A path's segments are judged one by one: a token that is one of them is flagged...
    ("secret", "cat /run/keys/Zx8kP2mQ9vR4tY7wB1nC5dF3gH6jK0lA", "Zx8kP2mQ9vR4tY7wB1nC5dF3gH6jK0lA"),
    ("secret", "/var/lib/Zx8kP2mQ9vR4tY7wB1nC5dF3gH6jK0lA/x", "Zx8kP2mQ9vR4tY7wB1nC5dF3gH6jK0lA"),
    # ...and a base64 secret with slashes in it, its pieces each too short, is judged joined.
    ("secret", "echo x > /tmp/Zx8kP2mQ9v/R4tY7wB1nC5d/F3gH6jK0lA", "Zx8kP2mQ9v/R4tY7wB1nC5d/F3gH6jK0lA"),
    ("secret", "cp key /run/secrets/pYVElU//0aeuMqH8fUlCrTNpol3U05kkEgXkVPqQ/x", "pYVElU//0aeuMqH8fUlCrTNpol3U05kkEgXkVPqQ"),
    # ...and a token after the path (a query string), or one that only looks like it starts
    # a path, is judged whole, its slashes included.
    ("secret", "curl /tmp/x?key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("secret", "ab/tmp/wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "ab/tmp/wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("secret", "/tmp/a+wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "/tmp/a+wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("secret", "/tmpwJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "/tmpwJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    # The shortest value each length-guarded detector flags, alone (the guards skip shorter text).
    ("card", "4222222222222", "4222222222222"),             # 13 digits
    ("iban", "NO9386011117947", "NO9386011117947"),         # 15 characters, the shortest IBAN
    ("phone", "+4912345678", "+4912345678"),                # 10 digits
    ("ssn", "123-45-6789", "123-45-6789"),                  # 11 characters
    ("aws_key", "AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),  # 20 characters
]

NEGATIVES = [
    ("email", "user@localhost"), ("email", "a@b"), ("email", "foo@bar.c"), ("email", "not an @ email"),
    ("email", "@handle on twitter"),
    ("card", "4111111111111112"),  # Luhn fails
    ("card", "0000000000000000"),  # one repeated digit
    ("card", "1234567812345670"),  # Luhn ok, but no card network starts with 1
    ("card", "order 12345"), ("card", "2024-01-15"),
    ("iban", "DE89 3704 0044 0532 0130 01"),  # checksum fails
    ("iban", "DE12 3456"), ("iban", "DE8937040044053201300"),  # wrong length for DE
    ("phone", "2024-01-15"), ("phone", "192.168.1.1"), ("phone", "v1.2.3"), ("phone", "12345"),
    ("ssn", "000-12-3456"), ("ssn", "666-12-3456"), ("ssn", "900-12-3456"), ("ssn", "123-00-4567"),
    ("ssn", "123-45-0000"), ("ssn", "1234-56-789"), ("ssn", "123456789"),
    ("aws_key", "akiaiosfodnn7example"), ("aws_key", "AKIAIOSFODNN7EXAMPL"), ("aws_key", "XKIAIOSFODNN7EXAMPLE"),
    ("aws_key", "AKIAIOSFODNN7EXAMPLE1"),
    ("private_key", "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----"),
    ("private_key", "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----"),
    ("private_key", "-----BEGIN RSA PRIVATE KEY----- (truncated"),
    ("jwt", "eyJhbGciOi.eyJzdWIi.x"),
    ("jwt", "eyJub3QiOiJqd3QifQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc"),  # header without "alg"
    ("secret", "internationalization"), ("secret", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("secret", "550e8400-e29b-41d4-a716-446655440000"),  # a UUID
    ("secret", "d41d8cd98f00b204e9800998ecf8427e"),  # hex digest: 4 bits/char at most
    ("secret", "/usr/local/lib/python3.11/site-packages"),
    # Temporary directories' random names: the whole path has over 4 bits per character, no
    # segment can (fewer than 16 distinct characters).
    ("secret", "echo 12 >> /tmp/bw-ssh-crash-k2j8x_q1/ran"),
    ("secret", "/tmp/pytest-of-root/pytest-3/test_a_killed_daemon0/ran"),
    ("secret", "cat /home/bot/.cache/AbCdEf123456/Xy9z-Qw7R"),
    # CamelCase names joined are not random (of 400,000 paths on this machine, 3 more were
    # flagged than before the joined judgement, two of them hex digests).
    ("secret", "ls /usr/include/llvm-14/llvm/DebugInfo/CodeView/TypeDumpVisitor.h"),
    ("secret", "cat /usr/lib/google-cloud-sdk/lib/googlecloudsdk/schemas/gkeonprem/v1/BareMetalLoadBalancerNodePoolConfig.yaml"),
    ("secret", "ls /home/JohnSmith/Downloads/Invoice2024/Receipts"),
    ("secret", "The quick brown fox jumps over the lazy dog"),
]


@pytest.mark.parametrize("detector,text,expected", POSITIVES)
def test_detector_true_positive(detector: str, text: str, expected: str) -> None:
    spans = find(detector, text)
    assert [text[a:b] for a, b in spans] == [expected]


@pytest.mark.parametrize("detector,text", NEGATIVES)
def test_detector_look_alike_is_left_alone(detector: str, text: str) -> None:
    assert find(detector, text) == []


def test_base64_secrets_with_slashes_written_as_paths_are_masked() -> None:
    """300 random base64 secrets (21 to 40 bytes, with "/" and without "+") each written as a path
    under /tmp: every piece of each was under 20 characters for the detector, which judged a
    path's segments one by one; runs of segments are judged joined now (4 of these 300 keep an
    unmasked stretch of 8 or more characters: chance runs that look like words)."""
    rng = random.Random(20261207)
    found: list[str] = []
    while len(found) < 300:
        secret = base64.b64encode(rng.randbytes(rng.choice([21, 24, 30, 33, 40]))).decode().rstrip("=")
        if "/" in secret and "+" not in secret:
            found.append(secret)
    left = []
    for secret in found:
        text = f"cat /tmp/{secret} > /dev/null"
        covered = {i for a, b in find("secret", text) for i in range(a, b)}
        start, stretch, longest = text.index(secret), 0, 0
        for i in range(start, start + len(secret)):
            stretch = 0 if i in covered else stretch + 1
            longest = max(longest, stretch)
        if longest >= 8:
            left.append(secret)
    assert len(left) <= 9, left


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert ssn_ok("123", "45", "6789") and not ssn_ok("666", "45", "6789") and not ssn_ok("987", "65", "4321")
    assert shannon_entropy("aaaa") == 0.0 and shannon_entropy("abcd") == 2.0


# --- strategies ------------------------------------------------------------------------------------


def test_partial_keeps_last_n_and_separators() -> None:
    assert partial("4111-1111-1111-1234", 4) == "****-****-****-1234"
    assert partial("alice@example.com", 4) == "*****@******e.com"
    assert partial("abc", 4) == "***"  # never reveal a value shorter than what is kept
    assert partial("", 4) == "********"


def test_format_preserving_keeps_shape_and_is_keyed() -> None:
    out = format_preserving("AB-12 cd/9", b"salt-one")
    assert len(out) == len("AB-12 cd/9")
    assert out[2] == "-" and out[5] == " " and out[8] == "/"
    assert out[0:2].isupper() and out[3:5].isdigit() and out[6:8].islower() and out[9].isdigit()
    assert out == format_preserving("AB-12 cd/9", b"salt-one")  # deterministic: joins still work
    assert out != format_preserving("AB-12 cd/9", b"salt-two")  # but keyed by the deployment salt
    assert format_preserving("123-45-6789", b"k") != "123-45-6789"


def test_hash_is_salted_and_stable() -> None:
    a = Strategy("hash", salt=b"one")("alice@example.com")
    assert a == Strategy("hash", salt=b"one")("alice@example.com")
    assert a != Strategy("hash", salt=b"two")("alice@example.com")
    assert a.startswith("h:") and "alice" not in a
    assert Strategy("null")("x") is None
    assert Strategy("full")("secret-value") == "********"


# --- plans through the engine ------------------------------------------------------------------------

CONFIG = """
[[targets]]
name = "db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"

[[identities]]
name = "bot"
[identities.process]
uid = 1000

[[rules]]
name = "pii"
action = "mask"
[rules.sql]
reads = ["public.customers", "public.people"]
[[rules.mask]]
columns = ["customers.email"]
strategy = "partial"
keep = 4
[[rules.mask]]
columns = ["*.ssn"]
strategy = "null"
[[rules.mask]]
columns = ["card_*"]
strategy = "format"
[[rules.mask]]
columns = ["notes"]
detectors = ["email", "card"]
strategy = "hash"

[[rules]]
name = "secrets-everywhere"
action = "mask"
[[rules.mask]]
detectors = ["aws_key", "private_key"]
strategy = "full"
"""

TEXT, VARCHAR, INT4, JSONB, JSON_, BYTEA = 25, 1043, 23, 3802, 114, 17


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    cfg = parse_config(CONFIG)
    return PolicyEngine(cfg.policy, cfg.targets, cfg.identities, salt=b"0123456789abcdef")


def _plan(engine: PolicyEngine, sql: str, columns: list[ColumnDesc]):
    verdict = engine.decide_sql("bot", (), "db", sql)
    return verdict, engine.mask_plan("bot", (), "db", verdict, columns)


def test_column_rules_by_name_and_table(engine: PolicyEngine) -> None:
    cols = [ColumnDesc("id", 1, 1, INT4), ColumnDesc("email", 1, 2, TEXT), ColumnDesc("ssn", 1, 3, VARCHAR),
            ColumnDesc("card_number", 1, 4, TEXT)]
    verdict, plan = _plan(engine, "select id, email, ssn, card_number from customers where id = $1", cols)
    assert verdict.action == "mask" and verdict.rule == "pii"
    out, changed = plan.apply([b"7", b"alice@example.com", b"123-45-6789", b"4111-1111-1111-1111"])
    assert changed
    assert out[0] == b"7"
    assert out[1] == b"*****@******e.com"
    assert out[2] is None
    assert out[3] != b"4111-1111-1111-1111" and len(out[3]) == 19 and out[3][4:5] == b"-"
    assert plan.counts == {"email": 1, "ssn": 1, "card_number": 1}
    plan.apply([b"8", None, b"x", b"1"])  # NULL stays NULL and is not counted
    assert plan.counts == {"email": 1, "ssn": 2, "card_number": 2}


def test_table_qualified_column_rule_needs_that_table(engine: PolicyEngine) -> None:
    # "customers.email" does not apply to people.email; "*.ssn" does.
    cols = [ColumnDesc("email", 2, 1, TEXT), ColumnDesc("ssn", 2, 2, TEXT)]
    _, plan = _plan(engine, "select email, ssn from people", cols)
    out, _ = plan.apply([b"bob@example.com", b"123-45-6789"])
    assert out == [b"bob@example.com", None]


def test_alias_and_expression_do_not_escape_column_rules(engine: PolicyEngine) -> None:
    cols = [ColumnDesc("contact", 0, 0, TEXT), ColumnDesc("lower", 0, 0, TEXT), ColumnDesc("x", 0, 0, TEXT)]
    _, plan = _plan(engine, "select email as contact, lower(email), y.x from (select email as x from customers) y", cols)
    out, _ = plan.apply([b"alice@example.com", b"alice@example.com", b"alice@example.com"])
    assert out == [b"*****@******e.com"] * 3


def test_whole_row_reference_is_masked(engine: PolicyEngine) -> None:
    cols = [ColumnDesc("c", 0, 0, TEXT), ColumnDesc("row_to_json", 0, 0, JSON_)]
    _, plan = _plan(engine, "select c, row_to_json(c) from customers c", cols)
    out, changed = plan.apply([b'(1,alice@example.com,123-45-6789)', b'{"email":"alice@example.com"}'])
    # The row carries every column, ssn included, whose strategy is null: the strictest applies.
    assert changed and out == [None, None]


def test_whole_row_in_json_stays_valid_json() -> None:
    cfg = parse_config(CONFIG.split("[[rules.mask]]")[0] + '[[rules.mask]]\ncolumns = ["customers.email"]\n')
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    _, plan = _plan(engine, "select to_json(c) as doc from customers c", [ColumnDesc("doc", 0, 0, JSON_)])
    out, changed = plan.apply([b'{"email":"alice@example.com"}'])
    assert changed and json.loads(out[0]) == "********"


def test_detectors_inside_a_column_keep_the_rest(engine: PolicyEngine) -> None:
    cols = [ColumnDesc("notes", 1, 5, TEXT)]
    _, plan = _plan(engine, "select notes from customers", cols)
    out, changed = plan.apply([b"mail alice@example.com, card 4111 1111 1111 1111, thanks"])
    text = out[0].decode()
    assert changed and text.startswith("mail h:") and ", card h:" in text and text.endswith(", thanks")
    assert "alice" not in text and "4111" not in text


def test_content_detectors_on_every_text_column(engine: PolicyEngine) -> None:
    cols = [ColumnDesc("a", 0, 0, TEXT), ColumnDesc("n", 0, 0, INT4), ColumnDesc("j", 0, 0, JSONB)]
    verdict, plan = _plan(engine, "select a, n, j from orders", cols)
    assert verdict.action == "mask" and verdict.rule == "secrets-everywhere"
    out, changed = plan.apply([b"key AKIAIOSFODNN7EXAMPLE end", b"42", b'{"k": "AKIAIOSFODNN7EXAMPLE"}'])
    assert out == [b"key ******** end", b"42", b'{"k": "********"}']
    assert json.loads(out[2]) == {"k": "********"}
    out2, changed2 = plan.apply([b"nothing here", b"1", b"{}"])
    assert not changed2 and out2 == [b"nothing here", b"1", b"{}"]


def test_binary_format(engine: PolicyEngine) -> None:
    # text in binary format is UTF-8: masked; jsonb binary: version byte kept; int4 binary: NULL.
    cols = [ColumnDesc("email", 1, 2, TEXT, 1), ColumnDesc("ssn", 1, 3, JSONB, 1),
            ColumnDesc("card_number", 1, 4, INT4, 1), ColumnDesc("notes", 1, 5, BYTEA, 1)]
    _, plan = _plan(engine, "select email, ssn, card_number, notes from customers", cols)
    out, _ = plan.apply([b"alice@example.com", b'\x01"123-45-6789"', b"\x00\x00\x00\x07", b"alice@example.com"])
    assert out[0] == b"*****@******e.com"
    assert out[1] is None  # ssn strategy is null
    assert out[2] is None  # binary int cannot be format-masked correctly: withheld
    assert out[3] is None  # bytea named by a detector rule: cannot scan binary, withheld


def test_text_format_non_text_type_named_by_rule_becomes_null(engine: PolicyEngine) -> None:
    cols = [ColumnDesc("card_number", 1, 4, INT4, 0)]
    _, plan = _plan(engine, "select card_number from customers", cols)
    out, _ = plan.apply([b"4111111111111111"])
    assert out == [None]


def test_no_plan_when_nothing_to_mask() -> None:
    cfg = parse_config(CONFIG.replace('name = "secrets-everywhere"\naction = "mask"',
                                      'name = "secrets-everywhere"\naction = "mask"\n[rules.sql]\nreads = ["vault.*"]'))
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities, salt=b"k" * 16)
    verdict = engine.decide_sql("bot", (), "db", "select id from orders")
    assert verdict.action == "allow" and verdict.mask_rules == ()
    assert engine.mask_plan("bot", (), "db", verdict, [ColumnDesc("id", 1, 1, INT4)]) is None
    # A mask rule matched, but no column of this result is one it names: still no plan.
    verdict = engine.decide_sql("bot", (), "db", "select id from customers")
    assert verdict.action == "mask"
    assert engine.mask_plan("bot", (), "db", verdict, [ColumnDesc("id", 1, 1, INT4)]) is None


def test_blocked_verdict_gets_no_plan(engine: PolicyEngine) -> None:
    from appliance.policy import Verdict

    v = Verdict("block", "x", "r", mask_rules=("pii",))
    assert engine.mask_plan("bot", (), "db", v, [ColumnDesc("email", 0, 0, TEXT)]) is None


def test_masking_applies_after_approval() -> None:
    cfg = parse_config(CONFIG + '\n[[rules]]\nname = "hold"\naction = "approve"\n[rules.sql]\nreads = ["customers"]\n')
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities, salt=b"k" * 16)
    verdict = engine.decide_sql("bot", (), "db", "select email from customers")
    assert verdict.action == "approve" and "pii" in verdict.mask_rules
    plan = engine.mask_plan("bot", (), "db", verdict, [ColumnDesc("email", 1, 2, TEXT)])
    assert plan.apply([b"alice@example.com"])[0] == [b"*****@******e.com"]


def test_hash_without_salt_is_refused() -> None:
    cfg = parse_config(CONFIG)
    with pytest.raises(PolicyError, match="salt"):
        PolicyEngine(cfg.policy, cfg.targets, cfg.identities)


def test_mask_rule_without_entries_is_a_config_error() -> None:
    bad = CONFIG.split("[[rules]]")[0] + '[[rules]]\nname = "m"\naction = "mask"\n'
    with pytest.raises(ConfigError, match=r"<memory>:\d+: rules\[0\]: .*needs at least one \[\[rules.mask\]\]"):
        parse_config(bad)


def test_plan_cache_tells_statements_apart(engine: PolicyEngine) -> None:
    cols = [ColumnDesc("email", 0, 0, TEXT)]
    for _ in range(2):  # second round: plans come from the cache
        _, plan = _plan(engine, "select email from customers", cols)
        assert plan.apply([b"alice@example.com"])[0] == [b"*****@******e.com"]
        _, plan = _plan(engine, "select email from people", cols)
        assert plan.apply([b"alice@example.com"])[0] == [b"alice@example.com"]


def _partial_reference(value: str, keep: int) -> str:
    """partial() as specified, written the slow obvious way."""
    alnum = [i for i, ch in enumerate(value) if ch.isalnum()]
    if len(alnum) <= keep:
        return "".join("*" if ch.isalnum() else ch for ch in value) if alnum else "********"
    hide = set(alnum[:len(alnum) - keep])
    return "".join("*" if i in hide else ch for i, ch in enumerate(value))


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1Z9-@. é٣_")), max_size=30) | st.text(max_size=20),
       st.integers(0, 8))
def test_partial_matches_its_reference(value: str, keep: int) -> None:
    assert partial(value, keep) == _partial_reference(value, keep)


# RowMasker.apply runs for every row of a masked result, through functions chosen once per
# column (_compile). They must do exactly what the general per-value path (_mask) does.
_TYPE_OIDS = [25, 1043, 1042, 19, 705, 18, 114, 3802, 0, 23, 1700]
_STRATEGIES = st.builds(Strategy, st.sampled_from(["null", "full", "partial", "hash", "format"]),
                        st.integers(0, 6), st.just(b"salt"))
_ACTIONS = st.builds(
    lambda name, oid, fmt, whole, detectors: ColumnAction(name, oid, fmt, whole, detectors),
    st.sampled_from(["email", "ssn", "note"]), st.sampled_from(_TYPE_OIDS), st.sampled_from([0, 1]),
    st.none() | _STRATEGIES,
    st.lists(st.tuples(st.sampled_from(sorted(DETECTOR_FUNCTIONS)), _STRATEGIES), max_size=3))
_RAW = (st.text(alphabet=st.sampled_from(list("ab1Z9-@. é٣_")), max_size=30).map(lambda t: t.encode())
        | st.sampled_from([b"alice@example.com", b"078-05-1120", "\u00e9t\u00e9".encode(), b"\x01{\"a\": 1}"])
        | st.binary(max_size=12))


def _reference_apply(masker: RowMasker, values: list) -> tuple[list, bool, dict]:
    out, changed, counts = list(values), False, {}
    for i, action in enumerate(masker.actions):
        if action is None or i >= len(out) or out[i] is None:
            continue
        new = masker._mask(action, out[i])
        if new != out[i]:
            out[i], changed = new, True
            counts[action.name] = counts.get(action.name, 0) + 1
    return out, changed, counts


@settings(max_examples=400, deadline=None)
@given(st.lists(st.none() | _ACTIONS, max_size=4), st.lists(st.none() | _RAW, max_size=5))
def test_row_masker_compiled_steps_equal_the_general_path(actions, values):
    masker = RowMasker(actions, DetectorSettings())
    for action in actions:
        if action is not None:
            for raw in values:
                if raw is not None:
                    assert masker._compile(action)(raw) == masker._mask(action, raw)
    out, changed = masker.apply(values)
    assert (out, changed, masker.counts) == _reference_apply(RowMasker(actions, DetectorSettings()), values)


_PARTIAL_ACTIONS = st.builds(
    lambda name, oid, fmt, keep: ColumnAction(name, oid, fmt, Strategy("partial", keep)),
    st.sampled_from(["email", "ssn", "note"]), st.sampled_from([25, 1043, 1042, 19, 705, 18]),
    st.sampled_from([0, 1]), st.integers(0, 6))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.none() | _PARTIAL_ACTIONS, min_size=1, max_size=4),
       st.lists(st.lists(st.none() | _RAW, max_size=5), max_size=6))
def test_runs_of_rows_masked_at_once_equal_row_by_row(actions, rows):
    """The relay hands a run of DataRows to hotpath.mask_rows when every step is a partial mask
    of a text column (RowMasker.partial_steps): same bytes out, same counts as RowMasker.apply."""
    from appliance import hotpath

    masker = RowMasker(actions, DetectorSettings())
    if all(a is None for a in actions):
        assert masker.partial_steps is None
        return
    assert masker.partial_steps is not None
    buf = b"".join(hotpath.encode_row(r) for r in rows) + b"C\x00\x00\x00\x0dSELECT 1\x00"
    counts = [0] * len(masker.partial_steps)
    end, out = hotpath.mask_rows(buf, 0, len(buf), masker.partial_steps, counts)
    masker.add_counts(counts)
    by_row = RowMasker(actions, DetectorSettings())
    expected = b"".join(hotpath.encode_row(by_row.apply(r)[0]) for r in rows)
    assert end == len(buf) - 14
    assert (out if out is not None else buf[:end]) == expected
    assert masker.counts == by_row.counts


def test_other_strategies_keep_the_row_by_row_path():
    masker = RowMasker([ColumnAction("email", 25, 0, Strategy("partial", 4)),
                        ColumnAction("ssn", 25, 0, Strategy("hash", salt=b"s"))], DetectorSettings())
    assert masker.partial_steps is None
    detectors = RowMasker([ColumnAction("note", 25, 0, None, [("email", Strategy("partial", 4))])],
                          DetectorSettings())
    assert detectors.partial_steps is None


# --- the server's errors and notices while a masked statement runs ---------------------------------

AWS = "AKIAIOSFODNN7EXAMPLE"
RAISED = (("S", "ERROR"), ("V", "ERROR"), ("C", "P0001"), ("M", "bad value alice@example.com"),
          ("D", "value alice@example.com"), ("H", "alice@example.com"), ("W", "PL/pgSQL function f(text) line 1"),
          ("c", "alice@example.com"), ("F", "pl_exec.c"), ("L", "3911"), ("R", "exec_stmt_raise"))


def test_errors_of_a_statement_reading_masked_columns_are_withheld(engine: PolicyEngine) -> None:
    masker = engine.message_masker(engine.decide_sql("bot", (), "db", "select email::int from customers"))
    fields = masker.fields(RAISED)
    assert fields is not None and "alice" not in repr(fields)
    assert [c for c, _ in fields] == ["S", "V", "C", "M", "F", "L", "R"]  # the server's own fields stay
    assert dict(fields)["C"] == "P0001" and "withheld" in dict(fields)["M"] and "'pii'" in dict(fields)["M"]
    # Raised while the statement was analysed (a position in its text): no row was read, as it is.
    assert masker.fields((("S", "ERROR"), ("C", "42703"), ("M", 'column "emial" does not exist'), ("P", "8"))) is None


def test_errors_under_detector_rules_only_have_the_detected_values_masked(engine: PolicyEngine) -> None:
    # secrets-everywhere (detectors, every statement) is the only rule that matches.
    masker = engine.message_masker(engine.decide_sql("bot", (), "db", "select x::int from elsewhere"))
    msg = (("S", "ERROR"), ("C", "22P02"), ("M", f'invalid input syntax for type integer: "{AWS}"'),
           ("D", f"key {AWS}"), ("P", "8"))
    fields = dict(masker.fields(msg))
    assert fields["M"].startswith('invalid input syntax for type integer: "') and AWS not in fields["M"]
    assert AWS not in fields["D"] and fields["C"] == "22P02" and fields["P"] == "8"
    assert masker.fields((("S", "ERROR"), ("C", "22012"), ("M", "division by zero"))) is None  # nothing found


def test_a_column_rule_for_another_table_does_not_withhold(engine: PolicyEngine) -> None:
    # pii's entries: customers.email (not people's), *.ssn, card_*, notes: only the unqualified ones
    # may name a column of people, and they do: withheld. A statement that matches no column
    # entry's table is left to the detectors.
    assert engine.message_masker(engine.decide_sql("bot", (), "db", "select 1 from people")).withhold is not None
    v = engine.decide_sql("bot", (), "db", "select 1")
    assert v.mask_rules == ("secrets-everywhere",) and engine.message_masker(v).withhold is None


def test_sending_a_masked_column_elsewhere_is_refused(engine: PolicyEngine) -> None:
    for sql in ["select set_config('x.y', email, false) from customers",
                "select 1 from customers where pg_notify('c', email) is null",
                "select pg_notify('c', e) from (select email as e from customers) s",
                "select set_config('x.y', c::text, false) from customers c",
                "do $$ begin perform count(*) from customers; end $$",
                "create function f() returns text language sql as 'select ssn from people'",
                "alter table customers rename email to e", "alter table customers rename to c2",
                "alter table customers set schema other",
                "alter table customers add column c text generated always as (email) stored",
                "alter table customers alter column name type text using email",
                "create trigger t before update on customers for each row execute function f()",
                "alter table customers inherit parent",
                "copy customers to '/tmp/customers.csv'", "copy customers (email) to program 'cat'",
                "insert into customers (id) values (1) on conflict (id) do update set name = customers.email",
                "update customers set name = email where id = 1",
                # SQL text botwarden cannot read, whatever it names: while pii masks columns.
                "do $$ begin execute 'create table c2 as select email from ' || quote_ident(current_user); end $$",
                "select query_to_xml(current_setting('x.q'), true, true, '')"]:
        v = engine.decide_sql("bot", (), "db", sql)
        assert v.action == "block" and v.rule == "pii" and "masking cannot follow" in v.reason, (sql, v)
    for sql in ["select set_config('x.y', name, false) from customers",   # not masked
                "select pg_notify('c', 'done') from customers",
                "with d as (delete from customers where id = 1 returning *) select * from d",  # read, masked
                "alter table customers add column c text", "create index on customers (email)",
                "alter table customers alter column email type text using lower(email)",
                "alter table customers rename constraint a to b", "copy customers from '/tmp/in.csv'"]:
        assert engine.decide_sql("bot", (), "db", sql).action == "mask", sql


def test_the_planners_statistics_are_refused_while_a_rule_masks_columns(engine: PolicyEngine) -> None:
    for sql in ["select most_common_vals from pg_stats", "select * from pg_catalog.pg_stats_ext",
                "select 1 from pg_statistic"]:
        v = engine.decide_sql("bot", (), "db", sql)
        assert (v.action, v.rule) == ("block", "pii") and "statistics" in v.reason, (sql, v)
    cfg = parse_config(CONFIG.replace('columns = ["customers.email"]', 'detectors = ["email"]')
                       .replace('columns = ["*.ssn"]', 'detectors = ["ssn"]').replace('columns = ["card_*"]', 'detectors = ["card"]')
                       .replace('columns = ["notes"]\n', ''))
    detectors_only = PolicyEngine(cfg.policy, cfg.targets, cfg.identities, salt=b"0123456789abcdef")
    assert detectors_only.decide_sql("bot", (), "db", "select most_common_vals from pg_stats").action != "block"
    assert detectors_only.decide_sql("bot", (), "db", "do $$ begin execute current_setting('x.q'); end $$").action \
        != "block"


@pytest.mark.parametrize("prepare,execute,action", [
    # What the prepared body writes or sends, EXECUTE does (before: only its outputs were seen;
    # EXECUTE's own parameters are constant expressions, the server refuses a subquery there).
    ("prepare p as update t set a = customers.email from customers where t.id = customers.id", "execute p", "block"),
    ("prepare p as select pg_notify('c', email) from customers", "execute p", "block"),
    ("prepare p as delete from customers where id = $1 returning email", "execute p(1)", "mask"),  # read, masked
])
def test_execute_is_decided_with_its_bodys_effects(engine: PolicyEngine, prepare, execute,
                                                                      action) -> None:
    from appliance.policy import SqlSessionState
    session = SqlSessionState()
    engine.decide_sql("bot", (), "db", prepare, session=session)
    v = engine.decide_sql("bot", (), "db", execute, session=session)
    assert v.action == action, v


def test_only_the_servers_own_integrity_violations_keep_their_message():
    from appliance.policy.masking import MessageMasker
    masker = MessageMasker(withhold="withheld")
    native = (("S", "ERROR"), ("C", "23505"), ("M", 'duplicate key value violates unique constraint "c_pkey"'),
              ("D", "Key (email)=(dora@example.com) already exists."), ("s", "public"), ("t", "c"), ("n", "c_pkey"),
              ("F", "nbtinsert.c"), ("L", "666"), ("R", "_bt_check_unique"))
    assert masker.fields(native) == tuple(f for f in native if f[0] != "D")
    raised = tuple(("R", "exec_stmt_raise") if f[0] == "R" else f for f in native)  # a RAISE shaped like one
    other_text = tuple(("M", "doppelter Schlüsselwert verletzt Unique-Constraint") if f[0] == "M" else f for f in native)
    for fields in (raised, other_text):
        out = dict(masker.fields(fields))
        assert out["M"] == "withheld" and "D" not in out and "n" not in out, out
