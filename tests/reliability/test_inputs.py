"""`ternqc.inputs`: what is refused before reading, and the nesting check against the parsers' own view of
the nesting (hypothesis: random nested values with brackets, quotes, escapes and `#` inside strings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternqc import inputs

tricky_text = st.text(alphabet="[]{}\"\\'#\n ab", max_size=6)
nested = st.recursive(
    st.one_of(st.integers(-5, 5), tricky_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(tricky_text, inner, max_size=2)),
    max_leaves=15,
)
arrays = st.recursive(
    st.one_of(st.integers(-5, 5), tricky_text), lambda inner: st.lists(inner, max_size=3), max_leaves=15
)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _refused(text: str, limit: int, syntax: str) -> bool:
    try:
        inputs.check_nesting(text, "x", limit, syntax)
    except ValueError:
        return True
    return False


@settings(max_examples=200, deadline=None)
@given(value=nested, limit=st.integers(0, 6))
def test_json_nesting_is_the_parsed_depth(value: Any, limit: int) -> None:
    text = json.dumps(value)
    assert _refused(text, limit, "json") == (_depth(value) > limit)


@settings(max_examples=200, deadline=None)
@given(value=arrays, limit=st.integers(1, 6), comment=tricky_text.filter(lambda t: "\n" not in t))
def test_toml_nesting_is_the_parsed_depth(value: Any, limit: int, comment: str) -> None:
    from ternqc.runtime.io.mase_io import tomllib

    text = f"# {comment}\nx = {json.dumps([value])} # {comment}\n"
    assert tomllib.loads(text)["x"] == [value]  # the text is TOML and means what was drawn
    assert _refused(text, limit, "toml") == (_depth([value]) > limit)


def test_the_refusal_names_line_and_column() -> None:
    with pytest.raises(ValueError, match=r"^p.json:3:7: nested deeper than 2 levels"):
        inputs.check_nesting('{"a": "[[[",\n "b": 1,\n "c":[[[1]]]}', "p.json", 2)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "too-large"])
def test_refused_before_reading(tmp_path: Path, kind: str) -> None:
    path = {
        "fifo": tmp_path / "f",
        "dev-zero": Path("/dev/zero"),
        "folder": tmp_path,
        "too-large": tmp_path / "big",
    }[kind]
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: a blocking open would hang the test
    if kind == "too-large":
        path.write_bytes(b"x" * 101)
    with pytest.raises(inputs.InputError) as caught:
        inputs.read_bytes(path, "plan", limit=100)
    words = {
        "fifo": "FIFO",
        "dev-zero": "character device",
        "folder": "directory",
        "too-large": "larger than",
    }
    assert words[kind] in str(caught.value)
    assert caught.value.strerror == str(caught.value)  # callers report OSError.strerror


def test_compile_with_an_output_still_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom ternqc.cli import main\n"
        f"assert main(['compile', 'configs/toy_ternary.tq', '-o', {str(tmp_path / 'p.json')!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'ternqc compile -o imported torch'\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    assert run.returncode == 0, run.stderr
