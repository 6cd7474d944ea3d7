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

from collections.abc import Mapping

from attrs import field, frozen
from torch import nn

from ternqc.plan import QUANTISABLE, Origin, ProfilePoint, StatSpec
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.types import module_type as _module_type
from ternqc.runtime.quantize.types import param_view

PARAM_TENSORS = ("weight", "bias")
#: Staging memory for small activations, all tensors together (each gets at most `stats.STAGE_BYTES`).
STAGING_BYTES = 64 * 2**20


def module_type(module: nn.Module) -> str:
    """The module type a selector matches (`linear`, `conv2d`, `embedding`, ...), decided by `isinstance`:
    see `ternqc.runtime.quantize.types`. The single entry point for module types."""
    return _module_type(module)


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
        model: the model; module type = `module_type(m)`, matched by `Selector.matches`.
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
            has_param = param_view(module, point.tensor) is not None
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


def input_index(tensor: str) -> int | None:
    if tensor.startswith("data_in_") and tensor[len("data_in_") :].isdigit():
        return int(tensor[len("data_in_") :])
    return None
