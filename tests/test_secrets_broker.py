"""Per-session credentials from a real OpenBao against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import hvac
import psycopg
import pytest

from appliance.config import CredentialSource, TargetConfig, VaultSettings
from appliance.secrets import SecretsBroker, SecretUnavailable
from tests.servers import SUPERUSER_PASSWORD, OpenBaoServer, PostgresServer, free_port


@dataclass
class VaultEnv:
    bao: OpenBaoServer
    pg: PostgresServer
    token_file: Path
    db_mount: str
    kv_path: str
    ssh_mount: str
    tmp: Path

    def settings(self, **kw) -> VaultSettings:
        return VaultSettings(address=self.bao.addr, token_file=str(self.token_file), **kw)

    def db_target(self, role: str = "session") -> TargetConfig:
        return TargetConfig(name="orders-db", protocol="postgres", address=f"127.0.0.1:{self.pg.port}",
                            credential=CredentialSource(source="database", mount=self.db_mount, role=role))

    def kv_target(self) -> TargetConfig:
        return TargetConfig(name="legacy-db", protocol="postgres", address=f"127.0.0.1:{self.pg.port}",
                            credential=CredentialSource(source="kv", path=self.kv_path))

    def write_kv(self, username: str, password: str) -> None:
        self.bao.client().secrets.kv.v2.create_or_update_secret(
            path=self.kv_path, secret={"username": username, "password": password})


def configure_vault(bao: OpenBaoServer, pg: PostgresServer, tmp: Path, *, default_ttl: int = 60) -> VaultEnv:
    """Database engine (PostgreSQL plugin), KV v2 and an SSH CA, configured through OpenBao's API."""
    root = bao.client()
    tag = uuid.uuid4().hex[:8]
    db_mount, ssh_mount = f"db-{tag}", f"ssh-{tag}"
    root.sys.enable_secrets_engine("database", path=db_mount)
    root.secrets.database.configure(
        name="pg", plugin_name="postgresql-database-plugin", allowed_roles=["*"],
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres?sslmode=require",
        username="postgres", password=SUPERUSER_PASSWORD, mount_point=db_mount)
    creation = ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                "GRANT pg_read_all_data TO \"{{name}}\";"]
    root.secrets.database.create_role("session", db_name="pg", creation_statements=creation,
                                      default_ttl=default_ttl, max_ttl=3600, mount_point=db_mount)
    root.secrets.database.create_role("short", db_name="pg", creation_statements=creation,
                                      default_ttl=4, max_ttl=10, mount_point=db_mount)
    root.sys.enable_secrets_engine("ssh", path=ssh_mount)
    root.write(f"{ssh_mount}/config/ca", generate_signing_key=True)
    root.write(f"{ssh_mount}/roles/bot", key_type="ca", allow_user_certificates=True, allowed_users="*",
               default_extensions={"permit-pty": ""}, ttl="10m")
    token_file = tmp / "vault-token"
    token_file.write_text(bao.root_token + "\n")
    env = VaultEnv(bao, pg, token_file, db_mount, f"bw-{tag}/app", ssh_mount, tmp)
    env.write_kv("app_v1", "kv-password-v1")
    return env


@pytest.fixture(scope="module")
def vault(bao_server, pg_server, tmp_path_factory) -> VaultEnv:
    return configure_vault(bao_server, pg_server, tmp_path_factory.mktemp("vault"))


def role_exists(pg: PostgresServer, name: str) -> bool:
    return pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "1"


def login(pg: PostgresServer, user: str, password: str) -> str:
    with psycopg.connect(host="127.0.0.1", port=pg.port, user=user, password=password, dbname="postgres",
                         sslmode="require", connect_timeout=5) as conn:
        return conn.execute("SELECT current_user").fetchone()[0]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_database_user_per_session_created_then_dropped(vault, monkeypatch):
    # Spy on hvac's HTTP adapter: no Vault request may run on the event loop's thread.
    threads: list[int] = []
    original = hvac.adapters.JSONAdapter.request

    def spy(self, *a, **kw):
        threads.append(threading.get_ident())
        return original(self, *a, **kw)

    monkeypatch.setattr(hvac.adapters.JSONAdapter, "request", spy)

    async def main():
        loop_thread = threading.get_ident()
        broker = SecretsBroker(vault.settings())
        await broker.start()
        try:
            a = await broker.acquire(vault.db_target(), "s-1")
            b = await broker.acquire(vault.db_target(), "s-2")
            assert a.username != b.username and a.password != b.password
            assert a.lease_id and a.lease_id.startswith(f"{vault.db_mount}/creds/session/")
            assert a.renewable and a.expires_at is not None
            assert dict(a.audit_fields) == {"credential_user": a.username, "lease_id": a.lease_id}
            assert role_exists(vault.pg, a.username)
            assert await asyncio.to_thread(login, vault.pg, a.username, a.password) == a.username
            await broker.release(a)
            assert not role_exists(vault.pg, a.username)
            assert role_exists(vault.pg, b.username)
        finally:
            await broker.close()
        # close() revokes what sessions left behind.
        assert not role_exists(vault.pg, b.username)
        return loop_thread

    loop_thread = run(main())
    assert threads and loop_thread not in threads


def test_kv_rotation_applies_to_the_next_session(vault):
    async def main():
        broker = SecretsBroker(vault.settings())
        await broker.start()
        try:
            vault.write_kv("app_v1", "kv-password-v1")
            first = await broker.acquire(vault.kv_target(), "s-1")
            vault.write_kv("app_v2", "kv-password-v2")
            second = await broker.acquire(vault.kv_target(), "s-2")
        finally:
            await broker.close()
        assert (first.username, first.password) == ("app_v1", "kv-password-v1")
        assert (second.username, second.password) == ("app_v2", "kv-password-v2")
        assert first.lease_id is None and dict(second.audit_fields) == {"credential_user": "app_v2"}

    run(main())


def test_static_source_reads_password_file_each_session(vault, tmp_path):
    pw = tmp_path / "pw"
    target = TargetConfig(name="static-db", protocol="postgres", address="127.0.0.1:5432",
                          credential=CredentialSource(source="static", username="svc", password_file=str(pw)))

    async def main():
        broker = SecretsBroker(vault.settings())  # static needs no Vault call, but shares the broker
        await broker.start()
        try:
            pw.write_text("first-secret\n")
            one = await broker.acquire(target, "s-1")
            pw.write_text("second-secret\n")
            two = await broker.acquire(target, "s-2")
            pw.unlink()
            with pytest.raises(SecretUnavailable) as err:
                await broker.acquire(target, "s-3")
        finally:
            await broker.close()
        assert (one.username, one.password, two.password) == ("svc", "first-secret", "second-secret")
        assert err.value.kind == "file" and str(pw) in err.value.message

    run(main())


def test_ssh_certificate_per_session(vault):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_identity

    target = TargetConfig(name="web-1", protocol="ssh", address="127.0.0.1:22",
                          credential=CredentialSource(source="ssh", mount=vault.ssh_mount, role="bot",
                                                      principals=("deploy", "www")))
    mine = Ed25519PrivateKey.generate()
    my_pub = mine.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)

    async def main():
        broker = SecretsBroker(vault.settings())
        await broker.start()
        try:
            given = await broker.acquire(target, "s-1", public_key=my_pub.decode())
            made = await broker.acquire(target, "s-2")
        finally:
            await broker.close()
        return given, made

    given, made = run(main())
    cert = load_ssh_public_identity(given.cert.encode())
    assert [p.decode() for p in cert.valid_principals] == ["deploy", "www"]
    assert cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == \
        mine.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert given.username == "deploy" and given.private_key is None and given.expires_at is not None
    assert int(given.expires_at.timestamp()) == cert.valid_before
    # Without a public key the broker makes the pair and hands back the private half.
    made_cert = load_ssh_public_identity(made.cert.encode())
    made_key = load_ssh_private_key(made.private_key.encode(), None)
    assert made_cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == \
        made_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert "BEGIN" not in repr(made)


def test_lease_renewed_while_session_lasts_then_max_ttl_ends_it(vault):
    # Role "short": 4 s leases, 10 s max TTL.
    async def main():
        broker = SecretsBroker(vault.settings(), lease_end_margin_s=1.0)
        await broker.start()
        try:
            cred = await broker.acquire(vault.db_target("short"), "s-1")
            await asyncio.sleep(5.5)  # past the first lease: only renewal keeps the user alive
            assert role_exists(vault.pg, cred.username)
            assert await asyncio.to_thread(login, vault.pg, cred.username, cred.password) == cred.username
            assert not cred.ended
            message = await asyncio.wait_for(cred.wait_ended(), 15)
            assert cred.watch.reason == "max_ttl"
            assert "maximum TTL" in message and "orders-db" in message
            await broker.release(cred)
            assert not role_exists(vault.pg, cred.username)
        finally:
            await broker.close()

    run(main())


def test_vault_stopped_mid_run(pg_server, tmp_path):
    # A second, private OpenBao: stopping the shared one would break other tests.
    bao = OpenBaoServer(root_token="bw-second-root").start()
    stopped = False
    leftover = None
    try:
        env = configure_vault(bao, pg_server, tmp_path, default_ttl=4)
        env.write_kv("cached_user", "cached-password")

        async def main():
            nonlocal stopped, leftover
            strict = SecretsBroker(env.settings(timeout=2), lease_end_margin_s=1.0)
            lenient = SecretsBroker(env.settings(timeout=2, max_staleness_s=3600))
            await strict.start()
            await lenient.start()
            await lenient.acquire(env.kv_target(), "warm-cache")
            cred = await strict.acquire(env.db_target(), "s-1")
            leftover = cred.username
            bao.stop()
            stopped = True
            for target in (env.db_target(), env.kv_target()):
                with pytest.raises(SecretUnavailable) as err:
                    await strict.acquire(target, "s-2")
                assert err.value.kind == "unreachable"
                assert bao.addr in err.value.message and "unreachable" in err.value.message
                assert target.name in err.value.message
            stale = await lenient.acquire(env.kv_target(), "s-3")
            assert (stale.username, stale.password) == ("cached_user", "cached-password")
            assert stale.audit_fields["credential_stale_s"] >= 0
            # The session that already holds a credential keeps working until its lease ends.
            assert await asyncio.to_thread(login, pg_server, cred.username, cred.password) == cred.username
            message = await asyncio.wait_for(cred.wait_ended(), 20)
            assert cred.watch.reason == "lease_expired" and "could not be renewed" in message
            # Nobody can revoke it now; PostgreSQL itself stops the password at VALID UNTIL, which the
            # database engine sets a few seconds past the lease's end.
            valid_until = float(pg_server.psql(
                f"SELECT extract(epoch FROM rolvaliduntil) FROM pg_roles WHERE rolname = '{cred.username}'"))
            await asyncio.sleep(max(valid_until - time.time(), 0) + 1)
            with pytest.raises(psycopg.OperationalError):
                await asyncio.to_thread(login, pg_server, cred.username, cred.password)
            await strict.release(cred)  # Vault is gone: logged, not raised
            await strict.close(revoke_outstanding=False)
            await lenient.close()

        run(main())
    finally:
        if not stopped:
            bao.stop()
        if leftover:
            pg_server.psql(f'DROP ROLE IF EXISTS "{leftover}"')


def test_approle_login_and_token_renewal(vault, bao_server, caplog):
    caplog.set_level(logging.DEBUG)
    root = bao_server.client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    name = f"bw-broker-{uuid.uuid4().hex[:6]}"
    root.sys.create_or_update_policy(name, f'path "secret/data/{vault.kv_path}" {{ capabilities = ["read"] }}')
    # Short TTLs so renewal and re-login (at max TTL) both happen within the test.
    root.auth.approle.create_or_update_approle(name, token_policies=[name], token_ttl="2s", token_max_ttl="5s")
    role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
    secret_file = vault.tmp / f"{name}.secret"
    secret_file.write_text(root.auth.approle.generate_secret_id(name)["data"]["secret_id"])
    settings = VaultSettings(address=bao_server.addr, auth="approle", role_id=role_id,
                             secret_id_file=str(secret_file))

    async def main():
        broker = SecretsBroker(settings)
        await broker.start()
        try:
            assert broker.logins == 1 and broker.token_ttl == 2
            await asyncio.sleep(7)  # past the token's max TTL
            cred = await broker.acquire(vault.kv_target(), "s-1")
            assert cred.username
            assert broker.token_renewals >= 1 and broker.logins >= 2
            with pytest.raises(SecretUnavailable) as err:  # the policy allows the KV path only
                await broker.acquire(vault.db_target(), "s-2")
            assert err.value.kind == "forbidden" and "forbids" in err.value.message
            return broker._token
        finally:
            await broker.close()

    last_token = run(main())
    secret_id = secret_file.read_text()
    for record in caplog.records:
        assert secret_id not in record.getMessage() and last_token not in record.getMessage()


def test_forbidden_and_unreachable_are_clear(vault, tmp_path):
    weak = vault.bao.client().auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    weak_file = tmp_path / "weak-token"
    weak_file.write_text(weak)

    async def main():
        broker = SecretsBroker(VaultSettings(address=vault.bao.addr, token_file=str(weak_file)))
        await broker.start()
        try:
            with pytest.raises(SecretUnavailable) as err:
                await broker.acquire(vault.kv_target(), "s-1")
        finally:
            await broker.close()
        assert err.value.kind == "forbidden"
        assert "forbids reading KV secret" in err.value.message and "'legacy-db'" in err.value.message
        assert weak not in err.value.message
        dead = SecretsBroker(VaultSettings(address=f"http://127.0.0.1:{free_port()}", token_file=str(weak_file),
                                           timeout=2))
        with pytest.raises(SecretUnavailable) as err:
            await dead.start()
        assert err.value.kind == "unreachable" and "connection refused" in err.value.message

    run(main())


def test_no_secret_in_repr_logs_or_audit(vault, caplog):
    caplog.set_level(logging.DEBUG)

    async def main():
        broker = SecretsBroker(vault.settings())
        await broker.start()
        try:
            db = await broker.acquire(vault.db_target(), "s-1")
            kv = await broker.acquire(vault.kv_target(), "s-2")
            await broker.release(db)
            await broker.release(kv)
        finally:
            await broker.close()
        return db, kv

    vault.write_kv("app_v3", "kv-password-v3")
    db, kv = run(main())
    secrets = [db.password, kv.password, vault.bao.root_token]
    texts = [r.getMessage() for r in caplog.records] + [repr(db), repr(kv), str(dict(db.audit_fields)),
                                                          str(dict(kv.audit_fields))]
    assert any(db.username in t for t in texts)  # the username is logged, so the check below is meaningful
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_lease_revoked_in_vault_ends_the_session(vault):
    # An operator revoking the lease (a kill switch) ends the session at the next renewal.
    async def main():
        broker = SecretsBroker(vault.settings())
        await broker.start()
        try:
            cred = await broker.acquire(vault.db_target("short"), "s-1")
            await asyncio.to_thread(vault.bao.client().sys.revoke_lease, cred.lease_id)
            assert not role_exists(vault.pg, cred.username)
            message = await asyncio.wait_for(cred.wait_ended(), 15)
            assert cred.watch.reason == "revoked" and "revoked in Vault" in message
            await broker.release(cred)
        finally:
            await broker.close()

    run(main())
