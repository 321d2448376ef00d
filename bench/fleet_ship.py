"""Fleet audit, measured: shipping throughput and lag, and a fleet query over many rows.

Run as root from the repository root:

    .venv/bin/python bench/fleet_ship.py [--duration 20] [--clients 8] [--ship-events 200000]
                                         [--query-rows 10000000]

1. Shipping under the PostgreSQL benchmark's load: the whole daemon as bench/pgbench_compare.py
   runs it (eBPF probes, attestation, policy, strict audit) with a ``[fleet]`` section pointing
   at a DuckLake whose catalog is a second real PostgreSQL 15 and whose data path is a temp
   directory. ``pgbench -S`` runs for --duration seconds twice: with the lake up, then with
   the catalog stopped (bots must not notice). The daemon's fleet status is sampled every
   0.25 s: rows shipped per second during the load, backlog and lag (median, max), and how long
   shipping takes to catch up once the load stops (and once the catalog is back).
2. Shipping alone: a FleetShipper over an audit store prefilled with --ship-events request
   events (no daemon, no load), rows per second.
3. Fleet query: --query-rows synthetic request rows for two bastions inserted straight into the
   lake (DuckDB ``INSERT ... FROM range()``: the shipper is measured in 1 and 2), then three
   queries an auditor would run, timed with `botwarden fleet sql`'s code path.

Prints a Markdown table and writes it to bench/results/fleet.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pgbench_compare as pgb  # noqa: E402


def sample_fleet(socket: Path, stop: threading.Event, out: list) -> None:
    from appliance.control import ControlClient

    client = ControlClient(str(socket), timeout=5)
    while not stop.is_set():
        try:
            st = client.get("/v1/status")["fleet"]
            out.append((time.monotonic(), st.get("shipped_seq") or 0, st.get("backlog"), st.get("lag_s") or 0.0,
                        st.get("lake"), st.get("head_seq") or 0))
        except Exception as e:  # a slow answer under load: say so, keep sampling
            print(f"status sample failed: {type(e).__name__}: {e}", file=sys.stderr)
        stop.wait(0.25)


def wait_caught_up(socket: Path, head: int, timeout: float = 300) -> float:
    from appliance.control import ControlClient

    client = ControlClient(str(socket), timeout=5)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = client.get("/v1/status")["fleet"]
        if st.get("lake") == "up" and (st.get("shipped_seq") or 0) >= head:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"shipping did not reach seq {head} in {timeout}s")


def audit_head(socket: Path) -> int:
    from appliance.control import ControlClient

    client = ControlClient(str(socket), timeout=30)
    client.post("/v1/audit/flush")
    return client.post("/v1/audit/sql", {"sql": "SELECT max(chain_seq) FROM chain"})["rows"][0][0]


def pgbench_round(daemon, target_port: int, args, logdir: Path, tag: str) -> tuple[dict, list]:
    """pgbench against the target's real address: the probes redirect it into the daemon."""
    samples: list = []
    stop = threading.Event()
    t = threading.Thread(target=sample_fleet, args=(daemon.socket, stop, samples))
    t.start()
    try:
        result = pgb.run_pgbench(target_port, "no-token-needed", "simple", args, logdir, f"botwarden-{tag}",
                                 daemon.pid, wrap=lambda argv: unprivileged_bot(daemon, argv))
    finally:
        stop.set()
        t.join()
    return result, samples


def unprivileged_bot(daemon, argv: list[str]) -> list[str]:
    """argv as the bench bot in its watched cgroup, as nobody (`bot run` refuses a root bot)."""
    return [sys.executable, "-m", "appliance.cli", "--config", str(daemon.config), "bot", "run", "--name", "pgbench",
            "--user", "nobody", "--", *argv]


def shipping_alone(lake, n: int, tmp: Path) -> tuple[float, int]:
    from analytics import AuditStore, fleet
    from tests.audit_fixtures import request, session_start, sid

    store = AuditStore(tmp / "alone.duckdb", batch_max=5000)
    store.start()
    try:
        s = sid()
        store.submit("session_start", session_start(s))
        now = dt.datetime.now(dt.timezone.utc)
        for i in range(n):
            store.submit("request", request(s, ts=now, seq=i + 1))
            if i % 5000 == 0:
                store.flush(60)
        store.flush(120)
        head = store.stats()["head_seq"]
        shipper = fleet.FleetShipper(store, lake.settings("bench-alone", interval=0.05))
        shipper.start()
        while shipper.progress.lake != "up":   # attaching the lake (extension load, catalog) is not shipping
            time.sleep(0.01)
        t0 = time.monotonic()
        while (shipper.progress.shipped_seq or 0) < head:
            time.sleep(0.05)
            if time.monotonic() - t0 > 600:
                raise TimeoutError("shipping alone did not finish in 600 s")
        elapsed = time.monotonic() - t0
        shipper.stop()
        return elapsed, head
    finally:
        store.close()


def fleet_query(lake, rows: int) -> list[tuple[str, float, str]]:
    from analytics import fleet

    con = fleet.connect(lake.settings("bench-query"))
    try:
        fleet.ensure_schema(con)
        half = rows // 2
        t0 = time.monotonic()
        for b, name in enumerate(("bench-east", "bench-west")):
            con.execute(f"""INSERT INTO requests (bastion, chain_seq, chain_prev, chain_hash, request_id, session_id,
                ts, protocol, kind, text, decision, rule, duration_ms, rows, seq)
                SELECT '{name}', i, '\\x00'::BLOB, '\\x00'::BLOB, 'r' || i, 's' || (i // 50),
                       TIMESTAMPTZ '2026-09-01' + to_seconds(i // 10),
                       'postgres', 'query',
                       CASE WHEN i % 97 = 0 THEN 'DELETE FROM orders WHERE id = $1'
                            WHEN i % 13 = 0 THEN 'UPDATE orders SET total = $1 WHERE id = $2'
                            ELSE 'SELECT * FROM orders WHERE id = $1' END,
                       CASE WHEN i % 997 = 0 THEN 'block' WHEN i % 97 = 0 THEN 'approve' ELSE 'allow' END,
                       CASE WHEN i % 97 = 0 THEN 'deletes-need-approval' END,
                       (i % 100) / 10.0, i % 5, i % 50 + 1
                FROM range({half}) t(i)""")
        load_s = time.monotonic() - t0
    finally:
        con.close()
    out = [("load (INSERT ... FROM range)", load_s, f"{rows:,} rows")]
    t0 = time.monotonic()
    con = fleet.connect(lake.settings("bench-query"), read_only=True)
    out.append(("attach the lake read-only (load extensions, read the catalog)", time.monotonic() - t0, ""))
    queries = [
        ("count per bastion", "SELECT bastion, count(*) FROM requests GROUP BY bastion"),
        ("every DELETE, per bastion and day",
         "SELECT bastion, date_trunc('day', ts) AS day, count(*) FROM requests WHERE starts_with(text, 'DELETE') "
         "GROUP BY ALL ORDER BY ALL"),
        ("decisions per bastion and rule", "SELECT bastion, decision, rule, count(*), avg(duration_ms) FROM requests "
                                            "GROUP BY ALL ORDER BY ALL"),
    ]
    try:
        for name, sql in queries:
            times = []
            for _ in range(3):
                t0 = time.monotonic()
                result = con.execute(sql).fetchall()
                times.append(time.monotonic() - t0)
            out.append((name, statistics.median(times), f"{len(result)} result rows"))
    finally:
        con.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2, help="rounds of (lake up, catalog stopped)")
    ap.add_argument("--ship-events", type=int, default=200_000)
    ap.add_argument("--query-rows", type=int, default=10_000_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet.md"))
    args = ap.parse_args()
    args.builtin = "select-only"

    from appliance.sandbox import PostgresServer
    from tests.fleet_fixtures import new_lake, remove_lake

    tmp = Path(tempfile.mkdtemp(prefix="bw-bench-fleet-"))
    os.chmod(tmp, 0o777)
    pg = PostgresServer(extra_conf={"max_connections": "100"}).start()
    catalog = PostgresServer().start()
    lake = new_lake(catalog)
    daemon = None
    lines = []
    try:
        pg.psql(f"CREATE ROLE {pgb.USER} LOGIN SUPERUSER PASSWORD '{pgb.PASSWORD}'")
        pg.psql("CREATE DATABASE bench")
        subprocess.run([pgb.PGBENCH, "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", pgb.USER, "bench"], check=True, capture_output=True,
                       env={**os.environ, "PGPASSWORD": pgb.PASSWORD})
        daemon = pgb.Daemon(tmp, pg.port, suffix="-fleet", extra=lake.toml("bench-bastion").replace(
            "interval = 0.2", "interval = 1.0"))
        logdir = tmp / "logs"
        logdir.mkdir()
        os.chmod(logdir, 0o777)

        rows = []
        for round_no in range(args.repeat):   # interleaved, so a busy minute of the machine hits both
            up, samples = pgbench_round(daemon, pg.port, args, logdir, f"lake-up-{round_no}")
            head = audit_head(daemon.socket)
            catch_up = wait_caught_up(daemon.socket, head)
            during = [x for x in samples if x[4] == "up"]
            span = (during[-1][0] - during[0][0]) if len(during) > 1 else 0.0
            shipped = (during[-1][1] - during[0][1]) / span if span else 0.0
            committed = (during[-1][5] - during[0][5]) / span if span else 0.0
            backlogs = [x[2] for x in during if x[2] is not None] or [0]
            lags = [x[3] for x in during] or [0.0]
            rows.append(f"| {round_no + 1}: lake up | {up['tps']:.0f} | {up['p99']:.2f} | {committed:.0f} | {shipped:.0f} | "
                        f"{statistics.median(backlogs):.0f} / {max(backlogs)} | "
                        f"{statistics.median(lags):.2f} / {max(lags):.2f} | {catch_up:.1f} |")
            lake.kill()
            down, samples_down = pgbench_round(daemon, pg.port, args, logdir, f"lake-down-{round_no}")
            backlog_down = max((x[2] or 0) for x in samples_down) if samples_down else None
            lake.restart()
            head = audit_head(daemon.socket)
            catch_up_down = wait_caught_up(daemon.socket, head)
            rows.append(f"| {round_no + 1}: catalog stopped | {down['tps']:.0f} | {down['p99']:.2f} | - | 0 (lake down) | "
                        f"- / {backlog_down} | - | {catch_up_down:.1f} (after restart) |")
        verify = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(daemon.config), "fleet",
                                 "verify"], cwd=ROOT, capture_output=True, text=True)

        lines += [
            "## Shipping under pgbench -S (whole daemon, strict audit, eBPF probes)", "",
            f"pgbench -S, {args.clients} clients, {args.duration} s per round, simple protocol; `[fleet] interval = "
            "1.0`, batch_rows 10000; catalog: a second PostgreSQL 15 on loopback; data path: local temp dir. "
            "Status sampled every 0.25 s.", "",
            "| round | bot TPS | p99 ms | rows committed/s to the local store | rows shipped/s during load | "
            "backlog median / max (rows) | lag median / max (s) | catch-up after load (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"`fleet verify` after the outages: `{verify.stdout.splitlines()[0] if verify.stdout else verify.stderr}`",
            "",
        ]
        daemon.stop()
        daemon = None

        elapsed, n = shipping_alone(lake, args.ship_events, tmp)
        lines += ["## Shipping alone", "",
                  f"{n:,} chain rows (request events) from a prefilled store: {elapsed:.1f} s, "
                  f"**{n / elapsed:,.0f} rows/s** (batches of 10,000 rows, one DuckLake transaction each).", ""]

        lines += ["## Fleet query", "", f"{args.query_rows:,} request rows from 2 bastions in the lake "
                  "(Parquet under the data path, catalog in PostgreSQL), beside the rows the sections above "
                  "shipped (2 more bastions), attached read-only as `botwarden fleet sql` does (each `fleet sql` "
                  "pays the attach once); query times are the median of 3 runs.", "",
                  "| query | seconds | |", "|---|---:|---|"]
        for name, secs, note in fleet_query(lake, args.query_rows):
            lines.append(f"| {name} | {secs:.2f} | {note} |")
        lines.append("")
    finally:
        if daemon is not None:
            daemon.stop()
        remove_lake(lake)
        catalog.stop()
        pg.stop()
    text = (f"# Fleet audit benchmark (bench/fleet_ship.py)\n\n`{' '.join(['.venv/bin/python', *sys.argv])}` "
            f"({os.cpu_count()} CPUs; other load on the machine shows in the bot TPS)\n\n" + "\n".join(lines))
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
