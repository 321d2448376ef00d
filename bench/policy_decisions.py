"""Policy decisions per second: uncached, shape-cached and exact-cached; mask plans; SSH.

Run from the repository root:

    /work/main/.venv/bin/python bench/policy_decisions.py [--seconds 2]

Prints a Markdown table and writes it to bench/results/policy.md. The policy is
the test corpus policy (tests/policy_corpus_botwarden.toml) and the
statements are the corpus statements (tests/policy_corpus.toml).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pglast  # noqa: E402

from appliance.config import parse_config  # noqa: E402
from appliance.policy import ColumnDesc, PolicyEngine, SshRequest  # noqa: E402

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
WHO = {"ci": ("ci-bot", ("ci",)), "etl": ("etl-bot", ("etl",)), "agent": ("agent", ("ai",))}


def rate(fn: Callable[[int], None], seconds: float) -> tuple[float, int]:
    """Calls per second of fn(i), i = 0, 1, 2 ... for about ``seconds``."""
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            fn(n)
            n += 1
        if time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start), n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "policy.md"))
    args = parser.parse_args()

    cfg = parse_config((ROOT / "tests" / "policy_corpus_botwarden.toml").read_text(), "policy_corpus_botwarden.toml")
    corpus = tomllib.loads((ROOT / "tests" / "policy_corpus.toml").read_text())
    cases = [(WHO[c["who"]], c.get("target", "prod-db"), c["sql"]) for c in corpus["sql"] if "session" not in c]
    salt = b"bench-salt-0123456789"

    def engine(cache: bool = True) -> PolicyEngine:
        return PolicyEngine(cfg.policy, cfg.targets, cfg.identities, salt=salt, cache=cache)

    rows: list[tuple[str, str, float, str]] = []

    uncached = engine(cache=False)

    def corpus_uncached(i: int) -> None:
        (ident, groups), target, sql = cases[i % len(cases)]
        uncached.decide_sql(ident, groups, target, sql, now=NOW)

    r, n = rate(corpus_uncached, args.seconds)
    rows.append(("SQL, uncached (parse + analyze + decide)", f"{len(cases)} corpus statements", r, f"{n}"))

    simple_uncached = engine(cache=False)

    def simple(i: int) -> None:
        simple_uncached.decide_sql("ci-bot", ("ci",), "prod-db", f"select id, total from orders where id = {i}", now=NOW)

    r, n = rate(simple, args.seconds)
    rows.append(("SQL, uncached", "`select id, total from orders where id = N`", r, f"{n}"))

    adhoc_engine = engine()

    def adhoc(i: int) -> None:
        # The shape of bench/workers.py --workload adhoc: aliases numbered, so no cache ever hits.
        sql = f"select aid as a_{i}, " + ", ".join(
            f"abalance + {k} as c{k}_{i}, case when abalance > {k} then bid when abalance < -{k} then -bid "
            f"else {k} end as k{k}_{i}" for k in range(4)) + f" from pgbench_accounts where aid = {i}"
        adhoc_engine.decide_sql("ci-bot", ("ci",), "prod-db", sql, now=NOW)

    r, n = rate(adhoc, args.seconds)
    rows.append(("SQL, a new shape every time (cached, never hits)", "9 outputs, 4 CASEs, aliases numbered", r, f"{n}"))

    shape = engine()

    def shaped(i: int) -> None:
        shape.decide_sql("ci-bot", ("ci",), "prod-db", f"select id, total from orders where id = {i}", now=NOW)

    r, n = rate(shaped, args.seconds)
    rows.append(("SQL, shape cache (new constants each time)", "`select id, total from orders where id = N`", r,
                 f"{shape.stats['shape_hits']} shape hits / {n}"))

    exact = engine()
    for (ident, groups), target, sql in cases:
        exact.decide_sql(ident, groups, target, sql, now=NOW)

    def corpus_exact(i: int) -> None:
        (ident, groups), target, sql = cases[i % len(cases)]
        exact.decide_sql(ident, groups, target, sql, now=NOW)

    exact.stats.update(exact_hits=0)
    r, n = rate(corpus_exact, args.seconds)
    rows.append(("SQL, exact-text cache", f"{len(cases)} corpus statements", r, f"{exact.stats['exact_hits']} hits / {n}"))

    windowed = engine()

    def window_exact(i: int) -> None:
        windowed.decide_sql("etl-bot", ("etl",), "prod-db", "insert into orders values (1)")  # now = wall clock

    r, n = rate(window_exact, args.seconds)
    rows.append(("SQL, exact cache, time-window rule in scope", "etl-bot insert (window check per call)", r, f"{n}"))

    masker = engine()
    verdict = masker.decide_sql("agent", ("ai",), "prod-db", "select id, email, ssn, notes, total from customers", now=NOW)
    cols = [ColumnDesc("id", 1, 1, 23), ColumnDesc("email", 1, 2, 25), ColumnDesc("ssn", 1, 3, 25),
            ColumnDesc("notes", 1, 4, 25), ColumnDesc("total", 1, 5, 1700)]
    row = [b"42", b"alice@example.com", b"123-45-6789", b"call +1 415 555 2671 about order 17", b"99.50"]

    def plan_rows(i: int) -> None:
        plan = masker.mask_plan("agent", ("ai",), "prod-db", verdict, cols)
        assert plan is not None
        plan.apply(row)

    r, n = rate(plan_rows, args.seconds)
    rows.append(("mask plan + one DataRow (5 columns, 8 detectors)", "agent on customers", r, f"{n}"))

    plan = masker.mask_plan("agent", ("ai",), "prod-db", verdict, cols)
    r, n = rate(lambda i: plan.apply(row), args.seconds)
    rows.append(("mask one DataRow (plan reused)", "5 columns, 8 detectors", r, f"{n}"))

    nomask = engine()
    v2 = nomask.decide_sql("ci-bot", ("ci",), "prod-db", "select id from orders", now=NOW)
    r, n = rate(lambda i: nomask.mask_plan("ci-bot", ("ci",), "prod-db", v2, cols), args.seconds)
    rows.append(("mask_plan when nothing is masked (returns None)", "hot path", r, f"{n}"))

    ssh_engine = engine()
    commands = [c["command"] for c in corpus["ssh"] if "command" in c]

    def ssh(i: int) -> None:
        ssh_engine.decide_ssh("ci-bot", ("ci",), "bastion", SshRequest.exec(commands[i % len(commands)]))

    r, n = rate(ssh, args.seconds)
    rows.append(("SSH exec decision (uncached)", f"{len(commands)} corpus commands", r, f"{n}"))

    header = (f"# Policy decisions per second\n\n"
              f"`python bench/policy_decisions.py --seconds {args.seconds:g}` on {platform.node()} "
              f"({platform.machine()}, Python {platform.python_version()}, pglast {pglast.__version__}), "
              f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; one thread. "
              f"Policy: tests/policy_corpus_botwarden.toml ({len(cfg.policy.rules)} rules).\n\n")
    table = ["| measurement | input | per second | calls |", "|---|---|---:|---:|"]
    for name, what, per_s, calls in rows:
        table.append(f"| {name} | {what} | {per_s:,.0f} | {calls} |")
    text = header + "\n".join(table) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
