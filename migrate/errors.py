"""The engine's errors.

Every error the engine raises on purpose derives from :class:`LivemigError`, so an
embedding program can catch one class; each carries the data an operator needs::

    LivemigError
     ├── ConfigError        bad input: spec, URI, flag, missing file
     ├── PreflightError     a move refused before it started (.reasons)
     ├── QemuError          a QEMU process or QMP command failed (.command, .detail)
     │    └── QemuLaunchError   QEMU did not come up (.argv, .exit_code, .output)
     ├── MigrationError     the move itself failed (.phase, .report)
     │    └── MigrationAborted  stopped on purpose: policy, operator, integrity
     └── StreamError        pagestream: protocol, transport or integrity (.side, .kind)

The lower packages have their own roots (``cpumodel.CpuModelError``,
``dirtytrack.DirtyTrackError``); the CLI maps all of them to one line and an exit code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from migrate.phase import Phase
    from migrate.report import MigrationReport


class LivemigError(Exception):
    """Root of the engine's errors."""


class ConfigError(LivemigError):
    """Bad input: an unknown VM, a malformed URI, a missing socket or file."""


class PreflightError(LivemigError):
    """The migration was refused before anything moved."""

    def __init__(self, message: str, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.reasons = tuple(reasons)


class QemuError(LivemigError):
    """A QEMU process or a QMP command failed.

    ``command`` is the QMP command (or argv summary) that was sent, ``detail`` what
    QEMU answered (its error description or class), when known.
    """

    def __init__(self, message: str, command: str | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.command = command
        self.detail = detail


class QemuLaunchError(QemuError):
    """QEMU exited or never answered while starting."""

    def __init__(
        self, message: str, argv: Sequence[str], exit_code: int | None, output: str
    ) -> None:
        super().__init__(message, command=" ".join(argv))
        self.argv = tuple(argv)
        self.exit_code = exit_code
        self.output = output


class MigrationError(LivemigError):
    """The migration failed; the VM was left (or put back) on the source."""

    def __init__(
        self,
        message: str,
        phase: Phase | None = None,
        report: MigrationReport | None = None,
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.report = report


class MigrationAborted(MigrationError):
    """The migration was stopped on purpose (policy limit, operator, integrity)."""


class StreamError(LivemigError):
    """The pagestream page stream failed: a malformed or corrupt frame, a broken
    connection, a digest mismatch, or a helper agent that died.

    ``side`` is where it was detected (``sender``, ``receiver``, ``engine``);
    ``kind`` is ``protocol`` (malformed or corrupt frame), ``transport`` (socket),
    ``integrity`` (target RAM differs from the source), ``agent`` (helper process)
    or ``config``; ``detail`` carries data for the operator (frame offsets, chunks).
    """

    def __init__(
        self, message: str, *, side: str = "engine", kind: str = "protocol", detail: Any = None
    ) -> None:
        super().__init__(message)
        self.side = side
        self.kind = kind
        self.detail = detail
