"""Quantile methods side by side: exact buffers, the sketch, numpy.quantile and torch.quantile.

The same stream of batches (64 x [256, 1024] float32 = 2^24 values, a ReLU-like half of exact zeros and a
drifting scale, the MLP's case) goes through each method; reported: time per batch (feeding, plus the
final answer spread over the batches), peak memory the method allocates (numpy/torch memory measured by
`tracemalloc` for numpy; sizes for torch), and the rank error of the 0.01 and 0.99 quantiles against the
sorted values (0 when the answer lies between the two values the exact quantile interpolates). Targets: exact
methods have rank error 0; the sketch <= 1e-4 within its budget.

    .venv/bin/python bench/quantile_methods.py [--quick]
"""

from __future__ import annotations

import sys
import time
import tracemalloc

import numpy as np
import torch
from timing import standalone, table, verdict

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate import buffers
from ternqc.runtime.calibrate.stats.states import QuantileBudget, make_state

QS = (0.01, 0.99)  # one range_quantile(quantile=0.99) gives both: min and max


def stream(batches: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.relu(torch.randn(256, 1024, generator=g) * (1 + i / batches)) for i in range(batches)]


def rank_error(sorted_values: np.ndarray, value: float, q: float) -> float:
    """How far (as a fraction of n) `value` is from the values at the two ranks around q·(n-1), between
    which the exact quantile interpolates (0 when it lies between them)."""
    n = len(sorted_values)
    target = q * (n - 1)
    lo, hi = sorted_values[int(np.floor(target))], sorted_values[int(np.ceil(target))]
    if lo <= value <= hi:
        return 0.0
    if value < lo:
        return (np.floor(target) - (np.searchsorted(sorted_values, value, "right") - 1)) / n
    return (np.searchsorted(sorted_values, value, "left") - np.ceil(target)) / n


def ours(xs, budget_bytes):
    """ternqc's range_quantile states (one per q; min is the 1-q quantile, max the q quantile)."""
    budget = QuantileBudget(budget_bytes)
    state = make_state(StatSpec("range_quantile", options=(("quantile", QS[1]),)), quantile_budget=budget,
                       size_hint=len(xs))
    start = time.perf_counter()
    for x in xs:
        state.update(x)
    fed = time.perf_counter()
    result = state.result()
    done = time.perf_counter()
    return [result["min"], result["max"]], fed - start, done - fed, budget.peak, "exact" not in result


def numpy_quantile(xs):
    start = time.perf_counter()
    everything = np.concatenate([x.numpy().reshape(-1) for x in xs])
    fed = time.perf_counter()
    answers = [float(np.quantile(everything, q)) for q in QS]
    return answers, fed - start, time.perf_counter() - fed, None, True


def torch_quantile(xs):
    start = time.perf_counter()
    everything = torch.cat([x.reshape(-1) for x in xs])
    fed = time.perf_counter()
    try:
        answers = [float(torch.quantile(everything, q)) for q in QS]
    except RuntimeError as exc:
        return None, fed - start, time.perf_counter() - fed, everything.numel() * 4, str(exc).split(".")[0]
    return answers, fed - start, time.perf_counter() - fed, everything.numel() * 4 * 2, True


def measure(name, fn, xs, srt):
    buffers.clear_pool()  # fresh buffers: the memory is counted
    tracemalloc.start()
    answers, feed, final, held, exact = fn(xs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = max(peak, held or 0)
    per_batch = (feed + final) / len(xs) * 1e3
    if answers is None:
        return [name, f"{per_batch:.2f}", "-", "-", "-", f"{exact}"]
    errors = [rank_error(srt, a, q) for a, q in zip(answers, QS)]
    return [name, f"{per_batch:.2f}", f"{final * 1e3:.0f}", f"{peak / 2**20:.0f}",
            " / ".join(f"{e:.1e}" for e in errors), "exact" if exact is True else "sketch"]


def run(quick: bool = False) -> str:
    batches = 16 if quick else 64
    xs = stream(batches)
    srt = np.sort(torch.cat([x.reshape(-1) for x in xs]).numpy())
    n = srt.size
    rows = [
        measure("exact buffers (default 256 MiB budget)", lambda v: ours(v, 256 * 2**20), xs, srt),
        measure("sketch (budget 4 MiB)", lambda v: ours(v, 4 * 2**20), xs, srt),
        measure("numpy.quantile on the concatenation", numpy_quantile, xs, srt),
        measure("torch.quantile on the concatenation", torch_quantile, xs, srt),
    ]
    sketch_errors = [float(e) for e in rows[1][4].split(" / ")]
    notes = [
        f"{batches} batches of [256, 1024] ({n:,} values, {n * 4 / 2**20:.0f} MiB, half of them 0); "
        "quantiles 0.01 and 0.99 (ternqc: one range_quantile(quantile=0.99), its min and max)",
        "ms/batch: feeding plus the final answer spread over the batches; final ms: the answer alone",
        "peak MiB: memory the method allocates (tracemalloc for numpy, tensor sizes for torch)",
        f"sketch rank error target <= 1e-4: {verdict(max(sketch_errors), 1e-4)}",
    ]
    header = ["method", "ms/batch", "final ms", "peak MiB", "rank error q0.01 / q0.99", "kind"]
    return table("Quantile methods", header, rows, notes)


def main(argv=None) -> int:
    return standalone(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
