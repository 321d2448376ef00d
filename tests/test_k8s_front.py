"""The Kubernetes front with real kubectl 1.20 against a real kube-apiserver 1.20.2 (issue 17).

The control plane is built by tests/k8s/build.sh (cached per machine) and started by
tests/k8s/cluster.py; botwarden runs as a real daemon with OpenBao as OIDC issuer.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import uuid

import pytest
import yaml

from appliance.protocols.kubernetes import MASK_DATA, MASK_TEXT
from tests.k8s_fixtures import K8sEnv, start_k8s_env


@pytest.fixture(scope="module")
def env(kube, bao_server, pg_server):
    e = start_k8s_env(kube, bao_server, pg_server)
    try:
        yield e
    finally:
        e.close()


def _ns(env: K8sEnv) -> str:
    name = f"bw-{uuid.uuid4().hex[:8]}"
    res = env.kubectl(env.direct_kubeconfig(), "create", "namespace", name)
    assert res.returncode == 0, res.stderr
    return name


def _no_age(table: str) -> str:
    """kubectl's tables end with AGE, which moves between two runs; everything else must match."""
    lines = table.splitlines()
    if not lines or not lines[0].rstrip().endswith("AGE"):
        return table
    return "\n".join(line[:lines[0].rindex("AGE")].rstrip() for line in lines)


def test_get_and_list_through_botwarden_match_direct(env: K8sEnv) -> None:
    ns = _ns(env)
    direct = env.direct_kubeconfig()
    for i in range(3):
        assert env.kubectl(direct, "-n", ns, "create", "configmap", f"cm{i}", f"--from-literal=k=v{i}").returncode == 0
    bot = env.bot_kubeconfig()
    for args in (("get", "configmaps", "-n", ns, "-o", "json"), ("get", "configmap", "cm1", "-n", ns, "-o", "yaml"),
                 ("get", "namespaces", ns), ("get", "configmaps", "-n", ns), ("get", "all", "-n", ns),
                 ("get", "configmaps", "-n", ns, "-l", "missing=label"), ("api-resources",)):
        want = env.kubectl(direct, *args)
        got = env.kubectl(bot, *args)
        assert want.returncode == 0, want.stderr
        assert (got.returncode, _no_age(got.stdout)) == (0, _no_age(want.stdout)), got.stderr
    rows = env.daemon.audit_sql(
        "SELECT text, decision, sqlstate FROM requests WHERE protocol = 'k8s' AND text LIKE ? ORDER BY ts",
        [f"list configmaps in {ns}%"])
    assert rows and all(r["decision"] == "allow" and r["sqlstate"] == "200" for r in rows)
    # audit.mode = "strict" (the default): each request was journaled before it went upstream, a
    # request_starts row its requests row completes (same id and seq; issue 23.4).
    unstarted = env.daemon.audit_sql(
        "SELECT r.text FROM requests r LEFT JOIN request_starts s ON s.request_id = r.request_id "
        "AND s.seq = r.seq AND s.chain_seq < r.chain_seq "
        "WHERE r.protocol = 'k8s' AND r.text LIKE ? AND s.request_id IS NULL", [f"list configmaps in {ns}%"])
    assert unstarted == []


def test_namespace_delete_is_refused_with_a_kubernetes_status(env: K8sEnv) -> None:
    ns = _ns(env)
    res = env.kubectl(env.bot_kubeconfig(), "delete", "namespace", ns)
    assert res.returncode != 0
    assert ("Error from server (Forbidden): blocked by botwarden rule 'no-namespace-deletes' "
            f"(namespaces are deleted by humans): delete namespaces {ns} in {ns}") in res.stderr
    # Never reached the server: the namespace is there and active.
    doc = env.kube.get(f"/api/v1/namespaces/{ns}")
    assert doc["status"]["phase"] == "Active"
    rows = env.daemon.audit_sql("SELECT decision, rule, sqlstate, error FROM requests WHERE text LIKE ?",
                                [f"delete namespaces {ns}%"])
    assert [(r["decision"], r["rule"], r["sqlstate"]) for r in rows] == [("block", "no-namespace-deletes", "403")]


def test_secret_values_are_masked_in_yaml_json_and_lists(env: K8sEnv) -> None:
    ns = _ns(env)
    direct = env.direct_kubeconfig()
    res = env.kubectl(direct, "-n", ns, "create", "secret", "generic", "db", "--from-literal=password=hunter2-real",
                      "--from-literal=user=admin")
    assert res.returncode == 0, res.stderr
    bot = env.bot_kubeconfig()
    got = env.kubectl(bot, "-n", ns, "get", "secret", "db", "-o", "yaml")
    assert got.returncode == 0, got.stderr
    doc = yaml.safe_load(got.stdout)  # still parses
    assert doc["kind"] == "Secret" and doc["data"] == {"password": MASK_DATA, "user": MASK_DATA}
    assert base64.b64decode(doc["data"]["password"]).decode() == MASK_TEXT
    assert "hunter2-real" not in got.stdout and base64.b64encode(b"hunter2-real").decode() not in got.stdout
    listed = env.kubectl(bot, "-n", ns, "get", "secrets", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    items = [i for i in json.loads(listed.stdout)["items"] if i["metadata"]["name"] == "db"]
    assert items[0]["data"] == {"password": MASK_DATA, "user": MASK_DATA}
    table_direct = env.kubectl(direct, "-n", ns, "get", "secrets", "db")
    table_bot = env.kubectl(bot, "-n", ns, "get", "secrets", "db")
    assert _no_age(table_bot.stdout) == _no_age(table_direct.stdout) and "Opaque" in table_bot.stdout
    # Direct, the value is there: the mask is botwarden's doing.
    real = env.kubectl(direct, "-n", ns, "get", "secret", "db", "-o", "jsonpath={.data.password}")
    assert base64.b64decode(real.stdout).decode() == "hunter2-real"
    rows = env.daemon.audit_sql("SELECT decision, rule, masked FROM requests WHERE text LIKE ? ORDER BY ts",
                                [f"get secrets db in {ns}%"])
    assert rows and rows[-1]["decision"] == "mask" and rows[-1]["rule"] == "mask-secrets"
    # `kubectl apply` keeps a copy of the object, values included, in an annotation: masked too.
    manifest = env.workdir / f"{ns}-applied.yaml"
    value = base64.b64encode(b"applied-secret-9").decode()
    manifest.write_text(f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: applied\n  namespace: {ns}\n"
                        f"data:\n  pw: {value}\n")
    assert env.kubectl(direct, "apply", "-f", str(manifest)).returncode == 0
    assert value in env.kubectl(direct, "-n", ns, "get", "secret", "applied", "-o", "yaml").stdout
    got = env.kubectl(bot, "-n", ns, "get", "secret", "applied", "-o", "yaml")
    assert got.returncode == 0, got.stderr
    assert value not in got.stdout and "applied-secret-9" not in got.stdout
    doc = yaml.safe_load(got.stdout)
    assert json.loads(doc["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])["data"] == {
        "pw": MASK_DATA}


def test_a_bad_token_is_refused_and_audited(env: K8sEnv) -> None:
    bot = env.bot_kubeconfig(token="not-a-valid-oidc-token")
    res = env.kubectl(bot, "get", "namespaces")
    assert res.returncode != 0
    assert "Unauthorized" in res.stderr or "You must be logged in" in res.stderr, res.stderr
    rows = env.daemon.audit_sql("SELECT outcome, error FROM sessions WHERE protocol = 'k8s' AND outcome = 'refused'")
    assert rows and any("token" in (r["error"] or "") for r in rows)


def test_held_deployment_delete_runs_once_approved(env: K8sEnv) -> None:
    ns = _ns(env)
    direct = env.direct_kubeconfig()
    res = env.kubectl(direct, "-n", ns, "create", "deployment", "web", "--image=registry.invalid/web:1")
    assert res.returncode == 0, res.stderr
    bot = env.bot_kubeconfig()
    home = bot.parent / "home"
    home.mkdir(exist_ok=True)
    before = {a["approval_id"] for a in env.client.get("/v1/approvals")["approvals"]}
    proc = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", ns, "delete", "deployment", "web"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={"HOME": str(home)})
    try:
        deadline = time.monotonic() + 30
        held = []
        while not held and time.monotonic() < deadline:
            held = [a for a in env.client.get("/v1/approvals")["approvals"] if a["approval_id"] not in before]
            time.sleep(0.2)
        assert held, "the delete was not held"
        item = held[0]
        assert item["rule"] == "deployment-deletes-need-approval" and item["target"] == "cluster"
        assert f"delete deployments.apps web in {ns}" in item["request"]
        # Nothing ran while it waited.
        assert env.kube.get(f"/apis/apps/v1/namespaces/{ns}/deployments/web")["metadata"]["name"] == "web"
        assert proc.poll() is None
        env.client.post(f"/v1/approvals/{item['approval_id']}/approve", {"reason": "change 17"})
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert 'deployment.apps "web" deleted' in out
    gone = env.kubectl(direct, "-n", ns, "get", "deployment", "web")
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def _pod(env: K8sEnv, ns: str, name: str = "web", labels: dict | None = None) -> None:
    """A Pod object. Nothing runs it (no kubelet): it stays Pending with no node. (Without a
    controller manager nobody makes the namespace's default service account: we do.)"""
    try:
        env.kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "default"}})
    except urllib.error.HTTPError as e:
        if e.code != 409:  # made for an earlier pod of the namespace
            raise
    env.kube.request("POST", f"/api/v1/namespaces/{ns}/pods", {
        "metadata": {"name": name, "labels": labels or {}}, "spec": {"automountServiceAccountToken": False,
                                      "containers": [{"name": "c", "image": "registry.invalid/web:1"}]}})


def _read_until(proc: subprocess.Popen, needle: str, timeout: float = 30) -> str:
    """What the process printed until ``needle`` (read from the pipe itself: a watch's events
    come as multi-line JSON, which a buffered readline would hold back)."""
    import os
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = ""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        if sel.select(0.2):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk.decode(errors="replace")
    return seen


def test_watch_streams_events_and_masks_secrets_event_by_event(env: K8sEnv) -> None:
    ns = _ns(env)
    bot = env.bot_kubeconfig()
    home = bot.parent / "home"
    home.mkdir(exist_ok=True)
    proc = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", ns, "get", "secrets", "--watch",
                             "--output-watch-events", "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={"HOME": str(home)})
    try:
        time.sleep(1.0)  # the watch is open (nothing to assert on: an empty namespace has no events yet)
        env.kube.request("POST", f"/api/v1/namespaces/{ns}/secrets",
                         {"metadata": {"name": "later"}, "data": {"pw": base64.b64encode(b"streamed-secret").decode()}})
        seen = _read_until(proc, '"later"')
        assert '"later"' in seen, proc.stderr.read() if proc.poll() is not None else seen
    finally:
        proc.kill()
        proc.wait()
    assert MASK_DATA in seen and base64.b64encode(b"streamed-secret").decode() not in seen


def test_exec_and_logs_refusals_of_the_api_server_pass_through_unchanged(env: K8sEnv) -> None:
    ns = _ns(env)
    _pod(env, ns)
    direct, bot = env.direct_kubeconfig(), env.bot_kubeconfig()
    # No kubelet: the server refuses the exec upgrade; a pod that never ran has empty logs.
    for args in (("exec", "web", "--", "ls"), ("logs", "web"), ("logs", "web", "--tail=5")):
        want = env.kubectl(direct, "-n", ns, *args)
        got = env.kubectl(bot, "-n", ns, *args)
        assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)
    exec_direct = env.kubectl(direct, "-n", ns, "exec", "web", "--", "ls")
    assert exec_direct.returncode != 0 and "does not have a host assigned" in exec_direct.stderr


def _exec_events(env: K8sEnv, ns: str) -> list[dict]:
    """The exec requests of namespace ``ns`` that reached the API server (its audit log: one event
    per stage of a request, one request per auditID)."""
    return list({e["auditID"]: e for e in env.kube.audit_events()
                 if e.get("objectRef", {}).get("namespace") == ns and e["objectRef"].get("subresource") == "exec"
                 }.values())


def test_a_blocked_exec_is_refused_before_it_reaches_the_server(env: K8sEnv) -> None:
    ns = f"locked-{uuid.uuid4().hex[:6]}"
    assert env.kubectl(env.direct_kubeconfig(), "create", "namespace", ns).returncode == 0
    _pod(env, ns)
    res = env.kubectl(env.bot_kubeconfig(), "-n", ns, "exec", "web", "--", "cat", "/etc/shadow")
    assert res.returncode != 0
    assert "blocked by botwarden rule 'no-exec-in-locked-namespaces'" in res.stderr
    rows = env.daemon.audit_sql("SELECT decision, rule, sqlstate FROM requests WHERE text LIKE ?",
                                [f"create pods/exec web in {ns}%"])
    assert [(r["decision"], r["rule"], r["sqlstate"]) for r in rows] == [("block", "no-exec-in-locked-namespaces",
                                                                          "403")]
    assert _exec_events(env, ns) == []  # the server never saw it


def test_exec_is_decided_on_its_command_and_only_allowed_commands_reach_the_server(env: K8sEnv) -> None:
    ns = _ns(env)
    _pod(env, ns)
    direct, bot = env.direct_kubeconfig(), env.bot_kubeconfig()
    for argv in (("rm", "-rf", "/data"), ("sh", "-c", "ls /data; rm -rf /data"), ("/bin/dd", "if=/dev/zero")):
        res = env.kubectl(bot, "-n", ns, "exec", "web", "--", *argv)
        assert res.returncode != 0
        assert "Error from server (Forbidden): blocked by botwarden rule 'no-destructive-exec'" in res.stderr, \
            res.stderr
    assert _exec_events(env, ns) == []  # none of them reached the server
    # An allowed command goes to the server, which refuses it (no kubelet): that answer is passed
    # through unchanged, and the server's audit log has the request.
    want = env.kubectl(direct, "-n", ns, "exec", "web", "--", "ls", "/data")
    got = env.kubectl(bot, "-n", ns, "exec", "web", "--", "ls", "/data")
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)
    assert "does not have a host assigned" in got.stderr
    assert len(_exec_events(env, ns)) == 2  # direct and through botwarden
    rows = env.daemon.audit_sql("SELECT text, decision, rule, sqlstate FROM requests WHERE text LIKE ? ORDER BY ts",
                                [f"create pods/exec web in {ns}%"])
    assert [(r["decision"], r["rule"]) for r in rows] == [("block", "no-destructive-exec")] * 3 + [("allow", None)]
    assert rows[1]["text"].startswith(f"create pods/exec web in {ns} -- sh -c 'ls /data; rm -rf /data'")
    assert rows[3]["sqlstate"] == "400"


def test_an_api_server_that_is_down_gives_a_status_and_an_audit_row(env: K8sEnv) -> None:
    res = env.kubectl(env.bot_kubeconfig(port=env.down_listen_port), "get", "configmaps", "-n", "default")
    assert res.returncode != 0
    assert "could not reach the Kubernetes API server of target 'cluster-down'" in res.stderr, res.stderr
    rows = env.daemon.audit_sql("SELECT r.sqlstate FROM requests r JOIN sessions s USING (session_id) "
                                "WHERE s.target = 'cluster-down'")
    assert rows and {r["sqlstate"] for r in rows} == {"503"}


def _python_client(host: str, token: str, ca: str):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = host
    cfg.api_key = {"authorization": f"Bearer {token}"}
    cfg.ssl_ca_cert = ca
    return client.CoreV1Api(client.ApiClient(cfg))


def test_the_python_client_over_http1_keep_alive_sees_what_it_sees_direct(env: K8sEnv) -> None:
    ns = _ns(env)
    env.kube.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "a"}, "data": {"k": "v"}})
    env.kube.request("POST", f"/api/v1/namespaces/{ns}/secrets",
                     {"metadata": {"name": "s"}, "data": {"pw": base64.b64encode(b"py-secret").decode()}})
    direct = _python_client(env.kube.url, env.kube.admin_token, str(env.kube.ca_file))
    bot = _python_client(f"https://127.0.0.1:{env.listen_port}", env.bao.mint_token(), str(env.bot_ca))
    for _ in range(3):  # one connection, several requests (urllib3 keeps it alive)
        want = direct.list_namespaced_config_map(ns).to_dict()
        got = bot.list_namespaced_config_map(ns).to_dict()
        assert got == want
    assert direct.read_namespaced_secret("s", ns).data == {"pw": base64.b64encode(b"py-secret").decode()}
    assert bot.read_namespaced_secret("s", ns).data == {"pw": MASK_DATA}
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        bot.delete_namespace(ns)
    assert refused.value.status == 403
    assert json.loads(refused.value.body)["message"].startswith("blocked by botwarden rule 'no-namespace-deletes'")


def _rows(env: K8sEnv, like: str) -> list[tuple]:
    return [(r["decision"], r["rule"], r["sqlstate"]) for r in env.daemon.audit_sql(
        "SELECT decision, rule, sqlstate FROM requests WHERE protocol = 'k8s' AND text LIKE ? ORDER BY ts", [like])]


def test_a_selector_rule_refuses_delete_by_label_while_delete_by_name_is_another_rules(env: K8sEnv) -> None:
    ns = _ns(env)
    for name in ("web-1", "web-2"):
        _pod(env, ns, name, labels={"app": "web"})
    bot = env.bot_kubeconfig()
    res = env.kubectl(bot, "-n", ns, "delete", "pods", "-l", "app=web")
    assert res.returncode != 0
    assert "Error from server (Forbidden): blocked by botwarden rule 'no-pod-deletes-by-app-selector'" in res.stderr
    assert env.kube.get(f"/api/v1/namespaces/{ns}/pods/web-1")["metadata"]["name"] == "web-1"  # nothing deleted
    assert _rows(env, f"list pods in {ns} -l app=web%") == [("block", "no-pod-deletes-by-app-selector", "403")]
    res = env.kubectl(bot, "-n", ns, "delete", "pod", "web-2", "--wait=false")
    assert res.returncode == 0 and 'pod "web-2" deleted' in res.stdout, res.stderr
    assert _rows(env, f"delete pods web-2 in {ns}%") == [("allow", "pod-deletes-by-name", "200")]
    # Another selector is not this rule's.
    other = env.kubectl(bot, "-n", ns, "get", "pods", "-l", "tier=fe")
    assert other.returncode == 0, other.stderr


def test_a_patch_type_rule_blocks_json_patches_and_lets_apply_and_merge_through(env: K8sEnv) -> None:
    ns = _ns(env)
    env.kube.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "c"}, "data": {"k": "v0"}})
    bot = env.bot_kubeconfig()
    res = env.kubectl(bot, "-n", ns, "patch", "configmap", "c", "--type=json",
                      "-p", '[{"op": "replace", "path": "/data/k", "value": "json"}]')
    assert res.returncode != 0 and "blocked by botwarden rule 'no-json-patches'" in res.stderr, res.stderr
    assert env.kube.get(f"/api/v1/namespaces/{ns}/configmaps/c")["data"] == {"k": "v0"}
    res = env.kubectl(bot, "-n", ns, "patch", "configmap", "c", "--type=merge", "-p", '{"data": {"k": "merge"}}')
    assert res.returncode == 0, res.stderr
    manifest = env.workdir / f"{ns}-c.yaml"
    manifest.write_text(f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  namespace: {ns}\n"
                        "data:\n  k: applied\n")
    res = env.kubectl(bot, "apply", "-f", str(manifest))  # the object exists: a strategic merge patch
    assert res.returncode == 0, res.stderr
    assert env.kube.get(f"/api/v1/namespaces/{ns}/configmaps/c")["data"] == {"k": "applied"}
    assert _rows(env, f"patch configmaps c in {ns} (json patch)%") == [("block", "no-json-patches", "403")]
    assert _rows(env, f"patch configmaps c in {ns} (merge patch)%") == [("allow", None, "200")]
    assert _rows(env, f"patch configmaps c in {ns} (strategic patch)%") == [("allow", None, "200")]


def test_a_server_dry_run_delete_is_not_held_where_the_real_one_is(env: K8sEnv) -> None:
    ns = _ns(env)
    direct = env.direct_kubeconfig()
    res = env.kubectl(direct, "-n", ns, "create", "deployment", "web", "--image=registry.invalid/web:1")
    assert res.returncode == 0, res.stderr
    before = {a["approval_id"] for a in env.client.get("/v1/approvals")["approvals"]}
    res = env.kubectl(env.bot_kubeconfig(), "-n", ns, "delete", "deployment", "web", "--dry-run=server")
    assert res.returncode == 0, res.stderr
    assert 'deployment.apps "web" deleted (server dry run)' in res.stdout
    assert env.kube.get(f"/apis/apps/v1/namespaces/{ns}/deployments/web")["metadata"]["name"] == "web"
    assert {a["approval_id"] for a in env.client.get("/v1/approvals")["approvals"]} == before
    assert _rows(env, f"delete deployments.apps web in {ns} (dry run)%") == [("allow", None, "200")]


def test_configured_paths_are_masked_in_configmaps_and_pod_env_in_yaml_json_and_watch(env: K8sEnv) -> None:
    ns = f"masked-{uuid.uuid4().hex[:6]}"
    direct = env.direct_kubeconfig()
    assert env.kubectl(direct, "create", "namespace", ns).returncode == 0
    res = env.kubectl(direct, "-n", ns, "create", "configmap", "app", "--from-literal=password=cm-secret-1",
                      "--from-literal=user=app")
    assert res.returncode == 0, res.stderr
    _pod(env, ns)
    env.kube.request("DELETE", f"/api/v1/namespaces/{ns}/pods/web")
    env.kube.request("POST", f"/api/v1/namespaces/{ns}/pods", {
        "metadata": {"name": "db"}, "spec": {"automountServiceAccountToken": False, "containers": [
            {"name": "c", "image": "registry.invalid/db:1",
             "env": [{"name": "DB_PASSWORD", "value": "env-secret-2"}, {"name": "DB_USER", "value": "dbuser"}]}]}})
    bot = env.bot_kubeconfig()
    got = env.kubectl(bot, "-n", ns, "get", "configmap", "app", "-o", "yaml")
    assert got.returncode == 0, got.stderr
    doc = yaml.safe_load(got.stdout)  # still parses
    assert doc["kind"] == "ConfigMap" and doc["data"] == {"password": MASK_TEXT, "user": "app"}
    listed = env.kubectl(bot, "-n", ns, "get", "configmaps", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [i["data"] for i in json.loads(listed.stdout)["items"] if i["metadata"]["name"] == "app"] == [
        {"password": MASK_TEXT, "user": "app"}]
    pod = env.kubectl(bot, "-n", ns, "get", "pod", "db", "-o", "yaml")
    assert pod.returncode == 0, pod.stderr
    assert yaml.safe_load(pod.stdout)["spec"]["containers"][0]["env"] == [
        {"name": "DB_PASSWORD", "value": MASK_TEXT}, {"name": "DB_USER", "value": "dbuser"}]
    for out in (got.stdout, listed.stdout, pod.stdout):
        assert "cm-secret-1" not in out and "env-secret-2" not in out
    # Direct, the values are there: the mask is botwarden's doing.
    assert "cm-secret-1" in env.kubectl(direct, "-n", ns, "get", "configmap", "app", "-o", "yaml").stdout
    # A watch, event by event.
    home = bot.parent / "home"
    home.mkdir(exist_ok=True)
    proc = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", ns, "get", "configmaps", "--watch",
                             "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"HOME": str(home)})
    try:
        time.sleep(1.0)  # the watch is open (nothing to assert on before the event)
        env.kube.request("POST", f"/api/v1/namespaces/{ns}/configmaps",
                         {"metadata": {"name": "later"}, "data": {"password": "streamed-cm-3"}})
        seen = _read_until(proc, '"later"')
    finally:
        proc.kill()
        proc.wait()
    # kubectl prints "data" before "metadata": the new object's value came before its name.
    assert '"later"' in seen and "streamed-cm-3" not in seen and seen.count(MASK_TEXT) >= 2, seen
    rows = env.daemon.audit_sql("SELECT decision, rule, masked FROM requests WHERE text LIKE ? ORDER BY ts",
                                [f"get configmaps app in {ns}%"])
    assert rows and rows[-1]["decision"] == "mask" and rows[-1]["rule"] == "mask-config-passwords"
    assert rows[-1]["masked"] == {"ConfigMap.data.password": 1}


@pytest.mark.parametrize("target,why", [
    ("cluster-wrong-ca", "unable to get local issuer certificate"),
    ("cluster-wrong-name", "Hostname mismatch"),
])
def test_an_api_server_whose_certificate_does_not_verify_is_refused(env: K8sEnv, target: str, why: str) -> None:
    port = env.wrong_ca_listen_port if target == "cluster-wrong-ca" else env.wrong_name_listen_port
    res = env.kubectl(env.bot_kubeconfig(port=port), "get", "configmaps", "-n", "default")
    assert res.returncode != 0
    assert (f"Error from server (ServiceUnavailable): botwarden refused the Kubernetes API server of target "
            f"'{target}': its certificate does not verify") in res.stderr, res.stderr
    assert why in res.stderr
    rows = env.daemon.audit_sql("SELECT r.sqlstate, r.decision, r.error FROM requests r JOIN sessions s "
                                "USING (session_id) WHERE s.target = ?", [target])
    assert rows and {r["sqlstate"] for r in rows} == {"503"}
    assert all("certificate does not verify" in r["error"] for r in rows)


def test_each_request_is_a_row_with_its_attributes_status_duration_and_response_size(env: K8sEnv) -> None:
    import http.client
    import ssl

    ns = _ns(env)
    env.kube.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "a"}, "data": {"k": "v"}})
    conn = http.client.HTTPSConnection("127.0.0.1", env.listen_port,
                                       context=ssl.create_default_context(cafile=str(env.bot_ca)))
    auth = {"Authorization": f"Bearer {env.bao.mint_token()}", "Accept": "application/json"}
    got = {}
    try:  # one HTTP/1.1 connection: one session, three requests
        for method, path in (("GET", f"/api/v1/namespaces/{ns}/configmaps/a"),
                             ("GET", f"/apis/apps/v1/namespaces/{ns}/deployments?labelSelector=app%3Dx"),
                             ("DELETE", f"/api/v1/namespaces/{ns}")):
            conn.request(method, path, headers=auth)
            resp = conn.getresponse()
            got[method + path] = (resp.status, len(resp.read()))
    finally:
        conn.close()
    rows = env.daemon.audit_sql(
        "SELECT params, decision, rule, sqlstate, duration_ms, rows, session_id FROM requests "
        "WHERE protocol = 'k8s' AND list_contains(params, ?) ORDER BY seq", [ns])
    assert [(r["params"], r["decision"], r["rule"], r["sqlstate"]) for r in rows] == [
        (["get", "", "configmaps", None, ns, "a"], "allow", None, "200"),
        (["list", "apps", "deployments", None, ns, None], "allow", None, "200"),
        (["delete", "", "namespaces", None, ns, ns], "block", "no-namespace-deletes", "403"),
    ]
    assert len({r["session_id"] for r in rows}) == 1
    # The response size is what the bot received, byte for byte; every row has a duration.
    assert [r["rows"] for r in rows] == [size for _, size in got.values()]
    assert [str(status) for status, _ in got.values()] == [r["sqlstate"] for r in rows]
    assert all(r["duration_ms"] is not None and r["duration_ms"] >= 0 for r in rows)


def _recording(env: K8sEnv, session_id: str) -> list[tuple[str, object]]:
    rows = env.daemon.audit_sql("SELECT direction, to_base64(data) AS data FROM recordings WHERE session_id = ? "
                                "ORDER BY seq", [session_id])
    chunks = [(r["direction"], base64.b64decode(r["data"])) for r in rows]
    return [(k, json.loads(d) if k == "event" else d) for k, d in chunks]


def test_the_session_is_recorded_request_by_request_with_bodies_masked(env: K8sEnv) -> None:
    ns = _ns(env)
    bot = env.bot_kubeconfig()
    secret = b"rec-secret-1"
    res = env.kubectl(bot, "-n", ns, "create", "secret", "generic", "s", f"--from-literal=pw={secret.decode()}")
    assert res.returncode == 0, res.stderr
    res = env.kubectl(bot, "-n", ns, "patch", "secret", "s", "-p",
                      json.dumps({"data": {"pw": base64.b64encode(b"rec-secret-2").decode()}}))
    assert res.returncode == 0, res.stderr
    got = env.kubectl(bot, "-n", ns, "get", "secret", "s", "-o", "json")
    assert got.returncode == 0, got.stderr
    sessions = {}
    for verb in ("create", "patch", "get"):
        rows = env.daemon.audit_sql("SELECT session_id, request_id FROM requests WHERE text LIKE ? ORDER BY ts",
                                    [f"{verb} secrets%in {ns}%"])
        assert rows, verb
        sessions[verb] = (rows[-1]["session_id"], rows[-1]["request_id"])  # (kubectl patch gets it first)
    everything = b""
    for verb, (session_id, request_id) in sessions.items():
        rec = _recording(env, session_id)
        everything += b"".join(d if isinstance(d, bytes) else json.dumps(d).encode() for _, d in rec)
        events = [d for k, d in rec if k == "event" and d.get("request_id") == request_id]
        assert events[0]["type"] == "request" and events[0]["path"] == (
            f"/api/v1/namespaces/{ns}/secrets" + ("" if verb == "create" else "/s"))
        assert any(e["type"] == "response" and e["status"] in (200, 201) for e in events)
        # the chunks after this request's events are its bodies: masked, or withheld
        start = next(i for i, (k, d) in enumerate(rec) if k == "event" and d == events[0])
        mine = [(k, d) for k, d in rec[start:] if k != "event"][:2]
        if verb == "create":
            sent = json.loads(mine[0][1])
            assert mine[0][0] == "in" and sent["kind"] == "Secret" and sent["data"] == {"pw": MASK_DATA}
        if verb == "patch":  # a patch has no kind to mask by: only its size is recorded
            assert any(e["type"] == "withheld" and e["direction"] == "in" for e in events)
            assert mine[0][0] == "out"
        if verb == "get":
            assert mine[0][0] == "out" and json.loads(mine[0][1])["data"] == {"pw": MASK_DATA}
    for value in (b"rec-secret-1", b"rec-secret-2"):
        assert value not in everything and base64.b64encode(value) not in everything
