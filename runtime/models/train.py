"""Training: fit a classifier on CPU, keep the best validation-loss state, write a Lightning checkpoint.

`train_model(model, train_ds, val_ds, epochs=, lr=, batch_size=, seed=)` trains `model` in place with Adam
and cross-entropy, evaluates on `val_ds` after every epoch, and loads the state with the lowest validation
loss back into `model`; it returns a `TrainResult` (the best epoch, its validation loss and accuracy, and the
per-epoch history). Everything random (weight init in `run_train`, shuffling, dropout) follows `seed`,
without disturbing the caller's global RNG.

`run_train(model_spec, dataset_spec, ...)` is `ternqc train`: build model and data, train, and write the
best state to `out` in the Lightning layout (`checkpoints.save_lightning_checkpoint`). It prints nothing
but the progress bar (one line, epochs, with the latest losses and accuracy).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any

import torch
from attrs import frozen
from torch import nn
from torch.utils.data import Dataset

from ternqc.runtime import ranges
from ternqc.runtime.errors import UserError
from ternqc.runtime.io.checkpoints import save_lightning_checkpoint
from ternqc.runtime.models.builtin import build_model
from ternqc.runtime.models.data import build_dataset
from ternqc.runtime.models.evaluate import batch_loss, batches, dataset_name, loss_and_accuracy
from ternqc.runtime.progress import progress as progress_bar

#: Defaults of `ternqc train`: they take the toy model to >= 0.98 validation accuracy on toy-tiny in about
#: half a second here, for every seed tried (MASE's lr 1e-5 leaves it at 0.46; lr 1e-3 gives 0.973-0.988).
DEFAULT_EPOCHS = 30
DEFAULT_LR = 1e-2
DEFAULT_BATCH_SIZE = 64


@frozen
class TrainDefaults:
    """What `ternqc train` uses for a model when the command line does not say."""

    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE


#: Per built-in model; user factories get the toy's. The digits models: Adam 3e-3 (lr 1e-2 overshoots them).
MODEL_DEFAULTS = {
    "toy": TrainDefaults(),
    "digits-mlp": TrainDefaults(epochs=40, lr=3e-3),
    "digits-cnn": TrainDefaults(epochs=40, lr=3e-3),
}
#: Models up to this many parameters train on one intra-op thread. Their ops are too small to gain from
#: threads, and on a busy 2-core machine two threads made toy training 30x slower (16 s instead of 0.5 s).
SINGLE_THREAD_MAX_PARAMS = 1_000_000


@frozen
class EpochStats:
    """One epoch: mean training loss, validation loss and accuracy, optimizer steps taken so far."""

    epoch: int  # 0-based, as Lightning counts
    train_loss: float
    val_loss: float
    val_accuracy: float
    global_step: int


@frozen
class TrainResult:
    """The epoch with the lowest validation loss (its state is what the model holds after training)."""

    best_epoch: int  # 0-based
    best_val_loss: float
    best_val_accuracy: float
    history: tuple[EpochStats, ...]


class LiveDesc:
    """A progress-bar label that changes as training goes (the bar formats it with `f"{desc}"`)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __format__(self, spec: str) -> str:
        return format(self.text, spec)


@contextlib.contextmanager
def threads_for(model: nn.Module):
    """One intra-op thread while training a small model; the previous setting is restored."""
    before = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) <= SINGLE_THREAD_MAX_PARAMS
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _check_settings(epochs: int, lr: float, batch_size: int) -> None:
    ranges.count("--epochs", epochs)
    ranges.positive("--lr", lr)
    ranges.count("--batch-size", batch_size)


def _check_finite(inputs: Any, dataset: str) -> None:
    """Refuse a batch of floating-point inputs holding NaN or infinity: training on it only ever "diverges",
    which would blame the learning rate."""
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        nan, inf = int(torch.isnan(inputs).sum()), int(torch.isinf(inputs).sum())
        msg = (
            f"the training data {dataset} holds non-finite inputs ({nan} NaN and {inf} infinite values in a "
            f"batch of {inputs.numel()}); ternqc trains on finite data only"
        )
        raise UserError(msg)


def train_model(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
    train_name: str | None = None,
    val_name: str | None = None,
) -> TrainResult:
    """Train `model` in place with Adam and cross-entropy; end holding the best validation-loss state.

    Args:
        model: a classifier returning `[batch, classes]` scores; trained on CPU as given.
        train_ds, val_ds: map-style datasets of `(input, label)`; the training set is reshuffled every
            epoch by a generator seeded with `seed`.
        epochs, lr, batch_size: the usual; `lr` is Adam's learning rate.
        seed: seeds the shuffling and any randomness in the model (dropout); the caller's global RNG state
            is restored afterwards.
        progress: draw a progress bar over epochs on stderr.
        train_name, val_name: names of the datasets for messages.

    Returns:
        `TrainResult`; ties in validation loss keep the earlier epoch.

    Raises:
        UserError: bad settings, a model without trainable parameters, a model that rejects the data, or
            a validation loss that never was finite (diverged).
    """
    _check_settings(epochs, lr, batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"the model {type(model).__name__} has no trainable parameters")
    train_shown = dataset_name(train_ds, train_name)
    val_shown = dataset_name(val_ds, val_name)
    history: list[EpochStats] = []
    best: EpochStats | None = None
    best_state: dict[str, torch.Tensor] | None = None
    step = 0
    desc = LiveDesc("train")
    with torch.random.fork_rng(devices=[]), threads_for(model):
        torch.manual_seed(seed)
        shuffle = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(params, lr=lr)
        for epoch in progress_bar(range(epochs), total=epochs, desc=desc, enabled=progress):
            model.train()
            total, count = 0.0, 0
            for inputs, labels in batches(
                train_ds, batch_size, name=train_shown, shuffle=True, generator=shuffle
            ):
                _check_finite(inputs, train_shown)
                optimizer.zero_grad(set_to_none=True)
                loss, _ = batch_loss(model, inputs, labels, dataset=train_shown)
                loss.backward()
                optimizer.step()
                step += 1
                n = len(labels)
                total += float(loss.detach()) * n
                count += n
            val_loss, val_acc = loss_and_accuracy(model, val_ds, name=val_shown)
            stats = EpochStats(epoch, total / max(count, 1), val_loss, val_acc, step)
            history.append(stats)
            if math.isfinite(val_loss) and (best is None or val_loss < best.val_loss):
                best = stats
                best_state = copy.deepcopy(model.state_dict())
            desc.text = (
                f"train loss {stats.train_loss:.4f} val_loss {val_loss:.4f} val_acc {val_acc:.4f}"
                f" (best epoch {best.epoch if best else '-'})"
            )
    if best is None or best_state is None:
        msg = (
            f"training diverged: the validation loss on {val_shown} was never finite in {epochs} epochs; "
            f"try a smaller --lr (got {lr})"
        )
        raise UserError(msg)
    model.load_state_dict(best_state)
    return TrainResult(best.epoch, best.val_loss, best.val_accuracy, tuple(history))


def run_train(
    model_spec: str,
    dataset_spec: str,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    out: str | os.PathLike = "best.ckpt",
    progress: bool = True,
) -> TrainResult:
    """`ternqc train`: build the model (initialised under `seed`) and the train/validation splits, train,
    and write the best state to `out` as a Lightning checkpoint (`state_dict` with `model.` keys, `epoch`,
    `global_step`, `metrics` = val_loss / val_acc / train_loss of the best epoch). `epochs`, `lr` and
    `batch_size` left at None take the model's `MODEL_DEFAULTS` (the toy's for a user factory).

    Returns:
        The `TrainResult`; the checkpoint holds the state of `result.best_epoch`.

    Raises:
        UserError: from building the model or data, training, or writing `out`.
    """
    defaults = MODEL_DEFAULTS.get(model_spec, TrainDefaults())
    epochs = defaults.epochs if epochs is None else epochs
    lr = defaults.lr if lr is None else lr
    batch_size = defaults.batch_size if batch_size is None else batch_size
    _check_settings(epochs, lr, batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_spec)
    train_ds = build_dataset(dataset_spec, "train")
    val_ds = build_dataset(dataset_spec, "validation")
    result = train_model(
        model,
        train_ds,
        val_ds,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        train_name=f"{dataset_spec} train",
        val_name=f"{dataset_spec} validation",
    )
    best = result.history[result.best_epoch]
    save_lightning_checkpoint(
        out,
        model,
        epoch=best.epoch,
        global_step=best.global_step,
        metrics={"val_loss": best.val_loss, "val_acc": best.val_accuracy, "train_loss": best.train_loss},
        extra={
            "ternqc": {
                "model": model_spec,
                "dataset": dataset_spec,
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "seed": seed,
            }
        },
    )
    return result
