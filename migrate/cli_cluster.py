"""``livemig agent`` and ``livemig cluster create|join-key|join|nodes``.

``cluster join-key`` runs on the node that created the cluster (it holds the CA):
it writes the new token's hash into the state directory (``tokens.json``, under
``tokens.lock``), where the running agent reads it when the new node joins — no
agent needs to be running to make a key. The agent and the aiohttp/cryptography
stack load only inside these handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from migrate import cli_args
from migrate.cli import EXIT_ERROR, EXIT_OK, print_json
from migrate.errors import ConfigError


def _address(text: str) -> Any:
    from migrate.cluster.address import parse_address

    try:
        return parse_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _name(text: str) -> str:
    from migrate.cluster.state import check_name

    try:
        return check_name(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_TTL_S = cli_args.int_in(1, 7 * 24 * 3600)


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=cli_args.path, required=True,
                        help="this node's cluster state directory (keys, certificates, members)")  # fmt: skip


def register(sub: Any) -> None:
    agent = sub.add_parser("agent", help="run this host's node agent (foreground, mutual TLS)")
    _state_dir(agent)
    agent.add_argument("--listen", type=_address, default=None, metavar="HOST:PORT",
                       help="listen here instead of the node's address (e.g. 0.0.0.0:7443)")  # fmt: skip
    agent.set_defaults(func=_agent)

    cluster = sub.add_parser("cluster", help="create or join a cluster of livemig hosts")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, parser_class=type(cluster))
    create = csub.add_parser("create", help="make a cluster CA and this node's certificate")
    _state_dir(create)
    create.add_argument("--name", type=_name, required=True, help="this node's name (a DNS label)")
    create.add_argument("--address", type=_address, required=True, metavar="HOST:PORT",
                        help="where this node's agent is reached (goes into its certificate)")  # fmt: skip
    create.set_defaults(func=_create)

    key = csub.add_parser("join-key", help="print a one-time join key (on the CA's node)")
    _state_dir(key)
    key.add_argument(
        "--ttl-s", type=_TTL_S, default=900, help="the key's lifetime (s, default 900)"
    )
    key.set_defaults(func=_join_key)

    join = csub.add_parser("join", help="join a cluster with a join key")
    _state_dir(join)
    join.add_argument("--name", type=_name, required=True, help="this node's name (a DNS label)")
    join.add_argument("--address", type=_address, required=True, metavar="HOST:PORT",
                      help="where this node's agent will be reached")  # fmt: skip
    join.add_argument("--timeout", type=cli_args.positive_float(300), default=10.0,
                      help="deadline of each call to the cluster's agent (s)")  # fmt: skip
    join.add_argument("key", help="the join key (livemig-join:v1:...)")
    join.set_defaults(func=_join)

    remove = csub.add_parser(
        "remove", help="remove a node from the cluster (on the CA's node): agents refuse it"
    )
    _state_dir(remove)
    remove.add_argument("node", type=_name, help="the node to remove")
    remove.add_argument("--timeout", type=cli_args.positive_float(300), default=5.0,
                        help="deadline for each member's answer (s)")  # fmt: skip
    remove.set_defaults(func=_remove)

    nodes = csub.add_parser("nodes", help="list the members and what their agents say")
    _state_dir(nodes)
    nodes.add_argument("--json", action="store_true", help="print exactly one JSON object")
    nodes.add_argument("--timeout", type=cli_args.positive_float(300), default=5.0,
                       help="deadline for each member's answer (s)")  # fmt: skip
    nodes.set_defaults(func=_nodes)


def _agent(args: argparse.Namespace) -> int:
    from migrate.agent.server import run_agent
    from migrate.cluster.state import StateDir

    return run_agent(StateDir(args.state_dir), args.listen)


def _create(args: argparse.Namespace) -> int:
    from migrate.cluster.state import StateDir, create_cluster

    state = StateDir(args.state_dir)
    member = create_cluster(state, args.name, args.address)
    sys.stdout.write(
        f"cluster created: node {member.name} at {member.address}, "
        f"CA sha256 {state.ca_fingerprint()}\n"
    )
    return EXIT_OK


def _join_key(args: argparse.Namespace) -> int:
    from migrate.cluster.joinkey import JoinKey
    from migrate.cluster.state import StateDir
    from migrate.cluster.tokens import TokenStore

    state = StateDir(args.state_dir)
    identity = state.require_member()
    token = TokenStore(state).issue(args.ttl_s)
    key = JoinKey(address=str(identity.address), ca_sha256=state.ca_fingerprint(), token=token)
    sys.stdout.write(key.encode() + "\n")
    return EXIT_OK


def _join(args: argparse.Namespace) -> int:
    from migrate.agent.join import join_cluster
    from migrate.cluster.joinkey import JoinKey
    from migrate.cluster.state import StateDir

    key = JoinKey.decode(args.key)
    members = asyncio.run(
        join_cluster(StateDir(args.state_dir), args.name, args.address, key, args.timeout)
    )
    names = ", ".join(m.name for m in members)
    sys.stdout.write(f"joined the cluster as {args.name} (members: {names})\n")
    return EXIT_OK


def _remove(args: argparse.Namespace) -> int:
    from migrate.agent.nodes import remove_node
    from migrate.cluster.state import StateDir

    members, failed = asyncio.run(remove_node(StateDir(args.state_dir), args.node, args.timeout))
    names = ", ".join(m.name for m in members)
    sys.stdout.write(f"node {args.node} removed (members: {names})\n")
    for line in failed:
        sys.stderr.write(f"livemig: {line}\n")
    return EXIT_ERROR if failed else EXIT_OK


def _nodes(args: argparse.Namespace) -> int:
    from migrate.agent.nodes import list_nodes
    from migrate.cluster.state import StateDir

    statuses = asyncio.run(list_nodes(StateDir(args.state_dir), args.timeout))
    if args.json:
        print_json({"nodes": [s.to_dict() for s in statuses]})
        return EXIT_OK
    rows = [("NAME", "ADDRESS", "REACHABLE", "CPU", "FREE MEMORY")]
    for s in statuses:
        d = s.to_dict()
        cpu = d["cpu"] or {}
        cpu_text = (
            f"{cpu.get('vendor', '?')} {cpu.get('psabi_level') or '-'} x{cpu.get('logical_cpus', '?')}"
            if s.reachable
            else "-"
        )
        mem = d["memory"] or {}
        free = f"{mem['available_bytes'] / 2**30:.1f} GiB" if "available_bytes" in mem else "-"
        reach = "yes" if s.reachable else f"no ({s.error})"
        rows.append(
            (
                s.member.name + (" (ca)" if s.member.ca else ""),
                s.member.address,
                reach,
                cpu_text,
                free,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        sys.stdout.write(
            "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
            + "  "
            + row[4]
            + "\n"
        )
    return EXIT_OK
