"""Plans are read from disk: a malformed plan is a ValueError with a sentence, never a crash later on."""

from __future__ import annotations

import json

import pytest

from ternqc.plan import Plan

GOOD = {"version": 1, "sources": ["r.tq"], "calibration": {"samples": 32, "batch_size": 128, "split": "train"},
        "profile": [], "bindings": []}


def _with(**changes):
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    ("plan", "needle"),
    [
        ({"version": 1}, "missing key 'sources'"),
        (_with(calibration={"samples": "x", "batch_size": 1, "split": "train"}), "'samples' must be"),
        (_with(calibration={"samples": 0, "batch_size": 1, "split": "train"}), "'samples' must be > 0"),
        (_with(calibration={"samples": 1, "batch_size": 1, "split": 3}), "'split' must be"),
        (_with(bindings=[{"selector": {"kind": "type", "pattern": "linear"}, "param": "weight_max",
                          "value": {"const": [1]}, "origin": {"file": "r.tq", "line": 1, "col": 1},
                          "order": 0}]), "'value' must be"),
        (_with(bindings=[{"selector": {"kind": "planet", "pattern": "x"}, "param": "weight_max",
                          "value": {"const": 1.0}, "origin": {"file": "r.tq", "line": 1, "col": 1},
                          "order": 0}]), "'kind' must be in"),
        (_with(profile=[{"selector": {"kind": "type", "pattern": "linear"}, "tensor": "weight",
                         "stats": [{"name": "range_min_max", "dims": "some", "abs": False, "options": {}}],
                         "origin": {"file": "r.tq", "line": 1, "col": 1}, "reason": "profiled"}]), "dims"),
        (_with(profile="nope"), "malformed plan"),
    ],
)
def test_malformed_plans_are_value_errors(plan, needle) -> None:
    with pytest.raises(ValueError, match="malformed plan|unsupported plan") as info:
        Plan.from_json(json.dumps(plan))
    assert needle in str(info.value)


def test_the_good_plan_reads() -> None:
    assert Plan.from_json(json.dumps(GOOD)).calibration.samples == 32
