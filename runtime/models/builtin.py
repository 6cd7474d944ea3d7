"""Models: the built-in `toy` network and user factories.

`build_model(spec) -> nn.Module`: `spec` is a built-in name (`toy`) or `FILE.py:factory` /
`package.module:factory`, where `factory()` returns an `nn.Module`. Built-ins get PyTorch's default
initialisation from the global RNG (seed it first for a reproducible model).
"""

from __future__ import annotations

from torch import nn

from ternqc.runtime.errors import UserError
from ternqc.runtime.io.factories import call_factory, is_factory_spec, load_factory, unknown_builtin_message


class ToyNet(nn.Module):
    """MASE's 2023 `toy` network: input [B, 1, 2, 2] flattened to 4, Linear(4,100)-ReLU-Linear(100,100)-ReLU-
    Linear(100,2). Module names match MASE's (`seq_blocks.0` ... `seq_blocks.4`), so MASE checkpoints load."""

    def __init__(self, in_features: int = 4, hidden: int = 100, num_classes: int = 2) -> None:
        super().__init__()
        self.seq_blocks = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.seq_blocks(x.view(x.size(0), -1))


BUILTIN_MODELS = {"toy": ToyNet}


def build_model(spec: str) -> nn.Module:
    """Build the model named by `spec`.

    Args:
        spec: a built-in name (`toy`), `path/to/file.py:factory` (relative to the working directory) or
            `package.module:factory`; `factory()` takes no arguments and returns an `nn.Module`.

    Returns:
        A fresh model (in training mode, as built).

    Raises:
        UserError: unknown built-in (with close matches), file or module not found, no such factory,
            the factory raised, or it returned something that is not an `nn.Module`.
    """
    if not is_factory_spec(spec):
        if spec in BUILTIN_MODELS:
            return BUILTIN_MODELS[spec]()
        raise UserError(unknown_builtin_message(spec, list(BUILTIN_MODELS), what="model"))
    factory = load_factory(spec, what="model")
    model = call_factory(spec, factory, what="model")
    if not isinstance(model, nn.Module):
        msg = (
            f"model factory {spec!r} returned a {type(model).__module__}.{type(model).__qualname__}, "
            f"not a torch.nn.Module; it must return the model itself (e.g. `return MyNet()`)"
        )
        raise UserError(msg)
    return model
