"""The daemon's identity call end to end: an OpenBao token + this process's real /proc facts."""

from __future__ import annotations

import asyncio
import os

import pytest

from appliance.config import parse_config
from appliance.identity import IdentityRefused, IdentityService, ProcessFacts
from tests.idsec_fixtures import setup_bao_issuer


def my_facts() -> ProcessFacts:
    cgroup = open("/proc/self/cgroup").read().strip().split("::", 1)[-1]
    return ProcessFacts(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), cgroup_path=cgroup,
                        exe_path=os.path.realpath("/proc/self/exe"), comm=open("/proc/self/comm").read().strip())


def test_token_and_process_bound_end_to_end(bao_server):
    issuer = setup_bao_issuer(bao_server)
    facts = my_facts()
    cfg = parse_config(f"""
[oidc]
issuer = "{issuer.issuer}"
audience = ["{issuer.client_id}"]
on_expiry = "end"

[[targets]]
name = "prod-db"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "token+attestation"

[[targets]]
name = "local-db"
protocol = "postgres"
address = "127.0.0.1:5433"
authentication = "attestation"

[[identities]]
name = "deploy-bot"
groups = ["deployers"]
[identities.token]
subject = "{issuer.entity_id}"
groups_any = ["deployers"]
[identities.process]
uid = {facts.uid}
exe = "{facts.exe_path}"

[[identities]]
name = "local-runner"
[identities.process]
cgroup = "{facts.cgroup_path}"
""")
    service = IdentityService(cfg)

    async def main():
        token = issuer.mint()
        ok = await service.authenticate(cfg.target("prod-db"), token, facts)
        assert ok.identity.name == "deploy-bot" and ok.identity.subject == issuer.entity_id
        assert ok.identity.audit_fields["uid"] == facts.uid and ok.identity.audit_fields["token_kid"]
        assert ok.expiry is not None and ok.expiry.policy == "end" and ok.expiry.remaining() > 0
        # Another uid: the token is fine, the process is not.
        wrong = ProcessFacts(**{**facts.__dict__, "uid": facts.uid + 1})
        with pytest.raises(IdentityRefused) as err:
            await service.authenticate(cfg.target("prod-db"), token, wrong)
        assert err.value.reason == "process_mismatch"
        assert f"uid {facts.uid + 1}, identity 'deploy-bot' requires uid {facts.uid}" in err.value.message
        with pytest.raises(IdentityRefused) as err:
            await service.authenticate(cfg.target("prod-db"), None, facts)
        assert err.value.reason == "no_identity"
        with pytest.raises(IdentityRefused) as err:
            await service.authenticate(cfg.target("prod-db"), token[:-6] + "AAAAAA", facts)
        assert err.value.reason == "signature" and token[-20:] not in err.value.message
        # Attestation-only target: the password field is not a token and is not checked.
        local = await service.authenticate(cfg.target("local-db"), "whatever-the-bot-sent", facts)
        assert local.identity.name == "local-runner" and local.expiry is None

    asyncio.run(main())
