"""MASE TOML in and out: the statistics file (node-meta layout) and the quantize config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import toml
from hypothesis import given, settings
from hypothesis import strategies as st

from ternqc.plan import (
    QUANTISABLE,
    STATISTICS,
    Binding,
    Calibration,
    Const,
    Origin,
    Plan,
    Selector,
    StatRef,
    StatSpec,
)
from ternqc.runtime.calibrate.table import ModuleStats
from ternqc.runtime.errors import UserError
from ternqc.runtime.io.mase_io import (
    parse_spec_key,
    read_config_toml,
    read_stats_toml,
    write_quant_config_toml,
    write_stats_toml,
)
from ternqc.runtime.quantize.mapping import map_params
from ternqc.runtime.quantize.resolve import applicable_params

DOC_STATS = Path(__file__).resolve().parents[1] / "data" / "mase" / "stats_for_quantisation.toml"
RMM = StatSpec("range_min_max")
MEDIAN = StatSpec("range_quantile", options=(("quantile", 0.5),))
Q975 = StatSpec("range_quantile", options=(("quantile", 0.975),))
PER_CH = StatSpec("range_min_max", dims=(1,), abs=True)
ELEMENTWISE = StatSpec("abs_mean", dims="none")
F32 = [float(np.float32(v)) for v in (0.0833507776260376, -4.972967624664307, 1 / 3, 1e-8, -0.1)]


def sample_table():
    fc = ModuleStats(
        "seq_blocks.0", "seq_blocks_0", "linear",
        shapes={"data_in_0": (4,), "weight": (3, 4), "bias": (3,), "data_out_0": (3,)},
        values={
            "data_in_0": {
                RMM: {"min": F32[1], "max": F32[0], "range": F32[0] - F32[1], "count": 512},
                MEDIAN: {"min": F32[2], "max": F32[2], "range": 0.0, "count": 512},
                Q975: {"min": F32[3], "max": F32[4], "range": F32[4] - F32[3], "count": 512},
            },
            "weight": {PER_CH: {"min": [F32[0], F32[2], F32[3]], "max": [0.5, 0.25, F32[2]],
                                "range": [0.1] * 3, "count": 4}},
            "data_out_0": {RMM: {"min": -1.5, "max": 2.5, "range": 4.0, "count": 384}},
        },
        notes=("2 NaN/Inf values in data_in_0 were left out",),
    )
    relu = ModuleStats(
        "seq_blocks.1", "seq_blocks_1", "relu", shapes={"data_in_0": (2, 3)},
        values={"data_in_0": {ELEMENTWISE: {"abs_mean": [[0.5, 1.5, F32[2]], [2.0, 0.0, 1e-300]],
                                            "count": 128}}},
    )
    return {"seq_blocks.0": fc, "seq_blocks.1": relu}


# --- statistics: write -------------------------------------------------------------------------------------


def test_written_file_is_in_mase_node_meta_layout(tmp_path):
    path = tmp_path / "stats.toml"
    write_stats_toml(path, sample_table())
    d = toml.load(path)  # what MASE does
    n0 = d["seq_blocks_0"]
    assert n0["common"]["mase_type"] == "module_related_func" and n0["common"]["mase_op"] == "linear"
    args = n0["common"]["args"]
    assert args["data_in_0"] == {"type": "float", "precision": [32], "size": [1, 4]}
    assert args["weight"]["size"] == [3, 4] and args["bias"]["size"] == [3]
    assert n0["common"]["results"]["data_out_0"]["size"] == [1, 3]
    stat = n0["software"]["args"]["data_in_0"]["stat"]
    # one range_min_max: MASE's name; two range_quantile: each by its full key
    assert set(stat) == {"range_min_max", MEDIAN.key(), Q975.key()}
    assert stat["range_min_max"]["max"] == F32[0] and stat["range_min_max"]["min"] == F32[1]
    assert stat[MEDIAN.key()]["max"] == F32[2] and stat[Q975.key()]["max"] == F32[4]
    assert type(stat["range_min_max"]["count"]) is int
    w = n0["software"]["args"]["weight"]["stat"]["range_min_max"]
    assert w["min"] == [F32[0], F32[2], F32[3]] and w["max"] == [0.5, 0.25, F32[2]]
    assert n0["software"]["results"]["data_out_0"]["stat"]["range_min_max"]["max"] == 2.5
    n1 = d["seq_blocks_1"]
    assert n1["common"]["args"]["data_in_0"]["size"] == [1, 2, 3]
    assert n1["software"]["args"]["data_in_0"]["stat"]["abs_mean"]["abs_mean"] == [[0.5, 1.5, F32[2]],
                                                                                 [2.0, 0.0, 1e-300]]
    assert "data_out_0" not in n1["common"].get("results", {})


def test_floats_are_written_with_repr_precision(tmp_path):
    path = tmp_path / "stats.toml"
    write_stats_toml(path, sample_table())
    text = path.read_text()
    for v in (F32[0], F32[1], F32[2]):
        assert repr(v) in text


def test_numpy_values_are_written_as_plain_toml(tmp_path):
    t = {"fc": ModuleStats("fc", "fc", "linear", shapes={"weight": (2,)}, values={"weight": {RMM: {
        "min": np.float32(-0.25), "max": np.array([0.5, 0.75], dtype=np.float32), "count": np.int64(2)}}})}
    path = tmp_path / "s.toml"
    write_stats_toml(path, t)
    r = toml.load(path)["fc"]["software"]["args"]["weight"]["stat"]["range_min_max"]
    assert r == {"min": -0.25, "max": [0.5, 0.75], "count": 2} and type(r["count"]) is int


def test_round_trip_write_mase_load_read(tmp_path):
    table = sample_table()
    path = tmp_path / "stats.toml"
    write_stats_toml(path, table)
    back = read_stats_toml(path)
    assert back == table  # paths, nodes, ops, shapes, StatSpec keys, values, notes
    raw = toml.load(path)
    for mpath, ms in table.items():
        for tensor, results in ms.values.items():
            for spec, fields in results.items():
                assert back[mpath].lookup(tensor, spec) == fields
                side = "results" if tensor.startswith("data_out") else "args"
                stats = raw[ms.node]["software"][side][tensor]["stat"]
                key = spec.key() if spec.key() in stats else spec.name
                assert stats[key] == fields


def test_two_specs_of_one_statistic_stay_apart_when_read_by_a_mase_style_reader(tmp_path):
    path = tmp_path / "stats.toml"
    write_stats_toml(path, sample_table())
    del_ternqc = toml.load(path)
    for node in del_ternqc.values():
        node.pop("ternqc", None)  # a reader that keeps only MASE's sections
    p2 = tmp_path / "mase.toml"
    p2.write_text(toml.dumps(del_ternqc))
    back = read_stats_toml(p2)["seq_blocks_0"]  # MASE files know node names only
    assert back.lookup("data_in_0", MEDIAN)["max"] == F32[2]
    assert back.lookup("data_in_0", Q975)["max"] == F32[4]
    assert back.lookup("data_in_0", RMM)["max"] == F32[0]  # by name: the only range_min_max


def test_node_name_collision_is_refused(tmp_path):
    t = {"a.b": ModuleStats("a.b", "a_b", "linear"), "a_b": ModuleStats("a_b", "a_b", "linear")}
    with pytest.raises(UserError, match="node name 'a_b'"):
        write_stats_toml(tmp_path / "s.toml", t)
    assert not (tmp_path / "s.toml").exists()


# --- statistics: read ---------------------------------------------------------------------------------------


def test_reading_the_documents_file():
    raw = toml.load(DOC_STATS)
    table = read_stats_toml(DOC_STATS)
    assert list(table) == list(raw)  # every node, by node name, in file order
    for node, meta in raw.items():
        ms = table[node]
        assert ms.path == ms.node == node and ms.op == meta["common"]["mase_op"]
        stats = {t: e.get("stat", {}) for t, e in meta.get("software", {}).get("args", {}).items()}
        for tensor, results in stats.items():
            for name, fields in results.items():
                spec = StatSpec(name, options=(("quantile", 0.5),) if name == "range_quantile" else ())
                assert ms.lookup(tensor, spec) == fields
        assert sum(len(r) for r in ms.values.values()) == sum(len(r) for r in stats.values())
    shapes = table["seq_blocks_0"].shapes
    assert shapes["data_in_0"] == (4,) and shapes["weight"] == (100, 4)
    assert table["x"].values == {} and table["x"].op == "placeholder"


def test_rewriting_the_documents_file_keeps_its_statistics(tmp_path):
    raw = toml.load(DOC_STATS)
    out = tmp_path / "again.toml"
    write_stats_toml(out, read_stats_toml(DOC_STATS))
    again = toml.load(out)
    for node, meta in raw.items():
        assert again[node]["common"]["mase_op"] == meta["common"]["mase_op"]
        if meta["common"]["mase_op"] in QUANTISABLE:
            assert again[node]["software"]["args"] == meta["software"]["args"]
            for arg, m in meta["common"]["args"].items():
                assert again[node]["common"]["args"][arg]["size"] == m["size"]


@pytest.mark.parametrize(
    "content, words",
    [
        ("[a.common\nmase_op = 1", "not valid TOML"),
        ('model = "toy"\n[passes.quantize]\nby = "name"\n', "no common.mase_op"),
        ("", "holds no nodes"),
        ('[n.common]\nmase_op = "linear"\n[n.software.args.weight.stat]\nrange_min_max = 3\n', "not a table"),
    ],
)
def test_malformed_statistics_files(tmp_path, content, words):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=words) as info:
        read_stats_toml(path)
    assert str(path) in str(info.value)


def test_missing_statistics_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_stats_toml(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="cannot read"):
        read_stats_toml(tmp_path)  # a folder


# --- statistic keys -----------------------------------------------------------------------------------------

specs = st.builds(
    StatSpec,
    name=st.sampled_from(sorted(STATISTICS)),
    dims=st.one_of(st.sampled_from(["all", "none"]), st.lists(st.integers(-3, 5), max_size=3).map(tuple)),
    abs=st.booleans(),
)


@settings(max_examples=100, deadline=None)
@given(specs, st.floats(0.001, 0.999))
def test_spec_keys_parse_back(spec, q):
    if spec.name == "range_quantile":
        spec = StatSpec(spec.name, spec.dims, spec.abs, (("quantile", q),))
    assert parse_spec_key(spec.key()) == spec


@pytest.mark.parametrize("text", ["range_min_max", "nope(dims=all)", "range_min_max(dims=some)",
                                  "range_min_max(abs=yes)", "range_min_max(quantile=0.5)", "abs_mean(dims)",
                                  "range_quantile(quantile=x)"])
def test_other_keys_are_not_specs(text):
    assert parse_spec_key(text) is None


# --- quantize config ----------------------------------------------------------------------------------------


def mapped():
    per_ch = StatSpec("range_min_max", dims=(1,))
    stats = {"fc": ModuleStats("fc", "fc", "linear", values={"weight": {per_ch: {"max": [0.5, 0.25]}}}),
             "act": ModuleStats("act", "act", "relu")}
    bindings = [
        Binding(Selector("default"), "name", Const("ternary"), Origin("r.tq", 1, 1), 0),
        Binding(Selector("default"), "data_in_width", Const(2), Origin("r.tq", 2, 1), 1),
        Binding(Selector("type", "linear"), "weight_max", StatRef("weight", per_ch, "max"),
                Origin("r.tq", 3, 1), 2),
        Binding(Selector("type", "linear"), "weight_scaling_factor", Const(False), Origin("r.tq", 4, 1), 3),
    ]
    plan = Plan(sources=("r.tq",), calibration=Calibration(), profile=(), bindings=bindings)
    return map_params(plan, stats)


#: MASE's ternary quantiser config suffixes (MASE's quant_parsers), for data_in, weight and bias.
MASE_SUFFIXES = ("_width", "_scaling_factor", "_mean", "_median", "_max", "_threshold", "_scale")


def test_quant_config_has_every_key_per_node_with_na(tmp_path):
    path = tmp_path / "q.toml"
    write_quant_config_toml(path, mapped(), base={"model": "toy", "dataset": "toy-tiny", "passes": {"x": 1}})
    d = toml.load(path)
    assert d["model"] == "toy" and d["dataset"] == "toy-tiny" and set(d) == {"model", "dataset", "passes"}
    q = d["passes"]["quantize"]
    assert q["by"] == "name" and q["report"] is True
    assert set(q) == {"by", "report", "default", "fc", "act"}
    for node, op in (("fc", "linear"), ("act", "relu")):
        cfg = q[node]["config"]
        mase = [k for k in applicable_params(op) if k == "name" or k.endswith(MASE_SUFFIXES)]
        mase = [k for k in mase if not k.startswith("data_out")]
        assert list(cfg) == mase
        assert cfg["name"] == "ternary" and cfg["data_in_width"] == 2
    fc = q["fc"]["config"]
    assert fc["weight_max"] == [0.5, 0.25] and fc["weight_scaling_factor"] is False
    set_keys = {"name", "data_in_width", "weight_max", "weight_scaling_factor"}
    assert all(v == "NA" for k, v in fc.items() if k not in set_keys)
    assert all(v == "NA" for k, v in q["act"]["config"].items() if k not in {"name", "data_in_width"})
    default = q["default"]["config"]
    assert default["name"] == "ternary" and default["data_in_width"] == 2
    assert default["weight_max"] == "NA" and default["weight_scaling_factor"] == "NA"
    assert len(default) == 1 + 3 * 8


def test_quant_config_without_base(tmp_path):
    path = tmp_path / "q.toml"
    write_quant_config_toml(path, mapped())
    assert set(toml.load(path)) == {"passes"}
    assert read_config_toml(path)["passes"]["quantize"]["by"] == "name"


def test_node_named_like_a_reserved_key_is_refused(tmp_path):
    stats = {"default": ModuleStats("default", "default", "relu")}
    plan = Plan(sources=(), calibration=Calibration(), profile=(), bindings=())
    with pytest.raises(UserError, match="'default'"):
        write_quant_config_toml(tmp_path / "q.toml", map_params(plan, stats))
    assert not (tmp_path / "q.toml").exists()
