"""probes/setup-host.sh: idempotent host set-up the install script sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from probes import cgroups

SCRIPT = Path(__file__).resolve().parents[1] / "probes" / "setup-host.sh"


@pytest.mark.root
def test_setup_host_is_idempotent_and_reports_the_cgroup2_mount():
    venv = str(Path(sys.executable).parents[1])
    for _ in range(2):
        run = subprocess.run(["sh", str(SCRIPT), venv], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip().splitlines()[-1] == str(cgroups.cgroup2_mount())
    # Sourced by another script, the function is callable by name.
    sourced = subprocess.run(["bash", "-c", f". {SCRIPT} && botwarden_probes_setup_host {venv}"],
                             capture_output=True, text=True)
    assert sourced.returncode == 0, sourced.stderr
    assert Path("/sys/fs/bpf").is_mount()
    import bcc  # noqa: F401 - importable from the venv once linked
