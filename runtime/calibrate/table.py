"""Collected statistics as plain values: what calibration produces and what mapping reads.

`StatsTable` maps a module path (`seq_blocks.0`) to its `ModuleStats`: the module's MASE/FX node name
(`seq_blocks_0`), its op (lower-case type: `linear`, `relu`, ...), the shapes of the tensors seen, and for
each canonical tensor (`data_in_0`, `data_out_0`, `weight`, `bias`) the results of each statistic.

A result is a dict from field name (`min`, `max`, `count`, ...) to a float, or to nested lists of floats for
per-channel / element-wise statistics. Results are keyed by their `StatSpec`; statistics read from a MASE
file, which does not record options, are keyed by the statistic's name (a `str`). `ModuleStats.lookup`
finds either. This module imports neither torch nor lark.
"""

from __future__ import annotations

from typing import Any, Union

from attrs import field, frozen

from ternqc.plan import StatSpec

StatKey = Union[StatSpec, str]
Result = dict[str, Any]


@frozen
class ModuleStats:
    path: str
    node: str
    op: str
    shapes: dict[str, tuple[int, ...]] = field(factory=dict)  # canonical tensor -> shape of one sample/param
    values: dict[str, dict[StatKey, Result]] = field(factory=dict)  # canonical tensor -> stat -> fields
    notes: tuple[str, ...] = ()  # e.g. "12 NaN/Inf values in data_in_0 were left out"

    def lookup(self, tensor: str, spec: StatSpec) -> Result | None:
        """The result of `spec` on `tensor`: by exact spec, else by key string, else by bare statistic name
        when exactly one result of that statistic exists for the tensor (a MASE file keeps no options)."""
        results = self.values.get(tensor, {})
        if spec in results:
            return results[spec]
        if spec.key() in results:
            return results[spec.key()]
        named = [k for k in results if (k.name if isinstance(k, StatSpec) else k) == spec.name]
        if len(named) == 1:
            return results[named[0]]
        return None


StatsTable = dict[str, ModuleStats]
