"""Conversion: quantise float modules in place, and the ternary checkpoint that reloads them.

In: a model and `{module_path: ModuleQuant}` (dotted paths such as `seq_blocks.0`). Out: the same model
with each configured module quantised in place by its kind
(`modules.TERNARY_MODULES`); and `ternary.ckpt`, a file holding the model spec, the configs and the
converted model's `state_dict`, which `load_ternary_checkpoint` rebuilds without calibrating again: into a
model the caller supplies (the spec stored in the file is never imported or run; only a built-in one is
built unasked).

Checkpoint layout (loadable with `torch.load(..., weights_only=True)`: only tensors and plain values):
`{"format": "ternqc-ternary", "version": 2, "model_spec": str, "configs": {path: ModuleQuant.to_dict()},
"state_dict": model.state_dict(), **extra}`. The configs are the ones the model was converted with (a tensor
whose quantisation could not take effect is float there). In the state_dict a quantised weight is stored as
its latent float value, `<path>.parametrizations.weight.original`, with Δ and α beside it
(`<path>.parametrizations.weight.0.delta`, `.alpha`), an input quantiser as `<path>.ternary_input.delta` /
`.alpha`; tied parameters (GPT-2's `lm_head.weight` is `wte.weight`) are saved once and stay tied.
Version 1 (ternqc's earlier swapped-in modules, `qweight` buffers) is refused with a message.
"""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ternqc.inputs import check_regular
from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import save_torch
from ternqc.runtime.io.checkpoints import non_plain_entry
from ternqc.runtime.quantize.modules import TERNARY_MODULES
from ternqc.runtime.quantize.quantizers import ModuleQuant

CHECKPOINT_FORMAT = "ternqc-ternary"
CHECKPOINT_VERSION = 2  # 2: modules quantised in place (parametrize); 1: swapped-in modules
_RESERVED = ("format", "version", "model_spec", "configs", "state_dict")


def convert_(model: nn.Module, configs: dict[str, ModuleQuant]) -> nn.Module:
    """Quantise, in place, each module named in `configs` (see `modules.py`: the module keeps its class and
    forward; its weight and bias become parametrized, its input quantised by a pre-hook).

    Each path is a dotted module path (`seq_blocks.0`, `encoder.layers.1.fc`; children of Sequential,
    ModuleList and ModuleDict by their name; `""` is the model itself). Modules whose config quantises
    nothing are left as they are. Every module is checked and its quantisers built before any is converted,
    so a failure leaves the model unchanged.

    Args:
        model: the float model.
        configs: `{module_path: ModuleQuant}`.

    Returns:
        `model`, converted.

    Raises:
        UserError: an unknown path (with the closest module names), a module whose type does not match its
            config's op, an already converted module, or an invalid config (see `TernaryModule.prepare`).
    """
    modules = dict(model.named_modules())
    steps = []
    for path, mq in configs.items():
        if not mq.quantises_anything:
            continue
        module = modules.get(path)
        if module is None:
            close = difflib.get_close_matches(path, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            msg = f"{mq.node}: the model has no module {path!r}{hint}"
            raise UserError(msg)
        cls = TERNARY_MODULES.get(mq.op)
        if cls is None:
            msg = f"{mq.node}: op {mq.op!r} has no ternary module (supported: {sorted(TERNARY_MODULES)})"
            raise UserError(msg)
        steps.append(cls.prepare(module, mq))
    for step in steps:
        step()
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
    save_torch(path, payload, "ternary checkpoint")


def load_ternary_checkpoint(
    path: str | os.PathLike, model: nn.Module | Callable[[str], nn.Module] | str | None = None
) -> tuple[nn.Module, dict[str, ModuleQuant], dict[str, Any]]:
    """Rebuild a converted model from a ternary checkpoint, without calibrating.

    A checkpoint is untrusted input: it is read with `torch.load(weights_only=True)`, and the model spec
    stored in it (`net.py:make`, `pkg.mod:make`) is never imported or run. The caller says where the float
    model comes from; the stored configs convert it and the stored state is loaded strictly (eval mode).

    Args:
        path: a file written by `save_ternary_checkpoint`.
        model: the float model, supplied by the caller:
            - an `nn.Module`: converted in place and returned;
            - a callable: called with the stored spec (for information) and returning the float model;
            - a spec string (`"toy"`, `"net.py:make"`): it must equal the stored spec, then it is built
              (`ternqc.runtime.models.build_model`), as the caller asked;
            - `None`: the stored spec must be a built-in model (`toy`); anything else is refused.

    Returns:
        `(model, configs, meta)`: meta holds every top-level entry but `configs` and `state_dict`
        (`format`, `version`, `model_spec` and the saved `extra` values).

    Raises:
        UserError: a missing, unreadable or non-regular file, another format or version, malformed configs,
            a stored spec that is not built in (with `model=None`) or differs from the given one, or a state
            that does not fit the model.
    """
    target = os.fspath(path)
    try:
        check_regular(target, "ternary checkpoint")
        payload = torch.load(target, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        msg = f"ternary checkpoint {target!r} does not exist"
        raise UserError(msg) from exc
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split()[:40])
        msg = f"cannot read ternary checkpoint {target!r}: {detail}"
        raise UserError(msg) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        msg = f"{target!r} is not a ternqc ternary checkpoint (no format = {CHECKPOINT_FORMAT!r})"
        raise UserError(msg)
    if payload.get("version") != CHECKPOINT_VERSION:
        msg = (
            f"ternary checkpoint {target!r} has version {_short(payload.get('version'))}; this ternqc reads "
            f"version {CHECKPOINT_VERSION}"
        )
        raise UserError(msg)
    try:
        spec = payload["model_spec"]
        state = payload["state_dict"]
        configs = {str(p): ModuleQuant.from_dict(d) for p, d in payload["configs"].items()}
        if not isinstance(spec, str):
            raise TypeError(f"model_spec is a {type(spec).__name__}, not a string")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        msg = f"ternary checkpoint {target!r} is malformed: {_short(exc)}"
        raise UserError(msg) from exc
    float_model = _float_model(target, spec, model)
    try:
        convert_(float_model, configs)
        float_model.load_state_dict(state, strict=True)
    except (UserError, RuntimeError) as exc:
        msg = f"ternary checkpoint {target!r} does not fit model {_short(spec)}: {exc}"
        raise UserError(msg) from exc
    float_model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("configs", "state_dict")}
    return float_model, configs, meta


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value) if not isinstance(value, BaseException) else f"{type(value).__name__}: {value}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _float_model(target: str, spec: str, model: nn.Module | Callable[[str], nn.Module] | str | None) -> nn.Module:
    """The float model to convert, from what the caller supplied; never from code the checkpoint names."""
    from ternqc.runtime.models.builtin import BUILTIN_MODELS, build_model

    if isinstance(model, nn.Module):
        return model
    if model is None:
        if spec not in BUILTIN_MODELS:
            msg = (
                f"ternary checkpoint {target!r} was made from model {_short(spec)}, which is not a built-in "
                f"model; ternqc never imports or runs code named inside a checkpoint. Pass the model yourself: "
                f"load_ternary_checkpoint(path, model=MyNet()) or model={_short(spec)} if you trust that code"
            )
            raise UserError(msg)
        return build_model(spec)
    if isinstance(model, str):
        if model != spec:
            msg = (
                f"ternary checkpoint {target!r} was made from model {_short(spec)}, not {model!r}; ternqc builds "
                "only the model the caller names, and only when the checkpoint names the same one"
            )
            raise UserError(msg)
        return build_model(model)
    built = model(spec)
    if not isinstance(built, nn.Module):
        msg = f"the model factory given for {target!r} returned a {type(built).__name__}, not an nn.Module"
        raise UserError(msg)
    return built
