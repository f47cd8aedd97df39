"""What a controller (or the operator) wants done, as typed intents.

A controller returns :class:`~migrate.report.Decision` records, each carrying one or
more intents and the reason. Each strategy carries out or rejects every intent by
its type (``native`` through QEMU's migration parameters, ``pagestream`` through its
own planner and sender); the outcome (applied, rejected with why, failed) is written
on the decision in the report, so nothing is ever a silent no-op.

:func:`qemu_command` is QEMU's rendering of intents (what the ``native`` strategy
sends, and what a report shows as ``command``/``arguments``): every intent of one
decision renders to the same QMP command and side, their arguments merged.
Pure data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

#: QEMU's largest downtime-limit (MAX_MIGRATE_DOWNTIME, migration/migration.c): 2000 s.
QEMU_MAX_DOWNTIME_MS = 2_000_000


@dataclass(frozen=True)
class _Intent:
    KIND: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # ``kind`` tells the types apart in JSON; a wrong one is not this type.
        if getattr(self, "kind", self.KIND) != self.KIND:
            raise ValueError(f"not a {self.KIND} intent")


@dataclass(frozen=True)
class SetDowntimeLimit(_Intent):
    """Switch over once what is left fits ``ms`` (QEMU's ``downtime-limit``)."""

    KIND: ClassVar[str] = "downtime-limit"
    ms: int
    kind: str = KIND


@dataclass(frozen=True)
class CapBandwidth(_Intent):
    """Send at most ``bytes_per_s`` (``max-bandwidth``; UNLIMITED_BANDWIDTH: no cap)."""

    KIND: ClassVar[str] = "bandwidth"
    bytes_per_s: int
    kind: str = KIND


@dataclass(frozen=True)
class Throttle(_Intent):
    """Slow the guest's vCPUs: auto-converge from ``initial_pct`` by ``increment_pct``
    up to ``max_pct``."""

    KIND: ClassVar[str] = "throttle"
    initial_pct: int
    increment_pct: int
    max_pct: int
    kind: str = KIND


@dataclass(frozen=True)
class ArmAutoConverge(_Intent):
    """Let QEMU throttle the guest when pre-copy does not converge (before the start)."""

    KIND: ClassVar[str] = "auto-converge"
    kind: str = KIND


@dataclass(frozen=True)
class Compress(_Intent):
    """Compress the RAM stream: ``xbzrle`` (deltas) or ``multifd`` (its compression
    set by :class:`SetMultifd`), before the start."""

    KIND: ClassVar[str] = "compress"
    method: str
    kind: str = KIND


@dataclass(frozen=True)
class SetXbzrleCache(_Intent):
    KIND: ClassVar[str] = "xbzrle-cache"
    bytes: int
    kind: str = KIND


@dataclass(frozen=True)
class SetMultifd(_Intent):
    """multifd channels and compression, the same on both ends."""

    KIND: ClassVar[str] = "multifd"
    channels: int
    compression: str
    kind: str = KIND


@dataclass(frozen=True)
class ArmPostcopy(_Intent):
    """Make post-copy possible later (``postcopy-ram`` on both sides, before the start)."""

    KIND: ClassVar[str] = "postcopy-ram"
    kind: str = KIND


@dataclass(frozen=True)
class AnnounceEarly(_Intent):
    """The target announces the guest's MAC ``initial_ms`` after it loaded the VM."""

    KIND: ClassVar[str] = "announce"
    initial_ms: int
    kind: str = KIND


@dataclass(frozen=True)
class StartPostcopy(_Intent):
    KIND: ClassVar[str] = "postcopy"
    kind: str = KIND


@dataclass(frozen=True)
class SwitchoverNow(_Intent):
    """Switch over at the next opportunity, whatever the downtime (operator)."""

    KIND: ClassVar[str] = "switchover-now"
    kind: str = KIND


@dataclass(frozen=True)
class Switchover(_Intent):
    """A strategy's own planner decided to switch over (recorded, nothing to carry out)."""

    KIND: ClassVar[str] = "switchover"
    kind: str = KIND


@dataclass(frozen=True)
class Abort(_Intent):
    """Give up: the VM stays on (goes back to) the source."""

    KIND: ClassVar[str] = "abort"
    kind: str = KIND


Intent = (
    SetDowntimeLimit
    | CapBandwidth
    | Throttle
    | ArmAutoConverge
    | Compress
    | SetXbzrleCache
    | SetMultifd
    | ArmPostcopy
    | AnnounceEarly
    | StartPostcopy
    | SwitchoverNow
    | Switchover
    | Abort
)

_SET = "migrate-set-parameters"
_CAPS = "migrate-set-capabilities"


def _render(intent: Intent) -> tuple[str | None, dict[str, Any], str]:
    """One intent as (QMP command or None, arguments, side)."""
    match intent:
        case SetDowntimeLimit(ms=ms):
            return _SET, {"downtime-limit": int(ms)}, "source"
        case CapBandwidth(bytes_per_s=rate):
            return _SET, {"max-bandwidth": int(rate)}, "source"
        case Throttle(initial_pct=initial, increment_pct=increment, max_pct=most):
            return _SET, {"cpu-throttle-initial": initial, "cpu-throttle-increment": increment,
                          "max-cpu-throttle": most}, "source"  # fmt: skip
        case SetXbzrleCache(bytes=size):
            return _SET, {"xbzrle-cache-size": int(size)}, "source"
        case SetMultifd(channels=channels, compression=compression):
            return _SET, {"multifd-compression": compression, "multifd-channels": channels}, "both"
        case AnnounceEarly(initial_ms=ms):
            return _SET, {"announce-initial": int(ms)}, "target"
        case Compress(method=method):
            return _CAPS, {method: True}, "both"
        case ArmAutoConverge():
            return _CAPS, {"auto-converge": True}, "both"
        case ArmPostcopy():
            return _CAPS, {"postcopy-ram": True}, "both"
        case StartPostcopy():
            return "migrate-start-postcopy", {}, "source"
        case SwitchoverNow():
            return _SET, {"downtime-limit": QEMU_MAX_DOWNTIME_MS}, "source"
    return None, {}, "source"  # Abort, Switchover: nothing for QEMU


def qemu_command(intents: tuple[Intent, ...]) -> tuple[str | None, dict[str, Any], str]:
    """The one QMP command carrying ``intents`` in QEMU's stream: (command, arguments, side).

    Raises ValueError when they would need different commands or sides.
    """
    rendered = [_render(i) for i in intents]
    commands = {c for c, _, _ in rendered}
    sides = {s for c, _, s in rendered if c is not None}
    if len(commands) > 1 or len(sides) > 1:
        kinds = ", ".join(i.kind for i in intents)
        raise ValueError(f"intents {kinds} need more than one QMP command or side")
    command = rendered[0][0] if rendered else None
    if command is None:
        return None, {}, "source"
    if command == _CAPS:
        caps: dict[str, bool] = {}
        for _, args, _ in rendered:
            caps.update(args)
        arguments: dict[str, Any] = {
            "capabilities": [{"capability": k, "state": v} for k, v in caps.items()]
        }
    else:
        arguments = {}
        for _, args, _ in rendered:
            arguments.update(args)
    return command, arguments, sides.pop()


def action_of(intents: tuple[Intent, ...]) -> str:
    """A short name for a decision: its intents' kinds, joined."""
    return "+".join(i.kind for i in intents) or "none"


def intents_from_qmp(
    action: str, command: str | None, arguments: dict[str, Any]
) -> tuple[Intent, ...]:
    """The intents a decision recorded before intents existed (QMP only) stood for."""
    if action == "abort":
        return (Abort(),)
    if action == "switchover":
        return (Switchover(),)
    if action == "switchover-now":
        return (SwitchoverNow(),)
    if command == "migrate-start-postcopy":
        return (StartPostcopy(),)
    found: list[Intent] = []
    if command == _CAPS:
        for cap in arguments.get("capabilities", []):
            name = cap.get("capability") if isinstance(cap, dict) else None
            if name in ("xbzrle", "multifd"):
                found.append(Compress(str(name)))
            elif name == "auto-converge":
                found.append(ArmAutoConverge())
            elif name == "postcopy-ram":
                found.append(ArmPostcopy())
        return tuple(found)
    a = arguments
    if "downtime-limit" in a:
        found.append(SetDowntimeLimit(int(a["downtime-limit"])))
    if "max-bandwidth" in a:
        found.append(CapBandwidth(int(a["max-bandwidth"])))
    if "cpu-throttle-initial" in a:
        found.append(Throttle(int(a["cpu-throttle-initial"]),
                              int(a.get("cpu-throttle-increment", 10)),
                              int(a.get("max-cpu-throttle", 99))))  # fmt: skip
    if "xbzrle-cache-size" in a:
        found.append(SetXbzrleCache(int(a["xbzrle-cache-size"])))
    if "multifd-channels" in a or "multifd-compression" in a:
        found.append(SetMultifd(int(a.get("multifd-channels", 2)),
                                str(a.get("multifd-compression", "none"))))  # fmt: skip
    if "announce-initial" in a:
        found.append(AnnounceEarly(int(a["announce-initial"])))
    return tuple(found)
