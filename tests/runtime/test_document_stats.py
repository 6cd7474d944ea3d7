"""Acceptance 2: the user's document's statistics, reproduced value for value.

The document's `stats_for_quantisation.toml` comes from MASE profiling the untrained `toy` model built right
after `random.seed(0); numpy.random.seed(0); torch.manual_seed(0)`, on one batch of 128 from a shuffled
`DataLoader(ToyTiny("train"), batch_size=128)`: the first iterator's first batch was drawn and discarded, the
second iterator's first batch is the calibration batch. The loader draws its shuffle seed from the global
torch RNG when an iterator starts, so what matters is that the model is built (consuming the RNG for its
initialisation) before the first iterator; creating the loader before or after the model changes nothing.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy
import pytest
import toml
import torch
from torch.utils.data import DataLoader

from ternqc.plan import Origin, ProfilePoint, Selector, StatSpec
from ternqc.runtime.calibrate.loop import calibrate
from ternqc.runtime.calibrate.points import resolve_profile
from ternqc.runtime.models.builtin import ToyNet
from ternqc.runtime.models.data import ToyTiny

DOCUMENT = Path(__file__).resolve().parents[1] / "data" / "mase" / "stats_for_quantisation.toml"
SPECS = {
    "range_min_max": StatSpec("range_min_max", dims="all", abs=False),
    "range_quantile": StatSpec("range_quantile", dims="all", abs=False, options=(("quantile", 0.5),)),
}


def document_values():
    """Every (node, tensor, statistic, field, value) under `*.software.args.*.stat.*`."""
    out = []
    for node, meta in toml.load(DOCUMENT).items():
        for tensor, arg in meta.get("software", {}).get("args", {}).items():
            for stat, fields in arg.get("stat", {}).items():
                out.extend((node, tensor, stat, field, value) for field, value in fields.items())
    return out


@pytest.fixture(scope="module")
def table():
    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)
    model = ToyNet()
    loader = DataLoader(ToyTiny("train"), batch_size=128, shuffle=True)
    next(iter(loader))  # drawn and discarded
    batch = next(iter(loader))
    origin = Origin("toy_ternary_collect_stats.toml", 1, 1)
    stats = tuple(SPECS.values())
    linear = Selector("type", "linear")
    points = [ProfilePoint(linear, t, stats, origin) for t in ("weight", "bias", "data_in_0")]
    points.append(ProfilePoint(Selector("type", "relu"), "data_in_0", stats, origin))
    return calibrate(model, [batch], resolve_profile(points, model), progress=False)


def test_the_document_has_88_values():
    assert len(document_values()) == 88


@pytest.mark.parametrize("node,tensor,stat,field,value", document_values())
def test_document_value_reproduced_exactly(table, node, tensor, stat, field, value):
    by_node = {ms.node: ms for ms in table.values()}
    result = by_node[node].values[tensor][SPECS[stat]]
    assert result[field] == value
    assert type(result[field]) is type(value)
