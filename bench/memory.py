"""Peak memory of calibrating the MLP on N and on 4N batches (each in a fresh process).

A child process builds the MLP, runs one forward (so torch's own memory is in place), records its resident
memory, calibrates on batches made on demand (`LazyBatches`: the data is not held, only what calibration
keeps counts), and reports its peak resident memory (`ru_maxrss`) and the quantile memory the budget
accounted. Acceptance: 4 x more batches raise peak memory by less than 10% (the quantile memory stays
within its budget: exact values while they fit, then a sketch).

    .venv/bin/python bench/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from timing import table, verdict

HERE = Path(__file__).resolve().parent


def child(batches: int, budget_mib: float) -> None:
    import torch
    from workloads import build

    from ternqc.runtime.calibrate import calibrate
    from ternqc.runtime.stats import QuantileBudget

    built = build("mlp", batches, lazy=True)
    with torch.no_grad():
        built.model(built.batches[0][0])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    budget = QuantileBudget(int(budget_mib * 2**20))
    table_ = calibrate(built.model, built.batches, built.resolved, quantile_budget=budget, progress=False)
    exact = all(r.get("exact", True) for ms in table_.values() for v in ms.values.values() for r in v.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before": before * 1024, "peak": peak * 1024, "quantile": budget.peak, "exact": exact}))


def measure(batches: int, budget_mib: float) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "memory.py"), "--child", str(batches), str(budget_mib)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> str:
    n = 16 if quick else 64
    rows, verdicts = [], []
    for budget in (256.0, 16.0):
        small, large = measure(n, budget), measure(4 * n, budget)
        growth = (large["peak"] - small["peak"]) / small["peak"]
        verdicts.append(verdict(growth, 0.10))
        for count, m in ((n, small), (4 * n, large)):
            rows.append(
                [
                    f"{count} batches, budget {budget:g} MiB",
                    f"{m['before'] / 2**20:.0f}",
                    f"{m['peak'] / 2**20:.0f}",
                    f"{(m['peak'] - m['before']) / 2**20:.0f}",
                    f"{m['quantile'] / 2**20:.1f}",
                    "exact" if m["exact"] else "sketch",
                    "" if count == n else f"{growth:+.1%}  {verdicts[-1]}",
                ]
            )
    notes = [
        "4 x Linear(1024) + ReLU, batches of 256 made on demand; RSS = resident memory of the child process",
        "target: peak RSS with 4N batches at most 10% above the peak with N batches",
    ]
    header = ["MLP calibration", "RSS before MiB", "peak RSS MiB", "calibration MiB", "quantile MiB", "quantiles",
              "4N vs N"]
    return table("Peak memory: N vs 4N batches", header, rows, notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("BATCHES", "BUDGET_MIB"))
    args = parser.parse_args(argv)
    if args.child:
        child(int(args.child[0]), float(args.child[1]))
        return 0
    print(run(args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
