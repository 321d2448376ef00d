"""What the CLI prints: ``policy explain`` (why this decision) and ``policy lint`` (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Literal, Sequence

from appliance.policy.config import PolicyConfig, Rule, matcher_keys
from appliance.policy.engine import PolicyEngine, RuleMatch, SqlSessionState, resolve_batch
from appliance.policy.k8s import K8sRequest
from appliance.policy.sql import StatementAnalysis, analyze_sql
from appliance.policy.ssh import SshAnalysis, SshRequest, analyze_ssh
from appliance.policy.types import ACTION_STRENGTH, Verdict

if TYPE_CHECKING:
    from appliance.config import IdentityConfig, TargetConfig


@dataclass(frozen=True)
class StatementExplanation:
    index: int
    analysis: StatementAnalysis | SshAnalysis | K8sRequest
    verdict: Verdict
    matches: tuple[RuleMatch, ...]


@dataclass(frozen=True)
class Explanation:
    identity: str
    groups: tuple[str, ...]
    target: str
    protocol: str
    default_action: str
    request: str
    decision: Verdict
    statements: tuple[StatementExplanation, ...] = ()

    @property
    def rule(self) -> str | None:
        return self.decision.rule

    @property
    def matching_rules(self) -> tuple[str, ...]:
        out: list[str] = []
        for s in self.statements:
            for m in s.matches:
                if m.rule not in out:
                    out.append(m.rule)
        return tuple(out)

    @property
    def decided_by(self) -> str:
        """"rule", "default" (no rule matched: the target's default_action) or "unanalyzable"
        (the request could not be analyzed and no rule exempts it: blocked, fail closed)."""
        return _decided_by(self.decision, [s.analysis for s in self.statements])

    def to_json(self) -> dict:
        """The machine-readable form (``policy explain --json``)."""
        d = self.decision
        out: dict = {
            "identity": self.identity, "groups": list(self.groups), "target": self.target,
            "protocol": self.protocol, "default_action": self.default_action,
            "decision": {"action": d.action, "rule": d.rule, "decided_by": self.decided_by, "reason": d.reason},
            "masking": list(d.mask_rules), "matching_rules": list(self.matching_rules),
            "exit_status": EXIT_STATUS[d.action], "statements": [],
            "row_guards": [{"rule": g.rule, "action": g.action, "max_rows": g.max_rows} for g in d.row_guards],
        }
        for s in self.statements:
            a = s.analysis
            item: dict = {"index": s.index}
            if isinstance(a, StatementAnalysis):
                item.update(kind=a.kind, kinds=sorted(a.kinds), reads=sorted(map(str, a.reads)),
                            writes=sorted(map(str, a.writes)), functions=sorted(map(str, a.functions)),
                            properties=sorted(a.properties), error=a.error)
            elif isinstance(a, SshAnalysis):
                item.update(request=a.request.describe(), commands=[list(argv) for argv in a.argvs],
                            programs=sorted(a.programs), constructs=sorted(a.constructs), error=a.error)
            else:
                item.update(request=a.describe())
            item["matching_rules"] = [{"rule": m.rule, "action": m.action} for m in s.matches]
            item["verdict"] = {"action": s.verdict.action, "rule": s.verdict.rule,
                               "decided_by": _decided_by(s.verdict, [a])}
            out["statements"].append(item)
        return out

    def __str__(self) -> str:
        d = self.decision
        label = {"rule": f" (rule {d.rule!r})", "default": " (target default)",
                 "unanalyzable": " (not analyzable: blocked, fail closed)"}[self.decided_by]
        lines = [
            f"decision:  {d.action}" + label,
            f"reason:    {d.reason}",
            f"identity:  {self.identity}" + (f" (groups: {', '.join(self.groups)})" if self.groups else ""),
            f"target:    {self.target} ({self.protocol}, default {self.default_action})",
            "precedence: block > approve > mask > allow; the first matching rule of the strongest kind decides",
        ]
        if d.mask_rules:
            lines.append(f"masking:   {', '.join(d.mask_rules)}")
        for g in d.row_guards:
            lines.append(f"row guard: {g.action} by {g.rule!r} if the server estimates more than {g.max_rows} rows "
                         "(asked before the statement runs)")
        for s in self.statements:
            a = s.analysis
            lines.append("")
            if isinstance(a, StatementAnalysis):
                lines.append(f"statement {s.index + 1}: {a.kind}")
                if a.error:
                    lines.append(f"  not analyzable: {a.error}")
                lines.append(f"  kinds:      {', '.join(sorted(a.kinds)) or '-'}")
                lines.append(f"  reads:      {', '.join(sorted(map(str, a.reads))) or '-'}")
                lines.append(f"  writes:     {', '.join(sorted(map(str, a.writes))) or '-'}")
                lines.append(f"  functions:  {', '.join(sorted(map(str, a.functions))) or '-'}")
                lines.append(f"  properties: {', '.join(sorted(a.properties)) or '-'}")
            elif isinstance(a, SshAnalysis):
                lines.append(f"request: {a.request.describe()}")
                if a.error:
                    lines.append(f"  not analyzable: {a.error}")
                for argv in a.argvs:
                    lines.append(f"  command:    {' '.join(argv)}")
                lines.append(f"  programs:   {', '.join(sorted(a.programs)) or '-'}")
                lines.append(f"  constructs: {', '.join(sorted(a.constructs)) or '-'}")
            else:
                lines.append(f"request: {a.describe()}")
            matches = ", ".join(f"{m.rule} ({m.action})" for m in s.matches) or "none"
            lines.append(f"  matching rules: {matches}")
            by = _decided_by(s.verdict, [a])
            lines.append(f"  verdict:    {s.verdict.action}" + (f" by {s.verdict.rule!r}" if by == "rule" else f" ({by})"))
        return "\n".join(lines)


# ``policy explain`` exits with the decision, so scripts need not parse it (documented in
# docs/policy.md and the CLI's help): 1 is the CLI's "refused" status.
EXIT_STATUS = {"allow": 0, "block": 1, "approve": 4, "mask": 5}


def _decided_by(verdict: Verdict, analyses: Sequence[object]) -> str:
    if verdict.rule is not None:
        return "rule"
    if verdict.action == "block" and any(getattr(a, "error", None) for a in analyses):
        return "unanalyzable"
    return "default"


def explain(engine: PolicyEngine, identity: str, target: str, statement: str | SshRequest | K8sRequest, *,
            groups: tuple[str, ...] | None = None, now: datetime | None = None,
            session: SqlSessionState | None = None) -> Explanation:
    """Why ``statement`` from ``identity`` to ``target`` gets its decision. For SSH targets a
    string is a command; for Kubernetes targets a string is ``"VERB /path"``. Uncached."""
    if groups is None:
        ident = engine.identities.get(identity)
        groups = tuple(ident.groups) if ident is not None else ()
    scope = engine.scope(identity, groups, target)
    when = engine._now(now) if scope.windows else None
    t = engine.targets.get(target)
    protocol = t.protocol if t is not None else "unknown"
    default = scope.default
    if protocol == "ssh":
        request = statement if isinstance(statement, SshRequest) else SshRequest.exec(str(statement))
        verdict = engine.decide_ssh(identity, groups, target, request, now=now)
        analysis = verdict.details[0] if verdict.details else analyze_ssh(request)
        matches = tuple(RuleMatch(n, _action(engine, n), 0) for n in verdict.matched)
        return Explanation(identity, groups, target, protocol, default, request.describe(), verdict,
                           (StatementExplanation(0, analysis, verdict, matches),))
    if protocol == "kubernetes":
        if isinstance(statement, K8sRequest):
            request_k = statement
        else:
            method, _, path = str(statement).strip().partition(" ")
            request_k = K8sRequest.from_http(method, path.strip())
        verdict = engine.decide_k8s(identity, groups, target, request_k, now=now)
        matches = tuple(RuleMatch(n, _action(engine, n), 0) for n in verdict.matched)
        return Explanation(identity, groups, target, protocol, default, request_k.describe(), verdict,
                           (StatementExplanation(0, request_k, verdict, matches),))
    sql = str(statement)
    batch = analyze_sql(sql)
    stmts, paths = resolve_batch(batch, session)
    per = []
    for i, stmt in enumerate(stmts):
        v, found = engine._decide_one(scope, stmt, paths[i], when, target)
        per.append(StatementExplanation(i, stmt, v, tuple(RuleMatch(m.rule, m.action, i) for m in found)))
    verdict = engine._decide_statements(scope, stmts, paths, when, target)
    return Explanation(identity, groups, target, protocol, default, sql, verdict, tuple(per))


def _action(engine: PolicyEngine, name: str) -> str:
    for c in engine.rules:
        if c.name == name:
            return c.action
    return "?"


# --- lint ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LintFinding:
    severity: Literal["error", "warning"]
    rule: str | None
    message: str
    path: tuple[str | int, ...] = field(default=())

    def __str__(self) -> str:
        where = f"rule {self.rule!r}: " if self.rule else ""
        return f"{self.severity}: {where}{self.message}"


def lint(policy: PolicyConfig, targets: Sequence["TargetConfig"], identities: Sequence["IdentityConfig"]) -> list[LintFinding]:
    findings: list[LintFinding] = []
    target_by_name = {t.name: t for t in targets}
    ident_by_name = {i.name: i for i in identities}
    known_groups = {g for i in identities for g in i.groups}
    protocols = {t.protocol for t in targets}

    for i, rule in enumerate(policy.rules):
        path = ("rules", i)
        for j, name in enumerate(rule.targets):
            if name not in target_by_name:
                findings.append(LintFinding("error", rule.name, f"unknown target {name!r}", (*path, "targets", j)))
        for j, name in enumerate(rule.identities):
            if name not in ident_by_name:
                findings.append(LintFinding("error", rule.name, f"unknown identity {name!r}", (*path, "identities", j)))
        for j, name in enumerate(rule.groups):
            if name not in known_groups:
                findings.append(LintFinding("warning", rule.name, f"no identity has group {name!r} in the config "
                                            "(it may still come from a token's groups claim)", (*path, "groups", j)))
        scoped = [target_by_name[n] for n in rule.targets if n in target_by_name] if rule.targets else list(targets)
        proto = rule.protocol
        if proto is not None:
            if rule.targets and scoped and all(t.protocol != proto for t in scoped):
                findings.append(LintFinding("error", rule.name, f"can never match: its matchers are for {proto} but its "
                                            f"targets are {', '.join(sorted({t.protocol for t in scoped}))}", path))
            elif not rule.targets and proto not in protocols:
                findings.append(LintFinding("warning", rule.name, f"can never match: no {proto} target is configured", path))
        if rule.unparsed != "block" and scoped and all(t.protocol != "postgres" for t in scoped):
            findings.append(LintFinding("warning", rule.name, "unparsed applies to PostgreSQL targets only", (*path, "unparsed")))
        if rule.action == "mask":
            strict = [t.name for t in scoped if t.default_action != "allow"]
            if strict:
                findings.append(LintFinding("warning", rule.name, "a matching mask rule admits the statement: on "
                                            f"{', '.join(strict)} (default not allow) it lets through what it matches",
                                            path))
        if rule.identities and not rule.groups:
            reachable = []
            for name in rule.identities:
                ident = ident_by_name.get(name)
                if ident is None:
                    continue
                if ident.targets and rule.targets and not set(ident.targets) & set(rule.targets):
                    findings.append(LintFinding("warning", rule.name, f"identity {name!r} may not use any of the rule's "
                                                "targets", (*path, "identities")))
                else:
                    reachable.append(name)
            if not reachable and any(n in ident_by_name for n in rule.identities):
                findings.append(LintFinding("error", rule.name, "can never match: none of its identities may use its "
                                            "targets", path))
        section = rule.sql or rule.ssh
        keys = matcher_keys(section)
        if rule.action in ("block", "approve") and len(keys) > 1 and section is not None and section.match_keys is None:
            # The first operators who wrote "functions = [...]" and "properties = [...]" in one block
            # rule expected either to block; keys combine with AND unless match_keys says otherwise.
            verb = "blocked" if rule.action == "block" else "held for approval"
            listed = " and ".join(keys)
            findings.append(LintFinding(
                "warning", rule.name,
                f"combines {listed}: it matches only requests that meet all of them, so a request that meets "
                f"{keys[1]} but not {keys[0]} is not {verb}; set match_keys = \"any\" to match on either, or "
                f"match_keys = \"all\" to say the intersection is meant", (*path, "sql" if rule.sql else "ssh")))

    # Shadowing: a rule that can never name a decision because another rule always matches too.
    for j, later in enumerate(policy.rules):
        for i, other in enumerate(policy.rules):
            if i == j:
                continue
            stronger = ACTION_STRENGTH[other.action] > ACTION_STRENGTH[later.action]
            same_earlier = other.action == later.action and i < j
            if not (stronger or same_earlier):
                continue
            if later.action == "mask" and other.action != "block":
                continue  # masks add up and still apply after an approval
            if covers(other, later):
                why = "is stronger" if stronger else "comes first with the same action"
                findings.append(LintFinding("warning", later.name, f"shadowed by rule {other.name!r}: it matches whenever "
                                            f"this rule does and {why}", ("rules", j)))
                break
    return findings


def _subset(inner: tuple | None, outer: tuple | None) -> bool:
    """``outer`` constrains no more than ``inner`` does."""
    if outer is None:
        return True
    if inner is None:
        return False
    return {x.lower() for x in inner} <= {x.lower() for x in outer}


def _mode(rule: Rule, section: object) -> str:
    mode = getattr(section, "match", None)
    return mode or ("all" if rule.action == "allow" else "any")


def covers(a: Rule, b: Rule) -> bool:
    """Whenever ``b`` matches a request, ``a`` does too (conservative: False when unsure)."""
    if a.targets and not (b.targets and set(b.targets) <= set(a.targets)):
        return False
    if a.identities or a.groups:
        if not (b.identities or b.groups):
            return False
        if not (set(b.identities) <= set(a.identities) and set(b.groups) <= set(a.groups)):
            return False
    if a.when is not None and a.when != b.when:
        return False
    if b.unparsed != "block" and a.unparsed != b.unparsed:
        return False
    a_generic = a.sql is None and a.ssh is None and a.k8s is None and not a.mask and a.unparsed == "block"
    if a_generic:
        return True
    if a.protocol != b.protocol:
        return False
    if a.sql is not None or (a.mask and b.mask):
        sa, sb = a.sql, b.sql
        if sa is None:
            return True
        if sb is None:
            return all(getattr(sa, f) is None for f in ("kinds", "relations", "reads", "writes", "functions", "properties",
                                                        "unless_properties"))
        if _mode(a, sa) != _mode(b, sb) or "any" in (sa.match_keys, sb.match_keys):
            return False  # match_keys = "any": not worth proving, say nothing
        if sa.unless_properties and not set(sa.unless_properties) <= set(sb.unless_properties or ()):
            return False  # a exempts statements b still matches
        return all(_subset(getattr(sb, f), getattr(sa, f))
                   for f in ("kinds", "relations", "reads", "writes", "functions", "properties"))
    if a.ssh is not None and b.ssh is not None:
        sa2, sb2 = a.ssh, b.ssh
        mode = _mode(a, sa2)
        if mode != _mode(b, sb2) or "any" in (sa2.match_keys, sb2.match_keys):
            return False
        if sa2.shell is not None and sa2.shell != sb2.shell:
            return False
        fields = ("programs", "commands", "forwarding", "destinations", "subsystems", "sftp_paths", "sftp_ops")
        if not all(_subset(getattr(sb2, f), getattr(sa2, f)) for f in fields):
            return False
        if mode == "all":
            return set(sb2.constructs or ()) <= set(sa2.constructs or ()) or "any" in (sa2.constructs or ())
        return sa2.constructs is None or (sb2.constructs is not None and (
            set(sb2.constructs) <= set(sa2.constructs) or "any" in sa2.constructs))
    if a.k8s is not None and b.k8s is not None:
        return (all(_subset(getattr(b.k8s, f), getattr(a.k8s, f))
                    for f in ("verbs", "resources", "subresources", "namespaces", "names", "api_groups",
                              "label_selectors", "field_selectors", "patch_types", "programs", "commands",
                              "constructs"))
                and a.k8s.dry_run in (None, b.k8s.dry_run))
    return False
