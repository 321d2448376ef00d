"""`botwarden doctor` on a healthy install and with each thing it checks broken.

Healthy: a real daemon (eBPF probes attached to a cgroup of this module's own) wired to a real
OpenBao (AppRole, database secrets engine, OIDC issuer) and a real PostgreSQL 15 with TLS.
Broken: the same config with one thing wrong at a time (wrong secret id, a credential path the
AppRole may not use, a closed target port, a wrong issuer, an unknown config key), the control
socket chmod 0666, the probes detached under the running daemon, an OpenBao that was stopped,
and an audit store, read with the daemon down, whose chain was tampered with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import pytest

from appliance.daemon import autogroups_enabled
from appliance.sandbox import OpenBaoServer, configure_openbao
from probes import cgroups
from tests.audit_fixtures import populate
from tests.daemon_fixtures import ROOT, DaemonProcess, fresh_setup, new_port, write_config

pytestmark = pytest.mark.root  # eBPF probes, the root-owned control socket

TAG = uuid.uuid4().hex[:6]
BOTS = f"botwarden-doctor-{TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-doctor-{TAG}"
NFT_TABLE = f"botwarden_doctor_{TAG}"
PROBES = f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "{PIN_DIR}"\nnft_table = "{NFT_TABLE}"\nmap_entries = 1024'


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def doctor(config: Path) -> tuple[int, dict[str, dict]]:
    res = cli("--config", str(config), "doctor", "--json")
    doc = json.loads(res.stdout)
    assert doc["ok"] == (res.returncode == 0), res.stdout
    return res.returncode, {c["name"]: c for c in doc["checks"]}


def with_probes(config: Path) -> Path:
    text = config.read_text()
    config.write_text(text.replace('[probes]\nmode = "off"', f"[probes]\n{PROBES}"))
    return config


@pytest.fixture(scope="module")
def env(pg_server, bao_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("doctor")
    setup = fresh_setup(bao_server, pg_server, workdir)
    config = with_probes(write_config(workdir / "botwarden.toml", workdir=workdir, pg=pg_server, bao=setup,
                                      listen_port=new_port(),
                                      extra=f'[audit.stream]\nfile = "{workdir / "stream" / "audit.jsonl"}"\n'))
    # A session of its own, as systemd starts the service (its priority then counts against others)
    daemon = DaemonProcess(config, workdir / "run" / "control.sock", prefix=["setsid"]).start()
    try:
        yield type("Env", (), {"pg": pg_server, "bao": setup, "config": config, "daemon": daemon,
                               "workdir": workdir})
    finally:
        try:
            daemon.stop()
        finally:
            try:
                cli("--config", str(config), "probes", "detach")
            finally:
                cgroups.remove(BOTS)


EXPECTED = ["running as root", "kernel BTF", "cgroup v2", "bpffs", "BPF permission", "nft (fallback path)", "bcc",
            "kernel headers for bcc", "config", "Vault reachable", "Vault login", "target orders credential",
            "target orders reachable", "OIDC issuer", "daemon", "daemon CPU priority", "audit store", "audit disk space",
            "audit chain off the host", "control socket", "probes"]


def test_healthy_install_passes_every_check(env):
    code, checks = doctor(env.config)
    assert code == 0, json.dumps(checks, indent=1)
    assert list(checks) == EXPECTED
    bad = {n: c for n, c in checks.items() if c["status"] != "ok"}
    assert not bad, bad
    assert f"{env.bao.db_mount}/creds/{env.bao.db_role}" in checks["target orders credential"]["detail"]
    assert "answers SSLRequest with 'S'" in checks["target orders reachable"]["detail"]
    assert "keys)" in checks["OIDC issuer"]["detail"]
    assert "via the daemon" in checks["audit store"]["detail"] and "OK:" in checks["audit store"]["detail"]
    assert "mode 0600" in checks["control socket"]["detail"]
    assert "the audit stream writes every row's hash to" in checks["audit chain off the host"]["detail"]
    assert f"owner pid {env.daemon.proc.pid} alive" in checks["probes"]["detail"]
    if autogroups_enabled():
        assert checks["daemon CPU priority"]["detail"] == "nice -10, and its session's scheduler autogroup nice -10"
    # The same, for a person: one line per check and the count.
    text = cli("--config", str(env.config), "doctor")
    assert text.returncode == 0 and f"{len(EXPECTED)} of {len(EXPECTED)} checks passed" in text.stdout, text.stdout


def broken(env, name: str, old: str, new: str) -> Path:
    text = env.config.read_text()
    assert old in text, old
    path = env.workdir / f"broken-{name}.toml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("case", ["wrong-secret-id", "credential-path-denied", "target-port-closed",
                                  "wrong-issuer", "bad-config-key"])
def test_each_broken_item_fails_its_check_and_says_what_to_do(env, case):
    if case == "wrong-secret-id":
        wrong = env.workdir / "wrong-secret-id"
        wrong.write_text(str(uuid.uuid4()) + "\n")
        config = broken(env, case, f'secret_id_file = "{env.bao.secret_id_file}"', f'secret_id_file = "{wrong}"')
        failing, words = "Vault login", "secret id"
    elif case == "credential-path-denied":
        config = broken(env, case, f'mount = "{env.bao.db_mount}"', 'mount = "not-granted-db"')
        failing, words = "target orders credential", "not-granted-db/creds/"
    elif case == "target-port-closed":
        closed = new_port()
        config = broken(env, case, f'address = "{env.pg.host}:{env.pg.port}"', f'address = "127.0.0.1:{closed}"')
        failing, words = "target orders reachable", "refused"
    elif case == "wrong-issuer":
        config = broken(env, case, f'issuer = "{env.bao.issuer}"', f'issuer = "{env.bao.server.addr}/v1/nowhere"')
        failing, words = "OIDC issuer", "HTTP"
    else:
        config = broken(env, case, "[audit]\n", "[audit]\nretention = 30\n")
        failing, words = "config", "audit.retention: unknown key"
    code, checks = doctor(config)
    assert code == 1
    failed = {n for n, c in checks.items() if c["status"] == "fail"}
    assert failed == {failing}, json.dumps(checks, indent=1)
    assert words in checks[failing]["detail"] + checks[failing]["fix"], checks[failing]
    assert checks[failing]["fix"]
    if case == "wrong-secret-id":
        assert checks["target orders credential"]["status"] == "skip"
        assert open(env.workdir / "wrong-secret-id").read().strip() not in json.dumps(checks)
    if case == "bad-config-key":
        assert "Vault reachable" not in checks  # nothing that needs the config ran


def test_control_socket_mode_0666_fails(env):
    os.chmod(env.daemon.socket, 0o666)
    try:
        code, checks = doctor(env.config)
    finally:
        os.chmod(env.daemon.socket, 0o600)
    assert code == 1
    assert checks["control socket"]["status"] == "fail"
    assert "mode 0666" in checks["control socket"]["detail"]
    assert [n for n, c in checks.items() if c["status"] == "fail"] == ["control socket"]


def test_probes_detached_under_the_running_daemon_fails(env):
    res = cli("--config", str(env.config), "probes", "detach")
    assert res.returncode == 0, res.stderr
    try:
        code, checks = doctor(env.config)
    finally:
        res = cli("--config", str(env.config), "probes", "attach")
        assert res.returncode == 0, res.stderr
    assert code == 1
    assert checks["probes"]["status"] == "fail"
    assert checks["probes"]["fix"] == "botwarden probes attach"
    assert doctor(env.config)[0] == 0  # attached again: healthy again


def test_stopped_openbao_fails_vault_and_issuer(pg_server, tmp_path):
    bao = OpenBaoServer().start()
    try:
        setup = configure_openbao(bao, pg_server, tmp_path, tag="doc")
        config = write_config(tmp_path / "botwarden.toml", workdir=tmp_path, pg=pg_server, bao=setup,
                              listen_port=new_port())
        assert doctor(config)[1]["Vault login"]["status"] == "ok"
    finally:
        bao.stop()
    code, checks = doctor(config)
    assert code == 1
    assert checks["Vault reachable"]["status"] == "fail"
    assert "unreachable" in checks["Vault reachable"]["detail"]
    assert "start Vault/OpenBao" in checks["Vault reachable"]["fix"]
    assert checks["target orders credential"]["status"] == "skip"
    assert checks["OIDC issuer"]["status"] == "fail"
    assert checks["target orders reachable"]["status"] == "ok"  # PostgreSQL still runs
    assert checks["daemon"]["status"] == "warn"


def test_audit_store_read_only_with_the_daemon_down_and_a_tampered_chain(pg_server, tmp_path):
    # No Vault, no issuer: a static credential and attestation only, so the doctor needs nothing remote.
    audit = tmp_path / "state" / "audit.duckdb"
    audit.parent.mkdir()
    populate(audit)
    password = tmp_path / "pg-password"
    password.write_text(pg_server.password + "\n")
    config = tmp_path / "botwarden.toml"
    config.write_text(f"""
[appliance]
state_dir = "{tmp_path / 'state'}"
control_socket = "{tmp_path / 'run' / 'control.sock'}"
[audit]
path = "{audit}"
[probes]
mode = "off"
[[targets]]
name = "orders"
protocol = "postgres"
address = "{pg_server.host}:{pg_server.port}"
authentication = "attestation"
[targets.credential]
source = "static"
username = "{pg_server.superuser}"
password_file = "{password}"
[[identities]]
name = "bot"
[identities.process]
uid = 0
""")
    code, checks = doctor(config)
    assert code == 0, json.dumps(checks, indent=1)
    assert "read-only, daemon down" in checks["audit store"]["detail"]
    assert checks["Vault"]["status"] == "skip" and checks["OIDC issuer"]["status"] == "skip"
    assert checks["target orders password file"]["status"] == "ok"
    assert checks["control socket"]["status"] == "skip"
    # Nothing copies the chain off the host: a warning (exit 0) that says what to configure.
    off_host = checks["audit chain off the host"]
    assert off_host["status"] == "warn" and "nothing copies the audit chain off the host" in off_host["detail"]
    assert "[audit.stream]" in off_host["fix"] and "--anchors" in off_host["fix"]
    with duckdb.connect(str(audit)) as con:
        con.execute("UPDATE requests SET decision = 'allow' WHERE chain_seq = "
                    "(SELECT max(chain_seq) FROM requests)")
    code, checks = doctor(config)
    assert code == 1
    assert checks["audit store"]["status"] == "fail"
    assert "modified" in checks["audit store"]["detail"]
    assert [n for n, c in checks.items() if c["status"] == "fail"] == ["audit store"]


def test_a_daemon_priority_that_does_not_count_against_other_sessions_is_a_warning(env):
    """The priority check reads the scheduler's view of real processes: one at the configured nice
    whose session's autogroup is at nice 0 is warned about; one at the wrong nice is too; one
    leading its session with its autogroup set (what the daemon does) is ok."""
    from appliance.config import load_config
    from appliance.doctor import Doctor, _Failed

    if not autogroups_enabled():
        pytest.skip("no scheduler autogroups on this kernel: the check has nothing more to say")
    cfg = load_config(str(env.config))
    assert cfg.appliance.nice == -10
    sleep = "import time; print('ready', flush=True); time.sleep(60)"
    # At -10 in a session of its own whose group nobody set (a new autogroup starts at nice 0): as a
    # daemon whose group stayed at its caller's
    inside = subprocess.Popen(["setsid", sys.executable, "-c",
                               f"import os; os.setpriority(os.PRIO_PROCESS, 0, -10); {sleep}"],
                              stdout=subprocess.PIPE, text=True)
    plain = subprocess.Popen([sys.executable, "-c", sleep], stdout=subprocess.PIPE, text=True)
    leader = subprocess.Popen(["setsid", sys.executable, "-c", f"from appliance.daemon import set_priority; "
                               f"set_priority(-10); {sleep}"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for p in (inside, plain, leader):
            assert p.stdout.readline().strip() == "ready"
        with pytest.raises(_Failed) as e:
            Doctor.priority(cfg, inside.pid)
        assert e.value.status == "warn" and "counts within its session only" in e.value.detail
        assert "autogroup is at nice 0" in e.value.detail and "setsid botwarden run" in e.value.fix
        with pytest.raises(_Failed) as e:
            Doctor.priority(cfg, plain.pid)
        assert e.value.status == "warn" and f"pid {plain.pid} runs at nice 0; appliance.nice is -10" == e.value.detail
        assert Doctor.priority(cfg, leader.pid) == "nice -10, and its session's scheduler autogroup nice -10"
    finally:
        for p in (inside, plain, leader):
            p.kill()
            p.wait()
