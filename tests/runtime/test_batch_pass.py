"""The batch pass (`stats/batch_pass.py`): a large batch fed to every statistic by one compiled pass gives the
general path's bits, declines (changing nothing) where that path must decide, and is really taken.

References: the general path (`TensorStats._feed` with a `Block`, the pass turned off), numpy's sort for the
quantiles (`test_bracket.reference`), the fixed-order sum written out in Python floats
(`test_scan_kernel._sequential`) folded left in batch order, numpy's min and max.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate import bracket as bracket_mod
from ternqc.runtime.calibrate import scan_kernel
from ternqc.runtime.calibrate.bracket import Bracket
from ternqc.runtime.calibrate.quantiles import QuantileBudget
from ternqc.runtime.calibrate.stats import batch_pass, quantile_state
from ternqc.runtime.calibrate.stats.feeder import TensorStats
from ternqc.runtime.calibrate.stats.sums import Partials, fold_sums
from ternqc.runtime.calibrate.stats.threshold_state import ThresholdAbsMeanState, _Band, scan_row
from tests.runtime.test_bracket import reference
from tests.runtime.test_scan_kernel import _sequential, needs_kernel

pytestmark = needs_kernel

MINMAX, ABSMEAN, ALPHA = StatSpec("range_min_max"), StatSpec("abs_mean"), StatSpec("threshold_abs_mean")


def quantile(q: float) -> StatSpec:
    return StatSpec("range_quantile", options=(("quantile", q),))


@pytest.fixture(autouse=True)
def _bracket_small_streams(monkeypatch):
    """Streams of ~2M values are bracketed here as the large ones are (see test_bracket)."""
    monkeypatch.setattr(quantile_state, "EXACT_UP_TO", 2 * bracket_mod.HEAD_VALUES)


def batches_of(kind: str, n: int = 10, shape=(64, 4096)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(*shape, generator=g) for _ in range(n)]
    if kind == "relu":  # ~60% zeros: the median is the atom at 0
        xs = [torch.relu(x - 0.25) for x in xs]
    elif kind == "nan":  # a NaN and an Inf in batches the pass would take
        xs[4][3, 5] = float("nan")
        xs[7][0, 0] = float("inf")
    elif kind == "drift":  # the median walks out of the first batches' bracket: a miss
        xs = [x + 2.0 * i for i, x in enumerate(xs)]
    elif kind == "positive":  # |x| = x: the probe's sums of |x| are the sums of x
        xs = [x.abs() + 1.0 for x in xs]
    return xs


class Bits:
    """A result value compared by its bits (and dtype, shape); `value` as a numpy array."""

    def __init__(self, value) -> None:
        self.value = np.asarray(value)

    def __eq__(self, other) -> bool:
        a, b = self.value, other.value
        return (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())

    def __repr__(self) -> str:
        return repr(self.value)


@contextlib.contextmanager
def counting_feeds(passes: bool = True):
    """Inside, each `BatchPass.feed`'s answer is appended to the list yielded (True: the pass took the batch);
    not `passes`: no batch pass is made (every batch through a `Block`)."""
    taken = []
    real = batch_pass.BatchPass.feed

    def counting(self, *args):
        got = real(self, *args)
        taken.append(got)
        return got

    with pytest.MonkeyPatch.context() as m:
        m.setattr(batch_pass.BatchPass, "feed", counting)
        if not passes:
            m.setattr(batch_pass.BatchPass, "build", classmethod(lambda cls, *a: None))
        yield taken


def collect(xs, specs, budget_bytes=256 * 2**20, plan=None):
    """The statistics of `xs` fed batch by batch, and how many batches the pass took."""
    ts = TensorStats(specs, bracket=True, quantile_budget=QuantileBudget(budget_bytes), plan_hint=plan)
    with counting_feeds() as taken:
        for i, x in enumerate(xs):
            ts.update(x, i)
        results = {s.key(): {k: Bits(v) for k, v in r.items()} for s, r in ts.results().items()}
    return results, sorted(s.key() for s in ts.missed()), ts.nonfinite, sum(taken)


def general(monkeypatch, *args, **kwargs):
    """`collect` with the pass turned off: every batch through a `Block`."""
    with monkeypatch.context() as m:
        m.setattr(batch_pass.BatchPass, "build", classmethod(lambda cls, *a: None))
        return collect(*args, **kwargs)


@pytest.mark.parametrize("kind", ["gaussian", "relu", "nan", "drift", "positive"])
@pytest.mark.parametrize("q", [0.5, 0.9])
def test_the_pass_gives_the_general_paths_bits(monkeypatch, kind, q):
    xs = batches_of(kind)
    specs = [MINMAX, quantile(q), ABSMEAN]
    got, missed, nonfinite, taken = collect(xs, specs)
    want, want_missed, want_nonfinite, none = general(monkeypatch, xs, specs)
    assert none == 0 and taken >= len(xs) - 3  # the head, and the batches with NaN/Inf, go the general way
    assert (got, missed, nonfinite) == (want, want_missed, want_nonfinite)
    assert nonfinite == (2 if kind == "nan" else 0)
    assert bool(missed) == (kind == "drift")
    # independent: numpy's sort for the quantile, numpy's min/max, the fixed order written out for abs_mean
    finite = [x[torch.isfinite(x)].numpy() for x in xs]
    every = np.concatenate(finite)
    assert (got[MINMAX.key()]["min"].value, got[MINMAX.key()]["max"].value) == (every.min(), every.max())
    total = 0.0
    for f in finite:  # per batch the fixed-order sum of |x|, batches added left in order
        total += _sequential(f, True)
    assert got[ABSMEAN.key()]["abs_mean"].value == total / every.size
    if not missed:
        assert (got[quantile(q).key()]["min"].value, got[quantile(q).key()]["max"].value) == reference(xs, q)


def test_the_pass_takes_every_batch_after_the_head():
    xs = batches_of("gaussian", n=12)  # 262,144 values a batch: the first is the head the brackets come from
    _, missed, _, taken = collect(xs, [MINMAX, quantile(0.5), ABSMEAN])
    assert not missed and taken == len(xs) - 1


def read_midway(xs, specs, at: int):
    """The results read after batch `at` (mid-stream) and after the last, and how many batches the pass took."""
    ts = TensorStats(specs, bracket=True, quantile_budget=QuantileBudget(256 * 2**20))
    reads = []
    with counting_feeds() as taken:
        for i, x in enumerate(xs):
            ts.update(x, i)
            if i == at:
                reads.append({s.key(): {k: Bits(v) for k, v in r.items()} for s, r in ts.results().items()})
        reads.append({s.key(): {k: Bits(v) for k, v in r.items()} for s, r in ts.results().items()})
    return reads, sum(taken)


@pytest.mark.parametrize("log_batches", [1, 3, 64])
def test_waiting_feeders_give_the_general_paths_bits_whenever_read(monkeypatch, log_batches):
    """The pass runs its states' feeders later, `LOG_BATCHES` batches at a time (`BatchPass.drain`): results read
    midway (a read drains) and at the end are the general path's, whether the feeders ran after every batch,
    every third or only when read; and midway they hold exactly the batches fed so far (numpy's min and max)."""
    monkeypatch.setattr(batch_pass, "LOG_BATCHES", log_batches)
    xs = batches_of("gaussian", n=12)
    specs = [MINMAX, quantile(0.5), ABSMEAN]
    got, taken = read_midway(xs, specs, at=7)
    with monkeypatch.context() as m:
        m.setattr(batch_pass.BatchPass, "build", classmethod(lambda cls, *a: None))
        want, none = read_midway(xs, specs, at=7)
    assert none == 0 and taken >= len(xs) - 3
    assert got == want
    so_far = np.concatenate([x.reshape(-1).numpy() for x in xs[:8]])
    assert (got[0][MINMAX.key()]["min"].value, got[0][MINMAX.key()]["max"].value) == (so_far.min(), so_far.max())


def test_a_batch_of_another_shape_goes_the_general_way(monkeypatch):
    """A smaller batch among the large ones (a last batch, a module called on other shapes): that batch through a
    block, the pass made again after it; results as the general path's and the references'."""
    xs = batches_of("gaussian", n=10)
    xs[6] = xs[6][:32]
    specs = [MINMAX, quantile(0.5), ABSMEAN]
    got = collect(xs, specs)
    assert got[3] == len(xs) - 3  # not the head, not the smaller batch, not the one after it (the pass remade)
    assert got[:3] == general(monkeypatch, xs, specs)[:3]
    results = got[0]
    every = np.concatenate([x.reshape(-1).numpy() for x in xs])
    assert (results[MINMAX.key()]["min"].value, results[MINMAX.key()]["max"].value) == (every.min(), every.max())
    assert (results[quantile(0.5).key()]["min"].value, results[quantile(0.5).key()]["max"].value) == reference(xs, 0.5)
    total = 0.0
    for x in xs:
        total += _sequential(x.reshape(-1).numpy(), True)
    assert results[ABSMEAN.key()]["abs_mean"].value == total / every.size


def test_without_a_bracket_the_pass_is_one_probe(monkeypatch):
    """min/max and abs_mean alone: the pass is the probe's row sums, fed to both."""
    xs = batches_of("gaussian", n=5)
    got = collect(xs, [MINMAX, ABSMEAN])
    assert got[3] == len(xs) - 1 and got[:3] == general(monkeypatch, xs, [MINMAX, ABSMEAN])[:3]


def test_statistics_that_need_the_values_get_no_pass(monkeypatch):
    """Two bracketed quantiles (two passes), a quantile of |x|, a variance, an α: every batch through a Block,
    with the same results as ever."""
    xs = batches_of("gaussian", n=4)
    for specs in (
        [quantile(0.5), quantile(0.99)],
        [StatSpec("range_quantile", abs=True, options=(("quantile", 0.5),)), MINMAX],
        [StatSpec("variance_precise"), MINMAX],
    ):
        got = collect(xs, specs)
        assert got[3] == 0 and got == general(monkeypatch, xs, specs)
    assert ThresholdAbsMeanState(StatSpec("threshold_abs_mean")).pass_feeder(True) is None


def test_an_overflowing_bracket_is_a_miss_as_on_the_general_path(monkeypatch):
    xs = [torch.randn(64, 4096) * 1e-3 for _ in range(8)]
    xs[0] = torch.randn(64, 4096) * 100  # a wide bracket from a wide head, then everything inside it
    specs = [MINMAX, quantile(0.5), ABSMEAN]
    got = collect(xs, specs, budget_bytes=2 * 2**20)
    assert got[1] == [quantile(0.5).key()]
    assert got[:3] == general(monkeypatch, xs, specs, budget_bytes=2 * 2**20)[:3]


def _bracket(head: np.ndarray, q: float, budget: QuantileBudget) -> Bracket:
    return Bracket.start(head, (1.0 - q, q), budget)


@pytest.mark.parametrize("q", [0.5, 0.9])
@pytest.mark.parametrize("absolute", [False, True])
def test_add_pass_counts_and_keeps_as_add_and_sums_in_the_fixed_order(monkeypatch, q, absolute):
    """Into buffers with little room (each scan stops and goes on many times), `add_pass` gives `add`'s counts
    and the same values inside in the same order, and the pass's sum, min and max are the reference's."""
    monkeypatch.setattr(bracket_mod, "PASS_ROOM", 128)
    rng = np.random.default_rng(3)
    head = rng.standard_normal(50_000).astype(np.float32)
    blocks = [rng.standard_normal(40_003).astype(np.float32) * s for s in (1.0, 1.3, 0.8)]
    by_pass, by_add = _bracket(head, q, QuantileBudget()), _bracket(head, q, QuantileBudget())
    for x in blocks:
        total, mn, mx = by_pass.add_pass(x.ctypes.data, x.size, 8 if absolute else 4)
        by_add.add(x, x.size)
        assert np.float64(total).view(np.int64) == np.float64(_sequential(x, absolute)).view(np.int64)
        assert (mn, mx) == (float(x.min()), float(x.max()))
    assert by_pass.counts == by_add.counts and by_pass.seen == by_add.seen
    kept = [v.values()[0] for v in by_pass.inside]
    assert sum(k.size for k in kept) > 20 * 128  # the room filled and the scans went on
    for mine, theirs in zip(kept, (v.values()[0] for v in by_add.inside)):
        np.testing.assert_array_equal(mine.view(np.uint32), theirs.view(np.uint32))


def test_add_pass_declines_without_a_trace():
    """A NaN or Inf, or a budget with no room: None, and the counts and the values kept are as before."""
    rng = np.random.default_rng(4)
    head = rng.standard_normal(50_000).astype(np.float32)
    for spoil, budget in (("nan", QuantileBudget()), ("inf", QuantileBudget()), (None, QuantileBudget(60_000))):
        b = _bracket(head, 0.5, budget)
        x = rng.standard_normal(40_000).astype(np.float32)
        assert b.add_pass(x.ctypes.data, x.size, 4) is not None
        before = (b.counts[0][:], b.seen, b.inside[0].n, b.inside[0].values()[0].copy())
        y = rng.standard_normal(40_000).astype(np.float32) * (1e-3 if spoil is None else 1.0)  # near the median: inside the bracket
        y = np.concatenate([y] * 8) if spoil is None else y  # more inside than the budget has room for
        if spoil:
            y[-3] = np.nan if spoil == "nan" else np.inf
        assert b.add_pass(y.ctypes.data, y.size, 4) is None
        assert (b.counts[0], b.seen, b.inside[0].n) == before[:3]
        np.testing.assert_array_equal(b.inside[0].values()[0], before[3])


@pytest.mark.parametrize("eager", [True, False])
def test_add_one_is_add_of_one_batch(eager):
    keys = [3, 5, 4, 9, 1] + list(range(10, 80))  # out of order, then past a fold
    one, many = Partials(fold_sums, eager), Partials(fold_sums, eager)
    for k in keys:
        one.add_one(k, (7, k * 0.1))
        many.add(np.array([k]), (7, np.array([[k * 0.1]])), 1)
    assert one._in_order == many._in_order
    a, b = one.pending(), many.pending()
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[1], b[1]):
        np.testing.assert_array_equal(x, y)
    fa, fb = one.fold(), many.fold()
    for x, y in zip(fa, fb):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("then", ["fold", "add", "add_one", "merge", "merged_into"])
@pytest.mark.parametrize("eager", [True, False])
def test_a_first_partial_held_as_numbers_is_one_in_the_arrays(then, eager):
    """`add_one` before anything else holds its partial as numbers (a one-batch calibration makes no arrays);
    whatever comes next (a fold, another partial by `add` or `add_one`, a merge either way) gives what the
    arrays give, bit for bit: pending keys and fields, the fold (sums in key order: 1e16 makes it matter) and
    the last key folded."""

    def run(lean: bool, look: bool):
        p = Partials(fold_sums, eager)
        if lean:
            p.add_one(4, (7, 0.1))
        else:
            p.add(np.array([4]), (7, np.array([[0.1]])), 1)
        other = Partials(fold_sums, eager)
        other.add(np.array([2, 9]), (np.array([[3.0], [5.0]]), np.array([[1e16], [0.3]])), 1)
        if then == "add":
            p.add(np.array([1]), (2, np.array([[0.7]])), 1)
        elif then == "add_one":
            p.add_one(1, (2, 0.7))
        elif then == "merge":
            p.merge(other)
        elif then == "merged_into":
            other.merge(p)
            p = other
        keys, cols = p.pending() if look else (np.empty(0), ())  # `pending` first, or the fold straight away
        return keys, cols, p.fold(), p.last

    for look in (True, False):
        lean, arrays = run(True, look), run(False, look)
        np.testing.assert_array_equal(lean[0], arrays[0])
        for x, y in zip((*lean[1], *lean[2]), (*arrays[1], *arrays[2])):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
        assert lean[3] == arrays[3]
    total = {"fold": 0.1, "add": 0.7 + 0.1, "add_one": 0.7 + 0.1, "merge": 1e16 + 0.1 + 0.3,
             "merged_into": 1e16 + 0.1 + 0.3}[then]
    assert float(lean[2][1][0]) == total  # key order, folded left


def test_the_pass_needs_the_library():
    with scan_kernel.numpy_scans():
        got = collect(batches_of("gaussian", n=3), [MINMAX, quantile(0.5), ABSMEAN])
    assert got[3] == 0


# --- a pending α (`threshold_abs_mean` waiting for Δ): its band, or every |x|, kept by the pass -------------------


def pending_alpha(xs, delta, budget_bytes, passes=True):
    """`xs` fed to abs_mean and a pending α with a band of ±10% around `delta` (4 MiB: a band; 256 MiB: every |x|
    kept, `KEEP_SHARE`), Δ = `delta` set afterwards when the state can finish; the results by their bits (α left out
    when it cannot finish), whether it kept a band, and how many batches the pass took."""
    ts = TensorStats([ABSMEAN, ALPHA], band=(0.9 * delta, 1.1 * delta), quantile_budget=QuantileBudget(budget_bytes),
                     plan_hint=len(xs), size_hint=len(xs))
    with counting_feeds(passes) as taken:
        for i, x in enumerate(xs):
            ts.update(x, i)
        state = ts.states[ALPHA]
        banded, finishes = state.banded, state.can_finish(delta)
        if finishes:
            state.set_threshold(delta)
        results = {s.key(): {k: Bits(v) for k, v in r.items()} for s, r in ts.results().items()}
    return results if finishes else {ABSMEAN.key(): results[ABSMEAN.key()]}, banded, state.overflowed, sum(taken)


def alpha_reference(xs, delta):
    """Count and mean of |x| over |x| > Δ: per batch numpy's float64 sum of the values above (exact here, so any
    order gives these bits), the batches added left in order."""
    count, total = 0, 0.0
    for x in xs:
        a = x.abs().reshape(-1).numpy()
        above = a[a > np.float32(delta)]
        count += above.size
        total += float(np.sum(above, dtype=np.float64))
    return count, total / count


@pytest.mark.parametrize("kind", ["gaussian", "relu"])
@pytest.mark.parametrize("budget_mib", [4, 256])  # a band; every value kept
def test_a_pending_alpha_is_kept_by_the_pass_with_the_general_paths_bits(kind, budget_mib):
    xs = batches_of(kind, n=8)
    delta = 0.7 * float(np.mean(np.concatenate([x.abs().reshape(-1).numpy() for x in xs])))
    got, banded, overflowed, taken = pending_alpha(xs, delta, budget_mib * 2**20)
    want, want_banded, _, none = pending_alpha(xs, delta, budget_mib * 2**20, passes=False)
    assert taken == len(xs) - 1 and none == 0  # every batch after the first, which decides band or all
    assert banded == want_banded == (budget_mib == 4) and not overflowed
    assert got == want
    count, mean = alpha_reference(xs, delta)
    assert (got[ALPHA.key()]["count"].value, got[ALPHA.key()]["abs_mean"].value) == (count, mean)
    total = 0.0
    for x in xs:  # abs_mean alongside: the fixed-order sums of |x| from the same pass
        total += _sequential(x.reshape(-1).numpy(), True)
    assert got[ABSMEAN.key()]["abs_mean"].value == total / sum(x.numel() for x in xs)


@pytest.mark.parametrize("budget_mib", [4, 256])
def test_a_nan_leaves_a_pending_alpha_to_a_second_pass_as_on_the_general_path(budget_mib):
    """A NaN in a batch the pass would take: declined, the general path takes it (a band overflows; every value
    kept keeps it, masked); the same results either way."""
    xs = batches_of("gaussian", n=6)
    xs[3][2, 7] = float("nan")
    delta = 0.55
    got = pending_alpha(xs, delta, budget_mib * 2**20)
    want = pending_alpha(xs, delta, budget_mib * 2**20, passes=False)
    assert got[:3] == want[:3] and got[2] == (budget_mib == 4)
    assert got[3] == len(xs) - 2  # not the first, not the NaN batch (the pass made again at the next one)


def test_a_band_over_the_budget_overflows_as_on_the_general_path():
    xs = batches_of("gaussian", n=6)
    got = pending_alpha(xs, 0.55, 2**18)  # room for the first batches' band only (~80 kB a batch)
    want = pending_alpha(xs, 0.55, 2**18, passes=False)
    assert got[2] and got[:3] == want[:3]


def test_a_delta_outside_the_band_cannot_finish_after_the_pass_either():
    xs = batches_of("gaussian", n=5)
    ts = TensorStats([ABSMEAN, ALPHA], band=(0.5, 0.6), quantile_budget=QuantileBudget(4 * 2**20), plan_hint=5, size_hint=5)
    for i, x in enumerate(xs):
        ts.update(x, i)
    state = ts.states[ALPHA]
    assert state.banded and state.can_finish(0.55) and not state.can_finish(0.7) and not state.can_finish(0.45)


def test_band_add_pass_keeps_as_add_scanned(monkeypatch):
    """Into rooms of 128 values (each scan stops and goes on many times), `_Band.add_pass` keeps the values
    `scan_row` finds in the band, in order, with its count, sum and max above; and sums |x| in the fixed order."""
    monkeypatch.setattr(bracket_mod, "PASS_ROOM", 128)
    rng = np.random.default_rng(8)
    by_pass, by_scan = _Band((0.5, 0.6), QuantileBudget()), _Band((0.5, 0.6), QuantileBudget())
    for key, scale in enumerate((1.0, 1.3, 0.8)):
        x = rng.standard_normal(40_003).astype(np.float32) * scale
        total, mn, mx = by_pass.add_pass(x.ctypes.data, x.size, 8, key)
        assert by_scan.add_scanned(key, x.size, scan_row(np.abs(x), by_scan.hi, by_scan.lo))
        assert np.float64(total).view(np.int64) == np.float64(_sequential(x, True)).view(np.int64)
        assert (mn, mx) == (float(x.min()), float(x.max()))
    fields = ("keys", "sizes", "counts", "sums", "tops", "lengths")
    assert [getattr(by_pass, f) for f in fields] == [getattr(by_scan, f) for f in fields]
    assert by_pass.inside.n > 20 * 128  # the room filled and the scans went on
    np.testing.assert_array_equal(by_pass.inside.values().view(np.uint32), by_scan.inside.values().view(np.uint32))


def test_band_add_pass_declines_without_a_trace():
    rng = np.random.default_rng(9)
    for spoil, budget in (("nan", QuantileBudget()), ("inf", QuantileBudget()), (None, QuantileBudget(300_000))):
        band = _Band((0.5, 0.6), budget)
        x = rng.standard_normal(40_000).astype(np.float32)
        assert band.add_pass(x.ctypes.data, x.size, 8, 0) is not None
        before = (band.keys[:], band.inside.n, band.inside.values().copy())
        y = np.full(400_000, 0.55, dtype=np.float32) if spoil is None else rng.standard_normal(40_000).astype(np.float32)
        if spoil:
            y[-3] = np.nan if spoil == "nan" else -np.inf
        assert band.add_pass(y.ctypes.data, y.size, 8, 1) is None
        assert (band.keys, band.inside.n) == before[:2]
        np.testing.assert_array_equal(band.inside.values(), before[2])
