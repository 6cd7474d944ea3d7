"""report.html from report.json content alone (no run): notes, layers left in float, assertion results,
constants, fine-tuning accuracies and text that needs escaping all reach the page; a report without
histograms (written before they existed) still renders."""

from __future__ import annotations

from ternqc.runtime.report.page import render_report
from tests.report.support import number, parse_page


def _report() -> dict:
    return {
        "float_accuracy": 0.75,
        "ternary_accuracy": 0.5,
        "post_training_accuracy": 0.25,
        "nodes": {
            "b": {
                "path": "b",
                "op": "relu",
                "index": 2,
                "tensors": {
                    "data_in": {
                        "quantized": True,
                        "delta": 0.125,
                        "scaling": False,
                        "alpha": None,
                        "zero_fraction": 0.5,
                    }
                },
            },
            "a<x>": {
                "path": "a.x",
                "op": "linear",
                "index": 1,
                "tensors": {
                    "weight": {
                        "quantized": True,
                        "delta": {"values": 4, "mean": 0.5, "min": 0.25, "max": 1.0},
                        "scaling": True,
                        "alpha": 2.0,
                        "zero_fraction": 0.0,
                    },
                    "data_in": {"quantized": False},
                    "bias": {"quantized": False},
                },
            },
        },
        "notes": ["seq.3: never called <so no statistics>"],
        "float_layers": [
            {"path": "head", "op": "linear", "reason": "no rule quantises any of its tensors"},
            {"path": "attn.out_proj", "op": "linear", "reason": "no rule quantises any of its tensors"},
        ],
        "left_in_float": {"attn.out_proj": "read without calling the module"},
        "assertions": {
            "checked": 3,
            "failures": [
                {
                    "assert": "r.tq:9:1",
                    "selector": "linear",
                    "module": "a.x",
                    "values": {"weight_zero_fraction": 0.123456789},
                    "message": "too dense",
                },
                {
                    "assert": "r.tq:9:1",
                    "selector": "linear",
                    "module": "b",
                    "values": {},
                    "message": "too dense",
                },
            ],
        },
        "constants": {"k": {"value": 0.6, "how": "set", "origin": "r.tq:1:1"}},
        "finetune": {"epochs": 3, "lr": 0.001, "history": []},
    }


def test_notes_float_layers_assertions_constants_and_finetuning_reach_the_page() -> None:
    text = render_report(_report())
    assert "never called &lt;so no statistics&gt;" in text
    assert "<code>head</code> (linear) stays in float: no rule quantises any of its tensors" in text
    assert text.count("attn.out_proj") == 1  # said once, with the more specific reason
    assert "assertion at <code>r.tq:9:1</code> fails" in text and "too dense" in text
    assert "weight_zero_fraction = 0.1235" in text
    panel = text[text.index('id="node-a&lt;x&gt;"') : text.index('id="node-b"')]
    assert "assertion at <code>r.tq:9:1</code> fails here" in panel  # on the module it failed on
    assert ">2/3<" in text  # assertions that hold (one fails)
    assert "<code>k = 0.6</code> (--set)" in text
    page = parse_page(text)
    assert number(page.found[("post_training_accuracy", None, None, None)][0]) == 0.25
    assert "epochs 3" in text


def test_layers_follow_model_order_and_names_are_escaped() -> None:
    text = render_report(_report())
    assert text.index('id="node-a&lt;x&gt;"') < text.index('id="node-b"')
    page = parse_page(text)
    assert number(page.found[("delta", "a<x>", "weight", None)][0]) == 0.5  # a per-channel Δ shows its mean
    assert number(page.found[("zero_fraction", "b", "data_in", None)][0]) == 0.5


def test_a_report_without_histograms_renders_without_histogram_figures() -> None:
    text = render_report(_report())
    assert len(parse_page(text).images) == 1  # the zero-fraction chart; no errors, no histograms
