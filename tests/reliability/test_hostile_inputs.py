"""The hostile-input matrix (issue 13): every case is one bad input or environment a user can produce.

Each case runs `ternqc.cli.main([...])` in-process in a fresh folder that already holds previous outputs at
every place the commands write, and asserts: the exit code (1, or 2 for usage), no traceback, the words of a
precise message, stderr of bounded size, the previous outputs intact byte for byte, and no temporary file
left behind.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from ternqc.plan import MAX_EXPR_DEPTH
from ternqc.runtime.models.builtin import ToyNet
from tests.reliability.support import FACTORIES, Case, assert_clean_failure, assert_intact, seed_outputs
from tests.test_cli_support import CONFIGS, run_cli

RECIPE = str(CONFIGS / "toy_ternary.tq")
QUICK = ["--no-progress", "--samples", "32", "--batch-size", "32"]


# ---------------------------------------------------------------------------------------------------------
# Inputs made in the case's folder
# ---------------------------------------------------------------------------------------------------------


def fifo(tmp: Path, name: str) -> str:
    path = tmp / name
    os.mkfifo(path)
    return str(path)


def text(tmp: Path, name: str, content: str) -> str:
    path = tmp / name
    path.write_text(content, encoding="utf-8")
    return str(path)


def bytes_file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


class _Payload:
    """Unpickling it would create the file `marker`: proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def sparse(tmp: Path, name: str, size: int) -> str:
    """A file of `size` bytes that takes no disk space (a hole)."""
    path = tmp / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def toy_state(**changes) -> dict:
    state = ToyNet().state_dict()
    state.update(changes)
    return state


def ckpt(tmp: Path, payload) -> str:
    path = tmp / "in.ckpt"
    torch.save(payload, path)
    return str(path)


def _nan_weights() -> torch.Tensor:
    w = torch.zeros(100, 4)
    w[0, :3] = float("nan")
    w[1, 0] = float("inf")
    return w


def plan_json(depth: int) -> str:
    """A valid plan whose first binding's value is `-(-(...(1)))`, `depth` negations deep."""
    from ternqc.compiler import compile_file

    data = json.loads(compile_file(RECIPE).plan.to_json())
    value: dict = (
        {"stat": data["bindings"][-1]["value"]["stat"]}
        if "stat" in data["bindings"][-1]["value"]
        else {"const": 1.0}
    )
    for _ in range(depth):
        value = {"unary": {"op": "neg", "operand": value}}
    data["bindings"][-1]["value"] = value
    return json.dumps(data)


_STATS_CACHE: dict[str, str] = {}


def stats(tmp: Path, edit=None) -> str:
    """A statistics file from `ternqc profile` on the toy model (made once per session), optionally edited
    as text by `edit(text) -> text`."""
    if "text" not in _STATS_CACHE:
        made = tmp / "made.toml"
        run = run_cli("profile", *QUICK, "--out", made)
        assert run.rc == 0, run
        _STATS_CACHE["text"] = made.read_text()
        made.unlink()
    body = _STATS_CACHE["text"]
    return text(tmp, "s.toml", edit(body) if edit else body)


def _first_field(body: str, value: str) -> str:
    """`body` with the first `max = <number>` set to `value`."""
    return re.sub(r"(?m)^max = \S+$", f"max = {value}", body, count=1)


# ---------------------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------------------

CASES = [
    # --- rules files (compile) ------------------------------------------------------------------------
    Case(
        "compile-fifo",
        lambda t: ["compile", fifo(t, "r.tq"), "-o", str(t / "o.json")],
        ("FIFO", "regular file"),
    ),
    Case(
        "compile-dev-zero", lambda t: ["compile", "/dev/zero", "-o", str(t / "o.json")], ("character device",)
    ),
    Case("compile-folder", lambda t: ["compile", str(t / "out"), "-o", str(t / "o.json")], ("directory",)),
    Case(
        "compile-too-large",
        lambda t: ["compile", sparse(t, "r.tq", 16 * 2**20 + 1), "-o", str(t / "o.json")],
        ("larger than", "16 MiB"),
    ),
    Case(
        "compile-deep-negation",
        lambda t: [
            "compile",
            text(t, "r.tq", "linear.weight_threshold = " + "-" * 3000 + "1\n"),
            "-o",
            str(t / "o.json"),
        ],
        (f"nested deeper than {MAX_EXPR_DEPTH} levels", "r.tq:1:"),
    ),
    Case(
        "compile-long-sum",
        lambda t: [
            "compile",
            text(t, "r.tq", "\n\nlinear.weight_threshold = " + " + ".join(["1"] * 3000) + "\n"),
            "-o",
            str(t / "o.json"),
        ],
        (f"nested deeper than {MAX_EXPR_DEPTH} levels", "r.tq:3:"),
    ),
    Case(
        "compile-100k-identifier",
        lambda t: [
            "compile",
            text(t, "r.tq", "x" * 100_000 + ".weight_width = 2\n"),
            "-o",
            str(t / "o.json"),
        ],
        ("r.tq:1:1", "characters]"),
    ),
    Case(
        "compile-output-is-input",
        lambda t: ["compile", text(t, "o.json", open(RECIPE).read()), "-o", str(t / "o.json")],
        ("-o", "is the rules file", "destroy"),
    ),
    Case(
        "compile-output-is-included",
        lambda t: [
            "compile",
            text(t, "r.tq", 'include "inc.tq"\n'),
            "-o",
            text(t, "inc.tq", "linear.weight_width = 2\n"),
        ],
        ("is a file the rules include",),
    ),
    Case(
        "compile-output-in-missing-folder",
        lambda t: ["compile", RECIPE, "-o", str(t / "no" / "such" / "p.json")],
        ("cannot write plan", "no folder"),
    ),
    Case(
        "compile-not-utf8",
        lambda t: [
            "compile",
            bytes_file(t, "r.tq", b"linear.weight_width = 2 \xff\n"),
            "-o",
            str(t / "o.json"),
        ],
        ("not UTF-8", "0xff"),
    ),
    Case(
        "compile-include-fifo",
        lambda t: ["compile", text(t, "r.tq", f'include "{fifo(t, "inc.tq")}"\n'), "-o", str(t / "o.json")],
        ("cannot include", "regular file"),
    ),
    # --- plans ------------------------------------------------------------------------------------------
    Case("plan-fifo", lambda t: ["apply", "--plan", fifo(t, "p.json"), "--out", str(t / "out")], ("FIFO",)),
    Case(
        "plan-dev-zero",
        lambda t: ["apply", "--plan", "/dev/zero", "--out", str(t / "out")],
        ("character device",),
    ),
    Case(
        "plan-too-large",
        lambda t: ["apply", "--plan", sparse(t, "p.json", 64 * 2**20 + 1), "--out", str(t / "out")],
        ("larger than", "64 MiB"),
    ),
    Case(
        "plan-100k-deep-json",
        lambda t: [
            "apply",
            "--plan",
            text(t, "p.json", "[" * 100_000 + "]" * 100_000),
            "--out",
            str(t / "out"),
        ],
        ("p.json:1:257", "nested deeper than 256"),
    ),
    Case(
        "plan-deep-expression",
        lambda t: [
            "apply",
            "--plan",
            text(t, "p.json", plan_json(MAX_EXPR_DEPTH + 5)),
            "--out",
            str(t / "out"),
        ],
        ("p.json", "malformed plan", f"nested deeper than {MAX_EXPR_DEPTH} levels"),
    ),
    Case(
        "plan-not-json",
        lambda t: ["apply", "--plan", text(t, "p.json", "{not json"), "--out", str(t / "out")],
        ("invalid JSON",),
    ),
    Case(
        "plan-not-utf8",
        lambda t: [
            "profile",
            "--plan",
            str(Path(ckpt(t, {"a": torch.zeros(3)}))),
            "--out",
            str(t / "o.toml"),
        ],
        ("in.ckpt",),
    ),
    # --- numbers and paths in options --------------------------------------------------------------------
    Case(
        "seed-overflow-profile",
        lambda t: ["profile", "--seed", "9" * 23, "--out", str(t / "o.toml")],
        ("--seed", "2**64"),
    ),
    Case(
        "seed-overflow-train",
        lambda t: ["train", "--seed", "9" * 23, "--out", str(t / "o.ckpt")],
        ("--seed",),
    ),
    Case("seed-negative", lambda t: ["apply", "--seed", "-1", "--out", str(t / "out")], ("--seed",)),
    Case(
        "budget-inf",
        lambda t: ["profile", "--quantile-budget-mib", "inf", "--out", str(t / "o.toml")],
        ("--quantile-budget-mib", "inf"),
    ),
    Case(
        "budget-nan",
        lambda t: ["apply", "--quantile-budget-mib", "nan", "--out", str(t / "out")],
        ("--quantile-budget-mib",),
    ),
    Case(
        "samples-huge",
        lambda t: ["profile", "--samples", "1" + "0" * 30, "--out", str(t / "o.toml")],
        ("--samples",),
    ),
    Case(
        "workers-absurd",
        lambda t: ["profile", "--workers", "100000", "--out", str(t / "o.toml")],
        ("--workers", "256"),
    ),
    Case("lr-inf", lambda t: ["train", "--lr", "inf", "--out", str(t / "o.ckpt")], ("--lr",)),
    Case("out-empty-profile", lambda t: ["profile", "--out", ""], ("--out", "empty")),
    Case("out-blank-apply", lambda t: ["apply", "--out", "  "], ("--out", "empty")),
    Case(
        "seed-not-a-number",
        lambda t: ["profile", "--seed", "1e3", "--out", str(t / "o.toml")],
        ("--seed",),
        rc=2,
    ),
    # --- checkpoints --------------------------------------------------------------------------------------
    Case(
        "ckpt-fifo", lambda t: ["profile", "--ckpt", fifo(t, "c.ckpt"), "--out", str(t / "o.toml")], ("FIFO",)
    ),
    Case(
        "ckpt-dev-zero",
        lambda t: ["profile", "--ckpt", "/dev/zero", "--out", str(t / "o.toml")],
        ("character device",),
    ),
    Case(
        "ckpt-pickled-payload",
        lambda t: [
            "profile",
            "--ckpt",
            ckpt(t, {"state_dict": _Payload(t / "RAN")}),
            "--out",
            str(t / "o.toml"),
        ],
        ("holds Python objects", "refused"),
    ),
    Case(
        "ckpt-text",
        lambda t: ["profile", "--ckpt", text(t, "c.ckpt", "epoch: 3\n"), "--out", str(t / "o.toml")],
        ("not a PyTorch checkpoint", "it is text"),
    ),
    Case(
        "ckpt-ternary",
        lambda t: [
            "apply",
            "--ckpt",
            ckpt(t, {"format": "ternqc-ternary", "version": 1, "state_dict": toy_state()}),
            "--out",
            str(t / "out"),
        ],
        ("ternary checkpoint", "load_ternary_checkpoint"),
    ),
    Case(
        "ckpt-nan-weights",
        lambda t: [
            "apply",
            "--ckpt",
            ckpt(t, toy_state(**{"seq_blocks.0.weight": _nan_weights()})),
            "--out",
            str(t / "out"),
        ],
        ("seq_blocks.0.weight", "3 NaN", "1 infinite"),
    ),
    Case(
        "model-nan-weights",
        lambda t: ["apply", "--model", f"{FACTORIES}:toy_with_nan_weights", "--out", str(t / "out")],
        ("seq_blocks.2.weight", "2 NaN", "1 infinite"),
    ),
    Case(
        "ckpt-complex",
        lambda t: [
            "profile",
            "--ckpt",
            ckpt(t, toy_state(**{"seq_blocks.0.bias": torch.zeros(100, dtype=torch.complex64)})),
            "--out",
            str(t / "o.toml"),
        ],
        ("seq_blocks.0.bias", "complex"),
    ),
    Case(
        "ckpt-int64",
        lambda t: [
            "apply",
            "--ckpt",
            ckpt(t, toy_state(**{"seq_blocks.0.weight": torch.zeros(100, 4, dtype=torch.int64)})),
            "--out",
            str(t / "out"),
        ],
        ("seq_blocks.0.weight", "int64", "torch.float32"),
    ),
    Case(
        "ckpt-sparse",
        lambda t: [
            "profile",
            "--ckpt",
            ckpt(t, toy_state(**{"seq_blocks.0.weight": torch.zeros(100, 4).to_sparse()})),
            "--out",
            str(t / "o.toml"),
        ],
        ("seq_blocks.0.weight", "sparse"),
    ),
    Case(
        "ckpt-list-value",
        lambda t: [
            "profile",
            "--ckpt",
            ckpt(t, toy_state(**{"seq_blocks.0.bias": [0.0] * 100})),
            "--out",
            str(t / "o.toml"),
        ],
        ("seq_blocks.0.bias", "is a list"),
    ),
    Case(
        "out-holds-the-ckpt",
        lambda t: ["apply", "--ckpt", str(t / "out" / "ternary.ckpt"), "--out", str(t / "out")],
        ("--out", "is the checkpoint", "destroy"),
    ),
    Case(
        "train-out-is-model-file",
        lambda t: ["train", "--model", f"{text(t, 'm.py', 'x = 1')}:make", "--out", str(t / "m.py")],
        ("--out", "is the model file"),
    ),
    Case(
        "model-file-fifo",
        lambda t: ["profile", "--model", f"{fifo(t, 'm.py')}:make", "--out", str(t / "o.toml")],
        ("m.py", "not a regular file"),
    ),
    # --- datasets, calibration phase ------------------------------------------------------------------------
    Case(
        "data-ragged",
        lambda t: ["profile", "--dataset", f"{FACTORIES}:ragged", *QUICK, "--out", str(t / "o.toml")],
        ("calibration batch 1", "RuntimeError", "stack"),
    ),
    Case(
        "data-item-raises",
        lambda t: [
            "profile",
            "--dataset",
            f"{FACTORIES}:item_raises",
            *QUICK,
            "--samples",
            "64",
            "--out",
            str(t / "o.toml"),
        ],
        ("calibration batch", "sample 7 is corrupt"),
    ),
    Case(
        "data-lying-len",
        lambda t: ["profile", "--dataset", f"{FACTORIES}:lying_len", *QUICK, "--out", str(t / "o.toml")],
        ("calibration batch", "IndexError", "1000 items"),
    ),
    Case(
        "train-nan-data",
        lambda t: [
            "train",
            "--dataset",
            f"{FACTORIES}:nan_data",
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(t / "o.ckpt"),
        ],
        ("non-finite", "NaN"),
    ),
    Case(
        "forward-returns-string",
        lambda t: ["apply", "--model", f"{FACTORIES}:returns_string", *QUICK, "--out", str(t / "out")],
        ("returned a str",),
    ),
    # --- statistics TOML (map) ------------------------------------------------------------------------------
    Case("stats-fifo", lambda t: ["map", fifo(t, "s.toml"), "-o", str(t / "o.toml")], ("FIFO",)),
    Case("stats-dev-zero", lambda t: ["map", "/dev/zero", "-o", str(t / "o.toml")], ("character device",)),
    Case(
        "stats-too-large",
        lambda t: ["map", sparse(t, "s.toml", 256 * 2**20 + 1), "-o", str(t / "o.toml")],
        ("larger than",),
    ),
    Case(
        "stats-3000-deep-array",
        lambda t: [
            "map",
            text(t, "s.toml", "\n\nx = " + "[" * 3000 + "]" * 3000 + "\n"),
            "-o",
            str(t / "o.toml"),
        ],
        ("s.toml:3:", "nested deeper than 32"),
    ),
    Case(
        "stats-ragged-array",
        lambda t: [
            "map",
            stats(t, lambda b: _first_field(b, "[[1.0, 2.0], [3.0]]")),
            "-o",
            str(t / "o.toml"),
        ],
        ("rectangular", "range_min_max"),
    ),
    Case(
        "stats-empty-array",
        lambda t: ["map", stats(t, lambda b: _first_field(b, "[]")), "-o", str(t / "o.toml")],
        ("empty array",),
    ),
    Case(
        "stats-control-character",
        lambda t: ["map", text(t, "s.toml", 'a = "bell\x07"\n'), "-o", str(t / "o.toml")],
        ("not valid TOML",),
    ),
    Case(
        "stats-array-table-conflict",
        lambda t: ["map", text(t, "s.toml", "a = [1]\n[a]\nb = 2\n"), "-o", str(t / "o.toml")],
        ("not valid TOML",),
    ),
    Case(
        "stats-duplicate-path",
        lambda t: [
            "map",
            stats(t, lambda b: b.replace('path = "seq_blocks.2"', 'path = "seq_blocks.0"', 1)),
            "-o",
            str(t / "o.toml"),
        ],
        ("'seq_blocks.0'", "seq_blocks_0", "seq_blocks_2"),
    ),
    Case(
        "stats-not-utf8",
        lambda t: ["map", bytes_file(t, "s.toml", b"a = 1\n\xfe\n"), "-o", str(t / "o.toml")],
        ("not UTF-8",),
    ),
    Case(
        "base-fifo",
        lambda t: ["map", stats(t), "--base", fifo(t, "b.toml"), "-o", str(t / "o.toml")],
        ("config file", "FIFO"),
    ),
    Case(
        "stats-output-is-input",
        lambda t: ["map", str(t / "o.toml"), "-o", str(t / "o.toml")],
        ("-o", "destroy"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_clean_error(case: Case, tmp_path: Path) -> None:
    seed_outputs(tmp_path)
    argv = case.argv(tmp_path)
    before = seed_snapshot(tmp_path)  # previous outputs and the case's own inputs
    run = run_cli(*argv)
    assert_clean_failure(run, case.rc, case.words)
    assert_intact(tmp_path, before)
    assert not (tmp_path / "RAN").exists()  # no code from a data file ran


def seed_snapshot(tmp: Path) -> dict[str, bytes]:
    """Every file in the case's folder (previous outputs, the case's inputs), large sparse files left out."""
    from tests.reliability.support import snapshot

    return {k: v for k, v in snapshot(tmp).items() if len(v) < 2**20}


def test_the_stats_file_of_the_matrix_maps_cleanly(tmp_path: Path) -> None:
    """The unedited statistics file the TOML cases start from maps: their failures are the edits'."""
    run = run_cli("map", stats(tmp_path), "-o", tmp_path / "q.toml")
    assert run.rc == 0, run.err


def test_mixed_type_arrays_are_valid_toml(tmp_path: Path) -> None:
    """TOML 1.0 allows arrays of mixed types (toml 0.10 refused them): the reader accepts the file and the
    mapping, not the parser, says what is wrong with a field."""
    run = run_cli("map", stats(tmp_path, lambda b: _first_field(b, '[1.0, "a"]')), "-o", tmp_path / "q.toml")
    assert_clean_failure(run, 1, ("not a number or an array of numbers",))
    assert "valid TOML" not in run.err


def test_more_workers_than_cores_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--workers N` beyond the CPU count runs, with a note saying why it will be slow."""
    import ternqc.options as options

    monkeypatch.setattr(options.os, "cpu_count", lambda: 2)
    run = run_cli("profile", "--workers", "64", "--plan", "/no/such/plan.json", "--out", tmp_path / "s.toml")
    assert "--workers 64 starts more processes than this machine's 2 CPU cores" in run.err
