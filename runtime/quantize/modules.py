"""Ternary modules: drop-in replacements for Linear, ReLU, Conv1d and Conv2d.

In: a float module and its `ModuleQuant` (see `quantizers.py`). Out: `TernaryLinear`, `TernaryReLU`,
`TernaryConv1d` or `TernaryConv2d`, built with `from_float(module, config)`, and the registry
`TERNARY_MODULES` (float type or op name -> ternary class) that `convert.py` swaps them in with.

- Weights and biases are quantised once, at conversion, and cached in the buffers `qweight` / `qbias`
  (`q(w) = α·T(w)` or `T(w)`), so eval-mode forward is one `F.linear` / `F.conv*d` on the cached tensor.
  The float `weight` / `bias` Parameters are kept (the same Parameter objects as the float module's, so an
  optimizer built before conversion still holds them) for fine-tuning: in training mode with grad enabled
  the forward re-quantises them with a straight-through estimator, `w + (q(w) - w).detach()`. The cache is
  refreshed whenever the float weight has changed in place (its version counter moved, e.g. after an
  optimizer step or `load_state_dict`), on `eval()`, and by `refresh_()`.
- Activations (`data_in`) are quantised on the fly, `q(x) = α·T(x)` with the calibrated α, with the same
  straight-through estimator when `x` needs a gradient.
- Δ and α live in buffers named `<tensor>_delta` and `<tensor>_alpha` (α only with scaling), shaped as
  configured (a 0-dim tensor for a scalar), so a module's whole state is in its `state_dict`. α of a weight
  or bias without `t_scale` is derived from the tensor (`quantizers.weight_alpha`) and kept in step with it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ternqc.plan import QUANTISABLE
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.kinds import get_kind, granularity, row_dims
from ternqc.runtime.quantize.kinds.registry import check_groups, scale_for
from ternqc.runtime.quantize.quantizers import (
    ModuleQuant,
    TensorQuant,
    as_tensor,
    ternarize,
)

PARAM_TENSORS = ("weight", "bias")


class TernaryModule(nn.Module):
    """What every ternary module shares: the config, the data_in quantiser, Δ/α buffers and their repr."""

    op: ClassVar[str]
    float_type: ClassVar[type[nn.Module]]

    def _setup(self, module: nn.Module, mq: ModuleQuant) -> None:
        """Check that `module` and `mq` belong together and keep `mq`; called first by `from_float`."""
        if type(module).forward is not self.float_type.forward or not isinstance(module, self.float_type):
            msg = (
                f"{mq.node}: cannot convert a {type(module).__name__} to {type(self).__name__}: it needs an "
                f"nn.{self.float_type.__name__} (a subclass that overrides forward cannot be converted)"
            )
            raise UserError(msg)
        if mq.op != self.op:
            msg = f"{mq.node}: the config is for a {mq.op} but the module is a {type(module).__name__}"
            raise UserError(msg)
        self.config = mq
        self.node = mq.node
        self._quant = {t: mq.tensor(t) for t in QUANTISABLE[self.op]}

    # --- data_in ----------------------------------------------------------------------------------------

    def _setup_data_in(self, sample_shape: tuple[int | None, ...] | None, like: torch.Tensor) -> None:
        """Register data_in's and data_out's Δ/α buffers. `sample_shape` is the per-sample input shape a
        per-channel data_in value must broadcast against (None: unknown size, e.g. a spatial dimension; None
        for the whole: any); data_out values are checked when they first meet an output."""
        self._setup_activation("data_in", sample_shape, like)
        if "data_out" in self._quant:
            self._setup_activation("data_out", None, like)

    def _setup_activation(self, t: str, sample_shape: tuple[int | None, ...] | None, like: torch.Tensor) -> None:
        tq = self._quant[t]
        self.register_buffer(f"{t}_delta", None)
        self.register_buffer(f"{t}_alpha", None)
        if not tq.quantize:
            return
        if tq.scaling and tq.alpha is None and not tq.dynamic:
            derived = {"ternary": "mean of |x| over |x| > Δ", "binary": "mean of |x|"}.get(tq.kind)
            if t == "data_in" and derived:
                how = f"the runtime derives it from the calibration data ({derived}), or set {t}_scale"
            else:
                how = f"set {t}_scale" + (f" or {t}_max" if tq.kind == "integer" else "")
            msg = f"{self.node}: {t} is quantised with scaling but has no α: {how}"
            raise UserError(msg)
        for kind, value in (("delta", tq.delta), ("alpha", tq.alpha if tq.scaling else None)):
            if value is None:
                continue
            v = as_tensor(value, like)
            if sample_shape is not None and not _fits_sample(tuple(v.shape), sample_shape):
                shown = tuple("*" if s is None else s for s in sample_shape)
                msg = (
                    f"{self.node}: {t} {_SYMBOL[kind]} has shape {tuple(v.shape)}, which does not "
                    f"broadcast against one input sample of shape {shown} (a per-channel value must be 1 or "
                    "the channel count along the channel dimension, right-aligned)"
                )
                raise UserError(msg)
            self.register_buffer(f"{t}_{kind}", v)

    def _quant_in(self, x: torch.Tensor) -> torch.Tensor:
        # `_buffers[...]` rather than attribute access: nn.Module's __getattr__ fallback costs a microsecond
        # per lookup, which is measurable against a small layer's forward
        tq = self._quant["data_in"]
        if not tq.quantize:
            return x
        if tq.kind == "ternary":  # the common case, without the generic dispatch
            buffers = self._buffers
            q = ternarize(x, buffers["data_in_delta"])
            alpha = buffers["data_in_alpha"]
            if alpha is not None:
                q = q * alpha
        else:
            q = self._fake_quant_activation("data_in", x)
        if x.requires_grad and torch.is_grad_enabled():
            return x + (q - x).detach()  # straight-through: forward q(x), gradient of the identity
        return q

    def _quant_out(self, y: torch.Tensor) -> torch.Tensor:
        tq = self._quant.get("data_out")
        if tq is None or not tq.quantize:
            return y
        q = self._fake_quant_activation("data_out", y)
        if y.requires_grad and torch.is_grad_enabled():
            return y + (q - y).detach()
        return q

    def _fake_quant_activation(self, t: str, x: torch.Tensor) -> torch.Tensor:
        """q(x) of activation `t` by its kind: static Δ/α from the buffers, or per-row scales (dynamic)."""
        tq = self._quant[t]
        kind = get_kind(tq.kind)
        if tq.dynamic:
            scale = kind.dynamic_scale(x, tq, row_dims(self.op, x))
        else:
            scale = self._buffers[f"{t}_alpha"]
        return kind.quantize(x, tq, self._buffers[f"{t}_delta"], scale)

    # --- description ------------------------------------------------------------------------------------

    def resolved_quant(self) -> ModuleQuant:
        """The config as the module applies it: Δ from its buffers and every α filled in, including the
        ones derived from the weight and bias (float values or nested lists)."""
        self._sync()
        tensors = {}
        for t, tq in self._quant.items():
            if not tq.quantize or (t in PARAM_TENSORS and getattr(self, f"q{t}", None) is None):
                tensors[t] = TensorQuant.float_()
                continue
            delta = getattr(self, f"{t}_delta", None)
            alpha = getattr(self, f"{t}_alpha", None)
            tensors[t] = attrs.evolve(
                tq,
                delta=None if delta is None else delta.tolist(),
                alpha=None if alpha is None else alpha.tolist(),
            )
        return ModuleQuant(op=self.op, node=self.node, tensors=tensors)

    def _quant_repr(self) -> str:
        parts = []
        for t, tq in self._quant.items():
            if not tq.quantize or (t in PARAM_TENSORS and getattr(self, f"q{t}", None) is None):
                parts.append(f"{t}: float")
                continue
            delta = getattr(self, f"{t}_delta", None)
            alpha = getattr(self, f"{t}_alpha", None)
            scale = "no scaling" if not tq.scaling else "α per row" if alpha is None else f"α={_fmt_values(alpha)}"
            head = f"Δ={_fmt_values(delta)} " if delta is not None else ""
            kind = "" if tq.kind == "ternary" else f"{tq.kind} {tq.width}-bit {granularity(tq)} "
            parts.append(f"{t}: {kind}{head}{scale}")
        return f"node={self.node}, " + ", ".join(parts)

    def _sync(self) -> None:
        """Bring cached quantised parameters in step with the float ones (weighted modules override)."""


class _TernaryWeighted(TernaryModule):
    """A ternary module with a weight and an optional bias: caches q(weight) and q(bias)."""

    def _setup_params(self, module: nn.Module) -> None:
        self.register_parameter("weight", module.weight)
        self.register_parameter("bias", module.bias)
        self._versions: dict[str, int] = {}
        for t in PARAM_TENSORS:
            tq = self._quant[t]
            p = getattr(self, t)
            self.register_buffer(f"{t}_delta", None)
            self.register_buffer(f"{t}_alpha", None)
            self.register_buffer(f"q{t}", None)
            if p is None or not tq.quantize:
                continue
            with torch.no_grad():
                delta = None
                if tq.delta is not None:
                    delta = as_tensor(tq.delta, p)
                    _check_fits(self.node, t, "delta", delta, p)
                    self.register_buffer(f"{t}_delta", delta)
                if tq.group_size:
                    try:
                        check_groups(tuple(p.shape), tq.group_size)
                    except ValueError as exc:
                        raise UserError(f"{self.node}: {t}_group_size = {tq.group_size}: {exc}") from exc
                if tq.scaling:
                    if tq.alpha is None:
                        alpha = get_kind(tq.kind).derive_scale(p, tq, delta)
                    else:
                        alpha = as_tensor(tq.alpha, p)
                    if not (tq.group_size and tq.alpha is None):
                        _check_fits(self.node, t, "alpha", alpha, p)
                    self.register_buffer(f"{t}_alpha", alpha)
                self.register_buffer(f"q{t}", torch.empty_like(p, requires_grad=False))
        self.refresh_()

    @torch.no_grad()
    def refresh_(self) -> None:
        """Re-quantise the cached `qweight` / `qbias` (and derived α) from the float weight and bias."""
        for t in PARAM_TENSORS:
            p, cache = getattr(self, t), getattr(self, f"q{t}")
            if p is None or cache is None:
                continue
            q = self._quantize_param(t, p.detach(), update_alpha=True)
            cache.copy_(q)
            self._versions[t] = p._version

    def _quantize_param(self, t: str, p: torch.Tensor, *, update_alpha: bool = False) -> torch.Tensor:
        tq = self._quant[t]
        delta, alpha = getattr(self, f"{t}_delta"), getattr(self, f"{t}_alpha")
        kind = get_kind(tq.kind)
        if tq.scaling and tq.alpha is None:  # derived α follows the tensor
            derived = kind.derive_scale(p, tq, delta)
            if update_alpha:
                alpha.copy_(derived)
            alpha = derived
        scale = None if alpha is None else scale_for(alpha, tuple(p.shape), tq)
        return kind.quantize(p, tq, delta, scale)

    def _param(self, t: str) -> torch.Tensor | None:
        """The weight or bias the forward uses: cached q(p) in eval / no-grad, STE q(p) when training."""
        p = self._parameters[t]
        cache = self._buffers["q" + t]
        if p is None or cache is None:
            return p
        if self.training and p.requires_grad and torch.is_grad_enabled():
            q = self._quantize_param(t, p.detach())
            return p + (q - p).detach()  # straight-through: forward q(p), gradient of the identity
        if p._version != self._versions[t]:
            self.refresh_()
        return cache

    def _sync(self) -> None:
        for t in PARAM_TENSORS:
            p = getattr(self, t)
            if p is not None and getattr(self, f"q{t}") is not None and p._version != self._versions[t]:
                self.refresh_()
                return

    def train(self, mode: bool = True) -> _TernaryWeighted:
        """As `nn.Module.train`; switching to eval also refreshes the cached quantised weight and bias."""
        super().train(mode)
        if not mode:
            self.refresh_()
        return self


class TernaryLinear(_TernaryWeighted):
    """`nn.Linear` with ternary data_in, weight and/or bias: `F.linear(q(x), q(W), q(b))`."""

    op = "linear"
    float_type = nn.Linear

    @classmethod
    def from_float(cls, linear: nn.Linear, mq: ModuleQuant) -> TernaryLinear:
        """Build from a float `nn.Linear`, sharing its Parameters and caching q(W), q(b).

        Raises:
            UserError: `linear` is not an `nn.Linear`, `mq` is not a linear config, a Δ/α does not fit its
                tensor, or data_in has scaling without α.
        """
        self = cls()
        self._setup(linear, mq)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup_params(linear)
        self._setup_data_in((linear.in_features,), linear.weight)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_out(F.linear(self._quant_in(x), self._param("weight"), self._param("bias")))

    def extra_repr(self) -> str:
        head = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{head}, bias={self.bias is not None}, {self._quant_repr()}"


class TernaryReLU(TernaryModule):
    """`nn.ReLU` with a ternary data_in: `relu(q(x))`."""

    op = "relu"
    float_type = nn.ReLU

    @classmethod
    def from_float(cls, relu: nn.ReLU, mq: ModuleQuant) -> TernaryReLU:
        """Build from a float `nn.ReLU`.

        Raises:
            UserError: `relu` is not an `nn.ReLU`, `mq` is not a relu config, or data_in has scaling
                without α.
        """
        self = cls()
        self._setup(relu, mq)
        self.inplace = relu.inplace
        self._setup_data_in(None, torch.empty(0))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._quant["data_in"].quantize:
            return self._quant_out(F.relu(x, inplace=self.inplace))
        return self._quant_out(F.relu(self._quant_in(x)))  # q(x) is a new tensor: in place would gain nothing

    def extra_repr(self) -> str:
        return self._quant_repr()


class _TernaryConvNd(_TernaryWeighted):
    """Shared by the ternary Conv1d and Conv2d: `conv(q(x), q(W), q(b))` with the float conv's settings."""

    spatial_dims: ClassVar[int]

    @classmethod
    def from_float(cls, conv: nn.Module, mq: ModuleQuant) -> _TernaryConvNd:
        """Build from a float conv of the same dimensionality, sharing its Parameters and caching q(W), q(b).

        Raises:
            UserError: the module is not the matching `nn.ConvNd`, `mq` is for another op, a Δ/α does not fit
                its tensor, or data_in has scaling without α.
        """
        self = cls()
        self._setup(conv, mq)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self._setup_params(conv)
        self._setup_data_in((conv.in_channels,) + (None,) * self.spatial_dims, conv.weight)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_in(x)
        w, b = self._param("weight"), self._param("bias")
        conv = F.conv1d if self.spatial_dims == 1 else F.conv2d
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._quant_out(conv(x, w, b, self.stride, 0, self.dilation, self.groups))
        return self._quant_out(conv(x, w, b, self.stride, self.padding, self.dilation, self.groups))

    def extra_repr(self) -> str:
        head = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, padding_mode={self.padding_mode}"
        )
        return f"{head}, {self._quant_repr()}"


class TernaryConv1d(_TernaryConvNd):
    """`nn.Conv1d` with ternary data_in, weight and/or bias."""

    op = "conv1d"
    float_type = nn.Conv1d
    spatial_dims = 1


class TernaryConv2d(_TernaryConvNd):
    """`nn.Conv2d` with ternary data_in, weight and/or bias."""

    op = "conv2d"
    float_type = nn.Conv2d
    spatial_dims = 2


#: Float module type, or op name (`plan.QUANTISABLE`'s keys), -> its ternary replacement.
TERNARY_MODULES: dict[Any, type[TernaryModule]] = {
    nn.Linear: TernaryLinear,
    nn.ReLU: TernaryReLU,
    nn.Conv1d: TernaryConv1d,
    nn.Conv2d: TernaryConv2d,
    "linear": TernaryLinear,
    "relu": TernaryReLU,
    "conv1d": TernaryConv1d,
    "conv2d": TernaryConv2d,
}


# ---------------------------------------------------------------------------------------------------------

_SYMBOL = {"delta": "Δ", "alpha": "α"}


def _check_fits(node: str, t: str, kind: str, value: torch.Tensor, p: torch.Tensor) -> None:
    """A per-channel Δ/α must broadcast to its weight/bias shape without enlarging it."""
    try:
        ok = torch.broadcast_shapes(value.shape, p.shape) == p.shape
    except RuntimeError:
        ok = False
    if not ok:
        msg = (
            f"{node}: {t} {_SYMBOL[kind]} has shape {tuple(value.shape)}, which does not broadcast to {t}'s "
            f"shape {tuple(p.shape)} (e.g. [out, 1] for a Linear weight, [out, 1, 1, 1] for a Conv2d weight)"
        )
        raise UserError(msg)


def _fits_sample(shape: tuple[int, ...], sample: tuple[int | None, ...]) -> bool:
    if len(shape) > len(sample):
        return False
    return all(s == 1 or want is None or s == want for s, want in zip(reversed(shape), reversed(sample)))


def _fmt_values(v: torch.Tensor) -> str:
    """A scalar compactly (`0.03125`), a vector summarised (`[100 values, mean 0.0312]`)."""
    if v.numel() == 1 and v.dim() == 0:
        return f"{v.item():.4g}"
    return f"[{v.numel()} values, mean {v.float().mean().item():.4g}]"


__all__ = [
    "TERNARY_MODULES",
    "TernaryConv1d",
    "TernaryConv2d",
    "TernaryLinear",
    "TernaryModule",
    "TernaryReLU",
]
