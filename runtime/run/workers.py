"""`--workers N`: N local processes on 127.0.0.1 that form a gloo group, and the worker entry points of the
commands that calibrate (`profile_worker`, `apply_worker`, `finetune_worker`).

In: a module-level function and picklable arguments. Out: rank 0's return value (pickled back), or the first
worker's `UserError`.
"""


import os
import pickle
import shutil
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ternqc.runtime.errors import UserError
from ternqc.runtime.run.collectives import TIMEOUT, broadcast_model_, shutdown

# ---------------------------------------------------------------------------------------------------------
# --workers N: local processes on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------


def run_workers(n: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in `n` spawned processes that form a gloo process group on 127.0.0.1, and return
    rank 0's return value. `fn` must be a module-level function and `args` picklable (pass plans as
    `Plan.to_dict()`). Each process gets `torch.get_num_threads() // n` threads (at least 1).

    With `n <= 1` it calls `fn(*args)` here.

    Raises:
        UserError: a worker raised one (same message).
    """
    if n <= 1:
        return fn(*args)
    import torch.multiprocessing as mp

    outdir = tempfile.mkdtemp(prefix="ternqc-workers-")
    threads = max(1, torch.get_num_threads() // n)
    try:
        try:
            mp.start_processes(
                _worker,
                args=(n, _free_port(), threads, outdir, fn, args),
                nprocs=n,
                join=True,
                start_method=_start_method(),
            )
        except mp.ProcessExitedException:
            pass  # a worker's UserError: its message is in outdir (read below)
        errors = sorted(f for f in os.listdir(outdir) if f.startswith("error-"))
        if errors:
            with open(os.path.join(outdir, errors[0]), encoding="utf-8") as f:
                raise UserError(f.read())
        path = os.path.join(outdir, "result.pkl")
        if not os.path.exists(path):
            msg = f"the {n} calibration workers stopped without a result (one was killed?)"
            raise UserError(msg)
        with open(path, "rb") as f:
            return pickle.load(f)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def _start_method() -> str:
    """`forkserver` where available: one server process imports torch once and forks the workers (about
    2 s for two workers here, and a later call reuses it) instead of every worker importing torch itself
    (`spawn`, 3.5 s). Plain `fork` is not safe once this process has used OpenMP threads."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:  # not started yet
        multiprocessing.set_forkserver_preload(
            ["torch", "ternqc.runtime.run.workers", "ternqc.runtime.run.pipeline"]
        )
    return "forkserver"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(index: int, n: int, port: int, threads: int, outdir: str, fn: Callable, args: tuple) -> None:
    """One spawned process: join the group, run `fn`, hand rank 0's result (or a UserError) to the parent."""
    torch.set_num_threads(threads)
    os.environ.update(
        RANK=str(index),
        WORLD_SIZE=str(n),
        LOCAL_RANK=str(index),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=index, world_size=n, timeout=TIMEOUT
    )
    try:
        result = fn(*args)
        if index == 0:
            with open(os.path.join(outdir, "result.pkl.tmp"), "wb") as f:
                pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(os.path.join(outdir, "result.pkl.tmp"), os.path.join(outdir, "result.pkl"))
    except UserError as exc:
        with open(os.path.join(outdir, f"error-{index:05d}"), "w", encoding="utf-8") as f:
            f.write(str(exc))
        raise SystemExit(1) from None  # the parent stops the other workers
    finally:
        shutdown()


# ---------------------------------------------------------------------------------------------------------
# Worker entry points for `ternqc profile --workers N` and `ternqc apply --workers N`
# ---------------------------------------------------------------------------------------------------------


def _prepared(plan_dict: dict, settings):
    from ternqc.plan import Plan
    from ternqc.runtime.run import pipeline

    model = broadcast_model_(pipeline.load_model(settings))
    return Plan.from_dict(plan_dict), model


def profile_worker(plan_dict: dict, settings) -> Any:
    """`pipeline.profile` in every process (calibration sharded and merged); returns the `ProfileResult`
    without its batches. For `run_workers(n, profile_worker, plan.to_dict(), settings)`."""
    import attrs

    from ternqc.runtime.run import pipeline

    plan, model = _prepared(plan_dict, settings)
    result = pipeline.profile(model, plan, settings)
    return attrs.evolve(result, batches=())


def apply_worker(plan_dict: dict, settings, rules: str) -> Any:
    """`pipeline.apply` in every process (both calibration passes sharded and merged; evaluation runs in
    every process); returns rank 0's `ApplyResult` (its model converted) without the batches. For
    `run_workers(n, apply_worker, plan.to_dict(), settings, source)`."""
    import attrs

    from ternqc.runtime.run import pipeline

    plan, model = _prepared(plan_dict, settings)
    result = pipeline.apply(model, plan, settings, rules=rules)
    return attrs.evolve(result, profile=attrs.evolve(result.profile, batches=()))


def finetune_worker(plan_dict: dict, settings, tune, rules: str) -> Any:
    """`finetune.finetune` in every process (calibration sharded and merged, training data-parallel); returns
    rank 0's `FinetuneResult` without the calibration batches. For
    `run_workers(n, finetune_worker, plan.to_dict(), settings, tune, source)`."""
    import attrs

    from ternqc.runtime.run.finetune import finetune

    plan, model = _prepared(plan_dict, settings)
    tuned = finetune(model, plan, settings, tune, rules=rules)
    result = tuned.result
    result = attrs.evolve(result, profile=attrs.evolve(result.profile, batches=()))
    return attrs.evolve(tuned, result=result)
