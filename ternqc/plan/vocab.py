"""The vocabulary the compiler and the runtime agree on: plan versions, tensors, statistics with their fields
and options, quantisable module types, quantiser kinds, widths and parameters. Plain tables and two
functions over them (`split_param`, `all_params`); re-exported by `ternqc.plan`.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen

PLAN_VERSION = 2
#: Plan versions this ternqc reads: version 1 plans (no lets, asserts or selector forms of language v2) mean
#: the same under version 2.
READABLE_VERSIONS = (1, 2)
#: The deepest expression the compiler accepts and a plan may hold (every pass over expressions recurses).
MAX_EXPR_DEPTH = 100

# ---------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------

#: Tensor names in the language, and their canonical names in the plan (MASE's argument names).
TENSOR_ALIASES: dict[str, str] = {
    "data_in": "data_in_0",
    "data_out": "data_out_0",
    "weight": "weight",
    "bias": "bias",
}
#: Tensors a quantiser parameter can be about (`data_in_max`, `weight_width`, `data_out_width`, ...).
PARAM_TENSORS: tuple[str, ...] = ("data_in", "weight", "bias", "data_out")


@frozen
class StatKind:
    """What a statistic produces (`fields`) and which options it takes beyond `dims` and `abs`."""

    fields: tuple[str, ...]
    options: tuple[tuple[str, float], ...] = ()  # (option name, default value)

    def option_defaults(self) -> dict[str, float]:
        return dict(self.options)


#: MASE's statistics, with MASE's result fields and options (see shared/MASE.md).
STATISTICS: dict[str, StatKind] = {
    "range_min_max": StatKind(("min", "max", "range", "count")),
    "range_quantile": StatKind(("min", "max", "range", "count"), (("quantile", 0.975),)),
    "variance_precise": StatKind(("mean", "variance", "count")),
    "variance_online": StatKind(("mean", "variance", "count")),
    "abs_mean": StatKind(("abs_mean", "count")),
    "range_n_sigma": StatKind(("min", "max", "range", "count"), (("num_sigma", 3.0),)),
}

#: Statistics the compiler adds on its own and users cannot name. `threshold_abs_mean` is the mean of |x|
#: over |x| > Δ (the ternary scale α of an activation), where Δ is the module's resolved threshold; the
#: runtime gathers it in a second pass over the calibration batches once Δ is known.
DERIVED_STATISTICS: dict[str, StatKind] = {
    "threshold_abs_mean": StatKind(("abs_mean", "count")),
}

#: Options every statistic takes, with defaults.
COMMON_STAT_OPTIONS: dict[str, Any] = {"dims": "all", "abs": False}

#: Module types that can be quantised, and the tensors each has.
QUANTISABLE: dict[str, tuple[str, ...]] = {
    "linear": ("data_in", "weight", "bias", "data_out"),
    "relu": ("data_in", "data_out"),
    "conv1d": ("data_in", "weight", "bias", "data_out"),
    "conv2d": ("data_in", "weight", "bias", "data_out"),
    "embedding": ("weight",),
}

#: Quantiser kinds and the widths each takes (`FLOAT_WIDTH` or `na` always leaves a tensor in float). The
#: runtime's kind registry (`ternqc.runtime.quantize.kinds`) holds the same names, widths and parameters; a
#: test pins the two equal. `name` is a module's default kind, `<tensor>_quantiser` overrides it per tensor.
QUANTISER_WIDTHS: dict[str, tuple[int, ...]] = {
    "ternary": (2,),
    "binary": (1,),
    "integer": tuple(range(2, 17)),
}
#: Per-tensor parameter suffixes each kind reads (besides `width` and `quantiser`); setting one a tensor's
#: kind does not read is allowed (it may be meant for another kind) and ignored.
QUANTISER_PARAMS: dict[str, tuple[str, ...]] = {
    "ternary": ("scaling_factor", "mean", "median", "max", "threshold", "scale", "group_size", "per_channel"),
    "binary": ("scaling_factor", "scale", "group_size", "per_channel", "dynamic"),
    "integer": ("max", "scale", "group_size", "per_channel", "dynamic"),
}

#: Quantiser names.
QUANTISERS: tuple[str, ...] = tuple(QUANTISER_WIDTHS)

#: Per-tensor parameter suffixes and the kind of value each takes:
#: "int", "bool", or "number" (a number, an expression over statistics, or `na`).
PARAM_SUFFIXES: dict[str, str] = {
    "width": "int",
    "frac_width": "int",  # MASE compatibility; written to MASE TOML, the ternary quantiser ignores it
    "scaling_factor": "bool",
    "mean": "number",
    "median": "number",
    "max": "number",
    "threshold": "number",
    "scale": "number",
    "quantiser": "quantiser",  # a kind of QUANTISERS, overriding `name` for this tensor
    "group_size": "int",  # weight/bias: one scale per group of N consecutive input elements of a row
    "per_channel": "bool",  # weight/bias: one derived scale per output channel
    "dynamic": "bool",  # data_in/data_out: scales computed per row (token) at run time from |x|'s max
}
#: Width of a tensor the ternary quantiser quantises (see `QUANTISER_WIDTHS` for every kind); `FLOAT_WIDTH` (or `na`) leaves the tensor in float.
TERNARY_WIDTH = 2
FLOAT_WIDTH = 32


def split_param(param: str) -> tuple[str, str] | None:
    """`"weight_max"` -> `("weight", "max")`; `None` when `param` is not a per-tensor parameter."""
    for tensor in PARAM_TENSORS:
        prefix = tensor + "_"
        if param.startswith(prefix) and param[len(prefix) :] in PARAM_SUFFIXES:
            return tensor, param[len(prefix) :]
    return None


def all_params() -> tuple[str, ...]:
    """Every quantiser parameter name: `name` and `<tensor>_<suffix>` for each tensor and suffix."""
    return ("name",) + tuple(f"{t}_{s}" for t in PARAM_TENSORS for s in PARAM_SUFFIXES)
