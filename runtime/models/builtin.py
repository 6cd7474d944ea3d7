"""Models: the built-in networks (`toy`, `digits-mlp`, `digits-cnn`) and user factories.

`build_model(spec) -> nn.Module`: `spec` is a built-in name (`toy`, `digits-mlp`, `digits-cnn`) or `FILE.py:factory` /
`package.module:factory`, where `factory()` returns an `nn.Module`. Built-ins get PyTorch's default
initialisation from the global RNG (seed it first for a reproducible model). Every built-in keeps its
layers in one `nn.Sequential` called `seq_blocks`, as MASE's toy does, so `seq_blocks.0` (node name
`seq_blocks_0`) is always the first layer, the one that sees the raw input (recipes name it).

`default_dataset(spec)` is the dataset a built-in model is made for (`toy-tiny` for `toy` and for user
factories, `digits` for the digits models).
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


class DigitsMLP(nn.Module):
    """An MLP for the 8×8 digits: input [B, 1, 8, 8] flattened to 64, Linear(64,128)-ReLU-Linear(128,64)-ReLU-
    Linear(64,10)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq_blocks = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.seq_blocks(x.view(x.size(0), -1))


class DigitsCNN(nn.Module):
    """A small CNN for the 8×8 digits (55k parameters): input [B, 1, 8, 8]; Conv(1→32, 3×3)-ReLU-MaxPool(2)
    to 32×4×4, Conv(32→64, 3×3)-ReLU-MaxPool(2) to 64×2×2, Flatten, Linear(256,128)-ReLU-Linear(128,10).
    (Half as wide, ternary activations cost 2.5 points more after fine-tuning: a binary {0, α} ReLU output
    needs channels to carry information.)"""

    def __init__(self) -> None:
        super().__init__()
        self.seq_blocks = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.seq_blocks(x)


BUILTIN_MODELS = {"toy": ToyNet, "digits-mlp": DigitsMLP, "digits-cnn": DigitsCNN}
#: The dataset each built-in model is made for (its input shape and classes).
BUILTIN_DATASET_OF = {"toy": "toy-tiny", "digits-mlp": "digits", "digits-cnn": "digits"}


def default_dataset(spec: str) -> str:
    """The dataset `spec` is made for: its entry in `BUILTIN_DATASET_OF`, else `toy-tiny` (the historical
    default, kept for user factories)."""
    return BUILTIN_DATASET_OF.get(spec, "toy-tiny")


def build_model(spec: str) -> nn.Module:
    """Build the model named by `spec`.

    Args:
        spec: a built-in name (`toy`, `digits-mlp`, `digits-cnn`), `path/to/file.py:factory` (relative to the working directory) or
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
