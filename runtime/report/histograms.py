"""Compact histograms of the values a quantiser sees: weights and biases read whole, activations (`data_in`)
gathered over the calibration batches by forward pre-hooks.

In: tensors, or a float model, its ternary configs and the calibration batches. Out: `Histogram` values
(uniform bins between `lo` and `hi`, plus the exact minimum and maximum seen) and, per activation, the
relative L2 error of its quantisation on those batches. Nothing here changes the model.

An activation's range is not known before its first batch: the histogram keeps a symmetric power-of-two
range [-R, R] and doubles it (merging neighbouring bins) when a batch exceeds it, so one pass suffices and the
result does not depend on the order of the batches beyond that doubling.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from attrs import frozen
from torch import nn

from ternqc.runtime.models.batches import call_model
from ternqc.runtime.quantize.quantizers import ModuleQuant, TensorQuant

#: Bins of a weight histogram (over the tensor's exact range).
WEIGHT_BINS = 64
#: Bins of an activation histogram over its power-of-two range (a multiple of 4: doubling merges pairs).
ACTIVATION_BINS = 128


@frozen
class Histogram:
    """Counts in uniform bins between `lo` and `hi`; `min` and `max` are the extreme values seen."""

    lo: float
    hi: float
    counts: tuple[int, ...]
    min: float
    max: float

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "counts": list(self.counts), "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        return cls(
            float(d["lo"]),
            float(d["hi"]),
            tuple(int(c) for c in d["counts"]),
            float(d["min"]),
            float(d["max"]),
        )

    @property
    def total(self) -> int:
        return sum(self.counts)


def tensor_histogram(t: torch.Tensor, bins: int = WEIGHT_BINS) -> Histogram:
    """The histogram of every finite element of `t`, in `bins` bins over its exact range."""
    x = t.detach().flatten().to(torch.float64)
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return Histogram(0.0, 0.0, (0,) * bins, 0.0, 0.0)
    lo, hi = float(x.min()), float(x.max())
    top = hi if hi > lo else lo + 1.0
    counts = torch.histc(x, bins=bins, min=lo, max=top)
    return Histogram(lo, top, tuple(int(c) for c in counts.tolist()), lo, hi)


def relative_l2(x: torch.Tensor, q: torch.Tensor) -> float | None:
    """‖x - q‖₂ / ‖x‖₂ in float64; `None` when x is all zeros."""
    x64, q64 = x.detach().to(torch.float64), q.detach().to(torch.float64)
    norm = float(x64.norm())
    return None if norm == 0 else float((x64 - q64).norm()) / norm


class _Growing:
    """A symmetric histogram over [-R, R], R a power of two, that doubles R when a value falls outside."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.exponent: int | None = None
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self.min, self.max = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float()
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        need = max(abs(lo), abs(hi), 2.0**-30)
        wanted = math.ceil(math.log2(need))
        if 2.0**wanted < need:  # log2 rounding
            wanted += 1
        if self.exponent is None:
            self.exponent = wanted
        while self.exponent < wanted:
            self._double()
        r = 2.0**self.exponent
        index = ((x + r) * (self.bins / (2 * r))).long().clamp_(0, self.bins - 1)
        self.counts += torch.bincount(index, minlength=self.bins)

    def _double(self) -> None:
        """[-R, R] → [-2R, 2R]: old bin i lands in new bin bins/4 + i // 2."""
        merged = self.counts.view(-1, 2).sum(dim=1)
        new = torch.zeros_like(self.counts)
        quarter = self.bins // 4
        new[quarter : quarter + merged.numel()] = merged
        self.counts = new
        self.exponent += 1

    def result(self) -> Histogram:
        """The histogram with empty bins at both ends dropped."""
        if self.exponent is None:
            return Histogram(0.0, 0.0, (), 0.0, 0.0)
        r = 2.0**self.exponent
        width = 2 * r / self.bins
        nonzero = torch.nonzero(self.counts).flatten()
        first, last = int(nonzero[0]), int(nonzero[-1])
        counts = tuple(int(c) for c in self.counts[first : last + 1].tolist())
        return Histogram(-r + first * width, -r + (last + 1) * width, counts, self.min, self.max)


@frozen
class ObservedInputs:
    """What the histogram pass saw at the input of each module with a quantised `data_in`."""

    histograms: dict[str, Histogram]  # module path -> histogram of its calibrated inputs
    errors: dict[str, float | None]  # module path -> ‖x - q(x)‖₂ / ‖x‖₂ over the calibration batches


def input_quantiser(tq: TensorQuant, like: torch.Tensor, op: str) -> nn.Module:
    """The function `x -> q(x)` a converted module applies to its input (the module's own quantiser, so every
    quantiser kind and dynamic scales are what conversion will use)."""
    from ternqc.runtime.quantize.modules import TernaryInput

    return TernaryInput(tq, like, op)


@contextmanager
def _input_hooks(model: nn.Module, configs: dict[str, ModuleQuant]) -> Iterator[dict[str, list]]:
    """Forward pre-hooks on every module whose `data_in` is quantised; yields path -> [histogram, Σ(x-q)², Σx²]."""
    state: dict[str, list] = {}
    handles = []

    def hook_for(path: str, mq: ModuleQuant):
        tq = mq.tensor("data_in")
        entry = state.setdefault(path, [_Growing(ACTIVATION_BINS), 0.0, 0.0])
        quantiser: list[nn.Module] = []  # built at the first call, like the input it quantises

        def hook(_module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            entry[0].update(x)
            if not quantiser:
                quantiser.append(input_quantiser(tq, x, mq.op))
            q = quantiser[0](x)
            # float32 sums per batch into float64 totals (PITFALLS: upcasting whole tensors is slow)
            entry[1] += float(torch.sum((x - q) ** 2, dtype=torch.float32))
            entry[2] += float(torch.sum(x * x, dtype=torch.float32))

        return hook

    modules = dict(model.named_modules())
    for path, mq in configs.items():
        if path in modules and mq.tensor("data_in").quantize:
            handles.append(modules[path].register_forward_pre_hook(hook_for(path, mq)))
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


def observe_inputs(
    model: nn.Module, configs: dict[str, ModuleQuant], batches: Sequence[tuple[Any, Any]]
) -> ObservedInputs:
    """Run `batches` through the float `model` (eval, no grad) and histogram the input of every module whose
    `data_in` the configs quantise, with the relative L2 error of q(x) = α·T(x) (T(x) without scaling).

    A module the model never calls gets no entry.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _input_hooks(model, configs) as state:
            for inputs, _labels in batches:
                call_model(model, inputs)
    finally:
        model.train(was_training)
    histograms = {p: s[0].result() for p, s in state.items() if s[0].exponent is not None}
    errors = {p: (math.sqrt(s[1] / s[2]) if s[2] > 0 else None) for p, s in state.items() if p in histograms}
    return ObservedInputs(histograms, errors)
