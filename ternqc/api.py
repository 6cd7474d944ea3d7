"""The one-call Python API: `quantize_(model, rules, calibration_data, *, eval_data=None, **settings)`.

In: a model you hold, rules (a `.tq` path, a shipped recipe name such as `"weights_only"`, rules text, or a
compiled `Plan`), and data: a `DataLoader` or any iterable of batches, each `(input, label)`,
`((inputs...), label)` or a dict of tensors (keyword arguments; `labels` is the label). Out: the model
converted in place, and a `Report` holding what `report.json` holds.

`compile_rules(rules) -> Plan` resolves rules the same way. Wrong argument types raise `TypeError`, values
that cannot be used raise `ValueError`, both before anything runs; failures the model, data or rules cause
raise `ternqc.runtime.errors.UserError` with a one-paragraph message. Importing this module does not import
torch (`quantize_` does, when called).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import field, frozen

from ternqc.plan import Plan

#: Settings `quantize_` takes as keyword arguments, with their defaults.
SETTINGS: dict[str, Any] = {
    "samples": None,  # calibration samples (default: the rules' `calibrate { samples }`)
    "seed": 0,
    "quantile_budget_mib": 256.0,
    "progress": False,
    "metric": None,  # fn(output, labels) -> float, or "FILE.py:fn"
    "out": None,  # a folder: write stats.toml, quant_config.toml, ternary.ckpt and report.json there
    "model_spec": None,  # how ternary.ckpt names the model (default: its class); see load_ternary_checkpoint
}


@frozen
class Report:
    """What `report.json` holds: the headline metric as `float_accuracy` / `ternary_accuracy` (None without
    evaluation data), all metrics, `warnings` (rules whose quantisation cannot take effect), `notes`, and per
    node its path, op, calls per forward and per tensor Δ, α and zero fraction."""

    float_accuracy: float | None
    ternary_accuracy: float | None
    metric: str | None
    float_metrics: dict[str, float] | None
    ternary_metrics: dict[str, float] | None
    warnings: tuple[str, ...] = field(converter=tuple)
    notes: tuple[str, ...] = field(converter=tuple)
    nodes: dict[str, Any] = field(factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        return cls(**{k: d.get(k) for k in attrs_fields()})

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in attrs_fields()}
        out["warnings"], out["notes"] = list(self.warnings), list(self.notes)
        return out


def attrs_fields() -> tuple[str, ...]:
    import attrs

    return tuple(a.name for a in attrs.fields(Report))


def compile_rules(rules: str | os.PathLike | Plan) -> Plan:
    """The plan of `rules`: a `Plan` as it is; a path to a `.tq` file; a shipped recipe name (`"twn"` or
    `"twn.tq"`); or rules text (anything with a newline, `=` or `{`).

    Raises:
        TypeError: `rules` is none of those types.
        ValueError: a string that is no file, no shipped recipe and no rules text.
        ternqc.compiler.CompileError: the rules do not compile.
    """
    return _compile(rules)[0]


def _compile(rules: Any) -> tuple[Plan, str]:
    from ternqc.compiler import builtin_recipe, compile_file, compile_source

    if isinstance(rules, Plan):
        return rules, "<plan>"
    if isinstance(rules, os.PathLike):
        return compile_file(rules).plan, os.fspath(rules)
    if not isinstance(rules, str):
        msg = f"rules must be a path, a shipped recipe name, rules text or a Plan, not a {type(rules).__name__}"
        raise TypeError(msg)
    if "\n" in rules or "=" in rules or "{" in rules:
        return compile_source(rules, "<rules>").plan, "<rules>"
    if os.path.isfile(rules):
        return compile_file(rules).plan, rules
    name = rules if rules.endswith(".tq") else rules + ".tq"
    try:
        return compile_file(builtin_recipe(name)).plan, name
    except FileNotFoundError as exc:
        msg = f"rules {rules!r} is not a file, nor rules text, and {exc}"
        raise ValueError(msg) from None


def _batches(data: Any, what: str, *, once: bool) -> Iterable:
    """`data` checked to be a DataLoader or an iterable of batches; a one-shot iterator becomes a list
    unless `once` (it is read once)."""
    import torch
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, DataLoader):
        return data
    if data is None or isinstance(data, (str, bytes, Mapping, torch.Tensor)) or not isinstance(data, Iterable):
        msg = (f"{what} must be a DataLoader or an iterable of batches ((input, label), ((inputs...), label) "
               f"or dicts of tensors), not a {type(data).__name__}")
        raise TypeError(msg)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        msg = (f"{what} is a Dataset of samples; pass batches: torch.utils.data.DataLoader(dataset, "
               "batch_size=...)")
        raise TypeError(msg)
    if not once and iter(data) is data:  # a generator: evaluation reads it twice (float, then ternary)
        return list(data)
    return data


def _settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(SETTINGS))
    if "batch_size" in unknown:
        msg = "batch_size: the batches come from your data (set it on your DataLoader)"
        raise ValueError(msg)
    if unknown:
        msg = f"unknown setting(s) {', '.join(unknown)}; quantize_ takes {', '.join(SETTINGS)}"
        raise TypeError(msg)
    out = {**SETTINGS, **kwargs}
    samples = out["samples"]
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)):
        raise TypeError(f"samples must be an int, not a {type(samples).__name__}")
    if samples is not None and samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    metric = out["metric"]
    if metric is not None and not (callable(metric) or isinstance(metric, str)):
        raise TypeError(f"metric must be a function fn(output, labels) -> float or 'FILE.py:fn', not {metric!r}")
    return out


def quantize_(model: Any, rules: Any, calibration_data: Any, *, eval_data: Any = None, **settings: Any) -> Report:
    """Calibrate `model` on `calibration_data`, map the statistics to quantiser parameters by `rules`, and
    convert `model` to ternary in place (every quantised weight is quantised for whatever reads it).

    Args:
        model: an `nn.Module` (Hugging Face models included).
        rules: a `.tq` path, a shipped recipe name (`"weights_only"`, `"twn"`, `"bitnet"`, `"ternary_full"`,
            `"toy_ternary"`), rules text, or a `Plan`.
        calibration_data: a `DataLoader` or any iterable of batches; read until the rules' calibration
            sample count (or `samples`) is reached.
        eval_data: batches to measure the float and the ternary model on (accuracy for `[batch, classes]`
            outputs, next-token accuracy and perplexity for `[batch, seq, vocab]`, or `metric`); None: no
            evaluation.
        **settings: `samples`, `seed`, `quantile_budget_mib`, `progress` (default False), `metric`
            (`fn(output, labels) -> float`), `out` (a folder for stats.toml, quant_config.toml, ternary.ckpt
            and report.json) and `model_spec` (the model's name in ternary.ckpt).

    Returns:
        The `Report`; each of its warnings is also issued with `warnings.warn`.

    Raises:
        TypeError / ValueError: an argument of the wrong type or value (nothing is run).
        ternqc.runtime.errors.UserError: the model fails on a batch or returns what ternqc cannot evaluate
            (found before calibrating), a rule cannot be evaluated on this model, ...
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not a {type(model).__name__}")
    options = _settings(settings)
    plan, source = _compile(rules)
    calibration = _batches(calibration_data, "calibration_data", once=True)
    evaluation = None if eval_data is None else _batches(eval_data, "eval_data", once=False)

    from ternqc.runtime.calibrate.loop import batches_from_iterable
    from ternqc.runtime.run import pipeline

    samples = options["samples"] or plan.calibration.samples
    batches, count = batches_from_iterable(calibration, samples)
    notes = ()
    if count < samples:
        notes = (f"asked for {samples} calibration samples, but the calibration data holds only {count}: "
                 f"calibrating on {count}",)
    data = pipeline.RunData(calibration=tuple(batches), evaluation=evaluation, notes=notes)
    metric = options["metric"]
    run = pipeline.RunSettings(
        model=options["model_spec"] or f"python:{type(model).__qualname__}",
        seed=options["seed"],
        quantile_budget_mib=float(options["quantile_budget_mib"]),
        progress=bool(options["progress"]),
        metric=metric if isinstance(metric, str) else None,
    )
    result = pipeline.apply(model, plan, run, data=data,
                            metric=metric if callable(metric) else None)
    result.report["run"]["rules"] = source  # as the user gave it: a path, "<rules>" text or "<plan>"
    if options["out"] is not None:
        pipeline.write_apply_outputs(os.fspath(options["out"]), result, run)
    for warning in result.warnings:
        warnings.warn(warning, stacklevel=2)
    return Report.from_dict(result.report)


__all__ = ["Report", "compile_rules", "quantize_"]
