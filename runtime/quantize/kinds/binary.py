"""`binary`: codes in {-1, +1} (width 1), q(x) = α·sign(x) with sign(0) = +1.

0 has no code of its own: it becomes +1 (x >= 0 -> +1, x < 0 -> -1), as in XNOR-Net/BinaryConnect
implementations that binarise with `x >= 0`. With `t_scaling_factor`, α is `t_scale`, or for a weight or
bias the mean of |w| (per tensor, per channel with `t_per_channel`, or per group of `t_group_size`), or
for data_in the mean of |x| over the calibration data; `t_dynamic = true` takes α per row at run time
(mean of |x| over the row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ternqc.runtime.quantize.kinds.registry import QuantKind, reduce_to, register_kind
from ternqc.runtime.quantize.quantizers import TensorQuant

if TYPE_CHECKING:
    import torch


@register_kind
class Binary(QuantKind):
    name = "binary"
    widths = (1,)
    params = ("scaling_factor", "scale", "group_size", "per_channel", "dynamic")
    has_zero = False

    def levels(self, width: int) -> tuple[int, int]:
        return -1, 1

    def pack_layout(self, width: int) -> tuple[int, int, int]:
        return -1, 2, 1  # -1 -> 0, +1 -> 1

    def config(self, t: str, width: int, values: dict[str, Any]) -> TensorQuant:
        dynamic = bool(values.get(f"{t}_dynamic", False))
        return TensorQuant(
            quantize=True,
            scaling=dynamic or bool(values.get(f"{t}_scaling_factor", False)),
            alpha=None if dynamic else values.get(f"{t}_scale"),
            kind=self.name,
            width=width,
            group_size=values.get(f"{t}_group_size"),
            per_channel=bool(values.get(f"{t}_per_channel", False)),
            dynamic=dynamic,
        )

    def codes(self, x: torch.Tensor, tq: TensorQuant, delta: Any, scale: Any) -> torch.Tensor:
        return (x >= 0).to(x.dtype) * 2 - 1

    def derive_scale(self, w: torch.Tensor, tq: TensorQuant, delta: Any) -> torch.Tensor:
        import torch

        a = w.detach().abs()
        return reduce_to(a, tq, None, "sum") / reduce_to(torch.ones_like(a), tq, None, "sum")

    def dynamic_scale(self, x: torch.Tensor, tq: TensorQuant, dims: tuple[int, ...]) -> torch.Tensor:
        return x.abs().mean(dim=dims, keepdim=True)
