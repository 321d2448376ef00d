"""SSH requests and shell command analysis (pure).

A command string is read the way a POSIX shell reads it: quotes and backslashes
are removed, so ``'r''m'`` and ``r\\m`` are the program ``rm``; words that a shell
would split, substitute or redirect are reported as constructs (``;``, ``&&``,
``|``, ``$(...)``, backticks, ``>``, ``$VAR``, unquoted globs ...). Commands inside
``$(...)``, backticks, ``bash -c '...'`` and behind wrappers (``sudo``, ``env``,
``xargs``...) are analyzed too, so their programs count.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

RequestKind = Literal["exec", "shell", "subsystem", "forward", "sftp"]


@dataclass(frozen=True)
class SshRequest:
    kind: RequestKind
    command: str | None = None  # exec
    subsystem: str | None = None  # subsystem (e.g. "sftp")
    forward: Literal["local", "remote", "agent", "x11"] | None = None
    destination: str | None = None  # forward: "host:port"
    sftp_op: str | None = None  # read, write, remove, ...
    path: str | None = None  # sftp path

    @classmethod
    def exec(cls, command: str) -> "SshRequest":
        return cls("exec", command=command)

    def describe(self) -> str:
        if self.kind == "exec":
            return f"exec {self.command!r}"
        if self.kind == "forward":
            return f"{self.forward} forwarding to {self.destination or '-'}"
        if self.kind == "sftp":
            return f"sftp {self.sftp_op} {self.path!r}"
        if self.kind == "subsystem":
            return f"subsystem {self.subsystem}"
        return "interactive shell"


@dataclass(frozen=True)
class SshAnalysis:
    request: SshRequest
    argvs: tuple[tuple[str, ...], ...] = ()  # every simple command, nested ones included
    programs: frozenset[str] = frozenset()  # basenames of the programs run
    constructs: frozenset[str] = frozenset()
    error: str | None = None  # unbalanced quotes etc.: fail closed

    @property
    def command_lines(self) -> tuple[str, ...]:
        return tuple(" ".join(a) for a in self.argvs)

    def summary(self) -> str:
        parts = [self.request.describe()]
        if self.programs:
            parts.append("runs " + ", ".join(sorted(self.programs)))
        if self.constructs:
            parts.append("[" + ", ".join(sorted(self.constructs)) + "]")
        return " ".join(parts)


class ShellSyntaxError(ValueError):
    pass


_WRAPPERS = {"sudo", "doas", "env", "nice", "nohup", "timeout", "stdbuf", "ionice", "time", "command",
             "exec", "xargs", "setsid", "chroot", "busybox", "unbuffer", "flock", "watch", "strace", "su",
             "runuser", "taskset", "chrt"}
_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "ash", "fish", "busybox"}
_GLOB = set("*?[")


def analyze_ssh(request: SshRequest) -> SshAnalysis:
    if request.kind != "exec":
        return SshAnalysis(request)
    try:
        argvs, dynamic, constructs = _split(request.command or "")
    except ShellSyntaxError as e:
        return SshAnalysis(request, error=str(e))
    programs: set[str] = set()
    for argv, dyn in zip(argvs, dynamic):
        programs |= _programs(argv, dyn)
    return SshAnalysis(request, tuple(argvs), frozenset(programs), frozenset(constructs))


UNKNOWN_PROGRAM = "?"  # a program name the shell computes at run time ($CMD, /bin/r?, $(...))


def _programs(argv: tuple[str, ...], dyn: tuple[bool, ...]) -> set[str]:
    """The program, and behind a wrapper (sudo, env, xargs...) every later word that could be
    one: wrapper options are not parsed, so over-counting is the fail-closed side."""
    out: set[str] = set()
    i = 0
    while i < len(argv) and argv[i].partition("=")[1] and argv[i].partition("=")[0].isidentifier():
        i += 1  # NAME=value before the program (a computed value is still just a value)
    if i >= len(argv):
        return out
    prog = posixpath.basename(argv[i])
    out.add(UNKNOWN_PROGRAM if dyn[i] else prog)
    if prog in _WRAPPERS and not dyn[i]:
        for word, d in zip(argv[i + 1:], dyn[i + 1:]):
            if d:
                out.add(UNKNOWN_PROGRAM)
            elif not word.startswith("-") and "=" not in word and posixpath.basename(word):
                out.add(posixpath.basename(word))
    return out


def split_command(text: str, depth: int = 0) -> tuple[list[tuple[str, ...]], set[str]]:
    """Simple commands (argv after quote removal) and the constructs a shell would act on."""
    argvs, _, constructs = _split(text, depth)
    return argvs, constructs


_ANSI_C = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
           "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}


def _ansi_c(text: str, start: int) -> tuple[str, int]:
    """Decode bash's $'...' quoting from ``start`` (after the quote); return (text, index after)."""
    out, i, n = [], start, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            return "".join(out), i + 1
        if c == "\\" and i + 1 < n:
            d = text[i + 1]
            if d in _ANSI_C:
                out.append(_ANSI_C[d])
                i += 2
                continue
            for prefix, base, width in (("x", 16, 2), ("u", 16, 4), ("U", 16, 8)):
                if d == prefix:
                    j = i + 2
                    while j < n and j < i + 2 + width and text[j] in "0123456789abcdefABCDEF":
                        j += 1
                    if j > i + 2:
                        out.append(chr(min(int(text[i + 2:j], base), 0x10FFFF)))
                        i = j
                        break
            else:
                if d in "01234567":
                    j = i + 1
                    while j < n and j < i + 4 and text[j] in "01234567":
                        j += 1
                    out.append(chr(int(text[i + 1:j], 8) & 0xFF))
                    i = j
                elif d == "c" and i + 2 < n:
                    out.append(chr(ord(text[i + 2]) & 0x1F))
                    i += 3
                else:
                    out.append("\\" + d)
                    i += 2
                continue
            continue
        out.append(c)
        i += 1
    raise ShellSyntaxError("unterminated $'...' quote")


def _split(text: str, depth: int = 0) -> tuple[list[tuple[str, ...]], list[tuple[bool, ...]], set[str]]:
    """Like split_command, plus for every word whether the shell computes it at run time
    (an expansion, substitution or glob outside quotes): such a word could be any program."""
    if depth > 8:
        raise ShellSyntaxError("command nested too deeply")
    argvs: list[tuple[str, ...]] = []
    dynamic: list[tuple[bool, ...]] = []
    constructs: set[str] = set()
    words: list[str] = []
    word_dyn: list[bool] = []
    word: list[str] | None = None
    dyn = False
    i, n = 0, len(text)

    def end_word() -> None:
        nonlocal word, dyn
        if word is not None:
            words.append("".join(word))
            word_dyn.append(dyn)
            word = None
            dyn = False

    def end_command() -> None:
        end_word()
        if words:
            argvs.append(tuple(words))
            dynamic.append(tuple(word_dyn))
            words.clear()
            word_dyn.clear()

    def substitution(start: int, closer: str) -> int:
        """Analyze ``$( ... )`` or backticks starting after the opener; return the index after it."""
        j, level, quote = start, 1, None
        while j < n:
            c = text[j]
            if quote:
                if c == quote:
                    quote = None
                elif c == "\\" and quote == '"':
                    j += 1
            elif c in "'\"":
                quote = c
            elif c == "\\":
                j += 1
            elif closer == ")" and c == "(":
                level += 1
            elif c == closer:
                level -= 1
                if level == 0:
                    inner_argvs, inner_dyn, inner_constructs = _split(text[start:j], depth + 1)
                    argvs.extend(inner_argvs)
                    dynamic.extend(inner_dyn)
                    constructs.update(inner_constructs)
                    return j + 1
            j += 1
        raise ShellSyntaxError("unterminated command substitution")

    while i < n:
        c = text[i]
        if c in " \t":
            end_word()
            i += 1
        elif c == "\n":
            constructs.add("newline")
            end_command()
            i += 1
        elif c == "#" and word is None:
            constructs.add("sequence")  # a comment hides the rest from a reader, not from the shell
            while i < n and text[i] != "\n":
                i += 1
        elif c == ";":
            constructs.add("sequence")
            end_command()
            i += 1
        elif c == "&":
            if text.startswith("&&", i):
                constructs.add("and_or")
                i += 2
            elif text.startswith("&>", i):
                constructs.add("redirect")
                i += 2
                continue
            else:
                constructs.add("background")
                i += 1
            end_command()
        elif c == "|":
            constructs.add("and_or" if text.startswith("||", i) else "pipe")
            i += 2 if text.startswith("||", i) else 1
            end_command()
        elif c in "<>":
            constructs.add("redirect")
            if text.startswith("<(", i) or text.startswith(">(", i):
                constructs.add("subst")
                end_word()
                i = substitution(i + 2, ")")
                continue
            end_word()
            i += 1
            if i < n and text[i] in "&<>|":  # >& >> << >| : still one redirection operator
                i += 1
        elif c in "()":
            constructs.add("subshell")
            end_command()
            i += 1
        elif c == "`":
            constructs.add("subst")
            word = word if word is not None else []
            dyn = True
            i = substitution(i + 1, "`")
        elif c == "$":
            word = word if word is not None else []
            if text.startswith("$'", i):
                decoded, i = _ansi_c(text, i + 2)
                word.append(decoded)
            elif text.startswith("$(", i) and not text.startswith("$((", i):
                constructs.add("subst")
                dyn = True
                i = substitution(i + 2, ")")
            else:
                constructs.add("expansion")
                dyn = True
                word.append(c)
                i += 1
        elif c == "\\":
            word = word if word is not None else []
            if i + 1 < n and text[i + 1] != "\n":
                word.append(text[i + 1])
            i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ShellSyntaxError("unterminated single quote")
            word = word if word is not None else []
            word.append(text[i + 1:end])
            i = end + 1
        elif c == '"':
            word = word if word is not None else []
            j = i + 1
            while True:
                if j >= n:
                    raise ShellSyntaxError("unterminated double quote")
                d = text[j]
                if d == '"':
                    break
                if d == "\\" and j + 1 < n and text[j + 1] in '$`"\\\n':
                    word.append(text[j + 1])
                    j += 2
                    continue
                if d == "`":
                    constructs.add("subst")
                    dyn = True
                    j = substitution(j + 1, "`")
                    continue
                if d == "$":
                    if text.startswith("$(", j) and not text.startswith("$((", j):
                        constructs.add("subst")
                        dyn = True
                        j = substitution(j + 2, ")")
                        continue
                    constructs.add("expansion")
                    dyn = True
                word.append(d)
                j += 1
            i = j + 1
        else:
            if c in _GLOB:
                constructs.add("glob")
                dyn = True
            elif c == "{":
                close = text.find("}", i)
                if close > 0 and ("," in text[i:close] or ".." in text[i:close]):
                    constructs.add("glob")  # brace expansion
                    dyn = True
            elif c == "~" and word is None:
                constructs.add("expansion")
            word = word if word is not None else []
            word.append(c)
            i += 1
    end_command()

    # `bash -c 'cmd'`: the string is a command too.
    for argv in list(argvs):
        progs = list(argv)
        for k, w in enumerate(progs):
            if posixpath.basename(w) in _SHELLS and "-c" in progs[k + 1:]:
                idx = progs.index("-c", k + 1)
                if idx + 1 < len(progs):
                    inner_argvs, inner_dyn, inner_constructs = _split(progs[idx + 1], depth + 1)
                    argvs.extend(inner_argvs)
                    dynamic.extend(inner_dyn)
                    constructs.update(inner_constructs)
                    constructs.add("subshell")
                break
    return argvs, dynamic, constructs
