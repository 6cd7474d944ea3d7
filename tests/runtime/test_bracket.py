"""Bracketed exact quantiles (`calibrate/bracket.py`): exact whenever they answer, a miss (never a wrong value)
when the data drift out of the brackets, and then the statistic is collected again by `calibrate_pass`.
References are `torch.quantile` over every value (all below its 2^24 limit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate import bracket as bracket_mod
from ternqc.runtime.calibrate import loop
from ternqc.runtime.calibrate.points import ResolvedPoints
from ternqc.runtime.calibrate.quantiles import QuantileBudget
from ternqc.runtime.calibrate.stats import quantile_state
from ternqc.runtime.calibrate.stats.feeder import TensorStats
from tests.runtime.test_distributed_sync import run_distributed, same


@pytest.fixture(autouse=True)
def _bracket_small_streams(monkeypatch):
    """Streams of ~1M values are bracketed here as the large ones are (the default keeps up to
    `EXACT_UP_TO` values whole, which would leave these drifts nothing to miss)."""
    monkeypatch.setattr(quantile_state, "EXACT_UP_TO", 2 * bracket_mod.HEAD_VALUES)


def quantile(q, abs_=False):
    return StatSpec("range_quantile", abs=abs_, options=(("quantile", q),))


def reference(batches, q, abs_=False):
    """torch.quantile's definition (linear interpolation at rank q·(n-1), `torch.lerp` in float32) with the
    rank in float64, as ternqc defines it, over every value sorted by numpy."""
    x = torch.cat([b.reshape(-1) for b in batches])
    x = x[torch.isfinite(x)]
    x = np.sort((x.abs() if abs_ else x).numpy())
    out = []
    for f in (1 - q, q):
        r = f * (x.size - 1)
        lo, hi = math.floor(r), math.ceil(r)
        w = torch.tensor(r - lo, dtype=torch.float32)
        out.append(float(torch.lerp(torch.tensor(x[lo]), torch.tensor(x[hi]), w)))
    return tuple(out)


def feed(batches, specs, budget=None, world_hint=None):
    ts = TensorStats(specs, bracket=True, quantile_budget=budget or QuantileBudget(), plan_hint=world_hint)
    for i, b in enumerate(batches):
        ts.update(b, i)
    return ts


def gaussian(n_batches=8, shape=(64, 2048), seed=0, scale=lambda i: 1.0, shift=lambda i: 0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * scale(i) + shift(i) for i in range(n_batches)]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.975, 0.999])
@pytest.mark.parametrize("abs_", [False, True])
def test_bracketed_quantiles_are_exact_and_keep_a_fraction_of_the_values(q, abs_):
    batches = gaussian(n_batches=16, shape=(64, 4096))
    budget = QuantileBudget()
    ts = feed(batches, [quantile(q, abs_)], budget)
    (state,) = ts.states.values()
    assert state._bracket is not None  # brackets in use, not a buffer of everything
    (result,) = ts.results().values()
    lo, hi = reference(batches, q, abs_)
    assert (result["min"], result["max"]) == (lo, hi)
    assert result.get("exact", True) and not ts.missed()
    every_value = sum(b.numel() for b in batches) * 4
    assert budget.peak < every_value / 4


def test_relu_zeros_on_the_median_are_found_by_the_edge_counts():
    batches = [torch.relu(b - 0.3) for b in gaussian()]  # ~62% zeros: the median is the atom at 0
    ts = feed(batches, [quantile(0.5), quantile(0.7)])
    got = ts.results()
    assert not ts.missed()
    for q in (0.5, 0.7):
        assert (got[quantile(q)]["min"], got[quantile(q)]["max"]) == reference(batches, q)


def test_nonfinite_values_are_left_out_of_the_ranks():
    batches = gaussian()
    batches[0][0, :10] = float("nan")
    batches[5][3, 7] = float("inf")
    ts = feed(batches, [quantile(0.5)])
    (result,) = ts.results().values()
    assert (result["min"], result["max"]) == reference(batches, 0.5)
    assert result["nonfinite"] == 11


DRIFTS = {
    "shift": dict(shift=lambda i: 3.0 * i),  # the median walks out of the first batch's bracket
    "collapse": dict(scale=lambda i: 1.0 if i == 0 else 1e-3, shift=lambda i: 0.0 if i == 0 else 0.5),
    "one_sided": dict(shift=lambda i: 0.0 if i < 2 else -5.0),
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_drift_out_of_the_bracket_is_a_miss_never_a_wrong_value(drift):
    batches = gaussian(**DRIFTS[drift])
    ts = feed(batches, [quantile(0.5), quantile(0.975)])
    assert ts.missed()  # these drifts leave the bracket of at least one quantile
    for spec, result in ts.results().items():  # whatever still answers is exact
        assert (result["min"], result["max"]) == reference(batches, spec.option("quantile"))


@pytest.mark.parametrize("seed", range(12))
def test_random_drifts_are_exact_or_missed(seed):
    g = torch.Generator().manual_seed(100 + seed)
    steps = torch.randn(8, generator=g) * float(torch.rand(1, generator=g) * 2)
    scales = torch.exp(torch.randn(8, generator=g))
    batches = gaussian(seed=seed, shift=lambda i: float(steps[: i + 1].sum()), scale=lambda i: float(scales[i]))
    if seed % 3 == 0:
        batches = [torch.relu(b) for b in batches]
    specs = [quantile(q) for q in (0.5, 0.9, 0.99)]
    ts = feed(batches, specs)
    missed = set(ts.missed())
    for spec in specs:
        if spec not in missed:
            got = ts.results()[spec]
            assert (got["min"], got["max"]) == reference(batches, spec.option("quantile")), spec.key()


def test_values_inside_that_outgrow_the_budget_are_a_miss():
    batches = [torch.randn(64, 4096) * 1e-3 for _ in range(8)]
    batches[0] = torch.randn(64, 4096) * 100  # a wide bracket from a wide head, then everything inside it
    ts = feed(batches, [quantile(0.5)], QuantileBudget(2 * 2**20))
    assert ts.missed()


class Single(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Identity()

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize(("drift", "budget_mib", "exact"), [("shift", 256, True), ("collapse", 256, True),
                                                            ("shift", 1, False)])
def test_calibration_collects_a_missed_quantile_again(monkeypatch, drift, budget_mib, exact):
    batches = [(b, None) for b in gaussian(**DRIFTS[drift])]
    specs = (quantile(0.5), StatSpec("abs_mean"), quantile(0.975))
    points = ResolvedPoints.from_mapping({"inner": {"data_in_0": specs}})
    calls = []
    real = loop.calibrate_pass

    def spy(*args, **kwargs):
        calls.append(kwargs.get("bracket", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "calibrate_pass", spy)
    table = loop.calibrate(Single(), batches, points, quantile_budget=QuantileBudget(int(budget_mib * 2**20)),
                           progress=False)
    assert calls[-1] is False  # a second pass without brackets
    results = table["inner"].values["data_in_0"]
    assert list(results) == list(specs)  # in the order asked for
    values = torch.cat([b.reshape(-1) for b, _ in batches])
    n = values.numel()
    for spec in (quantile(0.5), quantile(0.975)):
        got = results[spec]
        q = spec.option("quantile")
        if exact:
            assert (got["min"], got["max"]) == reference([b for b, _ in batches], q)
        else:  # the sketch: within its certified rank error, and said so
            assert got["exact"] is False
            rank = float((values < got["max"]).sum()) / n
            assert abs(rank - q) <= 1e-4 + 1 / n


def test_calibration_without_drift_needs_no_second_pass(monkeypatch):
    batches = [(b, None) for b in gaussian()]
    points = ResolvedPoints.from_mapping({"inner": {"data_in_0": (quantile(0.5),)}})
    calls = []
    real = loop.calibrate_pass
    monkeypatch.setattr(loop, "calibrate_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    table = loop.calibrate(Single(), batches, points, progress=False)
    assert len(calls) == 1
    got = table["inner"].values["data_in_0"][quantile(0.5)]
    assert (got["min"], got["max"]) == reference([b for b, _ in batches], 0.5)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drift", [None, "shift"])
def test_processes_merge_brackets_to_the_single_process_answer(world, drift):
    batches = gaussian(n_batches=9, **(DRIFTS[drift] if drift else {}))
    specs = [quantile(0.5), quantile(0.99), quantile(0.9, abs_=True)]

    def make(eager):
        return TensorStats(specs, eager=eager, bracket=True, plan_hint=len(batches))

    single = make(True)
    for i, b in enumerate(batches):
        single.update(b, i)
    missed_single = set(single.missed())
    everyone = run_distributed(make, batches, world)
    for results, _, _ in everyone:
        for spec in specs:
            if spec in results:  # answered: exact, so the single process's answer bit for bit
                want = reference(batches, spec.option("quantile"), spec.abs)
                assert same([results[spec]["min"], results[spec]["max"]], list(want))
            if spec not in missed_single and drift is None:
                assert spec in results
    assert len({tuple(sorted(s.key() for s in r)) for r, _, _ in everyone}) == 1  # the same misses everywhere


def test_bracket_width_is_a_module_constant():
    assert 0 < bracket_mod.WIDTH < 0.1


def test_more_calls_than_planned_turn_to_brackets_not_to_a_sketch():
    """Planned small (one update), fed many: the exact buffer's room runs out and brackets take over."""
    batches = gaussian(n_batches=6, shape=(64, 2048))
    budget = QuantileBudget(3 * 2**20)
    ts = TensorStats([quantile(0.5)], bracket=True, quantile_budget=budget, plan_hint=1, size_hint=1)
    for i, b in enumerate(batches):
        ts.update(b, i)
    (result,) = ts.results().values()
    assert result.get("exact", True)
    assert (result["min"], result["max"]) == reference(batches, 0.5)


def _kept_inside(ts) -> int:
    (state,) = ts.states.values()
    return sum(v.n for v in state._bracket.inside)


@pytest.mark.parametrize("q", [0.5, 0.9])
def test_narrowed_brackets_stay_exact_and_keep_far_fewer_values(monkeypatch, q):
    """Once the head is counted, and again after `NARROW_AFTER_HEADS` heads, the brackets shrink to the values
    near the current ranks: the answer is still torch.quantile's, from fewer values at each step (half or less
    of those kept without narrowing)."""
    batches = gaussian(n_batches=16, shape=(64, 4096))
    narrowed = feed(batches, [quantile(q)])
    (state,) = narrowed.states.values()
    assert state._bracket.fractions is None  # narrowed (once)
    (result,) = narrowed.results().values()
    assert (result["min"], result["max"]) == reference(batches, q)
    assert not narrowed.missed()
    monkeypatch.setattr(bracket_mod, "NARROW_AFTER_HEADS", 10**9)
    head_only = feed(batches, [quantile(q)])
    assert head_only.states[quantile(q)]._bracket.fractions is not None  # the second narrowing never came
    monkeypatch.setattr(bracket_mod.Bracket, "narrow", lambda self, *args, **kwargs: None)
    wide = feed(batches, [quantile(q)])
    for ts in (head_only, wide):
        (result,) = ts.results().values()
        assert (result["min"], result["max"]) == reference(batches, q)
    assert _kept_inside(narrowed) < _kept_inside(head_only) < _kept_inside(wide)
    assert _kept_inside(narrowed) * 2 < _kept_inside(wide)


def test_repeated_values_at_the_narrowed_edges_are_counted_as_atoms():
    """Values on a coarse grid (each repeated thousands of times): a narrowed edge falls on a repeated value,
    whose rank is then found from the edge counts; exact, no miss."""
    batches = [torch.round(b * 8) / 8 for b in gaussian(n_batches=16, shape=(64, 4096))]
    for q in (0.5, 0.7, 0.95):
        ts = feed(batches, [quantile(q)])
        (result,) = ts.results().values()
        assert not ts.missed()
        assert (result["min"], result["max"]) == reference(batches, q)


def test_drift_after_narrowing_is_a_miss_never_a_wrong_value():
    """A shift of 0.2 standard deviations in the second half moves the median ~4% of the ranks: inside the
    wide bracket's margin, outside the narrowed one's. A miss (collected again by the caller), never a wrong value."""
    batches = gaussian(n_batches=16, shape=(64, 4096), shift=lambda i: 0.0 if i < 8 else 0.2)
    ts = feed(batches, [quantile(0.5)])
    assert ts.missed()
    assert quantile(0.5) not in ts.results()


@pytest.mark.parametrize("seed", range(6))
def test_scan_with_the_block_bounds_counts_as_the_scan_without(seed):
    """Comparisons the block's min and max decide are skipped; the counts and the values inside are those of
    the full scan, for edges below, at, inside and above the data (a ReLU's atom at 0 included)."""
    from ternqc.runtime.calibrate.quantiles import _scan_part

    rng = np.random.default_rng(seed)
    values = np.maximum(rng.standard_normal(300_000).astype(np.float32), 0) if seed % 2 else (
        rng.standard_normal(300_000).astype(np.float32)
    )
    mn, mx = float(values.min()), float(values.max())
    edges = [np.float32(e) for e in (mn - 1, mn, 0.0, 0.1, 0.5, mx, mx + 1)]
    brackets = [(lo, hi, a, b) for lo in edges for hi in edges if lo < hi for a in (False, True) for b in (False, True)]
    full = _scan_part(values, brackets)
    skipped = _scan_part(values, brackets, (mn, mx))
    for (lo, hi, a, b), (c_full, v_full), (c_skip, v_skip) in zip(brackets, full, skipped):
        want = [int(np.count_nonzero(values > lo)), int(np.count_nonzero((values > lo) & (values < hi))),
                int(np.count_nonzero(values < lo)) if a else 0, int(np.count_nonzero(values > hi)) if b else 0]
        assert c_full == want and c_skip == want
        assert np.array_equal(np.sort(v_skip), np.sort(values[(values > lo) & (values < hi)]))
        assert np.array_equal(v_full, v_skip)


def test_a_bracket_scan_split_over_threads_counts_as_one_thread(monkeypatch):
    from ternqc.runtime.calibrate import quantiles

    values = np.random.default_rng(4).standard_normal(500_000).astype(np.float32)
    brackets = [(np.float32(-0.1), np.float32(0.1), True, True), (np.float32(1.0), np.float32(1.2), False, False)]
    one = quantiles.scan_brackets(values, brackets)
    monkeypatch.setattr(quantiles, "_PARALLEL_SCAN", 1)
    monkeypatch.setattr(quantiles, "select_threads", lambda: 2)
    many = quantiles.scan_brackets(values, brackets)
    for (c1, v1), (c2, v2) in zip(one, many):
        assert c1 == c2 and np.array_equal(v1, v2)


def test_streams_up_to_exact_up_to_keep_every_value(monkeypatch):
    """A stream that plans at most `EXACT_UP_TO` values and fits the budget is kept whole (no brackets to place
    and narrow) and answered exactly; one more value per batch than that and it is bracketed, exact too."""
    batches = gaussian(n_batches=8, shape=(64, 2048))  # 8 x 131072 values
    spec = quantile(0.5)
    for limit, bracketed in ((8 * 64 * 2048, False), (8 * 64 * 2048 - 1, True)):
        monkeypatch.setattr(quantile_state, "EXACT_UP_TO", limit)
        ts = feed(batches, [spec], world_hint=len(batches))
        state = ts.states[spec]
        assert (state._bracket is not None) is bracketed
        got = ts.results()[spec]
        assert (got["min"], got["max"]) == reference(batches, 0.5)
