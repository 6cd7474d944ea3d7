"""Batches and model outputs in the forms real models use.

In: one batch as a DataLoader yields it, a model, its raw output. Out: `(inputs, labels)`, the model called
the right way, the logits tensor.

Batch forms (what a default-collated DataLoader yields for each item form):
- `(input, label)`: `model(input)`;
- `(tuple_of_inputs, label)`: `model(*inputs)`;
- a dict of tensors (Hugging Face's `input_ids`, `attention_mask`, ...): `model(**inputs)`, where the key
  `labels` is the label and is not passed to the model (a dict without `labels` has no label).
Output forms: a tensor; a tuple or list (its first element); an object or dict with `logits` (Hugging Face's
`ModelOutput`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ternqc.runtime.errors import UserError

LABELS_KEY = "labels"


def split_batch(batch: Any, *, where: str = "the data") -> tuple[Any, Any]:
    """`(inputs, labels)` of one batch in one of the forms of the module docstring.

    Raises:
        UserError: the batch is neither a dict nor an `(inputs, label)` pair.
    """
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != LABELS_KEY}
        return inputs, batch.get(LABELS_KEY)
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    parts = f" of {len(batch)} parts" if isinstance(batch, (list, tuple)) else ""
    msg = (
        f"{where} must yield (input, label) pairs, ((inputs...), label) pairs or dicts of tensors (with an "
        f"optional 'labels' key); a batch is a {type(batch).__name__}{parts}"
    )
    raise UserError(msg)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """`model(**inputs)` for a dict, `model(*inputs)` for a tuple or list, else `model(inputs)`."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def model_logits(output: Any) -> torch.Tensor | None:
    """The tensor of scores in a model's output (see the module docstring), or None when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def describe_output(output: Any) -> str:
    """A short description of a model output for messages (`a tensor of shape [8, 2]`, `a dict`...)."""
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {list(output.shape)}"
    return f"a {type(output).__name__}"


def batch_count(inputs: Any, labels: Any = None) -> int:
    """How many samples a batch holds: the first dimension of its labels or first input tensor."""
    for value in (labels, inputs):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, Mapping):
            value = list(value.values())
        if isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    return int(v.shape[0])
    return 1


__all__ = ["LABELS_KEY", "batch_count", "call_model", "describe_output", "model_logits", "split_batch"]
