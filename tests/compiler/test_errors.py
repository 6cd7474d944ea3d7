"""Bad rules files: `tests/data/errors/NAME.tq`, each with `# E: <message fragment>` on every line that
must get an error (mypy's test-data style).

For each file: `compile_file` reports exactly those errors (at those lines, each with its fragment in
"message; hint"), and `ternqc compile` exits 1 with `file:line:col` on stderr and no traceback.
Files under `errors/includes/` are helpers that the tests include, not cases of their own.
"""

from __future__ import annotations

import re

import pytest

from ternqc.cli import main
from ternqc.compiler import CompileError, compile_file

from .conftest import ERRORS_DIR

ERROR_FILES = sorted(p.name for p in ERRORS_DIR.glob("*.tq"))
_EXPECT = re.compile(r"#\s*E:\s*(?P<fragment>.+?)\s*$")


def _expected(name: str) -> list[tuple[int, str]]:
    lines = (ERRORS_DIR / name).read_text(encoding="utf-8").splitlines()
    return [(i, m["fragment"]) for i, line in enumerate(lines, 1) if (m := _EXPECT.search(line))]


def test_there_are_enough_error_files() -> None:
    assert len(ERROR_FILES) >= 30
    assert all(_expected(name) for name in ERROR_FILES), "every error file marks its errors with # E:"


@pytest.mark.parametrize("name", ERROR_FILES)
def test_error_file(name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ERRORS_DIR)
    expected = _expected(name)
    with pytest.raises(CompileError) as info:
        compile_file(name)
    found = [(d.span.file, d.span.line, f"{d.message}; {d.hint}") for d in info.value.diagnostics]
    assert all(d.is_error for d in info.value.diagnostics)
    for line, fragment in expected:
        assert any(f == name and ln == line and fragment in text for f, ln, text in found), (
            f"{name}:{line}: no error containing {fragment!r}; got {found}"
        )
    assert len(found) == len(expected), f"unexpected extra errors: {found}"

    assert main(["compile", name]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    for line, _fragment in expected:
        assert re.search(rf"^{re.escape(name)}:{line}:\d+: error: ", err, re.MULTILINE), err
    assert out == ""
