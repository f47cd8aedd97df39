"""libvirt's job statistics as the engine's :class:`~migrate.report.Sample`.

``virDomainGetJobStats`` answers with a flat dict (``memory_total``,
``memory_remaining``, ``memory_processed``, ``memory_bps``, ``memory_dirty_rate``
in pages/s, ``memory_iteration``, ``downtime``...), which is QEMU's
``query-migrate`` seen through libvirt. During the job ``downtime`` is QEMU's
*expected* downtime; in the completed job's stats (``VIR_DOMAIN_JOB_STATS_COMPLETED``,
kept on the destination) it is the real one. Pure functions, no libvirt import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from migrate.report import Sample

#: virDomainJobType → a ``query-migrate``-like status.
JOB_TYPE_STATUS = {0: "none", 1: "active", 2: "active", 3: "completed", 4: "failed", 5: "cancelled"}


def _int(stats: Mapping[str, Any], key: str) -> int:
    value = stats.get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


def job_status(stats: Mapping[str, Any], qemu_status: str | None = None) -> str:
    """The job's status: QEMU's own latest (``setup``, ``device``, ``postcopy-active``...)
    while the job runs and one is known, else from libvirt's job type."""
    status = JOB_TYPE_STATUS.get(_int(stats, "type"), "none")
    if status == "active" and qemu_status:
        return qemu_status
    return status


def sample_from_job_stats(
    stats: Mapping[str, Any], now: float, elapsed_ms: float, qemu_status: str | None = None
) -> Sample:
    """One :class:`Sample` from a ``jobStats()`` dict (absent keys count as 0)."""
    expected = stats.get("downtime")
    return Sample(
        time=now,
        elapsed_ms=elapsed_ms,
        status=job_status(stats, qemu_status),
        ram_total_bytes=_int(stats, "memory_total"),
        ram_remaining_bytes=_int(stats, "memory_remaining"),
        ram_transferred_bytes=_int(stats, "memory_processed"),
        dirty_pages_rate=_int(stats, "memory_dirty_rate"),
        dirty_sync_count=_int(stats, "memory_iteration"),
        mbps=_int(stats, "memory_bps") * 8 / 1e6,
        page_size=_int(stats, "memory_page_size") or 4096,
        expected_downtime_ms=float(expected) if isinstance(expected, int | float) else None,
        cpu_throttle_pct=_int(stats, "auto_converge_throttle"),
        duplicate_pages=_int(stats, "memory_constant"),
        normal_pages=_int(stats, "memory_normal"),
        postcopy_requests=_int(stats, "memory_postcopy_requests"),
    )


def completed_figure(stats: Mapping[str, Any], key: str) -> float | None:
    """A number from the completed job's stats (None when libvirt did not give it)."""
    value = stats.get(key)
    return float(value) if isinstance(value, int | float) else None
