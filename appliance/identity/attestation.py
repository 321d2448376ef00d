"""Binding a token to the kernel-attested process that opened the socket.

Identities are tried in config order; the first one that is allowed on the target and matches
everything it requires (token claims and/or process facts) wins. When none does, the refusal
names the closest miss: a token that matched an identity but came from the wrong process is a
``process_mismatch`` ("process not allowed: uid 1001, identity 'deploy-bot' requires uid 1000");
anything else is ``no_identity``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Literal, Mapping

from appliance.config import IdentityConfig, ProcessMatch, TokenMatch
from appliance.identity.errors import IdentityRefused
from appliance.identity.oidc import TokenInfo

CGROUP2_MOUNT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class ProcessFacts:
    """What the kernel attests about the process behind a connection (from ``probes.Attribution``)."""

    pid: int
    uid: int
    gid: int
    cgroup_path: str | None
    exe_path: str | None
    comm: str
    source: Literal["ebpf", "nftables", "none"] = "ebpf"
    cgroup_id: int | None = None
    privileged: bool = False  # uid 0 or capabilities that can undo the probes (see probes.attribution)

    @classmethod
    def from_attribution(cls, obj: Any) -> "ProcessFacts | None":
        """Accept any object with pid, uid, gid, cgroup_path, exe_path, comm (e.g.
        ``probes.Attribution``); None stays None (no attribution for this connection)."""
        if obj is None:
            return None
        # The process id is the thread group id (what `ps` shows); probes' `pid` is the thread
        # that called connect().
        return cls(
            pid=int(getattr(obj, "tgid", None) or obj.pid), uid=int(obj.uid), gid=int(obj.gid),
            cgroup_path=getattr(obj, "cgroup_path", None), exe_path=getattr(obj, "exe_path", None),
            comm=str(getattr(obj, "comm", "") or ""), source=getattr(obj, "source", "ebpf") or "ebpf",
            cgroup_id=getattr(obj, "cgroup_id", None), privileged=bool(getattr(obj, "privileges", ())),
        )

    def audit_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid, "uid": self.uid, "gid": self.gid, "cgroup_path": self.cgroup_path,
                               "exe": self.exe_path, "comm": self.comm, "attribution_source": self.source,
                               "privileged": self.privileged}
        if self.cgroup_id is not None:
            out["cgroup_id"] = self.cgroup_id
        return out


from_attribution = ProcessFacts.from_attribution


@dataclass(frozen=True)
class ResolvedIdentity:
    name: str
    groups: tuple[str, ...]
    subject: str | None
    kid: str | None
    # Fields of the ``session_start`` audit event (contract §1); never a token.
    audit_fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def normalize_cgroup(path: str) -> str:
    """A cgroup as the kernel names it in /proc/<pid>/cgroup: absolute from the cgroup2 root."""
    path = path.strip()
    if path.startswith(CGROUP2_MOUNT + "/") or path == CGROUP2_MOUNT:
        path = path[len(CGROUP2_MOUNT):]
    path = posixpath.normpath("/" + path.lstrip("/"))
    return "/" if path in ("/", "//") else path.rstrip("/")


def required_cgroup(match_cgroup: str, bots_cgroup: str) -> str:
    """``cgroup = "deploy"`` means the child ``deploy`` of the bots cgroup; ``"/x/y"`` is absolute."""
    if match_cgroup.startswith("/"):
        return normalize_cgroup(match_cgroup)
    return normalize_cgroup(posixpath.join(normalize_cgroup(bots_cgroup), match_cgroup))


def _token_miss(match: TokenMatch, info: TokenInfo | None) -> str | None:
    """Why the token does not fit ``match``, or None when it does."""
    if info is None:
        return "no token presented"
    if match.subject is not None and info.subject != match.subject:
        return f"subject {info.subject!r} is not {match.subject!r}"
    if match.groups_any and not set(match.groups_any) & set(info.groups):
        return f"groups {list(info.groups)} include none of {list(match.groups_any)}"
    for name, want in match.claims.items():
        have = info.claims.get(name)
        values = [str(v) for v in have] if isinstance(have, list) else [] if have is None else [str(have)]
        if want not in values:
            return f"claim {name!r} is not {want!r}"
    return None


def _process_miss(match: ProcessMatch, facts: ProcessFacts | None, bots_cgroup: str) -> tuple[str, str] | None:
    """(what the process is, what the identity requires) for the first mismatch, or None."""
    wants = []
    if match.uid is not None:
        wants.append(("uid", str(match.uid)))
    if match.uid_not:
        wants.append(("uid_not", "not " + " or ".join(map(str, match.uid_not))))
    if match.cgroup is not None:
        wants.append(("cgroup", required_cgroup(match.cgroup, bots_cgroup)))
    if match.exe is not None:
        wants.append(("exe", match.exe))
    if not wants:
        return None
    if facts is None:
        what, want = wants[0]
        return ("not attested (no kernel attribution for this connection)", f"{what} {want}")
    for what, want in wants:
        if what == "uid" and facts.uid != match.uid:
            return (f"uid {facts.uid}", f"uid {want}")
        if what == "uid_not" and facts.uid in match.uid_not:
            return (f"uid {facts.uid}", f"uid {want}")
        if what == "cgroup":
            have = normalize_cgroup(facts.cgroup_path) if facts.cgroup_path else None
            # The bot's own cgroup or one below it (a bot may organise its processes in sub-cgroups;
            # creating one needs write access to the bot's cgroup, i.e. it is the same bot).
            if have is None or not (have == want or have.startswith(want.rstrip("/") + "/")):
                return (f"cgroup {have or 'unknown'}", f"cgroup {want}")
        if what == "exe" and facts.exe_path != match.exe:
            return (f"exe {facts.exe_path or 'unknown (not attested)'}", f"exe {want}")
    return None


def resolve_identity(identities: Iterable[IdentityConfig], token_info: TokenInfo | None,
                     facts: ProcessFacts | None, target: str, *, bots_cgroup: str = "botwarden.bots",
                     authentication: Literal["token", "attestation", "token+attestation"] | None = None,
                     ) -> ResolvedIdentity:
    """The first identity (config order) allowed on ``target`` that matches everything it requires.

    ``authentication`` is the target's mode: "token" needs a validated token, "attestation" needs
    kernel facts and an identity that checks them, "token+attestation" both. Raises
    :class:`IdentityRefused` ('no_identity' or 'process_mismatch').
    """
    needs_token = authentication in ("token", "token+attestation")
    needs_process = authentication in ("attestation", "token+attestation")
    if needs_token and token_info is None:
        raise IdentityRefused("no_identity", f"target {target!r} requires an OIDC token; none was presented")
    if needs_process and facts is None:
        raise IdentityRefused("no_identity", f"target {target!r} requires a kernel-attested process; "
                                             "this connection has no attribution")
    # (identity, is, requires): first those whose token part matched, then process-only identities.
    token_matched_misses: list[tuple[str, str, str]] = []
    process_only_misses: list[tuple[str, str, str]] = []
    not_on_target: list[str] = []
    for ident in identities:
        if ident.token is not None:
            if _token_miss(ident.token, token_info) is not None:
                continue
        elif needs_token:
            # A process-only identity would let the token say nothing about who this is.
            continue
        if needs_process and ident.process is None:
            continue
        if ident.process is not None:
            miss = _process_miss(ident.process, facts, bots_cgroup)
            if miss is not None:
                (token_matched_misses if ident.token else process_only_misses).append((ident.name, *miss))
                continue
        if ident.targets and target not in ident.targets:
            not_on_target.append(ident.name)
            continue
        return _resolved(ident, token_info, facts)
    # The closest miss first: the token named an identity but the process is wrong; then an identity
    # that matched fully but not on this target; then, for a connection without a token, a
    # process-only identity's requirements. A token that matched nothing is described as such.
    if token_matched_misses:
        name, have, want = token_matched_misses[0]
        raise IdentityRefused("process_mismatch", f"process not allowed: {have}, identity {name!r} requires {want}")
    if not_on_target:
        raise IdentityRefused("no_identity", f"identity {not_on_target[0]!r} is not allowed on target {target!r}")
    if process_only_misses and token_info is None:
        name, have, want = process_only_misses[0]
        raise IdentityRefused("process_mismatch", f"process not allowed: {have}, identity {name!r} requires {want}")
    raise IdentityRefused("no_identity", f"no identity matches this connection on target {target!r} "
                                         f"({_describe(token_info, facts)})")


def _describe(info: TokenInfo | None, facts: ProcessFacts | None) -> str:
    parts = []
    if info is not None:
        parts.append(f"subject {info.subject!r}")
        if info.groups:
            parts.append(f"groups {list(info.groups)}")
    else:
        parts.append("no token")
    if facts is not None:
        parts.append(f"uid {facts.uid}")
        if facts.cgroup_path:
            parts.append(f"cgroup {normalize_cgroup(facts.cgroup_path)}")
    else:
        parts.append("no process attribution")
    return ", ".join(parts)


def _resolved(ident: IdentityConfig, info: TokenInfo | None, facts: ProcessFacts | None) -> ResolvedIdentity:
    audit: dict[str, Any] = {"identity": ident.name}
    if info is not None:
        audit["token_subject"] = info.subject
        audit["token_kid"] = info.kid
    audit.update(facts.audit_fields() if facts is not None else {"attribution_source": "none"})
    return ResolvedIdentity(name=ident.name, groups=ident.groups, subject=info.subject if info else None,
                            kid=info.kid if info else None, audit_fields=MappingProxyType(audit))
