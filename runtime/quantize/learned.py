"""A ternary activation quantiser with a learned step (LSQ, Esser et al. 2020), for fine-tuning.

In: a ternary module's calibrated data_in Δ and α. Out: `LearnedTernary`, an `nn.Module` whose parameter
`step` (s) is trained with the model, and `learned_activations(model)`, a context manager that puts one in
front of every ternary module's quantised, scaled data_in for the duration of a fine-tuning run and writes
what was learned back into the module's Δ/α buffers when it ends; and `tracked_weight_thresholds(model)`,
which keeps each ternary weight's Δ at its calibrated ratio to mean|W| while the weights train.

Only `is_ternary`, `input_quantizer`, `weight_threshold` and `_swap_in` know how `modules.py` stores a
converted module's quantisers.

The quantiser, with r = Δ/α fixed from calibration (so Δ = r·s and α = s move together):

    q(x) = s · T(clamp(x / s, -1, 1); r)        T(v; r) = +1 if v > r, -1 if v < -r, else 0

which is the module's own `α·T(x; Δ)` with α = s, Δ = r·s (|x| > s maps to ±1 either way). Gradients, as in
LSQ with the rounding replaced by T: for x, the identity where |x| ≤ s and 0 where the input saturates; for s,
`T(v) - v` where |v| ≤ 1 and `sign(v)` beyond, scaled by `1/sqrt(features)` (LSQ's gradient scale, with
features = the number of values of one input sample that one step governs, read from the input, and
Q_P = 1; under Adam, which fine-tuning uses, a constant gradient scale changes nothing). With r = 1/2 this is
LSQ's ternary case exactly: `s · clamp(round(x / s), -1, 1)`.

A step may be a scalar or per channel (any shape that broadcasts against one input sample, as the calibrated
α). Δ or α of 0 (an input that was all zeros in calibration) keeps r = 1/2 and a tiny positive step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ternqc.runtime.quantize.modules import is_converted, latent_param, ternary_param

#: Smallest step: keeps x / s finite if training pushes a step to zero.
MIN_STEP = 1e-8
#: r when calibration gives no usable Δ/α (LSQ's ternary rounding point).
DEFAULT_RATIO = 0.5


def _scaled(p: torch.Tensor, scale: float) -> torch.Tensor:
    """`p` in the forward pass; `scale · grad` in the backward pass (LSQ's gradient scaling)."""
    return (p - p * scale).detach() + p * scale


class LearnedTernary(nn.Module):
    """q(x) = s·T(clamp(x/s, -1, 1); r) with a learned step s (see the module docstring).

    Args:
        delta: the calibrated Δ (a tensor, scalar or per channel).
        alpha: the calibrated α, same shape as Δ or broadcastable with it.
    """

    def __init__(self, delta: torch.Tensor, alpha: torch.Tensor) -> None:
        super().__init__()
        delta, alpha = torch.broadcast_tensors(delta.detach().float(), alpha.detach().float())
        usable = (alpha > 0) & (delta > 0)
        ratio = torch.where(usable, delta / alpha.clamp(min=MIN_STEP), torch.full_like(alpha, DEFAULT_RATIO))
        step = torch.where(usable, alpha, (delta / DEFAULT_RATIO).clamp(min=MIN_STEP))
        self.step = nn.Parameter(step.clone())
        self.register_buffer("ratio", ratio.clamp(max=1.0).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = max(1, math.prod(x.shape[1:]) // max(self.step.numel(), 1))
        s = _scaled(self.step, 1.0 / math.sqrt(features)).clamp(min=MIN_STEP).to(x.dtype)
        v = (x / s).clamp(-1.0, 1.0)
        r = self.ratio.to(x.dtype)
        t = (v > r).to(x.dtype) - (v < -r).to(x.dtype)
        return (v + (t - v).detach()) * s

    @torch.no_grad()
    def delta_alpha(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantiser as the module stores it: (Δ = r·s, α = s)."""
        s = self.step.detach().clamp(min=MIN_STEP)
        return self.ratio * s, s.clone()

    def extra_repr(self) -> str:
        return f"step={tuple(self.step.shape) or 'scalar'}"


# --- how a converted module keeps its quantisers: the only functions here that know modules.py's layout ---


def is_ternary(module: nn.Module) -> bool:
    """Whether `module` was converted to ternary."""
    return is_converted(module)


def input_quantizer(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The buffers `(Δ, α)` of a converted module's quantised data_in (α None when unscaled), or None."""
    q = getattr(module, "ternary_input", None) if is_converted(module) else None
    return None if q is None else (q.delta, q.alpha)


def weight_threshold(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(Δ buffer, latent float weight in the language's [out, ...] layout)` of a converted module's
    quantised weight, or None."""
    p = ternary_param(module, "weight") if is_converted(module) else None
    if p is None:
        return None
    w = latent_param(module, "weight")
    return p.delta, (w.t() if p.transposed else w)


def _swap_in(module: nn.Module, q: LearnedTernary) -> Callable[[], None]:
    """Make `q` quantise `module`'s data_in (the module's pre-hook calls `module.ternary_input`); return the
    function that puts the module's own quantiser back."""
    own = module.ternary_input
    module.ternary_input = q

    def undo() -> None:
        module.ternary_input = own

    return undo


# ---------------------------------------------------------------------------------------------------------


def learnable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(path, module)` of every converted module whose data_in is quantised with a scale α (those get a
    learned step; an unscaled data_in keeps its calibrated Δ)."""
    out = []
    for path, m in model.named_modules():
        found = input_quantizer(m)
        if found is not None and found[1] is not None:
            out.append((path, m))
    return out


@contextlib.contextmanager
def learned_activations(model: nn.Module) -> Iterator[dict]:
    """Give every converted module's scaled data_in a `LearnedTernary` for the duration of the block.

    On entry each such module's data_in is quantised by its `LearnedTernary` (it takes the place of the
    module's `ternary_input`, so the step is one of `model.parameters()`) instead of its own quantiser. On exit, normally or not, the module's own
    quantiser is back and the learned Δ = r·s and α = s are copied into its Δ/α buffers, so the module, its
    `state_dict` and a ternary checkpoint carry the learned values and need nothing from this file to run.

    Args:
        model: a converted model.

    Yields:
        `{path: LearnedTernary}`, the quantisers in use.
    """
    quantizers: dict[str, LearnedTernary] = {}
    undo: dict[str, Callable[[], None]] = {}
    try:
        for path, module in learnable_modules(model):
            delta, alpha = input_quantizer(module)
            q = LearnedTernary(delta, alpha).to(device=delta.device)
            undo[path] = _swap_in(module, q)
            quantizers[path] = q
        yield quantizers
    finally:
        modules = dict(model.named_modules())
        for path, q in quantizers.items():
            undo[path]()
            delta, alpha = input_quantizer(modules[path])
            learned_delta, learned_alpha = q.delta_alpha()
            with torch.no_grad():
                delta.copy_(learned_delta.reshape(delta.shape))
                alpha.copy_(learned_alpha.reshape(alpha.shape))


@contextlib.contextmanager
def tracked_weight_thresholds(model: nn.Module) -> Iterator[None]:
    """Keep every ternary weight's Δ in a fixed ratio to its mean |W| while the block runs (fine-tuning).

    A rule such as Δ = 0.7·mean|W| is evaluated once, on the float weights; as training moves the weights the
    calibrated Δ would drift away from the rule. Here Δ = c·mean|W| at every forward in training mode, with
    `c` = calibrated Δ / mean|W| at entry, per element of Δ (a per-channel Δ has a per-channel c, the mean
    taken over the elements that Δ governs). A weight whose mean |W| is 0 at entry keeps its Δ.
    """
    handles = []
    try:
        for module in model.modules():
            found = weight_threshold(module)
            if found is None:
                continue
            delta, weight = found
            dims = _governed_dims(delta, weight)
            with torch.no_grad():
                mean = _abs_mean(weight, dims, delta.shape)
                ratio = torch.where(mean > 0, delta / mean.clamp(min=MIN_STEP), torch.zeros_like(delta))
            handles.append(module.register_forward_pre_hook(_tracker(ratio, dims)))
        yield
    finally:
        for h in handles:
            h.remove()


def _governed_dims(delta: torch.Tensor, weight: torch.Tensor) -> list[int]:
    """The dimensions of `weight` that one element of Δ covers (where Δ, right-aligned, has size 1)."""
    padded = (1,) * (weight.dim() - delta.dim()) + tuple(delta.shape)
    return [i for i, s in enumerate(padded) if s == 1]


def _abs_mean(weight: torch.Tensor, dims: list[int], shape: torch.Size) -> torch.Tensor:
    a = weight.detach().abs()
    return (a.mean(dim=dims, keepdim=True) if dims else a).reshape(shape)


def _tracker(ratio: torch.Tensor, dims: list[int]):
    def hook(module: nn.Module, args: tuple) -> None:
        if not module.training:
            return
        delta, weight = weight_threshold(module)
        with torch.no_grad():
            delta.copy_(torch.where(ratio > 0, ratio * _abs_mean(weight, dims, delta.shape), delta))

    return hook


__all__ = [
    "LearnedTernary",
    "input_quantizer",
    "is_ternary",
    "learnable_modules",
    "learned_activations",
    "tracked_weight_thresholds",
    "weight_threshold",
]
