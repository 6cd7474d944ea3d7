"""ternqc's calibration against a model of MASE's `profile_statistics` pass, per batch, as batches grow.

MASE cannot be a dependency, so its cost model is reimplemented here from how its statistics work (see
/work/shared/MASE.md): each activation is fed one *sample* at a time (a Python loop over the batch), every
statistic updated per sample; `range_min_max` keeps a running min and max, `abs_mean` a running sum and count,
and `range_quantile` *stores every value by concatenating each sample to what it holds*
(`values = torch.cat([values, sample.flatten()])`, so the copying grows quadratically with the data) and calls
`torch.quantile` at the end (which refuses more than 2^24 values). Parameters are fed once, whole. MASE's FX
interpreter walk is left out, which favours MASE.

Both profile range_min_max, range_quantile(0.5) and abs_mean on every Linear's input and weight of `toy`, on
the same N batches of 128; their values are compared (min/max/median identical, abs_mean within 1e-6).
Reported: ms per batch for each and their ratio, for growing N. The relation that matters: ternqc's cost per
batch falls with more batches (its fixed cost spreads), the per-sample concatenation's grows.

    .venv/bin/python bench/mase_compare.py [--quick]
"""

from __future__ import annotations

import math
import statistics
import sys

import torch
from timing import paired, standalone, table
from workloads import build

from ternqc.runtime.calibrate.loop import calibrate
from ternqc.runtime.calibrate.stats.states import QuantileBudget


class MaseLikeStats:
    """One tensor's statistics the way MASE's pass keeps them (one sample at a time, values concatenated)."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.abs_sum = 0.0
        self.count = 0
        self.values = torch.empty(0)

    def update_a_sample(self, sample: torch.Tensor) -> None:
        sample = sample.detach()
        self.min = min(self.min, float(sample.min()))
        self.max = max(self.max, float(sample.max()))
        self.abs_sum += float(sample.abs().sum())
        self.count += sample.numel()
        self.values = torch.cat([self.values, sample.flatten()])

    def finalize(self) -> dict[str, float]:
        median = float(torch.quantile(self.values, 0.5))
        return {"min": self.min, "max": self.max, "median": median, "abs_mean": self.abs_sum / self.count}


def mase_like(model, batches, paths) -> dict:
    """The modelled pass: per-sample updates of every profiled input, whole weights once."""
    stats = {p: {"data_in_0": MaseLikeStats(), "weight": MaseLikeStats()} for p in paths}
    handles = []
    for p in paths:
        module = model.get_submodule(p)
        stats[p]["weight"].update_a_sample(module.weight)

        def hook(_m, args, p=p):
            for sample in args[0]:  # one sample at a time, as MASE's observers
                stats[p]["data_in_0"].update_a_sample(sample)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {(p, t): s.finalize() for p, ts in stats.items() for t, s in ts.items()}


def compare(ours, theirs) -> bool:
    for (path, tensor), want in theirs.items():
        got = {s.name + str(dict(s.options)): r for s, r in ours[path].values[tensor].items()}
        mm, q, am = got["range_min_max{}"], got["range_quantile{'quantile': 0.5}"], got["abs_mean{}"]
        if (mm["min"], mm["max"], q["max"]) != (want["min"], want["max"], want["median"]):
            return False
        if not math.isclose(am["abs_mean"], want["abs_mean"], rel_tol=1e-6):
            return False
    return True


def run(quick: bool = False) -> str:
    rows = []
    for n in (1, 8) if quick else (1, 8, 32):
        built = build("toy", batches=n)
        paths = list(built.resolved.modules)
        ours = calibrate(built.model, built.batches, built.resolved, quantile_budget=QuantileBudget(), progress=False)
        same = compare(ours, mase_like(built.model, built.batches, paths))
        got = paired(
            lambda built=built: calibrate(built.model, built.batches, built.resolved, progress=False),
            lambda built=built, paths=paths: mase_like(built.model, built.batches, paths),
            reps=max(3, 21 // n),
        )
        ternqc_ms = statistics.median(got.base) * 1e3 / n
        mase_ms = statistics.median(got.variant) * 1e3 / n
        rows.append([f"toy, {n} x 128", f"{ternqc_ms:.2f}", f"{mase_ms:.2f}", f"{got.ratio:.1f}",
                     "identical" if same else "DIFFER"])
    notes = [
        "MASE-like: per-sample updates and per-sample torch.cat of every value (a model of MASE's pass, "
        "without its FX interpreter)",
        "ratio = median over interleaved repetitions of MASE-like time / ternqc time",
    ]
    header = ["batches", "ternqc ms/batch", "MASE-like ms/batch", "ratio", "values"]
    return table("ternqc vs a model of MASE's profile_statistics", header, rows, notes)


def main(argv=None) -> int:
    return standalone(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
