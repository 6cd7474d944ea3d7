"""Ternary modules: a float module quantised in place, so that every reader of its weight sees q(weight).

In: a float module and its `ModuleQuant` (see `quantizers.py`). Out: the same module object, converted by
`TernaryLinear.from_float(module, config)` (likewise `TernaryConv1d`, `TernaryConv2d`, `TernaryReLU`,
`TernaryEmbedding`; `TERNARY_MODULES` maps each op name of `plan.QUANTISABLE` to its kind).

Why in place: a parent may read `child.weight` without calling the child (`MultiheadAttention` reads
`out_proj.weight`, `TransformerEncoderLayer`'s fused fast path reads `linear1.weight`), and a user's subclass
or transformers' `Conv1D` has its own forward. Swapping in another module would leave all of those computing
in float. So the weight and bias get a `torch.nn.utils.parametrize` parametrization (`TernaryParam`):
`module.weight` *is* q(weight) for every reader, fused paths included, and the module keeps its class
(`ParametrizedLinear`, still an `nn.Linear`) and its forward.

A converted module holds (its public state, all in its `state_dict`):
- `module.parametrizations.weight.original`: the latent float weight (the same Parameter object as before
  conversion, so an optimizer built earlier still holds it); `module.parametrizations.weight[0]`: the
  `TernaryParam` with buffers `delta` and `alpha` (None when unscaled, or when α is derived from the weight:
  the mean of |w| over |w| > Δ, kept in step with the weight) and the flags `scaling`, `derived_alpha` and
  `transposed` (transformers' `Conv1D` stores `[in, out]`; Δ/α are in the language's `[out, in]` layout).
  The same for `bias`.
- `module.ternary_input`: a `TernaryInput` (buffers `delta`, `alpha`) when data_in is quantised, applied by
  a forward pre-hook. Any hook inside a `TransformerEncoderLayer` turns off its fused fast path, which would
  otherwise skip the module; a module that is never called (MultiheadAttention's `out_proj`) cannot have its
  input quantised: the pipeline names it instead of converting it (`pipeline.check_effect`).
- `module.ternary_output`: the same for data_out when it is quantised, applied by a forward hook on the
  module's output.
- `module.ternary_config`: the `ModuleQuant` it was converted with (a plain attribute).

Every quantiser delegates to its tensor's kind (`kinds/`: ternary, binary, integer; per tensor, per output
channel, per group of a weight row, or dynamic per row for activations): `delta` is the ternary threshold
(None for the other kinds), `alpha` the scale (α or the integer step; for a weight without `t_scale` it is
derived from the weight by the kind, per tensor / channel / group, and kept in step with it; for a dynamic
activation it is computed per row at run time). The names say "ternary" for history: the class names and
attributes are the same whichever kind a tensor has.

q(w) is computed once and cached (eval forward costs what float costs); the cache follows the latent
weight (its version counter, e.g. after an optimizer step or `load_state_dict`) and Δ/α. With gradients
enabled on a weight that requires them, the parametrization is a straight-through estimator: forward
q(w), gradient of the identity (`q + (w - w.detach())`, exactly q in value). Activations likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import torch
from torch import nn
from torch.nn.utils import parametrize

from ternqc.plan import QUANTISABLE
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.kinds import get_kind, granularity, row_dims
from ternqc.runtime.quantize.kinds.registry import check_groups, scale_for
from ternqc.runtime.quantize.quantizers import (
    ModuleQuant,
    TensorQuant,
    as_tensor,
    broadcasts_to,
    ternarize,
)
from ternqc.runtime.quantize.types import MODULE_TYPES, is_transposed, module_type, param_view

PARAM_TENSORS = ("weight", "bias")
_SYMBOL = {"delta": "Δ", "alpha": "α"}


class TernaryParam(nn.Module):
    """A parametrization `w -> q(w) = s·c(w)` (or `c(w)` unscaled) for a weight or bias, by its kind.

    Buffers `delta` (the ternary threshold; None for the other kinds) and `alpha` (the given scale; None
    when unscaled or derived from the weight) are in the language's layout (`[out, 1]` per output channel,
    `[out, n_groups]` per group); `transposed` says the stored tensor is the transpose of that layout
    (transformers' `Conv1D`). `tq` is the tensor's config (kind, width, granularity).
    """

    def __init__(self, tq: TensorQuant, like: torch.Tensor, *, transposed: bool = False) -> None:
        super().__init__()
        self.tq = tq
        self.kind = get_kind(tq.kind)
        self.scaling = tq.scaling
        self.derived_alpha = tq.scaling and tq.alpha is None
        self.transposed = transposed
        self.register_buffer("delta", None if tq.delta is None else as_tensor(tq.delta, like))
        given = tq.alpha if tq.scaling and tq.alpha is not None else None
        self.register_buffer("alpha", None if given is None else as_tensor(given, like))
        self._cache: torch.Tensor | None = None
        self._key: tuple | None = None

    def alpha_of(self, w: torch.Tensor) -> torch.Tensor | None:
        """The scale applied to the stored tensor `w` as stored (not expanded over groups): the given one,
        the one the kind derives from `w`, or None unscaled."""
        if not self.scaling:
            return None
        if self.alpha is not None:
            return self.alpha
        with torch.no_grad():
            return self.kind.derive_scale(self._view(w.detach()), self.tq, self.delta)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """q(w) for the stored tensor `w`, in the stored layout, without a gradient."""
        with torch.no_grad():
            v = self._view(w.detach())
            alpha = self.alpha_of(w)
            scale = None if alpha is None else scale_for(alpha, tuple(v.shape), self.tq)
            q = self.kind.quantize(v, self.tq, self.delta, scale)
            return q.t() if self.transposed else q

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes c(w) of the stored tensor `w` in the language's layout (float tensor)."""
        with torch.no_grad():
            v = self._view(w.detach())
            alpha = self.alpha_of(w)
            scale = None if alpha is None else scale_for(alpha, tuple(v.shape), self.tq)
            return self.kind.codes(v, self.tq, self.delta, scale)

    def _view(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.transposed else w

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # Called on every read of `module.weight`: kept to a few attribute reads. A new dtype or device
        # moves `data_ptr`; an in-place update (optimizer step, load_state_dict) moves `_version`.
        buffers = self._buffers
        delta, alpha = buffers["delta"], buffers["alpha"]
        key = (w._version, w.data_ptr(), None if delta is None else delta._version,
               None if alpha is None else alpha._version)
        q = self._cache
        if q is None or key != self._key:
            q = self._cache = self.quantize(w)
            self._key = key
        if w.requires_grad and torch.is_grad_enabled():
            return q + (w - w.detach())  # straight-through: the value of q, the gradient of the identity
        return q

    def extra_repr(self) -> str:
        return _describe(self.tq, self.delta, self.alpha, derived=self.derived_alpha) + (
            ", transposed" if self.transposed else "")


class TernaryInput(nn.Module):
    """`x -> q(x) = s·c(x)` (or `c(x)`) for a module's input (or output: `ternary_output`), by its kind: the
    calibrated Δ and α / step (buffers), or per-row scales computed at run time (dynamic)."""

    def __init__(self, tq: TensorQuant, like: torch.Tensor, op: str = "linear") -> None:
        super().__init__()
        self.tq = tq
        self.op = op
        self.kind = get_kind(tq.kind)
        self.register_buffer("delta", None if tq.delta is None else as_tensor(tq.delta, like))
        self.register_buffer("alpha", as_tensor(tq.alpha, like) if tq.scaling and tq.alpha is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tq = self.tq
        if tq.kind == "ternary":  # the common case, without the generic dispatch
            q = ternarize(x, self._buffers["delta"])
            alpha = self._buffers["alpha"]
            if alpha is not None:
                q = q * alpha
        else:
            scale = self.kind.dynamic_scale(x, tq, row_dims(self.op, x)) if tq.dynamic else self.alpha
            q = self.kind.quantize(x, tq, self.delta, scale)
        if x.requires_grad and torch.is_grad_enabled():
            return q.detach() + (x - x.detach())  # straight-through
        return q

    def zero_mask_fn(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A function `x -> bool mask of the elements whose code is 0`, or None where the kind has no
        zero code or the scale is per row (binary, dynamic)."""
        tq = self.tq
        if tq.kind == "ternary":
            return lambda x, d=self.delta: x.abs() <= d
        if self.kind.has_zero and not tq.dynamic:
            return lambda x, k=self.kind, t=tq, a=self.alpha: k.codes(x, t, None, a) == 0
        return None

    def extra_repr(self) -> str:
        return _describe(self.tq, self.delta, self.alpha)


def _describe(tq: TensorQuant, delta: torch.Tensor | None, alpha: torch.Tensor | None, *, derived: bool = False) -> str:
    if not tq.scaling:
        scale = "no scaling"
    elif tq.dynamic:
        scale = "α per row"
    elif alpha is None:
        scale = "α derived"
    else:
        scale = f"α={_fmt_values(alpha)}"
    head = "" if delta is None else f"Δ={_fmt_values(delta)}, "
    kind = "" if tq.kind == "ternary" and not tq.group_size and not tq.per_channel else (
        f"{tq.kind} {tq.width}-bit {granularity(tq)}, ")
    return f"{kind}{head}{scale}"


def _quantise_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a converted module: its first positional argument becomes q(x)."""
    if args and isinstance(args[0], torch.Tensor):
        return (module.ternary_input(args[0]), *args[1:])
    return None


def _quantise_output(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook of a converted module with a quantised data_out: a tensor output becomes q(y)."""
    if isinstance(output, torch.Tensor):
        return module.ternary_output(output)
    return None


class TernaryModule:
    """One quantisable type's conversion (`op`, one of `plan.QUANTISABLE`): `from_float(module, config)`
    quantises `module` in place and returns it. Subclasses say how a data_in value must broadcast."""

    op: ClassVar[str]

    @classmethod
    def from_float(cls, module: nn.Module, mq: ModuleQuant) -> nn.Module:
        """Quantise `module` in place with `mq` and return it (see the module docstring for its state).

        Raises:
            UserError: `module` is not of this type, `mq` is for another op, the module is already
                converted, a Δ/α does not fit its tensor, or data_in has scaling without α.
        """
        return cls.prepare(module, mq)()

    @classmethod
    def prepare(cls, module: nn.Module, mq: ModuleQuant) -> Callable[[], nn.Module]:
        """Check everything and build the quantisers, touching nothing; the returned function converts.

        Raises:
            UserError: as `from_float`.
        """
        node = mq.node
        mtype = module_type(module)
        if mtype != cls.op:
            msg = f"{node}: cannot convert a {type(module).__name__} ({mtype}) with {cls.__name__}: it needs a {cls.op}"
            raise UserError(msg)
        if mq.op != cls.op:
            msg = f"{node}: the config is for a {mq.op} but the module is a {type(module).__name__} ({mtype})"
            raise UserError(msg)
        if is_converted(module):
            msg = f"{node}: the module is already converted to ternary"
            raise UserError(msg)
        cls._check_module(module, mq)
        params: dict[str, TernaryParam] = {}
        for t in PARAM_TENSORS:
            tq = mq.tensor(t) if t in QUANTISABLE[cls.op] else TensorQuant.float_()
            p = param_view(module, t)
            if p is None or not tq.quantize:
                continue
            transposed = t == "weight" and is_transposed(module)
            param = TernaryParam(tq, p, transposed=transposed)
            shape = p  # param_view: already in the language's layout
            if param.delta is not None:
                _check_fits(node, t, "delta", param.delta, shape)
            if tq.group_size:
                try:
                    check_groups(tuple(shape.shape), tq.group_size)
                except ValueError as exc:
                    raise UserError(f"{node}: {t}_group_size = {tq.group_size}: {exc}") from exc
            if param.alpha is not None and not tq.group_size:
                _check_fits(node, t, "alpha", param.alpha, shape)
            params[t] = param
        activations: dict[str, TernaryInput] = {}
        for t in ("data_in", "data_out"):
            tq = mq.tensor(t)
            if t in QUANTISABLE[cls.op] and tq.quantize:
                sample = cls.sample_shape(module) if t == "data_in" else None
                activations[t] = _input_quantiser(node, t, tq, sample, _like(module), cls.op)

        def apply() -> nn.Module:
            for t, param in params.items():
                parametrize.register_parametrization(module, t, param)
            if "data_in" in activations:
                module.ternary_input = activations["data_in"]
                module.register_forward_pre_hook(_quantise_input)
            if "data_out" in activations:
                module.ternary_output = activations["data_out"]
                module.register_forward_hook(_quantise_output)
            module.ternary_config = mq
            return module

        return apply

    @classmethod
    def sample_shape(cls, module: nn.Module) -> tuple[int | None, ...] | None:
        """The per-sample input shape a per-channel data_in value must broadcast against (None: any)."""
        return None

    @classmethod
    def _check_module(cls, module: nn.Module, mq: ModuleQuant) -> None:
        """Refuse modules whose quantisation could not take effect (nothing by default)."""


class TernaryLinear(TernaryModule):
    """`linear` (`nn.Linear` and subclasses, transformers' `Conv1D`): ternary data_in, weight and/or bias."""

    op = "linear"

    @classmethod
    def sample_shape(cls, module: nn.Module) -> tuple[int | None, ...]:
        return (param_view(module, "weight").shape[1],)


class _TernaryConvNd(TernaryModule):
    spatial_dims: ClassVar[int]

    @classmethod
    def sample_shape(cls, module: nn.Module) -> tuple[int | None, ...]:
        return (module.in_channels,) + (None,) * cls.spatial_dims


class TernaryConv1d(_TernaryConvNd):
    """`conv1d` (`nn.Conv1d`): ternary data_in, weight and/or bias."""

    op = "conv1d"
    spatial_dims = 1


class TernaryConv2d(_TernaryConvNd):
    """`conv2d` (`nn.Conv2d`): ternary data_in, weight and/or bias."""

    op = "conv2d"
    spatial_dims = 2


class TernaryReLU(TernaryModule):
    """`relu` (`nn.ReLU`): ternary data_in, `relu(q(x))`."""

    op = "relu"


class TernaryEmbedding(TernaryModule):
    """`embedding` (`nn.Embedding`): a ternary weight (per row = per token with Δ shaped `[num, 1]`)."""

    op = "embedding"

    @classmethod
    def _check_module(cls, module: nn.Module, mq: ModuleQuant) -> None:
        if getattr(module, "max_norm", None) is not None and mq.tensor("weight").quantize:
            msg = (
                f"{mq.node}: an Embedding with max_norm renormalises its weight in place on every lookup, "
                "which a quantised weight cannot follow; build it without max_norm or leave its weight in float"
            )
            raise UserError(msg)


#: Op name (`plan.QUANTISABLE`'s keys, `types.MODULE_TYPES`' keys) -> its conversion.
TERNARY_MODULES: dict[str, type[TernaryModule]] = {
    k.op: k for k in (TernaryLinear, TernaryConv1d, TernaryConv2d, TernaryReLU, TernaryEmbedding)
}
assert set(TERNARY_MODULES) == set(MODULE_TYPES) == set(QUANTISABLE), "types, modules and plan disagree"


# ---------------------------------------------------------------------------------------------------------
# Reading a converted module
# ---------------------------------------------------------------------------------------------------------


def is_converted(module: nn.Module) -> bool:
    """Whether `module` was converted by a `from_float`."""
    return isinstance(getattr(module, "ternary_config", None), ModuleQuant)


def ternary_param(module: nn.Module, tensor: str) -> TernaryParam | None:
    """The `TernaryParam` of `module.<tensor>` (`weight` / `bias`), or None when it is not quantised."""
    if not parametrize.is_parametrized(module, tensor):
        return None
    found = [p for p in module.parametrizations[tensor] if isinstance(p, TernaryParam)]
    return found[-1] if found else None


def quantized_param(module: nn.Module, tensor: str) -> torch.Tensor | None:
    """q(weight) / q(bias) of a converted module in the language's layout (`[out, in]`), or None."""
    p = ternary_param(module, tensor)
    if p is None:
        return None
    with torch.no_grad():
        q = getattr(module, tensor)
    return q.t() if p.transposed else q


def latent_param(module: nn.Module, tensor: str) -> torch.Tensor | None:
    """The float weight / bias behind a quantised one (the Parameter fine-tuning updates), or None."""
    if not parametrize.is_parametrized(module, tensor):
        return None
    return module.parametrizations[tensor].original


def activation_quantiser(module: nn.Module, tensor: str) -> TernaryInput | None:
    """The quantiser of a converted module's `data_in` / `data_out`, or None when it stays float."""
    return getattr(module, {"data_in": "ternary_input", "data_out": "ternary_output"}[tensor], None)


def resolved_quant(module: nn.Module) -> ModuleQuant:
    """The config as the converted module applies it: Δ from its buffers and every α filled in, including
    the ones derived from the weight and bias (float values or nested lists; a dynamic activation's α stays
    None: it is per row at run time)."""
    mq: ModuleQuant = module.ternary_config
    tensors = {}
    for t in QUANTISABLE[mq.op]:
        tq = mq.tensor(t)
        if t in ("data_in", "data_out"):
            q = activation_quantiser(module, t)
            if q is None:
                tensors[t] = TensorQuant.float_()
                continue
            delta, alpha = q.delta, q.alpha
        else:
            p = ternary_param(module, t)
            if p is None:
                tensors[t] = TensorQuant.float_()
                continue
            delta = p.delta
            alpha = p.alpha_of(latent_param(module, t))
        tensors[t] = attrs.evolve(
            tq,
            delta=None if delta is None else delta.tolist(),
            alpha=None if alpha is None else alpha.tolist(),
        )
    return ModuleQuant(op=mq.op, node=mq.node, tensors=tensors)


def converted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """`{path: module}` of every converted module of `model`."""
    return {path: m for path, m in model.named_modules() if is_converted(m)}


# ---------------------------------------------------------------------------------------------------------


def _like(module: nn.Module) -> torch.Tensor:
    """A tensor with the module's parameter dtype and device (float32 CPU when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p
    return torch.empty(0)


def _input_quantiser(
    node: str, t: str, tq: TensorQuant, sample_shape: tuple[int | None, ...] | None, like: torch.Tensor, op: str
) -> TernaryInput:
    if tq.scaling and tq.alpha is None and not tq.dynamic:
        derived = {"ternary": "mean of |x| over |x| > Δ", "binary": "mean of |x|"}.get(tq.kind)
        if t == "data_in" and derived:
            how = f"the runtime derives it from the calibration data ({derived}), or set {t}_scale"
        else:
            how = f"set {t}_scale" + (f" or {t}_max" if tq.kind == "integer" else "")
        msg = f"{node}: {t} is quantised with scaling but has no α: {how}"
        raise UserError(msg)
    q = TernaryInput(tq, like, op)
    for kind in ("delta", "alpha"):
        v = getattr(q, kind)
        if v is None or sample_shape is None or broadcasts_to(v.shape, sample_shape):
            continue
        shown = tuple("*" if s is None else s for s in sample_shape)
        msg = (
            f"{node}: {t} {_SYMBOL[kind]} has shape {tuple(v.shape)}, which does not broadcast against one "
            f"input sample of shape {shown} (a per-channel value must be 1 or the channel count along the "
            "channel dimension, right-aligned)"
        )
        raise UserError(msg)
    return q


def _check_fits(node: str, t: str, kind: str, value: torch.Tensor, p: torch.Tensor) -> None:
    """A per-channel Δ/α must broadcast to its weight/bias shape without enlarging it."""
    if not broadcasts_to(value.shape, p.shape):
        msg = (
            f"{node}: {t} {_SYMBOL[kind]} has shape {tuple(value.shape)}, which does not broadcast to {t}'s "
            f"shape {tuple(p.shape)} (e.g. [out, 1] for a Linear weight, [out, 1, 1, 1] for a Conv2d weight)"
        )
        raise UserError(msg)


def _fmt_values(v: torch.Tensor) -> str:
    """A scalar compactly (`0.03125`), a vector summarised (`[100 values, mean 0.0312]`)."""
    if v.numel() == 1 and v.dim() == 0:
        return f"{v.item():.4g}"
    return f"[{v.numel()} values, mean {v.float().mean().item():.4g}]"


__all__: list[Any] = [
    "TERNARY_MODULES",
    "TernaryConv1d",
    "TernaryConv2d",
    "TernaryEmbedding",
    "TernaryInput",
    "TernaryLinear",
    "TernaryModule",
    "TernaryParam",
    "TernaryReLU",
    "activation_quantiser",
    "converted_modules",
    "is_converted",
    "latent_param",
    "quantized_param",
    "resolved_quant",
    "ternary_param",
]
