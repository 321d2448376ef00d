"""The credential a session uses upstream, fetched from Vault/OpenBao at session start.

hvac is synchronous: every call goes through :meth:`SecretsBroker._call`, which runs it in a
worker thread (``asyncio.to_thread``) with a per-thread hvac client, and turns hvac/requests
errors into :class:`SecretUnavailable` with a message naming what failed — never a secret.

Per target ``credential.source``:

- ``kv``: KV v2 read at every session start, so a rotated secret applies to the next session;
- ``database``: a dynamic user per session; its lease is renewed while the session lasts and
  revoked when it ends; when the lease cannot be renewed any further (max TTL, or Vault gone
  until the lease runs out) :meth:`SessionCredential.wait_ended` returns the reason the session
  must end;
- ``ssh``: an OpenSSH user certificate per session, for a public key the caller passes (or for
  a fresh Ed25519 key the broker makes and returns);
- ``static``: the configured username and the password read from ``password_file``.

The broker's own token (AppRole login or a token file) is renewed by a background task; when it
cannot be renewed (max TTL), AppRole logs in again and a token file is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar

import hvac
import hvac.exceptions
import requests

from appliance.config import CredentialSource, TargetConfig, VaultSettings
from appliance.errors import BotwardenError
from appliance.secrets.ledger import LeaseLedger

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MOUNTS = {"kv": "secret", "database": "database", "ssh": "ssh", "kubernetes": "kubernetes"}

# A lease Vault could not revoke is tried again after 1 s, 2 s, 4 s, ... at most a minute apart.
REVOKE_RETRY_FIRST_S = 1.0
REVOKE_RETRY_MAX_S = 60.0


class SecretUnavailable(BotwardenError):
    """No credential for this session. ``kind``: 'unreachable' | 'sealed' | 'forbidden' |
    'missing' | 'invalid' | 'file'. The message names Vault's address and what was asked, never a secret."""

    def __init__(self, message: str, kind: str = "invalid"):
        self.kind = kind
        self.message = message
        super().__init__(message)


EndReason = Literal["max_ttl", "lease_expired", "revoked"]


class LeaseWatch:
    """Set once when a credential's lease can no longer keep the session alive."""

    def __init__(self) -> None:
        self._ended = asyncio.Event()
        self.reason: EndReason | None = None
        self.message: str | None = None

    def end(self, reason: EndReason, message: str) -> None:
        if not self._ended.is_set():
            self.reason, self.message = reason, message
            self._ended.set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def wait(self) -> str:
        await self._ended.wait()
        assert self.message is not None
        return self.message


@dataclass(frozen=True)
class SessionCredential:
    """What the front logs in upstream with. ``repr`` never shows the password or private key."""

    username: str
    password: str | None = field(repr=False)
    lease_id: str | None
    expires_at: datetime | None
    renewable: bool
    cert: str | None = None  # OpenSSH user certificate (ssh source)
    private_key: str | None = field(default=None, repr=False)  # when the broker made the key pair
    audit_fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    target: str = ""
    session_id: str = ""
    source: str = ""
    watch: LeaseWatch | None = field(default=None, repr=False, compare=False)

    async def wait_ended(self) -> str:
        """Returns (with a message for the bot) when the session must end because its credential
        lease ends; never returns for credentials without a lease — cancel the waiting task."""
        if self.watch is None:
            await asyncio.Event().wait()
        assert self.watch is not None
        return await self.watch.wait()

    @property
    def ended(self) -> bool:
        return self.watch is not None and self.watch.ended


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class PendingRevocation:
    """A lease botwarden tried to revoke and could not yet: retried until Vault confirms."""

    lease_id: str
    session_id: str | None
    since: datetime
    first_error: str
    last_error: str
    attempts: int = 1
    next_try: datetime | None = None

    def public(self) -> dict[str, Any]:
        return {"lease_id": self.lease_id, "session_id": self.session_id, "since": self.since.isoformat(),
                "attempts": self.attempts, "last_error": self.last_error,
                "next_try": self.next_try.isoformat() if self.next_try else None}


def _vault_errors(e: hvac.exceptions.VaultError) -> str:
    errors = [str(x).strip() for x in (e.errors or []) if str(x).strip()]
    text = "; ".join(errors)[:300]
    return text or type(e).__name__


class SecretsBroker:
    """Fetches, renews and revokes per-session credentials. Use from one event loop:
    ``await broker.start()`` … ``await broker.acquire(target, session_id)`` … ``await broker.close()``."""

    def __init__(self, settings: VaultSettings, *, lease_end_margin_s: float = 2.0,
                 ledger: LeaseLedger | None = None,
                 on_revoked_late: Callable[[PendingRevocation], None] | None = None):
        self.settings = settings
        # Every lease held and not yet revoked, on disk (kill -9 forgets nothing); None: memory only.
        self.ledger = ledger
        self.on_revoked_late = on_revoked_late
        self._pending: dict[str, PendingRevocation] = {}
        self._retries: dict[str, asyncio.Task] = {}
        self._local = threading.local()
        self._token: str | None = None
        self._token_period = 0  # the TTL a renewal asks for: the login's lease or the token's creation TTL
        self._token_lock = threading.Lock()
        self.token_ttl: int = 0  # seconds left on our own token at the last login/renewal; 0 = no expiry
        self.token_renewable = False
        self.logins = 0
        self.token_renewals = 0
        self._lease_end_margin_s = lease_end_margin_s
        self._renewer: asyncio.Task | None = None
        self._keepers: dict[str, asyncio.Task] = {}  # lease_id -> task
        self._kv_cache: dict[tuple[str, str], tuple[str, str | None, int | None, float]] = {}

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Authenticate (fail early when Vault is unreachable or refuses) and start renewing."""
        await asyncio.to_thread(self._login)
        self._renewer = asyncio.create_task(self._renew_token_loop(), name="botwarden-vault-token-renewal")

    async def close(self, *, revoke_outstanding: bool = True) -> None:
        if self._renewer:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        leases = list(self._keepers)
        for task in [*self._keepers.values(), *self._retries.values()]:
            task.cancel()
        await asyncio.gather(*self._keepers.values(), *self._retries.values(), return_exceptions=True)
        self._keepers.clear()
        self._retries.clear()  # their leases stay in the ledger: the next start revokes them
        if revoke_outstanding:
            for lease_id in leases:
                try:
                    await self._call(f"revoking lease {lease_id}",
                                     lambda c, lid=lease_id: c.sys.revoke_lease(lid))
                except SecretUnavailable as e:
                    log.warning("lease %s not revoked at shutdown (%s); %s", lease_id, e.message,
                                "the next start revokes it" if self.ledger else "it ends at its TTL")
                    continue
                await self._forget(lease_id)

    # -- sessions ---------------------------------------------------------------------------

    async def acquire(self, target: TargetConfig, session_id: str, *,
                      public_key: str | None = None) -> SessionCredential:
        """The credential for one session on ``target``. Raises :class:`SecretUnavailable`."""
        source = target.credential
        if source is None:
            raise SecretUnavailable(f"target {target.name!r} has no credential source configured", "invalid")
        if source.source == "static":
            cred = await self._static(target, source, session_id)
        elif source.source == "kv":
            cred = await self._kv(target, source, session_id)
        elif source.source == "database":
            cred = await self._database(target, source, session_id)
        elif source.source == "kubernetes":
            cred = await self._kubernetes(target, source, session_id)
        else:
            cred = await self._ssh(target, source, session_id, public_key)
        log.info("credential for session %s on target %r: user %r, source %s, lease %s",
                 session_id, target.name, cred.username, source.source, cred.lease_id or "-")
        return cred

    async def release(self, cred: SessionCredential) -> str | None:
        """End of session: stop renewing and revoke the lease (the database user is dropped).
        A Vault that cannot be reached is not raised: the lease stays in the ledger, revocation is
        retried with back-off (:meth:`pending_revocations`), and the reason is returned."""
        if not cred.lease_id:
            return None
        task = self._keepers.pop(cred.lease_id, None)
        if task:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            await self._call(f"revoking lease {cred.lease_id}", lambda c: c.sys.revoke_lease(cred.lease_id))
        except SecretUnavailable as e:
            log.warning("lease %s of session %s not revoked (%s); retrying with back-off",
                        cred.lease_id, cred.session_id, e.message)
            self._retry_later(cred.lease_id, cred.session_id, e.message)
            return e.message
        await self._forget(cred.lease_id)
        if cred.watch:
            cred.watch.end("revoked", f"botwarden: the credential for target {cred.target!r} was revoked")
        log.info("revoked lease %s of session %s", cred.lease_id, cred.session_id)
        return None

    async def revoke_orphans(self, lease_ids: Iterable[str],
                             session_of: Mapping[str, str] | None = None) -> dict[str, str | None]:
        """Revoke leases a previous run left behind (kill -9, crash): one attempt each now, then
        with back-off. Returns, per lease, None (revoked) or why not yet."""
        results: dict[str, str | None] = {}
        for lease_id in lease_ids:
            try:
                await self._call(f"revoking orphan lease {lease_id}",
                                 lambda c, lid=lease_id: c.sys.revoke_lease(lid))
            except SecretUnavailable as e:
                self._retry_later(lease_id, (session_of or {}).get(lease_id), e.message)
                results[lease_id] = e.message
                continue
            await self._forget(lease_id)
            log.info("revoked lease %s left behind by the last run", lease_id)
            results[lease_id] = None
        return results

    def pending_revocations(self) -> list[dict[str, Any]]:
        return [p.public() for p in self._pending.values()]

    async def _forget(self, lease_id: str) -> None:
        if self.ledger is not None:
            try:
                await asyncio.to_thread(self.ledger.remove, lease_id)
            except OSError as e:  # the lease is revoked; the next start's sweep finds nothing to do
                log.error("lease %s revoked but not removed from the ledger: %s", lease_id, e)

    def _retry_later(self, lease_id: str, session_id: str | None, error: str) -> None:
        if lease_id in self._retries:
            return
        self._pending[lease_id] = PendingRevocation(lease_id, session_id, _now(), error, error)
        self._retries[lease_id] = asyncio.get_running_loop().create_task(
            self._retry_revoke(self._pending[lease_id]), name=f"botwarden-revoke-{lease_id}")

    async def _retry_revoke(self, pending: PendingRevocation) -> None:
        delay = REVOKE_RETRY_FIRST_S
        try:
            while True:
                pending.next_try = _now() + timedelta(seconds=delay)
                await asyncio.sleep(delay)
                pending.attempts += 1
                try:
                    await self._call(f"revoking lease {pending.lease_id} (attempt {pending.attempts})",
                                     lambda c: c.sys.revoke_lease(pending.lease_id))
                except SecretUnavailable as e:
                    pending.last_error = e.message
                    delay = min(delay * 2, REVOKE_RETRY_MAX_S)
                    log.warning("lease %s still not revoked after %d attempts (%s); next try in %gs",
                                pending.lease_id, pending.attempts, e.message, delay)
                    continue
                break
        finally:
            self._retries.pop(pending.lease_id, None)
        # Off the ledger first: once status lists no pending revocation, the file lists none either.
        await self._forget(pending.lease_id)
        self._pending.pop(pending.lease_id, None)
        log.info("revoked lease %s of session %s after %d attempts", pending.lease_id, pending.session_id,
                 pending.attempts)
        if self.on_revoked_late is not None:
            try:
                self.on_revoked_late(pending)
            except Exception:  # a hook that fails is logged; the lease is revoked
                log.exception("reporting the late revocation of lease %s failed", pending.lease_id)

    # -- sources ----------------------------------------------------------------------------

    async def _static(self, target: TargetConfig, source: CredentialSource, sid: str) -> SessionCredential:
        assert source.username
        password = None
        if source.password_file:
            password = await asyncio.to_thread(_read_secret_file, source.password_file,
                                               f"credential.password_file of target {target.name!r}")
        return SessionCredential(username=source.username, password=password, lease_id=None, expires_at=None,
                                 renewable=False, target=target.name, session_id=sid, source="static",
                                 audit_fields=MappingProxyType({"credential_user": source.username}))

    async def _kv(self, target: TargetConfig, source: CredentialSource, sid: str) -> SessionCredential:
        mount = source.mount or DEFAULT_MOUNTS["kv"]
        assert source.path
        key = (mount, source.path)
        what = f"reading KV secret {mount}/{source.path} for target {target.name!r}"
        try:
            resp = await self._call(what, lambda c: c.secrets.kv.v2.read_secret_version(
                path=source.path, mount_point=mount, raise_on_deleted_version=True))
        except SecretUnavailable as e:
            cached = self._kv_cache.get(key)
            limit = self.settings.max_staleness_s
            if e.kind in ("unreachable", "sealed") and cached and limit > 0:
                age = time.monotonic() - cached[3]
                if age <= limit:
                    username, password, version, _ = cached
                    log.warning("Vault unavailable; using the KV secret for target %r cached %.0fs ago "
                                "(vault.max_staleness_s = %d)", target.name, age, limit)
                    return SessionCredential(
                        username=username, password=password, lease_id=None, expires_at=None, renewable=False,
                        target=target.name, session_id=sid, source="kv",
                        audit_fields=MappingProxyType({"credential_user": username,
                                                       "credential_stale_s": round(age, 1)}))
            raise
        data = resp.get("data", {}).get("data") or {}
        version = resp.get("data", {}).get("metadata", {}).get("version")
        username = data.get(source.username_key) or source.username
        password = data.get(source.password_key)
        if not username:
            raise SecretUnavailable(f"KV secret {mount}/{source.path} for target {target.name!r} has no "
                                    f"{source.username_key!r} key and credential.username is not set", "missing")
        if password is None:
            raise SecretUnavailable(f"KV secret {mount}/{source.path} for target {target.name!r} has no "
                                    f"{source.password_key!r} key", "missing")
        if target.protocol == "ssh":
            # An SSH target's KV secret holds a private key (under password_key, e.g. "private_key")
            # and optionally its certificate ("certificate"); never cached past Vault's answer.
            return SessionCredential(username=str(username), password=None, lease_id=None, expires_at=None,
                                     renewable=False, target=target.name, session_id=sid, source="kv",
                                     private_key=str(password), cert=data.get("certificate") or None,
                                     audit_fields=MappingProxyType({"credential_user": str(username)}))
        self._kv_cache[key] = (str(username), str(password), version, time.monotonic())
        return SessionCredential(username=str(username), password=str(password), lease_id=None, expires_at=None,
                                 renewable=False, target=target.name, session_id=sid, source="kv",
                                 audit_fields=MappingProxyType({"credential_user": str(username)}))

    async def _database(self, target: TargetConfig, source: CredentialSource, sid: str) -> SessionCredential:
        mount = source.mount or DEFAULT_MOUNTS["database"]
        assert source.role
        resp = await self._call(f"creating a database user from {mount}/creds/{source.role} for target {target.name!r}",
                                lambda c: c.secrets.database.generate_credentials(name=source.role, mount_point=mount))
        data = resp.get("data") or {}
        if not data.get("username") or not resp.get("lease_id"):
            raise SecretUnavailable(f"{mount}/creds/{source.role} returned no username/lease for target "
                                    f"{target.name!r}", "invalid")
        return await self._leased(target, sid, resp, data["username"], data.get("password"), "database")

    async def _kubernetes(self, target: TargetConfig, source: CredentialSource, sid: str) -> SessionCredential:
        """A service-account token from OpenBao's kubernetes secrets engine (TokenRequest API):
        the session's bearer token upstream, its lease revoked when the session ends."""
        mount = source.mount or DEFAULT_MOUNTS["kubernetes"]
        assert source.role and source.kubernetes_namespace
        resp = await self._call(
            f"creating a service-account token from {mount}/creds/{source.role} for target {target.name!r}",
            lambda c: c.write(f"{mount}/creds/{source.role}", kubernetes_namespace=source.kubernetes_namespace))
        data = (resp or {}).get("data") or {}
        if not data.get("service_account_token") or not resp.get("lease_id"):
            raise SecretUnavailable(f"{mount}/creds/{source.role} returned no token/lease for target "
                                    f"{target.name!r}", "invalid")
        account = f"system:serviceaccount:{data.get('service_account_namespace')}:{data.get('service_account_name')}"
        return await self._leased(target, sid, resp, account, data["service_account_token"], "kubernetes")

    async def _leased(self, target: TargetConfig, sid: str, resp: dict, username: str, password: str | None,
                      source_name: str) -> SessionCredential:
        """A credential with a lease: in the ledger before use, renewed at half-life, ended with it."""
        lease_id, duration = resp["lease_id"], int(resp.get("lease_duration") or 0)
        expires_at = _now() + timedelta(seconds=duration) if duration else None
        if self.ledger is not None:
            try:  # on disk before the credential is used: a crash from here on forgets nothing
                await asyncio.to_thread(self.ledger.add, lease_id)
            except OSError as e:
                with contextlib.suppress(SecretUnavailable):
                    await self._call(f"revoking lease {lease_id}", lambda c: c.sys.revoke_lease(lease_id))
                raise SecretUnavailable(f"cannot record lease of target {target.name!r} in "
                                        f"{self.ledger.path}: {e.strerror}", "file") from None
        watch = LeaseWatch()
        cred = SessionCredential(
            username=username, password=password, lease_id=lease_id, expires_at=expires_at,
            renewable=bool(resp.get("renewable")), target=target.name, session_id=sid, source=source_name,
            watch=watch, audit_fields=MappingProxyType({"credential_user": username, "lease_id": lease_id}))
        if duration:
            self._keepers[lease_id] = asyncio.create_task(self._keep_lease(cred, duration),
                                                          name=f"botwarden-lease-{lease_id}")
        return cred

    async def _ssh(self, target: TargetConfig, source: CredentialSource, sid: str,
                   public_key: str | None) -> SessionCredential:
        mount = source.mount or DEFAULT_MOUNTS["ssh"]
        assert source.role
        principals = source.principals or ((source.username,) if source.username else ())
        if not principals:
            raise SecretUnavailable(f"target {target.name!r}: credential.principals (or username) is required for "
                                    "ssh certificates; without it the certificate would carry none", "invalid")
        private_key = None
        if public_key is None:
            public_key, private_key = await asyncio.to_thread(_ed25519_pair)
        resp = await self._call(
            f"signing an SSH certificate with {mount}/sign/{source.role} for target {target.name!r}",
            # Not hvac's sign_ssh_key: it always sends ttl="", which OpenBao reads as "no TTL asked"
            # and signs for the mount's max TTL (32 days), ignoring the role's ttl.
            lambda c: c.write(f"{mount}/sign/{source.role}", public_key=public_key,
                              valid_principals=",".join(principals)))
        data = resp.get("data") or {}
        cert = data.get("signed_key")
        if not cert:
            raise SecretUnavailable(f"{mount}/sign/{source.role} returned no certificate for target {target.name!r}",
                                    "invalid")
        expires_at, serial = _cert_facts(cert)
        username = source.username or principals[0]
        audit = {"credential_user": username}
        return SessionCredential(username=username, password=None, lease_id=None, expires_at=expires_at,
                                 renewable=False, cert=cert.strip(), private_key=private_key, target=target.name,
                                 session_id=sid, source="ssh", audit_fields=MappingProxyType(audit))

    # -- lease keeping ----------------------------------------------------------------------

    async def _keep_lease(self, cred: SessionCredential, increment: int) -> None:
        """Renew at half-life; when Vault caps the TTL (max TTL) or cannot be reached until the
        lease runs out, tell the session to end shortly before the lease does."""
        assert cred.watch is not None and cred.lease_id is not None
        expires = time.monotonic() + increment
        capped = not cred.renewable
        failures = 0
        margin = min(self._lease_end_margin_s, increment / 4)
        while True:
            left = expires - time.monotonic()
            if capped or left <= margin:
                if left > margin:
                    await asyncio.sleep(left - margin)
                if capped:
                    cred.watch.end("max_ttl", f"botwarden: the credential lease for target {cred.target!r} reached "
                                              f"its maximum TTL and cannot be renewed; the session ends")
                else:
                    cred.watch.end("lease_expired", f"botwarden: the credential lease for target {cred.target!r} "
                                                    "could not be renewed (Vault unavailable) and expires; "
                                                    "the session ends")
                return
            await asyncio.sleep(max(min(left / 2, left - margin), 0.1) if failures == 0
                                else min(2.0, max((left - margin) / 2, 0.1)))
            try:
                resp = await self._call(f"renewing lease {cred.lease_id}",
                                        lambda c: c.sys.renew_lease(lease_id=cred.lease_id, increment=increment))
            except SecretUnavailable as e:
                if e.kind == "invalid" and "lease not found" in e.message:
                    # Revoked in Vault (an operator's kill switch, or the engine gave up): the user is gone.
                    cred.watch.end("revoked", f"botwarden: the credential lease for target {cred.target!r} was "
                                              "revoked in Vault; the session ends")
                    return
                failures += 1
                log.warning("renewing lease %s of session %s failed (%s); retrying until it expires",
                            cred.lease_id, cred.session_id, e.message)
                continue
            failures = 0
            duration = int(resp.get("lease_duration") or 0)
            expires = time.monotonic() + duration
            # Vault caps a renewal at the role's max TTL: a shorter grant than asked means this is the last.
            if duration < increment or not resp.get("renewable", True):
                capped = True
                log.info("lease %s of session %s reaches its max TTL in %ds", cred.lease_id, cred.session_id,
                         duration)

    # -- our own token ----------------------------------------------------------------------

    def _login(self) -> None:
        s = self.settings
        if s.auth == "approle":
            assert s.role_id and s.secret_id_file
            secret_id = _read_secret_file(s.secret_id_file, "vault.secret_id_file")
            client = hvac.Client(url=s.address, timeout=s.timeout, verify=s.ca_file or True)
            auth = self._guard(f"logging in with AppRole at {s.approle_mount}",
                               lambda: client.auth.approle.login(role_id=s.role_id, secret_id=secret_id,
                                                                 mount_point=s.approle_mount, use_token=False))["auth"]
            token, renewable = auth["client_token"], bool(auth.get("renewable"))
            ttl = int(auth.get("lease_duration") or 0)
        else:
            assert s.token_file
            token = _read_secret_file(s.token_file, "vault.token_file")
            client = hvac.Client(url=s.address, token=token, timeout=s.timeout, verify=s.ca_file or True)
            data = self._guard("looking up botwarden's own token", lambda: client.auth.token.lookup_self())["data"]
            ttl, renewable = int(data.get("ttl") or 0), bool(data.get("renewable"))
            period = int(data.get("creation_ttl") or ttl)
        if s.auth == "approle":
            period = ttl
        with self._token_lock:
            self._token, self.token_ttl, self.token_renewable = token, ttl, renewable
            self._token_period = period
        self.logins += 1
        log.info("authenticated to Vault at %s (%s), token ttl %ss", s.address, s.auth, ttl or "none")

    # -- checks (botwarden doctor) ----------------------------------------------------------

    def check_login(self) -> None:
        """Authenticate once, blocking, without starting the renewer. Raises SecretUnavailable."""
        self._login()

    def token_lookup(self) -> tuple[int, bool]:
        """(seconds left, renewable) of botwarden's own token, asked of Vault now (blocking; the
        status view's "Vault token" line). Raises SecretUnavailable."""
        data = self._call_sync("looking up botwarden's own token", lambda c: c.auth.token.lookup_self())["data"]
        return int(data.get("ttl") or 0), bool(data.get("renewable"))

    def check_logout(self) -> None:
        """Revoke the token check_login made (best effort: it would end at its TTL anyway)."""
        try:
            self._call_sync("revoking its own token", lambda c: c.auth.token.revoke_self())
        except SecretUnavailable as e:
            log.info("could not revoke botwarden doctor's Vault token; it ends at its TTL: %s", e.message)
        self._token = None

    def check_access(self, target: TargetConfig) -> str:
        """Whether botwarden's token may use ``target``'s credential path, asked of Vault itself
        (sys/capabilities-self: nothing is read or issued). Returns the path; raises
        SecretUnavailable ('forbidden') naming the capability that is missing."""
        source = target.credential
        if source is None or source.source == "static":
            raise SecretUnavailable(f"target {target.name!r} has no Vault credential source", "invalid")
        mount = source.mount or DEFAULT_MOUNTS[source.source]
        path, needed = {"kv": (f"{mount}/data/{source.path}", "read"),
                        "database": (f"{mount}/creds/{source.role}", "read"),
                        "kubernetes": (f"{mount}/creds/{source.role}", "update"),
                        "ssh": (f"{mount}/sign/{source.role}", "update")}[source.source]
        reply = self._call_sync(f"asking its capabilities on {path}",
                                lambda c: c.sys.get_capabilities(paths=[path]))
        caps = set((reply.get("data") or reply).get(path) or reply.get("capabilities") or ())
        if needed not in caps and "root" not in caps:
            raise SecretUnavailable(f"Vault at {self.settings.address}: botwarden's token has "
                                    f"{sorted(caps) or ['no']} capabilities on {path}, needs {needed!r}",
                                    "forbidden")
        return path

    def _renew_token(self) -> None:
        """Renew our token; log in again (AppRole) or re-read the token file when it cannot be renewed."""
        asked = max(self._token_period, 1)
        try:
            if not self.token_renewable:
                raise SecretUnavailable("token not renewable", "invalid")
            auth = self._call_sync("renewing botwarden's own token",
                                   lambda c: c.auth.token.renew_self(increment=asked))["auth"]
            granted = int(auth.get("lease_duration") or 0)
            self.token_renewals += 1
            if granted >= asked:
                self.token_ttl, self.token_renewable = granted, bool(auth.get("renewable"))
                return
            log.info("botwarden's Vault token reaches its max TTL in %ds; authenticating again", granted)
        except SecretUnavailable as e:
            if e.kind == "unreachable":
                raise
            log.info("botwarden's Vault token could not be renewed (%s); authenticating again", e.message)
        self._login()

    async def _renew_token_loop(self) -> None:
        while True:
            if not self.token_ttl:
                return  # a token without expiry (e.g. a root or periodic-less token) needs no renewal
            await asyncio.sleep(max(self.token_ttl / 3, 0.5))
            try:
                await asyncio.to_thread(self._renew_token)
            except SecretUnavailable as e:
                log.warning("Vault token renewal failed: %s", e.message)
                await asyncio.sleep(1.0)
            except Exception:  # keep renewing whatever happened once; the next round may succeed
                log.exception("unexpected error renewing the Vault token")
                await asyncio.sleep(1.0)

    # -- calling hvac -----------------------------------------------------------------------

    def _client(self) -> hvac.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            s = self.settings
            client = self._local.client = hvac.Client(url=s.address, timeout=s.timeout, verify=s.ca_file or True)
        client.token = self._token
        return client

    async def _call(self, what: str, fn: Callable[[hvac.Client], T]) -> T:
        return await asyncio.to_thread(self._call_sync, what, fn)

    def _call_sync(self, what: str, fn: Callable[[hvac.Client], T]) -> T:
        if self._token is None:
            raise SecretUnavailable(f"botwarden is not authenticated to Vault at {self.settings.address} "
                                    f"({what}); call start() first", "invalid")
        try:
            return self._guard(what, lambda: fn(self._client()))
        except SecretUnavailable as e:
            # Our token may have expired under us (e.g. while Vault was down): one fresh login, one retry.
            if e.kind != "forbidden" or self.settings.auth != "approle":
                raise
            self._login()
            return self._guard(what, lambda: fn(self._client()))

    def _guard(self, what: str, call: Callable[[], T]) -> T:
        addr = self.settings.address
        try:
            return call()
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as e:
            raise SecretUnavailable(f"Vault at {addr} forbids {what}: {_vault_errors(e)}", "forbidden") from None
        except (hvac.exceptions.VaultDown, hvac.exceptions.VaultNotInitialized) as e:
            raise SecretUnavailable(f"Vault at {addr} is sealed or not initialised ({what})", "sealed") from None
        except hvac.exceptions.InvalidPath as e:
            raise SecretUnavailable(f"Vault at {addr} has nothing at the path for {what}: {_vault_errors(e)}",
                                    "missing") from None
        except hvac.exceptions.VaultError as e:
            raise SecretUnavailable(f"Vault at {addr} refused {what}: {_vault_errors(e)}", "invalid") from None
        except requests.exceptions.Timeout:
            raise SecretUnavailable(f"Vault at {addr} did not answer within {self.settings.timeout}s ({what})",
                                    "unreachable") from None
        except requests.exceptions.RequestException as e:
            raise SecretUnavailable(f"Vault at {addr} is unreachable ({what}): {_connection_reason(e)}",
                                    "unreachable") from None


def _connection_reason(e: Exception) -> str:
    text = str(e).lower()
    for needle, reason in (("refused", "connection refused"), ("reset", "connection reset"),
                           ("name or service", "name not resolved"), ("certificate", "TLS certificate not trusted")):
        if needle in text:
            return reason
    return type(e).__name__


def _read_secret_file(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as e:
        raise SecretUnavailable(f"cannot read {what} {path}: {e.strerror}", "file") from None
    if not value:
        raise SecretUnavailable(f"{what} {path} is empty", "file")
    return value


def _ed25519_pair() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    return public.decode(), private.decode()


def _cert_facts(cert: str) -> tuple[datetime | None, int | None]:
    from cryptography.hazmat.primitives.serialization import SSHCertificate, load_ssh_public_identity

    try:
        parsed = load_ssh_public_identity(cert.strip().encode())
    except (ValueError, TypeError):
        return None, None
    if not isinstance(parsed, SSHCertificate):
        return None, None
    return datetime.fromtimestamp(parsed.valid_before, timezone.utc), parsed.serial

