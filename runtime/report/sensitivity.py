"""Which layer loses the accuracy: per quantised module, the accuracy of the model with only that module
quantised (`apply --sensitivity`).

In: the float model, the ternary configs, and a function that evaluates a model (its headline metric on the
evaluation data). Out: `{module path: metric}`. One evaluation per quantised module, each on a copy of the float
model with that one module converted; the model itself is not changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from ternqc.runtime.progress import progress as progress_bar
from ternqc.runtime.quantize.convert import convert_
from ternqc.runtime.quantize.quantizers import ModuleQuant


def layer_sensitivity(
    model: nn.Module,
    configs: dict[str, ModuleQuant],
    evaluate: Callable[[nn.Module], float],
    *,
    progress: bool = False,
) -> dict[str, float]:
    """`{path: evaluate(model with only the module at path converted)}` for every module whose config
    quantises anything, in `configs` order.

    Raises:
        UserError: as `convert_` and `evaluate`.
    """
    paths = [p for p, mq in configs.items() if mq.quantises_anything]
    out = {}
    for path in progress_bar(paths, total=len(paths), desc="sensitivity", enabled=progress):
        single = copy.deepcopy(model)
        convert_(single, {path: configs[path]})
        out[path] = evaluate(single)
    return out
