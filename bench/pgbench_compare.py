"""pgbench side by side: direct vs pgbouncer (session mode) vs the botwarden PostgreSQL front.

Run as root from the repository root:

    .venv/bin/python bench/pgbench_compare.py [--duration 15] [--repeat 3] [--clients 8] [--threads 2]

(--paths, --modes and --no-big pick a subset while working on one path; --profile FILE.perf
or FILE.txt records the daemon with Linux perf or py-spy during its first run; with
BENCH_KEEP_LOGS=DIR in the environment, pgbench's per-transaction logs (and the daemons' logs) are copied to DIR.
--json FILE also writes every number (each round, the medians, the large results, the load
average before and after) as JSON, so later runs can be compared. --quick is the regression
guard: under a minute (3 s runs, one round, scale 1, a 100,000-row large result; direct,
pgbouncer, relay and the full daemon), it prints the same table: what to look at is the proxy
CPU per transaction and the ratios, which a doubled hot path doubles whatever the load.)

It starts a real PostgreSQL 15 (appliance.sandbox), pgbouncer from the Debian
package with a temp config, and botwarden twice: the whole daemon (`botwarden
run`: pgbench runs inside a watched bot cgroup via `botwarden bot run`, the eBPF
probes redirect it, identity from kernel attestation, every statement through the
pglast policy engine with a realistic rule set, every request an audit row in
DuckDB) and, to show what the inspection costs, the PostgreSQL front alone in its
own process (allow-all, audit into a ring buffer); and, as the floor of any Python
proxy, a plain uvloop byte relay. Runs
`pgbench -S` in simple and prepared modes against each; and a
~100 MB SELECT with two masked columns. TPS comes from pgbench, latency
p50/p99 from its per-transaction logs (--log), CPU microseconds per
transaction of the proxy process and its children from /proc/<pid>/stat (utime +
stime; the daemon's child is its audit process; the stime share is printed too, and issue 20's
target 1 ratios: full inspection's CPU against pgbouncer's, split into user and kernel time, its
TPS and p99 against the byte relay's). With --repeat N every path runs N
times, the rounds interleaved (each round starting one path later), and the table shows medians;
each proxy gets a short unmeasured warm-up run first, and after each run (and before each large-result query) the bench waits for the
proxy to go idle (its audit process's last commits count for that run, not the next path's).
`--paths full,full-aa` is the A/A comparison: a second daemon configured exactly as the first, so
the ratio of their TPS in the same round is the spread of the bench itself on this machine.
`--pin` runs PostgreSQL and pgbench on CPU 0 and every proxy on CPU 1 (bench/workers.py's set-up):
unpinned, a proxy's CPU per transaction also includes what it loses competing with the load for
both cores (migrations, cold caches, more wake-ups with fewer messages each).
Prints a Markdown table and writes it to bench/results/pgbench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
PSQL = "/usr/lib/postgresql/15/bin/psql"
USER, PASSWORD = "bw_bench", "bw-bench-pw"
TOKEN = "bench-token"
BIG_SQL = "SELECT id, email, ssn, payload FROM big"
# The same rows through a view no masking rule names: the large result forwarded unmasked.
BIG_OPEN_SQL = "SELECT id, email, ssn, payload FROM big_open"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AA_NAME = "botwarden (full, A-A twin)"
SETTLE_MAX_S = 10.0   # after a run, how long to wait at most for the proxy to go idle


# ---------------------------------------------------------------- the front, in its own process

def serve_front(upstream_port: int, port_file: str) -> None:
    import uvloop

    from appliance.fronts.postgres import PgFrontSettings, PostgresFront
    from appliance.fronts.services import Credential, DefaultServices
    from appliance.policy.types import Verdict

    class BenchServices(DefaultServices):
        """Allow all except the big SELECT, which masks two columns; audit kept in a bounded ring."""

        def __init__(self):
            super().__init__(Credential(USER, PASSWORD), mask_columns=("email", "ssn"))
            from collections import deque
            self.ring = deque(maxlen=10_000)

        def decide_sql(self, grant, target, sql, phase):
            if sql == BIG_SQL:
                return Verdict("mask", "bench-pii", "two masked columns")
            return super().decide_sql(grant, target, sql, phase)

        def audit(self, kind, record):
            self.ring.append((kind, record))

    async def main() -> None:
        settings = PgFrontSettings(target="bench", upstream_host="127.0.0.1", upstream_port=upstream_port,
                                   upstream_tls="disable", allow_plaintext=True)
        front = PostgresFront(settings, BenchServices())
        server = await front.serve("127.0.0.1", 0)
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(main())


def serve_relay(upstream_port: int, port_file: str) -> None:
    """A plain uvloop byte relay (no inspection): the floor of any Python proxy on this machine."""
    import uvloop

    class Upstream(asyncio.Protocol):
        def __init__(self, down):
            self.down = down

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.down.transport.write(data)

        def connection_lost(self, exc):
            self.down.transport.close()

    class Downstream(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.pending, self.up = transport, [], None
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self):
            loop = asyncio.get_running_loop()
            _, self.up = await loop.create_connection(lambda: Upstream(self), "127.0.0.1", upstream_port)
            for data in self.pending:
                self.up.transport.write(data)

        def data_received(self, data):
            if self.up is not None:
                self.up.transport.write(data)
            else:
                self.pending.append(data)

        def connection_lost(self, exc):
            if self.up is not None:
                self.up.transport.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Downstream, "127.0.0.1", 0)
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(main())


# ---------------------------------------------------------------- the whole daemon

BOTS_CGROUP = f"botwarden-bench{os.getpid()}.bots"  # per run: benches of other checkouts may run beside
PIN_DIR = f"/sys/fs/bpf/botwarden-bench{os.getpid()}"
DAEMON_RULES = """
[[rules]]
name = "no-drops-or-truncates"
action = "block"
[rules.sql]
properties = ["drop", "truncate"]

[[rules]]
name = "no-server-files"
action = "block"
[rules.sql]
functions = ["pg_read_file", "pg_read_binary_file", "pg_ls_dir", "lo_export", "lo_import"]

[[rules]]
name = "mass-changes-need-a-human"
action = "approve"
[rules.sql]
kinds = ["DELETE", "UPDATE"]
properties = ["no_where"]

[[rules]]
name = "mask-pii"
action = "mask"
[rules.sql]
relations = ["big"]
[[rules.mask]]
columns = ["email", "ssn"]
strategy = "partial"
keep = 4
"""


class Daemon:
    """`botwarden run` with eBPF probes on a bench bots cgroup; bots are started with `bot run`."""

    def __init__(self, tmp: Path, pg_port: int, audit_mode: str = "strict", strict_reads: bool = False,
                 suffix: str = "", extra: str = "", record: str = "full", workers: int = 1, audit_extra: str = ""):
        """``suffix``: a second daemon beside the first (its own directory, bots cgroup, pins, table).
        ``extra``: more botwarden.toml sections (bench/fleet_ship.py adds [fleet]); ``audit_extra``:
        more lines for its [audit] section."""
        from appliance.sandbox import free_port

        self.bots_cgroup = BOTS_CGROUP.replace(".bots", f"{suffix}.bots")
        self.dir = tmp / f"daemon{suffix}"
        self.dir.mkdir()
        pwfile = self.dir / "bench.pw"
        pwfile.write_text(PASSWORD + "\n")
        os.chmod(pwfile, 0o600)
        self.config = self.dir / "botwarden.toml"
        self.socket = self.dir / "run" / "control.sock"
        self.config.write_text(f"""
[appliance]
state_dir = "{self.dir / 'state'}"
control_socket = "{self.socket}"
workers = {workers}

[audit]
path = "{self.dir / 'state' / 'audit.duckdb'}"
mode = "{audit_mode}"
strict_reads = {str(strict_reads).lower()}
{audit_extra}
[probes]
mode = "ebpf"
bots_cgroup = "{self.bots_cgroup}"
pin_dir = "{PIN_DIR}{suffix}"
nft_table = "botwarden_bench{suffix.replace('-', '_')}"

[[targets]]
name = "bench"
protocol = "postgres"
address = "127.0.0.1:{pg_port}"
listen = "127.0.0.1:{free_port()}"
allow_plaintext = true
authentication = "attestation"
record = "{record}"
[targets.tls]
mode = "disable"
[targets.credential]
source = "static"
username = "{USER}"
password_file = "{pwfile}"

[[identities]]
name = "bench-bot"
[identities.process]
cgroup = "pgbench"
""" + extra + DAEMON_RULES)
        self.log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(self.config), "run"],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # a session of its own, as a systemd service
        from appliance.control import ControlClient, ControlError

        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited; see {self.dir / 'daemon.log'}")
            try:
                ControlClient(str(self.socket)).get("/v1/status")
                break
            except ControlError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def bot(self, argv: list[str]) -> list[str]:
        """argv run as the bench bot, inside its watched cgroup, as nobody (`bot run` refuses a root bot)."""
        return [sys.executable, "-m", "appliance.cli", "--config", str(self.config), "bot", "run",
                "--name", "pgbench", "--user", "nobody", "--", *argv]

    def audited_requests(self) -> int:
        from appliance.control import ControlClient

        client = ControlClient(str(self.socket))
        client.post("/v1/audit/flush")
        return client.post("/v1/audit/sql", {"sql": "SELECT count(*) FROM requests"})["rows"][0][0]

    def decisions(self, sql: str) -> list[str]:
        """The distinct decisions the audit store holds for requests of exactly ``sql``: what the
        large result's labels (masked, unmasked) are checked against."""
        from appliance.control import ControlClient

        client = ControlClient(str(self.socket))
        client.post("/v1/audit/flush")
        quoted = sql.replace("'", "''")
        rows = client.post("/v1/audit/sql", {"sql": f"SELECT DISTINCT decision FROM requests WHERE text = '{quoted}' "
                                                    "ORDER BY 1"})["rows"]
        return [r[0] for r in rows]

    def paced(self) -> int:
        """botwarden_audit_paced_requests_total: statements that waited for the audit store."""
        from prometheus_client.parser import text_string_to_metric_families

        from appliance.control import _UnixHTTPConnection  # ControlClient reads JSON only

        conn = _UnixHTTPConnection(str(self.socket), 30)
        try:
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
        finally:
            conn.close()
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == "botwarden_audit_paced_requests_total":
                    return int(sample.value)
        return 0

    def missing_events(self) -> int:
        """What `audit verify` finds missing (holes in sessions' request numbers): a run that
        outran its audit store and lost records would not be a result."""
        from appliance.control import ControlClient

        return ControlClient(str(self.socket)).post("/v1/audit/verify", {"allow_gaps": True},
                                                     timeout=600)["missing_events"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(self.config), "probes", "detach"],
                       cwd=ROOT, capture_output=True)
        from probes import cgroups

        try:
            cgroups.remove(self.bots_cgroup)
        except Exception as e:  # leave it: the next run re-creates it
            print(f"could not remove cgroup {self.bots_cgroup}: {e}", file=sys.stderr)
        self.log.close()
        if os.environ.get("BENCH_KEEP_LOGS"):
            shutil.copy(self.dir / "daemon.log", Path(os.environ["BENCH_KEEP_LOGS"]) / f"{self.dir.name}.log")


# ---------------------------------------------------------------- helpers

def cpu_ratio(full: dict | None, other: dict | None) -> dict | None:
    """Proxy CPU per transaction of ``full`` over ``other`` (two median runs), with each's user and
    kernel µs (user: the process's own code, the interpreter and its C extensions; kernel: the
    system calls and what they do for it). None when either was not run or not measured."""
    if not full or not other or not full.get("cpu_us") or not other.get("cpu_us") \
            or full.get("sys_us") is None or other.get("sys_us") is None:
        return None
    return {"cpu": full["cpu_us"] / other["cpu_us"],
            "user_us": [full["cpu_us"] - full["sys_us"], other["cpu_us"] - other["sys_us"]],
            "kernel_us": [full["sys_us"], other["sys_us"]]}


def py_spy() -> str:
    """The py-spy that --profile runs (the venv's, or one on PATH); exits with how to install it
    when there is none (it is the `bench` extra, not installed by the README's commands)."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(found, os.X_OK):
        sys.exit(f"--profile needs py-spy, which is not installed: {Path(sys.executable).parent}/pip install -e '.[bench]'")
    return found


def pin(pids: list[int], cpu: int) -> None:
    """Every thread of each process in ``pids`` onto ``cpu`` (processes they fork later inherit it)."""
    for p in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(p)], check=True, capture_output=True)


def on_cpu(cpu: int, wrap=None):
    """An argv wrapper that runs the command on ``cpu`` (inside ``wrap``, e.g. a daemon's `bot run`)."""
    return lambda cmd: (wrap or list)(["taskset", "-c", str(cpu), *cmd])


def postmaster_pid(pg) -> int:
    return int((Path(pg.datadir) / "postmaster.pid").read_text().split()[0])


def proc_tree(pid: int) -> list[int]:
    """pid and every descendant process (the daemon, its workers, its audit process)."""
    out = [pid]
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = task.joinpath("children").read_text().split()
        except OSError:
            continue
        for c in children:
            out += proc_tree(int(c))
    return out


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return ["0"] * 13


def cpu_own(pid: int) -> int:
    """utime + stime of the process alone."""
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process and its child processes (the daemon's audit process)."""
    return sum(cpu_own(p) for p in proc_tree(pid))


def role(pid: int, root: int) -> str:
    """What a process of the daemon's tree is: "daemon", "worker", "audit" or "other"."""
    if pid == root:
        return "daemon"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    if b"appliance.worker" in cmdline:
        return "worker"
    return "audit" if b"appliance.auditproc" in cmdline else "other"


def cpu_by_role(pid: int) -> dict[str, int]:
    """CPU ticks of a daemon's tree, per role (see role)."""
    out: dict[str, int] = {}
    for p in proc_tree(pid):
        r = role(p, pid)
        out[r] = out.get(r, 0) + cpu_own(p)
    return out


def tree_switches(pid: int) -> tuple[int, int]:
    """(system-mode CPU ticks, context switches of every thread) of a process and its children:
    how much of the proxy's CPU is the kernel's, and how often its threads went to sleep or were
    preempted (an event loop that finds one ready socket per wake-up switches once per message)."""
    stime = switches = 0
    for p in proc_tree(pid):
        stime += int(_stat(p)[12])
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                for line in task.joinpath("status").read_text().splitlines():
                    if "ctxt_switches:" in line:
                        switches += int(line.split()[1])
            except OSError:
                continue
    return stime, switches


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def percentile(sorted_values: list[int], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def run_pgbench(port: int, password: str, mode: str, args, logdir: Path, tag: str, cpu_pid: int | None,
                wrap=None) -> dict:
    prefix = logdir / tag
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable", "PYTHONPATH": str(ROOT)}
    script = getattr(args, "script", None)  # a custom pgbench script (bench/workers.py --workload)
    workload = ["-f", script] if script else ["-S"] if args.builtin == "select-only" else ["-b", args.builtin]
    cmd = [PGBENCH, "-n", *workload, "-c", str(args.clients), "-j", str(args.threads), "-T", str(args.duration),
           "-M", mode, "-h", "127.0.0.1", "-p", str(port), "-U", "bot" if tag.startswith("botwarden") else USER,
           "--log", f"--log-prefix={prefix}", "bench"]
    if wrap is not None:
        cmd = wrap(cmd)
    before = cpu_ticks(cpu_pid) if cpu_pid else 0
    own_before = cpu_own(cpu_pid) if cpu_pid else 0
    roles_before = cpu_by_role(cpu_pid) if cpu_pid else {}
    sys_before, sw_before = tree_switches(cpu_pid) if cpu_pid else (0, 0)
    load = os.getloadavg()[0]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=logdir)
    # What the proxy still does for this run after pgbench ended (its audit process committing the
    # last records and chunks) counts for this run, and must not run into the next path's run.
    after = settle(cpu_pid)
    if res.returncode != 0:
        raise RuntimeError(f"pgbench {tag} failed: {res.stderr}")
    tps = float(next(line.split("=")[1].split()[0] for line in res.stdout.splitlines()
                     if line.startswith("tps") and "without initial" in line))
    txns = int(next(line.split(":")[1].split("/")[0] for line in res.stdout.splitlines()
                    if "number of transactions actually processed" in line))
    lat: list[int] = []
    for f in glob.glob(f"{prefix}.*"):
        with open(f) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3:
                    lat.append(int(parts[2]))
        if os.environ.get("BENCH_KEEP_LOGS"):
            shutil.copy(f, os.environ["BENCH_KEEP_LOGS"])
        os.unlink(f)
    lat.sort()
    cpu_us = (after - before) / CLK_TCK * 1e6 / txns if cpu_pid else None
    own_us = (cpu_own(cpu_pid) - own_before) / CLK_TCK * 1e6 / txns if cpu_pid else None
    sys_after, sw_after = tree_switches(cpu_pid) if cpu_pid else (0, 0)
    roles_after = cpu_by_role(cpu_pid) if cpu_pid else {}
    # Per role (daemon or supervisor, workers, audit process): µs per transaction.
    by_role = {r: (t - roles_before.get(r, 0)) / CLK_TCK * 1e6 / txns for r, t in roles_after.items()}
    return {"by_role_us": by_role, "tps": tps, "p50": percentile(lat, 50) / 1000, "p99": percentile(lat, 99) / 1000, "cpu_us": cpu_us,
            "own_us": own_us, "txns": txns, "load_1min_before": load,
            "sys_us": (sys_after - sys_before) / CLK_TCK * 1e6 / txns if cpu_pid else None,
            "switches_per_txn": (sw_after - sw_before) / txns if cpu_pid else None}


def settle(cpu_pid: int | None) -> int:
    """Wait (up to SETTLE_MAX_S) until the proxy's process tree stops using CPU (at most one tick
    in 0.25 s): its audit process done committing what the last run or query left it. Returns the
    tree's CPU ticks then."""
    if not cpu_pid:
        return 0
    after, start = cpu_ticks(cpu_pid), time.monotonic()
    while time.monotonic() - start < SETTLE_MAX_S:
        time.sleep(0.25)
        now = cpu_ticks(cpu_pid)
        busy, after = now - after > 1, now
        if not busy:
            break
    return after


def settle_seconds(cpu_pid: int | None) -> float:
    """settle(), returning how long it waited (the bench records it before each large-result query)."""
    start = time.monotonic()
    settle(cpu_pid)
    return time.monotonic() - start


def timed_psql(port: int, user: str, password: str, sql: str, wrap=None) -> float:
    """Seconds the query took as psql's \\timing measures it (query sent to last row read), so the
    start of psql and of the `bot run` wrapper around it do not count."""
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable", "PYTHONPATH": str(ROOT)}
    cmd = [PSQL, "-X", "-A", "-t", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "bench",
           "-o", "/dev/null", "-v", "ON_ERROR_STOP=1", "-c", "\\timing on", "-c", sql]
    t0 = time.perf_counter()
    res = subprocess.run(wrap(cmd) if wrap else cmd, check=True, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    for line in res.stdout.splitlines():
        if line.startswith("Time: "):
            return float(line.split()[1]) / 1000
    return wall


# ---------------------------------------------------------------- main

def _compiled() -> bool | None:
    """Whether the daemon's hot paths run compiled (appliance/hotpath; the daemon inherits this environment)."""
    try:
        from appliance import hotpath
    except ImportError:
        return None
    return hotpath.COMPILED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--big-rows", type=int, default=900_000, help="rows of the ~100 MB table")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "pgbench.md"))
    ap.add_argument("--paths", default="direct,pgbouncer,relay,full,front",
                    help="comma-separated subset of direct,pgbouncer,relay,full,full-batched,full-norecord,full-aa,"
                         "front (direct is always run; full-batched: a second daemon with audit.mode = batched; "
                         "full-norecord: a second daemon whose target records metadata only; full-aa: a second "
                         "daemon configured exactly as full, so full / full-aa per round is the A/A spread: "
                         "what two identical daemons differ by on this machine)")
    ap.add_argument("--twin-audit", default="", metavar="LINES",
                    help="[audit] lines for the full-aa daemon only, ';'-separated (an A/B instead of the A/A), "
                         "e.g. 'batch_max = 256'")
    ap.add_argument("--modes", default="simple,prepared", help="comma-separated subset of simple,prepared")
    ap.add_argument("--no-big", action="store_true", help="skip the large-result benchmark")
    ap.add_argument("--audit-mode", choices=["strict", "batched"], default="strict",
                    help="the full daemon's audit.mode (strict: each statement waits for its record's journal ack)")
    ap.add_argument("--strict-reads", action="store_true",
                    help="audit.strict_reads = true: plain reads wait for their record too")
    ap.add_argument("--builtin", choices=["select-only", "tpcb-like", "simple-update"], default="select-only",
                    help="pgbench's built-in script (select-only is -S)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every (mode, path) run, interleaved; the table shows medians")
    ap.add_argument("--profile", metavar="FILE", help="profile the daemon during its first mode's run: FILE.perf "
                    "with Linux perf, FILE.txt py-spy collapsed stacks, else a py-spy flame graph")
    ap.add_argument("--json", metavar="FILE", help="also write every number as JSON to FILE")
    ap.add_argument("--quick", action="store_true",
                    help="the regression guard: under a minute (3 s runs, 1 round, scale 1, 100,000 large rows, "
                         "paths direct,pgbouncer,relay,full unless --paths is given)")
    ap.add_argument("--pin", action="store_true",
                    help="PostgreSQL and pgbench on CPU 0, each proxy (with its children) on CPU 1, as "
                         "bench/workers.py runs: every proxy has a core of its own and none competes with the "
                         "load for it (direct PostgreSQL then has one core)")
    ap.add_argument("--suffix", default="", help="names the bench daemon's cgroup, pin dir and nft table apart "
                    "(tests/test_bench_quick.py: one per test run)")
    ap.add_argument("--serve-front", nargs=2, metavar=("UPSTREAM_PORT", "PORT_FILE"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-relay", nargs=2, metavar=("UPSTREAM_PORT", "PORT_FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile and not args.profile.endswith(".perf"):
        py_spy()
    if args.quick:
        args.duration, args.repeat, args.scale, args.big_rows = 3, 1, 1, 100_000
        if "--paths" not in sys.argv:
            args.paths = "direct,pgbouncer,relay,full"
    if args.serve_front:
        serve_front(int(args.serve_front[0]), args.serve_front[1])
        return
    if args.serve_relay:
        serve_relay(int(args.serve_relay[0]), args.serve_relay[1])
        return

    from appliance.sandbox import PostgresServer, free_port

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bw-bench-"))
    os.chmod(tmp, 0o777)
    pg = PostgresServer(extra_conf={"max_connections": "100"}).start()
    procs: list[subprocess.Popen] = []
    daemon: Daemon | None = None
    batched: Daemon | None = None
    norecord: Daemon | None = None
    twin: Daemon | None = None
    try:
        print(f"PostgreSQL 15 on 127.0.0.1:{pg.port}; preparing data ...", file=sys.stderr)
        pg.psql(f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        pg.psql("CREATE DATABASE bench")
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        subprocess.run([PGBENCH, "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(pg.port), "-U", USER,
                        "bench"], check=True, capture_output=True, env=env)
        if not args.no_big:
            pg.psql("CREATE TABLE big AS SELECT i AS id, 'person' || i || '@example.com' AS email, "
                    "lpad((i::bigint * 7919 % 1000000000)::text, 9, '0') AS ssn, repeat(md5(i::text), 2) AS payload "
                    f"FROM generate_series(1, {args.big_rows}) i", db="bench")
            # A table of its own, not a view of `big`: the policy follows a view to the table it
            # reads (since 6 December), so a view's rows are masked like the table's.
            pg.psql("CREATE TABLE big_open AS TABLE big", db="bench")
            big_mb = int(pg.psql("SELECT sum(octet_length(id::text) + octet_length(email) + octet_length(ssn) "
                                 "+ octet_length(payload)) FROM big", db="bench")) / 1e6

        # pgbouncer, session mode, temp config (it refuses to run as root: -u postgres)
        bport = free_port()
        bdir = tmp / "pgbouncer"
        bdir.mkdir()
        (bdir / "userlist.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
        (bdir / "pgbouncer.ini").write_text(f"""[databases]
bench = host=127.0.0.1 port={pg.port} dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {bport}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {bdir}/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 50
logfile = {bdir}/pgbouncer.log
pidfile = {bdir}/pgbouncer.pid
""")
        pw = pwd.getpwnam("postgres")
        for p in bdir.iterdir():
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chown(bdir, pw.pw_uid, pw.pw_gid)
        bouncer = subprocess.Popen(["pgbouncer", "-u", "postgres", str(bdir / "pgbouncer.ini")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(bouncer)

        def start_own(flag: str) -> tuple[subprocess.Popen, int]:
            port_file = tmp / f"{flag}.port"
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), flag, str(pg.port),
                                     str(port_file)], cwd=ROOT, start_new_session=True)
            procs.append(proc)
            deadline = time.monotonic() + 15
            while not port_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            port = int(port_file.read_text())
            wait_port(port)
            return proc, port

        front, fport = start_own("--serve-front")
        relay, rport = start_own("--serve-relay")
        wait_port(bport)
        daemon = Daemon(tmp, pg.port, args.audit_mode, args.strict_reads, suffix=args.suffix)
        if "full-batched" in args.paths.split(","):  # the same daemon with audit.mode = "batched", interleaved
            batched = Daemon(tmp, pg.port, "batched", suffix=args.suffix + "-batched")
        if "full-norecord" in args.paths.split(","):  # the same daemon without the session recording
            norecord = Daemon(tmp, pg.port, args.audit_mode, args.strict_reads, suffix=args.suffix + "-norec",
                              record="metadata")
        if "full-aa" in args.paths.split(","):  # the same daemon again: the A/A comparison
            twin = Daemon(tmp, pg.port, args.audit_mode, args.strict_reads, suffix=args.suffix + "-aa",
                          audit_extra=args.twin_audit.replace(";", "\n"))

        # (name, port, password, proxy pid, argv wrapper)
        full = "botwarden (full inspection)"
        front_only = "botwarden front only"
        keys = {"direct", *args.paths.split(",")}
        targets = [t for key, t in [
            ("direct", ("direct", pg.port, PASSWORD, None, None)),
            ("pgbouncer", ("pgbouncer", bport, PASSWORD, bouncer.pid, None)),
            ("relay", ("uvloop byte relay", rport, PASSWORD, relay.pid, None)),
            ("full", (full, pg.port, "no-token-needed", daemon.pid, daemon.bot)),
            ("full-batched", ("botwarden (full, audit.mode = batched)", pg.port, "no-token-needed",
                              batched.pid if batched else None, batched.bot if batched else None)),
            ("full-norecord", ("botwarden (full, record = metadata)", pg.port, "no-token-needed",
                               norecord.pid if norecord else None, norecord.bot if norecord else None)),
            ("full-aa", (AA_NAME, pg.port, "no-token-needed", twin.pid if twin else None, twin.bot if twin else None)),
            ("front", (front_only, fport, TOKEN, front.pid, None))] if key in keys]
        if args.pin:
            time.sleep(1)  # the daemons' workers and audit processes are up
            pin(proc_tree(postmaster_pid(pg)), 0)
            for _, _, _, pid, _ in targets:
                if pid is not None:
                    pin(proc_tree(pid), 1)
            targets = [(name, port, password, pid, on_cpu(0, wrap)) for name, port, password, pid, wrap in targets]
        modes = [m for m in ("simple", "prepared") if m in args.modes.split(",")]
        runs: dict[tuple[str, str], list[dict]] = {}
        audited_before = daemon.audited_requests()
        # One short unmeasured run per proxy first: its first sessions fill the policy's caches and
        # the audit file's first blocks, which would otherwise land on round 1 of that path only.
        warm = argparse.Namespace(**{**vars(args), "duration": min(2, args.duration)})
        for name, port, password, pid, wrap in targets:
            if pid is not None:
                run_pgbench(port, password, modes[0], warm, tmp, name.replace(" ", "_").replace("(", "").replace(")", "")
                            + "-warmup", None, wrap)
        # Rounds interleave the paths, so a slow minute of the machine does not land on one path only;
        # each round starts one path later, so no path always runs first (or right after another).
        for round_no, mode in itertools.product(range(args.repeat), modes):
            turn = round_no % len(targets)
            for name, port, password, pid, wrap in targets[turn:] + targets[:turn]:
                print(f"[{round_no + 1}/{args.repeat}] pgbench {args.builtin} -M {mode} via {name} ({args.duration}s) ...",
                      file=sys.stderr)
                tag = name.replace(" ", "_").replace("(", "").replace(")", "")
                spy = None
                if args.profile and name == full and mode == modes[0] and round_no == 0:
                    if args.profile.endswith(".perf"):  # Linux perf: user and kernel time, all threads
                        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                        cmd = ["perf", "record", "-F", "499", "-g", "-p", ",".join([str(pid), *kids]), "-o", args.profile,
                               "--", "sleep", str(args.duration)]
                    else:  # py-spy: Python stacks (raw collapsed stacks for a .txt name)
                        cmd = [py_spy(), "record", "-p", str(pid), "-o",
                               args.profile, "-r", "200", "-d", str(args.duration), "--threads", "--nonblocking",
                               "--subprocesses",  # the audit process too
                               "-f", "raw" if args.profile.endswith(".txt") else "flamegraph"]
                    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                paced = daemon.paced() if name == full else None
                r = run_pgbench(port, password, mode, args, tmp, f"{tag}-{mode}", pid, wrap)
                r["round"] = round_no
                if paced is not None:  # statements that waited for the audit store to catch up
                    r["paced"] = daemon.paced() - paced
                runs.setdefault((mode, name), []).append(r)
                if spy is not None:
                    spy.wait()
        audited = daemon.audited_requests() - audited_before
        missing = daemon.missing_events()
        full_txns = sum(r["txns"] for m in modes for r in runs.get((m, full), []))
        # Per path: the run with the median TPS (its latencies and CPU go with it); ratios per round
        # against that round's direct run, then their median.
        results: dict[tuple[str, str], dict] = {}
        for key, rs in runs.items():
            pick = sorted(rs, key=lambda r: r["tps"])[(len(rs) - 1) // 2]
            direct = {r["round"]: r["tps"] for r in runs[(key[0], "direct")]}
            ratios = sorted(r["tps"] / direct[r["round"]] for r in rs)
            results[key] = {**pick, "ratio": ratios[(len(ratios) - 1) // 2], "all_tps": [r["tps"] for r in rs],
                            "all_ratios": ratios}

        big: dict[str, float] = {}
        big_open: dict[str, float] = {}
        big_tries: dict[str, list[float]] = {}        # every try's seconds, in order (the table keeps the best)
        big_open_tries: dict[str, list[float]] = {}
        big_settled: dict[str, list[float]] = {}      # seconds each try waited for the proxy to go idle
        big_open_settled: dict[str, list[float]] = {}
        big_targets = [] if args.no_big else [t for t in targets if t[0] != "uvloop byte relay"]
        if big_targets:
            print("large result ...", file=sys.stderr)
        # Rounds interleave the paths here too (direct, pgbouncer, botwarden ..., then again), so a
        # busy minute of the machine does not land on one path; each path keeps its best time.
        # Best of five at least: one try of the same query varies by ±30 % on this VM (7 December:
        # direct 0.35–0.50 s within one run), so best of three sometimes kept an unlucky one.
        tries = 1 if args.quick else max(5, args.repeat)
        for name, port, password, _, wrap in big_targets:
            user = "bot" if name.startswith("botwarden") else USER
            timed_psql(port, user, password, "SELECT 1", wrap)  # warm up the connection path
        for attempt in range(tries):
            for name, port, password, cpu_pid, wrap in big_targets:
                user = "bot" if name.startswith("botwarden") else USER
                spy = None
                # Each query starts with the proxy idle, as each pgbench run ends: whatever the last
                # query left it to do (its audit process committing) must not share the CPU with this one.
                big_settled.setdefault(name, []).append(settle_seconds(cpu_pid))
                if args.profile and name == full and attempt == 0 and not args.profile.endswith(".perf"):
                    # py-spy over the daemon while it masks the large result (FILE-large.txt / .svg)
                    stem, ext = os.path.splitext(args.profile)
                    spy = subprocess.Popen([py_spy(), "record", "-p",
                                            str(daemon.pid), "-o", f"{stem}-large{ext}", "-r", "200", "--nonblocking",
                                            "-f", "raw" if ext == ".txt" else "flamegraph"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1)
                t = timed_psql(port, user, password, BIG_SQL, wrap)
                big[name] = min(big.get(name, t), t)
                big_tries.setdefault(name, []).append(t)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                if name.startswith("botwarden"):  # the same rows, no masking rule touching them
                    big_open_settled.setdefault(name, []).append(settle_seconds(cpu_pid))
                    t = timed_psql(port, user, password, BIG_OPEN_SQL, wrap)
                    big_open[name] = min(big_open.get(name, t), t)
                    big_open_tries.setdefault(name, []).append(t)
        load_after = os.getloadavg()
        # What the full daemon decided for the two large results, from its audit store: a label the
        # policy does not agree with (an "unmasked" result that was masked) is said in the table.
        big_decisions = {} if not big_targets else {"masked": daemon.decisions(BIG_SQL),
                                                    "unmasked": daemon.decisions(BIG_OPEN_SQL)}

        lines = [
            f"# pgbench {'-S' if args.builtin == 'select-only' else '-b ' + args.builtin}, {args.clients} clients, "
            f"{args.threads} threads, {args.duration}s per run "
            f"(scale {args.scale}); "
            + ("PostgreSQL and pgbench pinned to CPU 0, the proxy (and its children) to CPU 1; " if args.pin else
               f"{os.cpu_count()} CPUs shared by PostgreSQL, the proxy and pgbench; ")
            + f"the daemon's audit.mode = {args.audit_mode}"
            + (", strict_reads = true" if args.strict_reads else "")
            + (" (--quick)" if args.quick else ""),
            "",
            f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
            f"{', '.join(f'{x:.2f}' for x in load_after)}.",
            "",
            f"`{full}`: the daemon (`botwarden run`), pgbench started with `botwarden bot run` inside a "
            "watched cgroup and sent to the daemon by the eBPF probes, identity from kernel attestation, every "
            "statement through the pglast policy engine (4 rules), every request an audit row in DuckDB "
            f"({audited:,} request rows for {full_txns:,} transactions; `audit verify` afterwards: "
            + (f"**{missing:,} requests missing**" if missing else "none missing")
            + "; statements paced, i.e. held until the audit store caught up, per run: "
            + "; ".join(f"{m} " + ", ".join(f"{r.get('paced', 0):,}" for r in runs.get((m, full), [])) for m in modes)
            + f"). `{front_only}`: the PostgreSQL front in "
            "its own process with allow-all decisions and audit into a ring buffer (what the protocol work costs).",
            "",
            f"Proxy CPU is user + system time of the proxy's process and its children (for the daemon: "
            f"the daemon + its audit process). "
            + (f"Each path ran {args.repeat} times, interleaved; the table shows the median run and the median "
               f"of the per-round ratios (all ratios in the last column)." if args.repeat > 1 else ""),
            "",
            "| mode | path | TPS | ratio to direct | p50 ms | p99 ms | proxy CPU µs/txn | of it kernel µs/txn | ratios of all rounds |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for mode in modes:
            for name, *_ in targets:
                r = results[(mode, name)]
                cpu = f"{r['cpu_us']:.1f}" if r["cpu_us"] is not None else "—"
                if name.startswith("botwarden (full") and r["own_us"] is not None:
                    cpu += f" ({r['own_us']:.0f} daemon + {r['cpu_us'] - r['own_us']:.0f} audit process)"
                kernel = f"{r['sys_us']:.1f}" if r.get("sys_us") is not None else "—"
                lines.append(f"| {mode} | {name} | {r['tps']:,.0f} | {r['ratio']:.2f} | {r['p50']:.3f} | "
                             f"{r['p99']:.3f} | {cpu} | {kernel} | {', '.join(f'{x:.2f}' for x in r['all_ratios'])} |")
        relay_name = "uvloop byte relay"
        batched_name = "botwarden (full, audit.mode = batched)"
        norecord_name = "botwarden (full, record = metadata)"

        def same_round(other: str, mode: str) -> list[float] | None:
            """TPS of the full daemon over ``other``'s in the same round, sorted (None: not run)."""
            if (mode, full) not in runs or (mode, other) not in runs:
                return None
            o_tps = {r["round"]: r["tps"] for r in runs[(mode, other)]}
            return sorted(r["tps"] / o_tps[r["round"]] for r in runs[(mode, full)])

        def summary(other: str) -> list[str]:
            return [f"{mode} {rs[(len(rs) - 1) // 2]:.2f} ({', '.join(f'{x:.2f}' for x in rs)})"
                    for mode in modes if (rs := same_round(other, mode))]

        vs_relay, vs_batched, vs_norecord, vs_twin = (summary(n) for n in (relay_name, batched_name, norecord_name,
                                                                            AA_NAME))
        if vs_twin and args.twin_audit:
            lines += ["", f"A/B: `{full}` against `{AA_NAME}`, whose [audit] section adds `{args.twin_audit}`, "
                          "in the same round (TPS ratio): " + "; ".join(vs_twin) + "."]
        elif vs_twin:
            lines += ["", f"A/A: `{full}` against `{AA_NAME}` (a second daemon configured the same) in the same "
                          "round, the spread two identical daemons show on this machine: " + "; ".join(vs_twin) + "."]
        if vs_norecord:
            lines += ["", f"`{full}` (sessions recorded) against `{norecord_name}` in the same round: "
                          + "; ".join(vs_norecord) + "."]
        if vs_batched:
            lines += ["", f"`{full}` (audit.mode = {args.audit_mode}) against `{batched_name}` in the same round: "
                          + "; ".join(vs_batched) + "."]
        p99_vs_relay = {mode: results[(mode, full)]["p99"] / results[(mode, relay_name)]["p99"]
                        for mode in modes if (mode, full) in results and (mode, relay_name) in results
                        and results[(mode, relay_name)]["p99"] > 0}
        if vs_relay:
            lines += ["", f"`{full}` against the {relay_name} of the same round (a proxy that inspects nothing, "
                          "the floor of any Python proxy on this machine), TPS (issue 20's target 1: at least 0.80): "
                          + "; ".join(vs_relay) + ". p99 latency of the median runs against the relay's (target: at "
                          "most 1.5×): " + "; ".join(f"{mode} {x:.1f}×" for mode, x in p99_vs_relay.items()) + "."]
        cpu_vs_pgbouncer = {mode: cpu_ratio(results.get((mode, full)), results.get((mode, "pgbouncer")))
                            for mode in modes}
        if any(cpu_vs_pgbouncer.values()):
            lines += ["", f"`{full}`'s proxy CPU per transaction against pgbouncer's (issue 20's target 1: at most 2×), "
                          "and split into user time (Python, C extensions) and kernel time (the socket calls, waking "
                          "PostgreSQL and pgbench, the audit process's I/O): " + "; ".join(
                              f"{mode} {c['cpu']:.1f}× (user {c['user_us'][0]:.1f} µs against {c['user_us'][1]:.1f}, "
                              f"kernel {c['kernel_us'][0]:.1f} against {c['kernel_us'][1]:.1f})"
                              for mode, c in cpu_vs_pgbouncer.items() if c) + "."]
        lines += [] if not big_targets else [
            "",
            f"# Large result: `{BIG_SQL}` ({args.big_rows:,} rows, ~{big_mb:.0f} MB of values), psql to /dev/null;"
            " botwarden masks `email` and `ssn` in every row (decode, mask, re-encode each DataRow; the full daemon "
            "with the policy engine's partial masking, the front alone with a fixed mask)",
            "",
            *([f"**The labels below are wrong**: `{full}` decided `{BIG_SQL}` {big_decisions['masked']} and "
               f"`{BIG_OPEN_SQL}` {big_decisions['unmasked']} (expected ['mask'] and ['allow']).", ""]
              if big_decisions != {"masked": ["mask"], "unmasked": ["allow"]} else []),
            f"Best of {tries} tries per path, the paths interleaved; the last column compares the median "
            "tries instead (how much one unlucky try moves the ratio).",
            "",
            "| path | seconds | MB/s | ratio to direct | median try, ratio to direct's median |",
            "|---|---:|---:|---:|---:|",
        ]
        direct_median = statistics.median(big_tries["direct"]) if big_targets else 0.0
        for name, *_ in big_targets:
            lines.append(f"| {name}{' (masking 2 columns)' if name.startswith('botwarden') else ''} | {big[name]:.2f} | "
                         f"{big_mb / big[name]:.1f} | {big['direct'] / big[name]:.2f} | "
                         f"{direct_median / statistics.median(big_tries[name]):.2f} |")
            if name in big_open:
                lines.append(f"| {name} (unmasked: `big_open`, no rule) | {big_open[name]:.2f} | "
                             f"{big_mb / big_open[name]:.1f} | {big['direct'] / big_open[name]:.2f} | "
                             f"{direct_median / statistics.median(big_open_tries[name]):.2f} |")
        table = "\n".join(lines) + "\n"
        print(table)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
        if args.json:
            report = {
                "args": {k: v for k, v in vars(args).items() if not k.startswith("serve_")},
                "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
                "compiled": _compiled(), "audited_requests": audited, "full_transactions": full_txns,
                "audit_missing_events": missing,
                "runs": [{"mode": mode, "path": name, **r} for (mode, name), rs in runs.items() for r in rs],
                "medians": [{"mode": mode, "path": name, **r} for (mode, name), r in results.items()],
                "full_vs_relay": {mode: same_round(relay_name, mode) for mode in modes},
                # the medians' proxy CPU per transaction, full over pgbouncer, and each's user / kernel µs
                "full_vs_pgbouncer_cpu": cpu_vs_pgbouncer,
                "full_vs_relay_p99": p99_vs_relay,   # the median runs' p99, full over the relay's
                # full's TPS over the other daemon's in the same round, sorted (null: not run)
                "full_vs_batched": {mode: same_round(batched_name, mode) for mode in modes},
                "recorded_vs_metadata": {mode: same_round(norecord_name, mode) for mode in modes},
                "aa": {mode: same_round(AA_NAME, mode) for mode in modes},
                "large": None if not big_targets else {
                    "rows": args.big_rows, "mb": big_mb, "full_decisions": big_decisions,
                    "masked_seconds": big, "unmasked_seconds": big_open,
                    "masked_tries": big_tries, "unmasked_tries": big_open_tries,
                    "masked_settle_s": big_settled, "unmasked_settle_s": big_open_settled,
                    "masked_ratio": {k: big["direct"] / v for k, v in big.items()},
                    "unmasked_ratio": {k: big["direct"] / v for k, v in big_open.items()},
                    # the median try over direct's median try (the ratios above: best over best)
                    "masked_median_ratio": {k: direct_median / statistics.median(v) for k, v in big_tries.items()},
                    "unmasked_median_ratio": {k: direct_median / statistics.median(v) for k, v in big_open_tries.items()},
                },
            }
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    finally:
        for d in (daemon, batched, norecord, twin):
            if d is not None:
                d.stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
