"""Masking an SSH output stream (appliance/fronts/ssh_mask.py): a secret split over reads at any
offset is masked, the held text is bounded, non-UTF-8 bytes pass unchanged; and the policy's
[rules.ssh] mask rules that choose the detectors."""

from __future__ import annotations

import pytest

from appliance.fronts.ssh_mask import StreamMasker
from appliance.policy.engine import PolicyEngine
from appliance.policy.masking import STARS, DetectorSettings, Strategy, TextMasker
from appliance.policy.ssh import SshRequest

AWS = "AKIAIOSFODNN7EXAMPLE"
CARD = "4111 1111 1111 1111"
PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQyNTUxOQAAACD\n-----END OPENSSH PRIVATE KEY-----"
MASKER = TextMasker([(d, Strategy("full")) for d in ("aws_key", "card", "private_key", "jwt")], DetectorSettings())


def stream(chunks: list[bytes], lookbehind: int = 16 * 1024) -> tuple[bytes, StreamMasker]:
    m = StreamMasker(MASKER, lookbehind)
    return b"".join(m.feed(c) for c in chunks) + m.flush(), m


@pytest.mark.parametrize("secret", [AWS, CARD, PEM])
def test_a_secret_split_at_every_offset_is_masked(secret):
    text = f"key: {secret} (do not share)\nnext line\n".encode()
    want = f"key: {STARS} (do not share)\nnext line\n".encode()
    start = text.index(secret.encode())
    for cut in range(len(text) + 1):
        out, m = stream([text[:cut], text[cut:]])
        assert out == want, (cut, out)
        assert m.masked == 1
    # and byte by byte
    out, _ = stream([text[i:i + 1] for i in range(len(text))])
    assert out == want
    # nothing of the secret leaves before it is complete: every output so far is secret-free
    m = StreamMasker(MASKER)
    sent = b""
    for i in range(len(text)):
        sent += m.feed(text[i:i + 1])
        assert secret.encode()[:8] not in sent[start:] or i >= start + len(secret)
    assert secret.encode() not in sent + m.flush()


def test_complete_lines_go_out_at_once_and_the_partial_line_is_held():
    m = StreamMasker(MASKER)
    assert m.feed(b"line one\nline tw") == b"line one\n"
    assert m.holding
    assert m.feed(b"o\n") == b"line two\n" and not m.holding


def test_the_held_text_is_bounded_by_the_lookbehind():
    m = StreamMasker(MASKER, lookbehind=64)
    out = m.feed(b"x" * 1000)  # no newline: all but the last 64 characters go
    assert out == b"x" * 936
    # a secret within the look-behind at the cut is not split
    m = StreamMasker(MASKER, lookbehind=32)
    head = b"y " * 20 + AWS.encode()[:10]
    out = m.feed(head) + m.feed(AWS.encode()[10:] + b" tail") + m.flush()
    assert AWS.encode() not in out and STARS.encode() in out


def test_bytes_that_are_not_utf8_pass_unchanged():
    raw = b"\xff\xfe binary \x80 " + AWS.encode() + b" \xc3"
    out, _ = stream([raw[:7], raw[7:]])
    assert out == raw.replace(AWS.encode(), STARS.encode())


SSH_CONFIG = """
[[targets]]
name = "web"
protocol = "ssh"
address = "127.0.0.1:22"
authentication = "attestation"
known_hosts = "/dev/null"
[targets.credential]
source = "static"
username = "deploy"

[[identities]]
name = "bot"
[identities.process]
uid = 1000

[[rules]]
name = "mask-keys-in-cat"
action = "mask"
[rules.ssh]
programs = ["cat"]
[[rules.mask]]
detectors = ["aws_key"]

[[rules]]
name = "no-rm"
action = "block"
[rules.ssh]
programs = ["rm"]
"""


def test_ssh_mask_rules_choose_the_detectors_for_the_requests_they_match():
    from appliance.config import parse_config

    cfg = parse_config(SSH_CONFIG)
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    cat = engine.decide_ssh("bot", (), "web", SshRequest.exec("cat /etc/app.env"))
    assert (cat.action, cat.mask_rules) == ("allow", ("mask-keys-in-cat",))
    masker = engine.text_masker(cat)
    assert masker is not None and [t for t in masker.spans(f"x {AWS} y")] == [(2, 22, STARS)]
    ls = engine.decide_ssh("bot", (), "web", SshRequest.exec("ls"))
    assert ls.mask_rules == () and engine.text_masker(ls) is None
    rm = engine.decide_ssh("bot", (), "web", SshRequest.exec("rm x; cat y"))
    assert rm.action == "block" and engine.text_masker(rm) is None


def test_ssh_mask_rules_cannot_name_columns():
    from appliance.policy.config import MaskSpec, Rule, SshMatch

    with pytest.raises(ValueError, match="no columns"):
        Rule("m", "mask", ssh=SshMatch(programs=("cat",)), mask=(MaskSpec(columns=("x",)),))
    rule = Rule("m", "mask", ssh=SshMatch(programs=("cat",)), mask=(MaskSpec(detectors=("aws_key",)),))
    assert rule.protocol == "ssh"
