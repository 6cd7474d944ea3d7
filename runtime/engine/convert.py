"""Put a converted model on the integer engine: `to_engine_(model)`.

In: a model converted by `quantize.convert.convert_` (modules quantised in place by their kinds). Out: the
same model with every eligible converted `nn.Linear` / `nn.Conv1d` / `nn.Conv2d` replaced, through its
parent, by an `IntLinear` / `IntConv` (`linear.ineligible` says why a module stays simulated: a float weight
or input, more than 8 bits, a per-channel input scale, a grouped conv), and, inside each `nn.Sequential`, these fusions:

- `IntLinear, ReLU` → the ReLU is folded into the IntLinear's kernel (its place holds an `nn.Identity`);
- `IntLinear, ReLU, IntLinear` → the second knows its input is >= 0: a ternary input's codes are one
  comparison (`x > Δ`), an integer input's need no sign.

A ReLU counts when it is a plain `nn.ReLU` or a converted one that quantises nothing it sees. Fusion only
happens inside `nn.Sequential`, where the order of the children is the order of the data.
"""

from __future__ import annotations

from attrs import frozen
from torch import nn

from ternqc.runtime.engine.conv import IntConv
from ternqc.runtime.engine.linear import IntLinear, engine_op, ineligible
from ternqc.runtime.quantize.modules import is_converted


@frozen
class EngineReport:
    """What `to_engine_` did: module paths on the engine, fused ReLUs, and `{path: reason}` left simulated."""

    engine: tuple[str, ...]
    fused: tuple[str, ...]
    simulated: dict[str, str]


def to_engine_(model: nn.Module, *, fuse: bool = True) -> EngineReport:
    """Replace, in place, each eligible converted Linear / conv of `model` by its `IntLinear` / `IntConv`,
    then fuse.

    Returns:
        An `EngineReport`.
    """
    engine, simulated = [], {}
    for path, module in list(model.named_modules()):
        if not is_converted(module) or module.ternary_config.op in ("relu", "embedding"):
            continue
        reason = ineligible(module)
        if reason is not None:
            simulated[path] = reason
            continue
        cls = IntLinear if engine_op(module) == "linear" else IntConv
        _swap(model, path, cls.from_module(module))
        engine.append(path)
    fused = _fuse(model) if fuse else []
    model.eval()
    return EngineReport(tuple(engine), tuple(fused), simulated)


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _plain_relu(m: nn.Module) -> bool:
    if type(m) is not nn.ReLU:
        return False
    if is_converted(m):  # converted in place: a plain ReLU only when it quantises nothing
        return not any(tq.quantize for tq in m.ternary_config.tensors.values())
    return not m._forward_pre_hooks and not m._forward_hooks


def _fuse(model: nn.Module) -> list[str]:
    fused = []
    for seq_path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for i in range(len(names) - 1):
            a, r = seq._modules[names[i]], seq._modules[names[i + 1]]
            if not isinstance(a, IntLinear) or not _plain_relu(r):
                continue
            a.relu = True
            seq._modules[names[i + 1]] = nn.Identity()
            fused.append(f"{seq_path}.{names[i + 1]}" if seq_path else names[i + 1])
            b = seq._modules[names[i + 2]] if i + 2 < len(names) else None
            if isinstance(b, IntLinear):
                b._in.nonnegative = True
    return fused


__all__ = ["EngineReport", "to_engine_"]
