"""`ternqc sweep --rules R.tq --set k=0.5,0.6,0.7 [--set m=...] --out DIR`: the CLI half of a sweep.

In: the parsed arguments. Out: one plan per combination of the `--set` values (compiled through
`compile_with_sets`, the one seam to the language's `let` / `--set` overrides), handed to
`runtime.run.sweep` (one calibration, then map → convert → evaluate per combination); the table on stdout,
and `sweep.csv`, `sweep.json`, `sweep.html` in DIR.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import sys
from typing import Any

from ternqc.plan import Plan


def split_values(text: str) -> list[str]:
    """`"0.5,0.6, 0.7"` → `["0.5", "0.6", "0.7"]`: commas inside double quotes, brackets or parentheses do
    not split."""
    out, depth, quoted, current = [], 0, False, []
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "([":
            depth += 1
        elif not quoted and ch in ")]":
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            out.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    out.append("".join(current).strip())
    return out


def parse_set_options(items: list[str]) -> dict[str, list[str]]:
    """`["k=0.5,0.6", "m=1"]` → `{"k": ["0.5", "0.6"], "m": ["1"]}` (values as written, in order).

    Raises:
        UserError: an item is not NAME=V1,V2,..., a value is empty, or a name is given twice.
    """
    from ternqc.runtime.errors import UserError

    swept: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        parts = split_values(values) if sep else []
        if not sep or not name.isidentifier() or not parts or any(not p for p in parts):
            msg = f"--set {item}: expected NAME=VALUE[,VALUE...], e.g. --set k=0.5,0.6,0.7"
            raise UserError(msg)
        if name in swept:
            msg = f"--set {name} is given twice; list every value in one option: --set {name}=V1,V2,..."
            raise UserError(msg)
        swept[name] = parts
    return swept


def display_value(text: str) -> Any:
    """A swept value as sweep.json shows it: a number when the text is one (for a numeric plot axis), else
    the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def compile_with_sets(rules: str, sets: dict[str, str]) -> tuple[Plan, tuple[str, ...]]:
    """The seam between the sweep and the language: compile the rules file `rules` with its top-level
    `let NAME = ...` constants overridden by `sets` (`{name: value as written after --set NAME=}`), exactly as
    `--set name=value` does for `ternqc apply`; return the plan and the compiler's warnings, rendered.

    Raises:
        CompileError: the rules or a value do not compile (e.g. no `let` of that name).
        UserError: this ternqc's compiler has no `let` overrides.
    """
    from ternqc import compiler
    from ternqc.runtime.errors import UserError

    takes = "overrides" in inspect.signature(compiler.compile_file).parameters
    if not takes or not hasattr(compiler, "parse_sets"):
        msg = "ternqc sweep --set needs `let` constants and --set overrides in the rules language (issue 11)"
        raise UserError(msg)
    overrides = compiler.parse_sets([f"{k}={v}" for k, v in sets.items()])
    compiled = compiler.compile_file(rules, overrides=overrides)
    return compiled.plan, tuple(w.render() if hasattr(w, "render") else str(w) for w in compiled.warnings)


def combinations(swept: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the swept values, the first name varying slowest (`itertools.product` order)."""
    names = list(swept)
    return [dict(zip(names, combo)) for combo in itertools.product(*swept.values())]


def run_sweep_command(args: argparse.Namespace) -> int:
    """The `ternqc sweep` handler (registered in `commands.COMMANDS`)."""
    from ternqc.runargs import calibrate_in_processes, print_notes, settings_from_args
    from ternqc.runtime.errors import UserError
    from ternqc.runtime.report.plots import require_matplotlib
    from ternqc.runtime.run import sweep

    if args.plan or not args.rules:
        msg = "ternqc sweep needs --rules R.tq (the --set values override the rules' `let` constants)"
        raise UserError(msg)
    if not args.sets:
        msg = "ternqc sweep needs at least one --set NAME=V1,V2,... (the values of a `let` constant to try)"
        raise UserError(msg)
    require_matplotlib()
    swept = parse_set_options(args.sets)
    combos = combinations(swept)
    plans, warned = [], []
    for combo in combos:
        plan, warnings = compile_with_sets(args.rules, combo)
        for warning in warnings:  # the same rules give the same warnings: say each once
            if warning not in warned:
                warned.append(warning)
                print(warning, file=sys.stderr)
        plans.append(({k: display_value(v) for k, v in combo.items()}, plan.to_dict()))
    settings = settings_from_args(args)
    result, writes = calibrate_in_processes(
        args, sweep.sweep_worker, plans, settings, args.reports
    )
    if not writes:
        return 0
    print_notes(result.notes)
    doc = sweep.sweep_document(
        result, {k: [display_value(v) for v in vs] for k, vs in swept.items()}, settings
    )
    print(sweep.format_table(sweep.sweep_table(doc)))
    print(
        f"\nfloat accuracy {result.float_accuracy:.4f}; {len(combos)} combinations, "
        f"{result.calibrations} calibration(s)",
        file=sys.stdout,
    )
    written = sweep.write_sweep(args.out, doc, result)
    print(
        "wrote " + ", ".join(written[:3]) + (f" and {len(written) - 3} reports" if len(written) > 3 else "")
    )
    return 0
