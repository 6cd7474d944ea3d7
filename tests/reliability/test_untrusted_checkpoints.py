"""Reloading a ternary checkpoint never imports or runs code named inside it (issue 13).

The model spec stored in `ternary.ckpt` is data: `load_ternary_checkpoint` builds a model from it only
when it is a built-in name, or when the caller passes the same spec; otherwise the caller supplies the
model. A payload file that would leave a marker when imported proves nothing ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ternqc.runtime.errors import UserError
from ternqc.runtime.models.builtin import ToyNet
from ternqc.runtime.quantize.convert import convert_, load_ternary_checkpoint, save_ternary_checkpoint
from ternqc.runtime.quantize.quantizers import module_quant_from_params


def _configs() -> dict:
    params = {"name": "ternary", "weight_width": 2, "weight_threshold": 0.01, "weight_scaling_factor": True}
    return {"seq_blocks.0": module_quant_from_params("linear", "seq_blocks_0", params)}


def _checkpoint(tmp: Path, spec: str) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = convert_(ToyNet(), _configs()).eval()
    path = tmp / "ternary.ckpt"
    save_ternary_checkpoint(path, model, _configs(), model_spec=spec)
    return path, model


@pytest.fixture(name="payload")
def payload_fixture(tmp_path: Path) -> tuple[str, Path]:
    """A model file that leaves a marker when imported; returns its spec and the marker's path."""
    marker = tmp_path / "RAN"
    source = tmp_path / "payload.py"
    source.write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "from ternqc.runtime.models.builtin import ToyNet\n"
        "def make():\n    return ToyNet()\n"
    )
    return f"{source}:make", marker


@pytest.mark.parametrize("stored", ["payload", "this:s", "os:getcwd"])
def test_a_stored_spec_is_never_imported(stored: str, payload, tmp_path: Path, capsys) -> None:
    spec = payload[0] if stored == "payload" else stored
    path, _ = _checkpoint(tmp_path, spec)
    with pytest.raises(UserError, match="never imports or runs code named inside a checkpoint"):
        load_ternary_checkpoint(path)
    assert not payload[1].exists()
    assert "Beautiful is better than ugly" not in capsys.readouterr().out  # `this` was not imported


def test_a_different_spec_from_the_caller_is_refused(payload, tmp_path: Path) -> None:
    path, _ = _checkpoint(tmp_path, payload[0])
    with pytest.raises(UserError, match="not 'toy'"):
        load_ternary_checkpoint(path, "toy")
    assert not payload[1].exists()


def test_the_caller_may_trust_the_same_spec_or_supply_the_model(payload, tmp_path: Path) -> None:
    path, model = _checkpoint(tmp_path, payload[0])
    x = torch.randn(5, 1, 2, 2)
    supplied, _, meta = load_ternary_checkpoint(path, ToyNet())
    assert not payload[1].exists() and meta["model_spec"] == payload[0]
    built, _, _ = load_ternary_checkpoint(path, payload[0])  # the caller named that code: it runs
    assert payload[1].read_text() == "imported"
    with torch.no_grad():
        assert torch.equal(supplied(x), model(x)) and torch.equal(built(x), model(x))


def test_a_builtin_spec_is_built_unasked(tmp_path: Path) -> None:
    path, model = _checkpoint(tmp_path, "toy")
    loaded, _, _ = load_ternary_checkpoint(path)
    x = torch.randn(5, 1, 2, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_checkpoint_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "t.ckpt"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="FIFO"):
        load_ternary_checkpoint(fifo)


def test_the_checkpoint_is_byte_identical_across_saves(tmp_path: Path) -> None:
    """Saved twice (different temporary names), the bytes are equal: no name leaks into the archive."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = _checkpoint(tmp_path / "a", "toy")
    b, _ = _checkpoint(tmp_path / "b", "toy")
    assert a.read_bytes() == b.read_bytes()
