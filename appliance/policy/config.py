"""Policy configuration: the ``[[rules]]`` and ``[masking]`` parts of botwarden.toml (pure).

Built by :func:`appliance.schema.build`; every ``check`` below raises ValueError,
which the loader reports as ``file:line: rules[i].key: message``. See docs/policy.md.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

from appliance.errors import ConfigKeyError
from appliance.protocols.kubernetes import parse_mask_path
from appliance.schema import check

Action = Literal["allow", "block", "approve", "mask"]
MatchMode = Literal["any", "all"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DETECTORS = ("email", "card", "iban", "phone", "ssn", "aws_key", "private_key", "jwt", "secret")
SHELL_CONSTRUCTS = ("sequence", "and_or", "pipe", "background", "subst", "redirect", "expansion", "glob",
                    "subshell", "newline")
FORWARD_KINDS = ("local", "remote", "agent", "x11")
K8S_PATCH_TYPES = ("json", "merge", "strategic", "apply", "unknown")
K8S_SELECTOR_VERBS = ("list", "watch", "deletecollection")
SFTP_OPS = ("read", "write", "create", "remove", "rename", "mkdir", "rmdir", "list", "stat", "setstat",
            "symlink", "readlink")


def _nonempty_patterns(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if values is not None:
        for v in values:
            if not v.strip():
                raise ValueError("patterns must not be empty strings")
    return values


def _sftp_paths(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """SFTP operations are decided on absolute, normalized paths (the front resolves relative ones
    against the login's home directory): a pattern that could never match one is a mistake."""
    _nonempty_patterns(values)
    for v in values or ():
        if not v.startswith(("/", "*")):
            raise ValueError(f"sftp path pattern {v!r} must be absolute (start with / or *): operations are "
                             f"decided on absolute paths")
        parts = v.split("/")
        if any(p in (".", "..") for p in parts) or "//" in v:
            raise ValueError(f"sftp path pattern {v!r} is not normalized (no ., .. or //): paths are "
                             f"normalized before they are decided, so it would never match")
        if len(v) > 1 and v.endswith("/"):
            raise ValueError(f"sftp path pattern {v!r} ends with /: paths are decided without one "
                             f"(write {v.rstrip('/')!r} for the directory, {v + '*'!r} for what is under it)")
    return values


def _kinds(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    from appliance.policy.sql import valid_kind_pattern

    for v in values or ():
        if not valid_kind_pattern(v):
            raise ValueError(f"unknown statement kind {v!r} (e.g. SELECT, DELETE, DROP_TABLE, DDL, DML)")
    return tuple(v.upper() for v in values) if values is not None else None


def _properties(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    from appliance.policy.sql import PROPERTIES

    known = PROPERTIES | {"unparsed"}
    for v in values or ():
        if v not in known:
            raise ValueError(f"unknown property {v!r}; known: {', '.join(sorted(known))}")
    return values


def _positive_rows(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or value < 0):
        raise ValueError("max_rows must be a whole number of rows, 0 or more")
    return value


def _days(values: tuple[str, ...]) -> tuple[str, ...]:
    parse_days(values)
    return values


def parse_days(values: tuple[str, ...]) -> frozenset[int]:
    """``["mon-fri", "sun"]`` -> {0,1,2,3,4,6} (Monday = 0)."""
    out: set[int] = set()
    for value in values:
        lo, sep, hi = value.lower().partition("-")
        if lo not in DAYS or (sep and hi not in DAYS):
            raise ValueError(f"{value!r} is not a day or day range such as \"mon-fri\"")
        a, b = DAYS.index(lo), DAYS.index(hi) if sep else DAYS.index(lo)
        i = a
        while True:
            out.add(i)
            if i == b:
                break
            i = (i + 1) % 7
    return frozenset(out)


def _hours(values: tuple[str, ...]) -> tuple[str, ...]:
    parse_hours(values)
    return values


def _minute(text: str) -> int:
    hh, sep, mm = text.strip().partition(":")
    if not (sep and hh.isdigit() and mm.isdigit() and len(mm) == 2):
        raise ValueError(f"{text!r} is not HH:MM")
    h, m = int(hh), int(mm)
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ValueError(f"{text!r} is not a time of day")
    return h * 60 + m


def parse_hours(values: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """``["09:00-17:30", "22:00-02:00"]`` -> minute ranges; an end before the start wraps midnight."""
    out = []
    for value in values:
        start, sep, end = value.partition("-")
        if not sep:
            raise ValueError(f"{value!r} is not a range such as \"09:00-17:00\"")
        a, b = _minute(start), _minute(end)
        if a == b:
            raise ValueError(f"{value!r} is an empty range")
        out.append((a, b))
    return tuple(out)


def _timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as \"Europe/Berlin\")") from None
    return value


@dataclass(frozen=True)
class TimeWindow:
    """The rule applies only inside this window (days AND hours, in ``timezone``)."""

    days: tuple[str, ...] = field(default=("mon-sun",), metadata=check(_days))
    hours: tuple[str, ...] = field(default=("00:00-24:00",), metadata=check(_hours))
    timezone: str = field(default="UTC", metadata=check(_timezone))


@dataclass(frozen=True)
class SqlMatch:
    """PostgreSQL matchers. Every key given must match; see ``match`` for lists."""

    kinds: tuple[str, ...] | None = field(default=None, metadata=check(_kinds))
    relations: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    reads: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    writes: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    functions: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    properties: tuple[str, ...] | None = field(default=None, metadata=check(_properties))
    # The rule does not match a statement with any of these properties (e.g. "explain_only").
    unless_properties: tuple[str, ...] | None = field(default=None, metadata=check(_properties))
    # "any": some item of the statement matches a pattern (default for block/approve/mask);
    # "all": every item matches (default for allow, so one allowed table cannot carry another).
    match: MatchMode | None = None
    # How the keys combine: "all" (default) = every key present must match; "any" = one is enough.
    match_keys: MatchMode | None = None
    # Affected-rows guard: the rule matches an UPDATE, DELETE or MERGE (its other keys matching)
    # only when the planner estimates it touches more rows than this; the front asks the server
    # (EXPLAIN on the bot's session) before the statement runs. Not a matcher key.
    max_rows: int | None = field(default=None, metadata=check(_positive_rows))


@dataclass(frozen=True)
class SshMatch:
    programs: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    commands: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    # Commands using these shell constructs; "any" for all of them.
    constructs: tuple[Literal[SHELL_CONSTRUCTS + ("any",)], ...] | None = None  # type: ignore[valid-type]
    shell: bool | None = None  # true: matches interactive shell sessions
    forwarding: tuple[Literal[FORWARD_KINDS + ("any",)], ...] | None = None  # type: ignore[valid-type]
    destinations: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    subsystems: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    sftp_paths: tuple[str, ...] | None = field(default=None, metadata=check(_sftp_paths))
    sftp_ops: tuple[Literal[SFTP_OPS], ...] | None = None  # type: ignore[valid-type]
    match: MatchMode | None = None
    match_keys: MatchMode | None = None  # as in SqlMatch


def _mask_paths(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    for v in values or ():
        parse_mask_path(v)  # ValueError: what is wrong with it
    return values


@dataclass(frozen=True)
class K8sMatch:
    verbs: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    resources: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    subresources: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    namespaces: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    names: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    api_groups: tuple[str, ...] | None = None
    # Requirements of the request's selectors (`kubectl -l app=web` is "app=web"; "*" = any
    # selector); a request without one does not match.
    label_selectors: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    field_selectors: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    # A PATCH's type: `kubectl patch --type`, `kubectl apply` (strategic), `--server-side` (apply).
    patch_types: tuple[Literal[K8S_PATCH_TYPES], ...] | None = None  # type: ignore[valid-type]
    dry_run: bool | None = None  # true: only dry runs (`--dry-run=server`); false: only real requests
    # `kubectl exec -- cmd`: the command, analyzed as an SSH command is (docs/policy.md, SSH):
    # programs run, whole command lines, shell constructs; `match` as for [rules.ssh].
    programs: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    commands: tuple[str, ...] | None = field(default=None, metadata=check(_nonempty_patterns))
    constructs: tuple[Literal[SHELL_CONSTRUCTS + ("any",)], ...] | None = None  # type: ignore[valid-type]
    match: MatchMode | None = None
    # Not a matcher: with action = "mask", the values at these paths in the response's objects
    # ("ConfigMap.data.password", "Pod.spec.containers[*].env[*].value"; docs/kubernetes.md).
    mask_paths: tuple[str, ...] | None = field(default=None, metadata=check(_mask_paths))

    def __post_init__(self) -> None:
        command_keys = [k for k in ("programs", "commands", "constructs") if getattr(self, k) is not None]
        if command_keys and self.subresources is not None and not any(
                fnmatch.fnmatchcase("exec", p.lower()) for p in self.subresources):
            raise ValueError(f"{command_keys[0]} match the command of `kubectl exec`: subresources must include "
                             "\"exec\" (attach and port-forward carry no command)")
        if self.match is not None and not command_keys:
            raise ValueError("match applies to programs / commands / constructs: set one of them or drop it")
        # A key no request of the rule's verbs can carry would make the rule match nothing.
        verbs = self.verbs
        if verbs is None:
            return
        can = lambda wanted: any(fnmatch.fnmatchcase(v, p.lower()) for p in verbs for v in wanted)  # noqa: E731
        if self.patch_types is not None and not can(("patch",)):
            raise ValueError("patch_types match only patch requests: verbs must include \"patch\"")
        for key in ("label_selectors", "field_selectors"):
            if getattr(self, key) is not None and not can(K8S_SELECTOR_VERBS):
                raise ValueError(f"{key} match only list, watch and deletecollection requests (the verbs that "
                                 f"carry selectors; `kubectl delete -l` lists first): verbs must include one")


def _keep(value: int) -> int:
    if not 0 <= value <= 64:
        raise ValueError("must be between 0 and 64")
    return value


@dataclass(frozen=True)
class MaskSpec:
    """What a mask rule rewrites: columns by name and/or values by content."""

    # "email", "customers.email", "billing.customers.card_*": column name (glob), optionally
    # behind the table (and schema) the statement reads it from.
    columns: tuple[str, ...] = field(default=(), metadata=check(_nonempty_patterns))
    detectors: tuple[Literal[DETECTORS], ...] = ()  # type: ignore[valid-type]
    strategy: Literal["full", "partial", "hash", "null", "format"] = "full"
    keep: int = field(default=4, metadata=check(_keep))  # partial: characters kept at the end

    def __post_init__(self) -> None:
        if not self.columns and not self.detectors:
            raise ValueError("a [[rules.mask]] entry needs columns and/or detectors")


@dataclass(frozen=True)
class Rule:
    name: str
    action: Action
    description: str = ""
    targets: tuple[str, ...] = ()  # empty = every target
    identities: tuple[str, ...] = ()  # empty (with groups empty) = every identity
    groups: tuple[str, ...] = ()
    sql: SqlMatch | None = None
    ssh: SshMatch | None = None
    k8s: K8sMatch | None = None
    when: TimeWindow | None = None
    # What this rule does with statements that cannot be parsed (in its scope): by default
    # nothing, and botwarden blocks them.
    unparsed: Literal["block", "allow", "approve"] = "block"
    mask: tuple[MaskSpec, ...] = ()

    def __post_init__(self) -> None:
        sections = [k for k in ("sql", "ssh", "k8s") if getattr(self, k) is not None]
        if len(sections) > 1:
            raise ValueError(f"rule {self.name!r}: one of sql / ssh / k8s per rule, not {' and '.join(sections)}")
        # A Kubernetes mask rule needs no entries: it masks Secret values (docs/kubernetes.md).
        if self.action == "mask" and not self.mask and self.k8s is None:
            raise ValueError(f"rule {self.name!r}: action = \"mask\" needs at least one [[rules.mask]] entry "
                             "(or a [rules.k8s] section: Secret values in Kubernetes responses)")
        if self.mask and self.action != "mask":
            raise ValueError(f"rule {self.name!r}: mask entries need action = \"mask\", not {self.action!r}")
        if self.k8s is not None and self.k8s.mask_paths and self.action != "mask":
            raise ValueError(f"rule {self.name!r}: mask_paths need action = \"mask\", not {self.action!r}")
        if self.mask and sections and sections[0] not in ("sql", "ssh"):
            raise ValueError(f"rule {self.name!r}: masking applies to SQL results and SSH output only")
        if self.mask and self.ssh is not None and any(m.columns for m in self.mask):
            raise ValueError(f"rule {self.name!r}: SSH output has no columns; mask it with detectors")

    @property
    def protocol(self) -> str | None:
        """The protocol this rule's matchers speak; None = it matches any request."""
        if self.sql is not None or (self.mask and self.ssh is None):
            return "postgres"
        if self.ssh is not None:
            return "ssh"
        if self.k8s is not None:
            return "kubernetes"
        return None


def _threshold(value: float) -> float:
    if not 2.0 <= value <= 6.0:
        raise ValueError("must be between 2.0 and 6.0 bits per character")
    return value


@dataclass(frozen=True)
class MaskingSettings:
    # A file of random bytes (read by the daemon) keying the salted hash and format-preserving
    # strategies, so masked values stay joinable within a deployment but cannot be brute-forced.
    salt_file: str | None = None
    # Generic secret detector: minimum token length and Shannon entropy (bits per character).
    secret_min_length: int = 20
    secret_entropy: float = field(default=4.0, metadata=check(_threshold))


@dataclass(frozen=True)
class PolicyConfig:
    rules: tuple[Rule, ...] = ()
    masking: MaskingSettings = MaskingSettings()

    def cross_check(self, *, target_names: set[str], identity_names: set[str], group_names: set[str]) -> None:
        """References to targets, identities and groups must exist."""
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ConfigKeyError(("rules", i, "name"), f"duplicate rule name {rule.name!r}")
            seen.add(rule.name)
            for key, known, values in (("targets", target_names, rule.targets),
                                       ("identities", identity_names, rule.identities),
                                       ("groups", group_names, rule.groups)):
                for j, value in enumerate(values):
                    if value not in known:
                        raise ConfigKeyError(("rules", i, key, j), f"unknown {key[:-1] if key != 'identities' else 'identity'} {value!r}")


# The matcher keys of each section (what match_keys combines and lint counts).
SQL_KEYS = ("kinds", "relations", "reads", "writes", "functions", "properties")
SSH_KEYS = ("programs", "commands", "constructs", "shell", "forwarding", "destinations", "subsystems", "sftp_paths",
            "sftp_ops")


def matcher_keys(section: SqlMatch | SshMatch | None) -> tuple[str, ...]:
    """The matcher keys a section sets, in declaration order."""
    if section is None:
        return ()
    keys = SQL_KEYS if isinstance(section, SqlMatch) else SSH_KEYS
    return tuple(k for k in keys if getattr(section, k) is not None)


def glob_matches(pattern: str, value: str) -> bool:
    """Case-insensitive glob (``*``, ``?``, ``[...]``)."""
    return fnmatch.fnmatchcase(value.lower(), pattern.lower())
