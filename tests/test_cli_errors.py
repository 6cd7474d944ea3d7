"""Bad input to `ternqc profile` / `apply` end to end (issue 3 point 5, issue 4 point 6): exit 1, one clear
`ternqc: error:` paragraph naming the culprit, no traceback; a checkpoint holding Python objects is refused
without running them; a failed `apply` leaves its output folder as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.test_cli_support import (
    APPLY_OUTPUTS,
    FIXTURES,
    Trained,
    assert_one_clean_error,
    run_cli,
    trained_toy_fixture,  # noqa: F401 - registers the session fixture trained_toy
)

BAD = FIXTURES / "bad_factories.py"


def _apply(out: Path, *args) -> object:
    return run_cli("apply", *args, "--out", out, "--no-progress")


def _assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    """`out` holds exactly the files it held before, with the same bytes (no temporary files either)."""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["profile", "apply"])
def test_missing_checkpoint(tmp_path, command) -> None:
    ckpt = tmp_path / "nope.ckpt"
    out = tmp_path / "out"
    run = run_cli(command, "--ckpt", ckpt, "--out", out, "--no-progress")
    assert_one_clean_error(run, str(ckpt), "does not exist")
    assert not out.exists()


def test_truncated_checkpoint(tmp_path, trained_toy: Trained) -> None:
    ckpt = tmp_path / "cut.ckpt"
    data = trained_toy.ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert_one_clean_error(_apply(tmp_path / "out", "--ckpt", ckpt), str(ckpt), "truncated")


class _Payload:
    """Unpickling this calls `open(marker, "w")`: the marker file proves that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_a_pickled_object_is_refused_and_nothing_runs(tmp_path) -> None:
    marker = tmp_path / "ran.txt"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.seq_blocks.0.weight": _Payload(marker)}}, ckpt)
    run = _apply(tmp_path / "out", "--ckpt", ckpt)
    assert_one_clean_error(run, str(ckpt), "refused")
    assert not marker.exists()


def test_key_and_shape_mismatch_names_them(tmp_path, trained_toy: Trained) -> None:
    raw = torch.load(trained_toy.ckpt, weights_only=True)
    state = dict(raw["state_dict"])
    state["model.seq_blocks.2.weight"] = torch.zeros(3, 3)
    del state["model.seq_blocks.4.bias"]
    state["model.extra.weight"] = torch.zeros(1)
    ckpt = tmp_path / "bad.ckpt"
    torch.save({**raw, "state_dict": state}, ckpt)
    run = _apply(tmp_path / "out", "--ckpt", ckpt)
    assert_one_clean_error(run, str(ckpt), "seq_blocks.2.weight", "[3, 3]", "[100, 100]", "seq_blocks.4.bias",
                           "extra.weight")


# ---------------------------------------------------------------------------------------------------------
# Factories and data
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "factory", "needles"),
    [
        ("--model", "model_raises", ("model_raises", "ValueError", "fails on purpose")),
        ("--model", "model_returns_dict", ("model_returns_dict", "dict", "nn.Module")),
        ("--model", "no_such_factory", ("no_such_factory",)),
        ("--dataset", "data_raises", ("data_raises", "RuntimeError", "fails on purpose")),
        ("--dataset", "data_returns_list", ("data_returns_list", "list", "Dataset")),
        ("--dataset", "data_empty", ("data_empty", "empty")),
        ("--dataset", "data_wrong_shape", ("seq_blocks.0", "Linear", "[8, 1, 3, 3]")),
    ],
)
@pytest.mark.parametrize("command", ["profile", "apply"])
def test_bad_factories_and_data(tmp_path, command, option, factory, needles) -> None:
    out = tmp_path / "out"
    run = run_cli(command, option, f"{BAD}:{factory}", "--out", out, "--no-progress")
    assert_one_clean_error(run, *needles)
    assert not out.exists()


def test_unknown_builtin_model_suggests_the_name(tmp_path) -> None:
    assert_one_clean_error(_apply(tmp_path / "out", "--model", "tyo"), "'tyo'", "did you mean 'toy'")


# ---------------------------------------------------------------------------------------------------------
# Rules, plans and values
# ---------------------------------------------------------------------------------------------------------


def test_selector_matching_no_module_names_the_rule_and_the_closest_name(tmp_path,
                                                                         trained_toy: Trained) -> None:
    rules = tmp_path / "typo.tq"
    rules.write_text('default { name = "ternary"  data_in_width = 32 }\n'
                     '"seq_blokcs.0" { data_in_width = 2 }\n')
    run = _apply(tmp_path / "out", "--ckpt", trained_toy.ckpt, "--rules", rules)
    assert_one_clean_error(run, f"{rules}:2:", '"seq_blokcs.0"', "did you mean", '"seq_blocks.0"')


def test_unresolvable_threshold_names_node_tensor_and_rules(tmp_path, trained_toy: Trained) -> None:
    rules = tmp_path / "nothreshold.tq"
    rules.write_text('default { name = "ternary" }\nlinear {\n    weight_width = 2\n}\n')
    run = _apply(tmp_path / "out", "--ckpt", trained_toy.ckpt, "--rules", rules)
    line = assert_one_clean_error(run, "seq_blocks_0", "threshold", "weight", str(rules))
    assert f"weight_width = 2 (rule at {rules}:3:5)" in line  # the rule that set the width, exactly


def test_negative_threshold_expression_names_node_param_and_rule(tmp_path, trained_toy: Trained) -> None:
    rules = tmp_path / "negative.tq"
    rules.write_text(
        "profile linear.weight: range_min_max\n"
        'default { name = "ternary" }\n'
        "linear { weight_width = 2 }\n"
        "linear.weight_threshold = stat.range_min_max.min\n"
    )
    run = _apply(tmp_path / "out", "--ckpt", trained_toy.ckpt, "--rules", rules)
    assert_one_clean_error(run, "seq_blocks_0", "weight_threshold", f"{rules}:4:", "negative")


def test_negative_scale_expression_names_node_param_and_rule(tmp_path, trained_toy: Trained) -> None:
    rules = tmp_path / "scale.tq"
    rules.write_text('default { name = "ternary" }\nlinear { weight_width = 2  weight_threshold = 0.01 }\n'
                     "linear.weight_scale = 0 - 1\n")
    run = _apply(tmp_path / "out", "--ckpt", trained_toy.ckpt, "--rules", rules)
    assert_one_clean_error(run, "seq_blocks_0", "weight_scale", f"{rules}:3:", "negative")


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('{"version": 1, "sources": [', ("invalid JSON",)),
        ('{"version": 99}', ("version",)),
        ('{"version": 1, "sources": []}', ("malformed plan",)),
        (None, ("cannot read plan",)),
    ],
)
def test_bad_plan_file(tmp_path, text, needles) -> None:
    plan = tmp_path / "plan.json"
    if text is not None:
        plan.write_text(text)
    assert_one_clean_error(_apply(tmp_path / "out", "--plan", plan), str(plan), *needles)


def test_rules_and_plan_together_is_a_usage_error(tmp_path, capsys) -> None:
    run = run_cli("apply", "--rules", "a.tq", "--plan", "p.json", "--out", tmp_path / "out")
    assert run.rc == 2
    assert not (tmp_path / "out").exists()
    capsys.readouterr()  # argparse writes its usage message to the real stderr


def test_bad_calibration_settings(tmp_path, trained_toy: Trained) -> None:
    run = _apply(tmp_path / "out", "--ckpt", trained_toy.ckpt, "--samples", "0")
    assert_one_clean_error(run, "samples")


# ---------------------------------------------------------------------------------------------------------
# Outputs are all or nothing
# ---------------------------------------------------------------------------------------------------------


def _previous_outputs(out: Path) -> dict[str, bytes]:
    out.mkdir()
    for name in APPLY_OUTPUTS:
        (out / name).write_bytes(f"previous {name}\n".encode())
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_failed_apply_leaves_previous_outputs_untouched(tmp_path, trained_toy: Trained) -> None:
    out = tmp_path / "out"
    before = _previous_outputs(out)
    rules = tmp_path / "nothreshold.tq"
    rules.write_text('default { name = "ternary" }\nlinear { weight_width = 2 }\n')
    assert _apply(out, "--ckpt", trained_toy.ckpt, "--rules", rules).rc == 1
    _assert_untouched(out, before)


def test_failed_write_of_one_output_writes_none(tmp_path, trained_toy: Trained, monkeypatch) -> None:
    """report.json, the last file, cannot be written (the disk fills up): the other three keep their old
    content, and nothing is left beside the folder. (A folder in the way no longer fails: the output folder
    is replaced as a whole.)"""
    from ternqc.runtime.errors import UserError
    from ternqc.runtime.run import pipeline

    out = tmp_path / "out"
    before = _previous_outputs(out)

    def disk_full(path, text, encoding="utf-8"):
        raise UserError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(pipeline, "atomic_write_text", disk_full)
    run = _apply(out, "--ckpt", trained_toy.ckpt)
    assert_one_clean_error(run, "report.json", "No space left")
    _assert_untouched(out, before)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_unwritable_output_folder(tmp_path, trained_toy: Trained) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert_one_clean_error(_apply(out, "--ckpt", trained_toy.ckpt), str(out))
    finally:
        out.chmod(0o700)


def test_output_folder_that_is_a_file(tmp_path, trained_toy: Trained) -> None:
    out = tmp_path / "out"
    out.write_text("a file, not a folder\n")
    assert_one_clean_error(_apply(out, "--ckpt", trained_toy.ckpt), str(out))
    assert out.read_text() == "a file, not a folder\n"


def test_negative_quantile_budget_is_one_clean_error(tmp_path: Path) -> None:
    run = run_cli("profile", "--quantile-budget-mib", "-1", "--out", tmp_path / "s.toml", "--no-progress")
    assert_one_clean_error(run, "--quantile-budget-mib")
    assert not (tmp_path / "s.toml").exists()
