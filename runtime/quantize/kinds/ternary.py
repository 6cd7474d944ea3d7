"""`ternary`: codes in {-1, 0, +1} by a threshold Δ, scale α (MASE's ternary quantiser, width 2).

c(x) = +1 where x > Δ, -1 where x < -Δ, 0 otherwise (exactly at ±Δ: 0). Δ comes from `t_threshold` or the
first non-zero of `0.75·|t_mean|`, `0.75·|t_median|`, `0.05·|t_max|` (see `quantizers.py`). With
`t_scaling_factor`, q(x) = α·c(x) where α is `t_scale`, or for a weight or bias the mean of |w| over
|w| > Δ — per tensor, per channel (a per-channel Δ, or `t_per_channel`), or per group of
`t_group_size` consecutive elements of each output row — or for data_in the same mean over the
calibration data. No dynamic (per-row) form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ternqc.plan import FLOAT_WIDTH
from ternqc.runtime.quantize.kinds.registry import QuantKind, reduce_to, register_kind
from ternqc.runtime.quantize.quantizers import (
    THRESHOLD_SOURCES,
    TensorQuant,
    resolve_threshold,
    ternarize,
    weight_alpha,
)

if TYPE_CHECKING:
    import torch


@register_kind
class Ternary(QuantKind):
    name = "ternary"
    widths = (2,)
    params = ("scaling_factor", "mean", "median", "max", "threshold", "scale", "group_size", "per_channel")
    has_zero = True

    def levels(self, width: int) -> tuple[int, int]:
        return -1, 1

    def config(self, t: str, width: int, values: dict[str, Any]) -> TensorQuant:
        return TensorQuant(
            quantize=True,
            delta=resolve_threshold(t, values),
            scaling=bool(values.get(f"{t}_scaling_factor", False)),
            alpha=values.get(f"{t}_scale"),
            kind=self.name,
            width=width,
            group_size=values.get(f"{t}_group_size"),
            per_channel=bool(values.get(f"{t}_per_channel", False)),
        )

    def problem(self, t: str, values: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
        if values.get(f"{t}_dynamic"):
            return (
                f"{t}_dynamic = true is not available for the ternary quantiser; "
                f'use {t}_quantiser = "integer" (per-row absmax) or "binary" (per-row mean |x|)',
                (f"{t}_dynamic",),
            )
        if resolve_threshold(t, values) is None:
            tried = ", ".join(f"{t}_{s}" for s, _ in THRESHOLD_SOURCES)
            return (
                f"cannot resolve the ternary threshold of {t}: {t}_threshold is unset and so are {tried}. "
                f"Set {t}_threshold, give one of them a value, or set {t}_width = {FLOAT_WIDTH} to leave {t} "
                "in float",
                (f"{t}_width",),
            )
        return None

    def codes(self, x: torch.Tensor, tq: TensorQuant, delta: Any, scale: Any) -> torch.Tensor:
        return ternarize(x, delta)

    def derive_scale(self, w: torch.Tensor, tq: TensorQuant, delta: Any) -> torch.Tensor:
        import torch

        if not tq.group_size and not tq.per_channel:
            return weight_alpha(w, delta)  # α takes Δ's shape
        a = w.detach().abs()
        mask = (a > delta).to(a.dtype)
        total = reduce_to(a * mask, tq, delta, "sum")
        count = reduce_to(mask, tq, delta, "sum")
        return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
