"""The statistics registry: statistic name -> state class, filled by `@register_stat` beside each class.

In: a state class (decorated). Out: `STAT_REGISTRY` (name -> class) and `StatContext`, the one thing every
state's constructor takes besides its `StatSpec`: `cls.from_spec(spec, ctx)`. `make_state` only looks the
class up; a test pins `set(STAT_REGISTRY)` to the plan's vocabulary (`plan.STATISTICS` and
`plan.DERIVED_STATISTICS`), so a statistic added on one side only fails at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import field, frozen

#: statistic name -> state class (see `states.py`).
STAT_REGISTRY: dict[str, type] = {}


@frozen
class StatContext:
    """What a state may need beyond its `StatSpec` (each class reads only what it uses).

    `batched`: dim 0 is a batch (activations), always reduced. `budget`: the run's shared `QuantileBudget`
    (None: a private default one). `threshold`: Δ of `threshold_abs_mean` (a float or a tensor that
    broadcasts against x); None defers it: the values are kept until `set_threshold`. `size_hint`: the
    number of `update` calls expected here; `plan_hint`: by every process together. `eager`: fold per-batch
    partials as they come (False: a process of a distributed run, or a merge target). `bracket`: a quantile
    over everything may keep only the values near its ranks (`bracket.py`; a miss is collected again).
    `band`: `(L, H)` around a prediction of `threshold_abs_mean`'s Δ; a pending state whose values do not fit
    keeps only those inside (`threshold_state.py`).
    """

    batched: bool = True
    budget: Any = field(default=None, eq=False)
    threshold: Any = field(default=None, eq=False)
    size_hint: int | None = None
    plan_hint: int | None = None
    eager: bool = True
    bracket: bool = False
    band: tuple[float, float] | None = None


def register_stat(*names: str) -> Callable[[type], type]:
    """Class decorator: the state class of the statistics `names` (one class may serve several)."""

    def register(cls: type) -> type:
        for name in names:
            if name in STAT_REGISTRY:
                msg = f"statistic {name!r} is registered twice ({STAT_REGISTRY[name].__name__}, {cls.__name__})"
                raise ValueError(msg)
            STAT_REGISTRY[name] = cls
        return cls

    return register
