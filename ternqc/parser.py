"""The `ternqc` argument parser: one subcommand per command, its options and their help.

In: nothing. Out: an `argparse.ArgumentParser` whose namespaces carry `command`, the key of
`commands.COMMANDS`.
"""

from __future__ import annotations

import argparse

MODEL_HELP = "built-in name (toy, digits-mlp, digits-cnn) or FILE.py:factory / pkg.mod:factory"
DATASET_HELP = "built-in name (toy-tiny, digits) or FILE.py:factory; default: the model's own (toy-tiny for a factory)"


def _add_run_options(p: argparse.ArgumentParser, *, rules: bool = True, sets: bool = True) -> None:
    """Options shared by the commands that load a model and calibrate it (`sets`: with `--set NAME=VALUE`)."""
    p.add_argument("--model", default="toy", help=MODEL_HELP)
    p.add_argument("--ckpt", help="Lightning checkpoint or plain state_dict to load into the model")
    p.add_argument("--dataset", help=DATASET_HELP)
    if rules:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--rules", help="rules file (.tq); default: the built-in configs/toy_ternary.tq")
        src.add_argument("--plan", help="a plan compiled by `ternqc compile -o plan.json`")
    if sets:
        _add_set_option(p)
    p.add_argument("--samples", type=int, help="calibration samples (rounded up to whole batches)")
    p.add_argument("--batch-size", type=int, help="calibration batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration shuffle (default 0)")
    p.add_argument("--workers", type=int, default=1, help="calibrate in N local processes (torch.distributed)")
    p.add_argument("--quantile-budget-mib", type=float, default=256.0,
                   help="memory for exact quantile buffers before switching to a sketch (default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--metric", help="FILE.py:fn, fn(output, labels) -> float per batch, for outputs that are "
                   "neither [batch, classes] nor [batch, seq, vocab] scores")


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    """Options of `ternqc finetune` (see runtime/run/finetune.py)."""
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, cosine-decayed to 0 (default 3e-3)")
    p.add_argument("--train-batch-size", type=int, default=64, help="fine-tuning batch size (default 64)")
    p.add_argument("--fixed-activations", action="store_true",
                   help="keep the calibrated activation Δ/α instead of learning them (LSQ)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight in [0, 1] of distillation from the float model in the loss (default 0: off)")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (default 4)")


def _add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="sets",
                   help="override a top-level `let` of the rules (repeatable), e.g. --set k=0.6")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ternqc", description="Ternary quantisation from declarative rules.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("compile", help="check a rules file and lower it to a plan")
    p.add_argument("rules", help="rules file (.tq)")
    p.add_argument("-o", "--output", help="write the plan as JSON here")
    _add_set_option(p)
    p.add_argument("--model", help="check the rules against this model (built, not calibrated; imports torch)")
    p.add_argument("--ckpt", help="with --model: a checkpoint to load into it")
    p.add_argument("--explain", action="store_true", help="with --model: the rule that sets each parameter")

    p = sub.add_parser("train", help="train a model and write a Lightning-layout checkpoint")
    p.add_argument("--model", default="toy", help=MODEL_HELP)
    p.add_argument("--dataset", help=DATASET_HELP)
    p.add_argument("--epochs", type=int, help="epochs (default per model: toy 30, digits-* 40); the best validation loss is kept")
    p.add_argument("--lr", type=float, help="Adam learning rate (default per model: toy 1e-2, digits-* 3e-3)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling (default 0)")
    p.add_argument("--out", default="best.ckpt", help="checkpoint to write, Lightning layout (default best.ckpt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("profile", help="calibrate and write statistics in MASE's layout")
    _add_run_options(p)
    p.add_argument("--out", default="stats.toml")

    p = sub.add_parser("apply", help="calibrate, map, convert to ternary, evaluate and write outputs")
    _add_run_options(p)
    p.add_argument("--out", default="ternqc-out", help="output folder (default ternqc-out/)")
    p.add_argument("--explain", action="store_true", help="print the rule that set every parameter")
    p.add_argument("--report", action="store_true", help="also write OUT/report.html (needs matplotlib)")
    p.add_argument("--sensitivity", action="store_true",
                   help="per quantised layer, also measure the accuracy with only that layer quantised "
                        "(one evaluation per layer; in report.json and the report)")
    p.add_argument("--engine", choices=("sim", "int"), default="sim",
                   help="also evaluate on the integer engine (int: int8 matmuls, see docs/PACKED.md); default sim")

    p = sub.add_parser("export", help="write a ternary checkpoint as a packed integer-engine model (safetensors)")
    p.add_argument("ckpt", help="a ternary.ckpt written by `ternqc apply`")
    p.add_argument("--format", choices=("packed",), default="packed",
                   help="packed: codes at their width (ternary 2 bits), scales and config as metadata")
    p.add_argument("-o", "--output", default="model.safetensors", help="file to write (default model.safetensors)")
    p.add_argument("--ternary-packing", choices=("2bit", "base3"), default="2bit",
                   help="ternary codes 4 a byte (2bit, default) or 5 a byte (base3, 1.6 bits a code)")

    p = sub.add_parser("finetune", help="apply, then fine-tune the ternary model with the quantisers in the loop")
    _add_run_options(p)
    p.add_argument("--out", default="ternqc-out", help="output folder (default ternqc-out/)")
    p.add_argument("--explain", action="store_true", help="print the rule that set every parameter")
    _add_finetune_options(p)

    p = sub.add_parser("report", help="write DIR/report.html from the report.json that `apply` wrote in DIR")
    p.add_argument("dir", help="an output folder of `ternqc apply` or `ternqc sweep` (or its .json)")
    p.add_argument("-o", "--output", help="the page to write (default DIR/report.html)")

    p = sub.add_parser("sweep", help="calibrate once, then map, convert and evaluate every combination of --set values")
    _add_run_options(p, sets=False)
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="NAME=V1,V2,...",
                   help="values of a `let` constant of the rules to try; repeat for more names (every combination)")
    p.add_argument("--reports", action="store_true",
                   help="also write every combination's report.json and report.html into OUT/NAME=VALUE,.../")
    p.add_argument("--out", default="ternqc-sweep", help="output folder (default ternqc-sweep/)")

    p = sub.add_parser("map", help="MASE statistics file + rules -> MASE quantize config (stat-to-conf.py)")
    p.add_argument("stats", help="statistics TOML in MASE's node-meta layout")
    p.add_argument("--rules", help="rules file (.tq); default: the built-in configs/toy_ternary.tq")
    p.add_argument("-o", "--output", default="quant_config.toml")
    p.add_argument("--base", help="a MASE config whose model and dataset the output keeps (stat-to-conf.py's --base)")
    _add_set_option(p)
    p.add_argument("--explain", action="store_true", help="print the rule that set every parameter")

    p = sub.add_parser("demo", help="the whole flow on the built-in defaults: train toy, apply the default recipe")
    p.add_argument("--out", default="ternqc-out")
    p.add_argument("--no-progress", action="store_true")
    return parser
