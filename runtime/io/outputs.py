"""A command's outputs as one set: all of them committed together with one rename, or none of them.

`write_output_set(folder, writers)` writes every file into a fresh temporary folder beside `folder`
(`.NAME.PID.HEX.ternqc-tmp`), then swaps it with `folder` in one atomic exchange (`renameat2(RENAME_EXCHANGE)`
on Linux; elsewhere two renames, repaired on the next run), and only then removes the previous set. Until the
swap the previous outputs stay as they were; under SIGINT or SIGTERM the temporary folder is removed; after a
SIGKILL it is left behind and removed by the next run that writes there (`clean_stale`). Files in `folder`
that are not among the outputs (a `best.ckpt` from `ternqc demo`) are hard-linked into the new set, so they
survive the swap. A folder that holds sub-folders, or is the working directory or one of its parents, is
refused: ternqc swaps only a folder of its own.

`refuse_overwriting_inputs(outputs, inputs)` refuses an output path that resolves to an input file
(`ternqc compile r.tq -o r.tq`).

`fault_point(step)` is for the tests of this module only: when `TERNQC_TEST_SIGNAL_AT` is `STEP:SIGNAL`
(e.g. `ternary.ckpt:KILL`), the process sends itself that signal at that step of the write sequence.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import signal
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ternqc.runtime.errors import UserError

#: Test hook: `STEP:SIGNAL` makes the writer signal itself at STEP: a file of a set written (its name), `commit`,
#: `committed`, or `replace:NAME` just before a single file's rename (`atomic.atomic_path`).
FAULT_ENV = "TERNQC_TEST_SIGNAL_AT"
_TMP_SUFFIX = ".ternqc-tmp"
_OLD_SUFFIX = ".ternqc-old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: What `ternqc apply` writes into its output folder.
APPLY_OUTPUTS = ("stats.toml", "quant_config.toml", "ternary.ckpt", "report.json")
#: At most this many files of someone else are carried into a new output set.
MAX_FOREIGN_FILES = 64


def fault_point(step: str) -> None:
    """Signal this process at `step` when the test hook asks for it (see the module docstring)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    where, _, name = wanted.rpartition(":")
    if where == step:
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))  # Python's handler runs at the next bytecode


# ---------------------------------------------------------------------------------------------------------
# Inputs are never outputs
# ---------------------------------------------------------------------------------------------------------


def _same(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_inputs(
    outputs: Iterable[tuple[str, str | os.PathLike[str]]],
    inputs: Iterable[tuple[str, str | os.PathLike[str] | None]],
) -> None:
    """Refuse when an output path is (resolves to, or is a hard link of) an input file.

    Args:
        outputs: `(option, path)` of every file the command will write, e.g. `("-o", "plan.json")`.
        inputs: `(what, path)` of every file it reads, e.g. `("the rules file", "r.tq")`; `None` paths skipped.

    Raises:
        UserError: "-o r.tq is the rules file r.tq: writing it would destroy the input; choose another path".
    """
    inputs = [(what, path) for what, path in inputs if path]
    for option, out in outputs:
        for what, path in inputs:
            if _same(out, path):
                msg = (
                    f"{option} {os.fspath(out)} is {what} {os.fspath(path)}: writing it would destroy the "
                    "input; choose another path"
                )
                raise UserError(msg)


# ---------------------------------------------------------------------------------------------------------
# Stale temporaries
# ---------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporaries that dead ternqc processes left beside `target` (files `.NAME.PID.HEX.tmp`,
    folders `.NAME.PID.HEX.ternqc-tmp`); put back a previous set that a crash between two renames left as
    `.NAME.PID.HEX.ternqc-old` when `target` is missing. Returns what was removed or put back."""
    pattern = re.compile(
        rf"^\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+(\.tmp|{re.escape(_TMP_SUFFIX)}|{re.escape(_OLD_SUFFIX)})$"
    )
    done = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or _alive(int(m.group(1))):
            continue
        if m.group(2) == _OLD_SUFFIX and not target.exists():
            with contextlib.suppress(OSError):
                os.rename(entry, target)
                done.append(entry)
                continue
        _remove(entry)
        done.append(entry)
    return done


# ---------------------------------------------------------------------------------------------------------
# The swap
# ---------------------------------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically (Linux `renameat2`); False when this system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def fsync_path(path: Path, ignore: type[OSError] | tuple[type[OSError], ...] = OSError) -> None:
    """Flush a file's or a folder's entries to the disk (a rename made visible only after its data are there);
    the errors in `ignore` are best-effort misses (a folder that cannot be opened, a file already gone)."""
    with contextlib.suppress(ignore):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_folder(target: Path, names: Sequence[str]) -> list[Path]:
    """The entries of an existing `target` to carry into the new set; refuses what ternqc must not swap."""
    if not target.exists():
        return []
    if not target.is_dir():
        msg = f"cannot write the outputs into {target}: it is a file, not a folder"
        raise UserError(msg)
    here = Path.cwd().resolve()
    if target.resolve() == here or target.resolve() in here.parents:
        msg = (
            f"cannot write the outputs into {target}: it is the working folder or holds it; name a folder of "
            "its own"
        )
        raise UserError(msg)
    foreign = [e for e in target.iterdir() if e.name not in names]
    folders = [e.name for e in foreign if e.is_dir() and not e.is_symlink()]
    if folders or len(foreign) > MAX_FOREIGN_FILES:
        shown = ", ".join(sorted(folders)[:3]) or f"{len(foreign)} other files"
        msg = (
            f"cannot write the outputs into {target}: it holds {shown}; ternqc replaces its output folder as "
            "a whole, so name a new folder or one that holds only ternqc's outputs"
        )
        raise UserError(msg)
    return foreign


def _carry(entries: list[Path], into: Path) -> None:
    for entry in entries:
        dest = into / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
            continue
        try:
            os.link(entry, dest)
        except OSError:
            shutil.copy2(entry, dest)


def write_output_set(
    folder: str | os.PathLike[str], writers: Sequence[tuple[str, Callable[[Path], None]]]
) -> list[str]:
    """Write every `(name, write)` as `folder/name`, all committed together or none (module docstring).

    Args:
        folder: the output folder (created if missing; its parent folders too).
        writers: `(file name, write(path))` in the order to write; each writes one whole file at `path`.

    Returns:
        The paths written, as `folder/name` strings, in order.

    Raises:
        UserError: the folder cannot be used (a file, the working folder, someone else's folder), or a file
            cannot be written (disk full, permissions); `folder` is then as it was.
        KeyboardInterrupt: passed on after the temporary folder is removed.
    """
    from ternqc import signals

    shown = os.fspath(folder)
    target = Path(
        os.path.realpath(shown)
    )  # through a symbolic link: the folder it names is swapped, not the link
    names = [name for name, _ in writers]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the output folder {shown}: {exc.strerror or exc}"
        raise UserError(msg) from exc
    foreign = _check_folder(target, names)
    clean_stale(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        try:
            tmp.mkdir()
            _carry(foreign, tmp)
        except OSError as exc:
            msg = f"cannot write the outputs beside {shown}: {exc.strerror or exc}"
            raise UserError(msg) from exc
        for name, write in writers:
            write(tmp / name)
            fault_point(name)
        fsync_path(tmp)
        fault_point("commit")
        with signals.deferred():
            try:
                _commit(tmp, target)
            except OSError as exc:
                msg = f"cannot put the outputs in place at {shown}: {exc.strerror or exc}"
                raise UserError(msg) from exc
            fault_point("committed")
            _remove(tmp)  # after the swap it holds the previous set
    finally:
        if tmp.exists():
            _remove(tmp)
    return [os.path.join(shown, name) for name in names]


def _commit(tmp: Path, target: Path) -> None:
    """Put `tmp` at `target`; afterwards `tmp` holds the previous set, or does not exist."""
    if not target.exists():
        os.rename(tmp, target)
    elif not _exchange(tmp, target):
        old = target.with_name(tmp.name[: -len(_TMP_SUFFIX)] + _OLD_SUFFIX)
        os.rename(target, old)
        os.rename(tmp, target)
        os.rename(old, tmp)
    fsync_path(target.parent)
