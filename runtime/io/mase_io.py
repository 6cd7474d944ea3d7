"""MASE's TOML files in and out: the statistics file (node-meta layout) and the quantize pass config.

Statistics (`write_stats_toml` / `read_stats_toml`), one top-level table per MASE/FX node name:
```
[seq_blocks_0.common]                                 mase_type, mase_op (the module's op: linear, relu...)
[seq_blocks_0.common.args.<data_in_0|weight|bias>]    type = "float", precision = [32], size
[seq_blocks_0.common.results.data_out_0]              likewise, when data_out was seen
[seq_blocks_0.hardware]                               empty, as MASE writes it
[seq_blocks_0.software.args.<tensor>.stat.<stat>]     the statistic's fields (min, max, count, ...)
[seq_blocks_0.software.results.data_out_0.stat.<stat>]
[seq_blocks_0.ternqc]                                 ours, only when needed (MASE ignores it)
```
`size` is `[1, *per-sample shape]` for activations and the parameter's shape for weights and biases. A
statistic's section is named by the statistic (`range_quantile`, as MASE does) when it is the only one of
that name on the tensor, otherwise by its full `StatSpec.key()` (`"range_quantile(dims=all, abs=false,
quantile=0.5)"`). `[<node>.ternqc.specs.<tensor>]` records the full key of the ones written by name, so
ternqc reads its own files back exactly; `path` keeps the dotted module path (when it differs from the node
name) and `notes` the calibration notes. Floats are written with `repr` precision, counts as integers,
per-channel results as arrays.

Reading a MASE file: node names are the section names and also the module paths (MASE keeps no dots), the
op is `common.mase_op`, statistics are keyed by their section name (a `str`; `ModuleStats.lookup` finds
them by statistic name) or, for a full spec key, by the parsed `StatSpec`. Nodes without statistics
(placeholder, size, view, output) stay in the table with empty values; their ops are not quantisable, so
mapping gives them no parameters.

Quantize config (`write_quant_config_toml`): `model`/`dataset` from a base config, `[passes.quantize]` with
`by = "name"` and `report = true`, `[passes.quantize.default.config]` (what `default` rules set to
constants), and `[passes.quantize.<node>.config]` with every key of the node's op, `"NA"` where unset.

All files are written with the `toml` library (MASE uses toml 0.10) and atomically; they are read with
`tomllib` (strict TOML 1.0; `tomli` on Python 3.10).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import toml

from ternqc.inputs import MAX_TOML_BYTES, MAX_TOML_DEPTH, check_nesting, read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ternqc.plan import DERIVED_STATISTICS, STATISTICS, StatSpec
from ternqc.runtime.calibrate.table import ModuleStats, StatKey, StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import atomic_write_text
from ternqc.runtime.quantize.mapping import MappingResult

#: MASE's `mase_type` of the non-module nodes it writes; every module is a `module_related_func`.
MASE_TYPES = {"placeholder": "placeholder", "output": "output", "get_attr": "get_attr",
              "size": "implicit_func", "view": "implicit_func"}
MODULE_MASE_TYPE = "module_related_func"
NA = "NA"  # MASE's spelling of an unset parameter
_RESERVED_NODES = ("by", "report", "default")  # keys of [passes.quantize] that a node name must not shadow


# ---------------------------------------------------------------------------------------------------------
# Statistic keys
# ---------------------------------------------------------------------------------------------------------

_SPEC_RE = re.compile(r"^([a-z_]+)\((.*)\)$")


def _split_top(body: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in body:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts]


def parse_spec_key(text: str) -> StatSpec | None:
    """The `StatSpec` whose `key()` is `text` (`range_quantile(dims=all, abs=false, quantile=0.5)`), or
    `None` when `text` is not such a key (a bare MASE statistic name, or anything else)."""
    m = _SPEC_RE.match(text.strip())
    if not m or (m.group(1) not in STATISTICS and m.group(1) not in DERIVED_STATISTICS):
        return None
    name = m.group(1)
    dims: Any = "all"
    absolute = False
    options = []
    for part in _split_top(m.group(2)):
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq:
            return None
        try:
            if key == "dims":
                if value in ("all", "none"):
                    dims = value
                elif value.startswith("[") and value.endswith("]"):
                    dims = tuple(int(x) for x in value[1:-1].split(",") if x.strip())
                else:
                    return None
            elif key == "abs":
                if value not in ("true", "false"):
                    return None
                absolute = value == "true"
            else:
                options.append((key, float(value)))
        except ValueError:
            return None
    try:
        spec = StatSpec(name=name, dims=dims, abs=absolute, options=tuple(options))
        known = set(spec.kind.option_defaults())
    except (ValueError, TypeError, KeyError):
        return None
    return spec if all(k in known for k, _ in spec.options) else None


def _stat_name(key: StatKey) -> str:
    if isinstance(key, StatSpec):
        return key.name
    spec = parse_spec_key(key)
    return spec.name if spec is not None else key


# ---------------------------------------------------------------------------------------------------------
# Writing statistics
# ---------------------------------------------------------------------------------------------------------


def _plain(v: Any, *, count: bool = False) -> Any:
    """A value TOML can hold: python scalars and nested lists (numpy turned into python)."""
    if isinstance(v, np.ndarray):
        return _plain(v.tolist(), count=count)
    if isinstance(v, (list, tuple)):
        return [_plain(x, count=count) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return int(f) if count and f.is_integer() else f
    return v


def _arg_meta(tensor: str, shape: tuple[int, ...] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"type": "float", "precision": [32]}
    if shape is not None:
        dims = [int(d) for d in shape]
        meta["size"] = [1, *dims] if tensor.startswith("data_") else dims
    return meta


def stats_to_dict(table: StatsTable) -> dict[str, Any]:
    """The statistics file's content as nested dicts (what `write_stats_toml` writes)."""
    out: dict[str, Any] = {}
    paths: dict[str, str] = {}
    for path, ms in table.items():
        if ms.node in out:
            msg = f"two modules have the node name {ms.node!r} ({paths[ms.node]} and {path}); " \
                  "MASE's layout keys statistics by node name and cannot hold both"
            raise UserError(msg)
        tensors = list(dict.fromkeys([*ms.shapes, *ms.values]))
        args = {t: _arg_meta(t, ms.shapes.get(t)) for t in tensors if not t.startswith("data_out")}
        results = {t: _arg_meta(t, ms.shapes.get(t)) for t in tensors if t.startswith("data_out")}
        common = {"mase_type": MASE_TYPES.get(ms.op, MODULE_MASE_TYPE), "mase_op": ms.op}
        if args:
            common["args"] = args
        if results:
            common["results"] = results
        software: dict[str, Any] = {}
        specs: dict[str, dict[str, str]] = {}
        for tensor, res in ms.values.items():
            stat, named = _stat_sections(path, tensor, res)
            side = "results" if tensor.startswith("data_out") else "args"
            software.setdefault(side, {})[tensor] = {"stat": stat}
            if named:
                specs[tensor] = named
        ternqc: dict[str, Any] = {"path": path} if path != ms.node else {}
        if ms.notes:
            ternqc["notes"] = list(ms.notes)
        if specs:
            ternqc["specs"] = specs
        out[ms.node] = {"common": common, "hardware": {}, "software": software}
        if ternqc:
            out[ms.node]["ternqc"] = ternqc
        paths[ms.node] = path
    return out


def _stat_sections(path: str, tensor: str, results: Mapping[StatKey, Mapping[str, Any]]):
    names = [_stat_name(k) for k in results]
    stat: dict[str, Any] = {}
    named: dict[str, str] = {}
    for key, fields in results.items():
        if isinstance(key, StatSpec):
            section = key.name if names.count(key.name) == 1 else key.key()
            if section == key.name:
                named[section] = key.key()
        else:
            section = key
        if section in stat:
            msg = f"module {path}: two statistics of {tensor} would both be written as {section!r}"
            raise ValueError(msg)
        stat[section] = {f: _plain(v, count=(f == "count")) for f, v in fields.items()}
    return stat, named


def write_stats_toml(path: str | os.PathLike, table: StatsTable) -> None:
    """Write `table` to `path` in MASE's node-meta layout (see the module docstring), atomically.

    Raises:
        UserError: two modules share a node name, or the file cannot be written.
    """
    text = "# statistics written by ternqc, in MASE's node-meta layout\n" + toml.dumps(stats_to_dict(table))
    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------------------
# Reading statistics
# ---------------------------------------------------------------------------------------------------------


def _load(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A TOML file as nested dicts, read strictly (TOML 1.0, `tomllib`), refused before parsing when it is
    not a regular file, larger than `inputs.MAX_TOML_BYTES` or nested deeper than `inputs.MAX_TOML_DEPTH`."""
    shown = os.fspath(path)
    try:
        text = read_text(path, what, MAX_TOML_BYTES)
    except FileNotFoundError as exc:
        raise UserError(f"{what} {shown} does not exist") from exc
    except OSError as exc:
        raise UserError(f"cannot read {what} {shown}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {what} {shown}: it is not UTF-8 text (byte offset {exc.start})") from exc
    try:
        check_nesting(text, shown, MAX_TOML_DEPTH, "toml")
    except ValueError as exc:
        raise UserError(f"{what} {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} {shown} is not valid TOML: {exc}") from exc
    except RecursionError as exc:  # out of reach below MAX_TOML_DEPTH; a safety net
        raise UserError(f"{what} {shown} is nested too deeply") from exc


def _shape(tensor: str, meta: Any) -> tuple[int, ...] | None:
    size = meta.get("size") if isinstance(meta, dict) else None
    if not isinstance(size, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in size):
        return None
    return tuple(size[1:]) if tensor.startswith("data_") and size else tuple(size)


def stats_from_dict(data: Mapping[str, Any], source: str = "the statistics file") -> StatsTable:
    """A `StatsTable` from a statistics file's content (ours or MASE's); see `read_stats_toml`."""
    table: StatsTable = {}
    if not data:
        raise UserError(f"{source} holds no nodes")
    for node, meta in data.items():
        where = f"{source}, node [{node}]"
        common = meta.get("common") if isinstance(meta, dict) else None
        op = common.get("mase_op") if isinstance(common, dict) else None
        if not isinstance(op, str):
            msg = f"{where}: no common.mase_op; this is not a statistics file in MASE's node-meta layout " \
                  "(each node needs [<node>.common] with mase_op)"
            raise UserError(msg)
        extra = meta.get("ternqc") if isinstance(meta.get("ternqc"), dict) else {}
        path = extra.get("path") if isinstance(extra.get("path"), str) else node
        specs = extra.get("specs") if isinstance(extra.get("specs"), dict) else {}
        shapes: dict[str, tuple[int, ...]] = {}
        for side in ("args", "results"):
            section = common.get(side, {})
            for tensor, arg in section.items() if isinstance(section, dict) else ():
                shape = _shape(tensor, arg)
                if shape is not None:
                    shapes[tensor] = shape
        values: dict[str, dict[StatKey, dict[str, Any]]] = {}
        software = meta.get("software", {})
        if not isinstance(software, dict):
            raise UserError(f"{where}: software is not a table")
        for side in ("args", "results"):
            section = software.get(side, {})
            if not isinstance(section, dict):
                raise UserError(f"{where}: software.{side} is not a table")
            for tensor, entry in section.items():
                stats = entry.get("stat", {}) if isinstance(entry, dict) else None
                if not isinstance(stats, dict):
                    raise UserError(f"{where}: software.{side}.{tensor}.stat is not a table")
                for name, fields in stats.items():
                    if not isinstance(fields, dict):
                        msg = f"{where}: software.{side}.{tensor}.stat.{name} is not a table of fields"
                        raise UserError(msg)
                    full = specs.get(tensor, {}).get(name) if isinstance(specs.get(tensor), dict) else None
                    spec = parse_spec_key(full if isinstance(full, str) else name)
                    values.setdefault(tensor, {})[spec if spec is not None else name] = dict(fields)
        if path in table:
            msg = f"{where}: its module path {path!r} is also that of node [{table[path].node}]; each node needs its own"
            raise UserError(msg)
        notes = extra.get("notes", [])
        table[path] = ModuleStats(path=path, node=node, op=op, shapes=shapes, values=values,
                                  notes=tuple(str(n) for n in notes) if isinstance(notes, list) else ())
    return table


def read_stats_toml(path: str | os.PathLike) -> StatsTable:
    """Read a statistics file in MASE's node-meta layout (written by MASE or by `write_stats_toml`).

    Args:
        path: the file.

    Returns:
        `{module path: ModuleStats}`, one entry per node, in file order. For a MASE file the module path is
        the node name.

    Raises:
        UserError: the file is missing, unreadable, not TOML, or not in the node-meta layout.
    """
    source = f"statistics file {os.fspath(path)}"
    return stats_from_dict(_load(path, "statistics file"), source)


# ---------------------------------------------------------------------------------------------------------
# The quantize config
# ---------------------------------------------------------------------------------------------------------


def _config_value(v: Any) -> Any:
    return NA if v is None else _plain(v)


def quant_config_dict(mapping: MappingResult, *, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The quantize config as nested dicts (what `write_quant_config_toml` writes)."""
    out: dict[str, Any] = {k: base[k] for k in ("model", "dataset") if base and k in base}
    default = _mase_keys({p: _config_value(v) for p, v in mapping.defaults.items()})
    quantize: dict[str, Any] = {"by": "name", "report": True, "default": {"config": default}}
    for m in mapping.modules.values():
        if m.node in _RESERVED_NODES or m.node in quantize:
            clash = "a key MASE reserves there" if m.node in _RESERVED_NODES else "another node"
            msg = f"node {m.node!r} (module {m.path}) cannot be written to [passes.quantize]: its name " \
                  f"collides with {clash}"
            raise UserError(msg)
        quantize[m.node] = {"config": _mase_keys({p: _config_value(v) for p, v in m.params.items()})}
    out["passes"] = {"quantize": quantize}
    return out


#: MASE's ternary quantiser keys are `<tensor>_<suffix>` for these; ternqc's own parameters (other kinds,
#: groups, dynamic scales, data_out) are written only where set, so a ternary config stays MASE's.
_MASE_TENSORS = ("data_in", "weight", "bias")
_MASE_SUFFIXES = ("width", "frac_width", "scaling_factor", "mean", "median", "max", "threshold", "scale")


def _mase_keys(config: dict[str, Any]) -> dict[str, Any]:
    """`config` without ternqc's own keys that are unset (`"NA"`)."""
    mase = {"name"} | {f"{t}_{s}" for t in _MASE_TENSORS for s in _MASE_SUFFIXES}
    return {k: v for k, v in config.items() if k in mase or v != "NA"}


def write_quant_config_toml(
    path: str | os.PathLike, mapping: MappingResult, *, base: Mapping[str, Any] | None = None
) -> None:
    """Write MASE's quantize pass config for `mapping` to `path`, atomically.

    Args:
        path: the file to write.
        mapping: the mapped parameters; every quantisable node gets `[passes.quantize.<node>.config]` with
            every MASE key of its op, `"NA"` where unset (ternqc's own keys only where set).
        base: a MASE config whose top-level `model` and `dataset` are copied (nothing else is taken).

    Raises:
        UserError: a node name collides with a reserved key, or the file cannot be written.
    """
    rules = ", ".join(mapping.sources)
    header = f"# quantize config written by ternqc{f' from rules {rules}' if rules else ''}\n"
    atomic_write_text(path, header + toml.dumps(quant_config_dict(mapping, base=base)))


def read_config_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a MASE config file (e.g. a `--base` for `write_quant_config_toml`) as nested dicts.

    Raises:
        UserError: the file is missing, unreadable or not TOML.
    """
    return _load(path, "config file")
