"""``livemig vm create|start|stop|list|show|adopt`` and ``livemig migrate VM --to NODE``.

Both go through the cluster's agents over mutual TLS with this node's certificate
(``--state-dir``, default ``$LIVEMIG_STATE_DIR`` or ``/var/lib/livemig``): ``vm``
commands to this node's agent; ``migrate VM --to NODE`` to the agent of the node
that owns VM, which runs the migration while this command follows its events
(Ctrl-C asks that agent to abort: the VM stays on its node).

The cluster form joins the existing ``migrate`` parser (:func:`extend`): a VM name
instead of the QMP options.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from migrate import cli_args
from migrate.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_MIGRATION, EXIT_OK, print_json
from migrate.errors import MigrationError


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=cli_args.path, default=None,
                        help="this node's cluster state directory (default $LIVEMIG_STATE_DIR "
                             "or /var/lib/livemig)")  # fmt: skip


def _state(args: argparse.Namespace) -> Any:
    from migrate.cluster.state import StateDir
    from migrate.journal import state_dir_for_cli

    state = StateDir(state_dir_for_cli(args.state_dir))
    state.require_member()
    return state


def register(sub: Any) -> None:
    vm = sub.add_parser("vm", help="VMs owned by this node's agent (define, start, stop, adopt)")
    vsub = vm.add_subparsers(dest="vm_command", required=True, parser_class=type(vm))
    create = vsub.add_parser("create", help="define a VM from a JSON definition and start it")
    _state_dir(create)
    create.add_argument("definition", type=cli_args.path, help="the VM definition (JSON file)")
    create.add_argument("--no-start", action="store_true", help="define it only")
    create.set_defaults(func=_create)
    for name, helptext in (("start", "start a defined VM"), ("stop", "stop a VM (it stays defined)"),
                           ("show", "a VM's definition and state (JSON)")):  # fmt: skip
        cmd = vsub.add_parser(name, help=helptext)
        _state_dir(cmd)
        cmd.add_argument("name", type=cli_args.plain_text)
        cmd.set_defaults(func=_simple, vm_action=name)
    lst = vsub.add_parser("list", help="this node's VMs")
    _state_dir(lst)
    lst.add_argument("--json", action="store_true", help="print exactly one JSON object")
    lst.set_defaults(func=_list)
    adopt = vsub.add_parser("adopt", help="adopt a QEMU started elsewhere (its QMP socket)")
    _state_dir(adopt)
    adopt.add_argument("qmp_socket", type=cli_args.path)
    adopt.add_argument("--name", type=cli_args.plain_text, default=None,
                       help="the VM's name (default: QEMU's -name)")  # fmt: skip
    adopt.set_defaults(func=_adopt)


def extend(sub: Any) -> None:
    """``livemig migrate VM --to NODE``: a VM name instead of the QMP/libvirt options."""
    mig: argparse.ArgumentParser = sub.choices["migrate"]
    mig.add_argument("vm", nargs="?", default=None,
                     help="a cluster VM to migrate (with --to NODE): its owner's agent runs it")  # fmt: skip
    mig.add_argument("--no-tls", action="store_true",
                     help="cluster migration: plain TCP data path (QMP and the agents stay on mutual TLS)")  # fmt: skip
    other = mig.get_default("func")

    def handler(args: argparse.Namespace) -> int:
        if args.vm is None:
            if args.no_tls:
                mig.error("--no-tls goes with a cluster migration (livemig migrate VM --to NODE)")
            result: int = other(args)
            return result
        given = [
            opt
            for opt, dest in (("--source-qmp", "source_qmp"), ("--target-qmp", "target_qmp"),
                              ("--target-uri", "target_uri"), ("--libvirt", "libvirt"))
            if getattr(args, dest, None) is not None
        ]  # fmt: skip
        if given:
            mig.error(f"a cluster VM ({args.vm}) is migrated without {', '.join(given)}")
        if args.to is None:
            mig.error(f"migrating VM {args.vm} needs --to NODE")
        return _migrate(args)

    mig.set_defaults(func=handler)

    demo: argparse.ArgumentParser = sub.choices["demo"]
    demo.add_argument("--cluster", action="store_true",
                      help="make the lab's two hosts a cluster (an agent each), create the guest "
                           "on host A through its agent and migrate it by name to host B")  # fmt: skip
    demo.add_argument("--no-tls", action="store_true",
                      help="with --cluster: plain TCP data path (to measure what TLS costs)")  # fmt: skip
    other_demo = demo.get_default("func")

    def demo_handler(args: argparse.Namespace) -> int:
        if not args.cluster:
            if args.no_tls:
                demo.error("--no-tls goes with --cluster")
            result: int = other_demo(args)
            return result
        if getattr(args, "libvirt", False):
            demo.error("--cluster and --libvirt do not go together")
        if args.events:
            demo.error("--cluster prints the report (text or --json), not --events")
        return _demo_cluster(args)

    demo.set_defaults(func=demo_handler)


def _create(args: argparse.Namespace) -> int:
    from migrate.agent.vmclient import call_local
    from migrate.agent.vms import check_definition
    from migrate.vmdef import VmDefinition

    # refused here in one line before any call
    definition = VmDefinition.load(Path(args.definition))
    check_definition(definition)
    state = _state(args)
    body = {"definition": definition.to_dict(), "start": not args.no_start}
    info = asyncio.run(call_local(state, "POST", "/v1/vms", body))
    sys.stdout.write(f"VM {definition.name} defined on node {info['node']}: {info['state']}\n")
    return EXIT_OK


def _simple(args: argparse.Namespace) -> int:
    from migrate.agent.vmclient import call_local

    state = _state(args)
    if args.vm_action == "show":
        print_json(asyncio.run(call_local(state, "GET", f"/v1/vms/{args.name}")))
        return EXIT_OK
    info = asyncio.run(call_local(state, "POST", f"/v1/vms/{args.name}/{args.vm_action}", {}))
    sys.stdout.write(f"VM {args.name} on node {info['node']}: {info['state']}\n")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from migrate.agent.vmclient import call_local

    data = asyncio.run(call_local(_state(args), "GET", "/v1/vms"))
    if args.json:
        print_json(data)
        return EXIT_OK
    rows = [("NAME", "STATE", "PID", "MEMORY", "QEMU")]
    for vm in data["vms"]:
        rows.append((
            vm["name"] + (" (adopted)" if vm.get("adopted") else ""),
            vm["state"],
            str(vm["pid"] or "-"),
            f"{vm['definition']['memory_mib']} MiB",
            vm.get("qemu_status") or "-",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )
    return EXIT_OK


def _adopt(args: argparse.Namespace) -> int:
    from migrate.agent.vmclient import call_local

    body = {"qmp_socket": str(Path(args.qmp_socket).absolute()), "name": args.name}
    info = asyncio.run(call_local(_state(args), "POST", "/v1/vms/adopt", body))
    sys.stdout.write(f"VM {info['name']} adopted by node {info['node']} (pid {info['pid']})\n")
    return EXIT_OK


# -- livemig migrate VM --to NODE ------------------------------------------------------------


def migrate_options(args: argparse.Namespace) -> dict[str, Any]:
    from migrate.cli_migrate import _policy
    from migrate.codec import to_dict

    return {
        "to": args.to,
        "strategy": args.strategy,
        "policy": to_dict(_policy(args)),
        "tls": not args.no_tls,
        "verify": not args.no_verify,
        "repair": not args.no_repair,
        "force": args.force,
        "predict": not args.no_predict,
        "offline": args.offline,
    }


async def run_cluster_migration(
    state: Any, vm: str, options: dict[str, Any], on_record: Any, interrupted: list[bool]
) -> dict[str, Any]:
    """Ask VM's owner to migrate it, follow its events; the last record.

    SIGINT (Ctrl-C) asks the owner's agent to abort, then keeps following to the end.
    """
    from migrate.agent.client import AgentClient
    from migrate.agent.vmclient import abort, find_owner, follow

    async with AgentClient(state, timeout_s=30.0) as client:
        owner, _info = await find_owner(client, state, vm)
        started = await client.post_json(owner.address, f"/v1/vms/{vm}/migrate", options)
    migration_id = str(started["migration_id"])
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def on_sigint() -> None:
        interrupted.append(True)
        sys.stderr.write("livemig: interrupted: asking the agent to abort the migration\n")
        task = loop.create_task(abort(state, owner.address, migration_id, "interrupted (Ctrl-C)"))
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await follow(state, owner.address, migration_id, on_record)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if pending:
            await asyncio.wait(pending, timeout=10.0)


def _migrate(args: argparse.Namespace) -> int:
    from migrate.render import render_report
    from migrate.report import MigrationReport

    state = _state(args)
    options = migrate_options(args)

    def on_record(record: dict[str, Any]) -> None:
        if args.events:
            print_json(record)
        elif not args.json and record.get("event") == "agent":
            sys.stderr.write(f"livemig: {record.get('message')}\n")

    interrupted: list[bool] = []
    last = asyncio.run(run_cluster_migration(state, args.vm, options, on_record, interrupted))
    if last.get("event") == "error":
        code = last.get("exit_code")
        sys.stderr.write(f"livemig: error: {last.get('error')}\n")
        return EXIT_INTERRUPTED if interrupted else code if isinstance(code, int) else EXIT_ERROR
    report = last["report"]
    if args.json:
        print_json(report)
    elif not args.events:
        print(render_report(MigrationReport.from_dict(report)))
    if interrupted:
        return EXIT_INTERRUPTED
    if report.get("status") != "completed":
        raise MigrationError(
            f"migration {report.get('status')}: {report.get('error') or 'no reason given'}"
        )
    return EXIT_OK if report.get("status") == "completed" else EXIT_MIGRATION


def _demo_cluster(args: argparse.Namespace) -> int:
    from lab.cluster_demo import run_cluster_demo
    from migrate.cli_migrate import demo_config
    from migrate.files import check_output_dir
    from migrate.render import render_report

    config = demo_config(args, args.strategy, predict=not args.no_predict)
    if config.log_dir is not None:
        check_output_dir(config.log_dir, "log directory")
    if not args.json:
        print(f"livemig demo --cluster: {config.workload.text} guest, {config.memory_mib} MiB, "
              f"{config.strategy} strategy, {'plain TCP' if args.no_tls else 'TLS'} data path; "
              "two agents, one cluster...", file=sys.stderr)  # fmt: skip

    async def main() -> Any:
        # SIGTERM unwinds like Ctrl-C: agents, QEMUs and the lab are removed on the way out.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_cluster_demo(config, tls=not args.no_tls)

    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        sys.stderr.write("livemig: terminated; the cluster lab was removed\n")
        return 128 + signal.SIGTERM
    if args.json:
        print_json(result.to_dict())
    else:
        print(render_report(result.report, result.to_dict()["environment"]))
        c = result.cluster
        print(f"cluster: {c['nodes']} nodes, control {c['control']}, "
              f"migration TLS {'on' if c['migration_tls'] else 'off'}")  # fmt: skip
    return EXIT_OK if result.report.status == "completed" else EXIT_MIGRATION
