"""SFTP operations decided by [rules.ssh] path patterns (pure: no server).

The SSH front's relay (appliance/fronts/ssh_sftp.py) asks the engine once per (operation,
absolute path); these tests pin what the engine answers and how an SFTP open maps to operations.
"""

from __future__ import annotations

import pytest
from asyncssh.sftp import FXF_APPEND, FXF_CREAT, FXF_READ, FXF_TRUNC, FXF_WRITE

from appliance.config import parse_config
from appliance.fronts.ssh_sftp import open_ops
from appliance.policy import PolicyEngine, SshRequest

CONFIG = """\
[[targets]]
name = "web"
protocol = "ssh"
address = "127.0.0.1:22"
authentication = "attestation"

[[identities]]
name = "bot"
[identities.process]
uid = 1000

[[rules]]
name = "no-system-writes"
action = "block"
description = "deploy bots write under /srv only"
[rules.ssh]
sftp_paths = ["/etc/*", "/usr/*"]
sftp_ops = ["write", "create", "remove", "rename", "mkdir", "rmdir", "setstat", "symlink"]

[[rules]]
name = "keys-need-approval"
action = "approve"
[rules.ssh]
sftp_paths = ["/srv/keys/*"]

[[rules]]
name = "no-sftp-to-root"
action = "block"
[rules.ssh]
sftp_paths = ["/root", "/root/*"]
"""


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    cfg = parse_config(CONFIG)
    return PolicyEngine(cfg.policy, cfg.targets, cfg.identities)


def decide(engine: PolicyEngine, op: str, path: str):
    return engine.decide_ssh("bot", (), "web", SshRequest("sftp", subsystem="sftp", sftp_op=op, path=path))


@pytest.mark.parametrize("op,path,action,rule", [
    ("write", "/etc/passwd", "block", "no-system-writes"),
    ("read", "/etc/passwd", "allow", None),               # the rule lists writes only
    ("create", "/usr/local/bin/x", "block", "no-system-writes"),
    ("remove", "/etc/hosts", "block", "no-system-writes"),
    ("write", "/srv/app/release.tar", "allow", None),
    ("write", "/srv/../etc/shadow", "block", "no-system-writes"),  # normalized before matching
    ("read", "/srv/keys/deploy.pem", "approve", "keys-need-approval"),
    ("list", "/root", "block", "no-sftp-to-root"),        # a directory and what is under it
    ("stat", "/root/.ssh/authorized_keys", "block", "no-sftp-to-root"),
    ("list", "/rootless", "allow", None),                 # /root/* is not a prefix match
])
def test_sftp_operation_is_decided_on_its_path(engine, op, path, action, rule) -> None:
    v = decide(engine, op, path)
    assert (v.action, v.rule) == (action, rule), v.reason
    if rule == "no-system-writes":
        assert "deploy bots write under /srv only" in v.reason


@pytest.mark.parametrize("pflags,ops", [
    (FXF_READ, ("read",)),
    (0, ("read",)),                                       # no flag: SFTP reads
    (FXF_WRITE | FXF_CREAT | FXF_TRUNC, ("write", "create")),  # OpenSSH's put
    (FXF_WRITE, ("write",)),
    (FXF_APPEND, ("write",)),                             # append alone still writes
    (FXF_READ | FXF_WRITE, ("read", "write")),
    (FXF_TRUNC, ("write",)),                              # truncating is writing
])
def test_an_open_asks_for_every_operation_its_flags_allow(pflags, ops) -> None:
    assert open_ops(pflags) == ops
