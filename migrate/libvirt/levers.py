"""What libvirt can carry of a controller's intents, and how.

libvirt steers QEMU's migration for us: some levers exist only when the job
starts (``migrateToURI3``'s flags and typed parameters: compression, auto-converge,
post-copy, parallel connections, the bandwidth cap), some only while it runs
(``migrateSetMaxDowntime``, ``migrateSetMaxSpeed``, ``migrateSetCompressionCache``,
``migrateStartPostCopy``), and some not at all (the throttle's ceiling, the
target's self-announce timing, multifd compression in libvirt 9.0's parameters).
Every intent is carried out or rejected with the reason, and the decision's
outcome says which (applied, partial, rejected), as with every strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from migrate.control.base import UNLIMITED_BANDWIDTH
from migrate.control.intents import (
    QEMU_MAX_DOWNTIME_MS,
    Abort,
    AnnounceEarly,
    ArmAutoConverge,
    ArmPostcopy,
    CapBandwidth,
    Compress,
    Intent,
    SetDowntimeLimit,
    SetMultifd,
    SetXbzrleCache,
    StartPostcopy,
    Switchover,
    SwitchoverNow,
    Throttle,
)
from migrate.libvirt.conn import require_libvirt
from migrate.report import Decision, Outcome

MIB = 1 << 20

_NO_ANNOUNCE = "libvirt gives no say over when the target announces the guest's MAC"
_START_ONLY = "libvirt takes this only as a flag or parameter of migrateToURI3, before the start"


class JobDomain(Protocol):
    """The calls of a ``virDomain`` (on the control connection) a running job takes."""

    def migrateSetMaxDowntime(self, downtime: int, flags: int = 0) -> int: ...
    def migrateSetMaxSpeed(self, bandwidth: int, flags: int = 0) -> int: ...
    def migrateSetCompressionCache(self, cacheSize: int, flags: int = 0) -> int: ...
    def migrateStartPostCopy(self, flags: int = 0) -> int: ...
    def abortJob(self) -> int: ...


def bandwidth_mib(bytes_per_s: int) -> int:
    """libvirt's bandwidth unit (MiB/s, rounded up so a cap is never tighter)."""
    return max(1, math.ceil(bytes_per_s / MIB))


@dataclass
class Pending:
    """A start decision with intents only a running job takes: what the start did of
    it so far, and those intents."""

    decision: Decision
    results: list[tuple[Outcome, str]]
    live: list[Intent]


@dataclass
class StartSettings:
    """``migrateToURI3``'s flags and parameters from the start decisions; the
    decisions settled; and those with intents to carry out once the job runs."""

    flags: int
    params: dict[str, Any] = field(default_factory=dict)
    settled: list[Decision] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)


def _outcome(results: list[tuple[Outcome, str]]) -> tuple[Outcome, str]:
    outcomes = {outcome for outcome, _ in results}
    notes = "; ".join(why for _, why in results if why)
    if outcomes <= {Outcome.APPLIED}:
        return Outcome.APPLIED, notes
    if outcomes == {Outcome.REJECTED}:
        return Outcome.REJECTED, notes
    return Outcome.PARTIAL, notes


_LIVE_AT_START = (SetDowntimeLimit, SwitchoverNow, StartPostcopy)


def start_settings(decisions: list[Decision], flags: int) -> StartSettings:
    """Fold the controller's start decisions into ``migrateToURI3``'s flags and params.

    Intents that need a running job (downtime limit) wait in ``pending`` for
    :func:`settle_pending`; the rest are applied as flags/parameters or rejected
    with the reason.
    """
    lv = require_libvirt()
    settings = StartSettings(flags=flags)
    for decision in decisions:
        live: list[Intent] = [i for i in decision.intents if isinstance(i, _LIVE_AT_START)]
        results = [
            _at_start(i, settings, lv)
            for i in decision.intents
            if not isinstance(i, _LIVE_AT_START)
        ]
        if live:
            settings.pending.append(Pending(decision, results, live))
        else:
            outcome, detail = _outcome(results)
            settings.settled.append(decision.settled(outcome, detail))
    return settings


def settle_pending(pending: Pending, domain: JobDomain, postcopy_armed: bool) -> Decision:
    """Carry out a start decision's remaining intents on the now running job."""
    lv = require_libvirt()
    results = list(pending.results)
    for intent in pending.live:
        try:
            results.append(carry_out(intent, domain, postcopy_armed))
        except lv.libvirtError as exc:
            return pending.decision.settled(Outcome.FAILED, str(exc))
    outcome, detail = _outcome(results)
    return pending.decision.settled(outcome, detail)


def _at_start(intent: Intent, s: StartSettings, lv: Any) -> tuple[Outcome, str]:
    match intent:
        case CapBandwidth(bytes_per_s=rate):
            if rate >= UNLIMITED_BANDWIDTH:
                return Outcome.APPLIED, "no bandwidth cap (libvirt's default)"
            s.params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib(rate)
            return Outcome.APPLIED, f"bandwidth {bandwidth_mib(rate)} MiB/s"
        case ArmAutoConverge():
            s.flags |= lv.VIR_MIGRATE_AUTO_CONVERGE
            return Outcome.APPLIED, "VIR_MIGRATE_AUTO_CONVERGE"
        case Throttle(initial_pct=initial, increment_pct=increment, max_pct=most):
            s.params[lv.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = initial
            s.params[lv.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = increment
            if most < 99:
                return Outcome.PARTIAL, (
                    f"initial {initial} % and increment {increment} % set; max {most} % not: "
                    "libvirt has no max-cpu-throttle parameter (QEMU's 99 % stays)"
                )
            return Outcome.APPLIED, ""
        case Compress(method="xbzrle"):
            s.flags |= lv.VIR_MIGRATE_COMPRESSED
            s.params[lv.VIR_MIGRATE_PARAM_COMPRESSION] = "xbzrle"
            return Outcome.APPLIED, "VIR_MIGRATE_COMPRESSED xbzrle"
        case Compress(method="multifd"):
            s.flags |= lv.VIR_MIGRATE_PARALLEL
            return Outcome.APPLIED, "VIR_MIGRATE_PARALLEL"
        case SetXbzrleCache(bytes=size):
            s.params[lv.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE] = int(size)
            return Outcome.APPLIED, ""
        case SetMultifd(channels=channels, compression=compression):
            s.flags |= lv.VIR_MIGRATE_PARALLEL
            s.params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = int(channels)
            if compression != "none":
                return Outcome.PARTIAL, (
                    f"{channels} channels set; {compression}: libvirt 9.0 has no multifd compression"
                )
            return Outcome.APPLIED, ""
        case ArmPostcopy():
            s.flags |= lv.VIR_MIGRATE_POSTCOPY
            return Outcome.APPLIED, "VIR_MIGRATE_POSTCOPY"
        case AnnounceEarly():
            return Outcome.REJECTED, _NO_ANNOUNCE
        case Switchover():
            return Outcome.APPLIED, ""
    return Outcome.REJECTED, f"{intent.kind} is not a start setting"


def carry_out(intent: Intent, domain: JobDomain, postcopy_armed: bool) -> tuple[Outcome, str]:
    """Carry out one intent on a running job: (done, why not / what). Raises libvirt's
    error when libvirt refuses a call it has."""
    match intent:
        case SetDowntimeLimit(ms=ms):
            domain.migrateSetMaxDowntime(int(ms), 0)
            return Outcome.APPLIED, ""
        case SwitchoverNow():
            domain.migrateSetMaxDowntime(QEMU_MAX_DOWNTIME_MS, 0)
            return Outcome.APPLIED, f"migrateSetMaxDowntime({QEMU_MAX_DOWNTIME_MS})"
        case CapBandwidth(bytes_per_s=rate):
            domain.migrateSetMaxSpeed(bandwidth_mib(min(rate, UNLIMITED_BANDWIDTH)), 0)
            return Outcome.APPLIED, ""
        case SetXbzrleCache(bytes=size):
            domain.migrateSetCompressionCache(int(size), 0)
            return Outcome.APPLIED, ""
        case StartPostcopy():
            if not postcopy_armed:
                return Outcome.REJECTED, "the job was started without VIR_MIGRATE_POSTCOPY"
            domain.migrateStartPostCopy(0)
            return Outcome.APPLIED, ""
        case Switchover():
            return Outcome.APPLIED, ""
        case Throttle():
            return (
                Outcome.REJECTED,
                "libvirt sets auto-converge's throttle only when the job starts",
            )
        case AnnounceEarly():
            return Outcome.REJECTED, _NO_ANNOUNCE
        case Abort():
            domain.abortJob()
            return Outcome.APPLIED, ""
    return Outcome.REJECTED, _START_ONLY


def settle_live(decision: Decision, domain: JobDomain, postcopy_armed: bool) -> Decision:
    """Carry out every intent of ``decision`` on the running job; the settled decision.

    A call libvirt refuses settles it as failed with libvirt's message.
    """
    return settle_pending(Pending(decision, [], list(decision.intents)), domain, postcopy_armed)
