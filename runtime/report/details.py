"""What report.json holds beyond the accuracies and Δ/α/zeros per tensor, for `ternqc report`.

In: the report `pipeline.build_report` made, the converted model, the mapping, the inputs the histogram pass
observed, and a description of the run. Out: the same report with, added,
- `run`: model, checkpoint, dataset, rules (the root rules file, the files and their text), calibration settings;
- per quantised tensor: `histogram` (of the float values: the weight or bias, or the calibrated inputs),
  for a weight or bias with a per-channel Δ also `histogram_over_delta` (each value divided by its own Δ),
  `rel_l2_error` (‖x - q(x)‖₂ / ‖x‖₂);
- per node `index` (its position among the model's modules), `rules` (`{parameter: "file:line"}` of the
  rule that set each parameter some rule sets) and, with `apply --sensitivity`, `accuracy_alone` (the
  accuracy with only this node quantised);
- `float_layers`: modules of a quantisable type that stay float, and why.
The nodes are put in model order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ternqc.plan import QUANTISABLE
from ternqc.runtime.calibrate import scan_kernel
from ternqc.runtime.quantize.mapping import MappingResult
from ternqc.runtime.quantize.modules import is_converted, latent_param, quantized_param, ternary_param
from ternqc.runtime.quantize.quantizers import ModuleQuant
from ternqc.runtime.quantize.types import module_type
from ternqc.runtime.report.histograms import ObservedInputs, observe_inputs, relative_l2, tensor_histogram

#: Rules files larger than this are not copied into report.json.
MAX_RULES_TEXT = 256 * 1024


def run_description(settings: Any, sources: Sequence[str], calibration: Any) -> dict[str, Any]:
    """The run as report.json's `run`: where the model, weights, data and rules came from, how it calibrated.

    `settings` is a `RunSettings`; `sources` the plan's rules files, the root first (their text is copied
    when readable). `rules` is the root file; a command that read the plan from elsewhere (`--plan P.json`)
    names what the user gave instead.
    """
    texts = {}
    for path in sources:
        try:
            if os.path.getsize(path) <= MAX_RULES_TEXT:
                with open(path, encoding="utf-8") as f:
                    texts[path] = f.read()
        except (OSError, UnicodeDecodeError):
            continue
    return {
        "model": settings.model,
        "ckpt": settings.ckpt,
        "dataset": settings.dataset,
        "rules": sources[0] if sources else None,
        "rules_files": list(sources),
        "rules_text": texts,
        "calibration": {
            "samples": calibration.samples if settings.samples is None else settings.samples,
            "batch_size": calibration.batch_size if settings.batch_size is None else settings.batch_size,
            "split": calibration.split,
            "seed": settings.seed,
            "scans": scan_kernel.describe(),
        },
    }


def _rules_of(mapping: MappingResult, path: str) -> dict[str, str]:
    """`{parameter: "file:line"}` of the rule that set each parameter of the module at `path` that a rule sets."""
    m = mapping.modules.get(path)
    if m is None:
        return {}
    return {param: f"{rp.binding.origin.file}:{rp.binding.origin.line}" for param, rp in m.explain.items()}


def _param_details(module: nn.Module, tensor: str) -> dict[str, Any]:
    """Histogram of a converted module's float weight or bias and the relative L2 error of q(p)."""
    quantiser = ternary_param(module, tensor)
    latent = latent_param(module, tensor)
    if quantiser is None or latent is None:
        return {}
    with torch.no_grad():
        p = latent.detach().t() if quantiser.transposed else latent.detach()  # the language's layout
        q = quantized_param(module, tensor)
    out = {"histogram": tensor_histogram(p).to_dict(), "rel_l2_error": relative_l2(p, q)}
    delta = quantiser.delta
    if delta is not None and delta.numel() > 1:
        # per channel, one picture for every channel: each value over its own Δ, so ±1 is the threshold
        with torch.no_grad():
            ratio = p.double() / delta.double()
        out["histogram_over_delta"] = tensor_histogram(ratio).to_dict()
    return out


def add_details(
    report: dict[str, Any],
    model: nn.Module,
    configs: dict[str, ModuleQuant],
    mapping: MappingResult,
    observed: ObservedInputs | None,
    run: dict[str, Any],
    *,
    alone: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Add the report's details (see the module docstring) to `report` in place and return it. `alone`:
    per module path, the accuracy with only that module quantised (`apply --sensitivity`)."""
    modules = dict(model.named_modules())
    order = {path: i for i, path in enumerate(modules)}
    for node, entry in report.get("nodes", {}).items():
        path = entry.get("path", node)
        entry["index"] = order.get(path, len(order))
        entry["rules"] = _rules_of(mapping, path)
        if alone is not None and path in alone:
            entry["accuracy_alone"] = alone[path]
        module = modules.get(path)
        for tensor, t in entry.get("tensors", {}).items():
            if not t.get("quantized"):
                continue
            if tensor == "data_in":
                if observed is not None and path in observed.histograms:
                    t["histogram"] = observed.histograms[path].to_dict()
                    t["rel_l2_error"] = observed.errors.get(path)
            elif module is not None and is_converted(module):
                t.update(_param_details(module, tensor))
    report["nodes"] = dict(sorted(report.get("nodes", {}).items(), key=lambda kv: kv[1]["index"]))
    report["run"] = run
    report["float_layers"] = _float_layers(model, configs)
    return report


def _float_layers(model: nn.Module, configs: dict[str, ModuleQuant]) -> list[dict[str, str]]:
    """Modules of a quantisable type (subclasses included) that the run left in float, in model order, each
    with the reason."""
    out = []
    for path, module in model.named_modules():
        op = module_type(module)
        if not path or op not in QUANTISABLE or is_converted(module):
            continue
        mq = configs.get(path)
        reason = (
            "no rule quantises any of its tensors"
            if mq is None or not mq.quantises_anything
            else ("it was not converted")
        )
        out.append({"path": path, "op": op, "reason": reason})
    return out


def carry_inputs(report: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """Copy the input histograms of `earlier` (a report of the same model before its weights or Δ/α changed,
    e.g. before fine-tuning) into `report`, in place: the calibrated inputs are the same values. Their
    quantisation error is copied only where the input's Δ and α did not change. Returns `report`."""
    for node, entry in report.get("nodes", {}).items():
        before = earlier.get("nodes", {}).get(node, {}).get("tensors", {}).get("data_in", {})
        now = entry.get("tensors", {}).get("data_in")
        if not now or not now.get("quantized") or "histogram" not in before:
            continue
        now["histogram"] = before["histogram"]
        same = all(now.get(k) == before.get(k) for k in ("delta", "alpha", "scaling"))
        if same and "rel_l2_error" in before:
            now["rel_l2_error"] = before["rel_l2_error"]
    return report


__all__ = ["add_details", "carry_inputs", "observe_inputs", "run_description"]
