"""The compiled one-pass scans (`runtime/calibrate/native/scan.c` through `scan_kernel.py`) against the numpy
scans they stand in for, at every vector width this CPU runs (AVX-512, AVX2, baseline), on adversarial values:
NaN, ±Inf, -0.0, values exactly on the edges, atoms, tails shorter than a vector, more kept values than the
scratch buffer holds. Counts and kept values must be identical (the same values in the same order); the float64
sum of the values above a cut wherever it is exact (the only place it is used); the per-batch sums equal the
fixed order written out in plain Python. End to end, a calibration with the library and one without write the
same statistics, and so do a calibration whose bracket scans ride on the probe's pass and one that scans twice."""

from __future__ import annotations

import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from ternqc.plan import Origin, ProfilePoint, Selector, StatSpec
from ternqc.runtime.calibrate import scan_kernel
from ternqc.runtime.calibrate.loop import calibrate
from ternqc.runtime.calibrate.points import resolve_profile
from ternqc.runtime.calibrate.quantiles import QuantileBudget, _scan_part
from ternqc.runtime.calibrate.stats import quantile_state
from ternqc.runtime.calibrate.stats.sums import Block, lane_sums
from ternqc.runtime.calibrate.stats.threshold_state import _scan_piece, exact_bound

WIDTHS = [w for w in (16, 8, 4) if w <= (scan_kernel._LIB.ternqc_scan_lanes() if scan_kernel.available() else 0)]
needs_kernel = pytest.mark.skipif(not scan_kernel.available(), reason="the scan library was not built here")


def test_library_built_where_a_compiler_is():
    """`pip install` builds the library wherever a C compiler is (CI included): losing it silently would make
    every calibration slower."""
    if os.environ.get("TERNQC_NATIVE") == "0":
        pytest.skip("TERNQC_NATIVE=0 turns the library off")
    if sys.platform.startswith("linux") and shutil.which("cc"):
        assert scan_kernel.available(), "a C compiler is here but the scan library was not built (pip install -e .)"
        assert scan_kernel.LANES in (4, 8, 16)


@pytest.fixture(params=WIDTHS or [0], ids=lambda w: f"{w}-lanes")
def lanes(request):
    if not request.param:
        pytest.skip("the scan library was not built here")
    previous = scan_kernel.use_lanes(request.param)
    yield request.param
    scan_kernel.use_lanes(previous)


def _adversarial(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size).astype(np.float32)
    x[rng.random(size) < 0.3] = 0.0  # an atom (a ReLU's zeros)
    x[rng.random(size) < 0.05] = -0.0
    x[rng.random(size) < 0.02] = np.nan
    x[rng.random(size) < 0.01] = np.inf
    x[rng.random(size) < 0.01] = -np.inf
    x[rng.random(size) < 0.05] = np.float32(0.25)  # values exactly on an edge
    x[rng.random(size) < 0.05] = np.float32(-0.5)
    return x


BRACKETS = [
    [(np.float32(-0.5), np.float32(0.25), True, True)],  # both edges atoms of the data
    [(np.float32(0.0), np.float32(0.1), True, False)],  # lower edge on the zero atom
    [(np.float32(-np.inf), np.float32(0.3), False, True)],
    [(np.float32(-0.2), np.float32(np.inf), True, False)],
    [(np.float32(-3.0), np.float32(-1.0), False, False), (np.float32(0.0), np.float32(0.25), True, True)],
    [(np.float32(0.0), np.float32(0.0), True, True)],  # an atom holding the whole bracket (a ReLU's zeros)
    [(np.float32(0.25), np.float32(-0.5), True, True)],  # inverted: nothing between
]


@needs_kernel
@pytest.mark.parametrize("size", [0, 1, 15, 63, 64, 65, 1000, 4099, 2**17 + 3])
@pytest.mark.parametrize("which", range(len(BRACKETS)))
def test_brackets_equal_numpy(lanes, size, which):
    x = _adversarial(size, seed=size + 7 * which)
    brackets = BRACKETS[which]
    got = scan_kernel.scan_brackets(x, brackets)
    want = _scan_part(x, brackets)
    assert len(got) == len(want)
    for (gc, gm), (wc, wm) in zip(got, want):
        assert gc == wc
        assert gm.dtype == np.float32
        np.testing.assert_array_equal(gm.view(np.uint32), wm.view(np.uint32))  # same values, same order, same bits


@needs_kernel
def test_brackets_keep_more_than_the_scratch(lanes, monkeypatch):
    """More values inside than one call's buffer holds: the scan resumes where it stopped, nothing lost."""
    monkeypatch.setattr(scan_kernel, "SCRATCH", 256)
    monkeypatch.setattr(scan_kernel._local, "scratch", None, raising=False)
    x = _adversarial(50_000, seed=3)
    brackets = [(np.float32(-1.0), np.float32(1.0), True, True)]
    (gc, gm), = scan_kernel.scan_brackets(x, brackets)
    (wc, wm), = _scan_part(x, brackets)
    assert gm.size > 10 * 256
    assert gc == wc
    np.testing.assert_array_equal(gm.view(np.uint32), wm.view(np.uint32))


@needs_kernel
def test_brackets_take_only_contiguous_float32():
    x = _adversarial(1000, 1)
    assert scan_kernel.scan_brackets(x[::2], BRACKETS[0]) is None
    assert scan_kernel.scan_brackets(x.astype(np.float64), BRACKETS[0]) is None


def _row(size: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    row = np.abs(rng.standard_normal(size).astype(np.float32)) * np.float32(scale)
    row[rng.random(size) < 0.3] = 0.0
    row[rng.random(size) < 0.05] = np.float32(0.75 * scale)  # exactly on the cut
    row[rng.random(size) < 0.05] = np.float32(0.5 * scale)  # exactly on the band's lower edge
    return row


@needs_kernel
@pytest.mark.parametrize("size", [0, 1, 17, 64, 129, 5000, 2**17 + 5])
@pytest.mark.parametrize("keep", [False, True])
def test_row_equals_numpy(lanes, size, keep):
    row = _row(size, seed=size)
    cut, lo = np.float32(0.75), np.float32(0.5) if keep else None
    count, total, top, between = scan_kernel.scan_row(row, cut, lo)
    w_count, w_total, w_top, w_between = _scan_piece(row, cut, lo)
    assert (count, top) == (w_count, w_top)
    np.testing.assert_array_equal(between.view(np.uint32), w_between.view(np.uint32))
    assert row.size * top < exact_bound(float(cut))  # the sum is exact here, so every order gives these bits
    assert total == w_total == math.fsum(float(v) for v in row[row > cut])


@needs_kernel
def test_row_keeps_more_than_the_scratch(lanes, monkeypatch):
    monkeypatch.setattr(scan_kernel, "SCRATCH", 128)
    monkeypatch.setattr(scan_kernel._local, "scratch", None, raising=False)
    row = _row(40_000, seed=5)
    got = scan_kernel.scan_row(row, np.float32(0.75), np.float32(0.1))
    want = _scan_piece(row, np.float32(0.75), np.float32(0.1))
    assert got[3].size > 10 * 128
    assert got[:3] == want[:3]
    np.testing.assert_array_equal(got[3], want[3])


def _mlp_table(monkeypatch, native: bool):
    monkeypatch.setattr(quantile_state, "EXACT_UP_TO", 2**16)  # brackets, not every value kept
    if not native:
        monkeypatch.setattr(scan_kernel, "_LIB", None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(512, 64, generator=g), None) for _ in range(24)]
    specs = (
        StatSpec("range_min_max"),
        StatSpec("range_quantile", options=(("quantile", 0.9),)),
        StatSpec("range_quantile", options=(("quantile", 0.6),)),  # 0.4 and 0.6: inside the ReLU's zeros
        StatSpec("abs_mean"),
    )
    points = [ProfilePoint(Selector("type", "linear"), "data_in_0", specs, Origin("test", 1, 1))]
    resolved = resolve_profile(points, model)
    table = calibrate(model, batches, resolved, quantile_budget=QuantileBudget(2**26), progress=False)
    return {
        (path, tensor, spec.key(), field): np.asarray(value).tobytes()
        for path, ms in table.items()
        for tensor, stats in ms.values.items()
        for spec, result in stats.items()
        for field, value in result.items()
    }


@needs_kernel
def test_calibration_same_with_and_without_the_library(monkeypatch):
    """Bracketed quantiles (more values than the head, so brackets are placed, narrowed and scanned) give the
    same bits with the compiled scan as with numpy."""
    with_kernel = _mlp_table(monkeypatch, native=True)
    without = _mlp_table(monkeypatch, native=False)
    assert with_kernel == without
    assert any(key[2].startswith("range_quantile") for key in with_kernel)


@needs_kernel
def test_describe_says_how_the_scans_run():
    previous = scan_kernel.use_lanes(4)
    try:
        assert scan_kernel.describe() == "compiled, 4 floats a vector"
        if 8 in WIDTHS:
            scan_kernel.use_lanes(8)
            assert scan_kernel.describe() == "compiled, 8 floats a vector (AVX2)"
        with scan_kernel.numpy_scans():
            assert scan_kernel.describe().startswith("numpy (")
            assert scan_kernel.scan_row(np.ones(8, np.float32), np.float32(0.5)) is None  # numpy scans it
    finally:
        scan_kernel.use_lanes(previous)


# ---------------------------------------------------------------------------------------------------------
# The fixed-order sums and the probe's one pass
# ---------------------------------------------------------------------------------------------------------


def _sequential(values: np.ndarray, absolute: bool) -> float:
    """The fixed order written out in plain Python floats: value i to lane i % SUM_LANES, each lane in order
    from +0, the lanes in order from +0."""
    lane = [0.0] * scan_kernel.SUM_LANES
    for i, v in enumerate(values.tolist()):
        lane[i % len(lane)] += abs(v) if absolute else v
    total = 0.0
    for part in lane:
        total += part
    return total


def _wide(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Values over 17 orders of magnitude, both signs and -0.0: any other order of addition gives other bits."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, shape))).astype(np.float32)
    x[rng.random(shape) < 0.05] = -0.0
    return x


SHAPES = [(1, 0), (1, 1), (3, 31), (2, 32), (4, 33), (1, 1000), (2, 4099), (1, 70_001)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("absolute", [False, True])
def test_lane_sums_in_numpy_follow_the_fixed_order(monkeypatch, shape, absolute):
    monkeypatch.setattr(scan_kernel, "_LIB", None)
    x = _wide(shape, seed=shape[1])
    want = np.array([_sequential(row, absolute) for row in x])
    np.testing.assert_array_equal(lane_sums(x, absolute).view(np.int64), want.view(np.int64))


def test_the_fixed_order_matters_on_these_values():
    """The values above are wide enough that the order of addition shows (else the tests could not fail)."""
    x = _wide((1, 70_001), seed=70_001)[0]
    assert _sequential(x, True) != math.fsum(abs(float(v)) for v in x) or _sequential(x, False) != float(
        np.sum(x.astype(np.float64))
    )


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("absolute", [False, True])
def test_compiled_row_sums_follow_the_fixed_order(lanes, shape, absolute):
    x = _wide(shape, seed=shape[1] + 1)
    sums, lo, hi, bad = scan_kernel.row_sums(x, absolute)
    want = np.array([_sequential(row, absolute) for row in x])
    np.testing.assert_array_equal(sums.view(np.int64), want.view(np.int64))
    if x.size:  # by address and shape (a tensor's memory, no numpy view): the same
        by_address = scan_kernel.row_sums(None, absolute, x.ctypes.data, x.shape)
        np.testing.assert_array_equal(by_address[0].view(np.int64), want.view(np.int64))
        assert by_address[1:] == (lo, hi, bad)
    assert not bad
    if x.size:
        assert (lo, hi) == (float(x.min()), float(x.max()))


@needs_kernel
def test_row_sums_say_when_a_value_is_not_finite(lanes):
    for bad_value in (np.nan, np.inf, -np.inf):
        x = _wide((3, 100), seed=2)
        x[1, 57] = bad_value
        assert scan_kernel.row_sums(x, True)[3]
        assert scan_kernel.row_sums(x[:1].copy(), True)[3] is False
        assert math.isnan(lane_sums(x, True)[1]) or math.isinf(lane_sums(x, True)[1])


@needs_kernel
@pytest.mark.parametrize("which", range(len(BRACKETS)))
@pytest.mark.parametrize("absolute", [False, True])
def test_bracket_scan_with_sums_is_both_scans(lanes, monkeypatch, which, absolute):
    """The scan that also sums gives the bracket scan's counts and values and the row's fixed-order sum, min
    and max, also when it stops and resumes (a scratch buffer smaller than the values kept)."""
    monkeypatch.setattr(scan_kernel, "SCRATCH", 256)
    monkeypatch.setattr(scan_kernel._local, "scratch", None, raising=False)
    x = _adversarial(20_011, seed=which)
    x = np.where(np.isfinite(x), x, np.float32(1.5)).astype(np.float32)
    brackets = BRACKETS[which]
    # by address and size (a tensor's memory, no numpy view): the same (its values copied: views of the buffers
    # the next scan writes)
    by_address = scan_kernel.scan_brackets_with_sums(None, brackets, absolute, x.ctypes.data, x.size)
    by_address = ([(c, m.copy()) for c, m in by_address[0]], by_address[1])
    results, (total, lo, hi, bad) = scan_kernel.scan_brackets_with_sums(x, brackets, absolute)
    assert by_address[1] == (total, lo, hi, bad)
    want = _scan_part(x, brackets)
    for (gc, gm), (ac, am), (wc, wm) in zip(results, by_address[0], want):
        assert gc == ac == wc
        np.testing.assert_array_equal(gm.view(np.uint32), wm.view(np.uint32))
        np.testing.assert_array_equal(am.view(np.uint32), wm.view(np.uint32))
    assert np.float64(total).view(np.int64) == np.float64(_sequential(x, absolute)).view(np.int64)
    assert (lo, hi, bad) == (float(x.min()), float(x.max()), False)
    x[777] = np.nan
    assert scan_kernel.scan_brackets_with_sums(x, brackets, absolute)[1][3]


@pytest.mark.parametrize("native", [True, False])
def test_probe_gives_zero_bounds_as_plus_zero(monkeypatch, native):
    """Which zero is the min or max depends on the order values are met (vector width, numpy or compiled): a
    zero bound is always +0, so every path writes the same bits."""
    if native and not scan_kernel.available():
        pytest.skip("the scan library was not built here")
    if not native:
        monkeypatch.setattr(scan_kernel, "_LIB", None)
    for values in ([-0.0, 0.0, 1.0], [-1.0, 0.0, -0.0], [-0.0] * 40):
        block = Block.prepare(torch.tensor([values]), np.array([0]))
        lo, hi = block.bounds()
        assert math.copysign(1.0, lo) == 1.0 if lo == 0 else True
        assert math.copysign(1.0, hi) == 1.0 if hi == 0 else True
        assert (lo, hi) == (min(values), max(values))


def test_block_of_magnitudes_is_made_only_when_read():
    x = torch.tensor([[-1.0, 2.0, -3.0] * 20])
    block = Block.prepare(x, np.array([0]), absolute=True)
    magnitudes = block.absolute()
    assert magnitudes._x is None and magnitudes.shape == x.shape and magnitudes.numel() == x.numel()
    torch.testing.assert_close(magnitudes.x, x.abs(), rtol=0, atol=0)


def test_abs_mean_is_the_fixed_order_per_batch(monkeypatch):
    """abs_mean = (each batch's fixed-order sum of |x|, added batch after batch) / count, whatever the path:
    the compiled probe, numpy, staged small batches or one large batch at a time."""
    model = torch.nn.Sequential(torch.nn.Linear(300, 8)).eval()
    points = [ProfilePoint(Selector("type", "linear"), "data_in_0", (StatSpec("abs_mean"),), Origin("test", 1, 1))]
    resolved = resolve_profile(points, model)
    for rows in (2, 100):  # 600 values a batch are staged; 30000 are not
        g = torch.Generator().manual_seed(rows)
        batches = [(torch.randn(rows, 300, generator=g) * 10.0 ** torch.randint(-8, 8, (rows, 300), generator=g), None)
                   for _ in range(5)]
        total = 0.0
        for x, _ in batches:
            total += _sequential(x.numpy().reshape(-1), True)
        want = total / sum(x.numel() for x, _ in batches)
        for native in (True, False):
            with monkeypatch.context() as m:
                if not native:
                    m.setattr(scan_kernel, "_LIB", None)
                table = calibrate(model, batches, resolved, progress=False)
            (result,) = table["0"].values["data_in_0"].values()
            assert float(np.asarray(result["abs_mean"]).reshape(-1)[0]) == want


def _count_calls(monkeypatch, name: str) -> list:
    """Replace `scan_kernel.<name>` by itself plus a record of each call (the list returned)."""
    calls: list = []
    real = getattr(scan_kernel, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_kernel, name, counting)
    return calls


@needs_kernel
def test_bracket_scan_on_the_probe_pass_changes_nothing(monkeypatch):
    """A calibration whose bracket scans ride on the probe's pass writes the same bits as one that scans the
    values a second time; and the first really used the shared pass."""
    calls = _count_calls(monkeypatch, "scan_brackets_with_sums")
    shared = _mlp_table(monkeypatch, native=True)
    assert calls
    monkeypatch.setattr(quantile_state.QuantileState, "pending_scan", lambda self: None)
    calls.clear()
    separate = _mlp_table(monkeypatch, native=True)
    assert not calls
    assert shared == separate


def test_block_and_its_magnitudes_hold_no_cycle():
    """A block and its block of |x| must not hold each other: the batch's tensor would stay alive until the
    cyclic garbage collector runs (a calibration's memory grew with the number of batches)."""
    import gc
    import weakref

    enabled = gc.isenabled()
    gc.disable()
    try:
        x = torch.randn(1, 4096)
        alive = weakref.ref(x)
        block = Block.prepare(x, np.array([0]), absolute=True)
        block.absolute()
        del block, x
        assert alive() is None
    finally:
        if enabled:
            gc.enable()


@needs_kernel
@pytest.mark.parametrize("absolute", [False, True])
def test_band_scan_with_sums_is_both_scans(lanes, monkeypatch, absolute):
    """The α band's scan of |x| made in the probe's pass: the band scan's count, sum, max and kept values over
    |x|, and the raw values' fixed-order sum, min and max, also when it stops and resumes."""
    monkeypatch.setattr(scan_kernel, "SCRATCH", 128)
    monkeypatch.setattr(scan_kernel._local, "scratch", None, raising=False)
    x = np.random.default_rng(11).standard_normal(30_007).astype(np.float32)  # both signs, |x| around 1
    x[::17] = -0.0
    cut, lo = np.float32(1.5), np.float32(0.5)
    by_address = scan_kernel.scan_band_with_sums(None, cut, lo, absolute, x.ctypes.data, x.size)
    by_address = (by_address[0][:3], by_address[0][3].copy(), by_address[1])
    (count, total, top, between), (sum_all, mn, mx, bad) = scan_kernel.scan_band_with_sums(x, cut, lo, absolute)
    assert by_address[0] == (count, total, top) and by_address[2] == (sum_all, mn, mx, bad)
    np.testing.assert_array_equal(by_address[1].view(np.uint32), between.view(np.uint32))
    want = _scan_piece(np.abs(x), cut, lo)
    assert between.size > 10 * 128
    assert (count, top) == (want[0], want[2])
    assert total == want[1]  # exact here: every order gives these bits
    np.testing.assert_array_equal(between.view(np.uint32), want[3].view(np.uint32))
    assert np.float64(sum_all).view(np.int64) == np.float64(_sequential(x, absolute)).view(np.int64)
    assert (mn, mx, bad) == (float(x.min()), float(x.max()), False)
    x[5] = np.inf
    assert scan_kernel.scan_band_with_sums(x, cut, lo, absolute)[1][3]


@needs_kernel
def test_band_scan_on_the_probe_pass_changes_nothing(monkeypatch):
    """A pending α whose band is scanned in the probe's pass gives the bits of one scanned on its own; and the
    probe's pass was really used. (Batch passes off: they take these batches otherwise, `test_batch_pass`; the
    probe's band scan is the way where no batch pass can be made, e.g. next to a variance.)"""
    from ternqc.runtime.calibrate.stats import batch_pass
    from ternqc.runtime.calibrate.stats.feeder import TensorStats
    from ternqc.runtime.calibrate.stats.threshold_state import ThresholdAbsMeanState

    monkeypatch.setattr(batch_pass.BatchPass, "build", classmethod(lambda cls, *a: None))

    spec = StatSpec("threshold_abs_mean")
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(64, 3000, generator=g) for _ in range(6)]
    delta = 0.7 * float(torch.cat([x.abs().reshape(-1) for x in xs]).mean())

    def finished():
        ts = TensorStats([spec, StatSpec("abs_mean")], band=(0.9 * delta, 1.1 * delta),
                         quantile_budget=QuantileBudget(4 * 2**20), plan_hint=len(xs), size_hint=len(xs))
        for i, x in enumerate(xs):
            ts.update(x, i)
        state = ts.states[spec]
        assert state.can_finish(delta)
        state.set_threshold(delta)
        return {k: np.asarray(v).tobytes() for s, r in ts.results().items() for k, v in r.items()}

    calls = _count_calls(monkeypatch, "scan_band_with_sums")
    shared = finished()
    assert len(calls) == len(xs) - 1  # every batch after the first, which places the band
    monkeypatch.setattr(ThresholdAbsMeanState, "pending_band", lambda self: None)
    calls.clear()
    separate = finished()
    assert not calls
    assert shared == separate


def _selection_case(kind: str, size: int) -> np.ndarray:
    """`size` float32 values of one of the selection tests' kinds (see `test_select_equals_the_sorted_values`);
    the sampling stride is the first round's over `size` values."""
    rng = np.random.default_rng(size)
    want = min(2048, max(32, size // 8))  # the first round samples every p-th value, p prime >= size / want
    primes = (c for c in range(max(2, size // want), 2 * size + 3) if all(c % d for d in range(2, int(c**0.5) + 1)))
    p = 1 if size // want <= 1 else next(primes)
    if kind.startswith("sample_"):
        x = rng.standard_normal(size).astype(np.float32)
        x[::p] = 1000.0 if kind == "sample_high" else -1000.0
    elif kind.startswith("hidden_atom"):
        x = rng.standard_normal(size).astype(np.float32)
        sample = np.sort(x[::p][:want])
        s, k = sample.size, size // 2  # the bracket of the median, as the first round places it
        n1 = max(1, size - 1)
        d = int(1.5 * np.sqrt(s)) + 4
        at = (int(np.floor(k / n1 * (s - 1))) - d if kind.endswith("lo")
              else int(np.ceil(k / n1 * (s - 1))) + d)
        unsampled = np.ones(size, bool)
        unsampled[::p][:want] = False
        if 0 <= at < s and unsampled.sum() > size // 2:
            where = np.flatnonzero(unsampled & (rng.random(size) < 0.35))
            x[where] = sample[at]  # 35 % of the values, never in the sample
    elif kind == "adversarial":
        x = _adversarial(size, size)
    elif kind == "atoms":
        x = rng.integers(-2, 3, size).astype(np.float32) / 4
    elif kind == "descending":
        x = np.sort(rng.standard_normal(size).astype(np.float32))[::-1].copy()
    else:
        x = rng.standard_normal(size).astype(np.float32)
        x[rng.random(size) < 0.9] = np.nan
    return x


@needs_kernel
@pytest.mark.parametrize("size", [1, 48, 49, 777, 5000, 70_001])
@pytest.mark.parametrize(
    "kind",
    ["adversarial", "atoms", "descending", "mostly_nan", "sample_high", "sample_low", "hidden_atom_lo", "hidden_atom_hi"],
)
def test_select_equals_the_sorted_values(lanes, size, kind):
    """`scan_kernel.select` against np.sort (NaN last) at every width: NaN left out, ±Inf and signed zeros
    ranked, a few values repeated thousands of times, values in descending order, nine in ten values NaN, and
    a misleading sample (every value at the first round's sampling stride far above or below the rest, so the
    ranks fall outside its bracket), and an atom the sample sees once at a bracket end while the median falls
    in it (its count beyond the atom comes from a pass of its own); single ranks, neighbours, both ends, and
    more ranks than one call takes."""
    x = _selection_case(kind, size)
    rng = np.random.default_rng(size)
    finite = int(np.count_nonzero(~np.isnan(x)))
    if finite == 0:
        return
    want = np.sort(x)
    before = x.copy()
    rank_sets = [[finite // 2], [max(0, finite // 2 - 1), finite // 2], [0, finite - 1],
                 sorted({int(k) for k in rng.integers(0, finite, 100)})]
    for ranks in rank_sets:
        got = scan_kernel.select(x, ranks, finite)
        assert got is not None and set(got) == set(ranks)
        for k in ranks:
            assert got[k] == want[k] or (np.isnan(got[k]) and np.isnan(want[k])), (k, got[k], want[k])
    assert np.array_equal(x, before, equal_nan=True)  # only read


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 300), (3, 5000), (64, 777), (7, 10_001)])
@pytest.mark.parametrize(
    "kind", ["normal", "adversarial", "atoms", "descending", "sample_high", "sample_low", "hidden_atom_lo",
             "hidden_atom_hi", "relu"],
)
@pytest.mark.parametrize("absolute", [False, True])
def test_row_sums_select_equals_the_sums_and_the_sorted_values(lanes, shape, kind, absolute):
    """`scan_kernel.row_sums_select`: the per-row sums in the fixed order (`_sequential`, bit for bit), the min
    and max, and the values at the ranks as np.sort orders them, every width; the selection's cases as
    `select` meets them (atoms at a bracket end, seen by the sample or hidden from it, a misleading sample,
    ranks far apart, too few values to sample); a NaN or an infinity: the sums are flagged and nothing is
    selected."""
    k, n = shape
    normal = np.random.default_rng(n).standard_normal(k * n)
    x = (np.maximum(normal, 0) if kind == "relu" else normal if kind == "normal" else _selection_case(kind, k * n))
    x = x.astype(np.float32).reshape(k, n)
    if kind == "adversarial":  # its NaN and infinities: flagged
        got = scan_kernel.row_sums_select(absolute, x.ctypes.data, shape, [x.size // 2])
        assert got is not None and got[3] and got[4] is None
        x = np.where(np.isfinite(x), x, np.float32(1.5))
    want_sorted = np.sort(x.ravel())
    want_sums = np.array([_sequential(row, absolute) for row in x])
    total = x.size
    for ranks in ([total // 2], [(total - 1) // 2, total - (total - 1) // 2 - 1], [0, total - 1],
                  [total // 100, total // 100 + 1], [total - 1]):
        ranks = sorted(set(ranks))
        before = x.copy()
        got = scan_kernel.row_sums_select(absolute, x.ctypes.data, shape, ranks)
        assert got is not None
        sums, lo, hi, bad, found = got
        assert not bad
        np.testing.assert_array_equal(sums.view(np.int64), want_sums.view(np.int64))
        assert (lo, hi) == (float(x.min()), float(x.max()))
        assert found == {r: want_sorted[r] for r in ranks}, (ranks, found)
        assert np.array_equal(x, before)  # only read
