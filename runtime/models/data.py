"""Datasets: the built-in `toy-tiny` and `digits` data, and user factories.

`build_dataset(spec, split) -> Dataset` of `(input, label)` pairs (or `((inputs...), label)`, or dicts of
tensors whose `labels` key is the label: see `batches.py`): `spec` is a built-in name (`toy-tiny`,
also `toy_tiny`; `digits`, see `digits.py`) or `FILE.py:factory` / `package.module:factory` with `factory(split: str)`. Splits are
`train`, `validation` and `test`; `val` means `validation`, and factories receive the canonical name.
Every dataset handed out is a map-style torch `Dataset` with at least one item.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from ternqc.runtime.errors import UserError
from ternqc.runtime.io.factories import call_factory, is_factory_spec, load_factory, unknown_builtin_message
from ternqc.runtime.models.digits import Digits

TOY_TINY_SEEDS = {"train": 0, "validation": 1, "test": 2}
TOY_TINY_SIZE = 512

#: The split names ternqc uses, and the other spellings it accepts for them.
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation"}


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


BUILTIN_DATASETS = {"toy-tiny": ToyTiny, "toy_tiny": ToyTiny, "digits": Digits}


def canonical_split(split: str) -> str:
    """`val` -> `validation`; other names unchanged."""
    return SPLIT_ALIASES.get(split, split)


def _builtin(spec: str, split: str) -> Dataset:
    if spec not in BUILTIN_DATASETS:
        raise UserError(unknown_builtin_message(spec, list(BUILTIN_DATASETS), what="dataset"))
    if split not in SPLITS:
        close = difflib.get_close_matches(split, list(SPLITS) + list(SPLIT_ALIASES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        msg = f"dataset {spec!r} has no split {split!r}{hint}; its splits are {', '.join(SPLITS)} (or val)"
        raise UserError(msg)
    return BUILTIN_DATASETS[spec](split)


def _check_dataset(spec: str, split: str, dataset: object) -> Dataset:
    kind = f"{type(dataset).__module__}.{type(dataset).__qualname__}"
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Dataset):
        msg = (
            f"dataset factory {spec!r} returned a {kind} for split {split!r}, not a map-style "
            f"torch.utils.data.Dataset (with __len__ and __getitem__ giving (input, label) pairs)"
        )
        raise UserError(msg)
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        msg = f"dataset {spec!r} split {split!r} ({kind}) has no length: define __len__ ({exc})"
        raise UserError(msg) from exc
    if size == 0:
        msg = f"dataset {spec!r} split {split!r} is empty"
        raise UserError(msg)
    try:
        item = dataset[0]
    except Exception as exc:
        msg = f"dataset {spec!r} split {split!r}: reading item 0 raised {type(exc).__name__}: {exc}"
        raise UserError(msg) from exc
    if isinstance(item, Mapping):  # Hugging Face style: a dict of tensors, `labels` the label
        return dataset
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        msg = (
            f"dataset {spec!r} split {split!r}: items must be (input, label) pairs or dicts of tensors, "
            f"but item 0 is a {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        )
        raise UserError(msg)
    return dataset


def build_dataset(spec: str, split: str) -> Dataset:
    """Build split `split` of the dataset named by `spec`.

    Args:
        spec: `toy-tiny` (or `toy_tiny`), `digits`, `path/to/file.py:factory` (relative to the working directory) or
            `package.module:factory`, where `factory(split)` returns a torch `Dataset` of `(input, label)`.
        split: `train`, `validation` (or `val`) or `test`; a factory receives the canonical name.

    Returns:
        A non-empty map-style `Dataset` whose items are `(input, label)` pairs.

    Raises:
        UserError: unknown built-in or split, factory errors, a return value that is not a map-style
            Dataset, an empty split, or items that are not pairs.
    """
    split = canonical_split(split)
    if not is_factory_spec(spec):
        dataset = _builtin(spec, split)
    else:
        factory = load_factory(spec, what="dataset")
        dataset = call_factory(spec, factory, split, what="dataset")
    return _check_dataset(spec, split, dataset)
