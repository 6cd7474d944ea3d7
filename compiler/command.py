"""`ternqc compile RULES.tq [-o plan.json]`: compile, print a summary, write the plan.

stdout: the summary (what is profiled where, which parameters are bound for which selectors, which
statistics the compiler added and why). stderr: warnings, or the errors. Exit 0 when the rules compile,
1 when they do not or a file cannot be read or written. No file content ever causes a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from ternqc.compiler import CompileError, compile_file, parse_sets
from ternqc.compiler.summary import summarize


def run_compile(
    rules_path: str,
    output_path: str | None,
    *,
    sets: Sequence[str] = (),
    model: str | None = None,
    ckpt: str | None = None,
    explain: bool = False,
) -> int:
    """Compile `rules_path` (with `--set` overrides); write the plan as JSON to `output_path` when given;
    with `model`, check the rules against that model (`ternqc.runtime.rules_check`, which imports torch).
    Returns the exit code."""
    try:
        compiled = compile_file(rules_path, parse_sets(sets))
    except CompileError as exc:
        print(exc.render(), file=sys.stderr)
        n = len(exc.diagnostics)
        count = f"{n} {'error' if n == 1 else 'errors'}"
        print(f"ternqc: {rules_path}: {count}, nothing compiled", file=sys.stderr)
        return 1
    for warning in compiled.warnings:
        print(warning.render(), file=sys.stderr)
    print(summarize(compiled.plan))
    if output_path:
        try:
            with open(output_path, "w", encoding="utf-8") as f:
                f.write(compiled.plan.to_json())
        except OSError as exc:
            msg = f"ternqc: error: cannot write plan to {output_path}: {exc.strerror or exc}"
            print(msg, file=sys.stderr)
            return 1
        print(f"wrote plan to {os.fspath(output_path)}")
    if model is not None:
        from ternqc.runtime.errors import UserError
        from ternqc.runtime.rules_check import check_against_model

        try:
            report = check_against_model(compiled.plan, model, ckpt=ckpt, explain=explain)
        except UserError as exc:
            print(f"ternqc: error: {exc}", file=sys.stderr)
            return 1
        print(report.text)
        for line in report.warnings:
            print(f"ternqc: warning: {line}", file=sys.stderr)
        for line in report.errors:
            print(f"ternqc: error: {line}", file=sys.stderr)
        return 1 if report.errors else 0
    return 0
