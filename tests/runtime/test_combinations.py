"""Parameters checked once: mapping checks each value, `combinations.py` each tensor's values together before
the configs are built. A bad value or a combination that makes no quantiser config is a `UserError` naming
the node, the parameter and the rule that set it (`file:line:col`); the quantisers then trust what they
receive (`module_quant_from_params` only builds)."""

from __future__ import annotations

import re

import pytest

from ternqc.plan import Binding, Calibration, Const, Origin, Plan, Selector, StatRef, StatSpec
from ternqc.runtime.calibrate.table import ModuleStats
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.combinations import tensor_problem
from ternqc.runtime.quantize.mapping import map_params
from ternqc.runtime.quantize.quantizers import module_quant_from_params
from ternqc.runtime.run.pipeline import build_configs

RULES = "configs/r.tq"
PER_CH = StatSpec("range_min_max", dims=(0,))
MODULES = [("fc1", "linear"), ("pool", "maxpool")]
NAN = float("nan")


def mapped(params: dict, op: str = "linear"):
    """Map one rule per parameter (line i + 2, column 5, in `params`' order) on the module `fc1`. A list value
    is read from a per-channel statistic of fc1's weight (constants are scalars)."""
    bindings, values = [], {}
    for i, (param, value) in enumerate(params.items()):
        if isinstance(value, list):
            values[param] = value
            expr = StatRef("weight", PER_CH, param)
        else:
            expr = Const(value)
        bindings.append(Binding(Selector("name", "fc1"), param, expr, Origin(RULES, i + 2, 5), i))
    plan = Plan(sources=(RULES,), calibration=Calibration(), profile=(), bindings=bindings)
    table = {"fc1": ModuleStats("fc1", "fc1", op, values={"weight": {PER_CH: {**values, "count": 4}}})}
    return map_params(plan, table, modules=[("fc1", op), ("pool", "maxpool")])


def configs(params: dict):
    return build_configs(mapped(params))


def rule_of(params: dict, param: str) -> str:
    return f"{RULES}:{list(params).index(param) + 2}:5"


def lin(t="weight", **kw) -> dict:
    return {"name": "ternary", f"{t}_width": 2, **{f"{t}_{k}": v for k, v in kw.items()}}


# (params, the parameter whose rule the message names, words it holds)
BAD = {
    "width_8": ({"name": "ternary", "weight_width": 8, "weight_max": 1.0}, "weight_width",
                "not supported by the ternary quantiser"),
    "width_bool": ({"name": "ternary", "weight_width": True, "weight_max": 1.0}, "weight_width", "whole number"),
    "width_str": ({"name": "ternary", "weight_width": "2", "weight_max": 1.0}, "weight_width", "whole number"),
    "width_fraction": ({"name": "ternary", "weight_width": 2.5, "weight_max": 1.0}, "weight_width",
                       "whole number"),
    "name_unset": ({"weight_width": 2, "weight_max": 1.0}, "weight_width", "no quantiser is named"),
    "name_other": ({"name": "int8", "weight_width": 2, "weight_max": 1.0}, "name", "int8"),
    "name_not_str": ({"name": 3, "weight_width": 2, "weight_max": 1.0}, "name", "quantiser must be one of"),
    "nan_mean": (lin(mean=NAN, max=1.0), "weight_mean", "not finite"),
    "inf_max": (lin(max=float("inf")), "weight_max", "not finite"),
    "nan_in_vector": (lin(threshold=[0.1, NAN]), "weight_threshold", "not finite"),
    "nan_in_float_tensor": ({"data_in_width": 32, "data_in_max": NAN}, "data_in_max", "not finite"),
    "negative_threshold": (lin(threshold=-0.1), "weight_threshold", "must not be negative"),
    "negative_threshold_element": (lin(threshold=[0.1, -0.1]), "weight_threshold", "must not be negative"),
    "negative_scale": (lin(max=1.0, scaling_factor=True, scale=-1.0), "weight_scale", "must not be negative"),
    "scale_str": (lin(max=1.0, scale="big"), "weight_scale", "expected a number"),
    "mean_bool": (lin(mean=True), "weight_mean", "expected a number"),
    "ragged_vector": (lin(threshold=[[0.1], [0.1, 0.2]]), "weight_threshold", "rectangular"),
    "vector_of_bools": (lin(threshold=[True, False]), "weight_threshold", "not a number"),
    "empty_vector": (lin(threshold=[]), "weight_threshold", "empty"),
    "scaling_not_bool": (lin(max=1.0, scaling_factor=1), "weight_scaling_factor", "true or false"),
    "unknown_param": ({"name": "ternary", "weight_widht": 2}, "weight_widht", "unknown parameter"),
    # combinations (combinations.py and each kind's `problem`)
    "unresolvable_threshold": (lin(), "weight_width", "cannot resolve the ternary threshold of weight"),
    "unresolvable_threshold_na": (lin(mean=None, median=None, max=None), "weight_width",
                                  "cannot resolve the ternary threshold"),
    "binary_width_2": ({"name": "binary", "weight_width": 2}, "weight_width", "not supported by the binary quantiser"),
    "integer_width_17": ({"name": "integer", "weight_width": 17}, "weight_width", "weight_width = 17"),
    "ternary_dynamic": ({"name": "ternary", "data_in_width": 2, "data_in_threshold": 0.1, "data_in_dynamic": True},
                        "data_in_dynamic", "not available for the ternary quantiser"),
    "group_on_data_in": ({"name": "integer", "data_in_width": 8, "data_in_dynamic": True,
                          "data_in_group_size": 4}, "data_in_group_size", "weight and bias only"),
    "dynamic_weight": ({"name": "integer", "weight_width": 8, "weight_dynamic": True}, "weight_dynamic",
                       "data_in and data_out"),
    "integer_data_in_no_step": ({"name": "integer", "data_in_width": 8}, "data_in_width", "has no step"),
    "unknown_kind_override": ({"name": "ternary", "weight_quantiser": "int8", "weight_width": 8},
                              "weight_quantiser", "int8"),
    "group_zero": ({"name": "integer", "weight_width": 8, "weight_group_size": 0}, "weight_group_size",
                   "at least 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_parameters_are_user_errors_naming_node_and_the_rule(case):
    params, param, words = BAD[case]
    with pytest.raises(UserError) as info:
        configs(params)
    msg = str(info.value)
    assert param in msg and words in msg, msg
    assert "fc1" in msg or case == "unknown_param", msg  # an unknown parameter is no module's
    assert f"rule at {rule_of(params, param)}" in msg, msg
    assert "(rules:" not in msg


def test_a_combination_names_every_rule_behind_it():
    params = {"name": "binary", "weight_width": 2}
    with pytest.raises(UserError) as info:
        configs(params)
    msg = str(info.value)
    assert msg.startswith("weight of node fc1 (linear): weight_width = 2 is not supported by the binary quantiser")
    assert f'weight_width = 2 (rule at {rule_of(params, "weight_width")})' in msg
    assert f'name = "binary" (rule at {rule_of(params, "name")})' in msg


def test_a_module_that_cannot_be_quantised_is_named_with_its_type():
    plan = Plan(sources=(RULES,), calibration=Calibration(), profile=(),
                bindings=[Binding(Selector("name", "pool"), "data_in_width", Const(2), Origin(RULES, 3, 1), 0)])
    with pytest.raises(UserError) as info:
        map_params(plan, {}, modules=MODULES)
    assert re.search(rf"rule at {RULES}:3:1: .*maxpool", str(info.value))


@pytest.mark.parametrize("case", [c for c, (params, _, _) in BAD.items() if "name" in params and c.startswith(
    ("binary", "integer", "ternary", "group_on", "dynamic", "unresolvable"))])
def test_every_combination_problem_is_found_without_the_rules(case):
    params = {k: v for k, v in BAD[case][0].items() if v is not None}
    t = next(k for k in params if k.endswith("_width")).removesuffix("_width")
    assert tensor_problem(t, params) is not None


def test_good_parameters_map_and_build():
    params = {"name": "ternary", "weight_width": 2, "weight_threshold": 0.1, "data_in_quantiser": "integer",
              "data_in_width": 8, "data_in_dynamic": True}
    m = mapped(params).modules["fc1"]
    mq = module_quant_from_params(m.op, m.node, m.params)
    assert configs(params)["fc1"] == mq
    assert mq.tensor("weight").delta == 0.1 and mq.tensor("data_in").dynamic
