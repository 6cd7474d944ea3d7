"""The two halves stay apart: `ternqc compile` never imports torch, the runtime never imports lark.

Each check runs in a fresh interpreter, so what the test process imported does not count.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_compile_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from ternqc.cli import main\n"
        "rc = main(['compile', 'configs/toy_ternary.tq'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'ternqc compile imported torch'\n"
        "assert 'lark' in sys.modules\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "linear" in result.stdout


def test_compiler_modules_do_not_import_torch() -> None:
    modules = sorted(p.stem for p in (REPO / "compiler").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('ternqc.compiler.' + m)\n"
        "assert 'torch' not in sys.modules, 'the compiler imported torch'\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_runtime_does_not_import_lark() -> None:
    modules = sorted(p.stem for p in (REPO / "runtime").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        "import ternqc.runtime\n"
        f"for m in {modules!r}: importlib.import_module('ternqc.runtime.' + m)\n"
        "leaked = sorted(m for m in sys.modules if m == 'lark' or m.startswith('lark.'))\n"
        "assert not leaked, f'the runtime imported {leaked[:3]}'\n"
        "assert 'ternqc.compiler.parse' not in sys.modules\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
