"""Operator limits for a migration (:class:`Policy`): plain data, no behaviour.

The controllers that steer within these limits live in :mod:`migrate.control`
(the :class:`~migrate.control.base.Controller` protocol, the adaptive ``livemig``
controller, the static one and the peers' schedules); named policies in
:mod:`migrate.presets` (``controller_for`` picks the controller a policy names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from migrate import validate
from migrate.errors import ConfigError

#: QEMU's own ceiling on ``downtime-limit`` (2000 s, ``MAX_MIGRATE_DOWNTIME_SECONDS``).
MAX_DOWNTIME_LIMIT_MS = 2_000_000.0
#: QEMU's ``max-bandwidth`` is a size: at most 2^63-1 bytes/s.
MAX_BANDWIDTH = (1 << 63) - 1
_CAPABILITY = re.compile(r"[a-z0-9][a-z0-9-]*", re.ASCII)


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

    def __post_init__(self) -> None:
        """Raises :class:`~migrate.errors.ConfigError` naming the first bad field.

        Times must be finite and positive (``max_total_time_s`` may be None),
        ``max_throttle_pct`` 0-99, ``max_bandwidth_bytes_per_s`` None or a whole
        number of bytes >= 0, ``announce_initial_ms`` None or >= 0; a start limit
        above ``max_downtime_ms`` is allowed (the controllers clamp it to the ceiling).
        """
        validate.text(self.name, "policy name", max_length=64, spaces=True)
        validate.text(self.controller, "policy controller", pattern=validate.PLAIN_NAME, max_length=64)  # fmt: skip
        for name in ("downtime_limit_ms", "max_downtime_ms"):
            validate.number(getattr(self, name), f"policy {name}", above=0, maximum=MAX_DOWNTIME_LIMIT_MS)  # fmt: skip
        if self.max_total_time_s is not None:
            validate.number(self.max_total_time_s, "policy max_total_time_s", above=0, maximum=1e9)  # fmt: skip
        validate.whole(self.max_throttle_pct, "policy max_throttle_pct", minimum=0, maximum=99)
        validate.flag(self.postcopy_allowed, "policy postcopy_allowed")
        validate.flag(self.compression_allowed, "policy compression_allowed")
        if self.max_bandwidth_bytes_per_s is not None:
            validate.whole(self.max_bandwidth_bytes_per_s, "policy max_bandwidth_bytes_per_s", minimum=0, maximum=MAX_BANDWIDTH)  # fmt: skip
        if self.announce_initial_ms is not None:
            validate.whole(self.announce_initial_ms, "policy announce_initial_ms", minimum=0, maximum=100_000)  # fmt: skip
        pairs = self.capabilities
        if not isinstance(pairs, tuple) or not all(
            isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str)
            and _CAPABILITY.fullmatch(c[0]) and isinstance(c[1], bool)
            for c in pairs
        ):  # fmt: skip
            shown = repr(pairs)[:120]
            raise ConfigError(f"policy capabilities must be (name, True/False) pairs, not {shown}")
