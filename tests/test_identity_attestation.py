"""Binding token claims to kernel-attested process facts (pure: no servers)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType

import pytest

import probes

from appliance.config import IdentityConfig, ProcessMatch, TokenMatch, parse_config
from appliance.identity import IdentityRefused, ProcessFacts, TokenInfo, normalize_cgroup, resolve_identity


@dataclass(frozen=True)
class Attribution:
    """Shape of probes.Attribution (contract §2); probes itself is another room's code."""

    pid: int
    tgid: int
    uid: int
    gid: int
    cgroup_id: int
    cgroup_path: str | None
    comm: str
    start_time_ns: int
    exe_inode: int
    exe_dev: int
    exe_path: str | None
    original_dst: tuple[str, int]
    source: str


def token(sub="deploy-sub", groups=("deployers",), **claims) -> TokenInfo:
    all_claims = {"sub": sub, "groups": list(groups), **claims}
    return TokenInfo(subject=sub, kid="kid-1", claims=MappingProxyType(all_claims),
                     expires_at=datetime(2030, 1, 1, tzinfo=timezone.utc), issuer="https://idp", groups=tuple(groups))


def facts(uid=1000, cgroup="/botwarden.bots/deploy", exe="/usr/bin/psql", pid=4242) -> ProcessFacts:
    return ProcessFacts(pid=pid, uid=uid, gid=uid, cgroup_path=cgroup, exe_path=exe, comm="psql", source="ebpf")


DEPLOY = IdentityConfig(name="deploy-bot", groups=("deployers",), token=TokenMatch(subject="deploy-sub"),
                        process=ProcessMatch(cgroup="deploy", uid=1000, exe="/usr/bin/psql"))
CI = IdentityConfig(name="ci-bot", groups=("ci",), token=TokenMatch(groups_any=("ci", "builders")),
                    targets=("staging-db",))
REPORTS = IdentityConfig(name="reports", token=TokenMatch(claims={"team": "analytics"}))
LOCAL_CRON = IdentityConfig(name="cron", process=ProcessMatch(cgroup="/system.slice/cron.service", uid=0))
ALL = (DEPLOY, CI, REPORTS, LOCAL_CRON)


def test_from_attribution_takes_a_probes_record():
    attr = Attribution(pid=10, tgid=10, uid=1000, gid=1001, cgroup_id=77, cgroup_path="/botwarden.bots/deploy",
                       comm="psql", start_time_ns=1, exe_inode=2, exe_dev=3, exe_path="/usr/bin/psql",
                       original_dst=("10.0.0.5", 5432), source="nftables")
    f = ProcessFacts.from_attribution(attr)
    assert f == ProcessFacts(10, 1000, 1001, "/botwarden.bots/deploy", "/usr/bin/psql", "psql", "nftables", 77)
    assert ProcessFacts.from_attribution(None) is None


def test_token_and_process_bound_together():
    r = resolve_identity(ALL, token(), facts(), "prod-db", authentication="token+attestation")
    assert (r.name, r.groups, r.subject, r.kid) == ("deploy-bot", ("deployers",), "deploy-sub", "kid-1")
    assert dict(r.audit_fields) == {
        "identity": "deploy-bot", "token_subject": "deploy-sub", "token_kid": "kid-1", "pid": 4242, "uid": 1000,
        "gid": 1000, "cgroup_path": "/botwarden.bots/deploy", "exe": "/usr/bin/psql", "comm": "psql",
        "attribution_source": "ebpf", "privileged": False}


@pytest.mark.parametrize("kwargs, message", [
    ({"uid": 1001}, "process not allowed: uid 1001, identity 'deploy-bot' requires uid 1000"),
    ({"cgroup": "/botwarden.bots/other"},
     "process not allowed: cgroup /botwarden.bots/other, identity 'deploy-bot' requires cgroup /botwarden.bots/deploy"),
    ({"cgroup": "/botwarden.bots/deployer"},  # a sibling whose name merely starts the same
     "process not allowed: cgroup /botwarden.bots/deployer, identity 'deploy-bot' requires cgroup "
     "/botwarden.bots/deploy"),
    ({"exe": "/usr/bin/python3"},
     "process not allowed: exe /usr/bin/python3, identity 'deploy-bot' requires exe /usr/bin/psql"),
    ({"exe": None},
     "process not allowed: exe unknown (not attested), identity 'deploy-bot' requires exe /usr/bin/psql"),
])
def test_process_mismatch_names_the_mismatch(kwargs, message):
    with pytest.raises(IdentityRefused) as err:
        resolve_identity(ALL, token(), facts(**kwargs), "prod-db")
    assert err.value.reason == "process_mismatch" and err.value.sqlstate == "28000"
    assert err.value.message == message


def test_uid_not_refuses_a_root_process_and_privileges_mark_the_session():
    nonroot = IdentityConfig(name="nonroot-bot", process=ProcessMatch(cgroup="deploy", uid_not=(0,)))
    assert resolve_identity((nonroot,), None, facts(uid=1000), "db").name == "nonroot-bot"
    with pytest.raises(IdentityRefused) as err:
        resolve_identity((nonroot,), None, facts(uid=0), "db")
    assert err.value.message == "process not allowed: uid 0, identity 'nonroot-bot' requires uid not 0"
    # A root (or capable) process is attested as privileged, and its session row says so.
    attr = probes.Attribution(pid=10, tgid=10, uid=0, gid=0, cgroup_id=77, cgroup_path="/botwarden.bots/deploy",
                       comm="psql", start_time_ns=1, exe_inode=2, exe_dev=3, exe_path="/usr/bin/psql",
                       original_dst=("10.0.0.5", 5432), source="ebpf", privileges=("uid 0", "CAP_SYS_ADMIN"))
    f = ProcessFacts.from_attribution(attr)
    assert f.privileged and f.audit_fields()["privileged"] is True
    assert attr.audit_fields()["privileged"] is True


def test_unattested_connection_refused_when_identity_requires_process():
    with pytest.raises(IdentityRefused) as err:
        resolve_identity(ALL, token(), None, "prod-db")
    assert err.value.reason == "process_mismatch"
    assert "not attested" in err.value.message and "'deploy-bot'" in err.value.message


def test_cgroup_forms():
    # Nested below the bot's cgroup, or given as a cgroup2 filesystem path: same bot.
    assert resolve_identity(ALL, token(), facts(cgroup="/botwarden.bots/deploy/worker-1"), "db").name == "deploy-bot"
    assert resolve_identity(ALL, token(), facts(cgroup="/sys/fs/cgroup/botwarden.bots/deploy"), "db").name == \
        "deploy-bot"
    # An absolute bots cgroup setting works the same as the relative default.
    assert resolve_identity(ALL, token(), facts(cgroup="/custom/bots/deploy"), "db",
                            bots_cgroup="/sys/fs/cgroup/custom/bots").name == "deploy-bot"
    assert normalize_cgroup("/sys/fs/cgroup/a/b/") == "/a/b"
    assert normalize_cgroup("a/../b") == "/b"


def test_groups_claims_and_targets():
    ci_token = token(sub="runner-7", groups=("builders",))
    assert resolve_identity(ALL, ci_token, None, "staging-db").name == "ci-bot"
    with pytest.raises(IdentityRefused) as err:
        resolve_identity(ALL, ci_token, None, "prod-db")
    assert err.value.reason == "no_identity"
    assert err.value.message == "identity 'ci-bot' is not allowed on target 'prod-db'"
    assert resolve_identity(ALL, token(sub="r", groups=(), team="analytics"), None, "x").name == "reports"
    assert resolve_identity(ALL, token(sub="r", groups=(), team=["ops", "analytics"]), None, "x").name == "reports"
    with pytest.raises(IdentityRefused) as err:
        resolve_identity(ALL, token(sub="r", groups=(), team="sales"), None, "x")
    assert err.value.reason == "no_identity" and "subject 'r'" in err.value.message


def test_first_identity_in_config_order_wins():
    broad = IdentityConfig(name="any-deployer", token=TokenMatch(groups_any=("deployers",)))
    assert resolve_identity((broad, DEPLOY), token(), facts(), "db").name == "any-deployer"
    assert resolve_identity((DEPLOY, broad), token(), facts(), "db").name == "deploy-bot"
    # When the stricter identity's process check fails, the next one in order still applies.
    assert resolve_identity((DEPLOY, broad), token(), facts(uid=1001), "db").name == "any-deployer"


def test_target_authentication_modes():
    # attestation only: no token needed; process-only identities qualify.
    cron = resolve_identity(ALL, None, facts(uid=0, cgroup="/system.slice/cron.service", exe="/usr/bin/psql"),
                            "db", authentication="attestation")
    assert cron.name == "cron" and cron.subject is None and "token_subject" not in cron.audit_fields
    with pytest.raises(IdentityRefused) as err:
        resolve_identity(ALL, None, None, "db", authentication="attestation")
    assert err.value.reason == "no_identity" and "attribution" in err.value.message
    # token: a token is required; a process-only identity does not stand in for it.
    with pytest.raises(IdentityRefused) as err:
        resolve_identity(ALL, None, facts(uid=0, cgroup="/system.slice/cron.service"), "db", authentication="token")
    assert err.value.reason == "no_identity" and "requires an OIDC token" in err.value.message
    with pytest.raises(IdentityRefused):
        resolve_identity((LOCAL_CRON,), token(), facts(uid=0, cgroup="/system.slice/cron.service"), "db",
                         authentication="token")
    # token+attestation: an identity without process requirements is not enough.
    with pytest.raises(IdentityRefused) as err:
        resolve_identity((REPORTS,), token(team="analytics"), facts(), "db", authentication="token+attestation")
    assert err.value.reason == "no_identity"


def test_real_process_facts_of_this_test():
    # The facts of the current process, read from /proc the way probes attest them.
    cgroup = open("/proc/self/cgroup").read().strip().split("::", 1)[-1]
    me = ProcessFacts(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), cgroup_path=cgroup,
                      exe_path=os.path.realpath("/proc/self/exe"), comm=open("/proc/self/comm").read().strip())
    ident = IdentityConfig(name="me", process=ProcessMatch(cgroup=cgroup, uid=os.getuid(), exe=me.exe_path))
    assert resolve_identity((ident,), None, me, "db", authentication="attestation").name == "me"
    other = IdentityConfig(name="other", process=ProcessMatch(uid=os.getuid() + 1))
    with pytest.raises(IdentityRefused) as err:
        resolve_identity((other,), None, me, "db")
    uid = os.getuid()
    assert err.value.message == f"process not allowed: uid {uid}, identity 'other' requires uid {uid + 1}"


def test_identities_from_toml():
    cfg = parse_config("""
[oidc]
issuer = "https://idp.example"
audience = ["botwarden"]

[[targets]]
name = "prod-db"
protocol = "postgres"
address = "10.0.0.5:5432"
authentication = "token+attestation"

[[identities]]
name = "deploy-bot"
groups = ["deployers"]
targets = ["prod-db"]
[identities.token]
subject = "deploy-sub"
[identities.process]
cgroup = "deploy"
uid = 1000
uid_not = [0]
""")
    assert cfg.identities[0].process.uid_not == (0,)
    t = cfg.target("prod-db")
    r = resolve_identity(cfg.identities, token(), facts(exe="/anything"), t.name,
                         bots_cgroup=cfg.probes.bots_cgroup, authentication=t.authentication)
    assert r.name == "deploy-bot"
