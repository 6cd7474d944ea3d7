"""Statistic states: one mergeable accumulator class per statistic, registered by name.

In: a `StatSpec` and tensors (`update`), other states (`merge`). Out: `result()`, MASE's fields.
Add a statistic: its fields in `plan.STATISTICS`, a class here decorated `@register_stat("name")` whose
constructor takes `(spec, ctx: StatContext)` (`registry.py`); `make_state` only looks the class up.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import attrs
import numpy as np
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.bracket import HEAD_VALUES, Bracket, BracketMissed, bracket_protocol
from ternqc.runtime.calibrate.quantiles import (
    ExactValues,
    QuantileBudget,
    quantiles_from_ranks,
    run_local,
    select_protocol,
    wanted_ranks,
)
from ternqc.runtime.calibrate.sketch import CompactorSketch, rank_error_bound, sketch_bytes, sketch_k_for
from ternqc.runtime.calibrate.stats.layout import Layout, make_layout, pseudo_layout, result_form
from ternqc.runtime.calibrate.stats.registry import STAT_REGISTRY, StatContext, register_stat
from ternqc.runtime.calibrate.stats.sums import (
    Block,
    Partials,
    as_float,
    batch_counts,
    batch_sums,
    fold_moments,
    fold_sums,
    rows_view,
    write_rows,
)
from ternqc.runtime.errors import UserError

_INF = float("inf")

# ---------------------------------------------------------------------------------------------------------
# States
# ---------------------------------------------------------------------------------------------------------


class StatState:
    """Base of every statistic state. Subclasses implement `_observe`, `_merge`, `_result`, `_tensors`,
    `_load`. `count` is the number of finite elements used; `nonfinite` the number left out."""

    takes_abs = False  # the statistic is defined on |x| whatever `spec.abs` says

    def __init__(self, spec: StatSpec, ctx: StatContext | None = None) -> None:
        ctx = ctx if ctx is not None else StatContext()
        self.spec = spec
        self.ctx = ctx
        self.batched = ctx.batched
        self.wants_abs = spec.abs or self.takes_abs
        self.count = 0
        self.nonfinite = 0
        self.layout: Layout | None = None
        self._shape: tuple[int, ...] | None = None
        self._auto = 0  # the key of the next `update` without one

    # --- feeding ---

    def update(self, x: torch.Tensor, key: int | None = None) -> None:
        """Add a batch (activations, batch first) or a whole parameter tensor. `key` orders the batch among
        others (default: one more than the last)."""
        with torch.no_grad():
            x = as_float(x, self.batched)
            if x.numel() == 0:
                return
            if key is None:
                key = self._auto
            self._auto = key + 1
            block = Block.prepare(x.unsqueeze(0), np.array([key], dtype=np.int64))
            self.observe(block.absolute() if self.wants_abs else block)

    def observe(self, block: Block) -> None:
        """Add a prepared block of batches (|x| taken when `wants_abs`)."""
        if block.x.numel() == 0:
            return
        shape = tuple(block.x.shape[1:])
        if shape != self._shape:
            self.adopt(shape)
        self.count += block.x.numel() - block.bad
        self.nonfinite += block.bad
        self._observe(block)

    def adopt(self, shape: tuple[int, ...]) -> None:
        """Take the layout for batches of `shape` (raises when the result would change shape)."""
        layout = make_layout(shape, self.spec.dims, self.batched)
        old = self.layout
        if old is not None and result_form(old) != result_form(layout):
            per = "per-sample " if self.batched else ""
            msg = (
                f"{self.spec.key()} keeps dims of the tensor, so it needs the same {per}shape every time; "
                f"it gave results of shape {list(old.result_shape)} before and now "
                f"{list(layout.result_shape)} "
                f"(tensor shape {list(shape)})"
            )
            raise UserError(msg)
        self.layout = layout
        self._shape = shape

    def merge(self, other: StatState) -> None:
        """Add `other`'s data (same statistic and result shape) into this state."""
        if type(other) is not type(self) or other.spec != self.spec:
            msg = f"cannot merge {other.spec.key()} into {self.spec.key()}"
            raise ValueError(msg)
        if other.layout is None:
            return
        if self.layout is None:
            self.layout = other.layout
        elif result_form(self.layout) != result_form(other.layout):
            msg = (
                f"cannot merge {self.spec.key()} results of shapes {list(other.layout.result_shape)} and "
                f"{list(self.layout.result_shape)}"
            )
            raise ValueError(msg)
        self.count += other.count
        self.nonfinite += other.nonfinite
        self._merge(other)

    # --- reading ---

    def result(self) -> dict[str, Any]:
        """MASE's fields for this statistic, plus `nonfinite` (when > 0) and `exact = False` (sketch used)."""
        out = {k: self._fmt(v) for k, v in self._result().items()}
        out["count"] = int(self._count())
        if self.nonfinite:
            out["nonfinite"] = int(self.nonfinite)
        if not self.exact:
            out["exact"] = False
        return out

    @property
    def exact(self) -> bool:
        return True

    @property
    def pending(self) -> bool:
        """Waiting for something only known after calibration (a derived statistic's threshold)."""
        return False

    @property
    def missed(self) -> bool:
        """No exact answer from what was kept (a bracketed quantile whose rank drifted out): collect again."""
        return False

    def note(self) -> str | None:
        """A line for the report when the result needs one (e.g. a sketch was used)."""
        return None

    def release(self) -> None:
        """Drop memory no longer needed once `result()` has been read (e.g. quantile buffers)."""

    def _count(self) -> int:
        return self.count

    def _fmt(self, t: torch.Tensor | np.ndarray) -> float | list:
        if self.layout is None:
            return float("nan")
        a = np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t) + 0.0  # -0.0 -> +0.0
        if self.layout.scalar:
            return float(a.reshape(()))
        return a.reshape(self.layout.result_shape).tolist()

    # --- serialisation and merging across processes ---

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The state as a dict of tensors (for `torch.distributed`); `from_tensors` rebuilds it."""
        out = {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "nonfinite": torch.tensor(self.nonfinite, dtype=torch.int64),
        }
        if self.layout is not None:
            out["scalar"] = torch.tensor(self.layout.scalar)
            out["shape"] = torch.tensor(self.layout.result_shape, dtype=torch.int64)
            out.update(self._tensors())
        return out

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.count = int(tensors["count"])
        self.nonfinite = int(tensors["nonfinite"])
        if "shape" in tensors:
            shape = tuple(int(s) for s in tensors["shape"].tolist())
            self.layout = pseudo_layout(shape, bool(tensors["scalar"]))
            self._load(tensors)

    @classmethod
    def from_spec(cls, spec: StatSpec, ctx: StatContext) -> StatState:
        """A fresh state for `spec` (the one constructor shape of every registered class)."""
        return cls(spec, ctx)

    def _blank(self) -> StatState:
        """An empty state with this one's configuration, as a merge target (folds once everything is in)."""
        return type(self)(self.spec, attrs.evolve(self.ctx, size_hint=None, plan_hint=None, eager=False))

    def sync(self) -> Generator:
        """A protocol generator (see `distributed.run_protocols`): send `to_tensors()`, receive every
        process's, merge them in process order. Afterwards this state holds everybody's data."""
        everyone = yield self.to_tensors()
        merged = self._blank()
        for tensors in everyone:
            part = self._blank()
            part._load_tensors(tensors)
            merged.merge(part)
        self.__dict__.update(merged.__dict__)
        self.__dict__["_auto"] = max(self._auto, merged._auto)

    # subclass hooks
    def _observe(self, block: Block) -> None:
        raise NotImplementedError

    def _merge(self, other: StatState) -> None:
        raise NotImplementedError

    def _result(self) -> dict[str, torch.Tensor | np.ndarray]:
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


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
        self._blocks: list[tuple[np.ndarray, tuple[int, ...]]] = []  # (keys, block shape) in buffer order

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
        above = x > self.threshold  # NaN compares False; +-Inf is removed by the mask
        if block.mask is not None:
            above &= block.mask
        sums = batch_sums(torch.where(above, x, 0.0), lay)
        self._partials.add(block.keys, (batch_counts(above, lay), sums), lay.rows)

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
        self._blocks.append((np.asarray(block.keys, dtype=np.int64).copy(), tuple(x.shape)))

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
            for keys, shape in self._blocks:
                n = math.prod(shape)
                self._observe(Block.prepare(flat[start : start + n].view(shape), keys))
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


@register_stat("range_quantile")
class QuantileState(StatState):
    """`range_quantile`: exact while the shared `QuantileBudget` allows, then a `CompactorSketch`.

    With a size hint (the number of updates to expect) the choice is made at the first batch: exact when all
    the values will fit, else a sketch straight away. `plan_hint` is the number of updates of all processes
    together: the choice then is the one a single process would make, and the budget accounts for the
    values of every process (this process allocates only its own).
    """

    def __init__(self, spec: StatSpec, ctx: StatContext | None = None) -> None:
        super().__init__(spec, ctx)
        self.q = spec.option("quantile")
        self.budget = self.ctx.budget if self.ctx.budget is not None else QuantileBudget()
        self.size_hint = self.ctx.size_hint  # updates expected here: the first buffer is sized for all of them
        self.plan_hint = self.ctx.plan_hint or self.ctx.size_hint  # updates expected by every process together
        self._exact: ExactValues | None = None
        self._sketch: CompactorSketch | None = None
        self._final: dict[str, torch.Tensor] | None = None  # the result, after a merge across processes
        self._seen = 0  # values per row so far, left-out ones included
        self._left_out: np.ndarray | None = None  # per row, when any
        self._promised = 0  # bytes promised to this state's sketch in the budget
        self._head = False  # bracketing: the exact buffer is the head the brackets are placed from
        self._per_update = 0  # values per update, from the first batch (sizes the bracket buffers)
        self._bracket: Bracket | None = None
        self._missed = False
        if spec.dims == "all":  # one row: promise the sketch before any buffer can take the room
            self._promise(1)

    def _blank(self) -> StatState:
        return type(self)(self.spec, attrs.evolve(self.ctx, budget=self.budget, size_hint=None, plan_hint=None))

    def _promise(self, rows: int) -> None:
        # a default sketch (0.8 MB a row), but for many rows no more than an eighth of the budget: such a
        # state then gets a smaller sketch (a larger rank error, which its note states), not all the room
        want = min(sketch_bytes(rows), max(sketch_bytes(1), self.budget.limit // 8))
        if self._sketch is None and want > self._promised:
            self.budget.promise(want - self._promised)
            self._promised = want

    @property
    def exact(self) -> bool:
        return self._sketch is None

    @property
    def bracketing(self) -> bool:
        """Whether this state may keep only the values near its ranks (`ctx.bracket`, one row)."""
        return self.ctx.bracket and self.spec.dims == "all"

    @property
    def missed(self) -> bool:
        if self._bracket is not None and self._final is None and not self._missed:
            self._final = self._compute()
        return self._missed

    def note(self) -> str | None:
        if self._sketch is None:
            return None
        return (
            f"{self.spec.key()}: more values than the quantile memory budget holds "
            f"({self.budget.limit / 2**20:g} MiB); used a sketch with rank error <= "
            f"{rank_error_bound(self._sketch.k):.1e}"
        )

    def release(self) -> None:
        if self._final is None and self.layout is not None and not self._missed:
            self._final = self._compute()
        self._release_exact()
        if self._bracket is not None:
            self._bracket.release()
            self._bracket = None
        self.budget.cancel(self._promised)  # no sketch will be needed any more
        self._promised = 0

    def _start(self, per_update: int) -> None:
        """The first batch: an exact buffer (sized from the hint) or, when the hint says the values cannot
        fit, a sketch."""
        rows = self.layout.rows
        self._promise(rows)
        self._exact = ExactValues(rows, self.budget)
        planned = per_update * (self.plan_hint or 0)
        if self.bracketing and (not planned or planned > 2 * HEAD_VALUES or planned * 4 > self.budget.available):
            self._head = True  # keep the head, then brackets (`_begin_bracket`); never a sketch
            return
        if not self.plan_hint:
            return
        planned = per_update * self.plan_hint
        local = per_update * (self.size_hint or self.plan_hint)
        if planned * rows * 4 > self.budget.available + self._promised:
            self._exact = None
            self._to_sketch()
            return
        self.budget.cancel(self._promised)
        self._promised = 0
        self.budget.force((planned - local) * rows * 4)  # the other processes' share of the values
        self._exact.reserve(local)

    def _observe(self, block):
        self._final = None
        lay, x, mask = self.layout, block.x, block.mask
        if x.device.type != "cpu":
            x = x.cpu()
            mask = None if mask is None else mask.cpu()
        if mask is not None:
            self._add_left_out(batch_counts(~mask, lay).sum(0).numpy())
            x = torch.where(mask, x, float("nan"))
        m = x.numel() // lay.rows
        self._seen += m
        if self._bracket is not None:
            self._bracket.add(rows_view(x, lay)[0], m - block.bad)
            return
        if self._sketch is None:
            if self._exact is None:
                self._per_update = m // block.k
                self._start(self._per_update)
            if self._head:
                slot = self._exact.slot(m)
                if slot is not None:
                    write_rows(slot, x, lay)
                if slot is None or self._exact.n >= HEAD_VALUES:
                    self._begin_bracket(None if slot is not None else (rows_view(x, lay)[0], m - block.bad))
                return
            if self._sketch is None:
                slot = self._exact.slot(m)
                if slot is not None:
                    write_rows(slot, x, lay)
                    return
                if self.bracketing:  # more values than planned (a module called more often): brackets
                    self._begin_bracket((rows_view(x, lay)[0], m - block.bad))
                    return
                self._to_sketch()
        self._sketch.add(rows_view(x, lay))

    def _begin_bracket(self, extra: tuple[np.ndarray, int] | None) -> None:
        """Place brackets from the head (or from `extra`, a block the head had no room for), count the head
        into them and give the head back; then count `extra` too."""
        head = self._exact.values()[0]
        source = head if head.size or extra is None else extra[0]
        self._bracket = Bracket.start(source, (1.0 - self.q, self.q), self.budget)
        finite = head.size - (int(np.count_nonzero(np.isnan(head))) if self._left_out is not None else 0)
        if head.size:
            self._bracket.add(head, finite)
            planned = self._per_update * (self.size_hint or self.plan_hint or 0)
            self._bracket.reserve(head.size, planned - head.size)
        self._release_exact()
        self._head = False
        if extra is not None:
            self._bracket.add(*extra)

    def _add_left_out(self, per_row: np.ndarray) -> None:
        per_row = per_row.astype(np.int64)
        self._left_out = per_row if self._left_out is None else self._left_out + per_row

    def _to_sketch(self) -> None:
        rows = self.layout.rows
        self._promise(rows)
        freed = self._exact.nbytes if self._exact is not None else 0
        sketch = CompactorSketch(rows, sketch_k_for(rows, self.budget.available + freed + self._promised))
        if self._exact is not None:
            sketch.add(self._exact.values())
            self._exact.release()
            self._exact = None
        self.budget.claim(self._promised, sketch.reserved_bytes())
        self._promised = 0
        self._sketch = sketch

    def _merge(self, other):
        if self._bracket is not None or other._bracket is not None:
            msg = "a bracketed quantile merges only through its sync protocol"
            raise ValueError(msg)
        self._final = None
        self._seen += other._seen
        if other._left_out is not None:
            self._add_left_out(other._left_out)
        if other._sketch is not None:
            if self._sketch is None:
                self._to_sketch()
            self._sketch.merge(other._sketch)
            return
        if other._exact is None or other._exact.n == 0:
            return
        self._add_values(other._exact.values())

    def _add_values(self, values: np.ndarray) -> None:
        if self._sketch is None:
            if self._exact is None:
                self._promise(self.layout.rows)
                self._exact = ExactValues(self.layout.rows, self.budget)
            slot = self._exact.slot(values.shape[1])
            if slot is not None:
                slot[...] = values
                return
            self._to_sketch()
        self._sketch.add(values)

    def _finite_per_row(self) -> np.ndarray:
        finite = np.full(self.layout.rows, self._seen, dtype=np.int64)
        return finite if self._left_out is None else finite - self._left_out

    def _compute(self) -> dict[str, torch.Tensor] | None:
        """The result; None, with `missed` set, when a bracket cannot answer exactly."""
        rows = self.layout.rows
        qs = (1.0 - self.q, self.q)
        if self._bracket is not None:
            finite = self._finite_per_row()
            if int(finite[0]) == 0:
                lo = hi = torch.full((1,), float("nan"))
                return {"min": lo, "max": hi, "range": hi - lo}
            found = run_local(bracket_protocol(self._bracket, wanted_ranks(qs, finite), self._bracket.overflowed))
            if found is None:
                self._missed = True
                return None
            lo, hi = quantiles_from_ranks(qs, finite, found)
        elif self._sketch is not None:
            lo, hi = self._sketch.quantiles(qs, self._finite_per_row())
        elif self._exact is not None:
            lo, hi = self._exact.quantiles(qs, self._finite_per_row())
        else:
            lo = hi = torch.full((rows,), float("nan"))
        return {"min": lo, "max": hi, "range": hi - lo}

    def _result(self):
        if self._final is None and not self._missed:
            self._final = self._compute()  # kept: selection is the expensive part
        if self._missed:
            msg = f"{self.spec.key()}: the wanted rank left its bracket; collect this statistic again"
            raise BracketMissed(msg)
        return self._final

    def _tensors(self):
        if self._bracket is not None:
            msg = "a bracketed quantile merges only through its sync protocol"
            raise ValueError(msg)
        out = {"seen": torch.tensor(self._seen, dtype=torch.int64)}
        if self._left_out is not None:
            out["left_out"] = torch.from_numpy(self._left_out.copy())
        if self._sketch is not None:
            arrays = self._sketch.to_arrays()
            out.update({f"sketch_{k}": torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        elif self._exact is not None:
            out["values"] = torch.from_numpy(self._exact.values().copy())
        return out

    def _load(self, tensors):
        self._final = None
        rows = self.layout.rows
        self._seen = int(tensors["seen"])
        if "left_out" in tensors:
            self._left_out = tensors["left_out"].numpy().astype(np.int64).copy()
        if "sketch_k" in tensors:
            arrays = {k[len("sketch_") :]: v.numpy() for k, v in tensors.items() if k.startswith("sketch_")}
            self._sketch = CompactorSketch.from_arrays(arrays, rows)
            self.budget.claim(self._promised, self._sketch.reserved_bytes())
            self._promised = 0
        elif "values" in tensors:
            self._add_values(tensors["values"].numpy())

    def sync(self) -> Generator:
        """Merge across processes. Exact single-row states stay where they are: `select_protocol` finds the
        wanted ranks from samples, counts and the few values inside its brackets. Sketches (and exact values
        when some process has a sketch) are pooled and merged in process order; exact per-channel values are
        pooled. A bracketing state (`ctx.bracket`, one row) runs `bracket_protocol` instead."""
        if self.bracketing:
            return (yield from self._sync_bracket())
        rows = self.layout.rows if self.layout is not None else 0
        mode = "empty" if self.layout is None else "sketch" if self._sketch is not None else "exact"
        message = {
            "mode": mode,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "seen": self._seen,
            "left_out": self._left_out,
            "form": None if self.layout is None else result_form(self.layout),
            "sketch": self._sketch.to_arrays() if mode == "sketch" else None,
            "values": self._exact.values() if rows > 1 and self._exact is not None else None,
        }
        everyone = yield message
        forms = [m["form"] for m in everyone if m["form"] is not None]
        if not forms:
            return
        scalar, shape = forms[0]
        if self.layout is None:
            self.layout = pseudo_layout(shape, scalar)
        rows = self.layout.rows
        local = self._exact.values()[0] if mode == "exact" and rows == 1 and self._exact is not None else None
        local_finite = int(self._finite_per_row()[0]) if self._seen else 0
        self.count = sum(m["count"] for m in everyone)
        self.nonfinite = sum(m["nonfinite"] for m in everyone)
        self._seen = sum(m["seen"] for m in everyone)
        lefts = [m["left_out"] for m in everyone if m["left_out"] is not None]
        self._left_out = np.sum(lefts, axis=0).astype(np.int64) if lefts else None
        modes = [m["mode"] for m in everyone]
        if "sketch" in modes:
            values = everyone
            if rows == 1 and "exact" in modes:
                values = yield local  # the exact processes' values join the sketch
            sketch = CompactorSketch(rows, max(m["sketch"]["k"] for m in everyone if m["sketch"] is not None))
            for m, v in zip(everyone, values):
                if m["sketch"] is not None:
                    sketch.merge(CompactorSketch.from_arrays(m["sketch"], rows))
                elif m["mode"] == "exact":
                    values_of = v if rows == 1 else m["values"]
                    if values_of is not None:
                        sketch.add(np.asarray(values_of).reshape(rows, -1))
            self._release_exact()
            self._sketch = sketch
            self._final = None
            return
        if rows > 1:
            pooled = np.concatenate([m["values"] for m in everyone if m["values"] is not None], axis=1)
            self._release_exact()
            self._exact = ExactValues.from_array(pooled)
            self._final = None
            return
        finite = self._finite_per_row()
        qs = (1.0 - self.q, self.q)
        found = yield from select_protocol(local, local_finite, wanted_ranks(qs, finite), len(everyone))
        lo, hi = quantiles_from_ranks(qs, finite, found)
        self._final = {"min": lo, "max": hi, "range": hi - lo}
        self._release_exact()

    def _sync_bracket(self) -> Generator:
        """Merge a bracketing state: totals first, then `bracket_protocol` over every process's bracket or
        head; a miss anywhere is a miss everywhere (the caller collects the statistic again)."""
        message = {
            "count": self.count,
            "nonfinite": self.nonfinite,
            "seen": self._seen,
            "left_out": self._left_out,
            "form": None if self.layout is None else result_form(self.layout),
        }
        everyone = yield message
        forms = [m["form"] for m in everyone if m["form"] is not None]
        if not forms:
            return
        if self.layout is None:
            self.layout = pseudo_layout(forms[0][1], forms[0][0])
        self.count = sum(m["count"] for m in everyone)
        self.nonfinite = sum(m["nonfinite"] for m in everyone)
        self._seen = sum(m["seen"] for m in everyone)
        lefts = [m["left_out"] for m in everyone if m["left_out"] is not None]
        self._left_out = np.sum(lefts, axis=0).astype(np.int64) if lefts else None
        finite = self._finite_per_row()
        qs = (1.0 - self.q, self.q)
        self._final = None
        if int(finite[0]) == 0:
            lo = hi = torch.full((1,), float("nan"))
            self._final = {"min": lo, "max": hi, "range": hi - lo}
        else:
            bracket = self._bracket
            local = bracket if bracket is not None else (self._exact.values()[0] if self._exact is not None else None)
            missed = bracket is not None and bracket.overflowed
            found = yield from bracket_protocol(local, wanted_ranks(qs, finite), missed)
            if found is None:
                self._missed = True
            else:
                lo, hi = quantiles_from_ranks(qs, finite, found)
                self._final = {"min": lo, "max": hi, "range": hi - lo}
        self._release_exact()
        if self._bracket is not None:
            self._bracket.release()
            self._bracket = None

    def _release_exact(self) -> None:
        if self._exact is not None:
            self._exact.release()
            self._exact = None


# ---------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------

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


