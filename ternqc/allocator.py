"""The C allocator of a `ternqc` process: freed memory kept for the next forward instead of mapped afresh.

glibc hands a freed block at or above its mmap threshold back to the system, and the next block of that size
is fresh pages, each faulted in on first touch (~1.5-3 µs a page on the machines measured). The threshold
starts at 128 KiB and rises as blocks are freed, and where it settles depends on the order of every
allocation in the process. Measured on a 4-layer `nn.TransformerEncoder` (16 batches of 32 × 128 tokens): the
forward with empty hooks page-faulted ~65k times a batch, the same forward inside a calibration ~100k (the
statistics' own small allocations between the layers' leave glibc in another state), which was most of what
the calibration cost beyond the forward. With the thresholds fixed, both forwards fault ~32k times a batch
(only the 32 MiB feed-forward tensors, above any threshold glibc allows, are mapped afresh).

`keep_freed_memory()` fixes glibc's mmap threshold at its largest (32 MiB: smaller blocks come from the heap
and are reused) and keeps up to 256 MiB freed at the top of the heap before returning it. The cost: up to
that much memory stays resident after it is freed. The `ternqc` command calls it at start; library callers
choose (it changes the whole process). `TERNQC_MALLOC=0` leaves the allocator alone. Elsewhere than glibc it
does nothing.

In: nothing. Out: whether the settings were made.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's `mallopt` parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX); larger values are refused
MMAP_THRESHOLD = 32 * 2**20
#: freed memory at the top of the heap kept before any is returned to the system
TRIM_THRESHOLD = 256 * 2**20


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds (see the module doc); False where nothing was changed (not glibc, or
    `TERNQC_MALLOC=0`)."""
    if os.environ.get("TERNQC_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library (no `find_library`: it runs ldconfig)
    except (OSError, AttributeError):  # another C library (musl has no mallopt to speak of)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
