"""What the Kubernetes front needs to know about the API server's HTTP (sans-IO, no sockets).

HTTP itself is parsed by real libraries (h11 for HTTP/1.1, h2 for HTTP/2); this module holds
only the Kubernetes parts around them:

- :func:`status_body`: the API server's own ``Status`` object, which kubectl prints as it
  prints an RBAC refusal (``Error from server (Forbidden): ...``);
- :func:`upstream_headers`: the bot's request headers as they go to the real server (hop-by-hop
  headers dropped, the bot's ``Authorization`` replaced by the session's credential, ``Accept``
  narrowed to JSON where botwarden must read the response);
- :class:`ResponseMasker` / :class:`WatchMasker`: Secret ``data`` / ``stringData`` values, and the
  values at configured :class:`MaskPath` s, masked in JSON responses, whole documents (get, list)
  and watch event streams alike.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
from dataclasses import dataclass, field
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
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
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


@dataclass(frozen=True)
class MaskPath:
    """A configured path to values masked in objects of some kinds (``mask_paths`` of a
    ``[rules.k8s]`` mask rule): ``ConfigMap.data.password``, ``Pod.spec.containers[*].env[*].value``,
    ``Deployment.spec.template.spec.containers[*].env[name=DB_*].value``,
    ``*.metadata.annotations["example.com/token"]``. The first part is the object's kind (a glob);
    then ``.key`` (a glob), ``["literal key"]``, ``[*]`` (every list element) or ``[field=glob]``
    (the list elements whose ``field`` matches)."""

    text: str
    kind: str
    # ("key", glob, ""), ("literal", key, ""), ("each", "", ""), ("where", field, glob)
    steps: tuple[tuple[str, str, str], ...]

    def children(self, node: Any, step: tuple[str, str, str]) -> list:
        how, a, b = step
        if how in ("key", "literal"):
            if not isinstance(node, dict):
                return []
            return [k for k in node if (fnmatch.fnmatchcase(k, a) if how == "key" else k == a)]
        if not isinstance(node, list):
            return []
        if how == "each":
            return list(range(len(node)))
        return [i for i, el in enumerate(node)
                if isinstance(el, dict) and isinstance(el.get(a), str) and fnmatch.fnmatchcase(el[a], b)]


_KIND = re.compile(r"[^.\[\]\"]+")
_STEP = re.compile(r'\.([^.\[\]"]+)|\[\*\]|\["((?:[^"\\]|\\.)*)"\]|\[([A-Za-z0-9_.-]+)=([^\]]*)\]')


def parse_mask_path(text: str) -> MaskPath:
    """A ``mask_paths`` entry, or ValueError saying what is wrong with it."""
    m = _KIND.match(text)
    if m is None or not (m.group(0)[0].isupper() or m.group(0)[0] in "*?["):
        raise ValueError(f"mask path {text!r} must start with the kind of object it applies to "
                         "(\"ConfigMap.data.password\"; \"*\" for every kind)")
    steps: list[tuple[str, str, str]] = []
    pos = m.end()
    while pos < len(text):
        s = _STEP.match(text, pos)
        if s is None:
            raise ValueError(f"mask path {text!r}: cannot read {text[pos:]!r} (after the kind: .key, [\"key\"], "
                             "[*] or [field=pattern])")
        if s.group(1) is not None:
            steps.append(("key", s.group(1), ""))
        elif s.group(2) is not None:
            steps.append(("literal", re.sub(r"\\(.)", r"\1", s.group(2)), ""))
        elif s.group(3) is not None:
            steps.append(("where", s.group(3), s.group(4)))
        else:
            steps.append(("each", "", ""))
        pos = s.end()
    if not steps:
        raise ValueError(f"mask path {text!r} names a kind but no field (\"ConfigMap.data.password\")")
    return MaskPath(text, m.group(0), tuple(steps))


@dataclass
class ResponseMasker:
    """Masks a decoded JSON document - a single object, a ``...List``, a Table with objects, a
    watch event, a List of anything:

    - every Secret's ``data`` and ``stringData`` values. Keys stay (kubectl and controllers see
      which keys exist); values become ``MASK_DATA`` (base64 of ``MASK_TEXT``, so clients that
      decode still can) and ``MASK_TEXT`` in ``stringData``;
    - the values at ``paths`` in objects of their kinds: each string there (or under it, when the
      path selects an object or a list) becomes ``MASK_TEXT``; numbers and booleans stay (typed
      fields a client decodes).

    ``masked`` counts the values masked per Secret (``secret_values``) and per path."""

    paths: tuple[MaskPath, ...] = ()
    masked: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.masked.values())

    def mask(self, doc: Any) -> Any:
        self._walk(doc, None)
        return doc

    def _walk(self, node: Any, inherited_kind: str | None) -> None:
        if isinstance(node, dict):
            kind = node.get("kind") if isinstance(node.get("kind"), str) else inherited_kind
            if kind is not None:
                self._object(node, kind)
            # The API server leaves kind out of a list's items: a FooList's items are Foos.
            item_kind = kind[:-4] if kind and kind.endswith("List") and kind != "List" else None
            for key, value in node.items():
                if isinstance(value, (dict, list)):
                    self._walk(value, item_kind if key == "items" else None)
        elif isinstance(node, list):
            for value in node:
                if isinstance(value, (dict, list)):
                    self._walk(value, inherited_kind)

    def _object(self, node: dict, kind: str | None) -> None:
        if kind == "Secret":
            self._secret(node)
        matching = [p for p in self.paths if kind is not None and fnmatch.fnmatchcase(kind, p.kind)]
        for path in matching:
            self._apply(node, path, path.steps)
        if kind == "Secret" or matching:
            self._last_applied(node)

    def _last_applied(self, node: dict) -> None:
        """`kubectl apply` keeps the whole object it applied, values included, as JSON in an
        annotation: masked the same way (unreadable: replaced whole)."""
        metadata = node.get("metadata")
        annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
        if not isinstance(annotations, dict) or not isinstance(annotations.get(LAST_APPLIED), str):
            return
        before = self.total
        try:
            applied = json.loads(annotations[LAST_APPLIED])
            self._walk(applied, None)
            if self.total != before:
                annotations[LAST_APPLIED] = json.dumps(applied, separators=(",", ":"))
        except (ValueError, RecursionError):
            annotations[LAST_APPLIED] = MASK_TEXT
            self._count("unreadable_annotations", 1)

    def _count(self, key: str, n: int) -> None:
        if n:
            self.masked[key] = self.masked.get(key, 0) + n

    def _secret(self, node: dict) -> None:
        n = 0
        for key, mask in (("data", MASK_DATA), ("stringData", MASK_TEXT)):
            values = node.get(key)
            if isinstance(values, dict):
                for k in values:
                    if values[k] != mask:
                        values[k] = mask
                        n += 1
        self._count("secret_values", n)

    def _apply(self, node: Any, path: MaskPath, steps: tuple) -> None:
        step, rest = steps[0], steps[1:]
        for key in path.children(node, step):
            if rest:
                self._apply(node[key], path, rest)
            else:
                node[key] = self._masked(node[key], path.text)

    def _masked(self, value: Any, counter: str) -> Any:
        if isinstance(value, str):
            if value != MASK_TEXT:
                self._count(counter, 1)
            return MASK_TEXT
        if isinstance(value, dict):
            for k in value:
                value[k] = self._masked(value[k], counter)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                value[i] = self._masked(v, counter)
        return value

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

    def __init__(self, masker: ResponseMasker, max_event: int):
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
