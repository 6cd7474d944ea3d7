"""Everything ternqc shows a person as text: the per-layer table of `apply`, `--explain`, values as the rules
language writes them.

In: plain data (report dicts, `MappingResult`s, values). Out: strings. Nothing here computes a result.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from ternqc.plan import Binding


def _has_non_numbers(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_non_numbers(v) for v in value)
    return isinstance(value, (bool, str)) or value is None


def format_value(v: Any, limit: int = 6) -> str:
    """A value as the rules language would write it, long vectors abbreviated."""
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
