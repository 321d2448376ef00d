"""The Kubernetes front: botwarden between kubectl (or any API client) and a real kube-apiserver.

Data path
=========

One bot TLS connection is one session, as for PostgreSQL. The bot's kubeconfig points at the
API server's real address; the probes redirect the connection here, and the front answers TLS
with the appliance's certificate for the API server's names (signed by a CA the kubeconfig
trusts). ALPN picks the HTTP version: ``h2`` (kubectl's default over TLS) is parsed by the
``h2`` package, ``http/1.1`` by ``h11`` - both sans-IO; this module only wires them to the
socket (:mod:`appliance.fronts.k8s.http`).

1. **Identity** (first request): the bearer token in ``Authorization`` is the bot's OIDC
   token; ``services.open_session`` validates it and the kernel attestation exactly as for
   the other fronts and brings the session's upstream credential: a service-account token
   from OpenBao's kubernetes secrets engine (a lease revoked when the session ends) or a
   static token. Every later request of the connection must carry the same token (401
   otherwise). The bot's token never leaves botwarden.
2. **Decision** per request: :class:`appliance.policy.K8sRequest` reads verb, group,
   version, resource, subresource, namespace and name from the request line the way the
   API server does, plus selectors, a PATCH's type, dry run and an exec's command;
   ``services.decide_k8s`` answers allow / block / approve / mask.
   *block* and *deny* answer a real ``Status`` (403 Forbidden, naming the rule) that kubectl
   prints like an RBAC refusal; *approve* holds the request (kubectl sees a slow request).
3. **Forwarding** (``Session._forward``): httpx over a per-session
   connection pool to the real server, the bot's headers minus hop-by-hop and identity
   headers, the session's token added. Responses stream back as they arrive (``watch``,
   ``logs -f``); a masked response is read as JSON (``Accept`` narrowed to JSON) and Secret
   values (and the rule's ``mask_paths``) are rewritten, event by event for a watch.
4. **Audit** through :class:`appliance.fronts.session.SessionCore`: a ``session_start`` /
   ``session_end`` per connection, one ``requests`` row per API request (protocol ``k8s``, the
   HTTP status in ``sqlstate``, the attributes in ``params``, the response size in ``rows``)
   and the session's recording (each request and response, bodies masked).
"""

from .front import PROTOCOL, K8sFrontSettings, KubernetesFront

__all__ = ["PROTOCOL", "K8sFrontSettings", "KubernetesFront"]
