"""Per-batch reductions whose bits depend neither on the thread count nor on how batches are grouped, and the
per-batch partials of sum-like statistics, folded left in key order.

In: tensors and their `Layout`. Out: float64 partial sums keyed by batch, folded in a fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ternqc.runtime.calibrate import scan_kernel
from ternqc.runtime.calibrate.stats.layout import Layout

FOLD_EVERY = 64  # partials and min/max are folded every this many batches
SUM_CHUNK = 16384  # on an accelerator: values summed in float32 before the float64 total
SUM_LANES = scan_kernel.SUM_LANES  # on the CPU: the lanes of the fixed-order float64 sum (`lane_sums`)
FLOATS = frozenset((torch.float32, torch.float64))


# ---------------------------------------------------------------------------------------------------------
# Per-batch reductions whose bits depend neither on the thread count nor on how batches are grouped
# ---------------------------------------------------------------------------------------------------------


def lane_sums(rows: np.ndarray, absolute: bool = False) -> np.ndarray:
    """Per row of `rows` (`[K, n]` float32 or float64), the float64 sum of its values (of their magnitudes with
    `absolute`) in ternqc's fixed order: value i goes to lane i % 32, each lane adds its values in order, and
    the 32 lane sums are added in order from +0. The order depends on nothing else (threads, batching, the
    CPU's vector width), and float64 lanes lose far less than float32 sums. One pass of the compiled scans
    (`scan_kernel.row_sums`) where it takes the array, else numpy (~5x slower), with the same bits."""
    got = scan_kernel.row_sums(rows, absolute)
    if got is not None and not got[3]:  # with NaN/Inf, numpy's sums (the same NaN/Inf, for the caller's mask)
        return got[0]
    k, n = rows.shape
    body = n - n % SUM_LANES
    lanes = np.zeros((k, SUM_LANES))
    if body:
        part = rows[:, :body]
        if absolute:
            part = np.abs(part)
        # a reduction over the middle axis adds each lane's values one after the other, from the first row on
        # (numpy's pairwise summation is only along the contiguous axis; the float64 cast is buffered)
        lanes = np.add.reduce(part.reshape(k, -1, SUM_LANES), axis=1, dtype=np.float64)
    for i in range(body, n):  # the last n % 32 values: lane i % 32
        tail = rows[:, i].astype(np.float64)
        lanes[:, i - body] += np.abs(tail) if absolute else tail
    total = np.zeros(k)
    for j in range(SUM_LANES):
        total += lanes[:, j]
    return total


def batch_sums(t: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Per batch of the block `t` (`[K, *shape]`) and per result position, the sum of the reduced values:
    `[K, rows]` float64. One position per batch: on the CPU in `lane_sums`'s fixed order; on an accelerator
    (or for a tensor that needs its gradient), float32 sums over chunks of `SUM_CHUNK` values (each chunk
    reduced by one thread) added in float64.
    Several positions: torch's reduction, which gives each output to one thread."""
    k = t.shape[0]
    if not lay.reduce:
        return t.reshape(k, lay.rows).double()
    if lay.rows > 1:
        return t.sum(dim=lay.block_reduce).reshape(k, lay.rows).double()
    flat = t.reshape(k, -1)
    if flat.device.type == "cpu" and flat.dtype in FLOATS and not flat.requires_grad:
        return torch.from_numpy(lane_sums(flat.numpy())).reshape(k, 1)
    n = flat.shape[1]
    if n <= SUM_CHUNK:
        return flat.sum(1, keepdim=True).double()
    full = n - n % SUM_CHUNK
    chunks = flat[:, :full].view(k, full // SUM_CHUNK, SUM_CHUNK).sum(2)
    if full < n:
        chunks = torch.cat([chunks, flat[:, full:].sum(1, keepdim=True)], 1)
    return chunks.double().sum(1, keepdim=True)


def fixed_order_sum(
    x: torch.Tensor, dims: Sequence[int] | None = None, keepdim: bool = False
) -> torch.Tensor:
    """`x.sum(dims, keepdim)` in `x`'s dtype, with the same bits whatever the thread count.

    torch reduces a tensor to a single value with one partial per thread, so its bits depend on the number
    of threads (a process of a distributed run may have fewer); a reduction to several values gives each
    value to one thread and is stable. A single value is therefore the per-batch sum of `batch_sums` (the
    same order as the calibration's sums), rounded to `x`'s dtype.
    """
    dims = tuple(range(x.dim())) if dims is None else tuple(d % max(x.dim(), 1) for d in dims)
    out_shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
    lanes = x.device.type == "cpu" and x.dtype in FLOATS and not x.requires_grad  # else torch's chunks
    if math.prod(out_shape) > 1 or not dims or (not lanes and x.numel() <= SUM_CHUNK):
        return x.sum(dim=dims, keepdim=keepdim) if dims else x.clone()
    lay = Layout(tuple(range(x.dim())), (), (), True, ())
    total = batch_sums(x.reshape(1, -1), lay).reshape(()).to(x.dtype)
    if keepdim:
        return total.reshape(out_shape)
    return total.reshape([s for d, s in enumerate(x.shape) if d not in dims])


def batch_counts(mask: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Per batch and position, how many elements of the boolean block `mask` are set: `[K, rows]` int64."""
    k = mask.shape[0]
    if not lay.reduce:
        return mask.reshape(k, lay.rows).long()
    if lay.rows > 1:
        return mask.sum(dim=lay.block_reduce).reshape(k, lay.rows)
    return mask.reshape(k, -1).sum(1, keepdim=True)


def rows_view(x: torch.Tensor, lay: Layout) -> np.ndarray:
    """The block `x` as a `[rows, values]` float32 numpy array (kept dims first)."""
    if lay.rows == 1:
        v = x.reshape(1, -1)
    else:
        v = x.permute(lay.block_perm).reshape(lay.rows, -1)
    return v.numpy() if v.dtype == torch.float32 else v.float().numpy()


def write_rows(slot: np.ndarray, x: torch.Tensor, lay: Layout) -> None:
    """Copy the CPU block `x` into `slot` (a `[rows, values]` numpy view) in `rows_view` order."""
    if lay.rows == 1:
        slot[0, :] = x.reshape(-1).numpy()  # a numpy assignment: one memcpy (or cast)
        return
    v = x.permute(lay.block_perm)
    torch.from_numpy(slot).view(v.shape).copy_(v)  # one strided copy


# ---------------------------------------------------------------------------------------------------------
# A block of batches, prepared once for every statistic of a tensor
# ---------------------------------------------------------------------------------------------------------


class Block:
    """`K` batches of one shape as `x` (`[K, *shape]`, floating point), their keys, the finite mask (None when
    every value is finite), the number of NaN/Inf values, and the block's min/max when known.

    The block of |x| (`absolute()`) makes its values only when a statistic reads `x`: a sum over each whole
    batch may come with the probe (`prepare`)."""

    __slots__ = ("_x", "keys", "mask", "bad", "lo", "hi", "nonneg", "_sums", "_abs", "scratch", "_whole",
                 "_abs_whole", "_source", "scanned", "banded", "handover", "selected")

    def __init__(self, x, keys, mask, bad, lo=None, hi=None, nonneg=False) -> None:
        self._x = x
        self.keys = keys
        self.mask = mask
        self.bad = bad
        self.lo = lo
        self.hi = hi
        self.nonneg = nonneg
        self._sums: dict[Layout, torch.Tensor] = {}
        self._abs: Block | None = None
        self.scratch: Callable[[torch.Tensor], torch.Tensor] | None = None  # memory for |x|, reused
        self._whole: np.ndarray | None = None  # `[K, 1]`: each batch's sum over all its values, when known
        self._abs_whole: np.ndarray | None = None  # the same of |x|, for the block of |x|
        self._source: torch.Tensor | None = None  # the values this block is |x| of, until its own are made
        self.scanned: tuple | None = None  # `(brackets, results)` of a bracket scan made with the probe
        self.banded: tuple | None = None  # `(band, results)` of an α band's scan of |x| made with the probe
        # a pooled 1-D float32 buffer whose first values are this block's (a full staging buffer): a state that
        # would copy them all may keep the buffer instead, and then sets this to None (`ExactValues.adopt`)
        self.handover: np.ndarray | None = None
        self.selected: dict[int, np.float32] | None = None  # `{rank: value}` over the whole block, from the probe

    @classmethod
    def prepare(
        cls,
        x: torch.Tensor,
        keys: np.ndarray,
        absolute: bool = False,
        brackets: list | None = None,
        band=None,
        select: list[int] | None = None,
    ) -> Block:
        """Probe `x` for NaN/Inf and its min and max: finite min and max mean no NaN/Inf, and a min >= 0 means
        |x| = x. A CPU float32 block goes through the compiled scans' one pass (`scan_kernel.row_sums`), which
        also gives each batch's sum over all its values (of |x| with `absolute`), the sums of `lane_sums`;
        otherwise one `aminmax` (NaN propagates). A min or max of zero is +0 (either zero may come first).

        `brackets` (a bracketed quantile's groups, `Bracket.groups`), for a block of one batch: the same pass
        also scans them (`scan_kernel.scan_brackets_with_sums`); `scanned` then holds `(brackets, results)`
        for `Bracket.add`. Else `band` (an α band, `threshold_state._Band`): the same pass scans |x| into it
        (`scan_kernel.scan_band_with_sums`); `banded` then holds `(band, results)`, and so does the block of
        |x|. Else `select` (0-based ascending ranks among all the block's values, from a quantile state that
        keeps this whole block: `QuantileState.pending_select`): the same pass selects them
        (`scan_kernel.row_sums_select`); `selected` then holds `{rank: value}` when every value is finite. A
        memory-bound pass read once instead of twice."""
        if x.is_cpu and x.dtype == torch.float32 and x.numel() and x.is_contiguous():
            if x.shape[0] == 1 and (brackets is not None or band is not None):
                address, size = x.data_ptr(), x.numel()  # checked above: contiguous float32 on the CPU
                if brackets is not None:
                    got = scan_kernel.scan_brackets_with_sums(None, brackets, absolute, address, size)
                else:
                    got = scan_kernel.scan_band_with_sums(None, band.hi, band.lo, absolute, address, size)
                if got is not None and not got[1][3]:
                    results, (total, lo, hi, _) = got
                    block = cls._probed(x, keys, absolute, np.array([total]), lo, hi)
                    if brackets is not None:
                        block.scanned = (brackets, results)
                    else:
                        block.banded = (band, results)
                    return block
            shape = (x.shape[0], x.numel() // x.shape[0])
            if select is not None and brackets is None and band is None:
                got = scan_kernel.row_sums_select(absolute, x.data_ptr(), shape, select)
                if got is not None and not got[3]:
                    block = cls._probed(x, keys, absolute, got[0], got[1], got[2])
                    block.selected = got[4]
                    return block
            got = scan_kernel.row_sums(None, absolute, x.data_ptr(), shape)
            if got is not None and not got[3]:
                return cls._probed(x, keys, absolute, got[0], got[1], got[2])
        lo, hi = (t.item() + 0.0 for t in torch.aminmax(x))
        if math.isfinite(lo) and math.isfinite(hi):
            return cls(x, keys, None, 0, lo, hi, lo >= 0)
        mask = torch.isfinite(x)
        return cls(x, keys, mask, x.numel() - int(mask.sum()))

    @classmethod
    def _probed(cls, x, keys, absolute: bool, sums: np.ndarray, lo: float, hi: float) -> Block:
        """A block of finite values whose min, max and per-batch sums (of |x| with `absolute`) are known."""
        block = cls(x, keys, None, 0, lo + 0.0, hi + 0.0, lo >= 0)
        whole = sums.reshape(-1, 1)
        if absolute and not block.nonneg:
            block._abs_whole = whole
        else:  # the sums of x; of |x| too when x >= 0 (adding -0 or +0 to a sum from +0: the same bits)
            block._whole = whole
        return block

    @property
    def x(self) -> torch.Tensor:
        """The values (of a block of |x|: made on first use)."""
        if self._x is None:
            source = self._source
            out = self.scratch(source) if self.scratch is not None else None
            self._x = torch.abs(source, out=out) if out is not None else source.abs()
            self._source = None
        return self._x

    @property
    def shape(self) -> torch.Size:
        """`[K, *shape]`, without making the values of a block of |x|."""
        return (self._x if self._x is not None else self._source).shape

    @property
    def k(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return math.prod(self.shape)

    def per_batch(self) -> int:
        """Values per batch."""
        return math.prod(self.shape[1:])

    def bounds(self) -> tuple[float, float]:
        """Min and max of the whole block, as python floats (only when every value is finite)."""
        if self.lo is None:
            self.lo, self.hi = (t.item() + 0.0 for t in torch.aminmax(self.x))
        return self.lo, self.hi

    def sums(self, lay: Layout) -> torch.Tensor | np.ndarray:
        """`batch_sums(x, lay)`, computed once per layout (several statistics share it), or the sums over each
        whole batch that came with the probe (then a `[K, 1]` float64 numpy array: the same values)."""
        if self._whole is not None and lay.rows == 1 and lay.reduce:
            return self._whole
        got = self._sums.get(lay)
        if got is None:
            got = self._sums[lay] = batch_sums(self.x, lay)
        return got

    def absolute(self) -> Block:
        """The block of |x| (itself when every value is >= 0)."""
        if self.nonneg:
            return self
        if self._abs is None:
            self._abs = Block(None, self.keys, self.mask, self.bad, nonneg=True)
            # the values and the memory for |x|, not this block: a block and its |x| holding each other would
            # keep the batch's tensor alive until the cyclic garbage collector runs (measured: +1 MiB a batch)
            self._abs._source = self.x
            self._abs.scratch = self.scratch
            self._abs._whole = self._abs_whole
            self._abs.banded = self.banded
        return self._abs


def as_float(x: torch.Tensor, batched: bool) -> torch.Tensor:
    if x.requires_grad:
        x = x.detach()
    if x.dtype not in FLOATS:
        x = x.float()
    if batched and x.dim() == 0:
        x = x.reshape(1)
    return x


# ---------------------------------------------------------------------------------------------------------
# Per-batch partials, folded left in key order
# ---------------------------------------------------------------------------------------------------------


class Partials:
    """Per-batch partial results of a sum-like statistic: for each batch key a tuple of fields, each one
    value per result position, kept in preallocated float64 arrays (per-batch small tensors kept between
    the forward's large ones would fragment the heap). `eager` stores fold every `FOLD_EVERY` batches (one
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
        self._in_order = True  # the pending keys arrived increasing (one process: always)
        # the first partial of one position, as numbers (`add_one` before anything else; a one-batch calibration
        # folds it straight into `acc`): arrays are made only when a second one comes
        self._one: tuple[int, tuple[float, ...]] | None = None

    def _settle_one(self) -> None:
        """Move the partial held as numbers into the arrays."""
        one, self._one = self._one, None
        self._append_one(*one)

    def add(self, keys: np.ndarray, fields: tuple, rows: int) -> None:
        """Partials of `len(keys)` batches: each field a `[K, rows]` tensor or array, or one number for all."""
        if self._one is not None:
            self._settle_one()
        k, n = len(keys), self._n
        self._reserve(n + k, rows, len(fields))
        if self._in_order:  # still increasing with these keys?
            after = n == 0 or keys[0] > self._keys[n - 1]
            self._in_order = bool(after) and (k == 1 or bool(np.all(keys[1:] > keys[:-1])))
        self._keys[n : n + k] = keys
        for col, f in zip(self._cols, fields):
            if isinstance(f, torch.Tensor):
                col[n : n + k] = f.detach().cpu().numpy().reshape(k, rows)
            elif isinstance(f, np.ndarray):
                col[n : n + k] = f.reshape(k, rows)
            else:
                col[n : n + k] = f
        self._n = n + k
        if self.eager and self._n >= FOLD_EVERY:
            self.fold()

    def add_one(self, key: int, fields: tuple[float, ...]) -> None:
        """`add` of one batch with one result position, each field one number (a batch pass, `BatchPass`; a block
        of one batch: no arrays made)."""
        if self._n == 0 and self._one is None and self.acc is None:
            self._one = (key, fields)
            return
        if self._one is not None:
            self._settle_one()
        self._append_one(key, fields)

    def _append_one(self, key: int, fields: tuple[float, ...]) -> None:
        n = self._n
        if n >= len(self._keys) or not self._cols or self._cols[0].shape[1] != 1:
            self._reserve(n + 1, 1, len(fields))
        if self._in_order and n and not key > self._keys[n - 1]:
            self._in_order = False
        self._keys[n] = key
        for col, f in zip(self._cols, fields):
            col[n, 0] = f
        self._n = n + 1
        if self.eager and self._n >= FOLD_EVERY:
            self.fold()

    def _reserve(self, need: int, rows: int, fields: int) -> None:
        cap = len(self._keys)
        if need <= cap and self._cols and self._cols[0].shape[1] == rows:
            return
        grown = max(need, 2 * cap, FOLD_EVERY)
        keys = np.empty(grown, dtype=np.int64)
        keys[: self._n] = self._keys[: self._n]
        cols = [np.empty((grown, rows), dtype=np.float64) for _ in range(fields)]
        for new, old in zip(cols, self._cols):
            new[: self._n] = old[: self._n]
        self._keys, self._cols = keys, cols

    def pending(self) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The unfolded keys (sorted) and fields (`[P, rows]` float64 each, in key order), as copies."""
        if self._one is not None:
            self._settle_one()
        keys = self._keys[: self._n]
        if self._in_order:  # already in key order: copies, no sort
            return keys.copy(), tuple(c[: self._n].copy() for c in self._cols)
        order = np.argsort(keys, kind="stable")
        return keys[order], tuple(c[: self._n][order] for c in self._cols)

    def fold(self) -> tuple[np.ndarray, ...] | None:
        """Fold every pending partial into `acc` (in key order) and return `acc`."""
        if self._one is not None and self._n == 0 and self.acc is None:  # one partial, folded from nothing: itself
            (key, fields), self._one = self._one, None
            self.acc = tuple(np.array([f], dtype=np.float64) for f in fields)
            self.last = max(self.last, key)
            return self.acc
        if self._one is not None:
            self._settle_one()
        if self._n:
            keys, cols = self.pending()
            self.acc = self.fold_fn(self.acc, cols)
            self.last = max(self.last, int(keys[-1]))
            self._n = 0
            self._in_order = True
        return self.acc

    def set_pending(self, keys: np.ndarray, cols: tuple[np.ndarray, ...]) -> None:
        self._one = None
        self._keys = np.array(keys, dtype=np.int64)
        self._cols = [np.array(c, dtype=np.float64) for c in cols]
        self._n = len(keys)
        self._in_order = False

    def keys(self) -> np.ndarray:
        if self._one is not None:
            self._settle_one()
        return self._keys[: self._n]

    def merge(self, other: Partials) -> None:
        """Add `other`'s partials. Unfolded partials with keys disjoint from ours (other processes' batches)
        join ours and are later folded in key order; otherwise (two independent runs) `other`'s data is
        folded on its own and appended after ours."""
        if self.acc is None and other.acc is None and not np.intersect1d(self.keys(), other.keys()).size:
            if other._n:
                keys, cols = other.pending()
                rows = cols[0].shape[1]
                self._reserve(self._n + len(keys), rows, len(cols))
                self._in_order = False  # another process's keys: sorted when folded
                self._keys[self._n : self._n + len(keys)] = keys
                for col, c in zip(self._cols, cols):
                    col[self._n : self._n + len(keys)] = c
                self._n += len(keys)
            if self.eager and self._n >= FOLD_EVERY:
                self.fold()
            return
        mine = self.fold()
        keys, cols = other.pending()
        theirs = other.fold_fn(other.acc, cols) if len(keys) else other.acc
        if theirs is None:
            return
        self.acc = theirs if mine is None else self.fold_fn(mine, tuple(c[None] for c in theirs))
        self.last = max(self.last, other.last, int(keys[-1]) if len(keys) else -1)


def fold_sums(acc, cols):
    """Left fold of additive partials: `acc + p0 + p1 + ...` in order (`np.add.accumulate` is sequential)."""
    if acc is None and len(cols[0]) == 1:  # one partial: the fold is the partial itself
        return tuple(c[0].copy() for c in cols)
    out = []
    for i, c in enumerate(cols):
        stacked = c if acc is None else np.concatenate([acc[i][None], c])
        out.append(np.add.accumulate(stacked, axis=0)[-1].copy())
    return tuple(out)


def fold_moments(acc, cols):
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


