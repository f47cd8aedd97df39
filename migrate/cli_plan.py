"""``livemig plan``: predict a migration before anything moves (convergence issue)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Not implemented yet: registers nothing."""
    del sub
