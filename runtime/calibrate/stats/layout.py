"""Which dims a statistic reduces, and the shape of its result (see the package docstring for `dims`).

In: a tensor shape, `dims` and whether dim 0 is a batch. Out: a `Layout`.
"""

from __future__ import annotations

import functools
import math

from attrs import field, frozen

from ternqc.plan import channel_axis
from ternqc.runtime.errors import UserError

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


@functools.lru_cache(maxsize=1024)  # a frozen value: every calibration asks for the same few
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


def result_form(layout: Layout) -> tuple[bool, tuple[int, ...]]:
    return layout.scalar, layout.result_shape


def pseudo_layout(shape: tuple[int, ...], scalar: bool) -> Layout:
    """A layout known only by its result (a state rebuilt from tensors): enough to merge and report."""
    return Layout((), (), (), scalar, () if scalar else tuple(shape))


