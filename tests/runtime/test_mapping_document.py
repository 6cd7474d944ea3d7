"""Issue 4, acceptance 1: `map` on the statistics file of the user's document with configs/toy_ternary.tq
gives every layer its own numbers (no aliasing of seq_blocks_0's statistics)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import toml

from ternqc.plan import QUANTISABLE, Plan
from ternqc.render import render_explain
from ternqc.runtime.io.mase_io import read_stats_toml, write_quant_config_toml
from ternqc.runtime.quantize.mapping import map_params
from ternqc.runtime.quantize.resolve import applicable_params

from .test_mapping_toyplan import TOY_FILE, compiled_toy_plan, toy_plan

DATA = Path(__file__).resolve().parents[1] / "data" / "mase"
DOC_STATS = DATA / "stats_for_quantisation.toml"
DOC_OUTPUT = DATA / "toy_ternary_scaled_document_output.toml"
STAT_PARAMS = [f"{t}_{s}" for t in ("data_in", "weight", "bias") for s in ("median", "max")]


def expected_from_file(node: str, meta: dict) -> dict:
    """What the recipe says, computed straight from the raw TOML of the statistics file."""
    op = meta["common"]["mase_op"]
    args = meta["software"]["args"]
    exp = {p: None for p in applicable_params(op)}
    exp.update(name="ternary", data_in_width=2, data_in_scaling_factor=True)
    tensors = {"data_in": "data_in_0"}
    if op == "linear":
        exp.update(weight_width=2, weight_scaling_factor=True, bias_width=2, bias_scaling_factor=True)
        tensors.update(weight="weight", bias="bias")
    for t, arg in tensors.items():
        exp[f"{t}_median"] = args[arg]["stat"]["range_quantile"]["max"]
        exp[f"{t}_max"] = args[arg]["stat"]["range_min_max"]["max"]
    return exp


def check_document_mapping(plan: Plan, tmp_path: Path) -> None:
    raw = toml.load(DOC_STATS)
    result = map_params(plan, read_stats_toml(DOC_STATS), by_node_name=True)
    nodes = result.by_node()
    quantisable = [n for n, m in raw.items() if m["common"]["mase_op"] in QUANTISABLE]
    assert sorted(nodes) == sorted(quantisable) == [f"seq_blocks_{i}" for i in range(5)]
    for node in quantisable:
        assert nodes[node].params == expected_from_file(node, raw[node]), node

    # the numbers named in the issue, each from the layer's own statistics
    p = {n: m.params for n, m in nodes.items()}
    assert p["seq_blocks_2"]["data_in_max"] == 6.567787170410156
    assert p["seq_blocks_2"]["weight_max"] == 0.099988654255867
    assert p["seq_blocks_1"]["data_in_median"] == -0.008840139955282211
    assert p["seq_blocks_1"]["data_in_max"] == 6.567787170410156
    # the aliasing bug of stat-to-conf.py is gone: blocks 2 and 4 are not copies of block 0
    for other in ("seq_blocks_2", "seq_blocks_4"):
        for param in STAT_PARAMS:
            assert p[other][param] != p["seq_blocks_0"][param], (other, param)

    # the written MASE config agrees with the document's output where the document was right
    out = tmp_path / "quant_config.toml"
    write_quant_config_toml(out, result, base={"model": "toy", "dataset": "toy-tiny"})
    ours = toml.load(out)["passes"]["quantize"]
    doc = toml.load(DOC_OUTPUT)["passes"]["quantize"]
    for node in ("seq_blocks_0", "seq_blocks_3"):
        for key, value in doc[node]["config"].items():
            assert ours[node]["config"][key] == value, (node, key)
    # explain names a rule of the recipe for every set parameter
    text = render_explain(result)
    for node, m in nodes.items():
        assert node in text
        for param in m.explain:
            assert f"{TOY_FILE}:{m.explain[param].binding.origin.line}" in text


def test_document_statistics_with_hand_built_plan(tmp_path):
    check_document_mapping(toy_plan(), tmp_path)


def test_document_statistics_with_compiled_recipe(tmp_path):
    plan = compiled_toy_plan()
    # origins name the file as the compiler saw it; only the values and rule lines matter here
    plan = attrs.evolve(
        plan, bindings=[attrs.evolve(b, origin=attrs.evolve(b.origin, file=TOY_FILE)) for b in plan.bindings]
    )
    check_document_mapping(plan, tmp_path)


def test_placeholder_and_function_nodes_get_no_parameters():
    result = map_params(toy_plan(), read_stats_toml(DOC_STATS), by_node_name=True)
    nodes = result.by_node()
    assert sorted(nodes) == [f"seq_blocks_{i}" for i in range(5)]  # not an empty mapping
    for node in ("x", "size", "view", "output"):
        assert node not in nodes


@pytest.mark.parametrize("node", ["seq_blocks_1", "seq_blocks_3"])
def test_relu_nodes_have_only_data_in_and_data_out_parameters(node):
    result = map_params(toy_plan(), read_stats_toml(DOC_STATS), by_node_name=True)
    params = result.by_node()[node].params
    assert set(params) == {"name"} | {p for p in params if p.startswith(("data_in_", "data_out_"))}
    assert not any(p.startswith(("weight_", "bias_")) for p in params)
    assert {"data_in_median", "data_in_max"} <= set(params)  # the recipe's ReLU rules did apply
    assert not any(p.startswith(("weight", "bias")) for p in params)
