"""A plan as a short, readable summary: what is collected where, which parameters each selector binds,
and which statistics the compiler added and why. `ternqc compile` prints it.
"""

from __future__ import annotations

import json

from ternqc import plan
from ternqc.compiler.vocab import number_text, spec_text, tensor_word

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


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
        return f"stat({tensor_word(e.tensor)}).{spec_text(e.stat)}.{e.field}"
    if isinstance(e, plan.Unary):
        return "-" + expr_text(e.operand, 3)
    if isinstance(e, plan.Call):
        return f"{e.fn}({', '.join(expr_text(a) for a in e.args)})"
    assert isinstance(e, plan.BinOp), e
    rank = _PRECEDENCE[e.op]
    # left-associative: the right operand needs parentheses at equal rank
    text = f"{expr_text(e.left, rank)} {e.op} {expr_text(e.right, rank + 1)}"
    return f"({text})" if rank < parent else text


def _where(sel: plan.Selector, tensor: str) -> str:
    return f"{sel}.{tensor_word(tensor)}"


def summarize(p: plan.Plan) -> str:
    """The summary `ternqc compile` prints for plan `p`."""
    included = f" (with {', '.join(p.sources[1:])})" if len(p.sources) > 1 else ""
    lines = [f"compiled {p.sources[0]}{included}"]
    c = p.calibration
    lines.append(
        f"calibrate: {c.samples} samples (rounded up to whole batches of {c.batch_size}) "
        f"from split {json.dumps(c.split)}"
    )

    lines.append("profile (statistics collected per module):")
    profiled = [q for q in p.profile if q.reason == "profiled"]
    width = max([len(_where(q.selector, q.tensor)) for q in p.profile] or [0])
    if not profiled:
        lines.append("  (nothing)")
    for q in profiled:
        lines.append(f"  {_where(q.selector, q.tensor):<{width}}  {', '.join(map(spec_text, q.stats))}")

    added = [q for q in p.profile if q.reason != "profiled"]
    if added:
        lines.append("added by the compiler:")
    by_origin = {}
    for b in p.bindings:
        by_origin.setdefault(b.origin, b)
    for q in added:
        stats = ", ".join(map(spec_text, q.stats))
        lines.append(f"  {_where(q.selector, q.tensor):<{width}}  {stats}")
        b = by_origin.get(q.origin)
        rule = f"{b.selector}.{b.param}" if b is not None else "a rule"
        if q.reason == "referenced":
            lines.append(f"    why: {rule} at {q.origin} reads it; no profile statement collects it there")
        else:
            lines.append(f"    why: {rule} = true at {q.origin} scales activations by the mean |x|")
            lines.append("         over |x| > threshold, gathered in a second calibration pass")

    lines.append("parameters (name > glob > type > default; the later rule wins at equal rank):")
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
    return "\n".join(lines)
