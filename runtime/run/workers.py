"""`--workers N`: N local processes on 127.0.0.1 that form a gloo group, and the worker entry points of the
commands that calibrate (`profile_worker`, `apply_worker`, `finetune_worker`).

In: a module-level function and picklable arguments. Out: rank 0's return value (pickled back), or the first
worker's `UserError`.
"""


import os
import pickle
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ternqc.runtime.errors import UserError
from ternqc.runtime.run.collectives import TIMEOUT, broadcast_model_, shutdown

_SPAWNED = "TERNQC_SPAWNED_WORKER"  # set in the processes `run_workers` starts

# ---------------------------------------------------------------------------------------------------------
# --workers N: local processes on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------


def run_workers(n: int, fn: Callable[..., Any], *args: Any, preload: Callable[[], None] | None = None) -> Any:
    """Run `fn(*args)` in `n` spawned processes that form a gloo process group on 127.0.0.1, and return
    rank 0's return value. `fn` must be a module-level function and `args` picklable (pass plans as
    `Plan` values pickle as they are). Each process gets `torch.get_num_threads() // n` threads (at least 1). `preload`
    runs here before rank 0's result is unpickled: it imports what the result's classes live in (a user's
    model file, see `import_user_code`).

    With `n <= 1` it calls `fn(*args)` here.

    Raises:
        UserError: a worker failed: its `UserError`'s message, or its exception's type and message, or how it
            died (a signal, an exit code); the other workers are stopped.
        KeyboardInterrupt: after stopping every worker.
    """
    if n <= 1:
        return fn(*args)
    import torch.multiprocessing as mp

    outdir = tempfile.mkdtemp(prefix="ternqc-workers-")
    threads = max(1, torch.get_num_threads() // n)
    context = None
    try:
        try:
            context = mp.start_processes(
                _worker,
                args=(n, _free_port(), threads, outdir, fn, args),
                nprocs=n,
                join=False,
                start_method=_start_method(),
            )
            while not context.join():
                pass
        except mp.ProcessExitedException as exc:
            _raise_worker_error(outdir, n, exc, context)
        except mp.ProcessRaisedException as exc:  # not ours: `_worker` reports every exception itself
            _raise_worker_error(outdir, n, exc, context)
        except BaseException:
            _stop(context)
            raise
        _raise_worker_error(outdir, n, None, context)
        path = os.path.join(outdir, "result.pkl")
        if not os.path.exists(path):
            msg = f"the {n} calibration workers stopped without a result (one was killed?)"
            raise UserError(msg)
        if preload is not None:
            preload()
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except (ModuleNotFoundError, AttributeError) as exc:
                msg = f"the result of the calibration workers could not be read back in this process: {exc}"
                raise UserError(msg) from exc
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def _stop(context: Any) -> None:
    """Terminate and reap every worker still running."""
    if context is None:
        return
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    for process in context.processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


#: Words of a worker's error that only says another worker went away (gloo's view of a crash elsewhere).
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def _raise_worker_error(outdir: str, n: int, exc: BaseException | None, context: Any = None) -> None:
    """Raise the root cause of a failed run as a `UserError`: a worker's own report (its `UserError`, or its
    exception); else a worker that died of a signal; else a report that only says a peer went away; else
    `exc` (how the first failed worker ended). Returns when nothing failed."""
    reports = {}
    for name in sorted(f for f in os.listdir(outdir) if f.startswith("error-")):
        with open(os.path.join(outdir, name), encoding="utf-8") as f:
            reports[int(name[len("error-"):])] = f.read()
    own = {i: text for i, text in reports.items() if not any(w in text for w in _LOST_PEER)}
    if own:
        raise UserError(own[min(own)])
    killed = []
    if getattr(exc, "signal_name", None):
        killed.append((exc.error_index, exc.signal_name))
    for i, process in enumerate(getattr(context, "processes", ())):
        code = process.exitcode
        if code is not None and code < 0 and i not in reports and -code != signal.SIGTERM:  # SIGTERM: ours
            killed.append((i, signal.Signals(-code).name))
    if killed:
        index, name = killed[0]
        how = f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        raise UserError(f"calibration worker {index} of {n} {how}") from None
    if reports:
        raise UserError(reports[min(reports)])
    if exc is None:
        return
    last = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
    msg = f"calibration worker {getattr(exc, 'error_index', '?')} of {n} failed: {last[0]}"
    raise UserError(msg) from None


def import_user_code(settings: Any) -> None:
    """Import the user's model and dataset files named in `settings` (`FILE.py:factory`), so objects of their
    classes can be unpickled in this process (they are registered under the same module names as in the
    workers)."""
    from ternqc.runtime.io.factories import is_factory_spec, load_factory

    for spec, what in ((settings.model, "model"), (settings.dataset, "dataset")):
        if spec and is_factory_spec(spec):
            load_factory(spec, what=what)


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
        # Started with Ctrl-C ignored (an ignored signal stays ignored across exec): a Ctrl-C while the server
        # imports torch would print its traceback. This process stops the workers itself (`_stop`).
        try:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave the server as multiprocessing starts it
            return "forkserver"
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return "forkserver"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(index: int, n: int, port: int, threads: int, outdir: str, fn: Callable, args: tuple) -> None:
    """One spawned process: join the group, run `fn`, hand rank 0's result (or a UserError) to the parent."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores Ctrl-C; a worker stops on it
    torch.set_num_threads(threads)
    os.environ.update(
        {_SPAWNED: "1"},
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
    except Exception as exc:  # noqa: BLE001 - every failure goes to the parent as one message
        text = str(exc)
        if not isinstance(exc, UserError):
            text = f"calibration worker {index} of {n} failed: {_describe(exc)}"
        with open(os.path.join(outdir, f"error-{index:05d}"), "w", encoding="utf-8") as f:
            f.write(text)
        raise SystemExit(1) from None  # the parent stops the other workers
    finally:
        shutdown()


def _describe(exc: BaseException) -> str:
    """`TypeName: message (at file.py:12 in func)`."""
    import traceback

    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        text += f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})"
    return text


# ---------------------------------------------------------------------------------------------------------
# Worker entry points for `ternqc profile --workers N` and `ternqc apply --workers N`
# ---------------------------------------------------------------------------------------------------------


def _prepared(plan, settings):
    """The plan as given (a `Plan` pickles as itself: no dict round trip) and this process's model, with rank
    0's weights."""
    from ternqc.runtime.run import pipeline

    return plan, broadcast_model_(pipeline.load_model(settings))


def profile_worker(plan, settings) -> Any:
    """`pipeline.profile` in every process (calibration sharded and merged); returns the `ProfileResult`
    without its batches. For `run_workers(n, profile_worker, plan, settings)`."""
    import attrs

    from ternqc.runtime.run import pipeline

    plan, model = _prepared(plan, settings)
    result = pipeline.profile(model, plan, settings)
    return attrs.evolve(result, batches=())


def apply_worker(plan, settings) -> Any:
    """`pipeline.apply` in every process (both calibration passes sharded and merged; evaluation runs in
    every process); returns rank 0's `ApplyResult` (its model converted) without the batches. For
    `run_workers(n, apply_worker, plan, settings)`."""
    import attrs

    from ternqc.runtime.run import pipeline

    plan, model = _prepared(plan, settings)
    result = pipeline.apply(model, plan, settings)
    result = attrs.evolve(result, profile=attrs.evolve(result.profile, batches=()))
    if os.environ.get(_SPAWNED):  # pickled back to the parent: a parametrized model pickles only as state
        result = attrs.evolve(result, model=_Rebuild(settings.model, result.configs, result.model.state_dict()))
    return result


class _Rebuild:
    """A converted model on its way to the parent process: unpickles as the model itself, rebuilt from its
    spec, configs and state (torch pickles parametrized modules only through their state_dict)."""

    def __init__(self, spec: str, configs: dict, state: dict) -> None:
        self.args = (spec, {p: mq.to_dict() for p, mq in configs.items()}, state)

    def __reduce__(self):
        return rebuild_converted, self.args


def rebuild_converted(spec: str, configs: dict, state: dict):
    """The float model `spec` converted with `configs` and loaded with `state` (in eval mode)."""
    from ternqc.runtime.models.builtin import build_model
    from ternqc.runtime.quantize.convert import convert_
    from ternqc.runtime.quantize.quantizers import ModuleQuant

    model = build_model(spec)
    convert_(model, {p: ModuleQuant.from_dict(d) for p, d in configs.items()})
    model.load_state_dict(state)
    return model.eval()


def finetune_worker(plan, settings, tune) -> Any:
    """`finetune.finetune` in every process (calibration sharded and merged, training data-parallel); returns
    rank 0's `FinetuneResult` without the calibration batches. For
    `run_workers(n, finetune_worker, plan, settings, tune)`."""
    import attrs

    from ternqc.runtime.run.finetune import finetune

    plan, model = _prepared(plan, settings)
    tuned = finetune(model, plan, settings, tune)
    result = attrs.evolve(tuned.result, profile=attrs.evolve(tuned.result.profile, batches=()))
    if os.environ.get(_SPAWNED):  # pickled back to the parent: a parametrized model pickles only as state
        result = attrs.evolve(result, model=_Rebuild(settings.model, result.configs, result.model.state_dict()))
    return attrs.evolve(tuned, result=result)
