"""Statistic states against numpy on the same tensors, for every statistic, dims all / none / per-channel
(negative dims too), abs on and off, activations (batch first) and parameters; merge, serialisation, NaN/Inf.

The numpy reference implements the dims rule on its own: activations reduce axis 0 plus the listed dims,
"none" reduces only the batch (activations) or nothing (parameters), "all" gives a scalar, and reduced
non-batch dims are kept with size 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.stats.feeder import TensorStats
from ternqc.runtime.calibrate.stats.states import from_tensors, make_state
from ternqc.runtime.errors import UserError

EPS32 = float(np.finfo(np.float32).eps)


def spec(name, dims="all", abs=False, **options):
    return StatSpec(name, dims=dims, abs=abs, options=tuple(options.items()))


# --- the reference ---------------------------------------------------------------------------------------


def ref_axes(ndim, dims, batched):
    if dims == "all":
        return tuple(range(ndim))
    if dims == "none":
        return (0,) if batched else ()
    axes = {d % ndim for d in dims}
    if batched:
        axes.add(0)
    return tuple(sorted(axes))


def ref_shape(x, dims, batched):
    """The expected result shape, or None for a scalar."""
    if dims == "all":
        return None
    axes = ref_axes(x.ndim, dims, batched)
    shape = [1 if d in axes else x.shape[d] for d in range(x.ndim)]
    return tuple(shape[1:] if batched else shape)


def ref_finish(values, x, dims, batched):
    """Reduce-with-keepdims output -> the expected result (float or array of the result shape)."""
    shape = ref_shape(x, dims, batched)
    values = np.asarray(values)
    return float(values.reshape(())) if shape is None else values.reshape(shape)


def reference(name, x32, dims, batched, abs_, **options):
    """Numpy over float64 copies of the same float32 values (min/max in float32 to compare exactly)."""
    x32 = np.abs(x32) if abs_ or name == "abs_mean" else x32
    x = x32.astype(np.float64)
    axes = ref_axes(x.ndim, dims, batched)
    fin = lambda v: ref_finish(v, x, dims, batched)
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    if name == "range_min_max":
        lo = np.min(x32, axis=axes, keepdims=True)
        hi = np.max(x32, axis=axes, keepdims=True)
        return {"min": fin(lo), "max": fin(hi), "range": fin(hi - lo), "count": x.size}
    if name == "range_quantile":
        q = options["quantile"]
        lo = np.quantile(x, 1 - q, axis=axes, keepdims=True) if axes else x
        hi = np.quantile(x, q, axis=axes, keepdims=True) if axes else x
        return {"min": fin(lo), "max": fin(hi), "range": fin(hi - lo), "count": x.size}
    mean = np.mean(x, axis=axes, keepdims=True) if axes else x
    var = np.var(x, axis=axes, keepdims=True, ddof=1) if axes and n > 1 else np.full_like(mean, np.nan)
    if name in ("variance_precise", "variance_online"):
        return {"mean": fin(mean), "variance": fin(var), "count": x.size}
    if name == "range_n_sigma":
        k = options.get("num_sigma", 3.0)
        lo, hi = mean - k * np.sqrt(var), mean + k * np.sqrt(var)
        return {"min": fin(lo), "max": fin(hi), "range": fin(hi - lo), "count": x.size}
    if name == "abs_mean":
        return {"abs_mean": fin(mean), "count": x.size}
    raise AssertionError(name)


def check(name, got, want, x32):
    """Compare a result with the reference at the tolerance the acceptance asks for."""
    assert got["count"] == want["count"]
    assert set(got) == set(want)
    scale = float(np.max(np.abs(x32)))
    for field, expected in want.items():
        if field == "count":
            continue
        value = np.asarray(got[field], dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        assert value.shape == expected.shape, (field, value.shape, expected.shape)
        if name == "range_min_max":
            np.testing.assert_array_equal(value, expected, err_msg=field)  # exact, float32 range as MASE
        elif name == "range_quantile":
            np.testing.assert_allclose(value, expected, rtol=0, atol=4 * EPS32 * scale, err_msg=field)
        else:
            # 1e-6 relative; a mean near 0 is only as exact as float32 sums allow: ~1e-7 of the data's scale
            np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7 * scale, err_msg=field)


# --- data ------------------------------------------------------------------------------------------------


def batches(shape, count=3, seed=0):
    """Activation batches with a non-zero mean, of varying batch sizes (the batch dim is always reduced)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        b = shape[0] + 3 * i
        out.append(torch.randn((b, *shape[1:]), generator=g) * (1.5 + i) + 0.7)
    return out


STAT_CASES = [
    ("range_min_max", {}),
    ("range_quantile", {"quantile": 0.975}),
    ("range_quantile", {"quantile": 0.5}),
    ("variance_precise", {}),
    ("variance_online", {}),
    ("range_n_sigma", {"num_sigma": 3.0}),
    ("abs_mean", {}),
]
ACT_DIMS = ["all", "none", (1,), (2, 3), (-1,), (0, 2)]
WEIGHT_DIMS = ["all", "none", (1,), (1, 2, 3), (-3, -2, -1), (0,)]


@pytest.mark.parametrize("name,options", STAT_CASES)
@pytest.mark.parametrize("dims", ACT_DIMS)
@pytest.mark.parametrize("abs_", [False, True])
def test_activation_statistics_equal_numpy(name, options, dims, abs_):
    xs = batches((8, 3, 5, 4))
    state = make_state(spec(name, dims, abs_, **options))
    for x in xs:
        state.update(x)
    x32 = torch.cat(xs).numpy()
    check(name, state.result(), reference(name, x32, dims, True, abs_, **options), x32)


@pytest.mark.parametrize("name,options", STAT_CASES)
@pytest.mark.parametrize("dims", WEIGHT_DIMS)
@pytest.mark.parametrize("abs_", [False, True])
def test_weight_statistics_equal_numpy(name, options, dims, abs_):
    w = batches((6, 4, 3, 3), count=1, seed=1)[0]
    state = make_state(spec(name, dims, abs_, **options), batched=False)
    state.update(w)
    x32 = w.numpy()
    check(name, state.result(), reference(name, x32, dims, False, abs_, **options), x32)


@pytest.mark.parametrize("dims", ["all", "none", (1,), (0,)])
def test_weight_matrix_per_row_shape(dims):
    w = torch.randn(5, 7)
    r = make_state(spec("range_min_max", dims), batched=False)
    r.update(w)
    got = r.result()
    want = {"all": None, "none": (5, 7), (1,): (5, 1), (0,): (1, 7)}[dims]
    assert (np.shape(got["max"]) if want else None) == want
    if dims == (1,):
        assert got["max"] == w.amax(1, keepdim=True).tolist()  # broadcasts against the weight


def test_result_shapes_follow_the_lead_examples():
    """weight [out,in] dims [1] -> [out,1]; conv2d input dims [2,3] -> [C,1,1]; linear input none -> [100]."""
    cases = [
        (torch.randn(10, 4), (1,), False, [10, 1]),
        (torch.randn(8, 3, 6, 6), (2, 3), True, [3, 1, 1]),
        (torch.randn(8, 100), "none", True, [100]),
    ]
    for x, dims, batched, shape in cases:
        state = make_state(spec("abs_mean", dims), batched=batched)
        state.update(x)
        assert list(np.shape(state.result()["abs_mean"])) == shape


def test_empty_batches_change_nothing():
    for name, options in STAT_CASES:
        state = make_state(spec(name, (1,), **options))
        state.update(torch.ones(0, 3))
        state.update(torch.full((2, 3), 2.0))
        assert state.result()["count"] == 6


def test_count_is_elements_seen():
    state = make_state(spec("range_min_max"))
    state.update(torch.randn(128, 4))
    assert state.result()["count"] == 512


def test_results_are_python_values():
    state = make_state(spec("variance_precise"))
    state.update(torch.randn(16, 4))
    r = state.result()
    assert type(r["mean"]) is float and type(r["variance"]) is float and type(r["count"]) is int
    state = make_state(spec("range_min_max", (1,)))
    state.update(torch.randn(16, 4, 2))
    r = state.result()
    assert isinstance(r["min"], list) and all(isinstance(v, float) for row in r["min"] for v in row)


def test_variance_online_equals_precise():
    xs = batches((16, 10), count=5)
    results = []
    for name in ("variance_precise", "variance_online"):
        state = make_state(spec(name, (1,)))
        for x in xs:
            state.update(x)
        results.append(state.result())
    assert results[0] == results[1]


def test_many_batches_fold_and_stay_exact():
    """More batches than the fold interval: sums are folded in float64, min/max stay exact."""
    xs = [torch.randn(4, 3) * 10 + 100 for _ in range(150)]
    x32 = torch.cat(xs).numpy()
    for name, options in STAT_CASES:
        state = make_state(spec(name, "none", **options))
        for x in xs:
            state.update(x)
        check(name, state.result(), reference(name, x32, "none", True, False, **options), x32)


def test_variance_is_accurate_with_a_large_mean():
    """A mean 1e3 times the std: per-batch centring keeps the variance at 1e-6 relative."""
    xs = [torch.randn(256, 64) + 1000.0 for _ in range(8)]
    state = make_state(spec("variance_precise"))
    for x in xs:
        state.update(x)
    x64 = torch.cat(xs).double().numpy()
    np.testing.assert_allclose(state.result()["variance"], np.var(x64, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(state.result()["mean"], np.mean(x64), rtol=1e-6)


# --- merge and serialisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", STAT_CASES + [("threshold_abs_mean", {})])
@pytest.mark.parametrize("dims", ["all", "none", (2, 3)])
def test_merge_equals_updating_one_state(name, options, dims):
    xs = batches((8, 3, 5, 4), count=4)
    threshold = 1.0 if name == "threshold_abs_mean" else None
    s = spec(name, dims, **options)
    one = make_state(s, threshold=threshold)
    a = make_state(s, threshold=threshold)
    b = make_state(s, threshold=threshold)
    for i, x in enumerate(xs):
        one.update(x)
        (a if i < 2 else b).update(x)
    a.merge(b)
    got, want = a.result(), one.result()
    assert got.keys() == want.keys()
    for field in want:
        np.testing.assert_allclose(np.asarray(got[field]), np.asarray(want[field]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name,options", STAT_CASES + [("threshold_abs_mean", {})])
def test_to_tensors_round_trip_and_merge(name, options):
    xs = batches((8, 3, 5, 4), count=2)
    threshold = 0.5 if name == "threshold_abs_mean" else None
    s = spec(name, (2, 3), **options)
    a, b, both = (make_state(s, threshold=threshold) for _ in range(3))
    a.update(xs[0])
    b.update(xs[1])
    both.update(xs[0])
    both.update(xs[1])
    tensors = a.to_tensors()
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    rebuilt = from_tensors(s, tensors, threshold=threshold)
    assert rebuilt.result() == a.result()
    rebuilt.merge(from_tensors(s, b.to_tensors(), threshold=threshold))
    for field, want in both.result().items():
        np.testing.assert_allclose(np.asarray(rebuilt.result()[field]), np.asarray(want), rtol=1e-12)


def test_empty_state_serialises():
    s = spec("range_min_max")
    state = from_tensors(s, make_state(s).to_tensors())
    state.update(torch.ones(2, 2))
    assert state.result()["max"] == 1.0


# --- threshold_abs_mean -----------------------------------------------------------------------------------


def test_threshold_abs_mean_scalar_threshold():
    xs = batches((16, 10), count=3)
    state = make_state(spec("threshold_abs_mean"), threshold=1.2)
    for x in xs:
        state.update(x)
    a = np.abs(torch.cat(xs).double().numpy())
    sel = a > np.float32(1.2)
    r = state.result()
    assert r["count"] == int(sel.sum())
    np.testing.assert_allclose(r["abs_mean"], a[sel].mean(), rtol=1e-6)


def test_threshold_abs_mean_per_channel_threshold():
    """A per-channel Δ (shape [C,1,1], as a per-channel statistic gives) with per-channel results."""
    xs = batches((8, 3, 5, 4), count=2)
    delta = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1)
    state = make_state(spec("threshold_abs_mean", (2, 3)), threshold=delta)
    for x in xs:
        state.update(x)
    a = np.abs(torch.cat(xs).double().numpy())
    sel = a > delta.double().numpy()
    want = [[[a[:, c][sel[:, c]].mean()]] for c in range(3)]
    r = state.result()
    np.testing.assert_allclose(r["abs_mean"], want, rtol=1e-6)
    assert r["count"] == int(sel.sum())


# --- NaN and Inf ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", STAT_CASES)
@pytest.mark.parametrize("dims", ["all", (2, 3)])
def test_nonfinite_values_are_left_out_and_counted(name, options, dims):
    xs = batches((8, 3, 5, 4), count=2)
    xs[0][0, 0, 0, 0] = float("nan")
    xs[0][1, 2, 1, 1] = float("inf")
    xs[1][3, 1, 4, 3] = -float("inf")
    state = make_state(spec(name, dims, **options))
    for x in xs:
        state.update(x)
    r = state.result()
    assert r.pop("nonfinite") == 3
    x64 = torch.cat(xs).double().numpy()
    finite = np.isfinite(x64)
    # per position (channel) reference over finite values only
    groups = [x64[finite]] if dims == "all" else [x64[:, c][finite[:, c]] for c in range(3)]
    want = []
    for g in groups:
        want.append(reference(name, g.astype(np.float32).reshape(-1, 1), "all", True, False, **options))
    assert r["count"] == sum(w["count"] for w in want)
    for field in r:
        if field == "count":
            continue
        expected = [w[field] for w in want]
        expected = expected[0] if dims == "all" else np.reshape(expected, (3, 1, 1))
        np.testing.assert_allclose(np.asarray(r[field]), expected, rtol=1e-6, atol=1e-6)


def test_tensor_stats_counts_nonfinite_once_and_feeds_abs():
    x = torch.randn(32, 6)
    x[0, 0] = float("nan")
    x[5, 2] = float("inf")
    ts = TensorStats([spec("range_min_max"), spec("range_min_max", abs=True), spec("abs_mean")])
    ts.update(x)
    assert ts.nonfinite == 2
    res = ts.results()
    a = np.abs(x.numpy())
    a = a[np.isfinite(a)]
    assert res[spec("range_min_max", abs=True)]["min"] == float(a.min())
    np.testing.assert_allclose(res[spec("abs_mean")]["abs_mean"], a.astype(np.float64).mean(), rtol=1e-6)
    assert all(r["nonfinite"] == 2 for r in res.values())


def test_no_nonfinite_field_when_all_finite():
    state = make_state(spec("abs_mean"))
    state.update(torch.randn(4, 4))
    assert "nonfinite" not in state.result() and "exact" not in state.result()


def test_position_without_finite_values_is_nan():
    x = torch.randn(4, 3)
    x[:, 1] = float("nan")
    for name, options in STAT_CASES:
        state = make_state(spec(name, "none", **options))
        state.update(x)
        r = state.result()
        for field, value in r.items():
            if isinstance(value, list):
                assert math.isnan(value[1]), (name, field)
                assert not math.isnan(value[0]), (name, field)


# --- user errors ------------------------------------------------------------------------------------------


def test_dims_out_of_range_is_a_user_error():
    state = make_state(spec("range_min_max", (4,)))
    with pytest.raises(UserError, match=r"dims=\[4\].*shape \[2, 3\]"):
        state.update(torch.randn(2, 3))


def test_per_channel_shape_change_is_a_user_error():
    state = make_state(spec("range_min_max", "none"))
    state.update(torch.randn(2, 3))
    with pytest.raises(UserError, match="same per-sample shape"):
        state.update(torch.randn(2, 4))


def test_dims_all_accepts_changing_shapes():
    state = make_state(spec("range_quantile", quantile=0.5))
    a, b = torch.randn(2, 3), torch.randn(5, 7, 2)
    state.update(a)
    state.update(b)
    values = np.concatenate([a.numpy().ravel(), b.numpy().ravel()]).astype(np.float64)
    np.testing.assert_allclose(state.result()["max"], np.quantile(values, 0.5), atol=4 * EPS32 * 4)


# --- bits that do not depend on threads or on how batches are grouped -------------------------------------


def test_fixed_order_sum_is_the_same_for_any_thread_count():
    from ternqc.runtime.calibrate.stats.sums import fixed_order_sum

    x = torch.randn(300, 301, generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sums = [fixed_order_sum(x), fixed_order_sum(x, (0, 1), keepdim=True), fixed_order_sum(x, [1])]
            got.append(sums)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for other in got[1:] for a, b in zip(got[0], other))
    np.testing.assert_allclose(float(got[0][0]), x.double().sum().item(), rtol=1e-6)
    assert got[0][1].shape == (1, 1) and torch.equal(got[0][2], x.sum(1))


@pytest.mark.parametrize("dims", ["all", "none", (2, 3)])
def test_staged_batches_give_the_bits_of_batches_fed_one_by_one(dims):
    """`TensorStats` stages small batches and processes them 64 at a time; each state fed alone processes
    one batch at a time. Both must give the same bits (the results may not depend on the grouping)."""
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(8, 3, 5, 4, generator=g) * 2 + 0.5 for _ in range(70)]  # one shape: staged 64 at a time
    xs += [torch.randn(5, 3, 5, 4, generator=g) for _ in range(3)]
    specs = [spec(n, dims, **o) for n, o in STAT_CASES]
    ts = TensorStats(specs)
    singles = {s: make_state(s) for s in specs}
    for x in xs:
        ts.update(x)
        for state in singles.values():
            state.update(x)
    staged = ts.results()
    for s, state in singles.items():
        alone = state.result()
        assert staged[s].keys() == alone.keys()
        for field, value in alone.items():
            np.testing.assert_array_equal(np.asarray(staged[s][field]), np.asarray(value), err_msg=s.key())


@pytest.mark.parametrize("dims", ["all", "none"])
def test_staged_batches_copied_either_way_give_the_same_bits(dims):
    """Batches staged by index (the hook's path): contiguous ones go in by a memmove, others (a transposed view,
    a tensor subclass) by `copy_`; the results equal states fed one batch at a time."""
    g = torch.Generator().manual_seed(11)
    base = [torch.randn(8, 4, 5, generator=g) * 3 - 1 for _ in range(40)]
    fed = []
    for i, x in enumerate(base):
        if i % 3 == 1:
            fed.append(x.transpose(1, 2).contiguous().transpose(1, 2))  # the same values, not contiguous
        elif i % 3 == 2:
            fed.append(torch.nn.Parameter(x.clone(), requires_grad=False))  # a subclass
        else:
            fed.append(x)
    assert not fed[1].is_contiguous()
    specs = [spec(n, dims, **o) for n, o in STAT_CASES]
    ts = TensorStats(specs, size_hint=40)
    singles = {s: make_state(s) for s in specs}
    for i, x in enumerate(fed):
        ts.update(x, batch=i)
        for state in singles.values():
            state.update(base[i])
    staged = ts.results()
    for s, state in singles.items():
        for field, value in state.result().items():
            np.testing.assert_array_equal(np.asarray(staged[s][field]), np.asarray(value), err_msg=s.key())


@pytest.mark.parametrize(
    "batches, hint, handed",
    [(20, 20, True), (30, 10, True), (70, 70, False), (20, None, False)],
)
def test_staging_buffer_handed_to_the_exact_quantile_gives_torch_quantile(monkeypatch, batches, hint, handed):
    """A quantile that keeps every value may keep the full staging buffer instead of copying it
    (`ExactValues.adopt`): its quantiles equal torch.quantile over every value, bit for bit the results without
    the handover, and the budget holds the same bytes. Cases: the stage is every batch (the hint); more
    batches than hinted (the first stage handed over, the rest copied after it into a renewed stage); a
    stage smaller than the room reserved (64 of 70 batches: not handed over, it would grow by a copy); no
    hint (a 64-batch stage for 20 batches: not handed over, it would hold more bytes than the values)."""
    from ternqc.runtime.calibrate.quantiles import ExactValues, QuantileBudget

    g = torch.Generator().manual_seed(11)
    xs = [torch.relu(torch.randn(16, 40, generator=g)) for _ in range(batches)]  # an atom at 0, like a ReLU's
    # q·(n-1) exact in float32 for both quantiles: torch.quantile's rank is then the same (`quantiles.rank_of`)
    specs = [spec("range_quantile", quantile=0.5), spec("range_quantile", quantile=0.75), spec("abs_mean")]
    adopted = []
    adopt = ExactValues.adopt

    def counting(self, buffer, m):
        took = adopt(self, buffer, m)
        adopted.append(took)
        return took

    def run(handover: bool):
        monkeypatch.setattr(ExactValues, "adopt", counting if handover else (lambda self, buffer, m: False))
        budget = QuantileBudget()
        ts = TensorStats(specs, quantile_budget=budget, size_hint=hint, plan_hint=hint)
        for x in xs:
            ts.update(x)
        results = ts.results()
        peak = budget.peak
        ts.freeze()
        return results, peak, budget.used

    with_handover, peak, used = run(True)
    without, peak_without, _ = run(False)
    assert any(adopted) == handed
    assert used == 0
    if hint is None or hint >= batches:  # every value fits the first room: the same bytes either way
        assert peak == peak_without
    every = torch.cat([x.reshape(-1) for x in xs])
    for s in specs[:2]:
        q = s.option("quantile")
        assert float(with_handover[s]["max"]) == float(torch.quantile(every, q))
        assert float(with_handover[s]["min"]) == float(torch.quantile(every, 1.0 - q))
    for s in specs:
        for field, value in without[s].items():
            np.testing.assert_array_equal(np.asarray(with_handover[s][field]), np.asarray(value), err_msg=s.key())


def _record_probe_selections(monkeypatch) -> list[bool]:
    """Wrap `scan_kernel.row_sums_select`; the list returned gets, per call, whether it selected values."""
    from ternqc.runtime.calibrate import scan_kernel

    answered: list[bool] = []
    real = scan_kernel.row_sums_select

    def recording(*args):
        got = real(*args)
        answered.append(got is not None and got[4] is not None)
        return got

    monkeypatch.setattr(scan_kernel, "row_sums_select", recording)
    return answered


@pytest.mark.parametrize(
    "batches, hint, nan, fused",
    [(20, 20, False, True), (30, 20, False, True), (20, 20, True, False), (20, None, False, False)],
)
def test_quantile_selected_by_the_probe_pass_equals_torch_quantile(monkeypatch, batches, hint, nan, fused):
    """A quantile that keeps a whole block (every planned batch, in one process) has its ranks selected by the
    block's probe, in the pass that reads the values for the sums (`QuantileState.pending_select`,
    `scan_kernel.row_sums_select`): torch.quantile over every value, bit for bit the results of the separate
    selection, for every statistic of the tensor. Cases: the planned batches; more batches than planned (the
    probe's answer is dropped when the next batches come); a NaN among the values (the probe selects nothing:
    the ranks count other values); no plan (nothing asked of the probe). A second quantile of the same tensor
    selects on its own."""
    from ternqc.runtime.calibrate import scan_kernel
    from ternqc.runtime.calibrate.stats.base import StatState
    from ternqc.runtime.calibrate.stats.quantile_state import QuantileState

    if not scan_kernel.available():
        pytest.skip("the scan library was not built here")
    g = torch.Generator().manual_seed(13)
    xs = [torch.relu(torch.randn(16, 40, generator=g)) for _ in range(batches)]
    if nan:
        xs[3][2, 5] = float("nan")
    specs = [spec("range_quantile", quantile=0.5), spec("range_quantile", quantile=0.75), spec("abs_mean"),
             spec("range_min_max")]
    answered = _record_probe_selections(monkeypatch)

    def run():
        ts = TensorStats(specs, size_hint=hint, plan_hint=hint)
        for x in xs:
            ts.update(x)
        return ts.results()

    probed = run()
    assert any(answered) == fused
    monkeypatch.setattr(QuantileState, "pending_select", StatState.pending_select)
    answered.clear()
    separate = run()
    assert not answered
    assert probed == separate
    every = torch.cat([x.reshape(-1) for x in xs])
    every = every[~every.isnan()]
    for s in specs[:2]:
        q = s.option("quantile")
        assert probed[s]["max"] == float(torch.quantile(every, q))
        assert probed[s]["min"] == float(torch.quantile(every, 1.0 - q))


@pytest.mark.parametrize("numel", [7, 48, 49, 500, 12800])
@pytest.mark.parametrize("calls", [1, 2, 3])
def test_one_planned_batch_is_answered_by_its_probe_and_more_calls_go_the_general_way(monkeypatch, numel, calls):
    """A one-batch calibration as `calibrate` makes it (one process, one update planned, bracketing): the block's
    probe selects the quantiles' ranks at any size, and the values are kept only in a copy, in the budget as an
    exact buffer of them would be, given back on `freeze`. A module called more often than planned sends the
    kept values the general way first: every result equals torch.quantile over every value, and bit for bit
    the results with the probe's selection turned off."""
    from ternqc.runtime.calibrate import scan_kernel
    from ternqc.runtime.calibrate.quantiles import QuantileBudget
    from ternqc.runtime.calibrate.stats.base import StatState
    from ternqc.runtime.calibrate.stats.quantile_state import QuantileState

    g = torch.Generator().manual_seed(numel)
    xs = [torch.randn(1, numel, generator=g) for _ in range(calls)]
    specs = [spec("range_quantile", quantile=0.5), spec("range_quantile", quantile=0.75), spec("abs_mean"),
             spec("range_min_max")]
    answered = _record_probe_selections(monkeypatch)

    def run():
        budget = QuantileBudget()
        ts = TensorStats(specs, quantile_budget=budget, size_hint=1, plan_hint=1, bracket=True)
        held = []
        for x in xs:
            ts.update(x, 0)  # calls of one batch
            held.append(budget.used)
        ts.freeze()
        return ts.results(), held, budget.used

    probed, held, after = run()
    assert any(answered) == scan_kernel.available()
    monkeypatch.setattr(QuantileState, "pending_select", StatState.pending_select)
    answered.clear()
    separate, held_separate, after_separate = run()
    assert not any(answered)
    assert probed == separate
    assert held[0] == held_separate[0] == 2 * 4 * numel  # two quantiles, each the values of the batch
    assert after == after_separate == 0
    every = torch.cat([x.reshape(-1) for x in xs])
    for s in specs[:2]:
        q = s.option("quantile")
        assert probed[s]["max"] == float(torch.quantile(every, q))
        assert probed[s]["min"] == float(torch.quantile(every, 1.0 - q))
    assert probed[specs[3]]["min"] == float(every.min()) and probed[specs[3]]["max"] == float(every.max())


@pytest.mark.parametrize("view", [False, True])
def test_one_planned_batch_keeps_its_values_safe_from_later_changes(view):
    """The one batch's values are kept by reference only when its tensor is its own memory: a view into a
    larger tensor is copied (the larger one is not held), so changing that tensor later changes nothing; a
    tensor of its own changed in place is noticed (its version), and the quantile is left for the caller to
    collect again (`missed`), never answered from changed values."""
    from ternqc.runtime.calibrate.quantiles import QuantileBudget

    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 5000, generator=g)
    first = big[:1] if view else big[:1].clone()
    original = first.clone()
    second = torch.randn(1, 5000, generator=g)
    median = spec("range_quantile", quantile=0.5)
    ts = TensorStats([median], quantile_budget=QuantileBudget(), size_hint=1, plan_hint=1, bracket=True)
    ts.update(first, 0)
    first.mul_(3.0)  # after the call, before the next (of the big tensor too, for the view)
    ts.update(second, 0)
    if view:
        every = torch.cat([original.reshape(-1), second.reshape(-1)])
        assert ts.results()[median]["max"] == float(torch.quantile(every, 0.5))
    else:
        assert ts.missed() == [median] and median not in ts.results()


@pytest.mark.parametrize("shape", [(10, 4), (300, 200)])
def test_parameter_read_once_takes_its_quantiles_from_its_values(monkeypatch, shape):
    """A parameter (not batched, one update expected: `size_hint=1`) gets its quantiles straight from its
    values, without a buffer: the same as torch.quantile over them (median and 0.75: ranks exact in
    float32), the same bits as the buffered path, its values untouched; a second update is refused. With the
    compiled scans the first quantile's ranks are selected by the probe's pass, at any size."""
    from ternqc.runtime.calibrate import scan_kernel

    g = torch.Generator().manual_seed(12)
    w = torch.randn(*shape, generator=g)
    before = w.clone()
    specs = [spec("range_quantile", quantile=0.5), spec("range_quantile", quantile=0.75), spec("range_min_max")]
    answered = _record_probe_selections(monkeypatch)
    once = TensorStats(specs, batched=False, size_hint=1)
    once.update(w)
    assert any(answered) == scan_kernel.available()
    buffered = TensorStats(specs, batched=False)
    buffered.update(w)
    got, want = once.results(), buffered.results()
    assert torch.equal(w, before)
    for s in specs[:2]:
        q = s.option("quantile")
        assert got[s]["max"] == float(torch.quantile(w.reshape(-1), q))
        assert got[s]["min"] == float(torch.quantile(w.reshape(-1), 1.0 - q))
    assert got == want
    with pytest.raises(ValueError, match="one update"):
        once.update(w)


def test_partials_fold_in_key_order_however_the_keys_arrive():
    """Per-batch partials fold left in key order: keys that arrive increasing (one process) are not sorted
    again, keys out of order are; both, and a merge of two processes' interleaved keys, give the bits of a
    plain left fold in key order (numpy, written out here)."""
    from ternqc.runtime.calibrate.stats.sums import Partials, fold_sums

    rng = np.random.default_rng(13)
    keys = np.arange(40, dtype=np.int64) * 7
    sums = rng.standard_normal((40, 3)) * 10.0 ** rng.integers(-8, 8, size=(40, 1))
    want = np.zeros(3)
    for row in sums:  # the left fold in key order, from +0
        want = want + row

    def folded(order, eager=False):
        p = Partials(fold_sums, eager=eager)
        for i in order:
            p.add(keys[i : i + 1], (sums[i : i + 1],), 3)
        return p

    in_order = folded(range(40), eager=True)
    shuffled = folded(rng.permutation(40))
    got_keys, (got_cols,) = shuffled.pending()
    assert np.array_equal(got_keys, keys) and np.array_equal(got_cols, sums)
    even, odd = folded(range(0, 40, 2)), folded(range(1, 40, 2))
    even.merge(odd)
    for p in (in_order, shuffled, even):
        (acc,) = p.fold()
        assert np.array_equal(acc.view(np.int64), (np.zeros(3) + want).view(np.int64))
