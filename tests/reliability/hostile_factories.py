"""Hostile datasets and models for the reliability matrix (`FILE.py:factory` specs); each breaks one thing.

Datasets yield `(x, label)` with x shaped [1, 2, 2] (the toy model's 4 inputs) unless broken on purpose.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class _Items(Dataset):
    def __init__(self, n: int = 64, length: int | None = None) -> None:
        self.n = n
        self.length = n if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if i >= self.n:
            raise IndexError(f"item {i} of {self.n}")
        return torch.full((1, 2, 2), float(i % 5)), i % 2


class _Ragged(_Items):
    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return (x if i % 2 else torch.zeros(3)), y


class _Raises(_Items):
    def __getitem__(self, i: int):
        if i == 7:
            raise ValueError("sample 7 is corrupt")
        return super().__getitem__(i)


class _NaN(_Items):
    def __getitem__(self, i: int):
        return torch.full((1, 2, 2), float("nan")), i % 2


def ragged(split: str) -> Dataset:
    return _Ragged()


def item_raises(split: str) -> Dataset:
    return _Raises()


def lying_len(split: str) -> Dataset:
    return _Items(n=10, length=1000)


def nan_data(split: str) -> Dataset:
    return _NaN()


class _StringOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        self.fc(x.view(x.size(0), -1))
        return "not a tensor"


def returns_string() -> nn.Module:
    return _StringOut()


def toy_killed_in_rank_1() -> nn.Module:
    """The toy model, except that the process of rank 1 of a `--workers` run dies of SIGKILL building it."""
    import os
    import signal

    from ternqc.runtime.models.builtin import ToyNet

    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return ToyNet()


def toy_bug_in_rank_1() -> nn.Module:
    """The toy model, except that rank 1 hits a bug outside the factory's own call: an attribute error raised
    from a forward pre-hook on the first module (not a UserError, not the model's forward)."""
    import os

    from ternqc.runtime.models.builtin import ToyNet

    model = ToyNet()
    if os.environ.get("RANK") == "1":
        model.seq_blocks[0].register_forward_pre_hook(lambda m, a: m.no_such_attribute)
    return model


def toy_with_nan_weights() -> nn.Module:
    """The toy model with 2 NaN and 1 infinite weight in `seq_blocks.2.weight`."""
    from ternqc.runtime.models.builtin import ToyNet

    model = ToyNet()
    with torch.no_grad():
        model.seq_blocks[2].weight[0, :2] = float("nan")
        model.seq_blocks[2].weight[5, 5] = float("-inf")
    return model


class _Slow(_Items):
    """Items that take 20 ms each; in a `--workers` process the first one touches `$RELIABILITY_MARKER`."""

    def __getitem__(self, i: int):
        import os
        import time

        marker = os.environ.get("RELIABILITY_MARKER")
        if marker and os.environ.get("RANK") is not None and not os.path.exists(marker):
            open(marker, "w").close()
        time.sleep(0.02)
        return super().__getitem__(i % self.n)


def slow_in_workers(split: str) -> Dataset:
    return _Slow(n=64, length=2048)
