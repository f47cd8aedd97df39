"""``livemig replicate``: keep a replica of a VM's local disks on the target host.

``livemig replicate --qmp SOCK --replica-dir DIR`` runs once: the first run copies
each writable qcow2 disk whole, each later run only the clusters written since the
previous one (:mod:`migrate.disks.replicate`). ``--every 15m`` repeats until
interrupted (a failed run is reported and the next one tried at its time).
``livemig replicate status --replica-dir DIR`` lists each disk's generation, last
run, age and bytes. ``--json``: one JSON object per run (JSON lines with
``--every``), or the status object. Exit code 0 when the (last) run succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

from migrate import cli_args
from migrate.cli import EXIT_OK, print_json
from migrate.disks.replica_store import ReplicaStore
from migrate.disks.replicate import (
    DEFAULT_STALL_S,
    DEFAULT_TIMEOUT_S,
    ReplicationError,
    RunResult,
    replica_status,
    replicate_once,
)
from migrate.disks.storage_daemon import NbdAddress
from migrate.errors import ConfigError, LivemigError
from migrate.qmp import QmpSession

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def interval(text: str) -> float:
    """``--every``: ``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds (>= 1 s, <= 30 d)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not an interval: {text!r} (e.g. 90s, 15m, 2h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 1.0 <= seconds <= 30 * 86400.0:
        raise argparse.ArgumentTypeError(f"interval must be 1 s to 30 d: {text!r}")
    return seconds


def _nbd(text: str) -> NbdAddress:
    try:
        return NbdAddress.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    rep = sub.add_parser(
        "replicate",
        help="copy a VM's local disks to a replica on the target (incremental after the first)",
    )
    rep.add_argument("action", nargs="?", choices=("run", "status"), default="run",
                     help="run (default): replicate now (or --every); status: list the replica")  # fmt: skip
    rep.add_argument("--qmp", type=cli_args.path, default=None,
                     help="the source QEMU's QMP socket")  # fmt: skip
    rep.add_argument("--replica-dir", type=cli_args.path, required=True,
                     help="the replica directory on the target host")  # fmt: skip
    rep.add_argument("--disk", action="append", default=[], metavar="NAME",
                     help="replicate only this disk (repeatable; default every qcow2 disk)")  # fmt: skip
    rep.add_argument("--every", type=interval, default=None, metavar="INTERVAL",
                     help="repeat every INTERVAL (90s, 15m, 2h) until interrupted")  # fmt: skip
    rep.add_argument("--nbd-listen", type=_nbd, default=None, metavar="ADDR",
                     help="where the replica's NBD server listens: HOST:PORT or a socket "
                          "path (default a UNIX socket in the replica directory)")  # fmt: skip
    rep.add_argument("--rate-limit", type=cli_args.positive_float(1e6), default=None,
                     metavar="MIBPS", help="cap each disk's copy (MiB/s)")  # fmt: skip
    rep.add_argument("--timeout", type=cli_args.positive_float(30 * 86400.0),
                     default=DEFAULT_TIMEOUT_S, help="deadline of one run (s)")  # fmt: skip
    rep.add_argument("--stall", type=cli_args.positive_float(86400.0), default=DEFAULT_STALL_S,
                     help="give a run up when its copy makes no progress this long (s)")  # fmt: skip
    rep.add_argument("--json", action="store_true", help="print JSON")
    rep.set_defaults(func=_replicate)


def _replicate(args: argparse.Namespace) -> int:
    store = ReplicaStore(Path(args.replica_dir).absolute())
    if args.action == "status":
        status = replica_status(store)
        if args.json:
            print_json(status)
        else:
            print(_render_status(status))
        return EXIT_OK
    if args.qmp is None:
        raise ConfigError("replicate needs --qmp (the source QEMU's QMP socket)")
    if args.every is None:
        result = asyncio.run(_run(args, store))
        _print_run(args, result)
        return EXIT_OK
    return asyncio.run(_schedule(args, store))


async def _run(args: argparse.Namespace, store: ReplicaStore) -> RunResult:
    session = await QmpSession.connect(args.qmp, "source", timeout=10.0)
    try:
        return await replicate_once(
            session,
            store,
            disks=args.disk,
            nbd=args.nbd_listen,
            rate_limit=int(args.rate_limit * (1 << 20)) if args.rate_limit else None,
            timeout_s=args.timeout,
            stall_s=args.stall,
        )
    finally:
        await session.close()


async def _schedule(args: argparse.Namespace, store: ReplicaStore) -> int:
    """Run every ``args.every`` s until interrupted (KeyboardInterrupt: exit 130)."""
    while True:
        began = time.monotonic()
        try:
            _print_run(args, await _run(args, store))
        except (ReplicationError, LivemigError) as exc:
            # One failed run does not end the schedule: the next run retries from the
            # same bitmap, and `status` shows the failure meanwhile.
            if args.json:
                print_json({"replica_dir": str(store.dir), "error": str(exc)})
            sys.stderr.write(f"livemig: replicate: run failed: {exc}\n")
        await asyncio.sleep(max(0.0, args.every - (time.monotonic() - began)))


def _print_run(args: argparse.Namespace, result: RunResult) -> None:
    if args.json:
        print_json(result.to_dict())
        return
    for disk in result.disks:
        print(
            f"{disk.name}: {disk.mode} copy, generation {disk.generation}, "
            f"{_mib(disk.bytes)} copied in {disk.seconds:.2f} s"
        )
    sys.stdout.flush()


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _render_status(status: dict[str, Any]) -> str:
    lines = [f"replica {status['replica_id']} in {status['replica_dir']}"]
    if not status["disks"]:
        lines.append("  no disk replicated yet")
    for d in status["disks"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["last_run"]))
        lines.append(
            f"  {d['name']}: generation {d['generation']}, last run {when} "
            f"({_age(d['age_s'])} ago, {d['last_mode']}, {_mib(d['last_bytes'])} in "
            f"{d['last_seconds']:.2f} s), {d['runs']} runs, {_mib(d['total_bytes'])} in all"
        )
    failure = status.get("last_failure")
    if failure:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure["time"]))
        lines.append(f"  last run failed at {when}: {failure['error']}")
    return "\n".join(lines)
