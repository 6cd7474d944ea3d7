"""`details.carry_inputs`: after fine-tuning, the input histograms of the calibration carry over; their
error only where the input quantiser did not change."""

from __future__ import annotations

import copy

from ternqc.runtime.report.details import carry_inputs


def _node(delta: float, **extra) -> dict:
    return {
        "tensors": {
            "data_in": {"quantized": True, "delta": delta, "alpha": 1.0, "scaling": True, **extra},
            "weight": {"quantized": True, "delta": 0.1},
        }
    }


def test_histograms_carry_over_and_stale_errors_do_not() -> None:
    hist = {"lo": -1.0, "hi": 1.0, "counts": [1, 2], "min": -1.0, "max": 1.0}
    earlier = {
        "nodes": {
            "a": _node(0.5, histogram=hist, rel_l2_error=0.3),
            "b": _node(0.5, histogram=hist, rel_l2_error=0.4),
            "c": {"tensors": {"data_in": {"quantized": False}}},
        }
    }
    report = {
        "nodes": {"a": _node(0.5), "b": _node(0.7), "c": {"tensors": {"data_in": {"quantized": False}}}}
    }
    before = copy.deepcopy(earlier)
    carry_inputs(report, earlier)
    a, b = report["nodes"]["a"]["tensors"]["data_in"], report["nodes"]["b"]["tensors"]["data_in"]
    assert a["histogram"] == hist and a["rel_l2_error"] == 0.3
    assert b["histogram"] == hist and "rel_l2_error" not in b  # Δ changed: the old error says nothing
    assert report["nodes"]["c"] == {"tensors": {"data_in": {"quantized": False}}}
    assert "histogram" not in report["nodes"]["a"]["tensors"]["weight"]
    assert earlier == before
