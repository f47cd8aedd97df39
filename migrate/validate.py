"""Checks the engine's types run on what they are given (``__post_init__``).

Every check raises :class:`~migrate.errors.ConfigError` naming the field and the value
it refused, so a bad request fails when it is built, before anything talks to QEMU.
The CLI's argument types (:mod:`migrate.cli_args`) use the same checks and turn
their error into a usage error.
"""

from __future__ import annotations

import math
import re
from typing import Any

from migrate.errors import ConfigError

#: Characters no name, model string or path the engine passes on may hold: C0 and C1
#: control characters (newline, tab, NUL, ESC...) and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: A name that travels into QMP, file names or a namespace: ``vm-1``, ``host_a.2``.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def number(
    value: Any,
    name: str,
    *,
    above: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """``value`` as a finite real number (an int or a float, not a bool) within bounds.

    ``above`` is an exclusive lower bound, ``minimum``/``maximum`` inclusive ones.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, not {_show(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {_show(value)}")
    if above is not None and not value > above:
        raise ConfigError(f"{name} must be greater than {above:g}, not {_show(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, not {_show(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, not {_show(value)}")
    return float(value)


def whole(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (not a bool, not a float) within inclusive bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number, not {_show(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {_show(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, not {_show(value)}")
    return value


def flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool (``"no"`` or ``0`` are not)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, not {_show(value)}")
    return value


def text(
    value: Any,
    name: str,
    *,
    pattern: re.Pattern[str] | None = None,
    max_length: int = 256,
    spaces: bool = False,
) -> str:
    """``value`` as a non-empty string without control characters (nor, unless
    ``spaces``, whitespace), at most ``max_length`` long, matching ``pattern`` whole."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, not {_show(value)}")
    if not value.strip():
        raise ConfigError(f"{name} must not be empty, not {_show(value)}")
    if _CONTROL.search(value):
        raise ConfigError(f"{name} must not hold control characters (newline, tab...): {_show(value)}")  # fmt: skip
    if not spaces and any(c.isspace() for c in value):
        raise ConfigError(f"{name} must not hold whitespace: {_show(value)}")
    if spaces and value != value.strip():
        raise ConfigError(f"{name} must not start or end with whitespace: {_show(value)}")
    if len(value) > max_length:
        raise ConfigError(f"{name} is longer than {max_length} characters: {_show(value)}")
    if pattern is not None and pattern.fullmatch(value) is None:
        raise ConfigError(f"{name} {_show(value)} is not a valid name (letters, digits, . _ -)")
    return value


def has_control(value: str) -> bool:
    """Whether ``value`` holds a control character (see :func:`text`)."""
    return _CONTROL.search(value) is not None
