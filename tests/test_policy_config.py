"""Rule configuration errors name the file, the line and the key (through appliance.config)."""

from __future__ import annotations

import pytest

from appliance.config import parse_config
from appliance.errors import ConfigError

BASE = """\
[[targets]]
name = "db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"

[[targets]]
name = "box"
protocol = "ssh"
address = "127.0.0.1:22"
authentication = "attestation"

[[identities]]
name = "bot"
groups = ["ci"]
[identities.process]
uid = 1000

[[rules]]
name = "first"
action = "block"
[rules.sql]
kinds = ["DROP"]
"""
BASE_LINES = BASE.count("\n")


def _error(extra: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + extra, "botwarden.toml")
    return str(info.value)


def line_of(extra: str, needle: str) -> int:
    for i, line in enumerate(extra.splitlines(), start=BASE_LINES + 1):
        if needle in line:
            return i
    raise AssertionError(needle)


CASES = [
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.sql]\nkinds = ["SELEKT"]\n',
     "kinds = ", "rules[1].sql.kinds", "unknown statement kind 'SELEKT'"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.sql]\ntables = ["x"]\n',
     "tables = ", "rules[1].sql.tables", "unknown key"),
    ('\n[[rules]]\nname = "r"\naction = "deny"\n',
     "action = ", "rules[1].action", "must be one of 'allow', 'block', 'approve', 'mask'"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.sql]\nproperties = ["no-where"]\n',
     "properties = ", "rules[1].sql.properties", "unknown property 'no-where'"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.when]\ndays = ["funday"]\n',
     "days = ", "rules[1].when.days", "'funday' is not a day"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.when]\nhours = ["9-17"]\n',
     "hours = ", "rules[1].when.hours", "is not HH:MM"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.when]\nhours = ["09:00-09:00"]\n',
     "hours = ", "rules[1].when.hours", "empty range"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.when]\ntimezone = "Mars/Olympus"\n',
     "timezone = ", "rules[1].when.timezone", "unknown time zone"),
    ('\n[[rules]]\nname = "r"\naction = "mask"\n[[rules.mask]]\ndetectors = ["passport"]\n',
     "detectors = ", "rules[1].mask[0].detectors[0]", "must be one of"),
    ('\n[[rules]]\nname = "r"\naction = "mask"\n[[rules.mask]]\ncolumns = ["x"]\nkeep = 99\n',
     "keep = ", "rules[1].mask[0].keep", "between 0 and 64"),
    ('\n[[rules]]\nname = "r"\naction = "mask"\n[[rules.mask]]\nstrategy = "full"\n',
     "[[rules.mask]]", "rules[1].mask[0]", "needs columns and/or detectors"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[[rules.mask]]\ncolumns = ["x"]\n',
     "[[rules]]", "rules[1]", "mask entries need action = \"mask\""),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.sql]\nkinds = ["DROP"]\n[rules.ssh]\nshell = true\n',
     "[[rules]]", "rules[1]", "one of sql / ssh / k8s per rule"),
    ('\n[[rules]]\nname = "r"\naction = "block"\ntargets = ["db", "nowhere"]\n',
     "targets = ", "rules[1].targets[1]", "unknown target 'nowhere'"),
    ('\n[[rules]]\nname = "r"\naction = "block"\nidentities = ["ghost"]\n',
     "identities = ", "rules[1].identities[0]", "unknown identity 'ghost'"),
    ('\n[[rules]]\nname = "first"\naction = "allow"\n',
     'name = "first"', "rules[1].name", "duplicate rule name 'first'"),
    ('\n[[rules]]\nname = "r"\naction = "block"\nunparsed = "yes"\n',
     "unparsed = ", "rules[1].unparsed", "must be one of 'block', 'allow', 'approve'"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.ssh]\nconstructs = ["semicolon"]\n',
     "constructs = ", "rules[1].ssh.constructs[0]", "must be one of"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.sql]\nmatch = "some"\n',
     "match = ", "rules[1].sql.match", "must be one of 'any', 'all'"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.k8s]\nverbs = "delete"\n',
     "verbs = ", "rules[1].k8s.verbs", "must be a list"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.ssh]\nsftp_paths = ["etc/*"]\n',
     "sftp_paths = ", "rules[1].ssh.sftp_paths", "must be absolute"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.ssh]\nsftp_paths = ["/srv/../etc/*"]\n',
     "sftp_paths = ", "rules[1].ssh.sftp_paths", "is not normalized"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.ssh]\nsftp_paths = ["/etc/"]\n',
     "sftp_paths = ", "rules[1].ssh.sftp_paths", "ends with /"),
    ('\n[[rules]]\nname = "r"\naction = "block"\n[rules.ssh]\nsftp_ops = ["delete"]\n',
     "sftp_ops = ", "rules[1].ssh.sftp_ops[0]", "must be one of"),
    ('\n[masking]\nsecret_entropy = 9.5\n',
     "secret_entropy = ", "masking.secret_entropy", "between 2.0 and 6.0"),
]


@pytest.mark.parametrize("extra,needle,key,message", CASES, ids=[c[2] + ":" + c[3][:20] for c in CASES])
def test_rule_error_names_file_line_and_key(extra: str, needle: str, key: str, message: str) -> None:
    text = _error(extra)
    line = line_of(extra, needle)
    assert text.startswith(f"botwarden.toml:{line}: {key}"), text
    assert message in text


def test_valid_rules_build_into_models() -> None:
    cfg = parse_config(BASE + """
[[rules]]
name = "weekday-ddl"
action = "approve"
targets = ["db"]
groups = ["ci"]
unparsed = "approve"
[rules.sql]
kinds = ["ddl", "CREATE_*"]
writes = ["billing.*"]
match = "any"
[rules.when]
days = ["mon-fri"]
hours = ["09:00-17:30", "22:00-02:00"]
timezone = "Europe/Berlin"

[[rules]]
name = "ssh"
action = "block"
targets = ["box"]
[rules.ssh]
programs = ["rm"]
constructs = ["pipe", "subst"]
forwarding = ["remote"]

[[rules]]
name = "mask"
action = "mask"
[[rules.mask]]
columns = ["customers.email"]
strategy = "partial"
keep = 2
[[rules.mask]]
detectors = ["email", "iban"]

[masking]
salt_file = "/etc/botwarden/salt"
""")
    rules = {r.name: r for r in cfg.policy.rules}
    assert rules["weekday-ddl"].sql.kinds == ("DDL", "CREATE_*")
    assert rules["weekday-ddl"].when.hours == ("09:00-17:30", "22:00-02:00")
    assert rules["weekday-ddl"].protocol == "postgres"
    assert rules["ssh"].ssh.constructs == ("pipe", "subst") and rules["ssh"].protocol == "ssh"
    assert rules["mask"].mask[0].keep == 2 and rules["mask"].mask[1].strategy == "full"
    assert cfg.policy.masking.salt_file == "/etc/botwarden/salt"
