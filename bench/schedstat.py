"""Who waits for a CPU during a bench run: every second, each role's run time, run-queue wait,
time slices and involuntary switches, summed over its threads, from /proc/PID/task/TID/schedstat
(run and wait in ns, slices) and .../status (nonvoluntary_ctxt_switches).

Run beside a bench that is already running, as root, from the repository root:

    .venv/bin/python bench/pgbench_compare.py --paths full,front --modes simple --no-big --duration 8 &
    .venv/bin/python bench/schedstat.py --seconds 75

Roles: the bench daemon (`botwarden run` of a bench directory) split into the daemon, its workers
and its audit process as bench/pgbench_compare.py splits its CPU, the bench's own front and relay
(`--serve-front`, `--serve-relay`), PostgreSQL's processes and pgbench. A
line is printed for each second in which some role ran more than 100 ms. A wait is time runnable
but not running: behind other tasks on the run queue, including after a wake-up. Divide by the
run's TPS for µs per transaction (README, "Where the microseconds go").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pgbench_compare import proc_tree, role  # noqa: E402

_NONVOLUNTARY = re.compile(r"^nonvoluntary_ctxt_switches:\s+(\d+)", re.M)


def roots() -> dict[int, str]:
    """The processes a bench run is made of, by command line: a bench daemon (`botwarden run` of a
    bench directory), the bench's own front and relay, PostgreSQL's processes and pgbench."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "appliance.cli" in cmd and " run" in cmd and "bw-bench" in cmd:
            out[int(pid)] = "daemon"
        elif "--serve-front" in cmd:
            out[int(pid)] = "front"
        elif "--serve-relay" in cmd:
            out[int(pid)] = "relay"
        elif cmd.startswith("postgres") or "/bin/postgres " in cmd:
            out[int(pid)] = "postgres"
        elif "pgbench" in cmd and " -S" in cmd:
            out[int(pid)] = "pgbench"
    return out


def sample() -> dict[tuple[int, str], tuple[str, int, int, int, int]]:
    """(pid, tid) -> (role, run ns, wait ns, slices, involuntary switches). A daemon's tree is
    split as the bench splits its CPU (bench/pgbench_compare.py `role`: daemon, worker, audit)."""
    procs: dict[int, str] = {}
    for pid, what in roots().items():
        if what != "daemon":
            procs.setdefault(pid, what)
            continue
        for p in proc_tree(pid):
            procs[p] = role(p, pid)
    out = {}
    for pid, what in procs.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run, wait, slices = map(int, f.read().split())
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    m = _NONVOLUNTARY.search(f.read())
            except (OSError, ValueError):
                continue  # the thread ended meanwhile
            out[(pid, tid)] = (what, run, wait, slices, int(m.group(1)) if m else 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    prev = sample()
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        time.sleep(1)
        now = sample()
        per_role: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0, 0])
        for key, (role, run, wait, slices, invol) in now.items():
            if key not in prev:
                continue  # a thread started this second: counted from the next one
            _, run0, wait0, slices0, invol0 = prev[key]
            acc = per_role[role]
            acc[0] += (run - run0) / 1e6
            acc[1] += (wait - wait0) / 1e6
            acc[2] += slices - slices0
            acc[3] += invol - invol0
        prev = now
        if any(acc[0] > 100 for acc in per_role.values()):
            print(time.strftime("%H:%M:%S"), "  ".join(
                f"{role}: run {a[0]:.0f} ms, wait {a[1]:.0f} ms, slices {a[2]}, involuntary {a[3]}"
                for role, a in sorted(per_role.items()) if a[0] > 1), flush=True)


if __name__ == "__main__":
    main()
