"""Files an operator names: reading inputs safely, checking output directories.

Reading is :mod:`cpumodel.inputfile`'s (re-exported here for the engine and the
benchmark): regular files only, size-bounded, UTF-8, strict JSON of bounded depth,
each refusal an :class:`InputFileError` with a one-line reason.

:func:`check_output_dir` makes sure a directory results or logs will be written
to can be written, before anything long-running starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from cpumodel.inputfile import (
    MAX_INPUT_BYTES,
    MAX_JSON_DEPTH,
    InputFileError,
    JsonInputError,
    loads_json,
    read_input_bytes,
    read_input_json,
    read_input_text,
)
from migrate import validate
from migrate.errors import ConfigError

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_JSON_DEPTH",
    "InputFileError",
    "JsonInputError",
    "check_output_dir",
    "loads_json",
    "read_input_bytes",
    "read_input_json",
    "read_input_text",
]


def check_output_dir(path: Path, what: str = "output directory") -> Path:
    """Check that ``path`` is, or can be created as, a directory files can be written to.

    Creates nothing that stays: a missing directory is judged by its nearest existing
    parent, and writability by creating and removing an empty file (which sees
    permissions, read-only mounts and immutable directories alike). Raises
    :class:`ConfigError` with one line when the name is not valid UTF-8 (it could not
    be reported), a file stands where the directory (or a parent) should be, or it
    is read-only.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} {text!r}: the name is not valid UTF-8") from None
    if validate.has_control(text):
        raise ConfigError(f"{what} {text!r}: the name holds control characters")
    existing = path
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise ConfigError(f"{what} {path} exists and is not a directory")
        raise ConfigError(f"{what} {path} cannot be created: {existing} is not a directory")
    probe = existing / f".livemig-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        verb = "is not writable" if existing == path else f"cannot be created in {existing}"
        raise ConfigError(f"{what} {path} {verb}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return path
