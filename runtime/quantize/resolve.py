"""Rule precedence: which binding sets each parameter of each module (a pure function, no tensors).

In: the plan's bindings and the model's modules as `(path, type)` pairs, in `named_modules()` order (type =
the type name the runtime gives a module, or MASE's `mase_op`; `first(linear)` / `last(linear)` need the
order). Out: per quantisable module and per parameter, the winning binding and
the bindings it overrode.

Precedence, per module and per parameter, among the bindings whose selector matches the module:
  1. the highest selector specificity wins (`plan.SELECTOR_RANKS`): exact name, `first(T)`, `last(T)` (4) >
     glob, regex (3) > scoped type `T in "glob"` (2) > type (1) > default (0);
  2. at equal specificity the binding with the larger `order` wins, i.e. the later statement (an included
     file's statements come before those of the file that includes it, so the includer wins ties).
The overridden bindings are listed best first, by the same order.

Only quantisable modules (`plan.QUANTISABLE`) get parameters, and only the parameters their op has
(`applicable_params`: `name` plus `<tensor>_<suffix>` for the op's tensors; a `relu` has no `weight_max`).
Name and glob selectors may also hit other modules (a `Sequential`, a placeholder node); those hits are
ignored. `unmatched_selectors` reports the selectors that hit no quantisable module at all, and
`inapplicable_bindings` the name/glob bindings whose modules all lack the parameter's tensor.

`by_node_name=True` compares name and glob patterns in MASE/FX node form (dots become underscores on both
sides): statistics read from a MASE file know modules only by node name (`seq_blocks_1`), and a rule
written with a path (`"seq_blocks.1"`) must still find them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from attrs import frozen

from ternqc.plan import PARAM_SUFFIXES, QUANTISABLE, Binding, Selector, split_param

Module = tuple[str, str]  # (module path, lower-case type)


@frozen
class ResolvedParam:
    """The winning `binding` of one parameter of one module, and the matching bindings it beat, best first."""

    binding: Binding
    overridden: tuple[Binding, ...] = ()


def applicable_params(op: str) -> tuple[str, ...]:
    """The parameters a module of quantisable type `op` has: `name` and `<t>_<suffix>` for its tensors.

    Returns an empty tuple for a type that cannot be quantised.
    """
    if op not in QUANTISABLE:
        return ()
    return ("name",) + tuple(f"{t}_{s}" for t in QUANTISABLE[op] for s in PARAM_SUFFIXES)


def to_node_form(selector: Selector) -> Selector:
    """`selector` with a name/glob/regex pattern or a scope in MASE/FX node form (`seq_blocks.1` ->
    `seq_blocks_1`; a regex's `\\.` -> `_`), exclusions too."""
    exclude = tuple(to_node_form(e) for e in selector.exclude)
    if selector.kind in ("name", "glob"):
        return Selector(selector.kind, selector.pattern.replace(".", "_"), exclude=exclude)
    if selector.kind == "regex":
        return Selector("regex", selector.pattern.replace("\\.", "_"), exclude=exclude)
    if selector.kind == "scoped":
        return Selector("scoped", selector.pattern, selector.scope.replace(".", "_"), exclude=exclude)
    return Selector(selector.kind, selector.pattern, selector.scope, exclude)


def selector_matches(
    selector: Selector, path: str, op: str, *, by_node_name: bool = False, modules: Sequence[Module] | None = None
) -> bool:
    """Whether `selector` picks the module `(path, op)`; see the module docstring for `by_node_name`.
    `modules` (the model's `(path, type)` in order) is needed for `first` / `last`."""
    if by_node_name:
        nodes = [(p.replace(".", "_"), t) for p, t in modules] if modules is not None else None
        return to_node_form(selector).matches(path.replace(".", "_"), op, nodes)
    return selector.matches(path, op, modules)


def _rank(indexed: tuple[int, Binding]) -> tuple[int, int, int]:
    i, b = indexed
    return (b.selector.specificity, b.order, i)  # the list position only breaks exact ties (later wins)


def resolve_bindings(
    bindings: Sequence[Binding], modules: Iterable[Module], *, by_node_name: bool = False
) -> dict[str, dict[str, ResolvedParam]]:
    """The winning binding of every bound parameter of every quantisable module.

    Args:
        bindings: the plan's bindings.
        modules: `(path, type)` of every module of the model (non-quantisable ones are skipped).
        by_node_name: compare name/glob patterns in node form (for modules known by MASE node name only).

    Returns:
        `{path: {param: ResolvedParam}}` for every quantisable module, in the order of `modules`; a module
        no binding reaches maps to `{}`. Parameters no binding sets are absent.
    """
    indexed = list(enumerate(bindings))
    modules = list(modules)
    out: dict[str, dict[str, ResolvedParam]] = {}
    for path, op in modules:
        params = applicable_params(op)
        if not params:
            continue
        hits: dict[str, list[tuple[int, Binding]]] = {}
        matched: dict[Selector, bool] = {}
        for i, b in indexed:
            if b.param not in params:
                continue
            if b.selector not in matched:
                matched[b.selector] = selector_matches(
                    b.selector, path, op, by_node_name=by_node_name, modules=modules
                )
            if matched[b.selector]:
                hits.setdefault(b.param, []).append((i, b))
        resolved = {}
        for param in params:
            if param in hits:
                ranked = [b for _, b in sorted(hits[param], key=_rank, reverse=True)]
                resolved[param] = ResolvedParam(ranked[0], tuple(ranked[1:]))
        out[path] = resolved
    return out


def _distinct(bindings: Iterable[Binding]) -> list[Binding]:
    """One binding per distinct (selector, origin), the first in `order`."""
    seen: dict[tuple[Selector, object], Binding] = {}
    for b in sorted(bindings, key=lambda b: b.order):
        seen.setdefault((b.selector, b.origin), b)
    return list(seen.values())


def unmatched_selectors(
    bindings: Sequence[Binding], modules: Iterable[Module], *, by_node_name: bool = False
) -> list[Binding]:
    """The bindings whose selector matches no quantisable module, one per distinct selector and origin.

    Returns:
        Those bindings in statement order (`order`); empty when every selector hits something.
    """
    modules = list(modules)
    quantisable = [(p, op) for p, op in modules if op in QUANTISABLE]
    hit: dict[Selector, bool] = {}
    out = []
    for b in _distinct(bindings):
        if b.selector not in hit:
            hit[b.selector] = any(
                selector_matches(b.selector, p, op, by_node_name=by_node_name, modules=modules)
                for p, op in quantisable
            )
        if not hit[b.selector]:
            out.append(b)
    return out


def inapplicable_bindings(
    bindings: Sequence[Binding], modules: Iterable[Module], *, by_node_name: bool = False
) -> list[tuple[Binding, list[Module]]]:
    """Name and glob bindings that match quantisable modules none of which has the parameter's tensor.

    `"seq_blocks.1".weight_max = 0.1` on a ReLU can never take effect. Type and default selectors are left
    out (the compiler rejects `relu.weight_max`; `default.weight_width` rightly skips ReLUs).

    Returns:
        `(binding, matched quantisable modules)` pairs in statement order.
    """
    modules = list(modules)
    quantisable = [(p, op) for p, op in modules if op in QUANTISABLE]
    out = []
    for b in sorted(bindings, key=lambda b: b.order):
        if b.selector.kind not in ("name", "glob", "regex"):
            continue
        split = split_param(b.param)
        if split is None:  # `name`: every quantisable module has it
            continue
        hits = [(p, op) for p, op in quantisable
                if selector_matches(b.selector, p, op, by_node_name=by_node_name, modules=modules)]
        if hits and all(split[0] not in QUANTISABLE[op] for _, op in hits):
            out.append((b, hits))
    return out
