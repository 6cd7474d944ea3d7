"""A KLL-style mergeable quantile sketch (Karnin, Lang, Liberty 2016), vectorised over rows.

In: rows of float32 values. Out: per row the value at a rank, within `rank_error_bound(k)`; `sketch_bytes` says
what it holds at most, so a `QuantileBudget` can size it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ternqc.runtime.calibrate.quantiles import lerp, rank_of, select_pool, select_threads

#: Top-level capacity of the sketch: the measured rank error stays below 3/k, so 2^16 gives <= 4.6e-5.
DEFAULT_SKETCH_K = 2**16
MIN_SKETCH_K = 64
_SHRINK = 2.0 / 3.0  # KLL's capacity ratio between adjacent levels
_MIN_CAPACITY = 8
_CHUNK_VALUES = 2**22  # values sorted at once when a large array is added (16 MiB of float32)



def sketch_max_items(k: int) -> int:
    """An upper bound on the items one row of a `CompactorSketch(k)` holds between updates (measured maximum
    2.26k; the level capacities sum to at most k/(1-2/3) = 3k plus the small levels' minimum sizes)."""
    return 3 * k + 64 * _MIN_CAPACITY


def rank_error_bound(k: int) -> float:
    """The sketch's normalised rank error bound for top-level capacity `k`: the largest error measured over
    many seeds, quantiles and inputs was 2.9/k; the bound adds a margin (KLL's guarantee is probabilistic)."""
    return 4.0 / k


def sketch_bytes(rows: int, k: int = DEFAULT_SKETCH_K) -> int:
    """The most a sketch of `rows` rows and top capacity `k` holds (what it promises and reserves)."""
    return rows * sketch_max_items(k) * 4


def sketch_k_for(rows: int, nbytes: int) -> int:
    """The largest power-of-two `k <= DEFAULT_SKETCH_K` whose sketch of `rows` rows fits in `nbytes`
    (at least `MIN_SKETCH_K`)."""
    k = DEFAULT_SKETCH_K
    while k > MIN_SKETCH_K and sketch_bytes(rows, k) > nbytes:
        k //= 2
    return k


class CompactorSketch:
    """A KLL-style quantile sketch of `rows` rows at once (every row sees the same number of values).

    `add(values)` takes a `[rows, m]` float32 array (NaN = left out; NaN sorts last and is skipped when
    answering). `merge(other)` combines two sketches of the same `rows`. `quantiles` answers ranks.
    """

    def __init__(self, rows: int, k: int = DEFAULT_SKETCH_K, seed: int = 0) -> None:
        self.rows = rows
        self.k = int(k)
        self.levels: list[np.ndarray] = [np.empty((rows, 0), dtype=np.float32)]
        self._rng = np.random.default_rng(seed)

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels)

    def reserved_bytes(self) -> int:
        """What this sketch may hold at most (what it reserves from a budget)."""
        return sketch_bytes(self.rows, self.k)

    def _capacity(self, h: int) -> int:
        top = len(self.levels) - 1
        return max(_MIN_CAPACITY, math.ceil(self.k * _SHRINK ** (top - h)))

    def _push(self, h: int, items: np.ndarray) -> None:
        while len(self.levels) <= h:
            self.levels.append(np.empty((self.rows, 0), dtype=np.float32))
        level = self.levels[h]
        self.levels[h] = items if level.shape[1] == 0 else np.concatenate((level, items), axis=1)

    def add(self, values: np.ndarray) -> None:
        """Add `[rows, m]` values. A batch much larger than `k` is sorted once and thinned straight to the
        level where it fits (keeping every 2^j-th value from a random offset, as j compactions would); a
        very large one (a whole exact buffer being converted) in chunks, so the sort's copy stays small.
        Large batches are cut into one piece per thread, sorted in parallel (numpy releases the GIL; a
        calibration hook runs while the model waits, so the cores are free) and then thinned in order, so
        the result does not depend on the threads' timing."""
        values = np.asarray(values, dtype=np.float32)
        m = values.shape[1]
        if m == 0:
            return
        chunk = max(self.k, _CHUNK_VALUES // self.rows)
        threads = select_threads()
        if m <= self.k or (m <= chunk and (threads == 1 or m < 8 * self.k)):
            self._add_sorted(values if m <= self.k else np.sort(values, axis=1), m > self.k)
            return
        piece = max(self.k, min(chunk, -(-m // threads)))
        starts = range(0, m, piece)
        for start0 in range(0, len(starts), threads):  # at most `threads` sorted pieces held at once
            group = [values[:, s : s + piece] for s in starts[start0 : start0 + threads]]
            if len(group) > 1:
                sorted_group = list(select_pool().map(lambda v: np.sort(v, axis=1), group))
            else:
                sorted_group = [np.sort(group[0], axis=1)]
            for srt in sorted_group:
                self._add_sorted(srt, True)

    def _add_sorted(self, values: np.ndarray, is_sorted: bool) -> None:
        m = values.shape[1]
        j = max(0, math.ceil(math.log2(m / self.k))) if m > self.k else 0
        if j == 0:
            self._push(0, np.array(values, copy=True))
        else:
            step = 2**j
            body = m - m % step
            offset = int(self._rng.integers(step))
            self._push(j, np.ascontiguousarray(values[:, offset:body:step]))
            if body < m:
                self._push(0, np.ascontiguousarray(values[:, body:]))
        self._compress()

    def merge(self, other: CompactorSketch) -> None:
        """Add `other`'s items level by level (exact bookkeeping; the sketch error of both adds up)."""
        if other.rows != self.rows:
            msg = f"cannot merge sketches of {other.rows} and {self.rows} rows"
            raise ValueError(msg)
        self.k = max(self.k, other.k)
        for h, level in enumerate(other.levels):
            if level.shape[1]:
                self._push(h, level.copy())
        self._compress()

    def _compress(self) -> None:
        h = 0
        while h < len(self.levels):
            level = self.levels[h]
            if level.shape[1] >= self._capacity(h):
                srt = np.sort(level, axis=1)
                s = srt.shape[1]
                even = s - s % 2
                offset = int(self._rng.integers(2))
                self.levels[h] = np.ascontiguousarray(srt[:, even:])
                self._push(h + 1, np.ascontiguousarray(srt[:, offset:even:2]))
            h += 1

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All items `[rows, T]` and their weights `[T]` (the same for every row)."""
        values = np.concatenate(self.levels, axis=1)
        weights = np.concatenate(
            [np.full(level.shape[1], 2**h, dtype=np.int64) for h, level in enumerate(self.levels)]
        )
        return values, weights

    def quantiles(self, qs: tuple[float, ...], finite: np.ndarray) -> list[torch.Tensor]:
        """The `q` quantile of each row for each `q` in `qs`, interpolated like `ExactValues.quantiles`, with
        `finite` the exact number of non-NaN values each row has seen."""
        values, weights = self.items()
        order = np.argsort(values, axis=1, kind="stable")
        srt = np.take_along_axis(values, order, 1)
        cum = np.cumsum(weights[order], axis=1)
        last = np.maximum((~np.isnan(srt)).sum(axis=1) - 1, 0)[:, None]
        out = []
        for q in qs:
            r = rank_of(q, finite)
            picks = []
            for target in (np.floor(r), np.ceil(r)):
                idx = (cum <= target[:, None]).sum(axis=1, keepdims=True)
                picks.append(np.take_along_axis(srt, np.minimum(idx, last), 1)[:, 0])
            value = lerp(picks[0], picks[1], r)
            out.append(torch.where(torch.from_numpy(np.asarray(finite) > 0), value, float("nan")))
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"level_{h}": level for h, level in enumerate(self.levels)}
        out["k"] = np.array(self.k)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], rows: int) -> CompactorSketch:
        sketch = cls(rows, int(arrays["k"]))
        h = 0
        while f"level_{h}" in arrays:
            sketch._push(h, np.asarray(arrays[f"level_{h}"], dtype=np.float32).reshape(rows, -1))
            h += 1
        return sketch
