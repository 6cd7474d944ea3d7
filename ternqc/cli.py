"""The `ternqc` command line: argparse subcommands, flat dispatch through `commands.COMMANDS`.

`main(argv) -> int`: 0 success, 1 a user-facing failure (one message, no traceback), 2 usage errors,
130 on Ctrl-C. `compile` imports only the compiler (never torch); the other commands import the runtime
inside their handlers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ternqc.commands import COMMANDS
from ternqc.parser import build_parser

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    from ternqc.compiler import CompileError
    from ternqc.runtime.errors import UserError

    try:
        return COMMANDS[args.command](args)
    except CompileError as exc:
        print(exc.render(), file=sys.stderr)
        return EXIT_FAILURE
    except UserError as exc:
        print(f"ternqc: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("ternqc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
