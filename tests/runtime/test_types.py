"""Module types by isinstance (`runtime/quantize/types.py`), never by class name."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from ternqc.runtime.calibrate.points import module_type
from ternqc.runtime.quantize.types import is_transposed, param_view


class MyLinear(nn.Linear):
    pass


class Linear(nn.Module):  # shares nn.Linear's name, is no nn.Linear
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_subclasses_and_parametrized_modules_are_their_base_type():
    mha = nn.MultiheadAttention(8, 2)
    assert module_type(mha.out_proj) == "linear"  # NonDynamicallyQuantizableLinear
    assert module_type(MyLinear(2, 2)) == "linear"
    lin = nn.Linear(2, 2)
    parametrize.register_parametrization(lin, "weight", Double())
    assert type(lin).__name__ == "ParametrizedLinear" and module_type(lin) == "linear"
    norm = nn.LayerNorm(4)
    parametrize.register_parametrization(norm, "weight", Double())
    assert module_type(norm) == "layernorm" and module_type(mha) == "multiheadattention"
    assert module_type(nn.Embedding(3, 2)) == "embedding"


def test_a_class_that_only_shares_a_name_is_not_that_type():
    assert module_type(Linear()) == f"{__name__}.linear".lower()


def test_transformers_conv1d_is_linear_seen_transposed_and_never_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight [4, 6]
    assert module_type(conv) == "linear" and is_transposed(conv)
    assert param_view(conv, "weight").shape == (6, 4)  # [out, in], as nn.Linear's
    assert torch.equal(param_view(conv, "weight"), conv.weight.t())
    assert module_type(nn.Conv1d(4, 6, 1)) == "conv1d" and not is_transposed(nn.Conv1d(4, 6, 1))


def test_the_runtime_never_imports_transformers():
    code = ("import sys; import ternqc.runtime.run.pipeline, ternqc.runtime.quantize.types; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
