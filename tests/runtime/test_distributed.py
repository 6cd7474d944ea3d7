"""Acceptance 1 of issue 5: two gloo processes on 127.0.0.1 give the single-process result, bit for bit.

`run_workers(2, apply_worker, ...)` runs the whole apply flow in two spawned processes (each calibrates half
of the batches, both calibration passes are merged, rank 0's result comes back); `apply_worker` called here
runs it in this process. The statistics (exact quantiles, per-channel and element-wise results, abs_mean,
variance, n-sigma, the second pass's threshold_abs_mean with per-feature thresholds), the mapped
parameters, the ternary configs and the converted weights must be identical. The workers run with one
thread each and this process with more, batches are uneven (200, 200, 112) and some activations exceed a
summation chunk, so results that depended on threads or on the split would differ.
"""

from __future__ import annotations

import math

import pytest
import torch

from ternqc.compiler import compile_source
from ternqc.runtime.errors import UserError
from ternqc.runtime.models.builtin import ToyNet
from ternqc.runtime.run import collectives as distributed
from ternqc.runtime.run import pipeline, workers

RULES = """
calibrate {
    samples = 512
    batch_size = 200
}
profile linear.weight: range_min_max(dims = [1]), abs_mean
profile linear.data_in, relu.data_in:
    range_min_max(dims = none),
    range_quantile(quantile = 0.5),
    range_quantile(dims = none, quantile = 0.9),
    abs_mean(dims = none),
    variance_precise,
    range_n_sigma(num_sigma = 3)
default {
    name = "ternary"
    data_in_width = 2
    data_in_scaling_factor = true
}
linear {
    weight_width = 2
    weight_scaling_factor = true
    bias_width = 32
}
linear.data_in_threshold = 0.5 * stat.abs_mean.abs_mean
linear.weight_threshold  = 0.7 * stat(weight).abs_mean.abs_mean
relu.data_in_threshold   = abs(stat.range_quantile(quantile = 0.5).max) + 0.1 * stat.variance_precise.variance
"""

MODEL = """
import torch
from torch.utils.data import TensorDataset

from ternqc.runtime.models.builtin import ToyNet


def wide():
    return ToyNet(hidden=300)


def three_features(split):
    return TensorDataset(torch.zeros(300, 3), torch.zeros(300))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    (folder / "wide.py").write_text(MODEL)
    torch.manual_seed(3)
    torch.save(ToyNet(hidden=300).state_dict(), folder / "wide.pt")
    plan = compile_source(RULES, "rules.tq").plan
    model = f"{folder / 'wide.py'}:wide"
    settings = pipeline.RunSettings(model=model, ckpt=str(folder / "wide.pt"), dataset="toy-tiny", progress=False)
    return plan, settings


def test_two_processes_give_the_single_process_statistics_and_parameters(setup):
    plan, settings = setup
    single = workers.apply_worker(plan, settings)
    two = workers.run_workers(2, workers.apply_worker, plan, settings)

    assert list(two.profile.table) == list(single.profile.table)
    names = set()
    for path, ms in single.profile.table.items():
        other = two.profile.table[path]
        assert other.shapes == ms.shapes and other.notes == ms.notes
        for tensor, results in ms.values.items():
            assert list(other.values[tensor]) == list(results)
            for s, fields in results.items():
                names.add(s.name)
                got = other.values[tensor][s]
                assert got == fields, (path, tensor, s.key())
                assert not any(isinstance(v, float) and math.isnan(v) for v in fields.values())
    assert {"range_quantile", "range_min_max", "abs_mean", "variance_precise", "threshold_abs_mean"} <= names
    assert two.mapping == single.mapping
    assert two.configs == single.configs
    state, other = single.model.state_dict(), two.model.state_dict()
    assert state.keys() == other.keys()
    for k in state:  # α of a weight included: weight_alpha sums in a fixed order, whatever the thread count
        assert torch.equal(other[k], state[k]), k


def test_a_workers_user_error_reaches_the_parent_with_its_message(setup):
    """Inputs the model rejects: the process that fails and the one that does not both stop with it."""
    plan, settings = setup
    data = settings.model.replace(":wide", ":three_features")
    bad = pipeline.RunSettings(model=settings.model, ckpt=settings.ckpt, dataset=data, progress=False)
    with pytest.raises(UserError) as info:
        workers.run_workers(2, workers.profile_worker, plan, bad)
    with pytest.raises(UserError) as here:
        workers.profile_worker(plan, bad)
    assert str(info.value) == str(here.value)
    assert "rejected the calibration inputs" in str(here.value)


def test_without_a_process_group_everything_is_one_process(monkeypatch):
    for name in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.init_from_env()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert not distributed.is_distributed()
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.first_failure(None) is None and distributed.first_failure("boom") == "boom"
    assert workers.run_workers(1, divmod, 7, 2) == (3, 1)  # one worker: called here
