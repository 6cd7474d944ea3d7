"""Constants: `let` values, `include ... with { }` and `--set` overrides, and their substitution.

In: one file's statements and the values that override its `let`s. Out: the file's constants
(`{name: value}`, each a number, a string or a bool) and its statements with every use of a constant
replaced by a literal at the place of use, so the later passes never see a `let`. A `let` value is a
constant expression (numbers, strings, `true`/`false`, earlier constants, arithmetic, comparisons,
`and`/`or`/`not`, `if`, and the functions); it is folded here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from ternqc.compiler import ast
from ternqc.compiler.errors import Diagnostic, did_you_mean
from ternqc.compiler.vocab import FUNCTIONS, RESERVED_NAMES, VALUE_NAMES

Value = Any  # int | float | bool | str


class NotConstant(Exception):
    """An expression that cannot be folded: `(span, message)`."""

    def __init__(self, span: ast.Span, message: str) -> None:
        super().__init__(message)
        self.span, self.message = span, message


def _num(v: Value, span: ast.Span, what: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise NotConstant(span, f"{what} needs a number, got {kind_word(v)}")
    return v


def kind_word(v: Value) -> str:
    if isinstance(v, bool):
        return "a bool"
    if isinstance(v, str):
        return "a string"
    return "a number"


def _bool(v: Value, span: ast.Span, what: str) -> bool:
    if not isinstance(v, bool):
        raise NotConstant(span, f"{what} needs true or false, got {kind_word(v)}")
    return v


_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
    "**": lambda a, b: float(a) ** float(b),  # in floats: an integer power could take unbounded time
}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


def fold(e: ast.Expr, scope: dict[str, Value]) -> Value:
    """The value of constant expression `e`, names read from `scope`.

    Raises:
        NotConstant: `e` reads a statistic, an unknown name, or does an operation that has no value.
    """
    if isinstance(e, ast.Number):
        return e.value
    if isinstance(e, ast.String):
        return e.value
    if isinstance(e, ast.Name):
        if e.name in scope:
            return scope[e.name]
        if e.name in ("true", "false"):
            return VALUE_NAMES[e.name]
        hint = did_you_mean(e.name, list(scope))
        raise NotConstant(e.span, f"unknown name '{e.name}'" + (f"; {hint}" if hint else ""))
    if isinstance(e, ast.Neg):
        return -_num(fold(e.operand, scope), e.span, "-")
    if isinstance(e, ast.Not):
        return not _bool(fold(e.operand, scope), e.span, "not")
    if isinstance(e, ast.Cond):
        return fold(e.then, scope) if _bool(fold(e.test, scope), e.test.span, "if") else fold(e.orelse, scope)
    if isinstance(e, ast.BinOp):
        left, right = fold(e.left, scope), fold(e.right, scope)
        if e.op in ("and", "or"):
            a, b = _bool(left, e.left.span, e.op), _bool(right, e.right.span, e.op)
            return (a and b) if e.op == "and" else (a or b)
        if e.op in ("==", "!="):
            return _COMPARE[e.op](left, right)
        a, b = _num(left, e.left.span, e.op), _num(right, e.right.span, e.op)
        if e.op in _COMPARE:
            return _COMPARE[e.op](a, b)
        try:
            result = _ARITH[e.op](a, b)
        except (ZeroDivisionError, OverflowError):
            raise NotConstant(e.span, "this has no finite value") from None
        if isinstance(result, complex) or not math.isfinite(result):
            raise NotConstant(e.span, "this has no finite value")
        return result
    if isinstance(e, ast.Call):
        fn = e.fn.name
        if fn not in FUNCTIONS:
            hint = did_you_mean(fn, FUNCTIONS) or f"the functions are {', '.join(FUNCTIONS)}"
            raise NotConstant(e.fn.span, f"unknown function '{fn}'; {hint}")
        low, high = FUNCTIONS[fn]
        if len(e.args) < low or (high is not None and len(e.args) > high):
            raise NotConstant(e.span, f"{fn}() takes {low if low == high else f'at least {low}'} argument(s)")
        args = [_num(fold(a, scope), a.span, f"{fn}()") for a in e.args]
        try:
            if fn == "abs":
                return abs(args[0])
            if fn == "min":
                return min(args)
            if fn == "max":
                return max(args)
            if fn == "sqrt":
                return math.sqrt(args[0])
            if fn == "log2":
                return math.log2(args[0])
            return min(max(args[0], args[1]), args[2])  # clamp
        except ValueError:
            raise NotConstant(e.span, f"{fn}() has no value here") from None
    if isinstance(e, ast.StatRef):
        raise NotConstant(e.span, "a let holds a constant; it cannot read a statistic")
    raise NotConstant(e.span, "a let holds a constant: a number, a string, true or false")


def literal_node(value: Value, span: ast.Span) -> ast.Expr:
    """A literal node for a constant's value, at `span` (the place of use)."""
    if isinstance(value, bool):
        return ast.Name("true" if value else "false", span=span)
    if isinstance(value, str):
        return ast.String(value, span=span)
    return ast.Number(value, span=span)


def substitute(node: Any, scope: dict[str, Value]) -> Any:
    """`node` (a statement, entry, option or expression) with every name in `scope` replaced by its value."""
    if not scope:
        return node
    if isinstance(node, ast.Name):
        return literal_node(scope[node.name], node.span) if node.name in scope else node
    if isinstance(node, tuple):
        return tuple(substitute(n, scope) for n in node)
    if attrs.has(type(node)) and not isinstance(node, (ast.Ident, ast.Selector, ast.Span, ast.String)):
        changes = {
            f.name: substitute(getattr(node, f.name), scope)
            for f in attrs.fields(type(node))
            if f.name != "span" and f.eq
        }
        return attrs.evolve(node, **changes)
    return node


def bind_lets(
    statements: tuple[ast.Statement, ...],
    overrides: dict[str, tuple[Value, ast.Span]],
    diagnostics: list[Diagnostic],
) -> tuple[dict[str, Value], dict[str, ast.Let]]:
    """Fold the `let`s of one file, in order, with `overrides` ({name: (value, where it was given)}).

    Returns:
        `{name: value}` and `{name: the let statement}`; problems are appended to `diagnostics`.
    """
    scope: dict[str, Value] = {}
    lets: dict[str, ast.Let] = {}
    for stmt in statements:
        if not isinstance(stmt, ast.Let):
            continue
        name = stmt.name.name
        if name in RESERVED_NAMES:
            msg = f"'{name}' has a meaning of its own and cannot be a constant's name"
            diagnostics.append(Diagnostic(stmt.name.span, msg))
            continue
        if name in lets:
            msg = f"'{name}' is defined twice (first at line {lets[name].span.line})"
            diagnostics.append(Diagnostic(stmt.name.span, msg))
            continue
        lets[name] = stmt
        if name in overrides:
            scope[name] = overrides[name][0]
            continue
        try:
            scope[name] = fold(stmt.value, scope)
        except NotConstant as exc:
            diagnostics.append(Diagnostic(exc.span, exc.message))
    return scope, lets
