"""The Kubernetes front's listener and sessions (see the package docstring for the data path)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import httpx

from appliance.errors import BotwardenError
from appliance.fronts.admission import Admission
from appliance.fronts.ssh_cast import TypedLines
from appliance.fronts.services import (AUDIT_RULE, AuthRefused, ConnectionContext, FrontServices, HoldOutcome,
                                       SessionGrant)
from appliance.fronts.session import SessionCore, attribution, format_addr, new_request_id
from appliance.policy.k8s import K8sRequest
from appliance.policy.types import Verdict
from appliance.protocols.kubernetes import (KubernetesProtocolError, MaskPath, ResponseMasker, WatchMasker,
                                            bearer_token, response_headers, status_body, upstream_headers)
from appliance.protocols.kubernetes.streams import (SpdyStreams, StreamProtocolError, WebSocketChannelReader)
from appliance.tasks import TaskSet

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO; a query can carry what the bot passed (an exec command's
# arguments), and no request content goes to the log.
logging.getLogger("httpx").setLevel(logging.WARNING)

PROTOCOL = "k8s"  # as the audit store names it (the config says "kubernetes")
# Upgrade requests (exec/attach/port-forward over SPDY or WebSocket) keep these headers upstream,
# so the API server answers them exactly as it answers the client directly.
_UPGRADE_HEADERS = ("connection", "upgrade")


@dataclass(frozen=True)
class K8sFrontSettings:
    """One listener in front of one Kubernetes API server."""

    target: str
    upstream_host: str
    upstream_port: int
    tls_cert_file: str                   # the appliance's certificate for the API server's names
    tls_key_file: str
    upstream_ca_file: str | None = None  # the API server's CA (None: the system's roots)
    upstream_server_name: str | None = None
    require_token: bool = True           # the bot's bearer token is its OIDC token
    max_body_size: int = 64 * 1024 * 1024
    connect_timeout: float = 10.0
    startup_timeout: float = 30.0        # the first request (with the token) must arrive by then

    def __post_init__(self) -> None:
        if not self.tls_cert_file or not self.tls_key_file:
            raise ValueError("a Kubernetes target needs [tls] cert_file and key_file: kubectl speaks only TLS")
        if not 1024 <= self.max_body_size <= 1 << 30:
            raise ValueError("max_body_size must be between 1 KiB and 1 GiB")


class Responder(Protocol):
    """How an exchange answers on its HTTP version (HTTP/1.1 or one HTTP/2 stream)."""

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def end(self) -> None: ...


@dataclass
class BotRequest:
    method: str
    target: str          # path and query, as sent
    headers: list[tuple[str, str]]
    body: bytes


class KubernetesFront:
    """Listener for one target: ``await KubernetesFront(settings, services).serve(host, port)``."""

    def __init__(self, settings: K8sFrontSettings, services: FrontServices, admission: Admission | None = None):
        self.settings = settings
        self.services = services
        self.admission = admission
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        self.server_ssl = ctx
        # Always verified: the API server's certificate against its CA, for the address (an IP SAN)
        # or for upstream_server_name.
        self.upstream_ssl = ssl.create_default_context(cafile=settings.upstream_ca_file)
        self.sessions: set[Session] = set()
        self._tasks = TaskSet()
        self._server: asyncio.AbstractServer | None = None

    async def serve(self, host: str, port: int, **kwargs: Any) -> asyncio.AbstractServer:
        self._server = await asyncio.start_server(self._accepted, host, port, ssl=self.server_ssl,
                                                  ssl_handshake_timeout=self.settings.startup_timeout, **kwargs)
        return self._server

    def spawn(self, coro, name: str) -> asyncio.Task:
        return self._tasks.spawn(coro, name)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.shutdown("botwarden is shutting down")
        self._tasks.cancel_all()

    async def drain(self, deadline: float) -> None:
        """Stop listening; let requests in flight finish until ``deadline`` (monotonic), then end
        every session (long watches included: kubectl re-establishes them)."""
        if self._server is not None:
            self._server.close()
        while any(s.busy for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            s.shutdown("botwarden is shutting down; reconnect to continue")
        await asyncio.sleep(0)


class Refusal(BotwardenError):
    """An exchange answered by botwarden itself with a ``Status`` (``code``, ``message``)."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, close: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.close = close  # the connection ends after the answer (e.g. the session was refused)


class Session:
    """One bot connection: its identity, its upstream pool, its exchanges."""

    def __init__(self, front: KubernetesFront, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.front = front
        self.services = front.services
        self.settings = front.settings
        self.reader = reader
        self.writer = writer
        # Admission, identity and grant, audit rows, holds and the end: what every front shares.
        self.core = SessionCore(front.services, target=self.settings.target, protocol=PROTOCOL,
                                target_addr=f"{self.settings.upstream_host}:{self.settings.upstream_port}",
                                spawn=front.spawn, terminate=lambda code, message: self.shutdown(message))
        self._token_digest: bytes | None = None
        self._opening: asyncio.Future | None = None
        self.client: httpx.AsyncClient | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.in_flight = 0
        self._recorded_request: str | None = None  # the exchange the recording's last row belongs to
        self.closed = False
        self._ctx: ConnectionContext | None = None
        self._driver: Any = None
        self._ending: asyncio.Future | None = None  # set while an upgraded connection is relayed

    @property
    def session_id(self) -> str | None:
        return self.core.session_id

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        from .http import Http1Driver, Http2Driver

        if not self.core.admit(self.front.admission, self.writer.get_extra_info("socket"), self._admission_closed,
                               format_addr(self.writer.get_extra_info("sockname")) or ""):
            self.writer.close()
            return
        ssl_object = self.writer.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        self._driver = (Http2Driver if alpn == "h2" else Http1Driver)(self)
        try:
            await self._driver.run()
        except asyncio.CancelledError:
            raise
        except (ConnectionError, OSError, ssl.SSLError) as e:
            log.info("kubernetes session ended: %s", e)
        except Exception:
            log.exception("kubernetes session failed")
            self.core.set_outcome("error", "internal error in the Kubernetes front")
        finally:
            await self.finish()

    def _admission_closed(self, reason: str) -> None:
        self.core.set_outcome("error", f"botwarden: {reason}")
        self.shutdown(reason)

    def shutdown(self, reason: str) -> None:
        self.core.set_outcome("terminated", reason)
        if self._ending is not None:  # an upgraded exchange: it tells the client why, then closes
            if not self._ending.done():
                self._ending.set_result(reason)
            return
        if self._driver is not None:
            self._driver.shutdown(reason)
        else:
            self.writer.close()

    async def finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        if self.client is not None:
            await self.client.aclose()
        self.core.end(self.bytes_in, self.bytes_out)  # session_end, admission ticket, grant released

    # ------------------------------------------------------------------ identity
    async def _session_for(self, token: str | None) -> SessionGrant:
        """The session's grant: opened by the first request, the same token required after."""
        digest = hashlib.sha256(token.encode()).digest() if token else b""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open(token))
            self._token_digest = digest
        grant = await asyncio.shield(self._opening)
        if digest != self._token_digest:
            raise Refusal(401, "botwarden: every request of a connection must carry the same token",
                          reason="Unauthorized")
        return grant

    async def _open(self, token: str | None) -> SessionGrant:
        ctx = await self._context()
        self.core.credentials_presented()  # the identity checks bound the connection from here
        if self.settings.require_token and not token:
            self.core.refuse(ctx)
            self.core.set_outcome("refused", "no bearer token")
            raise Refusal(401, "botwarden refused the connection: no bearer token (the kubeconfig's token is "
                               "the bot's OIDC token)", reason="Unauthorized", close=True)
        try:
            grant = await self.core.open(ctx, "", token if token else None)  # a refusal is recorded there
        except AuthRefused as e:
            self.core.set_outcome("refused", e.message)
            code = 401 if e.sqlstate.startswith("28") else 503
            raise Refusal(code, e.message, close=True) from None
        s = self.settings
        self.client = httpx.AsyncClient(
            base_url=f"https://{s.upstream_host}:{s.upstream_port}", verify=self.front.upstream_ssl,
            # No timeout on reads: a watch or `logs -f` stays open as long as the bot wants it.
            timeout=httpx.Timeout(connect=s.connect_timeout, read=None, write=60.0, pool=None),
            headers={"accept-encoding": "identity"}, follow_redirects=False, trust_env=False)
        return grant

    async def _context(self) -> ConnectionContext:
        if self._ctx is None:
            transport = self.writer.transport
            self._ctx = ConnectionContext(self.writer.get_extra_info("peername"),
                                          self.writer.get_extra_info("sockname"), True,
                                          await attribution(self.services, transport))
        return self._ctx

    # ------------------------------------------------------------------ one exchange
    async def exchange(self, req: BotRequest, out: Responder) -> bool:
        """Answer one request. Returns False when the connection must close afterwards."""
        self.in_flight += 1
        t0 = time.time()
        self.bytes_in += len(req.body)
        request_id = new_request_id()
        out = _Counted(out, self, request_id)
        record: dict[str, Any] = {"request_id": request_id, "ts": datetime.fromtimestamp(t0, timezone.utc),
                                  "protocol": PROTOCOL, "kind": "k8s", "text": f"{req.method} {req.target}"}
        k8s: K8sRequest | None = None
        try:
            grant = await self._session_for(bearer_token(req.headers))
            record["session_id"] = grant.session_id
            k8s = K8sRequest.from_http(req.method, req.target, _header(req.headers, "content-type"), req.body)
            record["text"] = f"{k8s.describe()} ({req.method} {urlsplit(req.target).path})"
            # The request's attributes as columns one can query (docs/audit-schema.md, params).
            record["params"] = [k8s.verb, k8s.api_group, k8s.resource, k8s.subresource, k8s.namespace, k8s.name]
            verdict = self.services.decide_k8s(grant, self.settings.target, k8s)
            record.update(decision=verdict.action, rule=verdict.rule, reason=verdict.reason or None)
            # The recording: the request line without its query (which can carry what an exec
            # command was given; the requests row has it, redacted), then its body, masked.
            self.record_event(request_id, {"type": "request", "method": req.method,
                                           "path": urlsplit(req.target).path, "decision": verdict.action})
            self._record_request_body(request_id, req.body, k8s, verdict)
            if verdict.action == "block" and verdict.rule == AUDIT_RULE:  # transient: try again later
                raise Refusal(503, f"botwarden: {verdict.reason}", reason="ServiceUnavailable")
            if verdict.action == "block":
                raise Refusal(403, verdict.reason, reason="Forbidden")
            if (verdict.action == "mask" or verdict.mask_rules) and _is_upgrade(req.headers):
                # botwarden masks objects, not a command's output or a forwarded port's bytes: where
                # a mask applies, nothing it cannot mask reaches the bot (fail closed).
                record.update(decision="block", reason="a mask rule applies and the stream cannot be masked")
                raise Refusal(403, f"botwarden refuses this {k8s.subresource or 'upgrade'}: mask rule(s) "
                                   f"{', '.join(verdict.mask_rules) or verdict.rule} apply to it and botwarden cannot "
                                   f"mask a command's output or a forwarded port's bytes", reason="Forbidden")
            if verdict.action == "approve":
                outcome = await self._hold(grant, k8s, req, verdict, record)
                if not outcome.approved:
                    record["decision"] = "deny"
                    raise Refusal(403, _hold_refusal(outcome), reason="Forbidden")
            await self._record_start(record, verdict)
            masked = await self._forward(grant, req, k8s, verdict, out, record)
            if masked:
                record["masked"] = masked
            return True
        except Refusal as e:
            record.setdefault("decision", "block" if e.code == 403 else "deny")
            record["error"] = e.message
            record["sqlstate"] = str(e.code)
            await self._refuse(out, e, k8s)
            return not e.close
        except asyncio.CancelledError:
            # The bot went away (or reset the stream): a held request is withdrawn, a watch ends.
            if record.get("decision") == "approve" and "sqlstate" not in record:
                record["decision"] = "deny"
            record["error"] = record.get("error") or "the client went away before the answer was complete"
            raise
        finally:
            self.in_flight -= 1
            if "session_id" in record or self.session_id is not None:
                record.setdefault("session_id", self.session_id)
                record["duration_ms"] = (time.time() - t0) * 1000.0
                record["rows"] = out.sent  # the response body's size as the bot got it (masked)
                self.core.audit("request", record)

    # ------------------------------------------------------------------ recording
    def record(self, request_id: str, direction: str, data: bytes) -> None:
        """One chunk of an exchange in the session's recording (SessionCore.record). HTTP/2
        interleaves exchanges: a chunk of another exchange than the last one recorded follows a
        ``{"type": "continue", "request_id": ...}`` event, so each chunk belongs to one request."""
        if direction != "event" and self._recorded_request != request_id:
            self.core.record("event", json.dumps({"type": "continue", "request_id": request_id}).encode())
        self._recorded_request = request_id
        self.core.record(direction, data)

    def record_event(self, request_id: str, doc: dict[str, Any]) -> None:
        self.record(request_id, "event", json.dumps({**doc, "request_id": request_id}, separators=(",", ":")).encode())

    def _record_request_body(self, request_id: str, body: bytes, k8s: K8sRequest, verdict: Verdict) -> None:
        """The request's body as the recording keeps it: an object (JSON with a ``kind``) masked as
        a response would be; another body (a patch, YAML) as sent unless it may carry values a
        rule masks (a Secret, or a mask rule matched): then only its size (fail closed)."""
        if not body:
            return
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("kind"), str):
            ResponseMasker(tuple(d for d in verdict.details if isinstance(d, MaskPath))).mask(doc)
            self.record(request_id, "in", json.dumps(doc, separators=(",", ":")).encode())
        elif k8s.resource != "secrets" and not verdict.mask_rules:
            self.record(request_id, "in", body)
        else:
            self.record_event(request_id, {"type": "withheld", "direction": "in", "bytes": len(body),
                                           "reason": "a body botwarden cannot mask (not an object with a kind)"})

    async def _record_start(self, record: dict, verdict: Verdict) -> None:
        """audit.mode = "strict": the request reaches the API server only once its start record
        is durable (as a statement does; docs/audit-schema.md)."""
        start = {k: record[k] for k in ("request_id", "session_id", "ts", "protocol", "kind", "text", "decision",
                                        "rule")}
        try:
            wait = self.core.record_start(start, verdict)
            if wait is not None:
                await wait
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise Refusal(503, f"botwarden: the audit store cannot take this request's record ({e}); "
                               "no request runs unaudited, try again later", reason="ServiceUnavailable") from None

    async def _refuse(self, out: Responder, e: Refusal, k8s: K8sRequest | None) -> None:
        body = status_body(e.code, e.message, reason=e.reason, name=k8s.name if k8s else None,
                           kind=k8s.resource if k8s else None, group=k8s.api_group if k8s else None)
        await out.start(e.code, [("content-type", "application/json"), ("content-length", str(len(body)))])
        await out.send(body)
        await out.end()

    async def _hold(self, grant: SessionGrant, k8s: K8sRequest, req: BotRequest, verdict: Verdict,
                    record: dict) -> HoldOutcome:
        def notify(approval_id: str) -> None:
            log.info("session %s: %s held for approval %s", grant.session_id, k8s.describe(), approval_id)

        return await self.core.hold(record["text"], verdict, notify, record["request_id"],
                                    detail=k8s.detail())

    async def _forward(self, grant: SessionGrant, req: BotRequest, k8s: K8sRequest, verdict: Verdict,
                       out: Responder, record: dict) -> dict[str, int]:
        """Send the request upstream and stream the answer back; returns the values masked (Secret
        values, and per configured path)."""
        mask = bool(verdict.mask_rules) or verdict.action == "mask"
        paths = tuple(d for d in verdict.details if isinstance(d, MaskPath))
        if not mask and k8s.resource == "secrets" and isinstance(out, _Counted):
            out.withhold("Secret values no rule masks stay out of the recording")
        headers = upstream_headers(req.headers, grant.credential.password, narrow_json=mask)
        if _is_upgrade(req.headers):
            wanted = (_header(req.headers, "upgrade") or "").strip().lower()
            if not (wanted.startswith("spdy/3") or wanted == "websocket"):
                # The recording could not read it (fail closed): nothing goes upstream.
                raise Refusal(400, f"botwarden relays upgrades to SPDY/3.1 and WebSocket only, not {wanted!r}",
                              reason="BadRequest")
            headers += [(n.lower(), v) for n, v in req.headers if n.lower() in _UPGRADE_HEADERS]
        assert self.client is not None
        try:
            sni = self.settings.upstream_server_name
            upstream = self.client.build_request(req.method, req.target, headers=headers,
                                                 content=req.body if req.body else None,
                                                 extensions={"sni_hostname": sni} if sni else None)
            resp = await self.client.send(upstream, stream=True)
        except httpx.HTTPError as e:
            unverified = _certificate_error(e)
            if unverified is not None:
                # Not the API server the target names (its CA, its name): nothing is sent to it.
                self.core.upstream_failed("tls")
                raise Refusal(503, f"botwarden refused the Kubernetes API server of target {self.settings.target!r}: "
                                   f"its certificate does not verify against the target's [targets.tls] ca_file"
                                   f"{' and server_name' if self.settings.upstream_server_name else ''} "
                                   f"({unverified.verify_message or unverified.reason})",
                              reason="ServiceUnavailable") from None
            if isinstance(e, httpx.ConnectError):
                self.core.upstream_failed("tcp")
            raise Refusal(503, f"botwarden could not reach the Kubernetes API server of target "
                               f"{self.settings.target!r}: {type(e).__name__}: {e}",
                          reason="ServiceUnavailable") from None
        try:
            record["sqlstate"] = str(resp.status_code)
            if resp.status_code == 101:
                return await self._relay_upgrade(req, k8s, resp, out, record)
            ctype = resp.headers.get("content-type")
            watch = k8s.verb == "watch" or k8s.subresource == "log"  # streams: masked event by event
            if mask and resp.status_code < 300 and not watch:
                body = await resp.aread()
                masker = ResponseMasker(paths)
                try:
                    body = masker.mask_body(body, ctype)
                except KubernetesProtocolError as e:
                    raise Refusal(e.status, e.message) from None
                hdrs = response_headers(resp.headers.multi_items(), drop_length=True)
                await out.start(resp.status_code, hdrs + [("content-length", str(len(body)))])
                await out.send(body)
                await out.end()
                return masker.masked
            masker = ResponseMasker(paths)
            stream = WatchMasker(masker, self.settings.max_body_size) if mask and resp.status_code < 300 else None
            await out.start(resp.status_code, response_headers(resp.headers.multi_items(), drop_length=stream is not None))
            try:
                async for chunk in resp.aiter_raw():
                    if stream is not None:
                        chunk = stream.feed(chunk)
                    if chunk:
                        await out.send(chunk)
                if stream is not None:
                    tail = stream.close()
                    if tail:
                        await out.send(tail)
            except KubernetesProtocolError as e:
                record["error"] = e.message
                out_abort = getattr(out, "abort", None)
                if out_abort is not None:
                    out_abort()
                return masker.masked
            except httpx.HTTPError as e:
                record["error"] = f"the API server's answer broke off: {e}"
                out_abort = getattr(out, "abort", None)
                if out_abort is not None:
                    out_abort()
                return masker.masked
            await out.end()
            if resp.status_code >= 400:
                record["error"] = f"HTTP {resp.status_code} from the API server"
            return masker.masked
        finally:
            await resp.aclose()

    async def _relay_upgrade(self, req: BotRequest, k8s: K8sRequest, resp: httpx.Response, out: "_Counted",
                             record: dict) -> dict[str, int]:
        """The API server switched protocols (exec, attach, port-forward): the 101 goes to the bot
        and the bytes are piped both ways, unchanged, until either side closes or the session
        ends. A copy of each direction is read on the side for the recording (:class:`_StreamRecord`)."""
        upstream = resp.extensions.get("network_stream")
        if upstream is None:  # httpcore gives the connection of every 101 it reads
            raise Refusal(502, "botwarden: the API server's upgraded connection is not available",
                          reason="InternalError", close=True)
        headers = [(n.lower(), v) for n, v in resp.headers.multi_items()]
        client = await out.switch(101, headers)
        rec = _StreamRecord(self, record["request_id"], k8s, resp.headers.get("upgrade", ""),
                            resp.headers.get("x-stream-protocol-version") or resp.headers.get("sec-websocket-protocol")
                            or "", tty=_query_flag(req.target, "tty"))

        async def from_bot() -> None:
            while data := await client.read():
                # Only while the audit store can take its record (an exec's stdin is typed commands).
                if not await self.core.input_may_go_on(lambda: ending.done()):
                    return
                self.bytes_in += len(data)
                rec.from_client(data)
                await upstream.write(data)

        async def from_server() -> None:
            while data := await upstream.read(65536):
                out.count(len(data))
                rec.from_server(data)
                await client.write(data)

        tasks = [asyncio.ensure_future(from_bot()), asyncio.ensure_future(from_server())]
        self._ending = ending = asyncio.get_running_loop().create_future()
        try:
            done, _ = await asyncio.wait([*tasks, ending], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is ending:
                    continue
                if isinstance(t.exception(), StreamProtocolError):
                    record["error"] = (f"botwarden closed the upgraded connection: {t.exception()} "
                                       f"(not relayed: it could not be recorded)")
                elif t.exception() is not None and not isinstance(t.exception(), (ConnectionError, OSError,
                                                                                    httpx.HTTPError, ssl.SSLError)):
                    record["error"] = f"the upgraded connection broke off: {t.exception()}"
        finally:
            self._ending = None
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if ending.done() and not ending.cancelled():
                # The session ended (operator, TTL, shutdown): the client reads why on the error
                # channel, as it reads a command's failure, where the stream is between frames.
                record["error"] = ending.result()
                frame = rec.error_frame(ending.result())
                if frame:
                    with contextlib.suppress(ConnectionError, OSError):
                        await asyncio.wait_for(client.write(frame), 2.0)
            else:
                ending.cancel()
            with contextlib.suppress(Exception):
                await upstream.aclose()
            client.close()
            rec.close(record)
        return {}


class _Counted:
    """A responder that counts the body bytes it sends (the request's response size, the
    session's bytes_out) and records them (what the bot got, after masking)."""

    def __init__(self, out: Responder, session: "Session", request_id: str):
        self._out = out
        self._session = session
        self._request_id = request_id
        self._withheld: str | None = None
        self.sent = 0

    def withhold(self, reason: str) -> None:
        """The response's body stays out of the recording (its size is recorded)."""
        self._withheld = reason

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        ctype = next((v for n, v in headers if n.lower() == "content-type"), None)
        self._session.record_event(self._request_id, {"type": "response", "status": status, "content_type": ctype})
        await self._out.start(status, headers)

    async def send(self, data: bytes) -> None:
        self.sent += len(data)
        self._session.bytes_out += len(data)
        if self._withheld is None:
            self._session.record(self._request_id, "out", data)
        await self._out.send(data)

    async def end(self) -> None:
        if self._withheld is not None:
            self._session.record_event(self._request_id, {"type": "withheld", "direction": "out", "bytes": self.sent,
                                                          "reason": self._withheld})
        await self._out.end()

    async def switch(self, status: int, headers: list[tuple[str, str]]) -> "UpgradedClient":
        switch = getattr(self._out, "switch", None)
        if switch is None:
            raise Refusal(400, "botwarden: exec, attach and port-forward need an HTTP/1.1 connection "
                               "(an HTTP/2 request cannot be upgraded)", reason="BadRequest")
        self._session.record_event(self._request_id, {"type": "response", "status": status})
        return await switch(status, headers)

    def count(self, n: int) -> None:
        """Bytes of an upgraded connection sent to the bot (relayed, not through :meth:`send`)."""
        self.sent += n
        self._session.bytes_out += n

    def abort(self) -> None:
        abort = getattr(self._out, "abort", None)
        if abort is not None:
            abort()


def _certificate_error(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind an httpx error (httpx wraps httpcore's, which
    wraps ssl's), or None."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 8:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for n, v in headers if n.lower() == name), None)


def _is_upgrade(headers: list[tuple[str, str]]) -> bool:
    return any(n.lower() == "upgrade" for n, _ in headers)


def _hold_refusal(outcome: HoldOutcome) -> str:
    state = getattr(outcome, "state", "")
    reason = outcome.reason or "no reason given"
    where = f" (approval {outcome.approval_id})" if outcome.approval_id else ""
    if state == "expired":
        return f"botwarden: request not approved in time: {reason}{where}"
    if state == "withdrawn":
        return f"botwarden: request withdrawn while it waited for approval{where}"
    return f"botwarden: request {reason}{where}" if state == "denied" else f"botwarden: request not approved: {reason}{where}"


def _query_flag(target: str, name: str) -> bool:
    return any(v.lower() in ("1", "true") for v in parse_qs(urlsplit(target).query).get(name, ()))


class UpgradedClient(Protocol):
    """The bot's side of a switched connection (HTTP/1.1 only)."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class _StreamRecord:
    """What an upgraded exchange leaves in the recording, read from a copy of its bytes: an
    ``exec`` event (exec/attach; the command itself is in the requests row, redacted, not here),
    stdout and stderr as "out" rows as the bot got them (asciicast output on export), resizes,
    and an ``exec_end`` event with the exit code and the byte counts. Stdin is counted, not
    recorded (it may be a file or a secret piped to the command: the SSH front's rule), except
    on a terminal, where keystrokes are recorded as an SSH shell's are (password answers as *s).
    Port-forward: bytes counted per direction only. Bytes that cannot be read as the negotiated
    protocol raise StreamProtocolError: the relay closes rather than pass what it cannot record."""

    def __init__(self, session: "Session", request_id: str, k8s: K8sRequest, upgrade: str, protocol: str, *,
                 tty: bool):
        self.session = session
        self.request_id = request_id
        self.kind = k8s.subresource or "upgrade"
        self.terminal = self.kind in ("exec", "attach")
        self.counts = {"stdin": 0, "stdout": 0, "stderr": 0, "data_in": 0, "data_out": 0}
        self.exit_code: int | None = None
        self.unreadable: str | None = None
        self._error = bytearray()
        # A terminal (exec -t, attach -t): keystrokes are recorded as the SSH front records a
        # shell's, an answer to a password prompt as *s. Without one, stdin is only counted.
        self._typed = TypedLines() if tty and self.terminal else None
        if upgrade.lower().startswith("spdy"):
            self._client, self._server = SpdyStreams().readers()
        elif upgrade.lower() == "websocket":
            b64 = protocol.startswith("base64.")
            self._client, self._server = WebSocketChannelReader(True, b64), WebSocketChannelReader(False, b64)
        else:
            self._client = self._server = None
            self.unreadable = f"an upgrade to {upgrade!r} botwarden does not read"
        session.record_event(request_id, {"type": self.kind, "protocol": protocol or upgrade, "tty": tty})

    def error_frame(self, message: str) -> bytes | None:
        """A ``Status`` (Failure, the message) on the error channel to the client, or None where
        none can be sent (no error stream known, or the server's stream stopped mid-frame)."""
        status = json.dumps({"metadata": {}, "status": "Failure", "message": message,
                             "reason": "InternalError"}).encode()
        if self.unreadable or self._server is None or not self._server.at_boundary:
            return None
        return self._server.error_frame(status)

    def _read(self, reader, data: bytes):
        if reader is None or self.unreadable:
            return ()
        try:
            return reader.feed(data)
        except StreamProtocolError as e:
            # Not relayed: bytes the recording cannot read would go unrecorded (fail closed).
            self.unreadable = str(e)
            raise

    def from_client(self, data: bytes) -> None:
        for c in self._read(self._client, data):
            if c.channel == "stdin":
                self.counts["stdin"] += len(c.data)
                if self._typed is not None:
                    self.session.record(self.request_id, "in", self._typed.redact(c.data))
                    self._typed.feed(c.data)
            elif c.channel == "resize" and self.terminal:
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    size = json.loads(c.data)
                    self.session.record_event(self.request_id, {"type": "resize", "width": int(size["Width"]),
                                                                "height": int(size["Height"])})
            elif c.channel == "data":
                self.counts["data_in"] += len(c.data)

    def from_server(self, data: bytes) -> None:
        for c in self._read(self._server, data):
            if c.channel in ("stdout", "stderr") and self.terminal:
                self.counts[c.channel] += len(c.data)
                self.session.record(self.request_id, "out", c.data)
                if self._typed is not None:
                    self._typed.output(c.data)
            elif c.channel == "error" and len(self._error) < 65536:
                self._error += c.data
            elif c.channel == "data":
                self.counts["data_out"] += len(c.data)

    def close(self, record: dict) -> None:
        if self._error:
            self.exit_code = _exit_code(bytes(self._error))
        doc: dict[str, Any] = {"type": f"{self.kind}_end", **{k: v for k, v in self.counts.items() if v}}
        if self.exit_code is not None:
            doc["exit_code"] = self.exit_code
        if self.unreadable:
            doc["unreadable"] = self.unreadable
        self.session.record_event(self.request_id, doc)
        if self.exit_code is not None:
            record["params"] = [*record.get("params", []), f"exit_code={self.exit_code}"]


def _exit_code(status: bytes) -> int | None:
    """The exit code in the error channel's ``Status`` (v4+: Success is 0, NonZeroExitCode names
    it in details.causes); None for another error or text (v1-v3 send plain text)."""
    try:
        doc = json.loads(status)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if doc.get("status") == "Success":
        return 0
    for cause in (doc.get("details") or {}).get("causes") or ():
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            with contextlib.suppress(ValueError, TypeError):
                return int(cause.get("message"))
    return None
