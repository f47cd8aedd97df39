"""What a migration produced: samples, decisions, the switchover timeline, the report.

All are frozen dataclasses with one serialiser pair (:mod:`migrate.codec`). Times
named ``*_ms`` inside a :class:`Timeline` are offsets from ``started_at`` (realtime
seconds, the clock QMP stamps events with).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from migrate.codec import from_dict, to_dict
from migrate.control.intents import Intent, action_of, intents_from_qmp, qemu_command
from migrate.disks.model import DiskMode
from migrate.phase import Phase

#: Version of the report's JSON form (docs/schema/report.json); bump it with any
#: change a reader would notice (a field renamed, removed or retyped).
REPORT_SCHEMA_VERSION = 1


def new_migration_id() -> str:
    """A fresh migration id (random, 32 hex digits)."""
    return uuid.uuid4().hex


class Status(StrEnum):
    """``unknown``: neither copy could be proven the only running one, so neither
    was resumed (the report's error says both sides' state and what to do)."""

    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
    UNKNOWN = "unknown"


class Integrity(StrEnum):
    OK = "ok"
    FAILED = "failed"
    UNCHECKED = "unchecked"


class Verdict(StrEnum):
    OK = "ok"
    WARNING = "warning"
    REFUSED = "refused"


@dataclass(frozen=True)
class PreflightCheck:
    """One preflight check: its name, verdict and what it found.

    ``forceable`` refusals may be overridden by the operator (``--force``).
    """

    name: str
    verdict: Verdict
    detail: str
    forceable: bool = True


@dataclass(frozen=True)
class Sample:
    """One ``query-migrate`` observation (or one pagestream round)."""

    time: float
    elapsed_ms: float
    status: str
    ram_total_bytes: int = 0
    ram_remaining_bytes: int = 0
    ram_transferred_bytes: int = 0
    dirty_pages_rate: int = 0
    dirty_sync_count: int = 0
    mbps: float = 0.0
    page_size: int = 4096
    expected_downtime_ms: float | None = None
    cpu_throttle_pct: int = 0
    duplicate_pages: int = 0
    normal_pages: int = 0
    postcopy_requests: int = 0

    @property
    def dirty_rate_bytes_per_s(self) -> float:
        return float(self.dirty_pages_rate * self.page_size)

    @classmethod
    def from_query_migrate(cls, info: dict[str, Any], now: float, elapsed_ms: float) -> Sample:
        """Build from QEMU's ``query-migrate`` answer."""
        ram = info.get("ram") or {}
        expected = info.get("expected-downtime")
        return cls(
            time=now,
            elapsed_ms=elapsed_ms,
            status=str(info.get("status", "none")),
            ram_total_bytes=int(ram.get("total", 0)),
            ram_remaining_bytes=int(ram.get("remaining", 0)),
            ram_transferred_bytes=int(ram.get("transferred", 0)),
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            mbps=float(ram.get("mbps", 0.0)),
            page_size=int(ram.get("page-size", 4096)),
            expected_downtime_ms=float(expected) if expected is not None else None,
            cpu_throttle_pct=int(info.get("cpu-throttle-percentage", 0)),
            duplicate_pages=int(ram.get("duplicate", 0)),
            normal_pages=int(ram.get("normal", 0)),
            postcopy_requests=int(ram.get("postcopy-requests", 0)),
        )


class Outcome(StrEnum):
    """What became of a decision: ``proposed`` by a controller and not carried out
    yet, ``applied``, ``partial`` (some of its intents rejected), ``rejected`` by
    the strategy (it has no such lever; why in ``outcome_detail``), or ``failed``
    (QEMU refused it)."""

    PROPOSED = "proposed"
    APPLIED = "applied"
    PARTIAL = "partial"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(frozen=True)
class Decision:
    """Something a controller or the operator decided, why, and what came of it.

    ``intents`` say what is wanted, typed (:mod:`migrate.control.intents`);
    ``action``, ``command``, ``arguments`` and ``side`` are derived from them:
    a short name, and the QMP command carrying them in QEMU's own stream (what the
    ``native`` strategy sends; ``command`` is None for intents QEMU has no command
    for, such as an abort).
    """

    time: float
    reason: str
    intents: tuple[Intent, ...]
    outcome: Outcome = Outcome.PROPOSED
    outcome_detail: str = ""
    action: str = field(init=False, default="")
    command: str | None = field(init=False, default=None)
    arguments: dict[str, Any] = field(init=False, default_factory=dict)
    side: str = field(init=False, default="source")

    def __post_init__(self) -> None:
        command, arguments, side = qemu_command(self.intents)
        object.__setattr__(self, "action", action_of(self.intents))
        object.__setattr__(self, "command", command)
        object.__setattr__(self, "arguments", arguments)
        object.__setattr__(self, "side", side)

    @staticmethod
    def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
        """A decision recorded before intents and outcomes (action, command,
        arguments, side only), as today's: intents read back from its QMP command,
        outcome ``proposed`` (what became of it was not recorded)."""
        if "intents" in data:
            return data
        intents = intents_from_qmp(
            str(data.get("action", "")), data.get("command"), dict(data.get("arguments") or {})
        )
        return {
            "time": data.get("time", 0.0),
            "reason": data.get("reason", ""),
            "intents": [to_dict(i) for i in intents],
            "outcome": Outcome.PROPOSED.value,
            "outcome_detail": "recorded before decisions had outcomes",
        }

    def has(self, kind: type[Intent]) -> bool:
        """Whether one of the intents is of ``kind``."""
        return any(isinstance(i, kind) for i in self.intents)

    def settled(self, outcome: Outcome, detail: str = "") -> Decision:
        """This decision with its outcome."""
        return replace(self, outcome=outcome, outcome_detail=detail)


def offset_ms(origin: float, t: float | None) -> float | None:
    """``t`` as milliseconds after ``origin`` (both realtime seconds); None stays None."""
    return None if t is None else (t - origin) * 1e3


@dataclass(frozen=True)
class Timeline:
    """The switchover as QEMU's events and the probe saw it (ms after ``started_at``)."""

    started_at: float
    source_stop_ms: float | None = None
    source_completed_ms: float | None = None
    target_completed_ms: float | None = None
    verified_ms: float | None = None
    target_resume_ms: float | None = None
    first_probe_reply_ms: float | None = None
    ended_ms: float = 0.0

    @property
    def stop_to_resume_ms(self) -> float | None:
        if self.source_stop_ms is None or self.target_resume_ms is None:
            return None
        return self.target_resume_ms - self.source_stop_ms

    @property
    def resume_to_first_reply_ms(self) -> float | None:
        if self.target_resume_ms is None or self.first_probe_reply_ms is None:
            return None
        return self.first_probe_reply_ms - self.target_resume_ms


@dataclass(frozen=True)
class ProbeSummary:
    """What the network probe saw during the migration window."""

    interval_ms: float
    sent: int
    lost: int
    longest_gap_ms: float
    gap_start_ms: float
    gap_end_ms: float
    max_send_gap_ms: float
    baseline_gap_ms: float | None = None


@dataclass(frozen=True)
class Forecast:
    """The pre-copy model's forecast for one way of migrating (``livemig plan``).

    ``setting`` names it (e.g. ``native downtime-limit 20 ms``); ``compression`` is
    ``none``, ``xbzrle`` or ``zstd``; ``throttle_pct`` the guest CPU throttle
    assumed; ``postcopy`` whether it switches to post-copy after the bulk round.
    Times in ms, sizes in bytes. When ``converges`` is false the figures describe a
    switchover forced after the last simulated round.
    """

    setting: str
    converges: bool
    rounds: int
    total_time_ms: float
    downtime_ms: float
    transferred_bytes: float
    reason: str
    strategy: str = "native"
    downtime_limit_ms: float = 0.0
    compression: str = "none"
    throttle_pct: int = 0
    postcopy: bool = False
    #: The range the stop-to-resume time should fall in (see :mod:`migrate.plan.forecasting`).
    downtime_low_ms: float | None = None
    downtime_high_ms: float | None = None


@dataclass(frozen=True)
class Predicted:
    """What was measured and forecast before anything moved.

    ``dirty_rate_bytes_per_s`` comes from ``dirty_rate_method`` (a sample of the
    guest's RAM read three times, or QEMU's ``calc-dirty-rate``), and
    ``working_set_bytes`` (when the sample shows one) is how much the guest keeps
    rewriting; ``bandwidth_bytes_per_s`` from ``bandwidth_source``
    (operator, link cap, policy cap or an assumption). ``nonzero_ram_bytes`` and
    ``compression_ratios`` (raw / compressed bytes per method) come from sampling
    the guest's RAM file when it is mappable. ``policy_forecast`` is the forecast for
    the policy the migration runs with; ``recommendation`` names the best forecast.
    ``disk_copy_bytes``: allocated bytes of the local disks copied first
    (``--with-local-disks``), included in every forecast's time and bytes.
    ``disk_write_bytes_per_s``: how fast the guest wrote those disks while it was
    measured; a write-blocking mirror sends those writes along from the first copy
    to the switchover, so every forecast has that much less of the link and moves
    that much more.
    """

    ram_bytes: int
    dirty_rate_bytes_per_s: float
    dirty_rate_method: str
    bandwidth_bytes_per_s: float
    bandwidth_source: str
    device_state_bytes: int
    resume_overhead_ms: float
    forecasts: tuple[Forecast, ...]
    recommendation: str
    recommendation_reason: str
    nonzero_ram_bytes: int | None = None
    compression_ratios: dict[str, float] = field(default_factory=dict)
    compression_speed_bytes_per_s: float | None = None
    policy_forecast: Forecast | None = None
    measure_time_ms: float = 0.0
    working_set_bytes: int | None = None
    #: When the bandwidth was measured on QEMU's own stream: how long after the
    #: start (ms); None when it came from a hint before the start.
    bandwidth_measured_at_ms: float | None = None
    disk_copy_bytes: int = 0
    disk_write_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class Measured:
    """What the migration did, in the terms of :class:`Predicted`.

    Bandwidth and dirty rate are medians over the pre-copy samples (payload bytes
    per second between samples; QEMU's ``dirty-pages-rate``); ``*_error_pct`` is
    (measured - predicted) / predicted for the policy's forecast, when there was one.
    """

    rounds: int
    total_time_ms: float
    bandwidth_bytes_per_s: float | None = None
    dirty_rate_bytes_per_s: float | None = None
    downtime_ms: float | None = None
    final_downtime_limit_ms: float | None = None
    max_throttle_pct: int = 0
    postcopy: bool = False
    total_time_error_pct: float | None = None
    downtime_error_pct: float | None = None
    #: Source STOP to target RESUME (ms), and whether it fell in the forecast's band.
    switchover_ms: float | None = None
    switchover_in_band: bool | None = None


@dataclass(frozen=True)
class StreamStats:
    """pagestream's own figures: its page stream, tracker and final round.

    Bytes: ``raw_bytes`` are the non-zero pages sent (4 KiB each, all rounds),
    ``payload_bytes`` what they became on the wire (zstd, or raw when the link
    outran the compressor), ``stream_bytes`` every frame byte of the page stream;
    ``device_state_bytes`` is what QEMU's own stream carried (device state and
    the small non-shared RAM blocks). ``zero_pages_skipped`` were zero at the
    first scan and never sent; ``zero_pages_sent`` became zero later and went as
    flags. ``final_scan_ms`` is the final sweep's scanning (the VM stopped),
    ``final_round_ms`` the whole final sweep (scan overlapped with sending).
    ``zstd_batches`` counts the page batches sent at each zstd level
    ("raw": uncompressed), ``final_level`` is where the sender's tuning ended.
    ``switchover_ms`` marks pagestream's own switchover steps (ms after the
    start, like :class:`Timeline`): ``migrate`` (QEMU's stream started, VM
    stopped), ``pre_switchover`` (QEMU waits before device state), ``applied``
    (the receiver holds the final round), ``continue`` (device state released),
    ``final_reply`` (the sender finished, digest sent).
    """

    tracker: str
    tracker_reason: str
    rounds: int
    pages_sent: int
    zero_pages_sent: int
    zero_pages_skipped: int
    raw_bytes: int
    payload_bytes: int
    stream_bytes: int
    device_state_bytes: int
    compression_ratio: float
    zstd_batches: dict[str, int]
    final_level: str
    compress_threads: int
    scan_ms_total: float
    final_round_pages: int
    final_scan_ms: float
    final_round_ms: float
    digest: str
    switchover_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DiskReport:
    """One writable disk in a migration: how it reached the target and whether it
    arrived intact.

    ``bytes`` is what was copied for it (0 for a shared disk); ``integrity`` the
    comparison of the stopped source's image with the paused target's before the
    target resumed (allocated extents and digests of their data); ``detail`` what
    was compared or why not; ``copy_mode`` the mirror's (``write-blocking`` or
    ``background``, empty when nothing was mirrored); ``ready_ms`` how long the
    mirror took to reach READY (first full copy done).
    """

    name: str
    mode: DiskMode
    bytes: int = 0
    integrity: Integrity = Integrity.UNCHECKED
    detail: str = ""
    virtual_size: int = 0
    copy_mode: str = ""
    ready_ms: float | None = None


@dataclass(frozen=True)
class MigrationReport:
    """The outcome of one migration: figures, timeline, decisions, integrity.

    ``downtime_ms`` and ``qemu_total_time_ms`` are QEMU's own figures;
    ``total_time_ms`` is ours (``migrate`` issued → VM running on the target);
    ``guest_downtime_ms`` is the longest probe reply gap (None without a probe).
    ``predicted`` is the forecast made before the start, ``measured`` the same
    quantities as they turned out. ``migration_id`` is the request's id (also on
    every event); ``transport`` the data path's: ``tls`` (mutual TLS with the
    cluster's certificates), ``tcp`` or ``unix`` (None: not recorded, older
    reports); ``schema_version`` the version of this JSON form.
    """

    status: Status
    strategy: str
    mode: str
    vm: str
    source: str
    target: str
    policy: str
    phase: Phase
    total_time_ms: float
    ram_bytes: int
    timeline: Timeline
    downtime_ms: float | None = None
    guest_downtime_ms: float | None = None
    qemu_total_time_ms: float | None = None
    setup_time_ms: float | None = None
    transferred_bytes: int = 0
    wire_bytes: int | None = None
    precopy_rounds: int = 0
    integrity: Integrity = Integrity.UNCHECKED
    integrity_detail: str = ""
    repaired_pages: int = 0
    guest_check: str | None = None
    probe: ProbeSummary | None = None
    preflight: tuple[PreflightCheck, ...] = ()
    samples: tuple[Sample, ...] = ()
    decisions: tuple[Decision, ...] = ()
    error: str | None = None
    stream: StreamStats | None = None
    predicted: Predicted | None = None
    measured: Measured | None = None
    migration_id: str = ""
    transport: str | None = None
    disks: tuple[DiskReport, ...] = ()
    schema_version: int = REPORT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = to_dict(self)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MigrationReport:
        return from_dict(cls, data)
