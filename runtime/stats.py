"""Statistic states: small mergeable accumulators for MASE's statistics, vectorised over the batch.

In: a `StatSpec` (which statistic, `dims`, `abs`, options) and tensors, one `update(x)` per batch for an
activation or once with the whole tensor for a parameter. Out: `result()`, a dict with MASE's fields for the
statistic (`plan.STATISTICS[name].fields`): python floats for scalars, nested lists for per-channel or
element-wise results, `count` an int. `merge(other)` adds another state's data (exact, except a sketch,
which merges within its stated rank error); `to_tensors()` / `from_tensors(spec, tensors)` turn a state into
a dict of tensors and back; `state.sync()` / `TensorStats.sync()` are the protocols with which
`distributed.sync_stats` merges the states of every process of a `torch.distributed` job, so that every
process ends with the same results.

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
limit: see `quantiles.py`). `variance_precise` and `variance_online` are the same state: per batch a mean
and a sum of squared deviations, merged in float64 with Chan et al.'s formula, so the variance is exact to
~1e-7 relative. `range_n_sigma(num_sigma=k)`: min/max = mean -/+ k·std (unbiased std), range = max - min.
`abs_mean`: mean of |x|. `threshold_abs_mean` (derived): mean of |x| over the elements with |x| >
threshold, where the threshold (a float or a tensor that broadcasts against x) is given at construction;
count = how many.

NaN and +-Inf are counted, left out of every statistic, and reported as `nonfinite = N` in the result when
N > 0. A position that saw no finite value gets NaN fields. When a quantile state had to use a sketch
because of the memory budget, its result has `exact = False`. Zeros are reported as +0.0.

Results do not depend on how the batches are split between processes, bit for bit (a sketch aside):
- every batch gets a key (its index in the calibration, times 2^20, plus the call within the batch), and
  each sum-like statistic keeps one float64 partial per key: a float32 sum over chunks of 16384 values
  whose layout does not depend on the thread count (torch's single-output reductions do), added in float64.
  Partials are folded left in key order, as they come in one process, all at once after a merge;
- min/max and exact quantiles do not depend on the order of the values at all.

Speed: `TensorStats` feeds all statistics of one tensor together: per batch one `aminmax` (which is also the
NaN/Inf probe and tells whether |x| = x), at most one |x|, one chunked sum per sum-like statistic and one
copy into the exact quantile buffer. Tensors of at most 16384 values per batch are first copied into a
staging buffer and processed 64 batches at a time (a small model's cost is Python work per call, not
arithmetic). Parameters are read once and their results computed at once. Memory: nothing small is kept
per batch (per-batch partials go into preallocated arrays; small long-lived allocations between the
forward's large ones fragment the heap), and large buffers (exact values, staging, |x|) come from
`quantiles.take_buffer`'s pool, which keeps them for the next calibration (fresh memory costs page faults).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from attrs import field, frozen

from ternqc.plan import channel_axis, StatSpec
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantiles import (
    CompactorSketch,
    ExactValues,
    QuantileBudget,
    give_back,
    quantiles_from_ranks,
    rank_error_bound,
    select_protocol,
    sketch_bytes,
    sketch_k_for,
    take_buffer,
    wanted_ranks,
)

__all__ = [
    "KEY_CALLS",
    "fixed_order_sum",
    "Layout",
    "QuantileBudget",
    "StatState",
    "TensorStats",
    "from_tensors",
    "make_layout",
    "make_state",
]

#: A batch's key is `batch index * KEY_CALLS + call within the batch` (a module called twice per forward).
KEY_CALLS = 2**20
_FOLD_EVERY = 64  # partials and min/max are folded every this many batches
_SUM_CHUNK = 16384  # values summed in float32 before the float64 total (below torch's parallel grain)
_STAGE_MAX_NUMEL = 16384  # tensors of at most this many values per batch are staged
STAGE_BYTES = 4 * 2**20  # default staging memory of one tensor
_STAGE_MAX_BATCHES = 64
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
    `rows`: the number of result positions. A "block" is `K` batches stacked as `[K, *shape]`.
    """

    reduce: tuple[int, ...]
    kept: tuple[int, ...]
    kept_sizes: tuple[int, ...]
    scalar: bool
    result_shape: tuple[int, ...]
    rows: int = field(init=False)
    full: bool = field(init=False)  # every dim is reduced: whole-tensor reductions give a 0-d tensor
    block_reduce: tuple[int, ...] = field(init=False)  # the reduced dims of a block
    block_perm: tuple[int, ...] = field(init=False)  # a block's dims: kept first, then K, then reduced
    keep_shape: tuple[int, ...] = field(init=False)  # a batch's shape with reduced dims as 1

    def __attrs_post_init__(self) -> None:
        ndim = len(self.kept) + len(self.reduce)
        keep = [1] * ndim
        for d, size in zip(self.kept, self.kept_sizes):
            keep[d] = size
        set_ = object.__setattr__
        set_(self, "rows", math.prod(self.result_shape))
        set_(self, "full", not self.kept)
        set_(self, "block_reduce", tuple(d + 1 for d in self.reduce))
        set_(self, "block_perm", tuple(d + 1 for d in self.kept) + (0,) + tuple(d + 1 for d in self.reduce))
        set_(self, "keep_shape", tuple(keep))


def make_layout(shape: tuple[int, ...], dims: str | tuple[int, ...], batched: bool) -> Layout:
    """The layout of a statistic with `dims` on a tensor of `shape` (see the module docstring).

    Raises:
        UserError: a dim outside the tensor's dims.
    """
    ndim = len(shape)
    axis = channel_axis(dims)
    if axis is not None:  # per channel: keep only `axis`, reduce every other dim
        start = 1 if batched and ndim else 0
        if not (-ndim <= axis < ndim) or axis % max(ndim, 1) < start:
            what = "an activation" if batched else "a parameter"
            msg = (f"per_channel keeps dim {axis}, which {what} of shape {list(shape)} does not have "
                   f"(dims index the tensor as the module sees it{', batch first' if batched else ''})")
            raise UserError(msg)
        dims = tuple(d for d in range(start, ndim) if d != axis % ndim)
        if not dims:
            dims = "none"
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


def _canon_shape(layout: Layout) -> tuple[int, ...]:
    """The shape states keep their per-position values in: `()` for a scalar, `[rows]` otherwise."""
    return () if layout.scalar else (layout.rows,)


# ---------------------------------------------------------------------------------------------------------
# Per-batch reductions whose bits depend neither on the thread count nor on how batches are grouped
# ---------------------------------------------------------------------------------------------------------


def _batch_sums(t: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Per batch of the block `t` (`[K, *shape]`) and per result position, the sum of the reduced values:
    `[K, rows]` float64. One position per batch: float32 sums over chunks of `_SUM_CHUNK` values (each
    chunk reduced by one thread), added in float64. Several positions: torch's reduction, which gives each
    output to one thread."""
    k = t.shape[0]
    if not lay.reduce:
        return t.reshape(k, lay.rows).double()
    if lay.rows > 1:
        return t.sum(dim=lay.block_reduce).reshape(k, lay.rows).double()
    flat = t.reshape(k, -1)
    n = flat.shape[1]
    if n <= _SUM_CHUNK:
        return flat.sum(1, keepdim=True).double()
    full = n - n % _SUM_CHUNK
    chunks = flat[:, :full].view(k, full // _SUM_CHUNK, _SUM_CHUNK).sum(2)
    if full < n:
        chunks = torch.cat([chunks, flat[:, full:].sum(1, keepdim=True)], 1)
    return chunks.double().sum(1, keepdim=True)


def fixed_order_sum(
    x: torch.Tensor, dims: Sequence[int] | None = None, keepdim: bool = False
) -> torch.Tensor:
    """`x.sum(dims, keepdim)` in `x`'s dtype, with the same bits whatever the thread count.

    torch reduces a tensor to a single value with one partial per thread, so its bits depend on the number
    of threads (a process of a distributed run may have fewer); a reduction to several values gives each
    value to one thread and is stable. A single value is therefore summed here over fixed chunks of
    16384 values (float32 chunk sums added in float64).
    """
    dims = tuple(range(x.dim())) if dims is None else tuple(d % max(x.dim(), 1) for d in dims)
    out_shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
    if math.prod(out_shape) > 1 or x.numel() <= _SUM_CHUNK:
        return x.sum(dim=dims, keepdim=keepdim) if dims else x.clone()
    lay = Layout(tuple(range(x.dim())), (), (), True, ())
    total = _batch_sums(x.reshape(1, -1), lay).reshape(()).to(x.dtype)
    if keepdim:
        return total.reshape(out_shape)
    return total.reshape([s for d, s in enumerate(x.shape) if d not in dims])


def _batch_counts(mask: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Per batch and position, how many elements of the boolean block `mask` are set: `[K, rows]` int64."""
    k = mask.shape[0]
    if not lay.reduce:
        return mask.reshape(k, lay.rows).long()
    if lay.rows > 1:
        return mask.sum(dim=lay.block_reduce).reshape(k, lay.rows)
    return mask.reshape(k, -1).sum(1, keepdim=True)


def _rows_view(x: torch.Tensor, lay: Layout) -> np.ndarray:
    """The block `x` as a `[rows, values]` float32 numpy array (kept dims first)."""
    if lay.rows == 1:
        v = x.reshape(1, -1)
    else:
        v = x.permute(lay.block_perm).reshape(lay.rows, -1)
    return v.numpy() if v.dtype == torch.float32 else v.float().numpy()


def _write_rows(slot: np.ndarray, x: torch.Tensor, lay: Layout) -> None:
    """Copy the CPU block `x` into `slot` (a `[rows, values]` numpy view) in `_rows_view` order."""
    if lay.rows == 1:
        slot[0, :] = x.reshape(-1).numpy()  # a numpy assignment: one memcpy (or cast)
        return
    v = x.permute(lay.block_perm)
    torch.from_numpy(slot).view(v.shape).copy_(v)  # one strided copy


# ---------------------------------------------------------------------------------------------------------
# A block of batches, prepared once for every statistic of a tensor
# ---------------------------------------------------------------------------------------------------------


class _Block:
    """`K` batches of one shape as `x` (`[K, *shape]`, floating point), their keys, the finite mask (None when
    every value is finite), the number of NaN/Inf values, and the block's min/max when known."""

    __slots__ = ("x", "keys", "mask", "bad", "lo", "hi", "nonneg", "_sums", "_abs", "scratch")

    def __init__(self, x, keys, mask, bad, lo=None, hi=None, nonneg=False) -> None:
        self.x = x
        self.keys = keys
        self.mask = mask
        self.bad = bad
        self.lo = lo
        self.hi = hi
        self.nonneg = nonneg
        self._sums: dict[Layout, torch.Tensor] = {}
        self._abs: _Block | None = None
        self.scratch: Callable[[torch.Tensor], torch.Tensor] | None = None  # memory for |x|, reused

    @classmethod
    def prepare(cls, x: torch.Tensor, keys: np.ndarray) -> _Block:
        """Probe `x` with one `aminmax`: finite min and max mean no NaN/Inf (NaN propagates), and a min >= 0
        means |x| = x."""
        lo, hi = (t.item() for t in torch.aminmax(x))
        if math.isfinite(lo) and math.isfinite(hi):
            return cls(x, keys, None, 0, lo, hi, lo >= 0)
        mask = torch.isfinite(x)
        return cls(x, keys, mask, x.numel() - int(mask.sum()))

    @property
    def k(self) -> int:
        return self.x.shape[0]

    def bounds(self) -> tuple[float, float]:
        """Min and max of the whole block, as python floats (only when every value is finite)."""
        if self.lo is None:
            self.lo, self.hi = (t.item() for t in torch.aminmax(self.x))
        return self.lo, self.hi

    def sums(self, lay: Layout) -> torch.Tensor:
        """`_batch_sums(x, lay)`, computed once per layout (several statistics share it)."""
        got = self._sums.get(lay)
        if got is None:
            got = self._sums[lay] = _batch_sums(self.x, lay)
        return got

    def absolute(self) -> _Block:
        """The block of |x| (itself when every value is >= 0)."""
        if self.nonneg:
            return self
        if self._abs is None:
            out = self.scratch(self.x) if self.scratch is not None else None
            xa = torch.abs(self.x, out=out) if out is not None else self.x.abs()
            self._abs = _Block(xa, self.keys, self.mask, self.bad, nonneg=True)
        return self._abs


def _as_float(x: torch.Tensor, batched: bool) -> torch.Tensor:
    if x.requires_grad:
        x = x.detach()
    if x.dtype not in _FLOATS:
        x = x.float()
    if batched and x.dim() == 0:
        x = x.reshape(1)
    return x


# ---------------------------------------------------------------------------------------------------------
# Per-batch partials, folded left in key order
# ---------------------------------------------------------------------------------------------------------


class _Partials:
    """Per-batch partial results of a sum-like statistic: for each batch key a tuple of fields, each one
    value per result position, kept in preallocated float64 arrays (per-batch small tensors kept between
    the forward's large ones would fragment the heap). `eager` stores fold every `_FOLD_EVERY` batches (one
    process: keys arrive in order, so the memory stays small); otherwise partials are kept until merged with
    other processes' (`sync`), then folded all at once. Either way the fold is the same left fold in key
    order, so the bits are the same."""

    def __init__(self, fold: Callable, eager: bool = True) -> None:
        self.fold_fn = fold
        self.eager = eager
        self.acc: tuple[np.ndarray, ...] | None = None  # folded partials
        self.last = -1  # the largest key folded into `acc`
        self._keys = np.empty(0, dtype=np.int64)
        self._cols: list[np.ndarray] = []
        self._n = 0

    def add(self, keys: np.ndarray, fields: tuple, rows: int) -> None:
        """Partials of `len(keys)` batches: each field a `[K, rows]` tensor or one number for all."""
        k, n = len(keys), self._n
        self._reserve(n + k, rows, len(fields))
        self._keys[n : n + k] = keys
        for col, f in zip(self._cols, fields):
            if isinstance(f, torch.Tensor):
                col[n : n + k] = f.detach().cpu().numpy().reshape(k, rows)
            else:
                col[n : n + k] = f
        self._n = n + k
        if self.eager and self._n >= _FOLD_EVERY:
            self.fold()

    def _reserve(self, need: int, rows: int, fields: int) -> None:
        cap = len(self._keys)
        if need <= cap and self._cols and self._cols[0].shape[1] == rows:
            return
        grown = max(need, 2 * cap, _FOLD_EVERY)
        keys = np.empty(grown, dtype=np.int64)
        keys[: self._n] = self._keys[: self._n]
        cols = [np.empty((grown, rows), dtype=np.float64) for _ in range(fields)]
        for new, old in zip(cols, self._cols):
            new[: self._n] = old[: self._n]
        self._keys, self._cols = keys, cols

    def pending(self) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The unfolded keys (sorted) and fields (`[P, rows]` float64 each, in key order), as copies."""
        keys = self._keys[: self._n]
        order = np.argsort(keys, kind="stable")
        return keys[order], tuple(c[: self._n][order] for c in self._cols)

    def fold(self) -> tuple[np.ndarray, ...] | None:
        """Fold every pending partial into `acc` (in key order) and return `acc`."""
        if self._n:
            keys, cols = self.pending()
            self.acc = self.fold_fn(self.acc, cols)
            self.last = max(self.last, int(keys[-1]))
            self._n = 0
        return self.acc

    def set_pending(self, keys: np.ndarray, cols: tuple[np.ndarray, ...]) -> None:
        self._keys = np.array(keys, dtype=np.int64)
        self._cols = [np.array(c, dtype=np.float64) for c in cols]
        self._n = len(keys)

    def keys(self) -> np.ndarray:
        return self._keys[: self._n]

    def merge(self, other: _Partials) -> None:
        """Add `other`'s partials. Unfolded partials with keys disjoint from ours (other processes' batches)
        join ours and are later folded in key order; otherwise (two independent runs) `other`'s data is
        folded on its own and appended after ours."""
        if self.acc is None and other.acc is None and not np.intersect1d(self.keys(), other.keys()).size:
            if other._n:
                keys, cols = other.pending()
                rows = cols[0].shape[1]
                self._reserve(self._n + len(keys), rows, len(cols))
                self._keys[self._n : self._n + len(keys)] = keys
                for col, c in zip(self._cols, cols):
                    col[self._n : self._n + len(keys)] = c
                self._n += len(keys)
            if self.eager and self._n >= _FOLD_EVERY:
                self.fold()
            return
        mine = self.fold()
        keys, cols = other.pending()
        theirs = other.fold_fn(other.acc, cols) if len(keys) else other.acc
        if theirs is None:
            return
        self.acc = theirs if mine is None else self.fold_fn(mine, tuple(c[None] for c in theirs))
        self.last = max(self.last, other.last, int(keys[-1]) if len(keys) else -1)


def _fold_sums(acc, cols):
    """Left fold of additive partials: `acc + p0 + p1 + ...` in order (`np.add.accumulate` is sequential)."""
    out = []
    for i, c in enumerate(cols):
        stacked = c if acc is None else np.concatenate([acc[i][None], c])
        out.append(np.add.accumulate(stacked, axis=0)[-1].copy())
    return tuple(out)


def _fold_moments(acc, cols):
    """Left fold of (count, mean, sum of squared deviations) with Chan et al.'s pairwise formula."""
    ns, means, m2s = cols
    start = 0
    if acc is None:
        n, mean, m2 = ns[0].copy(), means[0].copy(), m2s[0].copy()
        start = 1
    else:
        n, mean, m2 = (a.copy() for a in acc)
    for i in range(start, len(ns)):
        nb = ns[i]
        total = n + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(total > 0, nb / np.where(total > 0, total, 1.0), 0.0)
        delta = means[i] - mean
        mean = np.where(n == 0, means[i], mean + delta * share)
        m2 = m2 + m2s[i] + delta * delta * n * share
        n = total
    return n, mean, m2


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
        self._shape: tuple[int, ...] | None = None
        self._auto = 0  # the key of the next `update` without one

    # --- feeding ---

    def update(self, x: torch.Tensor, key: int | None = None) -> None:
        """Add a batch (activations, batch first) or a whole parameter tensor. `key` orders the batch among
        others (default: one more than the last)."""
        with torch.no_grad():
            x = _as_float(x, self.batched)
            if x.numel() == 0:
                return
            if key is None:
                key = self._auto
            self._auto = key + 1
            block = _Block.prepare(x.unsqueeze(0), np.array([key], dtype=np.int64))
            self.observe(block.absolute() if self.wants_abs else block)

    def observe(self, block: _Block) -> None:
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
            self.layout = _pseudo_layout(shape, bool(tensors["scalar"]))
            self._load(tensors)

    def _blank(self) -> StatState:
        """An empty state with this one's configuration."""
        return type(self)(self.spec, self.batched)

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
    def _observe(self, block: _Block) -> None:
        raise NotImplementedError

    def _merge(self, other: StatState) -> None:
        raise NotImplementedError

    def _result(self) -> dict[str, torch.Tensor | np.ndarray]:
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class MinMaxState(StatState):
    """`range_min_max`: running min and max (exact, in the input's dtype; range in that dtype, as MASE).

    One position: python floats (the block's probe already has them). Several: tensors updated in place.
    Nothing small is kept per batch: small long-lived allocations between the forward's large short-lived
    ones fragment the heap (measured: +1.5 MiB resident per batch).
    """

    def __init__(self, spec: StatSpec, batched: bool = True) -> None:
        super().__init__(spec, batched)
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


class _SumState(StatState):
    """Sum-like statistics: per-batch partials (`_Partials`), folded left in key order."""

    _names: tuple[str, ...] = ()
    _fold = staticmethod(_fold_sums)

    def __init__(self, spec: StatSpec, batched: bool = True) -> None:
        super().__init__(spec, batched)
        self._partials = _Partials(self._fold)

    def _blank(self) -> StatState:
        blank = super()._blank()
        blank._partials.eager = False  # a merge target: fold once everybody's partials are in
        return blank

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


class MomentsState(_SumState):
    """`variance_precise`, `variance_online`, `range_n_sigma`: count, mean and the sum of squared deviations
    per position. Each batch gives its mean (float64, from the chunked sum) and its sum of squared deviations
    from that mean rounded to float32 (a float32 pass, corrected in float64 to the exact mean); batches are
    merged with Chan et al.'s formula M2 = M2_a + M2_b + delta^2·n_a·n_b/n."""

    _names = ("n", "mean", "m2")
    _fold = staticmethod(_fold_moments)

    def _observe(self, block):
        lay, x, mask = self.layout, block.x, block.mask
        k = block.k
        if mask is None:
            n = x[0].numel() // lay.rows
            mean = block.sums(lay) / n
            centre = mean.to(x.dtype)
            deviations = x - centre.reshape((k,) + lay.keep_shape)
            m2 = _batch_sums(deviations.square_(), lay)
        else:
            n = _batch_counts(mask, lay)
            sums = _batch_sums(torch.where(mask, x, 0.0), lay)
            mean = torch.where(n > 0, sums / n.clamp(min=1), 0.0)
            centre = mean.to(x.dtype)
            deviations = torch.where(mask, x - centre.reshape((k,) + lay.keep_shape), 0.0)
            m2 = _batch_sums(deviations.square_(), lay)
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


class AbsMeanState(_SumState):
    """`abs_mean`: mean of |x| (chunked float32 sums per batch, float64 across chunks and batches)."""

    takes_abs = True
    _names = ("n", "sum")

    def _observe(self, block):
        lay, x, mask = self.layout, block.x, block.mask
        if mask is None:
            self._partials.add(block.keys, (x[0].numel() // lay.rows, block.sums(lay)), lay.rows)
        else:
            sums = _batch_sums(torch.where(mask, x, 0.0), lay)
            self._partials.add(block.keys, (_batch_counts(mask, lay), sums), lay.rows)

    def _result(self):
        n, total = self._acc()
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"abs_mean": np.where(n > 0, total / n, np.nan)}


class ThresholdAbsMeanState(AbsMeanState):
    """`threshold_abs_mean`: mean of |x| over the elements with |x| > threshold; count = how many."""

    def __init__(self, spec: StatSpec, batched: bool = True, threshold: Any = None) -> None:
        super().__init__(spec, batched)
        if threshold is None:
            msg = "threshold_abs_mean needs the threshold it is taken above"
            raise ValueError(msg)
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32)

    def _blank(self) -> StatState:
        blank = type(self)(self.spec, self.batched, self.threshold)
        blank._partials.eager = False
        return blank

    def _observe(self, block):
        lay, x = self.layout, block.x
        if self.threshold.device != x.device:
            self.threshold = self.threshold.to(x.device)
        above = x > self.threshold  # NaN compares False; +-Inf is removed by the mask
        if block.mask is not None:
            above &= block.mask
        sums = _batch_sums(torch.where(above, x, 0.0), lay)
        self._partials.add(block.keys, (_batch_counts(above, lay), sums), lay.rows)

    def _count(self) -> int:
        got = self._acc()
        return 0 if got is None else round(float(got[0].sum()))


class QuantileState(StatState):
    """`range_quantile`: exact while the shared `QuantileBudget` allows, then a `CompactorSketch`.

    With a size hint (the number of updates to expect) the choice is made at the first batch: exact when all
    the values will fit, else a sketch straight away. `plan_hint` is the number of updates of all processes
    together: the choice then is the one a single process would make, and the budget accounts for the
    values of every process (this process allocates only its own).
    """

    def __init__(
        self,
        spec: StatSpec,
        batched: bool = True,
        budget: QuantileBudget | None = None,
        size_hint: int | None = None,
        plan_hint: int | None = None,
    ) -> None:
        super().__init__(spec, batched)
        self.q = spec.option("quantile")
        self.budget = budget if budget is not None else QuantileBudget()
        self.size_hint = size_hint  # updates expected here: the first buffer is sized for all of them
        self.plan_hint = plan_hint or size_hint  # updates expected by every process together
        self._exact: ExactValues | None = None
        self._sketch: CompactorSketch | None = None
        self._final: dict[str, torch.Tensor] | None = None  # the result, after a merge across processes
        self._seen = 0  # values per row so far, left-out ones included
        self._left_out: np.ndarray | None = None  # per row, when any
        self._promised = 0  # bytes promised to this state's sketch in the budget
        if spec.dims == "all":  # one row: promise the sketch before any buffer can take the room
            self._promise(1)

    def _blank(self) -> StatState:
        return type(self)(self.spec, self.batched, self.budget)

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

    def release(self) -> None:
        if self._final is None and self.layout is not None:
            self._final = self._compute()
        self._release_exact()
        self.budget.cancel(self._promised)  # no sketch will be needed any more
        self._promised = 0

    def _start(self, per_update: int) -> None:
        """The first batch: an exact buffer (sized from the hint) or, when the hint says the values cannot
        fit, a sketch."""
        rows = self.layout.rows
        self._promise(rows)
        self._exact = ExactValues(rows, self.budget)
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
            self._add_left_out(_batch_counts(~mask, lay).sum(0).numpy())
            x = torch.where(mask, x, float("nan"))
        m = x.numel() // lay.rows
        self._seen += m
        if self._sketch is None:
            if self._exact is None:
                self._start(m // block.k)
            if self._sketch is None:
                slot = self._exact.slot(m)
                if slot is not None:
                    _write_rows(slot, x, lay)
                    return
                self._to_sketch()
        self._sketch.add(_rows_view(x, lay))

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

    def _compute(self) -> dict[str, torch.Tensor]:
        rows = self.layout.rows
        qs = (1.0 - self.q, self.q)
        if self._sketch is not None:
            lo, hi = self._sketch.quantiles(qs, self._finite_per_row())
        elif self._exact is not None:
            lo, hi = self._exact.quantiles(qs, self._finite_per_row())
        else:
            lo = hi = torch.full((rows,), float("nan"))
        return {"min": lo, "max": hi, "range": hi - lo}

    def _result(self):
        if self._final is None:
            self._final = self._compute()  # kept: selection is the expensive part
        return self._final

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
        pooled."""
        rows = self.layout.rows if self.layout is not None else 0
        mode = "empty" if self.layout is None else "sketch" if self._sketch is not None else "exact"
        message = {
            "mode": mode,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "seen": self._seen,
            "left_out": self._left_out,
            "form": None if self.layout is None else _result_form(self.layout),
            "sketch": self._sketch.to_arrays() if mode == "sketch" else None,
            "values": self._exact.values() if rows > 1 and self._exact is not None else None,
        }
        everyone = yield message
        forms = [m["form"] for m in everyone if m["form"] is not None]
        if not forms:
            return
        scalar, shape = forms[0]
        if self.layout is None:
            self.layout = _pseudo_layout(shape, scalar)
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

    def _release_exact(self) -> None:
        if self._exact is not None:
            self._exact.release()
            self._exact = None


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
    plan_hint: int | None = None,
) -> StatState:
    """A fresh state for `spec`.

    Args:
        spec: the statistic and its options.
        quantile_budget: shared by every quantile state of a run (a private 256 MiB one when None).
        threshold: for `threshold_abs_mean` only: Δ, a float or a tensor that broadcasts against x.
        batched: True for activations (dim 0 is the batch, always reduced), False for parameters.
        size_hint: the number of `update` calls expected (quantile buffers are sized for all at once).
        plan_hint: the number of `update` calls all processes expect together (decides exact or sketch).
    """
    cls = _STATES[spec.name]
    if cls is QuantileState:
        return QuantileState(spec, batched, quantile_budget, size_hint, plan_hint)
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


def _empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of `n` values; float32 on the CPU comes from the buffer pool (warm memory)."""
    if dtype == torch.float32 and device.type == "cpu":
        return torch.from_numpy(take_buffer(n))
    return torch.empty(n, dtype=dtype, device=device)


class _Stage:
    """Small batches copied into one preallocated `[K, *shape]` tensor until it is full."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None
        self.buf: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []  # buf[0], buf[1], ... (indexing costs a call per batch)
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.k = 0
        self.keys: list[int] = []


class TensorStats:
    """Every statistic collected on one tensor, fed together (see the module docstring).

    `update(x, batch)` feeds all states (`batch`: the calibration batch index, for results that do not
    depend on how batches are split between processes; default: one more than the last call);
    `results()` maps each `StatSpec` to its result; `nonfinite` counts the NaN/Inf values left out; `shape`
    is the first shape seen; `updates` counts the calls. `eager=False` keeps per-batch partials until
    `sync` (a process of a distributed run). `freeze()` computes the results and drops the buffers.
    `stage_bytes` bounds the staging buffer of small batches.
    """

    def __init__(
        self,
        specs: Iterable[StatSpec],
        *,
        batched: bool = True,
        quantile_budget: QuantileBudget | None = None,
        threshold: Any = None,
        size_hint: int | None = None,
        plan_hint: int | None = None,
        eager: bool = True,
        stage_bytes: int = STAGE_BYTES,
    ) -> None:
        self.batched = batched
        self._stage_bytes = stage_bytes
        options = {"quantile_budget": quantile_budget, "threshold": threshold}
        self.states = {
            spec: make_state(spec, batched=batched, size_hint=size_hint, plan_hint=plan_hint, **options)
            for spec in specs
        }
        for state in self.states.values():
            if isinstance(state, _SumState):
                state._partials.eager = eager
        self._plain = [s for s in self.states.values() if not s.wants_abs]
        self._abs = [s for s in self.states.values() if s.wants_abs]
        self._nonfinite = 0
        self.updates = 0
        self.shape: tuple[int, ...] | None = None
        self._last_shape: tuple[int, ...] | None = None
        self._stage = _Stage() if batched else None
        self._batch: int | None = None
        self._call = 0
        self._frozen: dict[StatSpec, dict[str, Any]] | None = None
        self._scratch: torch.Tensor | None = None

    def _scratch_for(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like `x` for |x|, reused across batches (fresh memory is slow to fault in)."""
        s = self._scratch
        if s is None or s.numel() < x.numel() or s.dtype != x.dtype or s.device != x.device:
            s = self._scratch = _empty(x.numel(), x.dtype, x.device)
        return s[: x.numel()].view(x.shape)

    def update(self, x: torch.Tensor, batch: int | None = None) -> None:
        if x.requires_grad or x.dtype not in _FLOATS or (self.batched and x.dim() == 0):
            x = _as_float(x, self.batched)
        if batch is None:
            key = self.updates
        else:
            self._call = self._call + 1 if batch == self._batch else 0
            self._batch = batch
            key = batch * KEY_CALLS + self._call
        self.updates += 1
        shape = x.shape
        st = self._stage
        if st is not None and shape == st.shape and x.dtype is st.dtype:  # the common case: stage it
            st.rows[st.k].copy_(x)
            st.keys.append(key)
            st.k += 1
            if st.k == len(st.rows):
                self.flush()
            return
        shape = tuple(shape)
        if self.shape is None:
            self.shape = shape
        if x.numel() == 0:
            return
        if shape != self._last_shape:
            for state in self.states.values():  # a shape the statistics cannot take fails here, not later
                state.adopt(shape)
            self._last_shape = shape
        if st is not None and x.numel() <= _STAGE_MAX_NUMEL:
            self._restage(x)
            self.update_staged(x, key)
        else:
            self.flush()
            self._feed(x.unsqueeze(0), np.array([key], dtype=np.int64))

    def update_staged(self, x: torch.Tensor, key: int) -> None:
        st = self._stage
        st.rows[st.k].copy_(x)
        st.keys.append(key)
        st.k += 1
        if st.k == len(st.rows):
            self.flush()

    def _restage(self, x: torch.Tensor) -> None:
        """Make the staging buffer take batches of `x`'s shape, dtype and device (processing what it
        holds)."""
        self.flush()
        st = self._stage
        per = x.numel()
        kmax = max(2, min(_STAGE_MAX_BATCHES, self._stage_bytes // (per * x.element_size())))
        flat = st.flat
        if flat is None or flat.numel() < kmax * per or flat.dtype != x.dtype or flat.device != x.device:
            flat = st.flat = _empty(kmax * per, x.dtype, x.device)
        st.buf = flat[: kmax * per].view((kmax, *x.shape))
        st.rows = list(st.buf.unbind(0))
        st.shape, st.dtype = x.shape, x.dtype

    def flush(self) -> None:
        """Process the staged batches."""
        st = self._stage
        if st is None or st.k == 0:
            return
        block, keys = st.buf[: st.k], np.array(st.keys, dtype=np.int64)
        st.k, st.keys = 0, []
        self._feed(block, keys)

    def _feed(self, x: torch.Tensor, keys: np.ndarray) -> None:
        block = _Block.prepare(x, keys)
        block.scratch = self._scratch_for
        self._nonfinite += block.bad
        for state in self._plain:
            state.observe(block)
        if self._abs:
            absolute = block.absolute()
            for state in self._abs:
                state.observe(absolute)

    @property
    def nonfinite(self) -> int:
        self.flush()
        return self._nonfinite

    def results(self) -> dict[StatSpec, dict[str, Any]]:
        if self._frozen is not None:
            return self._frozen
        self.flush()
        return {spec: state.result() for spec, state in self.states.items()}

    def freeze(self) -> None:
        """Compute the results now and release the memory behind them (buffers go back to the pool)."""
        self._frozen = self.results()
        for state in self.states.values():
            state.release()
        for t in (self._scratch, self._stage.flat if self._stage is not None else None):
            if t is not None and t.device.type == "cpu" and t.dtype == torch.float32:
                give_back(t.numpy())
        self._scratch = None
        if self._stage is not None:
            self._stage = _Stage()

    def notes(self) -> list[str]:
        return [n for n in (s.note() for s in self.states.values()) if n]

    def sync(self) -> dict[Any, Generator]:
        """The protocol generators that merge this tensor's statistics with the other processes'
        (`distributed.sync_stats`)."""
        self.flush()
        gens: dict[Any, Generator] = {"meta": self._sync_meta()}
        gens.update((i, state.sync()) for i, state in enumerate(self.states.values()))
        return gens

    def _sync_meta(self) -> Generator:
        everyone = yield (self._nonfinite, self.updates, self.shape)
        self._nonfinite = sum(m[0] for m in everyone)
        self.updates = sum(m[1] for m in everyone)
        self.shape = next((m[2] for m in everyone if m[2] is not None), None)
