"""What the checker (`check.py`) needs beside its passes: the reference context of an expression, the
variables an `assert` may read, and the small texts of its messages (hints, selectors, options, widths).

In: AST nodes and plan values. Out: values and strings; nothing here reports a diagnostic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import attrs
from attrs import frozen

from ternqc import plan
from ternqc.compiler import ast
from ternqc.compiler.errors import and_list, did_you_mean
from ternqc.compiler.vocab import (
    is_int,
    is_number,
    literal,
)
from ternqc.render import tensor_word


def name_hint(word: str, known: Iterable[str], what: str) -> str:
    """"did you mean 'x'?" when a known name is close, else "<what> a, b and c"."""
    known = list(known)
    return did_you_mean(word, known) or f"{what} {and_list(known)}"


def kind_of(expr: ast.Expr) -> str:
    """What a value is, for "takes X, got Y" messages."""
    value = literal(expr)
    if value is None:
        return "na"
    if isinstance(value, bool):
        return "a bool"
    if is_int(value):
        return f"the integer {value}"
    if is_number(value):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(expr, ast.List):
        return "a list"
    if isinstance(expr, ast.StatRef):
        return "a statistic"
    if isinstance(expr, ast.Name):
        return f"the name '{expr.name}'"
    return "an expression"


@frozen
class RefContext:
    """What a statistic reference inside the value of parameter `key` refers to (`key` is "assert" in an
    assertion, where `variables` are the names it may read, with their kinds)."""

    key: str
    tensor: str  # canonical tensor of the parameter's prefix; "" in an assertion (say which)
    sel: plan.Selector | None
    written: ast.Selector | None
    variables: dict[str, str] = attrs.field(factory=dict)


KIND_WORDS = {"number": "a number", "bool": "a bool", "string": "a string"}

#: What `assert model:` may read.
MODEL_VARIABLES = {"float_accuracy": "number", "quantised_accuracy": "number"}
#: What conversion measures per quantised tensor, readable by `assert SELECTOR:`.
MEASURED_SUFFIXES = ("delta", "alpha", "zero_fraction")


def assert_variables(tensors: tuple[str, ...] | None) -> dict[str, str]:
    """The names `assert SELECTOR:` may read, with their kinds: parameters and measured values of the
    tensors the selected modules have (all of them when the compiler cannot tell)."""
    tensors = tensors or plan.PARAM_TENSORS
    kinds = {"int": "number", "number": "number", "bool": "bool", "quantiser": "string"}
    out = {"name": "string"}
    for t in tensors:
        for suffix, kind in plan.PARAM_SUFFIXES.items():
            out[f"{t}_{suffix}"] = kinds[kind]
        for suffix in MEASURED_SUFFIXES:
            out[f"{t}_{suffix}"] = "number"
    return out


def assert_hint(name: str, ctx: RefContext) -> str:
    close = did_you_mean(name, ctx.variables)
    if close:
        return close
    if ctx.sel is None:
        return "assert model: reads float_accuracy and quantised_accuracy"
    return "an assertion reads parameters (weight_width), measured values (weight_delta, weight_alpha, " \
           "weight_zero_fraction) and statistics (stat(weight).abs_mean.abs_mean)"


_MISTAKEN_INDEX = re.compile(r"(?P<type>[a-z_][a-z0-9_]*)\[(?P<index>-?\d+)\]")


def mistaken_pattern(text: str) -> str:
    """A hint when a quoted pattern looks like a selector written wrong (`"linear[-1]"`, `"re:..."`), else ""."""
    if text.startswith(("re:", "regex:")):
        pattern = text.split(":", 1)[1]
        return f're"{pattern}" is a regular expression'
    m = _MISTAKEN_INDEX.fullmatch(text)
    if m and m["type"] in plan.QUANTISABLE:
        index = int(m["index"])
        if index == -1:
            return f"the last {m['type']} is last({m['type']})"
        if index == 0:
            return f"the first {m['type']} is first({m['type']}); a module named {m['type']}0 is \"{m['type']}0\""
        if index < 0:
            return f"a glob [..] matches one character; the last {m['type']} is last({m['type']})"
    return ""


def in_range(value: int | float) -> bool:
    """Whether a number converts to a finite float (`1e999` and 400-digit integers do not)."""
    return abs(value) <= 1e300 if isinstance(value, int) else math.isfinite(value)


def valid_selector(sel: ast.Selector) -> bool:
    """Whether `selector_of(sel)` gives a valid plan selector (a regular expression compiles)."""
    if sel.form != "regex":
        return True
    try:
        re.compile(sel.text)
    except re.error:
        return False
    return True


def sel_text(sel: ast.Selector) -> str:
    return f'"{sel.text}"' if sel.quoted else sel.text


def ambiguous(ref: Any, found: list[plan.StatSpec]) -> str:
    """"ambiguous: range_quantile is collected with quantile=0.5 and quantile=0.99 on weight; say which,
    e.g. stat.range_quantile(quantile = 0.99).max"."""
    stat = ref.node.stat.name
    described = [differences(spec, found) for spec in found]
    example_opts = dict(described[-1])
    if ref.tensor in ("weight", "bias") and {k for d in described for k, _ in d} == {"dims"}:
        # per-output-channel layouts of different types ([1] on a Linear, [1, 2, 3] on a Conv2d): one of
        # them would fail on the other type; per_channel means the right one for each
        example_opts["dims"] = "per_channel"
    for opt in ref.node.options or ():
        example_opts.setdefault(opt.name.name, option_text(ref.written[opt.name.name]))
    head = f"stat({ref.node.tensor.name})" if ref.node.tensor is not None else "stat"
    opts = ", ".join(f"{k} = {v}" for k, v in example_opts.items())
    example = f"{head}.{stat}({opts}).{ref.node.field.name}"
    listed = and_list([", ".join(f"{k}={v}" for k, v in d) for d in described])
    return (f"ambiguous: {stat} is collected with {listed} on {tensor_word(ref.tensor)}; "
            f"say which, e.g. {example}")


def option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def differences(spec: plan.StatSpec, among: list[plan.StatSpec]) -> list[tuple[str, str]]:
    """The options of `spec` whose values differ among `among`, as (name, text)."""
    def values(s: plan.StatSpec) -> dict[str, Any]:
        return {"dims": s.dims, "abs": s.abs, **dict(s.options)}

    mine = values(spec)
    return [(k, option_text(v)) for k, v in mine.items() if any(values(o)[k] != v for o in among)]


def widths_text(widths: tuple[int, ...]) -> str:
    """`(2,)` -> `2`, `(2, 3, ..., 16)` -> `2-16`."""
    if len(widths) > 1 and list(widths) == list(range(widths[0], widths[-1] + 1)):
        return f"{widths[0]}-{widths[-1]}"
    return "/".join(map(str, widths))
