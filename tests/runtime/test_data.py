"""build_dataset: toy-tiny against MASE's definition, user factories, splits, and every error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from ternqc.runtime.errors import UserError
from ternqc.runtime.models.data import build_dataset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
USER_DATA = f"{FIXTURES / 'user_data.py'}:factory"
BAD = FIXTURES / "bad_factories.py"


@pytest.mark.parametrize(("split", "seed"), [("train", 0), ("validation", 1), ("val", 1), ("test", 2)])
@pytest.mark.parametrize("name", ["toy-tiny", "toy_tiny"])
def test_toy_tiny_is_mases_definition(name, split, seed):
    # MASE 2023: RandomState(seed), (rand(512, 4) - 0.5) * 10, label = row sum > 0, items (1, 2, 2).
    rng = np.random.RandomState(seed)
    data = (rng.rand(512, 4) - 0.5) * 10
    ds = build_dataset(name, split)
    assert len(ds) == 512
    x, y = ds[7]
    assert x.shape == (1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy().reshape(4), data[7].astype(np.float32))
    labels = np.array([int(ds[i][1]) for i in range(len(ds))])
    np.testing.assert_array_equal(labels, (data.sum(axis=1) > 0).astype(np.int64))


def test_user_data_from_file_splits_differ_and_are_deterministic(monkeypatch):
    monkeypatch.chdir(FIXTURES.parent.parent)
    spec = "tests/fixtures/user_data.py:factory"
    train, val = build_dataset(spec, "train"), build_dataset(spec, "val")
    again = build_dataset(spec, "train")
    x, y = train[0]
    assert x.shape == (1, 4, 4) and y.dtype == torch.int64
    assert torch.equal(train[3][0], again[3][0])
    assert not torch.equal(train[0][0], val[0][0])
    labels = torch.stack([train[i][1] for i in range(len(train))])
    assert set(labels.tolist()) == {0, 1}


def test_user_data_label_follows_the_documented_rule():
    ds = build_dataset(USER_DATA, "test")
    sums = torch.stack([ds[i][0].sum() for i in range(len(ds))])
    labels = torch.stack([ds[i][1] for i in range(len(ds))])
    # Shift +-1 on 16 values against noise of std 4 on the sum: the sign of the sum is right ~always.
    assert ((sums > 0).long() == labels).float().mean() > 0.99


def test_factory_receives_the_canonical_split_name(tmp_path):
    # The factory's dataset has one item per letter of the split name it was given.
    (tmp_path / "d.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def factory(split):\n"
        "    return TensorDataset(torch.zeros(len(split), 3), torch.zeros(len(split), dtype=torch.long))\n"
    )
    assert len(build_dataset(f"{tmp_path / 'd.py'}:factory", "val")) == len("validation")


def test_user_data_from_package_module(tmp_path, monkeypatch):
    pkg = tmp_path / "my_data"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sets.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make(split):\n    return TensorDataset(torch.ones(3, 1, 2, 2), torch.tensor([0, 1, 0]))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = build_dataset("my_data.sets:make", "train")
    assert isinstance(ds, Dataset) and len(ds) == 3


def _error(spec: str, split: str = "train") -> str:
    with pytest.raises(UserError) as info:
        build_dataset(spec, split)
    return str(info.value)


def test_unknown_builtin_dataset_suggests_the_close_name():
    msg = _error("toy-tin")
    assert "unknown dataset 'toy-tin'" in msg and "did you mean 'toy-tiny'" in msg


def test_unknown_split():
    msg = _error("toy-tiny", "trian")
    assert "no split 'trian'" in msg and "did you mean 'train'" in msg and "validation" in msg


def test_factory_that_raises():
    msg = _error(f"{BAD}:data_raises")
    assert "data_raises('train')" in msg and "RuntimeError" in msg and "fails on purpose" in msg


def test_factory_returning_a_list():
    msg = _error(f"{BAD}:data_returns_list")
    assert "returned a builtins.list" in msg and "Dataset" in msg


def test_empty_split():
    spec = f"{BAD}:data_empty"
    assert _error(spec, "train") == f"dataset {spec!r} split 'train' is empty"


def test_items_must_be_pairs(tmp_path):
    (tmp_path / "d.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def factory(split):\n    return TensorDataset(torch.zeros(2, 3))\n"
    )
    msg = _error(f"{tmp_path / 'd.py'}:factory")
    assert "(input, label) pairs" in msg and "length 1" in msg


def test_missing_dataset_file():
    assert "does not exist" in _error("nowhere/data.py:factory")
