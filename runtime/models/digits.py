"""The built-in `digits` dataset: scikit-learn's 8×8 handwritten digits, with a fixed split.

In: a split name. Out: a map-style `Dataset` of `(image, label)` pairs, images float32 shaped (1, 8, 8) with
pixel values divided by 16 (so in [0, 1]), labels int64 in 0..9.

`sklearn.datasets.load_digits` ships its 1,797 samples inside the package: nothing is downloaded. The split
is fixed and documented: the samples are permuted by `numpy.random.RandomState(0).permutation(1797)`; the
first 1,077 of the permutation (60%) are `train`, the next 360 (20%) `validation`, the last 360 (20%) `test`.
The three splits are disjoint and together hold every sample once. scikit-learn is the optional `data` extra
(`pip install "ternqc[data]"`); without it, building the dataset raises a `UserError` that says so.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from ternqc.runtime.errors import UserError

DIGITS_SEED = 0
DIGITS_SAMPLES = 1797
#: [start, stop) of each split in the seeded permutation.
DIGITS_SPLITS = {"train": (0, 1077), "validation": (1077, 1437), "test": (1437, 1797)}


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """All samples in scikit-learn's order: images (1797, 8, 8) float32 in [0, 1] and labels int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        msg = (
            "the built-in dataset 'digits' needs scikit-learn, which ships the data (no download): "
            'pip install "ternqc[data]" (or pip install scikit-learn)'
        )
        raise UserError(msg) from exc
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 8, 8)
    return images, np.asarray(bunch.target, dtype=np.int64)


def split_indices(split: str) -> np.ndarray:
    """The indices (into scikit-learn's order) of the samples of `split` (`train`, `validation`, `test`)."""
    start, stop = DIGITS_SPLITS[split]
    return np.random.RandomState(DIGITS_SEED).permutation(DIGITS_SAMPLES)[start:stop]


class Digits(Dataset):
    """One split of scikit-learn's digits (see the module docstring): items `(image [1, 8, 8], label)`."""

    def __init__(self, split: str = "train") -> None:
        images, labels = _load()
        if len(labels) != DIGITS_SAMPLES:
            msg = f"scikit-learn's digits has {len(labels)} samples, expected {DIGITS_SAMPLES}"
            raise UserError(msg)
        index = split_indices(split)
        self.inputs = torch.from_numpy(images[index].copy()).unsqueeze(1)
        self.labels = torch.from_numpy(labels[index].copy())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.inputs[i], self.labels[i]
