"""Kubernetes targets, credential sources and mask rules in botwarden.toml (issue 17)."""

from __future__ import annotations

import pytest

from appliance.config import parse_config
from appliance.errors import ConfigError
from appliance.policy import K8sRequest, PolicyEngine

TARGET = """\
[appliance]
state_dir = "/tmp/bw-state"

[vault]
address = "http://127.0.0.1:8200"
token_file = "/etc/botwarden/vault-token"

[[targets]]
name = "cluster"
protocol = "kubernetes"
address = "10.0.0.10:6443"
authentication = "attestation"
[targets.credential]
source = "kubernetes"
role = "bot-session"
"""

MASK_RULE = """
[[rules]]
name = "mask-secrets"
action = "mask"
[rules.k8s]
resources = ["secrets"]
"""


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "bw.toml")
    return str(exc.value)


def test_the_kubernetes_engine_needs_the_namespace_of_its_tokens() -> None:
    assert "credential.kubernetes_namespace is required" in _error(TARGET)
    cfg = parse_config(TARGET + 'kubernetes_namespace = "apps"\n' + MASK_RULE, "bw.toml")
    assert cfg.targets[0].credential.kubernetes_namespace == "apps"


def test_the_kubernetes_source_is_for_kubernetes_targets() -> None:
    text = TARGET.replace('protocol = "kubernetes"', 'protocol = "postgres"') + 'kubernetes_namespace = "apps"\n'
    assert 'source = "kubernetes" is for kubernetes targets' in _error(text)


def test_a_kubernetes_mask_rule_masks_secrets_and_applies_to_approved_requests() -> None:
    cfg = parse_config(TARGET + 'kubernetes_namespace = "apps"\n' + MASK_RULE + """
[[rules]]
name = "secret-deletes-need-approval"
action = "approve"
[rules.k8s]
verbs = ["delete"]
resources = ["secrets"]
""", "bw.toml")
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    got = engine.decide_k8s("bot", (), "cluster", K8sRequest.from_http("GET", "/api/v1/namespaces/a/secrets/s"))
    assert (got.action, got.rule, got.mask_rules) == ("mask", "mask-secrets", ("mask-secrets",))
    held = engine.decide_k8s("bot", (), "cluster", K8sRequest.from_http("DELETE", "/api/v1/namespaces/a/secrets/s"))
    assert (held.action, held.mask_rules) == ("approve", ("mask-secrets",))
    other = engine.decide_k8s("bot", (), "cluster", K8sRequest.from_http("GET", "/api/v1/namespaces/a/configmaps"))
    assert (other.action, other.mask_rules) == ("allow", ())


def test_mask_entries_stay_sql_only() -> None:
    text = TARGET + 'kubernetes_namespace = "apps"\n' + MASK_RULE + '[[rules.mask]]\ncolumns = ["email"]\n'
    assert "masking applies to SQL results and SSH output only" in _error(text)
