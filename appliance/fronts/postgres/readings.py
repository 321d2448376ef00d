"""Statement text read as the server will read it, and decided by the policy."""

from __future__ import annotations

import logging

from appliance.policy.reading import DEFAULT_READING, UnreadableStatement, possible_readings, read_statement
from appliance.policy.types import Verdict
from appliance.protocols.postgres import messages as m
from appliance.protocols.postgres.connection import error_response

from .wire import _syntax_error

log = logging.getLogger(__name__)


class ReadingMixin:
    """Statement text read as the server will read it, and decided by the policy
    (part of :class:`Session`)."""

    def _decide(self, sql: str, phase: str, *, probe: bool = False) -> Verdict:
        # No cache here: a verdict can depend on session state (PREPARE names, search_path) and
        # on time windows; the policy engine caches what is safe to cache.
        try:
            if probe:  # a possible reading, not the one the session state follows
                return self.services.decide_sql(self.core.grant, self.settings.target, sql, phase, probe=True)
            verdict = self.services.decide_sql(self.core.grant, self.settings.target, sql, phase)
        except Exception:
            log.exception("policy failed; statement refused")
            return Verdict("block", None, "the policy engine failed on this statement")
        self._sql_renamed(verdict)  # a DEALLOCATE or PREPARE changes what a parsed name holds
        return verdict

    def _read_and_decide(self, raw: bytes, phase: str) -> tuple[str, Verdict, m.ErrorResponse | None]:
        """(text as the server reads it, verdict, the refusal to send when blocked or None for
        the usual one). The hot path is the first two lines."""
        if self._reading is DEFAULT_READING and ((raw.isascii() and b"\\" not in raw) or self._settled()):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                pass
            else:
                return text, self._decide(text, phase), None
        try:
            text = read_statement(raw, self._reading)
        except UnreadableStatement as e:
            return self._unreadable(raw, e)
        verdict = self._decide(text, phase)
        if verdict.action == "block" or self._settled() or (raw.isascii() and b"\\" not in raw):
            return text, verdict, None
        return text, self._other_readings(raw, text, verdict, phase), None

    def _settled(self) -> bool:
        """Nothing this session sent is still unanswered: the settings the server last reported
        are the ones it will read the next statement with. (A SET, set_config() or ROLLBACK in
        flight changes them for the next message before its ParameterStatus arrives.)"""
        return not self._ext_open and not self.busy_upstream

    def _other_readings(self, raw: bytes, text: str, verdict: Verdict, phase: str) -> Verdict:
        """While a request in flight may still change client_encoding or standard_conforming_strings,
        the statement runs only if every reading the server might apply is decided alike."""
        seen = {text}
        for reading in possible_readings(raw, self._reading):
            try:
                other = read_statement(raw, reading)
            except UnreadableStatement:
                continue  # the server would refuse it under that reading: nothing runs
            if other in seen:
                continue
            seen.add(other)
            alt = self._decide(other, phase, probe=True)
            if alt.action != verdict.action or alt.mask_rules != verdict.mask_rules:
                return Verdict("block", "botwarden:reading",
                               f"a request still in flight may change how the server reads this statement "
                               f"({reading.describe()} reads it differently, and it would be "
                               f"{'allowed' if alt.action == 'allow' else alt.action + 'ed' if alt.action != 'block' else 'blocked'}"
                               f"); send it after the previous one completes", details=verdict.details)
        return verdict

    def _unreadable(self, raw: bytes, e: UnreadableStatement) -> tuple[str, Verdict, m.ErrorResponse]:
        text = raw.decode("utf-8", "replace")  # what the audit keeps: never a lone surrogate
        if e.syntax:
            return text, Verdict("block", None, f"botwarden blocks statements it cannot analyze: {e.message}"), \
                _syntax_error(e.message, e.position)
        return text, Verdict("block", "botwarden:reading", e.message), \
            error_response(e.sqlstate, e.message, detail=f"botwarden reads statements as the server does "
                                                         f"({self._reading.describe()})")
