"""`QuantileState`: `range_quantile`, exact under the quantile budget (a whole buffer, or brackets around the
wanted ranks), a KLL sketch beyond it.

In: a `StatSpec` and a `StatContext`. Out: `min`/`max` at the (1-q) and q quantiles, `exact`.
"""

from __future__ import annotations

from collections.abc import Generator

import attrs
import numpy as np
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.bracket import HEAD_VALUES, WIDTH, Bracket, BracketMissed, bracket_protocol
from ternqc.runtime.calibrate.quantiles import (
    ExactValues,
    QuantileBudget,
    quantiles_from_ranks,
    row_quantiles,
    run_local,
    select_protocol,
    wanted_ranks,
)
from ternqc.runtime.calibrate.sketch import CompactorSketch, rank_error_bound, sketch_bytes, sketch_k_for
from ternqc.runtime.calibrate.stats.base import StatState
from ternqc.runtime.calibrate.stats.layout import pseudo_layout, result_form
from ternqc.runtime.calibrate.stats.registry import StatContext, register_stat
from ternqc.runtime.calibrate.stats.sums import (
    Block,
    batch_counts,
    rows_view,
    write_rows,
)

#: A bracketing state keeps every value (no brackets) when all it plans to see are at most this many (16 MiB)
#: and fit the budget: a copy and one selection at the end cost less than placing and narrowing brackets.
EXACT_UP_TO = 2**22


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
        # answered from the first block, which was every value planned (`_answer_at_once`)
        self._read_once = False
        # that block's values, in case more come after all (`_keep`), and the version they had then
        self._kept: torch.Tensor | None = None
        self._kept_version: int | None = None
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
        if self._kept is not None:
            self.budget.release(4 * self._kept.numel())
            self._kept = self._kept_version = None
        if self._bracket is not None:
            self._bracket.release()
            self._bracket = None
        self.budget.cancel(self._promised)  # no sketch will be needed any more
        self._promised = 0

    def _mode(self, per_update: int) -> str:
        """How the first batch (`per_update` values) starts this state: "head" (bracketing: keep the head, then
        brackets), "exact" (a buffer for every value planned), "sketch" (they cannot fit), or "open" (no plan:
        a buffer that grows while the budget allows)."""
        planned = per_update * (self.plan_hint or 0)
        if self.bracketing and (not planned or planned > EXACT_UP_TO or planned * 4 > self.budget.available):
            return "head"
        if not self.plan_hint:
            return "open"
        if planned * self.layout.rows * 4 > self.budget.available + self._promised:
            return "sketch"
        return "exact"

    def _start(self, per_update: int, reserve: bool = True) -> None:
        """The first batch: an exact buffer (sized from the hint) or, when the hint says the values cannot
        fit, a sketch. Not `reserve`: the room is not taken yet (the first block is all the values, in a buffer
        that `ExactValues.adopt` may keep)."""
        rows = self.layout.rows
        self._promise(rows)
        self._exact = ExactValues(rows, self.budget)
        mode = self._mode(per_update)
        if mode == "head":
            self._head = True  # keep the head, then brackets (`_begin_bracket`); never a sketch
            return
        if mode == "open":
            return
        if mode == "sketch":
            self._exact = None
            self._to_sketch()
            return
        planned = per_update * self.plan_hint
        local = per_update * (self.size_hint or self.plan_hint)
        self.budget.cancel(self._promised)
        self._promised = 0
        self.budget.force((planned - local) * rows * 4)  # the other processes' share of the values
        if reserve:
            self._exact.reserve(local)

    def pending_select(self, k: int, numel: int) -> list[int] | None:
        """The ranks of this state's quantiles among `numel` values, when the next block (`k` batches of them)
        is every value it will see and they are to be selected exactly in one row (a parameter read once; or
        every batch planned, in one process, kept whole): the block's probe can select them in the pass that
        reads the values for the sums (`Block.prepare(select=...)`), and this state need not read them again.
        None otherwise (values seen already, a sketch or brackets coming, per-channel rows)."""
        if (
            self._seen or self._exact is not None or self._sketch is not None or self._bracket is not None
            or self.layout is None or self.layout.rows != 1 or self._read_once
        ):
            return None
        if self.batched and (
            k != self.size_hint or self.plan_hint != self.size_hint or self._mode(numel // k) != "exact"
        ):
            return None
        if not self.batched and self.size_hint != 1:
            return None
        return wanted_ranks((1.0 - self.q, self.q), np.array([numel]))

    def _observe(self, block):
        if self._read_once:
            if not self.batched:
                msg = f"{self.spec.key()}: a statistic expecting one update (size_hint=1) got another"
                raise ValueError(msg)
            self._take_back()  # more values than the one batch planned (a module called twice)
        if self._missed:  # the kept values were changed in place: this statistic is collected again
            return
        self._final = None
        scanned = block.scanned
        if scanned is not None and self._bracket is not None and scanned[0] is self._bracket.groups:
            # the probe's pass scanned this state's brackets (finite values, on the CPU): only count
            m = block.per_batch() * block.k
            self._seen += m
            self._bracket.add(None, m, None, scanned[1])
            if self._bracket.narrow_due():
                self._bracket.narrow()
            return
        lay, x, mask = self.layout, block.x, block.mask
        if not x.is_cpu:
            x = x.cpu()
            mask = None if mask is None else mask.cpu()
        if mask is not None:
            self._add_left_out(batch_counts(~mask, lay).sum(0).numpy())
            x = torch.where(mask, x, float("nan"))
        m = x.numel() // lay.rows
        self._seen += m
        if self._bracket is not None:
            bounds = (block.lo, block.hi) if mask is None and block.lo is not None else None
            self._bracket.add(rows_view(x, lay)[0], m - block.bad, bounds)
            if self._bracket.narrow_due():
                self._bracket.narrow()
            return
        if self._sketch is None:
            if self._exact is None:
                if lay.rows == 1 and mask is None and self._answer_at_once(block, m, x):
                    return
                self._per_update = m // block.k
                # a staging buffer holding every value planned here: kept as it is, no room reserved to give back
                whole = block.handover is not None and mask is None and m == self._per_update * (self.size_hint or 0)
                self._start(self._per_update, reserve=not whole)
            if self._head:
                slot = self._exact.slot(m)
                if slot is not None:
                    write_rows(slot, x, lay)
                if slot is None or self._exact.n >= HEAD_VALUES:
                    self._begin_bracket(None if slot is not None else (rows_view(x, lay)[0], m - block.bad))
                return
            if self._sketch is None:
                final = self._probe_selected(block, m) if mask is None else None
                if block.handover is not None and mask is None and self._exact.adopt(block.handover, m):
                    block.handover = None  # the staging buffer holding the values is now this state's
                    self._final = final
                    return
                slot = self._exact.slot(m)
                if slot is not None:
                    write_rows(slot, x, lay)
                    self._final = final
                    return
                if self.bracketing:  # more values than planned (a module called more often): brackets
                    self._begin_bracket((rows_view(x, lay)[0], m - block.bad))
                    return
                self._to_sketch()
        self._sketch.add(rows_view(x, lay))

    def _answer_at_once(self, block, m: int, x: torch.Tensor) -> bool:
        """Answer from the first block (`m` finite values in one row) when it is every value this state plans to
        see, without copying them into a buffer: a parameter read once (its ranks selected by the block's
        probe, or by a partition here, which copies what it partitions); or the one batch planned of a
        bracketing state in one process (a one-batch calibration), whose ranks the probe selected, its values
        kept in case a module is called again (`_keep`, `_take_back`). False: the general way."""
        if not self.batched:
            if self.size_hint != 1:
                return False
            final = self._probe_selected(block, m)
            if final is None:
                lo, hi = row_quantiles(rows_view(x, self.layout)[0], (1.0 - self.q, self.q), np.array([m]))
                final = {"min": lo, "max": hi, "range": hi - lo}
        else:
            if not (self.bracketing and self.ctx.eager and block.k == 1 and self.size_hint == self.plan_hint == 1):
                return False
            final = self._probe_selected(block, m)
            if final is None:
                return False
            self._keep(x)
        self._final = final
        self._read_once = True
        return True

    def _keep(self, x: torch.Tensor) -> None:
        """Keep the one batch's values `x` (`[1, *shape]`, float32 on the CPU) in case more come after all (a module
        called again), in the room the exact buffer would have taken (`_start`): the batch's tensor itself with
        its version (the model changing it in place bumps the version), when nothing more hangs on its memory
        (not a view into a larger tensor); else a copy."""
        base = x._base
        kept, version = None, None
        if base is None or base.numel() == x.numel():
            try:
                kept, version = x, x._version
            except RuntimeError:  # an inference tensor has no version counter
                kept = None
        self._kept = kept if kept is not None else x.clone()
        self._kept_version = version
        self.budget.cancel(self._promised)
        self._promised = 0
        self.budget.force(4 * x.numel())

    def _take_back(self) -> None:
        """Another block after an answer from the one batch planned: that batch's kept values go the general way
        first (an exact buffer while the budget allows, else brackets), as they would have without the answer. When
        the model changed them in place since, they are gone: `missed`, and the caller collects this statistic
        again."""
        kept, version = self._kept, self._kept_version
        self._kept = self._kept_version = None
        self._read_once = False
        self.budget.release(4 * kept.numel())
        if version is not None and kept._version != version:
            self._final, self._missed = None, True
            return
        self._seen -= kept.numel()
        self._observe(Block(kept, None, None, 0))

    def _probe_selected(self, block, m: int) -> dict[str, np.ndarray] | None:
        """The result from the values the block's probe selected (`pending_select`), when the block (`m` finite
        values) is every value this state has seen; else None."""
        found = block.selected
        if found is None or self._seen != m:
            return None
        qs, finite = (1.0 - self.q, self.q), np.array([m])
        if not all(r in found for r in wanted_ranks(qs, finite)):
            return None
        lo, hi = quantiles_from_ranks(qs, finite, found)
        return {"min": lo, "max": hi, "range": hi - lo}

    def pending_scan(self) -> list | None:
        """The bracket groups of the next block, when this state is counting into brackets over the values
        themselves (not |x|): the block's probe can scan them in its pass."""
        b = self._bracket
        if b is None or b.overflowed or self.wants_abs or self._missed:
            return None
        return b.groups

    def pass_scan(self) -> Bracket | None:
        """The bracket this state counts a batch into, when a batch pass may scan it: counting over the values
        themselves (not |x|), in one row, not missed."""
        b = self._bracket
        if b is None or b.overflowed or self.wants_abs or self._missed or self.layout is None or self.layout.rows != 1:
            return None
        return b

    def pass_feeder(self, absolute: bool):
        if not self._observes_as(QuantileState) or self.pass_scan() is None:
            return None

        def feed(n: int, key: int, lo: float, hi: float, total: float) -> None:
            # the pass counted the batch into the bracket (`Bracket.add_pass`); the rest of `_observe`'s bracket way
            self.count += n
            self._final = None
            self._seen += n

        return feed

    def _begin_bracket(self, extra: tuple[np.ndarray, int] | None) -> None:
        """Place brackets from the head (or from `extra`, a block the head had no room for), count the head
        into them and give the head back; then count `extra` too."""
        head = self._exact.values()[0]
        source = head if head.size or extra is None else extra[0]
        self._bracket = Bracket.start(source, (1.0 - self.q, self.q), self.budget)
        finite = head.size - (int(np.count_nonzero(np.isnan(head))) if self._left_out is not None else 0)
        if head.size:
            self._bracket.add(head, finite)
            # the head's exact counts replace the sample's rank error: keep WIDTH around its ranks' positions
            self._bracket.narrow(WIDTH, last=False)
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

