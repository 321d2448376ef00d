"""The README's main job: `botwarden demo` runs end to end with real components."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.root
def test_demo_runs_every_kind_of_decision(tmp_path):
    res = subprocess.run([sys.executable, "-m", "appliance.cli", "demo", "--workdir", str(tmp_path / "demo")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    # The bot went through the redirect and was identified by the kernel and its token.
    assert "probes: ebpf" in out
    assert "demo-bot" in out and "/usr/lib/postgresql/15/bin/psql" in out and "/botwarden-demo.bots/demo-bot" in out
    # It ran as an unprivileged user (a root bot could leave its cgroup): nobody, not privileged.
    assert "--user nobody" in out and "65534" in out and "WARNING" not in out
    # Allowed, masked, blocked, approved.
    assert "ada@example.com" not in out and "**** **** **** 1111" in out
    assert "blocked by rule 'no-drops-or-truncates'" in out and "blocked by rule 'no-server-files'" in out
    assert "DELETE 10" in out and "approved   root" in out
    # Deny by default: going around botwarden is refused by the kernel and audited.
    assert "refused by the kernel: Operation not permitted" in out
    assert "denied_connect" in out
    # Every session's database user was revoked.
    assert "still exist: 0" in out
    # Nothing is left attached to the kernel.
    assert not Path("/sys/fs/bpf/botwarden-demo").exists()
