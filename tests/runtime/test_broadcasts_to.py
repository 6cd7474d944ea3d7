"""`quantizers.broadcasts_to`, the check that a per-channel Δ or α fits its tensor: the same answer as torch's
`broadcast_shapes(shape, target) == target`, and converting a model no longer imports sympy (torch's
`broadcast_shapes` did on its first call: half a second of every fresh `apply`)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import torch

from ternqc.runtime.quantize.quantizers import broadcasts_to


def torch_says(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == torch.Size(target)
    except RuntimeError:
        return False


def test_broadcasts_to_answers_as_torch_does():
    targets = [(), (5,), (4, 5), (3, 4, 5), (6, 1, 3, 3), (2, 1)]
    dims = [1, 2, 3, 4, 5, 6]
    cases = 0
    for target in targets:
        for rank in range(len(target) + 2):
            for shape in itertools.product(dims, repeat=rank):
                assert broadcasts_to(shape, target) == torch_says(shape, target), (shape, target)
                cases += 1
    assert cases > 1000
    assert broadcasts_to(torch.Size([4, 1]), torch.Size([4, 5])) and not broadcasts_to((1, 4, 1), (4, 5))


def test_quantize_does_not_import_sympy():
    code = (
        "import sys, torch, ternqc\n"
        "from torch import nn\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))\n"
        "ternqc.quantize_(model, 'ternary_full', [(torch.randn(64, 16), None) for _ in range(2)], samples=128)\n"
        "assert type(model[0]).__name__ != 'Linear', type(model[0])\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
