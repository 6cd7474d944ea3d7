"""`threshold_abs_mean`: the activation scale α = mean of |x| over |x| > Δ, with Δ given, coming, or predicted.

In: blocks of |x| (`sums.Block`), Δ at construction (`ctx.threshold`, a second pass) or later
(`set_threshold`, the first pass's pending state), and optionally a band `(L, H)` around a prediction of Δ
(`ctx.band`, from a calibration of the first batch: `band_around`). Out: MASE's `abs_mean` field and `count` (how many |x| > Δ).

A pending state keeps every |x| while they fit the quantile budget and sums them once Δ comes. With a
predicted Δ, unless its values are few (`KEEP_SHARE` of the budget left, `KEEP_BYTES`), it keeps only the values in a
band `[L, H]` around the prediction and, per batch, the count, sum and max of those above H: given a Δ inside
the band, each batch's sum is the sum above H plus the kept values above Δ (~2-8% of the values on real
activations). Otherwise it overflows and the caller takes a second pass (`calibrate/derived.py`).

Every path gives the same bits, because each batch's sum is *exact* where it can be: the values above Δ are
float32 multiples of the float32 spacing u at Δ, so while `values × max < 2^53 u` every float64 partial sum of
them is exact, whatever the order or split. A batch beyond that bound is summed in the fixed order
(`sums.batch_sums`) instead, which only the batch's own values in their order can give: a band cannot answer
for it (`can_finish` is False) and the caller takes a second pass. Batches are folded in key order.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate import bracket, scan_kernel
from ternqc.runtime.calibrate.quantiles import (
    ExactValues,
    QuantileBudget,
    select_pool,
    select_threads,
    thread_pieces,
)
from ternqc.runtime.calibrate.stats.base import StatState
from ternqc.runtime.calibrate.stats.registry import StatContext, register_stat
from ternqc.runtime.calibrate.stats.sum_states import AbsMeanState
from ternqc.runtime.calibrate.stats.sums import Block, batch_counts, batch_sums

#: Half-width of the band around a Δ predicted from `n` samples, relative to it: `BAND / sqrt(n)`, within
#: `BAND_LIMITS`. Δ from all the batches against Δ from the first one: within 0.3% from 256 samples (the MLP)
#: and 32 sequences (the transformer), up to 6% on tiny GPT-2's attention output from 4 sequences.
BAND = 0.4
BAND_LIMITS = (0.03, 0.25)


def band_around(delta: float, samples: int) -> tuple[float, float]:
    """The band `(L, H)` around `delta`, predicted from a batch of `samples` samples."""
    width = min(max(BAND / math.sqrt(max(samples, 1)), BAND_LIMITS[0]), BAND_LIMITS[1])
    return delta * (1.0 - width), delta * (1.0 + width)


def exact_bound(delta: float) -> float:
    """2^53 times the float32 spacing of the values above `delta`: a float64 sum of such values, fewer than
    this over their largest, is exact in any order."""
    if not delta > 0:
        return math.ldexp(1.0, 53 - 149)  # the smallest positive float32 is 2^-149
    _, e = math.frexp(delta)  # delta = m 2^e, 0.5 <= m < 1: its float32 spacing is 2^(e-24)
    return math.ldexp(1.0, 53 + e - 24)


#: A tensor with a predicted Δ keeps every value (any Δ then finishes it, a prediction cannot miss) only when they
#: take at most this share of the budget left and at most `KEEP_BYTES`; else a band, the same bits in a few % of
#: the memory, which leaves room for the tensors after it.
KEEP_SHARE = 0.25
#: Fresh memory is what keeping every value costs (page faults; up to ~3 ms a MiB here): the MLP's `apply` with a
#: 1024 MiB budget, every value kept (8 × 64 MiB), took 2.7 s in a fresh process against 1.3 s banded, and in
#: a warm one the band was 19 ms faster still (its batches go through the batch pass as well).
KEEP_BYTES = 16 * 2**20
#: Values scanned at once (with the masks and the product they stay in the L2 cache).
CHUNK = 2**16
#: From this many values a row is scanned by several threads.
PARALLEL = 2**21


def scan_row(row: np.ndarray, cut: np.float32, lo: np.float32 | None = None) -> tuple[int, float, float, np.ndarray]:
    """Over `row` (1-D float32, finite, >= 0), chunk by chunk: how many values are > `cut`, their float64 sum
    (exact while `row.size × max < exact_bound(cut)`), their max (0 with none), and with `lo` the values in
    (lo, cut]. From `PARALLEL` values the row is split over threads (numpy releases the GIL); the pieces'
    sums add exactly whenever the whole sum is exact. The compiled scan (`scan_kernel`), when there is one,
    gives the same results in one pass."""
    got = scan_kernel.scan_row(row, cut, lo)
    if got is not None:
        return got
    if row.size < PARALLEL or select_threads() < 2:
        return _scan_piece(row, cut, lo)
    got = list(select_pool().map(lambda p: _scan_piece(p, cut, lo), thread_pieces(row, CHUNK)))
    return (
        sum(g[0] for g in got),
        math.fsum(g[1] for g in got),
        max(g[2] for g in got),
        np.concatenate([g[3] for g in got]),
    )


def _scan_piece(row: np.ndarray, cut: np.float32, lo: np.float32 | None) -> tuple[int, float, float, np.ndarray]:
    n = row.size
    size = min(CHUNK, n)
    above, product = np.empty(size, dtype=bool), np.empty(size, dtype=np.float32)
    inside = np.empty(size, dtype=bool) if lo is not None else None
    count, total, top, pieces = 0, 0.0, 0.0, []
    for start in range(0, n, CHUNK):
        chunk = row[start : start + CHUNK]
        m = chunk.size
        a, w = above[:m], product[:m]
        np.greater(chunk, cut, out=a)
        count += int(np.count_nonzero(a))
        np.multiply(chunk, a, out=w)  # x where x > cut, else +0.0
        total += float(np.add.reduce(w, dtype=np.float64))
        top = max(top, float(w.max()))
        if inside is not None:
            b = inside[:m]
            np.greater(chunk, lo, out=b)
            np.logical_xor(b, a, out=b)  # > lo and not > cut (> cut implies > lo)
            pieces.append(np.compress(b, chunk))
    between = np.concatenate(pieces) if len(pieces) > 1 else (pieces[0] if pieces else np.empty(0, np.float32))
    return count, total, top, between


@register_stat("threshold_abs_mean")
class ThresholdAbsMeanState(AbsMeanState):
    """`threshold_abs_mean`: mean of |x| over the elements with |x| > threshold; count = how many (see the
    module doc for the three ways to it). `overflowed`: nothing kept that can answer; `can_finish(Δ)` says
    whether `set_threshold(Δ)` can."""

    def __init__(self, spec: StatSpec, ctx: StatContext | None = None) -> None:
        super().__init__(spec, ctx)
        self.threshold = None if self.ctx.threshold is None else torch.as_tensor(self.ctx.threshold, dtype=torch.float32)
        self.overflowed = False
        self._kept: ExactValues | None = None
        self._blocks: list[tuple[np.ndarray, tuple[int, ...], bool]] = []  # (keys, shape, all finite), in order
        self._band: _Band | None = None

    @property
    def pending(self) -> bool:
        """No threshold yet: the values are kept (or overflowed) until `set_threshold`."""
        return self.threshold is None

    @property
    def banded(self) -> bool:
        return self._band is not None

    def _blank(self) -> StatState:
        ctx = attrs.evolve(self.ctx, threshold=self.threshold, size_hint=None, plan_hint=None, eager=False, band=None)
        return type(self)(self.spec, ctx)

    def _budget(self) -> QuantileBudget:
        """The run's shared budget (a private default one, made once, without)."""
        if self.ctx.budget is None:
            self.ctx = attrs.evolve(self.ctx, budget=QuantileBudget())
        return self.ctx.budget

    # --- Δ known: per-batch sums ---

    def _observe(self, block):
        if self.threshold is None:
            self._keep(block)
            return
        lay, x = self.layout, block.x
        if self.threshold.device != x.device:
            self.threshold = self.threshold.to(x.device)
        if lay.rows == 1 and block.mask is None and x.is_cpu and x.dtype == torch.float32 and self._one_threshold():
            # every value finite and >= 0 (|x|), one threshold t >= 0: per batch the count and the sum of the
            # values > t, exact when the bound allows (the bits a band gives), else in the fixed order
            delta = np.float32(float(self.threshold))
            bound = exact_bound(float(delta))
            rows = x.reshape(block.k, -1).numpy()
            counts, sums = np.empty(block.k, dtype=np.int64), np.empty(block.k, dtype=np.float64)
            for i, row in enumerate(rows):
                counts[i], sums[i], top, _ = scan_row(row, delta)
                if not row.size * top < bound:
                    kept = torch.nn.functional.threshold(x[i : i + 1], float(delta), 0.0)
                    sums[i] = float(batch_sums(kept, lay))
            self._partials.add(block.keys, (counts.reshape(-1, 1), sums.reshape(-1, 1)), 1)
            return
        above = x > self.threshold  # NaN compares False; +-Inf is removed by the mask
        if block.mask is not None:
            above &= block.mask
        sums = batch_sums(torch.where(above, x, 0.0), lay)
        self._partials.add(block.keys, (batch_counts(above, lay), sums), lay.rows)

    def _one_threshold(self) -> bool:
        """A single threshold >= 0 (a per-channel one, or a negative one, takes the general path)."""
        return self.threshold.numel() == 1 and float(self.threshold) >= 0

    # --- Δ coming: keep every value, or a band ---

    def _keep(self, block: Block) -> None:
        """Keep the block's |x| (float32, CPU) for `set_threshold`: the band when Δ was predicted, else every
        value while the budget allows (an overflow when it refuses)."""
        if self.overflowed:
            return
        band = self.ctx.band
        if self._band is None and self._kept is None and band is not None and 0 < band[0] < band[1]:
            planned = (block.x.numel() // block.k) * (self.ctx.plan_hint or 0)
            if self.layout.rows == 1 and not (0 < planned * 4 <= min(self._budget().available * KEEP_SHARE, KEEP_BYTES)):
                # a band: the same bits in a tenth of the memory, which leaves the budget to the other tensors
                self._band = _Band(band, self._budget())
        if self._band is not None:
            self._band_add(block)
            return
        x = block.x
        m = x.numel()
        if self._kept is None:
            self._kept = ExactValues(1, self._budget())
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

    def _kept_blocks(self) -> list[tuple[torch.Tensor, np.ndarray, bool]]:
        """The kept values as `(x, keys, all finite)` per block, views of the buffer."""
        if self._kept is None:
            return []
        flat = torch.from_numpy(self._kept.values()[0])
        out, start = [], 0
        for keys, shape, finite in self._blocks:
            n = math.prod(shape)
            out.append((flat[start : start + n].view(shape), keys, finite))
            start += n
        return out

    def pass_feeder(self, absolute: bool):
        if not self._observes_as(ThresholdAbsMeanState) or not absolute or self.threshold is not None:
            return None
        if not self.overflowed and self.pass_scan() is None:
            return None

        def feed(n: int, key: int, lo: float, hi: float, total: float) -> None:
            # the pass kept the batch (`_Band.add_pass`, `_KeepPass.add_pass`; overflowed: nothing to keep, as
            # `_keep`); the rest of `observe`'s way
            self.count += n

        return feed

    def pass_scan(self) -> _Band | _KeepPass | None:
        """While pending in one row, what a batch pass keeps a batch's |x| in: the band, or the buffer of every
        value; None otherwise (Δ known, overflowed, nothing decided yet)."""
        if self.threshold is not None or self.overflowed or self.layout is None or self.layout.rows != 1:
            return None
        if self._band is not None:
            return self._band
        if self._kept is not None:
            return _KeepPass(self)
        return None

    def pending_band(self) -> _Band | None:
        """The band the next block's magnitudes go into, when the block's probe may scan it in its pass."""
        if self.threshold is None and not self.overflowed and self._band is not None:
            return self._band
        return None

    def _band_add(self, block: Block) -> None:
        banded = block.banded
        if banded is not None and banded[0] is self._band:  # scanned by the probe's pass (finite, CPU, 1 batch)
            if not self._band.add_scanned(int(np.asarray(block.keys).reshape(-1)[0]), block.per_batch(), banded[1]):
                self._overflow()
            return
        if block.mask is not None or not block.x.is_cpu:
            self._overflow()  # NaN/Inf (or a device tensor): a second pass sums this tensor
            return
        x = block.x if block.x.dtype == torch.float32 else block.x.float()
        if not self._band.add(x, block.keys):
            self._overflow()

    def can_finish(self, threshold: Any) -> bool:
        """Whether `set_threshold(threshold)` can give the result: every value kept, or a band that holds Δ
        with every batch within the exactness bound."""
        if self.overflowed:
            return False
        if self._band is None:
            return True
        t = torch.as_tensor(threshold, dtype=torch.float32)
        return t.numel() == 1 and self._band.can_finish(np.float32(float(t)))

    def set_threshold(self, threshold: Any) -> None:
        """Give the pending state its threshold: the kept values are summed batch by batch (as a second pass
        would sum the same batches) and released. Only when `can_finish(threshold)`."""
        if not self.can_finish(threshold):
            msg = "threshold_abs_mean cannot be finished from what it kept: gather it in a second pass"
            raise ValueError(msg)
        self.threshold = torch.as_tensor(threshold, dtype=torch.float32)
        if self._band is not None:
            keys, counts, sums = self._band.finish(np.float32(float(self.threshold)))
            if self.layout is not None and len(keys):
                self._partials.add(keys, (counts.reshape(-1, 1), sums.reshape(-1, 1)), 1)
            self._band.release()
            self._band = None
            return
        for x, keys, finite in self._kept_blocks():
            # a block seen all finite is not probed again (the probe would find the same)
            self._observe(Block(x, keys, None, 0) if finite else Block.prepare(x, keys))
        self._release_kept()

    def _overflow(self) -> None:
        self.overflowed = True
        self._release_kept()
        if self._band is not None:
            self._band.release()
            self._band = None

    def _release_kept(self) -> None:
        if self._kept is not None:
            self._kept.release()
        self._kept = None
        self._blocks = []

    def release(self) -> None:
        if not self.pending:
            self.discard()

    def discard(self) -> None:
        """Give the kept values back (their threshold will not come)."""
        self._release_kept()
        if self._band is not None:
            self._band.release()
            self._band = None

    def _count(self) -> int:
        got = self._acc()
        return 0 if got is None else round(float(got[0].sum()))


class _Band:
    """Per batch (one row of |x| each): its key, its number of values, the count, float64 sum (exact when the
    bound at H allows) and max of the values above H; and every value in (L, H], in the budget."""

    def __init__(self, band: tuple[float, float], budget: QuantileBudget) -> None:
        self.lo, self.hi = np.float32(band[0]), np.float32(band[1])
        self.inside = ExactValues(1, budget)
        self.keys: list[int] = []
        self.sizes: list[int] = []
        self.counts: list[int] = []
        self.sums: list[float] = []
        self.tops: list[float] = []
        self.lengths: list[int] = []  # values kept per batch, in order
        self._finished: tuple[np.float32, list] | None = None  # per-batch results for one Δ

    def add(self, x: torch.Tensor, keys) -> bool:
        """Count and keep the block `x` (`[K, ...]` float32 on the CPU, finite, >= 0; one batch per row);
        False when the values in the band outgrow the budget."""
        for row, key in zip(x.reshape(x.shape[0], -1).numpy(), np.asarray(keys).reshape(-1)):
            if not self.add_scanned(int(key), row.size, scan_row(row, self.hi, self.lo)):
                return False
        return True

    def add_scanned(self, key: int, size: int, scanned: tuple[int, float, float, np.ndarray]) -> bool:
        """One batch of `size` values already scanned (`scan_row(|x|, H, L)`, e.g. by the block's probe): keep
        its values in the band; False when they outgrow the budget."""
        count, total, top, between = scanned
        slot = self.inside.slot(between.size)
        if slot is None:
            return False
        slot[0] = between
        self.keys.append(key)
        self.sizes.append(size)
        self.counts.append(count)
        self.sums.append(total)
        self.tops.append(top)
        self.lengths.append(between.size)
        return True

    def add_pass(self, address: int, n: int, sums: int, key: int) -> tuple[float, float, float] | None:
        """`add_scanned` of the batch of `n` float32 values at `address` (a contiguous CPU float32 tensor's
        `data_ptr()`), scanned by the compiled band scan straight into the buffer (no copy; a room that fills is
        grown and the scan goes on), the same pass making the fixed-order sum (`sums` 4 or 8), min and max of
        the values: `(sum, min, max)`. None, with nothing kept, when a value is NaN or +-Inf, the budget
        refuses room, or there are no sums: the general path then decides (`_band_add`)."""
        inside = self.inside
        mark, done, fresh = inside.n, 0, True
        count, above, top = 0, 0.0, 0.0
        cut, lo = float(self.hi), float(self.lo)
        while True:
            room = inside.tail(bracket.PASS_ROOM) if sums else None
            if room is None:
                inside.n = mark
                return None
            got = scan_kernel.scan_band_into(address + 4 * done, n - done, cut, lo, sums, fresh, room[0], room[1])
            inside.n += got[2]
            done += got[0]
            fresh = False
            count, above, top = count + got[1], above + got[3], max(top, got[4])  # as `scan_row` adds its calls
            if done >= n:
                break
        if not math.isfinite(got[5]):  # a NaN or +-Inf: the general path leaves the band to a second pass
            inside.n = mark
            return None
        self.keys.append(key)
        self.sizes.append(n)
        self.counts.append(count)
        self.sums.append(above)
        self.tops.append(top)
        self.lengths.append(inside.n - mark)
        return got[5], got[6], got[7]

    def settle(self) -> None:
        """Nothing to do after a batch pass's batch."""

    def _per_batch(self, delta: np.float32) -> list[tuple[int, int, float, bool]]:
        """Per batch: (key, count above Δ, sum above Δ, exact), computed once per Δ. The max above Δ is the max
        above H when there is one, else the largest kept value above Δ: the exact max, as `scan_row` finds it."""
        if self._finished is not None and self._finished[0] == delta:
            return self._finished[1]
        values = self.inside.values()[0]
        bound = exact_bound(float(delta))
        out, start = [], 0
        for key, size, count, total, top, n in zip(self.keys, self.sizes, self.counts, self.sums, self.tops, self.lengths):
            chosen = values[start : start + n]
            chosen = chosen[chosen > delta]
            start += n
            high = top if count else (float(chosen.max()) if chosen.size else 0.0)
            exact = size * high < bound
            out.append((key, count + chosen.size, total + float(np.add.reduce(chosen, dtype=np.float64)), exact))
        self._finished = (delta, out)
        return out

    def can_finish(self, delta: np.float32) -> bool:
        """Δ inside the band, and every batch's sum above it exact."""
        return bool(self.lo <= delta <= self.hi) and all(exact for *_, exact in self._per_batch(delta))

    def finish(self, delta: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys, counts and exact sums of the values > Δ, per batch (only after `can_finish(Δ)`)."""
        got = self._per_batch(delta)
        return (
            np.array([g[0] for g in got], dtype=np.int64),
            np.array([g[1] for g in got], dtype=np.int64),
            np.array([g[2] for g in got], dtype=np.float64),
        )

    def release(self) -> None:
        self.inside.release()


class _KeepPass:
    """A batch pass's scan for a pending state that keeps every |x| (`_keep`): the band scan with every magnitude
    in its band (nothing above +Inf, everything above -1) writes them in order straight into the state's buffer,
    the same values `_keep` copies there, and the batch is recorded as `_keep` records it."""

    __slots__ = ("state",)

    def __init__(self, state: ThresholdAbsMeanState) -> None:
        self.state = state  # its `_kept` buffer and `_blocks` record, read at each batch

    def add_pass(self, address: int, n: int, sums: int, key: int) -> tuple[float, float, float] | None:
        """`_keep` of the batch (`n` float32 values at `address`): `(sum, min, max)` as `_Band.add_pass`; None, with
        nothing kept, when a value is NaN or +-Inf (the general path keeps it with its mask), the budget refuses
        room (the general path overflows), or there are no sums."""
        state = self.state
        kept = state._kept
        room = kept.tail(n) if sums else None  # as `slot(n)` grows
        if room is None:
            return None
        got = scan_kernel.scan_band_into(address, n, math.inf, -1.0, sums, True, room[0], room[1])
        if got[0] != n or got[2] != n or not math.isfinite(got[5]):
            return None
        kept.n += n
        state._blocks.append((np.array([key], dtype=np.int64), (1, *state._shape), True))
        return got[5], got[6], got[7]

    def settle(self) -> None:
        """Nothing to do after a batch pass's batch."""
