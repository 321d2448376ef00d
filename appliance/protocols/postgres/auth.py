"""Pure authentication helpers: SCRAM-SHA-256 client (RFC 5802 / RFC 7677) and MD5 passwords."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import unicodedata

from .errors import AuthenticationError

SCRAM_SHA_256 = "SCRAM-SHA-256"


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The answer to AuthenticationMD5Password: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


def _saslprep(password: str) -> str:
    # PostgreSQL applies SASLprep when it can and uses the raw bytes otherwise;
    # NFKC normalisation is the part that changes ordinary passwords.
    try:
        return unicodedata.normalize("NFKC", password)
    except Exception:  # pragma: no cover - normalize only fails on non-str
        return password


class ScramClient:
    """Client side of SCRAM-SHA-256 without channel binding, as libpq does with sslmode<verify.

    Usage: ``first = c.client_first()``; ``final = c.client_final(server_first)``;
    ``c.verify_server_final(server_final)`` (raises AuthenticationError on a bad proof).
    """

    def __init__(self, password: str, nonce: bytes | None = None):
        self._password = _saslprep(password).encode()
        self._nonce = base64.b64encode(nonce or os.urandom(18)).decode()
        self._gs2 = "n,,"
        self._first_bare = f"n=,r={self._nonce}"
        self._server_signature: bytes | None = None

    def __repr__(self) -> str:
        return "ScramClient(<password hidden>)"

    def client_first(self) -> bytes:
        return (self._gs2 + self._first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        try:
            attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
            nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            raise AuthenticationError("server sent a malformed SCRAM server-first message") from e
        if not nonce.startswith(self._nonce) or iterations < 1:
            raise AuthenticationError("server's SCRAM nonce or iteration count is invalid")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={base64.b64encode(self._gs2.encode()).decode()},r={nonce}"
        auth_message = f"{self._first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        text = server_final.decode(errors="replace")
        if text.startswith("e="):
            raise AuthenticationError(f"server refused SCRAM authentication: {text[2:]}")
        if not text.startswith("v=") or self._server_signature is None:
            raise AuthenticationError("server sent a malformed SCRAM server-final message")
        try:
            got = base64.b64decode(text[2:].split(",", 1)[0])
        except ValueError as e:
            raise AuthenticationError("server sent a malformed SCRAM signature") from e
        if not hmac.compare_digest(got, self._server_signature):
            raise AuthenticationError("server's SCRAM signature does not match: it does not know the password")
