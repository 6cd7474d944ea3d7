"""Language v2 in the runtime: per-channel layouts, the new expression nodes, another module's statistic,
first/last/scoped/except in resolution, assertions, modules left in float, and the model check of
`ternqc compile --model`. Expected values come from numpy / math on the same inputs or from the rules'
definitions, never from the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ternqc.plan import (
    Assert,
    Binding,
    BinOp,
    Calibration,
    Call,
    Cond,
    Const,
    Origin,
    Plan,
    Selector,
    StatRef,
    StatSpec,
    Unary,
    Var,
)
from ternqc.runtime.calibrate.stats.layout import make_layout
from ternqc.runtime.calibrate.table import ModuleStats
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize import uncalled
from ternqc.runtime.quantize.mapping import map_params
from ternqc.runtime.quantize.resolve import resolve_bindings
from ternqc.runtime.run.rules_check import check_plan

from .test_stats import make_state, spec

MMAX = StatSpec("range_min_max")
LINEAR = Selector("type", "linear")
MODULES = [("enc", "sequential"), ("enc.0", "linear"), ("enc.1", "relu"), ("enc.2", "linear"), ("head", "linear")]


# --- per_channel -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "batched", "axis", "same_as"),
    [
        ((6, 4), False, 0, (1,)),  # Linear weight: one value per output row
        ((6, 4, 3, 3), False, 0, (1, 2, 3)),  # Conv2d weight: per output channel
        ((8, 3, 5, 4), True, 1, (2, 3)),  # Conv2d input: per input channel
        ((8, 7, 5), True, -1, (1,)),  # Linear input [B, T, F]: per feature
        ((8, 5), True, -1, "none"),  # Linear input [B, F]
    ],
)
def test_per_channel_layout_equals_the_explicit_dims(shape, batched, axis, same_as) -> None:
    assert make_layout(shape, f"channel:{axis}", batched) == make_layout(shape, same_as, batched)


def test_per_channel_statistic_equals_numpy() -> None:
    x = torch.randn(16, 7, 5) * 2 + 0.5
    state = make_state(spec("abs_mean", f"channel:{-1}"), batched=True)
    state.update(x)
    expected = np.abs(x.numpy()).mean(axis=(0, 1)).reshape(1, 5)
    np.testing.assert_allclose(state.result()["abs_mean"], expected, rtol=1e-5)


def test_per_channel_on_a_missing_axis_is_a_user_error() -> None:
    with pytest.raises(UserError, match="per_channel keeps dim 3"):
        make_layout((8, 5), "channel:3", True)


# --- expressions -------------------------------------------------------------------------------------------

W = [[0.5], [2.0], [4.5]]  # a per-channel statistic


def _table():
    stats = {
        "enc.0": ModuleStats("enc.0", "enc_0", "linear", values={
            "weight": {StatSpec("abs_mean", dims=(1,)): {"abs_mean": W, "count": 4}},
            "data_in_0": {MMAX: {"min": -3.0, "max": 12.0, "range": 15.0, "count": 9}}}),
        "enc.1": ModuleStats("enc.1", "enc_1", "relu", values={
            "data_out_0": {MMAX: {"min": 0.0, "max": 6.0, "range": 6.0, "count": 9}}}),
        "enc.2": ModuleStats("enc.2", "enc_2", "linear", values={
            "data_in_0": {MMAX: {"min": 0.0, "max": 6.0, "range": 6.0, "count": 9}}}),
        "head": ModuleStats("head", "head", "linear", values={
            "data_in_0": {MMAX: {"min": -1.0, "max": 1.0, "range": 2.0, "count": 9}}}),
    }
    return stats


def _plan(*rows, asserts=()):
    bindings = [Binding(s, p, v, Origin("r.tq", i + 1, 1), i) for i, (s, p, v) in enumerate(rows)]
    return Plan(("r.tq",), Calibration(), (), bindings, asserts=asserts)


def _map(*rows):
    return map_params(_plan(*rows), _table(), modules=MODULES)


def _in(field):
    return StatRef("data_in_0", MMAX, field)


def test_functions_and_power_equal_math() -> None:
    per_row = StatRef("weight", StatSpec("abs_mean", dims=(1,)), "abs_mean")
    m = _map((Selector("name", "enc.0"), "weight_threshold",
              Call("clamp", (BinOp("**", Call("sqrt", (per_row,)), Const(2)), Const(1.0), Call("log2", (Const(8),))))))
    expected = [[min(max(math.sqrt(v[0]) ** 2, 1.0), math.log2(8))] for v in W]
    np.testing.assert_allclose(m.modules["enc.0"].params["weight_threshold"], expected)


def test_conditional_width_per_module() -> None:
    rule = Cond(BinOp(">", _in("range"), Const(10)), Const(32), Const(2))
    m = _map((LINEAR, "data_in_width", rule))
    ranges = {p: _table()[p].values["data_in_0"][MMAX]["range"] for p in ("enc.0", "enc.2", "head")}
    assert {p: m.modules[p].params["data_in_width"] for p in ranges} == {
        p: 32 if r > 10 else 2 for p, r in ranges.items()}


def test_logic_and_not() -> None:
    test = BinOp("and", Unary("not", BinOp("<", _in("max"), Const(0))), BinOp("or", Const(False),
                                                                              BinOp("!=", _in("min"), Const(0))))
    m = _map((LINEAR, "data_in_scaling_factor", test))
    expected = {p: (not t.values["data_in_0"][MMAX]["max"] < 0) and t.values["data_in_0"][MMAX]["min"] != 0
                for p, t in _table().items() if t.op == "linear"}
    assert {p: m.modules[p].params["data_in_scaling_factor"] for p in expected} == expected


def test_per_channel_condition_picks_element_wise() -> None:
    per_row = StatRef("weight", StatSpec("abs_mean", dims=(1,)), "abs_mean")
    rule = Cond(BinOp(">", per_row, Const(1.0)), per_row, Const(0.0))
    m = _map((Selector("name", "enc.0"), "weight_threshold", rule))
    assert m.modules["enc.0"].params["weight_threshold"] == [[v[0] if v[0] > 1 else 0.0] for v in W]


def test_another_modules_statistic() -> None:
    other = StatRef("data_out_0", MMAX, "max", module=Selector("name", "enc.1"))
    m = _map((Selector("name", "enc.2"), "data_in_threshold", BinOp("*", Const(0.5), other)))
    assert m.modules["enc.2"].params["data_in_threshold"] == 0.5 * 6.0


def test_another_modules_statistic_must_name_one_module() -> None:
    other = StatRef("data_in_0", MMAX, "max", module=LINEAR)
    with pytest.raises(UserError, match="must name one module, but it matches 3 modules"):
        _map((Selector("name", "enc.2"), "data_in_threshold", other))


@pytest.mark.parametrize(("fn", "arg", "problem"), [("sqrt", -1.0, "negative"), ("log2", 0.0, "not positive")])
def test_function_domain_errors(fn, arg, problem) -> None:
    with pytest.raises(UserError, match=problem):
        _map((LINEAR, "weight_threshold", Call(fn, (Const(arg),))))


# --- resolution with the new forms --------------------------------------------------------------------------


def test_precedence_first_beats_type_and_later_wins_at_equal_rank() -> None:
    rows = [
        (Selector("first", "linear"), "weight_width", Const(32)),
        (LINEAR, "weight_width", Const(2)),  # later but lower rank
        (Selector("scoped", "linear", "enc.*"), "bias_width", Const(2)),
        (Selector("glob", "enc.*"), "bias_width", Const(32)),  # glob > scoped
        (Selector("type", "linear", exclude=(Selector("last", "linear"),)), "data_in_width", Const(2)),
    ]
    bindings = [Binding(s, p, v, Origin("r.tq", i + 1, 1), i) for i, (s, p, v) in enumerate(rows)]
    r = resolve_bindings(bindings, MODULES)
    assert r["enc.0"]["weight_width"].binding.value == Const(32)
    assert r["enc.2"]["weight_width"].binding.value == Const(2)
    assert r["enc.0"]["bias_width"].binding.value == Const(32)
    assert "bias_width" not in r["head"]
    assert "data_in_width" in r["enc.2"] and "data_in_width" not in r["head"]


# --- assertions ----------------------------------------------------------------------------------------------


def test_assertions_name_every_failing_module() -> None:
    from ternqc.runtime.quantize.asserts import check_asserts

    a = Assert(LINEAR, BinOp("<=", Var("weight_zero_fraction"), Const(0.5)), "too many zeros", Origin("r.tq", 3, 1))
    m_assert = Assert(None, BinOp(">=", Var("quantised_accuracy"), BinOp("-", Var("float_accuracy"), Const(0.1))),
                      "", Origin("r.tq", 4, 1))
    p = _plan((LINEAR, "name", Const("ternary")), asserts=(a, m_assert))
    mapping = map_params(p, _table(), modules=MODULES)
    zeros = {"enc_0": 0.25, "enc_2": 0.75, "head": None}  # head's weight stays in float: not checked
    report = {"float_accuracy": 0.9, "ternary_accuracy": 0.7, "nodes": {
        node: {"tensors": {"weight": {"quantized": z is not None, "zero_fraction": z}}} for node, z in zeros.items()}}
    failures = check_asserts(p, mapping, {}, report, _table(), MODULES)
    assert [(f.module, dict(f.values)) for f in failures] == [
        ("enc.2", {"weight_zero_fraction": 0.75}),
        (None, {"quantised_accuracy": 0.7, "float_accuracy": 0.9}),
    ]
    assert failures[0].origin == "r.tq:3:1" and "too many zeros" in failures[0].render()


# --- modules the model never calls ----------------------------------------------------------------------------


def test_multihead_attention_out_proj_is_functional_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(4, 2))
    assert list(uncalled.functional_only(model)) == ["1.out_proj"]
    assert isinstance(model[1].out_proj, torch.nn.Linear)  # why `linear` selects it
    modules = [("0", "linear"), ("1", "multiheadattention"), ("1.out_proj", "linear")]
    functional = uncalled.functional_only(model)
    rules = [Binding(Selector("last", "linear"), "weight_width", Const(2), Origin("r.tq", 1, 1), 0)]
    assert list(uncalled.selected(rules, modules, functional)) == ["1.out_proj"]
    rules = [Binding(Selector("first", "linear"), "weight_width", Const(2), Origin("r.tq", 1, 1), 0)]
    assert uncalled.selected(rules, modules, functional) == {}  # first(linear) is "0", not the out_proj


# --- the model check of `ternqc compile --model` ---------------------------------------------------------------


def test_check_plan_table_errors_and_out_proj_warning() -> None:
    modules = [("fc", "linear"), ("attn", "multiheadattention"), ("attn.out_proj", "linear"), ("head", "linear")]
    rows = [(LINEAR, "weight_width", Const(2)), (Selector("name", "hed"), "weight_width", Const(32))]
    report = check_plan(_plan(*rows), modules, {"attn.out_proj": uncalled.REASON})
    assert "3: fc, attn.out_proj, head" in report.text
    assert "left in float: attn.out_proj" in report.text
    assert any("attn.out_proj" in w and "left in float" in w for w in report.warnings)
    (error,) = report.errors
    assert '"hed" matched no module' in error and 'did you mean "head"' in error


def test_check_plan_shadowing_names_both_rules() -> None:
    rows = [(Selector("glob", "*.attn.out_proj"), "weight_width", Const(32)),
            (Selector("glob", "*.attn.*"), "weight_width", Const(2))]
    modules = [("l.attn.q_proj", "linear"), ("l.attn.out_proj", "linear")]
    report = check_plan(_plan(*rows), modules, {})
    (warning,) = report.warnings
    assert "r.tq:1:1" in warning and "r.tq:2:1" in warning and "never takes effect" in warning


def test_check_plan_reports_a_rule_for_a_tensor_its_modules_lack() -> None:
    modules = [("fc", "linear"), ("act", "relu")]
    report = check_plan(_plan((Selector("name", "act"), "weight_width", Const(2))), modules, {})
    (error,) = report.errors
    assert "r.tq:1:1" in error and "weight" in error and "act (relu)" in error


def test_a_failing_assertion_on_a_string_parameter_reports_it() -> None:
    from ternqc.runtime.quantize.asserts import check_asserts

    a = Assert(LINEAR, BinOp("!=", Var("name"), Const("ternary")), "", Origin("r.tq", 2, 1))
    p = _plan((LINEAR, "name", Const("ternary")), asserts=(a,))
    mapping = map_params(p, _table(), modules=MODULES)
    failures = check_asserts(p, mapping, {}, {"nodes": {}}, _table(), MODULES)
    assert [dict(f.values) for f in failures] == [{"name": "ternary"}] * 3


def test_check_plan_another_modules_statistic_must_name_one_module() -> None:
    modules = [("a.fc", "linear"), ("b.fc", "linear")]
    ref = StatRef("data_out_0", MMAX, "max", module=Selector("glob", "*.fc"))
    report = check_plan(_plan((LINEAR, "data_in_max", ref)), modules, {})
    (error,) = report.errors
    assert "r.tq:1:1" in error and "matches 2 modules (a.fc, b.fc)" in error
