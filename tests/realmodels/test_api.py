"""`ternqc.quantize_` / `compile_rules` as a user calls them: rules as a path, a recipe name, text or a Plan;
wrong argument types and values fail at once with TypeError / ValueError; `RunSettings` refuses a DataLoader
and has no silent default dataset; importing ternqc stays light; shipped recipes run on ordinary models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ternqc
from ternqc.compiler import builtin_recipe
from ternqc.plan import Plan
from ternqc.runtime.errors import UserError
from ternqc.runtime.quantize.modules import is_converted
from ternqc.runtime.run import pipeline


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=8)


def test_importing_ternqc_imports_neither_torch_nor_lark():
    code = "import sys, ternqc; ternqc.quantize_; ternqc.compile_rules; ternqc.Report; " \
           "assert 'torch' not in sys.modules and 'lark' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("form", ["path", "name", "name.tq", "text", "plan"])
def test_rules_as_path_recipe_name_text_or_plan(form):
    path = builtin_recipe("weights_only.tq")
    rules = {"path": str(path), "name": "weights_only", "name.tq": "weights_only.tq", "text": path.read_text(),
             "plan": ternqc.compile_rules(path)}[form]
    plan = ternqc.compile_rules(rules)
    def what(p: Plan) -> list:
        return [(b.selector, b.param, b.value) for b in p.bindings]

    assert isinstance(plan, Plan) and what(plan) == what(ternqc.compile_rules(str(path)))
    model = _mlp()
    report = ternqc.quantize_(model, rules, _loader(), eval_data=_loader())
    assert is_converted(model[0]) and is_converted(model[2])
    assert 0 <= report.ternary_accuracy <= 1 and report.to_dict()["nodes"] == report.nodes


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: ternqc.quantize_("model", "weights_only", _loader()), TypeError, "nn.Module"),
        (lambda: ternqc.quantize_(_mlp(), 3, _loader()), TypeError, "rules"),
        (lambda: ternqc.quantize_(_mlp(), "no_such_recipe", _loader()), ValueError, "shipped recipes"),
        (lambda: ternqc.quantize_(_mlp(), "weights_only", _loader().dataset), TypeError, "DataLoader"),
        (lambda: ternqc.quantize_(_mlp(), "weights_only", torch.zeros(3, 4)), TypeError, "DataLoader"),
        (lambda: ternqc.quantize_(_mlp(), "weights_only", None), TypeError, "calibration_data"),
        (lambda: ternqc.quantize_(_mlp(), "weights_only", _loader(), eval_data="val"), TypeError, "eval_data"),
        (lambda: ternqc.quantize_(_mlp(), "weights_only", _loader(), batch_size=4), ValueError, "DataLoader"),
        (lambda: ternqc.quantize_(_mlp(), "weights_only", _loader(), sample=4), TypeError, "unknown setting"),
        (lambda: ternqc.quantize_(_mlp(), "weights_only", _loader(), samples="4"), TypeError, "samples"),
        (lambda: ternqc.quantize_(_mlp(), "weights_only", _loader(), samples=0), ValueError, "samples"),
        (lambda: pipeline.RunSettings(dataset=_loader()), TypeError, "quantize_"),
        (lambda: pipeline.RunSettings(model=_mlp()), TypeError, "quantize_"),
    ],
    ids=["model", "rules_type", "rules_name", "dataset", "tensor", "none", "eval_str", "batch_size", "typo",
         "samples_type", "samples_zero", "settings_loader", "settings_model"],
)
def test_wrong_arguments_fail_at_once(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_run_settings_without_a_dataset_does_not_calibrate_on_toy_tiny():
    plan = ternqc.compile_rules("weights_only")
    with pytest.raises(UserError, match="no calibration data"):
        pipeline.apply(_mlp(), plan, pipeline.RunSettings(progress=False))


def test_fewer_samples_than_asked_for_is_said():
    report = ternqc.quantize_(_mlp(), "weights_only", _loader(32), samples=1000)
    assert any("asked for 1000 calibration samples" in n and "only 32" in n for n in report.notes)
    report = ternqc.quantize_(_mlp(), "weights_only", _loader(32), samples=16)
    assert not any("asked for" in n for n in report.notes)


def test_a_generator_of_batches_is_accepted_and_evaluation_reads_it_twice():
    batches = list(_loader())
    report = ternqc.quantize_(_mlp(), "weights_only", iter(batches), eval_data=(b for b in batches))
    assert report.float_accuracy is not None and report.ternary_accuracy is not None


class Ordinary(nn.Module):
    """Linear, Conv1d, Conv2d, ReLU and Embedding; zero-initialised biases and bias-free layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv1 = nn.Conv1d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 5 + 2 * 4 * 5, 3)
        for m in (self.conv1, self.fc):
            nn.init.zeros_(m.bias)

    def forward(self, tokens):
        e = self.emb(tokens)  # [B, 5, 4]
        a = self.relu(self.conv1(e.transpose(1, 2))).flatten(1)
        b = self.relu(self.conv2(e.unsqueeze(1))).flatten(1)
        return self.fc(torch.cat([a, b], dim=1))


@pytest.mark.parametrize("recipe", ["weights_only", "twn", "bitnet", "ternary_full", "toy_ternary"])
def test_every_shipped_recipe_runs_on_an_ordinary_model_with_zero_and_no_biases(recipe):
    torch.manual_seed(0)
    model = Ordinary().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 10, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    report = ternqc.quantize_(model, recipe, batches, eval_data=batches)
    for name in ("conv1", "conv2", "fc"):
        assert report.nodes[name]["tensors"]["weight"]["quantized"] is True, name
    if recipe == "toy_ternary":  # it quantises biases: the all-zero ones quantise to zeros
        assert report.nodes["fc"]["tensors"]["bias"]["quantized"] is True
        assert torch.count_nonzero(model.fc.bias) == 0
        assert report.nodes["fc"]["tensors"]["bias"]["zero_fraction"] == 1.0
