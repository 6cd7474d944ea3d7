"""Everything ternqc shows a person as text: the compile summary (`summarize`), the per-layer table of
`apply`, `--explain`, values, statistics and expressions as the rules language writes them.

In: plain data (plans, report dicts, `MappingResult`s, values). Out: strings. Nothing here computes a result.
`ternqc compile` imports this module without a model, so it imports neither numpy nor torch at module level
(`format_value` imports numpy when called; a numpy value means numpy is loaded already).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ternqc import plan
from ternqc.plan import Binding


def _has_non_numbers(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_non_numbers(v) for v in value)
    return isinstance(value, (bool, str)) or value is None


def format_value(v: Any, limit: int = 6) -> str:
    """A value as the rules language would write it, long vectors abbreviated."""
    import numpy as np

    if v is None:
        return "na"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, list):
        try:
            flat = np.asarray(v, dtype=np.float64).ravel().tolist() if not _has_non_numbers(v) else None
        except ValueError:  # a ragged array: shown as written
            flat = None
        if flat is not None and len(flat) > limit:
            head = ", ".join(format_value(x) for x in flat[:3])
            return f"[{head}, ...] ({len(flat)} values, min {format_value(min(flat))}, max {format_value(max(flat))})"
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"[{value['values']}] ~{value['mean']:.4g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_layer_table(report: dict[str, Any]) -> str:
    """One line per quantised tensor: node, op, tensor, Δ, α and the fraction of zeros."""
    rows = [("node", "op", "tensor", "delta", "alpha", "zeros")]
    for node, entry in report["nodes"].items():
        for tensor, t in entry["tensors"].items():
            if not t.get("quantized"):
                why = " (not called as a module)" if entry.get("left_in_float") else ""
                why = " (not applied)" if t.get("not_applied") else why
                rows.append((node, entry["op"], tensor, "float" + why, "", ""))
                continue
            zeros = t.get("zero_fraction")
            alpha = t.get("alpha") if t.get("scaling") else "off"
            rows.append(
                (node, entry["op"], tensor, _fmt(t["delta"]), _fmt(alpha), "-" if zeros is None else f"{zeros:.1%}")
            )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for node, entry in report["nodes"].items():
        if entry.get("calls_per_forward", 1) > 1:
            lines.append(f"note: {node} is called {entry['calls_per_forward']} times per forward; its statistics "
                         "count every call")
        for tensor, t in entry["tensors"].items():
            if t.get("not_applied"):
                lines.append(f"not applied: {node} {tensor}: {t['not_applied']}")
    return "\n".join(lines)


def format_metrics(report: dict[str, Any]) -> str:
    """`validation accuracy: float 0.9922  ternary 0.9727` (or the task's metrics), from a report."""
    floats, ternary = report.get("float_metrics"), report.get("ternary_metrics")
    if floats is None or ternary is None:
        if report.get("float_accuracy") is None:
            return "not evaluated (no evaluation data)"
        floats = {"accuracy": report["float_accuracy"]}
        ternary = {"accuracy": report["ternary_accuracy"]}
    parts = [f"validation {name.replace('_', ' ')}: float {floats[name]:.4f}  ternary {ternary[name]:.4f}"
             for name in floats]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Explain
# ---------------------------------------------------------------------------------------------------------


def _where(b: Binding) -> str:
    return f"{b.origin.file}:{b.origin.line}"


def render_explain(result: Any) -> str:
    """Per node, every parameter some rule sets: its value, the winning rule (`file:line`) and the rules it
    overrode (`overrides a.tq:12, b.tq:3`, best first). Parameters no rule sets are left out.

    Returns:
        The text, ending with a newline.
    """
    rules = ", ".join(result.sources)
    lines = [f"# parameters and the rules that set them{f' (rules: {rules})' if rules else ''}"]
    from ternqc.runtime.quantize.resolve import applicable_params

    for m in result.modules.values():
        lines.append(f"{m.node} ({m.op})" if m.node == m.path else f"{m.node} ({m.op}, module {m.path})")
        if not m.explain:
            lines.append("  (no rule sets any parameter)")
            continue
        rows = []
        for param in applicable_params(m.op):
            rp = m.explain.get(param)
            if rp is None:
                continue
            value = format_value(m.params[param])
            rule = f"{_where(rp.binding)} ({rp.binding.selector})"
            over = f"  overrides {', '.join(_where(b) for b in rp.overridden)}" if rp.overridden else ""
            rows.append((param, value, rule, over))
        wp = max(len(r[0]) for r in rows)
        wv = max(len(r[1]) for r in rows)
        for param, value, rule, over in rows:
            lines.append(f"  {param:<{wp}} = {value:<{wv}}  {rule}{over}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Plans: statistics, expressions and the compile summary
# ---------------------------------------------------------------------------------------------------------


def number_text(v: float | int) -> str:
    """`2` for integral values, else Python's shortest repr (`0.975`)."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else repr(float(v))


def spec_text(spec: plan.StatSpec) -> str:
    """A short form for messages and summaries: options that differ from the defaults, and the
    statistic's own options always, e.g. `range_quantile(quantile=0.5)`, `range_min_max(abs=true)`."""
    parts = []
    if spec.dims != plan.COMMON_STAT_OPTIONS["dims"]:
        dims = spec.dims if isinstance(spec.dims, str) else f"[{', '.join(map(str, spec.dims))}]"
        if plan.channel_axis(spec.dims) is not None:
            dims = "per_channel"  # the plan's `channel:N`, N the channel axis of this rule's tensor and type
        parts.append(f"dims={dims}")
    if spec.abs != plan.COMMON_STAT_OPTIONS["abs"]:
        parts.append("abs=true")
    parts += [f"{k}={number_text(v)}" for k, v in spec.options]
    return spec.name + (f"({', '.join(parts)})" if parts else "")


def tensor_word(canonical: str) -> str:
    """How a canonical tensor name reads in a message: `data_in_0` → `data_in`."""
    for word, canon in plan.TENSOR_ALIASES.items():
        if canon == canonical:
            return word
    return canonical


_PRECEDENCE = {
    "or": 1, "and": 2, "<": 4, "<=": 4, ">": 4, ">=": 4, "==": 4, "!=": 4, "+": 5, "-": 5, "*": 6, "/": 6, "**": 8,
}
_NOT, _NEG, _COND = 3, 7, 0


def expr_text(e: plan.Expr, parent: int = 0) -> str:
    """A plan expression in the language's notation, e.g. `0.7 * stat(weight).abs_mean.abs_mean`."""
    if isinstance(e, plan.Const):
        v = e.value
        if v is None:
            return "na"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return number_text(v) if isinstance(v, float) else str(v)
    if isinstance(e, plan.StatRef):
        where = tensor_word(e.tensor) if e.module is None else f"{e.module}.{tensor_word(e.tensor)}"
        return f"stat({where}).{spec_text(e.stat)}.{e.field}"
    if isinstance(e, plan.Var):
        return e.name
    if isinstance(e, plan.Unary):
        rank = _NEG if e.op == "neg" else _NOT
        text = ("-" if e.op == "neg" else "not ") + expr_text(e.operand, rank)
        return f"({text})" if rank < parent else text
    if isinstance(e, plan.Call):
        return f"{e.fn}({', '.join(expr_text(a) for a in e.args)})"
    if isinstance(e, plan.Cond):
        text = f"if {expr_text(e.test)} then {expr_text(e.then)} else {expr_text(e.orelse)}"
        return f"({text})" if parent > _COND else text
    assert isinstance(e, plan.BinOp), e
    rank = _PRECEDENCE[e.op]
    if e.op == "**":  # right-associative, and the left operand is an atom
        text = f"{expr_text(e.left, rank + 1)} ** {expr_text(e.right, _NEG)}"
    elif e.op in plan.COMPARISON_OPS:  # comparisons do not chain
        text = f"{expr_text(e.left, rank + 1)} {e.op} {expr_text(e.right, rank + 1)}"
    else:  # left-associative: the right operand needs parentheses at equal rank
        text = f"{expr_text(e.left, rank)} {e.op} {expr_text(e.right, rank + 1)}"
    return f"({text})" if rank < parent else text


def _point_where(sel: plan.Selector, tensor: str) -> str:
    return f"{sel}.{tensor_word(tensor)}"


def summarize(p: plan.Plan) -> str:
    """The summary `ternqc compile` prints for plan `p`."""
    included = f" (with {', '.join(p.sources[1:])})" if len(p.sources) > 1 else ""
    lines = [f"compiled {p.sources[0] if p.sources else 'a plan without sources'}{included}"]
    c = p.calibration
    lines.append(
        f"calibrate: {c.samples} samples (rounded up to whole batches of {c.batch_size}) "
        f"from split {json.dumps(c.split)}"
    )

    lines.append("profile (statistics collected per module):")
    profiled = [q for q in p.profile if q.reason == "profiled"]
    width = max([len(_point_where(q.selector, q.tensor)) for q in p.profile] or [0])
    if not profiled:
        lines.append("  (nothing)")
    for q in profiled:
        lines.append(f"  {_point_where(q.selector, q.tensor):<{width}}  {', '.join(map(spec_text, q.stats))}")

    added = [q for q in p.profile if q.reason != "profiled"]
    if added:
        lines.append("added by the compiler:")
    by_origin: dict[plan.Origin, plan.Binding] = {}
    for b in p.bindings:
        by_origin.setdefault(b.origin, b)
    by_place = {(b.origin, b.selector): b for b in reversed(p.bindings)}  # a union: one binding per selector
    for q in added:
        stats = ", ".join(map(spec_text, q.stats))
        lines.append(f"  {_point_where(q.selector, q.tensor):<{width}}  {stats}")
        b = by_place.get((q.origin, q.selector)) or by_origin.get(q.origin)
        asserted = any(a.origin == q.origin for a in p.asserts)
        rule = f"{b.selector}.{b.param}" if b is not None else "the assertion" if asserted else "a rule"
        if q.reason == "referenced":
            lines.append(f"    why: {rule} at {q.origin} reads it; no profile statement collects it there")
        else:
            lines.append(f"    why: {rule} = true at {q.origin} scales activations by the mean |x|")
            lines.append("         over |x| > threshold, gathered in a second calibration pass")

    lines.append("parameters (name, first/last > glob, regex > scoped type > type > default; "
                 "the later rule wins at equal rank):")
    # One pass, grouped by selector (in order of first appearance), then by parameter: linear in the bindings.
    chains: dict[plan.Selector, dict[str, list[plan.Binding]]] = {}
    for b in p.bindings:
        chains.setdefault(b.selector, {}).setdefault(b.param, []).append(b)
    first = {sel: i for i, sel in enumerate(chains)}
    selectors = sorted(chains, key=lambda s: (s.specificity, first[s]))
    if not selectors:
        lines.append("  (none)")
    for sel in selectors:
        lines.append(f"  {sel}")
        params = chains[sel]
        pw = max(len(param) for param in params)
        for param, chain in params.items():
            text = f"    {param:<{pw}} = {expr_text(chain[-1].value)}"
            if len(chain) > 1:
                text += f"   (overrides {', '.join(str(b.origin) for b in chain[:-1])})"
            lines.append(text)
    lines += _constants_and_asserts(p)
    return "\n".join(lines)


def _constants_and_asserts(p: plan.Plan) -> list[str]:
    lines = []
    if p.constants:
        lines.append("constants:")
        lines += [f"  {c.name} = {expr_text(plan.Const(c.value))}" + ("   (--set)" if c.how == "set" else "")
                  for c in p.constants]
    if p.asserts:
        lines.append("assertions (checked after conversion):")
        for a in p.asserts:
            msg = f", {json.dumps(a.message)}" if a.message else ""
            lines.append(f"  assert {a.selector or 'model'}: {expr_text(a.test)}{msg}   ({a.origin})")
    return lines

