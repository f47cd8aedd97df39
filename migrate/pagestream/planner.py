"""When to stop pre-copying: the switchover decision, from the policy's limits.

Same meaning as QEMU's ``downtime-limit``: switch over once the dirty pages left
could be sent within the limit at the throughput measured so far. Unlike QEMU,
pagestream's downtime also holds a full-RAM scan (with the VM stopped, to find
the last dirty pages; the final sweep overlaps it with sending), the
device-state migration and the digests; those costs are in
``expected_downtime_ms`` and bound by the policy's ``max_downtime_ms`` when the
dirty set stops shrinking. Pure logic, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from dirtytrack.ram import PAGE_SIZE

#: Device state through QEMU's own stream (~450 KB here), the receiver's "applied"
#: round trip and the resume: ~15-25 ms on the lab with 128-256 MiB TCG guests
#: (STOP -> RESUME minus the final scan and send). A starting estimate.
DEFAULT_FIXED_DOWNTIME_MS: Final = 25.0


@dataclass(frozen=True)
class SwitchoverVerdict:
    """Whether to stop the VM now, what that is expected to cost, and why."""

    switch: bool
    reason: str
    expected_transfer_ms: float | None
    expected_downtime_ms: float | None


@dataclass
class SwitchoverPlanner:
    """Decides after every scan whether the remaining dirty set is small enough.

    Switches when (in order): nothing is dirty; the remaining pages would go
    within ``downtime_limit_ms`` at the measured rate; the dirty set has not
    shrunk below ``shrink_factor`` of its smallest size for ``stall_rounds``
    rounds, or ``max_rounds`` were sent, and the whole expected downtime fits
    ``max_downtime_ms``. Otherwise it keeps pre-copying (the controller's
    total-time limit is what ends a migration that never converges).
    """

    fixed_downtime_ms: float = DEFAULT_FIXED_DOWNTIME_MS
    stall_rounds: int = 2
    shrink_factor: float = 0.9
    max_rounds: int = 30
    page_size: int = PAGE_SIZE
    _sent_pages: int = 0
    _send_s: float = 0.0
    _rounds: int = 0
    _smallest: int | None = None
    _stalled: int = 0

    @property
    def pages_per_s(self) -> float | None:
        """Throughput of the rounds sent so far (pages/s), None before any."""
        if self._sent_pages == 0 or self._send_s <= 0:
            return None
        return self._sent_pages / self._send_s

    def record_round(self, pages: int, duration_s: float) -> None:
        """A pre-copy round sent ``pages`` dirty pages, keeping the sending side
        (compression and socket) busy for ``duration_s`` seconds."""
        self._rounds += 1
        self._sent_pages += pages
        self._send_s += max(duration_s, 0.0)

    def estimate(self, dirty_pages: int, scan_s: float) -> tuple[float | None, float | None]:
        """(transfer ms, downtime ms) for ``dirty_pages`` found by a ``scan_s`` scan;
        None before any round was sent."""
        rate = self.pages_per_s
        if rate is None:
            return None, None
        transfer_ms = dirty_pages / rate * 1e3
        # The final sweep sends a range's pages while it scans the next one.
        return transfer_ms, max(scan_s * 1e3, transfer_ms) + self.fixed_downtime_ms

    def decide(
        self, dirty_pages: int, scan_s: float, downtime_limit_ms: float, max_downtime_ms: float
    ) -> SwitchoverVerdict:
        """Verdict for a scan that found ``dirty_pages`` in ``scan_s`` seconds."""
        transfer_ms, downtime_ms = self.estimate(dirty_pages, scan_s)
        if self._smallest is None or dirty_pages < self._smallest * self.shrink_factor:
            self._stalled = 0
        else:
            self._stalled += 1
        self._smallest = dirty_pages if self._smallest is None else min(self._smallest, dirty_pages)
        mib = dirty_pages * self.page_size / (1 << 20)

        def verdict(switch: bool, reason: str) -> SwitchoverVerdict:
            return SwitchoverVerdict(switch, reason, transfer_ms, downtime_ms)

        if dirty_pages == 0:
            return verdict(True, "no dirty pages left")
        if transfer_ms is None or downtime_ms is None:
            return verdict(False, f"{dirty_pages} pages to send, no throughput measured yet")
        if transfer_ms <= downtime_limit_ms:
            return verdict(
                True,
                f"{dirty_pages} dirty pages ({mib:.1f} MiB) go in ~{transfer_ms:.1f} ms "
                f"<= downtime limit {downtime_limit_ms:g} ms",
            )
        fits = downtime_ms <= max_downtime_ms
        if self._stalled >= self.stall_rounds and fits:
            return verdict(
                True,
                f"dirty set stopped shrinking at {dirty_pages} pages ({mib:.1f} MiB); "
                f"expected downtime ~{downtime_ms:.0f} ms <= max {max_downtime_ms:g} ms",
            )
        if self._rounds >= self.max_rounds and fits:
            return verdict(
                True,
                f"{self._rounds} rounds sent; expected downtime ~{downtime_ms:.0f} ms "
                f"<= max {max_downtime_ms:g} ms",
            )
        return verdict(
            False,
            f"{dirty_pages} dirty pages ({mib:.1f} MiB) need ~{transfer_ms:.1f} ms "
            f"> downtime limit {downtime_limit_ms:g} ms",
        )
