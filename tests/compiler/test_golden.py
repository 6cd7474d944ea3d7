"""Golden plans: every `tests/data/ok/NAME.tq` compiles, without warnings, to `NAME.plan.json`.

The expected plans are written by the compiler itself (`--regen-golden`) and reviewed, never by hand; what
they must mean is pinned independently in test_semantics.py and test_toy_recipe.py. Files are compiled
from inside `tests/data/ok/` so that origins read `NAME.tq`.
"""

from __future__ import annotations

import importlib.resources
import json

import pytest

from ternqc.compiler import builtin_recipe, compile_file
from ternqc.plan import Plan

from .conftest import OK_DIR

OK_FILES = sorted(p.name for p in OK_DIR.glob("*.tq"))


def test_there_are_goldens() -> None:
    assert {"toy_ternary.tq", "issue_examples.tq"} <= set(OK_FILES)


@pytest.mark.parametrize("name", OK_FILES)
def test_golden_plan(name: str, monkeypatch: pytest.MonkeyPatch, regen_golden: bool) -> None:
    monkeypatch.chdir(OK_DIR)
    compiled = compile_file(name)
    assert compiled.warnings == ()
    golden = OK_DIR / (name[: -len(".tq")] + ".plan.json")
    if regen_golden:
        golden.write_text(compiled.plan.to_json(), encoding="utf-8")
    assert golden.exists(), f"no golden plan for {name}: run pytest tests/compiler --regen-golden"
    expected = json.loads(golden.read_text(encoding="utf-8"))
    assert compiled.plan.to_dict() == expected
    assert Plan.from_dict(expected) == compiled.plan


def test_toy_golden_is_the_shipped_recipe() -> None:
    """tests/data/ok/toy_ternary.tq links to configs/toy_ternary.tq: the golden is of the shipped file."""
    assert (OK_DIR / "toy_ternary.tq").read_bytes() == builtin_recipe().read_bytes()


SHIPPED = sorted(p.name for p in importlib.resources.files("ternqc.configs").iterdir() if p.name.endswith(".tq"))


@pytest.mark.parametrize("recipe", SHIPPED)
def test_shipped_recipes_compile_without_warnings(recipe: str) -> None:
    assert compile_file(builtin_recipe(recipe)).warnings == ()


def test_builtin_recipe_unknown_name_lists_the_shipped_ones() -> None:
    with pytest.raises(FileNotFoundError, match="toy_ternary.tq"):
        builtin_recipe("no_such_recipe.tq")
