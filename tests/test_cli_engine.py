"""`ternqc apply --engine int`, `ternqc export --format packed` and `ternqc.load_packed` on the trained toy
model: the engine's accuracy equals the simulated model's, the packed file reloads bit for bit."""

from __future__ import annotations

import re

import pytest
import torch

import ternqc
from ternqc.runtime.engine import IntLinear, to_engine_
from ternqc.runtime.quantize.convert import load_ternary_checkpoint
from tests.test_cli_support import (
    CONFIGS,
    Trained,
    assert_one_clean_error,
    run_cli,
    toy_tiny,
    trained_toy_fixture,  # noqa: F401 - registers the session fixture trained_toy
)


@pytest.mark.parametrize("recipe", ["toy_ternary.tq", "bitnet.tq", "w2a8_first_last_int8.tq"])
def test_apply_engine_int_has_the_simulated_accuracy(tmp_path, trained_toy: Trained, recipe: str) -> None:
    run = run_cli("apply", "--ckpt", trained_toy.ckpt, "--rules", CONFIGS / recipe, "--out", tmp_path,
                  "--no-progress", "--engine", "int")
    assert run.rc == 0, run
    simulated = float(re.search(r"ternary (\d\.\d+)", run.out).group(1))
    engine = re.search(r"integer engine: (\d+) layers on int8 matmuls, accuracy (\d\.\d+)", run.out)
    assert engine is not None, run.out
    assert int(engine.group(1)) == 3  # toy's three Linears
    assert float(engine.group(2)) == pytest.approx(simulated, abs=2 / 512)  # at most a sample or two apart


def test_export_then_load_packed_is_bit_identical(tmp_path, trained_toy: Trained) -> None:
    out = tmp_path / "apply"
    assert run_cli("apply", "--ckpt", trained_toy.ckpt, "--rules", CONFIGS / "bitnet.tq", "--out", out,
                   "--no-progress").rc == 0
    packed = tmp_path / "model.safetensors"
    run = run_cli("export", out / "ternary.ckpt", "--format", "packed", "-o", packed)
    assert run.rc == 0, run
    assert "packed 3 layers" in run.out
    model, _configs, _meta = load_ternary_checkpoint(out / "ternary.ckpt")
    to_engine_(model)
    loaded = ternqc.load_packed(packed)
    assert all(isinstance(loaded.seq_blocks[i], IntLinear) for i in (0, 2, 4))
    inputs, _labels = toy_tiny("validation")
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert packed.stat().st_size < (out / "ternary.ckpt").stat().st_size
    assert state > 0


def test_export_of_a_missing_checkpoint_is_one_clean_error(tmp_path) -> None:
    run = run_cli("export", tmp_path / "nope.ckpt", "-o", tmp_path / "m.safetensors")
    assert_one_clean_error(run, "does not exist")
