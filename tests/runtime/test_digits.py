"""The built-in `digits` dataset and the digits models: the documented split against scikit-learn's data
(read independently here), a clear message without scikit-learn, and the models' shapes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ternqc.runtime.errors import UserError
from ternqc.runtime.models import digits
from ternqc.runtime.models.builtin import build_model, default_dataset
from ternqc.runtime.models.data import build_dataset

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def test_split_is_the_documented_permutation_of_sklearns_digits():
    bunch = sklearn_datasets.load_digits()
    order = np.random.RandomState(0).permutation(1797)
    sizes = {"train": 1077, "validation": 360, "test": 360}
    seen = []
    start = 0
    for split, size in sizes.items():
        ds = build_dataset("digits", split)
        assert len(ds) == size
        index = order[start : start + size]
        start += size
        seen.extend(index.tolist())
        x, y = ds[5]
        assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_allclose(x.numpy()[0], bunch.images[index[5]] / 16.0, rtol=0, atol=1e-7)
        assert int(y) == bunch.target[index[5]]
    assert sorted(seen) == list(range(1797))  # disjoint, every sample once


def test_val_alias_and_every_class_in_validation():
    ds = build_dataset("digits", "val")
    assert len(ds) == 360
    assert set(ds.labels.tolist()) == set(range(10))
    assert float(ds.inputs.min()) >= 0.0 and float(ds.inputs.max()) <= 1.0


def test_missing_scikit_learn_is_a_clear_user_error(monkeypatch):
    digits._load.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    try:
        with pytest.raises(UserError, match=r"scikit-learn.*ternqc\[data\]"):
            build_dataset("digits", "train")
    finally:
        digits._load.cache_clear()


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_digits_models_classify_digits_batches(name):
    model = build_model(name)
    x, _ = next(iter(torch.utils.data.DataLoader(build_dataset("digits", "train"), batch_size=4)))
    assert model(x).shape == (4, 10)
    assert default_dataset(name) == "digits"
    first = dict(model.named_modules())["seq_blocks.0"]  # recipes name the first layer so
    assert isinstance(first, (torch.nn.Linear, torch.nn.Conv2d))


def test_default_dataset_of_toy_and_factories():
    assert default_dataset("toy") == "toy-tiny"
    assert default_dataset("net.py:make") == "toy-tiny"
