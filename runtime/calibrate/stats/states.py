"""Statistic states: one mergeable accumulator class per statistic, registered by name.

In: a `StatSpec` and tensors (`update`), other states (`merge`). Out: `result()`, MASE's fields.
Add a statistic: its fields in `plan.STATISTICS`, a class here decorated `@register_stat("name")` whose
constructor takes `(spec, ctx: StatContext)` (`registry.py`); `make_state` only looks the class up.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.quantiles import (
    ExactValues,
    QuantileBudget,
)
from ternqc.runtime.calibrate.stats.base import StatState

# registers `range_quantile`: `make_state` finds every statistic through the registry
from ternqc.runtime.calibrate.stats.quantile_state import QuantileState  # noqa: F401
from ternqc.runtime.calibrate.stats.registry import STAT_REGISTRY, StatContext, register_stat
from ternqc.runtime.calibrate.stats.sums import (
    Block,
    Partials,
    batch_counts,
    batch_sums,
    fold_moments,
    fold_sums,
)

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
        if self._mn is None and self._lo != _INF:  # one position: numpy scalars, no tensor round trip
            dtype = np.float64 if self._dtype is torch.float64 else np.float32
            mn, mx = np.array([self._lo], dtype=dtype), np.array([self._hi], dtype=dtype)
            return {"min": mn, "max": mx, "range": mx - mn}
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


class SumState(StatState):
    """Sum-like statistics: per-batch partials (`Partials`), folded left in key order."""

    _names: tuple[str, ...] = ()
    _fold = staticmethod(fold_sums)

    def __init__(self, spec: StatSpec, ctx: StatContext | None = None) -> None:
        super().__init__(spec, ctx)
        self._partials = Partials(self._fold, eager=self.ctx.eager)

    def _rows(self) -> int:
        return self.layout.rows

    def _acc(self) -> tuple[np.ndarray, ...] | None:
        """The folded fields, each `[rows]` float64 (None before any batch)."""
        return self._partials.fold() if self.layout is not None else None

    def _merge(self, other):
        self._partials.merge(other._partials)

    def _tensors(self):
        out = {}
        p = self._partials
        if p.acc is not None:
            out.update({f"acc_{k}": torch.from_numpy(v.copy()) for k, v in zip(self._names, p.acc)})
            out["acc_last"] = torch.tensor(p.last, dtype=torch.int64)
        keys, cols = p.pending()
        if len(keys):
            out["keys"] = torch.from_numpy(keys.copy())
            out.update({f"part_{k}": torch.from_numpy(c) for k, c in zip(self._names, cols)})
        return out

    def _load(self, tensors):
        rows = self._rows()
        p = self._partials
        if "acc_last" in tensors:
            p.acc = tuple(tensors[f"acc_{k}"].double().numpy().reshape(rows).copy() for k in self._names)
            p.last = int(tensors["acc_last"])
        if "keys" in tensors:
            keys = tensors["keys"].numpy().astype(np.int64)
            cols = tuple(tensors[f"part_{k}"].double().numpy().reshape(-1, rows) for k in self._names)
            p.set_pending(keys, cols)
        self._auto = max(p.last + 1, int(p.keys().max()) + 1 if len(p.keys()) else 0)


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
            mean = block.sums(lay) / n
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


@register_stat("abs_mean")
class AbsMeanState(SumState):
    """`abs_mean`: mean of |x| (chunked float32 sums per batch, float64 across chunks and batches)."""

    takes_abs = True
    _names = ("n", "sum")

    def _observe(self, block):
        lay, x, mask = self.layout, block.x, block.mask
        if mask is None:
            self._partials.add(block.keys, (x[0].numel() // lay.rows, block.sums(lay)), lay.rows)
        else:
            sums = batch_sums(torch.where(mask, x, 0.0), lay)
            self._partials.add(block.keys, (batch_counts(mask, lay), sums), lay.rows)

    def _result(self):
        n, total = self._acc()
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"abs_mean": np.where(n > 0, total / n, np.nan)}


@register_stat("threshold_abs_mean")
class ThresholdAbsMeanState(AbsMeanState):
    """`threshold_abs_mean`: mean of |x| over the elements with |x| > threshold; count = how many.

    With the threshold given (`ctx.threshold`) it sums batch by batch. Without it (the plan's derived point in
    the first calibration pass, before Δ is known) the state is *pending*: it keeps every |x| it is fed in
    one buffer under the quantile budget (batch order, with each block's keys and shape) and sums them, block
    by block exactly as a second pass would, when `set_threshold(Δ)` comes: the same bits as a second pass.
    When the values would not fit the budget it keeps nothing and `overflowed` is set: the caller must then
    gather the statistic in a second pass with the threshold known.
    """

    def __init__(self, spec: StatSpec, ctx: StatContext | None = None) -> None:
        super().__init__(spec, ctx)
        self.threshold = None if self.ctx.threshold is None else torch.as_tensor(self.ctx.threshold, dtype=torch.float32)
        self.overflowed = False
        self._kept: ExactValues | None = None
        self._blocks: list[tuple[np.ndarray, tuple[int, ...], bool]] = []  # (keys, shape, all finite), in order

    @property
    def pending(self) -> bool:
        """No threshold yet: the values are kept (or overflowed) until `set_threshold`."""
        return self.threshold is None

    def _blank(self) -> StatState:
        ctx = attrs.evolve(self.ctx, threshold=self.threshold, size_hint=None, plan_hint=None, eager=False)
        return type(self)(self.spec, ctx)

    def _observe(self, block):
        if self.threshold is None:
            self._keep(block)
            return
        lay, x = self.layout, block.x
        if self.threshold.device != x.device:
            self.threshold = self.threshold.to(x.device)
        if lay.rows == 1 and block.mask is None and x.is_cpu and x.dtype == torch.float32 and self._one_threshold():
            # every value finite and >= 0 (|x|), one threshold t >= 0: x where x > t else 0 is torch's
            # `threshold` (one pass, ~10x faster than `where`), and the values above are its nonzero ones
            kept = torch.nn.functional.threshold(x, float(self.threshold), 0.0)
            rows = kept.reshape(block.k, -1).numpy().view(np.int32)  # +0.0 is the only zero: integers count faster
            counts = np.array([np.count_nonzero(row) for row in rows], dtype=np.int64)
            self._partials.add(block.keys, (torch.from_numpy(counts).reshape(block.k, 1), batch_sums(kept, lay)), 1)
            return
        above = x > self.threshold  # NaN compares False; +-Inf is removed by the mask
        if block.mask is not None:
            above &= block.mask
        sums = batch_sums(torch.where(above, x, 0.0), lay)
        self._partials.add(block.keys, (batch_counts(above, lay), sums), lay.rows)

    def _one_threshold(self) -> bool:
        """A single threshold >= 0 (a per-channel one, or a negative one, takes the general path)."""
        return self.threshold.numel() == 1 and float(self.threshold) >= 0

    def _keep(self, block: Block) -> None:
        """Keep the block's |x| (float32, CPU) for `set_threshold`, or overflow when the budget refuses."""
        if self.overflowed:
            return
        x = block.x
        m = x.numel()
        if self._kept is None:
            self._kept = ExactValues(1, self.ctx.budget if self.ctx.budget is not None else QuantileBudget())
            planned = (m // block.k) * (self.ctx.plan_hint or 0)
            local = (m // block.k) * (self.ctx.size_hint or self.ctx.plan_hint or 0)
            if planned * 4 > self._kept.budget.available:
                self._overflow()
                return
            if local:
                self._kept.budget.force((planned - local) * 4)  # the other processes' share
                self._kept.reserve(local)
        slot = self._kept.slot(m)
        if slot is None:
            self._overflow()
            return
        slot[0, :] = x.reshape(-1).cpu().numpy() if x.dtype == torch.float32 else x.reshape(-1).float().cpu().numpy()
        self._blocks.append((np.asarray(block.keys, dtype=np.int64).copy(), tuple(x.shape), block.mask is None))

    def _overflow(self) -> None:
        self.overflowed = True
        if self._kept is not None:
            self._kept.release()
        self._kept = None
        self._blocks = []

    def set_threshold(self, threshold: Any) -> None:
        """Give the pending state its threshold: the kept values are summed block by block (as a second pass
        would sum the same batches) and released. Not for an overflowed state (its values are gone)."""
        if self.overflowed:
            msg = "threshold_abs_mean overflowed the quantile budget: gather it in a second pass"
            raise ValueError(msg)
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32)
        if self._kept is not None:
            flat = torch.from_numpy(self._kept.values()[0])
            start = 0
            for keys, shape, finite in self._blocks:
                n = math.prod(shape)
                x = flat[start : start + n].view(shape)
                # a block seen all finite is not probed again (the probe would find the same)
                self._observe(Block(x, keys, None, 0) if finite else Block.prepare(x, keys))
                start += n
            self._kept.release()
        self._kept = None
        self._blocks = []

    def release(self) -> None:
        if not self.pending:
            self.discard()

    def discard(self) -> None:
        """Give the kept values back (their threshold will not come)."""
        if self._kept is not None:
            self._kept.release()
        self._kept = None
        self._blocks = []

    def _count(self) -> int:
        got = self._acc()
        return 0 if got is None else round(float(got[0].sum()))


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
    """
    ctx = StatContext(batched, quantile_budget, threshold, size_hint, plan_hint, eager, bracket)
    return STAT_REGISTRY[spec.name].from_spec(spec, ctx)


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


