"""`StatState`: the base of every statistic state (update, merge, result, to_tensors, the distributed sync).

In: a `StatSpec` and a `StatContext`. Out: a state that subclasses fill in (`states.py`, `quantile_state.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.stats.layout import Layout, make_layout, pseudo_layout, result_form
from ternqc.runtime.calibrate.stats.registry import StatContext
from ternqc.runtime.calibrate.stats.sums import (
    Block,
    as_float,
)
from ternqc.runtime.errors import UserError

if TYPE_CHECKING:
    from ternqc.runtime.calibrate.stats.batch_pass import PassScan

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

    def pending_scan(self) -> list | None:
        """The bracket groups this state will scan the next block's values against, when the block's probe
        may scan them in the same pass (`Block.prepare`); None for most statistics."""
        return None

    def pending_select(self, k: int, numel: int) -> list[int] | None:
        """The 0-based ranks (among all its values) to select in the next block's probe pass, when this state
        keeps that block (`k` batches, `numel` values) whole and it is every value it will see; None for most
        statistics."""
        return None

    def pending_band(self) -> Any | None:
        """The α band (`threshold_state._Band`) the next block's |x| goes into, when the block's probe may scan
        it in its pass; None for most statistics."""
        return None

    def pass_feeder(self, absolute: bool) -> Callable[[int, int, float, float, float], None] | None:
        """A function `feed(n, key, lo, hi, total)` adding one batch of `n` finite values with `key` (their min
        and max; their fixed-order sum, `sums.lane_sums`'s, of their magnitudes with `absolute`) to this state
        from a batch pass's results alone, exactly as `observe` of that batch's block would (`BatchPass`:
        no block made), valid while nothing but such batches of this shape come; None when this state needs
        the values themselves (most statistics). A feeder mirrors its class's `_observe`: a subclass that
        observes otherwise gets none unless it says how."""
        return None

    def _observes_as(self, cls: type) -> bool:
        """Whether this state observes as `cls` does (its `_observe` is `cls`'s): a feeder that mirrors `cls`'s
        `_observe` holds only then."""
        return type(self)._observe is cls._observe

    def pass_scan(self) -> PassScan | None:
        """What a batch pass scans for this state besides the sums (`PassScan.add_pass`: a quantile's bracket, a
        pending α's band or its buffer of every value), when its feeder expects that; None for most statistics."""
        return None

    def observe(self, block: Block) -> None:
        """Add a prepared block of batches (|x| taken when `wants_abs`)."""
        numel = block.numel()  # not block.x: a block of |x| makes its values only when a statistic reads them
        if numel == 0:
            return
        shape = tuple(block.shape[1:])
        if shape != self._shape:
            self.adopt(shape)
        self.count += numel - block.bad
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
        if self.layout.scalar:  # a python float, a numpy scalar, or one value in an array or tensor
            return float(t if getattr(t, "ndim", 0) == 0 else t.reshape(())) + 0.0  # -0.0 -> +0.0
        a = np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t) + 0.0
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


