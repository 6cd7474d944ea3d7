"""Atomic file writes: a file is either fully written or left as it was.

Every output of ternqc (statistics, quantize configs, checkpoints, reports) goes through here. The content is
written to a temporary file in the target's own directory (so the final `os.replace` is a rename within one
file system, which is atomic on POSIX and Windows), flushed and fsynced, then renamed over the target. When
anything fails before the rename, the temporary file is removed: no half-written file is ever left behind,
and an existing target keeps its old content.

- `atomic_write_text(path, text)` / `atomic_write_bytes(path, data)`: write a whole file.
- `atomic_path(path)`: a context manager yielding a temporary path for writers that want a path
  (`torch.save(obj, tmp)`); on normal exit it replaces `path`, on an exception it removes the temporary file
  and re-raises.

Parent folders are created. Operating-system failures of the write itself (permission denied, a folder in
the way, disk full) raise `UserError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from ternqc.runtime.errors import UserError
from ternqc.runtime.io.outputs import clean_stale, fault_point, fsync_path

PathLike = Union[str, "os.PathLike[str]"]


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _prepare(path: PathLike) -> Path:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot write {target}: cannot create its folder {target.parent} ({exc.strerror or exc})"
        raise UserError(msg) from exc
    if target.is_dir():
        msg = f"cannot write {target}: it is a folder"
        raise UserError(msg)
    clean_stale(target)  # temporary files of runs that were killed
    return target


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, on failure remove it.

    Args:
        path: the file to write.

    Yields:
        A path in the same folder that the caller writes (it does not exist yet).

    Raises:
        UserError: the folder cannot be created, the target is a folder, or the rename fails.
        Whatever the body raises, after the temporary file is removed.
    """
    target = _prepare(path)
    tmp = _temp_path(target)
    try:
        yield tmp
        if not tmp.exists():
            msg = f"atomic_path({target}): the body wrote nothing to {tmp}"
            raise RuntimeError(msg)  # a bug in the caller, not the user's doing
        fault_point(f"replace:{target.name}")  # the tests' hook (outputs.FAULT_ENV)
        try:
            # data reach the disk before the rename makes them visible (a crash leaves old or new, never half)
            fsync_path(tmp, FileNotFoundError)
            os.replace(tmp, target)
        except OSError as exc:
            msg = f"cannot write {target}: {exc.strerror or exc}"
            raise UserError(msg) from exc
    finally:
        if tmp.exists():
            _remove_quietly(tmp)


def write_failure(exc: BaseException) -> str:
    """Why a write failed, in a few words: torch's zip writer reports a full disk (or a file-size limit) as
    `RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos 704 vs 598`."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = " ".join(str(exc).split())
    if "unexpected pos" in text or "PytorchStreamWriter failed" in text or "file write failed" in text:
        return f"the disk is full or the file is too large (torch: {text})"
    return text


def save_torch(path: PathLike, obj: object, what: str = "file") -> None:
    """`torch.save(obj)` to `path`, atomically. Written through an open file, so the archive's inner folder
    is always `archive/` and equal objects give byte-identical files (a path would name it after the
    temporary file). Imports torch only when called.

    Raises:
        UserError: the file cannot be written (disk full, permissions); `path` is then unchanged.
    """
    import torch

    with atomic_path(path) as tmp:
        try:
            with open(tmp, "xb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as exc:
            msg = f"cannot write {what} {os.fspath(path)}: {write_failure(exc)}"
            raise UserError(msg) from exc


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring).

    Raises:
        UserError: the file cannot be written (the message names it); `path` is then unchanged.
    """
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            msg = f"cannot write {path}: {write_failure(exc)}"
            raise UserError(msg) from exc


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically, encoded with `encoding` (default UTF-8).

    Raises:
        UserError: the file cannot be written (the message names it); `path` is then unchanged.
    """
    atomic_write_bytes(path, text.encode(encoding))
