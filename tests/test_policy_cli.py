"""The CLI's `policy` commands as a script uses them: explain (text, --json, exit status by
decision, input the parser refuses), check / lint, and `policy test` over a corpus file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS_CONFIG = ROOT / "tests" / "policy_corpus_botwarden.toml"
EXAMPLE = ROOT / "botwarden.example.toml"


def cli(*args: str | bytes, config: Path = CORPUS_CONFIG) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def explain(identity: str, statement: str | bytes, *extra: str, target: str = "prod-db") -> subprocess.CompletedProcess:
    return cli("policy", "explain", "--identity", identity, "--target", target, *extra, statement)


def test_explain_exit_status_is_the_decision() -> None:
    for identity, sql, action, status in [("ci-bot", "select 1", "allow", 0),
                                          ("ci-bot", "drop table orders", "block", 1),
                                          ("ci-bot", "delete from orders", "approve", 4),
                                          ("agent", "select email from customers", "mask", 5)]:
        res = explain(identity, sql)
        assert res.returncode == status, (sql, res.stdout, res.stderr)
        assert res.stdout.decode().startswith(f"decision:  {action}")


def test_explain_json() -> None:
    res = explain("ci-bot", "select 1; delete from orders where id = id", "--json")
    assert res.returncode == 4, res.stderr
    out = json.loads(res.stdout)
    assert out["decision"] == {"action": "approve", "rule": "unbounded-writes", "decided_by": "rule",
                               "reason": out["decision"]["reason"]}
    assert out["exit_status"] == 4 and out["target"] == "prod-db" and out["default_action"] == "allow"
    first, second = out["statements"]
    assert first["kind"] == "SELECT" and first["verdict"] == {"action": "allow", "rule": None, "decided_by": "default"}
    assert second["kinds"] == ["DELETE"] and {"no_where", "destructive"} <= set(second["properties"])
    assert {"rule": "unbounded-writes", "action": "approve"} in second["matching_rules"]
    res = explain("ci-bot", "select 1", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["decision"]["decided_by"] == "default"
    res = explain("ci-bot", "ls; rm -rf /", "--json", target="bastion")
    out = json.loads(res.stdout)
    assert res.returncode == 1 and out["protocol"] == "ssh" and out["decision"]["rule"] == "ssh-destructive"
    assert out["statements"][0]["programs"] == ["ls", "rm"] and out["statements"][0]["commands"] == [["ls"], ["rm", "-rf", "/"]]
    res = explain("ci-bot", "DELETE /api/v1/namespaces/prod/pods/web-1", "--json", target="cluster")
    assert json.loads(res.stdout)["statements"][0]["request"].startswith("delete")


def test_explain_refuses_what_the_parser_refuses_without_a_traceback() -> None:
    for statement in (b"select '\xff\xfe'", b"\xc3(", "selec 1"):
        res = explain("ci-bot", statement)
        text = res.stdout.decode()
        assert res.returncode == 1 and b"Traceback" not in res.stderr, res.stderr
        # prod-db's default is allow: the block comes from failing closed, not from the default.
        assert text.startswith("decision:  block (not analyzable: blocked, fail closed)"), text
        assert "(target default)" not in text
    res = explain("ci-bot", b"select '\xff'", "--json")
    out = json.loads(res.stdout)
    assert res.returncode == 1 and out["decision"]["decided_by"] == "unanalyzable"
    assert out["statements"][0]["error"] == "statement is not valid UTF-8"


def test_check_and_lint_are_one_command() -> None:
    check, lint = cli("policy", "check"), cli("policy", "lint")
    assert check.returncode == lint.returncode == 0
    assert check.stdout == lint.stdout and b"0 error(s), 0 warning(s)" in check.stdout


def test_example_policy_passes_its_own_corpus() -> None:
    res = cli("policy", "test", str(ROOT / "botwarden.example.test.toml"), config=EXAMPLE)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    assert b"0 mismatch(es)" in res.stdout
    res = cli("policy", "check", config=EXAMPLE)
    assert res.returncode == 0 and b"0 warning(s)" in res.stdout, res.stdout


def test_policy_test_reports_each_mismatch_with_the_deciding_rule(tmp_path: Path) -> None:
    corpus = tmp_path / "c.toml"
    corpus.write_text('''
[defaults]
identity = "ci-bot"
target = "prod-db"

[[case]]
statement = "select 1"
expect = "allow"
rule = "-"

[[case]]
statement = "select pg_read_file('/etc/passwd')"
expect = "allow"

[[case]]
statement = "delete from orders"
expect = "approve"
rule = "ddl-needs-approval"

[[case]]
identity = "agent"
statement = "select * from customers"
expect = "mask"
rule = "mask-customers"

[[case]]
session = "a"
statement = "prepare p as delete from orders"
expect = "approve"

[[case]]
session = "a"
statement = "execute p"
expect = "approve"
rule = "unbounded-writes"
''')
    res = cli("policy", "test", str(corpus))
    out = res.stdout.decode()
    assert res.returncode == 1, out + res.stderr.decode()
    assert "case 2: ci-bot -> prod-db: \"select pg_read_file('/etc/passwd')\"\n  expected allow, got block by rule " \
           "'no-server-files'" in out
    assert "case 3:" in out and "expected approve by rule 'ddl-needs-approval', got approve by rule 'unbounded-writes'" in out
    assert "case 1:" not in out and "case 4:" not in out and "case 6:" not in out
    assert "6 cases, 2 mismatch(es)" in out


def test_policy_test_tsv_and_bad_files(tmp_path: Path) -> None:
    tsv = tmp_path / "c.tsv"
    tsv.write_text("# a comment\nidentity\ttarget\texpect\trule\tstatement\n"
                   "ci-bot\tprod-db\tblock\tci-no-destruction\tdrop table orders\n"
                   "ci-bot\tprod-db\tallow\t-\tselect 1\\n-- ; drop table x\n"
                   "ci-bot\tbastion\tblock\tssh-destructive\trm -rf /\n")
    res = cli("policy", "test", str(tsv))
    assert res.returncode == 0 and b"3 cases, 0 mismatch(es)" in res.stdout, res.stdout + res.stderr
    tsv.write_text("identity\ttarget\texpect\tstatement\nci-bot\tprod-db\tallow\tdrop table orders\n")
    res = cli("policy", "test", str(tsv))
    assert res.returncode == 1 and b"line 2: " in res.stdout and b"got block by rule 'ci-no-destruction'" in res.stdout
    for name, text, message in [("a.toml", "[[case]]\nstatement = 'x'\nexpect = 'allow'\n", "identity is required"),
                                ("b.toml", "[[case]]\nidentity = 'ci-bot'\ntarget = 'prod-db'\nstatement = 'x'\n"
                                           "expect = 'deny'\n", "expect must be one of"),
                                ("c.toml", "[[case]]\nidentity = 'ghost'\ntarget = 'prod-db'\nstatement = 'x'\n"
                                           "expect = 'allow'\n", "unknown identity 'ghost'"),
                                ("d.tsv", "who\tstatement\n", "the header must name the columns")]:
        path = tmp_path / name
        path.write_text(text)
        res = cli("policy", "test", str(path))
        assert res.returncode == 2 and message in res.stderr.decode() and b"Traceback" not in res.stderr, res.stderr
