"""Quantiser kinds: one registered object each (`registry.QuantKind`); importing this package registers
`ternary`, `binary` and `integer`. Adding a kind: a file here with a `@register_kind` class, its name,
widths and parameters in `ternqc.plan` (`QUANTISER_WIDTHS`, `QUANTISER_PARAMS`), and its tests."""

from ternqc.runtime.quantize.kinds import binary, integer, ternary  # noqa: F401  (registration)
from ternqc.runtime.quantize.kinds.registry import KINDS, QuantKind, get_kind, granularity, row_dims

__all__ = ["KINDS", "QuantKind", "get_kind", "granularity", "row_dims"]
