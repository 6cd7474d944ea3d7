"""The hook profiler: resolving profile points, and statistics collected by hooks against numpy on the same
tensors computed by hand (toy, and a model with Conv2d, nested submodules, two-input modules and a forward
with a Python `if` on tensor values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ternqc.plan import Origin, ProfilePoint, Selector, StatSpec
from ternqc.runtime.calibrate.hooks import collect_stats
from ternqc.runtime.calibrate.points import ResolvedPoints, resolve_profile
from ternqc.runtime.errors import UserError
from ternqc.runtime.models.builtin import ToyNet
from tests.runtime.test_stats import check, reference

ORIGIN = Origin("rules.tq", 3, 1)


def spec(name, dims="all", abs=False, **options):
    return StatSpec(name, dims=dims, abs=abs, options=tuple(options.items()))


def point(kind, pattern, tensor, *specs, line=1, reason="profiled"):
    return ProfilePoint(Selector(kind, pattern), tensor, specs, Origin("rules.tq", line, 1), reason)


def no_hooks_left(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# --- resolve ----------------------------------------------------------------------------------------------


def test_resolve_maps_modules_tensors_specs_in_first_seen_order_without_duplicates():
    model = ToyNet()
    a, b, c = spec("range_min_max"), spec("abs_mean", (1,)), spec("range_quantile", quantile=0.5)
    points = [
        point("type", "linear", "data_in_0", a, b, line=1),
        point("name", "seq_blocks_2", "data_in_0", b, c, line=2),  # FX node name
        point("glob", "seq_blocks.[04]", "weight", a, line=3),
        point("type", "relu", "data_in_0", a, line=4),
        point("type", "conv2d", "weight", a, line=5),  # matches nothing
        point("default", "", "bias", a, line=6),
    ]
    r = resolve_profile(points, model)
    assert list(r.modules) == ["seq_blocks.0", "seq_blocks.2", "seq_blocks.4", "seq_blocks.1", "seq_blocks.3"]
    assert r.modules["seq_blocks.2"] == {"data_in_0": (a, b, c), "bias": (a,)}
    assert r.modules["seq_blocks.0"] == {"data_in_0": (a, b), "weight": (a,), "bias": (a,)}
    assert r.modules["seq_blocks.4"] == {"data_in_0": (a, b), "weight": (a,), "bias": (a,)}
    assert r.modules["seq_blocks.1"] == {"data_in_0": (a,)}  # `default` bias: only types that have a bias
    assert [p.origin.line for p in r.unmatched] == [5]
    assert r.origins[("seq_blocks.2", "data_in_0")] == (Origin("rules.tq", 1, 1), Origin("rules.tq", 2, 1))


def test_resolve_missing_parameter_is_a_user_error_naming_module_and_rule():
    with pytest.raises(UserError, match=r"weight of seq_blocks.1 \(ReLU\)"):
        resolve_profile([point("glob", "seq_blocks.[01]", "weight", spec("range_min_max"))], ToyNet())
    model = nn.Sequential(nn.Linear(3, 3, bias=False))
    with pytest.raises(UserError, match=r"rules\.tq:7:1.*bias of 0 \(Linear\)"):
        resolve_profile([point("name", "0", "bias", spec("range_min_max"), line=7)], model)
    # a type rule speaks of every Linear: one built without a bias has nothing to profile there
    by_type = resolve_profile([point("type", "linear", "bias", spec("range_min_max"), line=7)], model)
    assert by_type.modules == {}
    with pytest.raises(UserError, match="weight of 0"):
        resolve_profile([point("name", "0", "weight", spec("range_min_max"))], nn.Sequential(nn.ReLU()))
    skipped = resolve_profile(
        [point("type", "linear", "bias", spec("range_min_max"))], model, missing_params="skip"
    )
    assert skipped.modules == {} and skipped.unmatched == ()


def test_resolve_leaves_derived_points_for_a_later_pass():
    p = point("type", "relu", "data_in_0", spec("threshold_abs_mean"), reason="derived")
    assert resolve_profile([p], ToyNet()).modules == {}
    assert "seq_blocks.1" in resolve_profile([p], ToyNet(), include_derived=True).modules


# --- toy --------------------------------------------------------------------------------------------------


def toy_activations(model, x):
    """The inputs of each of the toy's modules, computed without hooks."""
    blocks = model.seq_blocks
    h0 = x.reshape(x.shape[0], -1)
    h1 = F.linear(h0, blocks[0].weight, blocks[0].bias)
    h2 = torch.relu(h1)
    h3 = F.linear(h2, blocks[2].weight, blocks[2].bias)
    h4 = torch.relu(h3)
    return {f"seq_blocks.{i}": h for i, h in enumerate((h0, h1, h2, h3, h4))}


TOY_SPECS = [
    ("range_min_max", "all", False, {}),
    ("range_min_max", "none", True, {}),
    ("range_quantile", "all", False, {"quantile": 0.975}),
    ("range_quantile", (-1,), True, {"quantile": 0.5}),
    ("variance_precise", "none", False, {}),
    ("abs_mean", "all", False, {}),
    ("range_n_sigma", "all", True, {"num_sigma": 2.0}),
]


def test_toy_statistics_equal_numpy_on_activations_and_weights():
    torch.manual_seed(0)
    model = ToyNet()
    specs = [spec(n, d, a, **o) for n, d, a, o in TOY_SPECS]
    points = [point("type", "linear", t, *specs) for t in ("data_in_0", "weight", "bias")]
    points.append(point("type", "relu", "data_in_0", *specs))
    resolved = resolve_profile(points, model)
    xs = [torch.randn(32, 1, 2, 2) * 3 for _ in range(3)]
    with collect_stats(model, resolved, expected_batches=3) as collector:
        for x in xs:
            model(x)
    table = collector.table()
    assert no_hooks_left(model)

    with torch.no_grad():
        acts = [toy_activations(model, x) for x in xs]
    for path, ms in table.items():
        assert ms.node == path.replace(".", "_")
        assert ms.op == ("linear" if int(path[-1]) % 2 == 0 else "relu")
        x32 = torch.cat([a[path] for a in acts]).numpy()
        assert ms.shapes["data_in_0"] == x32.shape[1:]
        for s, (name, dims, abs_, options) in zip(specs, TOY_SPECS):
            check(name, ms.values["data_in_0"][s], reference(name, x32, dims, True, abs_, **options), x32)
            if ms.op == "linear":
                for pname in ("weight", "bias"):
                    p32 = getattr(model.get_submodule(path), pname).detach().numpy()
                    assert ms.shapes[pname] == p32.shape
                    want = reference(name, p32, dims, False, abs_, **options)
                    check(name, ms.values[pname][s], want, p32)


# --- a model FX cannot trace: Conv2d, nesting, two inputs, a Python `if` on a tensor value --------------


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:  # data-dependent control flow
            return self.act(y)
        return self.act(-y)


class Add(nn.Module):
    def forward(self, a, b):
        return a + b


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Block(3, 4)
        self.inner = nn.Sequential(Block(4, 4))
        self.add = Add()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    def forward(self, x):
        f = self.inner(self.stem(x))
        return self.head(self.add(f, x.mean(1, keepdim=True)))


def net_tensors(net, x):
    """What each hooked tensor is, computed by hand (no hooks, no module calls)."""
    out = {}

    def block(prefix, b, h):
        y = F.conv2d(h, b.conv.weight, b.conv.bias, padding=1)
        branch = bool(y.mean() > 0)
        r_in = y if branch else -y
        out[f"{prefix}.conv"] = {"data_in_0": h}
        out[f"{prefix}.act"] = {"data_in_0": r_in, "data_out_0": torch.relu(r_in)}
        return torch.relu(r_in), branch

    f, b1 = block("stem", net.stem, x)
    f, b2 = block("inner.0", net.inner[0], f)
    side = x.mean(1, keepdim=True)
    out["add"] = {"data_in_0": f, "data_in_1": side, "data_out_0": f + side}
    out["head.0"] = {"data_in_0": f + side}
    out["head.1"] = {"data_in_0": (f + side).flatten(1)}
    return out, (b1, b2)


NET_POINTS = [
    point("type", "conv2d", "data_in_0", spec("range_min_max", (2, 3)), spec("range_quantile", quantile=0.9)),
    point("type", "conv2d", "weight", spec("abs_mean", (1, 2, 3), abs=True), spec("range_min_max", (0,))),
    point("type", "conv2d", "bias", spec("variance_precise", "none"), spec("range_quantile", quantile=0.5)),
    point("type", "relu", "data_in_0", spec("range_quantile", "none", quantile=0.975)),
    point("type", "relu", "data_out_0", spec("range_min_max"), spec("abs_mean", (-1, -2))),
    point("name", "add", "data_in_1", spec("range_min_max"), spec("variance_precise", (1,))),
    point("name", "add", "data_in_0", spec("abs_mean", (1,))),
    point("glob", "head.*", "data_in_0", spec("variance_online", "none"), spec("range_n_sigma", "all")),
    point("type", "linear", "weight", spec("range_min_max", (1,))),
]


def test_net_statistics_equal_numpy_with_control_flow_and_nesting():
    torch.manual_seed(1)
    net = Net()
    resolved = resolve_profile(NET_POINTS, net)
    assert list(resolved.modules) == [
        "stem.conv",
        "inner.0.conv",
        "stem.act",
        "inner.0.act",
        "add",
        "head.0",
        "head.1",
    ]
    assert resolved.unmatched == ()
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(8, 3, 6, 6, generator=gen) + shift for shift in (2.0, -2.0, 0.5, -0.5)]
    with collect_stats(net, resolved) as collector:
        for x in xs:
            net(x)
    table = collector.table()
    assert no_hooks_left(net)

    with torch.no_grad():
        computed = [net_tensors(net, x) for x in xs]
    branches = {b for _, bs in computed for b in bs}
    assert branches == {True, False}  # both sides of the `if` ran

    assert table["stem.conv"].shapes == {"data_in_0": (3, 6, 6), "weight": (4, 3, 3, 3), "bias": (4,)}
    assert np.shape(table["stem.conv"].values["data_in_0"][spec("range_min_max", (2, 3))]["min"]) == (3, 1, 1)
    per_out = table["stem.conv"].values["weight"][spec("abs_mean", (1, 2, 3), abs=True)]
    assert np.shape(per_out["abs_mean"]) == (4, 1, 1, 1)
    for path, ms in table.items():
        module = net.get_submodule(path)
        for tensor, results in ms.values.items():
            if tensor in ("weight", "bias"):
                x32, batched = getattr(module, tensor).detach().numpy(), False
            else:
                x32, batched = torch.cat([c[path][tensor] for c, _ in computed]).numpy(), True
            for s, got in results.items():
                options = dict(s.options)
                check(s.name, got, reference(s.name, x32, s.dims, batched, s.abs, **options), x32)
        assert ms.op == type(module).__name__.lower()


# --- hooks' life cycle, notes ------------------------------------------------------------------------------


def test_hooks_are_removed_when_the_block_raises_and_grad_is_off_inside():
    model = ToyNet()
    resolved = resolve_profile([point("type", "linear", "data_in_0", spec("range_min_max"))], model)
    with pytest.raises(RuntimeError), collect_stats(model, resolved):
        assert not torch.is_grad_enabled()
        assert not no_hooks_left(model)
        model(torch.randn(4, 1, 3, 3))  # wrong input size
    assert no_hooks_left(model) and torch.is_grad_enabled()


def test_parameters_are_read_once_whatever_the_number_of_batches():
    model = ToyNet()
    resolved = resolve_profile([point("type", "linear", "weight", spec("range_min_max"))], model)
    with collect_stats(model, resolved) as collector:
        for _ in range(3):
            model(torch.randn(4, 1, 2, 2))
    assert collector.table()["seq_blocks.0"].values["weight"][spec("range_min_max")]["count"] == 400


class UsesWeightFunctionally(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)  # self.proj is never called


def test_a_module_never_called_gets_a_note_not_numbers():
    model = UsesWeightFunctionally()
    points = [point("type", "linear", t, spec("range_min_max"), line=9) for t in ("data_in_0", "weight")]
    with collect_stats(model, resolve_profile(points, model)) as collector:
        model(torch.randn(2, 4))
    ms = collector.table()["proj"]
    assert list(ms.values) == ["weight"]
    assert any("data_in_0" in n and "never called" in n and "rules.tq:9:1" in n for n in ms.notes)


def test_nonfinite_values_are_reported_with_the_tensor_in_the_module_notes():
    model = ToyNet()
    s = spec("range_min_max")
    x = torch.randn(8, 1, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    x[3, 0, 1, 1] = float("inf")
    with collect_stats(model, resolve_profile([point("name", "seq_blocks.0", "data_in_0", s)], model)) as c:
        model(x)
    ms = c.table()["seq_blocks.0"]
    assert ms.notes == ("data_in_0: 2 NaN/Inf values left out",)
    result = ms.values["data_in_0"][s]
    assert result["nonfinite"] == 2 and result["count"] == 8 * 4 - 2
    finite = x.numpy()[np.isfinite(x.numpy())]
    assert result["max"] == float(finite.max())


def test_thresholds_feed_threshold_abs_mean_through_collect():
    model = ToyNet()
    s = spec("threshold_abs_mean")
    resolved = ResolvedPoints.from_mapping({"seq_blocks.1": {"data_in_0": (s,)}})
    x = torch.randn(64, 1, 2, 2)
    with collect_stats(model, resolved, thresholds={("seq_blocks.1", "data_in_0"): torch.tensor(0.3)}) as c:
        model(x)
    with torch.no_grad():
        a = toy_activations(model, x)["seq_blocks.1"].abs().double().numpy()
    sel = a > np.float32(0.3)
    got = c.table()["seq_blocks.1"].values["data_in_0"][s]
    assert got["count"] == int(sel.sum())
    np.testing.assert_allclose(got["abs_mean"], a[sel].mean(), rtol=1e-6)


def test_shape_change_error_names_module_and_tensor():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    resolved = resolve_profile([point("type", "relu", "data_in_0", spec("abs_mean", "none"))], model)
    with pytest.raises(UserError, match=r"^1 data_in_0: abs_mean\(dims=none"), collect_stats(model, resolved):
        model(torch.randn(2, 3))
        model(torch.randn(2, 5))
    assert no_hooks_left(model)
