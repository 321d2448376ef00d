"""Masking a byte stream (an SSH command's stdout or stderr) with the policy's content detectors.

Sans-IO: :meth:`StreamMasker.feed` takes the bytes as they came and returns the bytes that may go
to the bot now; :meth:`StreamMasker.flush` returns the rest (end of stream, or a pause in an
interactive session). A secret split over two reads is still masked: what could still be the
beginning of one stays held back until the text around it is complete:

- the text after the last newline (no detector's secret spans a line, except a PEM key), and
  from an unfinished ``-----BEGIN ... PRIVATE KEY-----`` on;
- never more than ``lookbehind`` characters: beyond that the oldest part goes out, cut where no
  secret found in the buffer straddles it. A secret longer than the look-behind that arrives
  in pieces is the one case not masked whole (the default, 16 KiB, holds a 4096-bit RSA key).

Bytes that are not UTF-8 pass unchanged (decoded with ``surrogateescape`` and encoded back).
"""

from __future__ import annotations

import codecs
import re

from appliance.policy.masking import TextMasker

DEFAULT_LOOKBEHIND = 16 * 1024
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY(?: BLOCK)?-----")


class StreamMasker:
    def __init__(self, masker: TextMasker, lookbehind: int = DEFAULT_LOOKBEHIND):
        self.masker = masker
        self.lookbehind = lookbehind
        self.masked = 0  # secrets replaced so far
        self._held = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def feed(self, data: bytes) -> bytes:
        text = self._held + self._decoder.decode(data)
        spans = self.masker.spans(text)
        cut = self._cut(text, {start for start, _, _ in spans})
        for start, end, _ in spans:
            if start < cut < end:
                cut = start  # never split a secret found in the buffer
        self._held = text[cut:]
        return self._apply(text[:cut], [s for s in spans if s[1] <= cut])

    def flush(self) -> bytes:
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return self._apply(text, self.masker.spans(text))

    def _cut(self, text: str, span_starts: set[int]) -> int:
        cut = text.rfind("\n") + 1
        begin = None
        for m in _PEM_BEGIN.finditer(text):  # the last one the private_key detector did not take whole
            begin = None if m.start() in span_starts else m.start()
        if begin is not None and begin < cut:
            cut = begin  # an unfinished private key: hold it all
        return max(cut, len(text) - self.lookbehind)

    def _apply(self, text: str, spans: list[tuple[int, int, str]]) -> bytes:
        if spans:
            pieces, last = [], 0
            for start, end, replacement in spans:
                pieces += [text[last:start], replacement]
                last = end
            pieces.append(text[last:])
            text = "".join(pieces)
            self.masked += len(spans)
        return text.encode("utf-8", "surrogateescape")
