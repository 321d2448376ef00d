"""appliance.workers = 1 vs 2, full inspection, side by side (issue 20.3).

Run as root from the repository root:

    .venv/bin/python bench/workers.py [--duration 10] [--repeat 3] [--clients 8] [--modes simple,prepared]

Two whole daemons (`botwarden run`, as bench/pgbench_compare.py starts them: eBPF probes,
attestation, the pglast policy engine with a realistic rule set, every statement an audit row
in DuckDB, audit.mode = strict) against one real PostgreSQL 15, one with ``workers = 1`` and
one with ``workers = 2``; `pgbench -S` runs through each in turn, rounds interleaved. So that
"more workers" is not measured as "more of the CPU the load generator needed", PostgreSQL and
pgbench are pinned to CPU 0 and each daemon (its workers and its audit process) to CPU 1 with
taskset (--no-pin: no pinning). Reports TPS and the daemon's CPU microseconds per transaction
(supervisor + workers + audit process, from /proc), medians over the rounds; writes
bench/results/workers.md and, with --json FILE, every number.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pgbench_compare import PASSWORD, PGBENCH, USER, Daemon, on_cpu, pin, postmaster_pid, py_spy, role, run_pgbench  # noqa: E402
from bench.pgbench_compare import proc_tree as tree  # noqa: E402

MASKED_ROWS = 100_000


# name: (SQL run once in the bench database, pgbench script or None for -S)
WORKLOADS = {
    "select-only": ((), None),
    "masked-rows": ((f"CREATE TABLE big AS SELECT i AS id, 'person' || i || '@example.com' AS email, "
                     f"lpad((i::bigint * 7919 % 1000000000)::text, 9, '0') AS ssn, md5(i::text) AS note "
                     f"FROM generate_series(1, {MASKED_ROWS}) i", "ALTER TABLE big ADD PRIMARY KEY (id)", "ANALYZE big"),
                    f"\\set id random(1, {MASKED_ROWS - 9})\n"
                    "SELECT id, email, ssn, note FROM big WHERE id BETWEEN :id AND :id + 9;\n"),
    # Ad-hoc reads: every statement a shape the policy engine has not seen (its aliases carry a
    # random number), so each one is parsed and decided from scratch, while PostgreSQL's share (an
    # index lookup of one row, parsed and planned in C) stays small. Only numbers, no string
    # constants and no functions: a plain read, and no constant the audit redaction must examine.
    # Simple protocol only: pgbench cannot bind an alias as a parameter.
    "adhoc": ((), "\\set aid random(1, 100000 * :scale)\n\\set r random(1, 99999)\n" + "SELECT aid AS a_:r, " + ", ".join(
        f"abalance + {i} AS c{i}_:r, CASE WHEN abalance > {i} THEN bid WHEN abalance < -{i} THEN -bid ELSE {i} END AS k{i}_:r"
        for i in range(4)) + " FROM pgbench_accounts WHERE aid = :aid;\n"),
}

SYSCALLS = ("read", "write", "recvfrom", "sendto", "epoll_wait", "epoll_pwait", "futex", "sendmsg", "recvmsg")


def start_syscall_counts(root: int, tmp: Path, duration: int) -> dict[str, tuple[subprocess.Popen, Path]]:
    """One `perf stat` per process role of a daemon's tree, counting the calls in SYSCALLS over
    the run (started just before pgbench, for its duration)."""
    by_role: dict[str, list[int]] = {}
    for p in tree(root):
        by_role.setdefault(role(p, root), []).append(p)
    events = ",".join(f"syscalls:sys_enter_{c}" for c in SYSCALLS)
    out = {}
    for r, pids in by_role.items():
        path = tmp / f"perf-{root}-{r}.csv"
        out[r] = (subprocess.Popen(["perf", "stat", "-x,", "-o", str(path), "-e", events, "-p",
                                    ",".join(map(str, pids)), "--", "sleep", str(duration)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path)
    return out


def read_syscall_counts(counters: dict[str, tuple[subprocess.Popen, Path]], txns: int) -> dict[str, dict[str, float]]:
    """{role: {call: calls per transaction}} (the count covers the pgbench run's duration)."""
    out: dict[str, dict[str, float]] = {}
    for r, (proc, path) in counters.items():
        proc.wait(60)
        calls: dict[str, float] = {}
        for line in path.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_") and fields[0].isdigit():
                calls[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0]) / txns
        out[r] = {c: n for c, n in calls.items() if n >= 0.005}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--modes", default="simple,prepared")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--audit-mode", choices=["strict", "batched"], default="strict")
    ap.add_argument("--record", choices=["full", "metadata"], default="full",
                    help="the target's recording: full (the default: responses too) or metadata")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="select-only",
                    help="select-only: pgbench -S (one-row reads: PostgreSQL and pgbench cost about what the "
                         "daemon does); masked-rows: 10-row reads of a table whose email and ssn the policy masks "
                         "(the daemon's share of each statement is larger: decoding and masking every row); "
                         "adhoc: one-row reads each of a shape never seen before (the policy engine parses and "
                         "decides every statement; simple mode only)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "workers.md"))
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--profile", metavar="PREFIX", help="py-spy (raw stacks) over each process of both daemons "
                                                        "during their first run: PREFIX-w<N>-<pid>.txt (pinned, "
                                                        "PostgreSQL and pgbench do not compete for the daemon's "
                                                        "core, so its samples are mostly its CPU time)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count each process role's system calls per transaction in every run (perf's "
                         "syscalls tracepoints; the machine has no hardware counters): the same calls per "
                         "transaction with more CPU means each costs more, more calls means less batching")
    args = ap.parse_args()
    if args.profile:
        py_spy()
    args.builtin = "select-only"
    args.script = None
    if args.workload == "adhoc" and args.modes != "simple":
        ap.error("--workload adhoc runs in simple mode only (pgbench cannot bind an alias): add --modes simple")

    from appliance.sandbox import PostgresServer

    tmp = Path(tempfile.mkdtemp(prefix="bw-bench-workers-"))
    os.chmod(tmp, 0o777)
    pg = PostgresServer(extra_conf={"max_connections": "100"}).start()
    daemons: dict[int, Daemon] = {}
    try:
        pg.psql(f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        pg.psql("CREATE DATABASE bench")
        subprocess.run([PGBENCH, "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(pg.port), "-U", USER,
                        "bench"], check=True, capture_output=True, env={**os.environ, "PGPASSWORD": PASSWORD})
        setup, script = WORKLOADS[args.workload]
        for sql in setup:
            pg.psql(sql, db="bench")
        if script:
            args.script = str(tmp / f"{args.workload}.sql")
            Path(args.script).write_text(script)
        for n in (1, 2):
            daemons[n] = Daemon(tmp, pg.port, args.audit_mode, suffix=f"-w{n}-{os.getpid()}", workers=n,
                                record=args.record)
        time.sleep(1)  # the workers are up once the control socket answers; let them settle
        if not args.no_pin:
            pin(tree(postmaster_pid(pg)), 0)
            for d in daemons.values():
                pin(tree(d.pid), 1)
        wrap_cpu = (lambda d: on_cpu(0, d.bot)) if not args.no_pin else (lambda d: d.bot)
        modes = [m for m in ("simple", "prepared") if m in args.modes.split(",")]
        runs: dict[tuple[str, int], list[dict]] = {}
        for round_no, mode in itertools.product(range(args.repeat), modes):
            for n, d in daemons.items():
                print(f"[{round_no + 1}/{args.repeat}] pgbench -S -M {mode}, workers = {n} ({args.duration}s) ...",
                      file=sys.stderr)
                spies = []
                if args.profile and round_no == 0 and mode == modes[0]:
                    spies = [subprocess.Popen([py_spy(), "record", "-p", str(p),
                                               "-o", f"{args.profile}-w{n}-{p}.txt", "-r", "200", "-d", str(args.duration),
                                               "--nonblocking", "-f", "raw"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                             for p in tree(d.pid)]
                counters = start_syscall_counts(d.pid, tmp, args.duration) if args.syscalls else {}
                r = run_pgbench(pg.port, "no-token-needed", mode, args, tmp, f"botwarden_w{n}-{mode}", d.pid,
                                wrap_cpu(d))
                for spy in spies:
                    spy.wait(60)
                if counters:
                    r["syscalls_per_txn"] = read_syscall_counts(counters, r["txns"])
                runs.setdefault((mode, n), []).append(r)
        results = {}
        for key, rs in runs.items():
            pick = sorted(rs, key=lambda r: r["tps"])[(len(rs) - 1) // 2]
            results[key] = {**pick, "all_tps": [r["tps"] for r in rs], "all_cpu_us": [r["cpu_us"] for r in rs]}
        pinning = ("PostgreSQL and pgbench pinned to CPU 0, each daemon (workers, audit process) to CPU 1"
                   if not args.no_pin else "no CPU pinning")
        what = {"select-only": "pgbench -S",
                "masked-rows": f"pgbench -f masked-rows (`{WORKLOADS['masked-rows'][1].splitlines()[1]}`, email and ssn masked)",
                "adhoc": "pgbench -f adhoc (one-row reads, each of a new shape: `SELECT aid AS a_:r, abalance + 0 AS "
                         "c0_:r, CASE WHEN ... END AS k0_:r, ... FROM pgbench_accounts WHERE aid = :aid`, 9 columns, "
                         ":r random)"}[args.workload]
        lines = [f"# appliance.workers: {what}, {args.clients} clients, {args.duration}s per run, "
                 f"{args.repeat} interleaved rounds (medians); full inspection, audit.mode = {args.audit_mode}, record = {args.record}; {pinning}; "
                 f"{os.cpu_count()} CPUs", "",
                 "| mode | workers | TPS | CPU µs/txn (daemon + workers + audit) | of which kernel | of which the "
                 "daemon (1) or supervisor (2) | the workers | the audit process | context switches/txn | p99 ms | "
                 "TPS of each round |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for mode in modes:
            for n in daemons:
                r = results[(mode, n)]
                roles = r["by_role_us"]
                workers = f"{roles['worker']:.1f}" if "worker" in roles else "–"
                lines.append(f"| {mode} | {n} | {r['tps']:.0f} | {r['cpu_us']:.1f} | {r['sys_us']:.1f} | "
                             f"{roles.get('daemon', 0):.1f} | {workers} | {roles.get('audit', 0):.1f} | "
                             f"{r['switches_per_txn']:.2f} | {r['p99']:.2f} | "
                             f"{', '.join(f'{t:.0f}' for t in r['all_tps'])} |")
        if args.syscalls:
            lines += ["", "System calls per transaction, by process (median run's counts):", "",
                      "| mode | workers | process | calls/txn |", "|---|---|---|---|"]
            for mode in modes:
                for n in daemons:
                    for r, calls in sorted(results[(mode, n)].get("syscalls_per_txn", {}).items()):
                        lines.append(f"| {mode} | {n} | {r} | " + ", ".join(
                            f"{c} {v:.2f}" for c, v in sorted(calls.items(), key=lambda kv: -kv[1])) + " |")
        text = "\n".join(lines) + "\n"
        print(text)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "args": vars(args), "cpus": os.cpu_count(),
                "results": [{"mode": m, "workers": n, **r} for (m, n), r in results.items()]}, indent=2))
    finally:
        for d in daemons.values():
            d.stop()
        pg.stop()


if __name__ == "__main__":
    main()
