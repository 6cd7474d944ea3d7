"""What rules mean, checked on small programs against the language's definition (docs/LANGUAGE.md, the
issue, MASE's defaults), not against the compiler's own output."""

from __future__ import annotations

import pathlib
import re

import pytest

from ternqc import plan
from ternqc.compiler import Compiled, CompileError, compile_file, compile_source
from ternqc.plan import BinOp, Call, Const, Selector, StatRef, StatSpec, Unary

from .conftest import OK_DIR


def compile_(text: str, filename: str = "rules.tq") -> Compiled:
    return compile_source(text, filename)


def bindings(text: str) -> dict[tuple[str, str], plan.Expr]:
    """{(selector text, param): value} of the last binding of each."""
    return {(str(b.selector), b.param): b.value for b in compile_(text).plan.bindings}


def winner(p: plan.Plan, path: str, module_type: str, param: str) -> plan.Binding | None:
    """The documented precedence, written out: most specific selector, then the later statement."""
    found = [b for b in p.bindings if b.param == param and b.selector.matches(path, module_type)]
    return max(found, key=lambda b: (plan.SELECTOR_KINDS.index(b.selector.kind), b.order), default=None)


# --- selectors and tensors -------------------------------------------------------------------------------


def test_selector_kinds() -> None:
    p = compile_(
        'default.data_in_width = 2\nlinear.weight_width = 2\n"seq_blocks.0".weight_width = 2\n'
        '"seq_blocks_0".weight_width = 2\n"seq_blocks.*".weight_width = 2\n"a.?".weight_width = 2\n'
        '"a.[01]".weight_width = 2'
    ).plan
    assert [b.selector for b in p.bindings] == [
        Selector("default"),
        Selector("type", "linear"),
        Selector("name", "seq_blocks.0"),
        Selector("name", "seq_blocks_0"),
        Selector("glob", "seq_blocks.*"),
        Selector("glob", "a.?"),
        Selector("glob", "a.[01]"),
    ]


def test_profile_any_module_type_and_canonical_tensors() -> None:
    p = compile_(
        "profile layernorm.data_in, linear.data_out, linear.weight, linear.bias, "
        "multiheadattention.data_in_2, relu.data_in_0, relu.data_out_0: range_min_max"
    ).plan
    assert [(str(q.selector), q.tensor) for q in p.profile] == [
        ("layernorm", "data_in_0"),
        ("linear", "data_out_0"),
        ("linear", "weight"),
        ("linear", "bias"),
        ("multiheadattention", "data_in_2"),
        ("relu", "data_in_0"),
        ("relu", "data_out_0"),
    ]


def test_tensor_alias_and_canonical_name_are_the_same_tensor() -> None:
    with pytest.raises(CompileError, match="listed twice"):
        compile_("profile linear.data_in, linear.data_in_0: range_min_max")


def test_quantisable_types_have_the_documented_tensors() -> None:
    for t in ("linear", "conv1d", "conv2d"):
        compile_(f"{t}.data_in_max = 1\n{t}.weight_max = 1\n{t}.bias_max = 1")
    compile_("relu.data_in_max = 1")
    for bad in ("relu.weight_max = 1", "relu.bias_width = 2"):
        with pytest.raises(CompileError, match="relu has no tensor"):
            compile_(bad)


def test_name_and_glob_selectors_leave_tensors_to_the_runtime() -> None:
    """The compiler cannot know which tensors a named module has: it keeps such rules for the runtime."""
    p = compile_('"seq_blocks.1".weight_max = 1\n"x.*".bias_width = 2\nprofile "x".data_in_3: abs_mean').plan
    got = {(b.selector.kind, b.selector.pattern, b.param) for b in p.bindings}
    assert got == {("name", "seq_blocks.1", "weight_max"), ("glob", "x.*", "bias_width")}
    assert [(pt.selector.kind, pt.selector.pattern, pt.tensor) for pt in p.profile] == [("name", "x", "data_in_3")]


# --- values and expressions ------------------------------------------------------------------------------


def test_literal_values() -> None:
    v = bindings(
        'default { name = "ternary"  data_in_width = 2  data_in_scaling_factor = true }\n'
        "linear { weight_width = 32  weight_frac_width = 0  bias_width = na  weight_scaling_factor = false }\n"
        "linear.weight_max = 1.0\nlinear.weight_median = -0.0097\nlinear.weight_mean = na\n"
        "linear.bias_max = 3"
    )
    assert v[("default", "name")] == Const("ternary")
    assert v[("default", "data_in_width")] == Const(2)
    assert v[("default", "data_in_scaling_factor")] == Const(True)
    assert v[("linear", "weight_width")] == Const(32)
    assert v[("linear", "bias_width")] == Const(None)
    assert v[("linear", "weight_scaling_factor")] == Const(False)
    assert v[("linear", "weight_median")] == Const(-0.0097)
    assert v[("linear", "weight_mean")] == Const(None)
    assert type(v[("linear", "bias_max")].value) is int and type(v[("linear", "weight_max")].value) is float


def test_expression_structure() -> None:
    v = bindings(
        "linear.weight_max = 1 + 2 * 3\nlinear.weight_mean = 1 - 2 - 3\nlinear.weight_median = -(1 + 2)\n"
        "linear.weight_scale = (1 + 2) / 4\nlinear.weight_threshold = min(1, abs(-2), max(3))"
    )
    assert v[("linear", "weight_max")] == BinOp("+", Const(1), BinOp("*", Const(2), Const(3)))
    assert v[("linear", "weight_mean")] == BinOp("-", BinOp("-", Const(1), Const(2)), Const(3))
    assert v[("linear", "weight_median")] == Unary("neg", BinOp("+", Const(1), Const(2)))
    assert v[("linear", "weight_scale")] == BinOp("/", BinOp("+", Const(1), Const(2)), Const(4))
    assert v[("linear", "weight_threshold")] == Call(
        "min", (Const(1), Call("abs", (Const(-2),)), Call("max", (Const(3),)))
    )


def test_newlines_indentation_and_comments_carry_no_meaning() -> None:
    text = (OK_DIR / "toy_ternary.tq").read_text(encoding="utf-8")
    one_line = " ".join(re.sub(r"#[^\n]*", "", text).split())
    assert "\n" not in one_line

    def shape(p: plan.Plan) -> tuple:
        return (
            p.calibration,
            [(q.selector, q.tensor, q.stats, q.reason) for q in p.profile],
            [(b.selector, b.param, b.value, b.order) for b in p.bindings],
        )

    assert shape(compile_(one_line).plan) == shape(compile_(text).plan)


# --- statistic references --------------------------------------------------------------------------------


def refs(p: plan.Plan) -> list[StatRef]:
    return [r for b in p.bindings for r in plan.expr_stat_refs(b.value)]


def test_stat_ref_reads_the_tensor_of_the_parameter_prefix() -> None:
    p = compile_(
        "linear.weight_max = stat.range_min_max.max\nlinear.data_in_max = stat.range_min_max.max\n"
        "linear.bias_max = stat.range_min_max.max\nlinear.data_in_mean = stat(data_out).range_min_max.max\n"
        "linear.weight_mean = stat(bias).abs_mean.abs_mean"
    ).plan
    assert [r.tensor for r in refs(p)] == ["weight", "data_in_0", "bias", "data_out_0", "bias"]


def test_unprofiled_stat_gets_mase_defaults_and_is_added_to_the_plan() -> None:
    p = compile_(
        "profile linear.weight: range_min_max\n"
        "linear.weight_median = stat.range_quantile.max\n"
        "linear.weight_scale = stat.range_n_sigma(abs = true).max"
    ).plan
    quantile, sigma = refs(p)
    # MASE's defaults (shared/MASE.md): quantile 0.975, num_sigma 3, dims all, abs false
    assert quantile.stat == StatSpec("range_quantile", "all", False, (("quantile", 0.975),))
    assert sigma.stat == StatSpec("range_n_sigma", "all", True, (("num_sigma", 3.0),))
    added = [q for q in p.profile if q.reason == "referenced"]
    assert [(q.selector, q.tensor, q.stats) for q in added] == [
        (Selector("type", "linear"), "weight", (quantile.stat,)),
        (Selector("type", "linear"), "weight", (sigma.stat,)),
    ]
    assert [q.origin.line for q in added] == [2, 3]


def test_options_in_a_reference_pick_one_of_several_collected() -> None:
    p = compile_(
        "profile linear.weight: range_quantile(quantile = 0.5), range_quantile(quantile = 0.99)\n"
        "linear.weight_scale = stat.range_quantile(quantile = 0.99).max\n"
        "linear.weight_median = stat.range_quantile(quantile = 0.5).max"
    ).plan
    assert [r.stat.option("quantile") for r in refs(p)] == [0.99, 0.5]
    assert all(q.reason == "profiled" for q in p.profile)


def test_a_reference_takes_the_options_collected_for_it() -> None:
    p = compile_("profile linear.data_in: range_min_max(dims = [1], abs = true)\n"
                 "linear.data_in_max = stat.range_min_max.max").plan
    assert refs(p)[0].stat == StatSpec("range_min_max", (1,), True)
    assert [q.reason for q in p.profile] == ["profiled"]


def test_a_reference_prefers_what_its_own_selector_collects() -> None:
    # configs/weights_only.tq: each type collects abs_mean over its own dims
    p = compile_(
        "profile linear.weight: abs_mean(dims = [1])\nprofile conv2d.weight: abs_mean(dims = [1, 2, 3])\n"
        "linear.weight_threshold = stat.abs_mean.abs_mean\nconv2d.weight_threshold = stat.abs_mean.abs_mean"
    ).plan
    assert [r.stat.dims for r in refs(p)] == [(1,), (1, 2, 3)]


def test_default_collection_covers_types() -> None:
    p = compile_("profile default.data_in: range_min_max\nlinear.data_in_max = stat.range_min_max.max").plan
    assert [q.reason for q in p.profile] == ["profiled"]


def test_a_statistic_collected_elsewhere_is_also_collected_for_the_rule() -> None:
    p = compile_(
        'profile relu.data_in: range_min_max(abs = true)\n"seq_blocks.1".data_in_max = stat.range_min_max.max'
    ).plan
    assert refs(p)[0].stat == StatSpec("range_min_max", abs=True)
    added = [q for q in p.profile if q.reason == "referenced"]
    assert [(q.selector, q.tensor, q.stats) for q in added] == [
        (Selector("name", "seq_blocks.1"), "data_in_0", (StatSpec("range_min_max", abs=True),))
    ]


def test_every_referenced_statistic_is_collected_for_its_rule() -> None:
    for name in ("toy_ternary.tq", "issue_examples.tq", "statistics.tq", "referenced.tq"):
        p = compile_file(OK_DIR / name).plan
        for b in p.bindings:
            for r in plan.expr_stat_refs(b.value):
                assert any(
                    q.tensor == r.tensor
                    and r.stat in q.stats
                    and (q.selector == b.selector or (q.selector.kind == "default" and b.selector.kind != "glob"
                                                      and b.selector.kind != "name"))
                    for q in p.profile
                ), (name, b)


def test_scaling_activations_adds_the_threshold_mean_once_per_selector() -> None:
    p = compile_(
        "default { data_in_scaling_factor = true }\ndefault.data_in_scaling_factor = true\n"
        "linear.data_in_scaling_factor = true\nrelu.data_in_scaling_factor = false\n"
        "linear.weight_scaling_factor = true"
    ).plan
    derived = [q for q in p.profile if q.reason == "derived"]
    assert [(q.selector, q.tensor, q.stats) for q in derived] == [
        (Selector("default"), "data_in_0", (StatSpec("threshold_abs_mean"),)),
        (Selector("type", "linear"), "data_in_0", (StatSpec("threshold_abs_mean"),)),
    ]
    assert derived[0].origin.line == 1


# --- order, precedence, includes -------------------------------------------------------------------------


def test_issue_example_precedence() -> None:
    p = compile_file(OK_DIR / "issue_examples.tq").plan
    # the name selector beats the type rule from the included recipe
    assert winner(p, "seq_blocks.1", "relu", "data_in_median").value == Const(-0.0097)
    # equal rank: the including file's rule is later than the included one
    assert isinstance(winner(p, "seq_blocks.0", "linear", "data_in_max").value, Call)
    # type beats default; default still applies where nothing else does
    assert winner(p, "seq_blocks.0", "linear", "weight_width").selector == Selector("type", "linear")
    assert winner(p, "seq_blocks.1", "relu", "name").value == Const("ternary")
    assert winner(p, "seq_blocks.1", "relu", "data_in_width").selector == Selector("glob", "seq_blocks.*")


def test_included_statements_come_first_wherever_the_include_is(tmp_path: pathlib.Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.tq").write_text("linear.weight_width = 32\n")
    (tmp_path / "sub" / "main.tq").write_text('linear.weight_width = 2\ninclude "base.tq"\n')
    monkeypatch.chdir(tmp_path)
    compiled = compile_file("sub/main.tq")
    p = compiled.plan
    assert p.sources == ("sub/main.tq", "sub/base.tq")
    assert [(b.origin.file, b.value) for b in sorted(p.bindings, key=lambda b: b.order)] == [
        ("sub/base.tq", Const(32)),
        ("sub/main.tq", Const(2)),
    ]
    assert winner(p, "fc", "linear", "weight_width").value == Const(2)
    assert compiled.warnings == ()  # overriding an included rule is what include is for


def test_each_file_is_included_once(tmp_path: pathlib.Path) -> None:
    (tmp_path / "common.tq").write_text("linear.weight_width = 2\n")
    (tmp_path / "a.tq").write_text('include "common.tq"\nrelu.data_in_width = 2\n')
    (tmp_path / "b.tq").write_text('include "common.tq"\nconv2d.weight_width = 2\n')
    (tmp_path / "main.tq").write_text('include "a.tq"\ninclude "b.tq"\n')
    p = compile_file(tmp_path / "main.tq").plan
    assert [pathlib.Path(s).name for s in p.sources] == ["main.tq", "a.tq", "common.tq", "b.tq"]
    assert [str(b.selector) for b in p.bindings] == ["linear", "relu", "conv2d"]


def test_origins_are_one_based_lines_and_columns() -> None:
    p = compile_("\n\nprofile linear.weight: abs_mean\nrelu {\n  data_in_width = 2\n}").plan
    assert (p.profile[0].origin.line, p.profile[0].origin.col) == (3, 9)
    assert (p.bindings[0].origin.line, p.bindings[0].origin.col) == (5, 3)


def test_calibrate_defaults_and_later_blocks_win_key_by_key() -> None:
    assert compile_("").plan.calibration == plan.Calibration()
    compiled = compile_('calibrate { samples = 10  batch_size = 5 }\ncalibrate { samples = 20, split = "val" }')
    assert compiled.plan.calibration == plan.Calibration(samples=20, batch_size=5, split="val")
    assert [(w.span.line, w.severity) for w in compiled.warnings] == [(1, "warning")]


# --- warnings --------------------------------------------------------------------------------------------


def test_a_rule_replaced_later_in_the_same_file_is_a_warning() -> None:
    compiled = compile_("linear.weight_width = 2\nrelu.data_in_width = 2\nlinear { weight_width = 32 }")
    assert [(w.span.line, w.severity) for w in compiled.warnings] == [(1, "warning")]
    assert "never takes effect" in compiled.warnings[0].message and "line 3" in compiled.warnings[0].message
    assert len(compiled.plan.bindings) == 3


def test_different_selectors_for_the_same_modules_are_no_warning() -> None:
    compiled = compile_('"seq_blocks.0".weight_width = 2\n"seq_blocks_0".weight_width = 32\n'
                        "default.weight_width = 2\nlinear.weight_width = 2")
    assert compiled.warnings == ()


def test_warnings_are_shown_by_the_cli(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ternqc.cli import main

    f = tmp_path / "w.tq"
    f.write_text("linear.weight_width = 2\nlinear.weight_width = 32\n")
    assert main(["compile", str(f)]) == 0
    out, err = capsys.readouterr()
    assert f"{f}:1:1: warning: linear.weight_width is set again at line 2" in err
    assert "linear" in out


# --- errors: all of them, rendered -----------------------------------------------------------------------


def test_render_matches_the_mypy_style() -> None:
    text = "linear.weight_max = stat.range_minmax.max\n"
    with pytest.raises(CompileError) as info:
        compile_(text, "configs/bad.tq")
    col = text.index("range_minmax") + 1
    assert info.value.render().splitlines() == [
        f"configs/bad.tq:1:{col}: error: unknown statistic 'range_minmax'; did you mean 'range_min_max'?",
        "    1 | linear.weight_max = stat.range_minmax.max",
        "      | " + " " * (col - 1) + "^" * len("range_minmax"),
    ]


def test_all_errors_in_one_run_across_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "broken.tq").write_text("linear {\n")
    (tmp_path / "main.tq").write_text('include "broken.tq"\nrelu.weight_max = 1\nlinear.weight_width = 33\n')
    with pytest.raises(CompileError) as info:
        compile_file(tmp_path / "main.tq")
    places = [(pathlib.Path(d.span.file).name, d.span.line) for d in info.value.diagnostics]
    assert places == [("main.tq", 2), ("main.tq", 3), ("broken.tq", 1)]


def test_render_is_capped() -> None:
    text = "\n".join(f"linear.weight_width = {i + 33}" for i in range(25))
    with pytest.raises(CompileError) as info:
        compile_(text)
    assert len(info.value.diagnostics) == 25
    rendered = info.value.render()
    assert rendered.count(": error: ") == 20
    assert rendered.endswith("… and 5 more errors")


@pytest.mark.parametrize(
    "text",
    [
        "linear.weight_max = " + "(" * 3000 + "1" + ")" * 3000,
        "linear.weight_max = 1" + " + 1" * 3000,
        "linear.weight_max = " + "-" * 3000 + "1",
        "linear.weight_width = " + "9" * 5000,
    ],
)
def test_extreme_input_compiles_or_is_a_compile_error(text: str) -> None:
    try:
        compiled = compile_(text)
    except CompileError as exc:
        assert exc.diagnostics
    else:
        assert len(compiled.plan.bindings) == 1


def test_unreadable_rules_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CompileError, match="cannot read rules file: no such file"):
        compile_file(tmp_path / "missing.tq")
    (tmp_path / "latin1.tq").write_bytes(b"# caf\xe9\n")
    with pytest.raises(CompileError, match="not UTF-8"):
        compile_file(tmp_path / "latin1.tq")
    with pytest.raises(CompileError, match="directory"):
        compile_file(tmp_path)


def test_byte_order_mark_and_crlf_are_fine(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "bom.tq"
    f.write_bytes(b"\xef\xbb\xbflinear.weight_width = 2\r\nrelu.data_in_width = 2\r\n")
    assert len(compile_file(f).plan.bindings) == 2
