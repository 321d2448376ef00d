"""The project's root exception type and its direct descendants.

Third-party exceptions are wrapped where they enter (``raise ... from e``) so
callers only ever need to know these.
"""

from __future__ import annotations


class BotwardenError(Exception):
    """Root of every error botwarden raises on purpose."""


class ConfigError(BotwardenError):
    """The configuration is invalid. The message names the file, the key and the line."""


class ConfigKeyError(BotwardenError):
    """A value at ``path`` (a tuple of keys and list indexes) is invalid.

    Raised by pure validators that do not know the file; the config loader turns
    it into a :class:`ConfigError` that names the file and the line.
    """

    def __init__(self, path: tuple[str | int, ...], message: str):
        self.path = tuple(path)
        self.message = message
        super().__init__(f"{dotted(self.path)}: {message}")


def dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "<root>"
