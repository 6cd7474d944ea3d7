"""Fixtures of the compiler tests.

`--regen-golden` (or TERNQC_REGEN_GOLDEN=1) rewrites `tests/data/ok/NAME.plan.json` from the compiler
instead of comparing against it: `pytest tests/compiler --regen-golden`, then review the diff. pytest
registers the flag only when this folder is named on the command line; the variable works either way.
"""

from __future__ import annotations

import os
import pathlib

import pytest

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"
OK_DIR = DATA / "ok"
ERRORS_DIR = DATA / "errors"
REPO = DATA.parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true", help="rewrite tests/data/ok/*.plan.json")


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden", default=False)) or bool(
        os.environ.get("TERNQC_REGEN_GOLDEN")
    )
