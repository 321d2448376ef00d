"""exec, attach, logs -f and port-forward through the Kubernetes front, into pods a real kubelet
runs (tests/k8s/node.py), with real kubectl 1.20 (SPDY/3.1) and the ``kubernetes`` Python client
(WebSocket ``v4.channel.k8s.io``) — issue 17 items 2 and 6, issue 18's exec streams.

The front decides the upgrade request first, then relays the API server's 101 and the bytes both
ways unchanged; a copy of each direction is read on the side for the recording.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
import uuid

import pytest
from kubernetes import client as k8s_client
from kubernetes.stream import stream
from websocket import WebSocketConnectionClosedException

from appliance.sandbox import free_port
from tests.k8s.node import KubeNode
from tests.k8s_fixtures import K8S_RULES, K8sEnv, start_k8s_env
from tests.test_probes_e2e import cli

HELD_EXEC_RULE = """
[[rules]]
name = "exec-in-held-namespaces-needs-approval"
action = "approve"
[rules.k8s]
subresources = ["exec"]
namespaces = ["held-*"]
"""


@pytest.fixture(scope="module")
def env(kube, kube_node, bao_server, pg_server):
    e = start_k8s_env(kube, bao_server, pg_server, rules=K8S_RULES + HELD_EXEC_RULE, mismatch_targets=False)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture(scope="module")
def ns(kube_node: KubeNode) -> str:
    return kube_node.create_namespace(f"bw-relay-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def shell_pod(kube_node: KubeNode, ns: str) -> str:
    kube_node.run_pod(ns, "shell", ["sh", "-c", "echo started; exec sleep 3600"])
    return "shell"


def _pod_name() -> str:
    return "p-" + uuid.uuid4().hex[:6]


def _home(kubeconfig) -> dict:
    home = kubeconfig.parent / f"home-{kubeconfig.stem}"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "PATH": "/usr/bin:/bin"}


def _last_request(env: K8sEnv, like: str) -> dict:
    rows = env.daemon.audit_sql("SELECT * FROM requests WHERE text LIKE ? ORDER BY ts", [like])
    assert rows, like
    return rows[-1]


def _recording(env: K8sEnv, session_id: str) -> list[tuple[str, object]]:
    rows = env.daemon.audit_sql("SELECT direction, to_base64(data) AS data FROM recordings WHERE session_id = ? "
                                "ORDER BY seq", [session_id])
    chunks = [(r["direction"], base64.b64decode(r["data"])) for r in rows]
    return [(k, json.loads(d) if k == "event" else d) for k, d in chunks]


def _ended_recording(env: K8sEnv, session_id: str, end: str = "exec_end") -> list[tuple[str, object]]:
    """The session's recording once its exec's ``end`` event is in it (the store commits in batches)."""
    deadline = time.monotonic() + 20
    while True:
        rec = _recording(env, session_id)
        if any(k == "event" and d.get("type") == end for k, d in rec) or time.monotonic() > deadline:
            return rec
        time.sleep(0.3)


def _python_api(env: K8sEnv) -> k8s_client.CoreV1Api:
    """The ``kubernetes`` Python client as a bot uses it: botwarden's listener, its OIDC token."""
    config = k8s_client.Configuration()
    config.host = f"https://127.0.0.1:{env.listen_port}"
    config.ssl_ca_cert = str(env.bot_ca)
    config.api_key = {"authorization": "Bearer " + env.bao.mint_token()}
    return k8s_client.CoreV1Api(k8s_client.ApiClient(config))


def _wait_rows(env: K8sEnv, like: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        rows = env.daemon.audit_sql("SELECT * FROM requests WHERE text LIKE ? ORDER BY ts", [like])
        if rows or time.monotonic() > deadline:
            assert rows, like
            return rows[-1]
        time.sleep(0.2)


def test_exec_through_botwarden_gives_what_direct_gives(env: K8sEnv, ns: str, shell_pod: str) -> None:
    argv = ("exec", shell_pod, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    want = env.kubectl(env.direct_kubeconfig(), "-n", ns, *argv)
    got = env.kubectl(env.bot_kubeconfig(), "-n", ns, *argv)
    assert want.returncode == 3 and want.stdout == "out\n", want.stderr
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)
    row = _wait_rows(env, f"create pods/exec {shell_pod} in {ns} -- sh -c 'echo out; echo err >&2; exit 3'%")
    assert (row["decision"], row["sqlstate"]) == ("allow", "101")
    assert "exit_code=3" in row["params"]
    assert row["rows"] > 0  # the bytes the bot got over the upgraded connection


def test_exec_stdin_is_relayed_and_the_recording_has_the_output_not_the_input(env: K8sEnv, ns: str,
                                                                               shell_pod: str, tmp_path) -> None:
    payload = "".join(f"line {i} of the bot's input\n" for i in range(2000))
    res = env.kubectl(env.bot_kubeconfig(), "-n", ns, "exec", "-i", shell_pod, "--",
                      "sh", "-c", "tr a-z A-Z; echo done", input=payload)
    assert res.returncode == 0, res.stderr
    assert res.stdout == payload.upper() + "done\n"
    row = _wait_rows(env, f"create pods/exec {shell_pod} in {ns} -- sh -c 'tr a-z A-Z; echo done'%")
    rec = _ended_recording(env, row["session_id"])
    ends = [d for k, d in rec if k == "event" and d.get("type") == "exec_end"]
    starts = [d for k, d in rec if k == "event" and d.get("type") == "exec"]
    assert starts and starts[0]["request_id"] == row["request_id"] and starts[0]["protocol"] == "v4.channel.k8s.io"
    assert ends and ends[0]["exit_code"] == 0 and ends[0]["stdin"] == len(payload)
    out = b"".join(d for k, d in rec if k == "out")
    assert payload.upper().encode() + b"done\n" in out
    assert b"line 1 of the bot's input" not in b"".join(d for k, d in rec if k == "in")  # stdin: counted only
    cast = tmp_path / "exec.cast"
    exported = cli(env.daemon.config, "session", "export", row["session_id"], "--cast", str(cast))
    assert exported.returncode == 0, exported.stderr
    from asciinema.asciicast import open_from_url

    with open_from_url(str(cast)) as a:
        assert a.v2_header["version"] == 2
        text = "".join(e[2] for e in a.events() if e[1] == "o")
    assert "LINE 1999 OF THE BOT'S INPUT" in text and "done" in text


def test_an_exec_a_mask_rule_applies_to_is_refused_before_the_kubelet(env: K8sEnv, kube_node: KubeNode) -> None:
    # K8S_RULES' mask-config-passwords masks Pod env values (and more) in masked-* namespaces;
    # `exec -- env` would print them unmasked. botwarden masks objects, not a command's output:
    # the exec is refused with a Status saying so, and never reaches the pod (fail closed).
    ns = kube_node.create_namespace(f"masked-relay-{uuid.uuid4().hex[:6]}")
    kube_node.run_pod(ns, "shell", ["sh", "-c", "exec sleep 3600"])
    res = env.kubectl(env.bot_kubeconfig(), "-n", ns, "exec", "shell", "--", "sh", "-c", "touch /tmp/ran; env")
    assert res.returncode == 1 and res.stdout == ""
    assert "cannot mask a command's output" in res.stderr and "mask-config-passwords" in res.stderr, res.stderr
    row = _wait_rows(env, f"create pods/exec shell in {ns} -- %")
    assert (row["decision"], row["sqlstate"]) == ("block", "403")
    ran = env.kubectl(env.direct_kubeconfig(), "-n", ns, "exec", "shell", "--", "test", "-e", "/tmp/ran")
    assert ran.returncode == 1, "the refused exec ran in the pod"


def test_a_held_exec_runs_once_approved_and_a_blocked_one_never_reaches_the_kubelet(
        env: K8sEnv, kube_node: KubeNode) -> None:
    held_ns = kube_node.create_namespace(f"held-{uuid.uuid4().hex[:6]}")
    kube_node.run_pod(held_ns, "w", ["sh", "-c", "exec sleep 3600"])
    bot = env.bot_kubeconfig()
    before = {a["approval_id"] for a in env.client.get("/v1/approvals")["approvals"]}
    proc = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", held_ns, "exec", "w", "--",
                             "sh", "-c", "echo approved-run > /tmp/ran; cat /tmp/ran"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_home(bot))
    try:
        deadline = time.monotonic() + 30
        held = []
        while not held and time.monotonic() < deadline:
            held = [a for a in env.client.get("/v1/approvals")["approvals"] if a["approval_id"] not in before]
            time.sleep(0.2)
        assert held, "the exec was not held"
        # Nothing ran while it waited.
        check = env.kubectl(env.direct_kubeconfig(), "-n", held_ns, "exec", "w", "--", "cat", "/tmp/ran")
        assert check.returncode != 0
        env.client.post(f"/v1/approvals/{held[0]['approval_id']}/approve", {"reason": "ticket 9"})
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (proc.returncode, out) == (0, "approved-run\n"), err
    # Blocked by the command analysis: the kubelet never ran it.
    res = env.kubectl(bot, "-n", held_ns, "exec", "w", "--", "sh", "-c", "touch /tmp/blocked; rm -rf /tmp")
    assert res.returncode != 0 and "blocked by botwarden rule 'no-destructive-exec'" in res.stderr
    check = env.kubectl(env.direct_kubeconfig(), "-n", held_ns, "exec", "w", "--", "ls", "/tmp")
    assert check.returncode == 0 and "blocked" not in check.stdout and "ran" in check.stdout


def test_attach_with_stdin_through_botwarden(env: K8sEnv, kube_node: KubeNode, ns: str) -> None:
    name = _pod_name()
    manifest = kube_node.pod_manifest(name, ["sh", "-c", "while read line; do echo got:$line; done; echo eof"],
                                      stdin=True)
    manifest["spec"]["containers"][0]["stdinOnce"] = True
    env.kube.request("POST", f"/api/v1/namespaces/{ns}/pods", manifest)
    kube_node.wait_pod(ns, name, "Running")
    res = env.kubectl(env.bot_kubeconfig(), "-n", ns, "attach", "-i", name, input="one\ntwo\n")
    assert res.returncode == 0, res.stderr
    assert "got:one\ngot:two\neof\n" in res.stdout


def test_logs_follow_streams_lines_through_botwarden_as_they_are_produced(env: K8sEnv, kube_node: KubeNode,
                                                                          ns: str) -> None:
    # Line N exists only once the test has created /tmp/nN: each line read was produced after the
    # stream started, so nothing waited for the end of the body.
    name = _pod_name()
    kube_node.run_pod(ns, name, ["sh", "-c", "echo ready; i=0; while true; do "
                                 "if [ -e /tmp/n$i ]; then echo line$i; i=$((i+1)); fi; sleep 0.1; done"])
    bot = env.bot_kubeconfig()
    follow = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", ns, "logs", "-f", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_home(bot))
    try:
        assert follow.stdout.readline() == "ready\n"
        for i in range(3):
            touched = env.kubectl(env.direct_kubeconfig(), "-n", ns, "exec", name, "--", "touch", f"/tmp/n{i}")
            assert touched.returncode == 0, touched.stderr
            assert follow.stdout.readline() == f"line{i}\n"
            assert follow.poll() is None
    finally:
        follow.kill()
        follow.wait()


def test_port_forward_through_botwarden(env: K8sEnv, kube_node: KubeNode, ns: str) -> None:
    name = _pod_name()
    kube_node.run_pod(ns, name, ["sh", "-c", "echo served-by-$HOSTNAME > /www/index.html; "
                                 "exec httpd -f -p 8080 -h /www"], ports=(8080,))
    local = free_port()
    bot = env.bot_kubeconfig()
    forward = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", ns, "port-forward",
                                f"pod/{name}", f"{local}:8080"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_home(bot))
    try:
        assert forward.stdout.readline().startswith(f"Forwarding from 127.0.0.1:{local} -> 8080")
        for _ in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/index.html", timeout=30) as r:
                assert r.read() == f"served-by-{name}\n".encode()
    finally:
        forward.kill()
        forward.wait()
    row = _wait_rows(env, f"create pods/portforward {name} in {ns}%")
    assert (row["decision"], row["sqlstate"]) == ("allow", "101")
    rec = _recording(env, row["session_id"])
    ends = [d for k, d in rec if k == "event" and d.get("type") == "portforward_end"]
    assert ends and ends[0]["data_out"] > 0  # bytes counted; port-forward contents are not recorded
    assert b"served-by" not in b"".join(d for k, d in rec if k in ("in", "out"))


def test_python_client_websocket_exec_through_botwarden(env: K8sEnv, ns: str, shell_pod: str) -> None:
    api = _python_api(env)
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
    row = _wait_rows(env, f"%pods/exec {shell_pod} in {ns} -- sh -c 'read x; echo out:$x%")
    assert row["sqlstate"] == "101"
    rec = _recording(env, row["session_id"])
    assert b"out:from-python" in b"".join(d for k, d in rec if k == "out")
    ends = [d for k, d in rec if k == "event" and d.get("type") == "exec_end"]
    assert ends and ends[0]["exit_code"] == 3 and ends[0]["stdin"] == len("from-python\n")


def test_a_terminal_exec_records_keystrokes_with_a_password_answer_starred(env: K8sEnv, ns: str,
                                                                           shell_pod: str) -> None:
    api = _python_api(env)
    resp = stream(api.connect_get_namespaced_pod_exec, shell_pod, ns,
                  command=["sh", "-c", "printf 'Password: '; read -s pw; echo; echo got-${#pw}-chars; "
                                       "read line; echo line:$line"],
                  stdin=True, stdout=True, stderr=True, tty=True, _preload_content=False)
    out = ""
    try:
        deadline = time.monotonic() + 30
        while "Password:" not in out and time.monotonic() < deadline:
            resp.update(timeout=1)
            out += resp.read_stdout() if resp.peek_stdout() else ""
        assert "Password:" in out
        resp.write_stdin("hunter2-typed\n")
        while "got-" not in out and time.monotonic() < deadline:
            resp.update(timeout=1)
            out += resp.read_stdout() if resp.peek_stdout() else ""
        resp.write_stdin("hello from the keyboard\n")
        while resp.is_open() and time.monotonic() < deadline:
            resp.update(timeout=1)
            out += resp.read_stdout() if resp.peek_stdout() else ""
    finally:
        resp.close()
    assert "got-13-chars" in out and "line:hello from the keyboard" in out
    row = _wait_rows(env, f"%pods/exec {shell_pod} in {ns} -- sh -c 'printf%")
    rec = _ended_recording(env, row["session_id"])
    typed = b"".join(d for k, d in rec if k == "in")
    assert b"hello from the keyboard" in typed and b"*************" in typed
    everything = b"".join(d if isinstance(d, bytes) else json.dumps(d).encode() for _, d in rec)
    assert b"hunter2" not in everything
    assert [d for k, d in rec if k == "event" and d.get("type") == "exec"][0]["tty"] is True


def test_ending_the_session_closes_a_running_exec(env: K8sEnv, ns: str, shell_pod: str) -> None:
    bot = env.bot_kubeconfig()
    before = {s["session_id"] for s in env.client.get("/v1/sessions")["sessions"]}
    proc = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", ns, "exec", shell_pod, "--",
                             "sh", "-c", "echo running; exec sleep 300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_home(bot))
    try:
        assert proc.stdout.readline() == "running\n"
        mine = []
        deadline = time.monotonic() + 20
        while not mine and time.monotonic() < deadline:
            mine = [s for s in env.client.get("/v1/sessions")["sessions"]
                    if s["session_id"] not in before and s.get("protocol") == "kubernetes"]
            time.sleep(0.2)
        assert mine
        for s in mine:  # the exec's connection (kubectl's discovery has its own, already idle or gone)
            env.client.post(f"/v1/sessions/{s['session_id']}/end", {"reason": "runaway exec"})
        _, err = proc.communicate(timeout=30)  # not the 300 s the command would take
    finally:
        if proc.poll() is None:
            proc.kill()
    # The reason on the exec's error channel: kubectl prints it and fails, as for a server error.
    assert proc.returncode != 0 and "botwarden ended the session: ended by operator" in err, err
    assert "runaway exec" in err
    row = _wait_rows(env, f"create pods/exec {shell_pod} in {ns} -- sh -c 'echo running; exec sleep 300'%")
    assert row["sqlstate"] == "101"
    assert row["rows"] >= len("running\n") and row["duration_ms"] > 0
    ended = env.daemon.audit_sql("SELECT outcome, error FROM sessions WHERE session_id = ?", [row["session_id"]])
    assert ended and ended[0]["outcome"] == "terminated" and "runaway exec" in ended[0]["error"]
    ends = [d for k, d in _recording(env, row["session_id"]) if k == "event" and d.get("type") == "exec_end"]
    assert ends and "exit_code" not in ends[0]  # cut off by the end, not the command's exit


def test_an_execs_stdin_is_not_relayed_once_the_audit_process_is_gone(env: K8sEnv, ns: str, shell_pod: str) -> None:
    """An exec's stdin is typed commands: with the audit process dead (SIGKILL) the next line never
    reaches the pod's shell, and the session ends with the reason on kubectl's error channel.
    Before, the shell ran it while its recording was refused."""
    import os
    import signal

    def audit_pid_when_healthy() -> int | None:
        audit = env.client.get("/v1/status")["audit"]
        return audit["pid"] if audit["healthy"] else None

    bot = env.bot_kubeconfig()
    proc = subprocess.Popen([env.kube.kubectl, f"--kubeconfig={bot}", "-n", ns, "exec", "-i", shell_pod, "--", "sh"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_home(bot))
    try:
        proc.stdin.write("echo before-$((1+1))\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "before-2\n"
        child = audit_pid_when_healthy()
        assert child is not None
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while env.client.get("/v1/status")["audit"]["healthy"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.stdin.write("echo after-$((2+2))\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        deadline = time.monotonic() + 60  # the daemon starts a new audit process: later tests need it
        while audit_pid_when_healthy() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    assert "after-4" not in out, out
    assert proc.returncode != 0 and "audit store is unavailable" in err, err
    assert audit_pid_when_healthy() is not None


def test_an_upgrade_over_http2_is_a_protocol_error_and_reaches_nothing(env: K8sEnv, ns: str, shell_pod: str) -> None:
    # kubectl and the Python client upgrade over HTTP/1.1 only (no RFC 8441 extended CONNECT).
    # HTTP/2 forbids connection-specific headers (RFC 9113 8.2.2): the front's h2 stack answers
    # GOAWAY PROTOCOL_ERROR and the request is never decided nor sent to the API server.
    import socket
    import ssl

    import h2.config
    import h2.connection
    import h2.errors
    import h2.events

    ctx = ssl.create_default_context(cafile=str(env.bot_ca))
    ctx.set_alpn_protocols(["h2"])
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    path = f"/api/v1/namespaces/{ns}/pods/{shell_pod}/exec?command=touch&command=/tmp/h2-upgrade&stdout=true"
    with socket.create_connection(("127.0.0.1", env.listen_port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", path), (":scheme", "https"),
                              (":authority", f"127.0.0.1:{env.listen_port}"),
                              ("authorization", f"Bearer {env.bao.mint_token()}"),
                              ("connection", "Upgrade"), ("upgrade", "SPDY/3.1")], end_stream=True)
        tls.sendall(conn.data_to_send())
        events = []
        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            data = tls.recv(65536)
            if not data:
                break
            events += conn.receive_data(data)
    ended = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ended and ended[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, events
    assert not [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    check = env.kubectl(env.direct_kubeconfig(), "-n", ns, "exec", shell_pod, "--", "ls", "/tmp")
    assert check.returncode == 0 and "h2-upgrade" not in check.stdout


def test_a_frame_botwarden_cannot_read_closes_the_relay_with_the_reason_in_the_row(env: K8sEnv, ns: str,
                                                                                    shell_pod: str) -> None:
    # A real WebSocket exec, then a frame RFC 6455 forbids (a client frame without a mask): the
    # recording could not hold it, so it is not relayed; the connection closes, the row says why.
    api = _python_api(env)
    resp = stream(api.connect_get_namespaced_pod_exec, shell_pod, ns,
                  command=["sh", "-c", "echo malformed-ready; cat"],
                  stdin=True, stdout=True, stderr=True, tty=False, _preload_content=False)
    out = ""
    try:
        while "malformed-ready" not in out and resp.is_open():
            resp.update(timeout=5)
            out += resp.read_stdout() if resp.peek_stdout() else ""
        resp.sock.sock.sendall(b"\x82\x06\x00leak\n")  # FIN+binary, no MASK bit: malformed
        closed = False
        for _ in range(60):
            try:
                resp.update(timeout=1)
            except WebSocketConnectionClosedException:
                closed = True  # botwarden closed the connection
                break
            out += resp.read_stdout() if resp.peek_stdout() else ""
        assert closed
    finally:
        resp.close()
    assert "leak" not in out
    row = _wait_rows(env, f"%pods/exec {shell_pod} in {ns} -- sh -c 'echo malformed-ready; cat'%")
    assert row["sqlstate"] == "101"
    assert "botwarden closed the upgraded connection" in row["error"] and "mask" in row["error"], row["error"]
    ends = [d for k, d in _recording(env, row["session_id"]) if k == "event" and d.get("type") == "exec_end"]
    assert ends and "mask" in ends[0]["unreadable"]


def test_an_upgrade_to_a_protocol_botwarden_cannot_read_is_refused_before_the_server(env: K8sEnv, ns: str,
                                                                                      shell_pod: str) -> None:
    import http.client
    import ssl

    ctx = ssl.create_default_context(cafile=str(env.bot_ca))
    conn = http.client.HTTPSConnection("127.0.0.1", env.listen_port, context=ctx, timeout=30)
    path = f"/api/v1/namespaces/{ns}/pods/{shell_pod}/exec?command=touch&command=/tmp/odd-upgrade&stdout=true"
    conn.request("POST", path, headers={"Authorization": f"Bearer {env.bao.mint_token()}",
                                        "Connection": "Upgrade", "Upgrade": "h2c"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 400 and body["reason"] == "BadRequest" and "SPDY/3.1 and WebSocket only" in body["message"]
    check = env.kubectl(env.direct_kubeconfig(), "-n", ns, "exec", shell_pod, "--", "ls", "/tmp")
    assert check.returncode == 0 and "odd-upgrade" not in check.stdout
