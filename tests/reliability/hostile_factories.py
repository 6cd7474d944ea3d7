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
