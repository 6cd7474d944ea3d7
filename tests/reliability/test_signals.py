"""Interrupted and cut-off runs in real processes: signals in the write phase of `apply`, a signal while the
interpreter exits, a reader that closes the pipe.

The write phase is interrupted at chosen steps through the writer's test hook (`TERNQC_TEST_SIGNAL_AT=
STEP:SIGNAL`: the process signals itself right after writing that file, before the swap, or right after it),
not with sleeps. Each run starts from a complete previous output set (`--seed 1`) and would write a different
one (`--seed 2`); afterwards the folder must hold exactly one of the two, byte for byte, never a mix, and no
temporary file may remain (after SIGKILL the next run removes it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ternqc.runtime.io.outputs import FAULT_ENV
from tests.test_cli_support import (
    APPLY_OUTPUTS,
    CONFIGS,
    REPO,
    Trained,
    run_cli,
    trained_toy_fixture,  # noqa: F401 - registers the session fixture trained_toy
)

_SETS: dict[str, dict[str, bytes]] = {}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _apply_args(ckpt: Path, out: Path, seed: int) -> list[str]:
    return ["apply", "--ckpt", str(ckpt), "--seed", str(seed), "--out", str(out), "--no-progress"]


@pytest.fixture(name="output_sets")
def output_sets_fixture(trained_toy: Trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The complete output sets of seeds 1 (the previous set) and 2 (the new one), made in-process once."""
    if not _SETS:
        for name, seed in (("old", 1), ("new", 2)):
            out = tmp_path_factory.mktemp("sets") / name
            run = run_cli(*_apply_args(trained_toy.ckpt, out, seed))
            assert run.rc == 0, run.err
            _SETS[name] = _files(out)
        assert set(_SETS["old"]) == set(APPLY_OUTPUTS)
        assert _SETS["old"]["stats.toml"] != _SETS["new"]["stats.toml"]  # the two sets can be told apart
    return _SETS


def _ternqc(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ternqc", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
        **kwargs,
    )


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "out")


CUTS = [
    ("stats.toml", "INT", "old"),
    ("ternary.ckpt", "TERM", "old"),
    ("report.json", "KILL", "old"),
    ("commit", "INT", "old"),
    ("commit", "KILL", "old"),
    ("committed", "TERM", "new"),
    ("committed", "KILL", "new"),
]


@pytest.mark.parametrize(("step", "sig", "expected"), CUTS, ids=[f"{s}-{g}" for s, g, _ in CUTS])
def test_apply_killed_in_the_write_phase_leaves_one_whole_set(
    step: str, sig: str, expected: str, trained_toy: Trained, output_sets: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name, content in output_sets["old"].items():
        (out / name).write_bytes(content)
    (out / "best.ckpt").write_bytes(b"someone else's file in the folder")  # carried over by every swap

    run = _ternqc(*_apply_args(trained_toy.ckpt, out, 2), env={FAULT_ENV: f"{step}:{sig}"})

    signum = getattr(signal, f"SIG{sig}")
    assert run.returncode == (-signum if sig == "KILL" else 128 + signum), run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    if sig != "KILL":
        assert run.stderr.strip().splitlines()[-1] in ("ternqc: interrupted", "ternqc: terminated"), (
            run.stderr
        )
    got = _files(out)
    assert got.pop("best.ckpt") == b"someone else's file in the folder"
    assert got == output_sets[expected]  # one whole set, never a mix
    if sig == "KILL":
        assert _leftovers(tmp_path), "SIGKILL cannot clean up: the temporary folder stays until the next run"
        rerun = run_cli(*_apply_args(trained_toy.ckpt, out, 2))
        assert rerun.rc == 0, rerun.err
        got = _files(out)
        got.pop("best.ckpt")
        assert got == output_sets["new"]  # byte-identical to the in-process run: ternary.ckpt included
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", ["INT", "TERM", "KILL"])
def test_compile_output_signalled_before_its_rename(tmp_path: Path, sig: str) -> None:
    """`compile -o` stopped with the new plan written beside the old one, just before the rename: the old
    plan stays; a SIGKILL's temporary file is removed by the next write."""
    out = tmp_path / "plan.json"
    out.write_text("previous plan")
    rules = str(CONFIGS / "toy_ternary.tq")
    run = _ternqc("compile", rules, "-o", str(out), env={FAULT_ENV: f"replace:plan.json:{sig}"})
    signum = getattr(signal, f"SIG{sig}")
    assert run.returncode == (-signum if sig == "KILL" else 128 + signum), run.stderr
    assert "Traceback" not in run.stderr
    assert out.read_text() == "previous plan"
    leftovers = [p.name for p in tmp_path.iterdir() if p != out]
    assert len(leftovers) == (1 if sig == "KILL" else 0), leftovers
    assert _ternqc("compile", rules, "-o", str(out)).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"] and out.read_text().startswith("{")


def test_sigint_while_exiting_is_exit_130_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C that lands in an exit handler (after the work is done): exit 130, no 'Exception ignored'."""
    code = (
        "import atexit, os, signal\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), [None for _ in range(10**6)]))\n"
        "from ternqc.cli import entry\n"
        "entry()\n"
    )
    out = tmp_path / "plan.json"
    run = subprocess.run(
        [sys.executable, "-c", code, "compile", str(CONFIGS / "toy_ternary.tq"), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 130, run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    assert out.read_text().startswith("{")  # the work was done before the signal


def test_ctrl_c_during_calibration_with_two_workers(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group (ternqc, the fork server, both workers) once the workers read
    data: exit 130, one line, no traceback from any process, no worker left running."""
    import time

    from tests.reliability.support import FACTORIES

    marker = tmp_path / "workers-started"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ternqc",
            "profile",
            "--workers",
            "2",
            "--dataset",
            f"{FACTORIES}:slow_in_workers",
            "--samples",
            "2048",
            "--batch-size",
            "64",
            "--no-progress",
            "--out",
            str(tmp_path / "s.toml"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
        env={**os.environ, "RELIABILITY_MARKER": str(marker)},
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # waiting for the workers to start reading, not for a guessed moment
    assert marker.exists(), proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "ternqc: interrupted", err
    assert not (tmp_path / "s.toml").exists()
    with pytest.raises(ProcessLookupError):  # the group is gone: no worker or server left behind
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.2)


def _closed_reader(*args: str) -> subprocess.CompletedProcess:
    """`ternqc ARGS | head -0`: the reader closes its end before ternqc writes anything."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ternqc", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        text=True,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, "", err)


def test_compile_into_a_closed_pipe(tmp_path: Path) -> None:
    run = _closed_reader("compile", str(CONFIGS / "toy_ternary.tq"))
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


def test_apply_explain_into_a_closed_pipe_still_writes_every_output(
    trained_toy: Trained, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = _closed_reader(*_apply_args(trained_toy.ckpt, out, 2), "--explain")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(APPLY_OUTPUTS)  # committed before printing


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    """What a SIGKILLed run leaves (a temporary folder, a temporary file of a single-file write) is removed
    by the next write there; a live process's temporaries are left alone."""
    from ternqc.runtime.io.atomic import atomic_write_text
    from ternqc.runtime.io.outputs import write_output_set

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (tmp_path / f".out.{pid}.abcd1234.ternqc-tmp").mkdir()
    (tmp_path / f".s.toml.{pid}.abcd1234.tmp").write_text("half")
    alive = tmp_path / f".out.{os.getppid()}.abcd1234.ternqc-tmp"
    alive.mkdir()
    write_output_set(tmp_path / "out", [("a.txt", lambda p: atomic_write_text(p, "a"))])
    atomic_write_text(tmp_path / "s.toml", "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "s.toml", alive.name])
    shutil.rmtree(alive)
