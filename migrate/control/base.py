"""The controller interface, the decisions controllers build, and QEMU's constants.

A :class:`Controller` is pure logic: given the policy and live samples it returns
:class:`~migrate.report.Decision` objects; the strategy carries them out over QMP
and emits them as events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from migrate.control.intents import QEMU_MAX_DOWNTIME_MS, Abort, Intent, StartPostcopy
from migrate.policy import Policy
from migrate.report import Decision, Predicted, Sample

__all__ = ["QEMU_MAX_DOWNTIME_MS"]  # re-exported for the controllers

MIB = 1 << 20
GIB = 1 << 30

# QEMU 7.2 rejects max-bandwidth above SIZE_MAX / 1000 bytes/s; 1 TiB/s is "no cap".
UNLIMITED_BANDWIDTH = 1 << 40
#: QEMU's default max-bandwidth (MAX_THROTTLE, migration/migration.c): 128 MiB/s.
QEMU_DEFAULT_BANDWIDTH = 128 * MIB
#: Device state of the test guest (~600 KB measured with the pagestream prototype).
DEFAULT_DEVICE_STATE_BYTES = 600_000


@dataclass(frozen=True)
class ControlContext:
    """What a controller knows when the migration starts."""

    ram_bytes: int
    started_monotonic: float


class Controller(Protocol):
    """Decides migration settings; never talks to QEMU itself."""

    policy: Policy

    def start(self, context: ControlContext) -> list[Decision]:
        """Settings to apply before ``migrate`` is issued."""
        ...

    def on_sample(self, sample: Sample) -> list[Decision]:
        """Changes to make after a new observation (may include ``abort``)."""
        ...


@runtime_checkable
class PeerPollLoop(Protocol):
    """A controller that reproduces a peer's own poll loop (Proxmox, Nova, vdsm).

    It looks at ``query-migrate`` only at the times its peer does; samples fed to
    :meth:`Controller.on_sample` before :attr:`next_poll_ms` are ignored. A driver
    that runs the peer as its users get it (``lab.raw``) queries QEMU at that time.
    """

    @property
    def next_poll_ms(self) -> float:
        """When the peer polls next, in ms after ``migrate`` was issued."""
        ...


@runtime_checkable
class PredictionAware(Protocol):
    """A controller that can use the forecast made before the start."""

    def use_prediction(self, predicted: Predicted) -> None:
        """Take the pre-start measurement and forecast into account (before ``start``)."""
        ...


def decide(now: float, reason: str, *intents: Intent) -> Decision:
    """A decision carrying ``intents`` (see :mod:`migrate.control.intents`)."""
    return Decision(now, reason, intents)


def abort(now: float, reason: str) -> Decision:
    return Decision(now, reason, (Abort(),))


def start_postcopy(now: float, reason: str) -> Decision:
    return Decision(now, reason, (StartPostcopy(),))


def fmt_mib(value: float) -> str:
    """``value`` bytes as ``"12.3 MiB"`` (for decision reasons)."""
    return f"{value / MIB:.1f} MiB"


def round_powerof2(value: int) -> int:
    """Proxmox's ``round_powerof2`` (PVE/QemuMigrate.pm): the next power of two >= value.

    ``2 << int(log2(value - 1))``, and 1 below 2, as written there.
    """
    if value < 2:
        return 1
    return 2 << int(math.log(value - 1) / math.log(2))
