"""The integer engine against the simulated modules (every kind × granularity × input quantiser, both
kernels), its eligibility rules, fusion, and the packed export (bit-identical reload, layout)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from ternqc.runtime.engine import IntLinear, to_engine_
from ternqc.runtime.engine.intmm import onednn_available
from ternqc.runtime.engine.packed import (
    load_packed,
    pack_base3,
    pack_codes,
    save_packed,
    unpack_base3,
    unpack_codes,
)
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.convert import convert_
from ternqc.runtime.quantize.kinds import KINDS
from ternqc.runtime.quantize.modules import latent_param
from ternqc.runtime.quantize.quantizers import module_quant_from_params

WEIGHTS = {
    "ternary/tensor": {"weight_quantiser": "ternary", "weight_width": 2, "weight_threshold": 0.05},
    "ternary/channel": {"weight_quantiser": "ternary", "weight_width": 2, "weight_threshold": 0.05,
                        "weight_per_channel": True},
    "ternary/group": {"weight_quantiser": "ternary", "weight_width": 2, "weight_threshold": 0.05,
                      "weight_group_size": 16},
    "binary/channel": {"weight_quantiser": "binary", "weight_width": 1, "weight_per_channel": True},
    "binary/group": {"weight_quantiser": "binary", "weight_width": 1, "weight_group_size": 16},
    "int8/tensor": {"weight_quantiser": "integer", "weight_width": 8},
    "int8/channel": {"weight_quantiser": "integer", "weight_width": 8, "weight_per_channel": True},
    "int4/group": {"weight_quantiser": "integer", "weight_width": 4, "weight_group_size": 16},
}
INPUTS = {
    "ternary": {"data_in_quantiser": "ternary", "data_in_width": 2, "data_in_threshold": 0.3,
                "data_in_scale": 0.7},
    "ternary/no-scaling": {"data_in_quantiser": "ternary", "data_in_width": 2, "data_in_threshold": 0.3,
                           "data_in_scaling_factor": False},
    "binary": {"data_in_quantiser": "binary", "data_in_width": 1, "data_in_scale": 0.8},
    "binary/dynamic": {"data_in_quantiser": "binary", "data_in_width": 1, "data_in_dynamic": True},
    "int8": {"data_in_quantiser": "integer", "data_in_width": 8, "data_in_max": 2.5},
    "int8/dynamic": {"data_in_quantiser": "integer", "data_in_width": 8, "data_in_dynamic": True},
    "int4/dynamic": {"data_in_quantiser": "integer", "data_in_width": 4, "data_in_dynamic": True},
}
KERNELS = ["onednn", "int_mm"] if onednn_available() else ["int_mm"]


def config(weight: dict, data_in: dict, bias_quantised: bool = False):
    params = {"name": "ternary", "weight_scaling_factor": True, "data_in_scaling_factor": True, **weight, **data_in}
    if bias_quantised:
        params.update(bias_width=8, bias_quantiser="integer")
    return module_quant_from_params("linear", "fc", params)


def set_kernel(model: nn.Module, kernel: str) -> None:
    for m in model.modules():
        if isinstance(m, IntLinear):
            m.onednn = kernel == "onednn"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("data_in", list(INPUTS))
@pytest.mark.parametrize("weight", list(WEIGHTS))
def test_engine_equals_the_simulated_linear(weight, data_in, kernel):
    torch.manual_seed(len(weight) * 31 + len(data_in))
    sim = nn.Sequential(nn.Linear(64, 24))
    convert_(sim, {"0": config(WEIGHTS[weight], INPUTS[data_in], bias_quantised=weight == "int8/tensor")})
    sim.eval()
    eng = copy.deepcopy(sim)
    report = to_engine_(eng)
    assert report.engine == ("0",) and not report.simulated
    set_kernel(eng, kernel)
    x = torch.randn(3, 40, 64) * 1.3  # a leading batch dimension, 120 rows
    with torch.no_grad():
        want, got = sim(x), eng(x)
    assert got.shape == want.shape
    assert rel_err(want, got) <= 1e-5


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_engine_reads_the_converted_state_and_leaves_own_forwards_simulated():
    # converted in place: the engine takes the latent weight as it is now (updated after conversion), and a
    # Linear subclass with its own forward keeps it (simulated, named)
    torch.manual_seed(7)
    sim = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), _OwnForward(16, 8))
    cfg = {**WEIGHTS["int8/channel"], **INPUTS["int8/dynamic"]}
    params = {"name": "ternary", "weight_scaling_factor": True, "data_in_scaling_factor": True, **cfg}
    convert_(sim, {p: module_quant_from_params("linear", p, params) for p in ("0", "2")})
    with torch.no_grad():
        latent_param(sim[0], "weight").mul_(1.5)
    sim.eval()
    eng = copy.deepcopy(sim)
    report = to_engine_(eng)
    assert report.engine == ("0",) and "own forward" in report.simulated["2"]
    assert isinstance(eng[0], IntLinear) and type(eng[2]) is type(sim[2])
    x = torch.randn(5, 32)
    with torch.no_grad():
        want, got = sim(x), eng(x)
    assert rel_err(want, got) <= 1e-5


CONVS = {
    "conv2d/stride-pad": ("conv2d", lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1), (4, 3, 11, 9)),
    "conv2d/dilated": ("conv2d", lambda: nn.Conv2d(3, 8, (2, 3), padding=(1, 2), dilation=2), (2, 3, 10, 9)),
    "conv1d": ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2), (5, 4, 17)),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("data_in", ["ternary", "binary/dynamic", "int8", "int8/dynamic"])
@pytest.mark.parametrize("weight", ["ternary/tensor", "ternary/channel", "int8/channel", "binary/group"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_engine_equals_the_simulated_conv(conv, weight, data_in, kernel):
    op, make, shape = CONVS[conv]
    torch.manual_seed(len(conv) + len(weight) + len(data_in))
    wq = dict(WEIGHTS[weight])
    if "weight_group_size" in wq:
        wq["weight_group_size"] = 3  # rows of 27 / 24 / 12 elements
    params = {"name": "ternary", "weight_scaling_factor": True, "data_in_scaling_factor": True, **wq,
              **INPUTS[data_in]}
    sim = nn.Sequential(make(), nn.ReLU())
    convert_(sim, {"0": module_quant_from_params(op, "c", params)})
    sim.eval()
    eng = copy.deepcopy(sim)
    assert to_engine_(eng).engine == ("0",)
    set_kernel(eng, kernel)
    x = torch.randn(*shape)
    with torch.no_grad():
        want, got = sim(x), eng(x)
    assert got.shape == want.shape
    assert rel_err(want, got) <= 1e-5


def test_the_engine_matmul_is_integer_valued():
    """The accumulator equals numpy's integer product of the codes: the weights are stored as int8 codes
    and the rescale is one float product per column."""
    torch.manual_seed(0)
    sim = convert_(nn.Sequential(nn.Linear(32, 8, bias=False)),
                   {"0": config(WEIGHTS["int8/channel"], INPUTS["int8"])}).eval()
    eng = copy.deepcopy(sim)
    to_engine_(eng)
    m = eng[0]
    assert m.wcodes.dtype == torch.int8
    x = torch.randn(20, 32)
    step = np.float32(2.5 / 127)
    cx = np.clip(np.round(x.numpy() / step), -127, 127).astype(np.int64)
    acc = cx @ m.wcodes.numpy().astype(np.int64).T
    want = acc.astype(np.float64) * float(step) * m.wscale.numpy().astype(np.float64)
    with torch.no_grad():
        got = eng(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_what_stays_simulated_and_why():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv1d(2, 2, 3, groups=2), nn.Linear(8, 8),
                          nn.Linear(8, 8))
    cfg = {
        "0": config(WEIGHTS["ternary/tensor"], INPUTS["int8/dynamic"]),
        "3": config({"weight_width": 2, "weight_threshold": 0.05},
                    {"data_in_width": 2, "data_in_threshold": 0.1, "data_in_scale": [0.5] * 8}),
        "4": config({"weight_quantiser": "integer", "weight_width": 12}, INPUTS["int8"]),
    }
    cfg["2"] = module_quant_from_params("conv1d", "c", {"name": "ternary", "weight_width": 2,
                                                        "weight_threshold": 0.05})
    convert_(model, cfg)
    report = to_engine_(model)
    assert report.engine == ("0",)
    assert "per-channel scale" in report.simulated["3"]
    assert "12 bits" in report.simulated["4"]
    assert "grouped conv" in report.simulated["2"]


def test_fused_relu_gives_the_same_outputs_as_unfused():
    torch.manual_seed(1)
    float_model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))
    for data_in in ("ternary", "int8", "int8/dynamic"):
        cfg = {p: config(WEIGHTS["ternary/tensor"], INPUTS[data_in]) for p in ("0", "2", "4")}
        sim = convert_(copy.deepcopy(float_model), cfg).eval()
        fused, unfused = copy.deepcopy(sim), copy.deepcopy(sim)
        assert to_engine_(fused).fused == ("1", "3")
        assert to_engine_(unfused, fuse=False).fused == ()
        assert isinstance(fused[1], nn.Identity) and fused[0].relu and fused[2]._in.nonnegative
        x = torch.randn(50, 32)
        with torch.no_grad():
            a, b, s = fused(x), unfused(x), sim(x)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert (a.argmax(1) == s.argmax(1)).float().mean() >= 0.95


# --- packed export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "width"), [(k, w) for k in KINDS for w in KINDS[k].widths])
def test_pack_unpack_round_trip_and_size(kind, width):
    low, high = KINDS[kind].levels(width)
    rng = np.random.default_rng(width)
    codes = rng.integers(low, high + 1, size=(37, 11))
    if kind == "binary":
        codes = np.where(codes >= 0, 1, -1)
    lo, step, bits = KINDS[kind].pack_layout(width)
    data = pack_codes(codes, lo, step, bits)
    assert data.dtype == np.uint8 and data.size == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(unpack_codes(data, codes.shape, lo, step, bits), codes)
    assert bits == {"ternary": 2, "binary": 1, "integer": width}[kind]


def mixed_model() -> tuple[nn.Module, dict]:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32),
                          nn.Linear(32, 4))
    cfg = {
        "0": config(WEIGHTS["ternary/tensor"], INPUTS["ternary"]),
        "2": config(WEIGHTS["int4/group"], INPUTS["int8/dynamic"]),
        "4": config(WEIGHTS["binary/channel"], INPUTS["binary"]),
        "5": config({"weight_width": 2, "weight_threshold": 0.05}, {"data_in_width": 32}),  # stays simulated
    }
    return model, cfg


def test_packed_reload_is_bit_identical(tmp_path):
    model, cfg = mixed_model()
    convert_(model, cfg)
    report = to_engine_(model)
    assert report.engine == ("0", "2", "4") and set(report.simulated) == {"5"}
    x = torch.randn(33, 64)
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "m.safetensors"
    save_packed(path, model, cfg, model_spec="mixed", extra={"note": "test"})
    fresh, _ = mixed_model()
    for p in fresh.parameters():  # another model's weights: everything must come from the file
        nn.init.normal_(p)
    loaded = load_packed(path, fresh)
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, want)
    assert isinstance(loaded[0], IntLinear) and isinstance(loaded[1], nn.Identity)


def test_packed_file_is_plain_safetensors_with_codes_at_their_width(tmp_path):
    from safetensors import safe_open

    model, cfg = mixed_model()
    convert_(model, cfg)
    to_engine_(model)
    path = tmp_path / "m.safetensors"
    save_packed(path, model, cfg, model_spec="mixed")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
        packed0 = f.get_tensor("0.wcodes.packed")
    assert meta["format"] == "ternqc-packed" and meta["model_spec"] == "mixed"
    assert set(json.loads(meta["configs"])) == set(cfg)
    layout = json.loads(meta["packed"])
    assert layout["0.wcodes"] == {"shape": [64, 64], "kind": "ternary", "width": 2, "low": -1, "step": 1,
                                  "bits": 2, "scheme": "bits"}
    assert layout["4.wcodes"]["bits"] == 1 and layout["2.wcodes"]["bits"] == 4
    assert "0.wcodes" not in names and packed0.dtype == torch.uint8 and packed0.numel() == 64 * 64 // 4


def test_a_file_that_is_not_packed_is_a_user_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="not a ternqc packed model"):
        load_packed(path, nn.Linear(2, 2))
    with pytest.raises(UserError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors", nn.Linear(2, 2))


def test_packed_reload_of_a_conv_net_is_bit_identical(tmp_path):
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 5))

    params = {"name": "ternary", "weight_width": 2, "weight_threshold": 0.05, "weight_scaling_factor": True,
              "data_in_quantiser": "integer", "data_in_width": 8, "data_in_dynamic": True}
    cfg = {p: module_quant_from_params(op, p, params) for p, op in (("0", "conv2d"), ("2", "conv2d"),
                                                                                ("4", "linear"))}
    torch.manual_seed(3)
    model = convert_(build(), cfg)
    assert to_engine_(model).engine == ("0", "2", "4")
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = model(x)
    save_packed(tmp_path / "c.safetensors", model, cfg, model_spec="convnet")
    with torch.no_grad():
        got = load_packed(tmp_path / "c.safetensors", build())(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 1000, 1003])
def test_base3_packing_round_trip_and_size(n):
    codes = np.random.default_rng(n).integers(-1, 2, size=n)
    data = pack_base3(codes)
    assert data.dtype == np.uint8 and data.size == -(-n // 5)
    # byte i holds codes 5i..5i+4 as base-3 digits of (c + 1), the first the least significant
    first = list(codes[:5] + 1) + [1] * (5 - min(n, 5))  # padded with codes 0
    assert int(data[0]) == sum(int(d) * 3**i for i, d in enumerate(first))
    np.testing.assert_array_equal(unpack_base3(data, (n,)), codes)


def test_base3_packed_reload_is_bit_identical_and_smaller(tmp_path):
    model, cfg = mixed_model()
    convert_(model, cfg)
    to_engine_(model)
    x = torch.randn(9, 64)
    with torch.no_grad():
        want = model(x)
    sizes = {}
    for packing in ("2bit", "base3"):
        path = tmp_path / f"{packing}.safetensors"
        save_packed(path, model, cfg, model_spec="mixed", ternary_packing=packing)
        sizes[packing] = path.stat().st_size
        fresh, _ = mixed_model()
        with torch.no_grad():
            assert torch.equal(load_packed(path, fresh)(x), want)
    # layer 0's 64 x 64 ternary codes: 1024 bytes at 2 bits, 820 in base 3
    assert sizes["2bit"] - sizes["base3"] >= 1024 - 820 - 64  # less a few bytes of header
