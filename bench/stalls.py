"""Stalls in a pgbench run: intervals in which no client completed a transaction.

Run as root from the repository root, on the per-transaction logs a bench kept
(`BENCH_KEEP_LOGS=DIR bench/pgbench_compare.py ...` copies pgbench's `--log` files to DIR):

    .venv/bin/python bench/stalls.py DIR/botwarden_full_inspection-simple.*

A proxy whose event loop is not running (waiting for a CPU, or blocked) holds every client at
once: the run shows gaps between completions much longer than its median latency. A slow
server or one slow client does not (the other clients keep completing). Prints the latency
percentiles, how many gaps of more than 1 ms there were, their total, and how many exceeded 3 ms.
"""

from __future__ import annotations

import sys


def read(paths: list[str]) -> list[tuple[int, int]]:
    """(completion time in µs since the epoch, latency in µs) of every transaction, in time order.
    pgbench's log line: client_id transaction_no latency_us script_no epoch_s epoch_us."""
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                p = line.split()
                rows.append((int(p[4]) * 1_000_000 + int(p[5]), int(p[2])))
    rows.sort()
    return rows


def stalls(rows: list[tuple[int, int]], over_us: int = 1000) -> dict[str, float]:
    lat = sorted(r[1] for r in rows)
    n = len(lat)
    gaps = [b[0] - a[0] for a, b in zip(rows, rows[1:]) if b[0] - a[0] > over_us]
    return {"transactions": n, "p50_us": lat[n // 2], "p99_us": lat[int(n * 0.99)],
            "gaps": len(gaps), "gap_ms": sum(gaps) / 1000, "gaps_over_3ms": sum(g > 3000 for g in gaps)}


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    s = stalls(read(sys.argv[1:]))
    print(f"{s['transactions']:,} transactions, p50 {s['p50_us'] / 1000:.2f} ms, p99 {s['p99_us'] / 1000:.2f} ms; "
          f"{s['gaps']} gaps > 1 ms without a completion, {s['gap_ms']:.0f} ms in all, {s['gaps_over_3ms']} > 3 ms")


if __name__ == "__main__":
    main()
