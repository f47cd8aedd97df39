"""``livemig recover``: settle the migrations a crashed ``livemig`` left unfinished.

For every unfinished journal in the state directory whose owner process is gone,
both QEMUs are inspected and the VM brought to exactly one running copy
(:mod:`migrate.recover`); the journal is then finished. Output: a few lines per
migration, or with ``--json`` exactly one JSON object (``recovered``: all
settled; ``migrations``: one result each). Exit code 0 when every migration was
settled (or there was none), 1 otherwise: an ``unknown`` result (its ``advice``
says what to do) or a migration still in progress.
``--forget ID`` marks one unfinished journal finished without touching its VM.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from migrate.cli import EXIT_ERROR, EXIT_OK, print_json
from migrate.journal import DEFAULT_STATE_DIR, STATE_DIR_ENV, JournalStore, state_dir_for_cli
from migrate.recover import Recovery, SideState, forget, recover_all


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def register(sub: Any) -> None:
    rec = sub.add_parser(
        "recover", help="bring VMs of migrations a crashed livemig left unfinished to one copy"
    )
    rec.add_argument("--state-dir", type=Path, default=None,
                     help=f"the journals' state directory (default ${STATE_DIR_ENV} or "
                          f"{DEFAULT_STATE_DIR})")  # fmt: skip
    rec.add_argument("--json", action="store_true", help="print exactly one JSON object")
    rec.add_argument("--timeout", type=_seconds, default=5.0,
                     help="deadline for each QMP connection and command (s)")  # fmt: skip
    rec.add_argument("--postcopy-wait", type=_seconds, default=120.0,
                     help="how long a post-copy still running on the target may take (s)")  # fmt: skip
    rec.add_argument("--forget", metavar="ID", default=None,
                     help="mark migration ID finished without touching its VM (you settled it)")  # fmt: skip
    rec.set_defaults(func=_recover)


def _recover(args: argparse.Namespace) -> int:
    store = JournalStore(state_dir_for_cli(args.state_dir))
    if args.forget is not None:
        record = forget(store, args.forget)
        if args.json:
            print_json({"state_dir": str(store.state_dir), "forgotten": record.migration_id})
        else:
            print(f"migration {record.migration_id} (VM {record.describe_vm()}): forgotten")
        return EXIT_OK
    began = time.monotonic()
    results = asyncio.run(
        recover_all(store, timeout=args.timeout, postcopy_wait_s=args.postcopy_wait)
    )
    seconds = time.monotonic() - began
    recovered = all(r.recovered for r in results)
    if args.json:
        print_json(
            {
                "state_dir": str(store.state_dir),
                "recovered": recovered,
                "seconds": round(seconds, 4),
                "migrations": [r.to_dict() for r in results],
            }
        )
    elif not results:
        print(f"no unfinished migrations in {store.dir}")
    else:
        for result in results:
            print(_render(result))
    return EXIT_OK if recovered else EXIT_ERROR


def _side(state: SideState | None) -> str:
    return state.describe() if state is not None else "not looked at"


def _render(result: Recovery) -> str:
    where = "after" if result.point_of_no_return else "before"
    lines = [
        f"migration {result.migration_id} (VM {result.vm}, {result.strategy}, phase "
        f"{result.phase}, {where} the point of no return): {result.result}",
        f"  found: {_side(result.source)}; {_side(result.target)}",
    ]
    if result.actions:
        lines.append(f"  did: {'; '.join(result.actions)}")
    if result.advice:
        lines.append(f"  {result.advice}")
    lines.append(f"  took {result.seconds:.2f} s")
    return "\n".join(lines)
