"""The plan: the only thing the compiler and the runtime share.

The compiler (`ternqc.compiler`) turns a rules file into a `Plan`; the runtime (`ternqc.runtime`) reads a
`Plan` and never sees the rules text. A plan is made of frozen attrs values, carries a `version`, and
round-trips through plain dicts and JSON (`Plan.to_dict` / `Plan.from_dict`, `to_json` / `from_json`).

This package holds the plan's entries (here: `Plan`, `ProfilePoint`, `Binding`, `Assert`, `Constant`,
`Calibration`, `Origin`), its expressions (`expr.py`: `StatSpec`, `Const`, `StatRef`, ...), `Selector`
(`selector.py`) and the vocabulary both halves agree on (`vocab.py`: tensors, statistics with their fields
and options, quantisable module types and the quantiser parameters), all importable from `ternqc.plan`. It
imports neither lark nor torch.
"""


from __future__ import annotations

import json
from typing import Any

import attrs
from attrs import field, frozen

from ternqc.plan.expr import (
    ARITHMETIC_OPS,
    COMPARISON_OPS,
    EXPR_TYPES,
    FUNCTIONS,
    LOGICAL_OPS,
    UNARY_OPS,
    BinOp,
    Call,
    Cond,
    Const,
    Expr,
    StatRef,
    StatSpec,
    Unary,
    Var,
    channel_axis,
    expr_from_dict,
    expr_stat_refs,
    expr_to_dict,
)
from ternqc.plan.selector import (
    SELECTOR_KINDS,
    SELECTOR_RANKS,
    Module,
    Selector,
)
from ternqc.plan.vocab import (
    COMMON_STAT_OPTIONS,
    DERIVED_STATISTICS,
    FLOAT_WIDTH,
    MAX_EXPR_DEPTH,
    PARAM_SUFFIXES,
    PARAM_TENSORS,
    PLAN_VERSION,
    QUANTISABLE,
    QUANTISER_PARAMS,
    QUANTISER_WIDTHS,
    QUANTISERS,
    READABLE_VERSIONS,
    STATISTICS,
    TENSOR_ALIASES,
    TERNARY_WIDTH,
    StatKind,
    all_params,
    split_param,
)

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


__all__ = [
    "ARITHMETIC_OPS",
    "Assert",
    "BinOp",
    "Binding",
    "COMMON_STAT_OPTIONS",
    "COMPARISON_OPS",
    "Calibration",
    "Call",
    "Cond",
    "Const",
    "Constant",
    "DERIVED_STATISTICS",
    "EXPR_TYPES",
    "Expr",
    "FLOAT_WIDTH",
    "FUNCTIONS",
    "LET_SOURCES",
    "LOGICAL_OPS",
    "MAX_EXPR_DEPTH",
    "Module",
    "Origin",
    "PARAM_SUFFIXES",
    "PARAM_TENSORS",
    "PLAN_VERSION",
    "PROFILE_REASONS",
    "Plan",
    "ProfilePoint",
    "QUANTISABLE",
    "QUANTISERS",
    "QUANTISER_PARAMS",
    "QUANTISER_WIDTHS",
    "READABLE_VERSIONS",
    "SELECTOR_KINDS",
    "SELECTOR_RANKS",
    "STATISTICS",
    "Selector",
    "StatKind",
    "StatRef",
    "StatSpec",
    "TENSOR_ALIASES",
    "TERNARY_WIDTH",
    "UNARY_OPS",
    "Unary",
    "Var",
    "all_params",
    "channel_axis",
    "expr_from_dict",
    "expr_stat_refs",
    "expr_to_dict",
    "split_param",
]
