"""Predicted activation thresholds: Δ of every scaled activation as the rules give it from the first batch.

In: the model, the plan and the calibration batches. Out: `(module_path, "data_in_0") -> Δ` for each
quantised `data_in` whose α the plan derives (`scaled_inputs`), computed as `apply` would but from the
statistics of the first batch only. The first calibration pass gives these to the pending α states: a
tensor whose values do not fit the quantile budget keeps only those near its predicted Δ
(`calibrate/stats/threshold_state.py`) instead of needing a second pass. A prediction is only a hint: the
final Δ is checked against the band, and nothing is predicted when the rules cannot be evaluated on one batch.
The first batch's statistics come from a calibration of that batch (`predict_bands`), or, in `apply` in one
process, from the model check's forward of it, which runs anyway (`FirstBatchProbe`): one forward fewer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ternqc.plan import QUANTISABLE, TENSOR_ALIASES, Plan
from ternqc.runtime.calibrate import loop as calib
from ternqc.runtime.calibrate import points as prof
from ternqc.runtime.calibrate.hooks import collect_stats
from ternqc.runtime.calibrate.stats.states import QuantileBudget
from ternqc.runtime.calibrate.stats.threshold_state import band_around
from ternqc.runtime.calibrate.table import StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.combinations import check_module
from ternqc.runtime.quantize.mapping import map_params
from ternqc.runtime.quantize.quantizers import ModuleQuant, module_quant_from_params
from ternqc.runtime.quantize.types import param_view
from ternqc.runtime.run.effects import never_called


def scaled_inputs(configs: dict[str, ModuleQuant]) -> dict[str, ModuleQuant]:
    """The configs whose quantised `data_in` takes its α from the calibration data (ternary or binary, scaled,
    no α given, not dynamic): the plan's derived statistic finishes them."""
    return {
        path: mq
        for path, mq in configs.items()
        if (tq := mq.tensor("data_in")).quantize and tq.scaling and tq.alpha is None and not tq.dynamic
        and tq.kind in ("ternary", "binary")
    }


def predict_thresholds(
    model: nn.Module, plan: Plan, batches: Sequence, budget_bytes: int
) -> dict[tuple[str, str], tuple[float, float]]:
    """A band `(L, H)` around Δ per scaled ternary `data_in` (`band_around`: narrower the more samples the
    first batch holds), Δ from a calibration of `batches[0]` alone (one batch per process in a
    distributed run: the collective calls are the same in every process); {} when the plan derives nothing,
    or its rules cannot be evaluated from one batch."""
    if not batches or not any(p.reason == "derived" for p in plan.profile):
        return {}
    resolved = prof.resolve_profile(plan.profile, model)
    first = calib.calibrate_pass(model, list(batches[:1]), resolved, quantile_budget=QuantileBudget(budget_bytes),
                                 progress=False, desc="predict")
    return thresholds_from(model, plan, first.table, _samples(batches[0][0]))


def thresholds_from(
    model: nn.Module, plan: Plan, table: StatsTable, samples: int
) -> dict[tuple[str, str], tuple[float, float]]:
    """`predict_thresholds`' bands from `table`, the plan's statistics of one batch of `samples` samples."""
    types = [(name, prof.module_type(m)) for name, m in model.named_modules() if name]
    # modules the batch did not run as modules (MultiheadAttention's out_proj): their inputs stay unset, as
    # `apply` leaves them
    reached = {path for path, ms in table.items() if "data_in_0" in ms.values}
    calls = {path: int(path in reached) for path, t in types if t in QUANTISABLE}
    unset, _ = never_called(plan, calls, types)
    absent = absent_parameters(model) | unset
    try:
        mapping = map_params(plan, table, modules=types, absent_tensors=absent)
        configs = {}
        for path, m in mapping.modules.items():
            check_module(m.node, m.op, m.params, m.explain)
            configs[path] = module_quant_from_params(m.op, m.node, m.params)
    except (UserError, ValueError):
        return {}
    out = {}
    for path, mq in scaled_inputs(configs).items():
        tq = mq.tensor("data_in")
        if tq.kind == "ternary" and isinstance(tq.delta, (int, float)) and tq.delta > 0:  # per channel: no band
            out[(path, TENSOR_ALIASES["data_in"])] = band_around(float(tq.delta), samples)
    return out


def predict_bands(
    model: nn.Module, plans: Sequence[Plan], batches: Sequence, budget_bytes: int
) -> dict[tuple[str, str], tuple[float, float]]:
    """`predict_thresholds` for each plan (the same profile, other rules: a sweep's combinations), joined: per
    tensor the smallest band holding every plan's (only tensors every plan predicts)."""
    return _joined([predict_thresholds(model, p, batches, budget_bytes) for p in _unique(plans)])


class FirstBatchProbe:
    """`predict_bands` without a forward of its own: the plans' statistics of the first calibration batch,
    collected while the caller runs that batch anyway (`pipeline.apply`'s model check: `check_model(...,
    around=probe.collecting)`). After that forward `bands` holds the joined bands (`thresholds_from` per plan;
    {} when no plan derives anything); before it, and when the forward raised, None. One batch, so no
    brackets: every value kept when they fit the budget (else the certified sketch), as a bracket that missed
    would be collected again by `predict_thresholds`."""

    def __init__(self, model: nn.Module, plans: Sequence[Plan], batches: Sequence, budget_bytes: int) -> None:
        self.model = model
        self.plans = [p for p in _unique(plans) if any(q.reason == "derived" for q in p.profile)]
        self.samples = _samples(batches[0][0]) if batches else 1
        self.budget_bytes = budget_bytes
        self.bands: dict[tuple[str, str], tuple[float, float]] | None = None

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """The context for the first batch's forward (hooks on the profiled modules, removed on exit)."""
        if not self.plans:
            yield
            self.bands = {}
            return
        resolved = prof.resolve_profile(self.plans[0].profile, self.model)  # a sweep's plans share their profile
        with collect_stats(
            self.model, resolved, quantile_budget=QuantileBudget(self.budget_bytes), expected_batches=1, bracket=False
        ) as collector:
            collector.batch = 0
            yield
        table = collector.table()
        self.bands = _joined([thresholds_from(self.model, p, table, self.samples) for p in self.plans])


def _unique(plans: Sequence[Plan]) -> list[Plan]:
    unique: list[Plan] = []
    for p in plans:
        if not any(p is q for q in unique):
            unique.append(p)
    return unique


def _joined(got: list[dict]) -> dict[tuple[str, str], tuple[float, float]]:
    """Per tensor the smallest band holding every one of `got` (only tensors every one predicts)."""
    if not got:
        return {}
    keys = set(got[0]).intersection(*got[1:])
    return {k: (min(g[k][0] for g in got), max(g[k][1] for g in got)) for k in got[0] if k in keys}


def _samples(inputs: Any) -> int:
    """The samples in a batch's inputs: the leading dim of its first tensor (a tensor, tuple or dict)."""
    items = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return int(item.shape[0])
    return 1


def absent_parameters(model: nn.Module) -> set[tuple[str, str]]:
    """`(path, tensor)` for each weight or bias a quantisable module's type has but the module lacks
    (`Linear(..., bias=False)`)."""
    absent = set()
    for path, module in model.named_modules():
        for tensor in QUANTISABLE.get(prof.module_type(module), ()):
            if tensor in ("weight", "bias") and param_view(module, tensor) is None:
                absent.add((path, tensor))
    return absent
