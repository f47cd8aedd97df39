"""Placeholder CLI entry point; replaced by the real command set."""


def main() -> int:
    return 0
