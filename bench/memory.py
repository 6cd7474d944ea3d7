"""Peak memory of calibrating the MLP on N and on 4N batches (each in a fresh process).

A child process builds the MLP, runs one forward (so torch's own memory is in place), records its peak
resident memory so far, calibrates on batches made on demand (`LazyBatches`: the data is not held, only what
calibration keeps counts), and reports its peak resident memory (VmHWM) and the quantile memory the budget
accounted (Linux: /proc); each figure is the median of three such processes (one alone moves by ~20 MiB).
Acceptance: 4 x more batches raise the peak by less than 10% beyond the quantile memory, which stays within
its budget (exact values while they fit, then a sketch).

    .venv/bin/python bench/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from timing import table, verdict

HERE = Path(__file__).resolve().parent


def status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmRSS: now; VmHWM: the peak of
    this program, unlike getrusage's ru_maxrss, which keeps the parent's peak across exec)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(batches: int, budget_mib: float) -> None:
    import torch
    from workloads import build

    from ternqc.runtime.calibrate.loop import calibrate
    from ternqc.runtime.calibrate.stats.states import QuantileBudget

    built = build("mlp", batches, lazy=True)
    with torch.no_grad():
        built.model(built.batches[0][0])
    before = status("VmHWM")
    budget = QuantileBudget(int(budget_mib * 2**20))
    table_ = calibrate(built.model, built.batches, built.resolved, quantile_budget=budget, progress=False)
    results = [r for ms in table_.values() for v in ms.values.values() for r in v.values()]
    exact = all(r.get("exact", True) for r in results)
    print(json.dumps({"before": before, "peak": status("VmHWM"), "quantile": budget.peak, "exact": exact}))


def measure(batches: int, budget_mib: float, runs: int = 3) -> dict:
    """The child's report of the run with the median peak beyond the quantile memory, of `runs` fresh processes
    (one process's peak moves by ~20 MiB from run to run: glibc's and torch's own memory)."""
    reports = [measure_once(batches, budget_mib) for _ in range(runs)]
    reports.sort(key=lambda m: m["peak"] - m["quantile"])
    return reports[len(reports) // 2]


def measure_once(batches: int, budget_mib: float) -> dict:
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
        runs = 1 if quick else 3
        small, large = measure(n, budget, runs), measure(4 * n, budget, runs)
        other = [(m["peak"] - m["quantile"]) for m in (small, large)]
        growth = (other[1] - other[0]) / other[0]
        within = all(m["quantile"] <= budget * 2**20 for m in (small, large))
        verdicts.append(verdict(growth, 0.10) if within else "MISS (quantiles over budget)")
        for count, m in ((n, small), (4 * n, large)):
            rows.append(
                [
                    f"{count} batches, budget {budget:g} MiB",
                    f"{m['before'] / 2**20:.0f}",
                    f"{m['peak'] / 2**20:.0f}",
                    f"{m['quantile'] / 2**20:.1f}",
                    "exact" if m["exact"] else "sketch",
                    f"{(m['peak'] - m['quantile']) / 2**20:.0f}",
                    "" if count == n else f"{growth:+.1%}  {verdicts[-1]}",
                ]
            )
    notes = [
        "4 x Linear(1024) + ReLU, batches of 256 made on demand; RSS = resident memory of the child process",
        "quantile MiB: what the quantile budget accounted (exact values while they fit, else sketches)",
        "target: 4N batches raise the peak beyond the quantile memory (peak - quantile) by less than 10%, "
        "and the quantile memory stays within its budget",
    ]
    header = ["MLP calibration", "peak RSS before MiB", "peak RSS MiB", "quantile MiB", "quantiles",
              "peak - quantile MiB", "4N vs N"]
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
