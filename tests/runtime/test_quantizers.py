"""The ternary quantiser against an independent numpy implementation of the issue's rules.

The reference functions below (`ref_*`) are written from the issue text, in numpy, and never call
`ternqc.runtime.quantize.quantizers`; every test compares the two on the same values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ternqc.runtime.quantize.quantizers import (
    ModuleQuant,
    TensorQuant,
    module_quant_from_params,
    quantize,
    ternarize,
    weight_alpha,
)

# ---------------------------------------------------------------------------------------------------------
# Independent reference (numpy, from the text)
# ---------------------------------------------------------------------------------------------------------


def ref_delta(params: dict, t: str):
    """Δ by the issue's rule; a source is 'set and non-zero' when not None/NA and any element is non-zero."""

    def get(suffix):
        v = params.get(f"{t}_{suffix}")
        return None if v is None or v == "NA" else np.asarray(v, dtype=np.float64)

    if get("threshold") is not None:
        return get("threshold")
    for suffix, factor in (("mean", 0.75), ("median", 0.75), ("max", 0.05)):
        v = get(suffix)
        if v is not None and np.count_nonzero(v) > 0:
            return factor * np.abs(v)
    return None


def ref_T(x: np.ndarray, d) -> np.ndarray:
    d = np.asarray(d, dtype=x.dtype)
    out = np.zeros(np.broadcast_shapes(x.shape, d.shape), dtype=x.dtype)
    out[np.broadcast_to(x, out.shape) > np.broadcast_to(d, out.shape)] = 1
    out[np.broadcast_to(x, out.shape) < -np.broadcast_to(d, out.shape)] = -1
    return out


def ref_alpha_rows(w: np.ndarray, d_rows: np.ndarray) -> np.ndarray:
    """Per output channel (first axis): mean of |w| over |w| > Δ_row, 0 if none; loops on purpose."""
    out = np.zeros(w.shape[0], dtype=np.float64)
    for i in range(w.shape[0]):
        a = np.abs(w[i]).astype(np.float64).ravel()
        sel = a[a > float(d_rows[i])]
        out[i] = sel.mean() if sel.size else 0.0
    return out


def ref_alpha_scalar(w: np.ndarray, d: float) -> float:
    a = np.abs(w).astype(np.float64).ravel()
    sel = a[a > d]
    return float(sel.mean()) if sel.size else 0.0


def lin(t="weight", **kw) -> dict:
    """Params quantising one tensor of a linear."""
    return {"name": "ternary", f"{t}_width": 2, **{f"{t}_{k}": v for k, v in kw.items()}}


def tq_of(params: dict, t="weight", op="linear") -> TensorQuant:
    return module_quant_from_params(op, "seq_blocks_0", params).tensors[t]


# ---------------------------------------------------------------------------------------------------------
# Δ: every source, fall-through on 0 and na
# ---------------------------------------------------------------------------------------------------------

DELTA_CASES = {
    "threshold": dict(threshold=0.3, mean=0.5, median=0.7, max=2.0),
    "threshold_zero_is_set": dict(threshold=0.0, mean=0.5),
    "mean": dict(mean=0.4, median=0.7, max=2.0),
    "negative_mean_abs": dict(mean=-0.4, median=0.7),
    "mean_zero_falls_to_median": dict(mean=0.0, median=-0.2, max=2.0),
    "mean_na_falls_to_median": dict(mean=None, median=0.2, max=2.0),
    "mean_NA_string_falls_to_median": dict(mean="NA", median=0.2),
    "median_zero_falls_to_max": dict(mean=0.0, median=0.0, max=6.567787170410156),
    "only_max": dict(max=-3.0),
    "threshold_na_uses_mean": dict(threshold=None, mean=1.5),
}


@pytest.mark.parametrize("tensor", ["data_in", "weight", "bias"])
@pytest.mark.parametrize("case", sorted(DELTA_CASES))
def test_delta_sources_match_reference(case, tensor):
    params = lin(tensor, **DELTA_CASES[case])
    tq = tq_of(params, tensor)
    assert tq.quantize
    np.testing.assert_allclose(np.asarray(tq.delta), ref_delta(params, tensor), rtol=0, atol=1e-15)


def test_document_flow_values():
    # As in the user's document: seq_blocks_2 has data_in median 0.0 and max 6.567787170410156 -> data_in
    # falls through to 0.05*max; a non-zero weight median gives 0.75*|median|; bias mean "NA" falls through.
    params = {
        "name": "ternary",
        "data_in_width": 2,
        "data_in_median": 0.0,
        "data_in_max": 6.567787170410156,
        "weight_width": 2,
        "weight_median": -0.0017,
        "weight_max": 0.099988654255867,
        "bias_width": 2,
        "bias_mean": "NA",
        "bias_median": 0.01,
        "bias_max": 0.1,
    }
    mq = module_quant_from_params("linear", "seq_blocks_2", params)
    assert mq.tensors["data_in"].delta == pytest.approx(0.05 * 6.567787170410156, rel=1e-15)
    assert mq.tensors["weight"].delta == pytest.approx(0.75 * 0.0017, rel=1e-15)
    assert mq.tensors["bias"].delta == pytest.approx(0.75 * 0.01, rel=1e-15)


@pytest.mark.parametrize(
    "kw", [dict(mean=0.0), dict(mean=0.0, median=0.0, max=0.0), dict(mean=None, median="NA", max=[0.0, 0.0])]
)
def test_sources_set_but_all_zero_give_a_zero_threshold(kw):
    # a zero-initialised bias has mean, median and max 0: Δ = 0 (shaped like the first set source), and an
    # all-zero tensor quantises to zeros instead of failing
    tq = tq_of(lin("weight", **kw))
    assert np.all(np.asarray(tq.delta) == 0)
    first = next(v for k, v in kw.items() if v not in (None, "NA"))
    assert np.shape(tq.delta) == np.shape(first)
    import torch

    from ternqc.runtime.quantize.quantizers import quantize

    zeros = torch.zeros(3, 2)
    assert torch.equal(quantize(zeros, tq.delta, torch.tensor(0.0), True), zeros)


def test_vector_source_with_some_zeros_is_used_whole():
    # Not all zero -> the whole vector is the source; channels whose element is 0 get Δ = 0.
    mean = [[0.4], [0.0], [-0.2]]
    params = lin("weight", mean=mean, median=[[1.0], [1.0], [1.0]])
    tq = tq_of(params)
    np.testing.assert_allclose(np.asarray(tq.delta), ref_delta(params, "weight"))
    np.testing.assert_allclose(np.asarray(tq.delta), [[0.3], [0.0], [0.15]])


def test_all_zero_vector_falls_through():
    params = lin("weight", mean=[[0.0], [0.0]], median=[[0.2], [-0.4]])
    np.testing.assert_allclose(np.asarray(tq_of(params).delta), ref_delta(params, "weight"))


def test_width_float_or_unset_leaves_tensor_in_float_and_needs_no_name():
    params = {"data_in_width": 32, "weight_width": None, "bias_max": 1.0}
    mq = module_quant_from_params("linear", "n", params)
    assert not mq.quantises_anything
    assert set(mq.tensors) == {"data_in", "weight", "bias", "data_out"}
    assert all(not t.quantize and t.delta is None for t in mq.tensors.values())


def test_params_of_tensors_the_op_lacks_are_ignored():
    params = {"name": "ternary", "data_in_width": 2, "data_in_max": 4.0, "weight_width": 8}
    mq = module_quant_from_params("relu", "seq_blocks_1", params)
    assert set(mq.tensors) == {"data_in", "data_out"}
    assert mq.tensors["data_in"].delta == pytest.approx(0.2)


def test_scale_and_scaling_factor():
    tq = tq_of(lin("weight", max=1.0, scaling_factor=True, scale=0.25))
    assert tq.scaling and tq.alpha == 0.25
    tq = tq_of(lin("weight", max=1.0, scaling_factor=True))
    assert tq.scaling and tq.alpha is None  # derived later from the weight
    tq = tq_of(lin("weight", max=1.0))
    assert not tq.scaling


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

# The parameters' values and combinations are checked by mapping: tests/runtime/test_combinations.py.


def test_tensorquant_validates_values_read_from_disk():
    with pytest.raises(ValueError):
        TensorQuant(quantize=True, delta=None)
    with pytest.raises(ValueError):
        TensorQuant(quantize=True, delta=-1.0)
    with pytest.raises(ValueError):
        TensorQuant(quantize=True, delta=0.1, scaling=True, alpha=[float("nan")])
    with pytest.raises(ValueError):
        ModuleQuant(op="relu", node="r", tensors={"weight": TensorQuant(quantize=False)})


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------


def test_module_quant_dict_round_trip_is_plain_json():
    params = {
        "name": "ternary",
        "data_in_width": 2,
        "data_in_threshold": [0.1, 0.2, 0.3],
        "data_in_scaling_factor": True,
        "data_in_scale": 0.5,
        "weight_width": 2,
        "weight_max": [[1.0], [2.0], [3.0]],
        "weight_scaling_factor": True,
        "bias_width": 32,
    }
    mq = module_quant_from_params("linear", "fc", params)
    d = json.loads(json.dumps(mq.to_dict()))
    assert d["tensors"]["weight"]["delta"] == [[0.05], [0.1], [0.15000000000000002]]
    assert ModuleQuant.from_dict(d) == mq
    assert mq.with_alpha("data_in", 0.75).tensors["data_in"].alpha == 0.75
    assert mq.with_alpha("data_in", 0.75).tensors["weight"] == mq.tensors["weight"]


# ---------------------------------------------------------------------------------------------------------
# T(x), α, q(x)
# ---------------------------------------------------------------------------------------------------------


def test_ternarize_values_exactly_at_plus_minus_delta_are_zero():
    d = np.float32(0.3)  # compared at float32, the tensor's precision
    up, down = np.nextafter(d, np.float32(1)), np.nextafter(d, np.float32(0))
    x = np.array([-1.0, -up, -d, -down, 0.0, down, d, up, 1.0], dtype=np.float32)
    got = ternarize(torch.from_numpy(x), float(d)).numpy()
    np.testing.assert_array_equal(got, ref_T(x, d))
    np.testing.assert_array_equal(got, [-1, -1, 0, 0, 0, 0, 0, 1, 1])


def test_ternarize_zero_threshold_keeps_only_zeros():
    x = np.array([-2.0, -1e-30, 0.0, 1e-30, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(ternarize(torch.from_numpy(x), 0.0).numpy(), ref_T(x, 0.0))


@pytest.mark.parametrize("scaling", [True, False])
def test_quantize_scalar_delta_derived_alpha(scaling):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, size=(7, 5)).astype(np.float32)
    d = 0.08
    alpha = weight_alpha(torch.from_numpy(w), d)
    assert alpha.dim() == 0
    assert alpha.item() == pytest.approx(ref_alpha_scalar(w, np.float32(d)), rel=1e-6)
    got = quantize(torch.from_numpy(w), d, alpha, scaling).numpy()
    want = ref_T(w, d) * (ref_alpha_scalar(w, np.float32(d)) if scaling else 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if not scaling:
        assert set(np.unique(got)) <= {-1.0, 0.0, 1.0}


def test_no_weight_above_delta_gives_alpha_zero_and_all_zero_output():
    w = np.array([[0.1, -0.2], [0.2, 0.05]], dtype=np.float32)
    d = 0.2  # |w| <= Δ everywhere, one value exactly at Δ
    alpha = weight_alpha(torch.from_numpy(w), d)
    assert ref_alpha_scalar(w, np.float32(d)) == 0.0
    assert alpha.item() == 0.0
    q = quantize(torch.from_numpy(w), d, alpha, True)
    assert torch.count_nonzero(q) == 0
    # per channel: one channel has values above its Δ, the other none
    d_rows = np.array([[0.15], [0.5]], dtype=np.float32)
    a = weight_alpha(torch.from_numpy(w), d_rows).numpy()
    np.testing.assert_allclose(a.ravel(), ref_alpha_rows(w, d_rows.ravel()), rtol=1e-6)
    assert a[1, 0] == 0.0 and a[0, 0] == pytest.approx(0.2)


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 3, 3), (4, 2, 5)], ids=["linear", "conv2d", "conv1d"])
@pytest.mark.parametrize("scaling", [True, False])
def test_per_channel_delta_and_alpha(shape, scaling):
    # Δ per output channel from per-channel statistics: shape [out, 1, ...]; α per output channel likewise.
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, size=shape).astype(np.float32)
    per_row_mean = np.abs(w).reshape(shape[0], -1).mean(axis=1)  # a per-channel statistic
    delta_shape = (shape[0],) + (1,) * (len(shape) - 1)
    params = lin("weight", mean=(per_row_mean.reshape(delta_shape)).tolist(), scaling_factor=scaling)
    tq = tq_of(params)
    d = np.asarray(tq.delta)
    assert d.shape == delta_shape
    np.testing.assert_allclose(d, ref_delta(params, "weight"))
    alpha = weight_alpha(torch.from_numpy(w), tq.delta)
    assert tuple(alpha.shape) == delta_shape
    want_alpha = ref_alpha_rows(w, d.astype(np.float32).ravel())
    np.testing.assert_allclose(alpha.numpy().ravel(), want_alpha, rtol=1e-6)
    got = quantize(torch.from_numpy(w), tq.delta, alpha, scaling).numpy()
    want = ref_T(w, d.astype(np.float32))
    if scaling:
        want = want * want_alpha.reshape(delta_shape)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_per_input_delta_for_linear_data_in():
    # data_in of a Linear: Δ of shape [in] broadcasts over the batch; α per input feature likewise.
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, size=(16, 5)).astype(np.float32)
    d = np.array([0.1, 0.5, 0.0, 1.0, 2.0], dtype=np.float32)
    a = np.array([0.3, 0.7, 1.0, 1.2, 2.5], dtype=np.float32)
    got = quantize(torch.from_numpy(x), d.tolist(), a.tolist(), True).numpy()
    np.testing.assert_allclose(got, ref_T(x, d) * a, rtol=1e-6)
    # the per-column α of a weight-like tensor with Δ [in]: reduced over rows
    alpha = weight_alpha(torch.from_numpy(x), d.tolist()).numpy()
    want = ref_alpha_rows(x.T.copy(), d)
    np.testing.assert_allclose(alpha, want, rtol=1e-6)


def test_quantize_with_scaling_needs_alpha():
    with pytest.raises(ValueError):
        quantize(torch.ones(3), 0.5, None, True)


def test_weight_alpha_rejects_delta_larger_than_tensor():
    with pytest.raises(ValueError):
        weight_alpha(torch.ones(3, 2), [[0.1], [0.1], [0.1], [0.1]])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    per_channel=st.booleans(),
    scaling=st.booleans(),
)
def test_property_matches_reference(rows, cols, seed, per_channel, scaling):
    rng = np.random.default_rng(seed)
    # quantised to a grid so that values exactly at ±Δ happen often
    w = (rng.integers(-4, 5, size=(rows, cols)) / 4).astype(np.float32)
    d = (rng.integers(0, 4, size=(rows, 1)) / 4).astype(np.float32) if per_channel else np.float32(0.5)
    alpha = weight_alpha(torch.from_numpy(w), d.tolist() if per_channel else float(d))
    d_rows = d.ravel() if per_channel else np.full(rows, d)
    if per_channel:
        want_alpha = ref_alpha_rows(w, d_rows).reshape(rows, 1)
    else:
        want_alpha = ref_alpha_scalar(w, d)
    np.testing.assert_allclose(alpha.numpy(), want_alpha, rtol=1e-6)
    got = quantize(torch.from_numpy(w), d.tolist() if per_channel else float(d), alpha, scaling).numpy()
    want = ref_T(w, d) * (want_alpha if scaling else 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_resolving_parameters_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from ternqc.runtime.quantize.quantizers import module_quant_from_params as m; "
        "m('linear', 'n', {'name': 'ternary', 'weight_width': 2, 'weight_max': 1.0}); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
