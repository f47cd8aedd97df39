"""``livemig bench ...``: benchmark suites, reports and plots (bench issue)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Not implemented yet: registers nothing."""
    del sub
