"""Session start: TLS, the bot's token, the grant, the upstream connection and its login."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Any, Awaitable, Callable

from appliance.policy.engine import DEFAULT_SEARCH_PATH
from appliance.policy.reading import TRACKED_PARAMETERS
from appliance.policy.sql import split_search_path
from appliance.policy.redact import redact_value
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres import sqlstate
from appliance.protocols.postgres.auth import SCRAM_SHA_256, ScramClient, md5_password
from appliance.protocols.postgres.connection import (ConnectionClosed, negotiate_reply, startup_for_server,
                                                     startup_settings)
from appliance.protocols.postgres.errors import PgProtocolError

from ..services import AuthRefused, ConnectionContext, SessionGrant
from ..session import attribution as _attribution
from .recording import PgRecorder
from .settings import FrontError
from .transport import UpstreamProtocol

log = logging.getLogger(__name__)


def _texts(values) -> tuple[str | None, ...]:
    return tuple(None if v is None else bytes(v).decode("utf-8", "replace") for v in values)


class OwnAnswers:
    """The replies to botwarden's own queries on a session (``n`` of them, sent at once): each
    one's rows as text, up to its ReadyForQuery; an error refuses what was asked (``result``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.rows: list[list[tuple[str | None, ...]]] = [[]]
        self.failed: m.ErrorResponse | None = None

    def row(self, values) -> None:
        self.rows[-1].append(_texts(values))

    def raw_row(self, message: bytes) -> None:
        """A DataRow message kept as it came, decoded later by :meth:`decode` (a mid-session
        reply arrives inside the protocol's callbacks, which cannot give the loop a turn)."""
        self.rows[-1].append(message)  # type: ignore[arg-type]

    async def decode(self, values: Callable[[bytes, int, int], Any]) -> None:
        """The rows :meth:`raw_row` kept, decoded with ``values`` (wire._row_values), the event
        loop given a turn every _ROWS_PER_TURN of them, as _ask_server reads its own."""
        n = 0
        for rows in self.rows:
            for i, message in enumerate(rows):
                rows[i] = _texts(values(message, 0, len(message)))  # type: ignore[arg-type]
                n += 1
                if n % _ROWS_PER_TURN == 0:
                    await asyncio.sleep(0)

    def error(self, err: m.ErrorResponse) -> None:
        self.failed = self.failed or err

    def ready(self) -> bool:
        """One query answered; True when it was the last."""
        if len(self.rows) == self.n:
            return True
        self.rows.append([])
        return False

    def result(self, what: str) -> list[list[tuple[str | None, ...]]]:
        if self.failed is not None:
            raise FrontError(sqlstate.CONNECTION_FAILURE, f"botwarden could not read {what} from the target: "
                             f"{self.failed.message}")
        return self.rows


# What the policy follows of a session's settings (see _decide_startup_settings).
_DECIDED_SETTINGS = frozenset({"search_path", "role", "session_authorization"})
# The session's search_path and roles as the server set them up (_decide_session_defaults).
_DEFAULTS_QUERY = "SELECT pg_catalog.current_setting('search_path'), current_user::text, session_user::text"


# A catalog answer of this many rows or more is read off the event loop (below: the thread hand-off
# costs ~0.1 ms, more than reading a small catalog's answer).
_OFF_LOOP_ROWS = 500
# Views, functions and written relations learned from which the policy engine analyses them off
# the event loop (their bodies: ~70 µs each the first time).
_OFF_LOOP_TEXTS = 50
# Rows of botwarden's own answers read before the event loop gets a turn (_ask_server).
_ROWS_PER_TURN = 200


async def _run(off_loop: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, in a thread when ``off_loop`` (a big catalog: the caller waits either way)."""
    return await asyncio.to_thread(fn, *args) if off_loop else fn(*args)


def _first_round(lookup: Any, found: list) -> str | None:
    """The dependencies' and functions' answers read; the next round's question, or None."""
    lookup.dependencies(found[0])
    lookup.functions(found[1])
    return lookup.next_functions_query()


def _next_round(lookup: Any, answered: list, early: str | None) -> str | None:
    lookup.functions(answered[0])
    if early:
        lookup.add_definitions(answered[1])
    return lookup.next_functions_query()


class StartupMixin:
    """Session start: TLS, the bot's token, the grant, the upstream connection and its login
    (part of :class:`Session`)."""

    async def run_startup(self) -> None:
        try:
            await asyncio.wait_for(self._startup(), self.settings.startup_timeout)
        except asyncio.TimeoutError:
            self._refused_before_login("the session did not start in time")
            self.fatal(sqlstate.CONNECTION_FAILURE, "the session did not start in time", outcome="error")
        except FrontError as e:
            if e.server_error is not None:
                # The server's own words (e.g. 3D000 database does not exist) reach the bot unchanged.
                self.core.outcome, self.core.end_error = "refused", e.server_error.message
                self.write_bot(e.server_error.encode())
                self.close()
            else:
                self.fatal(e.sqlstate, e.message, outcome="refused" if e.sqlstate.startswith("28") else "error")
        except PgProtocolError as e:
            self._refused_before_login(f"protocol error: {e.message}")
            self.fatal(e.sqlstate, e.message)
        except (ConnectionError, OSError) as e:
            if not self.closed:
                log.info("session startup ended: %s", e)
                self.core.outcome = "error"
                self.core.end_error = str(e)
                self.close()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session startup failed")
            self.fatal(sqlstate.INTERNAL_ERROR, "internal error while starting the session")

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        codec = self.bot_waiter.codec
        ev = await self.bot_waiter.next()
        while isinstance(ev, (m.SSLRequest, m.GSSENCRequest)):
            if isinstance(ev, m.SSLRequest) and self.front.server_ssl is not None and not self.tls:
                self.write_bot(codec.send(m.SSLResponse(True)))
                self.bot.transport = await loop.start_tls(self.bot.transport, self.bot, self.front.server_ssl,
                                                          server_side=True)
                self.tls = True
            else:
                self.write_bot(codec.send(m.SSLResponse(False)))
            ev = await self.bot_waiter.next()
        if isinstance(ev, m.CancelRequest):
            await self.front.cancel(ev)
            self.close()
            return
        if isinstance(ev, ConnectionClosed):
            self.close()
            return
        startup: m.StartupMessage = ev
        if not self.tls and not self.settings.allow_plaintext:
            raise FrontError(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                             "this target requires TLS; connect with sslmode=require or stronger")
        reply = negotiate_reply(startup)
        if reply is not None:
            self.write_bot(reply.encode())
        user = startup.get("user")
        if not user:
            raise FrontError(sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, "no user name in the startup packet")
        token: str | None = None
        if self.settings.require_token:
            self.write_bot(m.AuthenticationCleartextPassword().encode())
            ev = await self.bot_waiter.next()
            if not isinstance(ev, m.PasswordMessage):
                raise FrontError(sqlstate.PROTOCOL_VIOLATION, "expected a password message carrying the token")
            token = ev.password_text()
        self.core.credentials_presented()  # the identity checks bound the connection from here
        transport = self.bot.transport
        ctx = ConnectionContext(transport.get_extra_info("peername"), transport.get_extra_info("sockname"),
                                self.tls, await _attribution(self.services, transport))
        try:
            grant = await self.core.open(ctx, user, token)  # a refusal is recorded there
        except AuthRefused as e:
            raise FrontError(e.sqlstate, e.message) from None
        finally:
            token = None  # the token is not kept past this point
        self._decide_startup_settings(startup)
        await self._connect_upstream(grant, startup)

    def _decide_startup_settings(self, startup: m.StartupMessage) -> None:
        """The settings the policy reads (search_path, role) that the startup packet makes
        (``options=-c search_path=...``, or a parameter of their own) apply before the first
        statement: each is decided as ``set_config`` in that statement would be (a search_path
        joins the session's, a role is a role switch), and one refused refuses the connection."""
        self._decide_settings(startup_settings(startup), "setting {name} at connection start")

    def _decide_settings(self, settings, what: str) -> None:
        for name, value in settings:
            if name not in _DECIDED_SETTINGS:
                continue
            literal = "'" + value.replace("'", "''") + "'"
            verdict = self._decide(f"SELECT pg_catalog.set_config('{name}', {literal}, false)", "startup")
            if verdict.action in ("allow", "mask"):
                continue
            why = verdict.reason or f"rule {verdict.rule!r}"
            if verdict.action == "approve":
                why = f"{why} (a hold cannot be asked for at connection start: set it with a statement)"
            raise FrontError(sqlstate.INSUFFICIENT_PRIVILEGE, f"{what.format(name=name)} is refused: {why}")

    async def _decide_session_defaults(self) -> None:
        """What the session starts with that the startup packet did not say: a search_path (or a
        role) set by ``ALTER DATABASE``/``ALTER ROLE ... SET`` or the server's configuration,
        and the views, functions, triggers and rules made before the session over relations a rule names
        (policy/catalog.py). Read from the server before the bot's first statement (one round
        trip; when the catalog changed since the engine last read it, a few more; the bot's
        ReadyForQuery waits). The search_path and role are decided as the startup packet's
        settings are: a search_path joins the session's, another role is a role switch."""
        find = getattr(self.services, "catalog_lookup", None)
        lookup = find(self.core.grant, self.settings.target) if find is not None else None
        answers = await self._ask_server([_DEFAULTS_QUERY] + ([lookup.probe_query] if lookup is not None else []),
                                         "the session's search_path, role and catalog")
        values = answers[0][0] if len(answers[0]) == 1 else None
        if values is None or len(values) != 3 or None in values:
            raise FrontError(sqlstate.CONNECTION_FAILURE, "botwarden could not read the session's search_path "
                             "and role from the target: no answer")
        path, current, session = values
        settings = []
        if set(split_search_path(path)) != set(DEFAULT_SEARCH_PATH):
            settings.append(("search_path", path))
        if current != session:
            settings.append(("role", current))
        self._decide_settings(settings, "the session's default {name} (ALTER ROLE/DATABASE ... SET, or the "
                                        "server's configuration)")
        if lookup is None:
            return
        await self._read_catalog(lookup, answers[1], self._ask_server)
        self._catalog_next = time.monotonic() + self.settings.catalog_recheck_s if self.settings.catalog_recheck_s else 0.0

    async def _read_catalog(self, lookup: Any, probe: list, ask: Callable[[list[str], str], Awaitable[list]], *,
                            again: bool = False) -> None:
        """What ``lookup`` finds in the catalog (policy/catalog.py), given to the policy engine for
        this session: the answers cached under the counters ``probe`` read, or read now with
        ``ask`` (a few round trips on the session). ``again``: a re-read during the session
        (recheck.py), whose answers replace what the session knew, even when there are none."""
        try:
            learned = lookup.cached(probe)
            if learned is None:
                found = await ask(lookup.queries, "the views and functions")
                # A big catalog's answers are read off the event loop (the lookup is this
                # session's alone, and it waits): 10-20 ms of Python for 500 views, 200 functions
                # and 1,000 foreign keys, which would hold every other session (bench/catalog_stall.py).
                # Under the GIL the loop still gets its turn every switch interval (5 ms).
                off_loop = sum(map(len, found)) >= _OFF_LOOP_ROWS
                more = await _run(off_loop, _first_round, lookup, found)
                while more is not None:
                    early = lookup.definitions_query()  # the views known so far, in the same round trip
                    answered = await ask([more] + ([early] if early else []), "the functions")
                    more = await _run(off_loop, _next_round, lookup, answered, early)
                query = lookup.definitions_query()
                answered = (await ask([query], "the definitions of views"))[0] if query else []
                learned = (await _run(off_loop, lookup.definitions, answered), lookup.learned_functions, lookup.effects)
                lookup.remember(learned)
        except ValueError as e:
            raise FrontError(sqlstate.CONNECTION_FAILURE, f"botwarden could not read the target's catalog: {e}") from None
        if again and learned is not self._catalog_seen:
            self._catalog_epoch += 1  # statements parsed before are decided again at their next Bind
        self._catalog_seen = learned
        views, functions, effects = learned
        if views or functions or effects or again:
            # Analysing hundreds of view and function bodies the first time (50-70 ms for 700)
            # runs off the loop too; the policy engine's caches take a second thread.
            await _run(len(views) + len(functions) + len(effects) >= _OFF_LOOP_TEXTS, self.services.learn_catalog,
                       self.core.grant, views, functions, effects)

    async def _ask_server(self, queries: list[str], what: str) -> list[list[tuple[str | None, ...]]]:
        """Botwarden's own queries on the session before the bot's first statement, sent at once:
        each one's rows as text. An error refuses the connection (fail closed: what botwarden
        cannot read, it cannot decide)."""
        self.upstream.transport.write(b"".join(m.Query(q).encode() for q in queries))
        answers = OwnAnswers(len(queries))
        n = 0
        while True:
            ev = await self.server_waiter.next()
            if isinstance(ev, m.DataRow):
                answers.row(ev.values)
                n += 1
                if n % _ROWS_PER_TURN == 0:
                    # Rows the server sent at once are all ready: without a turn given back, a big
                    # catalog's thousands would hold every other session for 10 ms and more.
                    await asyncio.sleep(0)
            elif isinstance(ev, m.ErrorResponse):
                answers.error(ev)
            elif isinstance(ev, m.ReadyForQuery):
                if answers.ready():
                    return answers.result(what)
            elif isinstance(ev, ConnectionClosed):
                raise FrontError(sqlstate.CONNECTION_FAILURE, "the server closed the connection during startup")

    async def _connect_upstream(self, grant: SessionGrant, startup: m.StartupMessage) -> None:
        loop = asyncio.get_running_loop()
        st = self.settings
        try:
            _, proto = await asyncio.wait_for(self.front._open_upstream(lambda: UpstreamProtocol(self)),
                                              st.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self.core.upstream_failed("tcp")
            raise FrontError(sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                             f"could not connect to the target {st.target!r}: {e or 'timeout'}") from e
        self.upstream = proto
        if self.closed:
            proto.transport.close()
            return
        codec = self.server_waiter.codec
        if st.upstream_tls != "disable":
            proto.transport.write(codec.send(m.SSLRequest()))
            ev = await self.server_waiter.next()
            if isinstance(ev, m.SSLResponse) and ev.accepted:
                try:
                    proto.transport = await loop.start_tls(
                        proto.transport, proto, self.front.upstream_ssl,
                        server_hostname=st.upstream_host if st.upstream_tls == "verify-full" else None)
                except (ssl.SSLError, OSError) as e:
                    self.core.upstream_failed("tls")
                    raise FrontError(sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                                     f"TLS to the target {st.target!r} failed: {e}") from e
            elif isinstance(ev, m.ErrorResponse):
                raise FrontError(ev.sqlstate or sqlstate.CONNECTION_FAILURE, "", server_error=ev)
            elif st.upstream_tls != "prefer":
                raise FrontError(sqlstate.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                                 f"the target {st.target!r} does not accept TLS (upstream_tls = {st.upstream_tls})")
        cred = grant.credential
        proto.transport.write(codec.send(startup_for_server(startup, cred.username)))
        await self._authenticate_upstream(cred.username, cred.password)
        self.write_bot(m.AuthenticationOk().encode())
        # Until ReadyForQuery: ParameterStatus/Notice as sent, BackendKeyData with our secret.
        server_params: dict[str, str] = {}
        while True:
            ev = await self.server_waiter.next()
            if isinstance(ev, m.ReadyForQuery):
                await self._decide_session_defaults()
                self.write_bot(ev.encode())
                self.txn_status = ev.status
                break
            if isinstance(ev, m.BackendKeyData):
                self.write_bot(self._remap_key(ev.pid, ev.secret))
            elif isinstance(ev, m.ErrorResponse):
                raise FrontError(ev.sqlstate or sqlstate.CONNECTION_FAILURE, "", server_error=ev)
            elif isinstance(ev, ConnectionClosed):
                raise FrontError(sqlstate.CONNECTION_FAILURE, "the server closed the connection during startup")
            elif isinstance(ev, (m.ParameterStatus, m.NoticeResponse, m.NegotiateProtocolVersion)):
                if isinstance(ev, m.ParameterStatus):
                    server_params[ev.name] = ev.value
                    if ev.name in TRACKED_PARAMETERS:
                        self._reading = self._reading.with_parameter(ev.name, ev.value)
                if not isinstance(ev, m.NegotiateProtocolVersion):
                    self.write_bot(ev.encode())
            else:
                raise FrontError(sqlstate.PROTOCOL_VIOLATION,
                                 f"the server sent {type(ev).__name__} during startup")
        self._to_bot = self.bot.transport.write
        self._to_server = self.upstream.transport.write
        self._record_startup(startup, server_params)
        self.relaying = True
        rest_server = self.server_waiter.codec.trailing_data
        rest_bot = self.bot_waiter.codec.trailing_data
        if rest_server:
            self.server_data(rest_server)
        if rest_bot:
            if self.recorder is not None:
                self.recorder.sent(rest_bot)
            self.client_data(rest_bot)

    def _record_startup(self, startup: m.StartupMessage, server_params: dict[str, str]) -> None:
        """The startup as one recording event, never its password message (the token) or the
        credential; then, when the target records sessions' bytes, the recorder on the relay."""
        core = self.core
        core.record("event", json.dumps({
            "type": "pg_startup", "protocol_version": f"{startup.major}.{startup.minor}",
            # The bot's parameters as it sent them (a value a detector flags is masked).
            "parameters": {k: redact_value(v) for k, v in startup.params},
            "server_parameters": server_params, "backend_pid": self.backend_pid, "tls": self.tls,
            "authentication": self.settings.authentication or ("token" if self.settings.require_token else "attestation"),
            "password": "not recorded", "credential_user": core.grant.credential.username if core.grant else None,
            "recording": "full" if core.recording_full else "metadata",
        }).encode())
        if core.recording_full:
            self.recorder = PgRecorder(core, self)
            self._to_bot = self.recorder.writer(self._to_bot)

    async def _authenticate_upstream(self, user: str, password: str | None) -> None:
        write = self.upstream.transport.write
        scram: ScramClient | None = None

        def need_password() -> str:
            if password is None:
                raise FrontError(sqlstate.INVALID_PASSWORD,
                                 "the target asks for a password but the session's credential has none")
            return password

        while True:
            ev = await self.server_waiter.next()
            if isinstance(ev, m.AuthenticationOk):
                return
            if isinstance(ev, m.AuthenticationCleartextPassword):
                write(m.PasswordMessage.password(need_password()).encode())
            elif isinstance(ev, m.AuthenticationMD5Password):
                write(m.PasswordMessage.password(md5_password(user, need_password(), ev.salt)).encode())
            elif isinstance(ev, m.AuthenticationSASL):
                if SCRAM_SHA_256 not in ev.mechanisms:
                    raise FrontError(sqlstate.FEATURE_NOT_SUPPORTED,
                                     f"the target offers SASL mechanisms {list(ev.mechanisms)}, none supported")
                scram = ScramClient(need_password())
                write(m.PasswordMessage.sasl_initial(SCRAM_SHA_256, scram.client_first()).encode())
            elif isinstance(ev, m.AuthenticationSASLContinue) and scram is not None:
                write(m.PasswordMessage(scram.client_final(ev.data)).encode())
            elif isinstance(ev, m.AuthenticationSASLFinal) and scram is not None:
                scram.verify_server_final(ev.data)
            elif isinstance(ev, m.ErrorResponse):
                raise FrontError(ev.sqlstate or sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, "",
                                 server_error=ev)
            elif isinstance(ev, m.NegotiateProtocolVersion):
                continue
            elif isinstance(ev, ConnectionClosed):
                raise FrontError(sqlstate.CONNECTION_FAILURE, "the server closed the connection during login")
            else:
                raise FrontError(sqlstate.FEATURE_NOT_SUPPORTED,
                                 f"the target asks for an authentication method botwarden does not speak "
                                 f"({type(ev).__name__})")
