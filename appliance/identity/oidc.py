"""OIDC bearer tokens: discovery, a cached JWKS that follows key rotation, strict validation.

The JOSE work (key import, signature check) is done by joserfc, the successor of
``authlib.jose`` by the same author (Authlib 1.9 marks ``authlib.jose`` deprecated and points
there). Everything around it is explicit here so each refusal has its own reason code:

1. parse the compact JWS ourselves (``malformed``);
2. the header's ``alg`` must be in ``oidc.algorithms`` and fit the key type (``algorithm``):
   never ``none``, never an HMAC algorithm, never RS* with an EC key and so on;
3. the unverified ``iss`` must be ours (``issuer``) — refused early so a token from another
   issuer is reported as such instead of as an unknown key;
4. the key named by ``kid`` comes from the cached JWKS; an unknown ``kid`` forces one refresh
   (rate-limited by ``oidc.jwks_min_refresh_s``) so rotation works without a restart
   (``unknown_kid``);
5. the signature (``signature``);
6. ``exp`` / ``nbf`` / ``iat`` with ``oidc.leeway_s`` (``expired`` / ``not_yet_valid``),
   ``aud`` (``audience``), the required claims (``missing_claim``).

No message or log line ever contains the token; claim values quoted in messages are public
(issuer, subject) and shortened.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

import requests
from authlib.oidc.discovery import OpenIDProviderMetadata
from joserfc import jwk, jws
from joserfc.errors import BadSignatureError, JoseError

from appliance.config import OIDCSettings
from appliance.identity.errors import IdentityRefused

log = logging.getLogger(__name__)

# RFC 9864 deprecates the polymorphic name "EdDSA" in favour of "Ed25519"; issuers (OpenBao among
# them) still sign with it and oidc.algorithms is the operator's decision, so joserfc's per-token
# warning is noise here.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", module="joserfc")

MAX_TOKEN_BYTES = 16 * 1024

# Which key type (and EC curve) each allowed algorithm needs. HMAC and "none" are absent on
# purpose: a token naming them is refused whatever the config says.
_KEY_TYPE_FOR_ALG: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "ES256K": ("EC", "secp256k1"),
    "EdDSA": ("OKP", None), "Ed25519": ("OKP", "Ed25519"),
}


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _b64json(part: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise IdentityRefused("malformed", f"token {what} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise IdentityRefused("malformed", f"token {what} is not a JSON object")
    return value


@dataclass(frozen=True)
class TokenInfo:
    """A validated token's facts. The raw token is deliberately not kept."""

    subject: str
    kid: str | None
    claims: Mapping[str, Any]
    expires_at: datetime | None
    issuer: str
    groups: tuple[str, ...] = ()
    algorithm: str = ""

    def __repr__(self) -> str:
        return (f"TokenInfo(subject={self.subject!r}, kid={self.kid!r}, issuer={self.issuer!r}, "
                f"expires_at={self.expires_at!r}, groups={self.groups!r})")


@dataclass(frozen=True)
class SessionExpiry:
    """How a session relates to its token's lifetime.

    ``policy == "end"``: the front ends the session when the token expires (``await wait()``
    then close with :meth:`message`). ``policy == "recheck"``: the session is not cut mid-request;
    the front calls :meth:`check` before forwarding each new request and, once it returns a
    message, refuses that request with it and ends the session.
    """

    subject: str
    expires_at: datetime | None
    policy: Literal["end", "recheck"]
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def remaining(self) -> float | None:
        """Seconds until the token expires (negative once it has); None = the token never expires."""
        if self.expires_at is None:
            return None
        return self.expires_at.timestamp() - self.clock()

    def message(self) -> str:
        when = self.expires_at.isoformat() if self.expires_at else "?"
        return (f"botwarden: the OIDC token for subject {_short(self.subject)} expired at {when}; "
                f"session ended (oidc.on_expiry = \"{self.policy}\"). Reconnect with a fresh token.")

    def check(self) -> str | None:
        """The end-of-session message once the token has expired, else None."""
        left = self.remaining()
        return self.message() if left is not None and left <= 0 else None

    async def wait(self) -> str:
        """Sleep until the token expires; return the end-of-session message. Never returns when
        the token has no expiry (cancel the task instead)."""
        while True:
            left = self.remaining()
            if left is None:
                await asyncio.Event().wait()  # never set: a token without exp never ends a session
            elif left <= 0:
                return self.message()
            else:
                await asyncio.sleep(min(left, 3600.0))


@dataclass
class _Jwks:
    by_kid: dict[str, Any] = field(default_factory=dict)  # kid -> (joserfc key, jwk dict)
    anonymous: list[tuple[Any, dict]] = field(default_factory=list)
    fetched_at: float = -math.inf  # monotonic


class OIDCValidator:
    """Validates bearer tokens from one issuer. Thread-safe; ``validate`` blocks on HTTP when it
    has to (re)fetch keys, so call :meth:`avalidate` from the event loop."""

    def __init__(self, settings: OIDCSettings, *, clock: Callable[[], float] = time.time,
                 session: requests.Session | None = None):
        self.settings = settings
        self._clock = clock
        self._http = session or requests.Session()
        self._lock = threading.Lock()
        self._jwks = _Jwks()
        self._last_forced = -math.inf  # monotonic time of the last refresh forced by an unknown kid
        self._last_failure = -math.inf
        self.fetch_count = 0  # JWKS fetches performed (observable for tests and status)
        base = (settings.discovery_url or settings.issuer).rstrip("/")
        self.discovery_url = (base if base.endswith("/.well-known/openid-configuration")
                              else base + "/.well-known/openid-configuration")

    # -- public API -------------------------------------------------------------------------

    def validate(self, token: str) -> TokenInfo:
        """Validate ``token``; raise :class:`IdentityRefused` with a reason code otherwise."""
        header, claims, alg, kid = self._parse(token)
        self._check_issuer(claims)
        key = self._key_for(kid, alg)
        try:
            jws.deserialize_compact(token.strip(), key, algorithms=[alg])
        except BadSignatureError:
            raise IdentityRefused("signature", "token signature does not verify against the issuer's key "
                                               f"{_short(kid)}") from None
        except JoseError as e:
            # joserfc's messages do not carry the token, but keep ours uniform anyway.
            raise IdentityRefused("signature", f"token signature could not be checked ({type(e).__name__})") from None
        return self._check_claims(claims, kid, alg)

    async def avalidate(self, token: str) -> TokenInfo:
        return await asyncio.to_thread(self.validate, token)

    def session_expiry(self, info: TokenInfo) -> SessionExpiry:
        return SessionExpiry(info.subject, info.expires_at, self.settings.on_expiry, self._clock)

    def refresh(self) -> None:
        """Fetch discovery and the JWKS now (e.g. at start-up, to fail early)."""
        with self._lock:
            self._fetch_locked()

    @property
    def key_count(self) -> int:
        """Keys in the JWKS fetched last (botwarden doctor)."""
        return len(self._jwks.by_kid) + len(self._jwks.anonymous)

    # -- steps ------------------------------------------------------------------------------

    def _parse(self, token: str) -> tuple[dict, dict, str, str | None]:
        if not isinstance(token, str) or not token.strip():
            raise IdentityRefused("malformed", "no token presented")
        token = token.strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise IdentityRefused("malformed", f"token longer than {MAX_TOKEN_BYTES} bytes")
        parts = token.split(".")
        if len(parts) != 3:
            raise IdentityRefused("malformed", f"token is not a compact JWS (expected 3 dot-separated parts, "
                                               f"got {len(parts)})")
        header = _b64json(parts[0], "header")
        claims = _b64json(parts[1], "payload")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise IdentityRefused("malformed", "token header has no 'alg'")
        if alg not in self.settings.algorithms or alg not in _KEY_TYPE_FOR_ALG:
            raise IdentityRefused("algorithm", f"token algorithm {_short(alg, 20)} is not allowed "
                                               f"(allowed: {', '.join(self.settings.algorithms)})")
        if "crit" in header:
            raise IdentityRefused("malformed", "token header has critical extensions botwarden does not support")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise IdentityRefused("malformed", "token header 'kid' is not a string")
        return header, claims, alg, kid

    def _check_issuer(self, claims: dict) -> None:
        iss = claims.get("iss")
        if iss is None:
            raise IdentityRefused("missing_claim", "token has no 'iss' claim")
        if iss != self.settings.issuer:
            raise IdentityRefused("issuer", f"token issued by {_short(iss)}, expected {_short(self.settings.issuer)}")

    def _key_for(self, kid: str | None, alg: str) -> Any:
        with self._lock:
            now = time.monotonic()
            fetched_now = False
            if now - self._jwks.fetched_at > self.settings.jwks_cache_s:
                self._fetch_locked()
                fetched_now = True
            found = self._lookup_locked(kid, alg)
            if found is None and not fetched_now and now - self._last_forced >= self.settings.jwks_min_refresh_s:
                # A kid we have not seen: the issuer may have rotated. One refresh, rate-limited so a
                # stream of forged kids cannot turn us into a load generator against the issuer.
                self._last_forced = now
                log.info("OIDC token names unknown key id %s; refreshing the JWKS", _short(kid))
                self._fetch_locked()
                found = self._lookup_locked(kid, alg)
        if found is None:
            raise IdentityRefused("unknown_kid", f"the issuer publishes no key {_short(kid)} "
                                                 f"(JWKS refreshed; key ids: {len(self._jwks.by_kid)} known)")
        key, jwk_dict = found
        kty, curve = _KEY_TYPE_FOR_ALG[alg]
        if key.key_type != kty or (curve and getattr(key, "curve_name", None) != curve):
            raise IdentityRefused("algorithm", f"token algorithm {alg} does not fit the issuer's "
                                               f"{key.key_type} key {_short(kid)}")
        if jwk_dict.get("alg") not in (None, alg):
            raise IdentityRefused("algorithm", f"token algorithm {alg} differs from key {_short(kid)}'s "
                                               f"algorithm {jwk_dict['alg']}")
        if jwk_dict.get("use") not in (None, "sig"):
            raise IdentityRefused("algorithm", f"key {_short(kid)} is not a signing key")
        return key

    def _lookup_locked(self, kid: str | None, alg: str) -> tuple[Any, dict] | None:
        if kid is not None:
            return self._jwks.by_kid.get(kid)
        # No kid: acceptable only when exactly one key could have signed with this algorithm.
        kty, _ = _KEY_TYPE_FOR_ALG[alg]
        fits = [kd for kd in [*self._jwks.by_kid.values(), *self._jwks.anonymous] if kd[0].key_type == kty]
        return fits[0] if len(fits) == 1 else None

    def _fetch_locked(self) -> None:
        now = time.monotonic()
        if now - self._last_failure < self.settings.jwks_min_refresh_s and self._jwks.fetched_at < self._last_failure:
            raise IdentityRefused("issuer_unreachable", "the OIDC issuer could not be reached a moment ago; "
                                                        "retrying after oidc.jwks_min_refresh_s")
        try:
            doc = self._get_json(self.discovery_url)
            if doc.get("issuer") != self.settings.issuer:
                raise IdentityRefused("issuer", f"discovery at {self.discovery_url} names issuer "
                                                f"{_short(doc.get('issuer'))}, config says "
                                                f"{_short(self.settings.issuer)}")
            jwks_uri = _discovered_jwks_uri(doc, self.discovery_url)
            keyset = self._get_json(jwks_uri)
        except IdentityRefused:
            self._last_failure = now
            raise
        fresh = _Jwks(fetched_at=now)
        for entry in keyset.get("keys") or []:
            if not isinstance(entry, dict):
                continue
            try:
                key = jwk.import_key(entry)
            except (JoseError, ValueError, TypeError) as e:
                log.warning("skipping JWKS key %s: %s", _short(entry.get("kid")), type(e).__name__)
                continue
            if key.is_private:
                # A JWKS never carries private material; if one does, do not trust it.
                log.warning("skipping JWKS key %s: it carries private key material", _short(entry.get("kid")))
                continue
            if isinstance(entry.get("kid"), str):
                fresh.by_kid[entry["kid"]] = (key, entry)
            else:
                fresh.anonymous.append((key, entry))
        self._jwks = fresh
        self.fetch_count += 1
        log.debug("fetched JWKS from %s: %d keys", jwks_uri, len(fresh.by_kid) + len(fresh.anonymous))

    def _get_json(self, url: str) -> dict:
        try:
            resp = self._http.get(url, timeout=self.settings.http_timeout_s,
                                  verify=self.settings.ca_file or True, allow_redirects=False)
        except requests.RequestException as e:
            raise IdentityRefused("issuer_unreachable", f"cannot reach the OIDC issuer at {url}: "
                                                        f"{type(e).__name__}") from None
        if resp.status_code != 200:
            raise IdentityRefused("issuer_unreachable", f"OIDC issuer answered HTTP {resp.status_code} for {url}")
        try:
            value = resp.json()
        except ValueError:
            raise IdentityRefused("issuer_unreachable", f"OIDC issuer sent non-JSON for {url}") from None
        if not isinstance(value, dict):
            raise IdentityRefused("issuer_unreachable", f"OIDC issuer sent a non-object for {url}")
        return value

    def _check_claims(self, claims: dict, kid: str | None, alg: str) -> TokenInfo:
        leeway = self.settings.leeway_s
        now = self._clock()

        def number(name: str) -> float | None:
            value = claims.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise IdentityRefused("malformed", f"token claim '{name}' is not a NumericDate")
            return float(value)

        exp, nbf, iat = number("exp"), number("nbf"), number("iat")
        if exp is not None and now >= exp + leeway:
            raise IdentityRefused("expired", f"token expired at {_iso(exp)} (leeway {leeway}s)")
        if nbf is not None and now + leeway < nbf:
            raise IdentityRefused("not_yet_valid", f"token not valid before {_iso(nbf)} (leeway {leeway}s)")
        if iat is not None and now + leeway < iat:
            raise IdentityRefused("not_yet_valid", f"token issued in the future, at {_iso(iat)} (leeway {leeway}s)")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in self.settings.audience for a in auds):
            shown = ", ".join(_short(a, 40) for a in auds[:5]) or "none"
            raise IdentityRefused("audience", f"token audience ({shown}) is not "
                                              f"{' or '.join(map(repr, self.settings.audience))}")
        for name in self.settings.required_claims:
            if claims.get(name) is None:
                raise IdentityRefused("missing_claim",
                                      f"token has no '{name}' claim (required by oidc.required_claims)")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise IdentityRefused("missing_claim", "token has no 'sub' claim")
        raw_groups = claims.get(self.settings.groups_claim)
        if isinstance(raw_groups, str):
            groups: tuple[str, ...] = (raw_groups,)
        elif isinstance(raw_groups, list):
            groups = tuple(str(g) for g in raw_groups)
        else:
            groups = ()
        return TokenInfo(
            subject=sub, kid=kid, claims=MappingProxyType(dict(claims)),
            expires_at=datetime.fromtimestamp(exp, timezone.utc) if exp is not None else None,
            issuer=claims["iss"], groups=groups, algorithm=alg,
        )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _discovered_jwks_uri(doc: dict, discovery_url: str) -> str:
    """The JWKS address from a discovery document, checked with Authlib's OpenID Provider
    Metadata rules (jwks_uri and the signing algorithms). The https-only rule for `issuer` is
    left out on purpose: a loopback issuer (OpenBao dev) is plain http; the issuer string
    itself is compared with the config before this."""
    meta = OpenIDProviderMetadata(doc)
    try:
        meta.validate_jwks_uri()
        meta.validate_id_token_signing_alg_values_supported()
    except ValueError as e:
        raise IdentityRefused("issuer_unreachable", f"discovery at {discovery_url} is invalid: {e}") from None
    jwks_uri = meta.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        raise IdentityRefused("issuer_unreachable", f"discovery at {discovery_url} has no jwks_uri")
    return jwks_uri
