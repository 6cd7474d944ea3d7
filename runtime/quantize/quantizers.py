"""Quantiser configs resolved from a module's mapped values, and the ternary kind's math.

In: per module, the op (`linear`, `relu`, `conv1d`, `conv2d`, `embedding`), its node name and the mapped quantiser
parameters `{param_name: value}` (names from `ternqc.plan.all_params()`; a value is `None` for unset/`na`, a
bool, an int, a str, a float, or nested lists of floats for per-channel values already shaped to broadcast
against the tensor). Out: a `ModuleQuant` holding one `TensorQuant` per tensor of the op, and the functions
that quantise tensors with the ternary kind (the other kinds live in `kinds/`).

For each tensor t (`data_in`, `weight`, `bias`, `data_out`) the module has:

- t's kind is `t_quantiser` if set, else `name` (`plan.QUANTISERS`); t is quantised iff `t_width` is set
  and not `32` (`plan.FLOAT_WIDTH`), and then the width must be one of its kind's (`plan.QUANTISER_WIDTHS`;
  ternary 2). The kind turns the parameters into the `TensorQuant` (`kinds/<kind>.py`); for ternary:
- Threshold Δ, the first that applies:
  `t_threshold` if set (every element >= 0); else `0.75·|t_mean|`, `0.75·|t_median|`, `0.05·|t_max|`, the
  first that is set and non-zero; else, when some of them are set but all are zero (a zero-initialised
  bias), Δ = 0 from the first set one (an all-zero tensor quantises to zeros); none set is refused by
  mapping (`kinds/ternary.py`'s `problem`), naming the rule that set the width.
  A per-channel (vector) source counts as non-zero when *any* element is non-zero, and then the whole
  vector is used: a channel whose element is 0 gets Δ = 0 (every non-zero value becomes ±1). Fall-through
  is decided for the whole source, never element by element, so Δ always comes from one rule.
- `T(x) = +1 if x > Δ, -1 if x < -Δ, 0 otherwise` (a value exactly at ±Δ becomes 0).
- `q(x) = α·T(x)` if `t_scaling_factor`, else `T(x)`.
- α = `t_scale` if set (every element >= 0), else derived: for weight and bias the mean of |w| over |w| > Δ
  (0 if none; see `weight_alpha`), for data_in the mean of |x| over |x| > Δ over the calibration data,
  which the runtime gathers and fills in before conversion (`ModuleQuant.with_alpha`).

Δ and α are stored at the precision of the tensor they quantise (float32 for a float32 model), so the
comparisons with ±Δ happen at that precision.

Resolving parameters needs only numpy: torch is imported by the math functions when first called, so
`ternqc map` can validate a config without paying for `import torch`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Union

import attrs
import numpy as np
from attrs import field, frozen

from ternqc.plan import (
    FLOAT_WIDTH,
    QUANTISABLE,
    QUANTISERS,
    TERNARY_WIDTH,
    split_param,
)

if TYPE_CHECKING:
    import torch

#: A quantiser value as stored: a float, nested tuples of floats (per channel), or None.
Value = Union[float, tuple, None]

#: Δ sources after `t_threshold`, in order, with their factors.
THRESHOLD_SOURCES: tuple[tuple[str, float], ...] = (("mean", 0.75), ("median", 0.75), ("max", 0.05))


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------


def _freeze(value: Any) -> Value:
    """A float, or nested lists/tuples/arrays of numbers -> nested tuples of floats; None stays None."""
    if value is None:
        return None
    if _is_tensor(value):
        value = value.detach().cpu().tolist()
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 0:
            return float(arr)
        return _to_tuples(arr.tolist())
    return float(value)


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # not imported -> cannot be a tensor
    return torch is not None and isinstance(value, torch.Tensor)


def _to_tuples(v: Any) -> Any:
    return tuple(_to_tuples(x) for x in v) if isinstance(v, list) else float(v)


def _thaw(value: Value) -> Any:
    """The inverse of `_freeze`, for JSON: nested tuples -> nested lists."""
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _repr_value(value: Value) -> str:
    """A scalar as itself, a vector summarised (`[100 values, shape (100, 1), mean 0.0312]`)."""
    if not isinstance(value, tuple):
        return repr(value)
    arr = np.asarray(value, dtype=np.float64)
    return f"[{arr.size} values, shape {arr.shape}, mean {arr.mean():.4g}]"


def _check_nonnegative_finite(inst: Any, att: attrs.Attribute, value: Value) -> None:
    if value is None:
        return
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        msg = f"{type(inst).__name__}.{att.name} must be finite, >= 0 and not empty, got {_thaw(value)!r}"
        raise ValueError(msg)


@frozen
class TensorQuant:
    """How one tensor of a module is quantised.

    quantize: False leaves the tensor in float (then the other fields are unused: None / False).
    delta: the threshold Δ, a float or nested tuples of floats shaped to broadcast against the tensor.
    scaling: whether `q(x) = α·T(x)` (True) or `T(x)` (False).
    alpha: the scale α when given (`t_scale`, or a data_in α the runtime calibrated); None to derive it from
        the tensor itself (weight and bias) or when `scaling` is False.
    """

    quantize: bool = field(validator=attrs.validators.instance_of(bool))
    delta: Value = field(
        default=None, converter=_freeze, validator=_check_nonnegative_finite, repr=_repr_value
    )
    scaling: bool = field(default=False, validator=attrs.validators.instance_of(bool))
    alpha: Value = field(
        default=None, converter=_freeze, validator=_check_nonnegative_finite, repr=_repr_value
    )
    kind: str = field(default="ternary", validator=attrs.validators.in_(QUANTISERS))
    width: int = field(default=TERNARY_WIDTH, validator=attrs.validators.instance_of(int))
    group_size: int | None = field(default=None)
    per_channel: bool = field(default=False, validator=attrs.validators.instance_of(bool))
    dynamic: bool = field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if self.quantize and self.kind == "ternary" and self.delta is None:
            raise ValueError("a quantised tensor needs a threshold delta")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (nested lists for per-channel values)."""
        return {
            "quantize": self.quantize,
            "delta": _thaw(self.delta),
            "scaling": self.scaling,
            "alpha": _thaw(self.alpha),
            "kind": self.kind,
            "width": self.width,
            "group_size": self.group_size,
            "per_channel": self.per_channel,
            "dynamic": self.dynamic,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorQuant:
        """Read `to_dict`'s output (files from before the kinds: ternary, width 2). Raises `ValueError` (or
        `KeyError`/`TypeError`) when malformed."""
        return cls(
            quantize=d["quantize"],
            delta=d["delta"],
            scaling=d["scaling"],
            alpha=d["alpha"],
            kind=d.get("kind", "ternary"),
            width=d.get("width", TERNARY_WIDTH),
            group_size=d.get("group_size"),
            per_channel=d.get("per_channel", False),
            dynamic=d.get("dynamic", False),
        )

    @classmethod
    def float_(cls) -> TensorQuant:
        """A tensor left in float."""
        return cls(quantize=False)


@frozen
class ModuleQuant:
    """The resolved quantiser of one module: its op, its node name, and a `TensorQuant` for each tensor the
    op has (`plan.QUANTISABLE[op]`: `data_in`, and for linear/conv also `weight` and `bias`)."""

    op: str = field(validator=attrs.validators.in_(tuple(QUANTISABLE)))
    node: str
    tensors: dict[str, TensorQuant] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        unknown = sorted(set(self.tensors) - set(QUANTISABLE[self.op]))
        if unknown:
            msg = f"{self.op} has no tensor(s) {unknown}; it has {list(QUANTISABLE[self.op])}"
            raise ValueError(msg)

    def tensor(self, name: str) -> TensorQuant:
        """The `TensorQuant` of `name`; a tensor the config does not mention stays in float."""
        return self.tensors.get(name) or TensorQuant.float_()

    @property
    def quantises_anything(self) -> bool:
        """Whether any tensor is quantised (a module that quantises nothing is left as it is)."""
        return any(t.quantize for t in self.tensors.values())

    def with_alpha(self, tensor: str, alpha: Any) -> ModuleQuant:
        """A copy with `tensor`'s α set (e.g. a data_in α the runtime calibrated)."""
        new = attrs.evolve(self.tensor(tensor), alpha=alpha)
        return attrs.evolve(self, tensors={**self.tensors, tensor: new})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values."""
        tensors = {k: v.to_dict() for k, v in self.tensors.items()}
        return {"op": self.op, "node": self.node, "tensors": tensors}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModuleQuant:
        """Read `to_dict`'s output. Raises `ValueError` (or `KeyError`/`TypeError`) when malformed."""
        return cls(
            op=d["op"],
            node=d["node"],
            tensors={k: TensorQuant.from_dict(v) for k, v in d["tensors"].items()},
        )


# ---------------------------------------------------------------------------------------------------------
# Parameters -> ModuleQuant
# ---------------------------------------------------------------------------------------------------------


def module_quant_from_params(op: str, node: str, params: dict[str, Any]) -> ModuleQuant:
    """One module's mapped quantiser parameters as a `ModuleQuant`.

    The parameters are trusted: mapping (`mapping.py`, `combinations.py`) checked each value and each tensor's
    combination of them once, naming the rule that set it; this function only builds.

    Args:
        op: the module's op, a key of `plan.QUANTISABLE`.
        node: the module's node name.
        params: `{param_name: value}` as mapping gives them; a missing name or `None` (or the string `"NA"`,
            MASE's spelling) is unset. Parameters of tensors the op does not have (e.g. `weight_width` on a
            ReLU) are ignored.

    Returns:
        A `ModuleQuant` with a `TensorQuant` for every tensor of the op (see the module docstring for Δ, α).
    """
    from ternqc.runtime.quantize.kinds import get_kind

    own = set(QUANTISABLE[op])
    values = {
        k: v
        for k, v in params.items()
        if not _unset(v) and (k == "name" or (split_param(k) or ("",))[0] in own)
    }
    tensors: dict[str, TensorQuant] = {}
    for t in QUANTISABLE[op]:
        width = values.get(f"{t}_width")
        if width is None or width == FLOAT_WIDTH:
            tensors[t] = TensorQuant.float_()
            continue
        kind = get_kind(values.get(f"{t}_quantiser") or values["name"])
        tensors[t] = kind.config(t, int(width), values)
    return ModuleQuant(op=op, node=node, tensors=tensors)


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.upper() == "NA")


def resolve_threshold(t: str, values: dict[str, Any]) -> Any:
    """Δ of tensor `t` by the threshold rule (module docstring), or None when no source is set."""
    threshold = values.get(f"{t}_threshold")
    if threshold is not None:
        return threshold
    zero = None
    for source, factor in THRESHOLD_SOURCES:
        v = values.get(f"{t}_{source}")
        if v is not None and np.any(np.asarray(v) != 0):
            return factor * np.abs(np.asarray(v, dtype=np.float64))
        if v is not None and zero is None:
            zero = factor * np.abs(np.asarray(v, dtype=np.float64))
    return zero  # every source that is set is zero (an all-zero bias): Δ = 0, and 0 quantises to 0


# ---------------------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------------------


def as_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A float / nested list / tensor as a tensor with `like`'s dtype and device."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    plain = _thaw(value) if isinstance(value, tuple) else value
    return torch.as_tensor(plain, dtype=like.dtype, device=like.device)


def ternarize(x: torch.Tensor, delta: Any) -> torch.Tensor:
    """T(x): +1 where x > Δ, -1 where x < -Δ, 0 otherwise (exactly at ±Δ: 0). Same dtype and shape as the
    broadcast of x and Δ; Δ is a float, nested list or tensor."""
    d = as_tensor(delta, x)
    return (x > d).to(x.dtype) - (x < -d).to(x.dtype)


def broadcasts_to(shape: tuple[int, ...], target: tuple[int | None, ...]) -> bool:
    """Whether a tensor of `shape` broadcasts to `target` without enlarging it: at most as many dimensions, each
    (right-aligned) 1 or `target`'s; a None in `target` is a size not known yet (a sample's), which any size
    fits. (What `torch.broadcast_shapes(shape, target) == target` says, without its first call importing sympy:
    half a second of every `apply`.)"""
    if len(shape) > len(target):
        return False
    return all(s == 1 or t is None or s == t for s, t in zip(reversed(tuple(shape)), reversed(tuple(target))))


def weight_alpha(w: torch.Tensor, delta: Any) -> torch.Tensor:
    """α derived from a weight or bias: the mean of |w| over the elements with |w| > Δ (0 where none).

    Per channel: α has Δ's shape, and each element of α is taken over the elements of `w` that the
    corresponding element of Δ governs under broadcasting, i.e. `w` is reduced over every dimension where Δ
    (right-aligned) has size 1 or is absent. A scalar Δ gives a scalar (0-dim) α; Δ of shape [out, 1] on a
    [out, in] weight gives one α per output row, [out, 1, 1, 1] on a conv weight one per output channel.

    Raises:
        ValueError: Δ does not broadcast to `w`'s shape without enlarging it.
    """
    import torch

    d = as_tensor(delta, w)
    if not broadcasts_to(d.shape, w.shape):
        msg = f"threshold of shape {tuple(d.shape)} does not fit a tensor of shape {tuple(w.shape)}"
        raise ValueError(msg)
    padded = (1,) * (w.dim() - d.dim()) + tuple(d.shape)
    dims = [i for i, s in enumerate(padded) if s == 1]
    a = w.detach().abs()
    mask = (a > d).to(a.dtype)
    if not dims:
        return (a * mask).reshape(d.shape)  # one Δ per element: α is |w| where it exceeds Δ
    # A fixed summation order: α must have the same bits in every process of a distributed run, whatever
    # its thread count (torch's single-value sums split the work by thread).
    from ternqc.runtime.calibrate.stats.sums import fixed_order_sum

    total = fixed_order_sum(a * mask, dims, keepdim=True)
    count = fixed_order_sum(mask, dims, keepdim=True)
    alpha = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return alpha.reshape(d.shape)


def quantize(x: torch.Tensor, delta: Any, alpha: Any, scaling: bool) -> torch.Tensor:
    """q(x) = α·T(x) if `scaling`, else T(x).

    Raises:
        ValueError: `scaling` is True and `alpha` is None (derive it first, e.g. with `weight_alpha`).
    """
    t = ternarize(x, delta)
    if not scaling:
        return t
    if alpha is None:
        raise ValueError("quantize with scaling needs alpha")
    return t * as_tensor(alpha, x)


__all__ = [
    "THRESHOLD_SOURCES",
    "ModuleQuant",
    "TensorQuant",
    "as_tensor",
    "module_quant_from_params",
    "quantize",
    "resolve_threshold",
    "ternarize",
    "weight_alpha",
]
