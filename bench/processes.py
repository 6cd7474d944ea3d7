"""Calibration of the MLP in 1 process and in 2 processes (torch.distributed, gloo on 127.0.0.1).

One process: `calibrate()` here (all threads). Two processes: `run_workers(2, ...)`, each worker with half
the threads, calibrating half of the batches; the statistics are merged and must equal the single
process's bit for bit. Reported: the calibration time (inside the workers, after start-up; median over
repetitions, the workers kept between them), the start-up, and whether the tables are identical.

    .venv/bin/python bench/processes.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time

from timing import standalone, table
from workloads import build

from ternqc.runtime.calibrate.loop import calibrate
from ternqc.runtime.run import workers


def calibrate_mlp(reps: int) -> tuple[list[float], object]:
    """In every process: build the MLP workload, calibrate `reps` times; returns the times and the table."""
    built = build("mlp")
    times, table_ = [], None
    for _ in range(reps):
        start = time.perf_counter()
        table_ = calibrate(built.model, built.batches, built.resolved, progress=False)
        times.append(time.perf_counter() - start)
    return times, table_


def run(quick: bool = False) -> str:
    reps = 2 if quick else 4
    one_times, one_table = calibrate_mlp(reps + 1)
    one_times = one_times[1:]  # the first calibration in a process pays for fresh memory
    start = time.perf_counter()
    two_times, two_table = workers.run_workers(2, calibrate_mlp, reps + 1)
    wall = time.perf_counter() - start
    startup = wall - sum(two_times)
    two_times = two_times[1:]
    one, two = statistics.median(one_times), statistics.median(two_times)
    rows = [
        ["1 process", f"{one:.2f}", "-", "1.00", "-"],
        ["2 processes (gloo, 127.0.0.1)", f"{two:.2f}", f"{startup:.1f}", f"{one / two:.2f}",
         one_table == two_table],
    ]
    notes = [
        "4 x Linear(1024) + ReLU, 64 batches of 256, the calibration statistics; times: median of "
        f"{reps} calibrations after a first one",
        "speed-up = 1-process time / 2-process time; this machine has 2 cores, so the 2 processes get one "
        "thread each where the single process has two: expect no speed-up here, only on more cores/machines",
    ]
    header = ["run", "calibrate s", "start-up s", "speed-up", "identical statistics"]
    return table("Calibration of the MLP: 1 vs 2 processes", header, rows, notes)


def main(argv=None) -> int:
    return standalone(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
