"""Integer matrix products with one float rescale: the engine's kernels.

`qlinear(xu, zp, x_scale, layer, relu)` computes `((xu - zp) @ W^T) · (x_scale · w_scale) + bias` (then ReLU)
where `xu` are uint8 codes with an integer zero point and W int8 codes, accumulating in int32:

- oneDNN (`torch.ops.onednn.qlinear_pointwise`, the kernel torch's x86 inductor quantisation uses): u8 × s8
  → s32 with the rescale, bias and ReLU fused in one call. Fast on AVX2 (vpmaddubsw) as well as
  AVX512-VNNI/AMX, where `torch._int_mm`'s s8 × s8 kernel is slow or a reference loop (measured on an AMD
  EPYC AVX2: 1.7 s against 57 ms for the fp32 matmul).
- fallback (no oneDNN): `torch._int_mm` (s8 × s8 → s32), or an int32 matmul where it refuses the shapes,
  then the rescale in float.

Both are exact in the integer part: int32 accumulation of 8-bit products cannot overflow below
K = 2^31 / 255^2 ≈ 33,000 input features.
"""

from __future__ import annotations

import torch

_INT_MM_OK: dict[tuple[int, int], bool] = {}


def onednn_available() -> bool:
    """Whether this torch has oneDNN's quantised linear."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def prepack(wcodes: torch.Tensor) -> torch.Tensor:
    """int8 weight codes [N, K] in oneDNN's blocked layout (an opaque tensor; not for state_dict)."""
    return torch.ops.onednn.qlinear_prepack(wcodes, None)


def qlinear_onednn(
    xu: torch.Tensor,
    zp: int,
    x_scale: float,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zp: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """`((xu - zp) @ W^T) · x_scale · w_scale + bias`, ReLU if asked; float32 [M, N]."""
    post, args = ("relu", [None]) if relu else ("none", [])
    return torch.ops.onednn.qlinear_pointwise(
        xu, x_scale, zp, packed, w_scale, w_zp, bias, 1.0, 0, torch.float32, post, args, ""
    )


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for int8 `a` [M, K] and int8 `b` [K, N], accumulated in int32."""
    key = (a.shape[1], b.shape[1])
    if _INT_MM_OK.get(key, True):
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            _INT_MM_OK[key] = False
    return a.to(torch.int32) @ b.to(torch.int32)


__all__ = ["int_matmul", "onednn_available", "prepack", "qlinear_onednn"]
