"""Check: a parsed `ast.Program` → every error and warning in it, as `Diagnostic`s.

Nothing is raised here; the driver raises one `CompileError` when any diagnostic is an error. What is
judged (docs/LANGUAGE.md has the rules):

- selectors: a binding's bare selector (also in `T in "glob"`, `first(T)`, `last(T)`) must be `default` or a
  quantisable type; module types are lower case; quoted names are not empty and do not look like a mistaken
  selector (`"linear[-1]"`, `"re:..."`); regular expressions compile; a union lists an item once;
- tensors: known words, and only tensors the selected type has (`relu.weight_max`, `profile relu.weight`);
- parameters, quantisers, statistics, their fields and options: known names, with "did you mean";
- value types: `*_width` 2 or 32 (or `na`), `*_frac_width` an integer, `*_scaling_factor` a bool, the
  numeric parameters a number, `na` or an expression over statistics, `name` a quantiser in quotes;
  options `dims = all | none | [ints]`, `abs = true|false`, `quantile` in [0, 1], `num_sigma` > 0;
- the same key twice in one block, and statistic references that could mean several collected statistics;
- kinds of expressions (number, bool, string): arithmetic and comparisons on numbers, `and`/`or`/`not` and
  `if` conditions on bools, `if` branches of one kind; integer, bool and string parameters take conditionals
  whose branches are valid values; `per_channel` on an input needs the module type;
- assertions: a bool over the names they may read (`assert_variables`, `MODEL_VARIABLES`) and statistics of
  a written tensor.

Warnings: a rule that can never take effect because a later rule in the same file sets the same parameter
for the same selector (and the same for `calibrate` keys).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from typing import Any

import attrs
from attrs import frozen

from ternqc import plan
from ternqc.compiler import ast
from ternqc.compiler.check_support import (
    KIND_WORDS,
    MODEL_VARIABLES,
    RefContext,
    ambiguous,
    assert_hint,
    assert_variables,
    in_range,
    kind_of,
    mistaken_pattern,
    name_hint,
    sel_text,
    valid_selector,
    widths_text,
)
from ternqc.compiler.errors import Diagnostic, and_list, did_you_mean, one_of
from ternqc.compiler.vocab import (
    CALIBRATE_KEYS,
    DEFAULT,
    FUNCTIONS,
    GRANULARITY,
    TENSOR_WORDS,
    VALUE_NAMES,
    Profiled,
    candidates,
    canonical_tensor,
    concrete_dims,
    is_int,
    is_number,
    literal,
    selector_of,
    spec_of,
    tensor_allowed,
    type_tensors,
    written_options,
)
from ternqc.render import tensor_word

ALL_PARAMS = plan.all_params()


def check(program: ast.Program) -> list[Diagnostic]:
    """Every error and warning in `program`, in no particular order (the driver sorts them)."""
    found = _Checker(dict(program.let_names), set(program.broken_lets)).run(program.statements)
    return list(dict.fromkeys(found))  # a union block checks its entries once per selector: report once


@frozen
class _Ref:
    """A statistic reference waiting for the whole program's `profile` statements."""

    node: ast.StatRef
    sel: plan.Selector | None  # the binding's
    tensor: str  # canonical
    written: dict[str, Any]


@frozen
class _Set:
    """One `selector.key = value` (or calibrate key) that took effect as far as checking knows."""

    key: tuple[Any, ...]
    text: str
    span: ast.Span


class _Checker:
    def __init__(
        self, let_names: dict[str, tuple[str, ...]] | None = None, broken_lets: set[tuple[str, str]] | None = None
    ) -> None:
        self.let_names = let_names or {}
        self.broken_lets = broken_lets or set()
        self.diagnostics: list[Diagnostic] = []
        self.profiled: Profiled = {}
        self.refs: list[_Ref] = []
        self.sets: list[_Set] = []

    def error(self, span: ast.Span, message: str, hint: str = "") -> None:
        self.diagnostics.append(Diagnostic(span, message, hint))

    def run(self, statements: Iterable[ast.Statement]) -> list[Diagnostic]:
        for stmt in statements:
            if isinstance(stmt, ast.Calibrate):
                self.calibrate(stmt)
            elif isinstance(stmt, ast.Profile):
                self.profile(stmt)
            elif isinstance(stmt, ast.Block):
                self.block(stmt)
            elif isinstance(stmt, ast.Binding):
                entry = ast.Entry(stmt.key, stmt.value, span=stmt.span)
                self.rules(stmt.selector, (entry,), in_block=False)
            elif isinstance(stmt, ast.Assert):
                self.assertion(stmt)
            # Include and let statements are gone after program.py expanded them.
        self.resolve_refs()
        self.shadowed()
        return self.diagnostics

    # --- calibrate ---------------------------------------------------------------------------------------
    def calibrate(self, stmt: ast.Calibrate) -> None:
        seen: dict[str, ast.Entry] = {}
        for entry in stmt.entries:
            key = entry.key.name
            if key in seen:
                self.twice(entry, seen[key])
                continue
            seen[key] = entry
            if key not in CALIBRATE_KEYS:
                msg = f"unknown calibrate setting '{key}'"
                self.error(entry.key.span, msg, name_hint(key, CALIBRATE_KEYS, "the settings are"))
                continue
            value = literal(entry.value)
            if CALIBRATE_KEYS[key] == "count":
                if not is_int(value) or value <= 0:
                    msg = f"{key} takes a positive integer, got {kind_of(entry.value)}"
                    self.error(entry.value.span, msg)
                    continue
            elif not isinstance(value, str) or not value:
                msg = f'{key} takes a split name in quotes, e.g. "train", got {kind_of(entry.value)}'
                self.error(entry.value.span, msg)
                continue
            self.sets.append(_Set(("calibrate", key), f"calibrate {key}", entry.span))

    def twice(self, entry: ast.Entry, first: ast.Entry) -> None:
        msg = f"'{entry.key.name}' is set twice in this block (first at line {first.span.line})"
        self.error(entry.key.span, msg)

    # --- profile -----------------------------------------------------------------------------------------
    def profile(self, stmt: ast.Profile) -> None:
        targets: list[tuple[plan.Selector, str]] = []
        seen_targets: set[tuple[plan.Selector, str]] = set()
        for target in stmt.targets:
            sel = self.selector(target.selector, binding=False)
            tensor = self.tensor(target.tensor, sel, target.selector)
            if sel is None or tensor is None:
                continue
            if (sel, tensor) in seen_targets:
                msg = f"{sel_text(target.selector)}.{target.tensor.name} is listed twice in this statement"
                self.error(target.span, msg)
                continue
            seen_targets.add((sel, tensor))
            targets.append((sel, tensor))
        calls: list[tuple[ast.StatCall, dict[str, Any]]] = []
        seen_specs: list[tuple[plan.StatSpec, Any]] = []
        for call in stmt.stats:
            if not self.statistic(call.name):
                continue
            written = self.options(call.name.name, call.options)
            if written is None:
                continue
            word = written.get("dims") if written.get("dims") in GRANULARITY else None
            spec = (spec_of(call.name.name, {**written, "dims": "all"} if word else written), word)
            if spec in seen_specs:
                self.error(call.span, f"{call.name.name} is listed twice with the same options")
                continue
            seen_specs.append(spec)
            calls.append((call, written))
        for sel, tensor in targets:
            specs = []
            for call, written in calls:
                concrete = self.granular(written, tensor, sel, call.span)
                if concrete is not None:
                    specs.append(spec_of(call.name.name, concrete))
            for spec in specs:
                known = self.profiled.setdefault((tensor, spec.name), [])
                if (sel, spec) not in known:
                    known.append((sel, spec))

    # --- selectors and tensors ---------------------------------------------------------------------------
    def selector(self, sel: ast.Selector, *, binding: bool) -> plan.Selector | None:
        """The plan selector, or `None` after reporting why `sel` is not valid here."""
        if sel.form == "regex":
            try:
                re.compile(sel.text)
            except re.error as exc:
                self.error(sel.span, f"invalid regular expression: {exc}")
                return None
            return selector_of(sel)
        if sel.quoted:
            if not sel.text.strip():
                self.error(sel.span, "empty module name", 'write a module path such as "seq_blocks.0"')
                return None
            mistaken = mistaken_pattern(sel.text)
            if mistaken:
                self.error(sel.span, f'"{sel.text}" would be read as a module name or glob', mistaken)
                return None
            return selector_of(sel)
        if sel.form == "scoped" and not sel.scope.strip():
            self.error(sel.span, "empty module path after 'in'", 'write a glob such as "encoder.*"')
            return None
        if sel.form in ("scoped", "first", "last") and sel.text == DEFAULT:
            self.error(sel.span, f"'{sel.form}' takes a module type, not default", "e.g. first(linear)")
            return None
        if sel.text != sel.text.lower():
            msg = f"module types are written in lower case: '{sel.text.lower()}', not '{sel.text}'"
            self.error(sel.span, msg)
            return None
        result = selector_of(sel)
        if binding and result.kind in ("type", "scoped", "first", "last") and (
            result.pattern not in plan.QUANTISABLE
        ):
            known = ["default", *plan.QUANTISABLE]
            msg = f"'{sel.text}' is not a quantisable type"
            self.error(sel.span, msg, name_hint(sel.text, known, "the quantisable types are"))
            return None
        return result

    def tensor(self, word: ast.Ident, sel: plan.Selector | None, written: ast.Selector) -> str | None:
        """The canonical tensor `word` names, or `None` after reporting an unknown tensor or one the
        selected modules lack."""
        canonical = canonical_tensor(word.name)
        if canonical is None:
            hint = name_hint(word.name, TENSOR_WORDS, "the tensors are")
            self.error(word.span, f"unknown tensor '{word.name}'", hint)
            return None
        known = type_tensors(sel) if sel is not None else None
        if not tensor_allowed(canonical, known):
            assert known is not None and sel is not None
            msg = f"{sel_text(written)} has no tensor '{word.name}'"
            self.error(word.span, msg, f"{sel_text(written)} has {and_list([*known, 'data_out'])}")
            return None
        return canonical

    def granular(
        self, written: dict[str, Any], tensor: str, sel: plan.Selector | None, span: ast.Span
    ) -> dict[str, Any] | None:
        """`written` options with a granularity word in `dims` made concrete for `tensor` of the modules `sel`
        picks, or `None` after reporting why it cannot be."""
        out = concrete_dims(written, tensor, sel)
        if out is None:
            msg = (f"per_channel on {tensor_word(tensor)} needs the module type to find the channel axis; "
                   f"write it in a linear, conv1d or conv2d rule")
            self.error(span, msg, "for weights and biases per_channel works with any selector")
        return out

    # --- rules: blocks and bindings ----------------------------------------------------------------------
    def block(self, stmt: ast.Block) -> None:
        for exclude in stmt.excludes:
            self.selector(exclude, binding=False)
        seen: dict[tuple[str, bool, str, str], ast.Selector] = {}
        for written in stmt.selectors:
            key = (written.text, written.quoted, written.form, written.scope)
            if key in seen:
                msg = f"{sel_text(written)} is listed twice in this block (first at column {seen[key].span.col})"
                self.error(written.span, msg)
                continue
            seen[key] = written
            self.rules(written, stmt.entries, in_block=True, excludes=stmt.excludes)

    def assertion(self, stmt: ast.Assert) -> None:
        if stmt.selector is None:
            ctx = RefContext("assert", "", None, None, variables=MODEL_VARIABLES)
            self.typed(stmt.test, ctx, "bool", "an assertion")
            return
        sel = self.selector(stmt.selector, binding=True)
        tensors = type_tensors(sel) if sel is not None else None
        names = assert_variables(tensors)
        ctx = RefContext("assert", "", sel, stmt.selector, variables=names)
        self.typed(stmt.test, ctx, "bool", "an assertion")

    def typed(self, expr: ast.Expr, ctx: RefContext, want: str, what: str) -> bool:
        kind = self.expr(expr, ctx)
        if kind is None:
            return False
        if kind != want:
            self.error(expr.span, f"{what} must be {KIND_WORDS[want]}, got {KIND_WORDS[kind]}")
            return False
        return True

    def rules(
        self,
        written: ast.Selector,
        entries: Iterable[ast.Entry],
        *,
        in_block: bool,
        excludes: tuple[ast.Selector, ...] = (),
    ) -> None:
        sel = self.selector(written, binding=True)
        if sel is not None and excludes:
            valid = [selector_of(e) for e in excludes if valid_selector(e)]
            sel = attrs.evolve(sel, exclude=tuple(valid)) if len(valid) == len(excludes) else None
        tensors = type_tensors(sel) if sel is not None else None
        seen: dict[str, ast.Entry] = {}
        for entry in entries:
            key = entry.key.name
            if in_block and key in seen:
                self.twice(entry, seen[key])
                continue
            seen[key] = entry
            if key not in ALL_PARAMS:
                hint = did_you_mean(key, ALL_PARAMS) or "see docs/LANGUAGE.md for the parameters"
                self.error(entry.key.span, f"unknown parameter '{key}'", hint)
                continue
            split = plan.split_param(key)
            if split is not None and tensors is not None and split[0] not in tensors:
                assert sel is not None
                msg = f"{sel_text(written)} has no tensor '{split[0]}', so '{key}' cannot be set"
                self.error(entry.key.span, msg, f"{sel_text(written)} has {and_list(tensors)}")
                continue
            ok = self.value(key, split, entry.value, sel, written)
            if ok and sel is not None:
                self.sets.append(_Set(("rule", sel, key), f"{sel}.{key}", entry.span))

    def value(
        self,
        key: str,
        split: tuple[str, str] | None,
        expr: ast.Expr,
        sel: plan.Selector | None,
        written: ast.Selector,
    ) -> bool:
        """Check the value of parameter `key` (`split` is `plan.split_param(key)`); `True` when valid."""
        if isinstance(expr, ast.Cond) and (split is None or plan.PARAM_SUFFIXES[split[1]] != "number"):
            # a parameter that takes an integer, a bool or a string: each branch must be one
            ctx = RefContext(key, plan.TENSOR_ALIASES[split[0]] if split else "data_in_0", sel, written)
            ok = self.typed(expr.test, ctx, "bool", "the condition of if")
            ok &= self.value(key, split, expr.then, sel, written)
            return self.value(key, split, expr.orelse, sel, written) and ok
        if split is None:  # `name`
            return self.quantiser(expr)
        tensor, suffix = split
        kind = plan.PARAM_SUFFIXES[suffix]
        if kind == "quantiser":  # `<tensor>_quantiser`: `na` leaves `name` in charge
            return literal(expr) is None or self.quantiser(expr, key)
        if suffix == "width":
            return self.width(key, tensor, expr)
        if kind == "int":
            return self.count(key, expr, low=0 if suffix == "frac_width" else 1)
        if kind == "bool":
            if isinstance(expr, (ast.BinOp, ast.Not, ast.Cond)):  # a condition evaluated per module
                ctx = RefContext(key, plan.TENSOR_ALIASES[tensor], sel, written)
                return self.typed(expr, ctx, "bool", key)
            return self.boolean(key, expr)
        value = literal(expr)
        if value is None:  # `na` on its own: unset
            return True
        if isinstance(value, str):
            msg = f"{key} takes a number, an expression over statistics or na, got a string"
            self.error(expr.span, msg)
            return False
        if suffix in ("threshold", "scale") and is_number(value) and value < 0:  # caught here, not at map time
            self.error(expr.span, f"{key} must be >= 0 (a ternary {suffix}), got {value}")
            return False
        return self.number(expr, RefContext(key, plan.TENSOR_ALIASES[tensor], sel, written))

    def quantiser(self, expr: ast.Expr, key: str = "name") -> bool:
        value = literal(expr)
        if not isinstance(value, str):
            msg = f'{key} takes a quantiser name in quotes, e.g. {key} = "ternary", got {kind_of(expr)}'
            self.error(expr.span, msg)
            return False
        if value not in plan.QUANTISERS:
            msg = f"unknown quantiser '{value}'"
            self.error(expr.span, msg, name_hint(value, plan.QUANTISERS, "the quantisers are"))
            return False
        return True

    def width(self, key: str, tensor: str, expr: ast.Expr) -> bool:
        value = literal(expr)
        # The kind may be set in another rule, so any kind's width passes here; the runtime checks the pair.
        widths = sorted({w for ws in plan.QUANTISER_WIDTHS.values() for w in ws} | {plan.FLOAT_WIDTH})
        if value is None or (is_int(value) and value in widths):
            return True
        kinds = ", ".join(f"{k} {widths_text(ws)}" for k, ws in plan.QUANTISER_WIDTHS.items())
        if is_int(value):
            msg = f"{key} must be a quantiser's width ({kinds}) or {plan.FLOAT_WIDTH} (leave {tensor} in float), got {value}"
        else:
            msg = f"{key} takes an integer ({kinds}, or {plan.FLOAT_WIDTH} for float), got {kind_of(expr)}"
        self.error(expr.span, msg)
        return False

    def count(self, key: str, expr: ast.Expr, low: int) -> bool:
        value = literal(expr)
        if value is None or (is_int(value) and value >= low):
            return True
        words = "a non-negative integer" if low == 0 else f"an integer of at least {low}"
        self.error(expr.span, f"{key} takes {words}, got {kind_of(expr)}")
        return False

    def boolean(self, key: str, expr: ast.Expr) -> bool:
        if isinstance(literal(expr), bool):
            return True
        if isinstance(expr, ast.Name) and expr.name not in VALUE_NAMES:
            return self.unknown_name(expr, ("true", "false"))
        self.error(expr.span, f"{key} takes true or false, got {kind_of(expr)}")
        return False

    def unknown_name(self, expr: ast.Name, known: Iterable[str], hint: str = "") -> bool:
        known = list(known)
        hint = did_you_mean(expr.name, known) or hint or f"expected {one_of(known)}"
        self.error(expr.span, f"unknown name '{expr.name}'", hint)
        return False

    def number(self, expr: ast.Expr, ctx: RefContext) -> bool:
        """Check a numeric expression (not `na` on its own); `True` when valid."""
        kind = self.expr(expr, ctx)
        if kind is None:
            return False
        if kind != "number":
            self.error(expr.span, f"{ctx.key} takes a number, got {KIND_WORDS[kind]}")
            return False
        return True

    def expr(self, expr: ast.Expr, ctx: RefContext) -> str | None:
        """The kind of an expression ("number", "bool" or "string"), or `None` after reporting an error."""
        if isinstance(expr, ast.Number):
            if not in_range(expr.value):
                self.error(expr.span, "number out of range")
                return None
            return "number"
        if isinstance(expr, ast.String):
            return "string"
        if isinstance(expr, ast.Name):
            if expr.name == "na":
                self.error(expr.span, "na (unset) cannot be part of an expression", f"write {ctx.key} = na")
                return None
            if expr.name in VALUE_NAMES:
                return "bool"
            if expr.name in ctx.variables:
                return ctx.variables[expr.name]
            if (expr.span.file, expr.name) in self.broken_lets:
                return None  # its let has no value, and says so
            if ctx.key == "assert":
                hint = assert_hint(expr.name, ctx)
                self.error(expr.span, f"unknown name '{expr.name}'", hint)
                return None
            hint = "a value is a number, an expression, stat.STAT.FIELD or na"
            self.unknown_name(expr, ("na", "stat", *FUNCTIONS, *self.let_names.get(expr.span.file, ())), hint)
            return None
        if isinstance(expr, ast.Neg):
            return self.operand(expr.operand, ctx, "number", "-")
        if isinstance(expr, ast.Not):
            return self.operand(expr.operand, ctx, "bool", "not")
        if isinstance(expr, ast.BinOp):
            return self.binop(expr, ctx)
        if isinstance(expr, ast.Cond):
            test = self.operand(expr.test, ctx, "bool", "if")
            then, orelse = self.expr(expr.then, ctx), self.expr(expr.orelse, ctx)
            if test is None or then is None or orelse is None:
                return None
            if then != orelse:
                msg = (f"the branches of if must be of one kind: then gives {KIND_WORDS[then]}, "
                       f"else {KIND_WORDS[orelse]}")
                self.error(expr.span, msg)
                return None
            return then
        if isinstance(expr, ast.Call):
            return "number" if self.call(expr, ctx) else None
        if isinstance(expr, ast.StatRef):
            return "number" if self.stat_ref(expr, ctx) else None
        self.error(expr.span, f"{ctx.key} takes a number, got {kind_of(expr)}")
        return None

    def operand(self, expr: ast.Expr, ctx: RefContext, want: str, op: str) -> str | None:
        kind = self.expr(expr, ctx)
        if kind is None:
            return None
        if kind != want:
            self.error(expr.span, f"'{op}' needs {KIND_WORDS[want]}, got {KIND_WORDS[kind]}")
            return None
        return want

    def binop(self, expr: ast.BinOp, ctx: RefContext) -> str | None:
        if expr.op in plan.LOGICAL_OPS:
            left = self.operand(expr.left, ctx, "bool", expr.op)
            right = self.operand(expr.right, ctx, "bool", expr.op)
            return "bool" if left and right else None
        if expr.op in ("==", "!="):
            left, right = self.expr(expr.left, ctx), self.expr(expr.right, ctx)
            if left is None or right is None:
                return None
            if left != right:
                self.error(expr.span, f"'{expr.op}' compares {KIND_WORDS[left]} with {KIND_WORDS[right]}")
                return None
            return "bool"
        left = self.expr(expr.left, ctx)
        right = self.expr(expr.right, ctx)
        if left is None or right is None:
            return None
        for side, kind in ((expr.left, left), (expr.right, right)):
            if kind != "number":
                what = "a comparison" if expr.op in plan.COMPARISON_OPS else "arithmetic"
                self.error(side.span, f"{KIND_WORDS[kind]} cannot be used in {what} ('{expr.op}')",
                           "a statistic field or a number is needed here")
                return None
        if expr.op == "/" and literal(expr.right) == 0:
            self.error(expr.right.span, "division by zero")
            return None
        return "bool" if expr.op in plan.COMPARISON_OPS else "number"

    def call(self, expr: ast.Call, ctx: RefContext) -> bool:
        fn = expr.fn.name
        if fn not in FUNCTIONS:
            self.error(expr.fn.span, f"unknown function '{fn}'", name_hint(fn, FUNCTIONS, "the functions are"))
            return False
        low, high = FUNCTIONS[fn]
        if len(expr.args) < low or (high is not None and len(expr.args) > high):
            want = f"{low} argument" if low == high else f"at least {low} argument"
            self.error(expr.span, f"{fn}() takes {want}{'s' if low > 1 else ''}, got {len(expr.args)}")
            return False
        return all([self.operand(a, ctx, "number", f"{fn}()") is not None for a in expr.args])

    # --- statistics --------------------------------------------------------------------------------------
    def statistic(self, name: ast.Ident) -> bool:
        if name.name in plan.STATISTICS:
            return True
        if name.name in plan.DERIVED_STATISTICS:
            msg = f"'{name.name}' is added by the compiler where it is needed and cannot be named"
            self.error(name.span, msg, "set data_in_scaling_factor = true to have it collected")
            return False
        hint = name_hint(name.name, plan.STATISTICS, "the statistics are")
        self.error(name.span, f"unknown statistic '{name.name}'", hint)
        return False

    def options(self, stat: str, options: Iterable[ast.Option]) -> dict[str, Any] | None:
        """Check a statistic's options; their plan values, or `None` when any is invalid."""
        own = plan.STATISTICS[stat].option_defaults()
        known = [*plan.COMMON_STAT_OPTIONS, *own]
        ok = True
        seen: set[str] = set()
        for opt in options:
            name = opt.name.name
            if name in seen:
                self.error(opt.name.span, f"option '{name}' is given twice")
                ok = False
                continue
            seen.add(name)
            if name not in known:
                elsewhere = [s for s, k in plan.STATISTICS.items() if name in k.option_defaults()]
                if elsewhere:
                    msg = f"{stat} takes no option '{name}' (only {one_of(elsewhere)} does)"
                    self.error(opt.name.span, msg, f"its options are {and_list(known)}")
                else:
                    hint = name_hint(name, known, "the options are")
                    self.error(opt.name.span, f"unknown option '{name}'", hint)
                ok = False
                continue
            ok &= self.option(name, opt.value)
        return written_options(options) if ok else None

    def option(self, name: str, expr: ast.Expr) -> bool:
        value = literal(expr)
        if name == "dims":
            if isinstance(expr, ast.Name) and expr.name in ("all", "none", *GRANULARITY):
                return True
            if isinstance(expr, ast.List):
                items = [literal(i) for i in expr.items]
                if not items:
                    self.error(expr.span, "dims = [] reduces no dimension", "write dims = none for that")
                    return False
                for item, value in zip(expr.items, items):
                    if not is_int(value):
                        self.error(item.span, f"dims lists dimensions as integers, got {kind_of(item)}")
                        return False
                if len(set(items)) != len(items):
                    self.error(expr.span, "dims lists a dimension twice")
                    return False
                return True
            if isinstance(expr, ast.Name) and expr.name not in VALUE_NAMES:
                return self.unknown_name(expr, ("all", "none", *GRANULARITY))
            msg = f"dims takes all, none or a list of dimensions such as [0, 1], got {kind_of(expr)}"
            self.error(expr.span, msg)
            return False
        if name == "abs":
            if isinstance(value, bool):
                return True
            if isinstance(expr, ast.Name) and expr.name not in VALUE_NAMES:
                return self.unknown_name(expr, ("true", "false"))
            self.error(expr.span, f"abs takes true or false, got {kind_of(expr)}")
            return False
        if not is_number(value):
            self.error(expr.span, f"{name} takes a number, got {kind_of(expr)}")
            return False
        if name == "quantile" and not 0 <= value <= 1:
            self.error(expr.span, f"quantile must be between 0 and 1, got {value}")
            return False
        if name == "num_sigma" and not (value > 0 and math.isfinite(value)):
            self.error(expr.span, f"num_sigma must be a positive number, got {value}")
            return False
        return True

    def stat_ref(self, ref: ast.StatRef, ctx: RefContext) -> bool:
        ok = True
        tensor = ctx.tensor
        sel, written_sel = ctx.sel, ctx.written
        if ref.module is not None:
            sel = self.selector(ref.module, binding=False)
            written_sel = ref.module
            if sel is None:
                return False
        if ref.tensor is not None:
            found = self.tensor(ref.tensor, sel, written_sel) if written_sel is not None else canonical_tensor(
                ref.tensor.name)
            ok = found is not None
            tensor = found or tensor
        elif not tensor:
            msg = "say which tensor the statistic is of here, e.g. stat(weight).abs_mean.abs_mean"
            self.error(ref.span, msg)
            return False
        if not self.statistic(ref.stat):
            return False
        stat = ref.stat.name
        written = self.options(stat, ref.options or ())
        ok &= written is not None
        if written is not None:
            written = self.granular(written, tensor, sel, ref.span)
            ok &= written is not None
        fields = plan.STATISTICS[stat].fields
        if ref.field.name not in fields:
            msg = f"{stat} has no field '{ref.field.name}'"
            hint = did_you_mean(ref.field.name, fields) or f"its fields are {and_list(fields)}"
            self.error(ref.field.span, msg, hint)
            ok = False
        if ok:
            assert written is not None
            self.refs.append(_Ref(ref, sel, tensor, written))
        return ok

    def resolve_refs(self) -> None:
        """A reference must not fit several statistics collected on its tensor with different options."""
        for ref in self.refs:
            found = candidates(self.profiled, ref.sel, ref.tensor, ref.node.stat.name, ref.written)
            if len(found) < 2:
                continue
            self.error(ref.node.span, ambiguous(ref, found))

    # --- shadowed rules ----------------------------------------------------------------------------------
    def shadowed(self) -> None:
        """Warn about a setting that a later one in the same file, same selector and key, replaces."""
        last: dict[tuple[Any, ...], _Set] = {}
        for s in reversed(self.sets):
            later = last.get(s.key)
            if later is not None and later.span.file == s.span.file:
                msg = f"{s.text} is set again at line {later.span.line}, so this never takes effect"
                self.diagnostics.append(Diagnostic(s.span, msg, severity="warning"))
            last[s.key] = s
        self.shadowed_by_broader()

    def shadowed_by_broader(self) -> None:
        """Warn about a glob rule that a later glob rule of the same rank, same file and key overrides on every
        module it can name: `"*.attn.out_proj".weight_width` then `"*.attn.*".weight_width`. (With a model,
        `ternqc compile --model` finds the other cases.)"""
        rules = [s for s in self.sets if s.key[0] == "rule"]
        for i, s in enumerate(rules):
            sel, key = s.key[1], s.key[2]
            if sel.kind != "glob" or sel.exclude:
                continue
            for later in rules[i + 1 :]:
                other = later.key[1]
                if (later.key[2] == key and later.span.file == s.span.file and other.kind == "glob"
                        and not other.exclude and other != sel and fnmatch.fnmatchcase(sel.pattern, other.pattern)):
                    msg = (f"{s.text} never takes effect: the later {other}.{key} at line {later.span.line} has "
                           f"the same rank and matches every module {sel} can name")
                    self.diagnostics.append(Diagnostic(s.span, msg, severity="warning"))
                    break


