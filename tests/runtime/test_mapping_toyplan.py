"""The plan of configs/toy_ternary.tq built by hand (for mapping tests that must not depend on the compiler),
and a check that the compiler, once it exists, lowers the shipped recipe to the same bindings."""

from __future__ import annotations

from pathlib import Path

from ternqc.plan import Binding, Calibration, Const, Origin, Plan, ProfilePoint, Selector, StatRef, StatSpec

REPO = Path(__file__).resolve().parents[2]
TOY_TQ = REPO / "configs" / "toy_ternary.tq"
TOY_FILE = "configs/toy_ternary.tq"
RANGE_MIN_MAX = StatSpec("range_min_max", "all", False)
MEDIAN = StatSpec("range_quantile", "all", False, (("quantile", 0.5),))
DEFAULT, LINEAR, RELU = Selector("default"), Selector("type", "linear"), Selector("type", "relu")


def toy_plan(file: str = TOY_FILE) -> Plan:
    """configs/toy_ternary.tq as a Plan: one binding per statement, origins at the statements' lines."""
    rows = [
        (DEFAULT, "name", Const("ternary"), 15, 5),
        (DEFAULT, "data_in_width", Const(2), 16, 5),
        (DEFAULT, "data_in_scaling_factor", Const(True), 17, 5),
        (LINEAR, "weight_width", Const(2), 21, 5),
        (LINEAR, "weight_scaling_factor", Const(True), 22, 5),
        (LINEAR, "bias_width", Const(2), 23, 5),
        (LINEAR, "bias_scaling_factor", Const(True), 24, 5),
    ]
    line = 28
    for sel, tensors in ((LINEAR, ("data_in", "weight", "bias")), (RELU, ("data_in",))):
        for tensor in tensors:
            canonical = "data_in_0" if tensor == "data_in" else tensor
            rows.append((sel, f"{tensor}_median", StatRef(canonical, MEDIAN, "max"), line, 1))
            rows.append((sel, f"{tensor}_max", StatRef(canonical, RANGE_MIN_MAX, "max"), line + 1, 1))
            line += 2
    bindings = [
        Binding(sel, p, v, Origin(file, ln, col), order=i) for i, (sel, p, v, ln, col) in enumerate(rows)
    ]
    profile = [
        ProfilePoint(sel, tensor, (RANGE_MIN_MAX, MEDIAN), Origin(file, 9, col))
        for sel, tensor, col in (
            (LINEAR, "weight", 9), (LINEAR, "bias", 24), (LINEAR, "data_in_0", 37), (RELU, "data_in_0", 53)
        )
    ]
    calibration = Calibration(32, 128, "train")
    return Plan(sources=(file,), calibration=calibration, profile=profile, bindings=bindings)


def test_hand_built_plan_follows_the_shipped_recipe_lines():
    lines = TOY_TQ.read_text().splitlines()
    for b in toy_plan().bindings:
        text = lines[b.origin.line - 1]
        assert b.param in text, (b.param, text)


def compiled_toy_plan() -> Plan:
    """The compiler's plan of configs/toy_ternary.tq."""
    from ternqc.compiler import compile_file

    return compile_file(str(TOY_TQ)).plan


def test_compiled_recipe_has_the_hand_built_bindings():
    plan = compiled_toy_plan()
    got = {(b.selector, b.param, b.value) for b in plan.bindings}
    document = {(b.selector, b.param, b.value) for b in toy_plan().bindings}
    assert document <= got
    # beyond the document: convolutions bound as the linear layers are
    linear = {(param, value) for sel, param, value in document if sel.pattern == "linear"}
    for conv in ("conv1d", "conv2d"):
        assert {(param, value) for sel, param, value in got - document if sel.pattern == conv} == linear
    by_param = {(b.selector, b.param): b for b in plan.bindings}
    for b in toy_plan().bindings:
        assert by_param[(b.selector, b.param)].origin.line == b.origin.line
