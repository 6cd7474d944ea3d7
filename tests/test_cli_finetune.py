"""`ternqc finetune` and `ternqc.runtime.run.finetune` on a small, fast configuration (the digits MLP
trained for a few epochs, three epochs of fine-tuning): fine-tuning recovers what post-training
quantisation lost, runs are reproducible, the outputs are `apply`'s with the fine-tuned model, and two
processes (DistributedDataParallel over gloo) reach the accuracy of one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ternqc.compiler import builtin_recipe, compile_file, compile_source
from ternqc.runtime.errors import UserError
from ternqc.runtime.models.data import build_dataset
from ternqc.runtime.models.evaluate import accuracy
from ternqc.runtime.models.train import run_train
from ternqc.runtime.quantize.convert import load_ternary_checkpoint
from ternqc.runtime.quantize.learned import input_quantizer
from ternqc.runtime.run import workers
from ternqc.runtime.run.finetune import FinetuneSettings, finetune
from ternqc.runtime.run.pipeline import RunSettings, load_model
from tests.test_cli_support import APPLY_OUTPUTS, assert_one_clean_error, run_cli

pytest.importorskip("sklearn.datasets")

TUNE = FinetuneSettings(epochs=3, progress=False)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "mlp.ckpt"
    run_train("digits-mlp", "digits", epochs=8, out=path, progress=False)
    return path


def _settings(ckpt: Path) -> RunSettings:
    return RunSettings(model="digits-mlp", ckpt=str(ckpt), dataset="digits", progress=False)


def _finetune(ckpt: Path, recipe: str, tune: FinetuneSettings = TUNE):
    plan = compile_file(builtin_recipe(recipe)).plan
    settings = _settings(ckpt)
    model = load_model(settings)
    return finetune(model, plan, settings, tune), model


def test_finetuning_ternary_activations_beats_post_training_and_reproduces(digits_ckpt):
    tuned, model = _finetune(digits_ckpt, "ternary_act.tq")
    again, model2 = _finetune(digits_ckpt, "ternary_act.tq")
    result = tuned.result
    assert result.ternary_accuracy >= tuned.post_training_accuracy + 0.03
    assert result.ternary_accuracy >= 0.85
    assert result.ternary_accuracy >= result.float_accuracy - 0.08
    assert len(tuned.history) == TUNE.epochs
    assert again.result.ternary_accuracy == result.ternary_accuracy
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # the configs carry the learned Δ/α the modules apply
    delta, alpha = input_quantizer(model.seq_blocks[2])
    tq = result.configs["seq_blocks.2"].tensor("data_in")
    assert tq.delta == pytest.approx(float(delta)) and tq.alpha == pytest.approx(float(alpha))
    assert result.mapping.modules["seq_blocks.2"].params["data_in_threshold"] == pytest.approx(tq.delta)


def test_learned_activation_steps_beat_fixed_ones(digits_ckpt):
    learned, _ = _finetune(digits_ckpt, "ternary_act.tq")
    fixed, _ = _finetune(digits_ckpt, "ternary_act.tq", FinetuneSettings(epochs=3, progress=False,
                                                                           learn_activations=False))
    assert learned.result.ternary_accuracy >= fixed.result.ternary_accuracy


def test_finetuning_weights_only_comes_close_to_float(digits_ckpt):
    tuned, _ = _finetune(digits_ckpt, "weights_only.tq")
    assert tuned.result.ternary_accuracy >= tuned.post_training_accuracy
    assert tuned.result.ternary_accuracy >= tuned.result.float_accuracy - 0.03


def test_two_processes_reach_the_accuracy_of_one(digits_ckpt):
    plan = compile_file(builtin_recipe("ternary_act.tq")).plan
    settings = _settings(digits_ckpt)
    one = workers.finetune_worker(plan, settings, TUNE)
    two = workers.run_workers(2, workers.finetune_worker, plan, settings, TUNE)
    assert two.post_training_accuracy == pytest.approx(one.post_training_accuracy, abs=1e-9)
    assert abs(two.result.ternary_accuracy - one.result.ternary_accuracy) <= 0.005


def test_cli_writes_apply_outputs_with_the_finetuned_model(digits_ckpt, tmp_path):
    out = tmp_path / "out"
    run = run_cli("finetune", "--model", "digits-mlp", "--ckpt", digits_ckpt, "--rules",
                  builtin_recipe("ternary_act.tq"), "--epochs", 2, "--out", out, "--no-progress")
    assert run.rc == 0, run.err
    assert "post-training" in run.out and "after 2 epochs of fine-tuning" in run.out
    assert "the first ternary layer" not in run.err  # ternary_act.tq keeps the raw input in float
    assert sorted(p.name for p in out.iterdir()) == sorted(APPLY_OUTPUTS)
    report = json.loads((out / "report.json").read_text())
    assert {"float_accuracy", "post_training_accuracy", "ternary_accuracy", "finetune"} <= set(report)
    assert len(report["finetune"]["history"]) == 2
    model, _configs, meta = load_ternary_checkpoint(out / "ternary.ckpt")
    reloaded = accuracy(model, build_dataset("digits", "validation"))
    assert reloaded == pytest.approx(report["ternary_accuracy"]) == pytest.approx(meta["ternary_accuracy"])


def test_cli_rejects_bad_settings(digits_ckpt, tmp_path):
    run = run_cli("finetune", "--model", "digits-mlp", "--ckpt", digits_ckpt, "--epochs", 0, "--out", tmp_path)
    assert_one_clean_error(run, "--epochs")
    run = run_cli("finetune", "--model", "digits-mlp", "--ckpt", digits_ckpt, "--distill", 2, "--out", tmp_path)
    assert_one_clean_error(run, "--distill")


def test_rules_that_convert_nothing_have_nothing_to_finetune(digits_ckpt):
    plan = compile_source('calibrate { samples = 64 }\ndefault { name = "ternary" }\n').plan
    settings = _settings(digits_ckpt)
    with pytest.raises(UserError, match="nothing to fine-tune"):
        finetune(load_model(settings), plan, settings, TUNE)


def test_python_entry_point_writes_outputs(digits_ckpt, tmp_path):
    import ternqc

    tuned = ternqc.finetune("digits-mlp", digits_ckpt, "weights_only.tq", epochs=1, out=tmp_path, progress=False)
    assert tuned.result.ternary_accuracy >= tuned.post_training_accuracy - 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(APPLY_OUTPUTS)
    with pytest.raises(UserError, match="no built-in recipe"):
        ternqc.finetune("digits-mlp", digits_ckpt, "nope.tq", epochs=1, progress=False)
    held = load_model(_settings(digits_ckpt))  # a model the caller holds: trained in place
    tuned = ternqc.finetune(held, rules="weights_only.tq", dataset="digits", epochs=1, progress=False)
    assert tuned.result.model is held
    with pytest.raises(UserError, match="needs dataset="):
        ternqc.finetune(held, rules="weights_only.tq", epochs=1, progress=False)


def test_weights_only_inner_holds_up_post_training(digits_ckpt):
    from ternqc.runtime.run.pipeline import apply

    settings = _settings(digits_ckpt)
    accs = {}
    for recipe in ("weights_only.tq", "weights_only_inner.tq"):
        plan = compile_file(builtin_recipe(recipe)).plan
        result = apply(load_model(settings), plan, settings)
        accs[recipe] = result.ternary_accuracy
    assert accs["weights_only_inner.tq"] >= accs["weights_only.tq"]
    assert accs["weights_only_inner.tq"] >= result.float_accuracy - 0.02


def test_a_ternary_raw_input_gets_a_note(digits_ckpt, tmp_path):
    run = run_cli("finetune", "--model", "digits-mlp", "--ckpt", digits_ckpt, "--rules",
                  builtin_recipe("ternary_full.tq"), "--epochs", 1, "--out", tmp_path, "--no-progress")
    assert run.rc == 0, run.err
    assert 'note: the input of seq_blocks.0' in run.err and '"seq_blocks.0".data_in_width = 32' in run.err


def test_assertions_are_checked_on_the_finetuned_model(digits_ckpt, tmp_path):
    tuned, _ = _finetune(digits_ckpt, "ternary_act.tq")
    post, after = tuned.post_training_accuracy, tuned.result.ternary_accuracy
    assert after > post
    rules = tmp_path / "r.tq"
    rules.write_text(
        f'include "{builtin_recipe("ternary_act.tq")}"\n'
        f'assert model: quantised_accuracy >= {(post + after) / 2}, "fine-tuning must recover"\n'
        f'assert model: quantised_accuracy >= {after + 0.01}, "more than it can"\n'
    )
    plan = compile_file(rules).plan
    settings = _settings(digits_ckpt)
    again = finetune(load_model(settings), plan, settings, TUNE)
    messages = [f.render() for f in again.result.assert_failures]
    assert len(messages) == 1 and "more than it can" in messages[0], messages
    assert len(again.result.report["assertions"]["failures"]) == 1


def test_cli_workers_two_processes_write_once(digits_ckpt, tmp_path):
    run = run_cli("finetune", "--model", "digits-mlp", "--ckpt", digits_ckpt, "--rules",
                  builtin_recipe("weights_only.tq"), "--epochs", 1, "--workers", 2, "--out", tmp_path,
                  "--no-progress")
    assert run.rc == 0, run.err
    assert run.out.count("after 1 epochs of fine-tuning") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(APPLY_OUTPUTS)


@pytest.mark.parametrize(
    ("name", "value", "option"),
    [("epochs", 0, "--epochs"), ("epochs", 2**60, "--epochs"), ("lr", float("nan"), "--lr"),
     ("batch_size", 0, "--train-batch-size"), ("distill", 1.5, "--distill"), ("temperature", 0.0, "--temperature")],
)
def test_settings_are_checked_once_when_made(name, value, option):
    # one place (runtime/ranges.py through FinetuneSettings' validators) for the CLI and Python alike
    with pytest.raises(UserError, match=f"^{option} must be"):
        FinetuneSettings(**{name: value})
