"""Statistic states: small mergeable accumulators for MASE's statistics, vectorised over the batch.

In: a `StatSpec` (which statistic, `dims`, `abs`, options) and tensors, one `update(x)` per batch for an
activation or once with the whole tensor for a parameter. Out: `result()`, a dict with MASE's fields for the
statistic (`plan.STATISTICS[name].fields`): python floats for scalars, nested lists for per-channel or
element-wise results, `count` an int. `merge(other)` adds another state's data (exact, except a sketch,
which merges within its stated rank error); `to_tensors()` / `from_tensors(spec, tensors)` turn a state into
a dict of tensors and back, for merging across processes.

`dims` (the lead's decision):
- `dims` index the tensor as the module sees it. For activations (`batched=True`) dim 0 is the batch and is
  always reduced: statistics are across samples.
- `dims="all"`: everything is reduced; the result is one scalar.
- `dims="none"`: only the batch dim is reduced for activations (element-wise across samples: the result has
  the per-sample shape); nothing is reduced for parameters (the result has the parameter's shape).
- a tuple of dims: those dims are reduced (plus the batch dim for activations); negative dims count from
  the end. Reduced non-batch dims are KEPT with size 1, so a per-channel result broadcasts against the
  tensor: weight [out, in] with dims (1,) -> [out, 1]; conv2d input [B, C, H, W] with dims (2, 3) ->
  [C, 1, 1]; linear input [B, 100] with dims "none" -> [100].
- `abs=True` takes |x| first.

Fields: `range_min_max` min, max, range = max - min (in float32, as MASE), count = number of elements seen
(MASE: 128 samples x 4 features = 512). `range_quantile(quantile=q)`: min = the (1-q) quantile, max = the q
quantile (linear interpolation at rank q·(n-1), torch.quantile's definition, exact and without its 2^24
limit: see `quantiles.py`). `variance_precise` and `variance_online` are the same state: mean and unbiased
variance from a float32 mean and centred sum of squares per batch, merged in float64 (Chan et al.'s
parallel formula), so the variance is exact to ~1e-7 relative and the mean to ~1e-7 of mean|x| (a mean
near 0 cannot be more exact from float32 sums, which PITFALLS.md measured 38x faster than float64 ones).
`range_n_sigma(num_sigma=k)`: min/max = mean -/+ k·std (unbiased std), range = max - min. `abs_mean`: mean
of |x|. `threshold_abs_mean` (derived): mean of |x| over the elements with |x| > threshold, where the
threshold (a float or a tensor that broadcasts against x) is given at construction; count = how many.

NaN and +-Inf are counted, left out of every statistic, and reported as `nonfinite = N` in the result when
N > 0. A position that saw no finite value gets NaN fields. When a quantile state had to use a sketch
because of the memory budget, its result has `exact = False`.
Speed: a batch costs one finiteness probe (a float32 sum) and a few reductions per statistic; per-batch
partial results are kept in lists and reduced every 64 batches, so a hook does little Python work.
`TensorStats` feeds all statistics of one tensor together (one probe, at most one |x| per batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from attrs import field, frozen

from ternqc.plan import StatSpec
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantiles import (
    CompactorSketch,
    ExactValues,
    QuantileBudget,
    rank_error_bound,
    sketch_bytes,
    sketch_k_for,
)

__all__ = [
    "Layout",
    "QuantileBudget",
    "StatState",
    "TensorStats",
    "from_tensors",
    "make_layout",
    "make_state",
]

_COMPACT_EVERY = 64
_INF = float("inf")
_FLOATS = frozenset((torch.float32, torch.float64))


# ---------------------------------------------------------------------------------------------------------
# Layout: which dims are reduced, and the result's shape
# ---------------------------------------------------------------------------------------------------------


@frozen
class Layout:
    """How a statistic reduces a tensor of one shape.

    `reduce`: the dims reduced (sorted, non-negative); `kept` / `kept_sizes`: the others; `scalar`: `dims` was
    "all"; `result_shape`: the shape of a non-scalar result (kept dims, reduced non-batch dims as 1);
    `rows`: the number of result positions.
    """

    reduce: tuple[int, ...]
    kept: tuple[int, ...]
    kept_sizes: tuple[int, ...]
    scalar: bool
    result_shape: tuple[int, ...]
    rows: int = field(init=False)
    full: bool = field(init=False)  # every dim is reduced: whole-tensor reductions give a 0-d tensor
    perm: tuple[int, ...] | None = field(init=False)  # kept dims first, then reduced; None = identity

    def __attrs_post_init__(self) -> None:
        order = self.kept + self.reduce
        object.__setattr__(self, "rows", math.prod(self.result_shape))
        object.__setattr__(self, "full", not self.kept)
        object.__setattr__(self, "perm", None if order == tuple(range(len(order))) else order)

    def sum(self, x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
        """Sum over the reduced dims (float32 stays float32; bool counts become int64)."""
        if not self.reduce:
            return x if x.dtype != torch.bool else x.long()
        if self.full and not keepdim:
            return x.sum()
        return x.sum(dim=self.reduce, keepdim=keepdim)

    def as_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` arranged as `[rows, values per row]` (kept dims first)."""
        if self.perm is not None:
            x = x.permute(self.perm)
        return x.reshape(self.rows, -1)

    def write(self, slot: np.ndarray, x: torch.Tensor) -> None:
        """Copy CPU tensor `x` into `slot` (a `[rows, values per row]` numpy view) in `as_rows` order."""
        if self.perm is None:
            slot[...] = x.numpy().reshape(slot.shape)  # a numpy assignment: a few µs less than torch's copy_
        else:
            x = x.permute(self.perm)
            torch.from_numpy(slot).view(x.shape).copy_(x)  # one strided copy


def make_layout(shape: tuple[int, ...], dims: str | tuple[int, ...], batched: bool) -> Layout:
    """The layout of a statistic with `dims` on a tensor of `shape` (see the module docstring).

    Raises:
        UserError: a dim outside the tensor's dims.
    """
    ndim = len(shape)
    if dims == "all":
        reduce = tuple(range(ndim))
    elif dims == "none" or dims == ():
        reduce = (0,) if batched and ndim else ()
    else:
        picked = set()
        for d in dims:
            if not -ndim <= d < ndim:
                what = "an activation" if batched else "a parameter"
                msg = (
                    f"dims={list(dims)} does not fit {what} of shape {list(shape)}: dim {d} is out of range "
                    f"(dims index the tensor as the module sees it{', batch first' if batched else ''})"
                )
                raise UserError(msg)
            picked.add(d % ndim)
        if batched and ndim:
            picked.add(0)
        reduce = tuple(sorted(picked))
    kept = tuple(d for d in range(ndim) if d not in reduce)
    start = 1 if batched and ndim else 0
    result_shape = () if dims == "all" else tuple(1 if d in reduce else shape[d] for d in range(start, ndim))
    return Layout(reduce, kept, tuple(shape[d] for d in kept), dims == "all", result_shape)


def _result_form(layout: Layout) -> tuple[bool, tuple[int, ...]]:
    return layout.scalar, layout.result_shape


def _pseudo_layout(shape: tuple[int, ...], scalar: bool) -> Layout:
    """A layout known only by its result (a state rebuilt from tensors): enough to merge and report."""
    return Layout((), (), (), scalar, () if scalar else tuple(shape))


# ---------------------------------------------------------------------------------------------------------
# Input preparation shared by a state's `update` and `TensorStats.update`
# ---------------------------------------------------------------------------------------------------------


def _prepare(x: torch.Tensor, batched: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Floating point `x`, its finite mask (`None` when all values are finite) and the non-finite count.

    The common case costs one float32 sum: a finite sum means no NaN/Inf (a sum that overflows only takes
    the slower, still correct, masked path)."""
    if x.requires_grad:
        x = x.detach()
    if x.dtype not in _FLOATS:
        x = x.float()
    if batched and x.dim() == 0:
        x = x.reshape(1)
    if math.isfinite(x.sum().item()):
        return x, None, 0
    mask = torch.isfinite(x)
    bad = x.numel() - int(mask.sum())
    return x, (mask if bad else None), bad


def _canon_shape(layout: Layout) -> tuple[int, ...]:
    """The shape states keep their per-position values in: `()` for a scalar, `[rows]` otherwise."""
    return () if layout.scalar else (layout.rows,)


def _stack(
    parts: list[Any], shape: tuple[int, ...], dtype: torch.dtype | None = torch.float64
) -> torch.Tensor:
    """Stack per-batch partials (python numbers, 0-d tensors, or tensors with one value per position) as a
    `[batches, *shape]` tensor (in `dtype`; None keeps the tensors' dtype). The common cases, all numbers or
    all tensors of one shape, cost one tensor operation, not one per batch."""
    lead = (len(parts),)
    if all(type(p) is int or type(p) is float for p in parts):
        numbers = torch.tensor(parts, dtype=dtype or torch.float64)
        return numbers.reshape(lead + (1,) * len(shape)).expand(lead + shape)
    if all(isinstance(p, torch.Tensor) for p in parts):
        first = parts[0].shape
        if all(p.shape == first for p in parts) and math.prod(first) == math.prod(shape):
            stacked = torch.stack(parts).cpu().reshape(lead + shape)
            return stacked if dtype is None else stacked.to(dtype)
    out = []
    for p in parts:
        t = (
            torch.as_tensor(p, device="cpu")
            if dtype is None
            else torch.as_tensor(p, dtype=dtype, device="cpu")
        )
        out.append(t.reshape(shape) if t.dim() else t.expand(shape))
    return torch.stack(out)


def _nan_where_empty(values: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return torch.where(n > 0, values, torch.full_like(values, float("nan")))


# ---------------------------------------------------------------------------------------------------------
# States
# ---------------------------------------------------------------------------------------------------------


class StatState:
    """Base of every statistic state. Subclasses implement `_observe`, `_merge`, `_result`, `_tensors`,
    `_load`. `count` is the number of finite elements used; `nonfinite` the number left out."""

    takes_abs = False  # the statistic is defined on |x| whatever `spec.abs` says

    def __init__(self, spec: StatSpec, batched: bool = True) -> None:
        self.spec = spec
        self.batched = batched
        self.wants_abs = spec.abs or self.takes_abs
        self.count = 0
        self.nonfinite = 0
        self.layout: Layout | None = None
        self._shape: torch.Size | None = None

    # --- feeding ---

    def update(self, x: torch.Tensor) -> None:
        """Add a batch (activations, batch first) or a whole parameter tensor."""
        with torch.no_grad():
            x, mask, bad = _prepare(x.detach(), self.batched)
            if self.wants_abs:
                x = x.abs()
            self.observe(x, mask, bad)

    def observe(self, x: torch.Tensor, mask: torch.Tensor | None, bad: int) -> None:
        """Add prepared input: floating point, |x| taken when `wants_abs`, `mask` the finite mask or None."""
        if x.numel() == 0:
            return
        if x.shape != self._shape:
            self._adopt(tuple(x.shape))
        self.count += x.numel() - bad
        self.nonfinite += bad
        self._observe(x, mask)

    def _adopt(self, shape: tuple[int, ...]) -> None:
        layout = make_layout(shape, self.spec.dims, self.batched)
        old = self.layout
        if old is not None and _result_form(old) != _result_form(layout):
            per = "per-sample " if self.batched else ""
            msg = (
                f"{self.spec.key()} keeps dims of the tensor, so it needs the same {per}shape every time; "
                f"it gave results of shape {list(old.result_shape)} before and now "
                f"{list(layout.result_shape)} "
                f"(tensor shape {list(shape)})"
            )
            raise UserError(msg)
        self.layout = layout
        self._shape = torch.Size(shape)

    def merge(self, other: StatState) -> None:
        """Add `other`'s data (same statistic and result shape) into this state."""
        if type(other) is not type(self) or other.spec != self.spec:
            msg = f"cannot merge {other.spec.key()} into {self.spec.key()}"
            raise ValueError(msg)
        if other.layout is None:
            return
        if self.layout is None:
            self.layout = other.layout
        elif _result_form(self.layout) != _result_form(other.layout):
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

    def note(self) -> str | None:
        """A line for the report when the result needs one (e.g. a sketch was used)."""
        return None

    def _count(self) -> int:
        return self.count

    def _fmt(self, t: torch.Tensor) -> float | list:
        if self.layout is None:
            return float("nan")
        if self.layout.scalar:
            return float(t.reshape(()))
        return t.reshape(self.layout.result_shape).tolist()

    # --- serialisation ---

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
            self.layout = _pseudo_layout(shape, bool(tensors["scalar"]))
            self._load(tensors)

    # subclass hooks
    def _observe(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        raise NotImplementedError

    def _merge(self, other: StatState) -> None:
        raise NotImplementedError

    def _result(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class MinMaxState(StatState):
    """`range_min_max`: running min and max (exact, in the input's dtype)."""

    def __init__(self, spec: StatSpec, batched: bool = True) -> None:
        super().__init__(spec, batched)
        self._mins: list[torch.Tensor] = []
        self._maxs: list[torch.Tensor] = []

    def _observe(self, x, mask):
        lay = self.layout
        if mask is not None:
            if lay.full:
                x = x[mask]
                if x.numel() == 0:
                    return
            else:
                self._add(torch.where(mask, x, _INF), torch.where(mask, x, -_INF), lay)
                return
        self._add(x, x, lay)

    def _add(self, lo: torch.Tensor, hi: torch.Tensor, lay: Layout) -> None:
        if lay.full:
            mn, mx = torch.aminmax(lo) if lo is hi else (lo.amin(), hi.amax())
        elif not lay.reduce:
            mn, mx = lo.clone(), hi.clone()
        else:
            mn, mx = lo.amin(dim=lay.reduce), hi.amax(dim=lay.reduce)
        self._mins.append(mn)
        self._maxs.append(mx)
        if len(self._mins) >= _COMPACT_EVERY:
            self._compact()

    def _compact(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._mins:
            return None
        shape = _canon_shape(self.layout)
        if len(self._mins) > 1 or self._mins[0].shape != shape:
            self._mins = [_stack(self._mins, shape, None).amin(0)]
            self._maxs = [_stack(self._maxs, shape, None).amax(0)]
        return self._mins[0], self._maxs[0]

    def _merge(self, other):
        self._mins += other._mins
        self._maxs += other._maxs
        self._compact()

    def _result(self):
        got = self._compact()
        if got is None:
            nan = torch.full(_canon_shape(self.layout), float("nan"))
            return {"min": nan, "max": nan, "range": nan}
        mn, mx = got
        empty = torch.isinf(mn) & (mn > 0)  # a position that saw no finite value
        mn = torch.where(empty, float("nan"), mn)
        mx = torch.where(empty, float("nan"), mx)
        return {"min": mn, "max": mx, "range": mx - mn}

    def _tensors(self):
        got = self._compact()
        return {} if got is None else {"min": got[0], "max": got[1]}

    def _load(self, tensors):
        if "min" in tensors:
            self._mins, self._maxs = [tensors["min"].clone()], [tensors["max"].clone()]


class _SumState(StatState):
    """Per-batch partial sums kept in a list and folded in float64 every `_COMPACT_EVERY` batches into
    `_acc`, a tuple of float64 tensors of the canonical shape (`[rows]`, or `()` for a scalar)."""

    _names: tuple[str, ...] = ()

    def __init__(self, spec: StatSpec, batched: bool = True) -> None:
        super().__init__(spec, batched)
        self._parts: list[tuple] = []
        self._acc: tuple[torch.Tensor, ...] | None = None

    def _push(self, part: tuple) -> None:
        self._parts.append(part)
        if len(self._parts) >= _COMPACT_EVERY:
            self._compact()

    def _compact(self) -> tuple[torch.Tensor, ...] | None:
        if self._parts:
            acc = self._fold_parts(self._parts)
            self._acc = acc if self._acc is None else self._fold_parts([self._acc, acc])
            self._parts = []
        return self._acc

    def _fold_parts(self, parts: list[tuple]) -> tuple[torch.Tensor, ...]:
        shape = _canon_shape(self.layout)
        return self._fold(*(_stack([p[i] for p in parts], shape) for i in range(len(self._names))))

    def _fold(self, *cols: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Combine stacked partials (`[parts, *shape]` float64 each) into one."""
        return tuple(c.sum(0) for c in cols)

    def _merge(self, other):
        other_acc = other._compact()
        if other_acc is not None:
            self._parts.append(other_acc)
        self._compact()

    def _tensors(self):
        got = self._compact()
        return {} if got is None else dict(zip(self._names, got))

    def _load(self, tensors):
        if self._names[0] in tensors:
            shape = _canon_shape(self.layout)
            self._acc = tuple(tensors[k].to(torch.float64).reshape(shape) for k in self._names)


class MomentsState(_SumState):
    """`variance_precise`, `variance_online`, `range_n_sigma`: count, mean and the sum of squared deviations
    per position. Each batch gives a float32 mean and centred sum of squares; they are merged in float64 with
    Chan et al.'s formula M2 = M2_a + M2_b + delta^2·n_a·n_b/n (here in its stacked form)."""

    _names = ("n", "mean", "m2")

    def _observe(self, x, mask):
        lay = self.layout
        if not lay.reduce:  # a parameter with dims "none": one value per position
            if mask is None:
                self._push((1, x.clone(), torch.zeros_like(x)))
            else:
                self._push((mask.double(), torch.where(mask, x, 0.0), torch.zeros_like(x)))
            return
        if mask is None:
            n = x.numel() // lay.rows
            mean = lay.sum(x, keepdim=True) / n
            m2 = lay.sum((x - mean).square_())
        else:
            cnt = lay.sum(mask, keepdim=True)
            mean = lay.sum(torch.where(mask, x, 0.0), keepdim=True) / cnt
            mean = torch.nan_to_num(mean, nan=0.0)  # positions without finite values: n = 0
            m2 = lay.sum(torch.where(mask, x - mean, 0.0).square_())
            n = cnt.reshape(m2.shape)
        self._push((n, mean.reshape(m2.shape), m2))

    def _fold(self, n, mean, m2):
        total = n.sum(0)
        mu = (n * mean).sum(0) / total
        return total, mu, m2.sum(0) + (n * (mean - mu).square()).sum(0)

    def _result(self):
        n, mean, m2 = self._compact()
        mean = _nan_where_empty(mean, n)
        variance = _nan_where_empty(m2 / (n - 1), n)
        if self.spec.name != "range_n_sigma":
            return {"mean": mean, "variance": variance}
        k = self.spec.option("num_sigma")
        std = variance.sqrt()
        lo, hi = mean - k * std, mean + k * std
        return {"min": lo, "max": hi, "range": hi - lo}


class AbsMeanState(_SumState):
    """`abs_mean`: mean of |x| (a float32 sum per batch, float64 across batches)."""

    takes_abs = True
    _names = ("n", "sum")

    def _observe(self, x, mask):
        lay = self.layout
        if mask is None:
            self._push((x.numel() // lay.rows, lay.sum(x)))
        else:
            self._push((lay.sum(mask), lay.sum(torch.where(mask, x, 0.0))))

    def _result(self):
        n, total = self._compact()
        return {"abs_mean": _nan_where_empty(total / n, n)}


class ThresholdAbsMeanState(AbsMeanState):
    """`threshold_abs_mean`: mean of |x| over the elements with |x| > threshold; count = how many."""

    def __init__(self, spec: StatSpec, batched: bool = True, threshold: Any = None) -> None:
        super().__init__(spec, batched)
        if threshold is None:
            msg = "threshold_abs_mean needs the threshold it is taken above"
            raise ValueError(msg)
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32)

    def _observe(self, x, mask):
        lay = self.layout
        if self.threshold.device != x.device:
            self.threshold = self.threshold.to(x.device)
        above = x > self.threshold  # NaN compares False; +-Inf is removed by the mask
        if mask is not None:
            above &= mask
        self._push((lay.sum(above), lay.sum(torch.where(above, x, 0.0))))

    def _count(self) -> int:
        got = self._compact()
        return 0 if got is None else round(float(got[0].sum()))


class QuantileState(StatState):
    """`range_quantile`: exact while the shared `QuantileBudget` allows, then a `CompactorSketch`."""

    def __init__(
        self,
        spec: StatSpec,
        batched: bool = True,
        budget: QuantileBudget | None = None,
        size_hint: int | None = None,
    ) -> None:
        super().__init__(spec, batched)
        self.q = spec.option("quantile")
        self.budget = budget if budget is not None else QuantileBudget()
        self.size_hint = size_hint  # expected number of updates: the first buffer is sized for all of them
        self._exact: ExactValues | None = None
        self._sketch: CompactorSketch | None = None
        self._seen = 0  # values per row so far, left-out ones included
        self._left_out: np.ndarray | None = None  # per row, when any
        self._promised = 0  # bytes promised to this state's sketch in the budget
        if spec.dims == "all":  # one row: promise the sketch before any buffer can take the room
            self._promise(1)

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

    def note(self) -> str | None:
        if self._sketch is None:
            return None
        return (
            f"{self.spec.key()}: more values than the quantile memory budget holds "
            f"({self.budget.limit / 2**20:g} MiB); used a sketch with rank error <= "
            f"{rank_error_bound(self._sketch.k):.1e}"
        )

    def _observe(self, x, mask):
        lay = self.layout
        if x.device.type != "cpu":
            x = x.cpu()
            mask = None if mask is None else mask.cpu()
        if mask is not None:
            self._add_left_out(lay.sum(~mask).reshape(-1).numpy())
            x = torch.where(mask, x, float("nan"))
        m = x.numel() // lay.rows
        self._seen += m
        if self._sketch is None:
            if self._exact is None:
                self._promise(lay.rows)
                self._exact = ExactValues(lay.rows, self.budget)
            slot = self._exact.slot(m, m * self.size_hint if self.size_hint else None)
            if slot is not None:
                lay.write(slot, x)
                return
            self._to_sketch()
        self._sketch.add(lay.as_rows(x).numpy())

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
        values = other._exact.values()
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

    def _result(self):
        rows = self.layout.rows
        qs = (1.0 - self.q, self.q)
        if self._sketch is not None:
            lo, hi = self._sketch.quantiles(qs, self._finite_per_row())
        elif self._exact is not None:
            lo, hi = self._exact.quantiles(qs, self._finite_per_row())
        else:
            lo = hi = torch.full((rows,), float("nan"))
        return {"min": lo, "max": hi, "range": hi - lo}

    def _tensors(self):
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
            values = tensors["values"].numpy()
            self._promise(rows)
            self._exact = ExactValues(rows, self.budget)
            slot = self._exact.slot(values.shape[1])
            if slot is None:
                self._to_sketch()
                self._sketch.add(values)
            else:
                slot[...] = values


# ---------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------

_STATES = {
    "range_min_max": MinMaxState,
    "range_quantile": QuantileState,
    "variance_precise": MomentsState,
    "variance_online": MomentsState,
    "range_n_sigma": MomentsState,
    "abs_mean": AbsMeanState,
    "threshold_abs_mean": ThresholdAbsMeanState,
}


def make_state(
    spec: StatSpec,
    *,
    quantile_budget: QuantileBudget | None = None,
    threshold: Any = None,
    batched: bool = True,
    size_hint: int | None = None,
) -> StatState:
    """A fresh state for `spec`.

    Args:
        spec: the statistic and its options.
        quantile_budget: shared by every quantile state of a run (a private 256 MiB one when None).
        threshold: for `threshold_abs_mean` only: Δ, a float or a tensor that broadcasts against x.
        batched: True for activations (dim 0 is the batch, always reduced), False for parameters.
        size_hint: the number of `update` calls expected (quantile buffers are sized for all at once).
    """
    cls = _STATES[spec.name]
    if cls is QuantileState:
        return QuantileState(spec, batched, quantile_budget, size_hint)
    if cls is ThresholdAbsMeanState:
        return ThresholdAbsMeanState(spec, batched, threshold)
    return cls(spec, batched)


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


# ---------------------------------------------------------------------------------------------------------
# A tensor's statistics, fed together
# ---------------------------------------------------------------------------------------------------------


class TensorStats:
    """Every statistic collected on one tensor: one finiteness probe and at most one |x| per batch.

    `update(x)` feeds all states; `results()` maps each `StatSpec` to its result; `nonfinite` counts the
    NaN/Inf values left out; `shape` is the first shape seen; `updates` counts the calls.
    """

    def __init__(
        self,
        specs: Iterable[StatSpec],
        *,
        batched: bool = True,
        quantile_budget: QuantileBudget | None = None,
        threshold: Any = None,
        size_hint: int | None = None,
    ) -> None:
        self.batched = batched
        options = {"quantile_budget": quantile_budget, "threshold": threshold, "size_hint": size_hint}
        self.states = {spec: make_state(spec, batched=batched, **options) for spec in specs}
        self._plain = [s for s in self.states.values() if not s.wants_abs]
        self._abs = [s for s in self.states.values() if s.wants_abs]
        self.nonfinite = 0
        self.updates = 0
        self.shape: tuple[int, ...] | None = None

    def update(self, x: torch.Tensor) -> None:
        x, mask, bad = _prepare(x, self.batched)
        if self.shape is None:
            self.shape = tuple(x.shape)
        for state in self._plain:
            state.observe(x, mask, bad)
        if self._abs:
            xa = x.abs()
            for state in self._abs:
                state.observe(xa, mask, bad)
        self.nonfinite += bad
        self.updates += 1

    def results(self) -> dict[StatSpec, dict[str, Any]]:
        return {spec: state.result() for spec, state in self.states.items()}

    def notes(self) -> list[str]:
        return [n for n in (s.note() for s in self.states.values()) if n]
