"""Statistics to quantiser parameters: evaluate the plan's bindings for every quantisable module.

In: a `Plan`, a `StatsTable` (calibrated, or read from a MASE statistics file) and optionally the model's
modules as `(path, type)` pairs. Out: a `MappingResult` holding, per module, every parameter its op has
(`resolve.applicable_params`: `name` and `<tensor>_<suffix>`) with its value, and for each parameter some
rule sets, the winning binding and the ones it overrode (`resolve.resolve_bindings` states the precedence).

Values: `None` for `na` or a parameter no rule sets; `str` for `name`; `int` for widths; `bool` for
`scaling_factor`; `float` for the numeric parameters, or nested lists of floats when a statistic is
per-channel / element-wise. Arithmetic is numpy float64 with numpy broadcasting: `+ - * /` and unary minus
work element-wise, `abs(x)` element-wise, `min(a, b, ...)` / `max(a, b, ...)` element-wise across their
arguments, and `min(x)` / `max(x)` with one argument reduce a vector to its smallest / largest element.

Errors (all `UserError`, each naming the rule's `file:line:col`): a selector that matches no module of the
model (with "did you mean" over module paths, node names and types), a name/glob rule for a tensor none of
its modules has, a statistic the table lacks for the node, division by zero, a NaN/Inf result, a negative
threshold or scale, a value of the wrong type, per-channel shapes that do not broadcast. Every value is
checked here, once; `combinations.py` checks each tensor's values together before configs are built (a width
its quantiser lacks, a ternary tensor with no threshold source, ...), and the quantisers trust what they
receive. (`ternqc map` writes MASE's TOML from the values alone.)

`render_explain(result)` prints, per node, each set parameter, its value, the rule that set it (`file:line`)
and the rules it overrode. This module imports numpy, not torch.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np
from attrs import field, frozen

from ternqc.plan import (
    COMPARISON_OPS,
    PARAM_SUFFIXES,
    QUANTISABLE,
    QUANTISERS,
    Binding,
    BinOp,
    Call,
    Cond,
    Const,
    Expr,
    Plan,
    Selector,
    StatRef,
    Unary,
    Var,
    all_params,
    expr_stat_refs,
    split_param,
)
from ternqc.render import format_value
from ternqc.runtime.calibrate.table import ModuleStats, StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.resolve import (
    Module,
    ResolvedParam,
    applicable_params,
    inapplicable_bindings,
    resolve_bindings,
    selector_matches,
    unmatched_selectors,
)

#: Parameters whose value must not be negative (the quantiser's Δ and α).
NON_NEGATIVE_SUFFIXES = ("threshold", "scale")


@frozen
class MappedModule:
    """The parameters of one quantisable module: `params[param]` for every parameter of its op, and
    `explain[param]` (winner and overridden rules) for those some rule sets."""

    path: str
    node: str
    op: str
    params: dict[str, Any]
    explain: dict[str, ResolvedParam]


@frozen
class MappingResult:
    """Every quantisable module's parameters, by module path in model order.

    `defaults` holds what rules with the `default` selector set to constants (MASE's
    `[passes.quantize.default.config]`); a default that reads statistics has no single value and is `None`.
    `sources` are the plan's rules files, the root first (`Plan.sources`, for the explain header).
    """

    modules: dict[str, MappedModule]
    defaults: dict[str, Any] = field(factory=dict)
    sources: tuple[str, ...] = field(default=(), converter=tuple)

    def by_node(self) -> dict[str, MappedModule]:
        """The same modules keyed by MASE/FX node name."""
        return {m.node: m for m in self.modules.values()}

    def configs(self) -> dict[str, dict[str, Any]]:
        """`{module path: {param: value}}`: what conversion needs."""
        return {path: dict(m.params) for path, m in self.modules.items()}


# ---------------------------------------------------------------------------------------------------------
# Mapping
# ---------------------------------------------------------------------------------------------------------


def map_params(
    plan: Plan,
    table: StatsTable,
    *,
    modules: Sequence[Module] | None = None,
    by_node_name: bool = False,
    stats_source: str = "the collected statistics",
    absent_tensors: Collection[tuple[str, str]] = (),
) -> MappingResult:
    """Evaluate the plan's bindings for every quantisable module.

    Args:
        plan: the compiled rules.
        table: statistics by module path (`ModuleStats.lookup` finds a `StatRef`'s statistic).
        modules: `(path, type)` of every module of the model; default: the table's modules and ops.
        by_node_name: compare name/glob selectors in MASE node form (for a table read from a MASE file).
        stats_source: how messages call the statistics (e.g. "the statistics file stats.toml").
        absent_tensors: `(path, tensor)` pairs a module's type has but the module lacks, such as the `bias` of
            a `Linear(..., bias=False)`: their parameters stay unset (the tensor has nothing to quantise).

    Returns:
        A `MappingResult` with one `MappedModule` per quantisable module.

    Raises:
        UserError: an unmatched selector, a statistic missing from the table, or a bad value (see the
        module docstring); the message names the node, the parameter and the location of the rule that set
        it. (Whether a tensor's values make a config together is `combinations.py`'s check.)
    """
    mods: list[Module] = list(modules) if modules is not None else [(p, ms.op) for p, ms in table.items()]
    bindings = list(plan.bindings)
    _check_params(bindings)
    _check_selectors(bindings, mods, by_node_name=by_node_name)
    resolved = resolve_bindings(bindings, mods, by_node_name=by_node_name)
    ops = dict(mods)
    out: dict[str, MappedModule] = {}
    for path, winners in resolved.items():
        op = ops[path]
        stats = table.get(path)
        node = stats.node if stats is not None else path.replace(".", "_")
        params: dict[str, Any] = {}
        for param in applicable_params(op):
            rp = winners.get(param)
            tensor = (split_param(param) or ("",))[0]
            if rp is None or (path, tensor) in absent_tensors:
                params[param] = None
                winners.pop(param, None)
                continue
            ctx = _Context(node, op, param, rp.binding, stats, stats_source, table=table, modules=mods,
                           by_node_name=by_node_name)
            params[param] = ctx.finish(ctx.evaluate(rp.binding.value))
        out[path] = MappedModule(path=path, node=node, op=op, params=params, explain=dict(winners))
    return MappingResult(modules=out, defaults=_default_values(bindings, stats_source), sources=plan.sources)


def _check_params(bindings: Iterable[Binding]) -> None:
    known = set(all_params())
    for b in bindings:
        if b.param not in known:
            close = difflib.get_close_matches(b.param, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"rule at {b.origin}: unknown parameter {b.param!r}{hint}"
            raise UserError(msg)


def _check_selectors(bindings: Sequence[Binding], modules: Sequence[Module], *, by_node_name: bool) -> None:
    # A rule for a quantisable type the model lacks (a recipe's `conv2d` rules on an MLP) is not a mistake:
    # recipes are written for many models. Names, globs and `default` that match nothing are.
    modules = list(modules)
    problems = [_unmatched_message(b.selector, b, modules, by_node_name) for b in
                unmatched_selectors(bindings, modules, by_node_name=by_node_name)
                if not (b.selector.kind == "type" and b.selector.pattern in QUANTISABLE)]
    for b, hits in inapplicable_bindings(bindings, modules, by_node_name=by_node_name):
        tensor = split_param(b.param)[0]  # type: ignore[index]
        which = ", ".join(f"{p} ({op})" for p, op in hits[:5]) + (" ..." if len(hits) > 5 else "")
        problems.append(
            f"rule at {b.origin}: selector {b.selector} sets {b.param}, but none of the modules it matches "
            f"has a {tensor} tensor: {which}"
        )
    if problems:
        more = f"\n... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UserError("\n".join(problems[:5]) + more)


def _unmatched_message(selector: Selector, b: Binding, modules: Sequence[Module], by_node_name: bool) -> str:
    head = f"rule at {b.origin}: selector {selector} matched no module of the model"
    quantisable = [(p, op) for p, op in modules if op in QUANTISABLE]
    if selector.exclude:
        base = Selector(selector.kind, selector.pattern, selector.scope)
        if any(selector_matches(base, p, op, by_node_name=by_node_name, modules=modules) for p, op in quantisable):
            return f"{head}: every module {base} matches is excluded by except"
    if selector.kind in ("scoped", "first", "last"):
        if selector.pattern not in {op for _, op in modules}:
            selector = Selector("type", selector.pattern)  # the type is missing: say so as for a type
        else:
            of_type = [p for p, op in modules if op == selector.pattern]
            close = difflib.get_close_matches(selector.scope, of_type, n=1, cutoff=0.5)
            hint = f"; did you mean {_or(close)}?" if close else ""
            sample = ", ".join(json.dumps(p) for p in of_type[:6]) + (", ..." if len(of_type) > 6 else "")
            return f"{head}{hint} (the {selector.pattern} modules are {sample})"
    if selector.kind == "default":
        types = sorted({op for _, op in modules})
        return f"{head}: no module can be quantised (quantisable types: {', '.join(QUANTISABLE)}; " \
               f"the model has: {', '.join(types) or 'nothing'})"
    if selector.kind == "type":
        present = sorted({op for _, op in modules})
        close = difflib.get_close_matches(selector.pattern, present, n=1)
        if selector.pattern in present:  # a type the model has, but not a quantisable one
            return f"{head} that can be quantised: {selector.pattern} is not a quantisable type " \
                   f"(quantisable: {', '.join(QUANTISABLE)})"
        if close:
            return f"{head}; did you mean {_or(close)}?"
        qtypes = sorted({op for _, op in quantisable})
        return f"{head}; its quantisable types are {', '.join(qtypes) or 'none'}"
    # name or glob
    others = [(p, op) for p, op in modules if op not in QUANTISABLE
              and selector_matches(selector, p, op, by_node_name=by_node_name, modules=modules)]
    if others:
        which = ", ".join(f"{p} ({op})" for p, op in others[:5])
        return f"{head} that can be quantised: it matches only {which}; quantisable types are " \
               f"{', '.join(QUANTISABLE)}"
    names: list[str] = []
    for p, _ in quantisable:
        names.append(p)
        node = p.replace(".", "_")
        if node != p:
            names.append(node)
    close = difflib.get_close_matches(selector.pattern, names, n=1, cutoff=0.5)
    if close:
        return f"{head}; did you mean {_or(close)}?"
    sample = ", ".join(json.dumps(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
    return f"{head}; its quantisable modules are {sample or 'none'}"


def _or(names: Sequence[str]) -> str:
    quoted = [json.dumps(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _default_values(bindings: Sequence[Binding], stats_source: str) -> dict[str, Any]:
    """What `default` rules set to constant values, per parameter (later statements win)."""
    winners: dict[str, Binding] = {}
    for b in sorted((b for b in bindings if b.selector.kind == "default"), key=lambda b: b.order):
        winners[b.param] = b
    out: dict[str, Any] = {p: None for p in all_params()}
    for param, b in winners.items():
        if expr_stat_refs(b.value):
            continue  # per module; no single default value
        ctx = _Context("default", "default", param, b, None, stats_source)
        out[param] = ctx.finish(ctx.evaluate(b.value))
    return out


# ---------------------------------------------------------------------------------------------------------
# Evaluation of one binding for one module
# ---------------------------------------------------------------------------------------------------------


class _Context:
    """Evaluates one binding's expression for one node and checks the result against the parameter.

    `table` and `modules` (the model's `(path, type)` in order) serve references to another module's
    statistic (`stat("seq_blocks.1".data_out)...`); `variables` are the names an assertion reads.
    """

    def __init__(self, node: str, op: str, param: str, binding: Binding, stats: ModuleStats | None,
                 stats_source: str, *, table: StatsTable | None = None, modules: Sequence[Module] = (),
                 by_node_name: bool = False, variables: dict[str, Any] | None = None) -> None:
        self.node, self.op, self.param, self.binding = node, op, param, binding
        self.stats, self.stats_source = stats, stats_source
        self.table, self.modules, self.by_node_name = table, list(modules), by_node_name
        self.variables = variables

    def fail(self, problem: str) -> UserError:
        where = f"node {self.node} ({self.op})" if self.op != "default" else "the default selector"
        return UserError(f"{self.param} of {where}, set by the rule at {self.binding.origin}: {problem}")

    # --- evaluation -------------------------------------------------------------------------------------

    def evaluate(self, e: Expr) -> Any:
        if isinstance(e, Const):
            return e.value
        if isinstance(e, StatRef):
            return self._stat(e)
        if isinstance(e, Var):
            if self.variables is None or e.name not in self.variables:
                raise self.fail(f"{e.name!r} has no value here")
            return self.variables[e.name]
        if isinstance(e, Unary):
            if e.op == "not":
                return np.logical_not(self._bool(self.evaluate(e.operand), "not"))
            return -self._number(self.evaluate(e.operand), "-")
        if isinstance(e, BinOp):
            return self._binop(e)
        if isinstance(e, Cond):
            return self._cond(e)
        if isinstance(e, Call):
            return self._call(e)
        raise self.fail(f"not an expression: {e!r}")

    def _bool(self, v: Any, where: str) -> np.ndarray:
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, np.ndarray) and v.dtype == np.bool_):
            return np.asarray(v)
        shown = format_value(v if not isinstance(v, np.ndarray) else _plain(v))
        raise self.fail(f"{shown} is not true or false ({where})")

    def _cond(self, e: Cond) -> Any:
        test = self._bool(self.evaluate(e.test), "if")
        if test.ndim == 0:
            return self.evaluate(e.then) if bool(test) else self.evaluate(e.orelse)
        then, orelse = self.evaluate(e.then), self.evaluate(e.orelse)
        if any(v is None or isinstance(v, (bool, str)) for v in (then, orelse)):
            raise self.fail("the condition of if is per-channel, so both branches must be numbers; "
                            "use min(...) or max(...) to make it one value")
        return self._broadcast(lambda a, b: np.where(test, a, b), np.asarray(then, dtype=np.float64),
                               np.asarray(orelse, dtype=np.float64), "if")

    def _stat(self, ref: StatRef) -> np.ndarray:
        what = f"statistic {ref.stat.key()}.{ref.field} of {ref.tensor}"
        stats = self.stats
        if ref.module is not None:
            stats = self._other_module(ref)
            what += f" of {stats.path if stats is not None else ref.module}"
        result = stats.lookup(ref.tensor, ref.stat) if stats is not None else None
        if result is None:
            held = self._held() if ref.module is None else "it was never collected"
            raise self.fail(f"it reads the {what}, but there is no such statistic for this node in "
                            f"{self.stats_source} ({held})")
        if ref.field not in result:
            raise self.fail(f"it reads the {what}, but that result in {self.stats_source} has only the "
                            f"fields {', '.join(sorted(result)) or 'none'}")
        value = result[ref.field]
        try:
            arr = np.asarray(value, dtype=np.float64)
            ok = not _has_non_numbers(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise self.fail(f"the {what} in {self.stats_source} is not a number or an array of numbers "
                            f"(arrays must be rectangular): {format_value(value)}")
        if arr.size == 0:
            raise self.fail(f"the {what} in {self.stats_source} is an empty array")
        return arr

    def _other_module(self, ref: StatRef) -> ModuleStats | None:
        """The statistics of the one module `ref.module` picks."""
        assert ref.module is not None
        hits = [p for p, op in self.modules
                if selector_matches(ref.module, p, op, by_node_name=self.by_node_name, modules=self.modules)]
        if len(hits) != 1:
            which = "no module" if not hits else f"{len(hits)} modules ({', '.join(hits[:4])})"
            raise self.fail(f"stat({ref.module}.…) must name one module, but it matches {which}")
        return (self.table or {}).get(hits[0])

    def _held(self) -> str:
        if self.stats is None:
            return "it has no statistics at all"
        held = [f"{k.key() if hasattr(k, 'key') else k} of {t}" for t, res in self.stats.values.items()
                for k in res]
        return "it holds " + ", ".join(held) if held else "it has no statistics at all"

    def _number(self, v: Any, where: str) -> np.ndarray:
        if v is None:
            raise self.fail(f"na (unset) cannot be used in arithmetic ({where})")
        if isinstance(v, (bool, str)):
            raise self.fail(f"{json.dumps(v)} is not a number and cannot be used in arithmetic ({where})")
        return np.asarray(v, dtype=np.float64)

    def _binop(self, e: BinOp) -> np.ndarray:
        if e.op in ("and", "or"):
            left = self._bool(self.evaluate(e.left), e.op)
            right = self._bool(self.evaluate(e.right), e.op)
            return self._broadcast(np.logical_and if e.op == "and" else np.logical_or, left, right, e.op)
        left_value, right_value = self.evaluate(e.left), self.evaluate(e.right)
        if e.op in ("==", "!=") and (isinstance(left_value, str) or isinstance(right_value, str)):
            return np.asarray((left_value == right_value) == (e.op == "=="))
        left = self._number(left_value, e.op)
        right = self._number(right_value, e.op)
        if e.op == "/" and np.any(right == 0):
            raise self.fail("division by zero")
        fn = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "**": np.power,
              "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
              "!=": np.not_equal}[e.op]
        result = self._broadcast(fn, left, right, e.op)
        if e.op == "**" and not np.all(np.isfinite(result)):
            raise self.fail(f"** has no finite value here ({format_value(_plain(left))} ** {format_value(_plain(right))})")
        return result if e.op not in COMPARISON_OPS else np.asarray(result, dtype=np.bool_)

    def _broadcast(self, fn: Any, left: np.ndarray, right: np.ndarray, where: str) -> np.ndarray:
        try:
            with np.errstate(all="ignore"):  # NaN/Inf are caught on the result, with a clear message
                return fn(left, right)
        except ValueError as exc:
            raise self.fail(f"per-channel shapes {left.shape} and {right.shape} do not broadcast "
                            f"({where})") from exc

    def _call(self, e: Call) -> np.ndarray:
        args = [self._number(self.evaluate(a), f"{e.fn}()") for a in e.args]
        if not args:
            raise self.fail(f"{e.fn}() needs an argument")
        if e.fn in ("abs", "sqrt", "log2"):
            if len(args) != 1:
                raise self.fail(f"{e.fn}() takes one argument, got {len(args)}")
            x = args[0]
            if e.fn == "sqrt" and np.any(x < 0):
                raise self.fail(f"sqrt() of a negative number: {format_value(_plain(x))}")
            if e.fn == "log2" and np.any(x <= 0):
                raise self.fail(f"log2() of a number that is not positive: {format_value(_plain(x))}")
            return {"abs": np.abs, "sqrt": np.sqrt, "log2": np.log2}[e.fn](x)
        if e.fn == "clamp":
            if len(args) != 3:
                raise self.fail(f"clamp() takes three arguments (x, lo, hi), got {len(args)}")
            x, lo, hi = args
            if np.any(lo > hi):
                raise self.fail(f"clamp() with lo > hi: {format_value(_plain(lo))} > {format_value(_plain(hi))}")
            low = self._broadcast(np.maximum, x, lo, "clamp()")
            return self._broadcast(np.minimum, low, hi, "clamp()")
        if len(args) == 1:
            if args[0].size == 0:
                raise self.fail(f"{e.fn}() of an empty statistic")
            return np.asarray(np.min(args[0]) if e.fn == "min" else np.max(args[0]))
        fn = np.minimum if e.fn == "min" else np.maximum
        return functools.reduce(lambda a, b: self._broadcast(fn, a, b, f"{e.fn}()"), args)

    # --- the parameter's type ---------------------------------------------------------------------------

    def finish(self, v: Any) -> Any:
        """`v` as the parameter's value type, or a `UserError` saying why it cannot be."""
        if v is None:
            return None
        split = split_param(self.param)
        kind = "quantiser" if split is None else PARAM_SUFFIXES[split[1]]
        if kind == "quantiser":  # `name` or `<tensor>_quantiser`
            if not isinstance(v, str) or v not in QUANTISERS:
                raise self.fail(f"the quantiser must be one of {', '.join(map(json.dumps, QUANTISERS))}, "
                                f"got {format_value(v)}")
            return v
        if kind == "bool":
            if isinstance(v, np.ndarray) and v.dtype == np.bool_ and v.ndim == 0:
                v = bool(v)
            if not isinstance(v, (bool, np.bool_)):
                raise self.fail(f"expected true or false, got {format_value(v)}")
            return bool(v)
        if isinstance(v, (bool, str, np.bool_)):
            raise self.fail(f"expected {'a whole number' if kind == 'int' else 'a number'}, got {format_value(v)}")
        arr = np.asarray(v, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise self.fail(f"the value is not finite: {format_value(_plain(arr))}")
        if kind == "int":
            if arr.ndim != 0 or not float(arr).is_integer():
                raise self.fail(f"expected a whole number, got {format_value(_plain(arr))}")
            n = int(arr)
            low = 0 if split[1] == "frac_width" else 1  # type: ignore[index]
            if n < low:
                raise self.fail(f"must be at least {low}, got {n}")
            return n
        suffix = split[1]  # type: ignore[index]
        if suffix in NON_NEGATIVE_SUFFIXES and np.any(arr < 0):
            raise self.fail(f"a {suffix} must not be negative, got {format_value(_plain(arr))}")
        return _plain(arr)


def _has_non_numbers(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_has_non_numbers(v) for v in value)
    return isinstance(value, (bool, str)) or value is None


def _plain(arr: np.ndarray) -> float | list:
    """A python float for a scalar, nested lists of python floats otherwise."""
    return float(arr) if arr.ndim == 0 else arr.tolist()


__all__ = ["MappedModule", "MappingResult", "map_params", "NON_NEGATIVE_SUFFIXES"]
