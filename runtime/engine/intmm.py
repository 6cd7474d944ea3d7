"""Integer matrix products: int8 × int8 → int32, exact.

`int_matmul(a [M, K] int8, b [K, N] int8) -> [M, N] int32` uses `torch._int_mm` (oneDNN/fbgemm VNNI
kernels where the CPU has them) and falls back to an int32 matmul where `_int_mm` refuses the shapes
(older torch builds need M > 16 and K, N multiples of 8). Both are exact: int32 accumulation of int8
products cannot overflow below K = 2^31 / 127^2 ≈ 133,000.
"""

from __future__ import annotations

import torch

_INT_MM_OK: dict[tuple[int, int], bool] = {}


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for int8 `a` [M, K] and `b` [K, N], accumulated in int32."""
    key = (a.shape[1], b.shape[1])
    if _INT_MM_OK.get(key, True):
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            _INT_MM_OK[key] = False
    return a.to(torch.int32) @ b.to(torch.int32)


__all__ = ["int_matmul"]
