"""The plan: the only thing the compiler and the runtime share.

The compiler (`ternqc.compiler`) turns a rules file into a `Plan`; the runtime (`ternqc.runtime`) reads a
`Plan` and never sees the rules text. A plan is made of frozen attrs values, carries a `version`, and
round-trips through plain dicts and JSON (`Plan.to_dict` / `Plan.from_dict`, `to_json` / `from_json`).

This module also holds the vocabulary both halves agree on: tensors, statistics with their fields and
options, quantisable module types and the quantiser parameters. It imports neither lark nor torch.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Sequence
from typing import Any, Union

import attrs
from attrs import field, frozen

PLAN_VERSION = 2
#: Plan versions this ternqc reads: version 1 plans (no lets, asserts or selector forms of language v2) mean
#: the same under version 2.
READABLE_VERSIONS = (1, 2)
#: The deepest expression the compiler accepts and a plan may hold (every pass over expressions recurses).
MAX_EXPR_DEPTH = 100

# ---------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------

#: Tensor names in the language, and their canonical names in the plan (MASE's argument names).
TENSOR_ALIASES: dict[str, str] = {
    "data_in": "data_in_0",
    "data_out": "data_out_0",
    "weight": "weight",
    "bias": "bias",
}
#: Tensors a quantiser parameter can be about (`data_in_max`, `weight_width`, `data_out_width`, ...).
PARAM_TENSORS: tuple[str, ...] = ("data_in", "weight", "bias", "data_out")


@frozen
class StatKind:
    """What a statistic produces (`fields`) and which options it takes beyond `dims` and `abs`."""

    fields: tuple[str, ...]
    options: tuple[tuple[str, float], ...] = ()  # (option name, default value)

    def option_defaults(self) -> dict[str, float]:
        return dict(self.options)


#: MASE's statistics, with MASE's result fields and options (see shared/MASE.md).
STATISTICS: dict[str, StatKind] = {
    "range_min_max": StatKind(("min", "max", "range", "count")),
    "range_quantile": StatKind(("min", "max", "range", "count"), (("quantile", 0.975),)),
    "variance_precise": StatKind(("mean", "variance", "count")),
    "variance_online": StatKind(("mean", "variance", "count")),
    "abs_mean": StatKind(("abs_mean", "count")),
    "range_n_sigma": StatKind(("min", "max", "range", "count"), (("num_sigma", 3.0),)),
}

#: Statistics the compiler adds on its own and users cannot name. `threshold_abs_mean` is the mean of |x|
#: over |x| > Δ (the ternary scale α of an activation), where Δ is the module's resolved threshold; the
#: runtime gathers it in a second pass over the calibration batches once Δ is known.
DERIVED_STATISTICS: dict[str, StatKind] = {
    "threshold_abs_mean": StatKind(("abs_mean", "count")),
}

#: Options every statistic takes, with defaults.
COMMON_STAT_OPTIONS: dict[str, Any] = {"dims": "all", "abs": False}

#: Module types that can be quantised, and the tensors each has.
QUANTISABLE: dict[str, tuple[str, ...]] = {
    "linear": ("data_in", "weight", "bias", "data_out"),
    "relu": ("data_in", "data_out"),
    "conv1d": ("data_in", "weight", "bias", "data_out"),
    "conv2d": ("data_in", "weight", "bias", "data_out"),
    "embedding": ("weight",),
}

#: Quantiser kinds and the widths each takes (`FLOAT_WIDTH` or `na` always leaves a tensor in float). The
#: runtime's kind registry (`ternqc.runtime.quantize.kinds`) holds the same names, widths and parameters; a
#: test pins the two equal. `name` is a module's default kind, `<tensor>_quantiser` overrides it per tensor.
QUANTISER_WIDTHS: dict[str, tuple[int, ...]] = {
    "ternary": (2,),
    "binary": (1,),
    "integer": tuple(range(2, 17)),
}
#: Per-tensor parameter suffixes each kind reads (besides `width` and `quantiser`); setting one a tensor's
#: kind does not read is allowed (it may be meant for another kind) and ignored.
QUANTISER_PARAMS: dict[str, tuple[str, ...]] = {
    "ternary": ("scaling_factor", "mean", "median", "max", "threshold", "scale", "group_size", "per_channel"),
    "binary": ("scaling_factor", "scale", "group_size", "per_channel", "dynamic"),
    "integer": ("max", "scale", "group_size", "per_channel", "dynamic"),
}

#: Quantiser names.
QUANTISERS: tuple[str, ...] = tuple(QUANTISER_WIDTHS)

#: Per-tensor parameter suffixes and the kind of value each takes:
#: "int", "bool", or "number" (a number, an expression over statistics, or `na`).
PARAM_SUFFIXES: dict[str, str] = {
    "width": "int",
    "frac_width": "int",  # MASE compatibility; written to MASE TOML, the ternary quantiser ignores it
    "scaling_factor": "bool",
    "mean": "number",
    "median": "number",
    "max": "number",
    "threshold": "number",
    "scale": "number",
    "quantiser": "quantiser",  # a kind of QUANTISERS, overriding `name` for this tensor
    "group_size": "int",  # weight/bias: one scale per group of N consecutive input elements of a row
    "per_channel": "bool",  # weight/bias: one derived scale per output channel
    "dynamic": "bool",  # data_in/data_out: scales computed per row (token) at run time from |x|'s max
}
#: Width of a tensor the ternary quantiser quantises (see `QUANTISER_WIDTHS` for every kind); `FLOAT_WIDTH` (or `na`) leaves the tensor in float.
TERNARY_WIDTH = 2
FLOAT_WIDTH = 32


def split_param(param: str) -> tuple[str, str] | None:
    """`"weight_max"` -> `("weight", "max")`; `None` when `param` is not a per-tensor parameter."""
    for tensor in PARAM_TENSORS:
        prefix = tensor + "_"
        if param.startswith(prefix) and param[len(prefix) :] in PARAM_SUFFIXES:
            return tensor, param[len(prefix) :]
    return None


def all_params() -> tuple[str, ...]:
    """Every quantiser parameter name: `name` and `<tensor>_<suffix>` for each tensor and suffix."""
    return ("name",) + tuple(f"{t}_{s}" for t in PARAM_TENSORS for s in PARAM_SUFFIXES)


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------


@frozen
class Origin:
    """Where a plan entry came from: a rules file and a 1-based line and column."""

    file: str = field(validator=attrs.validators.instance_of(str))
    line: int = field(validator=attrs.validators.instance_of(int))
    col: int = field(validator=attrs.validators.instance_of(int))

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


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


@frozen
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


SELECTOR_KINDS = ("default", "type", "scoped", "glob", "regex", "name", "first", "last")
#: Precedence rank of each kind: the more exactly a selector names a module, the higher.
SELECTOR_RANKS: dict[str, int] = {
    "default": 0, "type": 1, "scoped": 2, "glob": 3, "regex": 3, "name": 4, "first": 4, "last": 4,
}


def _regex_validator(inst: Any, _attr: Any, value: str) -> None:
    if inst.kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None


Module = tuple[str, str]  # (module path, type name as the runtime gives it)


@frozen
class Selector:
    """Which modules a rule is about.

    kind: `"default"` (every quantisable module), `"type"` (a module type, e.g. `linear`: the runtime passes
    the type name, which for the quantisable types is decided by `isinstance`, so subclasses match),
    `"scoped"` (a type whose module path matches the glob `scope`: `linear in "encoder.*"`), `"glob"` (a
    quoted name with `*`, `?` or `[`), `"regex"` (`re"..."`: a full match on the dotted path), `"name"` (a
    quoted module path such as `seq_blocks.0` or its MASE/FX node name `seq_blocks_0`), `"first"` / `"last"`
    (the first / last module of type `pattern` in the model's module order). `pattern` is empty for
    `default`. `exclude`: selectors whose modules are taken out (`linear except "seq_blocks.0"`).
    """

    kind: str = field(validator=attrs.validators.in_(SELECTOR_KINDS))
    pattern: str = field(default="", validator=[attrs.validators.instance_of(str), _regex_validator])
    scope: str = field(default="", validator=attrs.validators.instance_of(str))
    exclude: tuple[Selector, ...] = field(default=(), converter=tuple)

    @property
    def specificity(self) -> int:
        """Precedence rank (`SELECTOR_RANKS`): name, first, last 4 > glob, regex 3 > scoped 2 > type 1 >
        default 0 (later statements win at equal rank)."""
        return SELECTOR_RANKS[self.kind]

    @property
    def positional(self) -> bool:
        """Whether matching needs the model's ordered module list (`first` / `last`, also in `exclude`)."""
        return self.kind in ("first", "last") or any(e.positional for e in self.exclude)

    def matches(self, module_path: str, module_type: str, modules: Sequence[Module] | None = None) -> bool:
        """Whether this selector picks the module at `module_path` whose type name is `module_type`.

        Names and globs match either the dotted module path or the MASE/FX node name (dots -> underscores).
        `default` matches only quantisable types. `first` / `last` need `modules`, every `(path, type)` of the
        model in `named_modules()` order.

        Raises:
            ValueError: a `first` / `last` selector without `modules`.
        """
        if not self._matches(module_path, module_type, modules):
            return False
        return not any(e.matches(module_path, module_type, modules) for e in self.exclude)

    def _matches(self, module_path: str, module_type: str, modules: Sequence[Module] | None) -> bool:
        if self.kind == "default":
            return module_type in QUANTISABLE
        if self.kind == "type":
            return module_type == self.pattern
        if self.kind in ("first", "last"):
            if modules is None:
                raise ValueError(f"{self} needs the model's module list")
            if module_type != self.pattern:
                return False
            # scan from the near end only: a model with thousands of modules is matched module by module
            ordered = modules if self.kind == "first" else reversed(modules)
            return next((p for p, t in ordered if t == self.pattern), None) == module_path
        if self.kind == "regex":
            return re.fullmatch(self.pattern, module_path) is not None
        node = module_path.replace(".", "_")
        if self.kind == "scoped":
            return module_type == self.pattern and (
                fnmatch.fnmatchcase(module_path, self.scope) or fnmatch.fnmatchcase(node, self.scope)
            )
        if self.kind == "name":
            return self.pattern in (module_path, node)
        return fnmatch.fnmatchcase(module_path, self.pattern) or fnmatch.fnmatchcase(node, self.pattern)

    def select(self, modules: Sequence[Module]) -> list[str]:
        """The paths of `modules` (every `(path, type)` of a model, in order) this selector picks."""
        return [p for p, t in modules if self.matches(p, t, modules)]

    def __str__(self) -> str:
        if self.kind == "default":
            text = "default"
        elif self.kind == "type":
            text = self.pattern
        elif self.kind == "scoped":
            text = f"{self.pattern} in {json.dumps(self.scope)}"
        elif self.kind in ("first", "last"):
            text = f"{self.kind}({self.pattern})"
        elif self.kind == "regex":
            text = 're"' + self.pattern.replace('"', '\\"') + '"'
        else:
            text = json.dumps(self.pattern)
        if self.exclude:
            text += " except " + ", ".join(map(str, self.exclude))
        return text

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "pattern": self.pattern}
        if self.scope:
            d["scope"] = self.scope
        if self.exclude:
            d["exclude"] = [e.to_dict() for e in self.exclude]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selector:
        return cls(
            kind=d["kind"],
            pattern=d["pattern"],
            scope=d.get("scope", ""),
            exclude=tuple(cls.from_dict(e) for e in d.get("exclude", ())),
        )


# --- expressions ------------------------------------------------------------------------------------------


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


# --- plan entries -----------------------------------------------------------------------------------------

PROFILE_REASONS = ("profiled", "referenced", "derived")


@frozen
class ProfilePoint:
    """Collect `stats` on `tensor` (canonical name) of every module `selector` matches.

    reason: `"profiled"` (a `profile` statement), `"referenced"` (a rule reads a statistic that no profile
    statement collects there, so the compiler added it) or `"derived"` (the compiler added it for the
    quantiser, e.g. `threshold_abs_mean` for an activation scale α).
    """

    selector: Selector = field(validator=attrs.validators.instance_of(Selector))
    tensor: str = field(validator=attrs.validators.instance_of(str))
    stats: tuple[StatSpec, ...] = field(
        converter=tuple, validator=attrs.validators.deep_iterable(attrs.validators.instance_of(StatSpec))
    )
    origin: Origin = field(validator=attrs.validators.instance_of(Origin))
    reason: str = field(default="profiled", validator=attrs.validators.in_(PROFILE_REASONS))


@frozen
class Binding:
    """`selector.param = value`, from the rules file at `origin`.

    `order` is the statement's position in the whole program after includes are expanded (an included file's
    statements come before the including file's); with `selector.specificity` it decides precedence.
    """

    selector: Selector = field(validator=attrs.validators.instance_of(Selector))
    param: str = field(validator=attrs.validators.instance_of(str))
    value: Expr = field(validator=attrs.validators.instance_of(EXPR_TYPES))
    origin: Origin = field(validator=attrs.validators.instance_of(Origin))
    order: int = field(validator=attrs.validators.instance_of(int))


@frozen
class Assert:
    """`assert selector: test, "message"`, checked per module the selector picks after mapping and
    conversion; `selector` is `None` for `assert model: test`, checked once."""

    selector: Selector | None = field(validator=attrs.validators.optional(attrs.validators.instance_of(Selector)))
    test: Expr = field(validator=attrs.validators.instance_of(EXPR_TYPES))
    message: str = field(validator=attrs.validators.instance_of(str))
    origin: Origin = field(validator=attrs.validators.instance_of(Origin))

    def to_dict(self) -> dict[str, Any]:
        return {
            "selector": None if self.selector is None else self.selector.to_dict(),
            "test": expr_to_dict(self.test),
            "message": self.message,
            "origin": attrs.asdict(self.origin),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Assert:
        sel = None if d["selector"] is None else Selector.from_dict(d["selector"])
        return cls(sel, expr_from_dict(d["test"]), d["message"], Origin(**d["origin"]))


LET_SOURCES = ("let", "set")


@frozen
class Constant:
    """The value a top-level `let` of the root rules file took: as written (`how="let"`) or overridden
    with `--set name=value` (`how="set"`). Recorded so a run's report can say which values it used."""

    name: str = field(validator=attrs.validators.instance_of(str))
    value: float | int | bool | str = field(validator=attrs.validators.instance_of((float, int, bool, str)))
    how: str = field(validator=attrs.validators.in_(LET_SOURCES))
    origin: Origin = field(validator=attrs.validators.instance_of(Origin))


@frozen
class Calibration:
    """The `calibrate { }` block: how many samples, in batches of what size, from which split."""

    samples: int = field(default=128, validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)])
    batch_size: int = field(default=128, validator=[attrs.validators.instance_of(int), attrs.validators.gt(0)])
    split: str = field(default="train", validator=attrs.validators.instance_of(str))


@frozen
class Plan:
    """A compiled rules file."""

    sources: tuple[str, ...] = field(converter=tuple)  # the rules files read, the root first
    calibration: Calibration
    profile: tuple[ProfilePoint, ...] = field(converter=tuple)
    bindings: tuple[Binding, ...] = field(converter=tuple)
    asserts: tuple[Assert, ...] = field(
        default=(), converter=tuple, validator=attrs.validators.deep_iterable(attrs.validators.instance_of(Assert))
    )
    constants: tuple[Constant, ...] = field(
        default=(), converter=tuple,
        validator=attrs.validators.deep_iterable(attrs.validators.instance_of(Constant)),
    )
    version: int = field(default=PLAN_VERSION, validator=attrs.validators.in_(READABLE_VERSIONS))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sources": list(self.sources),
            "calibration": attrs.asdict(self.calibration),
            "profile": [
                {
                    "selector": p.selector.to_dict(),
                    "tensor": p.tensor,
                    "stats": [s.to_dict() for s in p.stats],
                    "origin": attrs.asdict(p.origin),
                    "reason": p.reason,
                }
                for p in self.profile
            ],
            "bindings": [
                {
                    "selector": b.selector.to_dict(),
                    "param": b.param,
                    "value": expr_to_dict(b.value),
                    "origin": attrs.asdict(b.origin),
                    "order": b.order,
                }
                for b in self.bindings
            ],
            "asserts": [a.to_dict() for a in self.asserts],
            "constants": [attrs.asdict(c) for c in self.constants],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Read a plan written by `to_dict`. Raises `ValueError` for another version or a malformed plan."""
        if not isinstance(d, dict) or d.get("version") not in READABLE_VERSIONS:
            found = d.get("version") if isinstance(d, dict) else type(d).__name__
            readable = " and ".join(map(str, READABLE_VERSIONS))
            msg = f"unsupported plan version {found!r}; this ternqc reads versions {readable}"
            raise ValueError(msg)
        try:
            return cls(
                version=d["version"],
                sources=d["sources"],
                calibration=Calibration(**d["calibration"]),
                profile=[
                    ProfilePoint(
                        selector=Selector.from_dict(p["selector"]),
                        tensor=p["tensor"],
                        stats=[StatSpec.from_dict(s) for s in p["stats"]],
                        origin=Origin(**p["origin"]),
                        reason=p["reason"],
                    )
                    for p in d["profile"]
                ],
                bindings=[
                    Binding(
                        selector=Selector.from_dict(b["selector"]),
                        param=b["param"],
                        value=expr_from_dict(b["value"]),
                        origin=Origin(**b["origin"]),
                        order=b["order"],
                    )
                    for b in d["bindings"]
                ],
                asserts=[Assert.from_dict(a) for a in d.get("asserts", ())],
                constants=[
                    Constant(c["name"], c["value"], c["how"], Origin(**c["origin"])) for c in d.get("constants", ())
                ],
            )
        except KeyError as exc:
            msg = f"malformed plan: missing key {exc.args[0]!r}"
            raise ValueError(msg) from exc
        except (TypeError, AttributeError, ValueError) as exc:
            # attrs validators put their sentence first in `args`, followed by internals
            detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else repr(exc)
            msg = f"malformed plan: {detail}"
            raise ValueError(msg) from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        """Read a plan written by `to_json`. Raises `ValueError` for invalid JSON, JSON nested deeper than
        `inputs.MAX_JSON_DEPTH` (with its line and column in `source`), or a malformed plan."""
        from ternqc.inputs import MAX_JSON_DEPTH, check_nesting

        check_nesting(text, source, MAX_JSON_DEPTH)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            msg = f"not a plan file (invalid JSON): {exc}"
            raise ValueError(msg) from exc
        except RecursionError:  # check_nesting's limit keeps this out of reach; kept as a safety net
            msg = "not a plan file: nested too deeply"
            raise ValueError(msg) from None
        return cls.from_dict(data)
