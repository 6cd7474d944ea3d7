"""Progress bars for long work (training epochs, calibration batches), written to stderr.

`progress(iterable, total=None, desc="", enabled=True)` yields the items of `iterable` and redraws one line
`desc: 37/64 [=====>    ] 58% 1.2s` at most ten times a second. On a terminal the line is redrawn in place;
when stderr is not a terminal (CI, a log file) only the final line is written, so logs stay readable.
Disabled bars cost nothing beyond the loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_BAR_WIDTH = 24
_REDRAW_SECONDS = 0.1


def _line(desc: str, done: int, total: int | None, elapsed: float) -> str:
    if total:
        filled = min(_BAR_WIDTH, done * _BAR_WIDTH // total)
        bar = "=" * filled + (">" if filled < _BAR_WIDTH else "") + " " * (_BAR_WIDTH - filled - 1)
        return f"{desc}: {done}/{total} [{bar[:_BAR_WIDTH]}] {100 * done // total:3d}% {elapsed:.1f}s"
    return f"{desc}: {done} {elapsed:.1f}s"


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True, stream=None
) -> Iterator[T]:
    """Yield from `iterable`, drawing a progress line on `stream` (default stderr) when `enabled`."""
    if not enabled:
        yield from iterable
        return
    stream = stream or sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    interactive = getattr(stream, "isatty", lambda: False)()
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if interactive and now - last >= _REDRAW_SECONDS:
            stream.write("\r" + _line(desc, done, total, now - start))
            stream.flush()
            last = now
    end = "\r" if interactive else ""
    stream.write(end + _line(desc, done, total, time.perf_counter() - start) + "\n")
    stream.flush()
