"""Masking of result values: content detectors, strategies, and the per-RowDescription plan.

Regular expressions here read *values* (never SQL). Every detector that has a
checksum or a reserved range checks it (Luhn for cards, mod-97 for IBANs, the
invalid SSN areas/groups/serials), so look-alikes stay readable.

Formats: text-format values are UTF-8. Binary-format values are masked only for
types whose binary form is their UTF-8 text (text, varchar, bpchar, name, json,
unknown; jsonb after its version byte); any other binary value a rule selects is
replaced by NULL: we cannot rewrite it correctly, so it does not leave at all.
Text-format values of non-text types (numbers, dates ...) are replaced by NULL
too, since "****" would not parse as the column's type in the client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from appliance import hotpath
from appliance.policy.types import ColumnDesc

# Type OIDs whose text form (and, except jsonb, binary form) is plain UTF-8 text.
TEXT_TYPES = {25: "text", 1043: "varchar", 1042: "bpchar", 19: "name", 705: "unknown", 18: "char"}
JSON_TYPES = {114: "json", 3802: "jsonb"}
UNKNOWN_TYPE = 0

# --- detectors -----------------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        alt = not alt
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    compact = text.replace(" ", "").upper()
    if not (15 <= len(compact) <= 34) or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    rearranged = compact[4:] + compact[:4]
    digits = "".join(str(int(c, 36)) for c in rearranged)
    return int(digits) % 97 == 1


IBAN_LENGTHS = {"AD": 24, "AT": 20, "BE": 16, "BG": 22, "CH": 21, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
                "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22,
                "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18,
                "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TR": 26}


def ssn_ok(area: str, group: str, serial: str) -> bool:
    return area != "000" and area != "666" and not area.startswith("9") and group != "00" and serial != "0000"


def shannon_entropy(text: str) -> float:
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _jwt_ok(token: str) -> bool:
    import base64

    header = token.split(".", 1)[0]
    try:
        data = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "alg" in data


_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}\b")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"
                    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\b\d{3}[.-]\d{3}[.-]\d{4})(?![\w-])")
_SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")
_AWS = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|APKA)[A-Z2-7]{16}(?![A-Z0-9])")
_PEM = re.compile(r"-----BEGIN ((?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?)-----"
                  r".*?-----END \1-----", re.S)
_JWT = re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*(?![\w-])")
_TOKEN = re.compile(r"[A-Za-z0-9+/_\-]{16,}={0,2}")
_PREFIXED_SECRET = re.compile(r"\b(?:ghp|gho|ghs|ghu|github_pat|glpat|xox[abpr]|sk_live|rk_live|sk-proj|hvs|s)"
                              r"[_.-][A-Za-z0-9_\-]{16,}\b")


# The fewest characters each detector flags; each detector skips shorter text (the cheap check
# comes before the regex). Audit redaction relies on these to skip short numeric constants.
MIN_LENGTH = {"card": 13, "iban": 15, "phone": 10, "ssn": 11, "aws_key": 20, "secret": 16}
# What the other detectors need in the text: none of these can occur in a numeric literal.
REQUIRED_TEXT = {"email": "@", "jwt": "eyJ", "private_key": "PRIVATE KEY"}


def _find_email(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if REQUIRED_TEXT["email"] not in text:
        return []
    return [m.span() for m in _EMAIL.finditer(text)]


def _find_card(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if len(text) < MIN_LENGTH["card"]:  # 13 digits at least
        return []
    out = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if 13 <= len(digits) <= 19 and digits[0] in "23456" and len(set(digits)) > 1 and luhn_ok(digits):
            out.append(m.span())
    return out


def _find_iban(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if len(text) < MIN_LENGTH["iban"]:  # the shortest IBAN (Norway)
        return []
    return [m.span() for m in _IBAN.finditer(text) if iban_ok(m.group())]


def _find_phone(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if len(text) < MIN_LENGTH["phone"]:  # 10 digits at least
        return []
    out = []
    for m in _PHONE.finditer(text):
        digits = sum(ch.isdigit() for ch in m.group())
        if 10 <= digits <= 15:
            out.append(m.span())
    return out


def _find_ssn(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if len(text) < MIN_LENGTH["ssn"] or "-" not in text:
        return []
    return [m.span() for m in _SSN.finditer(text) if ssn_ok(*m.groups())]


def _find_aws(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if len(text) < MIN_LENGTH["aws_key"]:  # a 4-letter prefix and 16 characters
        return []
    return [m.span() for m in _AWS.finditer(text)]


def _find_pem(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if REQUIRED_TEXT["private_key"] not in text:
        return []
    return [m.span() for m in _PEM.finditer(text)]


def _find_jwt(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if REQUIRED_TEXT["jwt"] not in text:
        return []
    return [m.span() for m in _JWT.finditer(text) if _jwt_ok(m.group())]


# An absolute path under one of the Filesystem Hierarchy Standard's top-level directories is
# judged segment by segment: the random part of a temporary directory's name made a whole path
# look like a token (`/tmp/bw-ssh-crash-k2j8x_q1/ran`: 29 characters, over 4 bits each), while
# its segments are each too short for 4 bits per character (that takes 16 distinct characters).
# A secret that is a segment of its own (`/run/keys/<token>`) is still flagged. The path ends at
# the first character a file name seldom has and a query string or key=value pair does ("?",
# "=", "+", ":"), so a token after it is judged whole; one that runs past the path's end is too.
# A base64 secret has "/" in it too: consecutive letters-and-digits-only segments after the
# top-level directory are also judged joined, as one token that must look random besides (its
# character class changes from one character to the next as often as in random text, ~62 %;
# words and CamelCase names change class far less often).
_PATH = re.compile(r"(?<![A-Za-z0-9+/_\-.~])/(?:bin|boot|dev|etc|home|lib|lib32|lib64|media|mnt|opt|proc|root|run"
                   r"|sbin|srv|sys|tmp|usr|var)(?:/[A-Za-z0-9._~@%,-]*)+")


def _classes(token: str) -> int:
    """How many of the classes digit, lower-case and upper-case letter ``token`` has."""
    return sum((any(c.isdigit() for c in token), any(c.islower() for c in token),
                any(c.isupper() for c in token)))


def _high_entropy(token: str, cfg: "DetectorSettings") -> bool:
    if len(token) < cfg.secret_min_length:
        return False
    return _classes(token) >= 2 and shannon_entropy(token) >= cfg.secret_entropy


_RANDOM_SWITCHES = 0.4     # share of adjacent characters of different classes a random run has at least
_CAPITALS_NOT_WORDS = 0.25  # share of its capitals followed by a capital or a digit, at least


def _looks_random(token: str) -> bool:
    """Letters and digits whose class (upper, lower, digit) changes from one character to the
    next as often as in random text (~62 %), and whose capitals are not each the start of a
    word (in random text ~58 % of them are followed by another capital or a digit; in
    CamelCase names almost none)."""
    kinds = "".join("u" if c.isupper() else "l" if c.islower() else "d" for c in token)
    if sum(a != b for a, b in zip(kinds, kinds[1:])) < _RANDOM_SWITCHES * (len(kinds) - 1):
        return False
    capitals = kinds[:-1].count("u")
    not_words = sum(a == "u" and b != "l" for a, b in zip(kinds, kinds[1:]))
    return capitals < 3 or not_words >= _CAPITALS_NOT_WORDS * capitals


def _path_spans(text: str, start: int, token: str, top_end: int, cfg: "DetectorSettings",
                out: list[tuple[int, int]]) -> None:
    """A token inside an absolute FHS path (whose top-level directory ends at ``top_end``): each
    segment judged alone, and each run of letters-and-digits-only segments after the top-level
    directory judged joined."""
    run: list[tuple[int, int]] = []

    def close_run() -> None:
        # Segments of one character class at either end (a directory's name, a digit-only
        # number, a one-letter file) are not part of what is judged joined.
        # (Such a segment is never high-entropy alone: that takes two classes.)
        while run and _classes(text[run[0][0]:run[0][1]]) < 2:
            run.pop(0)
        while run and _classes(text[run[-1][0]:run[-1][1]]) < 2:
            run.pop()
        if len(run) >= 2:
            joined = text[run[0][0]:run[-1][1]].replace("/", "")
            if _high_entropy(joined, cfg) and _looks_random(joined):
                out.append((run[0][0], run[-1][1]))
                run.clear()
                return
        for span in run:
            if _high_entropy(text[span[0]:span[1]], cfg) and span not in out:
                out.append(span)
        run.clear()

    pos = start
    for segment in token.split("/"):
        span = (pos, pos + len(segment))
        pos += len(segment) + 1
        if span[0] > top_end and (not segment or segment.isascii() and segment.isalnum()):  # "//" too
            run.append(span)
            continue
        close_run()
        if _high_entropy(segment, cfg) and span not in out:
            out.append(span)
    close_run()


def _find_secret(text: str, cfg: "DetectorSettings") -> list[tuple[int, int]]:
    if len(text) < MIN_LENGTH["secret"]:
        return []
    out = [m.span() for m in _PREFIXED_SECRET.finditer(text)]
    paths = [m.span() for m in _PATH.finditer(text)] if "/" in text else ()
    for m in _TOKEN.finditer(text):
        token = m.group()
        if len(token) < cfg.secret_min_length:
            continue
        start, end = m.span()
        path = next(((p_start, p_end) for p_start, p_end in paths if p_start <= start and end <= p_end), None)
        if path is not None:
            _path_spans(text, start, token, text.index("/", path[0] + 1), cfg, out)
        elif _high_entropy(token, cfg) and m.span() not in out:
            out.append(m.span())
    return out


DETECTOR_FUNCTIONS: dict[str, Callable[[str, "DetectorSettings"], list[tuple[int, int]]]] = {
    "private_key": _find_pem, "jwt": _find_jwt, "aws_key": _find_aws, "email": _find_email,
    "iban": _find_iban, "card": _find_card, "ssn": _find_ssn, "phone": _find_phone, "secret": _find_secret,
}


@dataclass(frozen=True)
class DetectorSettings:
    secret_min_length: int = 20
    secret_entropy: float = 4.0


def find(detector: str, text: str, settings: DetectorSettings = DetectorSettings()) -> list[tuple[int, int]]:
    """Spans of ``text`` the detector flags (public for tests and the CLI)."""
    return DETECTOR_FUNCTIONS[detector](text, settings)


# --- strategies ----------------------------------------------------------------------------------

STARS = hotpath.reference.STARS


class Strategy:
    """Turns one sensitive string into its masked form (None = SQL NULL)."""

    def __init__(self, name: str, keep: int = 4, salt: bytes = b""):
        self.name = name
        self.keep = keep
        self.salt = salt

    def function(self) -> Callable[[str], str | None]:
        """The strategy as a plain function of the value (what __call__ does, chosen once)."""
        if self.name == "null":
            return lambda value: None
        if self.name == "full":
            return lambda value: STARS
        if self.name == "partial":
            keep = self.keep
            return lambda value: partial(value, keep)
        return self.__call__

    def __call__(self, value: str) -> str | None:
        if self.name == "null":
            return None
        if self.name == "full":
            return STARS
        if self.name == "partial":
            return partial(value, self.keep)
        if self.name == "hash":
            return "h:" + hmac.new(self.salt, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
        if self.name == "format":
            return format_preserving(value, self.salt)
        raise ValueError(self.name)


# partial() and its UTF-8 form live with the other hot paths: compiled when built, this reference else.
partial = hotpath.partial
partial_utf8 = hotpath.partial_utf8


def format_preserving(value: str, salt: bytes) -> str:
    """Digits -> digits, letters -> letters (case kept), everything else kept; deterministic under
    the deployment salt so equal inputs give equal outputs, not reversible without it."""
    stream = b""
    counter = 0
    out = []
    pos = 0
    for ch in value:
        if not (ch.isascii() and ch.isalnum()):
            out.append(ch)
            continue
        while pos >= len(stream):
            stream += hmac.new(salt, counter.to_bytes(4, "big") + value.encode("utf-8"), hashlib.sha256).digest()
            counter += 1
        b = stream[pos]
        pos += 1
        if ch.isdigit():
            out.append(chr(48 + b % 10))
        elif ch.isupper():
            out.append(chr(65 + b % 26))
        else:
            out.append(chr(97 + b % 26))
    return "".join(out)


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class ColumnAction:
    """What happens to one column: whole-value strategy and/or detectors (strategy each)."""

    name: str
    type_oid: int
    format: int
    whole: Strategy | None = None
    detectors: list[tuple[str, Strategy]] = field(default_factory=list)


class RowMasker:
    """A :class:`appliance.policy.types.MaskPlan`: rewrites the DataRows of one result."""

    def __init__(self, actions: Sequence[ColumnAction | None], settings: DetectorSettings):
        self.actions = list(actions)
        self.settings = settings
        self.counts: dict[str, int] = {}
        # (column index, raw -> masked raw, column name), each function chosen once per result.
        self._steps = [(i, self._compile(a), a.name) for i, a in enumerate(self.actions) if a is not None]
        # When every step is a partial mask of a text column (the common rule), the relay hands
        # whole runs of DataRows to hotpath.mask_rows with these (column index, keep) pairs.
        self.partial_steps: list[tuple[int, int]] | None = None
        if self._steps and all(a is None or (a.whole is not None and a.whole.name == "partial"
                                             and a.type_oid in TEXT_TYPES) for a in self.actions):
            self.partial_steps = [(i, a.whole.keep) for i, a in enumerate(self.actions) if a is not None]

    def add_counts(self, counts: Sequence[int]) -> None:
        """Values changed by hotpath.mask_rows, per entry of ``partial_steps``."""
        names = [a.name for a in self.actions if a is not None]
        for name, n in zip(names, counts):
            if n:
                self.counts[name] = self.counts.get(name, 0) + n

    def apply(self, values: Sequence[bytes | None]) -> tuple[list[bytes | None], bool]:
        # This runs for every row of a masked result: nothing is decided here that _compile
        # could decide once.
        out = None
        n = len(values)
        counts = self.counts
        for i, mask, name in self._steps:
            if i >= n:
                continue
            value = values[i]
            if value is None:
                continue
            new = mask(value)
            if new != value:
                if out is None:
                    out = list(values)
                out[i] = new
                counts[name] = counts.get(name, 0) + 1
        if out is None:
            return list(values), False
        return out, True

    def _compile(self, action: ColumnAction) -> Callable[[bytes], bytes | None]:
        """``raw -> self._mask(action, raw)``, specialised for the common case: a whole-value
        strategy on a text column (whose text and binary formats are the same UTF-8 bytes)."""
        if action.whole is None or action.type_oid not in TEXT_TYPES:
            return lambda raw: self._mask(action, raw)
        if action.whole.name == "partial":  # the common case, bytes to bytes in one call
            keep = action.whole.keep
            return lambda raw: partial_utf8(raw, keep)
        whole = action.whole.function()

        def mask_text(raw: bytes) -> bytes | None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
            masked = whole(text)
            return None if masked is None else masked.encode("utf-8")

        return mask_text

    def _mask(self, action: ColumnAction, raw: bytes) -> bytes | None:
        prefix = b""
        texty = action.type_oid in TEXT_TYPES or action.type_oid in JSON_TYPES or action.type_oid == UNKNOWN_TYPE
        if action.format == 1:
            if action.type_oid == 3802 and raw[:1] == b"\x01":
                prefix, raw = b"\x01", raw[1:]  # jsonb binary: version byte, then the text
            elif action.type_oid not in TEXT_TYPES and action.type_oid != 114:
                return None  # binary of a type we cannot rewrite: withhold it
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        is_json = action.type_oid in JSON_TYPES
        if action.whole is not None:
            if not texty:
                return None  # "****" would not parse as a number/date in the client
            masked = action.whole(text)
            if masked is None:
                return None
            if is_json:
                masked = json.dumps(masked)
            return prefix + masked.encode("utf-8")
        if not texty:
            return raw
        spans: list[tuple[int, int, Strategy]] = []
        for detector, strategy in action.detectors:
            for start, end in DETECTOR_FUNCTIONS[detector](text, self.settings):
                spans.append((start, end, strategy))
        if not spans:
            return prefix + raw
        spans.sort(key=lambda s: (s[0], -s[1]))
        pieces, last = [], 0
        for start, end, strategy in spans:
            if start < last:
                continue  # overlaps a span already masked
            replacement = strategy(text[start:end])
            if replacement is None:
                return None  # strategy "null": the whole value goes
            pieces.append(text[last:start])
            pieces.append(replacement)
            last = end
        pieces.append(text[last:])
        return prefix + "".join(pieces).encode("utf-8")


def column_is_maskable(col: ColumnDesc) -> bool:
    return col.type_oid in TEXT_TYPES or col.type_oid in JSON_TYPES or col.type_oid == UNKNOWN_TYPE


class TextMasker:
    """Content detectors over free text (an SSH command's output): where the secrets are and
    what replaces each. A ``null`` strategy has no place in a byte stream: it stars the value."""

    def __init__(self, detectors: Sequence[tuple[str, Strategy]], settings: DetectorSettings):
        self.detectors = list(detectors)
        self.settings = settings

    def spans(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, replacement) of every secret in ``text``, in order, without overlaps."""
        found: list[tuple[int, int, Strategy]] = []
        for detector, strategy in self.detectors:
            for start, end in DETECTOR_FUNCTIONS[detector](text, self.settings):
                found.append((start, end, strategy))
        found.sort(key=lambda s: (s[0], -s[1]))
        out: list[tuple[int, int, str]] = []
        last = 0
        for start, end, strategy in found:
            if start < last:
                continue  # overlaps a span already masked
            replacement = strategy(text[start:end])
            out.append((start, end, STARS if replacement is None else replacement))
            last = end
        return out

    def mask(self, text: str) -> str:
        """``text`` with every secret the detectors find replaced."""
        pieces, last = [], 0
        for start, end, replacement in self.spans(text):
            pieces += (text[last:start], replacement)
            last = end
        return "".join(pieces) + text[last:] if pieces else text


# ErrorResponse / NoticeResponse fields a server sets itself, whatever a statement reads: the
# severity, the SQLSTATE, the position in the statement's text, and where in the server's
# source code it was raised. Every other field may carry a value: the message, detail, hint and
# context, and the schema/table/column/type/constraint names a RAISE ... USING may set to any text.
_SERVER_FIELDS = frozenset("SVCPFLR")

# Integrity violations the server's executor raises itself (R: the C routine; a RAISE in PL/pgSQL
# is exec_stmt_raise, and a RAISE cannot set R), whose message is one of these English templates
# over catalog names only: a bot writing into a masked table sees why its write failed. Their
# DETAIL ("Key (email)=(...) already exists", "Failing row contains (...)") quotes values and
# goes; a server whose lc_messages translates them gets the withheld text.
_INTEGRITY = {
    "23505": ({"_bt_check_unique", "check_exclusion_or_unique_constraint"},
              (r'duplicate key value violates unique constraint ".*"',)),
    "23502": ({"ExecConstraints"}, (r'null value in column ".*" of relation ".*" violates not-null constraint',)),
    "23514": ({"ExecConstraints", "ExecPartitionCheckEmitError", "ExecFindPartition"},
              (r'new row for relation ".*" violates check constraint ".*"',
               r'new row for relation ".*" violates partition constraint', r'no partition of relation ".*" found for row')),
    "23503": ({"ri_ReportViolation"}, (r'insert or update on table ".*" violates foreign key constraint ".*"',
                                       r'update or delete on table ".*" violates foreign key constraint ".*" on table ".*"')),
    "23P01": ({"check_exclusion_or_unique_constraint"}, (r'conflicting key value violates exclusion constraint ".*"',)),
}
_INTEGRITY_FIELDS = _SERVER_FIELDS | frozenset("Mnstc")  # the message, and the constraint/schema/table/column names


def _native_integrity_violation(fields: tuple[tuple[str, str], ...]) -> bool:
    found = dict(fields)
    known = _INTEGRITY.get(found.get("C", ""))
    return (known is not None and found.get("R") in known[0]
            and any(re.fullmatch(t, found.get("M", ""), re.DOTALL) for t in known[1]))


class MessageMasker:
    """What a server's error or notice may say while a masked statement runs.

    ``withhold`` (a rule masks columns of the statement's relations): any text field may quote
    one of their values (``email::int`` fails with the value in its message, a function may RAISE
    it) and no detector can tell which part is one, so the message becomes ``withhold`` and the
    other text fields go; an integrity violation the server's executor raised (a unique key, a
    not-null, check or foreign key constraint: :data:`_INTEGRITY`) keeps its message and names and
    loses its detail. An error the server raised while analysing the statement (it has a
    position in the statement's text: an unknown column, a syntax error) read no row and is
    passed on as it is. Otherwise (detector rules only) the rules' detectors run over every text
    field, as over the result's values."""

    def __init__(self, withhold: str | None = None, text: TextMasker | None = None):
        self.withhold = withhold
        self.text = text

    def fields(self, fields: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...] | None:
        """The fields to send instead, or None: send them as they are."""
        if self.withhold is not None:
            if any(code == "P" for code, _ in fields):
                return None
            if _native_integrity_violation(fields):
                return tuple((code, value) for code, value in fields if code in _INTEGRITY_FIELDS)
            out = [(code, value) for code, value in fields if code in _SERVER_FIELDS]
            out.insert(next((i + 1 for i, (code, _) in enumerate(out) if code == "C"), len(out)),
                       ("M", self.withhold))
            return tuple(out)
        if self.text is None:
            return None
        out, changed = [], False
        for code, value in fields:
            if code not in _SERVER_FIELDS:
                masked = self.text.mask(value)
                changed = changed or masked is not value
                value = masked
            out.append((code, value))
        return tuple(out) if changed else None
