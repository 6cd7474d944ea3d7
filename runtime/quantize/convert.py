"""Conversion: swap float modules for ternary ones, and the ternary checkpoint that reloads them.

In: a model and `{module_path: ModuleQuant}` (dotted paths such as `seq_blocks.0`). Out: the same model
with each configured module replaced, through its parent, by its ternary counterpart
(`modules.TERNARY_MODULES`); and `ternary.ckpt`, a file holding the model spec, the configs and the
converted model's `state_dict`, which `load_ternary_checkpoint` rebuilds without calibrating again.

Checkpoint layout (loadable with `torch.load(..., weights_only=True)`: only tensors and plain values):
`{"format": "ternqc-ternary", "version": 1, "model_spec": str, "configs": {path: ModuleQuant.to_dict()},
"state_dict": model.state_dict(), **extra}`.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import atomic_path
from ternqc.runtime.io.checkpoints import non_plain_entry
from ternqc.runtime.quantize.modules import TERNARY_MODULES, TernaryModule
from ternqc.runtime.quantize.quantizers import ModuleQuant

CHECKPOINT_FORMAT = "ternqc-ternary"
CHECKPOINT_VERSION = 1
_RESERVED = ("format", "version", "model_spec", "configs", "state_dict")


def convert_(model: nn.Module, configs: dict[str, ModuleQuant]) -> nn.Module:
    """Replace, in place, each module named in `configs` by its ternary counterpart.

    Each path is a dotted module path (`seq_blocks.0`, `encoder.layers.1.fc`; children of Sequential,
    ModuleList and ModuleDict by their name). Modules whose config quantises nothing are left as they are.
    Every replacement is built before any is swapped in, so a failure leaves the model unchanged.

    Args:
        model: the float model.
        configs: `{module_path: ModuleQuant}`.

    Returns:
        `model`, converted.

    Raises:
        UserError: an empty or unknown path (with the closest module names), a module type that has no
            ternary counterpart or does not match its config's op, an already converted module, or an
            invalid config (see the `from_float` methods).
    """
    modules = dict(model.named_modules())
    new: dict[str, nn.Module] = {}
    for path, mq in configs.items():
        if not mq.quantises_anything:
            continue
        if path == "":
            msg = f"{mq.node}: cannot convert the model's root module in place; wrap it in an nn.Sequential"
            raise UserError(msg)
        module = modules.get(path)
        if module is None:
            close = difflib.get_close_matches(path, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            msg = f"{mq.node}: the model has no module {path!r}{hint}"
            raise UserError(msg)
        if isinstance(module, TernaryModule):
            msg = f"{mq.node}: module {path!r} is already a {type(module).__name__}"
            raise UserError(msg)
        cls = TERNARY_MODULES.get(mq.op)
        if cls is None:
            supported = sorted(k for k in TERNARY_MODULES if isinstance(k, str))
            msg = f"{mq.node}: op {mq.op!r} has no ternary module (supported: {supported})"
            raise UserError(msg)
        new[path] = cls.from_float(module, mq)
    for path, replacement in new.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, replacement)
    return model


def save_ternary_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    configs: dict[str, ModuleQuant],
    *,
    model_spec: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a converted model's state and configs to `path`, atomically (`atomic.atomic_path`: a temporary
    file in the same folder, then a rename; on failure `path` keeps its old content).

    Args:
        path: the file to write (missing folders are created).
        model: the converted model.
        configs: the configs `model` was converted with (`{module_path: ModuleQuant}`).
        model_spec: what `build_model` needs to rebuild the float model (e.g. `toy` or `net.py:make`).
        extra: more plain values to store at the top level (e.g. accuracies); keys must not be one of
            `format`, `version`, `model_spec`, `configs`, `state_dict`.

    Raises:
        UserError: a reserved or non-plain `extra` value, or the file cannot be written.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        msg = f"cannot save {os.fspath(path)!r}: extra keys {clash} are reserved by the checkpoint format"
        raise UserError(msg)
    problem = non_plain_entry(extra, "extra")
    if problem:
        msg = f"cannot save {os.fspath(path)!r}: {problem}"
        raise UserError(msg)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_spec": str(model_spec),
        "configs": {p: mq.to_dict() for p, mq in configs.items()},
        "state_dict": model.state_dict(),
        **extra,
    }
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except OSError as exc:
            msg = f"cannot write {os.fspath(path)!r}: {exc}"
            raise UserError(msg) from exc


def load_ternary_checkpoint(
    path: str | os.PathLike, build_model: Callable[[str], nn.Module] | None = None
) -> tuple[nn.Module, dict[str, ModuleQuant], dict[str, Any]]:
    """Rebuild a converted model from a ternary checkpoint, without calibrating.

    Builds the float model with `build_model(model_spec)`, converts it with the stored configs, loads the
    stored state strictly and puts the model in eval mode.

    Args:
        path: a file written by `save_ternary_checkpoint`.
        build_model: `model_spec -> nn.Module`; defaults to `ternqc.runtime.models.build_model`.

    Returns:
        `(model, configs, meta)`: meta holds every top-level entry but `configs` and `state_dict`
        (`format`, `version`, `model_spec` and the saved `extra` values).

    Raises:
        UserError: a missing or unreadable file, another format or version, malformed configs, or a state
            that does not fit the rebuilt model.
    """
    target = os.fspath(path)
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        msg = f"ternary checkpoint {target!r} does not exist"
        raise UserError(msg) from exc
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        msg = f"cannot read ternary checkpoint {target!r}: {exc}"
        raise UserError(msg) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        msg = f"{target!r} is not a ternqc ternary checkpoint (no format = {CHECKPOINT_FORMAT!r})"
        raise UserError(msg)
    if payload.get("version") != CHECKPOINT_VERSION:
        msg = (
            f"ternary checkpoint {target!r} has version {payload.get('version')!r}; this ternqc reads "
            f"version {CHECKPOINT_VERSION}"
        )
        raise UserError(msg)
    try:
        spec = payload["model_spec"]
        state = payload["state_dict"]
        configs = {str(p): ModuleQuant.from_dict(d) for p, d in payload["configs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        msg = f"ternary checkpoint {target!r} is malformed: {exc!r}"
        raise UserError(msg) from exc
    if build_model is None:
        from ternqc.runtime.models.builtin import build_model
    model = build_model(spec)
    try:
        convert_(model, configs)
        model.load_state_dict(state, strict=True)
    except (UserError, RuntimeError) as exc:
        msg = f"ternary checkpoint {target!r} does not fit model {spec!r}: {exc}"
        raise UserError(msg) from exc
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("configs", "state_dict")}
    return model, configs, meta
