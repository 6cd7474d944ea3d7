"""The compiled one-pass scans (`native/scan.c`), when the install could build them; None otherwise.

In: float32 numpy rows. Out: exactly what the numpy scans they stand in for return (`quantiles._scan_part`,
`threshold_state._scan_piece`, `sums.lane_sums`): the same counts and the same values in the same order, the
same per-row sums (one fixed order, `sums.lane_sums`); the float64 sum of the values above a cut in another
order, which gives the same bits wherever it is used (only where it is exact).

`pip install` builds the library as an optional extension (`pyproject.toml`): without a C compiler the
install still succeeds and every scan runs in numpy, slower, with the same results. `TERNQC_NATIVE=0` turns
the library off; `LANES` is the vector width in use (16, 8 or 4 floats; `use_lanes` lowers it, for tests).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
import os
import struct
import threading
from pathlib import Path

import numpy as np

#: The calling convention expected of the library (`ternqc_scan_abi` in `native/scan.c`).
ABI = 6
#: Values a scan may keep per call at least (the scratch buffers, per thread): one that keeps more is called again.
SCRATCH = 2**16
#: At most this many values in an output buffer of a bracket or band scan, grown on demand and kept per thread
#: (each further call for a scan that keeps more costs a Python round trip and a copy).
BAND_SCRATCH = 2**20
#: Lanes of the fixed-order sums (`SUM_LANES` in `native/scan.c`, `sums.lane_sums`).
SUM_LANES = 32
#: A thread's result cells (`_Scratch.cells`): 4 counts, kept, the lanes (skipped) and their total, min, max.
_RESULTS = struct.Struct(f"<4qq{8 * SUM_LANES}xd2f")
#: The same cells after a band scan (`scan_band_into`): the count above the cut and the values kept (the first two
#: count cells), the float64 sum and the max above the cut (the next two), then as in `_RESULTS`.
_BAND_RESULTS = struct.Struct(f"<qqdf4x8x{8 * SUM_LANES}xd2f")

_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library and, without one, why not."""
    if os.environ.get("TERNQC_NATIVE", "1") == "0":
        return None, "TERNQC_NATIVE=0"
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_scan{suffix}"
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
                lib.ternqc_scan_abi.restype = _I32
                if lib.ternqc_scan_abi() != ABI:
                    return None, "the compiled scans are from another version: reinstall"
            except (OSError, AttributeError):  # not loadable, or built from another version of scan.c
                return None, "the compiled scans do not load: reinstall"
            lib.ternqc_scan_lanes.restype = _I32
            lib.ternqc_scan_lanes.argtypes = []
            lib.ternqc_scan_bracket.restype = _I64
            lib.ternqc_scan_bracket.argtypes = [_I32, _P, _I64, _F, _F, _I32, _P, _P, _I64, _P, _P, _P]
            lib.ternqc_scan_row.restype = _I64
            lib.ternqc_scan_row.argtypes = [_I32, _P, _I64, _F, _F, _I32, _P, _P, _P, _P, _I64, _P, _P]
            lib.ternqc_row_sums.restype = _I64
            lib.ternqc_row_sums.argtypes = [_I32, _P, _I64, _I64, _I32, _P, _P]
            lib.ternqc_select.restype = _I32
            lib.ternqc_select.argtypes = [_I32, _P, _I64, _I64, _P, _I64, _P]
            lib.ternqc_row_sums_select.restype = _I32
            lib.ternqc_row_sums_select.argtypes = [_I32, _P, _I64, _I64, _I32, _P, _P, _P, _I64, _P]
            return lib, ""
    return None, "the compiled scans are not built"


_LIB, _WHY_NOT = _load()
#: The vector width the scans run at (0: no library).
LANES = _LIB.ternqc_scan_lanes() if _LIB is not None else 0
_local = threading.local()


def available() -> bool:
    return _LIB is not None


_ISA = {16: "AVX-512", 8: "AVX2"}


def describe() -> str:
    """How the scans run now, for people (report.json's `run.calibration.scans`)."""
    if _LIB is None:
        return f"numpy ({_WHY_NOT or 'the compiled scans are turned off here'})"
    isa = _ISA.get(LANES)
    return f"compiled, {LANES} floats a vector" + (f" ({isa})" if isa else "")


def use_lanes(lanes: int) -> int:
    """Run the scans at `lanes` floats a vector (at most what the CPU has); returns the previous width."""
    global LANES
    previous = LANES
    if _LIB is not None:
        LANES = min(int(lanes), _LIB.ternqc_scan_lanes())
    return previous


#: Ranks one `select` call takes at most (more are selected in several calls).
_SELECT_RANKS = 64


class _Scratch:
    """Per-thread output buffers and result cells (the scans run in the selection threads too). `outs[i]`:
    output buffer i (a scan's bracket i, or the probe's shared pass), made on first use and kept: the values a
    scan keeps can then be handed out as views where the caller copies them at once, without a new array per
    call (in a hook, between the forward's layers, every such operation meets cold caches)."""

    def __init__(self) -> None:
        self.size = SCRATCH  # the output buffers' size when made (a test may change SCRATCH)
        self.outs: list[np.ndarray] = []
        self.out_ptrs: list[int] = []
        # the counts, kept, lanes and min/max cells in one block, in `_RESULTS`' layout: a scan's results are read
        # back in one unpack (`scan_bracket_into`; in a hook every further read meets cold caches)
        self.cells = np.zeros(_RESULTS.size, dtype=np.uint8)
        self.cells_view = memoryview(self.cells)
        self.counts = self.cells[0:32].view(np.int64)
        self.kept = self.cells[32:40].view(np.int64)
        self.acc = np.zeros(2, dtype=np.int64)
        self.sum = np.zeros(1, dtype=np.float64)
        self.top = np.zeros(1, dtype=np.float32)
        self.lanes = self.cells[40 : 48 + 8 * SUM_LANES].view(np.float64)  # the lanes, then their total
        self.mm = self.cells[48 + 8 * SUM_LANES : 56 + 8 * SUM_LANES].view(np.float32)
        self.sums = np.zeros(64, dtype=np.float64)  # row_sums's per-row sums (grown when more rows come)
        self.ranks = np.zeros(_SELECT_RANKS, dtype=np.int64)  # select's ranks and their values
        self.values = np.zeros(_SELECT_RANKS, dtype=np.float32)
        names = ("counts", "acc", "kept", "sum", "top", "mm", "lanes", "sums", "ranks", "values")
        self.ptr = {name: getattr(self, name).ctypes.data for name in names}
        cells = self.ptr["counts"]  # a band scan's results in the count cells (`_BAND_RESULTS`)
        self.ptr.update(band_acc=cells, band_sum=cells + 16, band_top=cells + 24)

    def out(self, i: int, size: int = 0) -> tuple[np.ndarray, int]:
        """Output buffer `i` (at least `size` values, grown when smaller: kept for the next scans) and its
        address."""
        while len(self.outs) <= i:
            self.outs.append(np.empty(self.size, dtype=np.float32))
            self.out_ptrs.append(self.outs[-1].ctypes.data)
        if self.outs[i].size < size:
            self.outs[i] = np.empty(size, dtype=np.float32)
            self.out_ptrs[i] = self.outs[i].ctypes.data
        return self.outs[i], self.out_ptrs[i]


def _scratch() -> _Scratch:
    s = getattr(_local, "scratch", None)
    if s is None or s.size != SCRATCH:
        s = _local.scratch = _Scratch()
    return s


#: `_Scratch.out` index of the probe's shared pass (a scan's brackets use 0, 1, ...: two per quantile at most).
_SHARED = 7


def _until_done(n: int, step, out: np.ndarray, copy: bool) -> np.ndarray:
    """Call `step(done)` until all `n` values are scanned: each call scans from value `done` into `out` and
    returns how many values it scanned and how many it kept (a call stops early when `out` could fill). Returns
    the kept values of every call, in order: a view of `out` when one call kept them all and not `copy` (valid
    until the next scan into `out` in this thread), else a new array."""
    pieces, done = [], 0
    while True:
        scanned, kept = step(done)
        done += scanned
        if done >= n and not pieces and not copy:
            return out[:kept]
        pieces.append(out[:kept].copy())
        if done >= n:
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _usable(values: np.ndarray) -> bool:
    return _LIB is not None and values.dtype == np.float32 and values.ndim == 1 and values.flags.c_contiguous


def scan_brackets(
    values: np.ndarray, brackets: list[tuple[np.float32, np.float32, bool, bool]], copy: bool = True
) -> list[tuple[list[int], np.ndarray]] | None:
    """Per bracket `(lo, hi, count < lo, count > hi)` with lo < hi: `[#(> lo), #(lo < v < hi), #(< lo) or 0,
    #(> hi) or 0]` and the values strictly between, in order (NaN counts nowhere); None without the library
    or for values it does not take (not 1-D contiguous float32). Not `copy`: the values between may be views
    of this thread's buffers, valid until its next scan (consume them at once)."""
    if not _usable(values):
        return None
    return _brackets(values, brackets, 0, copy)[0]


def scan_brackets_with_sums(
    values: np.ndarray | None, brackets: list[tuple[np.float32, np.float32, bool, bool]], absolute: bool,
    address: int | None = None, size: int | None = None,
) -> tuple[list[tuple[list[int], np.ndarray]], tuple[float, float, float, bool]] | None:
    """`scan_brackets(copy=False)`, and in the same pass over `values` as one row what `row_sums` gives: the
    fixed-order sum of the values (of their magnitudes with `absolute`), their min and max (NaN left out) and
    whether any is NaN or +-Inf. The values between are views valid until this thread's next such scan. None
    where `scan_brackets` is None or without a bracket. `values` None: the `size` float32 values at `address`
    (a contiguous CPU float32 tensor's `data_ptr()` and `numel()`: a numpy view of it costs ~25 µs in a hook,
    where caches are cold, and numpy's `.ctypes` ~50 µs)."""
    if not brackets or not (_usable(values) if values is not None else _LIB is not None and address):
        return None
    return _brackets(values, brackets, 8 if absolute else 4, False, address, size)


def _brackets(values, brackets, sums: int, copy: bool, address: int | None = None, size: int | None = None):
    """The scans of `scan_brackets`; `sums` (4: the values, 8: their magnitudes, 0: none) rides on the first.
    Bracket i keeps its values in output buffer i (the shared pass's in its own buffers). Lean: it runs in a
    hook, between the forward's layers, where every Python operation meets cold caches. `values` None: `size`
    values at `address`."""
    s, n = _scratch(), values.size if values is not None else size
    base = values.ctypes.data if address is None else address
    first = _SHARED if sums else 0
    ptr = s.ptr
    out = []
    for i, (lo, hi, lt_lo, gt_hi) in enumerate(brackets):
        # 16: counts from zero; 32 (the first bracket, with sums): the sums from +0 and min/max afresh
        flags = _bracket_flags(lt_lo, gt_hi, sums, fresh=True)
        buffer, at = s.out(first + i, min(n // 16, BAND_SCRATCH))  # brackets keep ~0.5-6% of a tensor

        def step(done: int, lo=float(lo), hi=float(hi), at=at, cap=buffer.size) -> tuple[int, int]:
            nonlocal flags
            scanned = _LIB.ternqc_scan_bracket(
                LANES, base + 4 * done, n - done, lo, hi, flags, ptr["counts"], at, cap, ptr["kept"],
                ptr["lanes"], ptr["mm"],
            )
            flags &= ~(16 | 32)  # a further call continues the same scan
            return scanned, int(s.kept[0])

        mids = _until_done(n, step, buffer, copy)
        out.append((s.counts.tolist(), mids))
        sums = 0
    return out, _shared_sums(s) if first else None


def _bracket_flags(lt_lo: bool, gt_hi: bool, sums: int, fresh: bool) -> int:
    """`ternqc_scan_bracket`'s flags: 1 count < lo, 2 count > hi, `sums` (4 the values, 8 their magnitudes);
    `fresh`: 16 counts from zero, 32 (with sums) the sums from +0 and min/max afresh."""
    return (1 if lt_lo else 0) | (2 if gt_hi else 0) | sums | ((16 | (32 if sums else 0)) if fresh else 0)


def scan_bracket_into(
    address: int, n: int, lo: float, hi: float, lt_lo: bool, gt_hi: bool, sums: int, fresh: bool, dst: int, cap: int
) -> tuple:
    """One call of the compiled bracket scan over the `n` float32 values at `address` (a contiguous CPU float32
    tensor's `data_ptr()`, or an offset into it), writing the values strictly between `lo` and `hi` (`lo` < `hi`)
    in order to the float32 room at `dst` (`cap` >= 128 values: a `Bracket` group's own buffer, no copy).
    `sums` 4 or 8: the same pass continues the fixed-order sums of the values (8: of their magnitudes) and
    their min and max, as `scan_brackets_with_sums` does. `fresh`: counts (and sums) from zero, else they go on
    from the previous call in this thread. Returns `(scanned, #(> lo), #(lo < v < hi), #(< lo) or 0, #(> hi) or 0,
    kept, sum, min, max)`: fewer than `n` scanned when the room could fill (call again from there, not
    `fresh`); the counts, sum, min and max over every call since the last fresh one, `kept` of this call (sum,
    min and max only with `sums`; a sum that is not finite means a NaN or +-Inf: nothing of the pass is to be
    used). The library must be loaded (`available()`)."""
    s = _scratch()
    ptr = s.ptr
    flags = _bracket_flags(lt_lo, gt_hi, sums, fresh)
    scanned = _LIB.ternqc_scan_bracket(
        LANES, address, n, lo, hi, flags, ptr["counts"], dst, cap, ptr["kept"], ptr["lanes"], ptr["mm"]
    )
    return (scanned, *_RESULTS.unpack_from(s.cells_view))


def scan_band_into(
    address: int, n: int, cut: float, lo: float, sums: int, fresh: bool, dst: int, cap: int
) -> tuple:
    """One call of the compiled band scan over the magnitudes of the `n` float32 values at `address` (as in
    `scan_bracket_into`), writing those in (`lo`, `cut`] in order to the float32 room at `dst` (`cap` >= 128
    values: the band's own buffer, no copy). `sums` 4 or 8: the same pass continues the fixed-order sums of the
    values (8: of their magnitudes) and the min and max of the values, as `scan_band_with_sums` does; `fresh`
    starts them afresh, else they go on from the previous call in this thread. Returns `(scanned, count above
    the cut, kept, their float64 sum above the cut, their max above the cut (0 with none), sum, min, max)`:
    fewer than `n` scanned when the room could fill (call again from there, not `fresh`); the count, sum and max
    above the cut and `kept` of this call, the sums, min and max over every call since the last fresh one (a sum
    that is not finite means a NaN or +-Inf: nothing of the pass is to be used). The library must be loaded."""
    s = _scratch()
    ptr = s.ptr
    flags = 1 | 2 | sums | (32 if sums and fresh else 0)  # keep, magnitudes, sums (from +0 when fresh)
    scanned = _LIB.ternqc_scan_row(
        LANES, address, n, cut, lo, flags, ptr["band_acc"], ptr["band_sum"], ptr["band_top"], dst, cap,
        ptr["lanes"], ptr["mm"],
    )
    return (scanned, *_BAND_RESULTS.unpack_from(s.cells_view))


def _shared_sums(s: _Scratch) -> tuple[float, float, float, bool]:
    """What a scan that summed along adds: the fixed-order sum (the lanes added in order from +0, by the
    library), the min and max, and whether a value was NaN or +-Inf."""
    total = float(s.lanes[SUM_LANES])
    mn, mx = s.mm.tolist()
    return total, mn, mx, not math.isfinite(total)


def scan_row(row: np.ndarray, cut: np.float32, lo: np.float32 | None = None) -> tuple[int, float, float, np.ndarray] | None:
    """Over `row` (1-D float32, finite, >= 0): how many values are > `cut`, their float64 sum (exact while
    `row.size × max < exact_bound(cut)`), their max (0 with none), and with `lo` the values in (lo, cut], in
    order; None without the library or for a row it does not take."""
    if not _usable(row) or (lo is not None and not lo < cut):  # the numpy scan's (cut, lo] when lo > cut
        return None
    return _row(row, cut, lo, 0, 0, None, True)[:4]


def scan_band_with_sums(
    values: np.ndarray | None, cut: np.float32, lo: np.float32, absolute: bool, address: int | None = None,
    size: int | None = None,
) -> tuple[tuple[int, float, float, np.ndarray], tuple[float, float, float, bool]] | None:
    """`scan_row(|values|, cut, lo)` (the α band's scan, on the magnitudes of `values`, 1-D float32) and, as in
    `scan_brackets_with_sums`, what the same pass adds: the fixed-order sum of the values (of their magnitudes
    with `absolute`), their min and max and whether any is NaN or +-Inf (then nothing else is to be used). The
    values in (lo, cut] are a view valid until this thread's next such scan. None where `scan_row` is None.
    `values` None: the `size` float32 values at `address`, as in `scan_brackets_with_sums`."""
    if not lo < cut or not (_usable(values) if values is not None else _LIB is not None and address):
        return None
    *band, sums = _row(values, cut, lo, 2, 8 if absolute else 4, address, False, size)
    return tuple(band), sums


def _row(row, cut, lo, magnitudes: int, sums: int, address: int | None, copy: bool, size: int | None = None):
    """The calls of `scan_row` (`magnitudes`: 2 to scan |row|; `sums`: 4 or 8 to sum along, see the C);
    `row` None: `size` values at `address`."""
    s, n = _scratch(), row.size if row is not None else size
    base = row.ctypes.data if address is None else address
    keep = lo is not None
    # a band keeps a few % of a row: room for an eighth of it in one buffer, so that one call scans it all (each
    # further call costs a Python round trip and a copy: 8.4M values keeping 6% took 5.8 ms instead of 2.5)
    out, at = s.out(_SHARED if sums else 0, min(n // 8, BAND_SCRATCH) if keep else 0)
    cap = out.size
    ptr = s.ptr
    found = [0, 0.0, 0.0]  # count, sum and max above the cut, over every call
    flags = int(keep) | magnitudes | sums | (32 if sums else 0)
    cut, lo = float(cut), float(lo) if keep else 0.0

    def step(done: int) -> tuple[int, int]:
        nonlocal flags
        scanned = _LIB.ternqc_scan_row(
            LANES, base + 4 * done, n - done, cut, lo, flags, ptr["acc"], ptr["sum"], ptr["top"], at, cap,
            ptr["lanes"], ptr["mm"],
        )
        flags &= ~32  # the rest of the same row
        acc = s.acc.tolist()
        found[0] += acc[0]
        found[1] += float(s.sum[0])
        found[2] = max(found[2], float(s.top[0]))
        return scanned, acc[1] if keep else 0

    between = _until_done(n, step, out, copy)
    return found[0], found[1], found[2], between, _shared_sums(s) if sums else None


def _sums_room(k: int) -> _Scratch:
    """This thread's scratch, its per-row sums grown to `k` rows when fewer."""
    s = _scratch()
    if k > s.sums.size:
        s.sums = np.empty(k, dtype=np.float64)
        s.ptr["sums"] = s.sums.ctypes.data
    return s


def row_sums(
    rows: np.ndarray | None, absolute: bool, address: int | None = None, shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, float, float, bool] | None:
    """One pass over `rows` (`[K, n]` float32, C-contiguous): per row the float64 sum of the values (of their
    magnitudes with `absolute`) in `sums.lane_sums`'s order, the min and max of the values that are not NaN,
    and whether any value is NaN or +-Inf (the sums and min/max are then not to be used); None without the
    library or for an array it does not take. `rows` None: the `[K, n]` = `shape` float32 values at `address`
    (a contiguous CPU float32 tensor's `data_ptr()`: numpy's views and `.ctypes` are slow where caches are
    cold)."""
    if rows is not None:
        if rows.dtype != np.float32 or rows.ndim != 2 or not rows.flags.c_contiguous:
            return None
        address, shape = rows.ctypes.data, rows.shape
    if _LIB is None or not address:
        return None
    s = _sums_room(shape[0])
    k, n = shape
    bad = _LIB.ternqc_row_sums(LANES, address, k, n, int(absolute), s.ptr["sums"], s.ptr["mm"])
    mn, mx = s.mm.tolist()
    return s.sums[:k].copy(), mn, mx, bool(bad)


def row_sums_select(
    absolute: bool, address: int, shape: tuple[int, int], ranks: list[int]
) -> tuple[np.ndarray, float, float, bool, dict[int, np.float32] | None] | None:
    """`row_sums` of the `[K, n]` = `shape` float32 values at `address` (a contiguous CPU float32 tensor's
    `data_ptr()`) and, in the same pass, `{rank: value}` for the 0-based ascending `ranks` (at most 64, each
    < K·n) among all of them, exactly as `select` gives them: the pass that reads the values for the sums also
    counts them against a bracket from a sample and keeps those inside (one read of a block instead of two).
    The dict is None when a value is NaN or +-Inf (the ranks then count other values: select them again).
    None without the library or when it could not allocate its buffers."""
    if _LIB is None or not address or not ranks or len(ranks) > _SELECT_RANKS:
        return None
    s = _sums_room(shape[0])
    k, n = shape
    s.ranks[: len(ranks)] = ranks
    rc = _LIB.ternqc_row_sums_select(
        LANES, address, k, n, int(absolute), s.ptr["sums"], s.ptr["mm"], s.ptr["ranks"], len(ranks), s.ptr["values"]
    )
    if rc < 0:
        return None
    mn, mx = s.mm.tolist()
    found = None if rc else dict(zip(ranks, (np.float32(v) for v in s.values[: len(ranks)].tolist())))
    return s.sums[:k].copy(), mn, mx, bool(rc), found


def select(values: np.ndarray, ranks: list[int], finite: int) -> dict[int, np.float32] | None:
    """`{rank: value}` for the 0-based `ranks` (each < `finite`) among the `finite` values of `values` (1-D
    float32, NaN = left out, only read) that are not NaN, exactly: brackets from samples and one branch-free
    counting pass each (`ternqc_select`). None without the library, for values it does not take, or when it
    could not allocate its buffers."""
    if not ranks or not _usable(values):
        return None
    s = _scratch()
    wanted = sorted(set(ranks))
    address = values.__array_interface__["data"][0]
    found: dict[int, np.float32] = {}
    for start in range(0, len(wanted), _SELECT_RANKS):
        part = wanted[start : start + _SELECT_RANKS]
        s.ranks[: len(part)] = part
        if _LIB.ternqc_select(LANES, address, values.size, finite, s.ptr["ranks"], len(part), s.ptr["values"]):
            return None
        found.update(zip(part, s.values[: len(part)].tolist()))
    return {k: np.float32(found[k]) for k in ranks}


class numpy_scans:
    """`with numpy_scans():` runs the scans in numpy inside the block (benchmarks compare the two)."""

    def __enter__(self) -> numpy_scans:
        global _LIB
        self._lib, _LIB = _LIB, None
        return self

    def __exit__(self, *exc) -> None:
        global _LIB
        _LIB = self._lib
