"""The quantiser-kind registry: one object per kind, looked up by name.

In: a kind's name (`ternary`, `binary`, `integer`: `plan.QUANTISERS`). Out: its `QuantKind`, which says
which widths and parameters the kind takes, how a tensor's mapped parameters become its `TensorQuant`, how
a tensor is quantised (codes and scale), and how it is described in reports. Conversion, the simulated
modules, the integer engine and the packed export all read this table; `plan.QUANTISER_WIDTHS` and
`plan.QUANTISER_PARAMS` (the compiler's side) are pinned equal to it by a test.

A quantised tensor is `q(x) = s · c(x)` where the codes `c(x)` are integers in `[qmin, qmax]` and the scale
`s` (α for ternary and binary, the step for integer) is a tensor that broadcasts against x:

- per tensor: a 0-dim scale; per output channel: `[out, 1, ...]`; per group of `G` consecutive elements of
  each output row (weights): `[out, n_groups]`, expanded along the flattened row (`expand_groups`);
- dynamic (activations): one scale per row, computed from the row at run time (`dynamic_scale`); the row is
  the last dimension for Linear inputs, the whole sample for the others (`row_dims`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from ternqc.runtime.quantize.quantizers import TensorQuant

#: name -> kind, filled by `@register_kind` beside each kind's class.
KINDS: dict[str, QuantKind] = {}


class QuantKind:
    """A quantiser kind. Subclasses set the class attributes and implement the methods; one instance each
    is registered with `@register_kind`."""

    name: ClassVar[str]
    widths: ClassVar[tuple[int, ...]]
    #: Per-tensor parameter suffixes the kind reads (besides `width` and `quantiser`).
    params: ClassVar[tuple[str, ...]]
    #: Whether a value exactly 0 has a code of its own (ternary, integer) or not (binary).
    has_zero: ClassVar[bool]

    def levels(self, width: int) -> tuple[int, int]:
        """The smallest and largest code."""
        raise NotImplementedError

    def pack_layout(self, width: int) -> tuple[int, int, int]:
        """How codes are stored packed: `(low, step, bits)`: a code c is stored as the unsigned
        `(c - low) // step` in `bits` bits (ternary 2, binary 1, integer its width)."""
        low, _ = self.levels(width)
        return low, 1, width

    def config(self, t: str, width: int, values: dict[str, Any]) -> TensorQuant:
        """Tensor `t`'s `TensorQuant` from its module's parameters `{param: value}` (set ones only), as
        mapping checked them: the kind trusts them (`problem` is what mapping asked first)."""
        raise NotImplementedError

    def problem(self, t: str, values: dict[str, Any]) -> tuple[str, tuple[str, ...]] | None:
        """What keeps tensor `t`'s parameters `values` (set ones only) from making a config of this kind:
        `(what is wrong, the parameters behind it)`, or None when they make one. Mapping asks once
        (`quantize/combinations.py`) and names the rules that set those parameters."""
        return None

    def codes(self, x: torch.Tensor, tq: TensorQuant, delta: Any, scale: Any) -> torch.Tensor:
        """The integer codes `c(x)` as a float tensor of x's dtype, for a static quantiser: `delta` is the
        ternary threshold (or None), `scale` the scale already shaped to broadcast against x (or None
        where the kind does not need it)."""
        raise NotImplementedError

    def derive_scale(self, w: torch.Tensor, tq: TensorQuant, delta: Any) -> torch.Tensor:
        """The scale a weight or bias gets from its own values (no `t_scale`), shaped as stored: 0-dim per
        tensor, Δ's or `[out, 1, ...]` per channel, `[out, n_groups]` per group."""
        raise NotImplementedError

    def dynamic_scale(self, x: torch.Tensor, tq: TensorQuant, dims: tuple[int, ...]) -> torch.Tensor:
        """Per-row scales of an activation, reduced over `dims` with keepdim."""
        raise NotImplementedError(f"{self.name} has no dynamic (per-row) scales")

    def quantize(self, x: torch.Tensor, tq: TensorQuant, delta: Any, scale: Any) -> torch.Tensor:
        """`q(x) = s·c(x)` (or `c(x)` when the tensor has no scaling); `scale` broadcasts against x."""
        c = self.codes(x, tq, delta, scale)
        return c * scale if tq.scaling else c

    def describe(self, tq: TensorQuant) -> str:
        """One line for tables and reprs, e.g. `integer 8-bit, per row (dynamic)`."""
        return f"{self.name} {tq.width}-bit, {granularity(tq)}"


def register_kind(cls: type[QuantKind]) -> type[QuantKind]:
    """Class decorator: register one instance of `cls` under `cls.name`."""
    if cls.name in KINDS:
        raise ValueError(f"quantiser kind {cls.name!r} registered twice")
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> QuantKind:
    """The registered kind `name` (KeyError when unknown)."""
    return KINDS[name]


def granularity(tq: TensorQuant) -> str:
    """`per tensor`, `per channel`, `per group of 64` or `per row (dynamic)`."""
    if tq.dynamic:
        return "per row (dynamic)"
    if tq.group_size:
        return f"per group of {tq.group_size}"
    if tq.per_channel:
        return "per channel"
    return "per tensor"


# --- shapes ------------------------------------------------------------------------------------------------


def row_dims(op: str, x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions one dynamic scale covers: the last (features) for a Linear input, else every
    dimension but the batch."""
    if op == "linear":
        return (x.dim() - 1,)
    return tuple(range(1, x.dim()))


def check_groups(w_shape: tuple[int, ...], group_size: int) -> int:
    """The number of groups per output row; ValueError when the row length is not a multiple of it."""
    row = 1
    for s in w_shape[1:]:
        row *= s
    if group_size <= 0 or row % group_size:
        msg = f"a row of {row} elements (shape {tuple(w_shape)}) does not split into groups of {group_size}"
        raise ValueError(msg)
    return row // group_size


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` as `[out, n_groups, group_size]` (rows flattened)."""
    check_groups(tuple(w.shape), group_size)
    return w.reshape(w.shape[0], -1, group_size)


def expand_groups(scale: torch.Tensor, w_shape: tuple[int, ...], group_size: int) -> torch.Tensor:
    """A `[out, n_groups]` scale repeated over each group and shaped like the weight."""
    return scale.repeat_interleave(group_size, dim=1).reshape(w_shape)


def reduce_dims_for(w: torch.Tensor, like_shape: tuple[int, ...]) -> list[int]:
    """The dimensions of `w` a value of shape `like_shape` (right-aligned) has size 1 in or lacks."""
    padded = (1,) * (w.dim() - len(like_shape)) + tuple(like_shape)
    return [i for i, s in enumerate(padded) if s == 1]


def param_scale_shape(w: torch.Tensor, tq: TensorQuant, delta: Any) -> tuple[int, ...]:
    """The shape of a derived weight/bias scale before grouping: Δ's shape (ternary per channel), one per
    output channel with `per_channel`, else 0-dim."""
    if tq.per_channel and w.dim() >= 1:
        return (w.shape[0],) + (1,) * (w.dim() - 1)
    if delta is not None and getattr(delta, "dim", lambda: 0)() > 0:
        return tuple(delta.shape)
    return ()


def reduce_to(a: torch.Tensor, tq: TensorQuant, delta: Any, how: str) -> torch.Tensor:
    """Reduce `a` (already |w|, or a mask) to a weight's scale shape: `how` is `sum` (in a fixed order, so
    the bits do not depend on the thread count) or `amax`; per group `[out, n_groups]`, else the shape of
    `param_scale_shape`."""
    from ternqc.runtime.calibrate.stats.sums import fixed_order_sum

    if tq.group_size:
        g = grouped(a, tq.group_size)
        return fixed_order_sum(g, [2]) if how == "sum" else g.amax(dim=2)
    shape = param_scale_shape(a, tq, delta)
    dims = reduce_dims_for(a, shape)
    if not dims:
        return a.reshape(shape).clone()
    out = fixed_order_sum(a, dims, keepdim=True) if how == "sum" else a.amax(dim=dims, keepdim=True)
    return out.reshape(shape)


def shaped_delta(delta: torch.Tensor, w: torch.Tensor, tq: TensorQuant) -> torch.Tensor:
    """Δ shaped to broadcast against `w` as seen per group (`[out, n_groups, group_size]`): a scalar stays,
    a per-channel Δ becomes `[out, 1, 1]`. Other values: ValueError."""
    if not tq.group_size or delta.dim() == 0 or delta.numel() == 1:
        return delta.reshape(()) if tq.group_size else delta
    if delta.numel() == w.shape[0] and delta.shape[0] == w.shape[0]:
        return delta.reshape(w.shape[0], 1, 1)
    msg = f"a per-group quantiser takes a scalar or per-output-channel threshold, not shape {tuple(delta.shape)}"
    raise ValueError(msg)


def scale_for(scale: torch.Tensor, w_shape: tuple[int, ...], tq: TensorQuant) -> torch.Tensor:
    """A stored weight scale shaped to broadcast against the weight (groups expanded)."""
    if tq.group_size and scale.dim() == 2 and len(w_shape) >= 1 and scale.shape[1] > 1:
        row = 1
        for s in w_shape[1:]:
            row *= s
        if scale.shape[1] * tq.group_size == row:  # [out, n_groups], not a per-channel [out, 1]
            return expand_groups(scale, w_shape, tq.group_size)
    return scale


__all__ = [
    "KINDS",
    "QuantKind",
    "check_groups",
    "expand_groups",
    "get_kind",
    "granularity",
    "grouped",
    "param_scale_shape",
    "reduce_to",
    "register_kind",
    "row_dims",
    "scale_for",
    "shaped_delta",
]
