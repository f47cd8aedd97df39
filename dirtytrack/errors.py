"""Errors of the dirty-tracking package.

    DirtyTrackError
     ├── RamMappingError        a RAM backing file could not be opened or mapped
     ├── TrackerUnavailable     a tracker's kernel/hardware prerequisite is missing
     ├── ConcurrentTrackerUse   one tracker was called from two threads at once
     ├── BitmapShapeError       bitmaps/arrays of different page counts were combined
     ├── PageRangeError         a page number or page range lies outside the bitmap/RAM
     └── BitmapFormatError      serialised bitmap bytes are malformed or corrupt

``BitmapShapeError`` and ``BitmapFormatError`` are also ``ValueError``s and
``PageRangeError`` is an ``IndexError``, so callers that validate inputs generically
keep working.
"""

from __future__ import annotations


class DirtyTrackError(Exception):
    """Root of dirtytrack's errors."""


class RamMappingError(DirtyTrackError):
    """A guest RAM backing file could not be opened, sized or mapped."""


class TrackerUnavailable(DirtyTrackError):
    """A tracker cannot run here (e.g. the kernel lacks soft-dirty support).

    ``tracker`` names the tracker kind that was refused; the message says why.
    """

    def __init__(self, message: str, tracker: str = "") -> None:
        super().__init__(message)
        self.tracker = tracker


class ConcurrentTrackerUse(DirtyTrackError):
    """A tracker is thread-confined and was entered while another call was running."""


class BitmapShapeError(DirtyTrackError, ValueError):
    """Page counts, dtypes or array shapes do not match what the operation needs."""


class PageRangeError(DirtyTrackError, IndexError):
    """A page number or ``(start, count)`` range lies outside ``[0, page_count)``."""


class BitmapFormatError(DirtyTrackError, ValueError):
    """Bytes handed to ``Bitmap.from_bytes`` are not a valid serialised bitmap."""
