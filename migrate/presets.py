"""Named policies: livemig's own and the peers' defaults, reproduced from their sources.

Stable API (the benchmark calls it): :data:`PRESET_NAMES`, :func:`preset` and
:func:`controller_for`. A preset is a plain :class:`~migrate.policy.Policy`;
customise one with :func:`dataclasses.replace` (its ``controller`` field keeps
naming the algorithm that steers it).

- ``livemig`` — start at downtime-limit 20 ms (measured best here for light
  workloads), hard maximum 300 ms, throttle allowed up to 99 % but only when the
  model says pre-copy cannot converge otherwise (a guest dirtying faster than the
  link would make the migration abort; Proxmox's default, auto-converge, completes
  there), no post-copy; the adaptive
  :class:`~migrate.control.livemig.LivemigController` raises the limit from the measured
  remaining set and bandwidth, picks compression from the plan, and aborts with the
  reason when pre-copy cannot meet the limits.
- ``qemu-default`` — what QEMU does when nobody steers: downtime-limit 300 ms,
  max-bandwidth 128 MiB/s, no capabilities, no abort
  (``DEFAULT_MIGRATE_SET_DOWNTIME``/``MAX_THROTTLE`` in migration/migration.c).
- ``proxmox`` — qemu-server ``PVE/QemuMigrate.pm`` ``phase2`` with
  ``set_migration_caps`` (PVE/QemuServer.pm): auto-converge + xbzrle, cache 10 % of
  RAM rounded up to a power of two, downtime from 100 ms doubling after more than
  5 polls whose remaining rose or was 0, never aborts
  (:class:`~migrate.control.proxmox.ProxmoxController`).
- ``nova`` — nova/virt/libvirt/migration.py ``downtime_steps`` and ``update_downtime``
  with driver.py's monitor: 500 ms over 10 steps every 75 s/GiB, completion timeout
  800 s/GiB then abort (:class:`~migrate.control.nova.NovaController`).
- ``ovirt-minimal-downtime`` — ovirt-engine's "Minimal downtime" migration policy as
  vdsm's ``MonitorThread`` applies it: 100 ms, then 150, 200, 300, 400, 500 ms by
  iteration, then abort; auto-converge on (:class:`~migrate.control.ovirt.OvirtController`).

The peers leave ``announce-initial`` at QEMU's default (they do not tune it).
"""

from __future__ import annotations

from collections.abc import Callable

from migrate.control.base import QEMU_DEFAULT_BANDWIDTH, QEMU_MAX_DOWNTIME_MS, Controller
from migrate.control.livemig import LivemigController
from migrate.control.nova import NovaController
from migrate.control.ovirt import OvirtController
from migrate.control.proxmox import ProxmoxController
from migrate.control.static import HandsOffController, StaticController
from migrate.errors import ConfigError
from migrate.policy import Policy
from migrate.report import Predicted

PRESET_NAMES: tuple[str, ...] = (
    "livemig",
    "qemu-default",
    "proxmox",
    "nova",
    "ovirt-minimal-downtime",
)

MIB = 1 << 20

_PRESETS: dict[str, Policy] = {
    "livemig": Policy(),
    "qemu-default": Policy(
        name="qemu-default",
        controller="static",
        downtime_limit_ms=300.0,
        max_downtime_ms=300.0,
        max_bandwidth_bytes_per_s=QEMU_DEFAULT_BANDWIDTH,
        max_throttle_pct=0,  # auto-converge is off unless someone turns it on
        announce_initial_ms=None,
        compression_allowed=False,
    ),
    "proxmox": Policy(
        name="proxmox",
        controller="proxmox",
        downtime_limit_ms=100.0,
        # Proxmox doubles without bound; QEMU's own ceiling is the only one.
        max_downtime_ms=float(QEMU_MAX_DOWNTIME_MS),
        max_throttle_pct=99,  # auto-converge with QEMU's default max-cpu-throttle
        max_bandwidth_bytes_per_s=None,  # the controller sets Proxmox's 16 GiB/s
        capabilities=(("auto-converge", True), ("xbzrle", True)),
        announce_initial_ms=None,
        compression_allowed=False,
    ),
    "nova": Policy(
        name="nova",
        controller="nova",
        downtime_limit_ms=300.0,  # QEMU's, until the monitor's first poll sets 50 ms
        max_downtime_ms=500.0,
        max_total_time_s=None,  # 800 s/GiB, computed from the RAM by the controller
        max_bandwidth_bytes_per_s=0,
        max_throttle_pct=0,  # live_migration_permit_auto_converge defaults to False
        announce_initial_ms=None,
        compression_allowed=False,
    ),
    "ovirt-minimal-downtime": Policy(
        name="ovirt-minimal-downtime",
        controller="ovirt",
        downtime_limit_ms=100.0,
        max_downtime_ms=500.0,
        max_throttle_pct=99,
        capabilities=(("auto-converge", True),),
        # The engine's bandwidth depends on the migration network's link speed,
        # which the lab does not report: QEMU's default cap stands in.
        max_bandwidth_bytes_per_s=None,
        announce_initial_ms=None,
        compression_allowed=False,
    ),
}


def preset(name: str) -> Policy:
    """The policy called ``name``. Raises :class:`ConfigError` listing the known names."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown policy {name!r} (known: {', '.join(PRESET_NAMES)})") from None


_CONTROLLERS: dict[str, Callable[[Policy], Controller]] = {
    "livemig": LivemigController,
    "static": StaticController,
    "none": HandsOffController,
    "proxmox": ProxmoxController,
    "nova": NovaController,
    "ovirt": OvirtController,
}


def controller_for(policy: Policy, predicted: Predicted | None = None) -> Controller:
    """A fresh controller of the kind ``policy.controller`` names.

    ``predicted`` (the pre-start forecast) is handed to controllers that use one.
    Raises :class:`ConfigError` for an unknown controller name.
    """
    try:
        make = _CONTROLLERS[policy.controller]
    except KeyError:
        raise ConfigError(
            f"policy {policy.name!r} names an unknown controller {policy.controller!r} "
            f"(known: {', '.join(_CONTROLLERS)})"
        ) from None
    controller = make(policy)
    if predicted is not None and isinstance(controller, LivemigController):
        controller.use_prediction(predicted)
    return controller
