"""`Selector`: which modules a rule, a profile point or an assertion is about, and how it matches a module
(`matches`, precedence rank `specificity`). Re-exported by `ternqc.plan`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Sequence
from typing import Any

import attrs
from attrs import field, frozen

from ternqc.plan.vocab import QUANTISABLE

SELECTOR_KINDS = ("default", "type", "scoped", "glob", "regex", "name", "first", "last")
#: Precedence rank of each kind: the more exactly a selector names a module, the higher.
SELECTOR_RANKS: dict[str, int] = {
    "default": 0, "type": 1, "scoped": 2, "glob": 3, "regex": 3, "name": 4, "first": 4, "last": 4,
}


def _regex_validator(inst: Any, _attr: Any, value: str) -> None:
    if inst.kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None


Module = tuple[str, str]  # (module path, type name as the runtime gives it)


@frozen
class Selector:
    """Which modules a rule is about.

    kind: `"default"` (every quantisable module), `"type"` (a module type, e.g. `linear`: the runtime passes
    the type name, which for the quantisable types is decided by `isinstance`, so subclasses match),
    `"scoped"` (a type whose module path matches the glob `scope`: `linear in "encoder.*"`), `"glob"` (a
    quoted name with `*`, `?` or `[`), `"regex"` (`re"..."`: a full match on the dotted path), `"name"` (a
    quoted module path such as `seq_blocks.0` or its MASE/FX node name `seq_blocks_0`), `"first"` / `"last"`
    (the first / last module of type `pattern` in the model's module order). `pattern` is empty for
    `default`. `exclude`: selectors whose modules are taken out (`linear except "seq_blocks.0"`).
    """

    kind: str = field(validator=attrs.validators.in_(SELECTOR_KINDS))
    pattern: str = field(default="", validator=[attrs.validators.instance_of(str), _regex_validator])
    scope: str = field(default="", validator=attrs.validators.instance_of(str))
    exclude: tuple[Selector, ...] = field(default=(), converter=tuple)

    @property
    def specificity(self) -> int:
        """Precedence rank (`SELECTOR_RANKS`): name, first, last 4 > glob, regex 3 > scoped 2 > type 1 >
        default 0 (later statements win at equal rank)."""
        return SELECTOR_RANKS[self.kind]

    @property
    def positional(self) -> bool:
        """Whether matching needs the model's ordered module list (`first` / `last`, also in `exclude`)."""
        return self.kind in ("first", "last") or any(e.positional for e in self.exclude)

    def matches(self, module_path: str, module_type: str, modules: Sequence[Module] | None = None) -> bool:
        """Whether this selector picks the module at `module_path` whose type name is `module_type`.

        Names and globs match either the dotted module path or the MASE/FX node name (dots -> underscores).
        `default` matches only quantisable types. `first` / `last` need `modules`, every `(path, type)` of the
        model in `named_modules()` order.

        Raises:
            ValueError: a `first` / `last` selector without `modules`.
        """
        if not self._matches(module_path, module_type, modules):
            return False
        return not any(e.matches(module_path, module_type, modules) for e in self.exclude)

    def _matches(self, module_path: str, module_type: str, modules: Sequence[Module] | None) -> bool:
        if self.kind == "default":
            return module_type in QUANTISABLE
        if self.kind == "type":
            return module_type == self.pattern
        if self.kind in ("first", "last"):
            if modules is None:
                raise ValueError(f"{self} needs the model's module list")
            if module_type != self.pattern:
                return False
            # scan from the near end only: a model with thousands of modules is matched module by module
            ordered = modules if self.kind == "first" else reversed(modules)
            return next((p for p, t in ordered if t == self.pattern), None) == module_path
        if self.kind == "regex":
            return re.fullmatch(self.pattern, module_path) is not None
        node = module_path.replace(".", "_")
        if self.kind == "scoped":
            return module_type == self.pattern and (
                fnmatch.fnmatchcase(module_path, self.scope) or fnmatch.fnmatchcase(node, self.scope)
            )
        if self.kind == "name":
            return self.pattern in (module_path, node)
        return fnmatch.fnmatchcase(module_path, self.pattern) or fnmatch.fnmatchcase(node, self.pattern)

    def select(self, modules: Sequence[Module]) -> list[str]:
        """The paths of `modules` (every `(path, type)` of a model, in order) this selector picks."""
        return [p for p, t in modules if self.matches(p, t, modules)]

    def __str__(self) -> str:
        if self.kind == "default":
            text = "default"
        elif self.kind == "type":
            text = self.pattern
        elif self.kind == "scoped":
            text = f"{self.pattern} in {json.dumps(self.scope)}"
        elif self.kind in ("first", "last"):
            text = f"{self.kind}({self.pattern})"
        elif self.kind == "regex":
            text = 're"' + self.pattern.replace('"', '\\"') + '"'
        else:
            text = json.dumps(self.pattern)
        if self.exclude:
            text += " except " + ", ".join(map(str, self.exclude))
        return text

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "pattern": self.pattern}
        if self.scope:
            d["scope"] = self.scope
        if self.exclude:
            d["exclude"] = [e.to_dict() for e in self.exclude]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selector:
        return cls(
            kind=d["kind"],
            pattern=d["pattern"],
            scope=d.get("scope", ""),
            exclude=tuple(cls.from_dict(e) for e in d.get("exclude", ())),
        )
