"""Reading an operator's input file without hanging, running out of memory or recursing.

The one reader of files an operator names: CPU descriptions and model catalogues
here, and (through :mod:`migrate.files`) the benchmark's ``results.json``. It lives
in this package, the lowest that reads such files, so that every caller shares it.

- only a regular file is read: a FIFO would block forever, ``/dev/zero`` never
  ends, a directory or a socket cannot be read; each is refused with what it is
  (the file is opened non-blocking, so even opening a FIFO returns at once);
- at most ``max_bytes`` (16 MiB unless the caller says otherwise);
- text must be UTF-8 (a UTF-8 byte-order mark is dropped);
- JSON must be strict JSON (``NaN``, ``Infinity`` and ``1e999`` are refused) nested at most
  :data:`MAX_JSON_DEPTH` levels deep (deeper input would exhaust Python's stack).

Every refusal is an :class:`InputFileError` (a ``ValueError``) with a one-line
reason that does not repeat the path; callers wrap it in their own error with the path.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any

MAX_INPUT_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 100


class InputFileError(ValueError):
    """An input file cannot be used; the message says why (without the path)."""


class JsonInputError(InputFileError):
    """A text is not JSON this tool reads; ``detail`` is the bare reason."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"bad JSON: {detail}")
        self.detail = detail


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def read_input_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of the regular file ``path``; raises :class:`InputFileError`."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InputFileError(f"cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # an embedded NUL
        raise InputFileError(f"cannot read: {exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputFileError(f"cannot read: {_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise InputFileError(f"larger than {_size(max_bytes)}")
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # grew while we read it
            raise InputFileError(f"larger than {_size(max_bytes)}")
        return b"".join(chunks)
    except OSError as exc:
        raise InputFileError(f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def decode_text(raw: bytes) -> str:
    """``raw`` as UTF-8 text (a leading byte-order mark dropped); raises InputFileError."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise InputFileError(f"not UTF-8 text (byte 0x{bad} at offset {exc.start})") from None


def read_input_text(path: str | os.PathLike[str], max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The UTF-8 text of the regular file ``path``; raises :class:`InputFileError`."""
    return decode_text(read_input_bytes(path, max_bytes))


def _no_constant(name: str) -> Any:
    raise JsonInputError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonInputError(f"{text} is out of range for a number")
    return value


def _depth_exceeds(data: Any, limit: int) -> bool:
    todo: list[tuple[Any, int]] = [(data, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        todo.extend((child, depth + 1) for child in children)
    return False


def loads_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``text`` parsed as strict JSON at most ``max_depth`` levels deep.

    Raises :class:`JsonInputError` (an :class:`InputFileError`).
    """
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise JsonInputError(f"nested deeper than {max_depth} levels") from None
    except JsonInputError:
        raise
    except ValueError as exc:
        raise JsonInputError(str(exc)) from None
    if _depth_exceeds(data, max_depth):
        raise JsonInputError(f"nested deeper than {max_depth} levels")
    return data


def read_input_json(
    path: str | os.PathLike[str],
    max_bytes: int = MAX_INPUT_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """The JSON value in the regular file ``path``; raises :class:`InputFileError`."""
    return loads_json(read_input_text(path, max_bytes), max_depth)


__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_JSON_DEPTH",
    "InputFileError",
    "JsonInputError",
    "decode_text",
    "loads_json",
    "read_input_bytes",
    "read_input_json",
    "read_input_text",
]
