"""Language v2 on the compiler side: selector forms, unions and exclusions, precedence, constants and
overrides, granularity words, the new expressions and assertions. Expected values are written from the
language's definition (docs/LANGUAGE.md), never read back from the compiler."""

from __future__ import annotations

import pytest

from ternqc import plan
from ternqc.compiler import CompileError, ast, compile_source, parse_sets
from ternqc.compiler.parse import parse
from ternqc.plan import Selector

I = ast.Ident  # noqa: E741
S = ast.Selector


def _bindings(text: str, **kw):
    return compile_source(text, "r.tq", **kw).plan.bindings


# --- parsing ------------------------------------------------------------------------------------------------


def test_selector_forms_parse() -> None:
    text = (
        'linear, "enc.0" except "enc.0.fc", last(linear) { weight_width = 2 }\n'
        'first(linear).weight_width = 32\n'
        'linear in "encoder.*".weight_width = 2\n'
        're"encoder\\.layers\\.[01]\\.linear[12]".weight_width = 2\n'
    )
    block, first, scoped, regex = parse(text)
    entry = (ast.Entry(I("weight_width"), ast.Number(2)),)
    assert block == ast.Block(
        (S("linear", False), S("enc.0", True)), entry, (S("enc.0.fc", True), S("linear", False, "last"))
    )
    assert first.selector == S("linear", False, "first")
    assert scoped.selector == S("linear", False, "scoped", "encoder.*")
    assert regex.selector == S(r"encoder\.layers\.[01]\.linear[12]", True, "regex")


def test_expressions_parse_with_python_precedence() -> None:
    (b,) = parse("x.y = if not a < 1 and b or c then -2 ** 2 ** 3 else clamp(1, 2, 3)")
    n = ast.Number
    assert b.value == ast.Cond(
        ast.BinOp("or", ast.BinOp("and", ast.Not(ast.BinOp("<", ast.Name("a"), n(1))), ast.Name("b")), ast.Name("c")),
        ast.Neg(ast.BinOp("**", n(2), ast.BinOp("**", n(2), n(3)))),
        ast.Call(I("clamp"), (n(1), n(2), n(3))),
    )


def test_other_module_stat_parses() -> None:
    (b,) = parse('x.y = stat("seq_blocks.1".data_out).range_min_max.max + stat(first(linear).data_in).abs_mean.abs_mean')
    assert b.value.left.module == S("seq_blocks.1", True) and b.value.left.tensor == I("data_out")
    assert b.value.right.module == S("linear", False, "first")


def test_keywords_stay_names_elsewhere() -> None:
    # `first`, `last`, `model`, `in` are keywords only where a selector or an assertion expects them
    (b,) = parse("x.first = last + model + in")
    assert b.key == I("first")
    assert b.value == ast.BinOp("+", ast.BinOp("+", ast.Name("last"), ast.Name("model")), ast.Name("in"))


# --- selectors, unions, exclusion, precedence --------------------------------------------------------------

MODULES = [
    ("enc", "sequential"),
    ("enc.0", "linear"),
    ("enc.1", "relu"),
    ("enc.2", "linear"),
    ("dec.0", "linear"),
    ("linear1", "linear"),
]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (Selector("first", "linear"), ["enc.0"]),
        (Selector("last", "linear"), ["linear1"]),
        (Selector("regex", r"enc\.[0-9]"), ["enc.0", "enc.1", "enc.2"]),
        (Selector("regex", r"enc"), ["enc"]),  # a full match, not a search
        (Selector("scoped", "linear", "enc.*"), ["enc.0", "enc.2"]),
        (Selector("type", "linear", exclude=(Selector("name", "enc.0"), Selector("last", "linear"))),
         ["enc.2", "dec.0"]),
        (Selector("glob", "linear[-1]"), ["linear1"]),  # why quoted "linear[-1]" is an error in the language
    ],
)
def test_selector_matches(selector: Selector, expected: list[str]) -> None:
    assert selector.select(MODULES) == expected


def test_first_and_last_need_the_module_list() -> None:
    with pytest.raises(ValueError, match="module list"):
        Selector("first", "linear").matches("enc.0", "linear")


def test_precedence_ranks() -> None:
    rank = {k: Selector(k, "x").specificity for k in plan.SELECTOR_KINDS}
    assert rank["name"] == rank["first"] == rank["last"] > rank["regex"] == rank["glob"] > rank["scoped"]
    assert rank["scoped"] > rank["type"] > rank["default"]


def test_union_block_is_one_binding_per_item_with_the_exclusions() -> None:
    bs = _bindings('linear, conv2d except "a", last(linear) { weight_width = 2  bias_width = 32 }')
    excl = (Selector("name", "a"), Selector("last", "linear"))
    assert [(b.selector, b.param) for b in bs] == [
        (Selector("type", "linear", exclude=excl), "weight_width"),
        (Selector("type", "linear", exclude=excl), "bias_width"),
        (Selector("type", "conv2d", exclude=excl), "weight_width"),
        (Selector("type", "conv2d", exclude=excl), "bias_width"),
    ]
    assert len({b.order for b in bs}) == 1  # one statement


def test_selector_json_round_trip() -> None:
    sel = Selector("scoped", "linear", "enc.*", (Selector("regex", "a.b"), Selector("first", "linear")))
    assert Selector.from_dict(sel.to_dict()) == sel


def test_version_1_plans_still_read() -> None:
    p = compile_source("linear.weight_width = 2", "r.tq").plan
    d = p.to_dict()
    d["version"] = 1
    del d["asserts"], d["constants"]
    assert plan.Plan.from_dict(d).bindings == p.bindings


# --- constants ------------------------------------------------------------------------------------------------


def test_let_is_substituted() -> None:
    with_let = _bindings("let k = 0.5 * 2\nlinear.weight_threshold = k * stat.abs_mean.abs_mean")
    written = _bindings("linear.weight_threshold = 1.0 * stat.abs_mean.abs_mean")
    assert [b.value for b in with_let] == [b.value for b in written]


def test_set_overrides_a_top_level_let_and_is_recorded() -> None:
    text = "let k = 0.7\nlet w = 2\nlinear.weight_threshold = k * stat.abs_mean.abs_mean\nlinear.weight_width = w"
    compiled = compile_source(text, "r.tq", overrides=parse_sets(["k=0.6"]))
    assert compiled.plan.bindings[0].value.left == plan.Const(0.6)
    assert [(c.name, c.value, c.how) for c in compiled.plan.constants] == [("k", 0.6, "set"), ("w", 2, "let")]


def test_set_unknown_name_is_an_error_with_did_you_mean() -> None:
    with pytest.raises(CompileError, match="did you mean 'k'"):
        compile_source("let k = 0.7", "r.tq", overrides={"kk": 1})


@pytest.mark.parametrize("item", ["k", "=1", "k=", "k=stat.a.b", "k=1 +"])
def test_set_syntax_errors(item: str) -> None:
    with pytest.raises(CompileError):
        parse_sets([item])


def test_set_values() -> None:
    assert parse_sets(["a=0.6", 'b="x"', "c=true", "d=2*3"]) == {"a": 0.6, "b": "x", "c": True, "d": 6}


def test_include_with_overrides_the_included_let(tmp_path) -> None:
    (tmp_path / "base.tq").write_text("let k = 0.7\nlinear.weight_threshold = k * stat.abs_mean.abs_mean\n")
    root = tmp_path / "r.tq"
    compiled = compile_source('let f = 0.25\ninclude "base.tq" with { k = f * 2 }', str(root))
    assert compiled.plan.bindings[0].value.left == plan.Const(0.5)


def test_include_recipe_by_name_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    compiled = compile_source('include recipe "twn" with { k = 0.5 }', "r.tq")
    assert compiled.plan.sources == ("r.tq", "ternqc.configs/twn.tq")
    thresholds = [b for b in compiled.plan.bindings if b.param == "weight_threshold"]
    assert thresholds and all(b.value.left == plan.Const(0.5) for b in thresholds)


# --- granularity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "dims"),
    [
        ("linear.weight_threshold = stat.abs_mean(dims = per_channel).abs_mean", "channel:0"),
        ("conv2d.weight_threshold = stat.abs_mean(dims = per_channel).abs_mean", "channel:0"),
        ('"x".weight_threshold = stat.abs_mean(dims = per_channel).abs_mean', "channel:0"),
        ("linear.data_in_threshold = stat.abs_mean(dims = per_channel).abs_mean", "channel:-1"),
        ("conv2d.data_in_threshold = stat.abs_mean(dims = per_channel).abs_mean", "channel:1"),
        ("first(conv1d).data_in_threshold = stat.abs_mean(dims = per_channel).abs_mean", "channel:1"),
        ("linear.weight_threshold = stat.abs_mean(dims = per_tensor).abs_mean", "all"),
    ],
)
def test_granularity_words(rule: str, dims: str) -> None:
    (b,) = _bindings(rule)
    assert b.value.stat.dims == dims
    # the compiler collects what it reads, with the same concrete dims
    points = compile_source(rule, "r.tq").plan.profile
    assert any(b.value.stat in p.stats for p in points)


def test_per_channel_in_a_union_is_per_type() -> None:
    p = compile_source("linear, conv2d { data_in_threshold = stat.abs_mean(dims = per_channel).abs_mean }",
                       "r.tq").plan
    assert {(b.selector.pattern, b.value.stat.dims) for b in p.bindings} == {
        ("linear", "channel:-1"), ("conv2d", "channel:1")}


# --- expressions and assertions ---------------------------------------------------------------------------


def test_conditional_width_and_its_profile_point() -> None:
    p = compile_source("linear.data_in_width = if stat.range_min_max.range > 10 then 32 else 2", "r.tq").plan
    (b,) = p.bindings
    assert isinstance(b.value, plan.Cond) and b.value.then == plan.Const(32)
    assert [(q.selector, q.tensor, q.reason) for q in p.profile] == [
        (Selector("type", "linear"), "data_in_0", "referenced")]


def test_another_modules_statistic_is_collected_there() -> None:
    p = compile_source('linear.data_in_max = stat("seq_blocks.1".data_out).range_min_max.max', "r.tq").plan
    (b,) = p.bindings
    assert b.value.module == Selector("name", "seq_blocks.1")
    assert [(q.selector, q.tensor) for q in p.profile] == [(Selector("name", "seq_blocks.1"), "data_out_0")]


def test_asserts_in_the_plan() -> None:
    text = ('assert linear: weight_zero_fraction <= 0.9, "zeros"\n'
            "assert model: quantised_accuracy >= float_accuracy - 0.05\n"
            "assert first(linear): stat(weight).abs_mean.abs_mean > 0\n")
    p = compile_source(text, "r.tq").plan
    a, m, s = p.asserts
    assert a == plan.Assert(Selector("type", "linear"), plan.BinOp("<=", plan.Var("weight_zero_fraction"),
                                                                   plan.Const(0.9)), "zeros", a.origin)
    assert m.selector is None and m.message == ""
    assert (a.origin.line, m.origin.line) == (1, 2)
    # an assertion's statistic is collected like a rule's
    assert [(q.selector, q.tensor) for q in p.profile] == [(Selector("first", "linear"), "weight")]
    assert plan.Plan.from_json(p.to_json()) == p


def test_no_let_or_assert_leaks_into_a_v1_shaped_plan() -> None:
    p = compile_source("linear.weight_width = 2", "r.tq").plan
    assert p.asserts == () and p.constants == () and p.version == plan.PLAN_VERSION


def test_string_and_bool_parameters_take_conditionals_of_their_kind() -> None:
    p = compile_source(
        'linear.name = if stat(data_in).range_min_max.max > 1 then "ternary" else "ternary"\n'
        "linear.weight_scaling_factor = if stat(weight).abs_mean.abs_mean > 0.01 then true else false\n",
        "r.tq",
    ).plan
    name, scaling = p.bindings
    assert name.value.then == plan.Const("ternary") and scaling.value.orelse == plan.Const(False)


def test_a_broader_later_glob_shadowing_a_narrower_one_is_a_warning_with_both_places() -> None:
    text = '"*.attn.out_proj".weight_width = 32\n"*.attn.*".weight_width = 2\n"*.mlp.*".bias_width = 32\n'
    (warning,) = compile_source(text, "r.tq").warnings
    assert (warning.span.line, warning.severity) == (1, "warning")
    assert "line 2" in warning.message and '"*.attn.*"' in warning.message
    # the other order is the usual exception, no warning
    assert compile_source('"*.attn.*".weight_width = 2\n"*.attn.out_proj".weight_width = 32\n', "r.tq").warnings == ()
