"""The plan's derived statistics: gathered in the first pass when their values fit, else in a second pass.

In: the plan's profile points with reason `derived` (the compiler adds `threshold_abs_mean` on `data_in_0` of
every selector that sets `data_in_scaling_factor = true`: the activation scale α = mean |x| over |x| > Δ), the
model, the first pass's `Calibrated` and, per tensor, the threshold Δ known only after mapping. Out:
`Derived`: per `(path, tensor)` the statistic's result and how many passes it took.

One pass: the first pass resolved the derived points without a threshold, so their states kept every |x|
within the quantile budget, or, when those did not fit, the values in a band around a Δ predicted from the
first batch (`stats/threshold_state.py`); given Δ they sum them batch by batch, exactly, as a second pass
would (the same bits). Two passes: only for the tensors that kept nothing that can answer (no prediction, a
Δ outside its band, NaN/Inf, a batch beyond the exactness bound), one more calibration pass with hooks on
those modules only and the same statistic, Δ known. Under `torch.distributed`
the processes agree on which tensors need the second pass, and merge the one-pass states as any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attrs import field, frozen
from torch import nn

from ternqc.plan import ProfilePoint, StatSpec
from ternqc.runtime.calibrate import loop
from ternqc.runtime.calibrate.points import ResolvedPoints, module_type, resolve_profile
from ternqc.runtime.calibrate.table import ModuleStats, StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.run import collectives as distributed


def resolve_derived(points: Sequence[ProfilePoint], model: nn.Module) -> ResolvedPoints:
    """The plan's derived points (and only those) resolved against `model`: what the runtime may be asked
    to finish, and with which statistic."""
    return resolve_profile([p for p in points if p.reason == "derived"], model, include_derived=True)


@frozen
class Derived:
    """`values[(path, tensor)][spec]`: each derived statistic's result; `passes[(path, tensor)]`: 1 when it
    came from the first pass's values, 2 when it took a second pass; `table`: the same results as
    `ModuleStats` entries, to add to the first pass's table."""

    values: dict[tuple[str, str], dict[StatSpec, dict[str, Any]]] = field(factory=dict)
    passes: dict[tuple[str, str], int] = field(factory=dict)
    table: StatsTable = field(factory=dict)


def finish_derived(
    model: nn.Module,
    batches: Sequence[loop.Batch],
    derived: ResolvedPoints,
    first: loop.Calibrated,
    thresholds: Mapping[tuple[str, str], Any],
    *,
    progress: bool = False,
) -> Derived:
    """The derived statistics of the tensors in `thresholds` (`(path, tensor) -> Δ`), from `first`'s pending
    states where they kept every value, else from a second pass over `batches`. Pending states not asked
    for are released.

    Raises:
        UserError: a tensor asked for has no derived point in the plan (a plan from another compiler).
    """
    specs: dict[tuple[str, str], tuple[StatSpec, ...]] = {}
    for key in thresholds:
        path, tensor = key
        got = derived.modules.get(path, {}).get(tensor)
        if not got:
            msg = (
                f"{path}: the quantiser needs a derived statistic on {tensor} (an activation scale), but the plan "
                "lists none there; compile the rules again with this version of ternqc"
            )
            raise UserError(msg)
        specs[key] = got
    kept = {key: first.pending.get(key) for key in specs}
    fits = [all(_finishable(kept[key], s, thresholds[key]) for s in specs[key]) for key in specs]
    if distributed.world_size() > 1:  # every process must take the same path (a second pass is collective)
        fits = [all(col) for col in zip(*distributed.gather_objects(fits))] if fits else fits
    one_pass = [key for key, ok in zip(specs, fits) if ok]
    two_pass = [key for key, ok in zip(specs, fits) if not ok]
    for key, ts in first.pending.items():  # what is not finished here is not needed: give the memory back
        if key not in one_pass:
            for state in ts.pending().values():
                state.discard()
    out = Derived()
    states = []
    for key in one_pass:
        for spec in specs[key]:
            state = kept[key].pending()[spec]
            state.set_threshold(thresholds[key])
            states.append(state)
    if distributed.world_size() > 1 and states:
        distributed.run_protocols({i: s.sync() for i, s in enumerate(states)}, distributed.gather_objects)
    for key in one_pass:
        ts = kept[key]
        values = {spec: ts.states[spec].result() for spec in specs[key]}
        _record(out, model, key, values, tuple(ts.shape[1:]), passes=1)
    if two_pass:
        modules: dict[str, dict[str, tuple[StatSpec, ...]]] = {}
        for path, tensor in two_pass:
            modules.setdefault(path, {})[tensor] = specs[(path, tensor)]
        points = ResolvedPoints.from_mapping(modules)
        table = loop.calibrate(
            model,
            batches,
            points,
            thresholds={key: thresholds[key] for key in two_pass},
            progress=progress,
            desc="scales",
        )
        for key in two_pass:
            path, tensor = key
            ms = table[path]
            if tensor in ms.values:
                _record(out, model, key, ms.values[tensor], ms.shapes[tensor], passes=2)
    return out


def _finishable(ts, spec: StatSpec, threshold: Any) -> bool:
    """Whether `ts` holds a pending state of `spec` that can give its result for `threshold` (every value
    kept, or a band around a predicted Δ that holds this one)."""
    state = None if ts is None else ts.pending().get(spec)
    return state is not None and state.can_finish(threshold)


def _record(out: Derived, model: nn.Module, key: tuple[str, str], values: dict, shape: tuple, passes: int) -> None:
    path, tensor = key
    out.values[key] = dict(values)
    out.passes[key] = passes
    have = out.table.get(path)
    merged_values = {**(have.values if have else {}), tensor: dict(values)}
    merged_shapes = {**(have.shapes if have else {}), tensor: tuple(shape)}
    out.table[path] = ModuleStats(
        path=path,
        node=path.replace(".", "_"),
        op=module_type(model.get_submodule(path)),
        shapes=merged_shapes,
        values=merged_values,
        notes=(),
    )
