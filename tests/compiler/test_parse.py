"""The parser alone: text → ast nodes (spans left out of equality), and syntax errors in the user's words."""

from __future__ import annotations

import re

import pytest

from ternqc.compiler import CompileError, ast
from ternqc.compiler.parse import parse

I = ast.Ident  # noqa: E741


def test_statements() -> None:
    text = (
        'include "base.tq"\n'
        'calibrate { samples = 32, split = "train" }\n'
        "profile linear.weight, \"fc*\".data_in: range_min_max, range_quantile(quantile = 0.5, dims = [0, -1])\n"
        "linear { weight_width = 2 }\n"
        "relu.data_in_max = stat(data_in).range_quantile(abs = true).max\n"
    )
    assert parse(text) == (
        ast.Include(ast.String("base.tq")),
        ast.Calibrate((ast.Entry(I("samples"), ast.Number(32)), ast.Entry(I("split"), ast.String("train")))),
        ast.Profile(
            (
                ast.Target(ast.Selector("linear", False), I("weight")),
                ast.Target(ast.Selector("fc*", True), I("data_in")),
            ),
            (
                ast.StatCall(I("range_min_max"), ()),
                ast.StatCall(
                    I("range_quantile"),
                    (
                        ast.Option(I("quantile"), ast.Number(0.5)),
                        ast.Option(I("dims"), ast.List((ast.Number(0), ast.Neg(ast.Number(1))))),
                    ),
                ),
            ),
        ),
        ast.Block((ast.Selector("linear", False),), (ast.Entry(I("weight_width"), ast.Number(2)),)),
        ast.Binding(
            ast.Selector("relu", False),
            I("data_in_max"),
            ast.StatRef(I("data_in"), I("range_quantile"), (ast.Option(I("abs"), ast.Name("true")),), I("max")),
        ),
    )


def test_spans() -> None:
    (stmt,) = parse("\n  linear.weight_max = stat.abs_mean.abs_mean\n", "f.tq")
    assert (stmt.span.file, stmt.span.line, stmt.span.col) == ("f.tq", 2, 3)
    ref = stmt.value
    assert (ref.span.col, ref.span.end_col) == (23, 45)
    assert (ref.stat.span.col, ref.stat.span.end_col) == (28, 36)


def test_strings_and_numbers() -> None:
    (stmt,) = parse('"a\\"b".name = "x\\\\y"\n')
    assert stmt.selector.text == 'a"b' and stmt.value == ast.String("x\\y")
    (stmt,) = parse("x.y = 1e-3")
    assert stmt.value == ast.Number(0.001)


LARK_WORDS = re.compile(r"__ANON|\$END|\b(?:LPAR|RPAR|LBRACE|RBRACE|LSQB|RSQB|COMMA|DOT|EQUAL|COLON|PLUS|MINUS|"
                        r"STAR|SLASH|NAME|NUMBER|STRING|CNAME|ESCAPED_STRING|INCLUDE|CALIBRATE|PROFILE|STAT)\b")


@pytest.mark.parametrize(
    "text",
    ["linear.weight_max =", "linear {", "linear weight", "x.y = (1", "profile", "profile a.b:", "a.b = stat.c",
     "a.b = 1 2", "}", "calibrate", "include", "include x", "a.b = stat(", "a.b = max(1,", "profile a.b: c(d = [",
     "a.b = 1 $", "a.b = 'x'", 'a.b = "x'],
)
def test_syntax_errors_speak_the_users_words(text: str) -> None:
    with pytest.raises(CompileError) as info:
        parse(text, "f.tq")
    (d,) = info.value.diagnostics
    assert d.span.line >= 1 and d.span.col >= 1
    assert not LARK_WORDS.search(d.message + d.hint), d.render()
    assert d.message.startswith(("unexpected", "unterminated"))
