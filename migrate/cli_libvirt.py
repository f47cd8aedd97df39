"""``livemig migrate --libvirt`` and ``livemig demo --libvirt``: the libvirt strategy.

::

    livemig migrate --libvirt SRC_URI DOMAIN --to DST_URI [--peer-uri URI]
                    [--policy P] [--offline] [--no-verify] [--json | --events]
    livemig demo --libvirt [--workload W] [--json | --events]

``--to`` is the target daemon as this machine reaches it; ``--peer-uri`` how the
source daemon reaches it, when that differs (peer-to-peer migration: the source
daemon connects to the target's itself). The policy options, output shapes, exit
codes and Ctrl-C/SIGTERM behaviour are those of the QEMU commands
(:mod:`migrate.cli_migrate`); the report's ``strategy`` is ``libvirt``.

The options join the existing ``migrate`` and ``demo`` parsers (:func:`extend`),
whose QMP options are then required only without ``--libvirt``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from migrate.cli import EXIT_USAGE
from migrate.cli_migrate import ABORT_GRACE_S, _Output, _policy, demo_config, run_and_report
from migrate.libvirt import LibvirtEndpoint, LibvirtMigration, LibvirtRequest

#: The QMP options of ``livemig migrate`` that ``--libvirt`` replaces.
_QMP_OPTIONS = ("--source-qmp", "--target-qmp", "--target-uri")


def extend(sub: Any) -> None:
    """Add ``--libvirt`` to the ``migrate`` and ``demo`` parsers registered in ``sub``."""
    mig: argparse.ArgumentParser = sub.choices["migrate"]
    group = mig.add_argument_group("libvirt (instead of the QMP options)")
    group.add_argument("--libvirt", nargs=2, metavar=("SRC_URI", "DOMAIN"), default=None,
                       help="migrate libvirt domain DOMAIN from the daemon at SRC_URI")  # fmt: skip
    group.add_argument("--to", metavar="DST_URI", default=None,
                       help="the target libvirt daemon (e.g. qemu+tcp://host-b/system)")  # fmt: skip
    group.add_argument("--peer-uri", default=None,
                       help="how the source daemon reaches the target, if not as --to")  # fmt: skip
    # argparse has no "required unless"; the QMP options are checked in the handler.
    qmp = [a for a in mig._actions if set(a.option_strings) & set(_QMP_OPTIONS)]
    for action in qmp:
        action.required = False
    qemu_migrate = mig.get_default("func")

    def migrate_handler(args: argparse.Namespace) -> int:
        if args.libvirt is None:
            missing = [a.option_strings[0] for a in qmp if getattr(args, a.dest) is None]
            if missing or args.to is not None:
                mig.error(
                    f"the following arguments are required: {', '.join(missing)}"
                    if missing
                    else "--to goes with --libvirt"
                )
            result: int = qemu_migrate(args)
            return result
        return _migrate(args, mig)

    mig.set_defaults(func=migrate_handler)

    demo: argparse.ArgumentParser = sub.choices["demo"]
    demo.add_argument("--libvirt", action="store_true",
                      help="run the demo through libvirt: a libvirtd per lab host, the guest "
                           "as a domain, the libvirt strategy")  # fmt: skip
    qemu_demo = demo.get_default("func")

    def demo_handler(args: argparse.Namespace) -> int:
        if not args.libvirt:
            result: int = qemu_demo(args)
            return result
        return _demo(args)

    demo.set_defaults(func=demo_handler)


def _migrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    given = [a for a in _QMP_OPTIONS if getattr(args, a[2:].replace("-", "_")) is not None]
    if given:
        parser.error(f"--libvirt replaces {', '.join(given)}")
    if args.to is None:
        parser.error("--libvirt needs --to DST_URI")
    if args.strategy != "native":
        parser.error("--libvirt is its own strategy (leave out --strategy)")
    src_uri, domain = args.libvirt
    request = LibvirtRequest(
        source=LibvirtEndpoint("source", src_uri),
        target=LibvirtEndpoint("target", args.to, args.peer_uri),
        domain=domain,
        policy=_policy(args),
        offline=args.offline,
        verify=not args.no_verify,
        repair=not args.no_repair,
        force=args.force,
    )
    out = _Output(args, "migrate")
    return run_and_report(
        out, LibvirtMigration(request, events=out.bus, abort_grace_s=ABORT_GRACE_S)
    )


def _demo(args: argparse.Namespace) -> int:
    from lab.libvirt_demo import run_libvirt_demo

    if args.strategy != "native":
        sys.stderr.write("livemig: error: --libvirt is its own strategy (leave out --strategy)\n")
        return EXIT_USAGE
    config = demo_config(args, "libvirt", predict=False)
    if not (args.json or args.events):
        print(f"livemig demo --libvirt: {config.workload.text} guest, {config.memory_mib} MiB, "
              f"policy {config.policy.name}; starting two libvirt daemons...", file=sys.stderr)  # fmt: skip
    out = _Output(args, "demo")
    try:
        result = out.run(run_libvirt_demo(config, out.bus))
    except KeyboardInterrupt:
        return out.interrupted()
    return out.emit(result.report, {"environment": result.to_dict()["environment"]})
