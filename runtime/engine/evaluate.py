"""`ternqc apply --engine int`: the converted model's accuracy on the integer engine.

In: a converted (simulated) model and a dataset spec. Out: the engine model's validation accuracy and the
`EngineReport` (which layers run on integer matmuls, which stay simulated and why). The simulated model is
left as it is (it stays the one written to `ternary.ckpt`, for fine-tuning).
"""

from __future__ import annotations

import copy

from torch import nn

from ternqc.runtime.engine.convert import EngineReport, to_engine_
from ternqc.runtime.models.data import build_dataset
from ternqc.runtime.models.evaluate import accuracy


def engine_accuracy(model: nn.Module, dataset: str, split: str = "validation") -> tuple[float, EngineReport]:
    """`(accuracy on the engine, report)` of a copy of `model` put on the integer engine."""
    engine = copy.deepcopy(model)
    report = to_engine_(engine)
    return accuracy(engine, build_dataset(dataset, split)), report


__all__ = ["engine_accuracy"]
