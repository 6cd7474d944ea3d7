"""`ternqc apply --report` and `ternqc report DIR` (issue 15): what report.json gains (histograms equal to
numpy's over the layer inputs and weights computed independently, relative L2 errors, the rule line behind each
parameter, model order), the page's numbers equal report.json's, the page stands alone (no script, no
external reference), and the user errors."""

from __future__ import annotations

import html
import json
import re
import sys

import numpy as np
import pytest

from ternqc.runtime.calibrate import scan_kernel
from ternqc.runtime.calibrate.loop import calibration_batches
from ternqc.runtime.models.data import build_dataset
from tests.report.support import Reported, applied_with_report_fixture, number, parse_page  # noqa: F401
from tests.test_cli_support import (
    CONFIGS,
    assert_one_clean_error,
    load_like_mase,
    np_ternarize,
    run_cli,
    toy_apply_fixture,  # noqa: F401 - registers the session fixture toy_apply
    toy_layer_inputs,
    toy_tiny,
    trained_toy_fixture,  # noqa: F401 - registers the session fixture trained_toy
)

RULES = CONFIGS / "toy_ternary.tq"


def _report(r: Reported) -> dict:
    return json.loads((r.out_dir / "report.json").read_text())


def _trimmed_numpy(values: np.ndarray, bins: int) -> list[int]:
    r = 2.0 ** int(np.ceil(np.log2(np.abs(values).max())))
    counts, _ = np.histogram(values, bins=bins, range=(-r, r))
    nz = np.nonzero(counts)[0]
    return counts[nz[0] : nz[-1] + 1].tolist()


def test_apply_report_writes_the_page_and_says_so(applied_with_report: Reported) -> None:
    page = applied_with_report.out_dir / "report.html"
    assert page.is_file()
    assert str(page) in applied_with_report.run.out


def test_histograms_equal_numpy_over_the_independently_computed_inputs_and_weights(
    applied_with_report: Reported, trained_toy
) -> None:
    report = _report(applied_with_report)
    model = load_like_mase(trained_toy.ckpt)
    # the built-in recipe calibrates on 32 samples of the train split in batches of 128, seed 0
    (batch,) = calibration_batches(build_dataset("toy-tiny", "train"), 32, 128, 0)
    inputs = toy_layer_inputs(model, batch[0])
    for node in ("seq_blocks_0", "seq_blocks_2", "seq_blocks_3"):
        h = report["nodes"][node]["tensors"]["data_in"]["histogram"]
        values = inputs[node].astype(np.float64).ravel()
        assert h["counts"] == _trimmed_numpy(values, 128), node
        assert (h["min"], h["max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))
    w = model.seq_blocks[2].weight.detach().numpy().astype(np.float64)
    h = report["nodes"]["seq_blocks_2"]["tensors"]["weight"]["histogram"]
    assert h["counts"] == np.histogram(w, bins=len(h["counts"]))[0].tolist()


def test_relative_l2_error_equals_numpy(applied_with_report: Reported, trained_toy) -> None:
    report = _report(applied_with_report)
    model = load_like_mase(trained_toy.ckpt)
    for i in (0, 2, 4):
        t = report["nodes"][f"seq_blocks_{i}"]["tensors"]["weight"]
        w = model.seq_blocks[i].weight.detach().numpy().astype(np.float64)
        q = t["alpha"] * np_ternarize(w, t["delta"])
        assert t["rel_l2_error"] == pytest.approx(np.linalg.norm(w - q) / np.linalg.norm(w), rel=1e-5)


def test_each_parameter_names_the_line_of_its_rule(applied_with_report: Reported) -> None:
    report = _report(applied_with_report)
    lines = RULES.read_text().splitlines()
    line_of = {
        p: next(i + 1 for i, t in enumerate(lines) if t.startswith(p))
        for p in ("linear.weight_max", "relu.data_in_median")
    }
    rules = report["nodes"]["seq_blocks_2"]["rules"]
    assert rules["weight_max"].endswith(f"toy_ternary.tq:{line_of['linear.weight_max']}")
    rules = report["nodes"]["seq_blocks_3"]["rules"]
    assert rules["data_in_median"].endswith(f"toy_ternary.tq:{line_of['relu.data_in_median']}")


def test_nodes_are_in_model_order_and_the_run_is_described(
    applied_with_report: Reported, trained_toy
) -> None:
    report = _report(applied_with_report)
    assert list(report["nodes"]) == [f"seq_blocks_{i}" for i in range(5)]
    run = report["run"]
    assert (run["model"], run["ckpt"], run["dataset"]) == ("toy", str(trained_toy.ckpt), "toy-tiny")
    (text,) = run["rules_text"].values()
    assert text == RULES.read_text()
    assert report["float_layers"] == [] and report["notes"] == []
    scans = run["calibration"]["scans"]  # how the calibration scanned: compiled (the vector width) or numpy
    assert scans.startswith(f"compiled, {scan_kernel.LANES} floats" if scan_kernel.available() else "numpy (")
    page = (applied_with_report.out_dir / "report.html").read_text()
    assert f"scans: {scans}" in page


def test_the_page_shows_report_json_numbers(applied_with_report: Reported) -> None:
    report = _report(applied_with_report)
    page = parse_page((applied_with_report.out_dir / "report.html").read_text())
    assert page.found[("float_accuracy", None, None, None)] == [f"{report['float_accuracy']:.4f}"]
    assert page.found[("ternary_accuracy", None, None, None)] == [f"{report['ternary_accuracy']:.4f}"]
    for node, tensor in (("seq_blocks_2", "weight"), ("seq_blocks_3", "data_in"), ("seq_blocks_4", "bias")):
        t = report["nodes"][node]["tensors"][tensor]
        cells = page.found[("delta", node, tensor, None)]
        assert len(cells) == 2  # the overview table and the layer's panel
        for cell in cells:
            assert number(cell) == pytest.approx(t["delta"], rel=5e-4)
        for cell in page.found[("zero_fraction", node, tensor, None)]:
            assert number(cell) == pytest.approx(t["zero_fraction"], abs=5e-4)


def test_the_page_stands_alone(applied_with_report: Reported) -> None:
    text = (applied_with_report.out_dir / "report.html").read_text()
    page = parse_page(text)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert len(page.images) == 2 + 5  # two per-layer charts, one histogram figure per node
    assert all(str(img["src"]).startswith("data:image/svg+xml;base64,") for img in page.images)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "url(" not in text


def test_report_command_writes_the_same_page(applied_with_report: Reported, tmp_path) -> None:
    again = tmp_path / "again.html"
    run = run_cli("report", applied_with_report.out_dir, "-o", again)
    assert run.rc == 0, run
    assert again.read_text() == (applied_with_report.out_dir / "report.html").read_text()


def test_report_of_a_folder_without_report_json_is_one_clean_error(tmp_path, capsys) -> None:
    assert_one_clean_error(run_cli("report", tmp_path), "no report.json", "ternqc apply")
    (tmp_path / "report.json").write_text("[1, 2]")
    assert_one_clean_error(run_cli("report", tmp_path), "is not a ternqc report")


def test_without_matplotlib_report_and_apply_report_say_how_to_install(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    (tmp_path / "report.json").write_text('{"nodes": {}}')
    assert_one_clean_error(run_cli("report", tmp_path), "pip install 'ternqc[report]'")
    run = run_cli("apply", "--out", tmp_path / "out", "--report", "--no-progress")
    assert_one_clean_error(run, "matplotlib")
    assert not (tmp_path / "out").exists()  # refused before the run


def test_histograms_are_not_collected_for_float_inputs(trained_toy, tmp_path) -> None:
    run = run_cli(
        "apply", "--ckpt", trained_toy.ckpt, "--rules", CONFIGS / "twn.tq", "--out", tmp_path, "--no-progress"
    )
    assert run.rc == 0, run
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(layer["path"], layer["op"]) for layer in report["float_layers"]] == [
        ("seq_blocks.1", "relu"),
        ("seq_blocks.3", "relu"),
    ]  # twn quantises no ReLU input
    lines = (CONFIGS / "twn.tq").read_text().splitlines()
    width_line = next(i + 1 for i, t in enumerate(lines) if t.strip().startswith("data_in_width"))
    for entry in report["nodes"].values():
        assert "histogram" not in entry["tensors"]["data_in"]
        assert entry["tensors"]["data_in"] == {"quantized": False}
        assert entry["rules"]["data_in_width"].endswith(
            f"twn.tq:{width_line}"
        )  # the rule that keeps it float


def test_per_channel_weights_are_also_histogrammed_over_their_own_delta(toy_apply, trained_toy) -> None:
    """configs/weights_only.tq: Δ = 0.7·mean|W| per row; w / Δ_row histogrammed, so ±1 is every row's
    threshold: the values inside (-1, 1) are exactly the zeros."""
    report = json.loads((toy_apply("weights_only.tq").out_dir / "report.json").read_text())
    model = load_like_mase(trained_toy.ckpt)
    for i in (0, 2, 4):
        t = report["nodes"][f"seq_blocks_{i}"]["tensors"]["weight"]
        w = model.seq_blocks[i].weight.detach().numpy().astype(np.float64)
        ratio = w / (0.7 * np.abs(w).mean(axis=1, keepdims=True))
        h = t["histogram_over_delta"]
        assert (h["min"], h["max"]) == (
            pytest.approx(ratio.min(), rel=1e-5),
            pytest.approx(ratio.max(), rel=1e-5),
        )
        expected = np.histogram(ratio, bins=len(h["counts"]), range=(h["lo"], h["hi"]))[0]
        assert (
            np.abs(np.array(h["counts"]) - expected).sum() <= 2
        )  # float32 Δ vs float64: a value may cross an edge
        assert np.mean(np.abs(ratio) <= 1) == pytest.approx(t["zero_fraction"], abs=1e-6)


def test_workers_write_the_same_report(applied_with_report: Reported, trained_toy, tmp_path) -> None:
    run = run_cli(
        "apply", "--ckpt", trained_toy.ckpt, "--out", tmp_path, "--report", "--workers", "2", "--no-progress"
    )
    assert run.rc == 0, run
    assert _report(Reported(tmp_path, run)) == _report(applied_with_report)
    assert (tmp_path / "report.html").read_text() == (applied_with_report.out_dir / "report.html").read_text()


def _np_forward_with_only(params: dict, report: dict, only: int, x: np.ndarray) -> np.ndarray:
    """The toy network in float64 numpy with block `only` quantised as report.json says, the rest float."""
    h = x.reshape(len(x), -1).astype(np.float64)
    for j in range(5):
        tensors = report["nodes"][f"seq_blocks_{j}"]["tensors"] if j == only else {}

        def q(v: np.ndarray, name: str, tensors=tensors) -> np.ndarray:
            t = tensors.get(name)
            if not t or not t["quantized"]:
                return v
            ternary = np_ternarize(v, t["delta"])
            return t["alpha"] * ternary if t["scaling"] else ternary

        if j % 2 == 0:
            w, b = (
                params[f"seq_blocks.{j}.weight"].astype(np.float64),
                params[f"seq_blocks.{j}.bias"].astype(np.float64),
            )
            h = q(h, "data_in") @ q(w, "weight").T + q(b, "bias")
        else:
            h = np.maximum(q(h, "data_in"), 0.0)
    return h


def test_sensitivity_is_the_accuracy_with_only_that_layer_quantised(trained_toy, tmp_path) -> None:
    run = run_cli("apply", "--ckpt", trained_toy.ckpt, "--out", tmp_path, "--sensitivity", "--no-progress")
    assert run.rc == 0, run
    report = json.loads((tmp_path / "report.json").read_text())
    params = {k: v.numpy() for k, v in load_like_mase(trained_toy.ckpt).state_dict().items()}
    inputs, labels = toy_tiny("validation")
    for i in range(5):
        expected = float(
            (_np_forward_with_only(params, report, i, inputs.numpy()).argmax(1) == labels).mean()
        )
        # float32 (ternqc) vs float64 (here): one of the 512 samples may fall on the other side of a threshold
        assert report["nodes"][f"seq_blocks_{i}"]["accuracy_alone"] == pytest.approx(expected, abs=1 / 512)
    assert run_cli("report", tmp_path).rc == 0
    page = parse_page((tmp_path / "report.html").read_text())
    assert len(page.images) == 3 + 5  # the sensitivity chart too
    for i in range(5):
        node = f"seq_blocks_{i}"
        (cell,) = page.found[("accuracy_alone", node, None, None)]
        assert cell == f"{report['nodes'][node]['accuracy_alone']:.4f}"


def test_tensors_and_layers_left_in_float_are_named_with_the_reason(tmp_path) -> None:
    """A TransformerEncoder's attention output projections are quantised in place, but MultiheadAttention
    never calls them, so their input stays float: report.json says why and the page shows it in their panel.
    No module of a quantisable type that ternary_full quantises is listed as left in float."""
    from tests.test_cli_support import FIXTURES

    run = run_cli(
        "apply",
        "--model",
        f"{FIXTURES / 'bert_like.py'}:transformer",
        "--dataset",
        "toy-tiny",
        "--rules",
        CONFIGS / "ternary_full.tq",
        "--out",
        tmp_path,
        "--report",
        "--no-progress",
    )
    assert run.rc == 0, run
    report = json.loads((tmp_path / "report.json").read_text())
    page = (tmp_path / "report.html").read_text()
    projections = {n: e for n, e in report["nodes"].items() if e["path"].endswith("self_attn.out_proj")}
    assert len(projections) == 2
    for node, entry in projections.items():
        why = entry["tensors"]["data_in"]["not_applied"]
        assert entry["tensors"]["weight"]["quantized"] and why
        panel = page[page.index(f'id="node-{node}"') :]
        assert html.escape(why) in panel[: panel.index("</article>")]
    assert report["float_layers"] == []
