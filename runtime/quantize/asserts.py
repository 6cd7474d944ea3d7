"""Assertions: the plan's `assert SELECTOR: test` and `assert model: test`, checked after mapping and
conversion.

In: the plan, the mapping (resolved parameters), the converted model's configs, the report (measured zero
fractions, accuracies) and the statistics table. Out: a list of `Failure`s (empty when every assertion holds).

An `assert SELECTOR:` is evaluated once per module the selector picks, reading the module's resolved
parameters (`weight_width`), its statistics (`stat(weight).abs_mean.abs_mean`) and what conversion measured:
`<tensor>_delta`, `<tensor>_alpha`, `<tensor>_zero_fraction`. A per-channel value holds only when every
element does. A module whose tensor is left in float has no Δ, α or zero fraction: an assertion reading one
is not checked there. `assert model:` reads `float_accuracy` and `quantised_accuracy`. Expressions are
evaluated by `mapping`'s evaluator, so they mean exactly what they mean in rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from attrs import frozen
from torch import nn

from ternqc.plan import (
    QUANTISABLE,
    Assert,
    Binding,
    BinOp,
    Call,
    Cond,
    Expr,
    Plan,
    Selector,
    StatRef,
    Unary,
    Var,
)
from ternqc.render import format_value
from ternqc.runtime.calibrate.table import StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.mapping import MappingResult, _Context, _plain
from ternqc.runtime.quantize.modules import is_converted, resolved_quant
from ternqc.runtime.quantize.resolve import Module, selector_matches


@frozen
class Failure:
    """One assertion that does not hold: on `module` (`None` for `assert model`), with the values it read."""

    origin: str
    selector: str
    module: str | None
    values: tuple[tuple[str, Any], ...]  # (name or statistic, its value: a float or nested lists)
    message: str

    def render(self) -> str:
        where = self.module if self.module is not None else "the model"
        read = ", ".join(f"{k} = {format_value(v)}" for k, v in self.values)
        text = f"assertion at {self.origin} ({self.selector}) fails on {where}"
        if read:
            text += f": {read}"
        return text + (f": {self.message}" if self.message else "")

    def to_dict(self) -> dict[str, Any]:
        return {"assert": self.origin, "selector": self.selector, "module": self.module,
                "values": dict(self.values), "message": self.message}


def _leaves(e: Expr) -> list[Expr]:
    """The names and statistics `e` reads, in reading order, each once."""
    if isinstance(e, (Var, StatRef)):
        return [e]
    if isinstance(e, Unary):
        return _leaves(e.operand)
    if isinstance(e, BinOp):
        out = _leaves(e.left)
        return out + [x for x in _leaves(e.right) if x not in out]
    if isinstance(e, Cond):
        out: list[Expr] = []
        for part in (e.test, e.then, e.orelse):
            out += [x for x in _leaves(part) if x not in out]
        return out
    if isinstance(e, Call):
        out = []
        for a in e.args:
            out += [x for x in _leaves(a) if x not in out]
        return out
    return []


def _leaf_text(e: Expr) -> str:
    if isinstance(e, Var):
        return e.name
    assert isinstance(e, StatRef)
    where = e.tensor if e.module is None else f"{e.module}.{e.tensor}"
    return f"stat({where}).{e.stat.name}.{e.field}"


def measured(
    mapping: MappingResult, configs: dict[str, Any], report: dict[str, Any], path: str
) -> dict[str, Any]:
    """What an assertion on module `path` may read: its parameters and, per quantised tensor, Δ, α and the
    zero fraction (`None` for a tensor left in float)."""
    m = mapping.modules[path]
    values: dict[str, Any] = dict(m.params)
    entries = report.get("nodes", {}).get(m.node, {}).get("tensors", {})
    for tensor in QUANTISABLE.get(m.op, ()):
        entry = entries.get(tensor, {})  # none for a module left in float as a whole
        quantised = entry.get("quantized")
        config = configs.get(path)
        tq = config.tensor(tensor) if config is not None and quantised else None
        values[f"{tensor}_delta"] = None if tq is None else _array(tq.delta)
        values[f"{tensor}_alpha"] = None if tq is None or not tq.scaling else _array(tq.alpha)
        values[f"{tensor}_zero_fraction"] = entry.get("zero_fraction") if quantised else None
    return values


def _json_value(v: Any) -> Any:
    """A value an assertion read, as report.json holds it: a string or bool as it is, numbers as floats or
    nested lists of floats."""
    if v is None or isinstance(v, (str, bool, np.bool_)):
        return v if not isinstance(v, np.bool_) else bool(v)
    return _plain(np.asarray(v, dtype=np.float64))


def _array(v: Any) -> Any:
    if v is None or isinstance(v, dict):  # a report summary of a vector: not comparable element-wise
        return None
    return np.asarray(v, dtype=np.float64)


def applied_configs(model: nn.Module, configs: dict[str, Any]) -> dict[str, Any]:
    """Each module's config as the converted module applies it (Δ and every α filled in)."""
    found = dict(model.named_modules())
    return {p: resolved_quant(found[p]) if p in found and is_converted(found[p]) else c
            for p, c in configs.items()}


def check_asserts(
    plan: Plan,
    mapping: MappingResult,
    configs: dict[str, Any],
    report: dict[str, Any],
    table: StatsTable,
    modules: Sequence[Module],
    *,
    stats_source: str = "the collected statistics",
) -> list[Failure]:
    """Evaluate every assertion of `plan`; the failures, in plan order then module order.

    Raises:
        UserError: an assertion cannot be evaluated (e.g. it reads a statistic that is not there).
    """
    failures: list[Failure] = []
    modules = list(modules)
    for a in plan.asserts:
        if a.selector is None:
            variables = {"float_accuracy": report.get("float_accuracy"),
                         "quantised_accuracy": report.get("ternary_accuracy")}
            failure = _check_one(a, "model", "model", None, variables, None, table, modules, stats_source)
            if failure is not None:
                failures.append(failure)
            continue
        hits = [p for p in mapping.modules
                if selector_matches(a.selector, p, mapping.modules[p].op, modules=modules)]
        if not hits and a.selector.kind == "type" and a.selector.pattern in QUANTISABLE:
            continue  # a recipe's assertion about a type this model lacks (conv2d on an MLP)
        if not hits:
            failures.append(Failure(str(a.origin), str(a.selector), None, (),
                                    "the selector matches no quantisable module of the model"))
            continue
        for path in hits:
            m = mapping.modules[path]
            variables = measured(mapping, configs, report, path)
            stats = table.get(path)
            failure = _check_one(a, m.node, m.op, path, variables, stats, table, modules, stats_source)
            if failure is not None:
                failures.append(failure)
    return failures


def _check_one(a: Assert, node: str, op: str, path: str | None, variables: dict[str, Any], stats: Any,
               table: StatsTable, modules: list[Module], stats_source: str) -> Failure | None:
    binding = Binding(a.selector or _MODEL, "assert", a.test, a.origin, 0)
    ctx = _Context(node, op if path is not None else "default", "assert", binding, stats, stats_source,
                   table=table, modules=modules, variables=variables)
    leaves = _leaves(a.test)
    if any(isinstance(x, Var) and variables.get(x.name, 0) is None for x in leaves):
        return None  # reads a measured value of a tensor left in float (or a parameter no rule sets)
    try:
        result = ctx.evaluate(a.test)
    except UserError as exc:
        msg = f"assertion at {a.origin} on {path or 'the model'}: {str(exc).split(': ', 1)[-1]}"
        raise UserError(msg) from exc
    if bool(np.all(np.asarray(result))):
        return None
    read = tuple((_leaf_text(x), _json_value(ctx.evaluate(x))) for x in leaves)
    return Failure(str(a.origin), str(a.selector) if a.selector else "model", path, read, a.message)


#: The selector an `assert model:` is reported under (it selects no module).
_MODEL = Selector("default")


def annotate_report(
    report: dict[str, Any], plan: Plan, failures: list[Failure], left_in_float: dict[str, str],
    mapping: MappingResult,
) -> None:
    """Add to report.json: the constants the plan was compiled with, the assertion failures, and the
    modules left in float because the model does not call them."""
    report["constants"] = {c.name: {"value": c.value, "how": c.how, "origin": str(c.origin)}
                           for c in plan.constants}
    report["assertions"] = {"checked": len(plan.asserts), "failures": [f.to_dict() for f in failures]}
    nodes = report.setdefault("nodes", {})
    for path, why in left_in_float.items():
        m = mapping.modules.get(path)
        node = m.node if m is not None else path.replace(".", "_")
        op = m.op if m is not None else "linear"
        tensors = {t: {"quantized": False} for t in QUANTISABLE.get(op, ())}
        nodes[node] = {"path": path, "op": op, "tensors": tensors, "left_in_float": why}
    report["left_in_float"] = dict(left_in_float)
