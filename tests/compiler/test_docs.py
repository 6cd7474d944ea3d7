"""Every rules example in docs/LANGUAGE.md (the ```tq blocks) compiles as written.

Examples are compiled as if they sat in configs/, next to the shipped toy_ternary.tq they may include.
"""

from __future__ import annotations

import re

import pytest

from ternqc.compiler import compile_source

from .conftest import REPO

DOC = (REPO / "docs" / "LANGUAGE.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```tq\n(.*?)^```$", DOC, re.MULTILINE | re.DOTALL)


def test_the_reference_has_examples() -> None:
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_doc_example_compiles(block: str) -> None:
    compiled = compile_source(block, str(REPO / "configs" / "doc_example.tq"))
    assert compiled.plan.bindings or compiled.plan.profile or "calibrate" in block
