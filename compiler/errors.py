"""Diagnostics and the compiler's one exception.

Passes append `Diagnostic(span, message, hint, severity)`s; the driver raises one `CompileError` holding
every error. `render()` prints them like mypy, with the source line and a caret under the span:

    configs/bad.tq:4:26: error: unknown statistic 'range_minmax'; did you mean 'range_min_max'?
        4 | linear.weight_max = stat.range_minmax.max
          |                          ^^^^^^^^^^^^
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import attrs
from attrs import field, frozen

from ternqc.compiler.ast import Span

#: How many diagnostics `CompileError.render` shows before "… and N more".
RENDER_LIMIT = 20
#: Longest message (or hint) and source excerpt a diagnostic shows, in characters.
MESSAGE_LIMIT = 400
SOURCE_LIMIT = 160


@frozen
class Diagnostic:
    """One finding at `span`: `message`, an optional `hint` (e.g. "did you mean 'x'?"), a severity.

    `source_line` is the text of the span's first line, attached by the driver so that a diagnostic
    renders on its own.
    """

    span: Span
    message: str
    hint: str = ""
    severity: str = field(default="error", validator=attrs.validators.in_(("error", "warning")))
    source_line: str = field(default="", eq=False, repr=False)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def render(self) -> str:
        """`path:line:col: severity: message; hint`, then the source line with a caret under the span."""
        head = f"{self.span}: {self.severity}: {_clip(self.message, MESSAGE_LIMIT)}"
        if self.hint:
            head += f"; {_clip(self.hint, MESSAGE_LIMIT)}"
        if self.span.line == 0:
            return head
        text = self.source_line.rstrip("\n")
        gutter = str(self.span.line)
        start = max(self.span.col - 1, 0)
        if self.span.end_line == self.span.line and self.span.end_col > self.span.col:
            width = self.span.end_col - self.span.col
        else:  # a span over several lines (or an empty one): underline to the end of the first line
            width = max(len(text.rstrip()) - start, 1)
        if len(text) > SOURCE_LIMIT:  # a window around the caret: a 100k-character line is not shown whole
            left = max(0, start - SOURCE_LIMIT // 4)
            shown = text[left : left + SOURCE_LIMIT]
            text = ("…" if left else "") + shown + ("…" if left + SOURCE_LIMIT < len(text) else "")
            start = start - left + (1 if left else 0)
            width = max(1, min(width, SOURCE_LIMIT - (start - (1 if left else 0))))
        pad = "".join("\t" if c == "\t" else " " for c in text[:start])
        return "\n".join(
            [
                head,
                f"    {gutter} | {text}",
                f"    {' ' * len(gutter)} | {pad}{'^' * width}",
            ]
        )


def _clip(text: str, limit: int) -> str:
    """`text`, its middle cut out when longer than `limit` characters (a 100k-character name in a message)."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}…[{len(text) - 2 * keep} characters]…{text[-keep:]}"


def with_sources(diagnostics: Iterable[Diagnostic], sources: dict[str, str]) -> list[Diagnostic]:
    """Attach each diagnostic's source line from `sources` ({path: text}) and sort them by place.

    Files sort in the order of `sources` (root first); within a file by line and column.
    """
    order = {path: i for i, path in enumerate(sources)}
    out = []
    for d in diagnostics:
        text = sources.get(d.span.file)
        if text is not None and d.span.line > 0:
            lines = text.splitlines()
            if d.span.line <= len(lines):
                d = attrs.evolve(d, source_line=lines[d.span.line - 1])
        out.append(d)
    out.sort(key=lambda d: (order.get(d.span.file, len(order)), d.span.line, d.span.col))
    return out


class CompileError(Exception):
    """A rules file that does not compile, with every error found (`diagnostics`, in file order)."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        super().__init__(self.render())

    def render(self, limit: int = RENDER_LIMIT) -> str:
        """Every diagnostic rendered with its caret, at most `limit` of them, then "… and N more"."""
        shown = [d.render() for d in self.diagnostics[:limit]]
        rest = len(self.diagnostics) - limit
        if rest > 0:
            shown.append(f"… and {rest} more {'error' if rest == 1 else 'errors'}")
        return "\n".join(shown)

    def __str__(self) -> str:
        return self.render()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions; a swap of neighbours counts one)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cost = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, prev2[j - 2] + 1)
            cur.append(cost)
        prev2, prev = prev, cur
    return prev[-1]


def close_matches(word: str, known: Iterable[str], n: int = 1) -> list[str]:
    """Known names close to `word`: similar (difflib) and a few edits away (at most a third of the word,
    at least 2), so a long shared prefix alone (`weight_group_size` / `weight_scale`) is not close."""
    known = list(known)
    limit = max(2, len(word) // 3)
    candidates = difflib.get_close_matches(word, known, n=max(n, 5), cutoff=0.6)
    return [c for c in candidates if edit_distance(word, c) <= limit][:n]


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """A hint "did you mean 'x'?" when a known name is close to `word` (`close_matches`), else ""."""
    close = close_matches(word, known)
    return f"did you mean '{close[0]}'?" if close else ""


def one_of(known: Iterable[str]) -> str:
    """`a, b or c` for messages that list the choices."""
    return _join(known, "or")


def and_list(items: Iterable[str]) -> str:
    """`a, b and c`."""
    return _join(items, "and")


def _join(items: Iterable[str], word: str) -> str:
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {word} " + items[-1]
