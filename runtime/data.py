"""Datasets: the built-in `toy-tiny` data and user factories.

`build_dataset(spec, split) -> Dataset` of `(input, label)` pairs: `spec` is a built-in name (`toy-tiny`,
also `toy_tiny`) or `FILE.py:factory` / `package.module:factory` with `factory(split: str)`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

TOY_TINY_SEEDS = {"train": 0, "validation": 1, "test": 2}
TOY_TINY_SIZE = 512


class ToyTiny(Dataset):
    """MASE's 2023 `toy-tiny`: 512 samples per split, `RandomState(seed)` with seeds train 0 / validation 1 /
    test 2, inputs uniform in [-5, 5) shaped (1, 2, 2) float32, label = int(row sum > 0) as int64."""

    def __init__(self, split: str = "train") -> None:
        rng = np.random.RandomState(TOY_TINY_SEEDS[split])
        data = (rng.rand(TOY_TINY_SIZE, 4) - 0.5) * 10
        self.inputs = torch.tensor(data, dtype=torch.float32).reshape(-1, 1, 2, 2)
        self.labels = torch.tensor((data.sum(axis=1) > 0).astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.inputs[i], self.labels[i]


BUILTIN_DATASETS = {"toy-tiny": ToyTiny, "toy_tiny": ToyTiny}
