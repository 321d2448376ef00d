"""The PostgreSQL front: botwarden's Layer-7 inspector between a bot and its real database.

Data path
=========

One bot connection is one :class:`BotProtocol` (an ``asyncio.Protocol``, not
streams, so uvloop delivers bytes straight into our buffer) paired with one
:class:`UpstreamProtocol` to the real server. There is no pooling: the bot's
session *is* one server session, so backend PIDs, prepared statements,
LISTEN and temp tables behave exactly as they would directly.

1. **Startup** (a coroutine, ``Session.run_startup``): the sans-IO codec
   (:mod:`appliance.protocols.postgres`) parses SSLRequest / GSSENCRequest
   ('N') / CancelRequest / StartupMessage. SSLRequest gets 'S' and
   ``loop.start_tls`` with the appliance's certificate. The bot's password
   field carries its OIDC token (AuthenticationCleartextPassword), which goes
   to ``services.open_session``; the grant brings the real credential. We
   connect to the target (TLS per settings), send the bot's startup
   parameters verbatim with only ``user`` replaced, and answer SCRAM / MD5 /
   cleartext with the credential. From AuthenticationOk on, the server's
   ParameterStatus messages go to the bot as sent; BackendKeyData keeps the
   real PID and gets our own secret (the front maps it back for
   CancelRequest). Before the first ReadyForQuery reaches the bot, one query
   of ours reads the session's search_path and roles as the server set them
   up (``ALTER DATABASE/ROLE ... SET``), decided as the startup packet's
   settings are. The first ReadyForQuery switches both sides to relaying.

2. **Relay, bot -> server** (``Session.client_data``): message boundaries
   come from ``struct.unpack_from`` over the received buffer (the loop of
   :func:`split_messages`, inlined), no copies. Only the types that matter
   are decoded: Query and Parse are first read as the server will read them
   (``appliance.policy.reading``: the session's client_encoding and
   standard_conforming_strings, tracked from ParameterStatus; while a request
   that might change them is still in flight, every reading it could bring
   must agree) and then go through ``services.decide_sql`` (the
   policy engine caches what is safe to cache; a verdict may depend on
   session state and time windows); Bind/Describe/Execute/Close/Sync are
   recorded as pending operations. Unchanged runs of messages are written
   as the very bytes received.

   * *block*: the statement is replaced by a statement that fails in the
     server's parser (``botwarden_blocked_<nonce>``). The server then does
     its own error recovery - aborts the transaction like any failed
     statement, discards up to Sync, sends ReadyForQuery with the true
     status - and we swap its syntax error for our 42501 ErrorResponse.
     Responses stay in order even with pipelining, and the blocked text never
     reaches the server.
   * *approve*: reading from the bot pauses for this session only; the
     statement waits on ``services.hold`` (the bot gets a NoticeResponse
     naming the approval id) and is then sent or replaced as for *block*.
     Inside a transaction a keep-alive Sync (answer swallowed) keeps the
     server's idle timeout away; a CancelRequest withdraws the hold (57014).
   * *mask*: the statement runs; see below. COPY TO STDOUT of a masked
     statement is refused (CopyData cannot be masked).

3. **Relay, server -> bot** (``Session.server_data``): spans again; a table
   of handlers per message type, ``None`` for pass-through. Pending
   operations pop on ParseComplete / BindComplete / CommandComplete /
   ReadyForQuery ..., which gives each request its rows, error and duration
   for the audit record. DataRows are decoded only while a masked result is
   in flight: RowDescription (or a Describe we add after Bind) gives the
   columns to ``services.mask_plan``, and each DataRow is re-encoded with
   the plan's values. While a masked statement runs, its ErrorResponse and
   NoticeResponse texts go through ``services.message_masker`` (withheld, or
   detectors run over them: they may quote a masked value). Large
   pass-through messages stream without being buffered whole.

4. **End**: a bot that disconnects mid-query gets its query cancelled and
   the upstream closed; an upstream that dies gives the bot a FATAL 08006
   from botwarden. ``session_end`` carries bytes each way and the outcome.

Back-pressure: each side pauses reading the other when its transport's
write buffer fills (``pause_writing``), so a 100 MB result never sits in
memory.

Modules
=======

``front``      the listener (TCP or Unix socket), TLS contexts, upstream connects, close and drain
``transport``  the asyncio protocols of the bot's and the server's sockets
``session``    one session's lifecycle and both relay loops (the hot path)
``startup``    TLS, the token, the grant, the upstream connection and its login
``readings``   statement text read as the server will read it, then decided
``extended``   Parse/Bind/Describe/Execute/Close/Sync bookkeeping
``masking``    mask plans and rewritten DataRows; COPY TO of a masked statement refused
``guard``      the affected-rows guard (the planner's estimate, by EXPLAIN)
``lookup``     FunctionCall decided as the SELECT of the function its OID names
``holds``      statements held for approval or for their durable record (strict audit)
``cancel``     cancel keys: our secret to the bot, its CancelRequest mapped back
``pending``    per-request records, prepared statements, portals, pending operations
``wire``       fast DataRow/Bind reads and writes, server-style ErrorResponses
``settings``   PgFrontSettings, limits, FrontError

What every front shares (identity, grant, audit rows, holds, expiry, drain) is in
:mod:`appliance.fronts.session`.
"""

from ..session import attribution as _attribution  # noqa: F401 (the Kubernetes front imports it from here)
from .front import PostgresFront
from .session import Session
from .settings import (HELD_BUFFER_LIMIT, HOLD_KEEPALIVE_S, PROTOCOL, SERVER_MAX_MESSAGE, STREAM_THRESHOLD,
                       FrontError, PgFrontSettings)
from .transport import BotProtocol, UpstreamProtocol
from .wire import _bind_fast, _render_params  # noqa: F401 (held to Bind.decode by the tests)

__all__ = ["PROTOCOL", "PostgresFront", "PgFrontSettings", "FrontError", "Session", "BotProtocol",
           "UpstreamProtocol", "STREAM_THRESHOLD", "HOLD_KEEPALIVE_S", "SERVER_MAX_MESSAGE", "HELD_BUFFER_LIMIT"]
