"""Quantiser kinds (ternary, binary, integer) × granularity × module type against independent numpy
implementations: quantised values, scales and zero fractions; per-group and dynamic per-token included;
the registry pinned to the compiler's vocabulary."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ternqc import plan
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.kinds import KINDS
from ternqc.runtime.quantize.modules import TERNARY_MODULES, latent_param, quantized_param, ternary_param
from ternqc.runtime.quantize.quantizers import module_quant_from_params

# --- the registry and the compiler's vocabulary ------------------------------------------------------------


def test_registry_equals_the_plan_vocabulary():
    assert set(KINDS) == set(plan.QUANTISERS) == set(plan.QUANTISER_WIDTHS) == set(plan.QUANTISER_PARAMS)
    for name, kind in KINDS.items():
        assert kind.name == name
        assert tuple(kind.widths) == plan.QUANTISER_WIDTHS[name], name
        assert tuple(kind.params) == plan.QUANTISER_PARAMS[name], name
        assert set(kind.params) <= set(plan.PARAM_SUFFIXES), name


def test_every_kind_and_width_compiles():
    from ternqc.compiler import compile_source

    for name, widths in plan.QUANTISER_WIDTHS.items():
        for w in widths:
            compile_source(f'linear {{ weight_quantiser = "{name}"  weight_width = {w} }}', "k.tq")


# --- numpy references ---------------------------------------------------------------------------------------


def np_groups(w: np.ndarray, how: str, group: int | None) -> tuple[np.ndarray, tuple]:
    """`w` viewed so that the last axis is what one scale covers: per tensor [1, n], per channel
    [out, row], per group [out, n_groups, group]; and the shape to put results back."""
    out = w.shape[0]
    if how == "tensor":
        return w.reshape(1, -1), ()
    if how == "channel":
        return w.reshape(out, -1), (out,) + (1,) * (w.ndim - 1)
    return w.reshape(out, -1, group), (out, -1)


def np_weight_quant(w: np.ndarray, kind: str, width: int, how: str, group: int | None, delta: float):
    """(q(w), scale as stored, codes) by the kinds' definitions (docs/LANGUAGE.md)."""
    v, shape = np_groups(w.astype(np.float32), how, group)
    a = np.abs(v)
    if kind == "ternary":
        codes = (v > delta).astype(np.float32) - (v < -delta).astype(np.float32)
        mask = a > delta
        scale = np.where(mask.sum(-1) > 0, (a * mask).sum(-1) / np.maximum(mask.sum(-1), 1), 0)
    elif kind == "binary":
        codes = np.where(v >= 0, 1.0, -1.0).astype(np.float32)
        scale = a.mean(-1)
    else:
        qmax = 2 ** (width - 1) - 1
        scale = (a.max(-1) / np.float32(qmax)).astype(np.float32)
        codes = np.clip(np.round(v / scale[..., None]), -qmax, qmax)
    q = (codes * scale[..., None]).reshape(w.shape)
    return q, scale.reshape(shape) if shape else scale.reshape(()), codes.reshape(w.shape)


FLOAT_MODULES = {
    "linear": lambda: nn.Linear(64, 12),
    "conv1d": lambda: nn.Conv1d(8, 6, 4),
    "conv2d": lambda: nn.Conv2d(4, 6, (2, 4)),
}
KIND_WIDTHS = [("ternary", 2), ("binary", 1), ("integer", 8), ("integer", 4), ("integer", 2)]
GRANULARITIES = ["tensor", "channel", "group"]


@pytest.mark.parametrize("op", list(FLOAT_MODULES))
@pytest.mark.parametrize(("kind", "width"), KIND_WIDTHS)
@pytest.mark.parametrize("how", GRANULARITIES)
def test_weight_values_scales_and_zeros_match_numpy(op, kind, width, how):
    torch.manual_seed(hash((op, kind, width, how)) % 1000)
    float_module = FLOAT_MODULES[op]()
    delta = 0.05
    params = {"name": "ternary", "weight_quantiser": kind, "weight_width": width, "weight_scaling_factor": True,
              "weight_threshold": delta}
    group = 8 if how == "group" else None
    if how == "channel":
        params["weight_per_channel"] = True
    if group:
        params["weight_group_size"] = group
    mq = module_quant_from_params(op, "n", params)
    w = float_module.weight.detach().numpy().copy()  # before conversion: the module is quantised in place
    module = TERNARY_MODULES[op].from_float(float_module, mq).eval()
    want_q, want_scale, want_codes = np_weight_quant(w, kind, width, how, group, delta)
    qweight = quantized_param(module, "weight")
    np.testing.assert_allclose(qweight.numpy(), want_q, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(module.weight.detach().numpy(), want_q, rtol=1e-6, atol=1e-7)  # every reader
    scale = ternary_param(module, "weight").alpha_of(latent_param(module, "weight"))
    np.testing.assert_allclose(scale.numpy(), want_scale, rtol=1e-6)
    got_zeros = float((qweight == 0).float().mean())
    assert got_zeros == pytest.approx(float((want_codes == 0).mean()))
    if kind == "binary":
        assert got_zeros == 0.0  # 0 has no code: sign(0) = +1


def np_integer(x: np.ndarray, scale, width: int) -> np.ndarray:
    qmax = 2 ** (width - 1) - 1
    scale = np.asarray(scale, dtype=np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    return np.clip(np.round(x / safe), -qmax, qmax) * scale


def test_integer_rounds_half_to_even_and_saturates():
    float_module = nn.Linear(5, 1, bias=False)
    mq = module_quant_from_params("linear", "n", {"name": "integer", "data_in_width": 4, "data_in_scale": 0.5})
    float_module.weight.data.fill_(1.0)
    module = TERNARY_MODULES["linear"].from_float(float_module, mq)
    captured = {}
    x = torch.tensor([[0.25, 0.75, -0.25, 10.0, -10.0]])  # 0.5, 1.5, -0.5 steps; beyond ±7 steps
    with torch.no_grad():
        captured["y"] = module(x)
    # half to even: 0.5 -> 0, 1.5 -> 2, -0.5 -> -0; saturating at ±7
    assert float(captured["y"]) == pytest.approx(0.5 * (0 + 2 + 0 + 7 - 7))


@pytest.mark.parametrize(("kind", "width"), [("integer", 8), ("integer", 4), ("binary", 1)])
def test_dynamic_per_token_activations_match_numpy(kind, width):
    torch.manual_seed(3)
    module = nn.Linear(16, 5)
    lin = copy.deepcopy(module)  # the float reference (conversion is in place)
    params = {"name": kind, "data_in_width": width, "data_in_dynamic": True}
    module = TERNARY_MODULES["linear"].from_float(module, module_quant_from_params("linear", "n", params))
    x = torch.randn(2, 7, 16) * torch.linspace(0.1, 3, 7)[None, :, None]  # tokens of different ranges
    with torch.no_grad():
        got = module(x).numpy()
    xn = x.numpy()
    if kind == "integer":
        scale = np.abs(xn).max(-1, keepdims=True) / np.float32(2 ** (width - 1) - 1)
        qx = np_integer(xn, scale, width)
    else:
        qx = np.where(xn >= 0, 1.0, -1.0) * np.abs(xn).mean(-1, keepdims=True)
    want = qx @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["conv1d", "conv2d"])
def test_static_integer_data_in_of_convs_matches_numpy(op):
    torch.manual_seed(4)
    module = FLOAT_MODULES[op]()
    conv = copy.deepcopy(module)  # the float reference (conversion is in place)
    params = {"name": "integer", "data_in_width": 8, "data_in_max": 2.0}
    module = TERNARY_MODULES[op].from_float(module, module_quant_from_params(op, "n", params))
    x = torch.randn(3, conv.in_channels, *([9] * (1 if op == "conv1d" else 2))) * 1.5
    qx = torch.from_numpy(np_integer(x.numpy(), np.float32(2.0 / 127), 8).astype(np.float32))
    fn = F.conv1d if op == "conv1d" else F.conv2d
    with torch.no_grad():
        got, want = module(x), fn(qx, conv.weight, conv.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "extra"), [("integer", {"data_out_max": 1.5}),
                                             ("ternary", {"data_out_threshold": 0.4, "data_out_scale": 0.9}),
                                             ("integer", {"data_out_dynamic": True})])
@pytest.mark.parametrize("op", ["relu", "linear"])
def test_data_out_is_quantised_like_numpy(kind, extra, op):
    torch.manual_seed(5)
    module = nn.ReLU() if op == "relu" else nn.Linear(6, 6)
    float_module = copy.deepcopy(module)  # the float reference (conversion is in place)
    params = {"name": kind, "data_out_width": 8 if kind == "integer" else 2,
              "data_out_scaling_factor": True, **extra}
    module = TERNARY_MODULES[op].from_float(module, module_quant_from_params(op, "n", params))
    x = torch.randn(4, 6) * 2
    with torch.no_grad():
        y = float_module(x).numpy()
        got = module(x).numpy()
    if kind == "ternary":
        want = ((y > 0.4).astype(np.float32) - (y < -0.4).astype(np.float32)) * np.float32(0.9)
    elif "data_out_dynamic" in extra:
        want = np_integer(y, np.abs(y).max(-1, keepdims=True) / np.float32(127), 8)
    else:
        want = np_integer(y, np.float32(1.5 / 127), 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- what cannot be configured -----------------------------------------------------------------------------

# What cannot be configured is refused by mapping, naming the rules: tests/runtime/test_combinations.py.


def test_group_size_that_does_not_divide_the_row_is_a_user_error():
    mq = module_quant_from_params("linear", "fc1", {"name": "integer", "weight_width": 8, "weight_group_size": 7})
    with pytest.raises(UserError, match="groups of 7"):
        TERNARY_MODULES["linear"].from_float(nn.Linear(64, 4), mq)


def test_per_tensor_kind_override_is_w158a8():
    params = {"name": "ternary", "weight_width": 2, "weight_threshold": 0.1, "weight_scaling_factor": True,
              "data_in_quantiser": "integer", "data_in_width": 8, "data_in_dynamic": True}
    mq = module_quant_from_params("linear", "n", params)
    assert (mq.tensor("weight").kind, mq.tensor("weight").width) == ("ternary", 2)
    assert (mq.tensor("data_in").kind, mq.tensor("data_in").width, mq.tensor("data_in").dynamic) == ("integer", 8, True)
