"""`make bench`: every benchmark of ternqc, one table each, measured in this run on this machine.

Tables: calibration / plain forward (toy, MLP, transformer); apply of ternary_full.tq / calibration and
the fixed cost of a calibration; ternqc vs a model of MASE's pass; quantile methods (exact buffers, sketch,
numpy, torch); ternary forward / float forward; `ternqc compile` wall time; calibration of the MLP in 1 vs 2
processes; peak memory with N vs 4N batches; the integer engine and the packed export (speed against fp32
and quantize_dynamic, size against the float state_dict); accuracy of the shipped recipes on digits and
toy-tiny, post-training and fine-tuned. Each states its target and PASS/MISS with the margin. About
5 minutes on a 2-core machine; `--quick` runs fewer repetitions and smaller cases (about 2 minutes).
Timings on a shared machine vary by 30-100% from run to run: ratios are medians of interleaved runs.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import accuracy
import apply_cost
import calibration
import compile_time
import engine
import mase_compare
import memory
import processes
import quantile_methods
import ternary_forward
import torch
from timing import table, verdict

COMPILE_TARGET_S = 0.4


def compile_table(quick: bool) -> str:
    runs = 5 if quick else 10
    command = compile_time.command_times(runs)
    first, warm = compile_time.in_process_times(runs * 10)
    median = statistics.median(command)
    rows = [
        ["ternqc compile configs/toy_ternary.tq (fresh interpreter)", f"{median * 1e3:.0f}",
         f"{min(command) * 1e3:.0f}-{max(command) * 1e3:.0f}", f"{COMPILE_TARGET_S * 1e3:.0f}",
         verdict(median, COMPILE_TARGET_S)],
        ["compile_source, first call in a process (imports + grammar)", f"{first * 1e3:.0f}", "-", "-", ""],
        ["compile_source, parser built", f"{statistics.median(warm) * 1e3:.1f}",
         f"{min(warm) * 1e3:.1f}-{max(warm) * 1e3:.1f}", "-", ""],
    ]
    notes = [f"medians over {runs} command runs and {len(warm)} in-process compiles"]
    return table("ternqc compile wall time", ["what", "median ms", "range ms", "target ms", ""], rows, notes)


SECTIONS = {
    "calibration": calibration.run,
    "apply": apply_cost.run,
    "mase": mase_compare.run,
    "quantiles": quantile_methods.run,
    "ternary": ternary_forward.run,
    "compile": compile_table,
    "processes": processes.run,
    "memory": memory.run,
    "engine": engine.run,
    "accuracy": accuracy.run,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller cases")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these tables")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    machine = platform.processor() or platform.machine()
    versions = f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}"
    title = f"ternqc benchmarks{' (quick)' if args.quick else ''}"
    print(f"{title}: {machine}, {os.cpu_count()} cores, {versions}\n", flush=True)
    for name in args.only or SECTIONS:
        section = time.perf_counter()
        print(SECTIONS[name](args.quick), flush=True)
        print(f"  ({time.perf_counter() - section:.0f} s)\n", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
