"""The report's histograms and errors against numpy: the growing activation histogram equals numpy's
histogram of all values over its final range, whatever the batch order; weight histograms and relative L2
errors equal numpy's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ternqc.runtime.quantize.quantizers import ModuleQuant, TensorQuant
from ternqc.runtime.report.histograms import (
    ACTIVATION_BINS,
    _Growing,
    observe_inputs,
    relative_l2,
    tensor_histogram,
)


def _numpy_trimmed(values: np.ndarray, lo: float, hi: float, bins: int) -> tuple[float, float, list[int]]:
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    nz = np.nonzero(counts)[0]
    return float(edges[nz[0]]), float(edges[nz[-1] + 1]), counts[nz[0] : nz[-1] + 1].tolist()


@pytest.mark.parametrize("scales", [(0.3, 1.0, 7.0), (7.0, 1.0, 0.3), (1e-3, 1e-3, 1e-3)])
def test_growing_histogram_equals_numpy_over_its_final_range(scales) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(0.2, s, size=(64, 9)).astype(np.float32) for s in scales]
    h = _Growing(ACTIVATION_BINS)
    for b in batches:
        h.update(torch.from_numpy(b))
    values = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
    r = 2.0 ** int(np.ceil(np.log2(np.abs(values).max())))
    lo, hi, counts = _numpy_trimmed(values, -r, r, ACTIVATION_BINS)
    got = h.result()
    assert list(got.counts) == counts
    assert (got.lo, got.hi) == pytest.approx((lo, hi))
    assert (got.min, got.max) == (pytest.approx(values.min()), pytest.approx(values.max()))
    assert got.total == values.size


def test_weight_histogram_and_relative_l2_equal_numpy() -> None:
    w = torch.randn(30, 7, generator=torch.Generator().manual_seed(1))
    h = tensor_histogram(w, bins=16)
    counts, edges = np.histogram(w.numpy().astype(np.float64), bins=16)
    assert list(h.counts) == counts.tolist()
    assert (h.lo, h.hi) == pytest.approx((edges[0], edges[-1]))
    q = torch.where(w.abs() > 0.5, w.sign() * 0.9, torch.zeros_like(w))
    wn, qn = w.numpy().astype(np.float64), q.numpy().astype(np.float64)
    assert relative_l2(w, q) == pytest.approx(np.linalg.norm(wn - qn) / np.linalg.norm(wn), rel=1e-12)
    assert relative_l2(torch.zeros(3), torch.zeros(3)) is None


def test_observed_inputs_are_the_inputs_of_quantised_modules_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    quant = TensorQuant(quantize=True, delta=0.4, scaling=True, alpha=1.5)
    configs = {
        "0": ModuleQuant("linear", "n0", {"data_in": TensorQuant.float_()}),
        "2": ModuleQuant("linear", "n2", {"data_in": quant}),
    }
    batches = [(torch.randn(8, 3), None), (torch.randn(8, 3) * 4, None)]
    seen = observe_inputs(model, configs, batches)
    assert set(seen.histograms) == {"2"}
    with torch.no_grad():
        x = torch.cat([model[1](model[0](b)) for b, _ in batches]).numpy().astype(np.float64)
    assert seen.histograms["2"].total == x.size
    q = np.where(np.abs(x) > 0.4, np.sign(x) * 1.5, 0.0)
    assert seen.errors["2"] == pytest.approx(np.linalg.norm(x - q) / np.linalg.norm(x), rel=1e-6)
    assert not model.training and all(not m._forward_pre_hooks for m in model)
