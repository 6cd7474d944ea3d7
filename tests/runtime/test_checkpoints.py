"""Checkpoints: Lightning and plain round trips, MASE's loading rule, and every refused or broken file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ternqc.runtime.errors import UserError
from ternqc.runtime.io.checkpoints import load_checkpoint_, save_lightning_checkpoint
from ternqc.runtime.models.builtin import ToyNet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _toy(seed: int) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet()


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(16, 1, 2, 2)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.fixture
def saved(tmp_path):
    """A toy model and the Lightning checkpoint written from it."""
    model = _toy(1)
    path = tmp_path / "best.ckpt"
    metrics = {"val_loss": 0.25, "val_acc": 0.9}
    save_lightning_checkpoint(path, model, epoch=4, metrics=metrics, global_step=40)
    return model, path


def test_lightning_round_trip(saved):
    model, path = saved
    fresh = _toy(2)
    assert not _same_outputs(model, fresh)
    meta = load_checkpoint_(fresh, path)
    assert _same_outputs(model, fresh)
    assert meta["epoch"] == 4 and meta["global_step"] == 40
    assert meta["metrics"] == {"val_loss": 0.25, "val_acc": 0.9}
    assert "state_dict" not in meta


def test_lightning_layout_as_lightning_and_mase_read_it(saved):
    model, path = saved
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw["state_dict"]) == {"model." + k for k in model.state_dict()}
    assert isinstance(raw["pytorch-lightning_version"], str) and isinstance(raw["epoch"], int)
    # MASE's --load-type pl: keys containing "model." lose their first dotted part; strict load.
    stripped = {(".".join(k.split(".")[1:]) if "model." in k else k): v for k, v in raw["state_dict"].items()}
    fresh = _toy(3)
    fresh.load_state_dict(stripped, strict=True)
    assert _same_outputs(model, fresh)


def test_plain_state_dict_round_trip(tmp_path):
    model = _toy(1)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    fresh = _toy(2)
    assert load_checkpoint_(fresh, tmp_path / "plain.pt") == {}
    assert _same_outputs(model, fresh)


def test_save_is_atomic_and_overwrites(saved):
    model, path = saved
    other = _toy(5)
    save_lightning_checkpoint(path, other, epoch=9, metrics={})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    fresh = _toy(2)
    assert load_checkpoint_(fresh, path)["epoch"] == 9
    assert _same_outputs(other, fresh)


def test_save_creates_parent_folders(tmp_path):
    path = tmp_path / "runs" / "a" / "best.ckpt"
    save_lightning_checkpoint(path, _toy(0), epoch=0, metrics={"val_loss": 1.0})
    assert path.is_file()


def test_save_refuses_objects_weights_only_cannot_read(tmp_path):
    with pytest.raises(TypeError, match="Linear"):
        save_lightning_checkpoint(
            tmp_path / "x.ckpt", _toy(0), epoch=0, metrics={}, extra={"m": nn.Linear(1, 1)}
        )
    assert not (tmp_path / "x.ckpt").exists()


def write_marker(path: str) -> None:
    Path(path).write_text("executed")


class _Marker:
    """Unpickling this calls `write_marker`: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (write_marker, (self.path,))


def _load_error(path, model=None) -> str:
    with pytest.raises(UserError) as info:
        load_checkpoint_(model or _toy(0), path)
    return str(info.value)


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    state = {"model." + k: v for k, v in _toy(0).state_dict().items()}
    torch.save({"state_dict": state, "x": _Marker(str(marker))}, path)
    msg = _load_error(path)
    assert not marker.exists()
    assert "holds Python objects" in msg and "refused" in msg and str(path) in msg
    assert "write_marker" in msg  # names what it needed
    # The same file with weights_only=False does run the code: the test's marker is real.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "executed"


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "module.ckpt"
    torch.save(_toy(0), path)
    assert "holds Python objects" in _load_error(path)


def test_missing_file(tmp_path):
    msg = _load_error(tmp_path / "nope.ckpt")
    assert "nope.ckpt" in msg and "does not exist" in msg


def test_truncated_checkpoint(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    msg = _load_error(cut)
    assert "cut.ckpt" in msg and "truncated or not a PyTorch checkpoint" in msg


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    assert "truncated or not a PyTorch checkpoint" in _load_error(path)


def test_a_folder_is_not_a_checkpoint(tmp_path):
    assert "is a directory" in _load_error(tmp_path)


@pytest.mark.parametrize(
    ("obj", "shown"),
    [(torch.zeros(3), "a Tensor"), ({"epoch": 3, "metrics": {}}, "a dict with keys 'epoch', 'metrics'")],
)
def test_weights_only_content_that_is_not_a_checkpoint(tmp_path, obj, shown):
    path = tmp_path / "x.ckpt"
    torch.save(obj, path)
    msg = _load_error(path)
    assert shown in msg and "state_dict" in msg


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path):
    state = _toy(0).state_dict()
    state["seq_blocks.9.weight"] = state.pop("seq_blocks.4.weight")
    path = tmp_path / "keys.pt"
    torch.save(state, path)
    msg = _load_error(path)
    assert "missing from the checkpoint: seq_blocks.4.weight" in msg
    assert "not in the model: seq_blocks.9.weight" in msg


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    path = tmp_path / "wide.ckpt"
    save_lightning_checkpoint(path, ToyNet(hidden=50), epoch=0, metrics={})
    msg = _load_error(path)
    assert "seq_blocks.0.weight (checkpoint [50, 4], model [100, 4])" in msg
    assert "after stripping 'model.'" in msg


def test_lightning_keys_outside_model_are_reported(tmp_path):
    state = {"model." + k: v for k, v in _toy(0).state_dict().items()}
    state["loss_fn.weight"] = torch.ones(2)
    path = tmp_path / "extra.ckpt"
    torch.save({"state_dict": state, "epoch": 0}, path)
    assert "not in the model: loss_fn.weight" in _load_error(path)


def test_failed_load_leaves_the_model_unchanged(tmp_path):
    model = _toy(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "wide.ckpt"
    save_lightning_checkpoint(path, ToyNet(hidden=50), epoch=0, metrics={})
    _load_error(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_user_model_round_trip(tmp_path):
    from ternqc.runtime.models.builtin import build_model

    spec = f"{FIXTURES / 'user_model.py'}:factory"
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    path = tmp_path / "user.ckpt"
    save_lightning_checkpoint(path, model, epoch=1, metrics={})
    fresh = build_model(spec)
    load_checkpoint_(fresh, path)
    x = torch.randn(4, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert os.path.getsize(path) > 0
