"""The packed export: an engine model in one safetensors file, codes at their width.

In: a model on the integer engine (`to_engine_`) and the configs it was converted with. Out: a
`.safetensors` file (no pickle) that `load_packed` turns back into the same engine model, outputs equal bit
for bit. Layout (docs/PACKED.md):

- every entry of the engine model's `state_dict`, under its own name, except each `IntLinear`'s `wcodes`
  (int8 codes [in, out]), stored instead as `<module>.wcodes.packed`: uint8, the codes as unsigned fields
  `(c - low) // step` of `bits` bits, little-endian within each byte (ternary: 2 bits, 4 per byte;
  binary: 1 bit; integer: its width), row-major; or, for ternary with `ternary_packing="base3"`, five codes
  a byte as `Σ (c_i + 1)·3^i`;
- metadata (strings): `format` = `ternqc-packed`, `version` = `1`, `model_spec`, `configs` (JSON:
  `{module path: ModuleQuant.to_dict()}`, what `convert_` takes), `packed` (JSON: `{tensor name: {shape,
  kind, width, low, step, bits}}`), and any `extra` values given to `save_packed` (JSON).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ternqc.runtime.engine.convert import to_engine_
from ternqc.runtime.engine.linear import IntLinear
from ternqc.runtime.errors import UserError
from ternqc.runtime.io.atomic import atomic_path
from ternqc.runtime.quantize.convert import convert_
from ternqc.runtime.quantize.kinds import get_kind
from ternqc.runtime.quantize.quantizers import ModuleQuant

PACKED_FORMAT = "ternqc-packed"
PACKED_VERSION = "1"
_META = ("format", "version", "model_spec", "configs", "packed")


def pack_codes(codes: np.ndarray, low: int, step: int, bits: int) -> np.ndarray:
    """Integer codes -> uint8 bytes holding `(c - low) // step` in `bits` bits each, little-endian."""
    u = ((codes.astype(np.int32).ravel() - low) // step).astype(np.uint32)
    if u.size and int(u.max()) >= 2**bits:
        raise ValueError(f"codes do not fit {bits} bits")
    planes = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little")


def unpack_codes(data: np.ndarray, shape: tuple[int, ...], low: int, step: int, bits: int) -> np.ndarray:
    """The inverse of `pack_codes`: int8 codes of `shape` (int16 beyond 8 bits)."""
    n = int(np.prod(shape))
    planes = np.unpackbits(data, count=n * bits, bitorder="little").reshape(n, bits).astype(np.int32)
    u = (planes << np.arange(bits, dtype=np.int32)).sum(axis=1)
    dtype = np.int8 if bits <= 8 else np.int16
    return (u * step + low).astype(dtype).reshape(shape)


#: Powers of 3 of the five ternary digits in one base-3 byte (3^5 = 243 <= 256).
_TRITS = np.array([1, 3, 9, 27, 81], dtype=np.int32)


def pack_base3(codes: np.ndarray) -> np.ndarray:
    """Ternary codes (-1, 0, +1) -> uint8 bytes of five codes each, `Σ_i (c_i + 1) · 3^i` (1.6 bits a code);
    the last byte is padded with codes 0."""
    u = codes.astype(np.int32).ravel() + 1
    if u.size and (u.min() < 0 or u.max() > 2):
        raise ValueError("base-3 packing takes codes -1, 0, +1")
    padded = np.concatenate([u, np.ones((-u.size) % 5, dtype=np.int32)])
    return (padded.reshape(-1, 5) @ _TRITS).astype(np.uint8)


def unpack_base3(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `pack_base3`: int8 codes of `shape`."""
    n = int(np.prod(shape))
    digits = (data.astype(np.int32)[:, None] // _TRITS) % 3
    return (digits.ravel()[:n] - 1).astype(np.int8).reshape(shape)


def save_packed(
    path: str | os.PathLike,
    model: nn.Module,
    configs: dict[str, ModuleQuant] | None = None,
    *,
    model_spec: str,
    extra: dict[str, Any] | None = None,
    ternary_packing: str = "2bit",
) -> None:
    """Write engine model `model` to `path` (atomically), its int8 codes packed at their width.

    Args:
        path: the `.safetensors` file to write.
        model: a model on the integer engine.
        configs: the configs `model` was converted with (default: each converted module's own).
        model_spec: what `build_model` needs to rebuild the float model.
        extra: more JSON-able values to store in the metadata.
        ternary_packing: `2bit` (4 codes a byte) or `base3` (5 codes a byte, 1.6 bits a code).

    Raises:
        UserError: the file cannot be written, or an `extra` key is reserved.
    """
    from safetensors.torch import save_file

    if configs is None:
        configs = {}
        for p, m in model.named_modules():  # converted in place (`ternary_config`), or on the engine (`config`)
            mq = getattr(m, "ternary_config", None) if not isinstance(m, IntLinear) else m.config
            if isinstance(mq, ModuleQuant):
                configs[p] = mq
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    engine = {p for p, m in model.named_modules() if isinstance(m, IntLinear)}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if leaf == "wcodes" and owner in engine:
            tw = model.get_submodule(owner).config.tensor("weight")
            low, step, bits = get_kind(tw.kind).pack_layout(tw.width)
            base3 = tw.kind == "ternary" and ternary_packing == "base3"
            data = pack_base3(t.numpy()) if base3 else pack_codes(t.numpy(), low, step, bits)
            tensors[name + ".packed"] = torch.from_numpy(data)
            packed[name] = {"shape": list(t.shape), "kind": tw.kind, "width": tw.width, "low": low,
                            "step": step, "bits": bits, "scheme": "base3" if base3 else "bits"}
        else:
            tensors[name] = t.detach().contiguous().clone()
    meta = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "model_spec": str(model_spec),
        "configs": json.dumps({p: mq.to_dict() for p, mq in configs.items()}),
        "packed": json.dumps(packed),
    }
    for key, value in (extra or {}).items():
        if key in _META:
            raise UserError(f"cannot save {os.fspath(path)!r}: metadata key {key!r} is reserved")
        meta[key] = json.dumps(value)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=meta)
        except OSError as exc:
            raise UserError(f"cannot write {os.fspath(path)!r}: {exc}") from exc


def read_packed(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """`(metadata, state_dict with codes unpacked)` of a packed file.

    Raises:
        UserError: a missing or unreadable file, or not a ternqc packed file of this version.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    target = os.fspath(path)
    if not os.path.exists(target):
        raise UserError(f"packed model {target!r} does not exist")
    try:
        with safe_open(target, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(target)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read packed model {target!r}: {exc}") from exc
    if meta.get("format") != PACKED_FORMAT or meta.get("version") != PACKED_VERSION:
        msg = f"{target!r} is not a ternqc packed model version {PACKED_VERSION} (format {meta.get('format')!r})"
        raise UserError(msg)
    try:
        for name, info in json.loads(meta["packed"]).items():
            data = tensors.pop(name + ".packed").numpy()
            if info.get("scheme", "bits") == "base3":
                codes = unpack_base3(data, tuple(info["shape"]))
            else:
                codes = unpack_codes(data, tuple(info["shape"]), info["low"], info["step"], info["bits"])
            tensors[name] = torch.from_numpy(codes)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"packed model {target!r} is malformed: {exc!r}") from exc
    return meta, tensors


def load_packed(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    build_model: Callable[[str], nn.Module] | None = None,
) -> nn.Module:
    """Rebuild the engine model saved by `save_packed`.

    Args:
        path: the packed file.
        model: the float model to convert in place (its weights are replaced); default:
            `build_model(model_spec)` with the stored spec.
        build_model: `model_spec -> nn.Module`; defaults to `ternqc.runtime.models.builtin.build_model`.

    Returns:
        The model on the integer engine, in eval mode; its outputs equal the saved model's bit for bit.

    Raises:
        UserError: an unreadable or malformed file, or a model it does not fit.
    """
    meta, state = read_packed(path)
    try:
        configs = {p: ModuleQuant.from_dict(d) for p, d in json.loads(meta["configs"]).items()}
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"packed model {os.fspath(path)!r} has malformed configs: {exc!r}") from exc
    if model is None:
        if build_model is None:
            from ternqc.runtime.models.builtin import build_model
        model = build_model(meta["model_spec"])
    try:
        convert_(model, configs)
        to_engine_(model)
        model.load_state_dict(state, strict=True)
    except (UserError, RuntimeError, ValueError) as exc:
        msg = f"packed model {os.fspath(path)!r} does not fit the model ({meta['model_spec']!r}): {exc}"
        raise UserError(msg) from exc
    return model.eval()





def export_checkpoint(ckpt: str | os.PathLike, output: str | os.PathLike, ternary_packing: str = "2bit"):
    """`ternqc export`: a ternary checkpoint (`ternqc apply`'s `ternary.ckpt`) -> a packed engine model.

    Returns:
        `(EngineReport, (checkpoint state bytes, packed file bytes))`.

    Raises:
        UserError: an unreadable checkpoint or an unwritable output.
    """
    from ternqc.runtime.quantize.convert import load_ternary_checkpoint

    model, configs, meta = load_ternary_checkpoint(ckpt)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report = to_engine_(model)
    extra = {k: v for k, v in meta.items() if k in ("float_accuracy", "ternary_accuracy")}
    save_packed(output, model, configs, model_spec=meta["model_spec"], extra=extra, ternary_packing=ternary_packing)
    return report, (state_bytes, os.path.getsize(output))

__all__ = [
    "export_checkpoint",
    "load_packed",
    "pack_base3",
    "pack_codes",
    "read_packed",
    "save_packed",
    "unpack_base3",
    "unpack_codes",
]
