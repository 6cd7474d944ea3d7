"""Ternary modules against an independent reference: quantisation in numpy (written here from the issue's
rules), then the float op on the quantised tensors (`x_q @ W_q.T + b_q` in numpy; `F.conv*d` for convs,
whose float arithmetic is not under test)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ternqc.plan import QUANTISABLE
from ternqc.runtime.calibrate.points import module_type
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.modules import (
    TERNARY_MODULES,
    TernaryConv1d,
    TernaryConv2d,
    TernaryLinear,
    TernaryReLU,
    latent_param,
    quantized_param,
    resolved_quant,
    ternary_param,
)
from ternqc.runtime.quantize.quantizers import ModuleQuant, TensorQuant
from ternqc.runtime.quantize.types import MODULE_TYPES

# --- independent reference -----------------------------------------------------------------------------


def ref_T(x, d):
    d = np.asarray(d, dtype=np.float32)
    return np.where(x > d, 1.0, np.where(x < -d, -1.0, 0.0)).astype(np.float32)


def ref_alpha(w, d):
    """Mean |w| over |w| > Δ, per element of Δ: w is reduced over the axes where Δ (right-aligned) is 1."""
    d = np.asarray(d, dtype=np.float32)
    dd = d.reshape((1,) * (w.ndim - d.ndim) + d.shape)
    axes = tuple(i for i, s in enumerate(dd.shape) if s == 1)
    a = np.abs(w).astype(np.float64)
    mask = a > dd
    total = (a * mask).sum(axis=axes, keepdims=True)
    count = mask.sum(axis=axes, keepdims=True)
    out = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return out.reshape(d.shape)


def ref_q(x, tq: TensorQuant, derive_from=None):
    """q(x) by the rules; α derived from `x` itself when the config leaves it to the tensor (weights)."""
    if not tq.quantize:
        return x
    d = np.asarray(tq.delta, dtype=np.float32)
    t = ref_T(x, d)
    if not tq.scaling:
        return t
    alpha = ref_alpha(x, d) if tq.alpha is None else np.asarray(tq.alpha, dtype=np.float64)
    return (t * alpha).astype(np.float32)


def np_(t):
    return t.detach().numpy().astype(np.float32)


def mq(op, node="n", **tensors):
    return ModuleQuant(op=op, node=node, tensors=tensors)


def TQ(delta, scaling=False, alpha=None):
    return TensorQuant(quantize=True, delta=delta, scaling=scaling, alpha=alpha)


FLOAT = TensorQuant.float_()

# --- Linear ------------------------------------------------------------------------------------------------

IN, OUT = 6, 5
LINEAR_CASES = {
    "weight_only_scaled": dict(weight=TQ(0.1, True)),
    "weight_only_unscaled": dict(weight=TQ(0.1, False)),
    "weight_given_scale": dict(weight=TQ(0.1, True, 0.2)),
    "weight_per_row": dict(weight=TQ([[0.05], [0.1], [0.2], [0.0], [0.3]], True)),
    "weight_per_row_given_alpha": dict(weight=TQ([[0.1]] * OUT, True, [[0.1], [0.2], [0.3], [0.4], [0.5]])),
    "all_three_scaled": dict(data_in=TQ(0.5, True, 0.8), weight=TQ(0.1, True), bias=TQ(0.1, True)),
    "all_three_unscaled": dict(data_in=TQ(0.5), weight=TQ(0.1), bias=TQ(0.1)),
    "data_in_per_feature": dict(
        data_in=TQ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], True, [1.0, 0.5, 0.25, 2.0, 1.5, 0.1]),
        weight=TQ(0.1, True),
    ),
    "data_in_only": dict(data_in=TQ(0.5, True, 0.7)),
    "bias_per_element": dict(bias=TQ([0.0, 0.1, 0.2, 0.3, 10.0], True)),
    "no_weight_above_delta": dict(weight=TQ(100.0, True), bias=TQ(100.0, True)),
}


def make_linear(bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(2.0)
        if bias:
            lin.bias.mul_(2.0)
    return lin


def ref_linear(x, lin, cfg: ModuleQuant):
    xq = ref_q(np_(x), cfg.tensor("data_in"))
    wq = ref_q(np_(lin.weight), cfg.tensor("weight"))
    out = xq.astype(np.float64) @ wq.T.astype(np.float64)
    if lin.bias is not None:
        out = out + ref_q(np_(lin.bias), cfg.tensor("bias"))
    return out


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_eval_matches_reference(case):
    lin = make_linear()
    ref = copy.deepcopy(lin)  # the float module, for the reference
    cfg = mq("linear", **LINEAR_CASES[case])
    t = TernaryLinear.from_float(lin, cfg).eval()
    assert t is lin and isinstance(t, nn.Linear)  # converted in place: same object, still a Linear
    x = torch.randn(9, IN)
    with torch.no_grad():
        got = t(x).numpy()
    np.testing.assert_allclose(got, ref_linear(x, ref, cfg), rtol=1e-5, atol=1e-5)
    if case == "no_weight_above_delta":
        assert torch.count_nonzero(quantized_param(t, "weight")) == 0
        assert torch.count_nonzero(quantized_param(t, "bias")) == 0
        np.testing.assert_allclose(got, 0.0)


def test_weight_reads_quantised_for_every_reader():
    lin = make_linear()
    ref = copy.deepcopy(lin)
    cfg = mq("linear", weight=TQ([[0.1]] * OUT, True), bias=TQ(0.1))
    TernaryLinear.from_float(lin, cfg)
    x = torch.randn(4, IN)
    # a functional call that reads `.weight` / `.bias` directly, as a parent module would
    with torch.no_grad():
        got = F.linear(x, lin.weight, lin.bias).numpy()
    np.testing.assert_allclose(got, ref_linear(x, ref, cfg), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lin.weight.detach().numpy(), ref_q(np_(ref.weight), cfg.tensor("weight")),
                               rtol=1e-6)


def test_linear_without_bias_and_3d_input():
    lin = make_linear(bias=False)
    ref = copy.deepcopy(lin)
    cfg = mq("linear", data_in=TQ(0.3, True, 0.9), weight=TQ(0.1, True), bias=TQ(0.1))
    t = TernaryLinear.from_float(lin, cfg).eval()
    x = torch.randn(2, 3, IN)
    got = t(x).detach().numpy()
    np.testing.assert_allclose(got, ref_linear(x, ref, cfg), rtol=1e-5, atol=1e-5)
    assert t.bias is None and ternary_param(t, "bias") is None


def test_state_dict_holds_latent_weight_delta_alpha_and_shares_the_float_parameter():
    lin = make_linear()
    weight, bias = lin.weight, lin.bias
    ref = copy.deepcopy(lin)
    cfg = mq("linear", data_in=TQ([0.1] * IN, True, 0.5), weight=TQ([[0.1]] * OUT, True), bias=TQ(0.1))
    t = TernaryLinear.from_float(lin, cfg)
    assert latent_param(t, "weight") is weight and latent_param(t, "bias") is bias  # optimizers keep them
    keys = set(t.state_dict())
    assert {"parametrizations.weight.original", "parametrizations.weight.0.delta",
            "parametrizations.bias.original", "parametrizations.bias.0.delta",
            "ternary_input.delta", "ternary_input.alpha"} == keys
    np.testing.assert_allclose(quantized_param(t, "weight").numpy(), ref_q(np_(ref.weight), cfg.tensor("weight")),
                               rtol=1e-6)
    alpha = resolved_quant(t).tensors["weight"].alpha
    np.testing.assert_allclose(alpha, ref_alpha(np_(ref.weight), [[0.1]] * OUT), rtol=1e-6)


def test_cache_follows_weight_updates():
    lin = make_linear()
    cfg = mq("linear", weight=TQ(0.1, True))
    t = TernaryLinear.from_float(lin, cfg).eval()
    latent = latent_param(t, "weight")
    x = torch.randn(4, IN)

    def reference():
        ref = copy.deepcopy(make_linear())
        with torch.no_grad():
            ref.weight.copy_(latent)
        return ref_linear(x, ref, cfg)

    with torch.no_grad():
        t(x)
        latent.mul_(-1.5)  # e.g. an optimizer step: in place, version counter moves
        got = t(x).numpy()
    np.testing.assert_allclose(got, reference(), rtol=1e-5, atol=1e-5)
    t.load_state_dict({**t.state_dict(), "parametrizations.weight.original": torch.randn(OUT, IN)})
    with torch.no_grad():
        np.testing.assert_allclose(t(x).numpy(), reference(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        latent.mul_(0.5)
        got = t(x).clone().numpy()
    np.testing.assert_allclose(got, reference(), rtol=1e-5, atol=1e-5)


# --- straight-through estimator -----------------------------------------------------------------------------


def test_linear_ste_gradients_equal_identity_ste_expectation():
    lin = make_linear()
    ref = copy.deepcopy(lin)
    weight, bias = lin.weight, lin.bias
    cfg = mq("linear", data_in=TQ(0.5, True, 0.8), weight=TQ([[0.1]] * OUT, True), bias=TQ(0.1, True))
    t = TernaryLinear.from_float(lin, cfg).train()
    x = torch.randn(7, IN, requires_grad=True)
    g = torch.randn(7, OUT)
    y = t(x)
    np.testing.assert_allclose(y.detach().numpy(), ref_linear(x, ref, cfg), rtol=1e-5, atol=1e-5)
    (y * g).sum().backward()
    xq = ref_q(np_(x), cfg.tensor("data_in"))
    wq = ref_q(np_(ref.weight), cfg.tensor("weight"))
    gn = g.numpy().astype(np.float64)
    # identity STE: dL/dx = g @ q(W), dL/dW = g^T @ q(x), dL/db = sum g
    np.testing.assert_allclose(x.grad.numpy(), gn @ wq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weight.grad.numpy(), gn.T @ xq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bias.grad.numpy(), gn.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(x.grad) > 0 and torch.count_nonzero(weight.grad) > 0


def test_training_step_changes_ternary_output():
    torch.manual_seed(3)
    lin = make_linear()
    t = TernaryLinear.from_float(lin, mq("linear", weight=TQ(0.2, True))).train()
    opt = torch.optim.SGD(t.parameters(), lr=1.0)
    x = torch.randn(32, IN)
    before = quantized_param(t, "weight").clone()
    loss = t(x).pow(2).mean()
    loss.backward()
    opt.step()
    t.eval()
    want = ref_q(np_(latent_param(t, "weight")), t.ternary_config.tensor("weight"))
    np.testing.assert_allclose(quantized_param(t, "weight").numpy(), want, rtol=1e-6)
    assert not torch.equal(before, quantized_param(t, "weight"))


def test_relu_matches_reference_and_ste():
    cfg = mq("relu", data_in=TQ(0.4, True, 1.7))
    r = TernaryReLU.from_float(nn.ReLU(), cfg)
    x = torch.randn(5, 8, requires_grad=True)
    y = r(x)
    want = np.maximum(ref_q(np_(x), cfg.tensor("data_in")), 0)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-6)
    y.sum().backward()
    # identity STE through q, then relu' evaluated at q(x)
    np.testing.assert_array_equal(x.grad.numpy(), (want > 0).astype(np.float32))
    assert torch.count_nonzero(x.grad) > 0


def test_relu_unscaled_per_channel_conv_input():
    d = [[[0.1]], [[0.5]], [[1.0]]]  # [C, 1, 1] against [B, C, H, W]
    cfg = mq("relu", data_in=TQ(d))
    r = TernaryReLU.from_float(nn.ReLU(inplace=True), cfg)
    x = torch.randn(2, 3, 4, 4)
    want = np.maximum(ref_T(np_(x), d), 0)
    np.testing.assert_array_equal(r(x).numpy(), want)


# --- Conv -------------------------------------------------------------------------------------------------

CONV_CASES = {
    "conv2d_per_channel": (
        lambda: nn.Conv2d(3, 4, 3, padding=1),
        dict(
            data_in=TQ([[[0.1]], [[0.3]], [[0.5]]], True, [[[1.0]], [[0.5]], [[2.0]]]),
            weight=TQ([[[[0.05]]], [[[0.1]]], [[[0.15]]], [[[0.2]]]], True),
            bias=TQ(0.05, True),
        ),
    ),
    "conv2d_reflect_stride_groups": (
        lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect", bias=False),
        dict(data_in=TQ(0.2, True, 0.6), weight=TQ(0.1, False)),
    ),
    "conv2d_weight_only": (lambda: nn.Conv2d(3, 2, (2, 3)), dict(weight=TQ(0.1, True))),
    "conv1d_per_channel": (
        lambda: nn.Conv1d(3, 5, 3, padding="same"),
        dict(data_in=TQ([[0.2], [0.4], [0.6]], True, [[1.0], [2.0], [3.0]]), weight=TQ([[[0.1]]] * 5, True)),
    ),
    "conv1d_circular": (
        lambda: nn.Conv1d(3, 2, 3, padding=1, padding_mode="circular"),
        dict(data_in=TQ(0.3), weight=TQ(0.1, True), bias=TQ(0.0)),
    ),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_reference(case):
    factory, tensors = CONV_CASES[case]
    torch.manual_seed(1)
    conv = factory()
    ref_conv = copy.deepcopy(conv)
    cfg = mq(type(conv).__name__.lower(), **tensors)
    cls = TernaryConv1d if isinstance(conv, nn.Conv1d) else TernaryConv2d
    t = cls.from_float(conv, cfg).eval()
    shape = (2, conv.in_channels, 9) if isinstance(conv, nn.Conv1d) else (2, conv.in_channels, 7, 6)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref_conv.weight.copy_(torch.from_numpy(ref_q(np_(ref_conv.weight), cfg.tensor("weight"))))
        if ref_conv.bias is not None:
            ref_conv.bias.copy_(torch.from_numpy(ref_q(np_(ref_conv.bias), cfg.tensor("bias"))))
        want = ref_conv(torch.from_numpy(ref_q(np_(x), cfg.tensor("data_in")))).numpy()
        got = t(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_weight_ste_gradient():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3)
    weight, w0 = conv.weight, conv.weight.detach().clone()
    cfg = mq("conv2d", data_in=TQ(0.3, True, 0.5), weight=TQ(0.1, True))
    t = TernaryConv2d.from_float(conv, cfg).train()
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    t(x).sum().backward()
    xq = torch.from_numpy(ref_q(np_(x), cfg.tensor("data_in")))
    wq = torch.from_numpy(ref_q(np_(w0), cfg.tensor("weight"))).requires_grad_()
    xr = xq.clone().requires_grad_()
    F.conv2d(xr, wq, conv.bias.detach()).sum().backward()
    torch.testing.assert_close(weight.grad, wq.grad)  # dL/dW of the conv on q(x), q(W)
    torch.testing.assert_close(x.grad, xr.grad)  # identity STE through q(x)
    assert torch.count_nonzero(weight.grad) > 0


# --- repr, resolved config, registry ---------------------------------------------------------------------


def test_repr_shows_delta_and_alpha():
    lin = nn.Linear(100, 3)
    cfg = mq("linear", data_in=TQ(0.25, True, 0.5), weight=TQ(0.03125, True), bias=TQ([0.01, 0.02, 0.03]))
    text = repr(TernaryLinear.from_float(lin, cfg))
    assert "TernaryInput(Δ=0.25, α=0.5)" in text
    assert "TernaryParam(Δ=0.03125, α derived)" in text
    assert "TernaryParam(Δ=[3 values, mean 0.02], no scaling)" in text


def test_resolved_quant_fills_in_derived_alpha():
    lin = make_linear()
    ref = copy.deepcopy(lin)
    cfg = mq("linear", weight=TQ([[0.1]] * OUT, True), bias=TQ(0.1, True))
    r = resolved_quant(TernaryLinear.from_float(lin, cfg))
    want = ref_alpha(np_(ref.weight), [[0.1]] * OUT)
    np.testing.assert_allclose(r.tensors["weight"].alpha, want, rtol=1e-6)
    assert r.tensors["bias"].alpha == pytest.approx(float(ref_alpha(np_(ref.bias), 0.1)), rel=1e-6)
    assert not r.tensors["data_in"].quantize


def test_every_quantisable_type_has_a_module_type_and_a_ternary_module_and_vice_versa():
    assert set(QUANTISABLE) == set(MODULE_TYPES) == set(TERNARY_MODULES)
    for op, kind in TERNARY_MODULES.items():
        assert kind.op == op
    examples = {"linear": nn.Linear(2, 2), "relu": nn.ReLU(), "conv1d": nn.Conv1d(2, 2, 1),
                "conv2d": nn.Conv2d(2, 2, 1), "embedding": nn.Embedding(4, 2)}
    assert set(examples) == set(QUANTISABLE)
    for op, module in examples.items():
        assert module_type(module) == op


# --- errors --------------------------------------------------------------------------------------------


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_subclass_overriding_forward_keeps_its_forward_on_the_quantised_weight():
    torch.manual_seed(4)
    lin = MyLinear(IN, OUT)
    ref = copy.deepcopy(lin)
    cfg = mq("linear", weight=TQ(0.1, True))
    TernaryLinear.from_float(lin, cfg)
    x = torch.randn(3, IN)
    with torch.no_grad():
        np.testing.assert_allclose(lin(x).numpy(), 2 * ref_linear(x, ref, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: TernaryLinear.from_float(nn.ReLU(), mq("linear", "fc9", weight=TQ(0.1))),
        lambda: TernaryLinear.from_float(TernaryLinear.from_float(nn.Linear(2, 2), mq("linear", "fc8", weight=TQ(0.1))),
                                         mq("linear", "fc9", weight=TQ(0.1))),
        lambda: TernaryLinear.from_float(nn.Linear(2, 2), mq("relu", "fc9", data_in=TQ(0.1))),
        lambda: TernaryConv1d.from_float(nn.Conv2d(2, 2, 1), mq("conv1d", "fc9", weight=TQ(0.1))),
        lambda: TernaryLinear.from_float(nn.Linear(2, 2), mq("linear", "fc9", data_in=TQ(0.1, True))),
        lambda: TernaryReLU.from_float(nn.ReLU(), mq("relu", "fc9", data_in=TQ(0.1, True))),
        lambda: TernaryLinear.from_float(nn.Linear(2, 3), mq("linear", "fc9", weight=TQ([[0.1], [0.1]]))),
        lambda: TernaryLinear.from_float(
            nn.Linear(2, 3), mq("linear", "fc9", weight=TQ(0.1, True, [0.1] * 3))
        ),
        lambda: TernaryLinear.from_float(nn.Linear(2, 3), mq("linear", "fc9", bias=TQ([0.1, 0.1]))),
        lambda: TernaryLinear.from_float(nn.Linear(2, 3), mq("linear", "fc9", data_in=TQ([0.1] * 3))),
        lambda: TernaryLinear.from_float(nn.Linear(2, 3), mq("linear", "fc9", data_in=TQ([[0.1, 0.1]]))),
        lambda: TernaryConv2d.from_float(nn.Conv2d(3, 2, 1), mq("conv2d", "fc9", data_in=TQ([[[0.1]]] * 2))),
        lambda: TernaryConv2d.from_float(nn.Conv2d(3, 2, 1), mq("conv2d", "fc9", weight=TQ([0.1, 0.1]))),
    ],
    ids=[
        "not_linear",
        "already_converted",
        "config_for_relu",
        "conv2d_as_conv1d",
        "data_in_scaling_without_alpha",
        "relu_scaling_without_alpha",
        "weight_delta_rows",
        "weight_alpha_shape",
        "bias_delta_shape",
        "data_in_delta_features",
        "data_in_delta_rank",
        "conv_data_in_channels",
        "conv_weight_delta_shape",
    ],
)
def test_from_float_errors_are_user_errors_naming_the_node(build):
    with pytest.raises(UserError, match="fc9"):
        build()
