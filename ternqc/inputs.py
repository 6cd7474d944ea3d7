"""Reading the user's input files defensively: regular files only, a size limit, a nesting limit.

Shared by the compiler (rules files) and the runtime (plans, statistics and config TOML, checkpoints); it
imports neither lark nor torch.

- `read_bytes(path, what, limit)` / `read_text(...)`: the whole file, refused *before* reading when it is not
  a regular file (a FIFO would block forever, `/dev/zero` never ends) or larger than `limit` bytes.
- `check_regular(path, what)`: the same refusal for readers that open the file themselves (`torch.load`).
- `check_nesting(text, what, limit, syntax)`: refuse JSON or TOML text whose brackets nest deeper than
  `limit`, naming the line and column, before a recursive parser meets it.

Every refusal is an `InputError`, an `OSError` whose `strerror` is the sentence to show, so callers that
already report `OSError`s (`exc.strerror`) report these too.
"""

from __future__ import annotations

import errno
import os
import re
import stat

#: Size limits, in bytes, of what ternqc reads whole into memory.
MAX_RULES_BYTES = 16 * 2**20
MAX_PLAN_BYTES = 64 * 2**20
MAX_TOML_BYTES = 256 * 2**20
#: Nesting limits: a plan's JSON (an expression node is two levels), and TOML arrays / inline tables.
MAX_JSON_DEPTH = 256
MAX_TOML_DEPTH = 32

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


class InputError(OSError):
    """An input file refused before (or instead of) reading it; `strerror` says why, in a few words."""

    def __init__(self, reason: str, code: int = errno.EINVAL) -> None:
        super().__init__(code, reason)

    def __str__(self) -> str:
        return self.strerror


def _kind(mode: int) -> str | None:
    for test, name in _KINDS:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_regular(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """`os.stat(path)`, refusing anything but a regular file (symbolic links are followed).

    Raises:
        FileNotFoundError, PermissionError, ...: as `os.stat`.
        InputError: `path` is a FIFO, a device, a socket or a directory.
    """
    st = os.stat(path)
    kind = _kind(st.st_mode)
    if kind is not None:
        code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
        raise InputError(
            f"it is {kind}, not a regular file; ternqc reads {what}s only from regular files", code
        )
    return st


def _human(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def read_bytes(path: str | os.PathLike[str], what: str = "file", limit: int = MAX_PLAN_BYTES) -> bytes:
    """The whole content of `path`, a regular file of at most `limit` bytes.

    The file is opened without blocking (a FIFO swapped in after the check cannot hang the reader) and
    checked again on the open descriptor; at most `limit + 1` bytes are ever read.

    Raises:
        OSError: as `open` (missing file, permission denied).
        InputError: not a regular file, or larger than `limit`.
    """
    if check_regular(path, what).st_size > limit:
        raise InputError(f"it is larger than the {_human(limit)} ternqc reads for a {what}", errno.EFBIG)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise InputError(f"it is {kind}, not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputError(f"it is larger than the {_human(limit)} ternqc reads for a {what}", errno.EFBIG)
    return data


def read_text(path: str | os.PathLike[str], what: str = "file", limit: int = MAX_PLAN_BYTES) -> str:
    """`read_bytes` decoded as UTF-8 (a leading byte-order mark dropped).

    Raises:
        As `read_bytes`, and `UnicodeDecodeError`.
    """
    return read_bytes(path, what, limit).decode("utf-8-sig")


_JSON_MARKS = re.compile(r'[\[\]{}"]')
_TOML_MARKS = re.compile(r"[\[\]{}\"'#]")
_BASIC_END = re.compile(r'["\\\n]')  # the end of a one-line "..." string, an escape, or a line break


def check_nesting(text: str, what: str, limit: int, syntax: str = "json") -> None:
    """Refuse `text` when its `[`/`{` brackets nest deeper than `limit`, outside strings and comments.

    Only the characters that matter are visited (a regular expression finds them), so a 256 MiB statistics
    file of numbers is scanned in a fraction of a second.

    Args:
        text: JSON (`syntax="json"`) or TOML (`syntax="toml"`: `#` comments, '...' literal strings and
            triple-quoted strings are skipped too).
        what: the input's name for the message, e.g. `plan p.json`.
        limit: the deepest nesting allowed.

    Raises:
        ValueError: "`what`:LINE:COL: nested deeper than LIMIT levels", at the first bracket too deep.
    """
    toml = syntax == "toml"
    marks = _TOML_MARKS if toml else _JSON_MARKS
    depth, i, n = 0, 0, len(text)
    while i < n:
        m = marks.search(text, i)
        if m is None:
            return
        i = m.start()
        c = text[i]
        if c in "[{":
            depth += 1
            if depth > limit:
                line = text.count("\n", 0, i) + 1
                col = i - (text.rfind("\n", 0, i) + 1) + 1
                msg = f"{what}:{line}:{col}: nested deeper than {limit} levels; ternqc refuses deeper input"
                raise ValueError(msg)
        elif c in "]}":
            depth -= 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        else:
            i = _skip_string(text, i, toml)
            continue
        i += 1


def _skip_string(text: str, i: int, toml: bool) -> int:
    """The index just past the string that starts at `text[i]` (or the end of text when unterminated)."""
    quote = text[i]
    if toml and text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        while quote == '"' and end > 0 and _escaped(text, end):
            end = text.find(quote * 3, end + 1)
        return len(text) if end < 0 else end + 3
    if quote == "'":  # a literal string: no escapes, ends at the quote or the line
        ends = [e for e in (text.find("'", i + 1), text.find("\n", i + 1)) if e >= 0]
        return min(ends) + 1 if ends else len(text)
    j = i + 1
    while True:
        m = _BASIC_END.search(text, j)
        if m is None:
            return len(text)
        if m.group() == "\\":
            j = m.start() + 2
            continue
        return m.start() + 1


def _escaped(text: str, i: int) -> bool:
    backslashes = 0
    while i - 1 - backslashes >= 0 and text[i - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1
