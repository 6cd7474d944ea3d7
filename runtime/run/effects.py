"""What a quantisation will and did do to a real model, beyond the numbers: calls per forward, quantisers
that cannot take effect, fused fast paths turned off, tied weights.

In: a model, one calibration batch, the configs. Out: `ModelCheck` (how often each quantisable module runs
per forward, and the task to evaluate, found before calibrating), `Effect`s (a tensor a rule quantises that
cannot take effect, with the reason) and plain notes.

- A module that is never called during a forward (`MultiheadAttention.out_proj`: its parent reads its weight)
  cannot have its input quantised: the hook that would do it never runs. Its weight and bias still can: they
  are parametrized, so every reader sees the quantised values.
- A `TransformerEncoderLayer` takes a fused fast path in eval mode that calls none of its children; any hook
  inside it turns that off, so a child whose input is quantised (by a pre-hook) keeps the quantiser.
- Tied parameters (GPT-2's `lm_head.weight` is `transformer.wte.weight`): each module that quantises the
  shared latent weight reads its own q(weight); a module that does not reads the float latent.
- Weight matrices held by modules of no quantisable type (`MultiheadAttention.in_proj_weight`, a bare
  Parameter) cannot be selected by any rule: one note lists them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from attrs import frozen
from torch import nn
from torch.nn.utils import parametrize

from ternqc.plan import FLOAT_WIDTH, QUANTISABLE, Binding, Const, Plan, expr_stat_refs, split_param
from ternqc.runtime.calibrate.loop import describe_failure
from ternqc.runtime.calibrate.points import module_type
from ternqc.runtime.errors import UserError
from ternqc.runtime.models.batches import call_model, split_batch
from ternqc.runtime.models.metrics import Task, infer_task
from ternqc.runtime.quantize.modules import is_converted, latent_param
from ternqc.runtime.quantize.resolve import resolve_bindings

FUSED_BLOCKS = (nn.TransformerEncoderLayer,)


@frozen
class ModelCheck:
    """`calls`: module path -> how many times it runs in one forward (quantisable modules only);
    `task`: what evaluation measures (None when nothing is evaluated)."""

    calls: dict[str, int]
    task: Task | None


@frozen
class Effect:
    """A tensor a rule quantises whose quantisation cannot take effect: it stays in float, for `reason`."""

    path: str
    tensor: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.tensor} stays in float: {self.reason}"


def check_model(
    model: nn.Module,
    batch: tuple[Any, Any],
    evaluation: Any = None,
    metric: Callable | None = None,
    around: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> ModelCheck:
    """Run one calibration batch through `model` (eval mode, no gradients), counting the calls of every
    quantisable module; then, when there is evaluation data, run its first batch and decide the task.
    `around()`: a context that batch's forward (only) runs in, e.g. `FirstBatchProbe.collecting`.

    Raises:
        UserError: the model fails on the batch (naming the module), or its output or labels fit no task
            (before any calibration is spent).
    """
    inputs, _ = batch
    counts: dict[str, int] = {}
    handles = []
    for path, module in model.named_modules():
        if module_type(module) in QUANTISABLE:
            counts[path] = 0
            handles.append(module.register_forward_pre_hook(_counter(counts, path)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (around() if around is not None else contextlib.nullcontext()):
            try:
                call_model(model, inputs)
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise describe_failure(model, inputs, exc) from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    task = None
    if evaluation is not None:
        task = _task(model, evaluation, metric)
    return ModelCheck(calls=counts, task=task)


def _counter(counts: dict[str, int], path: str) -> Callable:
    def hook(_module, _args):
        counts[path] += 1

    return hook


def _task(model: nn.Module, evaluation: Any, metric: Callable | None) -> Task:
    first = next(iter(evaluation), None)
    if first is None:
        msg = "the evaluation data yielded no batch"
        raise UserError(msg)
    inputs, labels = split_batch(first, where="the evaluation data")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                output = call_model(model, inputs)
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise describe_failure(model, inputs, exc, "evaluation inputs") from exc
    finally:
        model.train(was_training)
    try:
        return infer_task(output, labels, inputs, metric)
    except UserError as exc:
        msg = f"checked on one evaluation batch before calibrating: {exc}"
        raise UserError(msg) from exc


def never_called(
    plan: Plan, calls: dict[str, int], modules: list[tuple[str, str]]
) -> tuple[set[tuple[str, str]], list[Effect]]:
    """What cannot be evaluated or take effect on modules that never run as modules (`calls[path] == 0`):

    - their input and output: no hook sees them (always left unset; an `Effect` when a rule quantises one,
      i.e. the winning `data_in_width` / `data_out_width` is not a plain 32 or unset);
    - a weight or bias whose parameters read the module's own input or output statistics (there are none; an
      `Effect` when its width is not a plain 32 or unset).
    Their weights otherwise are quantised as the rules say (a parametrization needs no call).

    Args:
        modules: the model's `(path, type)` in order (first(T) / last(T) need the whole model).

    Returns:
        `(path, tensor)` pairs whose parameters stay unset, and the effects to name.
    """
    types = dict(modules)
    idle = {path for path, n in calls.items() if n == 0}
    absent: set[tuple[str, str]] = set()
    effects = []
    for path, winners in resolve_bindings(plan.bindings, modules).items():
        if path not in idle:
            continue
        for tensor in QUANTISABLE[types[path]]:
            own = {p: rp for p, rp in winners.items() if (split_param(p) or ("",))[0] == tensor}
            width = own.get(f"{tensor}_width")
            wanted = width is not None and not _is_float_width(width.binding)
            if tensor in ("data_in", "data_out"):
                absent.add((path, tensor))
                if wanted:
                    what = "input" if tensor == "data_in" else "output"
                    reason = (
                        "the module is never called during the forward (its parent uses its weight directly, as "
                        f"MultiheadAttention does with out_proj), so no quantiser can see its {what} (rule at "
                        f"{width.binding.origin}); its weight and bias are still quantised in place"
                    )
                    effects.append(Effect(path, tensor, reason))
                continue
            reading = [rp.binding for rp in own.values() if _reads_own_activations(rp.binding)]
            if reading:
                absent.add((path, tensor))
                if wanted:
                    reason = (
                        f"its rules read the module's input or output statistics (rule at {reading[0].origin}), "
                        "but the module is never called during the forward, so there are none"
                    )
                    effects.append(Effect(path, tensor, reason))
    return absent, effects


def _is_float_width(b: Binding) -> bool:
    return isinstance(b.value, Const) and b.value.value in (None, FLOAT_WIDTH)


def _reads_own_activations(b: Binding) -> bool:
    return any(r.module is None and r.tensor.startswith("data_") for r in expr_stat_refs(b.value))


def fast_path_notes(model: nn.Module) -> list[str]:
    """One note per fused block (`TransformerEncoderLayer`) whose fast path a quantised input turns off."""
    notes = []
    for path, block in model.named_modules():
        if not isinstance(block, FUSED_BLOCKS):
            continue
        inner = [f"{path}.{p}" if path else p for p, m in block.named_modules()
                 if p and (getattr(m, "ternary_input", None) is not None
                           or getattr(m, "ternary_output", None) is not None)]
        if inner:
            notes.append(
                f"{path or 'the model'} ({type(block).__name__}): fused fast path off, so that the input "
                f"quantisers of {', '.join(inner)} run (its quantised weights alone would keep it on)"
            )
    return notes


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """id of each Parameter -> the `module.name` paths holding it (more than one when tied)."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is not None:
                full = f"{path}.{name}" if path else name
                if full not in owners.setdefault(id(p), []):
                    owners[id(p)].append(full)
    return owners


def tied_notes(model: nn.Module, owners: dict[int, list[str]]) -> list[str]:
    """For each quantised parameter tied to others (found in `owners`, taken before conversion): who reads
    the ternary weight and who the float one."""
    notes = []
    for path, module in model.named_modules():
        if not is_converted(module):
            continue
        for tensor in ("weight", "bias"):
            latent = latent_param(module, tensor)
            if latent is None:
                continue
            here = f"{path}.{tensor}"
            others = [o for o in owners.get(id(latent), []) if o != here]
            if not others:
                continue
            ternary = [o for o in others if _is_quantised(model, o)]
            floats = [o for o in others if o not in ternary]
            text = f"{here} is tied to {', '.join(others)}: they share one latent float weight"
            if floats:
                text += (f"; {here} reads it ternary, {', '.join(floats)} in float (a rule for its type, e.g. "
                         "embedding, quantises it too)")
            else:
                text += "; each module quantises it with its own Δ and α"
            notes.append(text)
    return notes


def _is_quantised(model: nn.Module, owner: str) -> bool:
    path, _, tensor = owner.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return is_converted(module) and latent_param(module, tensor) is not None


def unreachable_weights(model: nn.Module) -> list[str]:
    """One note for the weight matrices (2-D or more) that modules of no quantisable type hold themselves,
    such as `MultiheadAttention.in_proj_weight`: no rule can select them, so they stay in float."""
    found = []
    for path, module in model.named_modules():
        if module_type(module) in QUANTISABLE or isinstance(module, parametrize.ParametrizationList):
            continue
        for name, p in module._parameters.items():
            if p is not None and p.dim() >= 2 and p.is_floating_point():
                where = f"{path}.{name}" if path else name
                found.append(f"{where} ({type(module).__name__}, {list(p.shape)})")
    if not found:
        return []
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    return [f"weights held by modules of no quantisable type stay in float (no rule can select them): {shown}"]


def repeated_calls(calls: dict[str, int]) -> dict[str, int]:
    """The modules that run more than once per forward, with their count."""
    return {path: n for path, n in calls.items() if n > 1}


def conversion_notes(model: nn.Module, owners: dict[int, list[str]], calls: dict[str, int]) -> tuple[str, ...]:
    """Every note about a converted model: fast paths turned off, tied weights, weights no rule can select
    (when anything was converted), modules called several times per forward (among `calls`)."""
    notes = fast_path_notes(model) + list(dict.fromkeys(tied_notes(model, owners)))
    if any(is_converted(m) for m in model.modules()):
        notes += unreachable_weights(model)
    notes += [f"{path}: called {n} times per forward; its statistics count every call"
              for path, n in repeated_calls(calls).items()]
    return tuple(notes)


__all__ = [
    "Effect",
    "ModelCheck",
    "check_model",
    "conversion_notes",
    "fast_path_notes",
    "never_called",
    "parameter_owners",
    "repeated_calls",
    "tied_notes",
    "unreachable_weights",
]
