"""`old_objects_frozen()`: the garbage collector leaves the objects that existed before a calibration alone
while it runs.

A calibration allocates many small objects per batch; every few calibrations that triggers a full collection,
which walks every object of the process: with torch imported ~170k of them, ~110 ms on the reference machine (a
tenth of the MLP benchmark's calibration, at random batches). Frozen (`gc.freeze`), the objects from before are
not walked; what the calibration makes is still collected as usual (cycles included), and they are unfrozen at
the end. A process that froze objects itself is left as it is.

In: nothing. Out: a context manager.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def old_objects_frozen() -> Iterator[None]:
    """Inside the block, full collections skip the objects that existed before it (unless the process already
    froze some itself: then nothing changes)."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
