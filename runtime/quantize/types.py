"""Module types: which language type (`linear`, `conv2d`, `embedding`, ...) a torch module is.

In: an `nn.Module`. Out: its type name (`module_type`), and for a quantisable type the layout of its weight
(`param_view`: the tensor as the language sees it).

A type is decided by `isinstance` against the torch classes the language knows, never by class name, so
`nn.Linear` subclasses (`MultiheadAttention.out_proj`'s `NonDynamicallyQuantizableLinear`, a user's
`class MyLinear(nn.Linear)`) and parametrized modules (`ParametrizedLinear`) are all `linear`. Hugging
Face's `transformers.pytorch_utils.Conv1D` is a linear layer (`y = x @ W + b`, `W` shaped `[in, out]`): it is
`linear`, recognised by its defining module and class name without importing transformers, and its weight is
seen transposed (`[out, in]`, as `nn.Linear`'s), so per-channel statistics and thresholds are per output
feature. It is never taken for `nn.Conv1d`. A module of no quantisable type has the type of its class name in
lower case (the class behind a parametrization: `layernorm`, `multiheadattention`), which type selectors may
still name; a class that merely shares a quantisable type's name (a `Linear` that is no `nn.Linear`) gets its
qualified name (`mylib.layers.linear`), so no type selector takes it for that type.

| type        | torch classes                                      | tensors                 | weight as seen |
|-------------|----------------------------------------------------|-------------------------|----------------|
| `linear`    | `nn.Linear` and subclasses; transformers' `Conv1D` | data_in, weight, bias   | `[out, in]`    |
| `conv1d`    | `nn.Conv1d` and subclasses                         | data_in, weight, bias   | `[out, in/g, k]` |
| `conv2d`    | `nn.Conv2d` and subclasses                         | data_in, weight, bias   | `[out, in/g, kh, kw]` |
| `relu`      | `nn.ReLU` and subclasses                           | data_in                 |                |
| `embedding` | `nn.Embedding` and subclasses                      | weight                  | `[num, dim]`   |
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from attrs import frozen
from torch import nn

from ternqc.plan import QUANTISABLE

#: Classes recognised by (defining module prefix, class name) anywhere in a module's MRO, so that ternqc
#: never imports the library that defines them.
HF_CONV1D = ("transformers", "Conv1D")


def _has_class(module: nn.Module, where: tuple[str, str]) -> bool:
    prefix, name = where
    return any(c.__name__ == name and c.__module__.split(".")[0] == prefix for c in type(module).__mro__)


@frozen
class ModuleType:
    """One quantisable type: its language name, how to recognise a module of it, and whether its weight is
    stored transposed relative to the language's layout (`module.weight.T` is what rules see)."""

    name: str
    recognise: Callable[[nn.Module], bool]
    transposed: Callable[[nn.Module], bool] = lambda module: False


def _isinstance(*classes: type) -> Callable[[nn.Module], bool]:
    return lambda module: isinstance(module, classes)


#: The quantisable types, in the order they are tried (transformers' Conv1D before anything else: it is an
#: `nn.Module` that only looks like a convolution by name).
MODULE_TYPES: dict[str, ModuleType] = {
    t.name: t
    for t in (
        ModuleType("linear", lambda m: isinstance(m, nn.Linear) or _has_class(m, HF_CONV1D),
                   transposed=lambda m: _has_class(m, HF_CONV1D)),
        ModuleType("conv1d", _isinstance(nn.Conv1d)),
        ModuleType("conv2d", _isinstance(nn.Conv2d)),
        ModuleType("relu", _isinstance(nn.ReLU)),
        ModuleType("embedding", _isinstance(nn.Embedding)),
    )
}


def module_type(module: nn.Module) -> str:
    """The type a selector matches: a quantisable type (`linear`, `conv1d`, `conv2d`, `relu`, `embedding`)
    by `isinstance`, else the lower-case name of the module's class (the original class of a parametrized
    module)."""
    for entry in MODULE_TYPES.values():
        if entry.recognise(module):
            return entry.name
    cls = type(module)
    if getattr(module, "parametrizations", None) is not None and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]  # torch.nn.utils.parametrize's injected class
    name = cls.__name__.lower()
    if name in MODULE_TYPES:  # a class that only shares a quantisable type's name is not of that type
        return f"{cls.__module__}.{cls.__name__}".lower()
    return name


def is_transposed(module: nn.Module) -> bool:
    """Whether `module.weight` is stored as `[in, out]` (transformers' `Conv1D`) rather than `[out, in]`."""
    entry = MODULE_TYPES.get(module_type(module))
    return entry is not None and entry.transposed(module)


def param_view(module: nn.Module, tensor: str) -> torch.Tensor | None:
    """`module.<tensor>` (`weight` or `bias`) as the language sees it (a Conv1D weight transposed to
    `[out, in]`), or None when the module has no such tensor."""
    value = getattr(module, tensor, None)
    if not isinstance(value, torch.Tensor):
        return None
    if tensor == "weight" and is_transposed(module):
        return value.t()
    return value


def type_tensors(name: str) -> tuple[str, ...]:
    """The tensors of quantisable type `name` (`plan.QUANTISABLE`); empty for any other type."""
    return QUANTISABLE.get(name, ())


__all__ = ["MODULE_TYPES", "ModuleType", "is_transposed", "module_type", "param_view", "type_tensors"]
