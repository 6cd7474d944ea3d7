"""`integer`: signed symmetric integers of 2-16 bits, q(x) = s·clamp(round(x / s), -Q, Q), Q = 2^(b-1) - 1.

Rounding is to the nearest integer, ties to even (`torch.round`, `numpy.round`); values beyond ±Q·s
saturate. The step s is `t_scale`, else `|t_max| / Q` (`t_max` is the clipping value, e.g. an absmax or a
quantile statistic), else for a weight or bias `max|w| / Q` per tensor, per output channel
(`t_per_channel`) or per group of `t_group_size` consecutive elements of each output row; `t_dynamic =
true` takes s per row at run time from the row's max |x| (BitNet b1.58's per-token absmax). A step of 0
(an all-zero tensor or row) gives codes 0. Scaling is always on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ternqc.runtime.quantize.kinds.registry import QuantKind, reduce_to, register_kind
from ternqc.runtime.quantize.quantizers import TensorQuant

PARAM_TENSORS = ("weight", "bias")

if TYPE_CHECKING:
    import torch


@register_kind
class Integer(QuantKind):
    name = "integer"
    widths = tuple(range(2, 17))
    params = ("max", "scale", "group_size", "per_channel", "dynamic")
    has_zero = True

    def levels(self, width: int) -> tuple[int, int]:
        q = 2 ** (width - 1) - 1
        return -q, q

    def config(self, t: str, width: int, values: dict[str, Any]) -> TensorQuant:
        dynamic = bool(values.get(f"{t}_dynamic", False))
        scale = values.get(f"{t}_scale")
        if scale is None and values.get(f"{t}_max") is not None and not dynamic:
            scale = np.abs(np.asarray(values[f"{t}_max"], dtype=np.float64)) / self.levels(width)[1]
        return TensorQuant(
            quantize=True,
            scaling=True,
            alpha=None if dynamic else scale,
            kind=self.name,
            width=width,
            group_size=values.get(f"{t}_group_size"),
            per_channel=bool(values.get(f"{t}_per_channel", False)),
            dynamic=dynamic,
        )

    def problem(self, t: str, values: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
        has_step = any(values.get(f"{t}_{p}") is not None for p in ("scale", "max")) or values.get(f"{t}_dynamic")
        if has_step or t in PARAM_TENSORS:  # a weight or bias derives its step from its own values
            return None
        width = values.get(f"{t}_width")
        return (
            f"{t} is quantised to {width}-bit integers but has no step: set {t}_max (the clipping value, "
            f"e.g. from a range statistic), {t}_scale, or {t}_dynamic = true",
            (f"{t}_width",),
        )

    def codes(self, x: torch.Tensor, tq: TensorQuant, delta: Any, scale: Any) -> torch.Tensor:
        import torch

        low, high = self.levels(tq.width)
        s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return torch.round(x / safe).clamp_(low, high) * (s > 0).to(x.dtype)

    def derive_scale(self, w: torch.Tensor, tq: TensorQuant, delta: Any) -> torch.Tensor:
        return reduce_to(w.detach().abs(), tq, None, "amax") / self.levels(tq.width)[1]

    def dynamic_scale(self, x: torch.Tensor, tq: TensorQuant, dims: tuple[int, ...]) -> torch.Tensor:
        return x.abs().amax(dim=dims, keepdim=True) / self.levels(tq.width)[1]
