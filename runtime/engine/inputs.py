"""How the integer engine turns a float activation into 8-bit codes, and its scale.

In: a converted module's data_in `TensorQuant` and buffers (Δ, α / step). Out: an `InputQuant` whose
`codes(x)` gives `(uint8 codes, zero point, scale)` with `code - zero point` equal to the simulated
quantiser's `c(x)` (`kinds`): ternary -1/0/+1 as 0/1/2 (zero point 1), or 0/1 when the input is known to
be >= 0 (after a folded ReLU: one comparison, `(x > Δ)` read as uint8); binary -1/+1 as 0/2 (zero point 1);
integer c + 128 (zero point 128), or c itself after a ReLU. The scale is a float (static, 1.0 without
scaling) or a `[rows, 1]` tensor (dynamic, per row).
"""

from __future__ import annotations

from typing import Any

import torch

from ternqc.runtime.quantize.kinds import get_kind
from ternqc.runtime.quantize.quantizers import TensorQuant

#: The widest code the 8-bit engine takes.
MAX_ENGINE_WIDTH = 8


def input_ineligible(tq: TensorQuant, alpha: torch.Tensor | None) -> str | None:
    """Why data_in with config `tq` and stored α/step `alpha` cannot feed an 8-bit matmul (None: it can)."""
    if not tq.quantize:
        return "data_in is float"
    if tq.width > MAX_ENGINE_WIDTH:
        return f"data_in has {tq.width} bits (the engine takes up to {MAX_ENGINE_WIDTH})"
    if alpha is not None and alpha.numel() != 1:
        return "data_in has a per-channel scale (it cannot be taken out of the sum over channels)"
    return None


class InputQuant:
    """A data_in quantiser for the engine (a plain object; its tensors are the owning module's buffers)."""

    def __init__(self, tq: TensorQuant, delta: torch.Tensor | None, alpha: torch.Tensor | None) -> None:
        self.tq = tq
        self.kind = get_kind(tq.kind)
        self.delta = delta
        self.scale = float(alpha) if alpha is not None and tq.scaling else 1.0
        self.nonnegative = False  # set by fusion when the input is known to be >= 0 (after a ReLU)
        self.low, self.high = self.kind.levels(tq.width)

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, int, Any]:
        """`(uint8 codes, zero point, scale)` for a float `x` [rows, K]."""
        tq = self.tq
        if tq.kind == "ternary":
            d = self.delta
            if self.nonnegative:
                return (x > d).view(torch.uint8), 0, self.scale
            return (x > d).view(torch.uint8) + (x >= -d).view(torch.uint8), 1, self.scale
        if tq.kind == "binary":
            u = (x >= 0).view(torch.uint8) * 2
            if tq.dynamic:
                return u, 1, x.abs().mean(dim=1, keepdim=True)
            return u, 1, self.scale
        # integer: the same divisions as the simulated quantiser (kinds/integer.py), so the codes are equal
        if tq.dynamic:
            amax = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg_())  # no |x| copy
            scale = amax / self.high
            q = x / torch.where(scale > 0, scale, torch.ones_like(scale))
            q.round_()  # |x| <= max|x| of its row: |q| <= Q, no clamp needed
        else:
            scale = self.scale
            q = (x / scale if scale > 0 else x.clone()).round_()
            q.clamp_(0 if self.nonnegative else self.low, self.high)
        if self.nonnegative:
            return q.to(torch.uint8), 0, scale
        return q.add_(128).to(torch.uint8), 128, scale


__all__ = ["MAX_ENGINE_WIDTH", "InputQuant", "input_ineligible"]
