"""Connect latency and request round trip: direct vs eBPF redirect vs nftables REDIRECT.

The same echo server is reached three ways:

- direct: a client outside any watched cgroup connects to the echo server;
- ebpf: a client in a watched cgroup connects to a target address in a test
  network namespace; connect4 rewrites it to the echo server (all programs attached);
- nftables: the same through the nftables fallback (REDIRECT + conntrack).

Per connection the client times connect() and one 64-byte echo round trip.
The echo server is the "listener" itself, so this isolates the cost of the
redirect from the cost of the inspector. Needs root.

    sudo .venv/bin/python bench/redirect_latency.py [--count 2000]

Prints a Markdown table and writes it to bench/results/redirect.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import probes  # noqa: E402
from probes import cgroups  # noqa: E402
from tests.probes_fixtures import TargetNet, free_port, unique  # noqa: E402

ECHO = r"""
import selectors, socket, sys
# One thread, epoll: no per-connection thread start in the measured round trip.
sel = selectors.DefaultSelector()
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(4096)
ls.setblocking(False)
sel.register(ls, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            c, _ = ls.accept()
            c.setblocking(False)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        try:
            d = c.recv(65536)
        except ConnectionError:
            d = b""
        if d:
            c.sendall(d)
        else:
            sel.unregister(c)
            c.close()
"""

CLIENT = r"""
import json, socket, sys, time
ip, port, count, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
payload = b"x" * 64
connect_us, rtt_us = [], []
for i in range(count + warmup):
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter_ns()
    s.connect((ip, port))
    t1 = time.perf_counter_ns()
    s.sendall(payload)
    got = 0
    while got < len(payload):
        got += len(s.recv(65536))
    t2 = time.perf_counter_ns()
    s.close()
    if i >= warmup:
        connect_us.append((t1 - t0) / 1000)
        rtt_us.append((t2 - t1) / 1000)
print(json.dumps({"connect": connect_us, "rtt": rtt_us}))
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_client(cgroup: Path | None, ip: str, port: int, count: int, warmup: int) -> dict:
    argv = [sys.executable, "-c", CLIENT, ip, str(port), str(count), str(warmup)]
    if cgroup is None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    else:
        proc = cgroups.spawn(cgroup, argv, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"client failed in {cgroup}")
    return json.loads(out)


HOLD = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
time.sleep(30)
"""


def lookup_cost(settings: probes.ProbeSettings, cgroup: Path, ip: str, port: int, listener: socket.socket,
                rounds: int) -> tuple[float, float]:
    """p50 and mean µs of probes.lookup() on one accepted redirected connection."""
    bot = cgroups.spawn(cgroup, [sys.executable, "-c", HOLD, ip, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        conn, _ = listener.accept()
        with conn:
            if probes.lookup(conn, pin_dir=settings.pin_dir, nft_table=settings.nft_table) is None:
                raise SystemExit(f"lookup found nothing on the {settings.mode} path")
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter_ns()
                probes.lookup(conn, pin_dir=settings.pin_dir, nft_table=settings.nft_table)
                times.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        bot.kill()
        bot.wait()
    return pct(times, 0.5), statistics.mean(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "redirect.md"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (eBPF, cgroups, nftables, network namespaces)")

    net = TargetNet(ports=(5432,)).start()
    echo_port = free_port()
    echo = subprocess.Popen([sys.executable, "-c", ECHO, str(echo_port)], stdout=subprocess.PIPE, text=True)
    assert echo.stdout.readline().strip() == "ready"
    lookup_port = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", lookup_port))
    listener.listen(16)
    target = [(net.ip4, 5432, "127.0.0.1", echo_port), (net.ip4, 6000, "127.0.0.1", lookup_port)]
    ebpf = probes.ProbeSettings(cgroup_parent=unique("bw-bench-"), targets=target,
                                pin_dir=f"/sys/fs/bpf/{unique('botwarden-bench-')}", mode="ebpf",
                                emit_redirected=False, nft_table=unique("bwbench_"))
    nft = probes.ProbeSettings(cgroup_parent=unique("bw-bench-"), targets=target,
                               pin_dir=f"/sys/fs/bpf/{unique('botwarden-bench-')}", mode="nftables",
                               nft_table=unique("bwbench_"), unix_sockets="unfiltered")  # nft cannot filter them
    handle = None
    rows = []
    lookups = []
    try:
        results = {"direct": run_client(None, "127.0.0.1", echo_port, args.count, args.warmup)}
        handle = probes.attach(ebpf)
        ebpf_cg = cgroups.bot_cgroup(ebpf.cgroup_parent, "bench")
        results["eBPF redirect (all programs)"] = run_client(ebpf_cg, net.ip4, 5432, args.count, args.warmup)
        lookups.append(("eBPF (pinned map)", *lookup_cost(ebpf, ebpf_cg, net.ip4, 6000, listener, 20000)))
        probes.attach(nft).close()
        nft_cg = cgroups.bot_cgroup(nft.cgroup_parent, "bench")
        results["nftables REDIRECT"] = run_client(nft_cg, net.ip4, 5432, args.count, args.warmup)
        lookups.append(("nftables (SO_ORIGINAL_DST + sock_diag + /proc)", *lookup_cost(nft, nft_cg, net.ip4, 6000,
                                                                                      listener, 2000)))
        for name, r in results.items():
            rows.append((name, pct(r["connect"], 0.5), pct(r["connect"], 0.99), statistics.mean(r["connect"]),
                         pct(r["rtt"], 0.5), pct(r["rtt"], 0.99)))
    finally:
        if handle is not None:
            handle.close()
        for s in (ebpf, nft):
            probes.detach(s)
            cgroups.remove(s.cgroup_parent)
        listener.close()
        echo.kill()
        echo.wait()
        net.stop()

    lines = [
        f"# Redirect latency ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Kernel {platform.release()}, {os.cpu_count()} CPUs, {args.count} connections per path "
        f"(+{args.warmup} warm-up), one 64-byte echo per connection; the echo server is the listener.",
        f"Command: `{Path(sys.executable).name} bench/redirect_latency.py --count {args.count}`",
        "",
        "| path | connect p50 µs | connect p99 µs | connect mean µs | round trip p50 µs | round trip p99 µs |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} | {e:.1f} |" for n, a, b, c, d, e in rows]
    lines += ["", "`probes.lookup()` on an accepted connection (in the inspector process):", "",
              "| path | p50 µs | mean µs |", "|---|---|---|"]
    lines += [f"| {n} | {a:.1f} | {b:.1f} |" for n, a, b in lookups]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
