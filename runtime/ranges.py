"""The numbers a user sets for a run, checked in one place: each check raises `UserError` naming the option
(`--epochs must be a positive integer (at most 2**53), got 0`), whether the value came from the command line or
from Python (`ternqc.finetune(epochs=0)`).

In: an option's name and value. Out: nothing, or the `UserError`. `validator(check, option)` makes an attrs
validator of a check, for the settings classes (`FinetuneSettings`); `train`'s settings call the checks
directly. Imports neither torch nor numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ternqc.runtime.errors import UserError

#: The largest count (epochs, samples, batch size) taken: beyond it a float no longer holds every integer.
MAX_COUNT = 2**53


def shown(value: object) -> str:
    """A value for a message; a number of more than 40 digits abbreviated."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} digits)"


def count(option: str, value: Any) -> None:
    """A whole number from 1 to `MAX_COUNT` (epochs, samples, batch sizes)."""
    if not 1 <= value <= MAX_COUNT:
        raise UserError(f"{option} must be a positive integer (at most 2**53), got {shown(value)}")


def positive(option: str, value: Any) -> None:
    """A finite number above 0 (a learning rate, a temperature); refuses NaN and infinity."""
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{option} must be a positive finite number, got {value}")


def share(option: str, value: Any) -> None:
    """A number from 0 to 1 (a weight between two losses); refuses NaN."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{option} must be between 0 and 1, got {value}")


def validator(check: Callable[[str, Any], None], option: str) -> Callable[[Any, Any, Any], None]:
    """`check` as an attrs validator of the field set by `option`."""

    def run(_inst: Any, _attr: Any, value: Any) -> None:
        check(option, value)

    return run


__all__ = ["MAX_COUNT", "count", "positive", "share", "shown", "validator"]
