"""Migration phases and the one table of legal transitions between them."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from migrate.errors import LivemigError


class Phase(StrEnum):
    SETUP = "setup"
    PRECOPY = "precopy"
    THROTTLING = "throttling"
    POSTCOPY = "postcopy"
    SWITCHOVER = "switchover"
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Phase.COMPLETED, Phase.ABORTED, Phase.FAILED})
_ENDINGS = frozenset({Phase.ABORTED, Phase.FAILED})

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.SETUP: frozenset({Phase.PRECOPY, Phase.SWITCHOVER}) | _ENDINGS,
    Phase.PRECOPY: frozenset({Phase.THROTTLING, Phase.POSTCOPY, Phase.SWITCHOVER}) | _ENDINGS,
    Phase.THROTTLING: frozenset({Phase.PRECOPY, Phase.POSTCOPY, Phase.SWITCHOVER}) | _ENDINGS,
    Phase.POSTCOPY: frozenset({Phase.COMPLETED}) | _ENDINGS,
    Phase.SWITCHOVER: frozenset({Phase.COMPLETED}) | _ENDINGS,
    Phase.COMPLETED: frozenset(),
    Phase.ABORTED: frozenset(),
    Phase.FAILED: frozenset(),
}


class PhaseError(LivemigError):
    """An illegal phase transition: a bug in a strategy, never an operator error."""


class PhaseTracker:
    """Holds the current phase; refuses illegal transitions; reports each change."""

    def __init__(self, on_change: Callable[[Phase, Phase], None] | None = None) -> None:
        self.phase = Phase.SETUP
        self._on_change = on_change

    def advance(self, to: Phase) -> None:
        """Move to ``to`` (staying put is allowed). Raises :class:`PhaseError`."""
        if to is self.phase:
            return
        if to not in TRANSITIONS[self.phase]:
            raise PhaseError(f"illegal migration phase change {self.phase} -> {to}")
        previous, self.phase = self.phase, to
        if self._on_change is not None:
            self._on_change(previous, to)
