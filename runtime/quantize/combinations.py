"""Each tensor's mapped parameters checked together: what one value alone cannot tell.

In: one mapped module's parameters and the rule behind each (mapping has checked every value on its own:
type, finite, range). Out: nothing, or a
`UserError` naming the node, the tensor, what is wrong and the rule (`file:line:col`) behind each parameter
involved. `pipeline.build_configs` asks before it builds, once, so that the quantisers trust what they
receive (`quantizers.py`, `kinds/`):

- a width that quantises (set, not `plan.FLOAT_WIDTH`) needs a quantiser: `<tensor>_quantiser` or `name`;
- the width must be one of that quantiser's (`plan.QUANTISER_WIDTHS`);
- `group_size` and `per_channel` apply to weight and bias, `dynamic` to data_in and data_out;
- what the kind itself needs (`QuantKind.problem`: a ternary threshold source, an integer step, ...).

This module imports numpy, not torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ternqc.plan import FLOAT_WIDTH, QUANTISABLE, QUANTISER_WIDTHS, QUANTISERS, split_param
from ternqc.render import format_value
from ternqc.runtime.errors import UserError

if TYPE_CHECKING:
    from ternqc.runtime.quantize.resolve import ResolvedParam

#: Tensors with a layout of their own (an output channel, rows to group); the others are activations.
PARAM_TENSORS = ("weight", "bias")


def check_module(node: str, op: str, params: dict[str, Any], explain: dict[str, ResolvedParam]) -> None:
    """Check every tensor of one module (`op`, named `node`) whose parameters quantise it; `params` are all
    its mapped parameters, `explain` the winning rule of each one a rule sets.

    Raises:
        UserError: the first tensor whose parameters do not make a config; the message names the node, the
            tensor, the problem and the rule behind each parameter involved (`name = "binary" (rule at
            r.tq:2:1)`).
    """
    for t in QUANTISABLE[op]:
        values = {k: v for k, v in params.items()
                  if v is not None and (k == "name" or (split_param(k) or ("",))[0] == t)}
        found = tensor_problem(t, values)
        if found is not None:
            problem, involved = found
            msg = f"{t} of node {node} ({op}): {problem} ({_set_by(params, involved, explain)})"
            raise UserError(msg)


def tensor_problem(t: str, values: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """What keeps tensor `t`'s parameters `values` (set ones only) from making a config: `(what is wrong,
    the parameters behind it)`, or None when they make one (or leave `t` in float)."""
    width = values.get(f"{t}_width")
    if width is None or width == FLOAT_WIDTH:
        return None
    key = f"{t}_quantiser" if f"{t}_quantiser" in values else "name"
    kind = values.get(key)
    if kind not in QUANTISERS:
        return (
            f"{t}_width = {width} quantises {t}, but no quantiser is named; set name = {QUANTISERS[0]!r} (or "
            f"{t}_quantiser, one of {list(QUANTISERS)}) to quantise, or leave the widths unset to stay in float",
            (f"{t}_width",),
        )
    widths = QUANTISER_WIDTHS[kind]
    if width not in widths:
        shown = f"{widths[0]}-{widths[-1]}" if len(widths) > 1 else str(widths[0])
        return (
            f"{t}_width = {width} is not supported by the {kind} quantiser; use {shown} for {kind} or "
            f"{FLOAT_WIDTH} (or na) to leave {t} in float",
            (f"{t}_width", key),
        )
    for suffix in ("group_size", "per_channel"):
        if values.get(f"{t}_{suffix}") and t not in PARAM_TENSORS:
            return f"{t}_{suffix} applies to weight and bias only; use {t}_dynamic", (f"{t}_{suffix}",)
    if values.get(f"{t}_dynamic") and t in PARAM_TENSORS:
        return f"{t}_dynamic applies to data_in and data_out only", (f"{t}_dynamic",)
    from ternqc.runtime.quantize.kinds import get_kind

    return get_kind(kind).problem(t, values)


def _set_by(params: dict[str, Any], involved: tuple[str, ...], explain: dict[str, ResolvedParam]) -> str:
    """`weight_width = 3 (rule at r.tq:4:3); name = "binary" (rule at r.tq:2:1)` for the parameters a rule
    set; a parameter no rule set is named as unset."""
    parts = []
    for param in involved:
        rp = explain.get(param)
        if rp is None:
            parts.append(f"{param} is set by no rule")
        else:
            parts.append(f"{param} = {format_value(params.get(param))} (rule at {rp.binding.origin})")
    return "; ".join(parts)


__all__ = ["check_module", "tensor_problem"]
