"""Shared by the end-to-end CLI tests (`tests/test_cli_*.py`); holds no tests itself.

- `run_cli(*args) -> CliRun`: `ternqc.cli.main([...])` in-process with stdout/stderr captured (usable from
  session fixtures, where `capsys` is not available).
- `trained_toy` (session fixture): `ternqc train` run once per session into `tmp_path_factory`; every other
  fixture or test that needs a trained checkpoint shares it. `toy_apply(rules)` likewise runs
  `ternqc apply --model toy --ckpt <trained>` once per recipe and session. A test module registers them by
  importing `trained_toy_fixture` / `toy_apply_fixture`; the caches are module-level, so the fixtures run
  once per session however many modules import them.
- Independent references the tests compare against, written from MASE's definitions in
  `shared/MASE.md`, not from ternqc's code: the toy network (`MaseToy`), MASE's checkpoint rule
  (`load_like_mase`: strip the first dotted part of every key, load strictly), toy-tiny (`toy_tiny`), and
  the ternary quantiser of issue 4 in numpy (`np_threshold`, `np_ternarize`, `np_alpha`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from ternqc.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FIXTURES = REPO / "tests" / "fixtures"
MASE_DATA = REPO / "tests" / "data" / "mase"
DOC_STATS = MASE_DATA / "stats_for_quantisation.toml"
APPLY_OUTPUTS = ("stats.toml", "quant_config.toml", "ternary.ckpt", "report.json")


class CliRun(NamedTuple):
    rc: int
    out: str
    err: str


def run_cli(*args: Any) -> CliRun:
    """`main([...])` with every argument as a string; returns the exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return CliRun(rc, out.getvalue(), err.getvalue())


def assert_one_clean_error(run: CliRun, *needles: str) -> str:
    """Exit 1, nothing but one `ternqc: error:` paragraph on stderr, no traceback, each needle in it."""
    assert run.rc == 1, (run.rc, run.out, run.err)
    assert "Traceback" not in run.err and "Traceback" not in run.out
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err
    assert lines[0].startswith("ternqc: error: "), run.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Session-wide runs (cached at module level: see the module docstring)
# ---------------------------------------------------------------------------------------------------------

_CACHE: dict[Any, Any] = {}


def _once(key: Any, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


class Trained(NamedTuple):
    ckpt: Path
    run: CliRun


class Applied(NamedTuple):
    out_dir: Path
    run: CliRun
    rules: Path


@pytest.fixture(scope="session", name="trained_toy")
def trained_toy_fixture(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """`ternqc train --model toy --dataset toy-tiny --out <tmp>/best.ckpt --no-progress`, once."""

    def make() -> Trained:
        ckpt = tmp_path_factory.mktemp("train") / "best.ckpt"
        run = run_cli("train", "--model", "toy", "--dataset", "toy-tiny", "--out", ckpt, "--no-progress")
        assert run.rc == 0, run
        return Trained(ckpt, run)

    return _once("trained_toy", make)


@pytest.fixture(scope="session", name="toy_apply")
def toy_apply_fixture(tmp_path_factory: pytest.TempPathFactory,
                      trained_toy: Trained) -> Callable[[str], Applied]:
    """`toy_apply("twn.tq")`: `ternqc apply` of `configs/<name>` to the trained toy model, once per recipe."""

    def get(name: str) -> Applied:
        def make() -> Applied:
            rules = CONFIGS / name
            out_dir = tmp_path_factory.mktemp("apply-" + name.replace(".", "-"))
            run = run_cli("apply", "--model", "toy", "--ckpt", trained_toy.ckpt, "--rules", rules,
                          "--out", out_dir, "--explain", "--no-progress")
            assert run.rc == 0, run
            return Applied(out_dir, run, rules)

        return _once(("toy_apply", name), make)

    return get


# ---------------------------------------------------------------------------------------------------------
# Independent references (MASE's definitions, shared/MASE.md; the quantiser of issue 4)
# ---------------------------------------------------------------------------------------------------------


class MaseToy(nn.Module):
    """MASE's 2023 `toy`: Sequential(Linear(4,100), ReLU, Linear(100,100), ReLU, Linear(100,2)) applied to
    x.view(B, -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq_blocks = nn.Sequential(nn.Linear(4, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                        nn.Linear(100, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq_blocks(x.view(x.size(0), -1))


def load_like_mase(ckpt: Path) -> MaseToy:
    """MASE's `--load-type pl`: torch.load(weights_only=True), drop the first dotted part of each key of
    `state_dict`, load strictly into a fresh toy model (eval mode)."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = {".".join(k.split(".")[1:]): v for k, v in raw["state_dict"].items()}
    model = MaseToy()
    model.load_state_dict(state, strict=True)
    return model.eval()


def toy_tiny(split: str) -> tuple[torch.Tensor, np.ndarray]:
    """MASE's toy-tiny split: RandomState(seed) (train 0, validation 1, test 2), 512 rows uniform in [-5, 5),
    label = row sum > 0; inputs as float32 [512, 1, 2, 2]."""
    seed = {"train": 0, "validation": 1, "test": 2}[split]
    data = (np.random.RandomState(seed).rand(512, 4) - 0.5) * 10
    labels = (data.sum(axis=1) > 0).astype(np.int64)
    return torch.tensor(data, dtype=torch.float32).reshape(-1, 1, 2, 2), labels


def accuracy_of(model: nn.Module, inputs: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(inputs).argmax(dim=1).numpy() == labels).mean())


def toy_layer_inputs(model: MaseToy, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """The float input of every block of the toy network (`seq_blocks_0` ... `seq_blocks_4`) on `inputs`,
    computed layer by layer (no hooks), as float32 numpy arrays."""
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        h = inputs.view(inputs.size(0), -1)
        for i, block in enumerate(model.seq_blocks):
            out[f"seq_blocks_{i}"] = h.numpy().copy()
            h = block(h)
    return out


def np_threshold(t: np.ndarray, *, mean: float | None = None, median: float | None = None,
                 maximum: float | None = None, threshold: float | None = None) -> float:
    """Issue 4's Δ: t_threshold, else 0.75|mean|, else 0.75|median|, else 0.05|max| (unset or 0 skipped)."""
    if threshold is not None:
        return threshold
    for value, factor in ((mean, 0.75), (median, 0.75), (maximum, 0.05)):
        if value is not None and value != 0:
            return factor * abs(value)
    raise AssertionError("no threshold source")


def np_ternarize(x: np.ndarray, delta: Any) -> np.ndarray:
    """+1 where x > Δ, -1 where x < -Δ, else 0."""
    return (x > delta).astype(np.float64) - (x < -np.asarray(delta)).astype(np.float64)


def np_alpha(x: np.ndarray, delta: float) -> float:
    """Mean of |x| over |x| > Δ (0 when none)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    sel = a[a > delta]
    return float(sel.mean()) if sel.size else 0.0
