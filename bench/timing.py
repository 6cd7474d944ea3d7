"""Measuring on a noisy 2-core machine, and printing the results as tables.

In: callables to time. Out: `Paired` (per-repetition times of a baseline and a variant, run back to back
in alternating order in the same process) with median ratio and spread; `table(title, header, rows)` and
`verdict(value, target)` ("PASS by 12%" / "MISS by 0.35x") for the printed report.

Identical runs vary by 30-100% here (PITFALLS.md), so every comparison interleaves the variants, repeats,
and reports the median of the per-repetition ratios, not a ratio of single runs.

Every benchmark process runs as the `ternqc` command does: importing this module fixes glibc's allocator
thresholds (`ternqc.allocator.keep_freed_memory`), for the baseline and the variant alike.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

from attrs import frozen

from ternqc.allocator import keep_freed_memory

keep_freed_memory()  # as the `ternqc` command runs (its forwards reuse freed memory): baselines and variants alike


@frozen
class Paired:
    base: tuple[float, ...]  # seconds per repetition
    variant: tuple[float, ...]

    @property
    def ratios(self) -> list[float]:
        return [v / b for b, v in zip(self.base, self.variant)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def base_median(self) -> float:
        return statistics.median(self.base)

    @property
    def variant_median(self) -> float:
        return statistics.median(self.variant)

    def spread(self) -> str:
        r = self.ratios
        return f"{min(r):.2f}-{max(r):.2f}"


def timed(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(base: Callable[[], object], variant: Callable[[], object], reps: int, warmup: int = 1) -> Paired:
    """Time `base` and `variant` `reps` times each, back to back, alternating which goes first."""
    for _ in range(warmup):
        base()
        variant()
    b, v = [], []
    for i in range(reps):
        if i % 2:
            v.append(timed(variant))
            b.append(timed(base))
        else:
            b.append(timed(base))
            v.append(timed(variant))
    return Paired(tuple(b), tuple(v))


def interleaved(base: Callable[[], object], variants: dict[str, Callable[[], object]], reps: int,
                warmup: int = 1) -> dict[str, Paired]:
    """Like `paired` for several variants against one baseline: each repetition runs the baseline and every
    variant once, in a rotating order; returns one `Paired` per variant."""
    fns = [base, *variants.values()]
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for i in range(reps):
        order = list(range(len(fns)))
        order = order[i % len(fns):] + order[: i % len(fns)]
        for j in order:
            times[j].append(timed(fns[j]))
    return {name: Paired(tuple(times[0]), tuple(times[j + 1])) for j, name in enumerate(variants)}


def verdict(value: float, target: float, lower_is_better: bool = True) -> str:
    """`PASS (12% margin)` or `MISS by 35%` for a value against its target."""
    if lower_is_better:
        ok = value <= target
        margin = (target - value) / target if ok else (value - target) / target
    else:
        ok = value >= target
        margin = (value - target) / target if ok else (target - value) / target
    return f"PASS ({margin:.0%} margin)" if ok else f"MISS by {margin:.0%}"


def table(title: str, header: list[str], rows: list[list[object]], notes: list[str] = ()) -> str:
    """A plain-text table with a title line and optional notes below."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "-" * len(title)]
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [f"  {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def standalone(run: Callable[[bool], str], doc: str | None, argv: list[str] | None = None) -> int:
    """The command line of one benchmark module run on its own: `python bench/NAME.py [--quick]` prints its
    table (`run(quick)`). `doc` is the module docstring, whose first line describes the command."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true")
    print(run(parser.parse_args(argv).quick))
    return 0
