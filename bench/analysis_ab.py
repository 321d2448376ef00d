"""The SQL analysis of this checkout against the one at a git revision, in one process.

Run from the repository root:

    /work/main/.venv/bin/python bench/analysis_ab.py --rev 3c88645 [--rounds 10]

Loads ``appliance/policy/sql.py`` as it was at ``--rev`` beside the current one and

1. checks that both give the same analysis (kinds, relations, functions, properties, output
   columns and their sources ...) of every statement of a corpus: the policy corpus
   (tests/policy_corpus.toml), the SQL strings of the policy tests, and every statement of
   the SQL scripts PostgreSQL installs (/usr/share/postgresql/*/: extensions, system views);
2. times ``analyze_sql`` of both, rounds interleaved, on three loads: the ad-hoc shape of
   ``bench/workers.py --workload adhoc`` (9 outputs, 4 CASEs), the policy corpus, and the
   PostgreSQL scripts.

The VM's speed moves ~2x within an hour, so only the per-round ratio (new / old, same round)
is worth comparing. Prints a Markdown table and writes it to bench/results/analysis-ab.md.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import importlib.util
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pglast import split  # noqa: E402

import appliance.policy.sql as current  # noqa: E402

_SQL_START = re.compile(r"\s*(select|insert|update|delete|with|create|alter|drop|grant|copy|do|explain|prepare|"
                        r"execute|set|merge|truncate|begin|vacuum|call)\b", re.I)


def at_revision(rev: str, tmp: Path) -> ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:appliance/policy/sql.py"],
                            check=True, capture_output=True, text=True).stdout
    path = tmp / "sql_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("appliance.policy._sql_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def adhoc(i: int) -> str:
    return f"SELECT aid AS a_{i}, " + ", ".join(
        f"abalance + {k} AS c{k}_{i}, CASE WHEN abalance > {k} THEN bid WHEN abalance < -{k} THEN -bid ELSE {k} END AS k{k}_{i}"
        for k in range(4)) + f" FROM pgbench_accounts WHERE aid = {i * 7}"


def postgres_scripts() -> list[str]:
    out: list[str] = []
    for name in sorted(glob.glob("/usr/share/postgresql/*/**/*.sql", recursive=True)):
        text = "\n".join(line for line in Path(name).read_text(errors="replace").splitlines()
                         if not line.startswith("\\"))  # psql meta-commands (\echo ...)
        text = text.replace("@extschema@", "ext").replace("MODULE_PATHNAME", "$libdir/x")
        try:
            out.extend(split(text))
        except Exception:  # a script pglast cannot split: not this bench's concern
            continue
    return out


def test_strings() -> list[str]:
    out = []
    for name in sorted((ROOT / "tests").glob("test_policy*.py")):
        for node in ast.walk(ast.parse(name.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL_START.match(node.value):
                out.append(node.value)
    return out


def canonical(value: Any, shared: frozenset[str] | None = None) -> Any:
    """An analysis as nested tuples with every set sorted: two runs compare equal when they agree.
    ``shared``: the fields both versions have (a field one of them lacks is not compared)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__,) + tuple((f.name, canonical(getattr(value, f.name), shared))
                                               for f in dataclasses.fields(value)
                                               if shared is None or f.name in shared
                                               or type(value).__name__ != "StatementAnalysis")
    if isinstance(value, (set, frozenset)):
        return ("set",) + tuple(sorted(repr(canonical(v, shared)) for v in value))
    if isinstance(value, (list, tuple)):
        return tuple(canonical(v, shared) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((repr(k), canonical(v, shared)) for k, v in value.items()))
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev", required=True, help="the git revision to compare with (its appliance/policy/sql.py)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "analysis-ab.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        old = at_revision(args.rev, Path(tmp))

    corpus = [c["sql"] for c in tomllib.loads((ROOT / "tests" / "policy_corpus.toml").read_text())["sql"]]
    scripts = postgres_scripts()
    statements = list(dict.fromkeys(corpus + test_strings() + scripts))
    shared = frozenset(f.name for f in dataclasses.fields(old.StatementAnalysis)) & frozenset(
        f.name for f in dataclasses.fields(current.StatementAnalysis))
    differ = [sql for sql in statements
              if canonical(old.analyze_sql(sql), shared) != canonical(current.analyze_sql(sql), shared)]

    loads = {"ad-hoc (bench/workers.py --workload adhoc)": [adhoc(i) for i in range(300)],
             "policy corpus": corpus,
             "PostgreSQL's scripts": scripts}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for version, module in (("old", old), ("new", current)):
            for load, texts in loads.items():
                start = time.process_time()
                for sql in texts:
                    module.analyze_sql(sql)
                times.setdefault((version, load), []).append((time.process_time() - start) / len(texts) * 1e6)

    header = (f"# SQL analysis: this checkout against {args.rev}\n\n"
              f"`python bench/analysis_ab.py --rev {args.rev} --rounds {args.rounds}` on {platform.node()} "
              f"(Python {platform.python_version()}), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; one process, "
              f"rounds interleaved.\n\n"
              f"Same analysis: **{len(statements) - len(differ)} of {len(statements)}** statements "
              f"({len(corpus)} corpus, {len(scripts)} from PostgreSQL's scripts, the rest from the policy tests)"
              + (f"; differing: {differ[:3]!r}" if differ else "") + ".\n\n")
    table = ["| load | statements | old µs (median) | new µs (median) | new / old, median of rounds (min–max) |",
             "|---|---:|---:|---:|---|"]
    for load, texts in loads.items():
        o, n = times[("old", load)], times[("new", load)]
        ratios = [b / a for a, b in zip(o, n)]
        table.append(f"| {load} | {len(texts)} | {statistics.median(o):.0f} | {statistics.median(n):.0f} | "
                     f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}) |")
    text = header + "\n".join(table) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()
