"""Errors of the dirty-tracking package.

    DirtyTrackError
     ├── RamMappingError    a RAM backing file could not be opened or mapped
     └── TrackerUnavailable a tracker's kernel/hardware prerequisite is missing
"""

from __future__ import annotations


class DirtyTrackError(Exception):
    """Root of dirtytrack's errors."""


class RamMappingError(DirtyTrackError):
    """A guest RAM backing file could not be opened, sized or mapped."""


class TrackerUnavailable(DirtyTrackError):
    """A tracker cannot run here (e.g. the kernel lacks soft-dirty support)."""
