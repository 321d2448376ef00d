"""The policy corpus: hundreds of statements, commands and API calls with expected decisions.

Every case runs twice, through a fresh engine (analysis and decision from scratch) and
through one shared engine (whose caches have seen every earlier case), so a cache that
served a wrong verdict would fail here.
"""

from __future__ import annotations

import tomllib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.policy import K8sRequest, PolicyEngine, SqlSessionState, SshRequest, explain

HERE = Path(__file__).parent
CONFIG = parse_config((HERE / "policy_corpus_botwarden.toml").read_text(), "policy_corpus_botwarden.toml")
CORPUS = tomllib.loads((HERE / "policy_corpus.toml").read_text())
WHO = {"ci": ("ci-bot", ("ci",)), "etl": ("etl-bot", ("etl",)), "agent": ("agent", ("ai",))}
DEFAULT_NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)  # a Wednesday
SALT = b"corpus-salt-0123456789"


def new_engine() -> PolicyEngine:
    return PolicyEngine(CONFIG.policy, CONFIG.targets, CONFIG.identities, salt=SALT)


def _now(case: dict) -> datetime:
    return datetime.fromisoformat(case["now"]) if "now" in case else DEFAULT_NOW


def _check(verdict, case: dict, label: str) -> None:
    expected_rule = None if case.get("rule", "-") == "-" else case["rule"]
    assert (verdict.action, verdict.rule) == (case["expect"], expected_rule), (
        f"{label}: {case} -> {verdict.action} by {verdict.rule}: {verdict.reason}")


def test_corpus_size() -> None:
    assert len(CORPUS["sql"]) >= 200
    assert {c["expect"] for c in CORPUS["sql"]} == {"allow", "block", "approve", "mask"}


def _sql_cases() -> list:
    return [pytest.param(i, c, id=f"{i:03d}") for i, c in enumerate(CORPUS["sql"]) if "session" not in c]


@pytest.mark.parametrize("index,case", _sql_cases())
def test_sql_case_fresh_engine(index: int, case: dict) -> None:
    identity, groups = WHO[case["who"]]
    verdict = new_engine().decide_sql(identity, groups, case.get("target", "prod-db"), case["sql"], now=_now(case))
    _check(verdict, case, "fresh")
    assert verdict.reason  # every verdict says why


def test_sql_corpus_through_one_cached_engine() -> None:
    """All cases, sessions included, in order through one engine, then all again (cache hits);
    and once through an engine with caching off."""
    engine = new_engine()
    uncached = PolicyEngine(CONFIG.policy, CONFIG.targets, CONFIG.identities, salt=SALT, cache=False)
    for round_, engine in ((1, engine), (2, engine), (3, uncached)):
        sessions: dict[str, SqlSessionState] = {}
        for case in CORPUS["sql"]:
            identity, groups = WHO[case["who"]]
            session = sessions.setdefault(case["session"], SqlSessionState()) if "session" in case else None
            verdict = engine.decide_sql(identity, groups, case.get("target", "prod-db"), case["sql"],
                                        now=_now(case), session=session)
            _check(verdict, case, f"round {round_}")
    assert uncached.stats["exact_hits"] == 0 and uncached.stats["misses"] == len(CORPUS["sql"])


def test_sql_corpus_shape_cache_with_other_constants() -> None:
    """Same statements with different constants hit the shape cache and still decide right."""
    engine = new_engine()
    for case in CORPUS["sql"]:
        if "session" in case:
            continue
        identity, groups = WHO[case["who"]]
        engine.decide_sql(identity, groups, case.get("target", "prod-db"), case["sql"], now=_now(case))
    before = engine.stats["shape_hits"]
    for sql, expect in [("SELECT * FROM orders WHERE id = 2", "allow"), ("select pg_read_file('/etc/shadow')", "block"),
                        ("delete from orders where 2 = 2", "approve"), ("delete from orders where id = 99", "allow")]:
        verdict = engine.decide_sql("ci-bot", ("ci",), "prod-db", sql, now=DEFAULT_NOW)
        assert verdict.action == expect, sql
    assert engine.stats["shape_hits"] > before


@pytest.mark.parametrize("index,case", [pytest.param(i, c, id=f"{i:03d}") for i, c in enumerate(CORPUS["ssh"])])
def test_ssh_case(index: int, case: dict) -> None:
    identity, groups = WHO[case["who"]]
    kind = case.get("kind", "exec")
    if kind == "exec":
        request = SshRequest.exec(case["command"])
    elif kind == "forward":
        request = SshRequest("forward", forward=case["forward"], destination=case.get("destination"))
    elif kind == "sftp":
        request = SshRequest("sftp", subsystem="sftp", sftp_op=case["op"], path=case["path"])
    else:
        request = SshRequest(kind)
    verdict = new_engine().decide_ssh(identity, groups, "bastion", request, now=_now(case))
    _check(verdict, case, "ssh")


@pytest.mark.parametrize("index,case", [pytest.param(i, c, id=f"{i:03d}") for i, c in enumerate(CORPUS["k8s"])])
def test_k8s_case(index: int, case: dict) -> None:
    identity, groups = WHO[case["who"]]
    request = K8sRequest.from_http(case["method"], case["path"])
    verdict = new_engine().decide_k8s(identity, groups, "cluster", request, now=_now(case))
    _check(verdict, case, "k8s")


def test_explain_agrees_with_engine_on_the_corpus() -> None:
    engine = new_engine()
    for case in CORPUS["sql"]:
        if "session" in case:
            continue
        identity, groups = WHO[case["who"]]
        target = case.get("target", "prod-db")
        e = explain(engine, identity, target, case["sql"], groups=groups, now=_now(case))
        v = engine.decide_sql(identity, groups, target, case["sql"], now=_now(case))
        assert (e.decision.action, e.decision.rule) == (v.action, v.rule), case
        if v.rule is not None:
            assert v.rule in e.matching_rules
            assert f"rule {v.rule!r}" in str(e)
