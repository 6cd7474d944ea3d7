"""`ternqc apply` on real architectures from files: GPT-2 with a dataset of dicts (next-token accuracy and
perplexity printed), a TransformerEncoder whose out_proj input cannot be quantised (a warning on stderr and a
`not applied` line), and `--samples` beyond the dataset said."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli_support import run_cli

MODELS = Path(__file__).resolve().parent / "models.py"


@pytest.mark.parametrize("recipe", ["weights_only", "toy_ternary"])
def test_apply_gpt2_from_files_with_dict_batches(recipe, tmp_path):
    from ternqc.compiler import builtin_recipe

    run = run_cli("apply", "--model", f"{MODELS}:gpt2", "--dataset", f"{MODELS}:tokens", "--rules",
                  builtin_recipe(f"{recipe}.tq"), "--samples", "8", "--batch-size", "4", "--out", tmp_path,
                  "--no-progress")
    assert run.rc == 0, run.err
    assert "validation next token accuracy: float" in run.out and "validation perplexity: float" in run.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metric"] == "next_token_accuracy"
    assert report["nodes"]["transformer_h_0_attn_c_attn"]["tensors"]["weight"]["quantized"] is True


def test_apply_encoder_names_what_cannot_take_effect_and_says_when_samples_run_out(tmp_path):
    from ternqc.compiler import builtin_recipe

    run = run_cli("apply", "--model", f"{MODELS}:encoder", "--dataset",
                  f"{MODELS}:sequences", "--rules", builtin_recipe("ternary_full.tq"), "--samples", "1000",
                  "--out", tmp_path, "--no-progress")
    assert run.rc == 0, run.err
    assert "ternqc: warning: encoder.layers.0.self_attn.out_proj: data_in stays in float" in run.err
    assert "not applied: encoder_layers_0_self_attn_out_proj data_in" in run.out
    assert "asked for 1000 calibration samples" in run.err and "holds only 24" in run.err


def test_apply_with_a_user_metric_from_a_file(tmp_path):
    from ternqc.compiler import builtin_recipe

    (tmp_path / "metric.py").write_text(
        "def confidence(output, labels):\n"
        "    return float(output.logits.softmax(-1).max(-1).values.mean())\n"
    )
    run = run_cli("apply", "--model", f"{MODELS}:gpt2", "--dataset", f"{MODELS}:tokens", "--rules",
                  builtin_recipe("weights_only.tq"), "--samples", "8", "--metric", f"{tmp_path / 'metric.py'}:confidence",
                  "--out", tmp_path / "out", "--no-progress")
    assert run.rc == 0, run.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metric"] == "confidence" and 0 < report["ternary_accuracy"] <= 1
    assert "validation confidence: float" in run.out
