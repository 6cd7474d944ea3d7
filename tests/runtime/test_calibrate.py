"""Calibration batches (MASE's semantics) and the calibration loop's failures, which name the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ternqc.plan import Origin, ProfilePoint, Selector, StatSpec
from ternqc.runtime.calibrate.loop import calibrate, calibration_batches, forward_naming_failures
from ternqc.runtime.calibrate.points import resolve_profile
from ternqc.runtime.errors import UserError
from ternqc.runtime.models.builtin import ToyNet
from ternqc.runtime.models.data import ToyTiny

MINMAX = StatSpec("range_min_max")


def toy_points():
    return [ProfilePoint(Selector("type", "linear"), "data_in_0", (MINMAX,), Origin("r.tq", 1, 1))]


def test_batches_are_rounded_up_to_whole_batches_of_a_seeded_shuffle():
    data = ToyTiny("train")
    batches = calibration_batches(data, samples=32, batch_size=128, seed=0)
    assert len(batches) == 1 and batches[0][0].shape == (128, 1, 2, 2)
    # the definition: a DataLoader shuffled by a torch.Generator seeded with `seed`
    loader = DataLoader(data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    expected = list(loader)
    assert torch.equal(batches[0][0], expected[0][0]) and torch.equal(batches[0][1], expected[0][1])
    three = calibration_batches(data, samples=300, batch_size=128, seed=0)
    assert [len(x) for x, _ in three] == [128, 128, 128]
    inputs = torch.cat([x for x, _ in three]).reshape(-1, 4)
    assert len(torch.unique(inputs, dim=0)) == 384  # distinct samples
    assert not torch.equal(inputs, data.inputs[:384].reshape(-1, 4))  # shuffled


def test_batches_stop_when_the_dataset_runs_out_and_depend_on_the_seed():
    data = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.zeros(10))
    batches = calibration_batches(data, samples=100, batch_size=4, seed=1)
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert sorted(torch.cat([x for x, _ in batches]).flatten().tolist()) == list(range(10))
    again = calibration_batches(data, samples=100, batch_size=4, seed=1)
    other = calibration_batches(data, samples=100, batch_size=4, seed=2)
    assert torch.equal(batches[0][0], again[0][0]) and not torch.equal(batches[0][0], other[0][0])


def test_empty_dataset_is_a_user_error():
    with pytest.raises(UserError, match="empty"):
        calibration_batches(TensorDataset(torch.zeros(0, 2), torch.zeros(0)), 8, 4, 0)


def test_items_that_are_not_pairs_are_a_user_error():
    with pytest.raises(UserError, match=r"\(input, label\) pairs"):
        calibration_batches(TensorDataset(torch.zeros(4, 2)), 8, 4, 0)


def test_calibrate_collects_and_sets_eval_mode():
    model = ToyNet().train()
    batches = calibration_batches(ToyTiny("train"), 256, 128, 0)
    table = calibrate(model, batches, resolve_profile(toy_points(), model), progress=False)
    assert not model.training
    x = torch.cat([b for b, _ in batches]).reshape(256, 4)
    assert table["seq_blocks.0"].values["data_in_0"][MINMAX]["max"] == float(x.max())
    assert table["seq_blocks.0"].values["data_in_0"][MINMAX]["count"] == 256 * 4


class _Twice(nn.Module):
    """A shared Linear called twice in one forward (as in a weight-tied or looped block)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(64, 64)

    def forward(self, x):
        return self.shared(self.shared(x) * 3.0 + 1.0)


@pytest.mark.parametrize("n_batches", [1, 3])
def test_a_module_called_twice_per_forward_gets_exact_quantiles_from_every_call(n_batches):
    """One batch planned per call counted once: a module called twice per forward still gets torch.quantile over
    the inputs of every call (the one-batch answer from the probe is taken back when the second call comes)."""
    from ternqc.runtime.calibrate.points import ResolvedPoints

    torch.manual_seed(0)
    model = _Twice()
    specs = (StatSpec("range_quantile", options=(("quantile", 0.5),)), StatSpec("range_quantile", options=(("quantile", 0.75),)), MINMAX)
    seen = []
    model.shared.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    batches = [(torch.randn(16, 64), None) for _ in range(n_batches)]
    table = calibrate(model, batches, ResolvedPoints.from_mapping({"shared": {"data_in_0": specs}}), progress=False)
    assert len(seen) == 2 * n_batches
    every = torch.cat([x.reshape(-1) for x in seen])
    got = table["shared"].values["data_in_0"]
    for s in specs[:2]:
        q = s.option("quantile")
        assert got[s]["max"] == float(torch.quantile(every, q))
        assert got[s]["min"] == float(torch.quantile(every, 1.0 - q))
        assert got[s]["count"] == every.numel()
    assert got[MINMAX]["max"] == float(every.max())


class _TwiceChangedInPlace(nn.Module):
    """A shared Linear called twice, its first input changed in place between the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(64, 64)

    def forward(self, x):
        y = x * 1.0
        h = self.shared(y)
        y.mul_(2.0)
        return self.shared(y + h)


def test_a_first_input_changed_in_place_before_a_second_call_is_collected_again():
    """One batch: the first call's values are kept by reference (no copy); the model changing them in place
    before calling the module again makes the statistic collected again, in one more forward: still
    torch.quantile over the inputs of both calls as they were."""
    from ternqc.runtime.calibrate.points import ResolvedPoints

    torch.manual_seed(1)
    model = _TwiceChangedInPlace()
    specs = (StatSpec("range_quantile", options=(("quantile", 0.5),)), MINMAX)
    seen = []
    model.shared.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    table = calibrate(model, [(torch.randn(16, 64), None)], ResolvedPoints.from_mapping({"shared": {"data_in_0": specs}}),
                      progress=False)
    assert len(seen) == 4  # the statistic's second pass: one more forward of the batch
    every = torch.cat([x.reshape(-1) for x in seen[:2]])
    got = table["shared"].values["data_in_0"]
    assert got[specs[0]]["max"] == float(torch.quantile(every, 0.5))
    assert got[specs[0]]["count"] == every.numel()
    assert got[MINMAX]["max"] == float(every.max())


def test_rejected_inputs_name_the_module_and_the_input_shape():
    model = ToyNet()
    batches = [(torch.randn(128, 1, 3, 3), torch.zeros(128))]
    with pytest.raises(UserError) as info:
        calibrate(model, batches, resolve_profile(toy_points(), model), progress=False)
    message = str(info.value)
    assert message.startswith(
        "the model rejected the calibration inputs: seq_blocks.0 (Linear) raised RuntimeError: mat1 and mat2 "
        "shapes cannot be multiplied"
    )
    assert message.endswith("(input batch shape [128, 1, 3, 3])")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Conv1d(4, 2, 1)))

    def forward(self, x):
        return self.body(x)


def test_forward_naming_failures_finds_the_innermost_module():
    model = Deep()
    assert forward_naming_failures(model, torch.randn(3, 4, 4)).shape == (3, 2, 4)
    with pytest.raises(UserError, match=r"evaluation inputs: body.1.1 \(Conv1d\) raised RuntimeError"):
        forward_naming_failures(model, torch.randn(3, 4), what="evaluation inputs")


def test_a_failure_in_the_models_own_forward_names_the_model():
    class Picky(nn.Module):
        def forward(self, x):
            raise ValueError("no thanks")

    with pytest.raises(UserError, match=r"the model \(Picky\) raised ValueError: no thanks \(input batch"):
        forward_naming_failures(Picky(), torch.zeros(2))
