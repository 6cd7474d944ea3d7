"""`threshold_abs_mean` with a band around a predicted Δ (`stats/threshold_state.py`): given a Δ inside the band
it gives the bits of the statistic computed with Δ known, which equal an exact numpy float64 sum; it refuses
(for a second pass) a Δ outside the band, a batch whose sum could not be exact, and values over the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.quantiles import QuantileBudget
from ternqc.runtime.calibrate.stats import threshold_state
from ternqc.runtime.calibrate.stats.feeder import TensorStats
from ternqc.runtime.calibrate.stats.threshold_state import BAND_LIMITS, band_around, exact_bound

SPEC = StatSpec("threshold_abs_mean")


def batches(kind: str, n: int = 6, shape=(64, 3000), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(*shape, generator=g) for _ in range(n)]
    return [torch.relu(b) for b in out] if kind == "relu" else out


def known(xs, delta):
    ts = TensorStats([SPEC], threshold=delta)
    for i, x in enumerate(xs):
        ts.update(x, i)
    return ts.results()[SPEC]


def banded(xs, predicted, budget=None):
    """Pending with a band of ±10% around `predicted`, under a 4 MiB budget: more than `KEEP_SHARE` of it, so a
    band."""
    budget = budget or QuantileBudget(4 * 2**20)
    ts = TensorStats([SPEC], band=(0.9 * predicted, 1.1 * predicted), quantile_budget=budget, plan_hint=len(xs), size_hint=len(xs))
    for i, x in enumerate(xs):
        ts.update(x, i)
    return ts, ts.states[SPEC]


def numpy_reference(xs, delta):
    a = np.concatenate([x.abs().reshape(-1).numpy() for x in xs])
    above = a[a > np.float32(delta)]
    return above.size, np.sum(above, dtype=np.float64) / above.size


@pytest.mark.parametrize("kind", ["gaussian", "relu"])
@pytest.mark.parametrize("miss", [0.97, 1.0, 1.03])
def test_a_band_gives_the_bits_of_the_threshold_known_and_of_numpy(kind, miss):
    xs = batches(kind)
    delta = 0.7 * float(np.mean(np.concatenate([x.abs().reshape(-1).numpy() for x in xs])))
    ts, state = banded(xs, delta * miss)
    assert state.banded and state.can_finish(delta)
    state.set_threshold(delta)
    got = ts.results()[SPEC]
    assert got == known(xs, delta)
    count, mean = numpy_reference(xs, delta)
    assert (got["count"], got["abs_mean"]) == (count, mean)


def test_the_band_keeps_a_small_share_of_the_values():
    xs = batches("gaussian")
    budget = QuantileBudget(4 * 2**20)
    _, state = banded(xs, 0.56, budget)
    every = sum(x.numel() for x in xs) * 4
    assert state.banded and 0 < budget.used < every / 8


def test_values_that_take_a_small_share_of_the_budget_are_all_kept_with_the_same_bits():
    xs = batches("relu")
    ts, state = banded(xs, 0.3, QuantileBudget(256 * 2**20))
    assert not state.banded and state.can_finish(0.3) and state.can_finish(5.0)  # any Δ: every value is here
    state.set_threshold(0.3)
    assert ts.results()[SPEC] == known(xs, 0.3)


def test_many_values_take_a_band_however_large_the_budget(monkeypatch):
    """Past `KEEP_BYTES` a tensor keeps a band even when the budget would hold every value (fresh memory is
    what keeping them costs); the same bits."""
    xs = batches("relu")
    every = sum(x.numel() for x in xs) * 4
    monkeypatch.setattr(threshold_state, "KEEP_BYTES", every - 1)
    ts, state = banded(xs, 0.3, QuantileBudget(256 * 2**20))
    assert state.banded and state.can_finish(0.3) and not state.can_finish(5.0)
    state.set_threshold(0.3)
    assert ts.results()[SPEC] == known(xs, 0.3)
    monkeypatch.setattr(threshold_state, "KEEP_BYTES", every)
    _, state = banded(xs, 0.3, QuantileBudget(256 * 2**20))
    assert not state.banded


def test_a_delta_outside_the_band_is_refused():
    xs = batches("gaussian")
    _, state = banded(xs, 0.5)
    assert not state.can_finish(0.6) and not state.can_finish(0.4)
    assert state.can_finish(0.5)
    with pytest.raises(ValueError, match="second pass"):
        state.set_threshold(0.6)


def test_a_batch_whose_sum_could_not_be_exact_is_refused_and_summed_in_the_fixed_order():
    """One huge value makes n x max exceed 2^53 spacings of Δ: the band cannot promise the bits of a pass over
    that batch, so it refuses; the statistic with Δ known (float32 chunk sums) still agrees with numpy."""
    xs = batches("gaussian")
    xs[2][0, 0] = 1e13
    assert xs[2].numel() * 1e13 >= exact_bound(0.5)
    _, state = banded(xs, 0.5)
    assert not state.can_finish(0.5)
    got = known(xs, 0.5)
    count, mean = numpy_reference(xs, 0.5)
    assert got["count"] == count and got["abs_mean"] == pytest.approx(mean, rel=1e-8)  # float32 chunk sums


def test_values_in_the_band_over_the_budget_overflow():
    xs = batches("gaussian")
    _, state = banded(xs, 0.56, QuantileBudget(16 * 1024))
    assert state.overflowed and not state.can_finish(0.56)


def test_nonfinite_values_leave_the_band_to_a_second_pass():
    xs = batches("gaussian")
    xs[1][3, 3] = float("nan")
    _, state = banded(xs, 0.56)
    assert not state.can_finish(0.56)


def test_exact_bound_is_two_to_the_53_spacings_of_delta():
    for delta in (0.5, 0.7, 1.0, 3.0, 1e-3):  # np.spacing: the gap to the next float32 up (at 2^k, above it)
        assert exact_bound(delta) == 2.0**53 * float(np.spacing(np.float32(delta)))
    assert exact_bound(0.0) == 2.0 ** (53 - 149)


def test_the_band_narrows_with_the_samples_of_the_first_batch_within_its_limits():
    widths = [band_around(1.0, n)[1] - 1.0 for n in (1, 4, 32, 256, 10**6)]
    assert widths == sorted(widths, reverse=True)
    assert widths[0] == pytest.approx(BAND_LIMITS[1]) and widths[-1] == pytest.approx(BAND_LIMITS[0])
    lo, hi = band_around(2.0, 64)
    assert lo < 2.0 < hi and (2.0 - lo) == pytest.approx(hi - 2.0)


def test_a_row_scanned_by_threads_gives_what_one_thread_gives(monkeypatch):
    from ternqc.runtime.calibrate.stats import threshold_state

    row = np.abs(np.random.default_rng(3).standard_normal(700_001).astype(np.float32))
    one = threshold_state.scan_row(row, np.float32(0.6), np.float32(0.5))
    monkeypatch.setattr(threshold_state, "PARALLEL", 1)
    monkeypatch.setattr(threshold_state, "select_threads", lambda: 2)
    many = threshold_state.scan_row(row, np.float32(0.6), np.float32(0.5))
    assert one[:3] == many[:3] and np.array_equal(one[3], many[3])
    above = row[row > np.float32(0.6)]
    assert one[0] == above.size and one[2] == above.max()
    assert one[1] == np.sum(above, dtype=np.float64)  # exact: any order gives these bits
