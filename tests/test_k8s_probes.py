"""kubectl in a bots cgroup reaches the Kubernetes front through the eBPF redirect (issue 17.2).

The bot's kubeconfig names the API server's real address; the kernel sends the connection to
botwarden, which knows which process asked (token + attestation)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from probes import cgroups
from tests.daemon_fixtures import ROOT
from tests.k8s_fixtures import start_k8s_env

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

TAG = uuid.uuid4().hex[:6]
BOTS = f"botwarden-k8s-{TAG}.bots"
BOT = "kube-bot"


@pytest.fixture(scope="module")
def env(kube, bao_server, pg_server):
    probes = (f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "/sys/fs/bpf/botwarden-k8s-{TAG}"\n'
              f'nft_table = "botwarden_k8s_{TAG}"\nmap_entries = 4096')
    e = start_k8s_env(kube, bao_server, pg_server, probes=probes, authentication="token+attestation",
                      identity_process=f'cgroup = "{BOT}"\nuid_not = [0]', mismatch_targets=False)
    try:
        yield e
    finally:
        try:
            e.daemon.stop()
        finally:
            try:  # programs detached, pins removed, then the bots' cgroup
                res = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(e.daemon.config),
                                      "probes", "detach"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
                assert res.returncode == 0, res.stderr
            finally:
                cgroups.remove(BOTS)
                shutil.rmtree(e.workdir, ignore_errors=True)


def test_kubectl_against_the_real_address_is_redirected_attested_and_decided(env) -> None:
    home = Path(tempfile.mkdtemp(prefix="bw-k8s-bot-"))
    os.chmod(home, 0o777)
    # The kubeconfig names the API server itself; only the CA is botwarden's.
    kubeconfig = env.kube.kubeconfig(home / "config", server=env.kube.url, token=env.bao.mint_token(),
                                     ca_file=env.bot_ca)
    os.chmod(kubeconfig, 0o644)
    os.chmod(env.bot_ca, 0o644)
    os.chmod(env.bot_ca.parent, 0o755)
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(env.daemon.config), "bot", "run",
                           "--name", BOT, "--user", "nobody", "--", env.kube.kubectl, f"--kubeconfig={kubeconfig}",
                           "delete", "namespace", "default"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home)})
    # Decided by botwarden (the rule's Status), so the connection went through the front.
    assert proc.returncode != 0
    assert "Error from server (Forbidden): blocked by botwarden rule 'no-namespace-deletes'" in proc.stderr, proc.stderr
    # The session's end row follows kubectl's exit (the front sees the connection close): wait for it.
    deadline = time.monotonic() + 20
    while True:
        rows = env.daemon.audit_sql(
            "SELECT identity, attribution_source, exe, uid FROM sessions WHERE protocol = 'k8s' AND outcome = 'ok' "
            "AND attribution_source = 'ebpf'")
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows and rows[-1]["identity"] == "deploy-bot" and rows[-1]["exe"].endswith("/kubectl"), \
        env.daemon.audit_sql("SELECT identity, attribution_source, outcome, error FROM sessions WHERE protocol = 'k8s'")
    assert rows[-1]["uid"] == 65534


def test_a_valid_token_from_a_process_outside_the_bots_cgroup_is_refused(env) -> None:
    # Straight to the front's listener, from the test process's cgroup: nothing attests it.
    res = env.kubectl(env.bot_kubeconfig(), "get", "namespaces")
    assert res.returncode != 0
    assert "botwarden refused the connection" in res.stderr, res.stderr
    rows = env.daemon.audit_sql(
        "SELECT outcome, token_subject, attribution_source FROM sessions WHERE protocol = 'k8s' AND outcome = 'refused'")
    assert rows and rows[-1]["attribution_source"] == "none"
    assert rows[-1]["token_subject"] == env.bao.bot_entity_id()  # a valid token: its subject is on record
