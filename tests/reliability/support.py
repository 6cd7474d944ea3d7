"""Shared by the reliability tests: the hostile-input case type, previous outputs to protect, and checks.

A `Case` is one hostile input: the command line (built in a fresh folder), the exit code and the words its
message must hold. `seed_outputs(folder)` puts recognisable previous outputs where every command writes, and
`assert_intact(folder, before)` checks that a failed command left them byte for byte, with nothing beside.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from tests.test_cli_support import APPLY_OUTPUTS, CliRun

HERE = Path(__file__).resolve().parent
FACTORIES = HERE / "hostile_factories.py"
OLD = b"previous output: must survive a failed run\n"


class Case(NamedTuple):
    """`argv(tmp)` -> the command line; `rc` the exit code; `words` in the message."""

    id: str
    argv: Callable[[Path], list[str]]
    words: tuple[str, ...]
    rc: int = 1


def seed_outputs(tmp: Path) -> dict[str, bytes]:
    """Previous outputs at every place the matrix's commands write: `out/` (apply), `o.json`, `o.toml`,
    `o.ckpt`; returns `{relative path: bytes}`."""
    (tmp / "out").mkdir(exist_ok=True)
    for name in APPLY_OUTPUTS:
        (tmp / "out" / name).write_bytes(OLD + name.encode())
    for name in ("o.json", "o.toml", "o.ckpt"):
        (tmp / name).write_bytes(OLD + name.encode())
    return snapshot(tmp)


def snapshot(tmp: Path) -> dict[str, bytes]:
    """Every regular file under `tmp` (hidden temporaries included), by relative path."""
    found = {}
    for root, _dirs, files in os.walk(tmp):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_fifo():
                found[str(path.relative_to(tmp))] = path.read_bytes()
    return found


def assert_clean_failure(run: CliRun, rc: int, words: tuple[str, ...]) -> None:
    """Exit `rc`, no traceback, and a message (stderr) holding every word (case-insensitive)."""
    assert run.rc == rc, (run.rc, run.err[-2000:])
    assert "Traceback" not in run.err + run.out, run.err
    assert len(run.err) < 5000, f"{len(run.err)} characters of stderr"
    low = run.err.lower()
    for word in words:
        assert word.lower() in low, (word, run.err[-2000:])


def assert_intact(tmp: Path, before: dict[str, bytes]) -> None:
    """The previous outputs are as they were and no temporary file or folder was left in `tmp`."""
    after = snapshot(tmp)
    for name, content in before.items():
        assert after.get(name) == content, f"{name} changed"
    leftovers = [p.name for p in tmp.rglob("*") if p.name.startswith(".") and "tmp" in p.name]
    assert not leftovers, leftovers
