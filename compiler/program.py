"""Read a rules file and everything it includes: text → `ast.Program` plus diagnostics.

`include "path"` is relative to the including file. Each file is read once (a second include of the same
file adds nothing); a file's includes are expanded, in the order written, before the file's own statements,
so an including file's rules come later and win at equal specificity. A missing or unreadable include is an
error at its `include` statement; an include cycle is an error at the include that starts the cycle.
Syntax errors end the reading of their file only: other files are still read and checked.
"""

from __future__ import annotations

import os

from attrs import frozen

from ternqc import inputs
from ternqc.compiler import ast
from ternqc.compiler.errors import CompileError, Diagnostic
from ternqc.compiler.parse import parse


def read_text(path: str) -> str:
    """A rules file's text (UTF-8, a byte-order mark dropped). Raises `OSError` or `UnicodeDecodeError`;
    a FIFO, a device or a file over `inputs.MAX_RULES_BYTES` is refused before reading (`InputError`)."""
    return inputs.read_text(path, "rules file", inputs.MAX_RULES_BYTES)


def read_problem(exc: Exception) -> str:
    """Why a file could not be read, in a few words."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnicodeDecodeError):
        return f"it is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
    return getattr(exc, "strerror", None) or str(exc)  # e.g. "it is not a regular file"


@frozen
class _Open:
    """A file being expanded: its real path, its shown path, and the include statement that opened it."""

    real: str
    shown: str
    via: ast.Include | None


def load_program(text: str, filename: str) -> tuple[ast.Program, list[Diagnostic]]:
    """Parse `text` (shown as `filename`) and the files it includes.

    Returns:
        The program (whatever could be read and parsed) and the diagnostics found while reading.
    """
    sources: dict[str, str] = {}
    statements: list[ast.Statement] = []
    diagnostics: list[Diagnostic] = []
    done: set[str] = set()

    def expand(shown: str, body: str, stack: list[_Open]) -> None:
        sources.setdefault(shown, body)
        try:
            parsed = parse(body, shown)
        except CompileError as exc:
            diagnostics.extend(exc.diagnostics)
            return
        for stmt in parsed:
            if isinstance(stmt, ast.Include):
                include(stmt, shown, stack)
        statements.extend(s for s in parsed if not isinstance(s, ast.Include))

    def include(stmt: ast.Include, including: str, stack: list[_Open]) -> None:
        written = stmt.path.value
        if not written.strip():
            diagnostics.append(Diagnostic(stmt.path.span, "include needs a file path"))
            return
        shown = os.path.normpath(os.path.join(os.path.dirname(including), written))
        real = os.path.realpath(shown)
        reals = [o.real for o in stack]
        if real in reals:
            start = reals.index(real)
            chain = [o.shown for o in stack[start:]] + [shown]
            opener = stack[start + 1].via if start + 1 < len(stack) else stmt
            assert opener is not None
            msg = f"include cycle: {' → '.join(chain)}"
            if not any(d.span == opener.span and d.message == msg for d in diagnostics):
                diagnostics.append(Diagnostic(opener.span, msg))
            return
        if real in done:
            return
        try:
            if os.path.exists(shown) and not os.path.isdir(shown) and not os.path.isfile(shown):
                raise OSError("it is not a regular file")  # a device or a pipe: never read it
            body = read_text(shown)
        except (OSError, UnicodeDecodeError) as exc:
            msg = f'cannot include "{written}": {read_problem(exc)}'
            diagnostics.append(Diagnostic(stmt.path.span, msg, f"looked for {shown}"))
            return
        expand(shown, body, [*stack, _Open(real, shown, stmt)])
        done.add(real)

    root = _Open(os.path.realpath(filename), filename, None)
    expand(filename, text, [root])
    return ast.Program(tuple(sources.items()), tuple(statements)), diagnostics
