"""``livemig cpu ...``: CPU descriptions, compatibility checks, cluster baselines.

    livemig cpu show [--qmp SOCKET | --libvirt URI | FILE]
    livemig cpu check --model MODEL --source FILE --target FILE
    livemig cpu baseline [FILE...] [--libvirt URI...]
    livemig cpu models

``--libvirt URI`` asks that host's libvirt daemon: its capabilities' host CPU, or
with ``--virt-type TYPE`` (kvm, qemu) what that hypervisor gives a guest (the
domain capabilities' host-model). FILE is /proc/cpuinfo text, lscpu output, a raw CPUID dump, libvirt ``<cpu>`` XML or
QMP/livemig JSON; its kind is detected from its content. ``cpu check`` exits 0 when
the move is compatible and 3 (refused) when it is not.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cpumodel import flags as F
from cpumodel.baseline import compute_baseline
from cpumodel.compat import check_migration
from cpumodel.errors import CpuMapError, QemuProbeError
from cpumodel.host import HostCpu, kvm_supported
from cpumodel.libvirt import (
    DEFAULT_CPU_MAP_DIR,
    CpuMap,
    ModelResolver,
    catalog_from_cpu_map,
    load_cpu_map,
)
from cpumodel.models import (
    ModelCatalog,
    fitting_models,
    highest_psabi_level,
    next_psabi_level,
)
from cpumodel.qemu import DEFAULT_QEMU, QmpHostView, host_view_from_qmp, load_catalog
from cpumodel.sources import load_catalog_file, load_host, load_hosts, model_resolver
from migrate import cli_args
from migrate.cli import EXIT_OK, EXIT_PREFLIGHT, EXIT_USAGE, print_json

_SHOWN_MODELS = 5


class _Context:
    """Model tables for one command, loaded on first use."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._catalog: ModelCatalog | None = None
        self._cpu_map: CpuMap | None = None
        self._cpu_map_loaded = False

    def catalog(self) -> ModelCatalog:
        """The QEMU models: a saved catalogue (--models) or the QEMU binary's (cached)."""
        if self._catalog is None:
            if self._args.models is not None:
                self._catalog = load_catalog_file(self._args.models)
            else:
                self._catalog = self._qemu_or_cpu_map()
        return self._catalog

    def _qemu_or_cpu_map(self) -> ModelCatalog:
        try:
            return load_catalog(self._args.qemu)
        except QemuProbeError as exc:
            cpu_map = self.cpu_map()
            if cpu_map is None:
                raise
            sys.stderr.write(f"livemig: note: {exc}; using libvirt's cpu_map models instead\n")
            return catalog_from_cpu_map(cpu_map)

    def cpu_map(self) -> CpuMap | None:
        """libvirt's cpu_map; None when the default one is not installed."""
        if not self._cpu_map_loaded:
            try:
                self._cpu_map = load_cpu_map(self._args.cpu_map)
            except CpuMapError:
                if self._args.cpu_map != DEFAULT_CPU_MAP_DIR:
                    raise
            self._cpu_map_loaded = True
        return self._cpu_map

    def resolver(self) -> ModelResolver:
        """Resolves libvirt model names (cpu_map first, QEMU's models second)."""
        return model_resolver(self.cpu_map(), self.catalog)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--qemu", default=DEFAULT_QEMU, help="QEMU binary whose models to use")
    parser.add_argument(
        "--models", type=cli_args.path, default=None, metavar="FILE",
        help="a saved model catalogue (livemig cpu models --json) instead of asking QEMU",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-map", type=cli_args.path, default=DEFAULT_CPU_MAP_DIR, metavar="DIR",
        help="libvirt cpu_map directory, for reading libvirt <cpu> XML",
    )  # fmt: skip


def _virt_type(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--virt-type", choices=("kvm", "qemu"), default=None,
        help="with --libvirt: the CPU this hypervisor gives a guest, not the host's own",
    )  # fmt: skip


def _libvirt_hosts(uris: list[str], args: argparse.Namespace, ctx: _Context) -> list[HostCpu]:
    from migrate.libvirt.hostcpu import host_cpus  # libvirt-python loads only here

    return host_cpus(uris, ctx.resolver(), args.virt_type)


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "cpu", help="CPU model checks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip

    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return EXIT_USAGE

    parser.set_defaults(func=usage)
    cmds = parser.add_subparsers(dest="cpu_command", parser_class=type(parser))

    show = cmds.add_parser("show", help="describe a host CPU")
    source = show.add_mutually_exclusive_group(required=True)
    source.add_argument("--qmp", type=cli_args.path, metavar="SOCKET",
                        help="QMP socket of a running QEMU")  # fmt: skip
    source.add_argument("--libvirt", metavar="URI", default=None,
                        help="the host whose libvirt daemon is at URI")  # fmt: skip
    source.add_argument("file", nargs="?", type=cli_args.path, help="CPU description file")
    _common(show)
    _virt_type(show)
    show.set_defaults(func=_show)

    check = cmds.add_parser("check", help="can a VM with this CPU move from source to target?")
    check.add_argument("--model", type=cli_args.plain_text, required=True,
                       help="the VM's -cpu string, e.g. host, kvm64")  # fmt: skip
    check.add_argument("--source", type=cli_args.path, required=True,
                       help="source host CPU description")  # fmt: skip
    check.add_argument("--target", type=cli_args.path, required=True,
                       help="target host CPU description")  # fmt: skip
    _common(check)
    check.set_defaults(func=_check)

    baseline = cmds.add_parser("baseline", help="the best CPU every host can run")
    baseline.add_argument("files", nargs="*", type=cli_args.path,
                          help="one CPU description per host")  # fmt: skip
    baseline.add_argument("--libvirt", nargs="+", metavar="URI", default=[],
                          help="hosts whose libvirt daemons are at these URIs")  # fmt: skip
    _common(baseline)
    _virt_type(baseline)
    baseline.set_defaults(func=_baseline)

    models = cmds.add_parser("models", help="the QEMU CPU models this tool knows")
    _common(models)
    models.set_defaults(func=_models)


def _print(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _level_summary(host: HostCpu) -> dict[str, Any]:
    native = host.flags - F.HOST_ONLY
    level = highest_psabi_level(native)
    above = next_psabi_level(level)
    return {
        "level": level.name if level else None,
        "lacks_for_next_level": sorted(above.flags - native) if above else [],
    }


def _usable_models(host: HostCpu, ctx: _Context) -> list[str] | None:
    try:
        catalog = ctx.catalog()
    except QemuProbeError as exc:
        sys.stderr.write(f"livemig: note: no QEMU model list ({exc})\n")
        return None
    return [m.name for m in fitting_models(kvm_supported(host), catalog, host.vendor)]


def _show_host(host: HostCpu, usable: list[str] | None, qmp: QmpHostView | None) -> None:
    summary = _level_summary(host)
    _print(f"{host.name}  ({host.source.value})")
    _print(f"  vendor      {host.vendor_label} ({host.vendor or 'unknown'}), {host.signature}")
    if host.model_name:
        _print(f"  model name  {host.model_name}")
    tsc = f"{host.tsc_khz / 1000:.3f} MHz" if host.tsc_khz else "unknown"
    _print(f"  TSC         {tsc}")
    lacks = ", ".join(summary["lacks_for_next_level"]) or "-"
    _print(f"  psABI level {summary['level'] or 'below x86-64-v1'} (lacks for next: {lacks})")
    _print(f"  flags ({len(host.flags)}): {' '.join(sorted(host.flags))}")
    if host.unknown:
        _print(f"  not shown by this source: {' '.join(sorted(host.unknown))}")
    if host.unrecognized:
        _print(f"  not QEMU flags: {' '.join(host.unrecognized)}")
    if qmp is not None:
        runnable = [d.name for d in qmp.definitions if not d.unavailable_features]
        _print(f"  models QEMU ({qmp.accelerator}) can run: {len(runnable)}")
    if usable is not None:
        shown = ", ".join(usable[:_SHOWN_MODELS]) or "none"
        _print(f"  best named models for this host: {shown}")


def _show(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    qmp: QmpHostView | None = None
    if args.qmp:
        qmp = host_view_from_qmp(str(args.qmp))
        hosts = [qmp.host]
    elif args.libvirt:
        hosts = _libvirt_hosts([args.libvirt], args, ctx)
    else:
        hosts = load_hosts(args.file, ctx.resolver())
    entries = []
    for host in hosts:
        usable = _usable_models(host, ctx)
        entry = host.to_dict() | _level_summary(host) | {"usable_models": usable}
        if qmp is not None:
            entry["runnable_models"] = [
                d.name for d in qmp.definitions if not d.unavailable_features
            ]
        entries.append(entry)
        if not args.json:
            _show_host(host, usable, qmp)
    if args.json:
        print_json(entries[0] if len(entries) == 1 else {"hosts": entries})
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    source = load_host(args.source, ctx.resolver())
    target = load_host(args.target, ctx.resolver())
    result = check_migration(args.model, source, target, ctx.catalog())
    if args.json:
        print_json(
            {
                "compatible": result.compatible,
                "missing": list(result.missing),
                "warnings": list(result.blockers) + list(result.warnings),
            }
        )
    else:
        verdict = "compatible" if result.compatible else "INCOMPATIBLE"
        _print(f"{args.model}: {source.name} -> {target.name}: {verdict}")
        if result.missing:
            _print(f"  missing on target: {', '.join(result.missing)}")
        for blocker in result.blockers:
            _print(f"  blocker: {blocker}")
        for warning in result.warnings:
            _print(f"  warning: {warning}")
        if result.suggestion:
            _print(f"  would work: -cpu {result.suggestion}")
    return EXIT_OK if result.compatible else EXIT_PREFLIGHT


def _baseline(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    if not args.files and not args.libvirt:
        sys.stderr.write("livemig: error: name CPU description files or --libvirt URIs\n")
        return EXIT_USAGE
    hosts: list[HostCpu] = []
    for name in args.files:
        hosts += load_hosts(name, ctx.resolver())
    if args.libvirt:
        hosts += _libvirt_hosts(args.libvirt, args, ctx)
    baseline = compute_baseline(hosts, ctx.catalog())
    if args.json:
        print_json(baseline.to_dict())
        return EXIT_OK
    _print(f"-cpu {baseline.cpu}")
    _print(f"  level     {baseline.level or 'below x86-64-v1'}")
    _print(f"  base      {baseline.base_model}")
    _print(f"  features  ({len(baseline.features)}) {' '.join(baseline.features)}")
    for gap in baseline.hosts:
        lacks = ", ".join(gap.lacks_for_next_level) or "nothing"
        _print(f"  {gap.name} ({gap.to_dict()['vendor']}) lacks for the next level: {lacks}")
    for note in baseline.notes:
        _print(f"  note: {note}")
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    catalog = _Context(args).catalog()
    if args.json:
        print_json(catalog.to_dict())
        return EXIT_OK
    _print(f"QEMU {catalog.qemu_version} ({catalog.binary or 'saved catalogue'})")
    for model in catalog.models.values():
        alias = f" -> {model.alias_of}" if model.alias_of else ""
        _print(f"  {model.name}{alias}  {model.vendor}  {len(model.flags)} flags")
    return EXIT_OK
