"""`ternqc compile` through `main([...])`: exit codes, the summary, the plan file, messages."""

from __future__ import annotations

import json
import pathlib

import pytest

from ternqc.cli import main
from ternqc.compiler import builtin_recipe, compile_file
from ternqc.plan import Plan


def test_compile_prints_a_summary_and_writes_the_plan(tmp_path: pathlib.Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "plan.json"
    recipe = str(builtin_recipe())
    assert main(["compile", recipe, "-o", str(out_file)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    # what is profiled where, which parameters for which selectors, what the compiler added and why
    assert "linear.weight" in out and "range_quantile(quantile=0.5)" in out
    assert "relu.data_in" in out
    assert "data_in_median" in out and "weight_scaling_factor = true" in out
    assert "threshold_abs_mean" in out and "why:" in out
    assert f"wrote plan to {out_file}" in out
    assert Plan.from_dict(json.loads(out_file.read_text())) == compile_file(recipe).plan


def test_compile_without_output_writes_nothing(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["compile", str(builtin_recipe())]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "wrote" not in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_unreadable_rules_file_is_exit_1_with_a_message(kind: str, tmp_path: pathlib.Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rules.tq"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)))
    assert main(["compile", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}: error: cannot read rules file" in err
    assert "Traceback" not in err


def test_unwritable_output_is_exit_1(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(builtin_recipe()), "-o", str(tmp_path / "no" / "such" / "plan.json")]) == 1
    assert "cannot write plan" in capsys.readouterr().err


def test_errors_go_to_stderr_with_a_count(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.tq"
    path.write_text("relu.weight_max = 1\nlinear.weight_width = true\n")
    assert main(["compile", str(path), "-o", str(tmp_path / "plan.json")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}:1:6: error: relu has no tensor 'weight'" in err
    assert f"{path}:2:23: error: weight_width takes an integer" in err
    assert "2 errors" in err
    assert not (tmp_path / "plan.json").exists()


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile"]) == 2
    assert "usage" in capsys.readouterr().err
