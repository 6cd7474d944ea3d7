"""Lower: a checked `ast.Program` → a `ternqc.plan.Plan`.

Runs only on programs `check.py` found no error in; it reports nothing. What it adds on its own:

- every statistic reference becomes a full `StatSpec`: the one collected statistic it fits, or the
  statistic with its defaults under the options written in the reference;
- a referenced statistic not collected for the binding's selector is added to the collection plan
  (`ProfilePoint(..., reason="referenced")`), so the plan collects exactly what is profiled or read;
- `data_in_scaling_factor = true` needs the activation scale α = mean |x| over |x| > Δ, so the selector gets
  `threshold_abs_mean` on `data_in_0` (`reason="derived"`), which the runtime gathers once Δ is mapped.

- a block with a union gets one binding per selector item, each with the block's `except` selectors as its
  exclusions; `per_channel` / `per_tensor` become concrete dims for each rule's tensor and type;
- assertions become `plan.Assert`s (the names they read `plan.Var`s), and the root file's constants (after
  `--set`) `plan.Constant`s; statistics assertions read are collected like those rules read, and a reference
  to another module's statistic is collected on that module.

Binding order is the statement's index in the program (an included file's statements first).
"""

from __future__ import annotations

from typing import Any

import attrs

from ternqc import plan
from ternqc.compiler import ast
from ternqc.compiler.vocab import (
    Profiled,
    canonical_tensor,
    concrete_dims,
    covers,
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
    asserts: list[plan.Assert] = []
    for order, stmt in enumerate(program.statements):
        if isinstance(stmt, ast.Calibrate):
            calibration.update({e.key.name: literal(e.value) for e in stmt.entries})
        elif isinstance(stmt, ast.Profile):
            points += _profile_points(stmt)
        elif isinstance(stmt, ast.Block):
            excludes = tuple(selector_of(x) for x in stmt.excludes)
            for written in stmt.selectors:
                sel = attrs.evolve(selector_of(written), exclude=excludes)
                for e in stmt.entries:
                    bindings.append(_binding(sel, e.key, e.value, e.span, order, profiled))
        elif isinstance(stmt, ast.Binding):
            bindings.append(_binding(selector_of(stmt.selector), stmt.key, stmt.value, stmt.span, order, profiled))
        elif isinstance(stmt, ast.Assert):
            asserts.append(_assert(stmt, profiled))
    points += _referenced(points, bindings, asserts)
    points += _derived(bindings)
    return plan.Plan(
        sources=tuple(path for path, _text in program.sources),
        calibration=plan.Calibration(**calibration),
        profile=points,
        bindings=bindings,
        asserts=asserts,
        constants=[plan.Constant(c.name, c.value, c.how, c.span.origin()) for c in program.lets],
    )


def _assert(stmt: ast.Assert, profiled: Profiled) -> plan.Assert:
    sel = selector_of(stmt.selector) if stmt.selector is not None else None
    message = stmt.message.value if stmt.message is not None else ""
    return plan.Assert(sel, _expr(stmt.test, sel, None, profiled), message, stmt.span.origin())


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
    points = []
    for t in stmt.targets:
        sel = selector_of(t.selector)
        tensor = canonical_tensor(t.tensor.name)
        assert tensor is not None
        specs = []
        for c in stmt.stats:
            written = concrete_dims(written_options(c.options), tensor, sel)
            assert written is not None  # check.py reported granularity words without a channel axis
            specs.append(spec_of(c.name.name, written))
        points.append(plan.ProfilePoint(selector=sel, tensor=tensor, stats=tuple(specs), origin=t.span.origin()))
    return points


def _binding(
    sel: plan.Selector, key: ast.Ident, value: ast.Expr, span: ast.Span, order: int, profiled: Profiled
) -> plan.Binding:
    split = plan.split_param(key.name)
    tensor = plan.TENSOR_ALIASES[split[0]] if split is not None else None
    return plan.Binding(
        selector=sel,
        param=key.name,
        value=_expr(value, sel, tensor, profiled),
        origin=span.origin(),
        order=order,
    )


def _expr(e: ast.Expr, sel: plan.Selector | None, tensor: str | None, profiled: Profiled) -> plan.Expr:
    """The plan expression of a checked value in a binding (or assertion) for `sel`; `tensor` is the
    parameter's (for `stat.X.Y`)."""
    if isinstance(e, ast.Name) and e.name not in ("true", "false", "na"):
        return plan.Var(e.name)  # a name an assertion reads
    if isinstance(e, (ast.Number, ast.String, ast.Name)):
        return plan.Const(literal(e))  # names left after checking: true, false, na
    if isinstance(e, ast.Not):
        return plan.Unary("not", _expr(e.operand, sel, tensor, profiled))
    if isinstance(e, ast.Cond):
        parts = (_expr(x, sel, tensor, profiled) for x in (e.test, e.then, e.orelse))
        return plan.Cond(*parts)
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
    module = selector_of(e.module) if e.module is not None else None
    where = module if module is not None else sel
    written = concrete_dims(written_options(e.options or ()), ref_tensor, where)
    assert written is not None and where is not None
    spec = resolve(profiled, where, ref_tensor, e.stat.name, written)
    return plan.StatRef(tensor=ref_tensor, stat=spec, field=e.field.name, module=module)


class _Coverage:
    """What the profile points collect, indexed so that each question costs a lookup and a few `covers` calls
    (a program with 10,000 rules would otherwise cost 10,000 x 10,000 comparisons). The answers are
    `vocab.covers`' own: a point covers a selector only when it equals it (exclusions aside) or is a `default`
    or type point, so those are the only candidates asked."""

    def __init__(self, points: list[plan.ProfilePoint]) -> None:
        self.exact: set[tuple[plan.Selector, str, plan.StatSpec]] = set()
        self.broad: dict[tuple[str, plan.StatSpec], list[plan.Selector]] = {}
        for p in points:
            self.add(p)

    def add(self, p: plan.ProfilePoint) -> None:
        for spec in p.stats:
            self.exact.add((p.selector, p.tensor, spec))
            if p.selector.kind in ("default", "type"):
                self.broad.setdefault((p.tensor, spec), []).append(p.selector)

    def covers(self, sel: plan.Selector, tensor: str, spec: plan.StatSpec) -> bool:
        """Whether some point collects `spec` on `tensor` for every module `sel` can pick."""
        base = plan.Selector(sel.kind, sel.pattern, sel.scope) if sel.exclude else sel  # as `covers` compares
        if (base, tensor, spec) in self.exact:
            return True
        return any(covers(q, sel) for q in self.broad.get((tensor, spec), ()))


def _referenced(
    points: list[plan.ProfilePoint], bindings: list[plan.Binding], asserts: list[plan.Assert]
) -> list[plan.ProfilePoint]:
    """Points for statistics that bindings and assertions read but nothing collects for their selector (or
    for the other module a reference names: `stat("seq_blocks.1".data_out)...`)."""
    added: list[plan.ProfilePoint] = []
    coverage = _Coverage(points)
    readers = [(b.selector, b.value, b.origin) for b in bindings]
    readers += [(a.selector, a.test, a.origin) for a in asserts]
    for selector, value, origin in readers:
        for ref in plan.expr_stat_refs(value):
            where = ref.module if ref.module is not None else selector
            assert where is not None  # `assert model:` reads statistics of named modules only
            if coverage.covers(where, ref.tensor, ref.stat):
                continue
            point = plan.ProfilePoint(where, ref.tensor, (ref.stat,), origin, reason="referenced")
            added.append(point)
            coverage.add(point)
    return added


def _derived(bindings: list[plan.Binding]) -> list[plan.ProfilePoint]:
    """`threshold_abs_mean` on `data_in_0` for every selector that sets `data_in_scaling_factor = true`."""
    added: dict[plan.Selector, plan.ProfilePoint] = {}
    for b in bindings:
        # true, or a condition that may be true for some module
        sets_true = not isinstance(b.value, plan.Const) or b.value.value is True
        if b.param == "data_in_scaling_factor" and sets_true and b.selector not in added:
            added[b.selector] = plan.ProfilePoint(
                b.selector, "data_in_0", (ACTIVATION_SCALE_STAT,), b.origin, reason="derived"
            )
    return list(added.values())

