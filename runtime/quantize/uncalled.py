"""Modules a rule may select that the model never calls as modules, and what happens to them.

`nn.MultiheadAttention` keeps its output projection as a module (`out_proj`, a `NonDynamicallyQuantizableLinear`:
an `nn.Linear`), but its forward reads `out_proj.weight` and `out_proj.bias` directly: the module is never
called, so no hook sees its input. Its weight and bias are quantised in place like any other (a
parametrization: every reader sees the quantised tensor), but a quantised input cannot take effect; the user
is told so by name (in `ternqc compile --model` here; in apply's table, report.json and a warning by
`runtime/run/effects.py`, which finds every module the forward never calls).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ternqc.plan import Binding
from ternqc.runtime.quantize.resolve import resolve_bindings

REASON = ("nn.MultiheadAttention reads its weight without calling the module: weight and bias are quantised in "
          "place, but its input and output are left in float")


def functional_only(model: nn.Module) -> dict[str, str]:
    """`{module path: why}` for every module the model uses without calling it (`MultiheadAttention.out_proj`)."""
    out: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(getattr(module, "out_proj", None), nn.Module):
            out[f"{path}.out_proj" if path else "out_proj"] = REASON
    return out


def selected(
    bindings: Sequence[Binding], modules: Sequence[tuple[str, str]], uncalled: dict[str, str]
) -> dict[str, str]:
    """`{path: why}` of the modules in `uncalled` that some binding reaches (`modules`: the model's
    `(path, type)` in order)."""
    reached = resolve_bindings(bindings, modules)  # the whole model: first(T) / last(T) need its order
    return {path: uncalled[path] for path, params in reached.items() if params and path in uncalled}


def notes(left: dict[str, str]) -> list[str]:
    """One warning line per module left in float."""
    return [f"{path}: selected by the rules, but {why}" for path, why in left.items()]
