"""Which layer loses the accuracy: per quantised module, the accuracy of the model with only that module
quantised (`apply --sensitivity`).

In: the float model, the ternary configs, the validation dataset. Out: `{module path: accuracy}`. One
evaluation per quantised module, each on a copy of the float model with that one module converted; the model
itself is not changed.
"""

from __future__ import annotations

import copy

from torch import nn

from ternqc.runtime.models.evaluate import accuracy
from ternqc.runtime.progress import progress as progress_bar
from ternqc.runtime.quantize.convert import convert_
from ternqc.runtime.quantize.quantizers import ModuleQuant


def layer_sensitivity(
    model: nn.Module, configs: dict[str, ModuleQuant], dataset, *, progress: bool = False
) -> dict[str, float]:
    """`{path: accuracy of model on dataset with only the module at path converted}` for every module whose
    config quantises anything, in `configs` order.

    Raises:
        UserError: as `convert_` and `accuracy`.
    """
    paths = [p for p, mq in configs.items() if mq.quantises_anything]
    out = {}
    for path in progress_bar(paths, total=len(paths), desc="sensitivity", enabled=progress):
        single = copy.deepcopy(model)
        convert_(single, {path: configs[path]})
        out[path] = accuracy(single, dataset)
    return out
