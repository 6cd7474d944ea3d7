"""`ternqc.finetune(...)`: quantisation-aware fine-tuning from Python, in one call.

In: a model (a built-in name, `FILE.py:factory`, or an `nn.Module` you hold), its float checkpoint, a rules
file (a path, or a shipped recipe's file name such as `"ternary_act.tq"`) and the fine-tuning options of
`ternqc finetune`. Out: the runtime's `FinetuneResult` (`.result` is an `ApplyResult` with the fine-tuned
model, `.post_training_accuracy`, `.history`), and with `out=` the four files `ternqc apply` writes.
torch is imported when this is called, not when `ternqc` is imported.
"""

from __future__ import annotations

import os
from typing import Any


def finetune(
    model: Any = "digits-mlp",
    ckpt: str | os.PathLike | None = None,
    rules: str | os.PathLike = "ternary_act.tq",
    *,
    dataset: str | None = None,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    learn_activations: bool = True,
    distill: float = 0.0,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Calibrate and convert `model` by `rules` as `ternqc apply` does, then fine-tune it with the quantisers
    in the loop (see `ternqc.runtime.run.finetune`).

    Args:
        model: a built-in name (`toy`, `digits-mlp`, `digits-cnn`), a `FILE.py:factory` spec, or an
            `nn.Module` (converted and trained in place; then `dataset` is required, and `ckpt` is ignored).
        ckpt: the float checkpoint to load into a model built from a spec.
        rules: a `.tq` file, or the file name of a shipped recipe (`weights_only.tq`, `ternary_act.tq`, ...).
        dataset: a built-in dataset or `FILE.py:factory`; default: the model's own (`digits` for the digits
            models, `toy-tiny` otherwise).
        epochs, lr, batch_size, learn_activations, distill, seed: as `ternqc finetune`'s options.
        out: a folder to write `stats.toml`, `quant_config.toml`, `ternary.ckpt` and `report.json` into.
        progress: progress bars on stderr.

    Returns:
        `FinetuneResult`.

    Raises:
        ternqc.runtime.errors.UserError: bad settings, or a failure of the model, the data or the rules.
        ternqc.compiler.CompileError: the rules do not compile.
    """
    from torch import nn

    from ternqc.compiler import builtin_recipe, compile_file
    from ternqc.runtime.errors import UserError
    from ternqc.runtime.io.checkpoints import load_checkpoint_
    from ternqc.runtime.models.builtin import build_model, default_dataset
    from ternqc.runtime.run import pipeline
    from ternqc.runtime.run.finetune import FinetuneSettings
    from ternqc.runtime.run.finetune import finetune as run_finetune

    path = os.fspath(rules)
    if not os.path.exists(path) and os.sep not in path:
        try:
            path = str(builtin_recipe(path))
        except FileNotFoundError as exc:
            raise UserError(f"rules {path!r}: no such file, and {exc}") from exc
    plan = compile_file(path).plan
    if isinstance(model, nn.Module):
        if dataset is None:
            raise UserError("finetune(model=<nn.Module>) needs dataset= (a built-in name or FILE.py:factory)")
        spec, module = type(model).__name__, model
    else:
        spec = str(model)
        module = build_model(spec)
        if ckpt is not None:
            load_checkpoint_(module, os.fspath(ckpt))
    settings = pipeline.RunSettings(
        model=spec, ckpt=None if ckpt is None else os.fspath(ckpt),
        dataset=dataset or default_dataset(spec), seed=seed, progress=progress,
    )
    tune = FinetuneSettings(epochs=epochs, lr=lr, batch_size=batch_size, learn_activations=learn_activations,
                            distill=distill, seed=seed, progress=progress)
    tuned = run_finetune(module.eval(), plan, settings, tune)
    if out is not None:
        pipeline.write_apply_outputs(os.fspath(out), tuned.result, settings)
    return tuned
