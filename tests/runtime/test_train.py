"""Training: toy reaches >= 0.97 validation accuracy, keeps the best state, writes a loadable checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ternqc.runtime.errors import UserError
from ternqc.runtime.io.checkpoints import load_checkpoint_
from ternqc.runtime.models.builtin import ToyNet, build_model
from ternqc.runtime.models.data import build_dataset
from ternqc.runtime.models.evaluate import loss_and_accuracy
from ternqc.runtime.models.train import TrainResult, run_train, train_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`ternqc train --model toy --dataset toy-tiny` with the defaults, once for this module."""
    out = tmp_path_factory.mktemp("train") / "best.ckpt"
    rng_before = torch.random.get_rng_state()
    result = run_train("toy", "toy-tiny", out=out, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is left alone
    return result, out


def test_toy_reaches_097_validation_accuracy(toy_run):
    result, _ = toy_run
    assert isinstance(result, TrainResult)
    assert result.best_val_accuracy >= 0.97


def test_best_epoch_is_the_lowest_validation_loss(toy_run):
    result, _ = toy_run
    losses = [h.val_loss for h in result.history]
    assert [h.epoch for h in result.history] == list(range(len(losses)))
    assert result.best_val_loss == min(losses)
    assert result.history[result.best_epoch].val_loss == min(losses)
    assert losses.index(min(losses)) == result.best_epoch  # ties keep the earlier epoch
    assert result.history[-1].val_loss >= result.best_val_loss


def test_checkpoint_holds_the_best_state_for_ternqc_and_mase(toy_run):
    result, out = toy_run
    val = build_dataset("toy-tiny", "validation")
    ours = ToyNet()
    meta = load_checkpoint_(ours, out)
    assert meta["epoch"] == result.best_epoch
    assert meta["metrics"]["val_loss"] == pytest.approx(result.best_val_loss)
    loss, acc = loss_and_accuracy(ours, val)
    assert acc == result.best_val_accuracy and acc >= 0.97
    assert loss == pytest.approx(result.best_val_loss, rel=1e-5)
    # MASE's rule: strip the first dotted part of `model.` keys, load strictly into a fresh toy model.
    raw = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    mase = ToyNet()
    mase.load_state_dict({k.split(".", 1)[1]: v for k, v in raw.items()}, strict=True)
    x = val.inputs[:64]
    with torch.no_grad():
        assert torch.equal(mase(x), ours(x))


def test_same_seed_same_result_and_model_holds_best_state():
    ds_train, ds_val = build_dataset("toy-tiny", "train"), build_dataset("toy-tiny", "val")
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ToyNet()
        result = train_model(
            model, ds_train, ds_val, epochs=4, lr=1e-2, batch_size=64, seed=3, progress=False
        )
        results.append(result)
        loss, acc = loss_and_accuracy(model, ds_val)
        assert loss == pytest.approx(result.best_val_loss, rel=1e-6) and acc == result.best_val_accuracy
    assert results[0] == results[1]


def test_user_model_and_data_train(tmp_path):
    result = run_train(
        f"{FIXTURES / 'user_model.py'}:factory",
        f"{FIXTURES / 'user_data.py'}:factory",
        epochs=3,
        out=tmp_path / "user.ckpt",
        progress=False,
    )
    assert result.best_val_accuracy >= 0.95
    load_checkpoint_(build_model(f"{FIXTURES / 'user_model.py'}:factory"), tmp_path / "user.ckpt")


def test_progress_bar_shows_losses(capsys):
    ds = build_dataset("toy-tiny", "train")
    train_model(ToyNet(), ds, ds, epochs=2, lr=1e-2, batch_size=256, seed=0, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "val_loss" in captured.err and "val_acc" in captured.err and "2/2" in captured.err


@pytest.mark.parametrize(
    ("settings", "text"),
    [({"epochs": 0}, "--epochs"), ({"lr": 0.0}, "--lr"), ({"batch_size": 0}, "--batch-size")],
)
def test_bad_settings(tmp_path, settings, text):
    kwargs = {"epochs": 1, "lr": 1e-2, "batch_size": 8, "seed": 0, "out": tmp_path / "x.ckpt"} | settings
    with pytest.raises(UserError, match=text):
        run_train("toy", "toy-tiny", progress=False, **kwargs)
    assert not (tmp_path / "x.ckpt").exists()


def test_diverged_training_is_a_user_error():
    class NaNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) * float("nan")

    ds = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    with pytest.raises(UserError, match="diverged"):
        train_model(NaNNet(), ds, ds, epochs=2, lr=1e-2, batch_size=4, seed=0, progress=False)


def test_model_without_parameters():
    ds = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    with pytest.raises(UserError, match="no trainable parameters"):
        train_model(nn.Identity(), ds, ds, epochs=1, lr=1e-2, batch_size=4, seed=0, progress=False)


def test_model_rejecting_the_data_names_the_dataset(tmp_path):
    data = f"{FIXTURES / 'bad_factories.py'}:data_wrong_shape"
    with pytest.raises(UserError) as info:
        run_train("toy", data, epochs=1, out=tmp_path / "x", progress=False)
    assert "data_wrong_shape train" in str(info.value) and "ToyNet" in str(info.value)
