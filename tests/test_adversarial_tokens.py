"""Issue 14.4, tokens: bad OIDC tokens presented to the REAL daemon by kernel-attested bots.

One daemon serves the module: `botwarden run` with its eBPF probes on its own bots cgroup, a real
PostgreSQL 15 target (``token+attestation``), a real OpenBao as the OIDC issuer and the credential
source, and a second OpenBao as "another issuer". Every bot is started with
`botwarden bot run --user nobody` and sends its token in the password field, as psql does.
Forged tokens are made from a real token's claims (tests/idsec_fixtures.py); expired, not yet
valid and wrong-audience tokens are minted by OpenBao itself from roles made for the purpose.

Each case asserts what the bot is told (FATAL, the reason), the session row the audit store
keeps (outcome ``refused``, the same reason, no token text), and that the daemon and another
bot's session opened before the attack are unaffected. The validator's own unit-level cases
(every reason code, leeway, rotation, fuzzing) are in tests/test_identity_oidc.py.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import hvac
import pytest
import requests
from joserfc import jwk

from appliance.sandbox import OpenBaoServer, config_header
from probes import cgroups
from tests.adversarial_fixtures import SYSTEM_PYTHON, LiveSession, session_row
from tests.approvals_fixtures import wait_until
from tests.daemon_fixtures import ROOT, DaemonProcess, fresh_setup, new_port
from tests.idsec_fixtures import hs256_with_secret, setup_bao_issuer, sign_with, token_parts, unsigned
from tests.test_adversarial_daemon import BotProcess, bot_env, psql_argv

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

# Unique per run: other test runs on the machine may hold their own probes at the same time.
RUN = uuid.uuid4().hex[:6]
BOTS = f"bw-advt-{RUN}.bots"
PIN_DIR = f"/sys/fs/bpf/bw-advt-{RUN}"
BOT_X, BOT_Y = "bot-x", "bot-y"  # the cgroups (under BOTS) identities X and Y require
MAX_TOKEN_BYTES = 16 * 1024       # appliance.identity.oidc.MAX_TOKEN_BYTES


def _approle_login(root: hvac.Client, addr: str, name: str, policy: str) -> hvac.Client:
    root.auth.approle.create_or_update_approle(name, token_policies=[policy], token_ttl="30m")
    role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
    client = hvac.Client(url=addr)
    client.auth.approle.login(role_id, secret_id)
    return client


@pytest.fixture(scope="module")
def other_issuer():
    """A second, independent real issuer (its own OpenBao dev server)."""
    server = OpenBaoServer(root_token="bw-advt-other").start()
    try:
        yield setup_bao_issuer(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def env(pg_server, bao_server, other_issuer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adversarial-tokens")
    setup = fresh_setup(bao_server, pg_server, workdir)
    root = bao_server.client()
    key = setup.oidc_role  # configure_openbao names the signing key after the role
    tag = uuid.uuid4().hex[:6]
    # Roles on the same key that mint what a misconfigured or hostile issuer would: a token for
    # another audience, one that is not valid for an hour, one that expires after a second.
    roles = {"audience": (f"advt-aud-{tag}", "10m", "bw-wrong-audience", "{}"),
             "future": (f"advt-nbf-{tag}", "10m", setup.client_id, '{"nbf": %d}' % (int(time.time()) + 3600)),
             "short": (f"advt-exp-{tag}", "1s", setup.client_id, "{}")}
    for role, ttl, client_id, template in roles.values():
        root.write(f"identity/oidc/role/{role}", key=key, ttl=ttl, client_id=client_id,
                   template=base64.b64encode(template.encode()).decode())
    root.sys.create_or_update_policy(f"advt-mint-{tag}", 'path "identity/oidc/token/*" { capabilities = ["read"] }')
    minter = _approle_login(root, bao_server.addr, f"advt-minter-{tag}", f"advt-mint-{tag}")
    # Identity Y: another bot with its own AppRole (its own entity, so its own token subject),
    # allowed to mint from the bots' role (configure_openbao's policy "<tag>-mint" for "<tag>-bots").
    mint_policy = setup.oidc_role.removesuffix("-bots") + "-mint"
    bot_y = _approle_login(root, bao_server.addr, f"advt-bot-y-{tag}", mint_policy)

    port = new_port()
    top = Path(tempfile.mkdtemp(prefix="bw-advt-"))
    socket_path = top / "run" / "control.sock"
    probes = (f'mode = "ebpf"\nbots_cgroup = "{BOTS}"\npin_dir = "{PIN_DIR}"\nnft_table = "bw_advt_{RUN}"\n'
              'map_entries = 4096')
    header = config_header(workdir, setup, socket_path=socket_path, probes=probes)
    # No leeway: a token that expired a second ago is expired (the default allows 30 s of clock skew).
    header = header.replace('algorithms = ["RS256"]\n', 'algorithms = ["RS256"]\nleeway_s = 0\n', 1)
    config = workdir / "botwarden.toml"
    config.write_text(header + f"""
[[targets]]
name = "ledger"
protocol = "postgres"
address = "{pg_server.host}:{pg_server.port}"
listen = "127.0.0.1:{port}"
allow_plaintext = true
authentication = "token+attestation"
[targets.tls]
mode = "require"
[targets.credential]
source = "database"
mount = "{setup.db_mount}"
role = "{setup.db_role}"

[[identities]]
name = "token-x"
[identities.token]
subject = "{setup.bot_entity_id()}"
[identities.process]
cgroup = "{BOT_X}"
uid_not = [0]

[[identities]]
name = "token-y"
[identities.token]
subject = "{bot_y.auth.token.lookup_self()['data']['entity_id']}"
[identities.process]
cgroup = "{BOT_Y}"
uid_not = [0]
""")
    daemon = DaemonProcess(config, socket_path).start()
    live = None
    try:
        # Another bot's session, open during every attack.
        live = LiveSession(pg_server.port, setup.mint_token(), bot_run=(config, BOT_X))
        yield type("Env", (), {
            "pg": pg_server, "bao": setup, "config": config, "daemon": daemon, "live": live,
            "mint_as": lambda which: minter.read(f"identity/oidc/token/{roles[which][0]}")["data"]["token"],
            "mint_y": lambda: bot_y.read(f"identity/oidc/token/{setup.oidc_role}")["data"]["token"],
            "jwks": lambda: requests.get(f"{bao_server.addr}/v1/identity/oidc/.well-known/keys", timeout=5).json(),
        })
    finally:
        try:
            if live is not None:
                live.close()
            daemon.stop()
        finally:
            subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), "probes", "detach"],
                           cwd=ROOT, capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
            for name in (BOT_X, BOT_Y, ""):
                cgroups.remove(f"{BOTS}/{name}".rstrip("/"))


def _real_claims(env) -> tuple[dict, dict]:
    header, claims, _ = token_parts(env.bao.mint_token())
    return header, claims


def alg_none(env, other) -> tuple[str, str]:
    header, claims = _real_claims(env)
    return unsigned({"alg": "none", "kid": header["kid"]}, claims), "token algorithm 'none' is not allowed"


def hs256_with_the_issuers_public_key(env, other) -> tuple[str, str]:
    header, claims = _real_claims(env)
    public = next(k for k in env.jwks()["keys"] if k["kid"] == header["kid"])
    pem = jwk.import_key(public).as_pem(private=False)
    return (hs256_with_secret({"alg": "HS256", "kid": header["kid"]}, claims, pem),
            "token algorithm 'HS256' is not allowed")


def expired(env, other) -> tuple[str, str]:
    token = env.mint_as("short")
    exp = token_parts(token)[1]["exp"]
    time.sleep(max(0.0, exp - time.time()) + 1.1)
    return token, "token expired at"


def not_yet_valid(env, other) -> tuple[str, str]:
    return env.mint_as("future"), "token not valid before"


def wrong_audience(env, other) -> tuple[str, str]:
    return env.mint_as("audience"), "token audience ('bw-wrong-audience') is not"


def wrong_issuer(env, other) -> tuple[str, str]:
    return other.mint(), f"token issued by '{other.issuer}'"


def unknown_kid(env, other) -> tuple[str, str]:
    _, claims = _real_claims(env)
    forged = sign_with(jwk.RSAKey.generate_key(2048, private=True), {"alg": "RS256", "kid": "bw-forged-kid"}, claims)
    return forged, "the issuer publishes no key 'bw-forged-kid'"


@pytest.mark.parametrize("forge", [alg_none, hs256_with_the_issuers_public_key, expired, not_yet_valid,
                                   wrong_audience, wrong_issuer, unknown_kid], ids=lambda f: f.__name__)
def test_bad_token_is_refused_audited_and_harms_no_one(env, other_issuer, forge):
    token, reason = forge(env, other_issuer)
    bot = BotProcess(env.config, BOT_X, psql_argv(env.pg.port, "SELECT 'should not run'"), bot_env(token))
    code, out, err = bot.finish()
    assert code != 0 and out == "", (out, err)
    assert "FATAL:  botwarden refused the connection: " in err and reason in err, err
    row = wait_until(lambda: session_row(env.daemon, pid=bot.pid), 20, "the refused session's row")
    assert row["outcome"] == "refused" and reason in row["error"], row
    assert row["identity"] is None and row["credential_user"] is None and row["lease_id"] is None
    assert row["cgroup_path"] == f"/{BOTS}/{BOT_X}" and row["uid"] == 65534  # who tried, from the kernel
    signature = token.rsplit(".", 1)[1][-16:] or token.split(".")[1][-16:]
    assert signature not in json.dumps(row, default=str) and signature not in env.daemon.output()
    assert env.live.alive(), "another bot's open session was disturbed"


def test_token_of_identity_x_from_a_process_attested_as_y(env):
    """X's valid token, presented by a process in Y's cgroup: refused, and the row names whose
    token it was. Y's own token from the same place is accepted (the refusal is the binding)."""
    token_x = env.bao.mint_token()
    bot = BotProcess(env.config, BOT_Y, psql_argv(env.pg.port, "SELECT 'should not run'"), bot_env(token_x))
    code, out, err = bot.finish()
    reason = (f"process not allowed: cgroup /{BOTS}/{BOT_Y}, identity 'token-x' requires cgroup /{BOTS}/{BOT_X}")
    assert code != 0 and out == "" and reason in err, err
    row = wait_until(lambda: session_row(env.daemon, pid=bot.pid), 20, "the refused session's row")
    assert row["outcome"] == "refused" and reason in row["error"] and row["identity"] is None
    assert row["token_subject"] == env.bao.bot_entity_id() and row["cgroup_path"] == f"/{BOTS}/{BOT_Y}"
    assert env.live.alive()

    ok = BotProcess(env.config, BOT_Y, psql_argv(env.pg.port, "SELECT 'y ran'"), bot_env(env.mint_y()))
    code, out, err = ok.finish()
    assert code == 0 and out.strip() == "y ran", err
    row = wait_until(lambda: session_row(env.daemon, pid=ok.pid), 20, "Y's session row")
    assert row["outcome"] == "ok" and row["identity"] == "token-y"


def test_a_root_bot_with_a_valid_token_is_refused_by_uid_not(env):
    """`bot run --allow-privileged` lets a root bot start (marked privileged); the identity's
    ``uid_not = [0]`` still refuses its session."""
    ran = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(env.config), "bot", "run", "--name",
                          BOT_X, "--allow-privileged", "--", *psql_argv(env.pg.port, "SELECT 'should not run'")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **bot_env(env.bao.mint_token())})
    reason = "process not allowed: uid 0, identity 'token-x' requires uid not 0"
    assert ran.returncode != 0 and ran.stdout == "" and reason in ran.stderr, ran.stderr
    row = wait_until(lambda: env.daemon.audit_sql("SELECT * FROM sessions WHERE uid = 0 AND cgroup_path = ? AND "
                                                  "outcome <> 'open'", [f"/{BOTS}/{BOT_X}"]), 20, "the row")[-1]
    assert row["outcome"] == "refused" and reason in row["error"] and row["privileged"] is True
    assert row["token_subject"] == env.bao.bot_entity_id() and row["identity"] is None
    assert env.live.alive()


HUGE_PASSWORD_BOT = r"""
import json, socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 10)
s.settimeout(60)
params = b"user\0huge\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
def read_exactly(n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
def read_msg():
    head = read_exactly(5)
    return (None, b"") if head is None else (head[:1], read_exactly(struct.unpack("!i", head[1:])[0] - 4) or b"")
kind, _ = read_msg()
assert kind == b"R", kind
password = open(sys.argv[2], "rb").read() + b"\0"
s.sendall(b"p" + struct.pack("!i", 4 + len(password)) + password)
kind, body = read_msg()
fields = {p[:1].decode(): p[1:].decode() for p in body.split(b"\0") if p}
print(json.dumps({"type": kind.decode() if kind else None, "severity": fields.get("S"), "sqlstate": fields.get("C"),
                  "message": fields.get("M"), "closed": read_exactly(1) is None}), flush=True)
"""


def test_a_1_mb_password_field_is_refused_without_being_kept(env):
    marker = uuid.uuid4().hex
    # In a directory the bot (nobody) can read: pytest's tmp dirs are root's only.
    fd, name = tempfile.mkstemp(prefix="bw-advt-password-")
    os.close(fd)
    huge = Path(name)
    huge.write_text((marker + "x" * 1000) * (1024 * 1024 // 1032 + 1))  # ~1 MiB, the marker throughout
    os.chmod(huge, 0o644)
    assert huge.stat().st_size >= 1024 * 1024
    bot = BotProcess(env.config, BOT_X, [SYSTEM_PYTHON, "-c", HUGE_PASSWORD_BOT, str(env.pg.port), str(huge)])
    try:
        code, out, err = bot.finish()
    finally:
        huge.unlink()
    answer = json.loads(out or "null") or {}
    assert (answer["type"], answer["severity"], answer["sqlstate"]) == ("E", "FATAL", "28P01"), (answer, err)
    assert f"token longer than {MAX_TOKEN_BYTES} bytes" in answer["message"] and answer["closed"]
    row = wait_until(lambda: session_row(env.daemon, pid=bot.pid), 20, "the refused session's row")
    assert row["outcome"] == "refused" and f"token longer than {MAX_TOKEN_BYTES} bytes" in row["error"]
    assert marker not in json.dumps(row, default=str) and marker not in env.daemon.output()
    assert env.live.alive()


def test_valid_tokens_still_work_after_the_attacks(env):
    """After every refusal above: a new session of X starts, and the one open all along still works."""
    ok = BotProcess(env.config, BOT_X, psql_argv(env.pg.port, "SELECT 'x ran'"), bot_env(env.bao.mint_token()))
    code, out, err = ok.finish()
    assert code == 0 and out.strip() == "x ran", err
    assert env.live.alive()
    assert env.daemon.proc.poll() is None and env.daemon.client().get("/v1/status")["audit"]["healthy"]
