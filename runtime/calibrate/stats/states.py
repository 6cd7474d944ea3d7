"""Statistic states: one mergeable accumulator class per statistic, registered by name.

In: a `StatSpec` and tensors (`update`), other states (`merge`). Out: `result()`, MASE's fields.
Add a statistic: its fields in `plan.STATISTICS`, a class here decorated `@register_stat("name")` whose
constructor takes `(spec, ctx: StatContext)` (`registry.py`); `make_state` only looks the class up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.quantiles import (
    QuantileBudget,
)
from ternqc.runtime.calibrate.stats.base import StatState

# registers `range_quantile`: `make_state` finds every statistic through the registry
from ternqc.runtime.calibrate.stats.quantile_state import QuantileState  # noqa: F401
from ternqc.runtime.calibrate.stats.registry import STAT_REGISTRY, StatContext, register_stat

# registers `abs_mean` and `threshold_abs_mean`
from ternqc.runtime.calibrate.stats.sum_states import AbsMeanState, SumState  # noqa: F401
from ternqc.runtime.calibrate.stats.sums import (
    batch_counts,
    batch_sums,
    fold_moments,
)
from ternqc.runtime.calibrate.stats.threshold_state import ThresholdAbsMeanState  # noqa: F401

_INF = float("inf")


@register_stat("range_min_max")
class MinMaxState(StatState):
    """`range_min_max`: running min and max (exact, in the input's dtype; range in that dtype, as MASE).

    One position: python floats (the block's probe already has them). Several: tensors updated in place.
    Nothing small is kept per batch: small long-lived allocations between the forward's large short-lived
    ones fragment the heap (measured: +1.5 MiB resident per batch).
    """

    def __init__(self, spec: StatSpec, ctx: StatContext | None = None) -> None:
        super().__init__(spec, ctx)
        self._lo, self._hi = _INF, -_INF
        self._mn: torch.Tensor | None = None
        self._mx: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None

    def pass_feeder(self, absolute: bool):
        lay = self.layout
        if not self._observes_as(MinMaxState) or self.wants_abs or lay is None or lay.rows != 1:
            return None
        if self._dtype is None:  # no batch seen yet
            return None

        def feed(n: int, key: int, lo: float, hi: float, total: float) -> None:
            self.count += n
            self._lo, self._hi = min(self._lo, lo), max(self._hi, hi)

        return feed

    def _observe(self, block):
        lay, x, mask = self.layout, block.x, block.mask
        self._dtype = self._dtype or x.dtype
        if lay.rows == 1:
            if mask is None:
                lo, hi = block.bounds()
            else:
                finite = x[mask]
                if finite.numel() == 0:
                    return
                lo, hi = (t.item() for t in torch.aminmax(finite))
            self._lo, self._hi = min(self._lo, lo), max(self._hi, hi)
            return
        dims = (0,) + lay.block_reduce
        if mask is None:
            mn, mx = x.amin(dim=dims), x.amax(dim=dims)  # 4-7x faster than aminmax with dims here
        else:
            mn, mx = torch.where(mask, x, _INF).amin(dim=dims), torch.where(mask, x, -_INF).amax(dim=dims)
        self._fold(mn.reshape(lay.rows), mx.reshape(lay.rows))

    def _fold(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        if self._mn is None:
            self._mn, self._mx = mn.clone(), mx.clone()
        else:
            torch.minimum(self._mn, mn.to(self._mn), out=self._mn)
            torch.maximum(self._mx, mx.to(self._mx), out=self._mx)

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Min and max per position (`[rows]` tensors in the input's dtype), None before any value."""
        if self._mn is not None:
            return self._mn.cpu(), self._mx.cpu()
        if self._lo == _INF and self._hi == -_INF:
            return None
        dtype = self._dtype or torch.float32
        return torch.tensor([self._lo], dtype=dtype), torch.tensor([self._hi], dtype=dtype)

    def _merge(self, other):
        got = other._bounds()
        if got is None:
            return
        self._dtype = self._dtype or other._dtype
        if self.layout.rows == 1 and self._mn is None:
            self._lo, self._hi = min(self._lo, float(got[0][0])), max(self._hi, float(got[1][0]))
        else:
            self._fold(*got)

    def _result(self):
        if self._mn is None and self._lo != _INF:  # one position: numpy scalars, no array or tensor made
            dtype = np.float64 if self._dtype is torch.float64 else np.float32
            mn, mx = dtype(self._lo), dtype(self._hi)
            return {"min": mn, "max": mx, "range": mx - mn}  # the range in that dtype, as MASE
        got = self._bounds()
        if got is None:
            nan = torch.full((self.layout.rows,), float("nan"))
            return {"min": nan, "max": nan, "range": nan}
        mn, mx = got
        empty = torch.isinf(mn) & (mn > 0)  # a position that saw no finite value
        mn = torch.where(empty, float("nan"), mn)
        mx = torch.where(empty, float("nan"), mx)
        return {"min": mn, "max": mx, "range": mx - mn}

    def _tensors(self):
        got = self._bounds()
        return {} if got is None else {"min": got[0], "max": got[1]}

    def _load(self, tensors):
        if "min" in tensors:
            mn, mx = tensors["min"].reshape(-1), tensors["max"].reshape(-1)
            self._dtype = mn.dtype
            if mn.numel() == 1:
                self._lo, self._hi = float(mn[0]), float(mx[0])
            else:
                self._mn, self._mx = mn.clone(), mx.clone()


@register_stat("variance_precise", "variance_online", "range_n_sigma")
class MomentsState(SumState):
    """`variance_precise`, `variance_online`, `range_n_sigma`: count, mean and the sum of squared deviations
    per position. Each batch gives its mean (float64, from the chunked sum) and its sum of squared deviations
    from that mean rounded to float32 (a float32 pass, corrected in float64 to the exact mean); batches are
    merged with Chan et al.'s formula M2 = M2_a + M2_b + delta^2·n_a·n_b/n."""

    _names = ("n", "mean", "m2")
    _fold = staticmethod(fold_moments)

    def _observe(self, block):
        lay, x, mask = self.layout, block.x, block.mask
        k = block.k
        if mask is None:
            n = x[0].numel() // lay.rows
            mean = torch.as_tensor(block.sums(lay)) / n
            centre = mean.to(x.dtype)
            deviations = x - centre.reshape((k,) + lay.keep_shape)
            m2 = batch_sums(deviations.square_(), lay)
        else:
            n = batch_counts(mask, lay)
            sums = batch_sums(torch.where(mask, x, 0.0), lay)
            mean = torch.where(n > 0, sums / n.clamp(min=1), 0.0)
            centre = mean.to(x.dtype)
            deviations = torch.where(mask, x - centre.reshape((k,) + lay.keep_shape), 0.0)
            m2 = batch_sums(deviations.square_(), lay)
        m2 = (m2 - n * (mean - centre.double()).square()).clamp(min=0.0)  # about the float64 mean
        self._partials.add(block.keys, (n, mean, m2), lay.rows)

    def _result(self):
        n, mean, m2 = self._acc()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, mean, np.nan)
            variance = np.where(n > 0, m2 / (n - 1), np.nan)
        if self.spec.name != "range_n_sigma":
            return {"mean": mean, "variance": variance}
        k = self.spec.option("num_sigma")
        std = np.sqrt(variance)
        lo, hi = mean - k * std, mean + k * std
        return {"min": lo, "max": hi, "range": hi - lo}


def make_state(
    spec: StatSpec,
    *,
    quantile_budget: QuantileBudget | None = None,
    threshold: Any = None,
    batched: bool = True,
    size_hint: int | None = None,
    plan_hint: int | None = None,
    eager: bool = True,
    bracket: bool = False,
    band: tuple[float, float] | None = None,
) -> StatState:
    """A fresh state for `spec`: the registered class's `from_spec(spec, StatContext(...))`.

    Args:
        spec: the statistic and its options.
        quantile_budget: shared by every quantile state of a run (a private 256 MiB one when None).
        threshold: for `threshold_abs_mean` only: Δ, a float or a tensor that broadcasts against x; None
            makes the state pending (values kept until `set_threshold`).
        batched: True for activations (dim 0 is the batch, always reduced), False for parameters.
        size_hint: the number of `update` calls expected (quantile buffers are sized for all at once).
        plan_hint: the number of `update` calls all processes expect together (decides exact or sketch).
        eager: fold per-batch partials as they come (False in a process of a distributed run).
        bracket: a quantile over everything may keep only the values near its ranks (`bracket.py`).
        band: for a pending `threshold_abs_mean`: `(L, H)` around the predicted Δ (`threshold_state.py`).
    """
    ctx = StatContext(batched, quantile_budget, threshold, size_hint, plan_hint, eager, bracket, band)
    return STAT_REGISTRY[spec.name].from_spec(spec, ctx)


def make_states(specs: Iterable[StatSpec], ctx: StatContext) -> dict[StatSpec, StatState]:
    """`{spec: state}` for the statistics of one tensor, which share `ctx` (made once: a calibration makes a
    state per statistic and tensor, and every context costs its making; a state that needs another one makes
    its own with `attrs.evolve`, contexts are frozen)."""
    return {spec: STAT_REGISTRY[spec.name].from_spec(spec, ctx) for spec in specs}


def from_tensors(
    spec: StatSpec,
    tensors: dict[str, torch.Tensor],
    *,
    quantile_budget: QuantileBudget | None = None,
    threshold: Any = None,
    batched: bool = True,
) -> StatState:
    """Rebuild a state written by `state.to_tensors()` (e.g. received from another process) so that it can
    be merged and read. A later `update` must bring tensors with the same result shape."""
    state = make_state(spec, quantile_budget=quantile_budget, threshold=threshold, batched=batched)
    state._load_tensors(tensors)
    return state


