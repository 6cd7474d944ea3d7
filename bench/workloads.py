"""The models, batches and profile points every benchmark measures.

Out: `WORKLOADS` (name -> `Workload`) and `build(name, batches=None)` -> `Built(model, batches, resolved)`:
- `toy`: MASE's toy network (ternqc's built-in), 64 batches of 128 samples of toy-tiny's distribution
  (uniform [-5, 5), shaped (1, 2, 2));
- `mlp`: 4 x (Linear(1024, 1024) + ReLU), 64 batches of 256;
- `transformer`: a 4-layer `nn.TransformerEncoder` (d_model 256, 8 heads, feed-forward 2048,
  `activation=nn.ReLU()`, batch first), 16 batches of 32 sequences of 128 tokens.
Each profiles range_min_max, range_quantile(0.5) and abs_mean on every Linear's input and weight (in the
transformer: `linear1` and `linear2` of each layer; the attention projections are not `nn.Linear` calls).
Data and weights come from fixed seeds. `LazyBatches` makes batches on demand (memory benchmarks must not
hold the calibration data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from attrs import frozen
from torch import nn

from ternqc.plan import Origin, ProfilePoint, Selector, StatSpec
from ternqc.runtime.calibrate.points import ResolvedPoints, resolve_profile
from ternqc.runtime.models.builtin import ToyNet

SPECS = (
    StatSpec("range_min_max"),
    StatSpec("range_quantile", options=(("quantile", 0.5),)),
    StatSpec("abs_mean"),
)


def profile_points() -> list[ProfilePoint]:
    """range_min_max, range_quantile(0.5) and abs_mean on every Linear's data_in_0 and weight."""
    origin = Origin("bench", 1, 1)
    return [ProfilePoint(Selector("type", "linear"), t, SPECS, origin) for t in ("data_in_0", "weight")]


def mlp() -> nn.Module:
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())])


def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(256, 8, dim_feedforward=2048, activation=nn.ReLU(), batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


@frozen
class Workload:
    make_model: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    batches: int
    describe: str


WORKLOADS = {
    "toy": Workload(ToyNet, lambda g: torch.rand(128, 1, 2, 2, generator=g) * 10 - 5, 64, "toy, 64 x 128"),
    "mlp": Workload(mlp, lambda g: torch.randn(256, 1024, generator=g), 64, "4 x Linear(1024), 64 x 256"),
    "transformer": Workload(
        transformer, lambda g: torch.randn(32, 128, 256, generator=g), 16, "4-layer encoder, 16 x 32 x 128"
    ),
}


class LazyBatches(Sequence):
    """`(input, None)` batches made on demand from a seed per index (nothing is kept)."""

    def __init__(self, workload: Workload, count: int, seed: int = 1) -> None:
        self.workload, self.count, self.seed = workload, count, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.workload.make_input(torch.Generator().manual_seed(self.seed * 1_000_003 + i)), None


@frozen
class Built:
    model: nn.Module
    batches: Sequence
    resolved: ResolvedPoints


def build(name: str, batches: int | None = None, lazy: bool = False) -> Built:
    """The workload's model (eval mode, seeded), its batches (`batches` of them, default the workload's) and
    resolved profile points."""
    w = WORKLOADS[name]
    torch.manual_seed(0)
    model = w.make_model().eval()
    lazy_batches = LazyBatches(w, batches or w.batches)
    data = lazy_batches if lazy else [lazy_batches[i] for i in range(len(lazy_batches))]
    return Built(model, data, resolve_profile(profile_points(), model))
