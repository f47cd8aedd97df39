"""``livemig plan``: predict a migration before anything moves.

Two ways to point it at a VM:

- ``--source-qmp PATH``: a running QEMU (``memory-backend-file,share=on`` RAM lets
  it sample pages too); ``--link-mbit`` gives the migration link's speed, else the
  policy's or QEMU's default bandwidth cap is assumed and said so;
  ``--with-local-disks`` counts its writable disks as local: their first copy and
  the guest's write rate to them (QEMU's block counters over the same window) are
  in the forecast, as in a ``--with-local-disks`` migration.
- ``--lab``: boots the test guest on lab host A with ``--workload`` (root), as
  ``livemig demo`` would, and measures it there; ``--bandwidth-mbit`` caps the
  lab's migration link and is the forecast's bandwidth.
- ``--libvirt SRC_URI DOMAIN --to DST_URI``: a libvirt domain, judged and measured
  through both hosts' libvirt daemons (:mod:`migrate.libvirt.plan`): the libvirt
  preflight (CPU against the target's hypervisor, disks shared or local, blocking
  devices, the target's free memory, versions) and, for a running domain, the
  dirty rate QEMU measures through libvirt; exit 3 when the move would be refused.

It prints the dirty rate (QEMU's ``calc-dirty-rate``, page-sampling), bandwidth,
RAM and what a sample of pages shows, then per setting (downtime limit,
compression, throttle, post-copy) the forecast total time, downtime and rounds,
whether the policy allows it, and the recommendation. ``--json`` prints exactly one
JSON object: the :class:`~migrate.report.Predicted` fields plus ``policy`` and
(with ``--lab``) ``environment``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrate import cli_args
from migrate.cli import EXIT_OK, EXIT_PREFLIGHT, print_json
from migrate.codec import to_dict
from migrate.disks.classify import block_disks
from migrate.errors import ConfigError
from migrate.plan import BandwidthHint, allowed, plan_migration
from migrate.policy import Policy
from migrate.presets import PRESET_NAMES, preset
from migrate.qmp import QmpSession
from migrate.ramfiles import ram_backing_file
from migrate.report import Predicted

if TYPE_CHECKING:
    from migrate.libvirt.plan import LibvirtPlan

MIB = 1 << 20


def register(sub: Any) -> None:
    plan = sub.add_parser(
        "plan",
        help="predict a migration: dirty rate, bandwidth, time and downtime per setting",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = plan.add_mutually_exclusive_group(required=True)
    where.add_argument("--source-qmp", type=cli_args.path, help="QMP socket of the running VM")
    where.add_argument("--lab", action="store_true", help="boot the test guest in the lab (root)")
    where.add_argument("--libvirt", nargs=2, metavar=("SRC_URI", "DOMAIN"), default=None,
                       help="libvirt domain DOMAIN on the daemon at SRC_URI (needs --to)")  # fmt: skip
    plan.add_argument("--to", metavar="DST_URI", default=None,
                      help="with --libvirt: the target host's libvirt daemon")  # fmt: skip
    plan.add_argument("--link-mbit", type=cli_args.MBIT, default=None,
                      help="migration link speed in Mbit/s (with --source-qmp)")  # fmt: skip
    plan.add_argument("--policy", choices=PRESET_NAMES, default="livemig")
    plan.add_argument("--max-downtime-ms", type=cli_args.DOWNTIME_MS, default=None)
    plan.add_argument("--workload", type=cli_args.workload, default=None,  # None: no lab import
                      help="with --lab: idle | openssl (default) | dirty:MIBPS | openssl+dirty:MIBPS")  # fmt: skip
    plan.add_argument("--memory-mib", type=cli_args.MEMORY_MIB, default=256)
    plan.add_argument("--dirty-mib", type=cli_args.MEMORY_MIB, default=64)
    plan.add_argument("--bandwidth-mbit", type=cli_args.MBIT, default=None,
                      help="with --lab: cap the lab's migration link (Mbit/s)")  # fmt: skip
    plan.add_argument("--with-local-disks", action="store_true",
                      help="with --source-qmp: count every writable disk as local (copied "
                           "first, its writes mirrored)")  # fmt: skip
    plan.add_argument("--calc-time-s", type=cli_args.int_in(1, 60), default=1,
                      metavar="S", help="dirty-rate measurement window (1-60 s)")  # fmt: skip
    plan.add_argument("--log-dir", type=cli_args.path, default=None)
    plan.add_argument("--json", action="store_true", help="print exactly one JSON object")
    plan.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    policy = preset(args.policy)
    if args.max_downtime_ms is not None:
        policy = dataclasses.replace(policy, max_downtime_ms=args.max_downtime_ms)
    environment: dict[str, Any] | None = None
    if (args.libvirt is None) != (args.to is None):
        raise ConfigError("--libvirt SRC_URI DOMAIN and --to DST_URI go together")
    if args.with_local_disks and args.source_qmp is None:
        raise ConfigError("--with-local-disks goes with --source-qmp")
    if args.libvirt is not None:
        return _plan_libvirt(args, policy)
    if args.lab:
        from lab.demo import DemoConfig, Workload, plan_on_lab  # the lab loads only here

        config = DemoConfig(
            workload=Workload.parse(args.workload or "openssl"),
            memory_mib=args.memory_mib,
            dirty_mib=args.dirty_mib,
            bandwidth_mbit=args.bandwidth_mbit,
            policy=policy,
            log_dir=args.log_dir,
        )
        predicted, lab_environment = asyncio.run(plan_on_lab(config, args.calc_time_s))
        environment = dataclasses.asdict(lab_environment)
    else:
        if not args.source_qmp.exists():
            raise ConfigError(f"no QMP socket at {args.source_qmp}")
        bandwidth = BandwidthHint.for_policy(policy, args.link_mbit)
        predicted = asyncio.run(
            _plan_qmp(args.source_qmp, policy, bandwidth, args.calc_time_s, args.with_local_disks)
        )
    if args.json:
        data: dict[str, Any] = to_dict(predicted)
        data["policy"] = policy.name
        if environment is not None:
            data["environment"] = environment
        print_json(data)
    else:
        print(render_plan(predicted, policy))
    return EXIT_OK


def _plan_libvirt(args: argparse.Namespace, policy: Policy) -> int:
    from migrate.libvirt.plan import plan_libvirt  # libvirt-python loads only here

    src_uri, domain = args.libvirt
    bandwidth = BandwidthHint.for_policy(policy, args.link_mbit)
    planned = plan_libvirt(src_uri, domain, args.to, policy, bandwidth, args.calc_time_s)
    if args.json:
        print_json(planned.to_dict() | {"policy": policy.name})
    else:
        print(render_libvirt_plan(planned, policy))
    return EXIT_PREFLIGHT if planned.refused else EXIT_OK


def render_libvirt_plan(planned: LibvirtPlan, policy: Policy) -> str:
    """A libvirt domain's plan as text: the preflight, then the forecast (if running)."""
    state = "running: live migration" if planned.active else "shut off: only its definition moves"
    lines = [
        f"domain {planned.domain} ({planned.memory_bytes / MIB:.0f} MiB, {state})",
        f"  {planned.source} -> {planned.target}",
        "  preflight:",
    ]
    for check in planned.preflight:
        lines.append(f"    {check.name:<14} {check.verdict.value:<8} {check.detail}")
    if planned.refused:
        lines.append(f"  refused: {', '.join(c.name for c in planned.refused)}")
    if planned.not_measured is not None:
        lines.append(f"  {planned.not_measured}")
    if planned.predicted is not None:
        lines.append(render_plan(planned.predicted, policy))
    return "\n".join(lines)


async def _plan_qmp(path: Path, policy: Policy, bandwidth: BandwidthHint,
                    calc_time_s: int, with_local_disks: bool = False) -> Predicted:  # fmt: skip
    session = await QmpSession.connect(path, "plan", 5.0)
    try:
        status = await session.status()
        if status not in ("running", "paused"):
            raise ConfigError(f"no VM runs behind {path} (its state is {status!r})")
        ram = await ram_backing_file(session)
        disks = (
            [d for d in await block_disks(session) if not d.readonly] if with_local_disks else []
        )
        return await plan_migration(session, policy, bandwidth, ram, calc_time_s, disks)
    finally:
        await session.close()


def _ms(value: float) -> str:
    return f"{value / 1e3:.1f} s" if value >= 10_000 else f"{value:.0f} ms"


def render_plan(predicted: Predicted, policy: Policy) -> str:
    """The forecast as text: measurements, one line per setting, recommendation."""
    p = predicted
    lines = [
        f"plan for policy {policy.name} (measured in {p.measure_time_ms:.0f} ms)",
        f"  RAM:         {p.ram_bytes / MIB:.0f} MiB"
        + (f", {p.nonzero_ram_bytes / MIB:.0f} MiB non-zero" if p.nonzero_ram_bytes else ""),
        f"  dirty rate:  {p.dirty_rate_bytes_per_s / MIB:.1f} MiB/s ({p.dirty_rate_method})"
        + (f", rewriting ~{p.working_set_bytes / MIB:.1f} MiB" if p.working_set_bytes else ""),
        f"  bandwidth:   {p.bandwidth_bytes_per_s / MIB:.1f} MiB/s ({p.bandwidth_source})",
    ]
    if p.disk_copy_bytes or p.disk_write_bytes_per_s:
        lines.append(
            f"  disks:       {p.disk_copy_bytes / MIB:.0f} MiB to copy first, guest writes "
            f"{p.disk_write_bytes_per_s / MIB:.1f} MiB/s to them (mirrored until the switchover)"
        )
    if p.compression_ratios:
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in sorted(p.compression_ratios.items()))
        speed = p.compression_speed_bytes_per_s
        lines.append(
            f"  compression: {ratios}"
            + (f" (zstd {speed / MIB:.0f} MiB/s on one core)" if speed else "")
        )
    lines.append(
        f"  {'setting':<44} {'ends':>5} {'rounds':>6} {'total':>8} {'downtime':>9}  policy"
    )
    for f in p.forecasts:
        lines.append(
            f"  {f.setting:<44} {'yes' if f.converges else 'no':>5} {f.rounds:>6} "
            f"{_ms(f.total_time_ms):>8} {_ms(f.downtime_ms):>9}  "
            f"{'allowed' if allowed(f, policy) else 'not allowed'}"
        )
    lines.append(f"  recommendation: {p.recommendation} — {p.recommendation_reason}")
    if p.policy_forecast is not None:
        f = p.policy_forecast
        lines.append(
            f"  policy {policy.name} would run as: {f.setting}, {_ms(f.total_time_ms)}, "
            f"downtime {_ms(f.downtime_ms)}{'' if f.converges else ' (does not converge)'}"
        )
    return "\n".join(lines)
