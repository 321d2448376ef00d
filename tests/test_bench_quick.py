"""The performance regression guard (issue 20): `bench/pgbench_compare.py --quick` runs in the
suite so its table (proxy CPU per transaction, ratios to direct and to the byte relay) is in every
CI log. Nothing here asserts a timing: the machine is shared and the numbers are noisy. What is
asserted is that the bench ran every path end to end and wrote complete JSON, so the guard
cannot rot silently.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.daemon_fixtures import ROOT
from tests.probes_fixtures import RUN_TAG

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

PATHS = ("direct", "pgbouncer", "uvloop byte relay", "botwarden (full inspection)")


def test_quick_bench_writes_every_path_as_json(tmp_path, capsys):
    out_json, out_md = tmp_path / "quick.json", tmp_path / "quick.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "pgbench_compare.py"), "--quick", "--json",
                          str(out_json), "--out", str(out_md), f"--suffix=-q{RUN_TAG}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=840, env={**os.environ})
    assert res.returncode == 0, res.stderr[-4000:]
    with capsys.disabled():  # the table goes to the CI log whatever pytest captures
        print("\n" + out_md.read_text())
    report = json.loads(out_json.read_text())
    medians = {(r["mode"], r["path"]): r for r in report["medians"]}
    for mode in ("simple", "prepared"):
        for path in PATHS:
            r = medians[(mode, path)]
            assert r["tps"] > 0 and r["txns"] > 0, (mode, path, r)
            assert math.isfinite(r["p99"])
            if path != "direct":
                assert r["cpu_us"] is not None and r["cpu_us"] > 0, (mode, path, r)
                assert r["sys_us"] is not None and 0 <= r["sys_us"] <= r["cpu_us"], (mode, path, r)
        assert report["full_vs_relay"][mode] and all(x > 0 for x in report["full_vs_relay"][mode])
        # target 1's CPU ratio, split into user and kernel time, is in the report (and the table)
        vs = report["full_vs_pgbouncer_cpu"][mode]
        full, pgb = medians[(mode, PATHS[3])], medians[(mode, "pgbouncer")]
        assert vs["cpu"] == pytest.approx(full["cpu_us"] / pgb["cpu_us"])
        assert vs["user_us"][0] + vs["kernel_us"][0] == pytest.approx(full["cpu_us"])
        relay = medians[(mode, PATHS[2])]
        assert report["full_vs_relay_p99"][mode] == pytest.approx(full["p99"] / relay["p99"])
    # every statement of the full path was audited as its own row
    assert report["audited_requests"] >= report["full_transactions"]
    assert report["audit_missing_events"] == 0  # `audit verify`: no request the daemon numbered is missing
    large = report["large"]
    for name in ("direct", "pgbouncer", "botwarden (full inspection)"):
        assert large["masked_seconds"][name] > 0
    assert large["unmasked_seconds"]["botwarden (full inspection)"] > 0
    # every try is kept; with --quick's one try the median ratio is the best-of ratio
    for kind in ("masked", "unmasked"):
        tries = large[f"{kind}_tries"]["botwarden (full inspection)"]
        assert len(tries) == 1 and tries[0] == large[f"{kind}_seconds"]["botwarden (full inspection)"]
        # each try started once the daemon's process tree had gone idle (the wait is recorded)
        assert len(large[f"{kind}_settle_s"]["botwarden (full inspection)"]) == 1
        assert large[f"{kind}_median_ratio"]["botwarden (full inspection)"] == pytest.approx(
            large[f"{kind}_ratio"]["botwarden (full inspection)"])
    # The two large results are what their labels say: the daemon masked the first and let the
    # second through whole (until this check, a view made the "unmasked" one masked too).
    assert large["full_decisions"] == {"masked": ["mask"], "unmasked": ["allow"]}
    assert len(report["load_before"]) == 3 and report["compiled"] in (True, False)


def test_the_audit_row_stages_bench_runs_and_says_whether_the_hash_is_compiled(tmp_path, capsys):
    """bench/audit_rows.py: the audit process's per-row stages, printed in the CI log (never asserted)."""
    out_json = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "audit_rows.py"), "--rows", "20000", "--json",
                          str(out_json)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    with capsys.disabled():
        print("\n" + res.stdout)
    report = json.loads(out_json.read_text())
    assert report["rows"] == 20000 and report["compiled"] is not (os.environ.get("BOTWARDEN_PURE_PYTHON", "") not in ("", "0"))
    assert all(math.isfinite(v) and v > 0 for v in report["us_per_row"].values())
    assert any(k.startswith("row hash, compiled") for k in report["us_per_row"])
