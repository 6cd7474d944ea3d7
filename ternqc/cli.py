"""The `ternqc` command line: argparse subcommands, flat dispatch through `commands.COMMANDS`.

`main(argv) -> int`: 0 success, 1 a user-facing failure (one message, no traceback), 2 usage errors,
130 on Ctrl-C (143 on SIGTERM). `compile` imports only the compiler (never torch); the other commands
import the runtime inside their handlers. `entry()` is the installed `ternqc` script: `main` with the
process's signal handling (`signals`) around it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from ternqc import allocator, signals
from ternqc.commands import COMMANDS
from ternqc.parser import build_parser

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null: its reader went away (`| head -1`), and Python's flush at exit would
    otherwise raise BrokenPipeError again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    from ternqc.compiler import CompileError
    from ternqc.options import check_options, check_outputs, notes
    from ternqc.runtime.errors import UserError

    try:
        check_options(args)
        check_outputs(args)
        for note in notes(args):
            print(f"ternqc: note: {note}", file=sys.stderr)
        status = COMMANDS[args.command](args)
        sys.stdout.flush()
        return status
    except CompileError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_FAILURE
    except UserError as exc:
        print(f"ternqc: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # the reader of stdout stopped reading: not worth a message
        _silence_stdout()
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        print(f"ternqc: {'terminated' if isinstance(exc, signals.Terminated) else 'interrupted'}", file=sys.stderr)
        return signals.exit_code(exc)


def entry() -> None:
    """The `ternqc` script: SIGTERM stops like Ctrl-C, then `main`; once it returns, a late signal ends the
    process at once (no traceback from an exit handler)."""
    signals.install()
    allocator.keep_freed_memory()  # the forwards of calibration, training and evaluation reuse freed memory
    try:
        code = main()
    except KeyboardInterrupt as exc:  # before main's own handler is in place (imports, argument parsing)
        print("ternqc: interrupted", file=sys.stderr)
        code = signals.exit_code(exc)
    except BrokenPipeError:
        _silence_stdout()
        code = EXIT_FAILURE
    signals.after_work()
    raise SystemExit(code)
