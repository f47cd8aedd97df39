"""How a pagestream migration runs (:class:`PagestreamOptions`) and where its stream goes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dirtytrack.trackers import TrackerKind
from migrate.errors import ConfigError
from migrate.pagestream.control import AGENT_MODULE
from migrate.pagestream.planner import DEFAULT_FIXED_DOWNTIME_MS

_TCP_URI: Final = re.compile(r"^tcp:(?P<host>\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):(?P<port>\d+)$")


@dataclass(frozen=True)
class PagestreamOptions:
    """How the stream runs; the defaults are what ``--strategy pagestream`` uses.

    ``tracker`` is a preference order (None: the sender's, soft-dirty → shadow
    diff if half the host's available memory holds a copy of guest RAM → page
    digests, by probe). ``start_level`` is the first zstd level (None: raw); the
    sender adapts it. ``engine_compare`` adds the engine's own comparison of
    both RAM files after the device-state load (where it can map them) to the
    stream digest. ``agent_module`` is the module both agents run as (``python
    -m``; another build of the agent, e.g. a packaged one, speaks the same
    protocol). ``log_dir`` keeps the agents' stderr. Timeouts in s.
    """

    tracker: tuple[TrackerKind, ...] | None = None
    max_threads: int = 2
    start_level: int | None = 1
    batch_pages: int | None = None
    fixed_downtime_ms: float = DEFAULT_FIXED_DOWNTIME_MS
    engine_compare: bool = False
    agent_module: str = AGENT_MODULE
    log_dir: Path | None = None
    setup_timeout_s: float = 120.0
    switchover_timeout_s: float = 60.0


def stream_host(migration_uri: str) -> str:
    """The address the page stream uses: the host of a ``tcp:HOST:PORT`` URI.

    Raises :class:`ConfigError` for other URIs (the page stream needs TCP).
    """
    match = _TCP_URI.match(migration_uri)
    if match is None:
        raise ConfigError(
            f"pagestream needs a tcp:HOST:PORT migration URI, not {migration_uri!r} "
            "(its page stream listens on HOST, next to QEMU's device-state stream)"
        )
    return match.group("host").strip("[]")
