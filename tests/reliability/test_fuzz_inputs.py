"""Hypothesis: statistics TOML and plans, valid and corrupted, give a result or one clean error, never a
crash (issue 13).

Statistics files start from a real one (`ternqc profile` on the toy model) and are corrupted by
hypothesis: a field's value replaced by any TOML value (huge, non-finite, ragged, empty, nested, strings),
bytes replaced by TOML punctuation, the text cut short. `ternqc map` must exit 0 or 1 with one message.
Plans start from the compiled default recipe; hypothesis replaces any part of the JSON by any JSON value or
deletes it, or cuts the text. Reading the plan and mapping it against real statistics must give a result or
a `UserError`, and the compile summary of a plan that reads must print.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import toml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ternqc.cli import main
from ternqc.commands import load_plan
from ternqc.compiler import compile_file
from ternqc.render import summarize
from ternqc.runtime.errors import UserError
from tests.test_cli_support import CONFIGS, run_cli

RECIPE = CONFIGS / "toy_ternary.tq"
_BASE: dict[str, Any] = {}


def _base_stats() -> str:
    if "stats" not in _BASE:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "s.toml"
            run = run_cli("profile", "--no-progress", "--samples", "32", "--batch-size", "32", "--out", out)
            assert run.rc == 0, run.err
            _BASE["stats"] = out.read_text()
    return _BASE["stats"]


def _run(*argv: Any) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Statistics TOML
# ---------------------------------------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
)
toml_values = st.recursive(
    st.one_of(numbers, st.booleans(), st.text(max_size=5), st.just([])),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


@st.composite
def stats_files(draw) -> str:
    text = _base_stats()
    for _ in range(draw(st.integers(0, 3))):
        # positions are found again after each replacement: a replaced value changes the offsets after it
        fields = [m.start() for m in re.finditer(r"(?m)^(min|max|count|mean|abs_mean) = ", text)]
        start = draw(st.sampled_from(fields))
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        key = text[start:end].split(" = ")[0]
        text = text[:start] + f"{key} = {_toml_value(draw(toml_values))}" + text[end:]
    kind = draw(st.sampled_from(["values", "punctuation", "truncate"]))
    if kind == "punctuation":
        at = draw(st.integers(0, len(text) - 1))
        junk = draw(st.text(alphabet="[]{}=\",.#\n'\\x0a", min_size=1, max_size=6))
        text = text[:at] + junk + text[at + draw(st.integers(0, 4)) :]
    elif kind == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    return text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=stats_files())
def test_any_statistics_file_maps_or_fails_cleanly(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "s.toml", Path(tmp) / "q.toml"
        path.write_text(text, encoding="utf-8")
        rc, err = _run("map", path, "-o", out)
        assert rc in (0, 1), err
        assert "Traceback" not in err
        if rc == 0:
            toml.loads(out.read_text())  # what was written reads back
        else:
            assert not out.exists() and err.strip(), err


# ---------------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=10,
)


def _base_plan() -> dict:
    if "plan" not in _BASE:
        _BASE["plan"] = json.loads(compile_file(RECIPE).plan.to_json())
    return json.loads(json.dumps(_BASE["plan"]))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


@st.composite
def plan_texts(draw) -> str:
    plan = _base_plan()
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(plan)[1:]))
        parent = plan
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    text = json.dumps(plan, allow_nan=True)
    if draw(st.integers(0, 4)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=plan_texts())
def test_any_plan_reads_and_maps_or_fails_cleanly(text: str) -> None:
    import tomllib

    from ternqc.runtime.io.mase_io import stats_from_dict
    from ternqc.runtime.quantize.mapping import map_params

    table = stats_from_dict(tomllib.loads(_base_stats()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.json"
        path.write_text(text, encoding="utf-8")
        try:
            plan, _ = load_plan(None, str(path))
        except UserError:
            return
    summarize(plan)
    with contextlib.suppress(UserError):
        map_params(plan, table, by_node_name=True)
