"""A real Kubernetes node for tests: kubelet 1.20.2 + containerd + runc on this machine, joined to a KubeCluster.

Opt-in (the control plane alone needs none of it): ``KubeNode(kube).start()`` builds the kubelet
and pause binaries if missing (``tests/k8s/build.sh --node``), starts a private containerd (its
own config, root, state and socket in a temp dir; never the system's), imports the two images
``tests/k8s/images.py`` builds offline (pause, busybox), starts the kubelet with a serving
certificate from the cluster's CA on a free loopback port, and waits for the Node to be Ready.
Pods are placed with ``spec.nodeName`` (there is no scheduler) and get their own network
namespace from the CNI ``ptp`` plugin in a private /24. :meth:`stop` deletes the node's pods,
kills the processes by pid, removes the containers, unmounts what they mounted and restores the
kernel settings the kubelet changes (when no other node runs on the machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from appliance.sandbox import free_port, wait_for_port
from tests.k8s.cluster import BUILD_SCRIPT, KubeCluster, issue_cert
from tests.k8s.images import BUSYBOX_IMAGE, PAUSE_IMAGE, busybox_image, pause_image

# The kubelet (container manager start-up) sets these host sysctls to its defaults; they are put
# back when the last node on the machine stops. Nodes of parallel test runs share the machine, so
# the values from before the first one are kept machine-wide (SYSCTL_STATE) and each running node
# registers its test process's pid under NODES_DIR; a registration whose process is gone (a run
# that was killed) does not count.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
NODES_DIR = Path("/run/botwarden-k8s-nodes")
SYSCTL_STATE = NODES_DIR / "sysctls.json"


@contextlib.contextmanager
def _nodes_lock():
    NODES_DIR.mkdir(exist_ok=True)
    with open(NODES_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _live_registrations() -> list[Path]:
    return [f for f in NODES_DIR.glob("node-*") if Path(f"/proc/{f.read_text().strip()}").exists()]


def _register_node(tag: str) -> None:
    with _nodes_lock():
        # A state file left by a killed run holds the values from before its node: keep those.
        if not SYSCTL_STATE.exists():
            SYSCTL_STATE.write_text(json.dumps({k: Path("/proc/sys", k).read_text() for k in KUBELET_SYSCTLS}))
        (NODES_DIR / f"node-{tag}").write_text(str(os.getpid()))


def _unregister_node(tag: str) -> None:
    with _nodes_lock():
        with contextlib.suppress(FileNotFoundError):
            (NODES_DIR / f"node-{tag}").unlink()
        if _live_registrations() or not SYSCTL_STATE.exists():
            return
        for key, value in json.loads(SYSCTL_STATE.read_text()).items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", key).write_text(value)
        SYSCTL_STATE.unlink()


def node_binaries() -> Path:
    """The cache directory with kubelet and pause besides the control plane (builds them if missing)."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--node"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tests/k8s/build.sh --node failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _free_pod_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.128.0.0/9 that no route on this machine covers (other runs, test namespaces)."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    used = []
    for line in routes.splitlines():
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(line.split()[0] if line.split()[0] not in ("local", "broadcast")
                                             else line.split()[1], strict=False))
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(128, 254)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free /24 for the test node's pods")


CONTAINERD_CONFIG = """version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.ttrpc.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # No CAP_SYS_RESOURCE here: runc cannot lower oom_score_adj (the pause container's -998);
  # clamp pods' values to containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{d}/runc"
"""


@dataclass
class KubeNode:
    """One kubelet + containerd node registered with ``cluster`` as :attr:`name`."""

    cluster: KubeCluster
    # The API server reaches a kubelet at one of the Node's addresses; the kubelet refuses a
    # loopback --node-ip, so the node is called "localhost" and the API server dials its Hostname
    # address (--kubelet-preferred-address-types=Hostname). One node per cluster, then; each
    # KubeCluster has its own etcd, so two runs never share a node name.
    name: str = "localhost"
    tag: str = field(default_factory=lambda: os.urandom(4).hex())
    bin_dir: Path | None = None
    workdir: Path | None = None
    kubelet_port: int = 0
    pod_subnet: ipaddress.IPv4Network | None = None
    start_seconds: float = 0.0

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd.sock"

    def start(self, timeout: float = 180) -> "KubeNode":
        began = time.monotonic()
        self.bin_dir = self.bin_dir or node_binaries()
        # Short path: unix socket paths are limited to 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="bw-node-", dir="/tmp"))
        self._procs: list[subprocess.Popen] = []
        self._logs: list = []
        _register_node(self.tag)
        self._registered = True
        try:
            self._start_containerd()
            self._import_images()
            self._grant_node_role()
            self._start_kubelet()
            self._wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    # -- containerd ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        self._logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(proc)
        return proc

    def _start_containerd(self) -> None:
        d = self.workdir
        (d / "cni").mkdir()
        self.pod_subnet = self.pod_subnet or _free_pod_subnet()
        # ptp: a veth pair per pod and a host route to its address; no bridge, no iptables (ipMasq
        # off), IPAM state in the temp dir. Pods only need to be reachable from this host.
        (d / "cni" / "10-bw.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": f"bw-node-{self.tag}",
            "plugins": [{"type": "ptp", "ipMasq": False,
                         "ipam": {"type": "host-local", "subnet": str(self.pod_subnet),
                                  "dataDir": str(d / "cni-ipam")}},
                        {"type": "loopback"}]}))
        (d / "containerd.toml").write_text(CONTAINERD_CONFIG.format(d=d, pause=PAUSE_IMAGE))
        self._spawn("containerd", ["containerd", "--config", str(d / "containerd.toml")])
        deadline = time.monotonic() + 30
        while not self.containerd_socket.exists():
            if self._procs[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{self.logs()[-3000:]}")
            time.sleep(0.1)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, check=check, timeout=60)

    def _import_images(self) -> None:
        for build, file in ((lambda p: pause_image(p, self.bin_dir / "pause"), "pause.tar"),
                            (busybox_image, "busybox.tar")):
            self.ctr("images", "import", str(build(self.workdir / file)))

    # -- kubelet ------------------------------------------------------------------------------

    def _grant_node_role(self) -> None:
        """Bind the built-in ClusterRole system:node to this node's user (there is no Node authorizer)."""
        self.cluster.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": f"bw-node-{self.tag}"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": f"system:node:{self.name}"}]})

    def _start_kubelet(self) -> None:
        d, c = self.workdir, self.cluster
        ca = (c.ca_file, c.workdir / "ca.key")
        issue_cert(d, ca, "kubelet-serving", f"/CN={self.name}", sans=("IP:127.0.0.1", "DNS:localhost"))
        issue_cert(d, ca, "kubelet-client", f"/O=system:nodes/CN=system:node:{self.name}", client=True)
        kubeconfig = d / "kubelet.kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "node",
            "clusters": [{"name": "c", "cluster": {"server": c.url, "certificate-authority": str(c.ca_file)}}],
            "users": [{"name": "node", "user": {"client-certificate": str(d / "kubelet-client.crt"),
                                                "client-key": str(d / "kubelet-client.key")}}],
            "contexts": [{"name": "node", "context": {"cluster": "c", "user": "node"}}]}))
        self.kubelet_port = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "127.0.0.1", "port": self.kubelet_port, "readOnlyPort": 0,
            "healthzPort": 0,
            "tlsCertFile": str(d / "kubelet-serving.crt"), "tlsPrivateKeyFile": str(d / "kubelet-serving.key"),
            # The API server calls the kubelet (exec, attach, port-forward, logs) with its
            # --kubelet-client-certificate; only this cluster's CA is trusted, and any client it
            # signed may do anything (the test CA signs nothing else that reaches this port).
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(c.ca_file)}},
            "authorization": {"mode": "AlwaysAllow"},
            # cgroup v1 here, no systemd: plain cgroupfs, no QoS hierarchy or node allocatable
            # enforcement (they would need the kubelet to own the root cgroups).
            "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
            "failSwapOn": False,
            # Leave the host's iptables alone (no KUBE-* chains; pods need no NAT here).
            "makeIPTablesUtilChains": False,
            "volumePluginDir": str(d / "volume-plugins"),
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
        }
        (d / "kubelet.yaml").write_text(json.dumps(config))  # JSON is YAML
        self._spawn("kubelet", [
            str(self.bin_dir / "kubelet"), f"--config={d / 'kubelet.yaml'}", f"--kubeconfig={kubeconfig}",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.containerd_socket}",
            f"--root-dir={d / 'kubelet'}", f"--cert-dir={d / 'kubelet-certs'}",
            f"--hostname-override={self.name}",
            f"--pod-infra-container-image={PAUSE_IMAGE}", "--v=2"])

    def _wait_ready(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()[-4000:]}")
            try:
                node = self.cluster.get(f"/api/v1/nodes/{self.name}")
                ready = [c for c in node.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
                if ready and ready[0]["status"] == "True":
                    return
                last = json.dumps(ready)
            except (OSError, urllib.error.URLError) as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"node {self.name} not Ready ({last}):\n{self.logs()[-4000:]}")

    # -- pods ---------------------------------------------------------------------------------

    def create_namespace(self, namespace: str) -> str:
        """A namespace with its ``default`` ServiceAccount (no controller-manager creates it here)."""
        with contextlib.suppress(urllib.error.HTTPError):  # 409: exists already
            self.cluster.request("POST", "/api/v1/namespaces",
                                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        with contextlib.suppress(urllib.error.HTTPError):
            self.cluster.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                                 {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})
        return namespace

    def pod_manifest(self, name: str, command: list[str], *, image: str = BUSYBOX_IMAGE,
                     stdin: bool = False, tty: bool = False, ports: tuple[int, ...] = ()) -> dict:
        """A one-container pod bound to this node (``spec.nodeName``; no scheduler here)."""
        container = {"name": "main", "image": image, "imagePullPolicy": "Never", "command": command,
                     "stdin": stdin, "tty": tty}
        if ports:
            container["ports"] = [{"containerPort": p} for p in ports]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"nodeName": self.name, "containers": [container],
                         "automountServiceAccountToken": False,  # no token controller here
                         "terminationGracePeriodSeconds": 1, "restartPolicy": "Never"}}

    def run_pod(self, namespace: str, name: str, command: list[str], *, timeout: float = 90, **kw) -> dict:
        """Create a pod on this node and wait until its container runs; returns the pod."""
        self.create_namespace(namespace)
        self.cluster.request("POST", f"/api/v1/namespaces/{namespace}/pods", self.pod_manifest(name, command, **kw))
        return self.wait_pod(namespace, name, "Running", timeout=timeout)

    def wait_pod(self, namespace: str, name: str, phase: str, *, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        pod: dict = {}
        while time.monotonic() < deadline:
            pod = self.cluster.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
            if pod.get("status", {}).get("phase") == phase:
                return pod
            time.sleep(0.3)
        raise TimeoutError(f"pod {namespace}/{name} not {phase}: {json.dumps(pod.get('status'))}\n"
                           f"{self.logs()[-3000:]}")

    # -- teardown -----------------------------------------------------------------------------

    def logs(self) -> str:
        out = []
        for name in ("containerd.log", "kubelet.log"):
            with contextlib.suppress(OSError, TypeError):
                out.append(f"--- {name}\n" + (self.workdir / name).read_text(errors="replace")[-6000:])
        return "\n".join(out)

    def _delete_pods(self, timeout: float = 30) -> None:
        """Delete this node's pods through the API; the kubelet stops them (CNI teardown, netns removed)."""
        path = f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.name}"
        with contextlib.suppress(OSError, urllib.error.URLError):
            for pod in self.cluster.get(path)["items"]:
                meta = pod["metadata"]
                with contextlib.suppress(urllib.error.HTTPError):
                    self.cluster.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}")
            deadline = time.monotonic() + timeout
            while self.cluster.get(path)["items"] and time.monotonic() < deadline:
                time.sleep(0.5)

    def _our_pids(self) -> list[int]:
        """containerd shims of this node: their command line names this node's socket (unique path)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    if b"containerd-shim" in argv[0] and str(self.containerd_socket).encode() in argv:
                        pids.append(int(entry.name))
        return pids

    def _netns_paths(self) -> list[str]:
        """The network namespaces containerd created for this node's pod sandboxes."""
        paths = []
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            info = self.ctr("containers", "info", cid, check=False).stdout
            with contextlib.suppress(ValueError, KeyError, TypeError):
                for ns in json.loads(info)["Spec"]["linux"]["namespaces"]:
                    if ns.get("type") == "network" and ns.get("path", "").startswith("/var/run/netns/"):
                        paths.append(ns["path"])
        return paths

    def stop(self) -> None:
        if self.workdir is None:
            return
        kubelet_running = any(p.poll() is None and "kubelet" in p.args[0] for p in getattr(self, "_procs", []))
        if kubelet_running:
            self._delete_pods()
        netns: list[str] = []
        for p in reversed(getattr(self, "_procs", [])):
            if "containerd" in p.args[0] and p.poll() is None:
                # Whatever the kubelet left: kill the tasks, remove the containers.
                netns = self._netns_paths()
                for cid in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
                    self.ctr("tasks", "delete", "-f", cid, check=False)
                for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                    self.ctr("containers", "delete", cid, check=False)
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        for pid in self._our_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for log in getattr(self, "_logs", []):
            log.close()
        # Mounts under the temp dir (rootfs overlays, shm, pod volumes) deepest first, then the
        # sandboxes' network namespaces (their veth ends and routes go with them).
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(str(self.workdir) + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        for path in netns:
            subprocess.run(["umount", path], capture_output=True)
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.cluster.request("DELETE", f"/api/v1/nodes/{self.name}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            self.cluster.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/bw-node-{self.tag}")
        if getattr(self, "_registered", False):
            _unregister_node(self.tag)
            self._registered = False
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None
