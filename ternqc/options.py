"""Range checks on the numbers and paths of the command line, before any work starts.

In: the parsed argparse namespace. Out: nothing, or a `UserError` naming the option and the value (exit 1,
like every other bad value), so no option reaches torch as a number it cannot hold
(`--seed 99999999999999999999999`, `--quantile-budget-mib inf`) or as a path that means something else
(`--out ""` is the current folder). `notes(args)` lists what is allowed but probably not meant
(`--workers 64` on 2 cores). `check_outputs(args)` refuses an output path that is one of the command's
input files.
"""

from __future__ import annotations

import argparse
import os

from ternqc.runtime import ranges
from ternqc.runtime.errors import UserError
from ternqc.runtime.ranges import shown as _shown

#: torch.manual_seed takes any value that fits 64 bits; ternqc's seeds are the non-negative ones.
MAX_SEED = 2**64 - 1
#: More local worker processes than this is a typing mistake, not a plan.
MAX_WORKERS = 256
#: The largest quantile budget: 1 TiB, in MiB.
MAX_BUDGET_MIB = 2.0**20

# --epochs, --lr (and finetune's --train-batch-size, --distill, --temperature) are checked where they are used,
# by `runtime/ranges.py`'s checks: `FinetuneSettings`'s validators and train's settings
_COUNTS = (("samples", "--samples"), ("batch_size", "--batch-size"))
_PATHS = (("out", "--out"), ("output", "--output"))


def check_options(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers and empty output paths in `args`.

    Raises:
        UserError: the first bad option, e.g. "--seed must be an integer from 0 to 2**64-1, got 1e+22".
    """
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer from 0 to 2**64-1, got {_shown(seed)}")
    for name, option in _COUNTS:
        value = getattr(args, name, None)
        if value is not None:
            ranges.count(option, value)
    budget = getattr(args, "quantile_budget_mib", None)
    if budget is not None and not 0 <= budget <= MAX_BUDGET_MIB:  # also refuses NaN and inf
        raise UserError(
            f"--quantile-budget-mib must be a number from 0 to {MAX_BUDGET_MIB:.0f}, got {budget}"
        )
    workers = getattr(args, "workers", None)
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise UserError(f"--workers must be from 1 to {MAX_WORKERS}, got {_shown(workers)}")
    for name, option in _PATHS:
        value = getattr(args, name, None)
        if value is not None and not str(value).strip():
            raise UserError(f"{option} must name a file or folder, got an empty string")


def notes(args: argparse.Namespace) -> list[str]:
    """Options that are allowed but probably not meant, as sentences."""
    found = []
    workers, cores = getattr(args, "workers", None), os.cpu_count() or 1
    if workers is not None and workers > cores:
        found.append(
            f"--workers {workers} starts more processes than this machine's {cores} CPU cores; each gets one "
            "thread and they share the cores, so calibration is slower, not faster"
        )
    return found


def _factory_file(spec: str | None) -> str | None:
    """The file of a `FILE.py:factory` spec, else None."""
    if not spec or ":" not in spec:
        return None
    target = spec.rpartition(":")[0]
    return target if target.endswith(".py") or "/" in target or "\\" in target else None


def input_files(args: argparse.Namespace) -> list[tuple[str, str]]:
    """`(what, path)` of every file the command in `args` reads."""
    found = [
        ("the rules file", getattr(args, "rules", None)),
        ("the plan", getattr(args, "plan", None)),
        ("the checkpoint", getattr(args, "ckpt", None)),
        ("the statistics file", getattr(args, "stats", None)),
        ("the base config", getattr(args, "base", None)),
        ("the model file", _factory_file(getattr(args, "model", None))),
        ("the dataset file", _factory_file(getattr(args, "dataset", None))),
    ]
    return [(what, path) for what, path in found if path]


def output_files(args: argparse.Namespace) -> list[tuple[str, str]]:
    """`(option, path)` of every file the command in `args` writes."""
    from ternqc.runtime.io.outputs import APPLY_OUTPUTS

    if args.command in ("apply", "demo"):
        return [("--out", os.path.join(args.out, name)) for name in APPLY_OUTPUTS]
    for name, option in _PATHS:
        value = getattr(args, name, None)
        if value:
            return [(option, value)]
    return []


def check_outputs(args: argparse.Namespace, extra_inputs: tuple[str, ...] = ()) -> None:
    """Refuse an output path that is one of the command's input files (`ternqc compile r.tq -o r.tq`).

    Args:
        args: the parsed command line.
        extra_inputs: more files read (e.g. the files a rules file includes).

    Raises:
        UserError: naming the option, the path and which input it is.
    """
    from ternqc.runtime.io.outputs import refuse_overwriting_inputs

    inputs = input_files(args) + [("a file the rules include", p) for p in extra_inputs]
    refuse_overwriting_inputs(output_files(args), inputs)
