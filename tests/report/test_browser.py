"""report.html and sweep.html in a real headless browser (issue 15): each page loads without errors, fetches
nothing, and every plot image decodes with a non-zero natural and rendered size."""

from __future__ import annotations

import json

import pytest

import ternqc.sweep as sweep_cli
from tests.report.browser import chromium_fixture, load_in_browser  # noqa: F401 - registers `chromium`
from tests.report.support import Reported, applied_with_report_fixture, parse_page  # noqa: F401
from tests.report.test_sweep import _substituting, _twn_with
from tests.test_cli_support import run_cli, trained_toy_fixture  # noqa: F401


def _check(seen: dict, expected_images: int) -> None:
    assert seen["errors"] == [] and seen["console"] == [], seen
    assert seen["resources"] == []  # everything is inline: no file, no network
    assert len(seen["images"]) == expected_images
    for img in seen["images"]:
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, img
        assert img["width"] > 0 and img["height"] > 0, img


def test_report_page_in_a_browser(chromium: str, applied_with_report: Reported, tmp_path) -> None:
    page = applied_with_report.out_dir / "report.html"
    images = len(parse_page(page.read_text()).images)
    assert images == 7
    _check(load_in_browser(chromium, page, tmp_path), images)


def test_sweep_page_in_a_browser(
    chromium: str, trained_toy, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep_cli, "compile_with_sets", _substituting)
    out = tmp_path / "sweep"
    run = run_cli(
        "sweep",
        "--ckpt",
        trained_toy.ckpt,
        "--rules",
        _twn_with(tmp_path, "{{k}}"),
        "--set",
        "k=0.5,0.7",
        "--out",
        out,
        "--no-progress",
    )
    assert run.rc == 0, run
    doc = json.loads((out / "sweep.json").read_text())
    page = parse_page((out / "sweep.html").read_text())
    for i, row in enumerate(doc["rows"]):
        assert page.found[("ternary_accuracy", None, None, str(i))] == [f"{row['ternary_accuracy']:.4f}"]
    _check(load_in_browser(chromium, out / "sweep.html", tmp_path), 2)  # accuracy plot, zeros heatmap
