"""``livemig demo`` and ``livemig migrate``."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    sub.add_parser("demo", help="live-migrate the test guest between two lab hosts")
