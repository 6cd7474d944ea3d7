"""`TensorStats`: every statistic of one tensor fed together (one min/max probe, one |x|, one staged copy).

In: the tensors a hook sees, batch by batch. Out: each state's `result()`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Generator, Iterable
from typing import Any

import numpy as np
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.buffers import give_back, take_buffer
from ternqc.runtime.calibrate.quantiles import QuantileBudget
from ternqc.runtime.calibrate.stats.batch_pass import BatchPass
from ternqc.runtime.calibrate.stats.registry import StatContext
from ternqc.runtime.calibrate.stats.states import StatState, make_states
from ternqc.runtime.calibrate.stats.sums import FLOATS, Block, as_float

#: A batch's key is `batch index * KEY_CALLS + call within the batch` (a module called twice per forward).
KEY_CALLS = 2**20
_STAGE_MAX_NUMEL = 16384  # tensors of at most this many values per batch are staged
STAGE_BYTES = 4 * 2**20  # default staging memory of one tensor
_STAGE_MAX_BATCHES = 64

# ---------------------------------------------------------------------------------------------------------
# A tensor's statistics, fed together
# ---------------------------------------------------------------------------------------------------------


def _empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of `n` values; float32 on the CPU comes from the buffer pool (warm memory)."""
    if dtype == torch.float32 and device.type == "cpu":
        return torch.from_numpy(take_buffer(n))
    return torch.empty(n, dtype=dtype, device=device)


class _Stage:
    """Small batches copied into one preallocated `[K, *shape]` tensor until it is full (`kmax` rows).

    A contiguous CPU tensor goes in by a memmove to `address + k * row_bytes` (each row is written once per
    calibration: a row view and torch's `copy_` cost ~1 µs more a batch); anything else by `copy_` into the
    row's view `buf[k]`, made on first use and kept (making all of them up front with `unbind` costs ~1 ms per
    tensor, a fixed cost of every calibration)."""

    def __init__(self) -> None:
        self.flat: torch.Tensor | None = None
        self.buf: torch.Tensor | None = None
        self.rows: list[torch.Tensor | None] = []
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.k = 0
        self.kmax = 0
        self.keys: list[int] = []
        self.address = 0  # of `buf` when it is CPU memory, else 0
        self.row_bytes = 0

    def put(self, x: torch.Tensor) -> None:
        """Copy `x` (this stage's shape and dtype) into row `k` (not counted here)."""
        k = self.k
        if self.address and type(x) is torch.Tensor and x.is_cpu and x.is_contiguous() and not x.is_neg():
            ctypes.memmove(self.address + k * self.row_bytes, x.data_ptr(), self.row_bytes)
            return
        row = self.rows[k]
        if row is None:
            row = self.rows[k] = self.buf[k]
        row.copy_(x)

    def handed_over(self) -> None:
        """A statistic kept the buffer (`Block.handover`): the next batch makes a new one (`_restage`), if one
        comes."""
        self.flat = self.buf = self.shape = None
        self.rows = []
        self.address = self.kmax = 0


class TensorStats:
    """Every statistic collected on one tensor, fed together (see the module docstring).

    `update(x, batch)` feeds all states (`batch`: the calibration batch index, for results that do not
    depend on how batches are split between processes; default: one more than the last call);
    `results()` maps each `StatSpec` to its result; `nonfinite` counts the NaN/Inf values left out; `shape`
    is the first shape seen; `updates` counts the calls. `eager=False` keeps per-batch partials until
    `sync` (a process of a distributed run). `freeze()` computes the results and drops the buffers.
    `stage_bytes` bounds the staging buffer of small batches. `bracket`: quantiles over everything keep only the
    values near their ranks (`bracket.py`); one that misses is left out of `results()` and listed by
    `missed()`, for the caller to collect again.
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
        bracket: bool = False,
        band: tuple[float, float] | None = None,
    ) -> None:
        self.batched = batched
        self._stage_bytes = stage_bytes
        self._size_hint = size_hint  # updates expected: no more rows are staged than that
        ctx = StatContext(batched, quantile_budget, threshold, size_hint, plan_hint, eager, bracket, band)
        self.states = make_states(specs, ctx)
        self._plain = [s for s in self.states.values() if not s.wants_abs]
        self._abs = [s for s in self.states.values() if s.wants_abs]
        # the states that may hand their bracket scan to the probe (`StatState.pending_scan`)
        self._scanners = [s for s in self._plain if type(s).pending_scan is not StatState.pending_scan]
        self._banders = [s for s in self._abs if type(s).pending_band is not StatState.pending_band]
        self._selectors = [s for s in self._plain if type(s).pending_select is not StatState.pending_select]
        self._nonfinite = 0
        self.updates = 0
        self.shape: tuple[int, ...] | None = None
        self._last_shape: tuple[int, ...] | None = None
        self._stage = _Stage() if batched else None
        self._batch: int | None = None
        self._call = 0
        self._frozen: dict[StatSpec, dict[str, Any]] | None = None
        self._scratch: torch.Tensor | None = None
        self._pass: BatchPass | None = None  # how the next large batch may be fed in one compiled pass
        self._pass_due = False  # a batch went through the general path: the next may make the pass

    def _scratch_for(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like `x` for |x|, reused across batches (fresh memory is slow to fault in)."""
        s = self._scratch
        if s is None or s.numel() < x.numel() or s.dtype != x.dtype or s.device != x.device:
            s = self._scratch = _empty(x.numel(), x.dtype, x.device)
        return s[: x.numel()].view(x.shape)

    def update(self, x: torch.Tensor, batch: int | None = None) -> None:
        st = self._stage
        if (  # the common case, first: the first call of a batch, staged (the same as the general path below)
            st is not None and batch is not None and batch != self._batch and x.shape == st.shape
            and x.dtype is st.dtype and not x.requires_grad
        ):
            self._batch, self._call = batch, 0
            self.updates += 1
            st.put(x)
            st.keys.append(batch * KEY_CALLS)
            st.k += 1
            if st.k == st.kmax:
                self.flush()
            return
        bp = self._pass
        if bp is None and self._pass_due:  # the next batch after one through the general path: make the pass now
            self._pass_due = False  # (not then: most tensors seen once, e.g. of a one-batch calibration, need none)
            if x.is_cpu and x.dtype is torch.float32:
                bp = self._pass = BatchPass.build(self.states.values(), self._last_shape, bool(self._abs))
        if bp is not None:
            if (  # a large batch of the shape the batch pass was made for, nothing staged before it
                x.shape == bp.shape and x.dtype is torch.float32 and not x.requires_grad and x.is_cpu
                and x.is_contiguous() and (st is None or st.k == 0)
            ):
                key, call = self._key(batch)
                if bp.feed(x.data_ptr(), x.numel(), key):
                    if batch is not None:
                        self._batch, self._call = batch, call
                    self.updates += 1
                    return
            bp.drain()  # the states as fed so far, before the general path takes this batch
            self._pass = None  # the general path takes this batch (the states may change) and decides again
        if x.requires_grad or x.dtype not in FLOATS or (self.batched and x.dim() == 0):
            x = as_float(x, self.batched)
        key, call = self._key(batch)
        if batch is not None:
            self._batch, self._call = batch, call
        self.updates += 1
        shape = x.shape
        st = self._stage
        if st is not None and shape == st.shape and x.dtype is st.dtype:  # the common case: stage it
            self.update_staged(x, key)
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
        if st is not None and x.numel() <= _STAGE_MAX_NUMEL and self._size_hint != 1:  # one batch: nothing to group
            self._restage(x)
            self.update_staged(x, key)
        else:
            self.flush()
            self._feed(x.unsqueeze(0), np.array([key], dtype=np.int64))
            self._pass_due = self.batched

    def _key(self, batch: int | None) -> tuple[int, int]:
        """The key of a call in `batch` (`batch * KEY_CALLS` + the call within the batch; without a batch, the
        number of updates so far) and that call's number within its batch; nothing is changed."""
        call = self._call + 1 if batch is not None and batch == self._batch else 0
        return (self.updates if batch is None else batch * KEY_CALLS + call), call

    def update_staged(self, x: torch.Tensor, key: int) -> None:
        st = self._stage
        st.put(x)
        st.keys.append(key)
        st.k += 1
        if st.k == st.kmax:
            self.flush()

    def _restage(self, x: torch.Tensor) -> None:
        """Make the staging buffer take batches of `x`'s shape, dtype and device (processing what it
        holds)."""
        self.flush()
        st = self._stage
        per = x.numel()
        kmax = max(2, min(_STAGE_MAX_BATCHES, self._size_hint or _STAGE_MAX_BATCHES,
                          self._stage_bytes // (per * x.element_size())))
        flat = st.flat
        if flat is None or flat.numel() < kmax * per or flat.dtype != x.dtype or flat.device != x.device:
            flat = st.flat = _empty(kmax * per, x.dtype, x.device)
        st.buf = flat[: kmax * per].view((kmax, *x.shape))
        st.rows = [None] * kmax
        st.kmax = kmax
        st.shape, st.dtype = x.shape, x.dtype
        st.address = st.buf.data_ptr() if st.buf.is_cpu and st.buf.is_contiguous() else 0
        st.row_bytes = per * x.element_size()

    def flush(self) -> None:
        """Process the staged batches, and the batch pass's waiting feeders (`BatchPass.drain`): every state is
        then up to date."""
        if self._pass is not None:
            self._pass.drain()
        st = self._stage
        if st is None or st.k == 0:
            return
        block, keys = st.buf[: st.k], np.array(st.keys, dtype=np.int64)
        st.k, st.keys = 0, []
        handover = st.flat.numpy() if st.flat.is_cpu and st.flat.dtype == torch.float32 else None
        if self._feed(block, keys, handover):
            st.handed_over()

    def _feed(self, x: torch.Tensor, keys: np.ndarray, handover: np.ndarray | None = None) -> bool:
        """Feed a block to every state; True when a state kept `handover` (the staging buffer holding `x`)."""
        brackets = band = select = None
        if x.shape[0] == 1:  # one batch: a bracketed quantile's scan or an α band's can ride on the probe's pass
            for state in self._scanners:
                brackets = state.pending_scan()
                if brackets is not None:
                    break
            if brackets is None:
                for state in self._banders:
                    band = state.pending_band()
                    if band is not None:
                        break
        if brackets is None and band is None:  # a quantile that keeps this whole block: its selection too
            for state in self._selectors:
                select = state.pending_select(x.shape[0], x.numel())
                if select is not None:
                    break
        block = Block.prepare(x, keys, absolute=bool(self._abs), brackets=brackets, band=band, select=select)
        block.scratch = self._scratch_for
        block.handover = handover
        self._nonfinite += block.bad
        for state in self._plain:
            state.observe(block)
        if self._abs:
            absolute = block.absolute()
            for state in self._abs:
                state.observe(absolute)
        return handover is not None and block.handover is None

    @property
    def nonfinite(self) -> int:
        self.flush()
        return self._nonfinite

    def results(self) -> dict[StatSpec, dict[str, Any]]:
        """Each statistic's result, pending ones (a derived statistic still waiting for its threshold,
        see `pending()`) left out."""
        if self._frozen is not None:
            return self._frozen
        self.flush()
        return {
            spec: state.result() for spec, state in self.states.items() if not (state.pending or state.missed)
        }

    def missed(self) -> list[StatSpec]:
        """The statistics that could not be answered exactly from what was kept (a bracketed quantile whose
        rank drifted out of its bracket): collect them again."""
        self.flush()
        return [spec for spec, state in self.states.items() if state.missed]

    def pending(self) -> dict[StatSpec, StatState]:
        """The states still waiting for a threshold (`ThresholdAbsMeanState` of a derived point): they keep
        their values through `freeze` and `sync` until the caller sets the threshold and merges them."""
        self.flush()
        return {spec: state for spec, state in self.states.items() if state.pending}

    def freeze(self) -> None:
        """Compute the results now and release the memory behind them (buffers go back to the pool)."""
        self._frozen = self.results()
        self._pass, self._pass_due = None, False
        for state in self.states.values():
            state.release()
        for t in (self._scratch, self._stage.flat if self._stage is not None else None):
            if t is not None and t.is_cpu and t.dtype == torch.float32:
                give_back(t.numpy())
        self._scratch = None
        if self._stage is not None:
            self._stage = _Stage()

    def notes(self) -> list[str]:
        self.flush()
        return [n for n in (s.note() for s in self.states.values()) if n]

    def sync(self) -> dict[Any, Generator]:
        """The protocol generators that merge this tensor's statistics with the other processes'
        (`distributed.sync_stats`)."""
        self.flush()
        self._pass, self._pass_due = None, False  # the states change under the merge
        gens: dict[Any, Generator] = {"meta": self._sync_meta()}
        gens.update((i, state.sync()) for i, state in enumerate(self.states.values()) if not state.pending)
        return gens

    def _sync_meta(self) -> Generator:
        everyone = yield (self._nonfinite, self.updates, self.shape)
        self._nonfinite = sum(m[0] for m in everyone)
        self.updates = sum(m[1] for m in everyone)
        self.shape = next((m[2] for m in everyone if m[2] is not None), None)
