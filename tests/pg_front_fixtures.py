"""Helpers for the PostgreSQL front tests: the front on its own event loop thread, roles, a test CA."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import uvloop

from appliance.config import parse_config
from appliance.fronts.postgres import PgFrontSettings, PostgresFront
from appliance.fronts.services import Credential, DefaultServices, HoldOutcome
from appliance.policy import PolicyEngine, SqlSessionState

APP_USER = "bw_app"
APP_PASSWORD = "bw-app-secret-pw"
MD5_USER, MD5_PASSWORD = "bw_md5", "bw-md5-secret-pw"
CLEAR_USER, CLEAR_PASSWORD = "bw_clear", "bw-clear-secret-pw"
BOT_TOKEN = "bot-oidc-token-abc123"
# The target and identity of EngineServices' policies (their rules follow).
POLICY_HEAD = """
[[targets]]
name = "pg-test"
protocol = "postgres"
address = "127.0.0.1:5432"
authentication = "attestation"

[[identities]]
name = "test-bot"
[identities.process]
uid = 1000
"""


def setup_roles(pg) -> None:
    """Roles the front logs in as (scram, md5, cleartext) and a small data set."""
    if pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{APP_USER}'") == "1":
        return
    pg.psql(f"CREATE ROLE {APP_USER} LOGIN SUPERUSER PASSWORD '{APP_PASSWORD}'")
    pg.psql(f"SET password_encryption = 'md5'; CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'")
    pg.psql(f"CREATE ROLE {CLEAR_USER} LOGIN PASSWORD '{CLEAR_PASSWORD}'")
    pg.psql("CREATE TABLE people (id int primary key, name text, email text, salary int, note varchar(40))")
    pg.psql("INSERT INTO people SELECT i, 'name' || i, 'user' || i || '@example.com', 1000 * i, "
            "CASE WHEN i % 2 = 0 THEN NULL ELSE 'n' || i END FROM generate_series(1, 50) i")
    pg.psql(f"GRANT ALL ON people TO {MD5_USER}, {CLEAR_USER}")


def make_ca(tmp: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A CA and a server certificate it signed, for the front's bot-side TLS."""
    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, cwd=tmp)

    run("openssl", "req", "-new", "-x509", "-days", "2", "-nodes", "-subj", "/CN=bw-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("openssl", "req", "-new", "-nodes", "-subj", "/CN=botwarden-front", "-keyout", "front.key",
        "-out", "front.csr")
    (tmp / "ext.cnf").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "front.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "front.crt")
    return {"ca": tmp / "ca.crt", "cert": tmp / "front.crt", "key": tmp / "front.key"}


class FrontThread:
    """A PostgresFront serving on 127.0.0.1 from its own uvloop thread."""

    def __init__(self, settings: PgFrontSettings, services: Any):
        self.settings = settings
        self.services = services
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="pg-front")
        self.thread.start()
        self.front = PostgresFront(settings, services)
        server = self.call(self.front.serve("127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def soon(self, fn: Callable, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def dsn(self, *, user: str = "bot", password: str | None = BOT_TOKEN, db: str = "postgres",
            sslmode: str = "disable", **extra: str) -> str:
        parts = [f"host=127.0.0.1 port={self.port} dbname={db} user={user} sslmode={sslmode}"]
        if password is not None:
            parts.append(f"password={password}")
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.front.close(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def direct_connect(pg) -> "psycopg.Connection":
    """Straight to the server as the application user (what a statement gives away without botwarden)."""
    import psycopg
    return psycopg.connect(host=pg.host, port=pg.port, user=APP_USER, password=APP_PASSWORD, dbname="postgres",
                           sslmode="disable", autocommit=True)


def plain_settings(pg, **kw) -> PgFrontSettings:
    base = PgFrontSettings(target="pg-test", upstream_host=pg.host, upstream_port=pg.port, upstream_tls="require",
                           allow_plaintext=True)
    return replace(base, **kw)


def default_services(**kw) -> DefaultServices:
    return DefaultServices(Credential(APP_USER, APP_PASSWORD), **kw)


class EngineServices(DefaultServices):
    """The front's services with the real policy engine deciding (``policy``: a config's TOML),
    per-session SQL state kept as the daemon's runtime keeps it, masking as the runtime asks
    the engine for it; holds end as ``approve`` says (no operator in these tests)."""

    def __init__(self, policy: str, user: str = APP_USER, password: str = APP_PASSWORD, *, approve: bool = False):
        super().__init__(Credential(user, password))
        cfg = parse_config(policy)
        self.engine = PolicyEngine(cfg.policy, cfg.targets, cfg.identities)
        self.sessions: dict[str, SqlSessionState] = {}
        self.approve = approve

    def decide_sql(self, grant, target, sql, phase, *, probe=False):
        state = self.sessions.setdefault(grant.session_id, SqlSessionState())
        return self.engine.decide_sql(grant.identity, grant.groups, target, sql,
                                      session=state.copy() if probe else state)

    def catalog_lookup(self, grant, target):
        return self.engine.catalog_lookup(grant.identity, grant.groups, target)

    def learn_catalog(self, grant, views, functions, effects):
        self.engine.learn_catalog(self.sessions.setdefault(grant.session_id, SqlSessionState()), views, functions,
                                  effects)

    def mask_plan(self, grant, target, verdict, columns):
        return self.engine.mask_plan(grant.identity, grant.groups, target, verdict, columns)

    def message_masker(self, grant, target, verdict):
        return self.engine.message_masker(verdict)

    async def hold(self, grant, target, request_text, verdict, notify, request_id=None, detail=None):
        if not self.approve:
            return await super().hold(grant, target, request_text, verdict, notify, request_id, detail)
        approval_id = uuid.uuid4().hex
        notify(approval_id)
        await asyncio.sleep(0)
        return HoldOutcome(True, approval_id, "approved by the test", "tester", "approved")
