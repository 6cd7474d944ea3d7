"""`ternqc compile RULES --model SPEC [--ckpt C] [--explain]`: the rules checked against a model, before any
calibration.

In: a plan and a model spec (built, its checkpoint loaded; no data is read). Out: `RulesReport`: a compact
table of what each selector hits, errors for selectors that hit nothing (with "did you mean" over the model's
module names and types), warnings for rules that never take effect (shadowed by a later rule of equal rank on
modules they name more narrowly, or beaten everywhere), for modules the model never calls (left in float,
`uncalled.py`), and with `explain` the rule that sets each parameter of each module.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from torch import nn

from ternqc.plan import QUANTISABLE, Binding, Const, Plan, Selector, expr_stat_refs, split_param
from ternqc.runtime.calibrate.points import module_type
from ternqc.runtime.io.checkpoints import load_checkpoint_
from ternqc.runtime.models.builtin import build_model
from ternqc.runtime.quantize import uncalled
from ternqc.runtime.quantize.mapping import _unmatched_message
from ternqc.runtime.quantize.resolve import Module, inapplicable_bindings, resolve_bindings, selector_matches

#: How many module names the table shows per selector.
SHOWN = 4


@frozen
class RulesReport:
    text: str
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def model_modules(model: nn.Module) -> list[Module]:
    """Every `(path, type)` of `model` in `named_modules()` order, the root left out."""
    return [(path, module_type(m)) for path, m in model.named_modules() if path]


def check_against_model(plan: Plan, spec: str, *, ckpt: str | None = None, explain: bool = False) -> RulesReport:
    """Build the model of `spec` (and load `ckpt`) and check `plan` against it (`check_plan`)."""
    model = build_model(spec)
    if ckpt:
        load_checkpoint_(model, ckpt)
    return check_plan(plan, model_modules(model), uncalled.functional_only(model), explain=explain, model=spec)


def _hits(selector: Selector, modules: list[Module], quantisable_only: bool) -> list[str]:
    return [p for p, t in modules if (t in QUANTISABLE or not quantisable_only)
            and selector_matches(selector, p, t, modules=modules)]


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown + (f", … (+{len(paths) - SHOWN})" if len(paths) > SHOWN else "")


def check_plan(
    plan: Plan, modules: list[Module], functional: dict[str, str], *, explain: bool = False, model: str = "the model"
) -> RulesReport:
    """The report for `plan` on a model with `modules` (`(path, type)` in order) of which `functional` are
    used without being called (`uncalled.functional_only`)."""
    errors: list[str] = []
    warnings: list[str] = []
    rows: list[tuple[str, str, str]] = []
    users: list[tuple[Selector, Any, str]] = [(b.selector, b.origin, "rule") for b in plan.bindings]
    users += [(p.selector, p.origin, "profile") for p in plan.profile if p.reason == "profiled"]
    users += [(a.selector, a.origin, "assert") for a in plan.asserts if a.selector is not None]
    groups: dict[tuple[Selector, bool], list[tuple[Any, str]]] = {}
    for selector, origin, what in users:
        places = groups.setdefault((selector, what == "profile"), [])
        if (origin, what) not in places:
            places.append((origin, what))
    present_types = {t for _, t in modules}
    for (selector, profile_only), places in groups.items():
        hits = _hits(selector, modules, quantisable_only=not profile_only)
        origin, what = places[0]
        where = f"{origin}" + (f" (+{len(places) - 1})" if len(places) > 1 else "")
        label = f"{selector}" + (" (profile)" if profile_only else "")
        rows.append((label, where, f"{len(hits)}: {_names(hits)}" if hits else "0"))
        if hits:
            for path in hits:
                if path in functional and any(w == "rule" for _, w in places):
                    warnings.append(f"{path} is selected by {selector} at {origin}, but {functional[path]}")
            continue
        if selector.kind == "type" and selector.pattern in QUANTISABLE and selector.pattern not in present_types:
            continue  # a recipe's rules for a type this model lacks (conv2d on an MLP) are not a mistake
        fake = Binding(selector, "name", _NA, origin, 0)
        errors.append(_unmatched_message(selector, fake, modules, False).replace("rule at", f"{what} at", 1))
    for b, hits in inapplicable_bindings(plan.bindings, modules):
        tensor = (split_param(b.param) or ("",))[0]
        which = ", ".join(f"{p} ({op})" for p, op in hits[:SHOWN])
        errors.append(f"rule at {b.origin}: {b.selector} sets {b.param}, but none of the modules it matches has "
                      f"a {tensor} tensor: {which}")
    errors += _other_module_refs(plan, modules)
    warnings += _shadowed(plan, modules)
    lines = [f"selectors on {model} ({len(modules)} modules, "
             f"{sum(t in QUANTISABLE for _, t in modules)} quantisable):"]
    widths = [max([len(r[i]) for r in rows] or [0]) for i in range(2)]
    lines += [f"  {s:<{widths[0]}}  {o:<{widths[1]}}  {h}" for s, o, h in rows] or ["  (no selectors)"]
    for path, why in functional.items():
        if any(path in _hits(b.selector, modules, True) for b in plan.bindings):
            lines.append(f"  input left in float: {path} ({why})")
    if explain:
        lines.append("")
        lines.append(_explain(plan, modules))
    unique_warnings = tuple(dict.fromkeys(warnings))
    return RulesReport("\n".join(lines), tuple(errors), unique_warnings)


_NA = Const(None)


def _other_module_refs(plan: Plan, modules: list[Module]) -> list[str]:
    """`stat("x".data_out)...` must name exactly one module of the model."""
    out = []
    readers = [(b.origin, b.value) for b in plan.bindings] + [(a.origin, a.test) for a in plan.asserts]
    seen = set()
    for origin, value in readers:
        for ref in expr_stat_refs(value):
            if ref.module is None or (origin, ref.module) in seen:
                continue
            seen.add((origin, ref.module))
            hits = _hits(ref.module, modules, quantisable_only=False)
            if len(hits) != 1:
                which = "no module" if not hits else f"{len(hits)} modules ({_names(hits)})"
                out.append(f"rule at {origin}: stat({ref.module}.…) must name one module, but it matches {which}")
    return out


def _shadowed(plan: Plan, modules: list[Module]) -> list[str]:
    """Rules that lose, on every module they match, to another rule: one of equal rank written later that
    matches more modules (the later, broader rule overrides the narrower one), or never win anywhere."""
    resolved = resolve_bindings(plan.bindings, modules)
    won: set[int] = set()
    beaten_by: dict[int, list[Binding]] = {}
    index = {id(b): i for i, b in enumerate(plan.bindings)}
    for params in resolved.values():
        for rp in params.values():
            won.add(index[id(rp.binding)])
            for loser in rp.overridden:
                beaten_by.setdefault(index[id(loser)], []).append(rp.binding)
    out = []
    hits_of: dict[Selector, set[str]] = {}

    def hits(sel: Selector) -> set[str]:
        if sel not in hits_of:
            hits_of[sel] = set(_hits(sel, modules, True))
        return hits_of[sel]

    for i, b in enumerate(plan.bindings):
        if i in won or i not in beaten_by:
            continue
        winner = beaten_by[i][0]
        if winner.selector == b.selector:
            continue  # the same selector set again: an include's rule overridden on purpose (or the compiler warned)
        if winner.selector.specificity == b.selector.specificity and hits(b.selector) < hits(winner.selector):
            out.append(f"{b.selector}.{b.param} at {b.origin} never takes effect: the later {winner.selector}."
                       f"{b.param} at {winner.origin} has the same rank and overrides it on every module it "
                       f"matches, though it names them less exactly")
        else:
            out.append(f"{b.selector}.{b.param} at {b.origin} never takes effect on this model: "
                       f"{winner.selector}.{b.param} at {winner.origin} wins on every module it matches")
    return out


def _explain(plan: Plan, modules: list[Module]) -> str:
    lines = ["# the rule that sets each parameter (later rules win at equal rank)"]
    for path, params in resolve_bindings(plan.bindings, modules).items():
        op = dict(modules)[path]
        lines.append(f"{path} ({op})")
        if not params:
            lines.append("  (no rule sets any parameter)")
        rows = []
        for param, rp in params.items():
            value = rp.binding.value
            shown = json.dumps(value.value) if isinstance(value, Const) else "(expression)"
            over = f"  overrides {', '.join(str(b.origin) for b in rp.overridden)}" if rp.overridden else ""
            rows.append((param, shown, f"{rp.binding.origin} ({rp.binding.selector}){over}"))
        wp = max([len(r[0]) for r in rows] or [0])
        wv = max([len(r[1]) for r in rows] or [0])
        lines += [f"  {p:<{wp}} = {v:<{wv}}  {w}" for p, v, w in rows]
    return "\n".join(lines)
