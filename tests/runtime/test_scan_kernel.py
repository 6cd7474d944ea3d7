"""The compiled one-pass scans (`runtime/calibrate/native/scan.c` through `scan_kernel.py`) against the numpy
scans they stand in for, at every vector width this CPU runs (AVX-512, AVX2, baseline), on adversarial values:
NaN, ±Inf, -0.0, values exactly on the edges, atoms, tails shorter than a vector, more kept values than the
scratch buffer holds. Counts and kept values must be identical (the same values in the same order); the float64
sum of the values above a cut wherever it is exact (the only place it is used). End to end, a calibration with
the library and one without write the same statistics."""

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
