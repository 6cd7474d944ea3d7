"""The runtime flow on one plan: prepare → calibrate → map → convert → evaluate, and the files it writes.

In: a `Plan` (compiled elsewhere; the runtime never parses rules), a model and dataset spec, calibration
settings. Out: `ProfileResult` (the statistics) or `ApplyResult` (statistics, parameters per node, the
ternary configs, float and ternary accuracy, a per-node report), and `write_apply_outputs` puts
`stats.toml`, `quant_config.toml`, `ternary.ckpt` and `report.json` in a folder, only after the whole run
succeeded and all or nothing: a failed run, or a failure to write any one of the four, leaves no half-written
file and every previous output as it was.

The activation scale α (mean |x| over |x| > Δ) needs Δ, which needs the statistics: the plan lists it as a
derived statistic, which the first pass keeps the values of when they fit the quantile budget, so that α
comes from that one pass once Δ is known; the tensors that did not fit take a second pass over the same
batches, hooks on their modules only (`calibrate/derived.py`). report.json says which per tensor.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import torch
from attrs import field, frozen
from torch import nn
from torch.utils.data import DataLoader

from ternqc.plan import QUANTISABLE, TENSOR_ALIASES, Plan
from ternqc.runtime.calibrate import derived as derived_stats
from ternqc.runtime.calibrate import loop as calib
from ternqc.runtime.calibrate import points as prof
from ternqc.runtime.calibrate.stats.states import QuantileBudget
from ternqc.runtime.calibrate.table import ModuleStats, StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import atomic_write_text
from ternqc.runtime.io.checkpoints import check_finite_parameters, load_checkpoint_
from ternqc.runtime.io.factories import load_factory
from ternqc.runtime.io.mase_io import write_quant_config_toml, write_stats_toml
from ternqc.runtime.io.outputs import APPLY_OUTPUTS, write_output_set
from ternqc.runtime.models.builtin import build_model
from ternqc.runtime.models.data import build_dataset
from ternqc.runtime.models.metrics import evaluate
from ternqc.runtime.quantize import asserts
from ternqc.runtime.quantize.combinations import check_module
from ternqc.runtime.quantize.convert import convert_, save_ternary_checkpoint
from ternqc.runtime.quantize.kinds import granularity
from ternqc.runtime.quantize.mapping import MappingResult, map_params
from ternqc.runtime.quantize.modules import is_converted, quantized_param, resolved_quant
from ternqc.runtime.quantize.quantizers import ModuleQuant, module_quant_from_params
from ternqc.runtime.report import details as report_details
from ternqc.runtime.report.sensitivity import layer_sensitivity
from ternqc.runtime.run import collectives as distributed
from ternqc.runtime.run import effects
from ternqc.runtime.run.predict import FirstBatchProbe, absent_parameters, predict_bands, scaled_inputs

VALIDATION_SPLIT = "validation"


def _spec(what: str, optional: bool = False):
    def check(_inst: Any, _attr: Any, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            kind = type(value).__name__
            msg = (
                f"RunSettings.{what} takes a spec string (a built-in name or FILE.py:factory), got a {kind}; "
                "to quantise a model with data you already hold, call ternqc.quantize_(model, rules, "
                "calibration_data, eval_data=...)"
            )
            raise TypeError(msg)

    return check


def _int_or_none(_inst: Any, attr: Any, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        msg = f"RunSettings.{attr.name} must be an int or None, got {value!r}"
        raise TypeError(msg)


@frozen
class RunSettings:
    """Where the model and data come from and how to calibrate; `None` keeps the plan's value.

    `dataset` has no default: a model is calibrated on data someone chose (`toy-tiny` for the built-in
    `toy`), or on batches handed to `profile` / `apply` directly. `metric` is `FILE.py:fn` for outputs that are
    neither classification nor language-model scores (see `models.metrics`).
    """

    model: str = field(default="toy", validator=_spec("model"))
    ckpt: str | None = field(default=None, validator=_spec("ckpt", optional=True))
    dataset: str | None = field(default=None, validator=_spec("dataset", optional=True))
    samples: int | None = field(default=None, validator=_int_or_none)
    batch_size: int | None = field(default=None, validator=_int_or_none)
    seed: int = 0
    quantile_budget_mib: float = 256.0
    progress: bool = True
    metric: str | None = field(default=None, validator=_spec("metric", optional=True))
    report_histograms: bool = True  # histogram the calibrated inputs for the report (one more pass)
    sensitivity: bool = False  # per quantised layer, the headline metric with only that layer quantised


@frozen
class RunData:
    """The batches a run uses: `calibration` as `(inputs, labels)` pairs, `evaluation` any re-iterable of
    batches (None: nothing is evaluated), and notes about them (fewer samples than asked for)."""

    calibration: tuple
    evaluation: Any = None
    notes: tuple[str, ...] = ()


@frozen
class ProfileResult:
    table: StatsTable
    notes: tuple[str, ...]  # rules that matched nothing, NaN/Inf reports, ...
    batches: tuple  # the calibration batches, reused by a second pass
    # derived statistics still waiting for their threshold (`derived.finish_derived`); not pickled
    pending: dict = attrs.field(factory=dict, eq=False, repr=False)


@frozen
class ApplyResult:
    """`float_accuracy` / `ternary_accuracy` hold the headline metric (accuracy, next-token accuracy or the
    user's metric; None when nothing was evaluated); `float_metrics` / `ternary_metrics` all of them."""

    profile: ProfileResult
    mapping: MappingResult
    configs: dict[str, ModuleQuant]
    model: nn.Module  # converted in place
    float_accuracy: float | None
    ternary_accuracy: float | None
    report: dict[str, Any]
    float_metrics: dict[str, float] | None = None
    ternary_metrics: dict[str, float] | None = None
    warnings: tuple[str, ...] = ()
    assert_failures: tuple = ()  # asserts.Failure: the plan's assertions that do not hold


def load_model(settings: RunSettings) -> nn.Module:
    """Build the float model and load its checkpoint, if any; refuse NaN or infinite weights."""
    model = build_model(settings.model)
    if settings.ckpt:
        load_checkpoint_(model, settings.ckpt)
    check_finite_parameters(model, f"the model {settings.model!r}")
    return model.eval()


def _check_positive(name: str, value: int) -> int:
    if value <= 0:
        msg = f"{name} must be a positive integer, got {value}"
        raise UserError(msg)
    return value


def _samples(plan: Plan, settings: RunSettings) -> int:
    # `is None`, not `or`: an explicit --samples 0 is an error, not "use the plan's value"
    cal = plan.calibration
    return _check_positive("samples", cal.samples if settings.samples is None else settings.samples)


def dataset_data(plan: Plan, settings: RunSettings, *, evaluation: bool = False) -> RunData:
    """The calibration batches (the plan's split of `settings.dataset`) and, with `evaluation`, its
    validation split in batches of 256.

    Raises:
        UserError: no dataset named, or the dataset cannot be built or read.
    """
    if settings.dataset is None:
        msg = (
            "no calibration data: name a dataset (RunSettings(dataset='toy-tiny' or 'FILE.py:factory'), "
            "--dataset), or hand the batches over (ternqc.quantize_(model, rules, loader))"
        )
        raise UserError(msg)
    cal = plan.calibration
    samples = _samples(plan, settings)
    batch_size = _check_positive(
        "batch size", cal.batch_size if settings.batch_size is None else settings.batch_size
    )
    dataset = build_dataset(settings.dataset, cal.split)
    batches = calib.calibration_batches(dataset, samples, batch_size, settings.seed)
    notes = ()
    if samples > len(dataset):
        notes = (f"asked for {samples} calibration samples, but {settings.dataset} ({cal.split}) holds only "
                 f"{len(dataset)}: calibrating on {len(dataset)}",)
    validation = None
    if evaluation:
        validation = DataLoader(build_dataset(settings.dataset, VALIDATION_SPLIT), batch_size=256)
    return RunData(calibration=tuple(batches), evaluation=validation, notes=notes)


def profile(
    model: nn.Module,
    plan: Plan,
    settings: RunSettings,
    data: RunData | None = None,
    *,
    derived: bool = False,
    sharing: Sequence[Plan] = (),
    bands: Mapping[tuple[str, str], tuple[float, float]] | None = None,
) -> ProfileResult:
    """Calibrate `model` on `data` (default: `dataset_data`) and collect the plan's statistics; with
    `derived`, also keep the values of its derived statistics (within the quantile budget, or in bands
    around their predicted Δ) in `pending`, for `apply`. `sharing`: other plans with the same profile that
    will finish these states (a sweep): the bands cover each plan's Δ. `bands`: those bands, predicted
    already (`FirstBatchProbe`); None predicts them here (`predict_bands`)."""
    if data is None:
        data = dataset_data(plan, settings)
    batches = list(data.calibration)
    resolved = prof.resolve_profile(plan.profile, model, include_derived=derived)
    # Recipes carry rules for every quantisable type; one the model lacks (conv2d on an MLP) is not news.
    notes = data.notes + tuple(
        f"profile rule at {p.origin} ({p.selector}.{p.tensor}) matched no module of the model"
        for p in resolved.unmatched
        if not (p.selector.kind == "type" and p.selector.pattern in QUANTISABLE) and p.reason != "derived"
    )
    budget_bytes = int(settings.quantile_budget_mib * 2**20)
    # Δ predicted from the first batch: an α whose values do not fit the budget keeps those near it instead
    if bands is None:
        bands = predict_bands(model, [plan, *sharing], batches, budget_bytes) if derived else {}
    done = calib.calibrate_pass(
        model, batches, resolved, quantile_budget=QuantileBudget(budget_bytes), progress=settings.progress,
        desc="calibrate", bands=bands,
    )
    table = done.table
    notes += tuple(f"{ms.path}: {n}" for ms in table.values() for n in ms.notes)
    return ProfileResult(pending=done.pending, table=table, notes=notes, batches=tuple(batches))


def build_configs(mapping: MappingResult) -> dict[str, ModuleQuant]:
    """Turn each node's parameters into its quantiser config (kind, Δ, α, scaling) by its kind's rules.

    Raises:
        UserError: a tensor's parameters do not make a config together (`combinations.check_module`); the
            message names the node, the tensor and the rule (`file:line:col`) behind each parameter involved.
    """
    for m in mapping.modules.values():
        check_module(m.node, m.op, m.params, m.explain)
    return {path: module_quant_from_params(m.op, m.node, m.params) for path, m in mapping.modules.items()}


def calibrate_activation_scales(
    model: nn.Module, configs: dict[str, ModuleQuant], result: ProfileResult, settings: RunSettings, plan: Plan
) -> tuple[dict[str, ModuleQuant], dict[str, int]]:
    """α of every quantised, scaled `data_in` without a given scale = the plan's derived statistic (mean |x|
    over |x| > Δ) on the calibration batches: from the first pass's kept values, or a second pass for the
    tensors that did not fit (`calibrate/derived.py`). Adds the results to `result.table`; returns the
    configs and, per module, how many passes its α took."""
    tensor = TENSOR_ALIASES["data_in"]
    need = scaled_inputs(configs)
    if not need:
        return configs, {}
    # binary: α is the mean of |x| over every element (any |x| exceeds a threshold of -1)
    thresholds = {
        (path, tensor): _as_tensor(-1.0 if mq.tensor("data_in").kind == "binary" else mq.tensor("data_in").delta)
        for path, mq in need.items()
    }
    first = calib.Calibrated(result.table, result.pending)
    done = derived_stats.finish_derived(
        model,
        list(result.batches),
        derived_stats.resolve_derived(plan.profile, model),
        first,
        thresholds,
        progress=settings.progress,
    )
    out = dict(configs)
    for path, mq in need.items():
        (found,) = done.values[(path, tensor)].values()
        # no |x| above Δ on the calibration data: every value becomes 0, and α is 0 (as for weights)
        alpha = np.nan_to_num(np.asarray(found["abs_mean"], dtype=np.float64), nan=0.0).tolist()
        out[path] = mq.with_alpha("data_in", alpha)
    for extra in done.table.values():
        _merge_into(result.table, extra)
    return out, {path: done.passes[(path, tensor)] for path in need}


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


def apply(
    model: nn.Module,
    plan: Plan,
    settings: RunSettings,
    *,
    data: RunData | None = None,
    metric: Callable | None = None,
    profiled: ProfileResult | None = None,
) -> ApplyResult:
    """The whole flow: check the model on one batch, calibrate, map statistics to parameters, derive
    activation scales, convert, evaluate.

    `model` is converted in place. Messages name rules by their origin (`file:line:col`). `data` defaults to
    `dataset_data(plan, settings, evaluation=True)`; `metric` (a function) overrides `settings.metric`.
    `profiled`: the statistics of an earlier calibration of the same model with the same profile points on
    the same data (a sweep calibrates once); its table is copied, not changed.

    Raises:
        UserError: anything the user can fix: the model fails on a batch or returns what ternqc cannot
            evaluate (found before calibrating), a rule cannot be evaluated, a config is invalid.
    """
    if data is None:
        data = dataset_data(plan, settings, evaluation=True)
    if metric is None and settings.metric is not None:
        metric = load_factory(settings.metric, what="metric")
    if not data.calibration:
        raise UserError("the calibration data holds no batch")
    # in one process the Δ prediction's statistics of the first batch ride on the check's forward of it
    probe = None
    if profiled is None and distributed.world_size() == 1:
        probe = FirstBatchProbe(model, [plan], data.calibration, int(settings.quantile_budget_mib * 2**20))
    check = effects.check_model(
        model, data.calibration[0], data.evaluation, metric, around=probe.collecting if probe else None
    )
    if profiled is None:
        result = profile(model, plan, settings, data, derived=True, bands=probe.bands if probe else None)
    else:  # a sweep's shared calibration: its pending derived states are finished per combination, on copies
        result = attrs.evolve(profiled, table=dict(profiled.table), pending=copy.deepcopy(profiled.pending))
    types = {name: prof.module_type(m) for name, m in model.named_modules() if name}
    # a module the checked batch did not reach but calibration did (a data-dependent branch) is not idle
    reached = {path for path, ms in result.table.items() if "data_in_0" in ms.values}
    reached |= {path for path, tensor in result.pending if tensor == "data_in_0"}
    calls = {path: n or int(path in reached) for path, n in check.calls.items()}
    unset, idle = effects.never_called(plan, calls, list(types.items()))
    absent = absent_parameters(model) | unset
    mapping = map_params(plan, result.table, modules=list(types.items()), absent_tensors=absent)
    configs = build_configs(mapping)
    configs, alpha_passes = calibrate_activation_scales(model, configs, result, settings, plan)
    result = attrs.evolve(result, pending={})
    observed = None
    if settings.report_histograms and distributed.is_main_process():  # only rank 0 writes the report
        observed = report_details.observe_inputs(model, configs, result.batches)
    float_metrics = None
    if data.evaluation is not None:
        float_metrics = evaluate(model, data.evaluation, check.task, what="the evaluation data")
    alone = None
    if settings.sensitivity and data.evaluation is not None and distributed.is_main_process():
        def headline(m: nn.Module) -> float:
            found = evaluate(m, data.evaluation, check.task, what="the evaluation data")
            return found[check.task.headline if check.task is not None else next(iter(found))]

        alone = layer_sensitivity(model, configs, headline, progress=settings.progress)
    owners = effects.parameter_owners(model)
    convert_(model, configs)
    ternary_metrics, zero_fractions = _metrics_and_activation_zeros(model, data.evaluation, check.task)
    warnings = tuple(str(e) for e in idle)
    notes = effects.conversion_notes(model, owners, {p: n for p, n in calls.items() if p in configs})
    report = build_report(model, configs, float_metrics, ternary_metrics, zero_fractions,
                          calls=calls, not_applied=idle, alpha_passes=alpha_passes, warnings=warnings, notes=result.notes + notes,
                          headline=None if check.task is None else check.task.headline)
    # language v2: the plan's assertions and its constants go into the report; no module is left in float as
    # a whole any more (a module that is never called has its weights quantised in place, its input named)
    applied = asserts.applied_configs(model, configs)
    modules = list(types.items())
    failures = asserts.check_asserts(plan, mapping, applied, report, result.table, modules)
    asserts.annotate_report(report, plan, failures, {}, mapping)
    run = report_details.run_description(settings, plan.sources, plan.calibration)
    report_details.add_details(report, model, configs, mapping, observed, run, alone=alone)
    profile_result = attrs.evolve(result, notes=result.notes + notes)
    return ApplyResult(
        profile_result, mapping, configs, model,
        report["float_accuracy"], report["ternary_accuracy"], report,
        float_metrics, ternary_metrics, warnings, tuple(failures),
    )


def _metrics_and_activation_zeros(model: nn.Module, batches, task) -> tuple[dict | None, dict[str, float]]:
    """The converted model's metrics on `batches` (None without), and per module the fraction of its
    quantised input values that become 0 (|x| <= Δ), counted in the same pass."""
    if batches is None:
        return None, {}
    zeros: dict[str, list[float]] = {}
    handles = []

    def hook_for(path: str, zero: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def hook(_module, args):
            x = args[0]
            stats = zeros.setdefault(path, [0.0, 0.0])
            stats[0] += float(zero(x).sum())
            stats[1] += x.numel()

        return hook

    for path, module in model.named_modules():
        quantiser = getattr(module, "ternary_input", None)
        zero = quantiser.zero_mask_fn() if is_converted(module) and quantiser is not None else None
        if zero is not None:
            # prepend: it sees the input before the quantiser's own pre-hook replaces it
            handles.append(module.register_forward_pre_hook(hook_for(path, zero), prepend=True))
    try:
        metrics = evaluate(model, batches, task, what="the evaluation data")
    finally:
        for h in handles:
            h.remove()
    return metrics, {path: z / n for path, (z, n) in zeros.items() if n}


def _summary(value: Any) -> Any:
    """A JSON-friendly value: scalars as they are, vectors as their length, mean, min and max."""
    if value is None or isinstance(value, (int, float)):
        return value
    t = torch.tensor(value, dtype=torch.float64)
    return {"values": t.numel(), "mean": float(t.mean()), "min": float(t.min()), "max": float(t.max())}


def build_report(
    model: nn.Module,
    configs: dict[str, ModuleQuant],
    float_metrics: dict[str, float] | None,
    ternary_metrics: dict[str, float] | None,
    zero_fractions: dict[str, float],
    *,
    calls: dict[str, int] | None = None,
    not_applied: Sequence[Any] = (),
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
    headline: str | None = None,
    alpha_passes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`report.json`'s content: the headline metric as `float_accuracy` / `ternary_accuracy` (None when
    nothing was evaluated), every metric, warnings (a rule whose quantisation cannot take effect) and notes,
    and per node its op, calls per forward and per tensor Δ, α and zero fraction, or why it stays float
    (`alpha_passes`: for an activation α computed from the calibration data, 1 when it came from the first
    calibration pass, 2 when it took a second one)."""
    modules = dict(model.named_modules())
    skipped = {(e.path, e.tensor): e.reason for e in not_applied}
    nodes: dict[str, Any] = {}
    for path, mq in configs.items():
        module = modules.get(path)
        applied = resolved_quant(module) if module is not None and is_converted(module) else mq
        tensors: dict[str, Any] = {}
        for name in QUANTISABLE[mq.op]:
            tq = applied.tensor(name)
            if (path, name) in skipped:
                tensors[name] = {"quantized": False, "not_applied": skipped[(path, name)]}
                continue
            if name not in mq.tensors:
                continue
            if not tq.quantize:
                if name != "data_out":  # an output in float is the norm: not worth a row
                    tensors[name] = {"quantized": False}
                continue
            if name == "data_in":
                zeros = zero_fractions.get(path)
            else:
                q = quantized_param(module, name) if module is not None else None
                zeros = None if q is None else float((q == 0).float().mean())
            tensors[name] = {
                "quantized": True,
                "kind": tq.kind,
                "width": tq.width,
                "granularity": granularity(tq),
                "delta": _summary(tq.delta),
                "scaling": tq.scaling,
                "alpha": _summary(tq.alpha),
                "zero_fraction": zeros,
            }
            if name == "data_in" and path in (alpha_passes or {}):
                tensors[name]["alpha_passes"] = alpha_passes[path]
        entry = {"path": path, "op": mq.op, "tensors": tensors}
        if calls is not None and path in calls:
            entry["calls_per_forward"] = calls[path]
        nodes[mq.node] = entry

    def headline_of(metrics: dict[str, float] | None) -> float | None:
        return None if metrics is None else metrics[headline or next(iter(metrics))]

    return {
        "float_accuracy": headline_of(float_metrics),
        "ternary_accuracy": headline_of(ternary_metrics),
        "metric": headline,
        "float_metrics": float_metrics,
        "ternary_metrics": ternary_metrics,
        "warnings": list(warnings),
        "notes": list(notes),
        "nodes": nodes,
    }


def write_apply_outputs(out_dir: str, result: ApplyResult, settings: RunSettings) -> list[str]:
    """Write `stats.toml`, `quant_config.toml`, `ternary.ckpt` and `report.json` into `out_dir`, all or
    nothing (`outputs.write_output_set`: a fresh folder beside it, swapped in with one rename, even under
    SIGINT, SIGTERM or SIGKILL); return the paths written.

    Raises:
        UserError: one of the files cannot be written (named), or `out_dir` is not a folder ternqc may
            replace; then the previous outputs are as they were.
    """
    extra = {"float_accuracy": result.float_accuracy, "ternary_accuracy": result.ternary_accuracy,
             "warnings": list(result.warnings)}
    report = json.dumps(_finite(result.report), indent=2) + "\n"
    writers = (
        ("stats.toml", lambda p: write_stats_toml(p, result.profile.table)),
        ("quant_config.toml", lambda p: write_quant_config_toml(p, result.mapping)),
        ("ternary.ckpt", lambda p: save_ternary_checkpoint(
            p, result.model, result.configs, model_spec=settings.model, extra=extra)),
        ("report.json", lambda p: atomic_write_text(p, report)),
    )
    assert tuple(name for name, _ in writers) == APPLY_OUTPUTS
    return write_output_set(out_dir, writers)


def _finite(value: Any) -> Any:
    """JSON has no NaN: write non-finite floats as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
