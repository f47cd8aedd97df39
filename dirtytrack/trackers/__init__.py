"""Dirty-page trackers behind one interface, and the probe that picks one.

    Tracker (base.py)             collect() -> Bitmap, capture(extent), reset(pages)
     ├── SoftDirtyTracker         kernel soft-dirty PTE bits via /proc/PID/pagemap
     ├── PageDigestTracker        one seeded xxh3-64 digest per page (8 B/page)
     └── ShadowDiffTracker        a full copy of the target's RAM, vectorised compare

:func:`choose_tracker` tries them in a preference order (default: soft-dirty, page
digests, shadow diff) and returns the tracker with the reason for the choice.
"""

from dirtytrack.trackers.base import (
    Baseline,
    PageArray,
    Tracker,
    TrackerKind,
    as_page_array,
)
from dirtytrack.trackers.choose import (
    DEFAULT_PREFERENCE,
    Rejection,
    TrackerChoice,
    choose_tracker,
)
from dirtytrack.trackers.digests import PageDigestTracker
from dirtytrack.trackers.shadow import ShadowDiffTracker
from dirtytrack.trackers.softdirty import (
    Freezer,
    NoFreeze,
    PagemapEntries,
    ProcFS,
    SigstopFreezer,
    SoftDirtyTracker,
    Vma,
    decode_pagemap,
    locate_ram,
    parse_maps,
    probe_soft_dirty,
)

__all__ = [
    "DEFAULT_PREFERENCE",
    "Baseline",
    "Freezer",
    "NoFreeze",
    "PageArray",
    "PageDigestTracker",
    "PagemapEntries",
    "ProcFS",
    "Rejection",
    "ShadowDiffTracker",
    "SigstopFreezer",
    "SoftDirtyTracker",
    "Tracker",
    "TrackerChoice",
    "TrackerKind",
    "Vma",
    "as_page_array",
    "choose_tracker",
    "decode_pagemap",
    "locate_ram",
    "parse_maps",
    "probe_soft_dirty",
]
