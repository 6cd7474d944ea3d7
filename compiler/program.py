"""Read a rules file and everything it includes: text → `ast.Program` plus diagnostics.

`include "path"` is relative to the including file; `include recipe "twn"` reads `twn.tq` shipped in
`ternqc.configs`. `let`s are folded per file (`lets.py`) and substituted into that file's statements; an
include's `with { k = v }` overrides the included file's `let`s, `overrides` (`--set k=v`) the root file's. Each file is read once (a second include of the same
file adds nothing); a file's includes are expanded, in the order written, before the file's own statements,
so an including file's rules come later and win at equal specificity. A missing or unreadable include is an
error at its `include` statement; an include cycle is an error at the include that starts the cycle.
Syntax errors end the reading of their file only: other files are still read and checked.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Any

from attrs import frozen

from ternqc import inputs
from ternqc.compiler import ast
from ternqc.compiler.errors import CompileError, Diagnostic, did_you_mean
from ternqc.compiler.lets import NotConstant, bind_lets, fold, substitute
from ternqc.compiler.parse import parse

#: How a shipped recipe's path reads in origins and messages (`ternqc.configs/twn.tq`).
RECIPE_PREFIX = "ternqc.configs/"


def recipe_path(name: str) -> str | None:
    """The path of shipped recipe `name` (`twn` or `twn.tq`) in `ternqc.configs`, `None` when none is."""
    folder = importlib.resources.files("ternqc.configs")
    found = folder / (name if name.endswith(".tq") else name + ".tq")
    return str(found) if found.is_file() else None


def shipped_recipes() -> list[str]:
    """The names of the shipped recipes, without `.tq`."""
    folder = importlib.resources.files("ternqc.configs")
    return sorted(p.name[: -len(".tq")] for p in folder.iterdir() if p.name.endswith(".tq"))


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


Overrides = dict[str, tuple[Any, ast.Span]]


def load_program(
    text: str, filename: str, overrides: dict[str, Any] | None = None
) -> tuple[ast.Program, list[Diagnostic]]:
    """Parse `text` (shown as `filename`) and the files it includes.

    Args:
        overrides: `{name: value}` replacing the root file's top-level `let`s (`--set name=value`).

    Returns:
        The program (whatever could be read and parsed) and the diagnostics found while reading.
    """
    sources: dict[str, str] = {}
    statements: list[ast.Statement] = []
    diagnostics: list[Diagnostic] = []
    done: set[str] = set()
    folders: dict[str, str] = {}  # shown path -> the folder its includes are relative to
    root_lets: list[ast.LetValue] = []
    let_names: dict[str, tuple[str, ...]] = {}
    broken: list[tuple[str, str]] = []

    def expand(shown: str, body: str, stack: list[_Open], given: Overrides, via: ast.Include | None) -> None:
        sources.setdefault(shown, body)
        try:
            parsed = parse(body, shown)
        except CompileError as exc:
            diagnostics.extend(exc.diagnostics)
            return
        scope, lets = bind_lets(parsed, given, diagnostics)
        let_names[shown] = tuple(lets)
        broken.extend((shown, name) for name in lets if name not in scope)
        for name, (_value, span) in given.items():
            if name not in lets:
                hint = did_you_mean(name, lets) or (
                    f"its constants are {', '.join(lets)}" if lets else "it has no let"
                )
                if via is None:
                    msg = f"--set {name}: the rules file has no top-level let '{name}' to override"
                else:
                    msg = f"\"{via.path.value}\" has no let '{name}' to override"
                diagnostics.append(Diagnostic(span, msg, hint))
        if via is None:
            for name, let in lets.items():
                if name in scope:
                    how = "set" if name in given else "let"
                    root_lets.append(ast.LetValue(name, scope[name], how, span=let.span))
        for stmt in parsed:
            if isinstance(stmt, ast.Include):
                include(stmt, shown, stack, scope)
        statements.extend(
            substitute(s, scope) for s in parsed if not isinstance(s, (ast.Include, ast.Let))
        )

    def include(stmt: ast.Include, including: str, stack: list[_Open], scope: dict[str, Any]) -> None:
        given: Overrides = {}
        for entry in stmt.with_:
            name = entry.key.name
            if name in given:
                msg = f"'{name}' is set twice in this block (first at line {given[name][1].line})"
                diagnostics.append(Diagnostic(entry.key.span, msg))
                continue
            try:
                given[name] = (fold(entry.value, scope), entry.key.span)
            except NotConstant as exc:
                diagnostics.append(Diagnostic(exc.span, exc.message))
        written = stmt.path.value
        if not written.strip():
            diagnostics.append(Diagnostic(stmt.path.span, "include needs a file path"))
            return
        if stmt.recipe:
            found = recipe_path(written)
            if found is None:
                shipped = shipped_recipes()
                hint = did_you_mean(written.removesuffix(".tq"), shipped) or f"shipped: {', '.join(shipped)}"
                diagnostics.append(Diagnostic(stmt.path.span, f"no shipped recipe '{written}'", hint))
                return
            on_disk = os.path.normpath(found)
            shown = RECIPE_PREFIX + os.path.basename(on_disk)  # the same on every machine (goldens, messages)
        else:
            on_disk = os.path.normpath(os.path.join(folders.get(including, os.path.dirname(including)), written))
            shown = on_disk
        folders[shown] = os.path.dirname(on_disk)
        real = os.path.realpath(on_disk)
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
            if os.path.exists(on_disk) and not os.path.isdir(on_disk) and not os.path.isfile(on_disk):
                raise OSError("it is not a regular file")  # a device or a pipe: never read it
            body = read_text(on_disk)
        except (OSError, UnicodeDecodeError) as exc:
            msg = f'cannot include "{written}": {read_problem(exc)}'
            diagnostics.append(Diagnostic(stmt.path.span, msg, f"looked for {on_disk}"))
            return
        expand(shown, body, [*stack, _Open(real, shown, stmt)], given, stmt)
        done.add(real)

    root = _Open(os.path.realpath(filename), filename, None)
    where = ast.Span.whole_file(filename)
    expand(filename, text, [root], {k: (v, where) for k, v in (overrides or {}).items()}, None)
    program = ast.Program(
        tuple(sources.items()), tuple(statements), tuple(root_lets), tuple(let_names.items()), tuple(broken)
    )
    return program, diagnostics
