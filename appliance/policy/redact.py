"""What the audit store may keep of a request: its text and parameters with sensitive values
redacted (pure).

Statement text: only constants are looked at — string, numeric, bit and hex literals as the
real PostgreSQL scanner (pglast) splits them, never a regex over the SQL — and every
constant a content detector flags (e-mail, card, IBAN, phone, SSN, AWS key, private key, JWT,
high-entropy secret) is replaced by a fixed mask. Parameters: each value goes through the
same detectors; for a statement whose result is masked, every parameter is masked (it may be
the very value a filter compares with a masked column). Text the scanner refuses is redacted
as one value. The masks keep a statement's shape readable for auditors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pglast.parser import scan, split

from appliance.policy.masking import DETECTOR_FUNCTIONS, MIN_LENGTH, REQUIRED_TEXT, DetectorSettings

MASK = "********"
# No detector flags fewer than 6 characters (the shortest is an e-mail like a@b.co); shorter
# constants (most numbers, short strings) are not examined.
_MIN_FLAGGABLE = 6
_CONSTANT_TOKENS = frozenset({"SCONST", "USCONST", "FCONST", "ICONST", "BCONST", "XCONST"})
_CACHE_MAX = 4096

# Statements without string constants (no quote, no dollar quote) hold only numeric constants
# (digits, ".", "_", "+", "-", exponent and 0x/0o/0b prefixes, hex digits). The detectors that
# need text a number cannot contain (an "@", "eyJ", "PRIVATE KEY") cannot flag one; the others
# need MIN_LENGTH characters. A numeric constant lies inside a run of [0-9A-Za-z_.+-] that holds
# a digit, so when every such run is shorter than that, no constant can be flagged and the
# statement is kept as it is — once the scanner has accepted it (text it refuses is redacted
# whole, below). This spares the per-token scan for most statements that differ only in numbers.
_NUMERIC_CHARS = frozenset("0123456789._+-xXoObBeEabcdefABCDEF")
_RUN_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_.+-")
# bytes.translate table: run characters (and any non-ASCII byte, to stay on the safe side) kept,
# everything else a space.
_SEPARATE = bytes(c if c >= 128 or chr(c) in _RUN_CHARS else 32 for c in range(256))
_DIGITS = frozenset(b"0123456789")
_NUMERIC_FLAGGABLE = min(MIN_LENGTH.values())
_FAST_PATH = (set(DETECTOR_FUNCTIONS) <= set(MIN_LENGTH) | set(REQUIRED_TEXT)
              and all(not set(t) <= _NUMERIC_CHARS for t in REQUIRED_TEXT.values()))


# A parameter value shorter than every length-limited detector's shortest match that holds none
# of the other detectors' required texts cannot be flagged (each detector returns early on both
# conditions, _FAST_PATH checks there is no third kind): it is kept without running them. Most
# bound values (ids, amounts, short names) are such values.
_SHORTEST_FLAGGABLE = min(MIN_LENGTH.values())
_SHORT_REQUIRED = tuple(t for t in REQUIRED_TEXT.values() if len(t) < _SHORTEST_FLAGGABLE)


def _cannot_flag(value: str) -> bool:
    if not _FAST_PATH or len(value) >= _SHORTEST_FLAGGABLE:
        return False
    for required in _SHORT_REQUIRED:
        if required in value:
            return False
    return True


def _only_short_numbers(sql: str) -> bool:
    """True when ``sql`` can hold no constant a detector could flag (see above)."""
    if "'" in sql or "$" in sql:
        return False
    for run in sql.encode("utf-8", "surrogatepass").translate(_SEPARATE).split():
        if len(run) >= _NUMERIC_FLAGGABLE and not _DIGITS.isdisjoint(run):
            return False
    return True


def redact_value(text: str, settings: DetectorSettings = DetectorSettings()) -> str:
    """``text`` with every span a detector flags replaced by the mask."""
    spans: list[tuple[int, int]] = []
    for find in DETECTOR_FUNCTIONS.values():
        spans.extend(find(text, settings))
    if not spans:
        return text
    out, pos = [], 0
    for start, end in sorted(spans):
        if end <= pos:
            continue
        start = max(start, pos)
        out.append(text[pos:start])
        out.append(MASK)
        pos = end
    out.append(text[pos:])
    return "".join(out)


class AuditRedactor:
    """Redacts request records for the audit store; remembers recent statement texts."""

    def __init__(self, settings: DetectorSettings = DetectorSettings()):
        self.settings = settings
        self._texts: OrderedDict[str, str] = OrderedDict()

    def text(self, sql: str) -> str:
        cached = self._texts.get(sql)
        if cached is not None:
            self._texts.move_to_end(sql)
            return cached
        if self._nothing_to_redact(sql):
            return sql  # not cached: texts that differ only in short numbers would evict the useful ones
        redacted = self._redact_tokens(sql)
        self._texts[sql] = redacted
        if len(self._texts) > _CACHE_MAX:
            self._texts.popitem(last=False)
        return redacted

    @staticmethod
    def _nothing_to_redact(sql: str) -> bool:
        if not (_FAST_PATH and _only_short_numbers(sql)):
            return False
        try:
            split(sql, with_parser=False)  # the same scanner, without a token list: does it accept it?
        except Exception:  # refused: the token path redacts it whole
            return False
        return True

    def _redact_tokens(self, sql: str) -> str:
        try:
            tokens = scan(sql)
        except Exception:  # the scanner refused it: treat the whole text as one value
            return redact_value(sql, self.settings)
        out, pos = [], 0
        for tok in tokens:
            if tok.name not in _CONSTANT_TOKENS:
                continue
            end = tok.end + 1  # pglast gives inclusive character offsets
            if end - tok.start < _MIN_FLAGGABLE:
                continue
            literal = sql[tok.start:end]
            redacted = redact_value(literal, self.settings)
            if redacted != literal:
                out.append(sql[pos:tok.start])
                quoted = literal[-1:] == "'"
                out.append(f"'{MASK}'" if quoted else MASK)
                pos = end
        if not out:
            return sql
        out.append(sql[pos:])
        return "".join(out)

    def params(self, params: Sequence[str | None] | None, *, masked_statement: bool) -> list[str | None] | None:
        if params is None:
            return None
        if masked_statement:
            return [None if p is None else MASK for p in params]
        return [p if p is None or _cannot_flag(p) else redact_value(p, self.settings) for p in params]

    def message(self, text: str | None) -> str | None:
        """Error texts can quote values (e.g. a unique violation's key)."""
        return None if text is None else redact_value(text, self.settings)
