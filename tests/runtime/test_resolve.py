"""Precedence, rule by rule: name > glob > type > default; later wins at equal rank; included files first."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ternqc.plan import Binding, Const, Origin, Selector
from ternqc.runtime.quantize.resolve import (
    applicable_params,
    inapplicable_bindings,
    resolve_bindings,
    unmatched_selectors,
)

# a toy-like model, with the containers named_modules() also yields
MODULES = [
    ("", "toynet"),
    ("seq_blocks", "sequential"),
    ("seq_blocks.0", "linear"),
    ("seq_blocks.1", "relu"),
    ("seq_blocks.2", "linear"),
    ("seq_blocks.3", "relu"),
    ("seq_blocks.4", "linear"),
]
NAME0 = Selector("name", "seq_blocks.0")
GLOB = Selector("glob", "seq_blocks.*")
LINEAR = Selector("type", "linear")
DEFAULT = Selector("default")


def bind(sel: Selector, order: int, param: str = "data_in_max", file: str = "main.tq", line: int = 0):
    return Binding(sel, param, Const(float(order)), Origin(file, line or order + 1, 1), order)


def winner(bindings, path="seq_blocks.0", param="data_in_max"):
    return resolve_bindings(bindings, MODULES)[path][param]


def test_name_beats_glob_even_when_earlier():
    name, glob = bind(NAME0, 0), bind(GLOB, 1)
    rp = winner([name, glob])
    assert rp.binding == name and rp.overridden == (glob,)


def test_glob_beats_type_even_when_earlier():
    glob, typ = bind(GLOB, 0), bind(LINEAR, 1)
    assert winner([glob, typ]).binding == glob


def test_type_beats_default_even_when_earlier():
    typ, dflt = bind(LINEAR, 0), bind(DEFAULT, 1)
    assert winner([typ, dflt]).binding == typ


def test_node_name_selector_is_a_name_selector():
    node_name, glob = bind(Selector("name", "seq_blocks_0"), 0), bind(GLOB, 1)
    assert winner([node_name, glob]).binding == node_name


def test_later_statement_wins_at_equal_specificity_whatever_the_list_order():
    early, late = bind(LINEAR, 2), bind(LINEAR, 7)
    for bindings in ([early, late], [late, early]):
        rp = winner(bindings)
        assert rp.binding == late and rp.overridden == (early,)


def test_including_file_wins_over_included_file_at_equal_rank():
    # include "inc.tq" comes first: its statements get the smaller orders
    inc_default = bind(DEFAULT, 0, file="inc.tq", line=3)
    inc_name = bind(NAME0, 1, file="inc.tq", line=4)
    main_default = bind(DEFAULT, 2, file="main.tq", line=2)
    main_type = bind(LINEAR, 3, file="main.tq", line=5)
    bindings = [main_default, main_type, inc_default, inc_name]
    res = resolve_bindings(bindings, MODULES)
    assert res["seq_blocks.0"]["data_in_max"].binding == inc_name  # name beats the includer's type rule
    assert res["seq_blocks.0"]["data_in_max"].overridden == (main_type, main_default, inc_default)
    assert res["seq_blocks.2"]["data_in_max"].binding == main_type
    assert res["seq_blocks.1"]["data_in_max"].binding == main_default  # relu: only the defaults match
    assert res["seq_blocks.1"]["data_in_max"].overridden == (inc_default,)


def test_each_parameter_is_resolved_on_its_own():
    width = bind(DEFAULT, 0, param="data_in_width")
    mx = bind(NAME0, 1, param="data_in_max")
    res = resolve_bindings([width, mx], MODULES)["seq_blocks.0"]
    assert res["data_in_width"].binding == width and res["data_in_max"].binding == mx
    assert set(res) == {"data_in_width", "data_in_max"}


def test_only_quantisable_modules_and_their_own_parameters():
    everything = Selector("glob", "*")
    bindings = [bind(everything, 0, param="weight_max"), bind(everything, 1, param="data_in_max")]
    res = resolve_bindings(bindings, MODULES)
    assert list(res) == ["seq_blocks.0", "seq_blocks.1", "seq_blocks.2", "seq_blocks.3", "seq_blocks.4"]
    assert set(res["seq_blocks.1"]) == {"data_in_max"}  # a relu has no weight
    assert set(res["seq_blocks.0"]) == {"data_in_max", "weight_max"}
    assert "weight_max" not in applicable_params("relu") and applicable_params("sequential") == ()


def test_module_without_rules_maps_to_empty():
    assert resolve_bindings([bind(LINEAR, 0)], MODULES)["seq_blocks.1"] == {}


def test_by_node_name_lets_dotted_patterns_find_node_names():
    mase = [("seq_blocks_0", "linear"), ("seq_blocks_1", "relu"), ("x", "placeholder")]
    dotted = bind(Selector("name", "seq_blocks.1"), 0)
    glob = bind(Selector("glob", "seq_blocks.*"), 1, param="data_in_width")
    assert resolve_bindings([dotted], mase)["seq_blocks_1"] == {}
    res = resolve_bindings([dotted, glob], mase, by_node_name=True)
    assert res["seq_blocks_1"]["data_in_max"].binding == dotted
    assert res["seq_blocks_0"]["data_in_width"].binding == glob
    assert unmatched_selectors([dotted], mase) == [dotted]
    assert unmatched_selectors([dotted], mase, by_node_name=True) == []


def test_unmatched_selectors_one_per_selector_and_origin():
    typo = Selector("name", "seq_blokcs.0")
    a = Binding(typo, "data_in_max", Const(1.0), Origin("x.tq", 4, 1), 0)
    a_same_origin = Binding(typo, "data_in_width", Const(2), Origin("x.tq", 4, 1), 1)
    a_other_origin = Binding(typo, "data_in_width", Const(2), Origin("x.tq", 9, 1), 2)
    container = bind(Selector("name", "seq_blocks"), 3)  # exists, but cannot be quantised
    absent_type = bind(Selector("type", "conv2d"), 4)
    relu = Selector("type", "relu")
    fine = [bind(NAME0, 5), bind(GLOB, 6), bind(LINEAR, 7), bind(DEFAULT, 8), bind(relu, 9)]
    got = unmatched_selectors([*fine, container, a_other_origin, a, a_same_origin, absent_type], MODULES)
    assert got == [a, a_other_origin, container, absent_type]


def test_default_is_unmatched_when_nothing_is_quantisable():
    d = bind(DEFAULT, 0)
    assert unmatched_selectors([d], [("", "net"), ("body", "sequential")]) == [d]
    assert unmatched_selectors([d], MODULES) == []


def test_inapplicable_name_rule_on_a_relu():
    relu_weight = bind(Selector("name", "seq_blocks.1"), 0, param="weight_max")
    glob_weight = bind(GLOB, 1, param="weight_max")  # hits linears too: fine
    default_weight = bind(DEFAULT, 2, param="weight_width")
    relu_name = bind(Selector("name", "seq_blocks.1"), 3, param="name")
    got = inapplicable_bindings([relu_weight, glob_weight, default_weight, relu_name], MODULES)
    assert got == [(relu_weight, [("seq_blocks.1", "relu")])]


# --- property: the winner is the best matching binding, the others are listed best first -----------------

SELECTORS = [NAME0, Selector("name", "seq_blocks_2"), GLOB, Selector("glob", "*.1"), LINEAR,
             Selector("type", "relu"), DEFAULT]
PARAMS = ["data_in_max", "weight_max", "name"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SELECTORS), st.sampled_from(PARAMS)), max_size=12), st.randoms())
def test_winner_is_the_best_match(rows, rnd):
    orders = list(range(len(rows)))
    rnd.shuffle(orders)
    bindings = [
        Binding(s, p, Const(1.0), Origin("r.tq", i + 1, 1), order)
        for i, ((s, p), order) in enumerate(zip(rows, orders))
    ]
    res = resolve_bindings(bindings, MODULES)
    for path, op in MODULES:
        params = applicable_params(op)
        if not params:
            assert path not in res
            continue
        for param in params:
            matching = [b for b in bindings if b.param == param and b.selector.matches(path, op)]
            if not matching:
                assert param not in res[path]
                continue
            rp = res[path][param]
            chain = [rp.binding, *rp.overridden]
            assert sorted(chain, key=id) == sorted(matching, key=id)
            keys = [(b.selector.specificity, b.order) for b in chain]
            assert all(keys[i] > keys[i + 1] for i in range(len(keys) - 1))
