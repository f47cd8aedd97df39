"""``livemig cluster nodes``: every member, asked over mutual TLS what it is."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from migrate.agent.client import AgentClient
from migrate.cluster.errors import ClusterError
from migrate.cluster.state import Member, StateDir, members_from_json
from migrate.errors import ConfigError

#: Deadline (s) for one member's answer.
NODE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NodeStatus:
    """One member as seen now: ``info`` is its ``/v1/node`` reply when reachable."""

    member: Member
    reachable: bool
    info: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        info = self.info or {}
        return {
            "name": self.member.name,
            "address": self.member.address,
            "ca": self.member.ca,
            "reachable": self.reachable,
            "cpu": info.get("cpu"),
            "memory": info.get("memory"),
            "error": self.error,
        }


async def _members(state: StateDir, client: AgentClient) -> tuple[Member, ...]:
    """The CA node's list when it answers (the freshest), else this node's file."""
    local = state.members()
    holder = next(m for m in local if m.ca)
    try:
        return members_from_json(await client.get_json(holder.address, "/v1/cluster/members"))
    except (ClusterError, ConfigError):
        return local


async def _status(client: AgentClient, member: Member) -> NodeStatus:
    try:
        info = await client.get_json(member.address, "/v1/node")
    except ClusterError as exc:
        return NodeStatus(member, False, error=str(exc))
    if not isinstance(info, dict) or info.get("name") != member.name:
        return NodeStatus(member, False, error=f"{member.address} answers as another node")
    return NodeStatus(member, True, info)


async def list_nodes(state: StateDir, timeout_s: float = NODE_TIMEOUT_S) -> list[NodeStatus]:
    """Every member's status, asked concurrently (each within ``timeout_s``)."""
    state.require_member()
    async with AgentClient(state, timeout_s=timeout_s) as client:
        members = await _members(state, client)
        return list(await asyncio.gather(*(_status(client, m) for m in members)))


async def remove_node(
    state: StateDir, name: str, timeout_s: float = NODE_TIMEOUT_S
) -> tuple[tuple[Member, ...], list[str]]:
    """``livemig cluster remove NAME`` on the CA's node: drop ``name`` from the member
    list here (this agent refuses its certificate from the next request on) and push
    the list to every other member. The members left, and one line per member the
    list did not reach. Raises :class:`ConfigError` (not the CA's node, no such
    member, this node, the CA's node)."""
    from migrate.cluster.state import members_to_json, without_member

    identity = state.require_member()
    if not state.holds_ca:
        raise ConfigError(
            f"node {identity.name!r} does not hold the cluster CA: remove members on the CA's node"
        )
    members = without_member(state.members(), name, identity.name)
    state.write_members(members)
    failed: list[str] = []
    async with AgentClient(state, timeout_s=timeout_s) as client:
        for m in members:
            if m.name == identity.name:
                continue
            try:
                await client.post_json(m.address, "/v1/cluster/members", members_to_json(members))
            except ClusterError as exc:
                failed.append(f"member list not pushed to {m.name}: {exc}")
    return members, failed
