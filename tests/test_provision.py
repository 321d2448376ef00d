"""`vagrant/provision.sh bastion` (issue 21.1), installed into a temporary root (``DESTDIR``).

With DESTDIR the script lays out exactly the files it would install on a bastion — the venv
(built for real from this checkout), ``/usr/local/bin/botwarden``, ``/etc/botwarden`` with the
config and the secret files, ``/var/lib/botwarden``, ``/var/log/botwarden``, the systemd units and
the fstab lines — under that directory, and leaves this shared machine alone (no packages,
mounts or systemctl). A second run must change nothing (modes, owners, sizes, mtimes, contents,
link targets of every file); a run from a newer checkout is the upgrade: the package, the units
and the example are replaced, the config, the secret files and the audit store are not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from analytics import AuditStore
from probes import cgroups
from tests.daemon_fixtures import ROOT

pytestmark = [pytest.mark.root, pytest.mark.timeout(1500)]

SOURCE_PARTS = ("pyproject.toml", "README.md", "botwarden.example.toml", "appliance", "analytics", "probes", "tui",
                "vagrant")


def provision(dest: Path, source: Path = ROOT) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", str(source / "vagrant" / "provision.sh"), "bastion"], capture_output=True, text=True,
                         env={**os.environ, "DESTDIR": str(dest)}, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: type, mode, owner, size, mtime, link target, content digest."""
    out = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        if path.is_symlink():
            what = ("link", os.readlink(path))
        elif path.is_file():
            what = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            what = ("dir", None)
        out[str(path.relative_to(root))] = (*what, st.st_mode, st.st_uid, st.st_gid,
                                            st.st_size if what[0] != "dir" else None, st.st_mtime_ns)
    return out


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bastion_install_is_idempotent_and_an_upgrade_keeps_config_and_audit(tmp_path):
    dest = tmp_path / "root"
    etc = dest / "etc" / "botwarden"
    first = provision(dest)

    # The layout, with the modes a bastion needs.
    for d in (etc, etc / "tls", dest / "var/lib/botwarden", dest / "var/log/botwarden"):
        assert d.is_dir() and mode(d) == 0o700, d
    for f in ("botwarden.toml", "botwarden.example.toml", "masking-salt", "vault-secret-id", "tls/server.key"):
        assert mode(etc / f) == 0o600, f
    assert len((etc / "masking-salt").read_text().strip()) == 64
    assert "BEGIN CERTIFICATE" in (etc / "tls/server.crt").read_text()
    config = (etc / "botwarden.toml").read_text()
    assert 'bots_cgroup = "botwarden.slice/botwarden-bots.slice"' in config  # the slice it installs
    units = dest / "etc/systemd/system"
    assert (units / "botwarden.service").read_text() == (ROOT / "vagrant/botwarden.service").read_text()
    assert (units / "botwarden-bots.slice").read_text() == (ROOT / "vagrant/botwarden-bots.slice").read_text()
    # The command on PATH: a relative link, so it resolves inside the root; it runs and accepts the config.
    command = dest / "usr/local/bin/botwarden"
    assert os.readlink(command) == "../../../opt/botwarden/venv/bin/botwarden"
    check = subprocess.run([str(command), "--config", str(etc / "botwarden.toml"), "config", "check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "OK" in check.stdout, check.stderr
    # Not editable: the installed package is a copy, not this checkout.
    where = subprocess.run([str(dest / "opt/botwarden/venv/bin/python"), "-c", "import appliance; print(appliance.__file__)"],
                           capture_output=True, text=True, cwd="/", timeout=60).stdout.strip()
    assert where.startswith(str(dest / "opt/botwarden/venv/lib")), where
    # The units as installed are valid (ExecStart pointed at the root's command, as systemd would find it).
    verify_dir = tmp_path / "verify"
    verify_dir.mkdir()
    for unit in ("botwarden.service", "botwarden-bots.slice"):
        (verify_dir / unit).write_text((units / unit).read_text().replace("/usr/local/bin/botwarden", str(command)))
    res = subprocess.run(["systemd-analyze", "verify", *map(str, sorted(verify_dir.iterdir()))], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    # Persistent mounts: systemd (PID 1) mounts both at boot; without it, one fstab line each.
    fstab = dest / "etc/fstab"
    mounts = {line.split()[1]: line.split()[2] for line in (fstab.read_text().splitlines() if fstab.exists() else [])
              if line.strip() and not line.startswith("#")}
    if Path("/run/systemd/system").is_dir():
        assert mounts == {}, mounts
    else:
        assert mounts == {"/sys/fs/bpf": "bpf", str(cgroups.cgroup2_mount()): "cgroup2"}, mounts

    # Twice: nothing changes.
    before = snapshot(dest)
    second = provision(dest)
    assert snapshot(dest) == before
    assert not [line for line in second.stderr.splitlines() if line.startswith("[provision] ") and any(
        word in line for word in ("created", "wrote", "linked", "installing", "added", "mode set"))], second.stderr

    # The operator's config and an audit store with a row in it.
    (etc / "botwarden.toml").write_text(config + "\n# edited by the operator\n")
    store = AuditStore(dest / "var/lib/botwarden/audit.duckdb")
    store.start()
    store.submit("probe", {"ts": datetime.now(timezone.utc), "event": "attached", "detail": "before the upgrade"})
    store.close()
    kept = {p: digest(p) for p in [*etc.rglob("*"), *(dest / "var/lib/botwarden").rglob("*")]
            if p.is_file() and p.name != "botwarden.example.toml"}
    assert dest / "var/lib/botwarden/audit.duckdb" in kept

    # A newer checkout: new code, a changed unit, a changed example.
    newer = tmp_path / "newer"
    newer.mkdir()
    for part in SOURCE_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, newer / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, newer / part)
    with open(newer / "appliance/__init__.py", "a") as f:
        f.write('\nUPGRADE_MARKER = "newer"\n')
    with open(newer / "vagrant/botwarden.service", "a") as f:
        f.write("# newer unit\n")
    with open(newer / "botwarden.example.toml", "a") as f:
        f.write("# newer example\n")
    fstab_before = fstab.read_text() if fstab.exists() else None
    upgrade = provision(dest, newer)
    assert "installing botwarden" in upgrade.stderr
    marker = subprocess.run([str(dest / "opt/botwarden/venv/bin/python"), "-c",
                             "import appliance; print(appliance.UPGRADE_MARKER)"],
                            capture_output=True, text=True, cwd="/", timeout=60)
    assert marker.stdout.strip() == "newer", marker.stderr
    assert (units / "botwarden.service").read_text().endswith("# newer unit\n")
    assert (etc / "botwarden.example.toml").read_text().endswith("# newer example\n")
    assert {p: digest(p) for p in kept} == kept  # config, secrets, certificate, audit store: untouched
    assert (etc / "botwarden.toml").read_text().endswith("# edited by the operator\n")
    assert (fstab.read_text() if fstab.exists() else None) == fstab_before
    with AuditStore(dest / "var/lib/botwarden/audit.duckdb") as reopened:
        assert reopened.query("SELECT detail FROM probes")[1] == [("before the upgrade",)]
