"""``livemig demo`` and ``livemig migrate``.

Output: a text report on stdout (default); ``--json`` exactly one JSON object on
stdout; ``--events`` one JSON object per event on stdout as it happens (planned,
phase, progress, decision, notice), the last line ``{"event": "finished",
"report": ...}`` — the two are mutually exclusive, so stdout is always one
machine-readable shape. On a terminal a progress bar is drawn on stderr (not with
``--events``; ``--no-progress`` turns it off). Ctrl-C cancels the migration: the VM
stays on (or goes back to) the source, the report (status ``aborted``) is printed
in the chosen format and the exit code is 130.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from typing import Any

from migrate import cli_args
from migrate.api import Migration, MigrationHandle
from migrate.cli import EXIT_INTERRUPTED, EXIT_MIGRATION, EXIT_OK, print_json
from migrate.engine import STRATEGIES
from migrate.errors import ConfigError, MigrationError
from migrate.events import EventBus, Finished, MigrationEvent
from migrate.files import check_output_dir
from migrate.journal import DEFAULT_STATE_DIR, STATE_DIR_ENV, JournalStore, state_dir_for_cli
from migrate.policy import Policy
from migrate.preflight import HostFacts
from migrate.presets import PRESET_NAMES, preset
from migrate.progress import JsonLines, ProgressBar
from migrate.render import render_report
from migrate.report import MigrationReport
from migrate.request import HostEndpoint, MigrationRequest, parse_migration_uri


def _policy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="native")
    parser.add_argument("--policy", choices=PRESET_NAMES, default="livemig",
                        help="named policy: livemig (measures and decides) or a peer's defaults")  # fmt: skip
    parser.add_argument("--max-total-time-s", type=cli_args.positive_float(1e9), default=None,
                        help="abort (or switch to post-copy, if allowed) past this time")  # fmt: skip
    parser.add_argument("--max-throttle-pct", type=cli_args.int_in(0, 99), default=None,
                        help="most guest CPU auto-converge may take (0-99)")  # fmt: skip
    parser.add_argument("--allow-postcopy", action="store_true",
                        help="let the controller switch to post-copy (no rollback, no RAM check before resume)")  # fmt: skip
    parser.add_argument(
        "--offline", action="store_true", help="stop the VM, move it, start it on the target"
    )
    parser.add_argument("--max-downtime-ms", type=cli_args.DOWNTIME_MS, default=None,
                        help="hard ceiling on QEMU's downtime-limit (ms)")  # fmt: skip
    parser.add_argument("--downtime-limit-ms", type=cli_args.DOWNTIME_MS, default=None,
                        help="downtime-limit to start with (ms)")  # fmt: skip
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the source/target RAM comparison before resuming the target")  # fmt: skip
    parser.add_argument("--no-repair", action="store_true",
                        help="abort (VM stays on the source) instead of repairing stale target pages")  # fmt: skip
    parser.add_argument("--force", action="store_true",
                        help="migrate despite CPU or target-memory refusals from preflight")  # fmt: skip
    parser.add_argument("--with-local-disks", action="store_true",
                        help="copy local writable disks to the target over NBD (else refused)")  # fmt: skip
    parser.add_argument("--disk-copy-mode", choices=("write-blocking", "background"),
                        default="write-blocking",
                        help="blockdev-mirror copy mode for --with-local-disks")  # fmt: skip
    parser.add_argument("--no-predict", action="store_true",
                        help="skip the measurement and forecast before the start (~1 s)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on the terminal")  # fmt: skip
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print exactly one JSON object")
    shape.add_argument("--events", action="store_true",
                       help="print one JSON object per event (JSON lines), the report last")  # fmt: skip


def _policy(args: argparse.Namespace) -> Policy:
    """The named preset with the operator's overrides applied."""
    policy = preset(args.policy)
    changes: dict[str, Any] = {}
    if args.max_downtime_ms is not None:
        changes["max_downtime_ms"] = args.max_downtime_ms
    if args.downtime_limit_ms is not None:
        changes["downtime_limit_ms"] = args.downtime_limit_ms
    if args.max_total_time_s is not None:
        changes["max_total_time_s"] = args.max_total_time_s
    if args.max_throttle_pct is not None:
        changes["max_throttle_pct"] = args.max_throttle_pct
    if args.allow_postcopy:
        changes["postcopy_allowed"] = True
    return dataclasses.replace(policy, **changes) if changes else policy


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="live-migrate the test guest between two lab hosts (root)")
    demo.add_argument("--workload", type=cli_args.workload, default="openssl",
                      help="idle, or openssl, dirty:MIBPS, disk:MIBPS joined by + "
                           "(e.g. openssl+disk:4)")  # fmt: skip
    demo.add_argument("--disk-mib", type=cli_args.MEMORY_MIB, default=64,
                      help="size of the guest's disk (a disk workload or --with-local-disks)")  # fmt: skip
    demo.add_argument("--memory-mib", type=cli_args.MEMORY_MIB, default=256)
    demo.add_argument("--dirty-mib", type=cli_args.MEMORY_MIB, default=64,
                      help="working set of the dirty workload (MiB)")  # fmt: skip
    demo.add_argument("--bandwidth-mbit", type=cli_args.MBIT, default=None,
                      help="cap the migration link with tc tbf (Mbit/s)")  # fmt: skip
    demo.add_argument(
        "--log-dir", type=cli_args.path, default=None, help="keep QEMU and serial logs here"
    )
    demo.add_argument("--cpu", type=cli_args.plain_text, default=None,
                      help="guest -cpu string (default: chosen with the accelerator)")  # fmt: skip
    _policy_args(demo)
    demo.set_defaults(func=_demo)

    mig = sub.add_parser("migrate", help="migrate a VM between two QEMUs you started")
    mig.add_argument(
        "--source-qmp", type=cli_args.path, required=True, help="QMP socket of the running VM"
    )
    mig.add_argument("--target-qmp", type=cli_args.path, required=True,
                     help="QMP socket of the target QEMU (started with -incoming defer)")  # fmt: skip
    mig.add_argument(
        "--target-uri", type=str, required=True, help="tcp:HOST:PORT the target listens on"
    )
    mig.add_argument("--source-cpu", type=cli_args.path, default=None,
                     help="source host CPU description (cpuinfo, lscpu, CPUID dump, libvirt XML)")  # fmt: skip
    mig.add_argument(
        "--target-cpu", type=cli_args.path, default=None, help="target host CPU description"
    )
    mig.add_argument("--cpu-model", type=cli_args.plain_text, default=None,
                     help="the VM's full -cpu string, if it has +flag/-flag edits QMP cannot show")  # fmt: skip
    mig.add_argument("--link-mbit", type=cli_args.MBIT, default=None,
                     help="migration link speed (Mbit/s) for the forecast; else assumed")  # fmt: skip
    mig.add_argument("--keep-source", action="store_true",
                     help="leave the source QEMU (paused) instead of quitting it after success")  # fmt: skip
    mig.add_argument("--state-dir", type=cli_args.path, default=None,
                     help=f"where the migration's journal goes, for `livemig recover` (default "
                          f"${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})")  # fmt: skip
    _policy_args(mig)
    mig.set_defaults(func=_migrate)


class _Output:
    """Where a run's events and report go, and what Ctrl-C prints."""

    def __init__(self, args: argparse.Namespace, title: str) -> None:
        self.args = args
        self.bus = EventBus()
        self.report: MigrationReport | None = None
        self.lines = JsonLines(sys.stdout, final_by_caller=True) if args.events else None
        self.bar = (
            ProgressBar(sys.stderr, title)
            if not args.events and not args.no_progress and sys.stderr.isatty()
            else None
        )
        self.bus.add_callback(self._capture)
        if self.lines is not None:
            self.bus.add_callback(self.lines.handle)
        if self.bar is not None:
            self.bus.add_callback(self.bar.handle)

    def _capture(self, event: MigrationEvent) -> None:
        if isinstance(event, Finished):
            self.report = event.report

    def run(self, main: Any) -> Any:
        """``asyncio.run(main)`` with the bar drawn meanwhile."""
        if self.bar is None:
            return asyncio.run(main)
        with self.bar:
            return asyncio.run(main)

    def emit(self, report: MigrationReport, extra: dict[str, Any] | None = None) -> int:
        data = report.to_dict()
        data.update(extra or {})
        if self.lines is not None:
            self.lines.finish(data)
        elif self.args.json:
            print_json(data)
        else:
            print(render_report(report, (extra or {}).get("environment")))
        return EXIT_OK if report.status == "completed" else EXIT_MIGRATION

    def interrupted(self) -> int:
        """After Ctrl-C: the report of the cancelled migration, if it had started."""
        if self.report is not None:
            self.emit(self.report)
            where = {
                "completed": "the VM runs on the target",
                "unknown": "neither copy resumed: see the report's error",
            }.get(str(self.report.status), "the VM stays on the source")
            sys.stderr.write(f"livemig: interrupted: migration {self.report.status}; {where}\n")
        else:
            sys.stderr.write("livemig: interrupted before the migration started\n")
        return EXIT_INTERRUPTED


def demo_config(args: argparse.Namespace, strategy: str, predict: bool) -> Any:
    """The lab's DemoConfig from ``livemig demo``'s arguments (imports the lab)."""
    from lab.demo import DemoConfig, Workload

    return DemoConfig(
        strategy=strategy,
        workload=Workload.parse(args.workload),
        memory_mib=args.memory_mib,
        dirty_mib=args.dirty_mib,
        bandwidth_mbit=args.bandwidth_mbit,
        offline=args.offline,
        verify=not args.no_verify,
        repair=not args.no_repair,
        policy=_policy(args),
        log_dir=args.log_dir,
        cpu_model=args.cpu,
        force=args.force,
        predict=predict,
        with_local_disks=getattr(args, "with_local_disks", False),
        disk_mib=getattr(args, "disk_mib", 64),
        disk_copy_mode=getattr(args, "disk_copy_mode", "write-blocking"),
    )


def _demo(args: argparse.Namespace) -> int:
    from lab.demo import run_demo

    config = demo_config(args, args.strategy, predict=not args.no_predict)
    if config.log_dir is not None:  # before the line below: an error stays one line
        check_output_dir(config.log_dir, "log directory")
    if not (args.json or args.events):
        print(f"livemig demo: {config.workload.text} guest, {config.memory_mib} MiB, "
              f"{config.strategy} strategy, policy {config.policy.name}; building what is "
              "missing...", file=sys.stderr)  # fmt: skip
    out = _Output(args, "demo")
    try:
        result = out.run(run_demo(config, out.bus))
    except KeyboardInterrupt:
        return out.interrupted()
    return out.emit(result.report, {"environment": result.to_dict()["environment"]})


def _migrate(args: argparse.Namespace) -> int:
    # What needs no QEMU first: the URI, the policy, the CPU files; then the sockets.
    uri = parse_migration_uri(args.target_uri)
    policy = _policy(args)
    source_host = HostFacts.from_file(args.source_cpu) if args.source_cpu else HostFacts()
    target_host = HostFacts.from_file(args.target_cpu) if args.target_cpu else HostFacts()
    for path in (args.source_qmp, args.target_qmp):
        if not path.exists():
            raise ConfigError(f"no QMP socket at {path}")
    state_dir = state_dir_for_cli(args.state_dir)
    request = MigrationRequest(
        source=HostEndpoint("source", args.source_qmp),
        target=HostEndpoint("target", args.target_qmp, uri),
        strategy=args.strategy,
        policy=policy,
        offline=args.offline,
        verify=not args.no_verify,
        repair=not args.no_repair,
        quit_source=not args.keep_source,
        force=args.force,
        cpu_model=args.cpu_model,
        source_host=source_host,
        target_host=target_host,
        predict=not args.no_predict,
        link_mbit=args.link_mbit,
        state_dir=state_dir,
        with_local_disks=args.with_local_disks,
        disk_copy_mode=args.disk_copy_mode,
    )
    # Refuse a VM left unfinished by a crash before connecting (the engine checks again).
    JournalStore(state_dir).check_vm_free(request)
    out = _Output(args, "migrate")
    return run_and_report(out, Migration(request, events=out.bus, abort_grace_s=ABORT_GRACE_S))


def run_and_report(out: _Output, migration: MigrationHandle) -> int:
    """Run ``migration`` with the output's bar/lines; print the report; the exit code.

    SIGTERM/SIGHUP abort it (exit 128 + the signal), Ctrl-C too (exit 130).
    """
    signalled: list[int] = []
    try:
        report = out.run(_follow(migration, signalled))
    except KeyboardInterrupt:
        return out.interrupted()
    code = out.emit(report)
    if signalled:
        name = signal.Signals(signalled[0]).name
        sys.stderr.write(f"livemig: {name}: migration {report.status}\n")
        return 128 + signalled[0]
    if report.status != "completed":
        raise MigrationError(f"migration {report.status}: {report.error or 'no reason given'}")
    return code


#: How long an abort (Ctrl-C, SIGTERM, SIGHUP) may wait for the strategy's next
#: sample before the migration task is cancelled (both roll back the same way).
ABORT_GRACE_S = 2.0


async def _follow(migration: MigrationHandle, signalled: list[int]) -> MigrationReport:
    """Run ``migration`` to its end; SIGTERM/SIGHUP and Ctrl-C abort it."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        migration.abort(f"{signal.Signals(signum).name} received")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await migration.run()  # Ctrl-C: asyncio.run cancels this task: abort
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
