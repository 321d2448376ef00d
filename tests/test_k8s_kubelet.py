"""Real pods: kubelet 1.20.2 + containerd + runc (tests/k8s/node.py) under the real kube-apiserver.

Direct, without botwarden: real kubectl 1.20 (SPDY/3.1 upgrades) and the ``kubernetes`` Python
client (WebSocket ``v4.channel.k8s.io``) exec, attach, follow logs and port-forward into busybox
pods the node runs from images built offline (tests/k8s/images.py). The front's relay of these
upgrades is tested against the same node.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from kubernetes import client as k8s_client
from kubernetes.stream import stream

from appliance.sandbox import free_port
from tests.k8s.cluster import KubeCluster
from tests.k8s.node import NODES_DIR, KubeNode


@pytest.fixture(scope="module")
def ns(kube_node: KubeNode) -> str:
    return kube_node.create_namespace(f"bw-pods-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def kubeconfig(kube: KubeCluster, tmp_path_factory):
    return kube.kubeconfig(tmp_path_factory.mktemp("kubelet-kcfg") / "config")


@pytest.fixture(scope="module")
def shell_pod(kube_node: KubeNode, ns: str) -> str:
    kube_node.run_pod(ns, "shell", ["sh", "-c", "echo started; exec sleep 3600"])
    return "shell"


def _pod_name() -> str:
    return "p-" + uuid.uuid4().hex[:6]


def test_pod_runs_in_its_own_network_namespace(kube: KubeCluster, kube_node: KubeNode, ns: str,
                                                shell_pod: str, kubeconfig) -> None:
    pod = kube.get(f"/api/v1/namespaces/{ns}/pods/{shell_pod}")
    assert pod["status"]["phase"] == "Running"
    assert ipaddress.ip_address(pod["status"]["podIP"]) in kube_node.pod_subnet
    node = kube.get(f"/api/v1/nodes/{kube_node.name}")
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == kube_node.kubelet_port
    logs = kube.run_kubectl(kubeconfig, "-n", ns, "logs", shell_pod)
    assert (logs.returncode, logs.stdout) == (0, "started\n"), logs.stderr


def test_kubectl_exec_gives_stdout_stderr_and_exit_code(kube: KubeCluster, ns: str, shell_pod: str,
                                                        kubeconfig) -> None:
    res = kube.run_kubectl(kubeconfig, "-n", ns, "exec", shell_pod, "--",
                           "sh", "-c", "echo out; echo err >&2; exit 3")
    assert res.returncode == 3, res.stderr
    assert res.stdout == "out\n"
    assert res.stderr.startswith("err\n")
    assert "command terminated with exit code 3" in res.stderr


def test_kubectl_exec_with_stdin(kube: KubeCluster, ns: str, shell_pod: str, kubeconfig) -> None:
    payload = "".join(f"line {i} of the bot's input\n" for i in range(2000))
    res = kube.run_kubectl(kubeconfig, "-n", ns, "exec", "-i", shell_pod, "--",
                           "sh", "-c", "tr a-z A-Z; echo done", input=payload)
    assert res.returncode == 0, res.stderr
    assert res.stdout == payload.upper() + "done\n"


def test_kubectl_attach_with_stdin(kube: KubeCluster, kube_node: KubeNode, ns: str, kubeconfig) -> None:
    name = _pod_name()
    kube.request("POST", f"/api/v1/namespaces/{ns}/pods", _stdin_once(kube_node.pod_manifest(
        name, ["sh", "-c", "while read line; do echo got:$line; done; echo eof"], stdin=True)))
    kube_node.wait_pod(ns, name, "Running")
    res = kube.run_kubectl(kubeconfig, "-n", ns, "attach", "-i", name, input="one\ntwo\n")
    assert res.returncode == 0, res.stderr
    assert "got:one\ngot:two\neof\n" in res.stdout
    kube_node.wait_pod(ns, name, "Succeeded")


def _stdin_once(manifest: dict) -> dict:
    # Closing the attached stdin closes the container's: the loop ends and the pod succeeds.
    manifest["spec"]["containers"][0]["stdinOnce"] = True
    return manifest


def test_kubectl_logs_follow_streams_lines_as_they_are_produced(kube: KubeCluster, kube_node: KubeNode, ns: str,
                                                                kubeconfig) -> None:
    # The pod prints line N only once the test has created /tmp/nN (through exec), so each line
    # read from `logs -f` was produced after the stream had started.
    name = _pod_name()
    kube_node.run_pod(ns, name, ["sh", "-c", "echo ready; i=0; while true; do "
                                 "if [ -e /tmp/n$i ]; then echo line$i; i=$((i+1)); fi; sleep 0.1; done"])
    home = kubeconfig.parent / "home"
    home.mkdir(exist_ok=True)
    follow = subprocess.Popen([kube.kubectl, f"--kubeconfig={kubeconfig}", "-n", ns, "logs", "-f", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    try:
        assert follow.stdout.readline() == "ready\n"
        for i in range(3):
            touched = kube.run_kubectl(kubeconfig, "-n", ns, "exec", name, "--", "touch", f"/tmp/n{i}")
            assert touched.returncode == 0, touched.stderr
            assert follow.stdout.readline() == f"line{i}\n"
            assert follow.poll() is None
    finally:
        follow.kill()
        follow.wait()


def test_kubectl_port_forward_reaches_a_port_in_the_pod(kube: KubeCluster, kube_node: KubeNode, ns: str,
                                                        kubeconfig) -> None:
    name = _pod_name()
    kube_node.run_pod(ns, name, ["sh", "-c", "echo served-by-$HOSTNAME > /www/index.html; "
                                 "exec httpd -f -p 8080 -h /www"], ports=(8080,))
    local = free_port()
    home = kubeconfig.parent / "home"
    home.mkdir(exist_ok=True)
    forward = subprocess.Popen([kube.kubectl, f"--kubeconfig={kubeconfig}", "-n", ns, "port-forward",
                                f"pod/{name}", f"{local}:8080"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    try:
        assert forward.stdout.readline().startswith(f"Forwarding from 127.0.0.1:{local} -> 8080")
        for _ in range(3):  # one SPDY connection, a stream per TCP connection
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/index.html", timeout=30) as r:
                assert r.read() == f"served-by-{name}\n".encode()
    finally:
        forward.kill()
        forward.wait()


def test_python_client_websocket_exec(kube: KubeCluster, ns: str, shell_pod: str) -> None:
    config = k8s_client.Configuration()
    config.host = kube.url
    config.ssl_ca_cert = str(kube.ca_file)
    config.api_key = {"authorization": "Bearer " + kube.admin_token}
    api = k8s_client.CoreV1Api(k8s_client.ApiClient(config))
    resp = stream(api.connect_get_namespaced_pod_exec, shell_pod, ns,
                  command=["sh", "-c", "read x; echo out:$x; echo err >&2; exit 3"],
                  stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False)
    try:
        resp.write_stdin("from-python\n")
        out, err = "", ""
        while resp.is_open():
            resp.update(timeout=5)
            out += resp.read_stdout() if resp.peek_stdout() else ""
            err += resp.read_stderr() if resp.peek_stderr() else ""
        assert (out, err) == ("out:from-python\n", "err\n")
        assert resp.returncode == 3
    finally:
        resp.close()


def test_node_stop_leaves_no_process_mount_namespace_or_route() -> None:
    # A node of its own (one node per cluster): its teardown must leave the shared machine as it was.
    cluster = KubeCluster().start()
    try:
        node = KubeNode(cluster).start()
        try:
            pod = node.run_pod("bw-teardown", "p", ["sh", "-c", "exec sleep 3600"])
            workdir, pod_ip = node.workdir, pod["status"]["podIP"]
            netns, shims = node._netns_paths(), node._our_pids()
            pids = [p.pid for p in node._procs] + shims
            assert netns and shims and Path(netns[0]).exists()
            assert pod_ip in _routes()
            assert (NODES_DIR / f"node-{node.tag}").read_text() == str(os.getpid())
        finally:
            node.stop()
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        assert str(workdir) not in Path("/proc/self/mountinfo").read_text()
        assert not workdir.exists()
        assert not [p for p in netns if Path(p).exists()]
        assert pod_ip not in _routes()
        # The kernel settings are shared with other runs' nodes: restored by the last one to stop.
        assert not (NODES_DIR / f"node-{node.tag}").exists()
        assert cluster.get("/api/v1/nodes")["items"] == []
    finally:
        cluster.stop()


def _routes() -> str:
    return subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
