"""Per-session service-account tokens from OpenBao's kubernetes secrets engine (issue 17.3)."""

from __future__ import annotations

import time
import urllib.error
import uuid

import pytest

from tests.k8s_fixtures import K8sEnv, start_k8s_env

NAMESPACE = f"bw-sessions-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def env(kube, bao_server, pg_server):
    kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
    e = start_k8s_env(kube, bao_server, pg_server,
                      credential=f'source = "kubernetes"\n{{engine}}\nkubernetes_namespace = "{NAMESPACE}"')
    try:
        yield e
    finally:
        e.close()


def _account_exists(env: K8sEnv, name: str) -> bool:
    try:
        env.kube.get(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{name}")
        return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


def test_each_session_gets_its_own_service_account_revoked_at_the_end(env: K8sEnv) -> None:
    bot = env.bot_kubeconfig()
    res = env.kubectl(bot, "-n", NAMESPACE, "create", "configmap", "made-by-bot", "--from-literal=a=b")
    assert res.returncode == 0, res.stderr
    made = env.kube.get(f"/api/v1/namespaces/{NAMESPACE}/configmaps/made-by-bot")
    assert made["data"] == {"a": "b"}
    rows = env.daemon.audit_sql(
        "SELECT session_id, credential_user, lease_id FROM sessions WHERE protocol = 'k8s' AND lease_id IS NOT NULL "
        "ORDER BY started_at")
    assert rows, "no session with a lease"
    user = rows[-1]["credential_user"]
    assert user.startswith(f"system:serviceaccount:{NAMESPACE}:")
    account = user.rsplit(":", 1)[1]
    # The session ended with kubectl; its lease is revoked and OpenBao deletes the account, so
    # every token of it stops working at the API server.
    deadline = time.monotonic() + 30
    while _account_exists(env, account) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not _account_exists(env, account)
    # Cluster-wide reads are not in what OpenBao binds (a RoleBinding in one namespace): the API
    # server's own RBAC refusal comes back unchanged.
    res = env.kubectl(env.bot_kubeconfig(), "get", "nodes")
    assert res.returncode != 0 and "Forbidden" in res.stderr and "system:serviceaccount" in res.stderr


def _status(env: K8sEnv, token: str) -> int:
    try:
        env.kube.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps", token=token)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


def test_a_token_of_the_sessions_service_account_gets_401_from_the_server_after_the_session(env: K8sEnv) -> None:
    import subprocess

    bot = env.bot_kubeconfig()
    home = bot.parent / "home-watch"
    home.mkdir(exist_ok=True)
    # A watch keeps the session (and its service account) alive while we look at it.
    proc = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", NAMESPACE, "get", "configmaps",
                             "--watch"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"HOME": str(home)})
    try:
        deadline = time.monotonic() + 30
        rows: list = []
        while not rows and time.monotonic() < deadline:
            rows = env.daemon.audit_sql("SELECT credential_user FROM sessions WHERE protocol = 'k8s' "
                                        "AND outcome = 'open' AND lease_id IS NOT NULL")
            time.sleep(0.2)
        assert len(rows) == 1, rows
        account = rows[0]["credential_user"].rsplit(":", 1)[1]
        # A token of the session's service account, as the cluster issues them (TokenRequest, as
        # OpenBao asked for the session's own): it works while the session lives.
        token = env.kube.request("POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{account}/token",
                                 {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                  "spec": {"expirationSeconds": 3600}})["status"]["token"]
        assert _status(env, token) == 200
    finally:
        proc.kill()
        proc.wait()
    # The session ended: botwarden revokes its lease, OpenBao deletes the role binding (403 for a
    # moment) and the account, and the real server refuses the token: 401 (it authenticates no one).
    deadline = time.monotonic() + 30
    while _status(env, token) != 401 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _status(env, token) == 401
    ended = env.daemon.audit_sql("SELECT outcome FROM sessions WHERE credential_user LIKE ?", [f"%:{account}"])
    assert [r["outcome"] for r in ended] == ["ok"], ended
