"""The listener for one PostgreSQL target (TCP or Unix socket): TLS contexts, the upstream
connection, its sessions, close and drain."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any, Callable

from appliance.protocols.postgres import sqlstate
from appliance.tasks import TaskSet

from ..admission import Admission
from ..services import FrontServices
from ..session import drain
from .settings import PgFrontSettings
from .transport import BotProtocol, SetupRefused
from .cancel import CancelForwarding
from .session import Session


log = logging.getLogger(__name__)


class PostgresFront(CancelForwarding):
    """Listener for one target: ``await PostgresFront(settings, services).serve(host, port)``."""

    def __init__(self, settings: PgFrontSettings, services: FrontServices, admission: Admission | None = None):
        self.settings = settings
        self.services = services
        self.admission = admission  # caps on unauthenticated connections (the daemon's, shared by its fronts)
        self.server_ssl: ssl.SSLContext | None = None
        if settings.tls_cert_file:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
            self.server_ssl = ctx
        self.upstream_ssl: ssl.SSLContext | None = None
        if settings.upstream_tls != "disable":
            if settings.upstream_tls == "verify-full":
                ctx = ssl.create_default_context(cafile=settings.upstream_ca_file)
            else:
                # require/prefer encrypt without verifying, as libpq does without a root cert.
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.upstream_ssl = ctx
        # FunctionCall OIDs resolved on the target (oid -> (schema, name)), for the policy.
        # Kept while the services (one config generation) stay the same: a reload re-resolves.
        self.function_names: dict[int, tuple[str, str]] = {}
        self._function_names_for: Any = services
        # (backend pid, secret we gave the bot) -> (real secret, upstream host, upstream port)
        self.cancel_keys: dict[tuple[int, int], tuple[int, str, int]] = {}
        self.sessions: set[Session] = set()
        self._tasks = TaskSet()
        self._server: asyncio.Server | None = None

    def protocol_factory(self) -> asyncio.Protocol:
        try:
            return BotProtocol(self)
        except Exception:  # our bug: the bot gets a clear FATAL now, not a connect timeout
            log.exception("could not set up a session for an accepted connection; refused")
            return SetupRefused()

    def new_session(self, bot: BotProtocol) -> Session:
        return Session(self, bot)

    async def serve(self, host: str, port: int, **kwargs: Any) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.protocol_factory, host, port, **kwargs)
        return self._server

    async def serve_socket(self, sock: Any) -> asyncio.Server:
        """Accept on a listening socket bound elsewhere (appliance.workers > 1: the daemon binds
        it, each worker process accepts on it)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.protocol_factory, sock=sock)
        return self._server

    async def serve_unix(self, path: str) -> asyncio.Server:
        """Listen on a Unix socket (a Unix-socket target: the kernel rewrites bots' connects to
        the database's socket into connects to this one). World-connectable like a loopback
        port: who is calling is decided by attestation (SO_PEERCRED), not by file modes."""
        loop = asyncio.get_running_loop()
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket of a previous run
        self._server = await loop.create_unix_server(self.protocol_factory, path)
        os.chmod(path, 0o666)
        return self._server

    async def _open_upstream(self, factory: Callable[[], Any]) -> tuple[Any, Any]:
        st = self.settings
        loop = asyncio.get_running_loop()
        if st.upstream_unix:
            return await loop.create_unix_connection(factory, st.upstream_host)
        return await loop.create_connection(factory, st.upstream_host, st.upstream_port)

    async def close(self) -> None:
        """Stop listening and end every session."""
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.shutdown(sqlstate.ADMIN_SHUTDOWN, "the appliance is shutting down")
        self._tasks.cancel_all()

    async def drain(self, deadline: float) -> None:
        """Stop listening; let requests in flight finish until ``deadline`` (monotonic), then end
        every session with a shutdown error (57P01) that says botwarden is stopping."""
        await drain(self._server, self.sessions, deadline, lambda s: s.busy,
                    lambda s: s.shutdown(sqlstate.ADMIN_SHUTDOWN, "botwarden is shutting down; reconnect to continue"))

    def spawn(self, coro, name: str) -> asyncio.Task:
        return self._tasks.spawn(coro, name)
