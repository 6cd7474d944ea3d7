"""Acceptance on real architectures (tiny BERT, tiny GPT-2, nn.TransformerEncoder, a ResNet-style block that
calls one ReLU twice, an nn.Linear subclass) with the shipped `weights_only` recipe through `ternqc.quantize_`:
every Linear-like module (MultiheadAttention's out_proj and GPT-2's Conv1D included) is quantised; the
converted model's output equals an independent reference (weights ternarised by numpy in
`models.weights_only_reference`, run with the fused fast paths off) and differs from float, with the fast
path on, and again after `ternary.ckpt` is reloaded."""

from __future__ import annotations

import pytest
import torch

import ternqc
from ternqc.runtime.quantize.convert import load_ternary_checkpoint
from ternqc.runtime.quantize.modules import is_converted, quantized_param
from tests.realmodels import models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("name", sorted(models.ARCHITECTURES))
def test_weights_only_quantises_every_linear_like_module_and_matches_the_reference(name, tmp_path):
    build, data = models.ARCHITECTURES[name]
    model, batches = build(), data()
    float_out = models.run(model, batches)
    reference = models.run(models.weights_only_reference(model), batches, fast_path=False)

    report = ternqc.quantize_(model, "weights_only", batches, out=tmp_path, model_spec=name)

    expected = models.weighted(model)
    assert set(models.linear_like(model)) <= set(expected) and expected
    for path, module in expected.items():
        assert is_converted(module), path
        node = path.replace(".", "_")
        assert report.nodes[node]["tensors"]["weight"]["quantized"] is True, path
        q = quantized_param(module, "weight")
        per_row = q.reshape(q.shape[0], -1).abs()
        assert all(len(torch.unique(r)) <= 2 for r in per_row), path  # {0, α_c} in every output channel
    if name == "encoder":
        assert is_converted(model.encoder.layers[0].self_attn.out_proj)
    assert report.warnings == ()

    got = models.run(model, batches)  # fast path on, as a user runs it
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert any((g - f).abs().max() > 1e-3 for g, f in zip(got, float_out))

    fresh = {"gpt2": models.gpt2, "bert": models.bert, "encoder": models.encoder, "block": models.block,
             "subclass": models.subclass}[name]
    reloaded, _, meta = load_ternary_checkpoint(tmp_path / "ternary.ckpt", lambda spec: fresh())
    assert meta["model_spec"] == name
    for g, r in zip(models.run(reloaded, batches), reference):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_the_encoder_runs_its_fused_fast_path_on_ternary_weights(monkeypatch):
    model, batches = models.encoder(), models.tensor_batches((5, 16), 3)
    reference = models.run(models.weights_only_reference(model), batches, fast_path=False)
    ternqc.quantize_(model, "weights_only", batches)
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    got = models.run(model, batches)
    assert len(calls) == 2 * len(batches)  # both layers, every batch: the fast path ran
    for g, r in zip(got, reference):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
