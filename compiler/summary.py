"""A plan as a short, readable summary: what is collected where, which parameters each selector binds,
and which statistics the compiler added and why. `ternqc compile` prints it.
"""

from __future__ import annotations

import json

from ternqc import plan
from ternqc.compiler.vocab import number_text, spec_text, tensor_word

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


def _where(sel: plan.Selector, tensor: str) -> str:
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
    width = max([len(_where(q.selector, q.tensor)) for q in p.profile] or [0])
    if not profiled:
        lines.append("  (nothing)")
    for q in profiled:
        lines.append(f"  {_where(q.selector, q.tensor):<{width}}  {', '.join(map(spec_text, q.stats))}")

    added = [q for q in p.profile if q.reason != "profiled"]
    if added:
        lines.append("added by the compiler:")
    by_origin: dict[plan.Origin, plan.Binding] = {}
    for b in p.bindings:
        by_origin.setdefault(b.origin, b)
    by_place = {(b.origin, b.selector): b for b in reversed(p.bindings)}  # a union: one binding per selector
    for q in added:
        stats = ", ".join(map(spec_text, q.stats))
        lines.append(f"  {_where(q.selector, q.tensor):<{width}}  {stats}")
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

