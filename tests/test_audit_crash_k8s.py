"""Audit durability under kill -9 through the Kubernetes front, with concurrent bots (issue 23;
tests/test_audit_crash.py does the same for PostgreSQL, tests/test_audit_crash_ssh.py for SSH).

Three loops of the real ``kubectl`` run at once through the daemon against the real
kube-apiserver, each deleting its own configmaps one by one by name. Mid-loop the test kills
(SIGKILL) the audit process and the daemon, starts the daemon again on the same state, and
checks that every configmap the API server deleted (the ones whose request the kill cut off
too) has its ``request_starts`` row: in strict mode (the default) a request is journaled before
it is forwarded. The batch window is longer than the test, so nothing of the loops was committed
before the kill: only the journal can keep the records (batched mode loses them: checked by
running this with ``mode = "batched"``). Killing the audit process alone, the daemon goes on:
a request it cannot have recorded meanwhile is refused (503) and never reaches the API
server, and the loops carry on once it has started a new audit process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid

import pytest

from tests.daemon_fixtures import DaemonProcess
from tests.k8s_fixtures import K8sEnv, start_k8s_env
from tests.test_audit_crash import _wait_gone

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

LOOPS = 3
PER_LOOP = 120  # more than run before the kill and after it fails


@pytest.fixture(scope="module")
def env(kube, bao_server, pg_server):
    e = start_k8s_env(kube, bao_server, pg_server, mismatch_targets=False)
    try:
        yield e
    finally:
        e.close()


def _names(env: K8sEnv, ns: str) -> set[str]:
    return {item["metadata"]["name"] for item in env.kube.get(f"/api/v1/namespaces/{ns}/configmaps")["items"]}


@pytest.mark.parametrize("kill", ["both", "audit"])
def test_a_killed_daemon_loses_no_kubernetes_request_that_reached_the_api_server(env: K8sEnv, kill: str) -> None:
    ns = f"bw-crash-{uuid.uuid4().hex[:6]}"
    env.kube.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    created = {f"cm-{j}-{i}" for j in range(LOOPS) for i in range(1, PER_LOOP + 1)}
    for name in sorted(created):
        env.kube.request("POST", f"/api/v1/namespaces/{ns}/configmaps",
                         {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}})
    assert _names(env, ns) == created
    # The env's daemon, again with a batch window longer than the test.
    env.daemon.stop()
    config = env.daemon.config.with_name("crash.toml")
    config.write_text(env.daemon.config.read_text().replace("flush_interval = 0.05",
                                                            "flush_interval = 60\nbatch_max = 50000"))
    crashed = DaemonProcess(config, env.daemon.socket).start()
    restarted = None
    kubeconfig = env.bot_kubeconfig()  # one token, minted now, for every loop
    home = kubeconfig.parent / "home"
    home.mkdir(exist_ok=True)
    # kubectl caches the API's discovery per server under HOME: fetched once here, through botwarden.
    assert env.kubectl(kubeconfig, "get", "configmaps", "-n", ns, "-o", "name").returncode == 0
    loops, said = [], []
    # --wait=false: one request per command, the DELETE (no GET after it that a refusal could fail
    # once the DELETE has run), so a command that failed is a DELETE that was refused.
    for j in range(LOOPS):
        script = (f'i=0; while [ $i -lt {PER_LOOP} ]; do i=$((i+1)); '
                  f'if {env.kube.kubectl} --kubeconfig={kubeconfig} -n {ns} delete configmap cm-{j}-$i --wait=false '
                  f'>/dev/null 2>>{home / f"errors-{ns}-{j}"}; then echo "ok {j} $i"; else echo "fail {j} $i"; fi; done')
        proc = subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, start_new_session=True, env={**os.environ, "HOME": str(home)})
        reader = threading.Thread(target=lambda p=proc: said.extend(line.strip() for line in p.stdout), daemon=True)
        reader.start()
        loops.append((proc, reader))
    try:
        audit_pid = crashed.client().get("/v1/status")["audit"]["pid"]
        deadline = time.monotonic() + 120
        while min(sum(1 for s in list(said) if s.startswith(f"ok {j} ")) for j in range(LOOPS)) < 8:
            assert all(p.poll() is None for p, _ in loops) and time.monotonic() < deadline, \
                (said[-5:], crashed.output()[-3000:])
            time.sleep(0.05)
        os.kill(audit_pid, signal.SIGKILL)  # mid-request: each loop is always inside one
        deadline = time.monotonic() + 60
        if kill == "both":
            crashed.proc.kill()
            crashed.proc.wait()
            while {s.split()[1] for s in list(said) if s.startswith("fail")} != {str(j) for j in range(LOOPS)}:
                assert time.monotonic() < deadline, said[-5:]  # every loop saw the daemon gone
                time.sleep(0.05)
        else:  # the daemon starts a new audit process; the loops go on
            before = {j: sum(1 for s in list(said) if s.startswith(f"ok {j} ")) for j in range(LOOPS)}
            while min(sum(1 for s in list(said) if s.startswith(f"ok {j} ")) - before[j] for j in range(LOOPS)) < 4:
                assert all(p.poll() is None for p, _ in loops) and time.monotonic() < deadline, \
                    (said[-5:], crashed.output()[-3000:])
                time.sleep(0.05)
            assert crashed.client().get("/v1/status")["audit"]["pid"] != audit_pid
        for proc, reader in loops:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            reader.join(10)
        _wait_gone(audit_pid)
        restarted = DaemonProcess(config, env.daemon.socket).start() if kill == "both" else crashed
        deleted = created - _names(env, ns)
        ok = {f"cm-{s.split()[1]}-{s.split()[2]}" for s in said if s.startswith("ok")}
        assert deleted and ok <= deleted, (sorted(ok - deleted), len(deleted))
        assert all(len({n for n in deleted if n.startswith(f"cm-{j}-")}) >= 8 for j in range(LOOPS))
        if kill == "audit":  # fail closed: what kubectl saw refused never reached the API server
            failed = {f"cm-{s.split()[1]}-{s.split()[2]}" for s in said if s.startswith("fail")}
            assert not failed & deleted, sorted(failed & deleted)
            if failed:  # and it was told why, as a Kubernetes status
                errors = "".join((home / f"errors-{ns}-{j}").read_text() for j in range(LOOPS))
                # (a new session: "refuses new sessions: the audit store is unavailable (<why>)"; a
                # request of an open one, whose record the dead process never acknowledged: "cannot
                # take this request's record (audit store unavailable: <why>)")
                lines = errors.splitlines()
                assert lines and all(line.startswith("Error from server (ServiceUnavailable): botwarden") and
                                     ("the audit store is unavailable (" in line or
                                      "the audit store cannot take this request's record (audit store unavailable: "
                                      in line) and "unaudited, try again later" in line for line in lines), \
                    [line for line in lines if "refuses new sessions" not in line][:5] or lines[:5]
        started = {m.group(1) for r in restarted.audit_sql("SELECT text FROM request_starts WHERE text LIKE ?",
                                                            [f"delete configmaps cm-% in {ns}%"])
                   if (m := re.match(r"delete configmaps (cm-\d+-\d+) in ", r["text"]))}
        # Every request the API server carried out has its record, journaled before it went
        # upstream (the ones the kill cut off too: their configmap is gone whether or not
        # kubectl saw the answer).
        missing = sorted(deleted - started)
        assert missing == [], (missing, len(deleted), len(started))
        report = restarted.client().post("/v1/audit/verify", {"allow_gaps": True}, timeout=300)["report"]
        assert "replayed from its journal" in report, report
        # The restarted daemon serves the bots again.
        assert env.kubectl(kubeconfig, "get", "configmaps", "-n", ns, "-o", "name").returncode == 0
    finally:
        for proc, _ in loops:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for d in {id(d): d for d in (restarted, crashed) if d is not None}.values():
            d.stop()
        try:
            env.kube.request("DELETE", f"/api/v1/namespaces/{ns}")
        except Exception:
            pass
