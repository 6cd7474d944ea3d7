"""Models: the built-in `toy` network and user factories.

`build_model(spec) -> nn.Module`: `spec` is a built-in name (`toy`) or `FILE.py:factory` /
`package.module:factory`, where `factory()` returns an `nn.Module`.
"""

from __future__ import annotations

from torch import nn


class ToyNet(nn.Module):
    """MASE's 2023 `toy` network: input [B, 1, 2, 2] flattened to 4, Linear(4,100)-ReLU-Linear(100,100)-ReLU-
    Linear(100,2). Module names match MASE's (`seq_blocks.0` ... `seq_blocks.4`), so MASE checkpoints load."""

    def __init__(self, in_features: int = 4, hidden: int = 100, num_classes: int = 2) -> None:
        super().__init__()
        self.seq_blocks = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.seq_blocks(x.view(x.size(0), -1))


BUILTIN_MODELS = {"toy": ToyNet}
