"""OpenBao down while a bot asks for a session on a Kubernetes target (issue 17.8).

An OpenBao dev server of this module's own, paused with SIGSTOP to play "OpenBao is down" (a
paused server accepts connections and answers nothing, as a hung one does), resumed afterwards.
The target's credential is a per-session service-account token from OpenBao's kubernetes engine,
so no session can be opened without it: kubectl gets a Status saying so and the refusal is audited.
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from appliance.sandbox import OpenBaoServer
from tests.k8s_fixtures import K8sEnv, start_k8s_env
from tests.servers import pause

pytestmark = pytest.mark.timeout(300)

NAMESPACE = f"bw-bao-down-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def own_bao():
    server = OpenBaoServer(root_token=f"bw-k8s-down-{uuid.uuid4().hex[:6]}").start()
    try:
        yield server
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)  # never leave it paused
        server.stop()


@pytest.fixture(scope="module")
def env(kube, own_bao, pg_server):
    kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
    e = start_k8s_env(kube, own_bao, pg_server, vault_timeout=1.0,
                      credential=f'source = "kubernetes"\n{{engine}}\nkubernetes_namespace = "{NAMESPACE}"')
    try:
        yield e
    finally:
        os.killpg(own_bao.proc.pid, signal.SIGCONT)
        e.close()


def test_openbao_down_refuses_the_session_with_a_status_and_an_audit_row(env: K8sEnv, own_bao) -> None:
    kubeconfig = env.bot_kubeconfig()  # the bot's token is minted while OpenBao is up
    ok = env.kubectl(kubeconfig, "-n", NAMESPACE, "get", "configmaps")
    assert ok.returncode == 0, ok.stderr  # with OpenBao up, the same kubeconfig works
    pause(own_bao.proc.pid, group=True)
    try:
        res = env.kubectl(kubeconfig, "-n", NAMESPACE, "get", "configmaps")  # a new connection: a new session
    finally:
        os.killpg(own_bao.proc.pid, signal.SIGCONT)
    assert res.returncode != 0
    assert ("Error from server (ServiceUnavailable): botwarden could not get a credential for 'cluster': Vault at "
            f"{own_bao.addr} did not answer") in res.stderr, res.stderr
    rows = env.daemon.audit_sql("SELECT outcome, error, lease_id, identity FROM sessions WHERE protocol = 'k8s' "
                                "AND outcome = 'refused'")
    assert len(rows) == 1 and rows[0]["lease_id"] is None, rows
    assert rows[0]["error"].startswith("botwarden could not get a credential for 'cluster'")
