"""Typed, frozen models built from plain TOML data, with errors that name the key.

Every config model is a frozen dataclass. :func:`build` walks its fields and
their type hints (str, int, float, bool, Literal, tuple[X, ...], X | None,
nested dataclasses, dict[str, X]) and raises :class:`ConfigKeyError` with the
full key path on the first problem: an unknown key, a wrong type, a missing
required key, or a value a field's own check refuses. The config loader turns
that path into a file name and a line (see :class:`TomlLocator`).

Pure: no I/O, so the policy room may use it for its rule models.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin, get_type_hints

from appliance.errors import ConfigKeyError

T = TypeVar("T")
Path_ = tuple[str | int, ...]

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def check(fn: Callable[[Any], Any]) -> dict[str, Any]:
    """Field metadata: ``fn(value)`` returns the (possibly converted) value or raises ValueError."""
    return {"check": fn}


def build(cls: type[T], raw: Any, path: Path_ = ()) -> T:
    """Build dataclass ``cls`` from ``raw`` (a mapping), validating every key."""
    if not isinstance(raw, Mapping):
        raise ConfigKeyError(path, f"must be a table, not {_describe(raw)}")
    hints = get_type_hints(cls, include_extras=False)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # TOML keys may use dashes; model fields use underscores.
    known = {name.replace("_", "-"): name for name in fields} | {name: name for name in fields}
    for key in raw:
        if key not in known:
            close = _closest(key, list(fields))
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigKeyError((*path, key), f"unknown key{hint}; allowed: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = known[key]
        field = fields[name]
        value = convert(hints[name], value, (*path, key))
        if "check" in field.metadata:
            try:
                value = field.metadata["check"](value)
            except ValueError as e:
                raise ConfigKeyError((*path, key), str(e)) from None
        kwargs[name] = value
    for name, field in fields.items():
        if name not in kwargs and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigKeyError((*path, name), "required key is missing")
    try:
        obj = cls(**kwargs)
    except ValueError as e:  # a model's own __post_init__ cross-field check
        raise ConfigKeyError(path, str(e)) from None
    return obj


def convert(tp: Any, value: Any, path: Path_) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigKeyError(path, f"must be one of {', '.join(repr(c) for c in choices)}, not {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        if len(args) == 1:  # X | None: keep the inner error's own key path (e.g. rules[0].sql.kinds)
            return convert(args[0], value, path)
        errors = []
        for arg in args:
            try:
                return convert(arg, value, path)
            except ConfigKeyError as e:
                if len(e.path) > len(path):  # the value had the right shape; a deeper key is wrong
                    raise
                errors.append(e.message)
        raise ConfigKeyError(path, " or ".join(errors))
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigKeyError(path, f"must be a list, not {_describe(value)}")
        item_tp = args[0]
        return tuple(convert(item_tp, v, (*path, i)) for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        args = get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise ConfigKeyError(path, f"must be a table, not {_describe(value)}")
        return types.MappingProxyType({str(k): convert(args[1], v, (*path, str(k))) for k, v in value.items()})
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigKeyError(path, f"must be {_TYPE_NAMES[float]}, not {_describe(value)}")
        return float(value)
    if tp in (str, int, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigKeyError(path, f"must be {_TYPE_NAMES[tp]}, not {_describe(value)}")
        return value
    raise TypeError(f"schema: unsupported field type {tp!r} at {path}")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _closest(word: str, candidates: list[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word.replace("-", "_"), candidates, n=1, cutoff=0.7)
    return found[0] if found else None


# --- line numbers ---------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)(\s*\.\s*("[^"]*"|'[^']*'|[A-Za-z0-9_\-]+))*\s*=""")


def _split_dotted(text: str) -> list[str]:
    parts, buf, quote = [], "", None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
            else:
                buf += ch
        elif ch in "\"'":
            quote = ch
        elif ch == ".":
            parts.append(buf.strip())
            buf = ""
        else:
            buf += ch
    parts.append(buf.strip())
    return parts


class TomlLocator:
    """Maps a key path to the line of a TOML document where it is written.

    It reads table headers, arrays of tables and ``key =`` lines; a path it has
    not seen (a key inside an inline table, a missing key) resolves to the
    line of its longest known prefix.
    """

    def __init__(self, text: str):
        self.lines: dict[Path_, int] = {}
        counters: dict[tuple, int] = {}
        current: Path_ = ()
        in_multiline = False
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                    in_multiline = False
                continue
            header = _HEADER.match(line)
            if header and not _KEY.match(line):
                names = _split_dotted(header.group(2))
                resolved: list[str | int] = []
                # Resolve each prefix to the latest element of any array of tables.
                for name in names[:-1]:
                    resolved.append(name)
                    idx = counters.get(tuple(resolved))
                    if idx is not None:
                        resolved.append(idx)
                resolved.append(names[-1])
                if header.group(1) == "[[":
                    key = tuple(resolved)
                    counters[key] = counters.get(key, -1) + 1
                    resolved.append(counters[key])
                current = tuple(resolved)
                self.lines.setdefault(current, lineno)
                if isinstance(current[-1], int):
                    self.lines.setdefault(current[:-1], lineno)
                continue
            key = _KEY.match(line)
            if key:
                names = _split_dotted(line.split("=", 1)[0])
                self.lines[(*current, *names)] = lineno
                rest = line.split("=", 1)[1]
                if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                    in_multiline = True

    def line_of(self, path: Path_) -> int | None:
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None
