"""A type rule about biases (`linear.bias_max = ...` in the default recipe) on a model whose Linear has no bias:
that module has no bias to profile or quantise, and the rest of the flow goes on."""

from __future__ import annotations

import json
from pathlib import Path

import toml

from tests.test_cli_support import FIXTURES, run_cli


def test_default_recipe_runs_on_a_linear_without_bias(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = run_cli("apply", "--model", f"{FIXTURES / 'biasless_model.py'}:factory", "--out", out, "--no-progress")
    assert run.rc == 0, run.err
    report = json.loads((out / "report.json").read_text())
    assert report["nodes"]["1"]["tensors"]["bias"] == {"quantized": False}  # no bias: nothing quantised
    assert report["nodes"]["3"]["tensors"]["bias"]["quantized"]  # the other Linear's bias is ternary
    stats = toml.load(out / "stats.toml")
    assert "bias" not in stats["1"]["software"]["args"] and "bias" in stats["3"]["software"]["args"]
    config = toml.load(out / "quant_config.toml")["passes"]["quantize"]
    assert config["1"]["config"]["bias_width"] == "NA" and config["3"]["config"]["bias_width"] == 2


def test_a_rule_naming_the_module_still_asks_for_its_bias(tmp_path: Path) -> None:
    rules = tmp_path / "r.tq"
    rules.write_text('profile "1".bias: range_min_max(dims = all)\n')
    run = run_cli("profile", "--model", f"{FIXTURES / 'biasless_model.py'}:factory", "--rules", rules,
                  "--out", tmp_path / "s.toml", "--no-progress")
    assert run.rc == 1 and "has no bias" in run.err and f"{rules}:1:" in run.err
