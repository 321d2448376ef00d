"""The catalog read again during a long session: views, functions, triggers and rules another
session made (or replaced, or dropped) after this one logged in."""

from __future__ import annotations

import asyncio
import logging
import time

from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres import sqlstate

from .lookup import _LOOKUP_REPLIES
from .pending import _HOLD
from .settings import FrontError
from .startup import OwnAnswers
from .wire import _row_values

log = logging.getLogger(__name__)

# A bot's CancelRequest sent while botwarden's own question runs cancels that question (the bot's
# statement has not reached the server yet): asked again, this many times at most.
_CANCELLED_TRIES = 3


class _Cancelled(Exception):
    """The server cancelled botwarden's own question (57014)."""


class CatalogRecheckMixin:
    """At login the front reads what the session's rules need of the catalog (startup.py,
    policy/catalog.py). A session that stays open for hours would otherwise decide by that
    forever: a view over a masked table that an administrator makes later would read in clear.
    So, once ``catalog_recheck_s`` has passed, the next Query, Parse, Bind or FunctionCall the bot sends
    while nothing is in flight and no transaction is open waits while the front asks the
    server's catalog change counters on the session (one round trip); when they moved, the
    catalog is read again as at login (the engine's cached answers first), and the session's
    knowledge is replaced (and :attr:`_catalog_epoch` moves: a statement parsed before is decided
    again at its next Bind). Then the statement is decided. Inside a transaction the check waits
    for its end (what the transaction's statements read is planned with the catalog as it is, and
    a transaction is bounded). An error reading the catalog ends the session (FATAL 08006): fail
    closed, as at login (part of :class:`Session`)."""

    _catalog_next = 0.0  # when the next check is due (time.monotonic); 0: never (no lookup, or off)
    _catalog_checked = False  # the held message comes back after its check: decided, not checked again
    _catalog_epoch = 0  # how many times the session learned a changed catalog (extended.py: Bind)
    _catalog_seen: object = None  # the answers the session was last given

    def _catalog_due(self) -> bool:
        if self._catalog_checked:
            self._catalog_checked = False
            return False
        return (time.monotonic() >= self._catalog_next and self.txn_status == "I" and self._settled()
                and not self._lookup_active and not self.closed)

    def _recheck_catalog(self, buf, s: int, e: int):
        """Hold the message (``buf[s:e]``) while the catalog is checked; it is processed again after."""
        self._catalog_next = 0.0  # (set again when the check is over)
        self._lookup_active = True  # no FunctionCall lookup meanwhile: the server's answers are ours
        self._recheck_task = self.front.spawn(self._recheck(bytes(buf[s:e])), "pg-catalog-recheck")
        return _HOLD

    async def _recheck(self, original: bytes) -> None:
        find = getattr(self.services, "catalog_lookup", None)
        try:
            for attempt in range(_CANCELLED_TRIES):
                try:
                    lookup = find(self.core.grant, self.settings.target) if find is not None else None
                    if lookup is None:  # (a reload left the session's rules nothing to look up)
                        break
                    probe = await self._ask_mid_session([lookup.probe_query], "the catalog's change counters")
                    await self._read_catalog(lookup, probe[0], self._ask_mid_session, again=True)
                    break
                except _Cancelled:
                    if attempt == _CANCELLED_TRIES - 1:
                        raise FrontError(sqlstate.CONNECTION_FAILURE, "botwarden could not read the target's "
                                         "catalog again: its questions were cancelled") from None
        except FrontError as err:
            log.warning("session %s: %s", self.core.session_id, err.message)
            self.fatal(err.sqlstate, err.message)
            return
        finally:
            self._lookup_active = False
        if self.closed:
            return
        self._catalog_next = time.monotonic() + self.settings.catalog_recheck_s
        self._catalog_checked = True
        self._requeue(original)  # decided now, with what the catalog says

    async def _ask_mid_session(self, queries: list[str], what: str) -> list[list[tuple[str | None, ...]]]:
        """Botwarden's own queries on the session while the bot waits (nothing of the bot's is in
        flight): each one's rows as text; their replies never reach the bot."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        answers = OwnAnswers(len(queries))
        saved = {c: self._handlers[c] for c in _LOOKUP_REPLIES}

        def on_reply(buf, s, e):
            kind = buf[s]
            if kind == 68:  # DataRow: decoded below, a turn of the loop at a time
                answers.raw_row(bytes(buf[s:e]))
            elif kind == 69:  # ErrorResponse
                answers.error(m.ErrorResponse.decode(bytes(buf[s + 5:e])))
            elif kind == 90:  # ReadyForQuery: one query answered
                self.txn_status = chr(buf[s + 5])
                if answers.ready():
                    for c, h in saved.items():
                        self._handlers[c] = h
                    if not done.done():
                        done.set_result(None)
            return b""  # the bot never asked for this

        for c in _LOOKUP_REPLIES:
            self._handlers[c] = on_reply
        try:
            self._to_server(b"".join(m.Query(q).encode() for q in queries))
            await done
        finally:
            if not done.done():  # (the session closed meanwhile)
                for c, h in saved.items():
                    self._handlers[c] = h
        if answers.failed is not None and answers.failed.sqlstate == sqlstate.QUERY_CANCELED:
            raise _Cancelled()
        if answers.failed is None:
            await answers.decode(_row_values)
        return answers.result(what)
