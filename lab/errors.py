"""The lab's errors.

::

    migrate.errors.LivemigError
     └── LabError            root: the lab failed (.command, .output when a tool failed)
          ├── GuestBuildError    building the test guest failed
          └── ProbeError         the network probe could not run or returned nothing

They derive from the engine's root so the CLI reports them, like every engine
error, as one line and exit code 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from migrate.errors import LivemigError


class LabError(LivemigError):
    """Creating or using the lab failed; ``command`` and ``output`` say what a tool
    (``ip``, ``tc``) was asked and answered, when one failed."""

    def __init__(self, message: str, command: Sequence[str] = (), output: str = "") -> None:
        super().__init__(message)
        self.command = tuple(command)
        self.output = output


class GuestBuildError(LabError):
    """Building the test guest (kernel + initramfs) failed."""


class ProbeError(LabError):
    """The network probe could not run or returned nothing usable."""
