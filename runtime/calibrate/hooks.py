"""Hooks that collect statistics: `collect_stats(model, resolved)` is a context manager; inside it every forward
of the model feeds the statistics, and every handle is removed in `finally`; afterwards `collector.table()` is
a `StatsTable`.

In: a model and `ResolvedPoints` (see `points.py`). Out: a `Collector`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ternqc.runtime.calibrate.points import (
    PARAM_TENSORS,
    STAGING_BYTES,
    ResolvedPoints,
    input_index,
    module_type,
)
from ternqc.runtime.calibrate.stats.feeder import STAGE_BYTES, TensorStats
from ternqc.runtime.calibrate.stats.states import QuantileBudget
from ternqc.runtime.calibrate.table import ModuleStats, StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.types import param_view


class Collector:
    """The statistics being collected inside `collect_stats`; `table()` reads them out.

    `batch` is the index of the calibration batch being run (set by `calibrate`); `None` numbers the calls
    instead. Batch indices make results independent of how batches are split between processes.
    """

    def __init__(
        self,
        model: nn.Module,
        resolved: ResolvedPoints,
        quantile_budget: QuantileBudget,
        thresholds: Mapping[tuple[str, str], Any],
        expected_batches: int | None,
        planned_batches: int | None = None,
        eager: bool = True,
        bracket: bool = True,
        bands: Mapping[tuple[str, str], tuple[float, float]] | None = None,
    ) -> None:
        self.model = model
        self.resolved = resolved
        self.budget = quantile_budget
        self.batch: int | None = None
        self.stats: dict[str, dict[str, TensorStats]] = {}
        self.types: dict[str, str] = {}
        self.modules: dict[str, nn.Module] = {}  # path -> module, looked up once
        activations = sum(t not in PARAM_TENSORS for tensors in resolved.modules.values() for t in tensors)
        stage_bytes = max(2**18, min(STAGE_BYTES, STAGING_BYTES // max(1, activations)))
        for path, tensors in resolved.modules.items():
            try:
                module = model.get_submodule(path)
            except AttributeError as exc:
                msg = f"the model has no module {path!r} to profile"
                raise UserError(msg) from exc
            self.types[path] = module_type(module)
            self.modules[path] = module
            self.stats[path] = {
                tensor: TensorStats(
                    specs,
                    batched=tensor not in PARAM_TENSORS,
                    quantile_budget=quantile_budget,
                    threshold=thresholds.get((path, tensor)),
                    size_hint=1 if tensor in PARAM_TENSORS else expected_batches,  # a parameter is read once
                    plan_hint=None if tensor in PARAM_TENSORS else (planned_batches or expected_batches),
                    eager=eager,
                    stage_bytes=stage_bytes,
                    bracket=bracket and tensor not in PARAM_TENSORS,
                    band=(bands or {}).get((path, tensor)),
                )
                for tensor, specs in tensors.items()
            }

    def _read_params(self) -> None:
        for path, tensors in self.stats.items():
            module = self.modules[path]
            for tensor, ts in tensors.items():
                if tensor in PARAM_TENSORS:
                    value = param_view(module, tensor)  # as the rules see it: a Conv1D weight is [out, in]
                    if value is None:
                        msg = f"{path} ({type(module).__name__}) has no {tensor} to profile"
                        raise UserError(msg)
                    _update(ts, value.detach(), path, tensor, None)
                    ts.freeze()  # results now, buffers released: a parameter is read once

    def _hooks(self) -> list[Any]:
        handles = []
        for path, tensors in self.stats.items():
            module = self.modules[path]
            inputs = [(input_index(t), ts, t) for t, ts in tensors.items() if input_index(t) is not None]
            if inputs:
                handles.append(module.register_forward_pre_hook(_pre_hook(self, inputs, path)))
            out = tensors.get("data_out_0")
            if out is not None:
                handles.append(module.register_forward_hook(_post_hook(self, out, path)))
        return handles

    def activations(self) -> list[TensorStats]:
        """The activation statistics, in resolution order (the same in every process)."""
        return [ts for tensors in self.stats.values() for t, ts in tensors.items() if t not in PARAM_TENSORS]

    def pending(self) -> dict[tuple[str, str], TensorStats]:
        """`(path, tensor) -> TensorStats` of the tensors that hold pending statistics (a derived statistic
        waiting for a threshold known only after calibration; see `TensorStats.pending`)."""
        return {
            (path, t): ts
            for path, tensors in self.stats.items()
            for t, ts in tensors.items()
            if ts.updates and ts.pending()  # a tensor never seen holds nothing (its module was never called)
        }

    def missed(self) -> dict[str, dict[str, tuple]]:
        """`{path: {tensor: specs}}` of the statistics to collect again (bracketed quantiles that missed)."""
        out: dict[str, dict[str, tuple]] = {}
        for path, tensors in self.stats.items():
            for t, ts in tensors.items():
                specs = ts.missed()
                if specs:
                    out.setdefault(path, {})[t] = tuple(specs)
        return out

    def sync(self, gather=None) -> None:
        """Merge the activation statistics with the other processes' (`distributed.sync_stats`, over
        `gather`, default `all_gather_object`); parameters are the same everywhere and were read locally."""
        from ternqc.runtime.run import collectives as distributed

        distributed.sync_stats(self.activations(), gather or distributed.gather_objects)

    def table(self) -> StatsTable:
        """The collected statistics, one `ModuleStats` per resolved module, in resolution order."""
        table: StatsTable = {}
        for path, tensors in self.stats.items():
            shapes, values, notes = {}, {}, []
            for tensor, ts in tensors.items():
                if ts.updates == 0:
                    rules = ", ".join(str(o) for o in self.resolved.origins.get((path, tensor), ()))
                    asked = f" (asked for by the profile rule at {rules})" if rules else ""
                    notes.append(
                        f"{tensor}: no statistics: the module was never called with this tensor during "
                        f"calibration{asked}; its weights may be used without calling the module"
                    )
                    continue
                shape = ts.shape if tensor in PARAM_TENSORS else ts.shape[1:]
                shapes[tensor] = tuple(shape)
                ts.freeze()  # results computed once; quantile buffers go back to the pool
                results = ts.results()
                if not results:  # only pending statistics: they join the table once finished
                    continue
                values[tensor] = results
                if ts.nonfinite:
                    notes.append(f"{tensor}: {ts.nonfinite} NaN/Inf values left out")
                notes.extend(f"{tensor}: {n}" for n in ts.notes())
            table[path] = ModuleStats(
                path=path,
                node=path.replace(".", "_"),
                op=self.types[path],
                shapes=shapes,
                values=values,
                notes=tuple(notes),
            )
        return table


def _update(ts: TensorStats, x: torch.Tensor, path: str, tensor: str, batch: int | None) -> None:
    try:
        ts.update(x, batch)
    except UserError as exc:
        msg = f"{path} {tensor}: {exc}"
        raise UserError(msg) from None


def _pre_hook(collector: Collector, inputs: list[tuple[int, TensorStats, str]], path: str):
    if len(inputs) == 1 and inputs[0][0] == 0:
        ((_, ts, name),) = inputs

        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                try:  # `_update`, inline: this runs for every module on every batch
                    ts.update(args[0], collector.batch)
                except UserError as exc:
                    msg = f"{path} {name}: {exc}"
                    raise UserError(msg) from None
            else:
                _update_nth(collector, args, inputs, path)

        return hook

    def hook_n(module, args):
        _update_nth(collector, args, inputs, path)

    return hook_n


def _update_nth(
    collector: Collector, args: tuple, inputs: list[tuple[int, TensorStats, str]], path: str
) -> None:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    for index, ts, name in inputs:
        if index < len(tensors):
            _update(ts, tensors[index], path, name, collector.batch)


def _post_hook(collector: Collector, ts: TensorStats, path: str):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            _update(ts, output, path, "data_out_0", collector.batch)
        elif isinstance(output, (tuple, list)):
            for item in output:
                if isinstance(item, torch.Tensor):
                    _update(ts, item, path, "data_out_0", collector.batch)
                    break

    return hook


@contextlib.contextmanager
def collect_stats(
    model: nn.Module,
    resolved: ResolvedPoints,
    *,
    quantile_budget: QuantileBudget | None = None,
    thresholds: Mapping[tuple[str, str], Any] | None = None,
    expected_batches: int | None = None,
    planned_batches: int | None = None,
    eager: bool = True,
    bracket: bool = True,
    bands: Mapping[tuple[str, str], tuple[float, float]] | None = None,
) -> Iterator[Collector]:
    """Collect `resolved`'s statistics from every forward run inside the block.

    ```python
    with collect_stats(model, resolved) as collector:
        for x, _ in batches:
            model(x)
    table = collector.table()
    ```
    Parameters are read once, whole, on entry. The block runs under `torch.no_grad()`; every hook handle is
    removed on exit, also when the block raises.

    Args:
        model: any `nn.Module`.
        resolved: from `resolve_profile` or `ResolvedPoints.from_mapping`.
        quantile_budget: shared by every quantile statistic (a fresh 256 MiB budget when None).
        thresholds: `(module_path, tensor) -> Δ` for `threshold_abs_mean` statistics.
        expected_batches: how many forwards will run here (sizes the exact quantile buffers up front).
        planned_batches: how many forwards all processes run together (decides exact quantiles or a
            sketch as one process would; default `expected_batches`).
        eager: fold per-batch partials as they come; False in a process of a distributed run, which keeps
            them until `collector.sync`.
        bracket: quantiles over a whole activation keep only the values near their ranks (`bracket.py`);
            `collector.missed()` lists those to collect again.
        bands: `(module_path, tensor) -> (L, H)` around a predicted Δ for pending `threshold_abs_mean` statistics whose values
            may not fit the budget (`threshold_state.py`).
    """
    collector = Collector(
        model,
        resolved,
        quantile_budget or QuantileBudget(),
        dict(thresholds or {}),
        expected_batches,
        planned_batches,
        eager,
        bracket,
        bands,
    )
    handles: list[Any] = []
    try:
        with torch.no_grad():
            collector._read_params()
            handles = collector._hooks()
            yield collector
    finally:
        for handle in handles:
            handle.remove()
