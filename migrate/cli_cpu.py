"""``livemig cpu ...``: CPU descriptions, compatibility checks, cluster baselines."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("cpu", help="CPU model checks")
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)
