"""A process-wide pool of large float32 buffers (exact quantile values, staging, |x|).

Fresh memory is slow here (page faults), so released buffers are kept for the next calibration in the process.
In: a size (`take_buffer`) or a buffer (`give_back`). Out: a 1-D float32 array. The pool holds at most
`POOL_BYTES`, and a quantile budget that hands memory out trims it to what it has not handed out
(`trim_pool`): buffers kept for reuse count against the budget's limit like the buffers in use.
"""

from __future__ import annotations

import numpy as np

# Fresh memory is slow here (page faults; on this VM up to ~2 ms/MiB once the host has reclaimed freed
# pages), so released buffers are kept for the next calibration in the process, up to `POOL_BYTES`.
POOL_BYTES = 512 * 2**20
_POOL_MIN = 2**16  # smaller arrays come from the heap, which reuses its memory anyway
_FREE: list[np.ndarray] = []
_held = 0  # bytes in `_FREE`


def take_buffer(size: int) -> np.ndarray:
    """A 1-D float32 array of `size` values (contents undefined): the smallest pooled one that is large
    enough (and at most 4x larger), else a new one."""
    if size < _POOL_MIN:
        return np.empty(size, dtype=np.float32)
    fits = [b for b in _FREE if size <= b.size <= 4 * size]
    if not fits:
        return np.empty(size, dtype=np.float32)
    best = min(fits, key=lambda b: b.size)
    _drop(best)
    return best[:size]


def give_back(buf: np.ndarray) -> None:
    """Return a buffer from `take_buffer` (or any float32 array) to the pool."""
    base = buf
    while base.base is not None and isinstance(base.base, np.ndarray):
        base = base.base
    if base.size < _POOL_MIN or base.dtype != np.float32 or base.ndim != 1 or any(b is base for b in _FREE):
        return
    global _held
    _FREE.append(base)
    _held += base.nbytes
    trim_pool(POOL_BYTES)


def pooled_bytes() -> int:
    """Bytes the pool holds."""
    return _held


def trim_pool(max_bytes: int) -> None:
    """Free pooled buffers, the smallest first, until the pool holds at most `max_bytes`."""
    while _held > max_bytes:
        _drop(min(_FREE, key=lambda b: b.size))


def _drop(buf: np.ndarray) -> None:
    global _held
    del _FREE[next(i for i, b in enumerate(_FREE) if b is buf)]
    _held -= buf.nbytes


def clear_pool() -> None:
    """Free the pooled buffers."""
    global _held
    _FREE.clear()
    _held = 0
