"""Lower: a checked `ast.Program` → a `ternqc.plan.Plan`.

Runs only on programs `check.py` found no error in; it reports nothing. What it adds on its own:

- every statistic reference becomes a full `StatSpec`: the one collected statistic it fits, or the
  statistic with its defaults under the options written in the reference;
- a referenced statistic not collected for the binding's selector is added to the collection plan
  (`ProfilePoint(..., reason="referenced")`), so the plan collects exactly what is profiled or read;
- `data_in_scaling_factor = true` needs the activation scale α = mean |x| over |x| > Δ, so the selector gets
  `threshold_abs_mean` on `data_in_0` (`reason="derived"`), which the runtime gathers in a second pass.

Binding order is the statement's index in the program (an included file's statements first).
"""

from __future__ import annotations

from typing import Any

from ternqc import plan
from ternqc.compiler import ast
from ternqc.compiler.vocab import (
    Profiled,
    canonical_tensor,
    literal,
    resolve,
    selector_of,
    spec_of,
    written_options,
)

#: The statistic the compiler adds for `data_in_scaling_factor = true` (see `plan.DERIVED_STATISTICS`).
ACTIVATION_SCALE_STAT = plan.StatSpec("threshold_abs_mean")


def lower(program: ast.Program) -> plan.Plan:
    """Build the plan of a program without errors.

    Args:
        program: a program `check.py` accepted.

    Returns:
        The `Plan`: sources root first, calibration, profile points (profiled, then referenced, then
        derived), bindings in program order.
    """
    profiled = _profiled(program.statements)
    calibration: dict[str, Any] = {}
    points = []
    bindings: list[plan.Binding] = []
    for order, stmt in enumerate(program.statements):
        if isinstance(stmt, ast.Calibrate):
            calibration.update({e.key.name: literal(e.value) for e in stmt.entries})
        elif isinstance(stmt, ast.Profile):
            points += _profile_points(stmt)
        elif isinstance(stmt, ast.Block):
            for e in stmt.entries:
                bindings.append(_binding(stmt.selector, e.key, e.value, e.span, order, profiled))
        elif isinstance(stmt, ast.Binding):
            bindings.append(_binding(stmt.selector, stmt.key, stmt.value, stmt.span, order, profiled))
    points += _referenced(points, bindings)
    points += _derived(bindings)
    return plan.Plan(
        sources=tuple(path for path, _text in program.sources),
        calibration=plan.Calibration(**calibration),
        profile=points,
        bindings=bindings,
    )


def _profiled(statements: tuple[ast.Statement, ...]) -> Profiled:
    """{(tensor, statistic): the distinct specs `profile` statements collect}, as `check.py` computes it."""
    found: Profiled = {}
    for stmt in statements:
        if isinstance(stmt, ast.Profile):
            for point in _profile_points(stmt):
                for spec in point.stats:
                    known = found.setdefault((point.tensor, spec.name), [])
                    if (point.selector, spec) not in known:
                        known.append((point.selector, spec))
    return found


def _profile_points(stmt: ast.Profile) -> list[plan.ProfilePoint]:
    specs = tuple(spec_of(c.name.name, written_options(c.options)) for c in stmt.stats)
    return [
        plan.ProfilePoint(
            selector=selector_of(t.selector),
            tensor=canonical_tensor(t.tensor.name),
            stats=specs,
            origin=t.span.origin(),
        )
        for t in stmt.targets
    ]


def _binding(
    selector: ast.Selector, key: ast.Ident, value: ast.Expr, span: ast.Span, order: int, profiled: Profiled
) -> plan.Binding:
    split = plan.split_param(key.name)
    tensor = plan.TENSOR_ALIASES[split[0]] if split is not None else None
    sel = selector_of(selector)
    return plan.Binding(
        selector=sel,
        param=key.name,
        value=_expr(value, sel, tensor, profiled),
        origin=span.origin(),
        order=order,
    )


def _expr(e: ast.Expr, sel: plan.Selector, tensor: str | None, profiled: Profiled) -> plan.Expr:
    """The plan expression of a checked value in a binding for `sel`; `tensor` is the parameter's (for
    `stat.X.Y`)."""
    if isinstance(e, (ast.Number, ast.String, ast.Name)):
        return plan.Const(literal(e))  # names left after checking: true, false, na
    if isinstance(e, ast.Neg):
        inner = _expr(e.operand, sel, tensor, profiled)
        if isinstance(inner, plan.Const):
            return plan.Const(-inner.value)  # a negative literal: `-0.0097`
        return plan.Unary("neg", inner)
    if isinstance(e, ast.BinOp):
        return plan.BinOp(e.op, _expr(e.left, sel, tensor, profiled), _expr(e.right, sel, tensor, profiled))
    if isinstance(e, ast.Call):
        return plan.Call(e.fn.name, tuple(_expr(a, sel, tensor, profiled) for a in e.args))
    assert isinstance(e, ast.StatRef), e
    ref_tensor = canonical_tensor(e.tensor.name) if e.tensor is not None else tensor
    assert ref_tensor is not None
    written = written_options(e.options or ())
    spec = resolve(profiled, sel, ref_tensor, e.stat.name, written)
    return plan.StatRef(tensor=ref_tensor, stat=spec, field=e.field.name)


class _Coverage:
    """What the profile points collect, indexed so that each question is one lookup (a program with 10,000
    rules would otherwise cost 10,000 × 10,000 comparisons). Same answers as `vocab.covers`: a point covers a
    binding's selector when it is the same selector, or `default` for a `default` or type selector."""

    def __init__(self, points: list[plan.ProfilePoint]) -> None:
        self.exact: set[tuple[plan.Selector, str, plan.StatSpec]] = set()
        self.by_default: set[tuple[str, plan.StatSpec]] = set()
        for p in points:
            self.add(p)

    def add(self, p: plan.ProfilePoint) -> None:
        for spec in p.stats:
            self.exact.add((p.selector, p.tensor, spec))
            if p.selector.kind == "default":
                self.by_default.add((p.tensor, spec))

    def covers(self, sel: plan.Selector, tensor: str, spec: plan.StatSpec) -> bool:
        """Whether some point collects `spec` on `tensor` for every module `sel` can pick."""
        if (sel, tensor, spec) in self.exact:
            return True
        return sel.kind in ("default", "type") and (tensor, spec) in self.by_default


def _referenced(points: list[plan.ProfilePoint], bindings: list[plan.Binding]) -> list[plan.ProfilePoint]:
    """Points for statistics that bindings read but nothing collects for their selector."""
    added: list[plan.ProfilePoint] = []
    coverage = _Coverage(points)
    for b in bindings:
        for ref in plan.expr_stat_refs(b.value):
            if coverage.covers(b.selector, ref.tensor, ref.stat):
                continue
            point = plan.ProfilePoint(b.selector, ref.tensor, (ref.stat,), b.origin, reason="referenced")
            added.append(point)
            coverage.add(point)
    return added


def _derived(bindings: list[plan.Binding]) -> list[plan.ProfilePoint]:
    """`threshold_abs_mean` on `data_in_0` for every selector that sets `data_in_scaling_factor = true`."""
    added: dict[plan.Selector, plan.ProfilePoint] = {}
    for b in bindings:
        sets_true = isinstance(b.value, plan.Const) and b.value.value is True
        if b.param == "data_in_scaling_factor" and sets_true and b.selector not in added:
            added[b.selector] = plan.ProfilePoint(
                b.selector, "data_in_0", (ACTIVATION_SCALE_STAT,), b.origin, reason="derived"
            )
    return list(added.values())

