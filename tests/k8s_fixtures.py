"""A real kube-apiserver (tests/k8s/cluster.py) behind a real botwarden daemon, for kubectl tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from appliance.control import ControlClient
from appliance.sandbox import OpenBaoSetup, config_header
from tests.daemon_fixtures import DaemonProcess, fresh_setup, new_port
from tests.k8s.cluster import KubeCluster, issue_cert, make_ca

K8S_RULES = """
[[rules]]
name = "no-namespace-deletes"
action = "block"
description = "namespaces are deleted by humans"
[rules.k8s]
verbs = ["delete", "deletecollection"]
resources = ["namespaces"]

[[rules]]
name = "deployment-deletes-need-approval"
action = "approve"
[rules.k8s]
verbs = ["delete"]
resources = ["deployments"]
api_groups = ["apps"]
dry_run = false  # `kubectl delete --dry-run=server` runs without waiting

# `kubectl delete pods -l app=...` lists by the selector first: refused there.
[[rules]]
name = "no-pod-deletes-by-app-selector"
action = "block"
[rules.k8s]
verbs = ["list", "deletecollection"]
resources = ["pods"]
label_selectors = ["app=*"]

[[rules]]
name = "pod-deletes-by-name"
action = "allow"
[rules.k8s]
verbs = ["delete"]
resources = ["pods"]

[[rules]]
name = "no-json-patches"
action = "block"
[rules.k8s]
verbs = ["patch"]
patch_types = ["json"]

[[rules]]
name = "no-exec-in-locked-namespaces"
action = "block"
[rules.k8s]
subresources = ["exec", "attach", "portforward"]
namespaces = ["locked-*"]

# `kubectl exec -- cmd`: the command, read by the SSH command analysis (sh -c included).
[[rules]]
name = "no-destructive-exec"
action = "block"
[rules.k8s]
subresources = ["exec"]
programs = ["rm", "shred", "dd"]

[[rules]]
name = "mask-secrets"
action = "mask"
[rules.k8s]
resources = ["secrets"]

[[rules]]
name = "mask-config-passwords"
action = "mask"
[rules.k8s]
namespaces = ["masked-*"]
mask_paths = ["ConfigMap.data.password", "Pod.spec.containers[*].env[name=*PASSWORD*].value"]
"""


@dataclass
class K8sEnv:
    kube: KubeCluster
    bao: OpenBaoSetup
    daemon: DaemonProcess
    workdir: Path
    listen_port: int
    bot_ca: Path
    down_listen_port: int = 0  # the listener of target cluster-down (an API server that is down)
    wrong_ca_listen_port: int = 0  # target cluster-wrong-ca: the API server's CA is not the configured one
    wrong_name_listen_port: int = 0  # target cluster-wrong-name: its certificate does not name server_name

    @property
    def client(self) -> ControlClient:
        return self.daemon.client()

    def close(self) -> None:
        """Stop the daemon, then remove the work directory (configs, keys, kubeconfigs)."""
        try:
            self.daemon.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def bot_kubeconfig(self, token: str | None = None, name: str | None = None, port: int | None = None) -> Path:
        """A bot's kubeconfig: the API server's name (here the front's loopback listener, as the
        probes would redirect it), the CA botwarden's certificate chains to, the bot's OIDC token."""
        path = self.workdir / f"{name or uuid.uuid4().hex[:8]}.kubeconfig"
        return self.kube.kubeconfig(path, server=f"https://127.0.0.1:{port or self.listen_port}",
                                    token=token if token is not None else self.bao.mint_token(), ca_file=self.bot_ca)

    def direct_kubeconfig(self) -> Path:
        return self.kube.kubeconfig(self.workdir / "direct.kubeconfig")

    def kubectl(self, kubeconfig: Path, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.kube.run_kubectl(kubeconfig, *args, **kw)


def configure_k8s_engine(bao_server, bao: OpenBaoSetup, kube: KubeCluster, *, tag: str | None = None,
                        ttl: str = "10m") -> tuple[str, str]:
    """OpenBao's kubernetes secrets engine for ``kube``, configured as an operator would: a role
    that creates a service account bound (RoleBinding: that namespace only) to the ClusterRole
    ``cluster-admin`` for each session. (Not ``edit``: it is an aggregated role whose rules the
    controller manager fills in, and the test cluster runs none.) Returns (mount, role); the appliance's AppRole may ask it for tokens."""
    tag = tag or uuid.uuid4().hex[:6]
    root = bao_server.client()
    mount, role = f"k8s-{tag}", "bot-session"
    root.sys.enable_secrets_engine("kubernetes", path=mount)
    root.write(f"{mount}/config", kubernetes_host=kube.url, kubernetes_ca_cert=kube.ca_file.read_text(),
               service_account_jwt=kube.admin_token, disable_local_ca_jwt=True)
    root.write(f"{mount}/roles/{role}", allowed_kubernetes_namespaces=["*"], kubernetes_role_type="ClusterRole",
               kubernetes_role_name="cluster-admin", token_default_ttl=ttl)
    appliance_role = f"{bao.db_mount.removesuffix('-db')}-appliance"
    root.sys.create_or_update_policy(f"{mount}-creds", f'path "{mount}/creds/*" {{ capabilities = ["update"] }}')
    root.auth.approle.create_or_update_approle(appliance_role, token_policies=[appliance_role, f"{mount}-creds"],
                                               token_ttl="1h", token_max_ttl="24h")
    return mount, role


def start_k8s_env(kube: KubeCluster, bao_server, pg_server, *, rules: str = K8S_RULES,
                  approvals_timeout_s: int = 60, credential: str | None = None, probes: str = 'mode = "off"',
                  authentication: str = "token", identity_process: str = "", vault_timeout: float | None = None,
                  mismatch_targets: bool = True) -> K8sEnv:
    """``credential``: a [targets.credential] body; default a static token (the cluster's admin).
    ``probes``: the [probes] body; ``identity_process``: an [identities.process] body;
    ``vault_timeout``: [vault] timeout (a hung OpenBao is noticed after that, not hvac's default);
    ``mismatch_targets``: the targets cluster-wrong-ca / cluster-wrong-name, which name the same
    address as cluster (the eBPF probes take one target per address: off with them)."""
    workdir = Path(tempfile.mkdtemp(prefix="bw-k8s-env-"))
    bao = fresh_setup(bao_server, pg_server, workdir)
    if credential is not None and "{engine}" in credential:
        mount, role = configure_k8s_engine(bao_server, bao, kube)
        credential = credential.replace("{engine}", f'mount = "{mount}"\nrole = "{role}"')
    ca = make_ca(workdir, "bot-ca")
    cert, key = issue_cert(workdir, ca, "front", "/CN=kube-apiserver",
                           sans=("IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes"))
    token_file = workdir / "k8s-token"
    token_file.write_text(kube.admin_token + "\n")
    token_file.chmod(0o600)
    port, down_port, down_listen = new_port(), new_port(), new_port()
    wrong_ca_listen, wrong_name_listen = new_port(), new_port()
    header = config_header(workdir, bao, approvals_timeout_s=approvals_timeout_s, probes=probes)
    if vault_timeout is not None:
        header = header.replace('auth = "approle"\n', f'auth = "approle"\ntimeout = {vault_timeout}\n', 1)
    mismatch = f"""# The real API server, but the configured CA did not sign its certificate (a man in the middle
# looks like this), or the certificate does not name the configured server_name.
[[targets]]
name = "cluster-wrong-ca"
protocol = "kubernetes"
address = "127.0.0.1:{kube.port}"
listen = "127.0.0.1:{wrong_ca_listen}"
[targets.tls]
mode = "verify-full"
ca_file = "{ca[0]}"
[targets.credential]
source = "static"
username = "bw-admin"
password_file = "{token_file}"

[[targets]]
name = "cluster-wrong-name"
protocol = "kubernetes"
address = "127.0.0.1:{kube.port}"
listen = "127.0.0.1:{wrong_name_listen}"
[targets.tls]
mode = "verify-full"
ca_file = "{kube.ca_file}"
server_name = "not-the-api-server.example"
[targets.credential]
source = "static"
username = "bw-admin"
password_file = "{token_file}"

""" if mismatch_targets else ""
    config = workdir / "botwarden.toml"
    config.write_text(header + f"""
[tls]
cert_file = "{cert}"
key_file = "{key}"

[[targets]]
name = "cluster"
protocol = "kubernetes"
address = "127.0.0.1:{kube.port}"
listen = "127.0.0.1:{port}"
authentication = "{authentication}"
[targets.tls]
mode = "verify-full"
ca_file = "{kube.ca_file}"
[targets.credential]
{credential or f'source = "static"{chr(10)}username = "bw-admin"{chr(10)}password_file = "{token_file}"'}

# An API server that is down: nothing listens at its address.
[[targets]]
name = "cluster-down"
protocol = "kubernetes"
address = "127.0.0.1:{down_port}"
listen = "127.0.0.1:{down_listen}"
[targets.tls]
mode = "verify-full"
ca_file = "{kube.ca_file}"
[targets.credential]
source = "static"
username = "bw-admin"
password_file = "{token_file}"

{mismatch}[[identities]]
name = "deploy-bot"
groups = ["bots"]
[identities.token]
subject = "{bao.bot_entity_id()}"
{"[identities.process]" + chr(10) + identity_process if identity_process else ""}
{rules}
""")
    daemon = DaemonProcess(config, workdir / "run" / "control.sock").start()
    return K8sEnv(kube, bao, daemon, workdir, port, ca[0], down_listen, wrong_ca_listen, wrong_name_listen)
