"""Kubernetes API requests as the policy sees them (pure).

:meth:`K8sRequest.from_http` reads the verb, resource, subresource, namespace and
name from an API server request line the way the API server's own
RequestInfoResolver does (``/api/v1/namespaces/ns/pods/name/exec``,
``/apis/group/version/...``, ``?watch=true``), and what else a rule may match: the
label and field selectors, a PATCH's type (from its ``Content-Type``) and whether
the request is a dry run (``?dryRun=All``, or a delete's ``DeleteOptions`` body).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

# A PATCH's Content-Type -> the patch type a rule names (`kubectl patch --type`, `kubectl apply`).
PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",  # kubectl apply (client-side)
    "application/apply-patch+yaml": "apply",                  # kubectl apply --server-side
}
# Verbs whose requests can carry label / field selectors.
SELECTOR_VERBS = frozenset({"list", "watch", "deletecollection"})
_SPACES_AROUND = re.compile(r"\s*(==|!=|=|,|\(|\))\s*")


def selector_requirements(selector: str | None) -> tuple[str, ...]:
    """A label or field selector as its requirements, written one way: ``"app = web, tier in (a, b)"``
    is ``("app=web", "tier in (a,b)")`` (``==`` is written ``=``; commas inside a set stay in it)."""
    if not selector:
        return ()
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth <= 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    out = []
    for part in parts:
        text = _SPACES_AROUND.sub(lambda m: "=" if m.group(1) == "==" else m.group(1), " ".join(part.split()))
        text = text.replace(" in(", " in (").replace(" notin(", " notin (")
        if text:
            out.append(text)
    return tuple(out)


def _delete_options_dry_run(body: bytes) -> bool:
    """``dryRun: ["All"]`` in a JSON ``DeleteOptions`` body. A body that is not JSON counts as a
    real delete: a rule relaxed for dry runs must not apply to a request botwarden cannot read."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("dryRun"), list) and "All" in doc["dryRun"]


@dataclass(frozen=True)
class K8sRequest:
    verb: str
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    api_group: str = ""  # "" = the core group
    resource_request: bool = True  # False for /healthz, /version, /apis discovery ...
    path: str = ""
    label_selector: tuple[str, ...] = ()  # requirements (selector_requirements)
    field_selector: tuple[str, ...] = ()
    patch_type: str | None = None  # PATCH only: json / merge / strategic / apply ("unknown": another type)
    dry_run: bool = False
    command: tuple[str, ...] = ()  # exec: the command's argv (`kubectl exec -- cmd args`)

    @property
    def command_line(self) -> str | None:
        """An exec's argv as a shell command line (each word quoted: the container runs the argv
        itself, with no shell between), for the SSH command analysis; None without a command."""
        return shlex.join(self.command) if self.command else None

    @classmethod
    def from_http(cls, method: str, target: str, content_type: str | None = None, body: bytes = b"") -> "K8sRequest":
        """``content_type`` and ``body`` are the request's (a PATCH's type; a delete's options)."""
        url = urlsplit(target)
        query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.split("/") if p]
        method = method.upper()
        if len(parts) < 2 or parts[0] not in ("api", "apis"):
            return cls(verb=method.lower(), resource_request=False, path=url.path)
        if parts[0] == "api":
            group, rest = "", parts[2:]
        else:
            if len(parts) < 3:
                return cls(verb=method.lower(), resource_request=False, path=url.path)
            group, rest = parts[1], parts[3:]
        namespace = None
        if len(rest) >= 2 and rest[0] == "namespaces" and (len(rest) > 2):
            namespace, rest = rest[1], rest[2:]
        elif rest and rest[0] == "namespaces":
            # /api/v1/namespaces[/name]: the namespace object itself
            pass
        resource = rest[0] if rest else None
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if resource == "namespaces" and name and namespace is None:
            namespace = name
        watch = query.get("watch", ["false"])[0] in ("1", "true")
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method)
        if verb is None:
            if method in ("GET", "HEAD"):
                verb = "watch" if watch else ("get" if name else "list")
            elif method == "DELETE":
                verb = "delete" if name else "deletecollection"
            else:
                verb = method.lower()
        if sub in ("exec", "attach", "portforward") and method == "GET":
            verb = "create"  # websocket upgrades: the API server authorizes them as create
        patch_type = None
        if method == "PATCH":
            media = (content_type or "").split(";")[0].strip().lower()
            patch_type = PATCH_TYPES.get(media, "unknown")
        # As the API server reads it: a delete's options come from its body when it has one (the
        # query is then ignored; kubectl 1.20 sends `DeleteOptions` with dryRun there), else from
        # the query; every other verb has dryRun in the query. "All" is its only valid value.
        if method == "DELETE" and body.strip():
            dry_run = _delete_options_dry_run(body)
        else:
            dry_run = "All" in query.get("dryRun", [])
        return cls(verb=verb, resource=resource, subresource=sub, namespace=namespace, name=name,
                   api_group=group, path=url.path,
                   label_selector=selector_requirements(query.get("labelSelector", [""])[-1]),
                   field_selector=selector_requirements(query.get("fieldSelector", [""])[-1]),
                   patch_type=patch_type, dry_run=dry_run,
                   command=tuple(query.get("command", ())) if sub == "exec" else ())

    def detail(self) -> dict[str, str | None]:
        """What an operator deciding a held request reads (the approvals' ``detail``)."""
        return {"verb": self.verb, "api_group": self.api_group, "resource": self.resource or self.path,
                "subresource": self.subresource, "namespace": self.namespace, "name": self.name}

    def describe(self) -> str:
        res = self.resource or self.path
        if self.api_group:
            res = f"{res}.{self.api_group}"
        if self.subresource:
            res += f"/{self.subresource}"
        where = f" in {self.namespace}" if self.namespace else ""
        name = f" {self.name}" if self.name else ""
        extra = "".join(f" {label} {','.join(reqs)}" for label, reqs in (("-l", self.label_selector),
                                                                          ("--field-selector", self.field_selector))
                        if reqs)
        if self.patch_type:
            extra += f" ({self.patch_type} patch)"
        if self.dry_run:
            extra += " (dry run)"
        if self.command:
            extra += f" -- {self.command_line}"
        return f"{self.verb} {res}{name}{where}{extra}"
