"""The syntax tree of a .tq rules file: frozen attrs values with source spans.

`parse.py` builds these from lark's tree; `check.py` judges them; `lower.py` turns them into a `Plan`.
Spans stay out of equality (`eq=False`), so two nodes written at different places compare equal.
Names follow the grammar: rule `binding` ↔ `Transformer.binding` ↔ `Binding`.
"""

from __future__ import annotations

from typing import Union

from attrs import field, frozen

from ternqc.plan import Origin


@frozen
class Span:
    """A region of a rules file: 1-based start line and column, end line and column (end exclusive).

    A span with `line == 0` stands for the whole file (e.g. a file that cannot be read).
    """

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    @classmethod
    def whole_file(cls, file: str) -> Span:
        return cls(file, 0, 0, 0, 0)

    def origin(self) -> Origin:
        """The plan's `Origin` (file, line, column) of this span's start."""
        return Origin(self.file, self.line, self.col)

    def __str__(self) -> str:
        return self.file if self.line == 0 else f"{self.file}:{self.line}:{self.col}"


#: The span of a node built by hand (in tests): spans are never compared.
NOWHERE = Span("<nowhere>", 0, 0, 0, 0)


def _span() -> Span:
    return field(eq=False, repr=False, kw_only=True, default=NOWHERE)


# --- leaves ------------------------------------------------------------------------------------------------


@frozen
class Ident:
    """An identifier as written: a parameter, tensor, statistic, field, option or function name."""

    name: str
    span: Span = _span()


#: Selector forms besides the plain ones (a bare type / `default`, a quoted name or glob).
SELECTOR_FORMS = ("", "regex", "scoped", "first", "last")


@frozen
class Selector:
    """One selector item as written.

    form "" (plain): `linear` / `default` (bare) or `"seq_blocks.0"` / `"seq_blocks.*"` (quoted);
    "regex": `re"enc\\.[01]"` (`text` is the pattern, `quoted` is true); "scoped": `linear in "encoder.*"`
    (`text` the type, `scope` the glob); "first" / "last": `first(linear)` (`text` the type).
    """

    text: str
    quoted: bool
    form: str = ""
    scope: str = ""
    span: Span = _span()


# --- expressions -------------------------------------------------------------------------------------------


@frozen
class Number:
    """A number literal: `int` when written without `.` or exponent, else `float` (inf when out of range)."""

    value: int | float
    span: Span = _span()


@frozen
class String:
    """A double-quoted string literal, escapes resolved."""

    value: str
    span: Span = _span()


@frozen
class Name:
    """A bare name in a value position: `true`, `false`, `na`, `all`, `none`, or a mistake."""

    name: str
    span: Span = _span()


@frozen
class Neg:
    """`-operand`."""

    operand: Expr
    span: Span = _span()


@frozen
class Not:
    """`not operand`."""

    operand: Expr
    span: Span = _span()


@frozen
class BinOp:
    """`left op right`, op one of `+ - * / **`, a comparison `< <= > >= == !=`, `and` or `or`."""

    op: str
    left: Expr
    right: Expr
    span: Span = _span()


@frozen
class Cond:
    """`if test then then else orelse`."""

    test: Expr
    then: Expr
    orelse: Expr
    span: Span = _span()


@frozen
class Call:
    """`fn(args, ...)`."""

    fn: Ident
    args: tuple[Expr, ...]
    span: Span = _span()


@frozen
class Option:
    """`name = value` inside a statistic's parentheses."""

    name: Ident
    value: Expr
    span: Span = _span()


@frozen
class List:
    """`[a, b, ...]`: only meaningful as an option value (`dims = [0, 1]`)."""

    items: tuple[Expr, ...]
    span: Span = _span()


@frozen
class StatRef:
    """`stat(tensor).stat(options).field`; `tensor` and `options` are `None` when not written.

    `module` is the selector of another module (`stat("seq_blocks.1".data_out)...`), `None` for the module
    the rule is evaluated for.
    """

    tensor: Ident | None
    stat: Ident
    options: tuple[Option, ...] | None
    field: Ident
    module: Selector | None = None
    span: Span = _span()


Expr = Union[Number, String, Name, Neg, Not, BinOp, Cond, Call, StatRef, List]


# --- parts of statements -----------------------------------------------------------------------------------


@frozen
class Entry:
    """`key = value` inside a block (or a `calibrate` block)."""

    key: Ident
    value: Expr
    span: Span = _span()


@frozen
class Target:
    """`selector.tensor` in a `profile` statement."""

    selector: Selector
    tensor: Ident
    span: Span = _span()


@frozen
class StatCall:
    """`stat_name(options)` in a `profile` statement; `options` is empty when not written."""

    name: Ident
    options: tuple[Option, ...]
    span: Span = _span()


# --- statements --------------------------------------------------------------------------------------------


@frozen
class Include:
    """`include "path"` or `include recipe "name"` (a shipped recipe), optionally `with { k = v ... }`."""

    path: String
    recipe: bool = False
    with_: tuple[Entry, ...] = ()
    span: Span = _span()


@frozen
class Let:
    """`let name = value` at file scope."""

    name: Ident
    value: Expr
    span: Span = _span()


@frozen
class Assert:
    """`assert selector: test, "message"`; `selector` is `None` for `assert model: ...`."""

    selector: Selector | None
    test: Expr
    message: String | None
    span: Span = _span()


@frozen
class Calibrate:
    """`calibrate { key = value ... }`."""

    entries: tuple[Entry, ...]
    span: Span = _span()


@frozen
class Profile:
    """`profile target, ... : stat_call, ...`."""

    targets: tuple[Target, ...]
    stats: tuple[StatCall, ...]
    span: Span = _span()


@frozen
class Block:
    """`selector, ... [except selector, ...] { key = value ... }`."""

    selectors: tuple[Selector, ...]
    entries: tuple[Entry, ...]
    excludes: tuple[Selector, ...] = ()
    span: Span = _span()


@frozen
class Binding:
    """`selector.key = value`."""

    selector: Selector
    key: Ident
    value: Expr
    span: Span = _span()


Statement = Union[Include, Let, Assert, Calibrate, Profile, Block, Binding]


@frozen
class Program:
    """A rules file with its includes expanded.

    `sources` are the files read (root first) with their text; `statements` are in program order: each
    included file's statements come before those of the file that includes it (`include` itself is gone).
    """

    sources: tuple[tuple[str, str], ...]
    statements: tuple[Statement, ...]
    lets: tuple[LetValue, ...] = ()  # the root file's constants, after `--set` overrides
    let_names: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (file, its constants' names), for "did you mean"
    broken_lets: tuple[tuple[str, str], ...] = ()  # (file, name) of lets without a value: already reported


@frozen
class LetValue:
    """The value a root-file `let` took: as written (`how="let"`) or overridden on the command line
    (`how="set"`)."""

    name: str
    value: int | float | bool | str
    how: str
    span: Span = _span()
