"""The runtime flow on one plan: prepare → calibrate → map → convert → evaluate, and the files it writes.

In: a `Plan` (compiled elsewhere; the runtime never parses rules), a model and dataset spec, calibration
settings. Out: `ProfileResult` (the statistics) or `ApplyResult` (statistics, parameters per node, the
ternary configs, float and ternary accuracy, a per-node report), and `write_apply_outputs` puts
`stats.toml`, `quant_config.toml`, `ternary.ckpt` and `report.json` in a folder, only after the whole run
succeeded and all or nothing: a failed run, or a failure to write any one of the four, leaves no half-written
file and every previous output as it was.

The activation scale α (mean |x| over |x| > Δ) needs Δ, which needs the statistics: it is gathered in a
second pass over the same calibration batches once Δ is known (the plan lists it as a derived statistic).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import torch
from attrs import frozen
from torch import nn

from ternqc.plan import QUANTISABLE, Plan, StatSpec, split_param
from ternqc.runtime.calibrate import loop as calib
from ternqc.runtime.calibrate import points as prof
from ternqc.runtime.calibrate.stats.states import QuantileBudget
from ternqc.runtime.calibrate.table import ModuleStats, StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import atomic_path, atomic_write_text
from ternqc.runtime.io.checkpoints import load_checkpoint_
from ternqc.runtime.io.mase_io import write_quant_config_toml, write_stats_toml
from ternqc.runtime.models.builtin import build_model
from ternqc.runtime.models.data import build_dataset
from ternqc.runtime.models.evaluate import accuracy
from ternqc.runtime.quantize import asserts, uncalled
from ternqc.runtime.quantize.convert import convert_, save_ternary_checkpoint
from ternqc.runtime.quantize.mapping import MappedModule, MappingResult, map_params
from ternqc.runtime.quantize.modules import TernaryModule
from ternqc.runtime.quantize.quantizers import ModuleQuant, module_quant_from_params

THRESHOLD_ABS_MEAN = StatSpec("threshold_abs_mean")
VALIDATION_SPLIT = "validation"


@frozen
class RunSettings:
    """Where the model and data come from and how to calibrate; `None` keeps the plan's value."""

    model: str = "toy"
    ckpt: str | None = None
    dataset: str = "toy-tiny"
    samples: int | None = None
    batch_size: int | None = None
    seed: int = 0
    quantile_budget_mib: float = 256.0
    progress: bool = True


@frozen
class ProfileResult:
    table: StatsTable
    notes: tuple[str, ...]  # rules that matched nothing, NaN/Inf reports, ...
    batches: tuple  # the calibration batches, reused by a second pass


@frozen
class ApplyResult:
    profile: ProfileResult
    mapping: MappingResult
    configs: dict[str, ModuleQuant]
    model: nn.Module  # converted in place
    float_accuracy: float
    ternary_accuracy: float
    report: dict[str, Any]
    assert_failures: tuple = ()  # asserts.Failure: the plan's assertions that do not hold
    warnings: tuple[str, ...] = ()  # e.g. modules the rules select that stay in float (uncalled.py)


def load_model(settings: RunSettings) -> nn.Module:
    """Build the float model and load its checkpoint, if any."""
    model = build_model(settings.model)
    if settings.ckpt:
        load_checkpoint_(model, settings.ckpt)
    return model.eval()


def _check_positive(name: str, value: int) -> int:
    if value <= 0:
        msg = f"{name} must be a positive integer, got {value}"
        raise UserError(msg)
    return value


def profile(model: nn.Module, plan: Plan, settings: RunSettings) -> ProfileResult:
    """Calibrate `model` on the plan's split and collect the plan's (non-derived) statistics."""
    cal = plan.calibration
    # `is None`, not `or`: an explicit --samples 0 is an error, not "use the plan's value"
    samples = _check_positive("samples", cal.samples if settings.samples is None else settings.samples)
    batch_size = _check_positive(
        "batch size", cal.batch_size if settings.batch_size is None else settings.batch_size
    )
    dataset = build_dataset(settings.dataset, cal.split)
    batches = calib.calibration_batches(dataset, samples, batch_size, settings.seed)
    resolved = prof.resolve_profile(plan.profile, model)
    # Recipes carry rules for every quantisable type; one the model lacks (conv2d on an MLP) is not news.
    notes = tuple(
        f"profile rule at {p.origin} ({p.selector}.{p.tensor}) matched no module of the model"
        for p in resolved.unmatched
        if not (p.selector.kind == "type" and p.selector.pattern in QUANTISABLE)
    )
    budget = QuantileBudget(int(settings.quantile_budget_mib * 2**20))
    table = calib.calibrate(
        model, batches, resolved, quantile_budget=budget, progress=settings.progress, desc="calibrate"
    )
    notes += tuple(f"{ms.path}: {n}" for ms in table.values() for n in ms.notes)
    return ProfileResult(table=table, notes=notes, batches=tuple(batches))


def build_configs(mapping: MappingResult, *, rules: str) -> dict[str, ModuleQuant]:
    """Turn each node's parameters into its ternary config (Δ, α, scaling) by the quantiser's rules.

    Raises:
        UserError: a node's parameters do not make a ternary config (e.g. a quantised tensor whose threshold
            cannot be resolved); the message names the node, the tensor, the rules file and the location of
            each rule that set that tensor's parameters.
    """
    configs = {}
    for path, m in mapping.modules.items():
        try:
            configs[path] = module_quant_from_params(m.op, m.node, m.params, rules=rules)
        except UserError as exc:
            msg = f"{exc}{_rules_behind(m, rules)}"
            raise UserError(msg) from exc
    return configs


def _rules_behind(m: MappedModule, rules: str) -> str:
    """Where the rules set the parameters of the tensors of `m` whose config fails on its own (all of them,
    and `name`, when none fails alone), as " (set by the rules: weight_width at r.tq:3:5, ...)"."""
    tensors = QUANTISABLE[m.op]

    def own(t: str) -> dict[str, Any]:
        return {k: v for k, v in m.params.items() if k == "name" or (split_param(k) or ("",))[0] == t}

    failing = []
    for t in tensors:
        try:
            module_quant_from_params(m.op, m.node, own(t), rules=rules)
        except UserError:
            failing.append(t)
    wanted = {k for t in (failing or tensors) for k in own(t) if k != "name" or not failing}
    places = [f"{param} at {rp.binding.origin}" for param, rp in m.explain.items() if param in wanted]
    return f" (set by the rules: {', '.join(places)})" if places else ""


def calibrate_activation_scales(
    model: nn.Module, configs: dict[str, ModuleQuant], result: ProfileResult, settings: RunSettings
) -> dict[str, ModuleQuant]:
    """Second pass: α of every quantised, scaled `data_in` without a given scale = mean |x| over |x| > Δ on
    the calibration batches. Adds the `threshold_abs_mean` results to `result.table`."""
    need = {
        path: mq
        for path, mq in configs.items()
        if mq.tensor("data_in").quantize and mq.tensor("data_in").scaling and mq.tensor("data_in").alpha is None
    }
    if not need:
        return configs
    points = prof.ResolvedPoints.from_mapping({path: {"data_in_0": (THRESHOLD_ABS_MEAN,)} for path in need})
    thresholds = {(path, "data_in_0"): _as_tensor(mq.tensor("data_in").delta) for path, mq in need.items()}
    table = calib.calibrate(
        model, list(result.batches), points, thresholds=thresholds, progress=settings.progress, desc="scales"
    )
    out = dict(configs)
    for path, mq in need.items():
        found = table[path].values["data_in_0"][THRESHOLD_ABS_MEAN]
        # no |x| above Δ on the calibration data: every value becomes 0, and α is 0 (as for weights)
        alpha = np.nan_to_num(np.asarray(found["abs_mean"], dtype=np.float64), nan=0.0).tolist()
        out[path] = mq.with_alpha("data_in", alpha)
        _merge_into(result.table, table[path])
    return out


def _as_tensor(value: Any) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _merge_into(table: StatsTable, extra: ModuleStats) -> None:
    """Add `extra`'s results to the same module's entry of `table` (the second pass adds statistics)."""
    have = table.get(extra.path)
    if have is None:
        table[extra.path] = extra
        return
    values = {t: dict(v) for t, v in have.values.items()}
    for tensor, results in extra.values.items():
        values.setdefault(tensor, {}).update(results)
    table[extra.path] = attrs.evolve(have, values=values, shapes={**extra.shapes, **have.shapes})


def apply(model: nn.Module, plan: Plan, settings: RunSettings, *, rules: str) -> ApplyResult:
    """The whole flow: calibrate, map statistics to parameters, derive activation scales, convert, evaluate.

    `model` is converted in place. `rules` names where the plan came from, for messages.
    """
    result = profile(model, plan, settings)
    modules = [(name, type(m).__name__.lower()) for name, m in model.named_modules() if name]
    # a module the model never calls (MultiheadAttention.out_proj) has no input statistics and stays a float
    # module: its parameters are not evaluated and no ternary config is built for it
    left_in_float = uncalled.selected(plan.bindings, modules, uncalled.functional_only(model))
    types = dict(modules)
    absent = _absent_parameters(model) | {(p, t) for p in left_in_float for t in QUANTISABLE.get(types[p], ())}
    mapping = map_params(plan, result.table, rules=rules, modules=modules, absent_tensors=absent)
    called = {p: m for p, m in mapping.modules.items() if p not in left_in_float}
    configs = build_configs(attrs.evolve(mapping, modules=called), rules=rules)
    configs = calibrate_activation_scales(model, configs, result, settings)
    validation = build_dataset(settings.dataset, VALIDATION_SPLIT)
    float_acc = accuracy(model, validation)
    convert_(model, configs)
    ternary_acc, zero_fractions = _accuracy_and_activation_zeros(model, validation)
    report = build_report(model, configs, float_acc, ternary_acc, zero_fractions)
    # language v2: the plan's assertions, its constants and modules left in float go into the report
    applied = asserts.applied_configs(model, configs)
    failures = asserts.check_asserts(plan, mapping, applied, report, result.table, modules)
    asserts.annotate_report(report, plan, failures, left_in_float, mapping)
    return ApplyResult(result, mapping, configs, model, float_acc, ternary_acc, report, tuple(failures),
                       tuple(uncalled.notes(left_in_float)))


def _absent_parameters(model: nn.Module) -> set[tuple[str, str]]:
    """`(path, tensor)` for each weight or bias a quantisable module's type has but the module lacks
    (`Linear(..., bias=False)`)."""
    absent = set()
    for path, module in model.named_modules():
        for tensor in QUANTISABLE.get(type(module).__name__.lower(), ()):
            if tensor in ("weight", "bias") and not isinstance(getattr(module, tensor, None), torch.Tensor):
                absent.add((path, tensor))
    return absent


def _accuracy_and_activation_zeros(model: nn.Module, dataset) -> tuple[float, dict[str, float]]:
    """The converted model's accuracy on `dataset`, and per module the fraction of its quantised input values
    that become 0 (|x| <= Δ), counted in the same pass."""
    zeros: dict[str, list[float]] = {}
    handles = []

    def hook_for(path: str, delta: torch.Tensor) -> Callable:
        def hook(_module, args):
            x = args[0]
            stats = zeros.setdefault(path, [0.0, 0.0])
            stats[0] += float((x.abs() <= delta).sum())
            stats[1] += x.numel()

        return hook

    for path, module in model.named_modules():
        if isinstance(module, TernaryModule) and module.config.tensor("data_in").quantize:
            delta = _as_tensor(module.config.tensor("data_in").delta)
            handles.append(module.register_forward_pre_hook(hook_for(path, delta)))
    try:
        acc = accuracy(model, dataset)
    finally:
        for h in handles:
            h.remove()
    return acc, {path: z / n for path, (z, n) in zeros.items() if n}


def _summary(value: Any) -> Any:
    """A JSON-friendly value: scalars as they are, vectors as their length, mean, min and max."""
    if value is None or isinstance(value, (int, float)):
        return value
    t = torch.tensor(value, dtype=torch.float64)
    return {"values": t.numel(), "mean": float(t.mean()), "min": float(t.min()), "max": float(t.max())}


def build_report(
    model: nn.Module,
    configs: dict[str, ModuleQuant],
    float_acc: float,
    ternary_acc: float,
    zero_fractions: dict[str, float],
) -> dict[str, Any]:
    """`report.json`'s content: accuracies, and per node its op, and Δ, α and zero fraction per tensor."""
    modules = dict(model.named_modules())
    nodes: dict[str, Any] = {}
    for path, mq in configs.items():
        module = modules.get(path)
        applied = module.resolved_quant() if isinstance(module, TernaryModule) else mq
        tensors: dict[str, Any] = {}
        for name in mq.tensors:
            tq = applied.tensor(name)
            if not tq.quantize:
                tensors[name] = {"quantized": False}
                continue
            if name == "data_in":
                zeros = zero_fractions.get(path)
            else:
                cached = getattr(module, "q" + name, None)
                zeros = None if cached is None else float((cached == 0).float().mean())
            tensors[name] = {
                "quantized": True,
                "delta": _summary(tq.delta),
                "scaling": tq.scaling,
                "alpha": _summary(tq.alpha),
                "zero_fraction": zeros,
            }
        nodes[mq.node] = {"path": path, "op": mq.op, "tensors": tensors}
    return {"float_accuracy": float_acc, "ternary_accuracy": ternary_acc, "nodes": nodes}


def write_apply_outputs(out_dir: str, result: ApplyResult, settings: RunSettings) -> list[str]:
    """Write `stats.toml`, `quant_config.toml`, `ternary.ckpt` and `report.json` into `out_dir`, all or
    nothing; return the paths written.

    Raises:
        UserError: one of the files cannot be written (named); then none of the four was replaced.
    """
    names = ("stats.toml", "quant_config.toml", "ternary.ckpt", "report.json")
    paths = {name: os.path.join(out_dir, name) for name in names}
    # All or nothing: each file is first written to a temporary file next to its target; the targets are
    # replaced only once all four are written. A failure on any of them (a folder in the way, disk full)
    # removes the temporary files and leaves every previous output as it was.
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(path)) for name, path in paths.items()}
        write_stats_toml(tmp["stats.toml"], result.profile.table)
        write_quant_config_toml(tmp["quant_config.toml"], result.mapping)
        save_ternary_checkpoint(
            tmp["ternary.ckpt"],
            result.model,
            result.configs,
            model_spec=settings.model,
            extra={"float_accuracy": result.float_accuracy, "ternary_accuracy": result.ternary_accuracy},
        )
        atomic_write_text(tmp["report.json"], json.dumps(_finite(result.report), indent=2) + "\n")
    return list(paths.values())


def _finite(value: Any) -> Any:
    """JSON has no NaN: write non-finite floats as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
