"""`ternqc profile` end to end (issue 3): MASE's node-meta layout, read back by `toml.load` and by ternqc,
with values equal to numpy on the same calibration batches through an independently loaded float model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import toml
import torch

from ternqc.runtime.calibrate.loop import calibration_batches
from ternqc.runtime.models.data import build_dataset
from tests.test_cli_support import (
    CONFIGS,
    Trained,
    assert_one_clean_error,
    load_like_mase,
    run_cli,
    toy_layer_inputs,
    trained_toy_fixture,  # noqa: F401 - registers the session fixture trained_toy
)

LINEARS = ("seq_blocks_0", "seq_blocks_2", "seq_blocks_4")
RELUS = ("seq_blocks_1", "seq_blocks_3")


def _calibration_inputs(samples: int, batch_size: int, seed: int) -> torch.Tensor:
    batches = calibration_batches(build_dataset("toy-tiny", "train"), samples, batch_size, seed)
    return torch.cat([x for x, _ in batches])


def _median(values: np.ndarray) -> float:
    # torch.quantile semantics: linear interpolation at rank q (n - 1), in float64
    return float(np.quantile(np.asarray(values, dtype=np.float64).ravel(), 0.5))


def _check_min_max_median(section: dict, values: np.ndarray) -> None:
    flat = np.asarray(values, dtype=np.float32).ravel()
    mm = section["range_min_max"]
    assert mm["min"] == float(flat.min())  # exactly
    assert mm["max"] == float(flat.max())
    assert mm["range"] == pytest.approx(float(flat.max()) - float(flat.min()), rel=1e-6)
    assert mm["count"] == flat.size
    q = section["range_quantile"]
    assert q["max"] == pytest.approx(_median(flat), rel=1e-6, abs=1e-7)
    assert q["min"] == pytest.approx(_median(flat), rel=1e-6, abs=1e-7)  # (1 - 0.5) quantile
    assert q["count"] == flat.size


@pytest.mark.parametrize(
    ("options", "samples", "batch_size", "seed"),
    [
        ((), 32, 128, 0),  # the built-in recipe's calibrate block: 32 samples -> one batch of 128
        (("--samples", "100", "--batch-size", "64", "--seed", "3"), 100, 64, 3),  # 2 batches of 64
    ],
)
def test_profile_matches_numpy_on_the_same_batches(tmp_path, trained_toy: Trained,
                                                   options, samples, batch_size, seed) -> None:
    out = tmp_path / "stats.toml"
    run = run_cli("profile", "--model", "toy", "--ckpt", trained_toy.ckpt, "--out", out, "--no-progress",
                  *options)
    assert run.rc == 0, run
    assert f"wrote {out}" in run.out
    data = toml.load(out)

    model = load_like_mase(trained_toy.ckpt)
    inputs = _calibration_inputs(samples, batch_size, seed)
    assert inputs.shape[0] == math.ceil(samples / batch_size) * batch_size
    acts = toy_layer_inputs(model, inputs)
    params = {f"seq_blocks_{k.split('.')[1]}": {} for k in model.state_dict()}
    for k, v in model.state_dict().items():
        params[f"seq_blocks_{k.split('.')[1]}"][k.split(".")[2]] = v.numpy()

    for node, op in [(n, "linear") for n in LINEARS] + [(n, "relu") for n in RELUS]:
        assert data[node]["common"]["mase_op"] == op
        assert data[node]["common"]["mase_type"] == "module_related_func"
        args = data[node]["software"]["args"]
        _check_min_max_median(args["data_in_0"]["stat"], acts[node])
        meta = data[node]["common"]["args"]["data_in_0"]
        assert meta["type"] == "float" and meta["precision"] == [32]
        assert meta["size"][1:] == list(acts[node].shape[1:])
        if op == "linear":
            for tensor in ("weight", "bias"):
                _check_min_max_median(args[tensor]["stat"], params[node][tensor])
                assert data[node]["common"]["args"][tensor]["size"] == list(params[node][tensor].shape)
        else:
            assert "weight" not in args and "bias" not in args


def test_profile_other_statistics_from_a_rules_file(tmp_path, trained_toy: Trained) -> None:
    """abs, variance and per-channel (dims = [0]: one value per feature) through the CLI."""
    rules = tmp_path / "stats.tq"
    rules.write_text(
        "calibrate { samples = 200  batch_size = 50 }\n"
        "profile linear.data_in: variance_precise(dims = all), abs_mean(dims = all),\n"
        "                        range_min_max(dims = [0], abs = true)\n"
        "profile linear.weight: abs_mean(dims = [1])\n"
    )
    out = tmp_path / "stats.toml"
    run = run_cli("profile", "--ckpt", trained_toy.ckpt, "--rules", rules, "--out", out, "--no-progress")
    assert run.rc == 0, run
    data = toml.load(out)
    model = load_like_mase(trained_toy.ckpt)
    acts = toy_layer_inputs(model, _calibration_inputs(200, 50, 0))
    for node in LINEARS:
        x = acts[node].astype(np.float64)
        stat = data[node]["software"]["args"]["data_in_0"]["stat"]
        assert stat["variance_precise"]["mean"] == pytest.approx(x.mean(), rel=1e-6, abs=1e-9)
        assert stat["variance_precise"]["variance"] == pytest.approx(x.var(ddof=1), rel=1e-6)
        assert stat["abs_mean"]["abs_mean"] == pytest.approx(np.abs(x).mean(), rel=1e-6)
        per_feature = np.asarray(stat["range_min_max"]["max"], dtype=np.float64).ravel()
        np.testing.assert_array_equal(per_feature, np.abs(acts[node]).max(axis=0).astype(np.float64))
        w = model.get_submodule("seq_blocks." + node.rsplit("_", 1)[1]).weight.detach().numpy()
        rows = np.asarray(data[node]["software"]["args"]["weight"]["stat"]["abs_mean"]["abs_mean"]).ravel()
        np.testing.assert_allclose(rows, np.abs(w.astype(np.float64)).mean(axis=1), rtol=1e-6)


def test_profile_output_feeds_map(tmp_path, trained_toy: Trained) -> None:
    """ternqc reads its own statistics file back: `map` on it gives each layer its own max."""
    stats = tmp_path / "stats.toml"
    assert run_cli("profile", "--ckpt", trained_toy.ckpt, "--out", stats, "--no-progress").rc == 0
    q = tmp_path / "q.toml"
    run = run_cli("map", stats, "--rules", CONFIGS / "toy_ternary.tq", "-o", q)
    assert run.rc == 0, run
    written = toml.load(stats)
    config = toml.load(q)["passes"]["quantize"]
    for node in LINEARS:
        want = written[node]["software"]["args"]["weight"]["stat"]["range_min_max"]["max"]
        assert config[node]["config"]["weight_max"] == want


def test_profile_unwritable_output_is_exit_1(tmp_path, trained_toy: Trained) -> None:
    (tmp_path / "stats.toml").mkdir()
    run = run_cli("profile", "--ckpt", trained_toy.ckpt, "--out", tmp_path / "stats.toml", "--no-progress")
    assert_one_clean_error(run, "stats.toml")


def test_profile_with_a_compiled_plan_equals_profile_with_its_rules(tmp_path, trained_toy: Trained) -> None:
    plan = tmp_path / "plan.json"
    assert run_cli("compile", CONFIGS / "toy_ternary.tq", "-o", plan).rc == 0
    by_plan, by_rules, default = tmp_path / "p.toml", tmp_path / "r.toml", tmp_path / "d.toml"
    common = ("profile", "--ckpt", trained_toy.ckpt, "--no-progress")
    assert run_cli(*common, "--plan", plan, "--out", by_plan).rc == 0
    assert run_cli(*common, "--rules", CONFIGS / "toy_ternary.tq", "--out", by_rules).rc == 0
    # without --rules the built-in recipe is configs/toy_ternary.tq
    assert run_cli(*common, "--out", default).rc == 0
    assert toml.load(by_plan) == toml.load(by_rules) == toml.load(default)
