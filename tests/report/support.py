"""Shared by the report tests; holds no tests. `applied_with_report` runs `ternqc apply --report` of the
built-in recipe once per session; `page_numbers` reads the numbers a page marks with `data-field`."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.test_cli_support import CliRun, Trained, _once, run_cli


class Reported(NamedTuple):
    out_dir: Path
    run: CliRun


@pytest.fixture(scope="session", name="applied_with_report")
def applied_with_report_fixture(tmp_path_factory: pytest.TempPathFactory, trained_toy: Trained) -> Reported:
    """`ternqc apply --model toy --ckpt <trained> --out <tmp> --report`, once."""

    def make() -> Reported:
        out = tmp_path_factory.mktemp("apply-report")
        run = run_cli(
            "apply", "--model", "toy", "--ckpt", trained_toy.ckpt, "--out", out, "--report", "--no-progress"
        )
        assert run.rc == 0, run
        return Reported(out, run)

    return _once("applied_with_report", make)


class _Numbers(HTMLParser):
    """Collects the text of every element with a `data-field`, keyed by (field, node, tensor, row)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[tuple, list[str]] = {}
        self._open: list[tuple | None] = []
        self.images: list[dict[str, str | None]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(a)
            return
        key = (
            (a["data-field"], a.get("data-node"), a.get("data-tensor"), a.get("data-row"))
            if "data-field" in a
            else None
        )
        self._open.append(key)
        if key is not None:
            self.found.setdefault(key, []).append("")

    def handle_endtag(self, tag: str) -> None:
        if tag != "img" and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for key in self._open:
            if key is not None:
                self.found[key][-1] += data


def parse_page(text: str) -> _Numbers:
    parser = _Numbers()
    parser.feed(text)
    return parser


def number(text: str) -> float:
    """The leading number of a cell: `0.3245`, `49.8%` (→ 0.498), `0.02345 mean of ...`."""
    import re

    match = re.match(r"\s*([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)(%?)", text)
    assert match, text
    value = float(match.group(1))
    return value / 100 if match.group(2) else value
