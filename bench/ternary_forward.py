"""Ternary model forward (cached ternary weights, eval mode) / float forward, on the same batches.

The float model is converted with `runtime.convert.convert_` and `ModuleQuant` / `TensorQuant` configs:
every Linear's weight ternary (Δ = 0.7·mean|W|, α derived from W, cached by the weight's parametrization), activations in
float; and for toy also the built-in recipe's kind of config, activations ternary too (Δ = 0.1, α = 1),
which quantises every Linear input on the fly. Float and ternary models run interleaved in this process.
Target: <= 1.1 x float with cached ternary weights.

    .venv/bin/python bench/ternary_forward.py [--quick]
"""

from __future__ import annotations

import copy
import sys

import torch
from timing import paired, standalone, table, verdict
from torch import nn
from workloads import build

from ternqc.runtime.quantize.convert import convert_
from ternqc.runtime.quantize.quantizers import ModuleQuant, TensorQuant

TARGET = 1.1


def configs(model: nn.Module, activations: bool) -> dict[str, ModuleQuant]:
    out = {}
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        delta = 0.7 * float(m.weight.detach().abs().mean())
        tensors = {"weight": TensorQuant(True, delta=delta, scaling=True)}
        if activations:
            tensors["data_in"] = TensorQuant(True, delta=0.1, scaling=True, alpha=1.0)
        out[path] = ModuleQuant("linear", path.replace(".", "_"), tensors)
    return out


def forward(model, batches) -> None:
    with torch.no_grad():
        for x, _ in batches:
            model(x)


def measure(name: str, activations: bool, batches: int, reps: int):
    built = build(name, batches)
    ternary = convert_(copy.deepcopy(built.model), configs(built.model, activations)).eval()
    return paired(lambda: forward(built.model, built.batches), lambda: forward(ternary, built.batches), reps)


def run(quick: bool = False) -> str:
    reps = 3 if quick else 9
    cases = [
        ("mlp", False, 16, "4 x Linear(1024), 16 x 256: ternary weights", TARGET),
        ("toy", False, 64, "toy, 64 x 128: ternary weights", TARGET),
        ("toy", True, 64, "toy, 64 x 128: ternary weights and activations", None),
    ]
    rows = []
    for name, activations, batches, label, target in cases:
        r = measure(name, activations, batches, reps)
        rows.append(
            [
                label,
                f"{r.base_median * 1e3:.1f}",
                f"{r.variant_median * 1e3:.1f}",
                f"{r.ratio:.2f}",
                r.spread(),
                target or "-",
                verdict(r.ratio, target) if target else "(for reference)",
            ]
        )
    notes = [
        "ratio = median over repetitions of ternary/float forward time on the same batches, same process",
        "activations: q(x) = α·T(x) computed on the fly each call (4 elementwise ops per Linear input)",
    ]
    header = ["model", "float ms", "ternary ms", "ratio", "spread", "target", ""]
    return table("Ternary forward / float forward", header, rows, notes)


def main(argv=None) -> int:
    return standalone(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
