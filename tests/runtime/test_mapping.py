"""Evaluating bindings against statistics: values, types, per-channel arithmetic, errors, explain."""

from __future__ import annotations

import math

import pytest

from ternqc.plan import (
    Binding,
    BinOp,
    Calibration,
    Call,
    Const,
    Origin,
    Plan,
    Selector,
    StatRef,
    StatSpec,
    Unary,
)
from ternqc.render import render_explain
from ternqc.runtime.calibrate.table import ModuleStats
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.mapping import map_params
from ternqc.runtime.quantize.resolve import applicable_params

MMAX = StatSpec("range_min_max")
PER_CH = StatSpec("range_min_max", dims=(0,))
ABS_MEAN = StatSpec("abs_mean")
LINEAR, RELU, DEFAULT = Selector("type", "linear"), Selector("type", "relu"), Selector("default")
W_MIN = [-0.5, -0.25, 0.125]
W_MAX = [0.75, 0.0625, 0.375]

MODULES = [("", "net"), ("body", "sequential"), ("body.fc", "linear"), ("body.act", "relu"),
           ("head", "linear")]


def table():
    fc = ModuleStats(
        "body.fc", "body_fc", "linear", shapes={"weight": (3, 4)},
        values={
            "weight": {PER_CH: {"min": W_MIN, "max": W_MAX, "range": [a - b for a, b in zip(W_MAX, W_MIN)],
                                "count": 4},
                       ABS_MEAN: {"abs_mean": 0.3, "count": 12}},
            "data_in_0": {MMAX: {"min": -4.0, "max": 5.0, "range": 9.0, "count": 40}},
        },
    )
    act = ModuleStats("body.act", "body_act", "relu",
                      values={"data_in_0": {MMAX: {"min": -2.0, "max": 0.0, "range": 2.0, "count": 40}}})
    head = ModuleStats("head", "head", "linear",
                       values={"data_in_0": {"range_min_max": {"min": 0.0, "max": 3.0, "count": 9}}})
    return {"body.fc": fc, "body.act": act, "head": head}


def plan(*rows) -> Plan:
    """rows: (selector, param, expr[, line])."""
    bindings = [
        Binding(r[0], r[1], r[2], Origin("configs/x.tq", r[3] if len(r) > 3 else i + 1, 1), i)
        for i, r in enumerate(rows)
    ]
    return Plan(sources=("configs/x.tq",), calibration=Calibration(), profile=(), bindings=bindings)


def run(*rows, modules=MODULES, **kw):
    return map_params(plan(*rows), table(), modules=modules, **kw)


def ref(tensor, spec, field):
    return StatRef(tensor, spec, field)


# --- values ---------------------------------------------------------------------------------------------


def test_every_applicable_parameter_is_present_unset_ones_none():
    res = run((DEFAULT, "name", Const("ternary")), (LINEAR, "weight_width", Const(2)))
    assert list(res.modules) == ["body.fc", "body.act", "head"]
    for path, op in (("body.fc", "linear"), ("body.act", "relu"), ("head", "linear")):
        m = res.modules[path]
        assert m.op == op and m.node == path.replace(".", "_")
        assert list(m.params) == list(applicable_params(op))
        assert m.params["name"] == "ternary"
        assert all(v is None for k, v in m.params.items() if k not in ("name", "weight_width"))
    assert res.modules["body.fc"].params["weight_width"] == 2
    assert "weight_width" not in res.modules["body.act"].params
    assert set(res.modules["body.act"].explain) == {"name"}


def test_python_types_of_values():
    res = run(
        (DEFAULT, "name", Const("ternary")),
        (DEFAULT, "data_in_width", Const(2)),
        (DEFAULT, "data_in_frac_width", Const(0)),
        (DEFAULT, "data_in_scaling_factor", Const(True)),
        (DEFAULT, "data_in_max", Const(3)),
        (DEFAULT, "data_in_median", Const(None)),
    )
    p = res.modules["head"].params
    assert p["data_in_width"] == 2 and type(p["data_in_width"]) is int
    assert p["data_in_frac_width"] == 0 and type(p["data_in_frac_width"]) is int
    assert p["data_in_scaling_factor"] is True
    assert p["data_in_max"] == 3.0 and type(p["data_in_max"]) is float
    assert p["data_in_median"] is None and "data_in_median" in res.modules["head"].explain


def test_scalar_arithmetic_reads_each_modules_own_statistics():
    # data_in_max = max(abs(stat.range_min_max.min), stat.range_min_max.max) / 2 - -1
    e = BinOp("-", BinOp("/", Call("max", (Call("abs", (ref("data_in_0", MMAX, "min"),)),
                                          ref("data_in_0", MMAX, "max"))), Const(2)),
              Unary("neg", Const(1)))
    res = run((LINEAR, "data_in_max", e), (RELU, "data_in_max", e))
    t = table()
    for path in ("body.fc", "body.act", "head"):
        r = t[path].lookup("data_in_0", MMAX)
        assert res.modules[path].params["data_in_max"] == max(abs(r["min"]), r["max"]) / 2 + 1


def test_per_channel_elementwise_and_broadcast_with_scalars():
    # weight_threshold = 0.5 * max(abs(min), max) over channels; weight_scale = stat(weight).abs_mean
    thr = BinOp("*", Const(0.5), Call("max", (Call("abs", (ref("weight", PER_CH, "min"),)),
                                               ref("weight", PER_CH, "max"))))
    res = run(
        (Selector("name", "body.fc"), "weight_threshold", thr),
        (Selector("name", "body_fc"), "weight_max", ref("weight", PER_CH, "max")),
        (Selector("name", "body.fc"), "weight_scale", ref("weight", ABS_MEAN, "abs_mean")),
        (Selector("name", "body.fc"), "weight_median", BinOp("-", ref("weight", PER_CH, "max"),
                                                              ref("weight", ABS_MEAN, "abs_mean"))),
    )
    p = res.modules["body.fc"].params
    assert p["weight_threshold"] == [0.5 * max(abs(a), b) for a, b in zip(W_MIN, W_MAX)]
    assert p["weight_max"] == W_MAX and all(type(v) is float for v in p["weight_max"])
    assert p["weight_scale"] == 0.3
    assert p["weight_median"] == [b - 0.3 for b in W_MAX]


def test_two_per_channel_shapes_broadcast_numpy_style():
    column = ModuleStats("head", "head", "linear", values={
        "weight": {StatSpec("range_min_max", dims=(1,)): {"min": [[-1.0], [-2.0]], "max": [[1.0], [2.0]]},
                   PER_CH: {"min": [-1.0, -3.0, -5.0], "max": [1.0, 3.0, 5.0]}}})
    e = BinOp("*", ref("weight", StatSpec("range_min_max", dims=(1,)), "max"), ref("weight", PER_CH, "max"))
    res = map_params(plan((LINEAR, "weight_max", e)), {"head": column})
    assert res.modules["head"].params["weight_max"] == [[a * b for b in (1.0, 3.0, 5.0)] for a in (1.0, 2.0)]


def test_min_max_with_one_argument_reduce_a_vector():
    res = run((Selector("name", "body.fc"), "weight_max", Call("max", (ref("weight", PER_CH, "max"),))),
              (Selector("name", "body.fc"), "weight_median", Call("min", (ref("weight", PER_CH, "min"),))))
    p = res.modules["body.fc"].params
    assert p["weight_max"] == max(W_MAX) and p["weight_median"] == min(W_MIN)


def test_statistics_from_a_mase_file_are_found_by_name():
    res = run((LINEAR, "data_in_max", ref("data_in_0", MMAX, "max")), modules=[("head", "linear")])
    assert res.modules["head"].params["data_in_max"] == 3.0


def test_module_without_statistics_gets_constants():
    res = run((DEFAULT, "data_in_width", Const(2)), modules=[*MODULES, ("tail", "relu")])
    assert res.modules["tail"].params["data_in_width"] == 2 and res.modules["tail"].node == "tail"


def test_defaults_hold_constant_default_rules_only():
    res = run((DEFAULT, "name", Const("ternary")), (DEFAULT, "data_in_width", Const(8)),
              (DEFAULT, "data_in_width", Const(2)), (DEFAULT, "data_in_max", ref("data_in_0", MMAX, "max")),
              (LINEAR, "weight_width", Const(2)), (DEFAULT, "weight_median", Unary("neg", Const(0.5))))
    assert res.defaults["name"] == "ternary" and res.defaults["data_in_width"] == 2
    assert res.defaults["data_in_max"] is None and res.defaults["weight_width"] is None
    assert res.defaults["weight_median"] == -0.5


def test_configs_by_path():
    res = run((DEFAULT, "name", Const("ternary")))
    assert res.configs()["body.act"] == res.modules["body.act"].params


# --- errors ---------------------------------------------------------------------------------------------


def error(*rows, **kw) -> str:
    with pytest.raises(UserError) as info:
        run(*rows, **kw)
    return str(info.value)


def test_unmatched_name_selector_names_rule_and_suggests():
    msg = error((DEFAULT, "name", Const("ternary")),
                (Selector("name", "body.fcc"), "data_in_max", Const(1.0), 4))
    assert msg.startswith('rule at configs/x.tq:4:1: selector "body.fcc" matched no module of the model; ')
    assert 'did you mean "body.fc"' in msg


def test_unmatched_selector_in_mase_node_names():
    table_ = {"seq_blocks_0": ModuleStats("seq_blocks_0", "seq_blocks_0", "linear"),
              "seq_blocks_1": ModuleStats("seq_blocks_1", "seq_blocks_1", "relu")}
    p = plan((Selector("name", "seq_blokcs.0"), "data_in_max", Const(1.0), 4))
    with pytest.raises(UserError) as info:
        map_params(p, table_, by_node_name=True)
    assert str(info.value) == ('rule at configs/x.tq:4:1: selector "seq_blokcs.0" matched no module of the '
                               'model; did you mean "seq_blocks_0"?')


def test_unmatched_type_selector_suggests_a_type():
    msg = error((Selector("type", "lnear"), "data_in_max", Const(1.0), 7))
    assert "configs/x.tq:7:1" in msg and "selector lnear matched no module" in msg
    assert 'did you mean "linear"' in msg


def test_rule_for_a_quantisable_type_the_model_lacks_is_not_an_error():
    # Recipes carry rules for linear and conv alike; on a model without convs those rules just do nothing.
    res = run((DEFAULT, "name", Const("ternary")), (Selector("type", "conv2d"), "data_in_max", Const(1.0), 2))
    assert res.modules  # the mapping ran
    assert all(m.params.get("data_in_max") is None for m in res.modules.values())


def test_selector_matching_only_containers_says_so():
    msg = error((Selector("name", "body"), "data_in_max", Const(1.0), 3))
    assert "configs/x.tq:3:1" in msg and "body (sequential)" in msg


def test_name_rule_for_a_tensor_the_module_lacks():
    msg = error((Selector("name", "body.act"), "weight_max", Const(1.0), 5))
    assert "configs/x.tq:5:1" in msg and "weight" in msg and "body.act (relu)" in msg


def test_missing_statistic_names_node_param_stat_and_rule():
    q = StatSpec("range_quantile", options=(("quantile", 0.5),))
    msg = error((LINEAR, "data_in_median", ref("data_in_0", q, "max"), 6),
                stats_source="the statistics file s.toml")
    assert "data_in_median of node body_fc (linear)" in msg
    assert "configs/x.tq:6:1" in msg and q.key() in msg and "s.toml" in msg
    assert "range_min_max" in msg  # what the node does hold


def test_missing_field_is_reported():
    msg = error((LINEAR, "data_in_max", ref("data_in_0", MMAX, "variance"), 6))
    assert "variance" in msg and "configs/x.tq:6:1" in msg


def test_node_without_any_statistics():
    msg = error((RELU, "data_in_max", ref("data_in_0", MMAX, "max"), 2), modules=[("tail", "relu")])
    assert "node tail (relu)" in msg and "no statistics at all" in msg


def test_division_by_zero():
    # body.act's data_in max is 0.0
    msg = error((RELU, "data_in_threshold", BinOp("/", Const(1.0), ref("data_in_0", MMAX, "max")), 9))
    assert "data_in_threshold of node body_act (relu)" in msg and "configs/x.tq:9:1" in msg
    assert "division by zero" in msg


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values(bad):
    stats = {"head": ModuleStats("head", "head", "linear",
                                 values={"data_in_0": {MMAX: {"min": 0.0, "max": bad, "count": 1}}})}
    p = plan((LINEAR, "data_in_max", BinOp("*", Const(2.0), ref("data_in_0", MMAX, "max")), 3))
    with pytest.raises(UserError, match=r"data_in_max of node head \(linear\).*configs/x.tq:3:1.*not finite"):
        map_params(p, stats)


def test_non_finite_per_channel_element():
    stats = {"head": ModuleStats("head", "head", "linear",
                                 values={"weight": {PER_CH: {"min": [0.0, 1.0], "max": [1.0, math.inf]}}})}
    with pytest.raises(UserError, match="not finite"):
        map_params(plan((LINEAR, "weight_max", ref("weight", PER_CH, "max"))), stats)


@pytest.mark.parametrize("param", ["weight_threshold", "weight_scale"])
def test_negative_threshold_or_scale(param):
    msg = error((Selector("name", "body.fc"), param, ref("weight", PER_CH, "min"), 8))
    assert f"{param} of node body_fc (linear)" in msg and "configs/x.tq:8:1" in msg and "negative" in msg


def test_negative_median_is_fine():
    res = run((Selector("name", "body.fc"), "weight_median", ref("weight", PER_CH, "min")))
    assert res.modules["body.fc"].params["weight_median"] == W_MIN


@pytest.mark.parametrize(
    "param, value, words",
    [
        ("data_in_width", Const(2.5), "whole number"),
        ("data_in_width", Const(True), "whole number"),
        ("data_in_width", Const(0), "at least 1"),
        ("data_in_frac_width", Const(-1), "at least 0"),
        ("data_in_scaling_factor", Const(1), "true or false"),
        ("name", Const("quaternary"), "quantiser"),
        ("name", Const(3), "quantiser"),
        ("data_in_max", Const("big"), "expected a number"),
        ("data_in_max", Const(True), "expected a number"),
        ("data_in_max", BinOp("+", Const(None), Const(1.0)), "na"),
        ("data_in_max", Unary("neg", Const("x")), "not a number"),
        ("data_in_width", ref("data_in_0", MMAX, "max"), None),  # 5.0 is whole: fine for body.fc
    ],
)
def test_wrong_types_are_errors(param, value, words):
    rows = [(Selector("name", "body.fc"), param, value, 11)]
    if words is None:
        assert run(*rows).modules["body.fc"].params[param] == 5
        return
    msg = error(*rows)
    assert f"{param} of node body_fc (linear)" in msg and "configs/x.tq:11:1" in msg and words in msg


def test_shapes_that_do_not_broadcast():
    stats = {"head": ModuleStats("head", "head", "linear", values={
        "weight": {PER_CH: {"min": [1.0, 2.0], "max": [1.0, 2.0, 3.0]}}})}
    both = BinOp("+", ref("weight", PER_CH, "min"), ref("weight", PER_CH, "max"))
    p = plan((LINEAR, "weight_max", both, 2))
    with pytest.raises(UserError, match=r"shapes \(2,\) and \(3,\) do not broadcast"):
        map_params(p, stats)


def test_statistic_that_is_not_a_number():
    stats = {"head": ModuleStats("head", "head", "linear",
                                 values={"data_in_0": {MMAX: {"max": "NA"}}})}
    with pytest.raises(UserError, match="not a number"):
        map_params(plan((LINEAR, "data_in_max", ref("data_in_0", MMAX, "max"))), stats)


def test_unknown_parameter_is_an_error():
    with pytest.raises(UserError, match="unknown parameter 'data_in_maxx'; did you mean 'data_in_max'"):
        run((LINEAR, "data_in_maxx", Const(1.0)))


# --- explain --------------------------------------------------------------------------------------------


def test_explain_names_winner_and_overridden_rules():
    inc_default = Binding(DEFAULT, "data_in_max", Const(1.0), Origin("configs/base.tq", 3, 1), 0)
    main_default = Binding(DEFAULT, "data_in_max", Const(2.0), Origin("configs/x.tq", 2, 1), 1)
    main_type = Binding(LINEAR, "data_in_max", Const(3.0), Origin("configs/x.tq", 12, 1), 2)
    name = Binding(Selector("name", "head"), "data_in_max", Const(4.0), Origin("configs/x.tq", 20, 1), 3)
    width = Binding(DEFAULT, "data_in_width", Const(2), Origin("configs/base.tq", 4, 1), 4)
    p = Plan(sources=("configs/x.tq", "configs/base.tq"), calibration=Calibration(), profile=(),
             bindings=(inc_default, main_default, main_type, name, width))
    res = map_params(p, table(), modules=MODULES)
    head = res.modules["head"].explain["data_in_max"]
    assert head.binding == name and head.overridden == (main_type, main_default, inc_default)
    text = render_explain(res)
    lines = text.splitlines()

    def line_of(node, param):
        start = next(i for i, ln in enumerate(lines) if ln.startswith(node + " "))
        return next(ln for ln in lines[start + 1:] if ln.strip().startswith(param + " "))

    assert "configs/x.tq:20" in line_of("head", "data_in_max")
    assert "overrides configs/x.tq:12, configs/x.tq:2, configs/base.tq:3" in line_of("head", "data_in_max")
    assert "= 4.0" in line_of("head", "data_in_max")
    fc = line_of("body_fc", "data_in_max")
    assert "= 3.0" in fc and "configs/x.tq:12" in fc and "overrides configs/x.tq:2, configs/base.tq:3" in fc
    act = line_of("body_act", "data_in_max")
    assert "= 2.0" in act and "overrides configs/base.tq:3" in act
    assert "overrides" not in line_of("body_act", "data_in_width")
    assert "configs/base.tq:4" in line_of("body_act", "data_in_width")
    # unset parameters are not listed
    assert not any(ln.strip().startswith("data_in_median") for ln in lines)


def test_explain_shows_na_and_abbreviates_long_vectors():
    long = ModuleStats("head", "head", "linear",
                       values={"weight": {PER_CH: {"min": [0.0] * 50, "max": [float(i) for i in range(50)]}}})
    p = plan((LINEAR, "weight_max", ref("weight", PER_CH, "max")), (LINEAR, "data_in_max", Const(None)))
    text = render_explain(map_params(p, {"head": long}))
    assert "50 values" in text and "max 49.0" in text
    assert any(ln.strip().startswith("data_in_max") and "= na" in ln for ln in text.splitlines())
