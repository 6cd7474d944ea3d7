"""Language v2 end to end on a BERT-like model with nested names and an nn.MultiheadAttention
(tests/fixtures/bert_like.py): `ternqc compile --model`, `--explain`, `--set`, assertions that fail with the
outputs written, and the issue's tasks in tests/data/ok run on the model. Expected values come from the
model itself (its modules, its weights) and from relations, not from the code under test."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys

import pytest
from torch import nn

from ternqc.plan import StatSpec
from tests.test_cli_support import APPLY_OUTPUTS, CONFIGS, FIXTURES, REPO, run_cli

OK = REPO / "tests" / "data" / "ok"
BERT = f"{FIXTURES / 'bert_like.py'}:bert_like"
TRANSFORMER = f"{FIXTURES / 'bert_like.py'}:transformer"


def _model(factory: str) -> nn.Module:
    sys.path.insert(0, str(FIXTURES))
    try:
        import bert_like
    finally:
        sys.path.pop(0)
    return getattr(bert_like, factory)()


def _linears(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]


# --- compile --model ------------------------------------------------------------------------------------------


def test_compile_model_lists_what_each_selector_hits() -> None:
    run = run_cli("compile", OK / "task2_selection.tq", "--model", BERT)
    assert run.rc == 0, run.err
    model = _model("bert_like")
    expected = [p for p in _linears(model)
                if fnmatch.fnmatchcase(p, "*.attn.*") and not fnmatch.fnmatchcase(p, "*.attn.out_proj")]
    assert len(expected) == 6
    table = run.out.split("selectors on ", 1)[1]
    (line,) = [ln for ln in table.splitlines() if ln.strip().startswith('"*.attn.*" except')]
    hits = line.split(f" {len(expected)}: ", 1)[1]
    shown = [h.strip() for h in hits.split(", ") if not h.startswith("…")]
    assert shown and set(shown) <= set(expected)


def test_compile_model_selector_hitting_nothing_is_an_error_with_did_you_mean(tmp_path) -> None:
    rules = tmp_path / "r.tq"
    rules.write_text('include recipe "twn"\n"encoder.layer.0.linear1".weight_width = 32\n')
    run = run_cli("compile", rules, "--model", BERT)
    assert run.rc == 1 and "Traceback" not in run.err
    assert 'matched no module' in run.err and 'did you mean "encoder.layers.0.linear1"' in run.err
    assert f"{rules}:2:1" in run.err


def test_compile_model_warns_about_a_shadowed_rule_with_both_places(tmp_path) -> None:
    rules = tmp_path / "r.tq"
    rules.write_text('include recipe "twn"\n"*.attn.out_proj".weight_width = 32\n"*.attn.*".weight_width = 2\n')
    run = run_cli("compile", rules, "--model", BERT)
    assert run.rc == 0, run.err
    (warning,) = [ln for ln in run.err.splitlines() if "never takes effect" in ln and ln.startswith("ternqc:")]
    assert f"{rules}:2:1" in warning and f"{rules}:3:1" in warning
    # the compiler sees this one without the model too
    assert any(ln.startswith(f"{rules}:2:1: warning:") for ln in run.err.splitlines())


def test_compile_explain_names_the_winning_rule() -> None:
    run = run_cli("compile", OK / "task1_first_last_float.tq", "--model", BERT, "--explain")
    assert run.rc == 0, run.err
    linears = _linears(_model("bert_like"))
    blocks = run.out.split("\n" + linears[0] + " (linear)\n", 1)[1]
    first_block = blocks.split("\n\n")[0].split("\n" + linears[1])[0]
    (width,) = [ln for ln in first_block.splitlines() if ln.strip().startswith("weight_width")]
    assert "= 32" in width and "task1_first_last_float.tq:3:" in width and "first(linear)" in width


def test_compile_options_need_model() -> None:
    assert run_cli("compile", OK / "task1_first_last_float.tq", "--explain").rc == 2


def test_compile_with_set_stays_torch_and_numpy_free() -> None:
    code = ("import sys\nfrom ternqc.cli import main\n"
            f"rc = main(['compile', {str(OK / 'task8_recipe_sweep.tq')!r}, '--set', 'k=0.5'])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules\n"
            # numpy alone costs ~0.15 s of the 0.4 s budget of `ternqc compile`
            "assert 'numpy' not in sys.modules, 'ternqc compile imported numpy'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "k = 0.5   (--set)" in result.stdout


# --- apply ----------------------------------------------------------------------------------------------------


def _apply(tmp_path, rules, *extra, model=BERT):
    out = tmp_path / "out"
    run = run_cli("apply", "--rules", rules, "--model", model, "--out", out, "--no-progress", *extra)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return run, out, report


def test_failed_assertion_exits_1_names_each_module_and_writes_the_outputs(tmp_path) -> None:
    run, out, report = _apply(tmp_path, OK / "task7_asserts.tq", "--set", "max_zeros=0.0")
    assert run.rc == 1 and "Traceback" not in run.err
    assert all((out / name).exists() for name in APPLY_OUTPUTS)
    # every quantised weight with any zero fails "zero fraction <= 0"; read from the report's own table
    expected = {n["path"] for n in report["nodes"].values()
                if n["tensors"].get("weight", {}).get("quantized") and n["tensors"]["weight"]["zero_fraction"] > 0}
    assert expected
    failures = report["assertions"]["failures"]
    assert {f["module"] for f in failures} == expected
    for f in failures:
        assert f["assert"].endswith("task7_asserts.tq:4:1") and f["values"]["weight_zero_fraction"] > 0
        assert f["module"] in run.err
    constant = report["constants"]["max_zeros"]
    assert (constant["value"], constant["how"]) == (0.0, "set") and constant["origin"].endswith("task7_asserts.tq:2:1")


def test_assertions_that_hold_exit_0(tmp_path) -> None:
    run, _out, report = _apply(tmp_path, OK / "task7_asserts.tq")
    assert run.rc == 0, run.err
    assert report["assertions"] == {"checked": 2, "failures": []}


def test_sweep_with_set_scales_every_threshold(tmp_path) -> None:
    deltas = {}
    for k in ("0.6", "0.8"):
        run, _out, report = _apply(tmp_path / k, OK / "task8_recipe_sweep.tq", "--set", f"k={k}")
        assert run.rc == 0, run.err
        assert report["constants"]["k"]["value"] == float(k) and report["constants"]["k"]["how"] == "set"
        deltas[k] = {n["path"]: n["tensors"]["weight"]["delta"] for n in report["nodes"].values()
                     if n["tensors"].get("weight", {}).get("quantized")}
    assert set(deltas["0.6"]) == set(deltas["0.8"]) and "encoder.layers.1.linear2" not in deltas["0.6"]
    for path, d in deltas["0.6"].items():
        assert d == pytest.approx(deltas["0.8"][path] * 0.6 / 0.8, rel=1e-5)  # Δ = k · mean|W|


def test_first_and_last_linear_stay_in_float(tmp_path) -> None:
    run, _out, report = _apply(tmp_path, OK / "task1_first_last_float.tq")
    assert run.rc == 0, run.err
    by_path = {n["path"]: n for n in report["nodes"].values()}
    model = _model("bert_like")
    uncalled = {f"{p}.out_proj" for p, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    linears = [p for p in _linears(model) if p in by_path and p not in uncalled]
    assert not by_path[linears[0]]["tensors"]["weight"]["quantized"]
    assert not by_path[linears[-1]]["tensors"]["weight"]["quantized"]
    assert all(by_path[p]["tensors"]["weight"]["quantized"] for p in linears[1:-1])


def test_wide_input_stays_in_float(tmp_path) -> None:
    from ternqc.compiler import compile_file
    from ternqc.runtime.run import pipeline

    plan = compile_file(OK / "task6_wide_input_float.tq").plan
    (bound,) = [c.value for c in plan.constants if c.name == "bound"]
    settings = pipeline.RunSettings(model=BERT, dataset="toy-tiny", progress=False)
    result = pipeline.apply(pipeline.load_model(settings), plan, settings)
    mmax = StatSpec("range_min_max")
    ranges = {p: ms.lookup("data_in_0", mmax)["range"] for p, ms in result.profile.table.items()
              if ms.op == "linear" and ms.lookup("data_in_0", mmax) is not None}
    assert any(r > bound for r in ranges.values()) and any(r <= bound for r in ranges.values())
    for path, r in ranges.items():
        assert result.mapping.modules[path].params["data_in_width"] == (32 if r > bound else 2)
        assert result.configs[path].tensor("data_in").quantize == (r <= bound)


def _type_name_of_out_proj() -> str:
    from ternqc.runtime.calibrate.points import module_type

    return module_type(_model("transformer").encoder.layers[0].self_attn.out_proj)


def test_linear_selects_out_proj_quantises_its_weight_and_names_its_input(tmp_path) -> None:
    assert _type_name_of_out_proj() == "linear"  # isinstance type names (issue 9): `linear` selects subclasses
    compiled = run_cli("compile", OK / "task1_first_last_float.tq", "--model", TRANSFORMER)
    assert "encoder.layers.0.self_attn.out_proj" in compiled.out and "left in float" in compiled.err
    # the toy recipe quantises inputs too: a module that is never called has none to quantise (issue 9: its
    # weight is quantised in place, its input is named as not applied)
    run, _out, report = _apply(tmp_path, CONFIGS / "toy_ternary.tq", model=TRANSFORMER)
    assert run.rc == 0, run.err
    outs = [f"{p}.out_proj" for p, m in _model("transformer").named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(outs) == 3  # two encoder layers and the pooler
    by_path = {n["path"]: n for n in report["nodes"].values()}
    for path in outs:
        assert by_path[path]["tensors"]["weight"]["quantized"] is True
        assert "never called" in by_path[path]["tensors"]["data_in"]["not_applied"]
        assert f"ternqc: warning: {path}: data_in stays in float" in run.err
    assert "float (not applied)" in run.out


# --- map and profile take --set too ------------------------------------------------------------------------


def test_map_with_set_overrides_a_let(tmp_path) -> None:
    import toml

    from tests.test_cli_support import CONFIGS, DOC_STATS

    rules = tmp_path / "r.tq"
    rules.write_text(f'include "{CONFIGS / "toy_ternary.tq"}"\nlet f = 1\n'
                     "linear.weight_max = f * stat.range_min_max.max\n")
    configs = {}
    for f in ("1", "2.5"):
        out = tmp_path / f"q{f}.toml"
        run = run_cli("map", DOC_STATS, "--rules", rules, "-o", out, "--set", f"f={f}")
        assert run.rc == 0, run.err
        configs[f] = toml.load(out)["passes"]["quantize"]
    stats = toml.load(DOC_STATS)
    for node in ("seq_blocks_0", "seq_blocks_2", "seq_blocks_4"):
        w_max = stats[node]["software"]["args"]["weight"]["stat"]["range_min_max"]["max"]
        assert configs["1"][node]["config"]["weight_max"] == pytest.approx(w_max)
        assert configs["2.5"][node]["config"]["weight_max"] == pytest.approx(2.5 * w_max)


def test_set_with_a_compiled_plan_is_refused(tmp_path) -> None:
    plan = tmp_path / "p.json"
    assert run_cli("compile", OK / "task8_recipe_sweep.tq", "-o", plan).rc == 0
    run = run_cli("apply", "--plan", plan, "--set", "k=0.5", "--out", tmp_path / "o", "--no-progress")
    assert run.rc == 1 and "--set changes the rules" in run.err


def test_per_channel_is_per_output_channel_for_linear_and_conv2d_alike() -> None:
    import numpy as np

    from ternqc.compiler import compile_file
    from ternqc.runtime.run import pipeline

    spec = f"{FIXTURES / 'user_model.py'}:factory"
    settings = pipeline.RunSettings(model=spec, dataset=f"{FIXTURES / 'user_data.py'}:factory", progress=False)
    float_model = pipeline.load_model(settings)
    weights = {p: m.weight.detach().numpy() for p, m in float_model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert any(w.ndim == 4 for w in weights.values()) and any(w.ndim == 2 for w in weights.values())
    plan = compile_file(OK / "task3_per_channel.tq").plan
    result = pipeline.apply(pipeline.load_model(settings), plan, settings)
    for path, w in weights.items():
        expected = 0.7 * np.abs(w).mean(axis=tuple(range(1, w.ndim)), keepdims=True)  # one Δ per output channel
        got = np.asarray(result.configs[path].tensor("weight").delta, dtype=np.float64)
        np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-5)


@pytest.mark.parametrize("doc", ["README.md", "docs/LANGUAGE.md"])
def test_the_documented_bert_recipe_checks_against_the_bert_like_model(doc, tmp_path) -> None:
    text = (REPO / doc).read_text(encoding="utf-8")
    start = re.search(r'let k = 0\.7[^\n]*\ninclude recipe "twn" with \{ k = k \}', text).start()
    rules = tmp_path / "bert.tq"
    rules.write_text(text[start : text.index("```", start)], encoding="utf-8")
    run = run_cli("compile", rules, "--model", BERT)
    assert run.rc == 0, run.err
    assert "first(linear)" in run.out and 'linear in "encoder.*" except "*.attn.out_proj"' in run.out


def test_overriding_an_included_rule_is_not_a_shadowing_warning(tmp_path) -> None:
    rules = tmp_path / "r.tq"
    rules.write_text('include recipe "twn"\nlinear.weight_threshold = 0.5 * stat.abs_mean.abs_mean\n')
    run = run_cli("compile", rules, "--model", BERT)
    assert run.rc == 0 and "never takes effect" not in run.err, run.err


def _run_task(name: str, model: str = BERT):
    from ternqc.compiler import compile_file
    from ternqc.runtime.run import pipeline

    settings = pipeline.RunSettings(model=model, dataset="toy-tiny", progress=False)
    float_model = pipeline.load_model(settings)
    weights = {p: m.weight.detach().numpy() for p, m in float_model.named_modules() if isinstance(m, nn.Linear)}
    plan = compile_file(OK / name).plan
    return pipeline.apply(pipeline.load_model(settings), plan, settings), weights


def test_task2_quantises_exactly_the_selected_weights() -> None:
    result, weights = _run_task("task2_selection.tq")
    selected = {p for p in weights if fnmatch.fnmatchcase(p, "encoder.layers.*.linear1")
                or (fnmatch.fnmatchcase(p, "*.attn.*") and not fnmatch.fnmatchcase(p, "*.attn.out_proj"))}
    quantised = {p for p, c in result.configs.items() if c.tensor("weight").quantize}
    assert quantised == selected and len(selected) == 8


def test_task4_first_layer_factor_and_the_rest() -> None:
    import numpy as np

    result, weights = _run_task("task4_let_override.tq")
    first = next(iter(weights))
    for path, w in weights.items():
        if path not in result.configs or not result.configs[path].tensor("weight").quantize:
            continue
        factor = 0.5 if path == first else 0.7
        delta = float(np.asarray(result.configs[path].tensor("weight").delta))
        assert delta == pytest.approx(factor * np.abs(w).mean(), rel=1e-5), path


def test_task5_threshold_from_the_previous_layers_output() -> None:
    result, _weights = _run_task("task5_expressions.tq")
    mmax = StatSpec("range_min_max")
    act_max = result.profile.table["encoder.layers.0.act"].lookup("data_out_0", mmax)["max"]
    delta = result.configs["encoder.layers.0.linear2"].tensor("data_in").delta
    assert float(delta) == pytest.approx(0.5 * act_max, rel=1e-6)
    # and the others: Δ = max(mean + 2·sqrt(variance), 0) of their own input
    var = StatSpec("variance_precise")
    stats = result.profile.table["encoder.layers.0.linear1"].lookup("data_in_0", var)
    expected = max(stats["mean"] + 2 * stats["variance"] ** 0.5, 0)
    assert float(result.configs["encoder.layers.0.linear1"].tensor("data_in").delta) == pytest.approx(expected)


def test_activation_threshold_above_every_input_gives_alpha_zero_not_a_crash(tmp_path) -> None:
    rules = tmp_path / "r.tq"
    rules.write_text('default { name = "ternary" }\n'
                     "linear { data_in_width = 2  data_in_scaling_factor = true  data_in_threshold = 1e6 }\n")
    run, _out, report = _apply(tmp_path, rules, model="toy")
    assert run.rc == 0 and "Traceback" not in run.err, run.err
    inputs = [n["tensors"]["data_in"] for n in report["nodes"].values() if n["op"] == "linear"]
    assert inputs and all(t["alpha"] == 0.0 and t["zero_fraction"] == 1.0 for t in inputs)


def test_compile_model_loads_a_checkpoint_and_reports_a_bad_one_cleanly(tmp_path) -> None:
    import torch

    good = tmp_path / "good.pt"
    torch.save(_model("bert_like").state_dict(), good)
    assert run_cli("compile", OK / "task1_first_last_float.tq", "--model", BERT, "--ckpt", good).rc == 0
    bad = tmp_path / "bad.pt"
    torch.save({"nothing": torch.zeros(1)}, bad)
    run = run_cli("compile", OK / "task1_first_last_float.tq", "--model", BERT, "--ckpt", bad)
    assert run.rc == 1 and "Traceback" not in run.err and "ternqc: error:" in run.err
