"""The shipped default recipe against the user's own MASE files (tests/data/mase/): it collects what
`toy_ternary_collect_stats.toml` collects and binds what `toy_ternary_scaled_base.toml` plus stat-to-conf.py
set, per layer (shared/MASE.md: median := range_quantile.max, max := range_min_max.max)."""

from __future__ import annotations

import pathlib

import toml

from ternqc import plan
from ternqc.compiler import builtin_recipe, compile_file
from ternqc.plan import Const, StatSpec

MASE = pathlib.Path(__file__).resolve().parent.parent / "data" / "mase"
TOY = {"seq_blocks.0": "linear", "seq_blocks.1": "relu", "seq_blocks.2": "linear", "seq_blocks.3": "relu",
       "seq_blocks.4": "linear"}


def _plan() -> plan.Plan:
    return compile_file(builtin_recipe()).plan


def _spec(name: str, opts: dict) -> StatSpec:
    own = {k: v for k, v in opts.items() if k not in ("dims", "abs")}
    return StatSpec(name, dims=opts["dims"], abs=opts["abs"], options=tuple(own.items()))


def test_collects_what_mase_collects() -> None:
    cfg = toml.load(MASE / "toy_ternary_collect_stats.toml")["passes"]["profile_statistics"]
    assert cfg["by"] == "type"
    expected = set()
    for t in cfg["target_weight_nodes"]:
        for tensor in ("weight", "bias"):  # MASE feeds every parameter tensor
            expected |= {(t, tensor, _spec(n, o)) for n, o in cfg["weight_statistics"].items()}
    for t in cfg["target_activation_nodes"]:
        expected |= {(t, "data_in_0", _spec(n, o)) for n, o in cfg["activation_statistics"].items()}
    p = _plan()
    every = {(q.selector.pattern, q.tensor, s) for q in p.profile if q.reason == "profiled" for s in q.stats}
    named = set(cfg["target_weight_nodes"]) | set(cfg["target_activation_nodes"])
    got = {e for e in every if e[0] in named}
    assert got == expected
    # convolutions, which the document's model has none of, follow the linear layers' flow
    convs = {e for e in every if e[0] not in named}
    assert {e[0] for e in convs} == {"conv1d", "conv2d"}
    assert {(e[1], e[2]) for e in convs} == {(e[1], e[2]) for e in expected if e[0] == "linear"}
    assert p.calibration.samples == cfg["num_samples"]


def _winner(p: plan.Plan, path: str, param: str) -> plan.Binding | None:
    found = [b for b in p.bindings if b.param == param and b.selector.matches(path, TOY[path])]
    return max(found, key=lambda b: (b.selector.specificity, b.order), default=None)


def test_binds_what_the_base_config_and_stat_to_conf_set() -> None:
    base = toml.load(MASE / "toy_ternary_scaled_base.toml")["passes"]["quantize"]["default"]["config"]
    p = _plan()
    for path, kind in TOY.items():
        tensors = ("data_in", "weight", "bias") if kind == "linear" else ("data_in",)
        for key, value in base.items():
            if key == "name" or key.split("_")[0] + ("_in" if key.startswith("data_in") else "") in tensors:
                assert _winner(p, path, key).value == Const(value), (path, key)
        for tensor in tensors:
            canonical = plan.TENSOR_ALIASES[tensor]
            median = _winner(p, path, f"{tensor}_median").value
            maximum = _winner(p, path, f"{tensor}_max").value
            assert (median.tensor, median.stat.name, median.field) == (canonical, "range_quantile", "max")
            assert (maximum.tensor, maximum.stat.name, maximum.field) == (canonical, "range_min_max", "max")
            assert _winner(p, path, f"{tensor}_mean") is None  # stat-to-conf.py never sets a mean
