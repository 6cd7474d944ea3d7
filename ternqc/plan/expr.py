"""The plan's expressions, the values a binding sets and an assertion tests: `StatSpec` (one statistic with its
options fixed), `Const`, `StatRef`, `Var`, `Unary`, `BinOp`, `Cond`, `Call`; their dict round trip
(`expr_to_dict` / `expr_from_dict`, bounded by `MAX_EXPR_DEPTH`) and `expr_stat_refs`. Re-exported by
`ternqc.plan`.
"""

from __future__ import annotations

import re
from typing import Any, Union

import attrs
from attrs import field, frozen

from ternqc.plan.selector import Selector
from ternqc.plan.vocab import DERIVED_STATISTICS, MAX_EXPR_DEPTH, STATISTICS, StatKind


def _dims_converter(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        return value
    return tuple(int(v) for v in value)


_CHANNEL_DIMS = re.compile(r"channel:-?[0-9]+")


def channel_axis(dims: Any) -> int | None:
    """The kept axis of `dims = "channel:N"` (per channel: every other dim is reduced), else `None`."""
    if isinstance(dims, str) and _CHANNEL_DIMS.fullmatch(dims):
        return int(dims.split(":")[1])
    return None


def _dims_validator(_inst: Any, _attr: Any, value: Any) -> None:
    if isinstance(value, str):
        if value not in ("all", "none") and channel_axis(value) is None:
            msg = f"dims must be 'all', 'none', 'channel:N' or a tuple of ints, got {value!r}"
            raise ValueError(msg)


@frozen(cache_hash=True)  # a key of many dicts in calibration
class StatSpec:
    """One statistic with all its options fixed: `range_quantile(dims=all, abs=false, quantile=0.5)`.

    `dims` is `"all"` (one scalar), `"none"` (element-wise across samples: the per-sample shape), a tuple
    of dimensions of the observed tensor to reduce (the others are kept: per-channel results), or
    `"channel:N"`: keep only dimension N (negative counts from the end), reduce all others (the language's
    `per_channel`: `channel:0` for a weight, `channel:1` for a Conv input, `channel:-1` for a Linear input).
    `options` holds the statistic's own options (e.g. `quantile`), complete and sorted by name.
    """

    name: str = field(validator=attrs.validators.in_(tuple(STATISTICS) + tuple(DERIVED_STATISTICS)))
    dims: str | tuple[int, ...] = field(default="all", converter=_dims_converter, validator=_dims_validator)
    abs: bool = field(default=False, validator=attrs.validators.instance_of(bool))
    options: tuple[tuple[str, float], ...] = field(
        default=(), converter=lambda opts: tuple(sorted((str(k), float(v)) for k, v in opts))
    )

    @property
    def kind(self) -> StatKind:
        return STATISTICS.get(self.name) or DERIVED_STATISTICS[self.name]

    def option(self, name: str) -> float:
        """The value of one of the statistic's own options (its default when unset)."""
        return dict(self.options).get(name, self.kind.option_defaults()[name])

    def key(self) -> str:
        """A canonical, human-readable identity, e.g. `range_quantile(dims=all, abs=false, quantile=0.5)`."""
        dims = self.dims if isinstance(self.dims, str) else "[" + ", ".join(map(str, self.dims)) + "]"
        parts = [f"dims={dims}", f"abs={'true' if self.abs else 'false'}"]
        parts += [f"{k}={_fmt_number(v)}" for k, v in self.options]
        return f"{self.name}({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dims": self.dims if isinstance(self.dims, str) else list(self.dims),
            "abs": self.abs,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatSpec:
        return cls(name=d["name"], dims=d["dims"], abs=bool(d["abs"]), options=tuple(d["options"].items()))


def _fmt_number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


@frozen
class Const:
    """A literal: a number, a string, a bool, or `None` for `na` (unset)."""

    value: float | int | bool | str | None = field(
        validator=attrs.validators.optional(attrs.validators.instance_of((float, int, bool, str)))
    )


@frozen
class StatRef:
    """`stat(tensor).<stat>.<field>` with the statistic fully resolved by the compiler.

    `tensor` is canonical (`data_in_0`, `weight`, ...). The runtime reads the value of `field` of `stat`
    collected on `tensor` of the module the binding is evaluated for, or, when `module` is set
    (`stat("seq_blocks.1".data_out)...`), of the one module that selector picks.
    """

    tensor: str = field(validator=attrs.validators.instance_of(str))
    stat: StatSpec = field(validator=attrs.validators.instance_of(StatSpec))
    field: str = field(validator=attrs.validators.instance_of(str))
    module: Selector | None = attrs.field(  # `field` is a field name here
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(Selector))
    )


@frozen
class Var:
    """A name an `assert` reads: a resolved parameter (`weight_width`), what conversion measured
    (`weight_delta`, `weight_alpha`, `weight_zero_fraction`) or, for `assert model`, `float_accuracy` /
    `quantised_accuracy`."""

    name: str = field(validator=attrs.validators.instance_of(str))


UNARY_OPS = ("neg", "not")
ARITHMETIC_OPS = ("+", "-", "*", "/", "**")
COMPARISON_OPS = ("<", "<=", ">", ">=", "==", "!=")
LOGICAL_OPS = ("and", "or")
#: Functions and their argument counts (min, max; None = unbounded).
FUNCTIONS: dict[str, tuple[int, int | None]] = {
    "abs": (1, 1), "min": (1, None), "max": (1, None), "sqrt": (1, 1), "log2": (1, 1), "clamp": (3, 3),
}


@frozen
class Unary:
    """`-x` (op `"neg"`) or `not x` (op `"not"`)."""

    op: str = field(validator=attrs.validators.in_(UNARY_OPS))
    operand: Expr


@frozen
class BinOp:
    """`left op right` with op one of `+ - * / **`, a comparison, `and` or `or`."""

    op: str = field(validator=attrs.validators.in_(ARITHMETIC_OPS + COMPARISON_OPS + LOGICAL_OPS))
    left: Expr
    right: Expr


@frozen
class Cond:
    """`if test then then else orelse`."""

    test: Expr
    then: Expr
    orelse: Expr


@frozen
class Call:
    """`fn(args...)` with fn one of `FUNCTIONS`: `abs`, `sqrt`, `log2` (one argument), `min`, `max` (one or
    more), `clamp(x, lo, hi)`."""

    fn: str = field(validator=attrs.validators.in_(tuple(FUNCTIONS)))
    args: tuple[Expr, ...] = field(converter=tuple)


Expr = Union[Const, StatRef, Var, Unary, BinOp, Cond, Call]
EXPR_TYPES = (Const, StatRef, Var, Unary, BinOp, Cond, Call)


def expr_to_dict(e: Expr) -> dict[str, Any]:
    """An expression as JSON-ready nested dicts."""
    if isinstance(e, Const):
        return {"const": e.value}
    if isinstance(e, StatRef):
        d = {"tensor": e.tensor, "spec": e.stat.to_dict(), "field": e.field}
        if e.module is not None:
            d["module"] = e.module.to_dict()
        return {"stat": d}
    if isinstance(e, Var):
        return {"var": e.name}
    if isinstance(e, Cond):
        return {"cond": {"test": expr_to_dict(e.test), "then": expr_to_dict(e.then), "else": expr_to_dict(e.orelse)}}
    if isinstance(e, Unary):
        return {"unary": {"op": e.op, "operand": expr_to_dict(e.operand)}}
    if isinstance(e, BinOp):
        return {"binop": {"op": e.op, "left": expr_to_dict(e.left), "right": expr_to_dict(e.right)}}
    if isinstance(e, Call):
        return {"call": {"fn": e.fn, "args": [expr_to_dict(a) for a in e.args]}}
    raise TypeError(f"not an expression: {e!r}")


def expr_from_dict(d: dict[str, Any], _depth: int = 0) -> Expr:
    """The inverse of `expr_to_dict`. Raises `ValueError` for an expression nested deeper than
    `MAX_EXPR_DEPTH` (every pass over expressions recurses)."""
    if _depth > MAX_EXPR_DEPTH:
        raise ValueError(f"an expression is nested deeper than {MAX_EXPR_DEPTH} levels")
    sub = lambda e: expr_from_dict(e, _depth + 1)
    if not isinstance(d, dict):
        raise ValueError(f"not an expression: {_short(d)}")
    if "const" in d:
        return Const(d["const"])
    if "stat" in d:
        s = d["stat"]
        module = Selector.from_dict(s["module"]) if s.get("module") is not None else None
        return StatRef(tensor=s["tensor"], stat=StatSpec.from_dict(s["spec"]), field=s["field"], module=module)
    if "var" in d:
        return Var(d["var"])
    if "cond" in d:
        c = d["cond"]
        return Cond(sub(c["test"]), sub(c["then"]), sub(c["else"]))
    if "unary" in d:
        return Unary(op=d["unary"]["op"], operand=sub(d["unary"]["operand"]))
    if "binop" in d:
        b = d["binop"]
        return BinOp(op=b["op"], left=sub(b["left"]), right=sub(b["right"]))
    if "call" in d:
        return Call(fn=d["call"]["fn"], args=tuple(sub(a) for a in d["call"]["args"]))
    raise ValueError(f"not an expression: {_short(d)}")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def expr_stat_refs(e: Expr) -> tuple[StatRef, ...]:
    """Every statistic reference inside `e`, in reading order."""
    if isinstance(e, StatRef):
        return (e,)
    if isinstance(e, Unary):
        return expr_stat_refs(e.operand)
    if isinstance(e, BinOp):
        return expr_stat_refs(e.left) + expr_stat_refs(e.right)
    if isinstance(e, Call):
        return tuple(r for a in e.args for r in expr_stat_refs(a))
    if isinstance(e, Cond):
        return expr_stat_refs(e.test) + expr_stat_refs(e.then) + expr_stat_refs(e.orelse)
    return ()
