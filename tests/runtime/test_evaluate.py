"""accuracy / loss_and_accuracy against numpy on the same outputs, and the errors they report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ternqc.runtime.errors import UserError
from ternqc.runtime.models.builtin import ToyNet
from ternqc.runtime.models.data import build_dataset
from ternqc.runtime.models.evaluate import accuracy, loss_and_accuracy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _numpy_loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    return float(loss), float((logits.argmax(axis=1) == labels).mean())


@pytest.mark.parametrize("batch_size", [1000, 256, 37])
def test_matches_numpy_on_the_same_outputs(batch_size):
    torch.manual_seed(0)
    model = ToyNet()
    ds = build_dataset("toy-tiny", "validation")
    with torch.no_grad():
        logits = model(ds.inputs).numpy()
    want_loss, want_acc = _numpy_loss_and_accuracy(logits, ds.labels.numpy())
    loss, acc = loss_and_accuracy(model, ds, batch_size=batch_size)
    assert acc == pytest.approx(want_acc, abs=1e-12)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert accuracy(model, ds, batch_size=batch_size) == acc


def test_eval_mode_no_grad_and_mode_restored():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.seen = []

        def forward(self, x):
            self.seen.append((self.training, torch.is_grad_enabled()))
            return self.fc(x)

    model = Probe()
    model.train()
    ds = TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,)))
    accuracy(model, ds, batch_size=4)
    assert set(model.seen) == {(False, False)}
    assert model.training


def test_model_rejecting_the_inputs_names_dataset_and_exception():
    ds = build_dataset(f"{FIXTURES / 'bad_factories.py'}:data_wrong_shape", "train")
    with pytest.raises(UserError) as info:
        accuracy(ToyNet(), ds, name="wrong-shape train")
    msg = str(info.value)
    assert "ToyNet" in msg and "wrong-shape train" in msg and "RuntimeError" in msg and "\n" not in msg


def test_outputs_must_be_class_scores():
    ds = TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match=r"\[batch, classes\].*returned a tuple"):
        accuracy(lambda_module(lambda x: (x, x)), ds)
    with pytest.raises(UserError, match=r"returned shape \[4\]"):
        accuracy(lambda_module(lambda x: x.sum(1)), ds)


def test_labels_must_be_class_indices_in_range():
    model = nn.Linear(3, 2)
    with pytest.raises(UserError, match="torch.float32 labels"):
        accuracy(model, TensorDataset(torch.randn(4, 3), torch.zeros(4)))
    with pytest.raises(UserError, match=r"labels in \[0, 5\].*2 classes"):
        accuracy(model, TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 5, 0])))


def lambda_module(fn):
    class Wrap(nn.Module):
        def forward(self, x):
            return fn(x)

    return Wrap()
