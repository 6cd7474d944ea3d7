"""Plan version 2 (language v2): every new value round-trips through JSON (hypothesis), and a malformed one
read from disk is a ValueError with a sentence."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternqc import plan
from ternqc.plan import Assert, Binding, Calibration, Constant, Origin, Plan, Selector, StatRef, StatSpec

from .test_plan_validation import GOOD

NAMES = st.sampled_from(["linear", "conv2d", "relu", "seq_blocks.0", "enc.*", "layernorm"])
ORIGIN = st.builds(Origin, st.sampled_from(["r.tq", "ternqc.configs/twn.tq"]), st.integers(1, 99), st.integers(1, 99))


def _selector(excludes: bool = True):
    base = st.one_of(
        st.just(Selector("default")),
        st.builds(Selector, st.sampled_from(["type", "name", "glob", "first", "last"]), NAMES),
        st.builds(Selector, st.just("regex"), st.sampled_from([r"enc\.[01]", "a|b", ".*proj"])),
        st.builds(lambda t, s: Selector("scoped", t, s), NAMES, st.sampled_from(["encoder.*", "x?"])),
    )
    if not excludes:
        return base
    return st.builds(lambda s, ex: Selector(s.kind, s.pattern, s.scope, tuple(ex)), base,
                     st.lists(_selector(False), max_size=2))


LEAVES = st.one_of(
    st.builds(plan.Const, st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(-9, 9),
                                    st.sampled_from(["ternary"]))),
    st.builds(plan.Var, st.sampled_from(["weight_zero_fraction", "float_accuracy", "data_in_delta"])),
    st.builds(StatRef, st.sampled_from(["weight", "data_in_0", "data_out_0"]),
              st.sampled_from([StatSpec("abs_mean"), StatSpec("abs_mean", dims="channel:0"),
                               StatSpec("range_quantile", dims=(1,), options=(("quantile", 0.99),))]),
              st.sampled_from(["abs_mean", "max"]), st.one_of(st.none(), _selector(False))),
)
EXPRS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(plan.Unary, st.sampled_from(plan.UNARY_OPS), inner),
        st.builds(plan.BinOp, st.sampled_from(plan.ARITHMETIC_OPS + plan.COMPARISON_OPS + plan.LOGICAL_OPS),
                  inner, inner),
        st.builds(plan.Cond, inner, inner, inner),
        st.builds(plan.Call, st.sampled_from(sorted(plan.FUNCTIONS)), st.lists(inner, min_size=1, max_size=3)),
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.builds(Binding, _selector(), st.sampled_from(["weight_width", "data_in_threshold"]), EXPRS, ORIGIN,
                       st.integers(0, 9)), max_size=4),
    st.lists(st.builds(Assert, st.one_of(st.none(), _selector()), EXPRS, st.sampled_from(["", "too many zeros"]),
                       ORIGIN), max_size=3),
    st.lists(st.builds(Constant, st.sampled_from(["k", "bound"]),
                       st.one_of(st.floats(-9, 9), st.integers(0, 9), st.booleans(), st.just("x")),
                       st.sampled_from(plan.LET_SOURCES), ORIGIN), max_size=3),
)
def test_v2_plans_round_trip(bindings, asserts, constants) -> None:
    p = Plan(("r.tq",), Calibration(), (), bindings, asserts=asserts, constants=constants)
    back = Plan.from_json(p.to_json())
    assert back == p
    assert back.to_dict() == p.to_dict()


def _with(**changes):
    return {**GOOD, "version": 2, **changes}


BINDING = {"selector": {"kind": "type", "pattern": "linear"}, "param": "weight_width", "value": {"const": 2},
           "origin": {"file": "r.tq", "line": 1, "col": 1}, "order": 0}


@pytest.mark.parametrize(
    ("d", "needle"),
    [
        ({**GOOD, "version": 3}, "unsupported plan version 3"),
        (_with(bindings=[{**BINDING, "selector": {"kind": "regex", "pattern": "(("}}]), "invalid regular expression"),
        (_with(bindings=[{**BINDING, "selector": {"kind": "type", "pattern": "linear", "exclude": [{"kind": "x",
                                                                                                   "pattern": ""}]}}]),
         "'kind' must be in"),
        (_with(bindings=[{**BINDING, "value": {"call": {"fn": "exp", "args": [{"const": 1}]}}}]), "'fn' must be in"),
        (_with(asserts=[{"selector": None, "test": {"var": "x"}, "message": 3,
                         "origin": {"file": "r.tq", "line": 1, "col": 1}}]), "'message' must be"),
        (_with(constants=[{"name": "k", "value": 1, "how": "guess", "origin": {"file": "r.tq", "line": 1, "col": 1}}]),
         "'how' must be in"),
    ],
)
def test_malformed_v2_plans_are_value_errors(d, needle) -> None:
    with pytest.raises(ValueError, match="malformed plan|unsupported plan") as info:
        Plan.from_json(json.dumps(d))
    assert needle in str(info.value)
