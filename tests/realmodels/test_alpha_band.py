"""The activation α of a real model from a band around the Δ predicted on the first batch: tiny GPT-2 and
BERT under `ternary_full`, with a quantile budget too small to keep every activation, give α bit for bit as
with every value kept, in one calibration pass."""

from __future__ import annotations

import copy

import pytest

import ternqc
from ternqc.runtime.calibrate.stats import threshold_state
from tests.realmodels.models import bert, gpt2, token_batches


def alphas(report) -> dict[str, tuple]:
    return {
        path: (node["tensors"]["data_in"].get("alpha"), node["tensors"]["data_in"].get("alpha_passes"))
        for path, node in report.nodes.items()
        if node["tensors"].get("data_in", {}).get("quantized")
    }


@pytest.mark.parametrize("make", [gpt2, bert])
def test_a_band_gives_every_alpha_of_every_value_kept_in_one_pass(make, monkeypatch):
    model = make()
    data = token_batches(n=8, batch=4)
    kept = alphas(ternqc.quantize_(copy.deepcopy(model), "ternary_full", data, quantile_budget_mib=256))
    finished = []
    real = threshold_state._Band.finish
    monkeypatch.setattr(threshold_state._Band, "finish", lambda band, delta: finished.append(delta) or real(band, delta))
    # 32 sequences of 12 tokens: activations of 48-192 KiB, more than a quarter of 0.25 MiB for most: bands
    banded = alphas(ternqc.quantize_(copy.deepcopy(model), "ternary_full", data, quantile_budget_mib=0.25))
    assert finished  # some α came from a band
    assert kept and set(kept) == set(banded)
    assert {passes for _, passes in banded.values()} == {1}
    assert {path: a for path, (a, _) in banded.items()} == {path: a for path, (a, _) in kept.items()}
