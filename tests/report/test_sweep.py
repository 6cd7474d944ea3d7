"""`ternqc sweep` (issue 15): each combination's accuracy and zero fractions equal a separate `ternqc apply`
with that value written into the rules (same seed, same batches); one calibration for the whole sweep (one
per value when the value changes the profile); every combination of several names; sweep.csv, sweep.json and
the printed table agree; `--workers 2` gives the same rows; option errors.

Until the language's `let`/`--set` (issue 11) is in this build, the seam `ternqc.sweep.compile_with_sets` is
replaced here by a test-only one that writes each value into a placeholder `{{NAME}}` of the rules text.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

import ternqc.sweep as sweep_cli
from ternqc.compiler import compile_source
from ternqc.runtime.run import pipeline
from tests.test_cli_support import (
    CONFIGS,
    assert_one_clean_error,
    run_cli,
    trained_toy_fixture,  # noqa: F401 - registers the session fixture trained_toy
)


def _substituting(rules: str, sets: dict[str, str]):
    text = Path(rules).read_text()
    for name, value in sets.items():
        assert "{{" + name + "}}" in text, name
        text = text.replace("{{" + name + "}}", value)
    return compile_source(text, rules).plan, ()


@pytest.fixture(name="placeholder_seam")
def placeholder_seam_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep_cli, "compile_with_sets", _substituting)


def _twn_with(tmp_path: Path, factor: str, name: str = "twn_k.tq") -> Path:
    """configs/twn.tq with its threshold factor (0.7, or the constant `k` once the language has `let`)
    replaced by `factor` (a number or a placeholder) in its three threshold rules."""
    text = (CONFIGS / "twn.tq").read_text()
    rule = re.compile(r"^(\w+\.weight_threshold = )(0\.7|k)( \* stat\.abs_mean\.abs_mean)$", re.M)
    text, n = rule.subn(lambda m: m.group(1) + factor + m.group(3), text)
    assert n == 3, text
    path = tmp_path / name
    path.write_text(text)
    return path


def _sweep(*args) -> tuple:
    run = run_cli("sweep", *args, "--no-progress")
    assert run.rc == 0, run
    return run


def test_each_value_gives_what_apply_gives_with_that_value_in_the_rules(
    placeholder_seam, trained_toy, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_profile = pipeline.profile
    monkeypatch.setattr(pipeline, "profile", lambda *a, **k: calls.append(1) or real_profile(*a, **k))
    rules = _twn_with(tmp_path, "{{k}}")
    out = tmp_path / "sweep"
    run = _sweep("--ckpt", trained_toy.ckpt, "--rules", rules, "--set", "k=0.4,0.9", "--out", out)
    assert len(calls) == 1  # one calibration for both values
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["calibrations"] == 1 and doc["swept"] == {"k": [0.4, 0.9]}
    for row, k in zip(doc["rows"], ("0.4", "0.9")):
        applied = tmp_path / f"apply-{k}"
        plain = run_cli(
            "apply",
            "--ckpt",
            trained_toy.ckpt,
            "--rules",
            _twn_with(tmp_path, k, f"twn_{k}.tq"),
            "--out",
            applied,
            "--no-progress",
        )
        assert plain.rc == 0, plain
        report = json.loads((applied / "report.json").read_text())
        zeros = {
            f"{n}.{t}": v["zero_fraction"]
            for n, e in report["nodes"].items()
            for t, v in e["tensors"].items()
            if v.get("quantized")
        }
        assert row["values"] == {"k": float(k)}
        assert row["ternary_accuracy"] == report["ternary_accuracy"]
        assert doc["float_accuracy"] == report["float_accuracy"]
        assert row["zero_fractions"] == zeros
        assert row["mean_zero_fraction"] == pytest.approx(sum(zeros.values()) / len(zeros), rel=1e-12)
    # the two values really differ (a larger threshold zeroes more weights)
    assert doc["rows"][1]["mean_zero_fraction"] > doc["rows"][0]["mean_zero_fraction"]
    # the table, the csv and the json agree
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["k", "ternary_accuracy", "vs_float", "mean_zero_fraction"]
    assert [float(r[1]) for r in table[1:]] == [round(r["ternary_accuracy"], 4) for r in doc["rows"]]
    printed = [" ".join(line.split()) for line in run.out.splitlines()]
    for line in table:
        assert " ".join(line) in printed, (line, run.out)


def test_every_combination_of_two_names(placeholder_seam, trained_toy, tmp_path) -> None:
    text = _twn_with(tmp_path, "{{k}}").read_text().replace("samples = 128", "samples = {{n}}")
    rules = tmp_path / "twn_kn.tq"
    rules.write_text(text)
    out = tmp_path / "sweep"
    _sweep(
        "--ckpt",
        trained_toy.ckpt,
        "--rules",
        rules,
        "--set",
        "k=0.5,0.7,0.9",
        "--set",
        "n=64,128",
        "--out",
        out,
    )
    doc = json.loads((out / "sweep.json").read_text())
    assert [r["values"] for r in doc["rows"]] == [
        {"k": k, "n": n} for k in (0.5, 0.7, 0.9) for n in (64, 128)
    ]
    assert doc["calibrations"] == 2  # the sample count changes the calibration; k does not
    html = (out / "sweep.html").read_text()
    assert html.count("<img") == 2 and "<script" not in html  # accuracy plot, zeros heatmap


def test_workers_give_the_same_rows(placeholder_seam, trained_toy, tmp_path) -> None:
    rules = _twn_with(tmp_path, "{{k}}")
    docs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        _sweep(
            "--ckpt",
            trained_toy.ckpt,
            "--rules",
            rules,
            "--set",
            "k=0.6,0.8",
            "--out",
            out,
            "--workers",
            workers,
        )
        docs.append(json.loads((out / "sweep.json").read_text()))
    assert docs[0]["rows"] == docs[1]["rows"]


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ("k", "expected NAME=VALUE"),
        ("k=", "expected NAME=VALUE"),
        ("k=0.5,,0.6", "expected NAME=VALUE"),
        ("2k=1", "expected NAME=VALUE"),
    ],
)
def test_bad_set_options_are_one_clean_error(placeholder_seam, option, needle, tmp_path) -> None:
    rules = _twn_with(tmp_path, "{{k}}")
    assert_one_clean_error(run_cli("sweep", "--rules", rules, "--set", option, "--out", tmp_path), needle)


def test_a_name_twice_and_a_missing_rules_file_option(placeholder_seam, tmp_path) -> None:
    rules = _twn_with(tmp_path, "{{k}}")
    assert_one_clean_error(run_cli("sweep", "--rules", rules, "--set", "k=1", "--set", "k=2"), "given twice")
    assert_one_clean_error(run_cli("sweep", "--set", "k=1"), "needs --rules")
    assert_one_clean_error(run_cli("sweep", "--rules", rules), "needs at least one --set")


def test_values_split_on_top_level_commas_only() -> None:
    assert sweep_cli.split_values('0.5, 0.6,"a,b",min(1, 2)') == ["0.5", "0.6", '"a,b"', "min(1, 2)"]
    assert sweep_cli.parse_set_options(["k=1,2", "m=x"]) == {"k": ["1", "2"], "m": ["x"]}
    assert [sweep_cli.display_value(v) for v in ("1", "0.5", '"x"')] == [1, 0.5, '"x"']


def test_the_seam_refuses_a_compiler_without_let_overrides(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ternqc.compiler as compiler

    monkeypatch.setattr(compiler, "compile_file", lambda path: None)
    rules = _twn_with(tmp_path, "0.7")
    assert_one_clean_error(run_cli("sweep", "--rules", rules, "--set", "k=1"), "`let`")


def _compiler_takes_overrides() -> bool:
    import inspect

    import ternqc.compiler as compiler

    return "overrides" in inspect.signature(compiler.compile_file).parameters and hasattr(
        compiler, "parse_sets"
    )


@pytest.mark.skipif(
    not _compiler_takes_overrides(), reason="the language's let/--set (issue 11) is not in this build"
)
def test_real_set_gives_what_apply_set_gives(trained_toy, tmp_path) -> None:
    """With the language's own `--set` (configs/twn.tq has `let k`): sweep = `apply --set k=...`, and the
    report shows the constant as set."""
    out = tmp_path / "sweep"
    _sweep("--ckpt", trained_toy.ckpt, "--rules", CONFIGS / "twn.tq", "--set", "k=0.5,0.9", "--out", out)
    doc = json.loads((out / "sweep.json").read_text())
    for row in doc["rows"]:
        k = row["values"]["k"]
        applied = tmp_path / f"apply-{k}"
        run = run_cli(
            "apply",
            "--ckpt",
            trained_toy.ckpt,
            "--rules",
            CONFIGS / "twn.tq",
            "--set",
            f"k={k}",
            "--out",
            applied,
            "--report",
            "--no-progress",
        )
        assert run.rc == 0, run
        report = json.loads((applied / "report.json").read_text())
        assert row["ternary_accuracy"] == report["ternary_accuracy"]
        assert report["constants"]["k"]["value"] == k
        assert f"k = {k}" in (applied / "report.html").read_text()


def test_reports_of_each_combination_equal_apply_reports(placeholder_seam, trained_toy, tmp_path) -> None:
    rules = _twn_with(tmp_path, "{{k}}")
    out = tmp_path / "sweep"
    _sweep("--ckpt", trained_toy.ckpt, "--rules", rules, "--set", "k=0.6", "--out", out, "--reports")
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["rows"][0]["report"] == "k=0.6/report.html"
    assert (out / "k=0.6" / "report.html").is_file()
    applied = tmp_path / "apply"
    fixed = _twn_with(tmp_path, "0.6", "twn_06.tq")
    run = run_cli("apply", "--ckpt", trained_toy.ckpt, "--rules", fixed, "--out", applied, "--no-progress")
    assert run.rc == 0, run

    def comparable(path: Path, rules_file: Path) -> dict:
        report = json.loads(path.read_text().replace(json.dumps(str(rules_file))[1:-1], "RULES"))
        del report["run"]  # the rules files differ in name (and here in text)
        return report

    assert comparable(out / "k=0.6" / "report.json", rules) == comparable(applied / "report.json", fixed)
    assert 'href="k=0.6/report.html"' in (out / "sweep.html").read_text()


def test_report_command_redraws_a_sweep(placeholder_seam, trained_toy, tmp_path) -> None:
    out = tmp_path / "sweep"
    _sweep(
        "--ckpt", trained_toy.ckpt, "--rules", _twn_with(tmp_path, "{{k}}"), "--set", "k=0.5", "--out", out
    )
    again = tmp_path / "again.html"
    assert run_cli("report", out, "-o", again).rc == 0
    assert again.read_text() == (out / "sweep.html").read_text()
    (out / "sweep.json").write_text('{"rows": 3}')
    assert_one_clean_error(run_cli("report", out), "is not a ternqc sweep")


@pytest.mark.skipif(
    not _compiler_takes_overrides(), reason="the language's let/--set (issue 11) is not in this build"
)
def test_assertions_are_checked_in_every_combination_as_apply_checks_them(trained_toy, tmp_path) -> None:
    rules = tmp_path / "twn_assert.tq"
    rules.write_text(
        (CONFIGS / "twn.tq").read_text() + '\nassert linear: weight_zero_fraction < 0.45, "too dense"\n'
    )
    out = tmp_path / "sweep"
    _sweep("--ckpt", trained_toy.ckpt, "--rules", rules, "--set", "k=0.5,0.9", "--out", out)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["assertions"] == 1
    for row in doc["rows"]:
        k = row["values"]["k"]
        applied = tmp_path / f"apply-{k}"
        run = run_cli(
            "apply",
            "--ckpt",
            trained_toy.ckpt,
            "--rules",
            rules,
            "--set",
            f"k={k}",
            "--out",
            applied,
            "--no-progress",
        )
        failures = json.loads((applied / "report.json").read_text())["assertions"]["failures"]
        assert run.rc == (1 if failures else 0)
        assert len(row["failed_assertions"]) == len(failures)
    assert [bool(r["failed_assertions"]) for r in doc["rows"]] == [False, True]  # k=0.9 zeroes more than 45%
    with open(out / "sweep.csv", newline="") as f:
        assert [line[-1] for line in csv.reader(f)] == [
            "assertions",
            "hold",
            f"{len(doc['rows'][1]['failed_assertions'])} failed",
        ]


@pytest.mark.skipif(
    not _compiler_takes_overrides(), reason="the language's let/--set (issue 11) is not in this build"
)
def test_compile_warnings_are_printed_once(trained_toy, tmp_path) -> None:
    rules = tmp_path / "shadowed.tq"
    rules.write_text(
        (CONFIGS / "twn.tq").read_text()
        + '\n"seq_blocks_0".weight_width = 2\n"seq_blocks_0".weight_width = 2\n'
    )
    run = run_cli(
        "sweep",
        "--ckpt",
        trained_toy.ckpt,
        "--rules",
        rules,
        "--set",
        "k=0.5,0.9",
        "--out",
        tmp_path / "s",
        "--no-progress",
    )
    assert run.rc == 0, run
    warnings = [ln for ln in run.err.splitlines() if ": warning:" in ln]
    assert warnings and len(warnings) == len(set(warnings))
