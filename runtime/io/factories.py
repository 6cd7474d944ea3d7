"""User factories: `FILE.py:factory` and `package.module:factory` specs turned into callables.

`--model` and `--dataset` name either a built-in or a factory in the user's own code:
`path/to/file.py:factory` (a file, relative to the working directory) or `package.module:factory` (an
importable module). `load_factory(spec, what=...)` imports the file or module and returns the callable;
`call_factory(spec, factory, *args, what=...)` calls it and turns any exception it raises into a
`UserError` that names the factory and the exception. Nothing here checks what the factory returns: the
callers (`models.py`, `data.py`) know what they expect.

A file is executed afresh on every `load_factory` call, under a module name derived from its absolute path;
while it runs, its folder is on `sys.path` (as for a script), so it can import modules beside it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import frozen

from ternqc.runtime.errors import UserError


@frozen
class FactorySpec:
    """A parsed `TARGET:ATTR` spec: `target` is a file path (`is_file`) or a dotted module name."""

    spec: str
    target: str
    attr: str
    is_file: bool


def is_factory_spec(spec: str) -> bool:
    """True when `spec` names a factory (`TARGET:factory`) rather than a built-in."""
    return ":" in spec


def unknown_builtin_message(spec: str, builtins: list[str], *, what: str) -> str:
    """The message for a spec that is neither a built-in nor `TARGET:factory`, with close matches, or a
    pointer to `:factory` when the spec looks like a file or module."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return (
            f"{what} {spec!r} looks like a file: write {spec}:NAME, where NAME is the function in it that "
            f"builds the {what}"
        )
    close = difflib.get_close_matches(spec, builtins, n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return (
        f"unknown {what} {spec!r}{hint} Built-in {what}s: {', '.join(sorted(builtins))}. For your own "
        f"{what} write path/to/file.py:factory or package.module:factory"
    )


def parse_factory_spec(spec: str, *, what: str) -> FactorySpec:
    """Split `FILE.py:factory` / `package.module:factory` into its parts.

    Raises:
        UserError: when either side of the colon is empty or the factory name is not an identifier.
    """
    target, _, attr = spec.rpartition(":")
    if not target or not attr or not attr.isidentifier():
        msg = (
            f"{what} spec {spec!r} should be FILE.py:factory or package.module:factory, "
            f"where factory is the name of a function in that file or module"
        )
        raise UserError(msg)
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    return FactorySpec(spec=spec, target=target, attr=attr, is_file=is_file)


def _describe(exc: BaseException) -> str:
    """`TypeName: message (at file.py:12 in func)`, naming the innermost frame of the traceback."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    return text


def _import_file(path_text: str, *, spec: str, what: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        if path.is_dir():
            where = "is a directory, not a Python file"
        elif path.exists():  # a FIFO or a device: importing it would block or never end
            where = "is not a regular file"
        else:
            where = "does not exist"
        msg = f"{what} file {path_text!r} (from {spec!r}) {where}; paths are relative to {Path.cwd()}"
        raise UserError(msg)
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_ternqc_user_{path.stem.replace('-', '_')}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        msg = f"{what} file {path_text!r} cannot be imported as a Python module"
        raise UserError(msg)
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running, like a normal import (dataclasses and pickling look modules up by name);
    # the file's folder is importable while it runs, as when it runs as a script.
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        msg = f"importing {what} file {path_text!r} failed: {_describe(exc)}"
        raise UserError(msg) from exc
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def _import_module(name: str, *, spec: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            msg = (
                f"{what} module {name!r} (from {spec!r}) was not found: no module named {exc.name!r}; "
                f"is it installed, or is its folder on PYTHONPATH? For a file, write path/to/file.py:factory"
            )
            raise UserError(msg) from exc
        msg = f"importing {what} module {name!r} (from {spec!r}) failed: {_describe(exc)}"
        raise UserError(msg) from exc
    except Exception as exc:
        msg = f"importing {what} module {name!r} (from {spec!r}) failed: {_describe(exc)}"
        raise UserError(msg) from exc


def load_factory(spec: str, *, what: str) -> Callable[..., Any]:
    """Import the file or module named by `spec` and return its factory.

    Args:
        spec: `path/to/file.py:factory` (relative to the working directory) or `package.module:factory`.
        what: `"model"` or `"dataset"`, for messages.

    Returns:
        The callable named after the colon.

    Raises:
        UserError: malformed spec, file or module not found, import failure (names the exception),
            no such attribute (with close matches), or the attribute is not callable.
    """
    parsed = parse_factory_spec(spec, what=what)
    if parsed.is_file:
        module = _import_file(parsed.target, spec=spec, what=what)
    else:
        module = _import_module(parsed.target, spec=spec, what=what)
    if not hasattr(module, parsed.attr):
        names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(parsed.attr, names, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        msg = f"{what} factory {spec!r}: {parsed.target!r} has no attribute {parsed.attr!r}{hint}"
        raise UserError(msg)
    factory = getattr(module, parsed.attr)
    if not callable(factory):
        msg = f"{what} factory {spec!r}: {parsed.attr!r} is a {type(factory).__name__}, not a function"
        raise UserError(msg)
    return factory


def call_factory(spec: str, factory: Callable[..., Any], *args: Any, what: str) -> Any:
    """Call `factory(*args)`; an exception it raises becomes a `UserError` naming `spec` and the exception.

    Raises:
        UserError: the factory raised (its own `UserError` passes through unchanged).
    """
    shown = ", ".join(repr(a) for a in args)
    name = spec.rpartition(":")[2] or getattr(factory, "__name__", "factory")
    try:
        return factory(*args)
    except UserError:
        raise
    except Exception as exc:
        msg = f"{what} factory {spec!r} raised an error when called as {name}({shown}): {_describe(exc)}"
        raise UserError(msg) from exc
