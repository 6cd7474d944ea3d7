"""`--workers 2` (issue 13): a user's model and dataset files work (the parent reads back a result whose
classes live in those files), and a worker's failure reaches the user as one message from the parent."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.support import FACTORIES, assert_clean_failure, assert_intact, seed_outputs
from tests.test_cli_support import APPLY_OUTPUTS, FIXTURES, run_cli

QUICK = ["--no-progress", "--samples", "32", "--batch-size", "16"]


def test_apply_with_user_files_and_two_workers(tmp_path: Path) -> None:
    from tests.test_cli_apply import USER_RULES

    rules = tmp_path / "user.tq"
    rules.write_text(USER_RULES)
    out = tmp_path / "out"
    run = run_cli(
        "apply",
        "--rules",
        rules,
        "--model",
        f"{FIXTURES / 'user_model.py'}:factory",
        "--dataset",
        f"{FIXTURES / 'user_data.py'}:factory",
        "--workers",
        "2",
        "--out",
        out,
        *QUICK,
    )
    assert run.rc == 0, run.err
    assert sorted(p.name for p in out.iterdir()) == sorted(APPLY_OUTPUTS)


def test_a_workers_data_error_is_its_message(tmp_path: Path) -> None:
    before = seed_outputs(tmp_path)
    run = run_cli(
        "profile",
        "--dataset",
        f"{FACTORIES}:item_raises",
        "--workers",
        "2",
        "--out",
        tmp_path / "o.toml",
        *QUICK,
        "--samples",
        "64",
    )
    assert_clean_failure(run, 1, ("calibration batch", "sample 7 is corrupt"))
    assert_intact(tmp_path, before)


def test_a_killed_worker_is_named(tmp_path: Path) -> None:
    before = seed_outputs(tmp_path)
    run = run_cli(
        "apply",
        "--model",
        f"{FACTORIES}:toy_killed_in_rank_1",
        "--workers",
        "2",
        "--out",
        tmp_path / "out",
        *QUICK,
    )
    assert_clean_failure(run, 1, ("worker 1 of 2", "SIGKILL"))
    assert_intact(tmp_path, before)


def test_a_workers_unexpected_exception_is_its_message(tmp_path: Path) -> None:
    before = seed_outputs(tmp_path)
    run = run_cli(
        "profile",
        "--model",
        f"{FACTORIES}:toy_bug_in_rank_1",
        "--workers",
        "2",
        "--out",
        tmp_path / "o.toml",
        *QUICK,
    )
    assert_clean_failure(run, 1, ("no_such_attribute",))
    assert_intact(tmp_path, before)
