"""Helpers for the identity and secrets tests: OpenBao as a real OIDC issuer, and token forging.

Everything is configured through OpenBao's real HTTP API (hvac); forged tokens are built with
joserfc / hmac so the validator sees exactly what an attacker could send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass

import hvac
from joserfc import jwk, jws

from tests.servers import OpenBaoServer


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def token_parts(token: str) -> tuple[dict, dict, str]:
    h, p, s = token.split(".")
    return json.loads(unb64(h)), json.loads(unb64(p)), s


def sign_with(key: jwk.RSAKey, header: dict, claims: dict) -> str:
    return jws.serialize_compact(header, json.dumps(claims).encode(), key, algorithms=[header["alg"]])


def hs256_with_secret(header: dict, claims: dict, secret: bytes) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def unsigned(header: dict, claims: dict) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}."


@dataclass
class BaoIssuer:
    """OpenBao's identity tokens as the bots' OIDC issuer: a key, a role with a fixed client_id,
    and an AppRole whose login has an entity (the root token has none, so it cannot mint)."""

    server: OpenBaoServer
    key: str
    role: str
    client_id: str
    bot_client: hvac.Client
    entity_id: str

    @property
    def issuer(self) -> str:
        return f"{self.server.addr}/v1/identity/oidc"

    def mint(self) -> str:
        return self.bot_client.read(f"identity/oidc/token/{self.role}")["data"]["token"]

    def rotate(self) -> None:
        self.server.client().write(f"identity/oidc/key/{self.key}/rotate")

    def jwks(self) -> dict:
        import requests
        return requests.get(f"{self.server.addr}/v1/identity/oidc/.well-known/keys", timeout=5).json()


def setup_bao_issuer(server: OpenBaoServer, *, ttl: str = "10m", name: str | None = None,
                     algorithm: str = "RS256") -> BaoIssuer:
    name = name or f"bw-{uuid.uuid4().hex[:8]}"
    root = server.client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(f"{name}-mint", f'path "identity/oidc/token/{name}" {{ capabilities = ["read"] }}')
    root.write(f"identity/oidc/key/{name}", allowed_client_ids="*", algorithm=algorithm,
               verification_ttl="1h", rotation_period="24h")
    # Literal claims through the role template: groups for identity matching, nbf to exercise it.
    template = '{"groups": ["deployers", "ci"], "team": "ops", "nbf": {{time.now}}}'
    client_id = f"botwarden-{name}"
    root.write(f"identity/oidc/role/{name}", key=name, ttl=ttl, client_id=client_id,
               template=base64.b64encode(template.encode()).decode())
    root.auth.approle.create_or_update_approle(name, token_policies=[f"{name}-mint"], token_ttl="30m")
    role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
    bot = hvac.Client(url=server.addr)
    login = bot.auth.approle.login(role_id, secret_id)
    return BaoIssuer(server, name, name, client_id, bot, login["auth"]["entity_id"])
