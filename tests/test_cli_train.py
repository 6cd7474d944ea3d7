"""`ternqc train` end to end (issue 3): a Lightning-layout checkpoint that MASE's rule and ternqc both load,
reaching at least 0.97 validation accuracy on toy-tiny, measured here independently of ternqc."""

from __future__ import annotations

import re

import pytest
import torch

from ternqc.runtime.io.checkpoints import load_checkpoint_
from ternqc.runtime.models.builtin import build_model
from tests.test_cli_support import (
    MaseToy,
    Trained,
    accuracy_of,
    assert_one_clean_error,
    load_like_mase,
    run_cli,
    toy_tiny,
    trained_toy_fixture,  # noqa: F401 - registers the session fixture trained_toy
)


def test_train_prints_the_best_epoch_and_writes_the_checkpoint(trained_toy: Trained) -> None:
    run = trained_toy.run
    assert run.rc == 0
    assert trained_toy.ckpt.is_file()
    assert f"wrote {trained_toy.ckpt}" in run.out
    assert "Traceback" not in run.err
    # --no-progress: no progress bar on stderr
    assert run.err.strip() == ""


def test_checkpoint_has_the_lightning_layout(trained_toy: Trained) -> None:
    raw = torch.load(trained_toy.ckpt, map_location="cpu", weights_only=True)
    assert isinstance(raw, dict)
    keys = set(raw["state_dict"])
    assert keys == {f"model.{k}" for k in MaseToy().state_dict()}
    assert isinstance(raw["epoch"], int)
    assert {"val_loss", "val_acc"} <= set(raw["metrics"])


def test_mase_rule_loads_it_and_validation_accuracy_is_at_least_097(trained_toy: Trained) -> None:
    model = load_like_mase(trained_toy.ckpt)
    inputs, labels = toy_tiny("validation")
    acc = accuracy_of(model, inputs, labels)
    assert acc >= 0.97
    # what train printed and stored is the accuracy of the stored weights (one sample of slack for
    # float rounding at a decision boundary between batch sizes)
    printed = float(re.search(r"val_acc (\d\.\d+)", trained_toy.run.out).group(1))
    assert printed == pytest.approx(acc, abs=1e-4 + 1 / 512)
    stored = torch.load(trained_toy.ckpt, weights_only=True)["metrics"]["val_acc"]
    assert stored == pytest.approx(acc, abs=1 / 512)


def test_ternqc_loads_it_into_the_same_weights(trained_toy: Trained) -> None:
    ours = build_model("toy")
    load_checkpoint_(ours, trained_toy.ckpt)
    mase = load_like_mase(trained_toy.ckpt)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), mase.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b)


def test_train_is_reproducible_by_seed(tmp_path, trained_toy: Trained) -> None:
    """The same command twice gives the same weights (seeded init and shuffle)."""
    again = tmp_path / "again.ckpt"
    run = run_cli("train", "--out", again, "--no-progress")
    assert run.rc == 0, run
    a = torch.load(trained_toy.ckpt, weights_only=True)["state_dict"]
    b = torch.load(again, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--model", "tyo"], "'toy'"),
        (["--dataset", "toy-tiyn"], "'toy-tiny'"),
    ],
)
def test_bad_training_options_are_exit_1(tmp_path, args, needle) -> None:
    out = tmp_path / "x.ckpt"
    run = run_cli("train", *args, "--out", out, "--no-progress")
    assert_one_clean_error(run, needle)
    assert not out.exists()
