"""Conversion and the ternary checkpoint: converted modules compute what an independent reference computes
(a deep copy of the float model whose weights are replaced by numpy-quantised ones and whose module inputs
are quantised by numpy in forward pre-hooks), and a saved checkpoint reloads to identical outputs."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

from ternqc.runtime.errors import UserError
from ternqc.runtime.models.builtin import ToyNet
from ternqc.runtime.quantize import convert as convert_mod
from ternqc.runtime.quantize.convert import convert_, load_ternary_checkpoint, save_ternary_checkpoint
from ternqc.runtime.quantize.modules import is_converted, latent_param
from ternqc.runtime.quantize.quantizers import ModuleQuant, TensorQuant

# --- independent reference -------------------------------------------------------------------------------


def ref_q(x: np.ndarray, tq: TensorQuant) -> np.ndarray:
    if not tq.quantize:
        return x
    d = np.asarray(tq.delta, dtype=np.float32)
    t = np.where(x > d, 1.0, np.where(x < -d, -1.0, 0.0))
    if not tq.scaling:
        return t.astype(np.float32)
    if tq.alpha is not None:
        alpha = np.asarray(tq.alpha, dtype=np.float64)
    else:  # mean |x| over |x| > Δ, per element of Δ (reduce where Δ, right-aligned, has size 1)
        dd = d.reshape((1,) * (x.ndim - d.ndim) + d.shape)
        axes = tuple(i for i, s in enumerate(dd.shape) if s == 1)
        a, mask = np.abs(x).astype(np.float64), np.abs(x) > dd
        cnt = mask.sum(axis=axes, keepdims=True)
        alpha = np.where(cnt > 0, (a * mask).sum(axis=axes, keepdims=True) / np.maximum(cnt, 1), 0.0)
        alpha = alpha.reshape(d.shape)
    return (t * alpha).astype(np.float32)


def reference_model(model: nn.Module, configs: dict[str, ModuleQuant]) -> nn.Module:
    """A float copy computing the ternary model's function without ternqc's quantiser code."""
    ref = copy.deepcopy(model)
    for path, cfg in configs.items():
        m = ref.get_submodule(path)
        with torch.no_grad():
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if p is not None:
                    p.copy_(torch.from_numpy(ref_q(p.detach().numpy(), cfg.tensor(name))))
        tq = cfg.tensor("data_in")
        if tq.quantize:
            m.register_forward_pre_hook(
                lambda _m, args, tq=tq: (torch.from_numpy(ref_q(args[0].detach().numpy(), tq)),)
            )
    return ref


def TQ(delta, scaling=False, alpha=None):
    return TensorQuant(quantize=True, delta=delta, scaling=scaling, alpha=alpha)


def _mq(op, node, **tensors):
    return ModuleQuant(op, node, tensors)


def toy_configs() -> dict[str, ModuleQuant]:
    return {
        "seq_blocks.0": ModuleQuant(
            "linear", "seq_blocks_0", {"weight": TQ(0.05, True), "bias": TQ(0.05, True)}
        ),
        "seq_blocks.1": ModuleQuant("relu", "seq_blocks_1", {"data_in": TQ(0.1, True, 0.9)}),
        "seq_blocks.2": ModuleQuant(
            "linear",
            "seq_blocks_2",
            {"data_in": TQ([0.2] * 100, True, [0.5] * 50 + [1.0] * 50), "weight": TQ([[0.02]] * 100, True)},
        ),
        "seq_blocks.3": ModuleQuant("relu", "seq_blocks_3", {"data_in": TensorQuant.float_()}),  # nothing
        "seq_blocks.4": ModuleQuant("linear", "seq_blocks_4", {"data_in": TQ(0.3), "weight": TQ(0.05)}),
    }


def toy_input(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 2, 2, generator=g) - 0.5) * 10


# --- a user-style model: Conv2d, Conv1d, nested modules, containers, a Python `if` ----------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(Block(), nn.Conv2d(4, 4, 1))
        self.temporal = nn.ModuleList([nn.Conv1d(4, 2, 3, padding=1)])
        self.heads = nn.ModuleDict({"cls": nn.Linear(2 * 5, 3)})

    def forward(self, x):
        h = self.features(x)
        if h.shape[-1] > 1:  # a Python branch: no FX tracing needed
            h = h.mean(-1)
        h = self.temporal[0](h)
        return self.heads["cls"](h.flatten(1))


def user_configs() -> dict[str, ModuleQuant]:
    return {
        "features.0.conv": ModuleQuant(
            "conv2d",
            "features_0_conv",
            {
                "data_in": TQ([[[0.1]], [[0.2]], [[0.3]]], True, [[[1.0]], [[0.5]], [[0.8]]]),
                "weight": TQ([[[[0.05]]], [[[0.1]]], [[[0.1]]], [[[0.15]]]], True),
                "bias": TQ(0.01, True),
            },
        ),
        "features.0.act": ModuleQuant("relu", "features_0_act", {"data_in": TQ(0.05, True, 0.4)}),
        "features.1": ModuleQuant("conv2d", "features_1", {"weight": TQ(0.2, False)}),
        "temporal.0": ModuleQuant(
            "conv1d", "temporal_0", {"data_in": TQ(0.02, True, 0.3), "weight": TQ(0.1, True)}
        ),
        "heads.cls": ModuleQuant("linear", "heads_cls", {"weight": TQ([[0.1]] * 3, True), "bias": TQ(0.0)}),
    }


# --- conversion ------------------------------------------------------------------------------------------


def test_convert_toynet_matches_reference():
    torch.manual_seed(0)
    model = ToyNet()
    configs = toy_configs()
    ref = reference_model(model, configs)
    assert convert_(model, configs) is model
    assert [is_converted(m) for m in model.seq_blocks] == [True, True, True, False, True]
    assert all(isinstance(m, t) for m, t in zip(model.seq_blocks, (nn.Linear, nn.ReLU, nn.Linear, nn.ReLU)))
    model.eval()
    x = toy_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_convert_user_model_with_convs_and_nested_modules():
    torch.manual_seed(1)
    model = UserNet()
    configs = user_configs()
    ref = reference_model(model, configs)
    convert_(model, configs)
    for m, kind in ((model.features[0].conv, nn.Conv2d), (model.features[0].act, nn.ReLU),
                    (model.features[1], nn.Conv2d), (model.temporal[0], nn.Conv1d), (model.heads["cls"], nn.Linear)):
        assert is_converted(m) and isinstance(m, kind)
    x = torch.randn(2, 3, 5, 6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_convert_skips_configs_that_quantise_nothing():
    model = ToyNet()
    relu = model.seq_blocks[3]
    convert_(model, {"seq_blocks.3": ModuleQuant("relu", "seq_blocks_3", {"data_in": TensorQuant.float_()})})
    assert model.seq_blocks[3] is relu


def test_converted_model_fine_tunes():
    torch.manual_seed(2)
    model = convert_(ToyNet(), toy_configs()).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = toy_input(64), torch.randint(0, 2, (64,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    latent = latent_param(model.seq_blocks[0], "weight")
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    opt.step()


@pytest.mark.parametrize(
    "configs, words",
    [
        ({"seq_blocks.9": _mq("linear", "seq_blocks_9", weight=TQ(0.1))}, ["seq_blocks.9", "did you mean"]),
        ({"": _mq("linear", "root", weight=TQ(0.1))}, ["root"]),
        ({"seq_blocks.1": _mq("linear", "seq_blocks_1", weight=TQ(0.1))}, ["seq_blocks_1", "ReLU"]),
        ({"seq_blocks.0": _mq("conv2d", "seq_blocks_0", weight=TQ(0.1))}, ["seq_blocks_0", "Linear"]),
        ({"seq_blocks.0": _mq("linear", "seq_blocks_0", data_in=TQ(0.1, True))}, ["seq_blocks_0", "α"]),
    ],
    ids=["unknown_path", "root", "wrong_type", "op_mismatch", "missing_data_in_alpha"],
)
def test_convert_errors_leave_the_model_unchanged(configs, words):
    model = ToyNet()
    before = [type(m) for m in model.modules()]
    good = {"seq_blocks.4": ModuleQuant("linear", "seq_blocks_4", {"weight": TQ(0.1)})}
    with pytest.raises(UserError) as exc:
        convert_(model, {**good, **configs})
    for w in words:
        assert w in str(exc.value)
    assert [type(m) for m in model.modules()] == before  # nothing was swapped in


def test_convert_twice_is_an_error():
    model = convert_(ToyNet(), toy_configs())
    with pytest.raises(UserError, match="already"):
        convert_(model, toy_configs())


# --- checkpoint ------------------------------------------------------------------------------------------


def test_save_load_toynet_gives_identical_outputs(tmp_path):
    torch.manual_seed(3)
    configs = toy_configs()
    model = convert_(ToyNet(), configs).eval()
    x = toy_input(32, seed=5)
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "out" / "ternary.ckpt"
    save_ternary_checkpoint(path, model, configs, model_spec="toy", extra={"accuracy": {"float": 0.9}})
    assert sorted(os.listdir(path.parent)) == ["ternary.ckpt"]  # no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "ternqc-ternary" and raw["version"] == 2 and raw["model_spec"] == "toy"
    built = []
    loaded, loaded_configs, meta = load_ternary_checkpoint(path, lambda spec: built.append(spec) or ToyNet())
    assert built == ["toy"]
    assert loaded_configs == configs
    assert meta == {"format": "ternqc-ternary", "version": 2, "model_spec": "toy", "accuracy": {"float": 0.9}}
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_save_load_user_model_and_default_builder(tmp_path):
    torch.manual_seed(4)
    configs = user_configs()
    model = convert_(UserNet(), configs).eval()
    x = torch.randn(3, 3, 5, 7)
    path = tmp_path / "ternary.ckpt"
    save_ternary_checkpoint(path, model, configs, model_spec="user.py:make")
    loaded, _, _ = load_ternary_checkpoint(path, lambda spec: UserNet())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # the runtime's own builder for a built-in model
    toy = convert_(ToyNet(), toy_configs()).eval()
    save_ternary_checkpoint(path, toy, toy_configs(), model_spec="toy")
    loaded_toy, _, _ = load_ternary_checkpoint(path)
    with torch.no_grad():
        assert torch.equal(loaded_toy(toy_input()), toy(toy_input()))


def test_save_rejects_bad_extra_and_keeps_old_file(tmp_path):
    model = convert_(ToyNet(), toy_configs())
    path = tmp_path / "ternary.ckpt"
    path.write_bytes(b"old")
    with pytest.raises(UserError, match="reserved"):
        save_ternary_checkpoint(path, model, toy_configs(), model_spec="toy", extra={"configs": 1})
    with pytest.raises(UserError, match="plain"):
        save_ternary_checkpoint(path, model, toy_configs(), model_spec="toy", extra={"x": {"y": object()}})
    assert path.read_bytes() == b"old"


def test_failed_save_leaves_no_half_written_file(tmp_path, monkeypatch):
    model = convert_(ToyNet(), toy_configs())
    path = tmp_path / "ternary.ckpt"
    path.write_bytes(b"old")

    def broken_save(obj, f):  # ternqc saves through an open file (the archive name then never varies)
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_mod.torch, "save", broken_save)
    with pytest.raises(UserError, match="ternary.ckpt"):
        save_ternary_checkpoint(path, model, toy_configs(), model_spec="toy")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ternary.ckpt"]


def _write(path, payload):
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p / "missing.ckpt", ["does not exist"]),
        (lambda p: (p / "junk.ckpt").write_bytes(b"not a checkpoint") and p / "junk.ckpt", ["cannot read"]),
        (lambda p: _write(p / "a.ckpt", {"state_dict": {}}), ["not a ternqc ternary checkpoint"]),
        (lambda p: _write(p / "b.ckpt", {"format": "ternqc-ternary", "version": 3}), ["version 3"]),
        (
            lambda p: _write(
                p / "c.ckpt",
                {"format": "ternqc-ternary", "version": 2, "model_spec": "toy", "state_dict": {},
                 "configs": {"seq_blocks.0": {"op": "maxpool", "node": "x", "tensors": {}}}},
            ),
            ["malformed"],
        ),
        (
            lambda p: _write(
                p / "d.ckpt",
                {"format": "ternqc-ternary", "version": 2, "model_spec": "toy", "configs": {},
                 "state_dict": {"seq_blocks.0.weight": torch.zeros(1)}},
            ),
            ["does not fit", "toy"],
        ),
    ],
    ids=["missing", "junk", "other_format", "other_version", "bad_config", "state_mismatch"],
)
def test_load_errors_are_user_errors(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(UserError) as exc:
        load_ternary_checkpoint(path, lambda spec: ToyNet())
    for w in words:
        assert w in str(exc.value)


def test_load_into_a_different_model_is_a_user_error(tmp_path):
    model = convert_(ToyNet(), toy_configs())
    path = tmp_path / "ternary.ckpt"
    save_ternary_checkpoint(path, model, toy_configs(), model_spec="toy")
    with pytest.raises(UserError, match="does not fit"):
        load_ternary_checkpoint(path, lambda spec: ToyNet(hidden=50))
    with pytest.raises(UserError, match="seq_blocks"):
        load_ternary_checkpoint(path, lambda spec: UserNet())
