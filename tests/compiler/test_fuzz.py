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
    # language v2
    "let", "k", "let k = 0.7", "with", "recipe", 'include recipe "twn"', "with { k = 0.5 }", "assert", "model",
    "first", "last", "first(linear)", "last(relu)", "in", 'in "enc.*"', "except", 're"a\\.b"', 're"(("', "re",
    "if", "then", "else", "and", "or", "not", "<", "<=", ">", ">=", "==", "!=", "**", "sqrt", "log2", "clamp",
    "per_channel", "per_tensor", "dims = per_channel", 'stat("seq_blocks.1".data_out)', "stat(first(linear).weight)",
    "weight_zero_fraction", "quantised_accuracy", '"linear[-1]"', '"re:x"',
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


#: Seeds for mutation: the shipped recipe and the language-v2 tasks (unions, lets, asserts, regexes, ...).
SEEDS = [TOY] + [p.read_text(encoding="utf-8") for p in sorted(OK_DIR.glob("task*.tq"))]


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(_EDIT, min_size=1, max_size=6))
def test_mutated_recipe(seed: str, edits: list[tuple[str, float, int, str]]) -> None:
    text = seed
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
    "first(linear)": ("data_in", "weight", "bias"),
    "last(conv2d)": ("data_in", "weight", "bias"),
    'linear in "enc.*"': ("data_in", "weight", "bias"),
    're"enc\\.[01]"': ("data_in", "weight", "bias"),
}
#: Block selector lists (unions with exclusions) and the tensors all their items have.
UNIONS = {
    'linear, conv2d except "enc.0", last(linear)': ("data_in", "weight", "bias"),
    'relu, "seq_blocks.*"': ("data_in",),
    'first(linear), last(linear)': ("data_in", "weight", "bias"),
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
    kind = draw(st.sampled_from(["number", "stat", "k"] + (["binop", "neg", "call", "if"] if depth < 3 else [])))
    if kind == "k":
        return "k"
    if kind == "if":
        test = f"{draw(number_expr(tensors, depth + 1))} {draw(st.sampled_from(['<', '>=', '!=']))} 1"
        test = draw(st.sampled_from([test, f"not {test}", f"{test} and {test}", f"{test} or true"]))
        return f"(if {test} then {draw(number_expr(tensors, depth + 1))} else {draw(number_expr(tensors, depth + 1))})"
    if kind == "number":
        return draw(st.sampled_from(["0.7", "2", "1e-3", "0.0097", "100"]))
    if kind == "stat":
        call, name = draw(stat_call())
        field = draw(st.sampled_from(plan.STATISTICS[name].fields))
        tensor = draw(st.sampled_from([None, *tensors, '"seq_blocks.1".data_out', "first(linear).weight"]))
        return f"stat{'' if tensor is None else f'({tensor})'}.{call}.{field}"
    if kind == "neg":
        return "-" + draw(number_expr(tensors, depth + 1))
    if kind == "call":
        fn = draw(st.sampled_from(["abs", "min", "max", "sqrt", "log2", "clamp"]))
        n = {"abs": 1, "sqrt": 1, "log2": 1, "clamp": 3}.get(fn) or draw(st.integers(1, 3))
        return f"{fn}({', '.join(draw(number_expr(tensors, depth + 1)) for _ in range(n))})"
    op = draw(st.sampled_from(["+", "-", "*", "/", "**"]))
    return f"({draw(number_expr(tensors, depth + 1))} {op} {draw(number_expr(tensors, depth + 1))})"


@st.composite
def statement(draw: st.DrawFn) -> str:
    sel = draw(st.sampled_from(sorted(SELECTORS)))
    tensors = SELECTORS[sel]
    kind = draw(st.sampled_from(["profile", "binding", "calibrate", "union", "assert"]))
    if kind == "union":
        union = draw(st.sampled_from(sorted(UNIONS)))
        return f"{union} {{ {draw(st.sampled_from(UNIONS[union]))}_width = 2 }}"
    if kind == "assert":
        return f"assert {sel}: stat(data_out).abs_mean.abs_mean >= 0 and {tensors[0]}_zero_fraction <= k"
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
    if suffix in ("threshold", "scale"):  # a negative constant threshold or scale is a compile error
        value = value.filter(lambda v: not re.fullmatch(r"-(--)*[0-9.e-]+", v))
    return f"{sel}.{tensor}_{suffix} = {draw(value)}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(statement(), max_size=10))
def test_valid_programs_round_trip_and_collect_what_they_read(statements: list[str]) -> None:
    text = "\n".join(["let k = 0.7", *statements])
    try:
        compiled = compile_source(text, FILENAME)
    except CompileError as exc:
        # the generator does not avoid duplicate profile entries, statistics collected with different
        # options and then read without saying which, a divisor that is literally zero, or a threshold or
        # scale that folds to a negative constant (`-k`, `-(0.7 * k)`: refused at compile time)
        allowed = ("ambiguous", "listed twice", "division by zero", "must be >= 0")
        assert all(any(a in d.message for a in allowed) for d in exc.diagnostics), exc.render()
        assume(False)
        return
    p = compiled.plan
    assert plan.Plan.from_json(p.to_json()) == p
    assert plan.Plan.from_json(p.to_json()).to_dict() == p.to_dict()
    readers = [(b.selector, b.value) for b in p.bindings] + [(a.selector, a.test) for a in p.asserts]
    for selector, value in readers:
        for r in plan.expr_stat_refs(value):
            where = r.module or selector
            assert any(
                q.tensor == r.tensor
                and r.stat in q.stats
                and (q.selector == where
                     or (q.selector.kind == "default" and where.kind in ("type", "scoped", "first", "last"))
                     or (q.selector.kind == "type" and where.kind in ("scoped", "first", "last")
                         and q.selector.pattern == where.pattern))
                for q in p.profile
            ), (text, value)
    for b in p.bindings:
        if b.param == "data_in_scaling_factor" and b.value == plan.Const(True):
            assert any(q.reason == "derived" and q.selector == b.selector for q in p.profile)
