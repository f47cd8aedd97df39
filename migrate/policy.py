"""Operator limits for a migration (:class:`Policy`): plain data, no behaviour.

The controllers that steer within these limits live in :mod:`migrate.control`
(the :class:`~migrate.control.base.Controller` protocol, the adaptive ``livemig``
controller, the static one and the peers' schedules); named policies in
:mod:`migrate.presets` (``controller_for`` picks the controller a policy names).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """The operator's limits and the settings a migration starts with.

    ``downtime_limit_ms`` is the downtime-limit a migration starts with;
    ``max_downtime_ms`` the hard ceiling no controller decision may exceed (on 2
    TCG cores a 20 ms start gave 35-48 ms guest-visible gaps where QEMU's default
    300 ms gave 65-135 ms: a late stop leaves a large final set). ``None`` for
    ``max_bandwidth_bytes_per_s`` leaves QEMU's default cap (128 MiB/s), 0 means no
    cap, the default: like Proxmox and Nova, whose uncapped runs here took ~200 ms
    where the 128 MiB/s cap took ~800 ms, with the same guest-visible downtime
    (docs/bench/default, 256 MiB openssl guest, uncapped link).
    ``capabilities`` are QEMU migration capabilities set on both sides before start.
    ``max_total_time_s`` bounds the migration (abort past it, or switch to post-copy
    where allowed); ``max_throttle_pct`` is the most guest CPU auto-converge may take
    (0: never throttle); ``postcopy_allowed`` lets a controller switch to post-copy,
    after which the VM cannot go back to the source and its RAM cannot be compared
    before it resumes; ``compression_allowed`` lets a controller pick xbzrle or
    multifd+zstd before start when the plan says it pays. ``controller`` names the
    algorithm that steers: ``livemig`` (measures and decides), ``static``,
    ``proxmox``, ``nova`` or ``ovirt`` (the peers' fixed schedules).
    ``announce_initial_ms`` is the target's delay before its first self-announce
    (RARP), which is when the switch learns where the guest went (QEMU's default is
    50 ms after the incoming side completes; 0 announces at once, while the target
    is still paused, so traffic queues on the target's tap until it resumes).
    """

    name: str = "livemig"
    controller: str = "livemig"
    downtime_limit_ms: float = 20.0
    max_downtime_ms: float = 300.0
    max_total_time_s: float | None = None
    max_throttle_pct: int = 99
    postcopy_allowed: bool = False
    max_bandwidth_bytes_per_s: int | None = 0
    capabilities: tuple[tuple[str, bool], ...] = ()
    announce_initial_ms: int | None = 0
    compression_allowed: bool = True
