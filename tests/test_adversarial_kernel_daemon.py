"""Adversarial, against the real daemon: a bot started with `botwarden bot run` tries to get
around it. Each case asserts what the bot sees, the audit row that records it, and that the
daemon keeps serving other bots.

- Unix sockets (issue 26.1): ``psql -h <PostgreSQL's socket directory>`` from a non-root bot is
  refused by the kernel and lands in ``probes``; an allow-listed socket path works.
- Privileged bots (issue 14.2): `bot run` refuses root without ``--user``/``--allow-privileged``;
  a root bot's sessions are marked ``privileged``.
- Escapes (issue 14.3): a root bot writing its pid to the root cgroup becomes a ``left_cgroup``
  row, a warning in the log and a count in ``status``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.probes_fixtures import RUN_TAG

from probes import cgroups
from tests.daemon_fixtures import PSQL, ROOT
from tests.probes_fixtures import BOT_PYTHON, BOT_SCRIPT, UnixEcho, unix, wait_for
from tests.test_probes_e2e import (  # noqa: F401 - world is a fixture
    BOT,
    CONNECT_PROBE,
    PSQL_ENV,
    QUERY,
    _finish,
    _start,
    bot_run,
    psql_args,
    sessions_for_pid,
    world,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

BOTS = f"botwarden-advk-{RUN_TAG}.bots"
PIN_DIR = f"/sys/fs/bpf/botwarden-advk-{RUN_TAG}"
NOBODY = 65534


@pytest.fixture(scope="module")
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="bw-adv-sock-"))
    os.chmod(d, 0o755)  # a bot (nobody) may reach the sockets in it
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def env(world, sockdir):
    e = _start(world, "adversarial", mode="ebpf", bots=BOTS, pin_dir=PIN_DIR, nft_table=f"botwarden_advk_{RUN_TAG}",
               extra_probes=f'\nunix_allow = ["{sockdir / "allowed.sock"}"]')
    try:
        yield e
    finally:
        _finish(e)


def _probe_rows(env, pid: int, event: str, want: int = 1) -> list[dict]:
    def rows():
        got = env.daemon.audit_sql("SELECT * FROM probes WHERE pid = ? AND event = ? ORDER BY chain_seq",
                                   [pid, event])
        return got if len(got) >= want else None
    return wait_for(rows, timeout=10, interval=0.1) or []


def _daemon_still_serves(env) -> None:
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV)
    assert ran.returncode == 0 and ran.stdout.strip() == env.direct, ran.stderr


# -- Unix sockets ------------------------------------------------------------------------------
def test_psql_to_the_databases_unix_socket_is_refused_and_audited(env):
    """Issue 26.1: psql -h <socket dir> read unmasked data with no session, request or probe row."""
    pg = env.pg
    sock = f"{pg.sockdir}/.s.PGSQL.{pg.port}"
    argv = [PSQL, "-X", "-A", "-t", "-h", str(pg.sockdir), "-p", str(pg.port), "-U", "postgres", "-d", "postgres",
            "-c", QUERY]
    # The socket is there and trusts local connections: nobody outside the bots' cgroups gets in.
    direct = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
                            capture_output=True, text=True, timeout=30)
    assert direct.returncode == 0 and direct.stdout.strip() == env.direct, direct.stderr
    sessions_before = env.daemon.audit_sql("SELECT count(*) AS n FROM sessions")[0]["n"]

    ran = bot_run(env.config, "sock-bot", argv, env=PSQL_ENV)
    assert ran.returncode != 0 and ran.stdout == ""
    assert f'connection to server on socket "{sock}" failed: Operation not permitted' in ran.stderr, ran.stderr
    [row] = _probe_rows(env, ran.pid, "denied_connect")
    assert row["family"] == "unix" and row["dst_addr"] == sock and row["dst_port"] is None
    # (exe is filled only while the process still runs: psql gives up at once, so it may be gone)
    assert row["uid"] == NOBODY and row["comm"] == "psql" and row["exe"] in (PSQL, None)
    assert row["cgroup_path"] == f"/{BOTS}/sock-bot" and row["detail"] == "Unix socket not in probes.unix_allow"
    assert env.daemon.audit_sql("SELECT count(*) AS n FROM sessions")[0]["n"] == sessions_before
    _daemon_still_serves(env)


def test_allow_listed_unix_socket_works(env, sockdir):
    allowed, other = sockdir / "allowed.sock", sockdir / "other.sock"
    servers = [UnixEcho(str(allowed), "journal"), UnixEcho(str(other), "other")]
    try:
        attempts = json.dumps([unix(str(allowed)), unix(str(other))])
        ran = bot_run(env.config, "sock-bot", [BOT_PYTHON, "-c", BOT_SCRIPT, attempts])
        assert ran.returncode == 0, ran.stderr
        results = json.loads(ran.stdout)["results"]
        assert results == [{"reply": "unix:journal:hello\n"}, {"errno": "EPERM"}]
        [row] = _probe_rows(env, ran.pid, "denied_connect")
        assert row["dst_addr"] == str(other)
    finally:
        for s in servers:
            s.close()


# -- privileged bots -----------------------------------------------------------------------------
def test_root_bot_is_refused_unless_a_user_or_allow_privileged_is_given(env):
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV, user=None)
    assert ran.returncode == 1 and ran.stdout == ""
    assert "bot run: refusing to start a privileged bot (uid 0, CAP_CHOWN" in ran.stderr, ran.stderr
    assert "--user NAME" in ran.stderr and "--allow-privileged" in ran.stderr
    assert sessions_for_pid(env, ran.pid, want_ended=False) == []  # nothing ran
    ran = bot_run(env.config, BOT, psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV, user="root")
    assert ran.returncode == 1 and "refusing to start a privileged bot (uid 0)" in ran.stderr, ran.stderr

    ran = bot_run(env.config, BOT, psql_args(env.net.ip_a, env.pg.port, QUERY), env=PSQL_ENV, user=None,
                  allow_privileged=True)
    assert ran.returncode == 0 and ran.stdout.strip() == env.direct, ran.stderr
    assert f"WARNING: bot '{BOT}' runs privileged (uid 0" in ran.stderr
    [row] = sessions_for_pid(env, ran.pid)
    assert row["uid"] == 0 and row["privileged"] is True and row["outcome"] == "ok"


# -- escapes ---------------------------------------------------------------------------------------
def test_root_bot_leaving_its_cgroup_is_detected_audited_and_counted(env):
    root = cgroups.cgroup2_mount()
    attempt = json.dumps([("after-escape", 4, env.net.ip_a, 22)])
    # The shell moves itself out, then waits for a line before it probes: the audit row is checked
    # while it is still the same process (its exe is verified against the kernel's record).
    script = f'echo $$ > {root}/cgroup.procs && read go && exec {BOT_PYTHON} -c "$PROBE" \'{attempt}\''
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(env.config), "bot", "run",
                             "--name", "escaper", "--allow-privileged", "--", "/bin/sh", "-c", script],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PROBE": CONNECT_PROBE})
    try:
        [row] = _probe_rows(env, proc.pid, "left_cgroup")
        assert row["uid"] == 0 and row["comm"] == "sh" and row["exe"] == str(Path("/bin/sh").resolve())
        assert row["cgroup_path"] == f"/{BOTS}/escaper" and row["dst_addr"] == "/"
        assert row["detail"] == f"moved from /{BOTS}/escaper to /"
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        proc.kill()
    # Outside the bots' cgroups nothing filters it any more (ECONNREFUSED from the host, not EPERM):
    # why the escape has to be seen.
    assert json.loads(out) == {"after-escape": "ECONNREFUSED"}, err
    status = env.daemon.client().get("/v1/status")
    assert status["bots_left_cgroup"] >= 1
    assert f"bot process left the bots' cgroups: pid {proc.pid} uid 0" in env.daemon.output()
    _daemon_still_serves(env)
