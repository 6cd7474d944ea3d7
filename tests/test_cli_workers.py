"""`--workers 2`: calibration in two local processes gives the same files as one process, byte for byte."""

from __future__ import annotations

from pathlib import Path

from tests.test_cli_support import APPLY_OUTPUTS, CONFIGS, Trained, run_cli
from tests.test_cli_support import toy_apply_fixture as toy_apply  # noqa: F401 - fixtures
from tests.test_cli_support import trained_toy_fixture as trained_toy  # noqa: F401 - fixtures


def test_apply_with_two_workers_writes_what_one_process_writes(toy_apply, trained_toy: Trained,  # noqa: F811
                                                               tmp_path: Path) -> None:
    # ternary_full.tq calibrates on 4 batches (512 samples, batch 128): each worker gets two, and both passes
    # (statistics, then the activation scales) are merged across the processes.
    single = toy_apply("ternary_full.tq").out_dir
    out = tmp_path / "workers"
    run = run_cli("apply", "--ckpt", trained_toy.ckpt, "--rules", CONFIGS / "ternary_full.tq", "--out", out,
                  "--workers", "2", "--no-progress")
    assert run.rc == 0, run.err
    for name in ("stats.toml", "quant_config.toml", "report.json", "ternary.ckpt"):  # byte for byte (issue 13)
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    assert set(APPLY_OUTPUTS) <= {p.name for p in out.iterdir()}


def test_zero_workers_is_a_usage_error(trained_toy: Trained, tmp_path: Path) -> None:  # noqa: F811
    run = run_cli("profile", "--ckpt", trained_toy.ckpt, "--workers", "0", "--out", tmp_path / "s.toml")
    assert run.rc == 1 and "--workers" in run.err and "Traceback" not in run.err
