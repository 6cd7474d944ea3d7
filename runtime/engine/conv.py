"""`IntConv`: a converted Conv1d/Conv2d on the integer engine, as an integer matmul over patches.

In: a converted `nn.Conv1d` / `nn.Conv2d` (groups = 1, zero padding) whose weight and data_in are quantised to
at most 8 bits. Out: a module that quantises its input to uint8 codes (per tensor, or per sample when
dynamic: a conv's row is its whole sample), pads them with the zero point (the code of 0, as the simulated
conv pads its quantised input with zeros), unfolds the patches (im2col) and runs `IntLinear`'s integer
matmul and rescale on `[samples · positions, in_channels · kernel]`, the weight codes being the conv weight
flattened to `[out, in_channels · kernel]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ternqc.runtime.engine.linear import IntLinear


class IntConv(IntLinear):
    """The integer-engine Conv1d/Conv2d; build with `IntConv.from_module(ternary_conv)`."""

    @classmethod
    def from_module(cls, m) -> IntConv:
        self = super().from_module(m)
        self.op = m.ternary_config.op
        self.spatial_dims = 1 if self.op == "conv1d" else 2
        if isinstance(m.padding, str):  # "same" / "valid"
            raise ValueError(f"{self.node}: padding={m.padding!r} has no integer kernel")

        def pair(v: tuple, one: int) -> tuple[int, int]:  # a Conv1d as a Conv2d of height 1
            return (one, v[0]) if self.spatial_dims == 1 else tuple(v)

        self.kernel_size, self.stride = pair(m.kernel_size, 1), pair(m.stride, 1)
        self.padding, self.dilation = pair(m.padding, 0), pair(m.dilation, 1)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 1:
            x = x.unsqueeze(2)
        n = x.shape[0]
        c, zp, s = self._in.codes(x.reshape(n, -1))  # a dynamic scale per sample
        codes = c.reshape(x.shape).to(torch.float32)  # small integers: exact in float for unfold
        ph, pw = self.padding
        if ph or pw:
            codes = F.pad(codes, (pw, pw, ph, ph), value=float(zp))
        cols = F.unfold(codes, self.kernel_size, dilation=self.dilation, stride=self.stride)  # [n, K, L]
        positions = cols.shape[2]
        rows = cols.transpose(1, 2).reshape(n * positions, self.in_features).to(torch.uint8)
        if not isinstance(s, float):
            s = s.repeat_interleave(positions, dim=0)
        y = self._rows(rows, zp, s)  # [n · L, out]
        h = (x.shape[2] + 2 * ph - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        y = y.reshape(n, positions, self.out_features).transpose(1, 2).reshape(n, self.out_features, h, -1)
        if self.spatial_dims == 1:
            y = y.squeeze(2)
        return self._quant_out(y.contiguous(), self.op)


__all__ = ["IntConv"]
