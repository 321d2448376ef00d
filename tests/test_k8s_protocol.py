"""The Kubernetes front's pure parts: Status objects, forwarded headers, Secret masking."""

from __future__ import annotations

import json
import re

import pytest

from appliance.protocols.kubernetes import (MASK_DATA, MASK_TEXT, KubernetesProtocolError, ResponseMasker, WatchMasker,
                                            parse_mask_path,
                                            bearer_token, status_body, upstream_headers)


def test_status_is_the_api_servers_forbidden_shape() -> None:
    doc = json.loads(status_body(403, "blocked by botwarden rule 'r'", kind="namespaces", name="prod"))
    assert doc == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "blocked by botwarden rule 'r'", "reason": "Forbidden",
                   "details": {"name": "prod", "kind": "namespaces"}, "code": 403}


def test_forwarded_headers_drop_the_bots_identity_and_hop_by_hop_headers() -> None:
    got = upstream_headers([("Authorization", "Bearer bot-oidc"), ("Impersonate-User", "admin"),
                            ("Connection", "keep-alive"), ("Accept", "application/vnd.kubernetes.protobuf"),
                            ("Accept-Encoding", "gzip"), ("User-Agent", "kubectl/v1.20.2"), (":path", "/x")],
                           "upstream-token", narrow_json=True)
    assert got == [("user-agent", "kubectl/v1.20.2"), ("accept", "application/json"),
                   ("authorization", "Bearer upstream-token")]
    table = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    assert upstream_headers([("accept", f"application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,{table}")],
                            None, narrow_json=True) == [("accept", table)]
    kept = upstream_headers([("Accept", "application/vnd.kubernetes.protobuf")], None, narrow_json=False)
    assert kept == [("accept", "application/vnd.kubernetes.protobuf")]


def test_bearer_token() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([]) is None


def _secret(name: str) -> dict:
    return {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": name},
            "data": {"password": "aHVudGVyMg=="}, "stringData": {"token": "t0ken"}}


def test_secrets_are_masked_alone_in_lists_and_in_tables() -> None:
    m = ResponseMasker()
    one = json.loads(m.mask_body(json.dumps(_secret("a")).encode(), "application/json"))
    assert one["data"] == {"password": MASK_DATA} and one["stringData"] == {"token": MASK_TEXT}
    # As the API server writes lists: the items carry no kind.
    listed = {"kind": "SecretList", "items": [{k: v for k, v in _secret(n).items() if k != "kind"} for n in "ab"]}
    listed = json.loads(m.mask_body(json.dumps(listed).encode(), "application/json"))
    assert all(i["data"] == {"password": MASK_DATA} for i in listed["items"])
    table = {"kind": "Table", "rows": [{"cells": ["a"], "object": _secret("a")}]}
    table = json.loads(m.mask_body(json.dumps(table).encode(), "application/json;charset=utf-8"))
    assert table["rows"][0]["object"]["data"] == {"password": MASK_DATA}
    cm = {"kind": "ConfigMap", "data": {"password": "visible"}}
    assert json.loads(m.mask_body(json.dumps(cm).encode(), "application/json")) == cm
    assert m.masked == {"secret_values": 2 + 4 + 2}  # one data and one stringData value per Secret: 1 + 2 + 1


def test_a_response_that_is_not_json_is_withheld() -> None:
    with pytest.raises(KubernetesProtocolError):
        ResponseMasker().mask_body(b"\x6b\x38\x73\x00protobuf", "application/vnd.kubernetes.protobuf")
    with pytest.raises(KubernetesProtocolError):
        ResponseMasker().mask_body(b"{not json", "application/json")


def test_watch_events_are_masked_one_by_one_fed_byte_by_byte() -> None:
    events = b"".join(json.dumps({"type": t, "object": _secret(t)}).encode() + b"\n" for t in ("ADDED", "MODIFIED"))
    w = WatchMasker(ResponseMasker(), max_event=1 << 20)
    out = b"".join(w.feed(events[i:i + 1]) for i in range(len(events))) + w.close()
    got = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in got] == ["ADDED", "MODIFIED"]
    assert all(e["object"]["data"] == {"password": MASK_DATA} for e in got)
    assert b"aHVudGVyMg==" not in out


def test_an_oversized_watch_event_ends_the_stream() -> None:
    w = WatchMasker(ResponseMasker(), max_event=100)
    with pytest.raises(KubernetesProtocolError):
        w.feed(b"{" + b"x" * 200)


def test_deeply_nested_json_is_withheld_not_a_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(KubernetesProtocolError):
        ResponseMasker().mask_body(deep, "application/json")
    with pytest.raises(KubernetesProtocolError):
        WatchMasker(ResponseMasker(), max_event=1 << 20).feed(deep + b"\n")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_watch_masker_fuzz_raises_only_its_own_error(chunks: list[bytes]) -> None:
    w = WatchMasker(ResponseMasker(), max_event=256)
    try:
        for chunk in chunks:
            out = w.feed(chunk)
            assert out == b"" or out.endswith(b"\n")
        w.close()
    except KubernetesProtocolError:
        pass


def _pod(name: str) -> dict:
    return {"metadata": {"name": name, "annotations": {"example.com/token": "annot-secret", "note": "x"}},
            "spec": {"containers": [{"name": "c", "env": [{"name": "DB_PASSWORD", "value": "env-secret"},
                                                         {"name": "PORT", "value": "5432"},
                                                         {"name": "REF", "valueFrom": {"secretKeyRef": {"name": "s"}}}]},
                                    {"name": "d", "env": [{"name": "DB_USER", "value": "env-user"}]}],
                     "replicas": 3}}


def test_configured_paths_mask_values_in_objects_of_their_kind_in_objects_lists_and_events() -> None:
    m = ResponseMasker((parse_mask_path("Pod.spec.containers[*].env[name=DB_*].value"),
                        parse_mask_path('*.metadata.annotations["example.com/token"]'),
                        parse_mask_path("ConfigMap.data"),
                        parse_mask_path("Pod.spec.replicas")))
    listed = {"kind": "PodList", "apiVersion": "v1", "items": [_pod("a"), _pod("b")]}
    got = json.loads(m.mask_body(json.dumps(listed).encode(), "application/json"))
    for item in got["items"]:
        env = {e["name"]: e.get("value") for c in item["spec"]["containers"] for e in c["env"]}
        assert env == {"DB_PASSWORD": MASK_TEXT, "PORT": "5432", "REF": None, "DB_USER": MASK_TEXT}
        assert item["metadata"]["annotations"] == {"example.com/token": MASK_TEXT, "note": "x"}
        assert item["spec"]["replicas"] == 3  # numbers stay
    cm = {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}}
    event = json.dumps({"type": "ADDED", "object": cm}).encode() + b"\n"
    got = json.loads(WatchMasker(m, 1 << 20).feed(event))
    assert got["object"]["data"] == {"a": MASK_TEXT, "b": MASK_TEXT} and got["object"]["metadata"] == {"name": "c"}
    assert m.masked == {"Pod.spec.containers[*].env[name=DB_*].value": 4,
                        '*.metadata.annotations["example.com/token"]': 2, "ConfigMap.data": 2}
    # Another kind with the same fields is left alone.
    other = {"kind": "Secretless", "metadata": {"name": "x"}, "data": {"a": "1"}}
    assert json.loads(ResponseMasker((parse_mask_path("ConfigMap.data"),)).mask_body(
        json.dumps(other).encode(), "application/json")) == other


def test_mask_paths_are_parsed_or_refused_with_the_reason() -> None:
    p = parse_mask_path('Deployment.spec.template.spec.containers[*].env[name=DB_*].value')
    assert (p.kind, p.steps[-4:]) == ("Deployment", (("each", "", ""), ("key", "env", ""), ("where", "name", "DB_*"),
                                                     ("key", "value", "")))
    assert parse_mask_path('*.metadata.annotations["a.b/c"]').steps[-1] == ("literal", "a.b/c", "")
    for bad, why in (("data.password", "must start with the kind"), ("ConfigMap", "names a kind but no field"),
                     ("ConfigMap.data[", "cannot read '['"), ("ConfigMap..data", "cannot read '..data'")):
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_mask_path(bad)


def test_kubectl_apply_s_copy_of_the_object_in_its_annotation_is_masked_too() -> None:
    from appliance.protocols.kubernetes import LAST_APPLIED

    applied = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"pw": "aHVudGVyMg=="}}
    secret = {**applied, "metadata": {"name": "s", "annotations": {LAST_APPLIED: json.dumps(applied) + "\n"}}}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"password": "cm-pw"}}
    cm["metadata"]["annotations"] = {LAST_APPLIED: json.dumps(cm), "other": "kept"}
    broken = {"kind": "Secret", "metadata": {"annotations": {LAST_APPLIED: "{not json"}}, "data": {}}
    m = ResponseMasker((parse_mask_path("ConfigMap.data.password"),))
    got = json.loads(m.mask_body(json.dumps({"kind": "List", "items": [secret, cm, broken]}).encode(),
                                 "application/json"))
    s_ann = json.loads(got["items"][0]["metadata"]["annotations"][LAST_APPLIED])
    assert s_ann["data"] == {"pw": MASK_DATA} and "aHVudGVyMg==" not in json.dumps(got)
    c_ann = json.loads(got["items"][1]["metadata"]["annotations"][LAST_APPLIED])
    assert c_ann["data"] == {"password": MASK_TEXT} and "cm-pw" not in json.dumps(got)
    assert got["items"][1]["metadata"]["annotations"]["other"] == "kept"
    assert got["items"][2]["metadata"]["annotations"][LAST_APPLIED] == MASK_TEXT
