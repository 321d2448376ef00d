"""What the Kubernetes front needs to know about the API server's HTTP (sans-IO, no sockets).

HTTP itself is parsed by real libraries (h11 for HTTP/1.1, h2 for HTTP/2); this module holds
only the Kubernetes parts around them:

- :func:`status_body`: the API server's own ``Status`` object, which kubectl prints as it
  prints an RBAC refusal (``Error from server (Forbidden): ...``);
- :func:`upstream_headers`: the bot's request headers as they go to the real server (hop-by-hop
  headers dropped, the bot's ``Authorization`` replaced by the session's credential, ``Accept``
  narrowed to JSON where botwarden must read the response);
- :class:`SecretMasker` / :class:`WatchMasker`: Secret ``data`` / ``stringData`` values masked in
  JSON responses, whole documents (get, list) and watch event streams alike.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Iterable

from appliance.errors import BotwardenError

# RFC 9110 §7.6.1 connection-specific headers, plus HTTP/2 pseudo-headers and what the front
# sets itself (the upstream's Host, the body's length, no compression: see upstream_headers).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-authenticate", "host", "content-length", "http2-settings",
})
# Headers the bot may not pass to the API server: they would let it choose who it is there.
IDENTITY_HEADERS = frozenset({"authorization", "impersonate-user", "impersonate-group", "impersonate-uid"})
JSON = "application/json"
MASK_TEXT = "********"
MASK_DATA = base64.b64encode(MASK_TEXT.encode()).decode()  # Secret.data values are base64


class KubernetesProtocolError(BotwardenError):
    """A response botwarden cannot inspect where it must (e.g. a masked request answered in
    a format other than JSON): the bot gets ``status`` with ``message`` instead of the body."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.message = message
        self.status = status


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 413: "RequestEntityTooLarge",
            429: "TooManyRequests", 500: "InternalError", 502: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}


def status_body(code: int, message: str, *, reason: str | None = None, kind: str | None = None,
                name: str | None = None, group: str | None = None) -> bytes:
    """A ``meta/v1 Status`` as the API server writes it for a failed request."""
    doc: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason or _REASONS.get(code, "InternalError")}
    details = {k: v for k, v in (("name", name), ("group", group), ("kind", kind)) if v}
    if details:
        doc["details"] = details
    doc["code"] = code
    return json.dumps(doc, separators=(",", ":")).encode()


def upstream_headers(headers: Iterable[tuple[str, str]], token: str | None, *,
                     narrow_json: bool) -> list[tuple[str, str]]:
    """The bot's headers as forwarded: names lower-case, hop-by-hop and identity headers dropped,
    the session's bearer token added. ``Accept-Encoding`` is dropped so the server answers
    uncompressed (a masked body must be read; loopback bandwidth is cheap). With ``narrow_json``
    the ``Accept`` becomes JSON: the server then answers JSON instead of protobuf or a Table."""
    out: list[tuple[str, str]] = []
    accept: list[str] = []
    for name, value in headers:
        n = name.lower()
        if n in HOP_BY_HOP or n in IDENTITY_HEADERS or n.startswith(":") or n == "accept-encoding":
            continue
        if narrow_json and n == "accept":
            # JSON media types stay, with their parameters (kubectl's server-side Table is
            # `application/json;as=Table;...`: the same output as direct); protobuf goes.
            accept += [p.strip() for p in value.split(",") if p.split(";")[0].strip().lower() == JSON]
            continue
        out.append((n, value))
    if narrow_json:
        out.append(("accept", ",".join(accept) or JSON))
    if token is not None:
        out.append(("authorization", f"Bearer {token}"))
    return out


def response_headers(headers: Iterable[tuple[str, str]], *, drop_length: bool) -> list[tuple[str, str]]:
    """The server's headers as they go back to the bot (hop-by-hop dropped; the length too
    when the body is rewritten)."""
    return [(n.lower(), v) for n, v in headers
            if n.lower() not in HOP_BY_HOP and not (drop_length and n.lower() == "content-length")]


def bearer_token(headers: Iterable[tuple[str, str]]) -> str | None:
    for name, value in headers:
        if name.lower() == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer":
                return None
            return token.strip() or None
    return None


def is_json(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";")[0].strip().lower() in (JSON, "application/merge-patch+json")


@dataclass
class SecretMasker:
    """Masks the values of every Secret's ``data`` and ``stringData`` in a decoded JSON document:
    a Secret, a SecretList, a Table with objects, a watch event, a List of anything. Keys stay
    (kubectl and controllers see which keys exist); values become ``MASK_DATA`` (base64 of
    ``MASK_TEXT``, so clients that decode still can) and ``MASK_TEXT`` in ``stringData``."""

    masked: int = 0

    def mask(self, doc: Any) -> Any:
        self._walk(doc)
        return doc

    def _walk(self, node: Any) -> None:
        if isinstance(node, dict):
            kind = node.get("kind")
            if kind == "Secret":
                self._secret(node)
            elif kind == "SecretList" and isinstance(node.get("items"), list):
                # The API server leaves kind out of a list's items.
                for item in node["items"]:
                    if isinstance(item, dict):
                        self._secret(item)
            for value in node.values():
                if isinstance(value, (dict, list)):
                    self._walk(value)
        elif isinstance(node, list):
            for value in node:
                if isinstance(value, (dict, list)):
                    self._walk(value)

    def _secret(self, node: dict) -> None:
        for key, mask in (("data", MASK_DATA), ("stringData", MASK_TEXT)):
            values = node.get(key)
            if isinstance(values, dict):
                for k in values:
                    if values[k] != mask:
                        values[k] = mask
                        self.masked += 1

    def mask_body(self, body: bytes, content_type: str | None) -> bytes:
        """A whole JSON response masked; anything else is refused (fail closed)."""
        if not body:
            return body
        if not is_json(content_type):
            raise KubernetesProtocolError(
                f"botwarden must mask this response but the API server answered {content_type or 'no content type'}"
                " instead of JSON; the response was withheld")
        try:
            return json.dumps(self.mask(json.loads(body)), separators=(",", ":")).encode()
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack
            raise KubernetesProtocolError(f"botwarden could not read the API server's JSON to mask it ({e}); "
                                          "the response was withheld") from None


class WatchMasker:
    """A watch stream (one JSON event per line) masked event by event. ``feed`` returns what
    may go to the bot now; a partial event waits for its end, bounded by ``max_event``."""

    def __init__(self, masker: SecretMasker, max_event: int):
        self.masker = masker
        self.max_event = max_event
        self._buf = bytearray()

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        end = self._buf.rfind(b"\n")
        if end < 0:
            if len(self._buf) > self.max_event:
                raise KubernetesProtocolError(f"a watch event larger than {self.max_event} bytes cannot be masked; "
                                              "the stream was ended")
            return b""
        complete, self._buf = bytes(self._buf[:end + 1]), self._buf[end + 1:]
        out = []
        for line in complete.split(b"\n")[:-1]:
            if not line.strip():
                out.append(line)
                continue
            try:
                out.append(json.dumps(self.masker.mask(json.loads(line)), separators=(",", ":")).encode())
            except (ValueError, RecursionError) as e:
                raise KubernetesProtocolError(f"botwarden could not read a watch event to mask it ({e}); "
                                              "the stream was ended") from None
        return b"\n".join(out) + b"\n"

    def close(self) -> bytes:
        """End of stream: a trailing event without a newline is masked too."""
        if not self._buf.strip():
            return b""
        rest, self._buf = bytes(self._buf), bytearray()
        try:
            return json.dumps(self.masker.mask(json.loads(rest)), separators=(",", ":")).encode()
        except (ValueError, RecursionError) as e:
            raise KubernetesProtocolError(f"botwarden could not read a watch event to mask it ({e})") from None
