"""How the integer engine turns a float activation into int8 codes, and its scale.

In: a converted module's data_in `TensorQuant` and buffers (Δ, α / step). Out: an `InputQuant` whose
`codes(x)` gives `(int8 codes [.., K], scale)`; the scale is a 0-dim tensor (static), `[rows, 1]`
(dynamic, per row) or None (no scaling: the codes are the values). The codes equal the simulated
quantiser's `c(x)` (`kinds`), computed with fewer passes: a ternary input known to be non-negative (after
a ReLU) needs one comparison, `(x > Δ)` read as int8.
"""

from __future__ import annotations

from typing import Any

import torch

from ternqc.runtime.quantize.kinds import get_kind
from ternqc.runtime.quantize.quantizers import TensorQuant

#: The widest code the int8 engine takes.
MAX_ENGINE_WIDTH = 8


def input_ineligible(tq: TensorQuant, alpha: torch.Tensor | None) -> str | None:
    """Why data_in with config `tq` and stored α/step `alpha` cannot feed an int8 matmul (None: it can)."""
    if not tq.quantize:
        return "data_in is float"
    if tq.width > MAX_ENGINE_WIDTH:
        return f"data_in has {tq.width} bits (the engine takes up to {MAX_ENGINE_WIDTH})"
    if alpha is not None and alpha.numel() != 1:
        return "data_in has a per-channel scale (it cannot be taken out of the sum over channels)"
    return None


class InputQuant:
    """A data_in quantiser for the engine (plain object, its tensors registered by the owning module)."""

    def __init__(self, tq: TensorQuant, delta: torch.Tensor | None, alpha: torch.Tensor | None) -> None:
        self.tq = tq
        self.kind = get_kind(tq.kind)
        self.delta = delta
        self.alpha = None if alpha is None else alpha.reshape(())
        self.nonnegative = False  # set by fusion when the input is known to be >= 0 (after a ReLU)
        self.low, self.high = self.kind.levels(tq.width)

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """`(int8 codes, scale)` for a float `x` [rows, K]."""
        tq = self.tq
        if tq.kind == "ternary":
            d = self.delta
            if self.nonnegative:
                c = (x > d).view(torch.int8)
            else:
                c = (x > d).view(torch.int8) - (x < -d).view(torch.int8)
            return c, self.alpha if tq.scaling else None
        if tq.kind == "binary":
            c = (x >= 0).view(torch.int8) * 2 - 1
            if tq.dynamic:
                return c.to(torch.int8), x.abs().mean(dim=1, keepdim=True)
            return c.to(torch.int8), self.alpha if tq.scaling else None
        # integer
        if tq.dynamic:
            scale = x.abs().amax(dim=1, keepdim=True) / self.high
        else:
            scale = self.alpha
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / safe).clamp_(self.low, self.high)
        if tq.dynamic:
            q.mul_((scale > 0).to(q.dtype))
        return q.to(torch.int8), scale


__all__ = ["MAX_ENGINE_WIDTH", "InputQuant", "input_ineligible"]
