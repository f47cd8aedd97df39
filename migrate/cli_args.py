"""Argument types of the ``livemig`` commands (and of the lab's and bench's helpers).

Each is an ``argparse`` ``type=``: it returns the parsed value or raises
``ArgumentTypeError``, which the parser turns into one usage line and exit code 2.
Numbers must be finite (``nan``, ``inf`` and ``1e999`` are refused) and within the
option's range; paths must be valid UTF-8 (a file name in another encoding is
refused here rather than failing later when it is printed).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from migrate import validate
from migrate.errors import ConfigError
from migrate.policy import MAX_DOWNTIME_LIMIT_MS


def positive_float(maximum: float | None = None) -> Callable[[str], float]:
    """A finite number > 0 (and <= ``maximum``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}: {text!r}")
        return value

    return parse


def int_in(minimum: int, maximum: int) -> Callable[[str], int]:
    """A whole number in ``minimum..maximum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not minimum <= value <= maximum:
            if value < 1 <= minimum:
                raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
            raise argparse.ArgumentTypeError(f"must be {minimum}-{maximum}: {text!r}")
        return value

    return parse


def path(text: str) -> Path:
    """A path named in valid UTF-8, not empty, without control characters."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"path is not valid UTF-8: {text!r}") from None
    if validate.has_control(text):
        raise argparse.ArgumentTypeError(f"path holds control characters: {text!r}")
    return Path(text)


def plain_text(text: str) -> str:
    """A string without whitespace or control characters (a ``-cpu`` string, a name)."""
    try:
        return validate.text(text, "value", max_length=4096)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("value ", "", 1)) from None


def workload(text: str) -> str:
    """``--workload``: idle, or openssl, dirty:MIBPS, disk:MIBPS joined by ``+``."""
    from lab.demo import Workload  # the lab loads only for the commands that boot it

    try:
        return Workload.parse(text).text
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The lab guest's RAM and working set (MiB), a link's speed (Mbit/s), a downtime
#: limit (ms, up to QEMU's own ceiling).
MEMORY_MIB = int_in(16, 1 << 20)
MBIT = positive_float(1e7)
DOWNTIME_MS = positive_float(MAX_DOWNTIME_LIMIT_MS)
