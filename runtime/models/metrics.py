"""What to measure on a model's outputs, decided from one batch, and the measurement over many batches.

In: a model, batches (see `batches.py` for their forms), optionally a user metric. Out: a `Task` (from
`infer_task` on one batch) and `{metric name: value}` from `evaluate`.

- `[batch, classes]` scores with integer class labels `[batch]`: `accuracy` (argmax equals the label).
- `[batch, seq, vocab]` scores with token labels `[batch, seq]` (the batch's `labels`, or its `input_ids` when
  it has no labels: a causal language model predicts its own input): the position t predicts token t+1;
  `next_token_accuracy` and `perplexity` (exp of the mean cross-entropy) over every predicted token whose
  label is not -100 (Hugging Face's "ignore").
- anything else: a user metric `fn(output, labels) -> float` (`--metric FILE.py:fn`), called per batch on
  the model's raw output; the result is the mean over batches weighted by their sample counts.
The first metric of each task is its headline (`Task.headline`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from attrs import frozen
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ternqc.runtime.errors import UserError
from ternqc.runtime.models.batches import batch_count, call_model, describe_output, model_logits, split_batch

IGNORE_INDEX = -100


@frozen
class Task:
    """`kind`: `classification`, `language_model` or `custom` (then `metric` is the user's function)."""

    kind: str
    metric: Callable[[Any, Any], float] | None = None

    @property
    def headline(self) -> str:
        """The name of the task's main metric."""
        if self.kind == "classification":
            return "accuracy"
        if self.kind == "language_model":
            return "next_token_accuracy"
        return getattr(self.metric, "__name__", "metric")


def token_labels(labels: Any, inputs: Any) -> Any:
    """The labels of a language-model batch: its labels, else its `input_ids`."""
    if labels is None and isinstance(inputs, Mapping):
        return inputs.get("input_ids")
    return labels


def infer_task(output: Any, labels: Any, inputs: Any, metric: Callable | None = None) -> Task:
    """The task that fits a model's `output` on one batch and the batch's labels.

    Raises:
        UserError: the output has no scores, or their shape and the labels fit no task; the message says
            what was found and what ternqc understands.
    """
    if metric is not None:
        return Task("custom", metric)
    logits = model_logits(output)
    if logits is None:
        msg = (
            f"the model returned {describe_output(output)}; ternqc reads a tensor, a tuple (its first element) "
            "or an object or dict with `logits`. Wrap the model, or give a metric (--metric FILE.py:fn)"
        )
        raise UserError(msg)
    labels_t = labels if isinstance(labels, torch.Tensor) or labels is None else torch.as_tensor(labels)
    if logits.dim() == 2 and labels_t is not None and labels_t.numel() == logits.shape[0] and _integral(labels_t):
        return Task("classification")
    tokens = token_labels(labels_t, inputs)
    if (logits.dim() == 3 and isinstance(tokens, torch.Tensor) and tuple(tokens.shape) == tuple(logits.shape[:2])
            and _integral(tokens)):
        return Task("language_model")
    got = "no labels" if labels_t is None else f"labels of shape {list(labels_t.shape)} ({labels_t.dtype})"
    msg = (
        f"cannot evaluate the model: it returned scores of shape {list(logits.shape)} with {got}. ternqc "
        "measures classification ([batch, classes] scores, integer labels [batch]) and language models "
        "([batch, seq, vocab] scores, token labels [batch, seq]: the batch's labels or input_ids); for "
        "anything else give a metric (--metric FILE.py:fn, fn(output, labels) -> float)"
    )
    raise UserError(msg)


def _integral(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


class _Totals:
    def __init__(self) -> None:
        self.correct = 0
        self.count = 0
        self.loss = 0.0
        self.weighted = 0.0


def evaluate(model: nn.Module, batches: Iterable, task: Task, *, what: str = "the evaluation data") -> dict[str, float]:
    """The task's metrics of `model` over `batches`, in eval mode without gradients (mode restored after).

    Returns:
        classification `{"accuracy"}`; language model `{"next_token_accuracy", "perplexity"}`; custom
        `{name: weighted mean}`. The headline metric comes first.

    Raises:
        UserError: no batch at all, or a batch whose output or labels do not fit the task.
    """
    totals = _Totals()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), parametrize.cached():  # a quantised weight is computed once per evaluation
            for batch in batches:
                inputs, labels = split_batch(batch, where=what)
                output = call_model(model, inputs)
                _accumulate(task, output, labels, inputs, totals)
    finally:
        model.train(was_training)
    if totals.count == 0:
        msg = f"{what} is empty: nothing to evaluate"
        raise UserError(msg)
    if task.kind == "classification":
        return {"accuracy": totals.correct / totals.count}
    if task.kind == "language_model":
        return {
            "next_token_accuracy": totals.correct / totals.count,
            "perplexity": math.exp(totals.loss / totals.count),
        }
    return {task.headline: totals.weighted / totals.count}


def _accumulate(task: Task, output: Any, labels: Any, inputs: Any, totals: _Totals) -> None:
    if task.kind == "custom":
        n = batch_count(inputs, labels)
        totals.weighted += float(task.metric(output, labels)) * n
        totals.count += n
        return
    logits = model_logits(output)
    if logits is None:
        msg = f"the model returned {describe_output(output)} on a batch of the evaluation data"
        raise UserError(msg)
    if task.kind == "classification":
        labels = torch.as_tensor(labels).reshape(-1).long()
        if logits.dim() != 2 or labels.numel() != logits.shape[0]:
            msg = f"a batch gave scores of shape {list(logits.shape)} for {labels.numel()} labels"
            raise UserError(msg)
        totals.correct += int((logits.argmax(dim=1) == labels).sum())
        totals.count += labels.numel()
        return
    tokens = token_labels(labels, inputs)
    if tokens is None or logits.dim() != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        msg = f"a batch gave scores of shape {list(logits.shape)} for token labels that do not fit them"
        raise UserError(msg)
    scores = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = tokens[:, 1:].reshape(-1).long()
    keep = target != IGNORE_INDEX
    scores, target = scores[keep], target[keep]
    if target.numel() == 0:
        return
    totals.loss += float(F.cross_entropy(scores, target, reduction="sum"))
    totals.correct += int((scores.argmax(dim=1) == target).sum())
    totals.count += target.numel()


__all__ = ["IGNORE_INDEX", "Task", "evaluate", "infer_task", "token_labels"]
