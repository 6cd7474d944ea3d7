"""Evaluation: classification accuracy and mean cross-entropy of a model on a dataset.

`accuracy(model, dataset)` and `loss_and_accuracy(model, dataset)` run the model in eval mode under
`torch.no_grad()` over the dataset in order (no shuffle) and compare the argmax of its outputs with the
labels. The model's train/eval mode is restored afterwards. The batch helpers `forward_logits` and
`batch_loss` are shared with training: a model that raises on the dataset's inputs, outputs that are not
`[batch, classes]` logits, or labels that are not class indices become a `UserError` naming the dataset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ternqc.runtime.errors import UserError


def dataset_name(dataset: Dataset, name: str | None = None) -> str:
    """`name` when given, else the dataset's class name, for messages."""
    return name or type(dataset).__name__


def batches(dataset: Dataset, batch_size: int, *, name: str | None = None, **loader_kwargs) -> Iterator:
    """Yield `(inputs, labels)` batches from a `DataLoader`; a collate failure becomes a `UserError`."""
    loader = DataLoader(dataset, batch_size=batch_size, **loader_kwargs)
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            msg = (
                f"reading a batch of {batch_size} from dataset {dataset_name(dataset, name)} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            raise UserError(msg) from exc
        yield batch


def forward_logits(model: nn.Module, inputs, *, dataset: str) -> torch.Tensor:
    """`model(inputs)`, checked to be a `[batch, classes]` tensor; exceptions become a `UserError`."""
    try:
        out = model(inputs)
    except UserError:
        raise
    except Exception as exc:
        msg = (
            f"the model {type(model).__name__} raised {type(exc).__name__} on inputs from dataset {dataset}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else '(no message)'}"
        )
        raise UserError(msg) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        msg = (
            f"the model {type(model).__name__} should return class scores shaped [batch, classes] on "
            f"dataset {dataset}, but returned {got}"
        )
        raise UserError(msg)
    return out


def _check_labels(logits: torch.Tensor, labels, *, dataset: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        msg = f"dataset {dataset} has {labels.dtype} labels; classification needs integer class indices"
        raise UserError(msg)
    labels = labels.reshape(-1).long()
    if labels.numel() != logits.shape[0]:
        msg = f"dataset {dataset}: {labels.numel()} labels for a batch of {logits.shape[0]} model outputs"
        raise UserError(msg)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        msg = (
            f"dataset {dataset} has labels in [{int(labels.min())}, {int(labels.max())}] but the model "
            f"outputs scores for {logits.shape[1]} classes"
        )
        raise UserError(msg)
    return labels


def batch_loss(model: nn.Module, inputs, labels, *, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the batch, number of correct argmax predictions) for one batch."""
    logits = forward_logits(model, inputs, dataset=dataset)
    labels = _check_labels(logits, labels, dataset=dataset)
    loss = F.cross_entropy(logits.float(), labels)
    correct = (logits.argmax(dim=1) == labels).sum()
    return loss, correct


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def loss_and_accuracy(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, *, name: str | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on all of `dataset`, in eval mode without gradients.

    Args:
        model: returns class scores `[batch, classes]`.
        dataset: map-style, items `(input, label)` with integer labels.
        batch_size: evaluation batch size (does not change the result).
        name: the dataset's name for messages (e.g. `toy-tiny validation`).

    Returns:
        `(loss, accuracy)`: loss averaged over samples, accuracy = share of samples whose argmax is the label.

    Raises:
        UserError: the model raises on the inputs, returns something other than `[batch, classes]`, the
            labels are not class indices, or the dataset is empty.
    """
    shown = dataset_name(dataset, name)
    total_loss, correct, count = 0.0, 0, 0
    with _eval_mode(model):
        for inputs, labels in batches(dataset, batch_size, name=shown):
            loss, right = batch_loss(model, inputs, labels, dataset=shown)
            n = int(labels.shape[0]) if isinstance(labels, torch.Tensor) else len(labels)
            total_loss += float(loss) * n
            correct += int(right)
            count += n
    if count == 0:
        msg = f"dataset {shown} is empty: nothing to evaluate"
        raise UserError(msg)
    return total_loss / count, correct / count


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256, *, name: str | None = None) -> float:
    """Share of `dataset`'s samples whose argmax output equals the label (eval mode, no gradients).

    Raises:
        UserError: as `loss_and_accuracy`.
    """
    return loss_and_accuracy(model, dataset, batch_size, name=name)[1]
