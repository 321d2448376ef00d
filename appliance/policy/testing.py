"""``botwarden policy test FILE``: a policy's regression corpus (pure; the CLI reads the file).

A corpus is a list of requests, each with the decision the operator expects for an identity
and a target, run through :func:`appliance.policy.explain.explain` (the same decision path as
the daemon, uncached). Two formats:

TOML::

    [defaults]                      # optional: keys every case inherits
    identity = "deploy-bot"
    target = "orders-db"

    [[case]]
    statement = "DELETE FROM orders"   # SQL; an SSH command; "VERB /path" for Kubernetes
    expect = "approve"                 # allow | block | approve | mask
    rule = "no-mass-deletes"           # optional: the rule that must decide; "-" = no rule
    # identity, target, groups = [...], session = "s1", now = "2026-11-25T12:00:00+00:00"

TSV (a header line names the columns; ``identity target expect statement`` are required,
``rule groups session now`` optional; ``\\t`` ``\\n`` ``\\\\`` escapes in a field; ``#`` lines
are comments)::

    identity<TAB>target<TAB>expect<TAB>rule<TAB>statement

Cases that name the same ``session`` share one SqlSessionState (PREPARE / EXECUTE, search_path),
in file order.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Sequence

from appliance.errors import BotwardenError
from appliance.policy.engine import SqlSessionState
from appliance.policy.explain import Explanation, explain

if TYPE_CHECKING:
    from appliance.policy.engine import PolicyEngine

ACTIONS = ("allow", "block", "approve", "mask")
_KEYS = {"identity", "target", "statement", "expect", "rule", "groups", "session", "now", "note"}
_TSV_REQUIRED = ("identity", "target", "expect", "statement")


class CorpusError(BotwardenError):
    """The corpus file itself is wrong (names the case and the key)."""


@dataclass(frozen=True)
class Case:
    where: str  # "case 3" (TOML) or "line 7" (TSV)
    identity: str
    target: str
    statement: str
    expect: str
    rule: str | None = None  # None = any rule; "-" = the target default decides
    groups: tuple[str, ...] | None = None
    session: str | None = None
    now: datetime | None = None


@dataclass(frozen=True)
class Outcome:
    case: Case
    explanation: Explanation

    @property
    def passed(self) -> bool:
        d = self.explanation.decision
        if d.action != self.case.expect:
            return False
        if self.case.rule is None:
            return True
        return d.rule == (None if self.case.rule == "-" else self.case.rule)

    def describe(self) -> str:
        d = self.explanation.decision
        got = f"{d.action} by rule {d.rule!r}" if d.rule else f"{d.action} ({self.explanation.decided_by})"
        want = self.case.expect + (f" by rule {self.case.rule!r}" if self.case.rule not in (None, "-") else
                                   " by no rule" if self.case.rule == "-" else "")
        return (f"{self.case.where}: {self.case.identity} -> {self.case.target}: {self.case.statement!r}\n"
                f"  expected {want}, got {got}\n  reason: {d.reason}")


def parse_corpus(text: str, name: str) -> list[Case]:
    """Cases from a ``.toml`` or ``.tsv`` corpus (by the name's extension)."""
    if name.lower().endswith((".tsv", ".txt")):
        return _parse_tsv(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CorpusError(f"{name}: {e}") from None
    defaults = data.get("defaults", {})
    unknown = set(data) - {"defaults", "case"}
    if unknown:
        raise CorpusError(f"{name}: unknown table(s) {', '.join(sorted(unknown))} (expected [defaults] and [[case]])")
    cases = data.get("case", [])
    if not isinstance(cases, list) or not cases:
        raise CorpusError(f"{name}: no [[case]] entries")
    return [_case(f"case {i + 1}", {**defaults, **raw}) for i, raw in enumerate(cases)]


def _case(where: str, raw: dict) -> Case:
    unknown = set(raw) - _KEYS
    if unknown:
        raise CorpusError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("identity", "target", "statement", "expect"):
        if not isinstance(raw.get(key), str) or (key != "statement" and not raw[key]):
            raise CorpusError(f"{where}: {key} is required (a string)")
    if raw["expect"] not in ACTIONS:
        raise CorpusError(f"{where}: expect must be one of {', '.join(ACTIONS)}, not {raw['expect']!r}")
    groups = raw.get("groups")
    if isinstance(groups, str):
        groups = [g for g in groups.split(",") if g]
    if groups is not None and not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)):
        raise CorpusError(f"{where}: groups must be a list of strings")
    now = raw.get("now")
    if isinstance(now, str) and now:
        try:
            now = datetime.fromisoformat(now)
        except ValueError:
            raise CorpusError(f"{where}: now must be an ISO 8601 time, not {now!r}") from None
    if isinstance(now, datetime) and now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    rule = raw.get("rule") or None
    return Case(where, raw["identity"], raw["target"], raw["statement"], raw["expect"], rule,
                tuple(groups) if groups is not None else None, raw.get("session") or None, now or None)


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        ch = field[i]
        if ch == "\\" and i + 1 < len(field):
            out.append({"t": "\t", "n": "\n", "\\": "\\"}.get(field[i + 1], "\\" + field[i + 1]))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_tsv(text: str) -> list[Case]:
    header: list[str] | None = None
    cases = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if header is None:
            header = [f.strip().lower() for f in fields]
            missing = [k for k in _TSV_REQUIRED if k not in header]
            if missing or set(header) - _KEYS:
                raise CorpusError(f"line {lineno}: the header must name the columns {' '.join(_TSV_REQUIRED)} "
                                  f"(optional: rule groups session now); got {' '.join(header)}")
            continue
        if len(fields) != len(header):
            raise CorpusError(f"line {lineno}: {len(fields)} fields, the header has {len(header)}")
        cases.append(_case(f"line {lineno}", {k: _unescape(v) for k, v in zip(header, fields)}))
    if not cases:
        raise CorpusError("no cases (a header line, then one case per line)")
    return cases


def run_corpus(engine: "PolicyEngine", cases: Sequence[Case]) -> list[Outcome]:
    for case in cases:
        if case.identity not in engine.identities:
            raise CorpusError(f"{case.where}: unknown identity {case.identity!r}")
        if case.target not in engine.targets:
            raise CorpusError(f"{case.where}: unknown target {case.target!r}")
    sessions: dict[str, SqlSessionState] = {}
    out = []
    for case in cases:
        session = sessions.setdefault(case.session, SqlSessionState()) if case.session else None
        explanation = explain(engine, case.identity, case.target, case.statement, groups=case.groups,
                              now=case.now, session=session)
        if session is not None and explanation.protocol == "postgres":
            # What the daemon remembers after this statement (PREPARE, search_path ...).
            session.apply([s.analysis for s in explanation.statements], explanation.decision)  # type: ignore[misc]
        out.append(Outcome(case, explanation))
    return out
