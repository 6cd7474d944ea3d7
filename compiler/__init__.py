"""The .tq compiler: rules text → `ternqc.plan.Plan`.

    program = load_program(text, filename)   # parse.py (lark → ast), following includes
    check(program)                           # check.py: every error and warning, or CompileError
    plan = lower(program)                    # lower.py: ast → Plan

`compile_source` / `compile_file` run the three passes (`ternqc compile` is `commands.compile_rules`);
`builtin_recipe` finds the recipes shipped in `ternqc.configs`. This package never imports torch.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from attrs import frozen

from ternqc.compiler import ast
from ternqc.compiler.ast import Span
from ternqc.compiler.check import check
from ternqc.compiler.errors import CompileError, Diagnostic, with_sources
from ternqc.compiler.lets import NotConstant, fold
from ternqc.compiler.lower import lower
from ternqc.compiler.parse import parse, too_deep
from ternqc.compiler.program import load_program, read_problem, read_text
from ternqc.plan import Plan

__all__ = [
    "CompileError",
    "Compiled",
    "Diagnostic",
    "builtin_recipe",
    "compile_file",
    "compile_source",
    "parse_sets",
]


@frozen
class Compiled:
    """A compiled rules file: the plan and the warnings (rules that never take effect, ...)."""

    plan: Plan
    warnings: tuple[Diagnostic, ...] = ()


def compile_source(text: str, filename: str = "<string>", overrides: dict[str, Any] | None = None) -> Compiled:
    """Compile rules text.

    Args:
        text: the rules.
        filename: the path shown in diagnostics and plan origins; includes are relative to its folder.
        overrides: `{name: value}` for the file's top-level `let`s (`--set name=value`; see `parse_sets`).

    Returns:
        The plan and any warnings.

    Raises:
        CompileError: with every error found (syntax errors end the checking of their file).
    """
    try:
        program, diagnostics = load_program(text, filename, overrides)
        diagnostics += check(program)
        diagnostics = with_sources(diagnostics, dict(program.sources))
        errors = [d for d in diagnostics if d.is_error]
        if errors:
            raise CompileError(errors)
        plan = lower(program)
    except RecursionError:
        raise CompileError([too_deep(filename)]) from None
    return Compiled(plan=plan, warnings=tuple(d for d in diagnostics if not d.is_error))


def compile_file(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Compiled:
    """Compile a rules file; plan origins show `path` as given; `overrides` as in `compile_source`.

    Raises:
        CompileError: when the file cannot be read or does not compile.
    """
    shown = os.fspath(path)
    try:
        text = read_text(shown)
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read rules file: {read_problem(exc)}"
        raise CompileError([Diagnostic(Span.whole_file(shown), msg)]) from None
    return compile_source(text, shown, overrides)


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`["k=0.6", 'name="x"']` (the `--set` options) → `{"k": 0.6, "name": "x"}`.

    A value is a constant as in a `let`: a number, a string in double quotes, true/false, or an expression
    over those.

    Raises:
        CompileError: an item is not `NAME=VALUE`, or its value is not a constant (the same name twice too).
    """
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        where = Span.whole_file(f"--set {item}")
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or not value.strip():
            problems.append(Diagnostic(where, "expected NAME=VALUE, e.g. --set k=0.6"))
            continue
        if name in out:
            problems.append(Diagnostic(where, f"'{name}' is set twice"))
            continue
        try:
            parsed = parse(f"let {name} = {value}", f"--set {item}")
        except CompileError as exc:
            problems.append(Diagnostic(where, f"the value is not a constant ({exc.diagnostics[0].message})"))
            continue
        if len(parsed) != 1 or not isinstance(parsed[0], ast.Let):
            problems.append(Diagnostic(where, "the value is not one constant"))
            continue
        try:
            out[name] = fold(parsed[0].value, {})
        except NotConstant as exc:
            problems.append(Diagnostic(where, exc.message))
    if problems:
        raise CompileError(problems)
    return out


def builtin_recipe(name: str = "toy_ternary.tq") -> pathlib.Path:
    """The path of a recipe shipped in `ternqc.configs` (works from an installed wheel, too).

    Raises:
        FileNotFoundError: when no shipped recipe has that name (the message lists those that exist).
    """
    folder = importlib.resources.files("ternqc.configs")
    found = folder / name
    if not found.is_file():
        shipped = sorted(p.name for p in folder.iterdir() if p.name.endswith(".tq"))
        msg = f"no built-in recipe {name!r}; shipped recipes: {', '.join(shipped) or 'none'}"
        raise FileNotFoundError(msg)
    return pathlib.Path(str(found))
