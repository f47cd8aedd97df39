"""Pick the cheapest tracker that works on this host, and say why."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from dirtytrack.errors import TrackerUnavailable
from dirtytrack.ram import PAGE_SIZE, RamMapping
from dirtytrack.trackers.base import Baseline, PageArray, Tracker, TrackerKind, as_page_array
from dirtytrack.trackers.digests import PageDigestTracker
from dirtytrack.trackers.shadow import ShadowDiffTracker
from dirtytrack.trackers.softdirty import Freezer, ProcFS, SoftDirtyTracker, probe_soft_dirty

#: Kernel bits first (no scan at all), then 8 bytes/page digests, then a full copy.
DEFAULT_PREFERENCE: Final = (
    TrackerKind.SOFT_DIRTY,
    TrackerKind.PAGE_DIGESTS,
    TrackerKind.SHADOW_DIFF,
)

#: Persistent memory per 4 KiB page, used to refuse trackers over the budget before
#: allocating anything.
_OVERHEAD_PER_PAGE: Final = {
    TrackerKind.SOFT_DIRTY: 1 / 4,  # two bitmaps
    TrackerKind.PAGE_DIGESTS: 8,
    TrackerKind.SHADOW_DIFF: PAGE_SIZE,
}


@dataclass(frozen=True)
class Rejection:
    """A tracker kind that was tried and refused, and why."""

    kind: TrackerKind
    reason: str


@dataclass(frozen=True, eq=False)
class TrackerChoice:
    """The tracker built by :func:`choose_tracker`, with the reasons for the choice."""

    tracker: Tracker
    kind: TrackerKind
    reason: str
    rejected: tuple[Rejection, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary for events and reports (the tracker itself is left out)."""
        return {
            "tracker": self.kind.value,
            "reason": self.reason,
            "memory_overhead_bytes": self.tracker.memory_overhead_bytes,
            "rejected": [{"tracker": r.kind.value, "reason": r.reason} for r in self.rejected],
        }


def choose_tracker(
    ram: RamMapping | PageArray,
    *,
    preference: Sequence[TrackerKind] = DEFAULT_PREFERENCE,
    qemu_pid: int | None = None,
    ram_path: str | os.PathLike[str] | None = None,
    baseline: Baseline = Baseline.ZERO,
    memory_budget_bytes: int | None = None,
    proc: ProcFS | None = None,
    freezer: Freezer | None = None,
    scan_threads: int = 1,
) -> TrackerChoice:
    """Build the first tracker in ``preference`` that works here.

    Soft-dirty needs ``qemu_pid`` (and ``ram_path`` unless ``ram`` is a
    :class:`RamMapping`) and passes :func:`probe_soft_dirty`. A tracker whose
    persistent memory exceeds ``memory_budget_bytes`` (default: the host's
    ``MemAvailable``) is refused. ``scan_threads`` is handed to the shadow-diff
    tracker (the only one whose scan runs outside the GIL). Raises :class:`TrackerUnavailable` listing every
    reason when none works, and :class:`ValueError` for an empty or repeated
    preference. Building may scan all of RAM (``Baseline.LIVE``), so call it from a
    worker thread, like the tracker itself.
    """
    if not preference or len(set(preference)) != len(preference):
        raise ValueError(f"preference must list distinct tracker kinds, got {list(preference)}")
    proc = proc or ProcFS()
    page_count = int(as_page_array(ram).shape[0])
    budget = memory_budget_bytes if memory_budget_bytes is not None else proc.mem_available_bytes()
    rejected: list[Rejection] = []
    for kind in preference:
        needed = int(_OVERHEAD_PER_PAGE[kind] * page_count)
        if budget is not None and needed > budget:
            rejected.append(
                Rejection(kind, f"needs {needed} bytes of memory, budget is {budget} bytes")
            )
            continue
        try:
            tracker = _build(kind, ram, qemu_pid, ram_path, baseline, proc, freezer, scan_threads)
        except TrackerUnavailable as exc:
            rejected.append(Rejection(kind, str(exc)))
            continue
        order = " > ".join(k.value for k in preference)
        reason = (
            f"{kind.value}: first usable in preference {order}; "
            f"{tracker.memory_overhead_bytes} bytes of tracking memory"
        )
        if rejected:
            reason += "; skipped " + "; ".join(f"{r.kind.value}: {r.reason}" for r in rejected)
        return TrackerChoice(tracker, kind, reason, tuple(rejected))
    raise TrackerUnavailable(
        "no dirty-page tracker usable: "
        + "; ".join(f"{r.kind.value}: {r.reason}" for r in rejected)
    )


def _build(
    kind: TrackerKind,
    ram: RamMapping | PageArray,
    qemu_pid: int | None,
    ram_path: str | os.PathLike[str] | None,
    baseline: Baseline,
    proc: ProcFS,
    freezer: Freezer | None,
    scan_threads: int,
) -> Tracker:
    if kind is TrackerKind.SHADOW_DIFF:
        return ShadowDiffTracker(ram, baseline=baseline, threads=scan_threads)
    if kind is TrackerKind.PAGE_DIGESTS:
        return PageDigestTracker(ram, baseline=baseline)
    if qemu_pid is None:
        raise TrackerUnavailable("no QEMU pid given", kind.value)
    if ram_path is None and not isinstance(ram, RamMapping):
        raise TrackerUnavailable("no RAM file path given", kind.value)
    probe_soft_dirty(qemu_pid, proc)
    return SoftDirtyTracker(
        ram, pid=qemu_pid, ram_path=ram_path, baseline=baseline, proc=proc, freezer=freezer
    )
