"""[rules.k8s] matchers on what the API server derives from a request (issue 17.4): selectors,
patch types, dry run. Pure: the policy engine and K8sRequest, no server."""

from __future__ import annotations

import json

import pytest

from appliance.config import parse_config
from appliance.errors import ConfigError
from appliance.policy import K8sRequest, PolicyEngine
from appliance.policy.k8s import selector_requirements

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
source = "static"
username = "bw"
password_file = "/etc/botwarden/k8s-token"
"""

RULES = """
[[rules]]
name = "no-pod-deletes-by-app-selector"
action = "block"
[rules.k8s]
verbs = ["list", "deletecollection"]
resources = ["pods"]
label_selectors = ["app=*", "app in *"]

[[rules]]
name = "no-node-field-selectors"
action = "approve"
[rules.k8s]
verbs = ["list", "watch"]
field_selectors = ["spec.nodeName=*"]

[[rules]]
name = "no-json-patches"
action = "block"
[rules.k8s]
verbs = ["patch"]
patch_types = ["json", "unknown"]

[[rules]]
name = "real-deployment-deletes-need-approval"
action = "approve"
[rules.k8s]
verbs = ["delete"]
resources = ["deployments"]
dry_run = false
"""


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    cfg = parse_config(TARGET + RULES, "bw.toml")
    return PolicyEngine(cfg.policy, cfg.targets, cfg.identities)


def _decide(engine: PolicyEngine, method: str, path: str, content_type: str | None = None, body: bytes = b""):
    got = engine.decide_k8s("bot", (), "cluster", K8sRequest.from_http(method, path, content_type, body))
    return got.action, got.rule


def test_selectors_are_read_as_the_api_server_reads_them() -> None:
    assert selector_requirements("app = web, tier in (a, b),x==y, !canary,env notin(p)") == (
        "app=web", "tier in (a,b)", "x=y", "!canary", "env notin (p)")
    assert selector_requirements("") == () and selector_requirements(None) == ()
    req = K8sRequest.from_http("GET", "/api/v1/namespaces/a/pods?labelSelector=app%3Dx%2Ctier%3Dfe"
                                      "&fieldSelector=status.phase%21%3DRunning")
    assert (req.verb, req.label_selector, req.field_selector) == ("list", ("app=x", "tier=fe"),
                                                                 ("status.phase!=Running",))
    assert req.describe() == "list pods in a -l app=x,tier=fe --field-selector status.phase!=Running"


def test_a_selector_rule_decides_selected_requests_and_not_named_ones(engine: PolicyEngine) -> None:
    # What `kubectl delete pods -l app=web` sends first, and a client's deletecollection.
    assert _decide(engine, "GET", "/api/v1/namespaces/a/pods?labelSelector=app%3Dweb") == (
        "block", "no-pod-deletes-by-app-selector")
    assert _decide(engine, "DELETE", "/api/v1/namespaces/a/pods?labelSelector=app+in+%28web%2Capi%29") == (
        "block", "no-pod-deletes-by-app-selector")
    # A delete by name carries no selector; other selectors and other resources are not matched.
    assert _decide(engine, "DELETE", "/api/v1/namespaces/a/pods/web-1") == ("allow", None)
    assert _decide(engine, "GET", "/api/v1/namespaces/a/pods?labelSelector=tier%3Dfe") == ("allow", None)
    assert _decide(engine, "GET", "/api/v1/namespaces/a/pods") == ("allow", None)
    assert _decide(engine, "GET", "/api/v1/namespaces/a/services?labelSelector=app%3Dweb") == ("allow", None)
    assert _decide(engine, "GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&watch=true") == (
        "approve", "no-node-field-selectors")
    assert _decide(engine, "GET", "/api/v1/pods?fieldSelector=status.phase%3DRunning") == ("allow", None)


def test_patch_types_come_from_the_content_type(engine: PolicyEngine) -> None:
    path = "/api/v1/namespaces/a/configmaps/c"
    for ctype, kind in (("application/json-patch+json", "json"), ("application/merge-patch+json", "merge"),
                        ("application/strategic-merge-patch+json; charset=utf-8", "strategic"),
                        ("application/apply-patch+yaml", "apply"), ("text/plain", "unknown"), (None, "unknown")):
        assert K8sRequest.from_http("PATCH", path, ctype).patch_type == kind
    assert K8sRequest.from_http("PUT", path, "application/json").patch_type is None
    assert _decide(engine, "PATCH", path, "application/json-patch+json") == ("block", "no-json-patches")
    assert _decide(engine, "PATCH", path, "application/x-yaml") == ("block", "no-json-patches")  # unknown: blocked
    assert _decide(engine, "PATCH", path, "application/strategic-merge-patch+json") == ("allow", None)
    assert _decide(engine, "PATCH", path, "application/apply-patch+yaml") == ("allow", None)


def test_dry_run_is_read_from_the_query_or_a_deletes_options(engine: PolicyEngine) -> None:
    path = "/apis/apps/v1/namespaces/a/deployments/web"
    dry = json.dumps({"kind": "DeleteOptions", "apiVersion": "v1", "dryRun": ["All"]}).encode()
    real = json.dumps({"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}).encode()
    assert _decide(engine, "DELETE", path, "application/json", dry) == ("allow", None)
    assert _decide(engine, "DELETE", path + "?dryRun=All") == ("allow", None)
    assert _decide(engine, "DELETE", path, "application/json", real) == (
        "approve", "real-deployment-deletes-need-approval")
    assert _decide(engine, "DELETE", path) == ("approve", "real-deployment-deletes-need-approval")
    # As the API server: with a body, the query's dryRun is not read; an unreadable body is a real delete.
    assert _decide(engine, "DELETE", path + "?dryRun=All", "application/json", real)[0] == "approve"
    assert _decide(engine, "DELETE", path, "application/vnd.kubernetes.protobuf", b"\x6b\x38\x73\x00dryRun")[0] == \
        "approve"
    assert K8sRequest.from_http("POST", "/api/v1/namespaces/a/pods?dryRun=All").dry_run
    assert not K8sRequest.from_http("POST", "/api/v1/namespaces/a/pods?dryRun=None").dry_run
    assert K8sRequest.from_http("DELETE", path, "application/json", dry).describe() == \
        "delete deployments.apps web in a (dry run)"


def _error(body: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(TARGET + f'\n[[rules]]\nname = "r"\naction = "block"\n[rules.k8s]\n{body}\n', "bw.toml")
    return str(exc.value)


def test_config_errors_name_the_key_and_the_fix() -> None:
    assert 'rules[0].k8s: patch_types match only patch requests: verbs must include "patch"' in _error(
        'verbs = ["delete"]\npatch_types = ["json"]')
    assert "rules[0].k8s.patch_types[0]: must be one of 'json', 'merge', 'strategic', 'apply', 'unknown', not " \
           "'yaml'" in _error('patch_types = ["yaml"]')
    assert "rules[0].k8s: label_selectors match only list, watch and deletecollection requests" in _error(
        'verbs = ["get", "delete"]\nlabel_selectors = ["app=*"]')
    assert "rules[0].k8s: field_selectors match only list" in _error('verbs = ["create"]\nfield_selectors = ["a=*"]')
    assert "rules[0].k8s.dry_run: must be true or false" in _error('dry_run = "yes"')
    assert "rules[0].k8s.label_selectors: patterns must not be empty strings" in _error('label_selectors = [""]')
    # Verb globs that include a verb carrying the key are fine.
    parse_config(TARGET + '\n[[rules]]\nname = "r"\naction = "block"\n[rules.k8s]\nverbs = ["*"]\n'
                 'label_selectors = ["a=*"]\npatch_types = ["json"]\ndry_run = true\n', "bw.toml")


def test_mask_paths_need_a_mask_rule_and_a_kind() -> None:
    assert 'rule \'r\': mask_paths need action = "mask", not \'block\'' in _error('mask_paths = ["ConfigMap.data.x"]')
    text = TARGET + '\n[[rules]]\nname = "r"\naction = "mask"\n[rules.k8s]\nmask_paths = ["data.x"]\n'
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "bw.toml")
    assert "rules[0].k8s.mask_paths: mask path 'data.x' must start with the kind of object it applies to" in \
        str(exc.value)
    cfg = parse_config(TARGET + '\n[[rules]]\nname = "m"\naction = "mask"\n[rules.k8s]\nnamespaces = ["a"]\n'
                       'mask_paths = ["ConfigMap.data.password"]\n', "bw.toml")
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    got = engine.decide_k8s("bot", (), "cluster", K8sRequest.from_http("GET", "/api/v1/namespaces/a/configmaps"))
    assert got.action == "mask" and [p.text for p in got.details[1:]] == ["ConfigMap.data.password"]
    other = engine.decide_k8s("bot", (), "cluster", K8sRequest.from_http("GET", "/api/v1/namespaces/b/configmaps"))
    assert other.action == "allow" and other.details[1:] == ()


EXEC_RULES = """
[[rules]]
name = "no-destructive-exec"
action = "block"
[rules.k8s]
subresources = ["exec"]
programs = ["rm", "dd"]

[[rules]]
name = "reads-need-no-approval"
action = "allow"
[rules.k8s]
subresources = ["exec"]
programs = ["ls", "cat"]

[[rules]]
name = "interpreters-need-approval"
action = "approve"
[rules.k8s]
subresources = ["exec"]
programs = ["python*", "perl"]

[[rules]]
name = "attach-needs-approval"
action = "approve"
[rules.k8s]
subresources = ["attach"]
"""


def _exec(engine: PolicyEngine, *argv: str, method: str = "POST"):
    from urllib.parse import urlencode

    query = urlencode([("command", a) for a in argv] + [("container", "c"), ("stdout", "true")])
    return _decide(engine, method, f"/api/v1/namespaces/a/pods/web/exec?{query}")


def test_exec_is_decided_on_its_command_as_ssh_commands_are() -> None:
    cfg = parse_config(TARGET + EXEC_RULES, "bw.toml")
    engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
    req = K8sRequest.from_http("POST", "/api/v1/namespaces/a/pods/web/exec?command=sh&command=-c&command=ls+%3B+rm+x")
    assert req.command == ("sh", "-c", "ls ; rm x") and req.command_line == "sh -c 'ls ; rm x'"
    assert req.describe() == "create pods/exec web in a -- sh -c 'ls ; rm x'"
    assert _exec(engine, "rm", "-rf", "/") == ("block", "no-destructive-exec")
    assert _exec(engine, "/bin/rm", "x", method="GET") == ("block", "no-destructive-exec")  # websocket exec
    assert _exec(engine, "sh", "-c", "ls; rm -rf /") == ("block", "no-destructive-exec")  # inside sh -c too
    # The argv runs without a shell: ";" in an argument is a file name, not a second command.
    assert _exec(engine, "ls", "a;", "rm", "-rf") == ("allow", "reads-need-no-approval")
    assert _exec(engine, "cat", "/etc/hostname") == ("allow", "reads-need-no-approval")
    assert _exec(engine, "python3") == ("approve", "interpreters-need-approval")
    assert _exec(engine, "sh", "-c", "cat x | python3") == ("approve", "interpreters-need-approval")
    assert _exec(engine, "sh", "-c", "cat x | perl; dd of=y") == ("block", "no-destructive-exec")
    # attach carries no command: only rules without command keys decide it.
    assert _decide(engine, "POST", "/api/v1/namespaces/a/pods/web/attach?stdout=true") == (
        "approve", "attach-needs-approval")
    assert K8sRequest.from_http("POST", "/api/v1/namespaces/a/pods/web/attach?command=rm").command == ()
    # A command the analysis cannot read is blocked, as for SSH.
    from urllib.parse import urlencode

    query = urlencode([("command", "sh"), ("command", "-c"), ("command", "ls 'unterminated")])
    got = engine.decide_k8s("bot", (), "cluster",
                            K8sRequest.from_http("POST", f"/api/v1/namespaces/a/pods/web/exec?{query}"))
    assert (got.action, got.rule) == ("block", None) and "cannot analyze: unterminated single quote" in got.reason


def test_exec_command_keys_need_the_exec_subresource() -> None:
    assert 'rules[0].k8s: programs match the command of `kubectl exec`: subresources must include "exec"' in _error(
        'subresources = ["attach"]\nprograms = ["rm"]')
    assert "rules[0].k8s: match applies to programs / commands / constructs" in _error('match = "all"')
    assert "rules[0].k8s.constructs[0]: must be one of" in _error('constructs = ["loops"]')
