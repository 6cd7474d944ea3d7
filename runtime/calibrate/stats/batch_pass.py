"""`BatchPass`: one batch of a large tensor fed to every statistic by one compiled pass, no block made.

In: a `TensorStats` whose statistics can all be fed from a pass's results (each state's `pass_feeder`), then
each batch as the address and size of its float32 values. Out: the same state changes as the general path
(`TensorStats._feed` with a `Block`), bit for bit; `feed` declines (changing nothing) where that path must
decide (a NaN or +-Inf, the budget refusing room), and the caller takes it.

Why: the general path makes a `Block`, asks each state what the probe may scan, and each state then reads the
block's results through its own checks: ~150-200 µs of Python per batch in a hook, where the forward's layers
have left every cache cold, against ~150 µs for the scan of a 1 MiB batch. Here the checks are made once, and
the states' feeders run later, up to `LOG_BATCHES` batches at a time (`drain`), with their code and data warm:
what a batch leaves in the hook is its scan and one entry in a list. The owner drains before anything reads the
states (`TensorStats.flush`) and before a batch takes the general path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ternqc.runtime.calibrate import scan_kernel

#: `feed(n, key, lo, hi, total)`: a state's share of one batch (see `StatState.pass_feeder`).
Feeder = Callable[[int, int, float, float, float], None]

#: Batches whose feeders wait at most (`BatchPass.drain`): each waiting batch is five numbers.
LOG_BATCHES = 64


class PassScan(Protocol):
    """What a batch pass scans besides the sums (`StatState.pass_scan`): a quantile's `Bracket`, an α's band."""

    def add_pass(self, address: int, n: int, sums: int, key: int) -> tuple[float, float, float] | None:
        """Scan the batch (`n` float32 values at `address`, `key`) into what it keeps, the same pass making the
        fixed-order sum (`sums` 4: of the values, 8: of their magnitudes), min and max: `(sum, min, max)`;
        None, with nothing changed, where the general path must take the batch (a NaN or +-Inf, no room)."""

    def settle(self) -> None:
        """After the batch has gone to every state's feeder."""


class BatchPass:
    """The states of one tensor and how to feed them a batch of `shape` (`build`), with at most one scan made in
    the pass (a quantile's bracket, an α's band; see `StatState.pass_scan`); `absolute`: the pass sums the
    magnitudes (a statistic of |x| is fed)."""

    __slots__ = ("shape", "absolute", "feeders", "scan", "waiting")

    def __init__(self, shape, absolute: bool, feeders: list[Feeder], scan: PassScan | None) -> None:
        self.shape = shape
        self.absolute = absolute
        self.feeders = feeders
        self.scan = scan
        self.waiting: list[tuple[int, int, float, float, float]] = []  # fed batches whose feeders wait (`drain`)

    @classmethod
    def build(cls, states, shape, absolute: bool) -> BatchPass | None:
        """The pass for `states` (one tensor's, adopted to batches of `shape`), or None when one
        of them needs the values themselves, two would scan, or there is no compiled library."""
        if not scan_kernel.available():
            return None
        feeders, scan = [], None
        for state in states:
            feeder = state.pass_feeder(absolute)
            if feeder is None:
                return None
            got = state.pass_scan()
            if got is not None:
                if scan is not None:
                    return None
                scan = got
            feeders.append(feeder)
        return cls(shape, absolute, feeders, scan)

    def feed(self, address: int, n: int, key: int) -> bool:
        """Feed the batch of `n` float32 values at `address` (a contiguous CPU float32 tensor's `data_ptr()`)
        with `key` to every state (the scan now, the feeders by `drain`); False, with nothing changed, where the
        general path must take it."""
        scan = self.scan
        sums = 8 if self.absolute else 4
        if scan is not None:
            got = scan.add_pass(address, n, sums, key)
            if got is None:
                return False
            total, lo, hi = got
        else:
            got = scan_kernel.row_sums(None, self.absolute, address, (1, n))
            if got is None or got[3]:
                return False
            total, lo, hi = float(got[0][0]), got[1], got[2]
        waiting = self.waiting
        waiting.append((n, key, lo, hi, total))
        if len(waiting) >= LOG_BATCHES:
            self.drain()
        if scan is not None:
            scan.settle()  # the scan's own state only: the feeders need not have run
        return True

    def drain(self) -> None:
        """Run every state's feeder on each batch fed since the last drain, in the order fed: the states are then
        as if each batch had been fed to them at once."""
        feeders, waiting = self.feeders, self.waiting
        for n, key, lo, hi, total in waiting:
            lo, hi = lo + 0.0, hi + 0.0  # a zero is +0 (either zero may come first), as `Block.prepare` gives it
            for feeder in feeders:
                feeder(n, key, lo, hi, total)
        waiting.clear()
