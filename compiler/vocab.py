"""The language's words and the plan's values: selectors, tensors, literals, statistic specs.

`check.py` uses these to judge a program and `lower.py` to build the plan from a judged one, so both passes
read the words the same way. Everything here is a pure function of `ast` nodes and `ternqc.plan`'s
vocabulary; nothing reports errors (a `None` or `NOT_LITERAL` result means "not valid", and `check.py`
says why).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ternqc import plan
from ternqc.compiler import ast

#: Tensor names the language accepts besides `data_in_N` / `data_out_N`.
TENSOR_WORDS: tuple[str, ...] = ("data_in", "data_out", "weight", "bias", "data_in_0", "data_out_0")
_NUMBERED = re.compile(r"(data_in|data_out)_(0|[1-9][0-9]{0,3})")

#: Module types whose tensors the language knows; `default` stands for all of them.
DEFAULT = "default"

#: Functions allowed in expressions, with their argument counts (min, max; None = unbounded).
FUNCTIONS: dict[str, tuple[int, int | None]] = plan.FUNCTIONS

#: Bare names with a meaning in a value position.
VALUE_NAMES = {"true": True, "false": False, "na": None}

#: Granularity words for the `dims` option: the output-channel axis of a weight (any type), the channel axis
#: of an input; or the whole tensor.
GRANULARITY = ("per_channel", "per_tensor")

#: Names a `let` may not take: they mean something of their own where a value is expected.
RESERVED_NAMES = frozenset({*VALUE_NAMES, "all", "none", "stat", *GRANULARITY})

#: The `calibrate { }` keys and the kind of value each takes.
CALIBRATE_KEYS: dict[str, str] = {"samples": "count", "batch_size": "count", "split": "string"}

NOT_LITERAL = object()


# --- selectors ---------------------------------------------------------------------------------------------


def selector_of(sel: ast.Selector) -> plan.Selector:
    """The plan's selector for a written one: bare → `type` (`default` → `default`); quoted → `glob` when
    it holds `*`, `?` or `[`, else `name`; `re"..."` → `regex`; `T in "glob"` → `scoped`; `first(T)`,
    `last(T)` → `first`, `last`."""
    if sel.form == "regex":
        return plan.Selector("regex", sel.text)
    if sel.form == "scoped":
        return plan.Selector("scoped", sel.text, scope=sel.scope)
    if sel.form in ("first", "last"):
        return plan.Selector(sel.form, sel.text)
    if not sel.quoted:
        return plan.Selector("default") if sel.text == DEFAULT else plan.Selector("type", sel.text)
    if any(c in sel.text for c in "*?["):
        return plan.Selector("glob", sel.text)
    return plan.Selector("name", sel.text)


def type_tensors(sel: plan.Selector) -> tuple[str, ...] | None:
    """The language tensor names (`data_in`, `weight`, ...) modules picked by `sel` have, when the compiler
    knows them (`default` and quantisable types); `None` when only the runtime can tell."""
    if sel.kind == "default":
        names: list[str] = []
        for tensors in plan.QUANTISABLE.values():
            names += [t for t in tensors if t not in names]
        return tuple(names)
    if sel.kind in ("type", "scoped", "first", "last") and sel.pattern in plan.QUANTISABLE:
        return plan.QUANTISABLE[sel.pattern]
    return None


def module_type_of(sel: plan.Selector | None) -> str | None:
    """The module type every module `sel` picks has, when the selector says (`linear`, `first(conv2d)`)."""
    if sel is not None and sel.kind in ("type", "scoped", "first", "last"):
        return sel.pattern
    return None


#: The channel axis of each quantisable type's input, as the module sees it (batch first): a Linear's
#: features are the last axis ([B, ..., F]), a Conv's channels the second ([B, C, ...]).
INPUT_CHANNEL_AXIS = {"linear": -1, "conv1d": 1, "conv2d": 1}


def concrete_dims(written: dict[str, Any], tensor: str, sel: plan.Selector | None) -> dict[str, Any] | None:
    """`written` statistic options with `dims = per_channel | per_tensor` made concrete for `tensor` of the
    modules `sel` picks: `per_tensor` → `all`; `per_channel` → keep only the channel axis (`channel:0`, the
    output channel, for a weight or bias of any type; the type's input channel axis for `data_in`).
    `None` when the channel axis of an input cannot be known (a selector without a type)."""
    dims = written.get("dims")
    if dims == "per_tensor":
        return {**written, "dims": "all"}
    if dims != "per_channel":
        return written
    if tensor in ("weight", "bias"):
        return {**written, "dims": "channel:0"}
    op = module_type_of(sel)
    if op not in INPUT_CHANNEL_AXIS or not tensor.startswith("data_in"):
        return None
    return {**written, "dims": f"channel:{INPUT_CHANNEL_AXIS[op]}"}


# --- tensors -----------------------------------------------------------------------------------------------


def canonical_tensor(word: str) -> str | None:
    """`data_in` → `data_in_0`, `data_out` → `data_out_0`, `weight`, `bias`, `data_in_N` → itself; `None`
    for a word that names no tensor."""
    if word in plan.TENSOR_ALIASES:
        return plan.TENSOR_ALIASES[word]
    if _NUMBERED.fullmatch(word):
        return word
    return None


def tensor_allowed(canonical: str, known: tuple[str, ...] | None) -> bool:
    """Whether modules with language tensors `known` (see `type_tensors`) have `canonical`.

    Every module has an output (`data_out_0`); the quantisable types take one input (`data_in_0`).
    """
    if known is None:
        return True
    return canonical == "data_out_0" or canonical in {plan.TENSOR_ALIASES[t] for t in known}


# --- literals ----------------------------------------------------------------------------------------------


def literal(expr: ast.Expr) -> Any:
    """The value of a literal: a number (a leading minus folded in), a string, `true`/`false`, `None` for
    `na`; `NOT_LITERAL` for anything else (expressions, statistics, other names, lists)."""
    if isinstance(expr, ast.Number):
        return expr.value
    if isinstance(expr, ast.Neg) and isinstance(expr.operand, (ast.Number, ast.Neg)):
        inner = literal(expr.operand)
        return -inner if isinstance(inner, (int, float)) and not isinstance(inner, bool) else NOT_LITERAL
    if isinstance(expr, ast.String):
        return expr.value
    if isinstance(expr, ast.Name) and expr.name in VALUE_NAMES:
        return VALUE_NAMES[expr.name]
    return NOT_LITERAL


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- statistics --------------------------------------------------------------------------------------------


def option_value(name: str, expr: ast.Expr) -> Any:
    """The plan value of a statistic option that `check.py` accepted: `dims` → "all" / "none" / tuple of
    ints, `abs` → bool, the statistic's own options → float."""
    if name == "dims":
        if isinstance(expr, ast.Name):
            return expr.name  # all, none, or a granularity word (`concrete_dims` makes it concrete)
        assert isinstance(expr, ast.List)
        return tuple(literal(i) for i in expr.items)
    if name == "abs":
        return literal(expr)
    return float(literal(expr))


def written_options(options: Iterable[ast.Option]) -> dict[str, Any]:
    """{option: plan value} for options `check.py` accepted."""
    return {o.name.name: option_value(o.name.name, o.value) for o in options}


def spec_of(stat: str, written: dict[str, Any]) -> plan.StatSpec:
    """The complete `StatSpec` of `stat` with `written` options over the defaults (dims=all, abs=false,
    the statistic's own defaults)."""
    kind = plan.STATISTICS[stat]
    own = kind.option_defaults()
    own.update({k: v for k, v in written.items() if k in own})
    return plan.StatSpec(
        name=stat,
        dims=written.get("dims", plan.COMMON_STAT_OPTIONS["dims"]),
        abs=written.get("abs", plan.COMMON_STAT_OPTIONS["abs"]),
        options=tuple(own.items()),
    )


def agrees(spec: plan.StatSpec, written: dict[str, Any]) -> bool:
    """Whether `spec` has every option value `written` in a statistic reference."""
    for name, value in written.items():
        if name == "dims":
            if spec.dims != value:
                return False
        elif name == "abs":
            if spec.abs != value:
                return False
        elif spec.option(name) != float(value):
            return False
    return True


#: {(canonical tensor, statistic): [(selector, spec)] that `profile` statements collect, in program order}
Profiled = dict[tuple[str, str], list[tuple[plan.Selector, plan.StatSpec]]]


def covers(point_selector: plan.Selector, sel: plan.Selector) -> bool:
    """Whether what is collected for `point_selector` is collected for every module `sel` can pick:
    the same selector (exclusions only narrow it), `default` for `default` and the (quantisable) types in
    any form, or a type for that type's scoped, first and last forms."""
    if sel.exclude:
        sel = plan.Selector(sel.kind, sel.pattern, sel.scope)
    if point_selector == sel:
        return True
    if point_selector.kind == "default":
        return sel.kind in ("default", "type", "scoped", "first", "last")
    return point_selector.kind == "type" and sel.kind in ("scoped", "first", "last") and (
        sel.pattern == point_selector.pattern)


def candidates(
    profiled: Profiled, sel: plan.Selector | None, tensor: str, stat: str, written: dict[str, Any]
) -> list[plan.StatSpec]:
    """The distinct profiled specs a reference `stat(tensor).stat(written).field` in a binding for `sel`
    may mean: those collected for the binding's own selector when there are any, else those collected
    anywhere in the program."""
    entries = [(s, spec) for s, spec in profiled.get((tensor, stat), []) if agrees(spec, written)]
    near = [spec for s, spec in entries if sel is not None and covers(s, sel)]
    found = near or [spec for _s, spec in entries]
    return list(dict.fromkeys(found))


def resolve(
    profiled: Profiled, sel: plan.Selector, tensor: str, stat: str, written: dict[str, Any]
) -> plan.StatSpec:
    """The one spec a reference means: the single candidate (see `candidates`), or, when nothing fits,
    the statistic with its defaults under the written options. (Several candidates is `check.py`'s
    error.)"""
    found = candidates(profiled, sel, tensor, stat, written)
    return found[0] if len(found) == 1 else spec_of(stat, written)
