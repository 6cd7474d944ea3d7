"""Signals for a `ternqc` process: SIGTERM becomes a clean stop like Ctrl-C, and a signal after the work is
done ends the process at once instead of printing a traceback from an exit handler.

- `install()`: SIGTERM (and SIGHUP) raise `Terminated`, a `KeyboardInterrupt`, so every `finally` and
  `except KeyboardInterrupt` that cleans up after Ctrl-C (temporary files, worker processes) runs for them
  too; `cli.main` reports it and exits 128 + the signal's number (143 for SIGTERM, 130 for SIGINT).
- `after_work(code)`: from here on SIGINT, SIGTERM and SIGHUP end the process with `128 + signal` without
  running the rest of the exit handlers (what was written is complete by then).
- `deferred()`: a context manager that holds SIGINT, SIGTERM and SIGHUP back while a commit (one rename and
  its clean-up) runs, and delivers them after it.

Only the command-line entry point installs these; `cli.main` called in-process leaves the handlers alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

_STOPPING = tuple(
    s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s
)


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM / SIGHUP handler; `signum` is the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def install() -> None:
    """SIGTERM and SIGHUP raise `Terminated` in the main thread (see the module docstring)."""
    for signum in _STOPPING[1:]:
        signal.signal(signum, _raise_terminated)


def _exit_now(signum: int, _frame: object) -> None:
    with contextlib.suppress(OSError):
        os.write(2, b"ternqc: interrupted while exiting\n")
    os._exit(128 + signum)


def after_work() -> None:
    """A stopping signal from now on ends the process at once with 128 + its number (see the docstring)."""
    for signum in _STOPPING:
        signal.signal(signum, _exit_now)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold the stopping signals back for the duration of the block (main thread, POSIX); they are delivered,
    and their handlers run, right after it."""
    if not hasattr(signal, "pthread_sigmask") or sys.platform == "win32":
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
