"""A real Kubernetes control plane for tests and benchmarks: etcd + kube-apiserver on loopback.

The binaries come from ``tests/k8s/build.sh`` (kube-apiserver 1.20.2 built from Debian's
source package, kubectl 1.20 from Debian's .deb, Debian's etcd), cached per machine. Each
:class:`KubeCluster` has its own temp dir, free ports, its own CA (the API server's serving
certificate, client certificates), a service-account key pair and a static token file with
an admin; it is stopped (process groups killed, temp dir removed) by :meth:`stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from appliance.sandbox import free_port, wait_for_port

BUILD_SCRIPT = Path(__file__).with_name("build.sh")

ADMIN_TOKEN = "bw-k8s-admin-token-" + os.urandom(6).hex()


def k8s_binaries() -> Path:
    """The directory with kube-apiserver, kubectl (1.20) and etcd; builds them if missing (minutes)."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tests/k8s/build.sh failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA ``<name>.crt`` / ``<name>.key`` in ``directory``."""
    _openssl(directory, "req", "-new", "-x509", "-days", "2", "-nodes", "-newkey", "rsa:2048",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt")
    return directory / f"{name}.crt", directory / f"{name}.key"


def issue_cert(directory: Path, ca: tuple[Path, Path], name: str, subject: str, *,
               sans: tuple[str, ...] = (), client: bool = False) -> tuple[Path, Path]:
    """A certificate ``<name>.crt`` / ``<name>.key`` signed by ``ca`` (server: with ``sans``)."""
    _openssl(directory, "req", "-new", "-nodes", "-newkey", "rsa:2048", "-subj", subject,
             "-keyout", f"{name}.key", "-out", f"{name}.csr")
    ext = directory / f"{name}.ext"
    lines = ["extendedKeyUsage=" + ("clientAuth" if client else "serverAuth")]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.crt")
    return directory / f"{name}.crt", directory / f"{name}.key"


@dataclass
class KubeCluster:
    """etcd + kube-apiserver on 127.0.0.1 with their own CA, started by :meth:`start`."""

    host: str = "127.0.0.1"
    admin_token: str = ADMIN_TOKEN
    extra_tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (user, groups)
    bin_dir: Path | None = None
    port: int = 0
    workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def kubectl(self) -> str:
        return str(self.bin_dir / "kubectl")

    def start(self, timeout: float = 120) -> "KubeCluster":
        self.bin_dir = self.bin_dir or k8s_binaries()
        self.workdir = Path(tempfile.mkdtemp(prefix="bw-k8s-"))
        d = self.workdir
        ca = make_ca(d, "ca")
        issue_cert(d, ca, "apiserver", "/CN=kube-apiserver",
                   sans=(f"IP:{self.host}", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default.svc"))
        # The API server's client certificate for kubelets (exec/attach/port-forward/logs); a
        # kubelet (tests/k8s/node.py) serves with a certificate from the same CA.
        issue_cert(d, ca, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
                   client=True)
        _openssl(d, "genrsa", "-out", "sa.key", "2048")
        _openssl(d, "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        rows = [f'{self.admin_token},bw-admin,bw-admin-uid,"system:masters"']
        rows += [f'{tok},{user},{user}-uid,"{groups}"' for tok, (user, groups) in self.extra_tokens.items()]
        (d / "tokens.csv").write_text("\n".join(rows) + "\n")
        os.chmod(d / "tokens.csv", 0o600)
        etcd_port, etcd_peer = free_port(), free_port()
        self.port = self.port or free_port()
        self._procs: list[subprocess.Popen] = []
        self._etcd_log = open(d / "etcd.log", "wb")
        self._procs.append(subprocess.Popen(
            [str(self.bin_dir / "etcd"), "--data-dir", str(d / "etcd"), "--name", "bw-test",
             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
             "--initial-cluster", f"bw-test=http://127.0.0.1:{etcd_peer}"],
            stdout=self._etcd_log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            wait_for_port("127.0.0.1", etcd_port, timeout=30)
            self._api_log = open(d / "apiserver.log", "wb")
            self._procs.append(subprocess.Popen(
                [str(self.bin_dir / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                 f"--bind-address={self.host}", f"--secure-port={self.port}", f"--advertise-address={self.host}",
                 f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
                 f"--client-ca-file={d / 'ca.crt'}",
                 f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
                 "--service-account-issuer=https://kubernetes.default.svc",
                 f"--token-auth-file={d / 'tokens.csv'}", "--authorization-mode=RBAC",
                 "--service-cluster-ip-range=10.0.0.0/24", "--insecure-port=0",
                 f"--cert-dir={d / 'certs'}", "--enable-priority-and-fairness=false",
                 f"--kubelet-client-certificate={d / 'apiserver-kubelet-client.crt'}",
                 f"--kubelet-client-key={d / 'apiserver-kubelet-client.key'}",
                 f"--kubelet-certificate-authority={d / 'ca.crt'}", "--kubelet-preferred-address-types=Hostname",
                 f"--audit-policy-file={self._audit_policy(d)}", f"--audit-log-path={self.audit_log}"],
                stdout=self._api_log, stderr=subprocess.STDOUT, start_new_session=True))
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()[-4000:]}")
            try:
                if self.get("/readyz", raw=True) == b"ok":
                    return
            except (OSError, urllib.error.URLError) as e:
                last = str(e)
            time.sleep(0.3)
        raise TimeoutError(f"kube-apiserver not ready after {timeout}s ({last}):\n{self.logs()[-4000:]}")

    # The server's own audit log, for exec/attach/port-forward only: the tests read in it which of
    # those requests reached the server (a request botwarden refused must not be there).
    AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  resources:
  - group: ""
    resources: ["pods/exec", "pods/attach", "pods/portforward"]
- level: None
"""

    def _audit_policy(self, d: Path) -> Path:
        path = d / "audit-policy.yaml"
        path.write_text(self.AUDIT_POLICY)
        return path

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def audit_events(self) -> list[dict]:
        """The server's audit events so far (exec/attach/port-forward requests it received)."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    def logs(self) -> str:
        out = []
        for name in ("etcd.log", "apiserver.log"):
            with contextlib.suppress(OSError):
                out.append((self.workdir / name).read_text(errors="replace"))
        return "\n".join(out)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def request(self, method: str, path: str, body: object | None = None, *, token: str | None = None,
                raw: bool = False, content_type: str = "application/json"):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token or self.admin_token}",
                                              "Content-Type": content_type, "Accept": "application/json"})
        with urllib.request.urlopen(req, context=self.ssl_context(), timeout=30) as r:
            payload = r.read()
        return payload if raw else json.loads(payload)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def kubeconfig(self, path: Path, *, server: str | None = None, token: str | None = None,
                   ca_file: Path | None = None) -> Path:
        """A kubeconfig for kubectl: this cluster (or ``server``, e.g. botwarden) with a bearer token."""
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "bw",
            "clusters": [{"name": "bw", "cluster": {"server": server or self.url,
                                                    "certificate-authority": str(ca_file or self.ca_file)}}],
            "users": [{"name": "bw", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "bw", "context": {"cluster": "bw", "user": "bw"}}],
        }
        path.write_text(json.dumps(doc))  # JSON is YAML
        os.chmod(path, 0o600)
        return path

    def run_kubectl(self, kubeconfig: Path, *args: str, timeout: float = 60,
                    input: str | None = None) -> subprocess.CompletedProcess:
        # A private HOME: kubectl caches discovery under ~/.kube/cache, per server address.
        home = kubeconfig.parent / "home"
        home.mkdir(exist_ok=True)
        return subprocess.run([self.kubectl, f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True,
                              timeout=timeout, input=input, env={**os.environ, "HOME": str(home)})

    def stop(self) -> None:
        for p in reversed(getattr(self, "_procs", [])):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        for f in ("_etcd_log", "_api_log"):
            with contextlib.suppress(AttributeError):
                getattr(self, f).close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
