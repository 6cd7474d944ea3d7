"""Hypothesis: no text makes the compiler fail other than with `CompileError`, and compiled plans
round-trip through JSON.

Random text and mutations of the shipped recipe (characters and tokens deleted, inserted, replaced) go to
`compile_source`; valid programs built from the language's pieces must compile, round-trip, and collect every
statistic they read. Rules are compiled as if in a folder that does not exist, so includes find nothing.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ternqc import plan
from ternqc.compiler import CompileError, compile_source

from .conftest import OK_DIR

FILENAME = "/nonexistent-ternqc-fuzz/rules.tq"
TOY = (OK_DIR / "toy_ternary.tq").read_text(encoding="utf-8")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKENS = [
    "{", "}", "(", ")", "[", "]", ",", ".", "=", ":", "-", "+", "*", "/", "#", '"', "'", "\n", " ",
    "stat", "profile", "include", "calibrate", "default", "linear", "relu", "na", "true", "false", "all",
    "none", "data_in", "data_in_7", "weight", "bias", "data_out", "range_quantile", "abs_mean", "max", "min",
    "abs", "quantile = 2", "dims = [0, 1.5]", "dims = none", "1e999", "0", "-0.5", '"seq_blocks.*"',
    'include "toy_ternary.tq"', "weight_width = 8", "name", '"ternary"', "threshold_abs_mean", "\x00", "é",
    "9" * 40, "stat(weight).", ".max", "data_in_scaling_factor = true",
]
LARK_WORDS = re.compile(r"__ANON|\$END|\b(?:LPAR|RPAR|LBRACE|RBRACE|LSQB|RSQB|COMMA|DOT|EQUAL|COLON|PLUS|"
                        r"MINUS|STAR|SLASH|CNAME|ESCAPED_STRING)\b")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _compile_or_error(text: str) -> None:
    try:
        compile_source(text, FILENAME)
    except CompileError as exc:
        assert exc.diagnostics
        for d in exc.diagnostics:
            assert d.is_error
            assert not LARK_WORDS.search(_QUOTED.sub("", d.message) + " " + _QUOTED.sub("", d.hint)), d.render()
        assert exc.render()


@FUZZ
@given(st.text(alphabet=st.sampled_from(sorted(set("".join(TOKENS)) | set("abcxyz_0123456789 \t"))), max_size=200))
def test_random_characters(text: str) -> None:
    _compile_or_error(text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_random_tokens(tokens: list[str]) -> None:
    _compile_or_error(" ".join(tokens))


_EDIT = st.tuples(
    st.sampled_from(["delete", "insert", "replace", "delete_token"]),
    st.floats(0, 1, allow_nan=False),
    st.integers(1, 12),
    st.sampled_from(TOKENS),
)
_TOKEN_RE = re.compile(r"\w+|\S")


@FUZZ
@given(st.lists(_EDIT, min_size=1, max_size=6))
def test_mutated_recipe(edits: list[tuple[str, float, int, str]]) -> None:
    text = TOY
    for op, where, n, token in edits:
        at = int(where * len(text))
        if op == "delete":
            text = text[:at] + text[at + n :]
        elif op == "insert":
            text = text[:at] + token + text[at:]
        elif op == "replace":
            text = text[:at] + token + text[at + n :]
        else:
            spans = [m.span() for m in _TOKEN_RE.finditer(text)]
            if spans:
                a, b = spans[min(int(where * len(spans)), len(spans) - 1)]
                text = text[:a] + text[b:]
    _compile_or_error(text)


# --- valid programs: compile, round-trip, collect what they read -----------------------------------------

SELECTORS = {
    "default": ("data_in", "weight", "bias"),
    "linear": ("data_in", "weight", "bias"),
    "conv2d": ("data_in", "weight", "bias"),
    "relu": ("data_in",),
    '"seq_blocks.0"': ("data_in", "weight", "bias"),
    '"seq_blocks.*"': ("data_in", "weight", "bias"),
}
OPTIONS = {
    "dims": st.sampled_from(["all", "none", "[0]", "[1, -1]"]),
    "abs": st.sampled_from(["true", "false"]),
}
OWN = {"quantile": st.sampled_from(["0", "0.5", "0.99", "1"]), "num_sigma": st.sampled_from(["1", "2.5"])}


@st.composite
def stat_call(draw: st.DrawFn) -> tuple[str, str]:
    """(`STAT(options)`, STAT)."""
    name = draw(st.sampled_from(sorted(plan.STATISTICS)))
    keys = [*OPTIONS, *plan.STATISTICS[name].option_defaults()]
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    opts = ", ".join(f"{k} = {draw({**OPTIONS, **OWN}[k])}" for k in chosen)
    return (f"{name}({opts})" if chosen or draw(st.booleans()) else name), name


@st.composite
def number_expr(draw: st.DrawFn, tensors: tuple[str, ...], depth: int = 0) -> str:
    kind = draw(st.sampled_from(["number", "stat"] + (["binop", "neg", "call"] if depth < 3 else [])))
    if kind == "number":
        return draw(st.sampled_from(["0.7", "2", "1e-3", "0.0097", "100"]))
    if kind == "stat":
        call, name = draw(stat_call())
        field = draw(st.sampled_from(plan.STATISTICS[name].fields))
        tensor = draw(st.sampled_from([None, *tensors]))
        return f"stat{'' if tensor is None else f'({tensor})'}.{call}.{field}"
    if kind == "neg":
        return "-" + draw(number_expr(tensors, depth + 1))
    if kind == "call":
        fn = draw(st.sampled_from(["abs", "min", "max"]))
        n = 1 if fn == "abs" else draw(st.integers(1, 3))
        return f"{fn}({', '.join(draw(number_expr(tensors, depth + 1)) for _ in range(n))})"
    op = draw(st.sampled_from(["+", "-", "*", "/"]))
    return f"({draw(number_expr(tensors, depth + 1))} {op} {draw(number_expr(tensors, depth + 1))})"


@st.composite
def statement(draw: st.DrawFn) -> str:
    sel = draw(st.sampled_from(sorted(SELECTORS)))
    tensors = SELECTORS[sel]
    kind = draw(st.sampled_from(["profile", "binding", "calibrate"]))
    if kind == "calibrate":
        return f"calibrate {{ samples = {draw(st.integers(1, 999))} }}"
    if kind == "profile":
        calls = draw(st.lists(stat_call(), min_size=1, max_size=3, unique_by=lambda c: c[0]))
        return f"profile {sel}.{draw(st.sampled_from(tensors))}: {', '.join(c for c, _ in calls)}"
    tensor = draw(st.sampled_from(tensors))
    suffix = draw(st.sampled_from(sorted(plan.PARAM_SUFFIXES)))
    literals = {"width": ["2", "32", "na"], "frac_width": ["0", "4"], "scaling_factor": ["true", "false"],
                "quantiser": ['"ternary"', '"integer"', '"binary"', "na"], "group_size": ["4", "64"],
                "per_channel": ["true", "false"], "dynamic": ["true", "false"]}
    value = st.sampled_from(literals[suffix]) if suffix in literals else st.one_of(st.just("na"), number_expr(tensors))
    return f"{sel}.{tensor}_{suffix} = {draw(value)}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(statement(), max_size=10))
def test_valid_programs_round_trip_and_collect_what_they_read(statements: list[str]) -> None:
    text = "\n".join(statements)
    try:
        compiled = compile_source(text, FILENAME)
    except CompileError as exc:
        # the generator does not avoid duplicate profile entries, statistics collected with different
        # options and then read without saying which, or a divisor that is literally zero
        allowed = ("ambiguous", "listed twice", "division by zero")
        assert all(any(a in d.message for a in allowed) for d in exc.diagnostics), exc.render()
        assume(False)
        return
    p = compiled.plan
    assert plan.Plan.from_json(p.to_json()) == p
    assert plan.Plan.from_json(p.to_json()).to_dict() == p.to_dict()
    for b in p.bindings:
        for r in plan.expr_stat_refs(b.value):
            assert any(
                q.tensor == r.tensor
                and r.stat in q.stats
                and (q.selector == b.selector or (q.selector.kind == "default" and b.selector.kind == "type"))
                for q in p.profile
            ), (text, b)
        if b.param == "data_in_scaling_factor" and b.value == plan.Const(True):
            assert any(q.reason == "derived" and q.selector == b.selector for q in p.profile)
