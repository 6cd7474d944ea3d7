"""Quantiles without torch.quantile's 2^24 limit: exact value buffers, a mergeable sketch, a shared budget.

In: rows of float32 values (`[rows, m]` per batch; `rows` = 1 for one quantile over everything, more for
per-channel or element-wise quantiles; NaN marks a value that is left out). Out: for each row the value at
a rank, linearly interpolated as `torch.quantile` does (rank `q·(n-1)`, `torch.lerp` in float32).

- `ExactValues` keeps every value in one preallocated, growing float32 buffer. A single row is answered by
  `select_values`, the one entry point for order statistics: the compiled selection (`scan_kernel.select`:
  a sample brackets each wanted rank, one branch-free pass counts the values below the bracket and copies
  those inside, the same again among those; ~0.3 ns a value) where the library is built, else
  `select_protocol` (the same idea in numpy: one pass, then only the few values inside are partitioned; a
  bracket that misses falls back to counting its edges or a full partition, so the answer is always exact).
  The protocol also runs across processes: only counts, samples and the values inside the brackets travel
  (`torch.distributed` merging, see `distributed.sync_stats`). Many rows (per-channel quantiles) are
  partitioned in place. No sort of everything, no size limit.
- `CompactorSketch` is a KLL-style compactor sketch (Karnin, Lang, Liberty 2016): a stack of levels, level
  `h` holding sorted samples of weight `2^h`; a full level is sorted and every other item (random offset)
  moves up. It is mergeable, handles repeated values (ReLU zeros) exactly like any other value, and its
  rank error does not depend on the value range. Measured over many seeds, quantiles and 10^5-2·10^7 values
  (iid and with a 50% atom at 0) the rank error stays below 3/k; the default k = 2^16 gives <= 4.6e-5
  (the acceptance bound is 1e-4), in about 0.6 MB per row; see `rank_error_bound`.
- `QuantileBudget` is shared by every quantile state of a run: exact buffers reserve bytes from it, and a
  state whose buffer would exceed it switches to a sketch sized to what is left.

Everything here is deterministic: the sketch draws its offsets from a generator seeded with 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ternqc.runtime.calibrate import scan_kernel
from ternqc.runtime.calibrate.buffers import give_back, take_buffer, trim_pool

DEFAULT_BUDGET_BYTES = 256 * 2**20


class QuantileBudget:
    """Bytes that the quantile states of one run may hold together (default 256 MiB).

    Every quantile state `promise`s the size of the sketch it would switch to (as soon as it knows its number
    of rows; for many rows at most an eighth of the limit), so exact buffers never take the room a later
    sketch needs: `available` is what is left for exact buffers. A state grows its buffer only within
    `available`; when it cannot, it switches to a sketch
    and `claim`s its promise. `used` and `peak` count bytes held, for reports and tests. The limit holds
    exactly when every promise is made before the buffers fill it (always for dims=all, whose one row is
    known up front); a per-channel state first seen after that may exceed it by its sketch.

    Buffers released to the process's pool (`buffers.give_back`: a buffer that grew, a head given up for
    brackets, every buffer once the run is done) count against the limit too: each time bytes are taken the
    pool is trimmed to what the budget has not handed out, so the values held and those kept for reuse stay
    within the limit together.
    """

    def __init__(self, bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if bytes < 0:
            msg = f"the quantile memory budget must not be negative, got {bytes}"
            raise ValueError(msg)
        self.limit = int(bytes)
        self.used = 0
        self.peak = 0
        self.promised = 0

    @property
    def available(self) -> int:
        """Bytes exact buffers may still take (the limit less what is held and what sketches were
        promised)."""
        return max(0, self.limit - self.used - self.promised)

    def promise(self, nbytes: int) -> None:
        """Set `nbytes` aside for a sketch that may be made later."""
        self.promised += int(nbytes)

    def cancel(self, promised: int) -> None:
        """Withdraw a promise of `promised` bytes (its state holds an exact buffer that needs no sketch)."""
        self.promised = max(0, self.promised - int(promised))

    def claim(self, promised: int, nbytes: int) -> None:
        """Turn a promise of `promised` bytes into `nbytes` held."""
        self.promised = max(0, self.promised - int(promised))
        self.force(nbytes)

    def reserve(self, nbytes: int) -> bool:
        """Take `nbytes` if they fit in `available`; return whether they were taken."""
        if nbytes > self.available:
            return False
        self.force(nbytes)
        return True

    def force(self, nbytes: int) -> None:
        """Take `nbytes` even beyond the limit (a sketch that cannot be made smaller); the pool keeps at most
        what is left."""
        self.used += int(nbytes)
        self.peak = max(self.peak, self.used)
        self.trim_pool()

    def trim_pool(self) -> None:
        """Free pooled buffers until the pool holds at most what the budget has not handed out."""
        trim_pool(max(0, self.limit - self.used - self.promised))

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - int(nbytes))

    def __repr__(self) -> str:
        return (
            f"QuantileBudget(limit={self.limit}, used={self.used}, promised={self.promised}, "
            f"peak={self.peak})"
        )


# ---------------------------------------------------------------------------------------------------------
# Ranks and interpolation (torch.quantile's definition)
# ---------------------------------------------------------------------------------------------------------


def rank_of(q: float, n: np.ndarray) -> np.ndarray:
    """The 0-based fractional rank `q·(n-1)` for each count in `n`, in float64.

    torch.quantile computes this rank in the input's dtype (float32), so for a `q` that float32 cannot hold
    (0.975) its rank can be off by up to 6e-8·n; here the rank is exact, so results agree with
    `numpy.quantile` to float32 rounding, and with torch.quantile bit for bit whenever `q·(n-1)` is exact in
    float32 (e.g. the median). The interpolation itself is torch's (`lerp`)."""
    n1 = np.maximum(np.asarray(n, dtype=np.int64) - 1, 0)
    return float(q) * n1.astype(np.float64)


def lerp(below: np.ndarray, above: np.ndarray, rank: np.ndarray) -> torch.Tensor:
    """`torch.lerp(below, above, rank - floor(rank))` in float32, as torch.quantile interpolates."""
    weight = torch.from_numpy((rank - np.floor(rank)).astype(np.float32))
    lo = torch.from_numpy(np.ascontiguousarray(below, dtype=np.float32))
    hi = torch.from_numpy(np.ascontiguousarray(above, dtype=np.float32))
    return torch.lerp(lo, hi, weight)


# ---------------------------------------------------------------------------------------------------------
# Exact: every value in one buffer
# ---------------------------------------------------------------------------------------------------------


class ExactValues:
    """All values of `rows` rows in one float32 buffer `[rows, capacity]` that grows by doubling.

    `slot(m)` returns a `[rows, m]` numpy view to write the next `m` values of every row into, or `None`
    when the budget refuses the memory (the caller then switches to a sketch). NaN marks left-out values.
    """

    def __init__(self, rows: int, budget: QuantileBudget) -> None:
        self.rows = rows
        self.n = 0
        self.budget = budget
        self._buf = np.empty((rows, 0), dtype=np.float32)
        self._address_of: np.ndarray | None = None  # the buffer whose address `_address` is (`tail`)
        self._address = 0

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes

    def slot(self, m: int, hint: int | None = None) -> np.ndarray | None:
        """Room for `m` more values per row; `hint` is the total expected per row (a first allocation)."""
        need = self.n + m
        if need > self._buf.shape[1] and not self._grow(need, hint):
            return None
        view = self._buf[:, self.n : need]
        self.n = need
        return view

    def tail(self, free: int) -> tuple[int, int] | None:
        """One row: the address of the room after the values held and how many values it has, at least `free`
        (grown within the budget; None when it refuses). A compiled scan writes there; `n` then grows by what it
        wrote."""
        if self._buf.shape[1] - self.n < free and not self._grow(self.n + free, None):
            return None
        buf = self._buf
        if self._address_of is not buf:  # `__array_interface__` once per buffer (`.ctypes` is slower still)
            self._address_of, self._address = buf, buf.__array_interface__["data"][0]
        return self._address + 4 * self.n, buf.shape[1] - self.n

    def reserve(self, total: int) -> bool:
        """Allocate room for `total` values per row at once (taken from the budget); False if it does not
        fit."""
        return total <= self._buf.shape[1] or self._grow(total, total)

    def _grow(self, need: int, hint: int | None) -> bool:
        # the hinted total, else doubling, at most what the budget has left; False when even `need` is not
        cap = self._buf.shape[1]
        room = cap + self.budget.available // (self.rows * 4)
        if room < need:
            return False
        grown = min(max(need, 2 * cap, hint or 0), room)
        self.budget.force((grown - cap) * self.rows * 4)
        buf = take_buffer(self.rows * grown).reshape(self.rows, grown)
        buf[:, : self.n] = self._buf[:, : self.n]
        give_back(self._buf)
        self.budget.trim_pool()  # the smaller buffer kept for reuse only within the budget
        self._buf = buf
        return True

    def adopt(self, buffer: np.ndarray, m: int) -> bool:
        """Keep `buffer` (a pooled 1-D float32 array whose first `m` values are the first values of the one
        row) as the buffer instead of copying them into it, when nothing is held yet and it is the size of the
        room reserved (or, with less reserved, of the `m` values): never more bytes than a copy would hold,
        never a smaller room that would have to grow by a copy. Whether it did."""
        if self.n or self.rows != 1 or buffer.ndim != 1 or buffer.dtype != np.float32:
            return False
        if not (m <= buffer.size and self._buf.size <= buffer.size <= max(self._buf.size, m)):
            return False
        more = (buffer.size - self._buf.size) * 4
        if more > 0 and not self.budget.reserve(more):
            return False
        if more < 0:
            self.budget.release(-more)
        give_back(self._buf)
        self.budget.trim_pool()
        self._buf = buffer.reshape(1, -1)
        self.n = m
        return True

    @classmethod
    def from_array(cls, values: np.ndarray) -> ExactValues:
        """A buffer holding `values` (`[rows, n]`), outside any budget (a merge result)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        out = cls(values.shape[0], QuantileBudget(values.nbytes))
        out._buf = values
        out.n = values.shape[1]
        return out

    def values(self) -> np.ndarray:
        """The `[rows, n]` values seen (a view; NaN = left out)."""
        return self._buf[:, : self.n]

    def release(self) -> None:
        """Give the buffer back (after switching to a sketch)."""
        self.budget.release(self._buf.nbytes)
        give_back(self._buf)
        self._buf = np.empty((self.rows, 0), dtype=np.float32)
        self.n = 0

    def quantiles(self, qs: tuple[float, ...], finite: np.ndarray) -> list[torch.Tensor | np.ndarray]:
        """The `q` quantile of each row for each `q` in `qs` (float32, shape `[rows]`: arrays for one row,
        tensors for several).

        `finite` holds each row's number of non-NaN values. One row goes through `select_protocol` (the buffer
        is only read); many rows are partitioned in place at the needed ranks (sorted when a row has left-out
        values: NaN sorts last).
        """
        a = self.values()
        if self.rows == 1:
            return row_quantiles(a[0], qs, finite)
        return partition_quantiles(a, qs, finite)


def row_quantiles(values: np.ndarray, qs: tuple[float, ...], finite: np.ndarray) -> list[np.ndarray]:
    """`ExactValues.quantiles` of one row: `values` (1-D float32, NaN = left out, only read), `finite[0]` of them
    not NaN; `[1]` float32 arrays (`select_values`)."""
    valid = [k for k in wanted_ranks(qs, finite) if 0 <= k < int(finite[0])]
    return quantiles_from_ranks(qs, finite, select_values(values, valid, int(finite[0]), keep=True))


def select_values(
    values: np.ndarray, ranks: list[int], finite: int | None = None, keep: bool = False
) -> dict[int, np.float32]:
    """`{rank: value}` for the 0-based `ranks` (each < `finite`, the number of values not NaN; counted when
    None) of `values` (1-D float32, NaN = left out, sorting last), which may be reordered unless `keep`.

    Beyond `PARTITION_SMALL` values the compiled selection (`scan_kernel.select`: brackets from samples and a
    branch-free counting pass each; it only reads), else one partition (of a copy with `keep`); without the
    library beyond `PARTITION_UP_TO` values `select_protocol` (a sample, one scan, a partition of the few values
    near the ranks). numpy's partition costs ~8-10 ns a value on fresh data (about every other comparison
    mispredicted; measured 134 µs for 12800 values, 8.9 ms for 819200, against 27 µs and 275 µs compiled), and
    with a single kth 2.5x what it costs with two: a single rank is partitioned with its neighbour."""
    if not ranks:
        return {}
    if values.size > PARTITION_SMALL:
        count = finite if finite is not None else values.size - int(np.count_nonzero(np.isnan(values)))
        got = scan_kernel.select(values, ranks, count)
        if got is not None:
            return got
        if values.size > PARTITION_UP_TO:
            return run_local(select_protocol(values, count, ranks))
    return _partitioned(values.copy() if keep else values, ranks)


def _partitioned(values: np.ndarray, ranks: list[int]) -> dict[int, np.float32]:
    """`{rank: value}` from one in-place partition of `values` at `ranks` (a single rank with a neighbour)."""
    if not ranks:
        return {}
    kth = sorted(set(ranks))
    if len(kth) == 1 and values.size > 1:
        kth.append(kth[0] + 1 if kth[0] + 1 < values.size else kth[0] - 1)
        kth.sort()
    values.partition(kth)
    return {k: values[k] for k in ranks}


def wanted_ranks(qs: tuple[float, ...], finite: np.ndarray) -> list[int]:
    """The 0-based integer ranks (floor and ceil of `q·(n-1)`) that the quantiles `qs` of one row need."""
    out = set()
    n1 = max(int(finite[0]) - 1, 0)
    for q in qs:
        r = float(q) * float(n1)  # `rank_of` for one row, without numpy's per-call cost
        out.update((math.floor(r), math.ceil(r)))
    return sorted(out)


def quantiles_from_ranks(
    qs: tuple[float, ...], finite: np.ndarray, values: dict[int, float]
) -> list[np.ndarray]:
    """One row's quantiles from the values at its integer ranks (`select_protocol`'s answer), interpolated
    like `torch.quantile`, as `[1]` float32 arrays (small tensors cost more to make); NaN when the row has no
    finite value."""
    if int(finite[0]) == 0:
        return [np.full(1, np.nan, dtype=np.float32) for _ in qs]
    n1 = max(int(finite[0]) - 1, 0)
    rs = [float(q) * float(n1) for q in qs]  # `rank_of` for one row
    lo = np.array([values[math.floor(r)] for r in rs], dtype=np.float32)
    hi = np.array([values[math.ceil(r)] for r in rs], dtype=np.float32)
    weight = np.array([r - math.floor(r) for r in rs], dtype=np.float32)
    got = [lerp_exactly(lo[i], hi[i], float(weight[i])) for i in range(len(qs))]
    if all(g is not None for g in got):  # a median's weight, 0 or 0.5: torch's bits without a torch call
        return [np.array([g], dtype=np.float32) for g in got]
    # torch's lerp (its bits), on numpy's memory: one call for every q, element-wise, the same as one at a time
    out = torch.lerp(torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(weight)).numpy()
    return [out[i : i + 1] for i in range(len(qs))]


def lerp_exactly(lo: np.float32, hi: np.float32, weight: float) -> np.float32 | None:
    """`torch.lerp(lo, hi, weight)` in float32, bit for bit, where no kernel's fusing of multiply and add can
    change it: weight 0 (torch computes `lo + 0·d`, d = hi - lo) and weight 0.5 (`hi - d·0.5`, the product
    exact for a normal d or 0); d finite. None otherwise (ask torch). The weights of a median (rank
    `0.5·(n-1)`), and of any quantile at a whole rank; it saves a torch call, the dearest part of a small
    tensor's result in a cold calibration."""
    if weight not in (0.0, 0.5) or not abs(float(hi) - float(lo)) < 1e38:
        return None
    d = hi - lo
    if weight == 0.0:
        return lo + np.float32(0.0) * d
    if d != 0 and abs(d) < np.float32(2.0**-125):  # halving a subnormal difference rounds
        return None
    return hi - d * np.float32(0.5)


def partition_quantiles(a: np.ndarray, qs: tuple[float, ...], finite: np.ndarray) -> list[torch.Tensor]:
    """Quantiles of every row of `a` (`[rows, n]`, NaN = left out), partitioning or sorting `a` in place."""
    rows = a.shape[0]
    ranks = [rank_of(q, finite) for q in qs]
    if a.shape[1] == 0:
        return [torch.full((rows,), float("nan")) for _ in qs]
    if np.all(finite == a.shape[1]):
        kth = sorted({int(i) for r in ranks for i in (np.floor(r[0]), np.ceil(r[0]))})
        a.partition(kth, axis=1)
        return [lerp(a[:, int(np.floor(r[0]))], a[:, int(np.ceil(r[0]))], r) for r in ranks]
    a.sort(axis=1)
    out = []
    for r in ranks:
        lo = np.floor(r).astype(np.int64)[:, None]
        hi = np.ceil(r).astype(np.int64)[:, None]
        value = lerp(np.take_along_axis(a, lo, 1)[:, 0], np.take_along_axis(a, hi, 1)[:, 0], r)
        out.append(torch.where(torch.from_numpy(finite > 0), value, float("nan")))
    return out


# ---------------------------------------------------------------------------------------------------------
# Exact selection of a few ranks among many values, in one process or across several
# ---------------------------------------------------------------------------------------------------------

#: Values in the sample that brackets the wanted ranks (all processes together). Smaller is wider brackets (more
#: values between, partitioned at the end) but a cheaper sample (a strided read and a partition): 2^13 against
#: 2^15 took toy's 819k-value medians from ~1.55 ms to ~1.2 ms each (the sample's brackets 340 -> 115 µs).
SAMPLE_SIZE = 2**13
#: Without the compiled selection, one row of at most this many values is partitioned whole instead of going
#: through `select_protocol` (measured: faster up to ~2^14).
PARTITION_UP_TO = 2**14
#: At most this many values are partitioned by numpy even with the compiled selection (faster up to ~2-3k).
PARTITION_SMALL = 2048
_SCAN_CHUNK = 2**16  # values compared at once (with their boolean masks they stay in the L2 cache)
_PARALLEL_SCAN = 2**22  # from this many values the scan is split over threads (measured: smaller blocks gain nothing)
_POOL: list = []


def select_protocol(values: np.ndarray | None, finite: int, ranks: list[int], parts: int = 1):
    """A generator that finds the values at 0-based `ranks` among the finite values of `parts` processes.

    Each process passes its own `values` (1-D float32, NaN = left out, only read) and their number of finite
    values. The generator yields what this process contributes to each round and is sent back the list of
    every process's contribution (rank order): `run_local` drives it in one process,
    `distributed.sync_stats` across processes with `all_gather_object`. It returns
    `{rank: float32 value}`, identical in every process.

    Rounds: (1) counts and a strided sample (a prime stride, so it does not alias with a tensor's layout;
    every value when there are few, which then answers at once). Every process sorts the pooled sample and
    picks a bracket `[lo, hi]` around each wanted rank, 5 standard deviations of the sample's rank error
    wide; an edge the sample holds twice is probably an atom. (2) each process counts its values <= lo and
    < hi (and < lo, <= hi at a likely atom) and extracts those strictly between: a rank between the counts
    is found by partitioning the few pooled values between, a rank on an atom at lo or hi (e.g. a ReLU's
    zeros) by the counts. (3) only for a rank still outside: the values < lo and <= hi are counted. (4) only
    when a bracket missed (never seen in practice): every value is pooled and partitioned. The answer is
    exact whatever the sample.
    """
    local = np.empty(0, dtype=np.float32) if values is None else values
    stride = _prime_at_least(max(1, local.size * parts // SAMPLE_SIZE))
    got = yield (int(finite), np.ascontiguousarray(local[::stride]), local.size)
    n = sum(f for f, _, _ in got)
    ranks = sorted({int(k) for k in ranks if 0 <= k < n})
    if not ranks:
        return {}
    pooled = np.concatenate([sample for _, sample, _ in got])
    pooled = pooled[~np.isnan(pooled)]
    if pooled.size == n:  # the samples were everything: they answer directly
        got = scan_kernel.select(pooled, ranks, n) if n > PARTITION_SMALL else None  # never the protocol again
        return {k: np.float32(v) for k, v in (got or _partitioned(pooled, ranks)).items()}
    groups = _brackets(pooled, n, ranks)
    # an edge the sample holds twice is probably an atom (e.g. a ReLU's zeros): count it in the same pass
    atoms = [(_repeated(pooled, lo), _repeated(pooled, hi)) for lo, hi, _ in groups]
    got = yield _scan(local, int(finite), [(lo, hi, a, b) for (lo, hi, _), (a, b) in zip(groups, atoms)])
    out: dict[int, float] = {}
    outside: list[tuple[int, int]] = []  # (group, rank) not strictly inside its bracket
    for g, (lo, hi, members) in enumerate(groups):
        le_lo, lt_hi, lt_lo, le_hi = (sum(part[g][0][i] for part in got) for i in range(4))
        inside = []
        for k in members:
            if le_lo <= k < lt_hi:
                inside.append(k)
            elif atoms[g][0] and lt_lo <= k < le_lo:
                out[k] = lo
            elif atoms[g][1] and lt_hi <= k < le_hi:
                out[k] = hi
            else:
                outside.append((g, k))
        if inside:
            mids = np.concatenate([part[g][1] for part in got])  # finite, the same in every process
            wanted = [k - le_lo for k in inside]
            # fewer than before: narrowing them again ends
            found = select_values(mids, wanted) if mids.size < n else _partitioned(mids, wanted)
            out.update((k + le_lo, v) for k, v in found.items())
    missed: list[int] = []
    if outside:  # on lo or hi (an atom, e.g. a ReLU's zeros), or outside the bracket: count the edges
        edges = sorted({g for g, _ in outside})
        got_edges = yield [_count_edges(local, groups[g][0], groups[g][1]) for g in edges]
        for g, k in outside:
            lo, hi, _ = groups[g]
            lt_lo, le_hi = (sum(part[edges.index(g)][i] for part in got_edges) for i in range(2))
            le_lo, lt_hi = (sum(part[g][0][i] for part in got) for i in range(2))
            if lt_lo <= k < le_lo:
                out[k] = lo
            elif lt_hi <= k < le_hi:
                out[k] = hi
            else:
                missed.append(k)
    if missed:
        got = yield local
        everything = np.concatenate(got)
        everything.partition(missed)
        out.update((k, everything[k]) for k in missed)
    return {k: np.float32(v) for k, v in out.items()}


def run_local(protocol) -> object:
    """Drive a protocol generator (e.g. `select_protocol`) in one process: every round's pool is its own
    part."""
    try:
        message = next(protocol)
        while True:
            message = protocol.send([message])
    except StopIteration as stop:
        return stop.value


def _brackets(pooled: np.ndarray, n: int, ranks: list[int]) -> list[tuple[np.float32, np.float32, list[int]]]:
    """`(lo, hi, ranks inside)` groups: each rank's bracket from the sample, overlapping ones
    joined."""
    return sample_brackets(pooled, [(k / max(n - 1, 1), k) for k in ranks])


def sample_brackets(
    sample: np.ndarray, items: list[tuple[float, Any]], width: float = 0.0
) -> list[tuple[np.float32, np.float32, list[Any]]]:
    """`(lo, hi, members)` groups from a sample (no NaN, in any order): around each `(fraction, member)` of
    `items` (by increasing fraction), `width` of the sample plus five standard deviations of its rank error
    (and 8) on each side; overlapping brackets joined, their members together. An empty sample brackets
    everything. The edges are the sample's order statistics at those positions (selected, not sorted)."""
    s = sample.size
    inf = np.float32(np.inf)
    if s == 0:
        return [(-inf, inf, [m for _, m in items])]
    spans = []
    for f, member in items:
        j = f * (s - 1)
        d = int(5.0 * math.sqrt(s * f * (1.0 - f)) + width * s) + 8
        spans.append((math.floor(j) - d, math.ceil(j) + d, member))
    kth = sorted({i for i_lo, i_hi, _ in spans for i in (i_lo, i_hi) if 0 <= i < s})
    at = select_values(sample, kth, s, keep=True)
    groups: list[list] = []
    for i_lo, i_hi, member in spans:
        lo = at[i_lo] if i_lo >= 0 else -inf
        hi = at[i_hi] if i_hi < s else inf
        if groups and lo <= groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], hi)
            groups[-1][2].append(member)
        else:
            groups.append([lo, hi, [member]])
    return [(np.float32(lo), np.float32(hi), members) for lo, hi, members in groups]


def _repeated(sample: np.ndarray, value: np.float32) -> bool:
    """Whether the sample (any order) holds `value` more than once: a probable atom."""
    if not np.isfinite(value):
        return False
    return int(np.count_nonzero(sample == value)) > 1


def _scan(
    values: np.ndarray, finite: int, brackets: list[tuple[np.float32, np.float32, bool, bool]]
) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """For each bracket `(lo, hi, count_lt_lo, count_le_hi)`: how many `values` (`finite` of them not NaN)
    are <= lo and < hi, and (when asked, else 0) < lo and <= hi (NaN counts nowhere); and the values
    strictly between lo and hi. One pass over `values` for all brackets (`scan_brackets`)."""
    out = []
    for (gt_lo, between, lt_lo, gt_hi), mids in scan_brackets(values, brackets):
        le_lo = finite - gt_lo
        le_hi = finite - gt_hi if brackets[len(out)][3] else 0
        out.append(((le_lo, le_lo + between, lt_lo, le_hi), mids))
    return out


def scan_brackets(
    values: np.ndarray,
    brackets: list[tuple[np.float32, np.float32, bool, bool]],
    bounds: tuple[float, float] | None = None,
    copy: bool = True,
) -> list[tuple[list[int], np.ndarray]]:
    """`_scan_part` over `values`: the compiled one-pass scan when there is one (`scan_kernel`, the same
    results), else numpy, split over threads from `_PARALLEL_SCAN` values (numpy releases the GIL; the pieces
    are whole chunks, so the values between come back in `values`' order). Not `copy`: the values between
    may be views valid until this thread's next scan."""
    got = scan_kernel.scan_brackets(values, brackets, copy)
    if got is not None:
        return got
    if values.size < _PARALLEL_SCAN or select_threads() < 2:
        return _scan_part(values, brackets, bounds)
    results = list(select_pool().map(lambda p: _scan_part(p, brackets, bounds), thread_pieces(values, _SCAN_CHUNK)))
    return [
        ([sum(r[b][0][i] for r in results) for i in range(4)], np.concatenate([r[b][1] for r in results]))
        for b in range(len(brackets))
    ]


def _scan_part(
    values: np.ndarray,
    brackets: list[tuple[np.float32, np.float32, bool, bool]],
    bounds: tuple[float, float] | None = None,
) -> list[tuple[list[int], np.ndarray]]:
    """Per bracket: counts of > lo, of lo < v < hi, of < lo (when asked) and of > hi (when asked), and the
    values in (lo, hi); chunk by chunk, so the chunk and its boolean masks stay in cache for every bracket.
    `bounds`: the values' min and max when every value is finite; comparisons they decide are skipped (a
    ReLU's output against an atom edge at 0 needs no `< 0` count)."""
    size = min(_SCAN_CHUNK, values.size)
    a, b = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    counts = [[0, 0, 0, 0] for _ in brackets]
    mids: list[list[np.ndarray]] = [[] for _ in brackets]
    mn, mx = bounds if bounds is not None else (math.nan, math.nan)  # NaN: decides nothing
    for start in range(0, values.size, _SCAN_CHUNK):
        chunk = values[start : start + _SCAN_CHUNK]
        m = chunk.size
        x, y = a[:m], b[:m]
        for (lo, hi, lt_lo, le_hi), c, got in zip(brackets, counts, mids):
            if lt_lo and not mn >= lo:
                np.less(chunk, lo, out=x)
                c[2] += int(np.count_nonzero(x))
            if le_hi and not mx <= hi:
                np.greater(chunk, hi, out=x)
                c[3] += int(np.count_nonzero(x))
            if mn > lo:  # all > lo: the values inside are those < hi
                c[0] += m
                if mx < hi:
                    got.append(chunk)
                else:
                    np.less(chunk, hi, out=x)
                    got.append(np.compress(x, chunk))
            else:
                np.greater(chunk, lo, out=x)
                c[0] += int(np.count_nonzero(x))
                if not mx < hi:
                    np.less(chunk, hi, out=y)
                    np.logical_and(x, y, out=x)
                got.append(np.compress(x, chunk))  # faster than chunk[x] when few are set
            c[1] += got[-1].size  # < hi: (> lo and < hi) here, <= lo added below
    empty = np.empty(0, dtype=np.float32)
    return [(c, np.concatenate(got) if got else empty) for c, got in zip(counts, mids)]


def _count_edges(values: np.ndarray, lo: np.float32, hi: np.float32) -> tuple[int, int]:
    """How many `values` are < lo and <= hi (NaN counts nowhere)."""
    lt_lo = le_hi = 0
    for start in range(0, values.size, _SCAN_CHUNK):
        chunk = values[start : start + _SCAN_CHUNK]
        lt_lo += int(np.count_nonzero(chunk < lo))
        le_hi += int(np.count_nonzero(chunk <= hi))
    return lt_lo, le_hi


def thread_pieces(values: np.ndarray, chunk: int) -> list[np.ndarray]:
    """`values` cut into one piece per select thread, each a whole number of `chunk`s (in order)."""
    step = -(-values.size // select_threads())
    step = -(-step // chunk) * chunk
    return [values[i : i + step] for i in range(0, values.size, step)]


def select_threads() -> int:
    return max(1, min(4, torch.get_num_threads()))


def select_pool():
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(max_workers=4, thread_name_prefix="ternqc-select"))
    return _POOL[0]


def _prime_at_least(n: int) -> int:
    """The smallest prime >= n (n >= 1; 1 for n = 1)."""
    if n <= 2:
        return max(1, n)
    candidate = n | 1
    while any(candidate % p == 0 for p in range(3, math.isqrt(candidate) + 1, 2)):
        candidate += 2
    return candidate


