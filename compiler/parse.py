"""Parse: rules text → a tuple of `ast` statements (one file; includes are `program.py`'s job).

The grammar (`ternqc/grammar/ternqc.lark`) is loaded once, LALR with positions kept. A Transformer reshapes
lark's tree into `ast` nodes with spans and judges nothing. lark's `Tree`, `Token` and `Meta` never leave
this module, and its `UnexpectedInput` is turned here into a `Diagnostic` in the user's words
("expected '=' or '.'", never a terminal name like `RPAR`).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from lark import Lark, Token, Transformer, Tree, UnexpectedInput, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

import ternqc.grammar
from ternqc.compiler import ast
from ternqc.compiler.errors import CompileError, Diagnostic, one_of, with_sources
from ternqc.plan import MAX_EXPR_DEPTH


@functools.cache
def _parser() -> Lark:
    """The LALR parser, built once per process. lark caches the built tables in the temporary folder (keyed
    by the grammar's hash and lark's version), which keeps `ternqc compile` well under 0.4 s; without a
    writable temporary folder it builds them each time."""
    return Lark.open(
        "ternqc.lark",
        rel_to=ternqc.grammar.__file__,
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        cache=True,
    )


def parse(text: str, filename: str = "<string>") -> tuple[ast.Statement, ...]:
    """Parse one rules file.

    Args:
        text: the file's contents.
        filename: the path shown in spans and diagnostics.

    Returns:
        The statements in the order written, `include`s included (not yet followed).

    Raises:
        CompileError: with one diagnostic, at the first syntax error.
    """
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        found = _syntax_errors(exc, text, filename)
        raise CompileError(with_sources(found, {filename: text})) from None
    deep = _too_deep_at(tree, filename)
    if deep is not None:
        raise CompileError(with_sources([deep], {filename: text}))
    try:
        return _ToAst(filename).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, RecursionError):
            raise CompileError([too_deep(filename)]) from None
        raise
    except RecursionError:
        raise CompileError([too_deep(filename)]) from None


_NESTING = frozenset(
    {"add", "sub", "mul", "div", "neg", "pow", "call", "cond", "or_", "and_", "not_", "compare", "list", "options"}
)


def _too_deep_at(tree: Tree, filename: str) -> Diagnostic | None:
    """The diagnostic at the first expression nested deeper than `plan.MAX_EXPR_DEPTH`, found without
    recursion (the Transformer and every later pass recurse into expressions), or None."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data in _NESTING:
            depth += 1
            if depth > MAX_EXPR_DEPTH:
                meta = node.meta
                span = ast.Span(filename, meta.line, meta.column, meta.end_line, meta.end_column)
                if meta.line != meta.end_line:
                    span = ast.Span(filename, meta.line, meta.column, meta.line, meta.column + 1)
                msg = f"expression nested deeper than {MAX_EXPR_DEPTH} levels"
                return Diagnostic(span, msg, "split it into smaller rules or simplify it")
        stack.extend((c, depth) for c in node.children if isinstance(c, Tree))
    return None


def too_deep(filename: str) -> Diagnostic:
    """The diagnostic for input nested beyond what the compiler's recursion allows."""
    return Diagnostic(ast.Span.whole_file(filename), "an expression is nested too deeply to compile")


# ---------------------------------------------------------------------------------------------------------
# lark tree -> ast
# ---------------------------------------------------------------------------------------------------------


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def _unescape(quoted: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), quoted[1:-1])


def _number(text: str) -> int | float:
    if any(c in text for c in ".eE"):
        return float(text)  # float("1e999") is inf; check.py reports it
    try:
        return int(text)
    except ValueError:  # more digits than Python converts: out of range anyway
        return float("inf")


@v_args(inline=True, meta=True)
class _ToAst(Transformer):
    """Reshape lark's tree into `ast` nodes. One method per grammar rule or alias; no judging here."""

    def __init__(self, filename: str) -> None:
        super().__init__()
        self.filename = filename

    def __default__(self, data: Any, children: Any, meta: Any) -> Any:
        raise NotImplementedError(f"no handler for grammar rule {data!r}")

    # --- spans and leaves --------------------------------------------------------------------------------
    def _span(self, meta: Any) -> ast.Span:
        return ast.Span(self.filename, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok_span(self, tok: Token) -> ast.Span:
        return ast.Span(self.filename, tok.line, tok.column, tok.end_line, tok.end_column)

    def _ident(self, tok: Token) -> ast.Ident:
        return ast.Ident(str(tok), span=self._tok_span(tok))

    # --- program and statements -------------------------------------------------------------------------
    @v_args(inline=False, meta=True)
    def start(self, meta: Any, statements: list) -> tuple[ast.Statement, ...]:
        return tuple(statements)

    def include(self, meta: Any, path: Token, with_: tuple[ast.Entry, ...] | None) -> ast.Include:
        path_node = ast.String(_unescape(str(path)), span=self._tok_span(path))
        return ast.Include(path_node, with_=with_ or (), span=self._span(meta))

    def include_recipe(self, meta: Any, path: Token, with_: tuple[ast.Entry, ...] | None) -> ast.Include:
        path_node = ast.String(_unescape(str(path)), span=self._tok_span(path))
        return ast.Include(path_node, recipe=True, with_=with_ or (), span=self._span(meta))

    @v_args(inline=False, meta=True)
    def with_(self, meta: Any, entries: list) -> tuple[ast.Entry, ...]:
        return tuple(entries)

    def let(self, meta: Any, name: Token, value: ast.Expr) -> ast.Let:
        return ast.Let(self._ident(name), value, span=self._span(meta))

    def assert_(self, meta: Any, selector: ast.Selector, test: ast.Expr, message: Token | None) -> ast.Assert:
        return ast.Assert(selector, test, self._message(message), span=self._span(meta))

    def assert_model(self, meta: Any, test: ast.Expr, message: Token | None) -> ast.Assert:
        return ast.Assert(None, test, self._message(message), span=self._span(meta))

    def _message(self, tok: Token | None) -> ast.String | None:
        return None if tok is None else ast.String(_unescape(str(tok)), span=self._tok_span(tok))

    @v_args(inline=False, meta=True)
    def calibrate(self, meta: Any, entries: list) -> ast.Calibrate:
        return ast.Calibrate(tuple(entries), span=self._span(meta))

    @v_args(inline=False, meta=True)
    def profile(self, meta: Any, children: list) -> ast.Profile:
        targets = tuple(c for c in children if isinstance(c, ast.Target))
        stats = tuple(c for c in children if isinstance(c, ast.StatCall))
        return ast.Profile(targets, stats, span=self._span(meta))

    def block(
        self, meta: Any, selectors: tuple[ast.Selector, ...], excludes: tuple[ast.Selector, ...] | None,
        *entries: ast.Entry,
    ) -> ast.Block:
        return ast.Block(selectors, tuple(entries), excludes or (), span=self._span(meta))

    @v_args(inline=False, meta=True)
    def selector_list(self, meta: Any, selectors: list) -> tuple[ast.Selector, ...]:
        return tuple(selectors)

    def binding(self, meta: Any, selector: ast.Selector, key: Token, value: ast.Expr) -> ast.Binding:
        return ast.Binding(selector, self._ident(key), value, span=self._span(meta))

    # --- parts of statements ----------------------------------------------------------------------------
    def entry(self, meta: Any, key: Token, value: ast.Expr) -> ast.Entry:
        return ast.Entry(self._ident(key), value, span=self._span(meta))

    def target(self, meta: Any, selector: ast.Selector, tensor: Token) -> ast.Target:
        return ast.Target(selector, self._ident(tensor), span=self._span(meta))

    def stat_call(self, meta: Any, name: Token, options: tuple[ast.Option, ...] | None) -> ast.StatCall:
        return ast.StatCall(self._ident(name), options or (), span=self._span(meta))

    def type_selector(self, meta: Any, name: Token) -> ast.Selector:
        return ast.Selector(str(name), quoted=False, span=self._tok_span(name))

    def name_selector(self, meta: Any, string: Token) -> ast.Selector:
        return ast.Selector(_unescape(str(string)), quoted=True, span=self._tok_span(string))

    def regex_selector(self, meta: Any, regex: Token) -> ast.Selector:
        # a regular expression keeps its backslashes: only \" is an escape (the quote itself)
        pattern = str(regex)[3:-1].replace('\\"', '"')
        return ast.Selector(pattern, quoted=True, form="regex", span=self._tok_span(regex))

    def scoped_selector(self, meta: Any, name: Token, scope: Token) -> ast.Selector:
        return ast.Selector(str(name), quoted=False, form="scoped", scope=_unescape(str(scope)),
                            span=self._span(meta))

    def first_selector(self, meta: Any, name: Token) -> ast.Selector:
        return ast.Selector(str(name), quoted=False, form="first", span=self._span(meta))

    def last_selector(self, meta: Any, name: Token) -> ast.Selector:
        return ast.Selector(str(name), quoted=False, form="last", span=self._span(meta))

    @v_args(inline=False, meta=True)
    def options(self, meta: Any, children: list) -> tuple[ast.Option, ...]:
        return tuple(c for c in children if c is not None)

    def option(self, meta: Any, name: Token, value: ast.Expr) -> ast.Option:
        return ast.Option(self._ident(name), value, span=self._span(meta))

    @v_args(inline=False, meta=True)
    def list(self, meta: Any, items: list) -> ast.List:
        return ast.List(tuple(i for i in items if i is not None), span=self._span(meta))

    # --- expressions ------------------------------------------------------------------------------------
    def number(self, meta: Any, tok: Token) -> ast.Number:
        return ast.Number(_number(str(tok)), span=self._tok_span(tok))

    def string(self, meta: Any, tok: Token) -> ast.String:
        return ast.String(_unescape(str(tok)), span=self._tok_span(tok))

    def name(self, meta: Any, tok: Token) -> ast.Name:
        return ast.Name(str(tok), span=self._tok_span(tok))

    def call(self, meta: Any, fn: Token, *args: ast.Expr | None) -> ast.Call:
        return ast.Call(self._ident(fn), tuple(a for a in args if a is not None), span=self._span(meta))

    def neg(self, meta: Any, operand: ast.Expr) -> ast.Neg:
        return ast.Neg(operand, span=self._span(meta))

    def not_(self, meta: Any, operand: ast.Expr) -> ast.Not:
        return ast.Not(operand, span=self._span(meta))

    def cond(self, meta: Any, test: ast.Expr, then: ast.Expr, orelse: ast.Expr) -> ast.Cond:
        return ast.Cond(test, then, orelse, span=self._span(meta))

    def compare(self, meta: Any, left: ast.Expr, op: Token, right: ast.Expr) -> ast.BinOp:
        return self._binop(str(op), meta, left, right)

    def pow(self, meta: Any, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return self._binop("**", meta, left, right)

    def and_(self, meta: Any, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return self._binop("and", meta, left, right)

    def or_(self, meta: Any, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return self._binop("or", meta, left, right)

    def _binop(self, op: str, meta: Any, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return ast.BinOp(op, left, right, span=self._span(meta))

    def add(self, meta: Any, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return self._binop("+", meta, left, right)

    def sub(self, meta: Any, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return self._binop("-", meta, left, right)

    def mul(self, meta: Any, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return self._binop("*", meta, left, right)

    def div(self, meta: Any, left: ast.Expr, right: ast.Expr) -> ast.BinOp:
        return self._binop("/", meta, left, right)

    def stat_ref(
        self,
        meta: Any,
        source: tuple[ast.Selector | None, ast.Ident] | None,
        stat: Token,
        options: tuple[ast.Option, ...] | None,
        field: Token,
    ) -> ast.StatRef:
        module, tensor = source if source is not None else (None, None)
        return ast.StatRef(tensor, self._ident(stat), options, self._ident(field), module, span=self._span(meta))

    def own_tensor(self, meta: Any, tensor: Token) -> tuple[None, ast.Ident]:
        return None, self._ident(tensor)

    def other_tensor(self, meta: Any, selector: ast.Selector, tensor: Token) -> tuple[ast.Selector, ast.Ident]:
        return selector, self._ident(tensor)


# ---------------------------------------------------------------------------------------------------------
# Syntax errors in the user's words
# ---------------------------------------------------------------------------------------------------------

#: How the grammar's named terminals read in a message.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a string in double quotes',
    "$END": "the end of the file",
}
#: Terminals that can start a value; when all are expected, say "a value".
_VALUE_START = {"NAME", "NUMBER", "STRING", "STAT", "LPAR", "MINUS"}
#: What may also follow a selector item besides '.' and '{' (left out of "expected ...").
_AFTER_SELECTOR_MORE = {"COMMA", "IN", "EXCEPT"}
#: Terminals that can start a statement (besides NAME and STRING, which start a selector).
_STATEMENT_KEYWORDS = {"INCLUDE", "CALIBRATE", "PROFILE"}


def _terminal_words(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = _parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    if pattern.type == "str":
        return f"'{pattern.value}'"
    return name.lower()  # a regex terminal without a word: not in this grammar today


def describe_expected(names: set[str]) -> str:
    """"expected …" for a set of terminal names, in the user's words."""
    names = set(names)
    words = []
    if _STATEMENT_KEYWORDS <= names:
        names -= _STATEMENT_KEYWORDS | {"NAME", "STRING"}
        words.append("a statement (a rule, a block, profile, calibrate or include)")
    if _VALUE_START <= names:
        names -= _VALUE_START
        words.append("a value (a number, a string, a name, stat.… or '(')")
    words += sorted((_terminal_words(n) for n in names), key=lambda w: (w.startswith("the end"), w))
    return "expected " + one_of(words) if words else ""


def _describe_token(tok: Token) -> str:
    if tok.type == "NAME":
        return f"name '{tok}'"
    if tok.type == "NUMBER":
        return f"number {tok}"
    if tok.type == "STRING":
        return f"string {tok}"
    return f"'{tok}'"


def _tokens_before(text: str, pos: int) -> list[Token]:
    """The tokens of `text` before offset `pos` (comments and spaces dropped); [] when they do not lex."""
    try:
        return [t for t in _parser().lex(text[:pos]) if t.type not in ("WS", "SH_COMMENT")]
    except UnexpectedInput:
        return []


def _tok_span_of(tok: Token, filename: str) -> ast.Span:
    return ast.Span(filename, tok.line, tok.column, tok.end_line, tok.end_column)


def _syntax_errors(exc: UnexpectedInput, text: str, filename: str) -> list[Diagnostic]:
    """The syntax error, said in the user's words; with the two mistakes that lark reports far from where
    they are made recognised: a trailing comma after the last statistic of a `profile` statement (the next
    statement is read as one more statistic), and a `{` that is never closed."""
    main = _syntax_error(exc, text, filename)
    pos = getattr(exc, "pos_in_stream", None)
    if isinstance(exc, UnexpectedToken) and exc.token.type != "$END":
        pos = exc.token.start_pos
    if pos is None:
        pos = len(text)
    before = _tokens_before(text, pos)
    comma = _trailing_profile_comma(before)
    if comma is not None:
        msg = "a trailing comma after the last statistic"
        hint = "the next statement is read as one more statistic; remove the ','"
        return [Diagnostic(_tok_span_of(comma, filename), msg, hint)]
    opened = _unclosed_brace(before)
    if opened is not None and main.message.startswith(("unexpected '.'", "unexpected '{'", "unexpected end")):
        note = Diagnostic(_tok_span_of(opened, filename), "this '{' is never closed",
                          "a block ends with '}' before the next statement")
        return [note, main]
    return [main]


def _trailing_profile_comma(tokens: list[Token]) -> Token | None:
    """The comma in `profile T: stat, <next statement>`: the last tokens are `',' NAME` (the next statement's
    selector read as a statistic) inside a profile statement's statistic list."""
    if len(tokens) < 2 or tokens[-2].type != "COMMA" or tokens[-1].type != "NAME":
        return None
    depth = 0
    for tok in reversed(tokens[:-2]):
        if tok.type in ("RPAR", "RSQB"):
            depth += 1
        elif tok.type in ("LPAR", "LSQB"):
            depth -= 1
        elif depth == 0 and tok.value in ("profile", "assert"):
            return tokens[-2] if tok.value == "profile" else None
        elif depth == 0 and tok.type in ("LBRACE", "RBRACE", "EQUAL"):
            return None
    return None


def _unclosed_brace(tokens: list[Token]) -> Token | None:
    """The innermost `{` not closed before the error, if any."""
    stack: list[Token] = []
    for tok in tokens:
        if tok.type == "LBRACE":
            stack.append(tok)
        elif tok.type == "RBRACE" and stack:
            stack.pop()
    return stack[-1] if stack else None


def _syntax_error(exc: UnexpectedInput, text: str, filename: str) -> Diagnostic:
    if isinstance(exc, UnexpectedCharacters):
        return _unexpected_character(exc, text, filename)
    if isinstance(exc, UnexpectedToken) and exc.token.type != "$END":
        tok = exc.token
        span = ast.Span(filename, tok.line, tok.column, tok.end_line, tok.end_column)
        expected = exc.accepts or exc.expected
        message = f"unexpected {_describe_token(tok)}"
        if tok.type == "DOT" and "LBRACE" in expected and "DOT" not in expected:
            # `linear, conv2d.weight_width = 2`: a union (or except) read as the start of a block
            hint = "several selectors (a union) or except need the block form, e.g. linear, conv2d { weight_width = 2 }"
            return Diagnostic(span, message, hint)
        if set(expected) - _AFTER_SELECTOR_MORE == {"DOT", "LBRACE"}:
            # after a selector: '.' for one rule, '{' for a block ('in', 'except', ',' are less likely meant)
            if tok.type == "NAME":
                message += " after a selector"
            expected = {"DOT", "LBRACE"}
        return Diagnostic(span, message, describe_expected(set(expected)))
    # the end of the file: point just after the last token
    expected: set[str] = set()
    line, col = 1, 1
    if isinstance(exc, UnexpectedToken):
        expected = set(exc.accepts or exc.expected)
        tok = exc.token
        if getattr(tok, "end_line", None) is not None:
            line, col = tok.end_line, tok.end_column
    elif isinstance(exc, UnexpectedEOF):
        expected = set(exc.expected)
        line, col = _end_of(text)
    expected.discard("$END")
    span = ast.Span(filename, line, col, line, col + 1)
    return Diagnostic(span, "unexpected end of file", describe_expected(expected))


def _end_of(text: str) -> tuple[int, int]:
    stripped = text.rstrip()
    lines = stripped.split("\n")
    return len(lines), len(lines[-1]) + 1


def _unexpected_character(exc: UnexpectedCharacters, text: str, filename: str) -> Diagnostic:
    char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
    span = ast.Span(filename, exc.line, exc.column, exc.line, exc.column + 1)
    if char == '"':
        rest = text[exc.pos_in_stream :].split("\n", 1)[0]
        span = ast.Span(filename, exc.line, exc.column, exc.line, exc.column + len(rest))
        return Diagnostic(span, "unterminated string", 'a string ends with " on the same line')
    if char == "'":
        hint = 'strings use double quotes, e.g. "seq_blocks.0"'
        return Diagnostic(span, "unexpected character \"'\"", hint)
    shown = repr(char) if char.isprintable() and char != "" else f"U+{ord(char):04X}" if char else "?"
    return Diagnostic(span, f"unexpected character {shown}", "")
