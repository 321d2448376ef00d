"""bench/stalls.py: gaps between completed transactions in pgbench's per-transaction logs (pure)."""

from __future__ import annotations

from bench.stalls import read, stalls


def test_gaps_without_a_completion_are_counted_and_summed(tmp_path):
    # pgbench --log lines: client transaction latency_us script epoch_s epoch_us
    lines = [f"{i % 2} {i} 400 0 1000 {t}" for i, t in enumerate([0, 300, 600, 2600, 2900, 7000, 7100])]
    lines.append("1 99 5000 0 1001 0")   # one second later: a 1 s gap, latencies are not gaps
    log = tmp_path / "full.1"
    log.write_text("\n".join(lines[::-1]) + "\n")  # out of order: read() sorts by completion
    s = stalls(read([str(log)]))
    assert s["transactions"] == 8
    assert s["gaps"] == 3                      # 600 -> 2600, 2900 -> 7000, 7100 -> 1 s later
    assert s["gap_ms"] == (2000 + 4100 + 992_900) / 1000
    assert s["gaps_over_3ms"] == 2
    assert s["p99_us"] == 5000 and s["p50_us"] == 400
