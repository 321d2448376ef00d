"""OpenSSH direct vs through botwarden's SSH front, side by side in one run (issue 16.10).

Starts PostgreSQL + OpenBao (appliance.sandbox), a real sshd trusting OpenBao's SSH CA and the
botwarden daemon with eBPF probes and an SSH target (tests/test_ssh_sftp.py's ``sftp_world``),
then times, for each path (alternating between them):

- ``ssh host true`` run N times one after the other (each a new connection: key exchange,
  authentication; through botwarden also attestation, a certificate signed by OpenBao for the
  session and the upstream connection): the connection set-up cost per command;
- a SIZE MB ``scp`` upload (OpenSSH 9: SFTP mode) and a SIZE MB ``sftp`` download: MB/s.

The bot's commands run as a bot (``botwarden bot run``, redirected by the eBPF probes); the direct
ones with a certificate signed for the benchmark. The loops are timed inside one shell per path,
so no Python start-up is counted.

    sudo nice -n 10 .venv/bin/python bench/ssh_compare.py [--count 200] [--size-mb 200] [--json out.json]

Prints a Markdown table and writes it to bench/results/ssh.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.sandbox import OpenBaoServer  # noqa: E402
from tests.test_probes_e2e import bot_run  # noqa: E402
from tests.test_ssh_front import ssh_direct  # noqa: E402
from tests.test_ssh_sftp import BOT, SSH_OPTS, sftp_world  # noqa: E402

REMOTE_DIR = Path("/tmp/bw-ssh-bench")


def timed_script(commands: str) -> str:
    """A shell script that runs ``commands`` and prints the nanoseconds they took (fails on error)."""
    return f"set -e\nt0=$(date +%s%N)\n{commands}\nt1=$(date +%s%N)\necho $((t1 - t0))\n"


def run(world, path: str, commands: str, timeout: float) -> float:
    script = timed_script(commands)
    if path == "botwarden":
        ran = bot_run(world["config"], BOT, ["/bin/sh", "-c", script], env={"HOME": str(world["bot_home"])},
                      timeout=timeout)
        code, out, err = ran.returncode, ran.stdout, ran.stderr
    else:
        p = subprocess.run([*world["net"].prefix, "/bin/sh", "-c", script], capture_output=True, text=True,
                           timeout=timeout)
        code, out, err = p.returncode, p.stdout, p.stderr
    if code != 0:
        raise RuntimeError(f"{path}: the benchmark commands failed ({code}): {err[-2000:]}")
    return int(out.strip().splitlines()[-1]) / 1e9


def sign_direct(world, keydir: Path) -> None:
    """A fresh certificate for the direct path (the role's certificates live 10 minutes)."""
    signed = world["bao"].client().write(f"{world['ssh_mount']}/sign/bot",
                                          public_key=(keydir / "id.pub").read_text(), valid_principals="root")
    (keydir / "id-cert.pub").write_text(signed["data"]["signed_key"])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200, help="sequential `ssh host true` per path")
    ap.add_argument("--size-mb", type=int, default=200, help="size of the scp / sftp transfer")
    ap.add_argument("--batches", type=int, default=8, help="the ssh loop alternates paths in this many batches")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    opts = ap.parse_args()
    bao = OpenBaoServer().start()
    workdir = Path(tempfile.mkdtemp(prefix="bw-ssh-bench-"))
    try:
        with sftp_world(bao, workdir) as world:
            sshd, home = world["sshd"], world["bot_home"]
            keydir = workdir / "direct"
            keydir.mkdir()
            ssh_direct(world, "true", keydir)  # the benchmark's own certificate and known_hosts
            opts_for = {
                "direct": [*SSH_OPTS, "-i", str(keydir / "id"), "-o", f"UserKnownHostsFile={keydir / 'known_hosts'}"],
                "botwarden": [*SSH_OPTS, "-o", f"UserKnownHostsFile={home / 'known_hosts'}"],
            }
            big = home / "big.bin"
            with open(big, "wb") as f:
                for _ in range(opts.size_mb):
                    f.write(os.urandom(1 << 20))
            os.chmod(big, 0o644)
            digest = sha256(big)
            REMOTE_DIR.mkdir(exist_ok=True)
            target = f"root@{sshd.host}"
            ssh_opts = {path: " ".join(shlex.quote(x) for x in o) for path, o in opts_for.items()}
            paths = ("direct", "botwarden")
            total = {p: {"ssh": 0.0, "put": 0.0, "get": 0.0} for p in paths}
            for path in paths:  # warm: the first connection (page cache, OpenBao's CA key)
                run(world, path, f"ssh {ssh_opts[path]} -p {sshd.port} {target} true", 60)
            # Interleaved, so that both paths share the machine's load as it changes: the ssh loop
            # in batches, one transfer of each kind per path.
            batch = max(1, opts.count // opts.batches)
            done = 0
            while done < opts.count:
                n = min(batch, opts.count - done)
                sign_direct(world, keydir)
                for path in paths:
                    ssh = f"ssh {ssh_opts[path]} -p {sshd.port} {target} true"
                    total[path]["ssh"] += run(world, path, f"i=0\nwhile [ $i -lt {n} ]; do {ssh}; i=$((i+1)); done",
                                              60 + n * 10)
                done += n
            for path in paths:
                sign_direct(world, keydir)
                o = ssh_opts[path]
                remote_file = REMOTE_DIR / f"{path}.bin"
                back = home / f"{path}.back"
                back.unlink(missing_ok=True)
                total[path]["put"] = run(world, path, f"scp {o} -P {sshd.port} {big} {target}:{remote_file}", 1800)
                total[path]["get"] = run(world, path, f"sftp {o} -P {sshd.port} {target}:{remote_file} {back}", 1800)
                if sha256(remote_file) != digest or sha256(back) != digest:
                    raise RuntimeError(f"{path}: the transferred file differs from the source")
                remote_file.unlink()
                back.unlink()
            results = {p: {"ssh_true_ms": t["ssh"] / opts.count * 1000, "scp_put_mb_s": opts.size_mb / t["put"],
                           "sftp_get_mb_s": opts.size_mb / t["get"], "ssh_true_total_s": t["ssh"],
                           "scp_put_s": t["put"], "sftp_get_s": t["get"]} for p, t in total.items()}
            d, b = results["direct"], results["botwarden"]
            load = os.getloadavg()
            lines = [
                f"# OpenSSH direct vs through botwarden ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
                "",
                f"`bench/ssh_compare.py --count {opts.count} --size-mb {opts.size_mb}`; "
                f"{subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()} client and sshd "
                f"on a veth pair, {platform.node()}, {os.cpu_count()} CPUs, load average "
                f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end.",
                "",
                "| workload | direct | botwarden | ratio |",
                "|---|---|---|---|",
                f"| `ssh host true` x{opts.count}, sequential (set-up per command) | {d['ssh_true_ms']:.0f} ms "
                f"| {b['ssh_true_ms']:.0f} ms | {b['ssh_true_ms'] / d['ssh_true_ms']:.2f}x |",
                f"| `scp` upload, {opts.size_mb} MB (SFTP mode) | {d['scp_put_mb_s']:.1f} MB/s "
                f"| {b['scp_put_mb_s']:.1f} MB/s | {b['scp_put_mb_s'] / d['scp_put_mb_s']:.2f}x |",
                f"| `sftp` download, {opts.size_mb} MB | {d['sftp_get_mb_s']:.1f} MB/s "
                f"| {b['sftp_get_mb_s']:.1f} MB/s | {b['sftp_get_mb_s'] / d['sftp_get_mb_s']:.2f}x |",
            ]
            text = "\n".join(lines) + "\n"
            print(text)
            out = ROOT / "bench" / "results" / "ssh.md"
            out.parent.mkdir(exist_ok=True)
            out.write_text(text)
            if opts.json is not None:
                opts.json.write_text(json.dumps({"count": opts.count, "size_mb": opts.size_mb, "load": load,
                                                 "results": results}, indent=2) + "\n")
        return 0
    finally:
        bao.stop()
        subprocess.run(["rm", "-rf", str(workdir), str(REMOTE_DIR)], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
