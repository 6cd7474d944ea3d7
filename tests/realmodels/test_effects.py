"""What ternqc says and does beyond weights-only: an input quantiser that cannot take effect (MultiheadAttention's
out_proj is never called) is named in the report, the table and a warning, never silently float; a
TransformerEncoderLayer with quantised inputs leaves its fused fast path so the quantisers run; a module
called twice per forward is counted twice; GPT-2's tied lm_head / wte weight is handled and described."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ternqc
from ternqc.compiler import builtin_recipe, compile_file
from ternqc.plan import StatSpec
from ternqc.render import format_layer_table
from ternqc.runtime.quantize.convert import load_ternary_checkpoint
from ternqc.runtime.quantize.modules import is_converted
from ternqc.runtime.run import pipeline
from tests.realmodels import models


def _ternary(x: np.ndarray, delta, alpha) -> np.ndarray:
    d = np.asarray(delta, dtype=np.float32)
    return (np.where(x > d, 1.0, np.where(x < -d, -1.0, 0.0)) * np.asarray(alpha, dtype=np.float32)).astype(
        np.float32)


def test_out_proj_input_is_named_not_silently_float_and_encoder_quantisers_run(tmp_path, monkeypatch):
    model, batches = models.encoder(), models.tensor_batches((5, 16), 3)
    float_model = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ternqc.quantize_(model, "ternary_full", batches, eval_data=batches, out=tmp_path,
                                  model_spec="encoder")
    out_projs = [f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)]
    for path in out_projs:
        entry = report.nodes[path.replace(".", "_")]
        assert entry["calls_per_forward"] == 0
        assert entry["tensors"]["data_in"]["quantized"] is False
        assert "never called" in entry["tensors"]["data_in"]["not_applied"]
        assert entry["tensors"]["weight"]["quantized"] is True  # its weight still is
        assert any(path in w and "data_in" in w for w in report.warnings)
        assert any(path in str(c.message) for c in caught)
        assert f"not applied: {path.replace('.', '_')} data_in" in format_layer_table(report.to_dict())
    assert sum("fused fast path off" in n for n in report.notes) == 2  # said once per layer
    unreachable = [n for n in report.notes if "no rule can select them" in n]
    assert len(unreachable) == 1 and "encoder.layers.1.self_attn.in_proj_weight (MultiheadAttention, [48, 16])" \
        in unreachable[0]

    # the reference: numpy-ternarised weights and inputs (with the calibrated Δ, α the report holds), unfused
    ref = float_model
    for path, m in ref.named_modules():
        if not isinstance(m, (nn.Linear, nn.ReLU)):
            continue
        entry = report.nodes[path.replace(".", "_")]["tensors"]
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(torch.from_numpy(models.ternarise_per_channel(m.weight.detach().numpy())))
        if entry["data_in"]["quantized"]:
            d, a = entry["data_in"]["delta"], entry["data_in"]["alpha"]
            m.register_forward_pre_hook(lambda _m, args, d=d, a=a: (torch.from_numpy(_ternary(args[0].numpy(), d, a)),))
    reference = models.run(ref, batches, fast_path=False)
    fused = torch._transformer_encoder_layer_fwd
    calls = []
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: calls.append(1) or fused(*a, **k))
    for got in (models.run(model, batches),
                models.run(load_ternary_checkpoint(tmp_path / "ternary.ckpt", lambda s: models.encoder())[0], batches)):
        for g, r in zip(got, reference):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert calls == []  # the quantised inputs keep the layers off the fast path
    meta = load_ternary_checkpoint(tmp_path / "ternary.ckpt", lambda s: models.encoder())[2]
    assert meta["warnings"] == list(report.warnings)


def test_a_relu_called_twice_per_forward_counts_every_call():
    model, batches = models.block(), models.tensor_batches((3, 6, 6), 2)
    seen = []
    handle = model.block.relu.register_forward_pre_hook(lambda _m, args: seen.append(args[0].numel()))
    models.run(model, batches)
    handle.remove()
    assert len(seen) == 2 * len(batches)
    plan = compile_file(builtin_recipe("ternary_full.tq")).plan
    data = pipeline.RunData(calibration=tuple(batches), evaluation=batches)
    result = pipeline.apply(model, plan, pipeline.RunSettings(progress=False), data=data)
    counted = result.profile.table["block.relu"].values["data_in_0"][StatSpec("abs_mean")]["count"]
    assert counted == sum(seen)
    assert result.report["nodes"]["block_relu"]["calls_per_forward"] == 2
    assert "block_relu is called 2 times per forward" in format_layer_table(result.report)
    assert result.report["nodes"]["stem"]["calls_per_forward"] == 1


EMBEDDINGS = """
calibrate { samples = 16  batch_size = 4 }
profile linear.weight: abs_mean(dims = [1])
profile embedding.weight: abs_mean(dims = [1])
default { name = "ternary" }
linear { weight_width = 2  weight_scaling_factor = true }
embedding { weight_width = 2  weight_scaling_factor = true }
linear.weight_threshold = 0.7 * stat.abs_mean.abs_mean
embedding.weight_threshold = 0.7 * stat.abs_mean.abs_mean
"""


def test_gpt2_tied_lm_head_weights_only_leaves_wte_float_and_says_so():
    model, batches = models.gpt2(), models.token_batches()
    wte = model.transformer.wte.weight.detach().clone()
    report = ternqc.quantize_(model, "weights_only", batches)
    assert torch.equal(model.transformer.wte.weight, wte)  # the embedding reads the float latent weight
    assert not torch.equal(model.lm_head.weight, wte)  # lm_head reads the ternary one
    assert any("lm_head.weight is tied to transformer.wte.weight" in n and "in float" in n for n in report.notes)


def test_gpt2_embeddings_quantised_by_an_embedding_rule_match_the_reference():
    model, batches = models.gpt2(), models.token_batches()
    ref = copy.deepcopy(model)
    for m in list(models.weighted(ref).values()) + [ref.transformer.wte, ref.transformer.wpe]:
        w = m.weight.detach().numpy()
        q = models.ternarise_per_channel(w.T).T if isinstance(m, models.Conv1D) else models.ternarise_per_channel(w)
        m.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(q)))  # unties lm_head from wte
    reference = models.run(ref, batches)
    report = ternqc.quantize_(model, EMBEDDINGS, batches)
    assert is_converted(model.transformer.wte) and is_converted(model.transformer.wpe)
    assert report.nodes["transformer_wte"]["tensors"]["weight"]["quantized"] is True
    assert any("tied" in n and "own Δ and α" in n for n in report.notes)
    for g, r in zip(models.run(model, batches), reference):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["weights_only", "twn", "bitnet", "ternary_full", "toy_ternary"])
def test_every_recipe_runs_on_gpt2_and_bert(recipe):
    for build, data in (models.ARCHITECTURES["gpt2"], models.ARCHITECTURES["bert"]):
        model = build()
        report = ternqc.quantize_(model, recipe, data(), eval_data=data())
        assert report.ternary_accuracy is not None
        assert any(t.get("quantized") for n in report.nodes.values() for t in n["tensors"].values())


def test_statistics_of_a_module_called_twice_pool_both_calls_exactly():
    from ternqc.compiler import compile_source

    rules = """
calibrate { samples = 32  batch_size = 8 }
profile relu.data_in: range_quantile(dims = all, quantile = 0.5), range_min_max(dims = all)
"""
    model, batches = models.block(), models.tensor_batches((3, 6, 6), 2)
    seen = []
    handle = model.block.relu.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone().reshape(-1)))
    models.run(model, batches)
    handle.remove()
    values = torch.cat(seen).numpy()
    plan = compile_source(rules, "r.tq").plan
    result = pipeline.profile(model, plan, pipeline.RunSettings(progress=False),
                              pipeline.RunData(calibration=tuple(batches)))
    got = result.table["block.relu"].values["data_in_0"]
    median = got[StatSpec("range_quantile", options=(("quantile", 0.5),))]
    assert median["count"] == values.size and median["max"] == pytest.approx(float(np.quantile(values, 0.5)))
    minmax = got[StatSpec("range_min_max")]
    assert (minmax["min"], minmax["max"]) == (float(values.min()), float(values.max()))


class BareAttention(nn.Module):
    """A custom module holding its projection as a bare Parameter: of no quantisable type."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(12, 4))
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x @ self.qkv.t())


def test_weights_no_rule_can_select_are_listed_once():
    torch.manual_seed(0)
    model = BareAttention().eval()
    batches = models.tensor_batches((4,), 2)
    report = ternqc.quantize_(model, "weights_only", batches)
    unreachable = [n for n in report.notes if "no rule can select them" in n]
    assert len(unreachable) == 1 and "qkv" in unreachable[0] and "[12, 4]" in unreachable[0]
    assert is_converted(model.fc)


ACTIVATION_THRESHOLD = """
calibrate { samples = 32  batch_size = 8 }
profile linear.data_in: range_min_max(dims = all)
default { name = "ternary" }
linear { weight_width = 2  weight_scaling_factor = true }
linear.weight_threshold = 0.001 * stat(data_in).range_min_max.range
"""


def test_a_weight_rule_reading_input_statistics_of_a_never_called_module_is_named():
    model, batches = models.encoder(), models.tensor_batches((5, 16), 3)
    with pytest.warns(UserWarning, match="out_proj: weight stays in float"):
        report = ternqc.quantize_(model, ACTIVATION_THRESHOLD, batches)
    for i in range(2):
        node = report.nodes[f"encoder_layers_{i}_self_attn_out_proj"]
        assert node["tensors"]["weight"]["quantized"] is False
        assert "never called" in node["tensors"]["weight"]["not_applied"]
        assert any(f"encoder.layers.{i}.self_attn.out_proj: weight stays in float" in w for w in report.warnings)
        assert report.nodes[f"encoder_layers_{i}_linear1"]["tensors"]["weight"]["quantized"] is True
