"""Command handlers behind `ternqc compile | train | profile | apply | finetune | map | report | sweep | demo`, and
`COMMANDS`, the table `cli.main` dispatches through.

Each takes the parsed argparse namespace and returns an exit code. This is the one place where the two
halves meet: a handler compiles the rules (`ternqc.compiler`, which never imports torch) and hands the plan
to the runtime (`ternqc.runtime`, which never imports lark). Both are imported inside the handlers so
`ternqc compile` stays fast. User-facing failures raise `UserError` (runtime) or `CompileError`
(compiler); `cli.main` prints them without a traceback and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from ternqc.plan import Plan
from ternqc.runargs import calibrate_in_processes, load_plan, print_notes, settings_from_args


def compile_rules(args: argparse.Namespace) -> int:
    """`ternqc compile RULES [-o plan.json] [--set k=v] [--model M [--ckpt C] [--explain]]`: compile, print a
    summary (stdout), warnings or errors (stderr), write the plan as JSON; with `--model`, check the rules
    against that model (`runtime/rules_check.py`, which imports torch). Exit 0 when the rules compile (and
    every selector hits something), 1 when they do not or a file cannot be read or written, 2 for --ckpt or
    --explain without --model."""
    from ternqc.compiler import CompileError, compile_file, parse_sets
    from ternqc.render import summarize

    rules_path, output_path = args.rules, args.output
    if (args.ckpt or args.explain) and not args.model:
        print("ternqc compile: error: --ckpt and --explain need --model", file=sys.stderr)
        return 2
    try:
        compiled = compile_file(rules_path, parse_sets(args.sets))
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
        from ternqc.options import check_outputs
        from ternqc.runtime.errors import UserError
        from ternqc.runtime.io.atomic import atomic_write_text

        check_outputs(args, extra_inputs=compiled.plan.sources)  # an included file is an input too
        folder = os.path.dirname(os.path.abspath(output_path))
        if not os.path.isdir(folder):
            msg = f"cannot write plan to {output_path}: there is no folder {folder}"
            raise UserError(msg)
        try:
            atomic_write_text(output_path, compiled.plan.to_json())  # all or nothing, even on a full disk
        except UserError as exc:
            msg = f"cannot write plan to {output_path}: {exc}"
            raise UserError(msg) from exc
        print(f"wrote plan to {os.fspath(output_path)}")
    if args.model:
        return _check_against_model(compiled.plan, args)
    return 0


def _check_against_model(plan: Plan, args: argparse.Namespace) -> int:
    from ternqc.runtime.run.rules_check import check_against_model

    report = check_against_model(plan, args.model, ckpt=args.ckpt, explain=args.explain)
    print(report.text)
    for line in report.warnings:
        print(f"ternqc: warning: {line}", file=sys.stderr)
    for line in report.errors:
        print(f"ternqc: error: {line}", file=sys.stderr)
    return 1 if report.errors else 0


def train(args: argparse.Namespace) -> int:
    from ternqc.runtime.models.builtin import default_dataset
    from ternqc.runtime.models.train import run_train

    result = run_train(
        args.model,
        args.dataset or default_dataset(args.model),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        out=args.out,
        progress=not args.no_progress,
    )
    print(
        f"best epoch {result.best_epoch}: val_loss {result.best_val_loss:.4f}, "
        f"val_acc {result.best_val_accuracy:.4f}; wrote {args.out}"
    )
    return 0


def profile(args: argparse.Namespace) -> int:
    from ternqc.runtime.io.mase_io import write_stats_toml
    from ternqc.runtime.run import workers

    plan, _source = load_plan(args.rules, args.plan, args.sets)
    result, writes = calibrate_in_processes(args, workers.profile_worker, plan, settings_from_args(args))
    if not writes:
        return 0
    print_notes(result.notes)
    write_stats_toml(args.out, result.table)
    counts = sum(len(v) for ms in result.table.values() for v in ms.values.values())
    print(f"profiled {len(result.table)} modules ({counts} statistics); wrote {args.out}")
    return 0


def apply(args: argparse.Namespace) -> int:
    from ternqc.render import format_layer_table, format_metrics, render_explain
    from ternqc.runtime.run import pipeline, workers

    if args.report:
        from ternqc.runtime.report.plots import require_matplotlib

        require_matplotlib()  # before the run, not after it
    plan, source = load_plan(args.rules, args.plan, args.sets)
    settings = settings_from_args(args)
    result, writes = calibrate_in_processes(args, workers.apply_worker, plan, settings)
    if not writes:
        return 0
    result.report["run"]["rules"] = source  # as the user named it (`--plan P.json` rather than the .tq)
    print_notes(result.profile.notes)
    written = pipeline.write_apply_outputs(args.out, result, settings)
    if args.report:
        from ternqc.runtime.report.write import write_report

        written.append(write_report(args.out))
    if args.explain:
        print(render_explain(result.mapping))
    print(format_layer_table(result.report))
    print(f"\n{format_metrics(result.report)}  ({settings.dataset}, rules {source})")
    if args.engine == "int":
        from ternqc.runtime.engine.evaluate import engine_accuracy

        acc, report = engine_accuracy(result.model, settings.dataset)
        print(f"integer engine: {len(report.engine)} layers on int8 matmuls, accuracy {acc:.4f}"
              + "".join(f"\n  {path}: simulated ({why})" for path, why in report.simulated.items()))
    print("wrote " + ", ".join(written))
    for warning in result.warnings:
        print(f"ternqc: warning: {warning}", file=sys.stderr)
    for failure in result.assert_failures:  # the outputs are written: nothing computed is lost
        print(f"ternqc: error: {failure.render()}", file=sys.stderr)
    return 1 if result.assert_failures else 0


def report(args: argparse.Namespace) -> int:
    """`ternqc report DIR [-o FILE]`: the HTML report of the run whose report.json is in DIR."""
    from ternqc.runtime.report.write import write_report

    print(f"wrote {write_report(args.dir, args.output)}")
    return 0


def sweep(args: argparse.Namespace) -> int:
    """`ternqc sweep`: see `ternqc.sweep`."""
    from ternqc.sweep import run_sweep_command

    return run_sweep_command(args)
def finetune(args: argparse.Namespace) -> int:
    """`ternqc finetune`: what `apply` does, then fine-tuning with the quantisers in the loop (one process,
    `--workers N` or every process of a torchrun job, data-parallel); rank 0 writes `apply`'s four outputs,
    with the fine-tuned model, and prints the accuracy before and after."""
    from ternqc.render import format_layer_table, render_explain
    from ternqc.runtime.run import pipeline, workers
    from ternqc.runtime.run.finetune import FinetuneSettings

    tune = FinetuneSettings(  # checks its values (UserError naming the option) before anything runs
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.train_batch_size,
        learn_activations=not args.fixed_activations,
        distill=args.distill,
        temperature=args.temperature,
        seed=args.seed,
        progress=not args.no_progress,
    )
    plan, source = load_plan(args.rules, args.plan, args.sets)
    settings = settings_from_args(args)
    tuned, writes = calibrate_in_processes(args, workers.finetune_worker, plan, settings, tune)
    if not writes:
        return 0
    result = tuned.result
    result.report["run"]["rules"] = source  # as the user named it (`--plan P.json` rather than the .tq)
    print_notes(result.profile.notes)
    written = pipeline.write_apply_outputs(args.out, result, settings)
    if args.explain:
        print(render_explain(result.mapping))
    print(format_layer_table(result.report))
    print(
        f"\nvalidation accuracy: float {result.float_accuracy:.4f}  ternary {tuned.post_training_accuracy:.4f}"
        f" post-training, {result.ternary_accuracy:.4f} after {tune.epochs} epochs of fine-tuning"
        f"  ({settings.dataset}, rules {source})"
    )
    print("wrote " + ", ".join(written))
    for warning in result.warnings:
        print(f"ternqc: warning: {warning}", file=sys.stderr)
    for failure in result.assert_failures:  # checked on the fine-tuned model; the outputs are written
        print(f"ternqc: error: {failure.render()}", file=sys.stderr)
    return 1 if result.assert_failures else 0


def export(args: argparse.Namespace) -> int:
    from ternqc.runtime.engine.packed import export_checkpoint

    report, sizes = export_checkpoint(args.ckpt, args.output, args.ternary_packing)
    print(f"packed {len(report.engine)} layers for the integer engine"
          + "".join(f"\n  {path}: kept simulated ({why})" for path, why in report.simulated.items()))
    print(f"wrote {args.output}: {sizes[1] / 2**20:.3f} MiB (the ternary checkpoint's state: {sizes[0] / 2**20:.3f} MiB)")
    return 0


def map_stats(args: argparse.Namespace) -> int:
    from ternqc.render import render_explain
    from ternqc.runtime.io.mase_io import read_config_toml, read_stats_toml, write_quant_config_toml
    from ternqc.runtime.quantize.mapping import map_params

    plan, source = load_plan(args.rules, None, args.sets)
    table = read_stats_toml(args.stats)
    mapping = map_params(plan, table, by_node_name=True, stats_source=f"the statistics file {args.stats}")
    base = read_config_toml(args.base) if args.base else None
    write_quant_config_toml(args.output, mapping, base=base)
    if args.explain:
        print(render_explain(mapping))
    print(f"mapped {len(mapping.modules)} nodes with rules {source}; wrote {args.output}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Train toy on toy-tiny, then apply the built-in recipe to the checkpoint: the two commands a user would
    type, parsed by the same parser, so the demo uses the commands' own defaults; ends with the path of the
    run's HTML report (when matplotlib, the `report` extra, is installed)."""
    import importlib.util

    from ternqc.parser import build_parser

    ckpt = os.path.join(args.out, "best.ckpt")
    quiet = ["--no-progress"] if args.no_progress else []
    report = importlib.util.find_spec("matplotlib") is not None  # the `report` extra
    steps = (
        (train, ["train", "--model", "toy", "--dataset", "toy-tiny", "--out", ckpt]),
        (apply, ["apply", "--model", "toy", "--ckpt", ckpt, "--out", args.out] + (["--report"] if report else [])),
    )
    for number, (command, argv) in enumerate(steps):
        print(("\n" if number else "") + "== ternqc " + " ".join(argv))
        status = command(build_parser().parse_args(argv + quiet))
        if status:
            return status
    if report:
        print(f"\nthe report of this run: {os.path.abspath(os.path.join(args.out, 'report.html'))}")
    else:
        print("\nno HTML report: it needs matplotlib (pip install 'ternqc[report]')")
    return 0


#: `ternqc COMMAND`: the handler of each subcommand of `parser.build_parser`.
COMMANDS = {
    "compile": compile_rules,
    "train": train,
    "profile": profile,
    "apply": apply,
    "finetune": finetune,
    "map": map_stats,
    "report": report,
    "sweep": sweep,
    "export": export,
    "demo": demo,
}
