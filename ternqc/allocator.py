"""The C allocator of a `ternqc` process: freed memory kept for the next forward instead of mapped afresh.

glibc maps a block at or above its mmap threshold on its own and hands it back to the system when it is freed,
so the next block of that size is fresh pages, each faulted in on first touch (~1.5-3 µs a page on the
machines measured). The threshold starts at 128 KiB, moves as blocks are freed, and cannot be set above
32 MiB; a block above it still comes from the heap when the top of the heap has room, which depends on the
order of every allocation in the process. Measured on a 4-layer `nn.TransformerEncoder` (16 batches of
32 × 128 tokens, 32 MiB feed-forward tensors): with glibc's defaults the forward with empty hooks faulted
~65k pages a batch and the same forward inside a calibration ~100k; with the threshold fixed at 32 MiB (this
module's first setting) the same forward faulted 0 to 940k pages over the 16 batches from one run to the
next (~1 s of a 6-7 s pass, in the plain forward, the forward with empty hooks and the calibration alike).

`keep_freed_memory()` turns glibc's own mappings off (M_MMAP_MAX 0: every block comes from the heap, and a
freed block is reused by the next one that fits) and keeps up to 256 MiB freed at the top of the heap before
returning it (M_TRIM_THRESHOLD): the transformer's forwards then fault nothing after the first. The cost: up
to 256 MiB stays resident after it is freed, and freed memory below a live block stays resident until it is
reused (a mapped block went back to the system when freed). The `ternqc` command calls it at start; library
callers choose (it changes the whole process). `TERNQC_MALLOC=0` leaves the allocator alone. Elsewhere than
glibc it does nothing.

In: nothing. Out: whether the settings were made.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's `mallopt` parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: how many blocks glibc may map on their own: none (every block from the heap, reused once freed)
MMAP_MAX = 0
#: freed memory at the top of the heap kept before any is returned to the system
TRIM_THRESHOLD = 256 * 2**20


def keep_freed_memory() -> bool:
    """Turn glibc's mappings off and fix its trim threshold (see the module doc); False where nothing was
    changed (not glibc, or `TERNQC_MALLOC=0`)."""
    if os.environ.get("TERNQC_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library (no `find_library`: it runs ldconfig)
    except (OSError, AttributeError):  # another C library (musl has no mallopt to speak of)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
