"""The hook profiler: resolve the plan's profile points against a model, then collect statistics with hooks.

In: the plan's `ProfilePoint`s and an `nn.Module`. `resolve_profile` is a pure mapping
`{module_path: {canonical tensor: (StatSpec, ...)}}` (deduplicated, first-seen order) plus the points that
matched nothing. `collect_stats(model, resolved)` is a context manager: inside it, every forward of the
model feeds the statistics; afterwards `collector.table()` is a `StatsTable`.

Tensors: `data_in_N` is the N-th tensor among a module's positional arguments (a forward pre-hook),
`data_out_0` its output (or the first tensor of a tuple output; a forward hook), `weight` / `bias` the
parameter, read once, whole. Hooks work on any `nn.Module` (no FX tracing), so forwards with Python control
flow on tensor values are fine. A module that is never called (e.g. `MultiheadAttention.out_proj`, whose
weight is used functionally) gets no activation statistics, and the table says so in the module's notes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from attrs import field, frozen
from torch import nn

from ternqc.plan import QUANTISABLE, Origin, ProfilePoint, StatSpec
from ternqc.runtime.errors import UserError
from ternqc.runtime.stats import STAGE_BYTES, QuantileBudget, TensorStats
from ternqc.runtime.stats_table import ModuleStats, StatsTable

PARAM_TENSORS = ("weight", "bias")
#: Staging memory for small activations, all tensors together (each gets at most `stats.STAGE_BYTES`).
STAGING_BYTES = 64 * 2**20


def module_type(module: nn.Module) -> str:
    """The module type a selector matches: the class name in lower case (`linear`, `conv2d`, ...)."""
    return type(module).__name__.lower()


@frozen
class ResolvedPoints:
    """Which statistics to collect where.

    `modules`: module path -> canonical tensor -> statistics, in first-seen order. `unmatched`: profile
    points that matched no module. `origins`: (module path, tensor) -> the rules that asked for it (for
    messages such as "the module was never called").
    """

    modules: dict[str, dict[str, tuple[StatSpec, ...]]] = field(factory=dict)
    unmatched: tuple[ProfilePoint, ...] = ()
    origins: dict[tuple[str, str], tuple[Origin, ...]] = field(factory=dict)

    @classmethod
    def from_mapping(cls, modules: Mapping[str, Mapping[str, tuple[StatSpec, ...]]]) -> ResolvedPoints:
        """Points given directly as `{module_path: {tensor: specs}}` (e.g. a second calibration pass)."""
        return cls(modules={p: {t: tuple(s) for t, s in ts.items()} for p, ts in modules.items()})


def resolve_profile(
    points: tuple[ProfilePoint, ...] | list[ProfilePoint],
    model: nn.Module,
    include_derived: bool = False,
    *,
    missing_params: str = "error",
) -> ResolvedPoints:
    """Match each profile point's selector against the model's named modules (the root excluded).

    Args:
        points: the plan's profile points, in plan order.
        model: the model; module type = `type(m).__name__.lower()`, matched by `Selector.matches`.
        include_derived: also resolve points with reason `derived` (statistics gathered in a later pass).
        missing_params: `"error"` (the default) or `"skip"`: what to do when a name or glob point asks for
            `weight` or `bias` of a module that has no such tensor (or has it set to None); type and `default`
            points skip such modules (a `Linear(..., bias=False)` has no bias to profile). A `default` selector only
            matches modules whose type has the tensor at all (`plan.QUANTISABLE`: a ReLU has no weight).

    Returns:
        The mapping, deduplicated and in first-seen order, and the points that matched no module.

    Raises:
        UserError: a point asks for a parameter the module lacks (with `missing_params="error"`).
    """
    modules: dict[str, dict[str, list[StatSpec]]] = {}
    origins: dict[tuple[str, str], list[Origin]] = {}
    unmatched = []
    named = [(path, m, module_type(m)) for path, m in model.named_modules() if path]
    order = [(path, mtype) for path, _m, mtype in named]  # for first(T) / last(T)
    for point in points:
        if point.reason == "derived" and not include_derived:
            continue
        hit = False
        for path, module, mtype in named:
            if not point.selector.matches(path, mtype, order):
                continue
            if point.selector.kind == "default" and not _type_has(mtype, point.tensor):
                continue  # `default` means every quantisable module that has this tensor at all
            hit = True
            has_param = isinstance(getattr(module, point.tensor, None), torch.Tensor)
            if point.tensor in PARAM_TENSORS and not has_param:
                # A type or `default` rule speaks of every module of a kind, some built without a bias
                # (`Linear(..., bias=False)`): those simply have nothing to profile there. A rule that names
                # the module asks for something it does not have.
                if missing_params == "skip" or point.selector.kind in ("type", "default"):
                    continue
                msg = (
                    f"profile rule at {point.origin} asks for the {point.tensor} of {path} "
                    f"({type(module).__name__}), but that module has no {point.tensor}"
                )
                raise UserError(msg)
            specs = modules.setdefault(path, {}).setdefault(point.tensor, [])
            specs.extend(s for s in point.stats if s not in specs)
            where = origins.setdefault((path, point.tensor), [])
            if point.origin not in where:
                where.append(point.origin)
        if not hit:
            unmatched.append(point)
    return ResolvedPoints(
        modules={p: {t: tuple(s) for t, s in ts.items()} for p, ts in modules.items()},
        unmatched=tuple(unmatched),
        origins={k: tuple(v) for k, v in origins.items()},
    )


def _type_has(mtype: str, tensor: str) -> bool:
    """Whether modules of quantisable type `mtype` have `tensor` (`plan.QUANTISABLE`; `data_out` always)."""
    base = tensor.rstrip("0123456789").rstrip("_")
    return base == "data_out" or base in QUANTISABLE.get(mtype, ())


def _input_index(tensor: str) -> int | None:
    if tensor.startswith("data_in_") and tensor[len("data_in_") :].isdigit():
        return int(tensor[len("data_in_") :])
    return None


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
    ) -> None:
        self.model = model
        self.resolved = resolved
        self.budget = quantile_budget
        self.batch: int | None = None
        self.stats: dict[str, dict[str, TensorStats]] = {}
        self.types: dict[str, str] = {}
        activations = sum(t not in PARAM_TENSORS for tensors in resolved.modules.values() for t in tensors)
        stage_bytes = max(2**18, min(STAGE_BYTES, STAGING_BYTES // max(1, activations)))
        for path, tensors in resolved.modules.items():
            try:
                module = model.get_submodule(path)
            except AttributeError as exc:
                msg = f"the model has no module {path!r} to profile"
                raise UserError(msg) from exc
            self.types[path] = module_type(module)
            self.stats[path] = {
                tensor: TensorStats(
                    specs,
                    batched=tensor not in PARAM_TENSORS,
                    quantile_budget=quantile_budget,
                    threshold=thresholds.get((path, tensor)),
                    size_hint=None if tensor in PARAM_TENSORS else expected_batches,
                    plan_hint=None if tensor in PARAM_TENSORS else (planned_batches or expected_batches),
                    eager=eager,
                    stage_bytes=stage_bytes,
                )
                for tensor, specs in tensors.items()
            }

    def _read_params(self) -> None:
        for path, tensors in self.stats.items():
            module = self.model.get_submodule(path)
            for tensor, ts in tensors.items():
                if tensor in PARAM_TENSORS:
                    value = getattr(module, tensor, None)
                    if not isinstance(value, torch.Tensor):
                        msg = f"{path} ({type(module).__name__}) has no {tensor} to profile"
                        raise UserError(msg)
                    _update(ts, value.detach(), path, tensor, None)
                    ts.freeze()  # results now, buffers released: a parameter is read once

    def _hooks(self) -> list[Any]:
        handles = []
        for path, tensors in self.stats.items():
            module = self.model.get_submodule(path)
            inputs = [(_input_index(t), ts, t) for t, ts in tensors.items() if _input_index(t) is not None]
            if inputs:
                handles.append(module.register_forward_pre_hook(_pre_hook(self, inputs, path)))
            out = tensors.get("data_out_0")
            if out is not None:
                handles.append(module.register_forward_hook(_post_hook(self, out, path)))
        return handles

    def activations(self) -> list[TensorStats]:
        """The activation statistics, in resolution order (the same in every process)."""
        return [ts for tensors in self.stats.values() for t, ts in tensors.items() if t not in PARAM_TENSORS]

    def sync(self, gather=None) -> None:
        """Merge the activation statistics with the other processes' (`distributed.sync_stats`, over
        `gather`, default `all_gather_object`); parameters are the same everywhere and were read locally."""
        from ternqc.runtime import distributed

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
                values[tensor] = ts.results()
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
                _update(ts, args[0], path, name, collector.batch)
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
    """
    collector = Collector(
        model,
        resolved,
        quantile_budget or QuantileBudget(),
        dict(thresholds or {}),
        expected_batches,
        planned_batches,
        eager,
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
