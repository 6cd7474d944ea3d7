"""Sum-like statistic states: per-batch partials folded left in key order (`SumState`), and `abs_mean`.

In: blocks of batches (`sums.Block`). Out: MASE's fields (`result()`); the partials merge across processes
bit for bit (`Partials`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.stats.base import StatState
from ternqc.runtime.calibrate.stats.registry import StatContext, register_stat
from ternqc.runtime.calibrate.stats.sums import Partials, batch_counts, batch_sums, fold_sums


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


@register_stat("abs_mean")
class AbsMeanState(SumState):
    """`abs_mean`: mean of |x| (per batch the fixed-order float64 sum of `sums.batch_sums`, batches folded in
    key order)."""

    takes_abs = True
    _names = ("n", "sum")

    def pass_feeder(self, absolute: bool):
        lay = self.layout
        if not self._observes_as(AbsMeanState) or not absolute:  # a subclass observes otherwise
            return None
        if lay is None or lay.rows != 1 or not lay.reduce:
            return None
        partials = self._partials

        def feed(n: int, key: int, lo: float, hi: float, total: float) -> None:
            self.count += n
            partials.add_one(key, (n, total))

        return feed

    def _observe(self, block):
        lay, mask = self.layout, block.mask
        if mask is None and lay.rows == 1 and block.k == 1:  # one batch, one position: numbers, no arrays
            self._partials.add_one(int(block.keys[0]), (block.per_batch(), float(block.sums(lay).reshape(()))))
        elif mask is None:
            self._partials.add(block.keys, (block.per_batch() // lay.rows, block.sums(lay)), lay.rows)
        else:
            sums = batch_sums(torch.where(mask, block.x, 0.0), lay)
            self._partials.add(block.keys, (batch_counts(mask, lay), sums), lay.rows)

    def _result(self):
        n, total = self._acc()
        if total.shape == (1,):  # one position (the usual case): the same IEEE division, fewer numpy calls
            return {"abs_mean": float(total[0]) / float(n[0]) if n[0] > 0 else math.nan}
        # total / n where a value was seen, else NaN (no division there: no warning to silence)
        return {"abs_mean": np.divide(total, n, out=np.full(total.shape, np.nan), where=n > 0)}
