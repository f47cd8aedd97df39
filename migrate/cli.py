"""The ``livemig`` command line.

Each command group lives in its own module exposing ``register(subparsers)``; the
handler it sets (``func``) returns an exit code. Every error the libraries raise on
purpose becomes one line on stderr and a non-zero exit code, never a traceback.

Exit codes: 0 ok, 1 error, 2 usage, 3 refused by preflight, 4 migration failed or
aborted, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cpumodel.errors import CpuModelError
from dirtytrack.errors import DirtyTrackError
from migrate.errors import LivemigError, MigrationError, PreflightError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PREFLIGHT = 3
EXIT_MIGRATION = 4
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"livemig: error: {message}\n")


def print_json(obj: Any) -> None:
    """Write exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    from migrate import (
        cli_bench,
        cli_cluster,
        cli_cpu,
        cli_libvirt,
        cli_migrate,
        cli_plan,
        cli_recover,
        cli_replicate,
        cli_vm,
    )  # fmt: skip

    parser = _Parser(prog="livemig", description="Live migration of QEMU/KVM virtual machines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (
        cli_migrate,
        cli_recover,
        cli_replicate,
        cli_plan,
        cli_cpu,
        cli_bench,
        cli_cluster,
        cli_vm,
    ):
        module.register(sub)
    cli_libvirt.extend(sub)  # --libvirt on migrate and demo
    cli_vm.extend(sub)  # migrate VM --to NODE
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except PreflightError as exc:
        _fail(str(exc), exc.reasons)
        return EXIT_PREFLIGHT
    except MigrationError as exc:
        _fail(str(exc))
        return EXIT_MIGRATION
    except (LivemigError, CpuModelError, DirtyTrackError) as exc:
        _fail(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED


def _fail(message: str, reasons: Sequence[str] = ()) -> None:
    line = message if not reasons else f"{message}: {'; '.join(reasons)}"
    sys.stderr.write(f"livemig: error: {line}\n")


if __name__ == "__main__":
    sys.exit(main())
