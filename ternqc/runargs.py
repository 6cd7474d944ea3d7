"""What the commands that run a model share: the plan from `--rules` / `--plan` / `--set`, `RunSettings` from
the options, notes on stderr, and running a pipeline worker here, under torchrun or in `--workers N` processes.

In: parsed argparse namespaces. Out: plans, settings, `(result, writes)`. Imports the runtime only inside the
functions, so `ternqc compile` stays free of torch.
"""

from __future__ import annotations

import argparse
import sys

from ternqc.plan import Plan


def load_plan(rules: str | None, plan_path: str | None, sets: list[str] | None = None) -> tuple[Plan, str]:
    """The plan from `--plan P.json`, `--rules R.tq`, or the built-in default recipe; and its source name.
    `sets` are the `--set NAME=VALUE` overrides of the rules' top-level `let`s.

    Compile warnings go to stderr.
    """
    from ternqc.runtime.errors import UserError

    if plan_path and sets:
        raise UserError("--set changes the rules, so it needs --rules; a compiled --plan has its values fixed")
    if plan_path:
        from ternqc.inputs import MAX_PLAN_BYTES, read_text

        try:
            return Plan.from_json(read_text(plan_path, "plan", MAX_PLAN_BYTES), plan_path), plan_path
        except OSError as exc:
            msg = f"cannot read plan {plan_path!r}: {exc.strerror or exc}"
            raise UserError(msg) from exc
        except ValueError as exc:
            msg = str(exc) if str(exc).startswith(f"{plan_path}:") else f"{plan_path}: {exc}"
            raise UserError(msg) from exc
    from ternqc.compiler import builtin_recipe, compile_file, parse_sets

    path = rules or str(builtin_recipe())
    compiled = compile_file(path, parse_sets(sets or []))
    for warning in compiled.warnings:
        print(warning.render() if hasattr(warning, "render") else str(warning), file=sys.stderr)
    return compiled.plan, (rules or "configs/toy_ternary.tq")


def settings_from_args(args: argparse.Namespace):
    """`RunSettings` from the command line; its numbers were checked with the others
    (`options.check_options`)."""
    from ternqc.runtime.models.builtin import default_dataset
    from ternqc.runtime.run.pipeline import RunSettings

    return RunSettings(
        model=args.model,
        ckpt=args.ckpt,
        dataset=args.dataset or default_dataset(args.model),
        samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
        quantile_budget_mib=args.quantile_budget_mib,
        progress=not args.no_progress,
        metric=getattr(args, "metric", None),
        sensitivity=getattr(args, "sensitivity", False),
    )


def print_notes(notes) -> None:
    for note in notes:
        print(f"ternqc: note: {note}", file=sys.stderr)


def calibrate_in_processes(args: argparse.Namespace, worker, *worker_args):
    """Run a pipeline worker (`workers.profile_worker` / `apply_worker`) here, in every process of a
    torchrun job, or in `--workers N` local processes; return `(result, writes)`: rank 0's result, and
    whether this process writes outputs (rank 0 only)."""
    from ternqc.runtime.run import collectives as distributed
    from ternqc.runtime.run import workers

    if distributed.init_from_env():  # under torchrun: this process is one rank
        try:
            return worker(*worker_args), distributed.is_main_process()
        finally:
            distributed.shutdown()
    if args.workers < 1:
        from ternqc.runtime.errors import UserError

        msg = f"--workers must be at least 1, got {args.workers}"
        raise UserError(msg)
    settings = worker_args[1]  # (plan, settings, ...): the user's model file defines the result's classes
    preload = lambda: workers.import_user_code(settings)  # noqa: E731
    return workers.run_workers(args.workers, worker, *worker_args, preload=preload), True
