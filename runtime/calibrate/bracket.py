"""Exact quantiles of a stream without keeping the stream: brackets from the first values, counts outside them,
the values inside them.

In: one row of float32 values, block by block (NaN = left out), and the rank fractions that will be asked
(`1 - q` and `q` of `range_quantile`). Out: the value at each wanted 0-based rank, exactly, or a *miss*.

`Bracket.start(head, fractions)` picks, from a strided sample of the first values (the head), an
interval `[lo, hi]` around each fraction, `WIDTH` of the values wide on each side plus five standard
deviations of the sample's rank error; edges the sample holds twice are probable atoms (a ReLU's zeros), whose
edge counts are kept too. Every block then costs one pass (`quantiles.scan_brackets`: ~0.2 ns a value compiled, ~0.5 ns a
value in numpy, on data still in cache): counts of values <= lo and < hi (and
< lo, <= hi at an atom) and a copy of the few values strictly inside, kept under the quantile budget. At the end a rank between the counts is found among
the kept values; a rank on an atom edge by the counts.

A miss (the data drifted so that a wanted rank left its interval, or the values inside outgrew the budget)
is never answered approximately: the caller collects that statistic again in a second pass, exactly when the
values fit the budget, else with the certified sketch (`loop.calibrate_pass`).

Across processes (`bracket_protocol`) each process brings its own intervals (from its own head); the
processes agree on the intersections, each counts its values against them and sends the few values inside,
so every process finds the same exact values, equal to one process's answer whenever none misses.
"""

from __future__ import annotations

import math

import numpy as np

from ternqc.runtime.calibrate import scan_kernel
from ternqc.runtime.calibrate.quantiles import (
    ExactValues,
    QuantileBudget,
    _prime_at_least,
    _repeated,
    sample_brackets,
    scan_brackets,
    select_values,
)

#: Values a state keeps exactly before it places its brackets (and the total up to which it never does).
HEAD_VALUES = 2**18
#: Values a bracket keeps on each side of its rank fraction (a margin for batch-to-batch drift).
WIDTH = 0.01
#: Brackets are narrowed twice, exact counts making that possible at any time: once the head is counted, to
#: `WIDTH` of the values on each side of its ranks' positions (the sample's rank error gone), and once this
#: share of the planned values (at least `NARROW_AFTER_HEADS` heads) has been counted, to `NARROW`. The values
#: kept inside (the scan's main cost) drop from ~5% to ~2% and then ~0.5-1%.
NARROW_AFTER_SHARE = 1 / 8
NARROW_AFTER_HEADS = 4
NARROW = 0.005
#: Sample of the head that places the brackets (its rank error widens them until they are narrowed).
HEAD_SAMPLE = 2**15

_INF = np.float32(np.inf)
#: Room (values) a group's buffer (or an α band's) has at least before each compiled scan writes into it (`add_pass`).
PASS_ROOM = 4096


class BracketMissed(RuntimeError):
    """A bracketed quantile whose wanted rank left its brackets: collect it again (never answered
    approximately)."""


class Bracket:
    """Counts outside and values inside intervals around the wanted rank fractions (see the module doc).

    `groups`: `[(lo, hi, atom_lo, atom_hi)]`, disjoint and sorted; `counts[g]`: `[le_lo, lt_hi, lt_lo, le_hi]`
    (the last two only meaningful at an atom edge); `overflowed`: the values inside outgrew the budget (a
    miss whatever is asked)."""

    def __init__(
        self,
        groups: list[tuple[np.float32, np.float32, bool, bool]],
        budget: QuantileBudget,
        fractions: list[list[float]] | None = None,
    ) -> None:
        self.groups = groups
        self.counts = [[0, 0, 0, 0] for _ in groups]
        self.inside = [ExactValues(1, budget) for _ in groups]
        self.overflowed = False
        self.budget = budget
        self.fractions = fractions  # the rank fractions each group is around (None: never narrowed)
        self.seen = 0  # finite values counted
        self.narrow_at = NARROW_AFTER_HEADS * HEAD_VALUES

    @classmethod
    def start(cls, head: np.ndarray, fractions: tuple[float, ...], budget: QuantileBudget) -> Bracket:
        """Brackets placed from `head` (1-D, NaN = left out), around each of `fractions`."""
        stride = _prime_at_least(max(1, head.size // HEAD_SAMPLE))
        sample = head[::stride]
        sample = sample[~np.isnan(sample)]
        groups = sample_brackets(sample, [(f, f) for f in sorted(set(fractions))], WIDTH)
        out = [(lo, hi, _repeated(sample, lo), _repeated(sample, hi)) for lo, hi, _ in groups]
        return cls(out, budget, [fs for *_, fs in groups])

    def add(
        self, values: np.ndarray | None, finite: int, bounds: tuple[float, float] | None = None,
        scanned: list | None = None,
    ) -> None:
        """Count a block (`values` 1-D float32, `finite` of them not NaN; `bounds`: its min and max when all
        are finite) and keep what falls inside. `scanned`: `scan_brackets(values, self.groups)`, already made
        (by the block's probe; `values` is then not needed)."""
        if self.overflowed:
            return
        self.seen += finite
        counted = _scan_counts(values, self.groups, bounds) if scanned is None else _as_counts(scanned)
        for g, (gt_lo, between, lt_lo, gt_hi) in enumerate(counted):
            self._count(g, finite, gt_lo, between[0], lt_lo, gt_hi)
            mids = between[1]
            if mids.size:
                slot = self.inside[g].slot(mids.size)
                if slot is None:
                    self.overflow()
                    return
                slot[0] = mids

    def add_pass(self, address: int, n: int, sums: int, key: int = 0) -> tuple[float, float, float] | None:
        """`add` of the `n` float32 values at `address` (a contiguous CPU float32 tensor's `data_ptr()`), by the
        compiled scan: one pass per group, writing the values inside straight into the group's buffer (no
        copy), the first pass also summing them (`sums` 4) or their magnitudes (8) in the fixed order, with
        their min and max. Returns `(sum, min, max)` (sums 0: `(0.0, nan, nan)`). None, with nothing added,
        when a value is NaN or +-Inf, the budget refuses room, or there is no library: the caller takes
        `add`'s way (which also overflows where the budget refuses). `key` (the batch's) is not needed here
        (a batch pass's scans all take it, `BatchPass`). Lean: it runs in a hook, after a pass that left every
        cache cold."""
        if self.overflowed or not scan_kernel.available():
            return None
        groups, inside = self.groups, self.inside
        marks = [values.n for values in inside]
        results = []
        for g in range(len(groups)):
            lo, hi, a, b = groups[g]
            values, step_sums, done, fresh = inside[g], sums if g == 0 else 0, 0, True
            while True:
                room = values.tail(PASS_ROOM)
                if room is None:
                    return self._undo(marks)
                got = scan_kernel.scan_bracket_into(
                    address + 4 * done, n - done, float(lo), float(hi), a, b, step_sums, fresh, room[0], room[1]
                )
                values.n += got[5]
                done += got[0]
                fresh = False
                if done >= n:
                    break
            if step_sums and not math.isfinite(got[6]):  # a NaN or +-Inf: the general path leaves them out
                return self._undo(marks)
            results.append(got)
        self.seen += n
        for g, (_, gt_lo, between, lt_lo, gt_hi, *_) in enumerate(results):
            self._count(g, n, gt_lo, between, lt_lo, gt_hi)
        return results[0][6:] if sums else (0.0, math.nan, math.nan)

    def _count(self, g: int, finite: int, gt_lo: int, between: int, lt_lo: int, gt_hi: int) -> None:
        """Add a block's scan of group `g` (`finite` values: how many were > lo, strictly inside, < lo, > hi) to
        its counts `[<= lo, < hi, < lo, <= hi]` (the last only at an atom edge)."""
        c = self.counts[g]
        c[0] += finite - gt_lo
        c[1] += finite - gt_lo + between
        c[2] += lt_lo
        c[3] += finite - gt_hi if self.groups[g][3] else 0

    def _undo(self, marks: list[int]) -> None:
        """Drop the values a failed `add_pass` wrote (the groups' buffers back to `marks` values)."""
        for values, n in zip(self.inside, marks):
            values.n = n
        return None

    def reserve(self, seen: int, coming: int) -> None:
        """Size each group's buffer once for `coming` more values, from the share of the `seen` values that
        fell inside it (+25%): growing by doubling would leave the smaller buffers in the pool."""
        if seen <= 0 or coming <= 0:
            return
        self.narrow_at = max(self.narrow_at, int((seen + coming) * NARROW_AFTER_SHARE))
        for values in self.inside:
            values.reserve(values.n + int(values.n / seen * coming * 1.25) + 4096)

    def settle(self) -> None:
        """After a batch pass's batch (`add_pass` and every state's feeder): narrow when due, as `add`'s callers do."""
        if self.narrow_due():
            self.narrow()

    def narrow_due(self) -> bool:
        """Whether enough values have been counted to narrow (once)."""
        return self.fractions is not None and not self.overflowed and self.seen >= self.narrow_at

    def narrow(self, margin: float = NARROW, last: bool = True) -> None:
        """Shrink each group to the values within `margin` of the values counted so far on each side of its
        fractions' current ranks (exact: the new edges are selected among the values inside, the counts move
        with them; an edge the values hold twice becomes an atom edge). `last`: no later narrowing. A group
        whose ranks are not inside it now is left as it is (it will miss, and be collected again)."""
        fractions = self.fractions
        if fractions is None:
            return
        if last:
            self.fractions = None
        n = self.seen
        for g, ((lo, hi, a, b), fs) in enumerate(zip(self.groups, fractions)):
            c = self.counts[g]
            le_lo = c[0]
            mids = self.inside[g].values()[0]  # reordered by the selection below (only their multiset counts)
            i_lo = math.floor((min(fs) - margin) * (n - 1)) - le_lo  # the i-th smallest has rank le_lo + i
            i_hi = math.ceil((max(fs) + margin) * (n - 1)) - le_lo
            if i_lo >= mids.size or i_hi < 0 or (i_lo < 0 and i_hi >= mids.size):
                continue  # the ranks sit on an edge's atom, or outside: nothing to narrow
            found = select_values(mids, [i for i in (i_lo, i_hi) if 0 <= i < mids.size])  # not a sort of them
            new_lo = found[i_lo] if i_lo >= 0 else lo
            new_hi = found[i_hi] if i_hi < mids.size else hi
            if not new_lo < new_hi:
                continue
            counts = list(c)
            if i_lo >= 0:
                left, right = int(np.count_nonzero(mids < new_lo)), int(np.count_nonzero(mids <= new_lo))
                counts[0], counts[2], a = le_lo + right, le_lo + left, right - left > 1
            if i_hi < mids.size:
                left, right = int(np.count_nonzero(mids < new_hi)), int(np.count_nonzero(mids <= new_hi))
                counts[1], counts[3], b = le_lo + left, le_lo + right, right - left > 1
            keep = mids[(mids > new_lo) & (mids < new_hi)]
            self.inside[g].release()
            values = ExactValues(1, self.budget)
            slot = values.slot(keep.size)
            if slot is None:  # cannot happen: fewer values than were kept
                self.overflow()
                return
            slot[0] = keep
            self.groups[g] = (np.float32(new_lo), np.float32(new_hi), bool(a), bool(b))
            self.counts[g] = counts
            self.inside[g] = values

    def overflow(self) -> None:
        self.overflowed = True
        self.release()

    def release(self) -> None:
        for values in self.inside:
            values.release()

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.inside)

    def message(self) -> dict:
        """What this process brings to `bracket_protocol`."""
        return {"mode": "missed" if self.overflowed else "bracket", "groups": self.groups}

    def against(self, lo: np.float32, hi: np.float32) -> tuple[list[int | None], np.ndarray]:
        """Counts `[<= lo, < hi, < lo, <= hi]` (None: unknown) and the values strictly between, for an interval
        inside one of this bracket's groups."""
        for g, (glo, ghi, a, b) in enumerate(self.groups):
            if glo <= lo and hi <= ghi:
                le_glo, lt_ghi, lt_glo, le_ghi = self.counts[g]
                mids = self.inside[g].values()[0]
                le_lo = le_glo if lo == glo else le_glo + int(np.count_nonzero(mids <= lo))
                lt_lo = (lt_glo if a else None) if lo == glo else le_glo + int(np.count_nonzero(mids < lo))
                lt_hi = lt_ghi if hi == ghi else le_glo + int(np.count_nonzero(mids < hi))
                le_hi = (le_ghi if b else None) if hi == ghi else le_glo + int(np.count_nonzero(mids <= hi))
                return [le_lo, lt_hi, lt_lo, le_hi], mids[(mids > lo) & (mids < hi)]
        msg = "interval outside every bracket"
        raise ValueError(msg)


def _scan_counts(values: np.ndarray, groups, bounds=None) -> list[tuple[int, tuple[int, np.ndarray], int, int]]:
    """Per group: count > lo, (count strictly between, the values between), count < lo, count > hi."""
    # views of the scan's buffers: `Bracket.add` copies them into its own before anything else scans
    return _as_counts(scan_brackets(values, [(lo, hi, a, b) for lo, hi, a, b in groups], bounds, copy=False))


def _as_counts(scanned: list) -> list[tuple[int, tuple[int, np.ndarray], int, int]]:
    """`scan_brackets`' results as `_scan_counts` gives them."""
    return [(c[0], (c[1], mids), c[2], c[3]) for c, mids in scanned]


def _values_against(values: np.ndarray, lo: np.float32, hi: np.float32) -> tuple[list[int], np.ndarray]:
    """`[<= lo, < hi, < lo, <= hi]` and the values strictly between, for a process holding every value."""
    return (
        [
            int(np.count_nonzero(values <= lo)),
            int(np.count_nonzero(values < hi)),
            int(np.count_nonzero(values < lo)),
            int(np.count_nonzero(values <= hi)),
        ],
        values[(values > lo) & (values < hi)],
    )


def bracket_protocol(local: Bracket | np.ndarray | None, ranks: list[int], missed: bool = False):
    """A protocol generator (driven by `quantiles.run_local` or `collectives.run_protocols`) that finds the
    values at the 0-based global `ranks` from every process's `local`: a `Bracket`, or an array holding every
    value it saw (1-D, NaN = left out; None: none). Returns `{rank: float32}`, or None (a miss) in every
    process alike. `missed` says this process already knows it cannot answer (e.g. an overflow)."""
    if isinstance(local, Bracket):
        message = local.message()
        if missed:
            message["mode"] = "missed"
    else:
        message = {"mode": "missed" if missed else "all", "groups": None}
    everyone = yield message
    if any(m["mode"] == "missed" for m in everyone):
        return None
    brackets = [m["groups"] for m in everyone if m["mode"] == "bracket"]
    if brackets:
        intervals = _intersections(brackets)
    else:
        intervals = [(-_INF, _INF)]
    if not intervals:
        return None
    if isinstance(local, Bracket):
        mine = [local.against(lo, hi) for lo, hi in intervals]
    else:
        values = np.empty(0, dtype=np.float32) if local is None else local
        mine = [_values_against(values, lo, hi) for lo, hi in intervals]
    everyone = yield mine
    out: dict[int, float] = {}
    for i, (lo, hi) in enumerate(intervals):
        counts = [[part[i][0][j] for part in everyone] for j in range(4)]
        le_lo, lt_hi, lt_lo, le_hi = (None if any(c is None for c in col) else sum(col) for col in counts)
        inside = []
        for k in ranks:
            if k in out:
                continue
            if le_lo <= k < lt_hi:
                inside.append(k - le_lo)
            elif lt_lo is not None and lt_lo <= k < le_lo:
                out[k] = lo
            elif le_hi is not None and lt_hi <= k < le_hi:
                out[k] = hi
        if inside:  # a selection among the values between, not a sort of them (~1% of all: 167k for 16.7M)
            between = np.concatenate([part[i][1] for part in everyone])
            out.update((k + le_lo, v) for k, v in select_values(between, inside).items())
    if any(k not in out for k in ranks):
        return None
    return {k: np.float32(v) for k, v in out.items()}


def _intersections(brackets: list[list[tuple]]) -> list[tuple[np.float32, np.float32]]:
    """The intervals every process knows: each group of the first bracket intersected with the overlapping
    group of every other (the one overlapping it most); empty intersections dropped."""
    out = []
    for lo, hi, _, _ in brackets[0]:
        for other in brackets[1:]:
            best = None
            for olo, ohi, _, _ in other:
                a, b = max(lo, olo), min(hi, ohi)
                if a <= b and (best is None or b - a > best[1] - best[0]):
                    best = (a, b)
            if best is None:
                lo, hi = _INF, -_INF
                break
            lo, hi = best
        if lo <= hi:  # lo == hi: an atom holds the whole bracket (its edge counts answer)
            out.append((np.float32(lo), np.float32(hi)))
    return out
