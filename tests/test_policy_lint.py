"""``policy lint``: unknown references, rules that can never match, shadowed rules."""

from __future__ import annotations

from appliance.config import IdentityConfig, ProcessMatch, TargetConfig, parse_config
from appliance.policy import PolicyConfig, Rule, lint
from appliance.policy.config import K8sMatch, MaskSpec, SqlMatch, SshMatch, TimeWindow

TARGETS = (
    TargetConfig(name="db", protocol="postgres", address="127.0.0.1:5432"),
    TargetConfig(name="strict", protocol="postgres", address="127.0.0.1:5433", default_action="block"),
    TargetConfig(name="box", protocol="ssh", address="127.0.0.1:22"),
)
IDENTITIES = (
    IdentityConfig(name="bot", groups=("ci",), process=ProcessMatch(uid=1000)),
    IdentityConfig(name="boxbot", groups=("ops",), process=ProcessMatch(uid=1001), targets=("box",)),
)


def findings(*rules: Rule) -> list[tuple[str, str | None, str]]:
    return [(f.severity, f.rule, f.message) for f in lint(PolicyConfig(rules=rules), TARGETS, IDENTITIES)]


def test_clean_policy_has_no_findings() -> None:
    assert findings(
        Rule("no-drop", "block", sql=SqlMatch(kinds=("DROP",))),
        Rule("approve-ddl", "approve", targets=("db",), sql=SqlMatch(kinds=("DDL",))),
        Rule("no-rm", "block", targets=("box",), ssh=SshMatch(programs=("rm",))),
    ) == []


def test_unknown_references() -> None:
    out = findings(Rule("r", "block", targets=("nope",), identities=("ghost",), groups=("nobody",)))
    assert ("error", "r", "unknown target 'nope'") in out
    assert ("error", "r", "unknown identity 'ghost'") in out
    assert any(sev == "warning" and "group 'nobody'" in msg for sev, _, msg in out)


def test_matchers_for_the_wrong_protocol_never_match() -> None:
    out = findings(Rule("sql-on-ssh", "block", targets=("box",), sql=SqlMatch(kinds=("DROP",))),
                   Rule("ssh-on-db", "block", targets=("db",), ssh=SshMatch(programs=("rm",))),
                   Rule("k8s-anywhere", "block", k8s=K8sMatch(verbs=("delete",))))
    assert any(r == "sql-on-ssh" and sev == "error" and "can never match" in m for sev, r, m in out)
    assert any(r == "ssh-on-db" and sev == "error" and "can never match" in m for sev, r, m in out)
    assert any(r == "k8s-anywhere" and "no kubernetes target" in m for _, r, m in out)


def test_identity_that_cannot_reach_the_rules_targets() -> None:
    out = findings(Rule("r", "block", targets=("db",), identities=("boxbot",), sql=SqlMatch(kinds=("DROP",))))
    assert any(sev == "error" and "none of its identities may use its targets" in m for sev, _, m in out)


def test_shadowed_by_an_earlier_rule_with_the_same_action() -> None:
    out = findings(Rule("broad", "block", sql=SqlMatch(kinds=("DROP_TABLE", "TRUNCATE"))),
                   Rule("narrow", "block", targets=("db",), groups=("ci",), sql=SqlMatch(kinds=("TRUNCATE",))))
    assert [(r, m) for _, r, m in out if "shadowed" in m] == [
        ("narrow", "shadowed by rule 'broad': it matches whenever this rule does and comes first with the same action")]


def test_shadowed_by_a_stronger_rule_anywhere() -> None:
    out = findings(Rule("approve-copy", "approve", sql=SqlMatch(properties=("copy_program",))),
                   Rule("block-copy", "block", sql=SqlMatch(properties=("copy_program", "copy_file"))))
    assert any(r == "approve-copy" and "shadowed by rule 'block-copy'" in m and "is stronger" in m for _, r, m in out)


def test_generic_block_shadows_everything_weaker_in_scope() -> None:
    out = findings(Rule("lockdown", "block", targets=("db",)),
                   Rule("reads", "allow", targets=("db",), sql=SqlMatch(kinds=("SELECT",))),
                   Rule("elsewhere", "allow", targets=("strict",), sql=SqlMatch(kinds=("SELECT",))))
    shadowed = {r for _, r, m in out if "shadowed" in m}
    assert shadowed == {"reads"}


def test_not_shadowed_when_narrower_in_time_or_scope() -> None:
    out = findings(Rule("nights", "block", when=TimeWindow(hours=("22:00-06:00",)), sql=SqlMatch(kinds=("DROP",))),
                   Rule("always", "block", sql=SqlMatch(kinds=("DROP",))),
                   Rule("ci-only", "block", groups=("ci",), sql=SqlMatch(kinds=("TRUNCATE",))),
                   Rule("everyone", "block", sql=SqlMatch(kinds=("TRUNCATE",), functions=("f",))))
    assert not any("shadowed" in m for _, _, m in out)


def test_masks_add_up_and_are_only_shadowed_by_blocks() -> None:
    mask = (MaskSpec(columns=("email",)),)
    out = findings(Rule("m1", "mask", mask=mask), Rule("m2", "mask", mask=mask),
                   Rule("hold", "approve", sql=SqlMatch(reads=("customers",))),
                   Rule("m3", "mask", sql=SqlMatch(reads=("customers",)), mask=mask))
    assert not any("shadowed" in m for _, r, m in out if r in ("m2", "m3"))
    out = findings(Rule("no-pii", "block", sql=SqlMatch(reads=("customers", "people"))),
                   Rule("m3", "mask", sql=SqlMatch(reads=("customers",)), mask=mask))
    assert any(r == "m3" and "shadowed by rule 'no-pii'" in m for _, r, m in out)


def test_mask_rule_admits_on_default_block_targets() -> None:
    out = findings(Rule("m", "mask", mask=(MaskSpec(detectors=("email",)),)))
    assert any(sev == "warning" and r == "m" and "strict" in m for sev, r, m in out)


def test_unparsed_exemption_on_non_sql_targets() -> None:
    out = findings(Rule("legacy", "allow", targets=("box",), unparsed="allow"))
    assert any("unparsed applies to PostgreSQL targets only" in m for _, _, m in out)


def test_lint_over_a_parsed_config_file() -> None:
    cfg = parse_config("""
[[targets]]
name = "db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"
[[identities]]
name = "bot"
[identities.process]
uid = 1
[[rules]]
name = "a"
action = "block"
[rules.sql]
functions = ["pg_read_file", "lo_export"]
[[rules]]
name = "b"
action = "block"
[rules.sql]
functions = ["lo_export"]
""")
    out = lint(cfg.policy, cfg.targets, cfg.identities)
    assert [str(f) for f in out] == [
        "warning: rule 'b': shadowed by rule 'a': it matches whenever this rule does and comes first with the same action"]
    assert out[0].path == ("rules", 1)


def test_block_rule_combining_keys_warns_until_match_keys_says_what_is_meant() -> None:
    both = SqlMatch(functions=("pg_read_file",), properties=("copy_program",))
    out = findings(Rule("files", "block", sql=both))
    assert ("warning", "files", 'combines functions and properties: it matches only requests that meet all of '
            'them, so a request that meets properties but not functions is not blocked; set match_keys = "any" '
            'to match on either, or match_keys = "all" to say the intersection is meant') in out
    out = findings(Rule("curl-pipe", "approve", targets=("box",), ssh=SshMatch(programs=("curl",), constructs=("pipe",))))
    assert any(r == "curl-pipe" and "held for approval" in m for _, r, m in out)
    for mode in ("any", "all"):
        sql = SqlMatch(functions=("pg_read_file",), properties=("copy_program",), match_keys=mode)
        assert findings(Rule("files", "block", sql=sql)) == []
    # One key, or an allow rule: nothing to say.
    assert findings(Rule("one", "block", sql=SqlMatch(functions=("pg_read_file",)))) == []
    assert findings(Rule("ok", "allow", sql=SqlMatch(kinds=("SELECT",), reads=("public.*",)))) == []


def test_a_rule_with_unless_properties_does_not_shadow_what_it_exempts() -> None:
    narrow = Rule("no-explain-exempt", "block", targets=("db",), sql=SqlMatch(unless_properties=("explain_only",)))
    later = Rule("all-on-db", "block", targets=("db",))
    assert not any("shadowed" in m for _, _, m in findings(narrow, later))
    exempt = Rule("mass", "block", sql=SqlMatch(properties=("no_where",), unless_properties=("explain_only",)))
    strict = Rule("mass-strict", "block", sql=SqlMatch(properties=("no_where",)))
    assert not any("shadowed" in m for _, r, m in findings(exempt, strict) if r == "mass-strict")
    assert any("shadowed by rule 'mass-strict'" in m for _, r, m in findings(strict, exempt) if r == "mass")
