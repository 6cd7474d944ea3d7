"""Calibration: the batches to calibrate on, and the loop that runs them through the hooked model.

In: a dataset of `(input, label)` pairs (or the other batch forms of `models.batches`), a sample count, a batch size and a seed; then a model and the
resolved profile points. Out: a list of `(inputs, labels)` batches (MASE's semantics: `ceil(samples /
batch_size)` batches from a loader shuffled by a seeded generator, every sample of those batches used), and
a `StatsTable`.

When the model's forward raises on a batch, the failure becomes a `UserError` that names the innermost
module running when it failed and the input's shape (`forward_naming_failures` does the same for any
forward, e.g. evaluation). Under `torch.distributed` (see `distributed.py`) each process calibrates its
share of the batches and the statistics are merged, with the same result as one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
from attrs import field, frozen
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ternqc.runtime.calibrate.heap import old_objects_frozen
from ternqc.runtime.calibrate.hooks import collect_stats
from ternqc.runtime.calibrate.points import ResolvedPoints
from ternqc.runtime.calibrate.stats.feeder import TensorStats
from ternqc.runtime.calibrate.stats.states import QuantileBudget
from ternqc.runtime.calibrate.table import StatsTable
from ternqc.runtime.errors import UserError
from ternqc.runtime.models.batches import batch_count, call_model, split_batch
from ternqc.runtime.progress import progress as progress_bar
from ternqc.runtime.run import collectives as distributed

Batch = tuple[Any, Any]


def calibration_batches(dataset, samples: int, batch_size: int, seed: int) -> list[Batch]:
    """`ceil(samples / batch_size)` batches of `(inputs, labels)` from `dataset`, shuffled with a
    `torch.Generator` seeded with `seed` (fewer when the dataset runs out). Every sample of those batches is
    kept, so `samples=32, batch_size=128` gives one batch of 128, as MASE does.

    Raises:
        UserError: an empty dataset, a dataset that cannot be shuffled, items that are not pairs, or a
            non-positive `samples` / `batch_size`.
    """
    if samples <= 0 or batch_size <= 0:
        msg = f"calibration needs a positive number of samples and batch size, got {samples} and {batch_size}"
        raise UserError(msg)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        kind = type(dataset).__name__
        msg = f"calibration needs a dataset with a length that can be shuffled, got a {kind}"
        raise UserError(msg)
    if len(dataset) == 0:
        msg = f"the calibration dataset ({type(dataset).__name__}) is empty"
        raise UserError(msg)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    wanted = math.ceil(samples / batch_size)
    batches: list[Batch] = []
    for batch in _read_batches(loader, dataset, batch_size):
        batches.append(split_batch(batch, where=f"the calibration dataset ({type(dataset).__name__})"))
        if len(batches) == wanted:
            break
    return batches


@frozen
class Calibrated:
    """A calibration's `table`, and the tensors whose `pending` statistics (derived ones, resolved without a
    threshold) still wait for it: `(path, tensor) -> TensorStats` (see `derived.py`)."""

    table: StatsTable
    pending: dict[tuple[str, str], TensorStats] = field(factory=dict, eq=False, repr=False)


def batches_from_iterable(data: Iterable, samples: int | None) -> tuple[list[Batch], int]:
    """`(inputs, labels)` batches read from a DataLoader or any iterable of batches, until they hold at least
    `samples` samples (all of them when `samples` is None); and how many samples they hold.

    Raises:
        UserError: a batch in none of the forms of `models.batches`, or no batch at all.
    """
    batches: list[Batch] = []
    count = 0
    for batch in data:
        inputs, labels = split_batch(batch, where="the calibration data")
        batches.append((inputs, labels))
        count += batch_count(inputs, labels)
        if samples is not None and count >= samples:
            break
    if not batches:
        msg = "the calibration data yielded no batch"
        raise UserError(msg)
    return batches, count


def _read_batches(loader: DataLoader, dataset: Any, batch_size: int):
    """The loader's batches; an exception while reading one (an item that raises, items of different
    shapes, a `__len__` larger than the data) becomes a `UserError` naming the dataset and the batch."""
    iterator = iter(loader)
    number = 0
    while True:
        number += 1
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as exc:
            detail = " ".join(str(exc).split())[:500] or "(no message)"
            msg = (
                f"reading calibration batch {number} ({batch_size} samples) from the dataset "
                f"({type(dataset).__name__}, {len(dataset)} items) failed: {type(exc).__name__}: {detail}"
            )
            raise UserError(msg) from exc
        yield batch


def calibrate(
    model: nn.Module,
    batches: Sequence[Batch],
    resolved: ResolvedPoints,
    *,
    quantile_budget: QuantileBudget | None = None,
    thresholds: Mapping[tuple[str, str], Any] | None = None,
    progress: bool = True,
    desc: str = "calibrate",
    bracket: bool = True,
) -> StatsTable:
    """`calibrate_pass(...).table`: the statistics (see `calibrate_pass`)."""
    return calibrate_pass(
        model, batches, resolved, quantile_budget=quantile_budget, thresholds=thresholds, progress=progress,
        desc=desc, bracket=bracket,
    ).table


def calibrate_pass(
    model: nn.Module,
    batches: Sequence[Batch],
    resolved: ResolvedPoints,
    *,
    quantile_budget: QuantileBudget | None = None,
    thresholds: Mapping[tuple[str, str], Any] | None = None,
    progress: bool = True,
    desc: str = "calibrate",
    bracket: bool = True,
    bands: Mapping[tuple[str, str], tuple[float, float]] | None = None,
) -> Calibrated:
    """Run `batches` through `model` (in eval mode, without gradients) and collect `resolved`'s statistics.

    Distributed: when `torch.distributed` is initialised with W > 1 processes, process r runs
    `batches[r::W]` (every process must pass the same batches and hold the same model), the statistics are
    merged across processes (`distributed.sync_stats`), and every process returns the same table: the
    same, bit for bit, as one process would compute (a quantile sketch aside, which is within its rank
    error). A failure in any process raises the same `UserError` in all of them. Only rank 0 draws the
    progress bar.

    Args:
        model: any `nn.Module`; put in eval mode.
        batches: `(inputs, labels)` pairs; `model(inputs)` is called for each.
        resolved: what to collect where (`profile.resolve_profile`).
        quantile_budget: shared by every quantile statistic (default 256 MiB); per process.
        thresholds: `(module_path, tensor) -> Δ` for `threshold_abs_mean` statistics; one without a
            threshold is pending: its values are kept (within the quantile budget) in `Calibrated.pending`.
        progress: draw a progress bar on stderr.
        desc: the progress bar's label.
        bracket: quantiles over a whole activation keep only the values near their ranks (`bracket.py`).
            When the data drift a wanted rank out of its bracket, that statistic (only) is collected again
            in a second pass over the batches without brackets: exact when its values fit the budget, else
            the certified sketch. Never an approximate answer from a bracket.
        bands: `(module_path, tensor) -> (L, H)` around a predicted Δ for the pending statistics: when their
            values do not fit the budget, they keep only those inside (`stats/threshold_state.py`).

    Raises:
        UserError: the model's forward raised (naming the module and the input shape), or a statistic cannot
            be collected on a tensor (e.g. per-channel dims with a changing shape), or the processes of a
            distributed run hold different models.
    """
    with old_objects_frozen():
        return _calibrate_pass(model, batches, resolved, quantile_budget, thresholds, progress, desc, bracket, bands)


def _calibrate_pass(model, batches, resolved, quantile_budget, thresholds, progress, desc, bracket, bands) -> Calibrated:
    if any(m.training for m in model.modules()):  # reading the flags costs less than setting every one
        model.eval()
    world, rank = distributed.world_size(), distributed.rank()
    mine = range(rank, len(batches), world)
    if world > 1:
        distributed.check_same_model(model)
    failure: tuple[Any, BaseException] | None = None
    with collect_stats(
        model,
        resolved,
        quantile_budget=quantile_budget,
        thresholds=thresholds,
        expected_batches=len(mine),
        planned_batches=len(batches),
        eager=world == 1,
        bracket=bracket,
        bands=bands,
    ) as collector:
        for i in progress_bar(mine, total=len(mine), desc=desc, enabled=progress and rank == 0):
            collector.batch = i
            inputs = batches[i][0]
            try:
                call_model(model, inputs)
            except KeyboardInterrupt:
                raise
            except UserError as exc:
                if world == 1:
                    raise
                failure = (inputs, exc)
                break
            except Exception as exc:  # noqa: BLE001 - the model's own failure, explained below
                failure = (inputs, exc)
                break
    error = None
    if failure is not None:
        inputs, exc = failure
        error = exc if isinstance(exc, UserError) else describe_failure(model, inputs, exc)
    if world > 1:
        message = distributed.first_failure(None if error is None else str(error))
        if message is not None:
            raise (error if error is not None and str(error) == message else UserError(message))
        collector.sync()
    elif error is not None:
        raise error from failure[1]
    missed = collector.missed()  # the same in every process (decided on merged data)
    table = collector.table()
    if missed:
        again = calibrate(
            model, batches, ResolvedPoints.from_mapping(missed), quantile_budget=quantile_budget,
            progress=progress, desc=f"{desc} (again)", bracket=False,
        )
        table = _with(table, again, collector)
    return Calibrated(table, collector.pending())


def _with(table: StatsTable, again: StatsTable, collector) -> StatsTable:
    """`table` with `again`'s results added, each tensor's statistics in the order they were asked for."""
    out = dict(table)
    for path, ms in again.items():
        have = out[path]
        values = {t: dict(v) for t, v in have.values.items()}
        for tensor, results in ms.values.items():
            merged = {**values.get(tensor, {}), **results}
            order = list(collector.stats[path][tensor].states)
            values[tensor] = {s: merged[s] for s in order if s in merged}
        notes = have.notes + tuple(n for n in ms.notes if n not in have.notes)
        out[path] = attrs.evolve(have, values=values, shapes={**ms.shapes, **have.shapes}, notes=notes)
    return out


def forward_naming_failures(model: nn.Module, inputs: Any, what: str = "calibration inputs") -> Any:
    """`model(inputs)`; if it raises, a `UserError` naming the innermost module that was running, the error
    and the input shape instead. `what` names the inputs in the message (e.g. "evaluation inputs")."""
    try:
        return call_model(model, inputs)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise describe_failure(model, inputs, exc, what) from exc


def describe_failure(
    model: nn.Module, inputs: Any, exc: BaseException, what: str = "calibration inputs"
) -> UserError:
    """The `UserError` for `exc`, raised by `model(inputs)`: "the model rejected the calibration inputs:
    seq_blocks.0 (Linear) raised RuntimeError: mat1 and mat2 shapes cannot be multiplied (128x9 and 4x100)
    (input batch shape [128, 1, 3, 3])". The module is the innermost one of `model` whose frame (its
    `forward`, hooks or `__call__`) is on the exception's traceback."""
    where = _failing_module(model, exc)
    detail = " ".join(str(exc).split()) or "(no message)"
    shape = _describe_inputs(inputs)
    msg = f"the model rejected the {what}: {where} raised {type(exc).__name__}: {detail} ({shape})"
    return UserError(msg)


def _failing_module(model: nn.Module, exc: BaseException) -> str:
    names = {id(m): path for path, m in model.named_modules()}
    found: nn.Module | None = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = owner
        tb = tb.tb_next
    if found is None or names[id(found)] == "":
        return f"the model ({type(found or model).__name__})"
    return f"{names[id(found)]} ({type(found).__name__})"


def _describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"input batch shape {list(inputs.shape)}"
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return "input batch shapes " + ", ".join(str(list(t.shape)) for t in inputs)
    if isinstance(inputs, Mapping) and all(isinstance(t, torch.Tensor) for t in inputs.values()):
        return "input batch shapes " + ", ".join(f"{k}={list(t.shape)}" for k, t in inputs.items())
    return f"input batch of type {type(inputs).__name__}"


__all__ = [
    "Calibrated",
    "batches_from_iterable",
    "calibrate",
    "calibrate_pass",
    "calibration_batches",
    "describe_failure",
    "forward_naming_failures",
]
