"""The learned activation quantiser (LSQ with a ternary T) against an independent numpy computation, and the
context managers that put it in a converted model and track weight thresholds."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ternqc.runtime.quantize.convert import convert_
from ternqc.runtime.quantize.learned import (
    LearnedTernary,
    input_quantizer,
    learned_activations,
    tracked_weight_thresholds,
    weight_threshold,
)
from ternqc.runtime.quantize.quantizers import ModuleQuant, TensorQuant


def _np_forward_and_grads(x: np.ndarray, s: float, r: float):
    """q, dq/dx summed gradient (upstream ones), d(sum q)/ds before LSQ's gradient scale."""
    v = x / s
    inside = np.abs(v) <= 1
    vc = np.clip(v, -1, 1)
    t = (vc > r).astype(np.float64) - (vc < -r).astype(np.float64)
    q = s * t
    dx = inside.astype(np.float64)
    ds = np.where(inside, t - v, np.sign(v)).sum()
    return q, dx, ds


def test_lsq_forward_and_gradients_match_numpy():
    torch.manual_seed(0)
    x = (torch.randn(16, 20) * 2).requires_grad_()
    delta, alpha = torch.tensor(0.8), torch.tensor(1.7)
    q_mod = LearnedTernary(delta, alpha)
    q = q_mod(x)
    q.sum().backward()
    s, r = 1.7, 0.8 / 1.7
    want_q, want_dx, want_ds = _np_forward_and_grads(x.detach().double().numpy(), s, r)
    np.testing.assert_allclose(q.detach().numpy(), want_q, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), want_dx)
    # LSQ's gradient scale: 1 / sqrt(values per sample governed by the step) = 1 / sqrt(20)
    np.testing.assert_allclose(float(q_mod.step.grad), want_ds / math.sqrt(20), rtol=1e-5)


def test_lsq_forward_is_the_modules_quantiser_at_initialisation():
    x = torch.linspace(-4, 4, 801)
    delta, alpha = 0.6, 1.5
    q = LearnedTernary(torch.tensor(delta), torch.tensor(alpha))(x)
    expected = alpha * ((x > delta).float() - (x < -delta).float())
    torch.testing.assert_close(q, expected)
    np.testing.assert_allclose([float(v) for v in LearnedTernary(torch.tensor(delta), torch.tensor(alpha))
                                .delta_alpha()], [delta, alpha], rtol=1e-6)


def _converted_mlp() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    scaled = TensorQuant(quantize=True, delta=0.3, scaling=True, alpha=0.9)
    weight = TensorQuant(quantize=True, delta=[[0.1]] * 3, scaling=True)
    convert_(model, {"2": ModuleQuant(op="linear", node="seq_2", tensors={"data_in": scaled, "weight": weight})})
    return model


def test_learned_activations_train_then_write_back_and_leave_no_trace():
    model = _converted_mlp()
    keys = set(model.state_dict())
    x = torch.randn(32, 6)
    with learned_activations(model) as quantizers:
        assert set(quantizers) == {"2"}
        assert any(p is quantizers["2"].step for p in model.parameters())
        with torch.no_grad():
            quantizers["2"].step.mul_(2.0)  # as if training doubled the step
        trained = model(x)
    assert set(model.state_dict()) == keys  # the module's own quantiser is back, no extra parameter left
    delta, alpha = input_quantizer(model[2])
    torch.testing.assert_close(alpha, torch.tensor(1.8))
    torch.testing.assert_close(delta, torch.tensor(0.6))
    torch.testing.assert_close(model(x), trained)  # the module's own quantiser now applies the learned values


def test_tracked_weight_threshold_keeps_its_ratio_to_mean_abs_weight():
    model = _converted_mlp()
    delta, weight = weight_threshold(model[2])
    before = delta.clone()
    mean = weight.detach().abs().mean(dim=1, keepdim=True)
    with tracked_weight_thresholds(model):
        with torch.no_grad():
            weight.mul_(3.0)
        model.train()
        model(torch.randn(4, 6))
    torch.testing.assert_close(weight_threshold(model[2])[0], before / mean * (3.0 * mean))


def test_per_channel_steps_quantise_each_channel_with_its_own_values():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 4, 4).requires_grad_()
    delta = torch.tensor([0.2, 0.5, 0.9]).reshape(3, 1, 1)
    alpha = torch.tensor([0.6, 1.0, 2.0]).reshape(3, 1, 1)
    q_mod = LearnedTernary(delta, alpha)
    q = q_mod(x)
    q.sum().backward()
    for c in range(3):
        s, r = float(alpha[c]), float(delta[c] / alpha[c])
        want_q, _dx, want_ds = _np_forward_and_grads(x.detach()[:, c].double().numpy(), s, r)
        np.testing.assert_allclose(q.detach()[:, c].numpy(), want_q, rtol=1e-6, atol=1e-6)
        # 48 values per sample, 3 steps: each governs 16
        np.testing.assert_allclose(float(q_mod.step.grad[c]), want_ds / math.sqrt(16), rtol=1e-5)
