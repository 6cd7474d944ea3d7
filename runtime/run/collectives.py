"""Calibration across processes with `torch.distributed`: process-group helpers and the collectives the
statistics merge with (`--workers N` and the commands' worker entry points are in `workers.py`).

In: the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), or a number of
local workers. Out: an initialised default process group (gloo for CPU tensors, NCCL for CUDA ones), and
the helpers `calibrate.calibrate` uses when it finds one: its shard of the batches (`batches[rank::world]`),
`sync_stats` (the statistics' merge protocols, over `gather_objects`: every process's object, rank order),
`first_failure` so that a failure in one process stops them all with the same message, and
`check_same_model`.

Two ways in:
- `torchrun --nproc-per-node N -m ternqc apply ...`: the command calls `init_from_env()` first, runs the
  pipeline in every process (calibration is sharded and merged inside), writes outputs only where
  `is_main_process()`, and calls `shutdown()` at the end.
- `--workers N`: `run_workers(N, fn, *args)` starts N local processes on 127.0.0.1 (torch.multiprocessing,
  forkserver where available else spawn; gloo; a free port), each initialises the group and calls
  `fn(*args)`; rank 0's return value comes back (pickled). `profile_worker`
  and `apply_worker` are such functions for the two commands.

Every process must hold the same model: built-in models without a checkpoint get a random initialisation
per process, so the workers broadcast rank 0's weights (`broadcast_model_`), and `calibrate` checks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ternqc.runtime.errors import UserError

__all__ = [
    "broadcast_model_",
    "check_same_model",
    "first_failure",
    "gather_objects",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank",
    "run_protocols",
    "shutdown",
    "sync_stats",
    "world_size",
]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
TIMEOUT = timedelta(minutes=30)


def is_distributed() -> bool:
    """Whether a default process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, the process that writes outputs and prints."""
    return rank() == 0


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment variables when they are set.

    gloo for CPU tensors, and NCCL for CUDA tensors when CUDA is available (`cpu:gloo,cuda:nccl`, the device
    `LOCAL_RANK`), so collectives run on the device of their tensors. Returns whether a group is
    initialised (False outside torchrun: a single process, nothing to do).

    Raises:
        UserError: the group cannot be initialised (e.g. the master address cannot be reached).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not all(name in os.environ for name in TORCHRUN_VARS):
        return False
    if not dist.is_available():
        msg = "this build of PyTorch has no torch.distributed, so it cannot run under torchrun"
        raise UserError(msg)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '?')}"
        msg = f"cannot start torch.distributed ({backend}, rank {os.environ['RANK']}, master {where}): {exc}"
        raise UserError(msg) from exc
    return True


def shutdown() -> None:
    """Destroy the default process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (`all_gather_object`; `[obj]` without a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_failure(message: str | None) -> str | None:
    """Agree on failure: every process passes its error message (None when it succeeded) and gets the
    lowest rank's message, or None when every process succeeded."""
    return next((m for m in gather_objects(message) if m is not None), None)


def check_same_model(model: nn.Module) -> None:
    """Raise a `UserError` in every process when the processes hold different weights (their statistics
    could not be merged)."""
    with torch.no_grad():
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        sums = [float(t.detach().double().sum()) for t in tensors]
    everyone = gather_objects(sums)
    if any(s != everyone[0] for s in everyone[1:]):
        msg = (
            "the processes of this distributed run hold different model weights, so their calibration "
            "statistics cannot be merged; load the same checkpoint in every process (--ckpt), or seed and "
            "build the model the same way"
        )
        raise UserError(msg)


def broadcast_model_(model: nn.Module) -> nn.Module:
    """Give every process rank 0's parameters and buffers (in place)."""
    if is_distributed():
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
    return model


# ---------------------------------------------------------------------------------------------------------
# Merging statistics: protocols advanced in lockstep
# ---------------------------------------------------------------------------------------------------------


def sync_stats(tensor_stats: Sequence[Any], gather: Callable[[Any], list[Any]] = gather_objects) -> None:
    """Merge `tensor_stats` (`stats.TensorStats`, the same list in the same order in every process) with every
    other process's, so that every process then holds the same results.

    `gather(obj)` returns the list of every process's `obj` in process order (`all_gather_object` by
    default). Each statistic runs a small protocol (`StatState.sync`: a generator that yields what it sends
    and is sent what everybody sent); the protocols of all statistics advance together, one `gather` per
    round (two or three rounds).
    """
    gens = {}
    for i, ts in enumerate(tensor_stats):
        gens.update(((i, k), g) for k, g in ts.sync().items())
    run_protocols(gens, gather)


def run_protocols(gens: dict[Any, Generator], gather: Callable[[Any], list[Any]]) -> dict[Any, Any]:
    """Advance protocol generators in lockstep: each round one `gather` of every active generator's message;
    returns each generator's return value. Every process must run the same generators with the same keys
    (their decisions depend only on gathered data, so they stay in step)."""
    results: dict[Any, Any] = {}
    active: dict[Any, tuple[Generator, Any]] = {}
    for key, gen in gens.items():
        try:
            active[key] = (gen, next(gen))
        except StopIteration as stop:
            results[key] = stop.value
    while active:
        everyone = gather({key: message for key, (_, message) in active.items()})
        advanced = {}
        for key, (gen, _) in active.items():
            try:
                advanced[key] = (gen, gen.send([part[key] for part in everyone]))
            except StopIteration as stop:
                results[key] = stop.value
        active = advanced
    return results
