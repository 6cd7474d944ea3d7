"""Checkpoints: load a Lightning checkpoint or a plain state_dict into a model; write the Lightning layout.

`load_checkpoint_(model, path) -> metadata` reads `path` with `torch.load(weights_only=True)` (a file that
needs arbitrary Python objects is refused, never run), takes its weights (a Lightning checkpoint's
`state_dict` with `model.` stripped from the keys, as MASE's `--load-type pl` does, or a plain state_dict)
and loads them strictly, naming every missing, unexpected or mis-shaped key. It returns the checkpoint's
other top-level entries (`epoch`, `global_step`, `metrics`, ...).

`save_lightning_checkpoint(path, model, epoch=..., metrics=...)` writes `{"state_dict": {"model." + key:
tensor}, "epoch", "global_step", "metrics", "callbacks", "pytorch-lightning_version"}` holding only tensors
and plain values, atomically (through `atomic.atomic_path`: a temporary file in the same folder, then
`os.replace`).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ternqc.inputs import check_regular
from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import atomic_path, write_failure

#: Lightning's prefix for the wrapped model's keys (MASE's `LightningModule` holds the model as `self.model`).
LIGHTNING_PREFIX = "model."
#: Written as `pytorch-lightning_version`; Lightning parses this key to decide on checkpoint migrations.
LIGHTNING_VERSION = "2.0.0"
#: Entries of a Lightning checkpoint that are not returned as metadata (large, and about training state).
_NOT_METADATA = ("state_dict", "optimizer_states", "lr_schedulers")
_SHOWN_KEYS = 8
#: The key Lightning's ModelCheckpoint(monitor="val_loss") stores its state under.
_MODEL_CHECKPOINT_KEY = (
    "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0, "
    "'every_n_epochs': 1, 'train_time_interval': None}"
)


def _load_raw(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.exists():
        msg = f"checkpoint {str(path)!r} does not exist"
        raise UserError(msg)
    if p.is_dir():
        msg = f"checkpoint {str(path)!r} is a directory, not a checkpoint file"
        raise UserError(msg)
    try:
        check_regular(p, "checkpoint")  # a FIFO would block torch.load forever, /dev/zero never ends
        with open(p, "rb") as f:  # permissions and the like, told apart from a broken file below
            head = f.read(8)
    except OSError as exc:
        msg = f"checkpoint {str(path)!r} cannot be read: {exc.strerror or exc}"
        raise UserError(msg) from exc
    problem = _not_a_checkpoint(head)
    if problem:
        msg = f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint: {problem}"
        raise UserError(msg)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            msg = (
                f"checkpoint {str(path)!r} holds Python objects (it needs {found.group(1)}) and was refused: "
                f"ternqc loads checkpoints with torch.load(weights_only=True) and never runs code from them. "
                f"Save the weights alone, e.g. torch.save(model.state_dict(), path)"
            )
            raise UserError(msg) from exc
        detail = _first_line(exc)
        if detail.startswith("Weights only load failed"):  # torch's advice to drop weights_only: not ours
            detail = "the weights_only unpickler rejected its contents"
        msg = f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint ({detail})"
        raise UserError(msg) from exc
    except Exception as exc:  # a truncated zip reads as OSError(EINVAL) or RuntimeError, text as KeyError
        msg = (
            f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint "
            f"(torch.load failed with {type(exc).__name__}: {_first_line(exc) or 'unexpected end of file'})"
        )
        raise UserError(msg) from exc


def _not_a_checkpoint(head: bytes) -> str | None:
    """Why the first bytes of a file cannot start a `torch.save` file (a zip archive, or a pickle for the
    legacy format), or None."""
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None
    if not head:
        return "it is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with bytes {head[:4].hex(' ')}, not a zip archive or a pickle"
    return f"it is text (it starts with {text!r}), not a zip archive or a pickle"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _split_checkpoint(raw: Any, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict keyed like the model, metadata) from a Lightning checkpoint or a plain state_dict."""
    if isinstance(raw, Mapping) and raw.get("format") == "ternqc-ternary":
        msg = (
            f"checkpoint {path!r} is a ternary checkpoint written by `ternqc apply`; --ckpt takes the float "
            "model's weights (a Lightning checkpoint or a state_dict). Reload a ternary model with "
            "ternqc.runtime.quantize.convert.load_ternary_checkpoint"
        )
        raise UserError(msg)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        state = {
            (k[len(LIGHTNING_PREFIX) :] if k.startswith(LIGHTNING_PREFIX) else k): v
            for k, v in raw["state_dict"].items()
        }
        meta = {k: v for k, v in raw.items() if k not in _NOT_METADATA}
        return state, meta
    if _is_state_dict(raw):
        return dict(raw), {}
    if isinstance(raw, Mapping):
        keys = ", ".join(repr(k) for k in list(raw)[:_SHOWN_KEYS]) or "none"
        shape = f"a dict with keys {keys}"
    else:
        shape = f"a {type(raw).__name__}"
    msg = (
        f"checkpoint {path!r} holds {shape}: expected a Lightning checkpoint (a dict with 'state_dict') "
        f"or a plain state_dict (parameter names to tensors)"
    )
    raise UserError(msg)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    return shown + (f" and {len(items) - _SHOWN_KEYS} more" if len(items) > _SHOWN_KEYS else "")


def _shape(v: Any) -> str:
    return str(list(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__


def _check_keys(model: nn.Module, state: dict[str, Any], path: str, lightning: bool) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (checkpoint {_shape(state[k])}, model {_shape(expected[k])})"
        for k in expected
        if k in state
        and isinstance(expected[k], torch.Tensor)
        and isinstance(state[k], torch.Tensor)
        and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        _check_values(model, expected, state, path)
        return
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_listed(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_listed(unexpected)}")
    if mismatched:
        parts.append(f"shape differs: {_listed(mismatched)}")
    how = f"after stripping {LIGHTNING_PREFIX!r} from its keys" if lightning else "as a plain state_dict"
    msg = (
        f"checkpoint {path!r} does not fit the model {type(model).__name__} ({how}); "
        + "; ".join(parts)
        + ". Was it saved from the same model (--model)?"
    )
    raise UserError(msg)


def _check_values(model: nn.Module, expected: dict[str, Any], state: dict[str, Any], path: str) -> None:
    """Refuse values that `load_state_dict` would reject with a bare message, or silently damage: non-tensors,
    sparse tensors, complex numbers into real parameters, and NaN or infinite weights (counted)."""
    for key, want in expected.items():
        got = state[key]
        where = f"checkpoint {path!r}: {key}"
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(got, torch.Tensor):
            raise UserError(f"{where} is a {type(got).__name__}, not a tensor")
        if got.layout != torch.strided:
            layout = str(got.layout).replace("torch.", "")
            raise UserError(f"{where} is a {layout} tensor; ternqc loads dense tensors only")
        if got.is_complex() and not want.is_complex():
            msg = f"{where} holds complex numbers ({got.dtype}); the model's {key} is real ({want.dtype})"
            raise UserError(msg)
        if want.is_floating_point() and not (got.is_floating_point() or got.is_complex()):
            msg = (
                f"{where} holds {str(got.dtype).replace('torch.', '')} values; the model's {key} is {want.dtype} "
                "(was it saved from another model, or cast by mistake?)"
            )
            raise UserError(msg)
        if got.is_floating_point() or got.is_complex():
            nan, inf = int(torch.isnan(got).sum()), int(torch.isinf(got).sum())
            if nan or inf:
                msg = (
                    f"{where} holds {nan} NaN and {inf} infinite values of {got.numel()}; ternqc quantises "
                    "finite weights only"
                )
                raise UserError(msg)


def check_finite_parameters(model: nn.Module, source: str) -> None:
    """Refuse a model whose floating-point parameters hold NaN or infinity, naming the first such tensor and
    the counts (they would otherwise surface later as a threshold that cannot be resolved, blamed on a
    statistic of some downstream module).

    Raises:
        UserError: "the model 'net.py:make': seq_blocks.0.weight holds 3 NaN and 1 infinite values of 400".
    """
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            msg = (
                f"{source}: {name} holds {nan} NaN and {inf} infinite values of {tensor.numel()}; ternqc "
                "quantises finite weights only"
            )
            raise UserError(msg)


def load_checkpoint_(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load the weights in `path` into `model`, in place and strictly.

    A Lightning checkpoint (a dict with `state_dict`) has `model.` stripped from its keys (MASE's
    `--load-type pl`); any other dict of tensors is a plain state_dict. The file is read with
    `torch.load(path, map_location="cpu", weights_only=True)`.

    Returns:
        The checkpoint's other top-level entries (e.g. `epoch`, `global_step`, `metrics`; no optimizer
        state); `{}` for a plain state_dict.

    Raises:
        UserError: missing, unreadable, truncated or foreign file; a file holding Python objects (refused
            by weights_only, nothing executed); missing, unexpected or mis-shaped keys (all named, with
            shapes).
    """
    shown = str(path)
    raw = _load_raw(path)
    state, meta = _split_checkpoint(raw, shown)
    lightning = isinstance(raw, Mapping) and "state_dict" in raw
    _check_keys(model, state, shown, lightning)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied, or a module's own _load hook
        msg = f"checkpoint {shown!r} could not be loaded into {type(model).__name__}: {_first_line(exc)}"
        raise UserError(msg) from exc
    return meta


def non_plain_entry(value: Any, where: str) -> str | None:
    """The first entry of `value` that `torch.load(weights_only=True)` would not read back (tensors, numbers,
    strings, None, lists, tuples and dicts with str/int keys are fine), described as "`where[...]` is a
    set"; None when everything is plain."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return None
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := non_plain_entry(v, f"{where}[{i}]"))), None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                return f"{where} has a key of type {type(k).__name__}"
            problem = non_plain_entry(v, f"{where}[{k!r}]")
            if problem:
                return problem
        return None
    return f"{where} is a {type(value).__name__}, not a plain value"


def save_lightning_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    epoch: int,
    metrics: dict[str, float],
    extra: dict[str, Any] | None = None,
    global_step: int = 0,
) -> None:
    """Write `model`'s weights in the Lightning layout, atomically.

    Args:
        path: where to write, atomically; missing parent folders are created.
        model: whose `state_dict()` is written under `model.` + key (cloned to CPU).
        epoch: the epoch the weights come from (0-based, as Lightning counts).
        metrics: e.g. `{"val_loss": ..., "val_acc": ...}`; also written as a ModelCheckpoint-like
            callback state monitoring `val_loss` when that metric is present.
        extra: further top-level entries (tensors and plain values only); may not replace the ones above.
        global_step: optimizer steps taken up to `epoch`.

    Raises:
        UserError: the file cannot be written (folder not writable, disk full, ...).
        TypeError / ValueError: `metrics` or `extra` hold objects `weights_only` could not read back, or
            `extra` would replace a standard entry (bugs in the caller).
    """
    state = {LIGHTNING_PREFIX + k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    checkpoint: dict[str, Any] = {
        "state_dict": state,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "callbacks": {},
    }
    if "val_loss" in metrics:
        checkpoint["callbacks"][_MODEL_CHECKPOINT_KEY] = {
            "monitor": "val_loss",
            "best_model_score": torch.tensor(float(metrics["val_loss"])),
            "best_model_path": str(Path(path).resolve()),
        }
    for k, v in (extra or {}).items():
        if k in checkpoint:
            raise ValueError(f"extra entry {k!r} would replace a standard checkpoint entry")
        checkpoint[k] = v
    problem = non_plain_entry({k: v for k, v in checkpoint.items() if k != "state_dict"}, "checkpoint")
    if problem:
        raise TypeError(f"checkpoint entry {problem}")

    with atomic_path(path) as tmp:
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as RuntimeError
            msg = f"cannot write checkpoint {str(path)!r}: {write_failure(exc)}"
            raise UserError(msg) from exc
