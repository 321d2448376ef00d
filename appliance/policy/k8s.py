"""Kubernetes API requests as the policy sees them (pure).

:meth:`K8sRequest.from_http` reads the verb, resource, subresource, namespace and
name from an API server request line the way the API server's own
RequestInfoResolver does (``/api/v1/namespaces/ns/pods/name/exec``,
``/apis/group/version/...``, ``?watch=true``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit


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

    @classmethod
    def from_http(cls, method: str, target: str) -> "K8sRequest":
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
        return cls(verb=verb, resource=resource, subresource=sub, namespace=namespace, name=name,
                   api_group=group, path=url.path)

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
        return f"{self.verb} {res}{name}{where}"
