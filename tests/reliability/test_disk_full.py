"""A full disk in the middle of a write, made real with a file-size limit (`RLIMIT_FSIZE`): the kernel
refuses every byte past the limit (EFBIG) exactly as a full disk refuses them (ENOSPC), inside torch's zip
writer as well. Every command fails with one message and leaves the previous outputs whole.
"""

from __future__ import annotations

import contextlib
import resource
import signal
from pathlib import Path

import pytest

from tests.reliability.support import assert_clean_failure, assert_intact, seed_outputs, snapshot
from tests.test_cli_support import CONFIGS, run_cli


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files written in this block cannot grow past `limit` bytes (SIGXFSZ ignored: writes fail instead)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


# The toy's outputs: stats.toml ~7 KB, quant_config.toml ~3 KB, ternary.ckpt ~100 KB, report.json ~3 KB.
@pytest.mark.parametrize(
    ("limit", "words"),
    [
        (1000, ("stats.toml", "too large")),
        (20_000, ("ternary.ckpt", "the disk is full or the file is too large")),
    ],
)
def test_apply_on_a_full_disk(tmp_path: Path, limit: int, words: tuple[str, ...]) -> None:
    before = seed_outputs(tmp_path)
    with file_size_limit(limit):
        run = run_cli(
            "apply", "--no-progress", "--samples", "32", "--batch-size", "32", "--out", tmp_path / "out"
        )
    assert_clean_failure(run, 1, words)
    assert_intact(tmp_path, before)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_compile_on_a_full_disk_keeps_the_previous_plan(tmp_path: Path) -> None:
    before = seed_outputs(tmp_path)
    with file_size_limit(200):
        run = run_cli("compile", CONFIGS / "toy_ternary.tq", "-o", tmp_path / "o.json")
    assert_clean_failure(run, 1, ("cannot write plan", "o.json", "too large"))
    assert snapshot(tmp_path) == before


def test_map_and_profile_on_a_full_disk(tmp_path: Path) -> None:
    before = seed_outputs(tmp_path)
    with file_size_limit(500):
        run = run_cli(
            "profile", "--no-progress", "--samples", "32", "--batch-size", "32", "--out", tmp_path / "o.toml"
        )
    assert_clean_failure(run, 1, ("o.toml", "too large"))
    assert snapshot(tmp_path) == before
