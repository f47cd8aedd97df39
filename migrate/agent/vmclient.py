"""The CLI's side of VMs and migrations: calls to this node's agent and to the VM's owner.

Every call goes over mutual TLS with this node's cluster certificate
(:class:`~migrate.agent.client.AgentClient`). A migration's events are read as a
stream of JSON lines from the source node's agent (:func:`follow`); each read has
a deadline (the agent writes a keep-alive line every 5 s of silence).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp

from migrate.agent.client import AgentClient
from migrate.cluster import tls
from migrate.cluster.address import parse_address
from migrate.cluster.errors import AgentError, AgentRefused
from migrate.cluster.state import Member, StateDir

#: Longest silence on an event stream before the follower gives up (s).
STREAM_SILENCE_S = 30.0


async def find_owner(
    client: AgentClient, state: StateDir, vm: str
) -> tuple[Member, dict[str, Any]]:
    """The member whose agent owns ``vm`` and what it says of it. Raises
    :class:`AgentError` when no reachable member has it."""
    members = state.members()
    unreachable = []
    for member in members:
        try:
            info = await client.get_json(member.address, f"/v1/vms/{vm}")
        except AgentRefused as exc:
            if exc.status == 404:
                continue
            raise
        except AgentError as exc:
            unreachable.append(f"{member.name}: {exc}")
            continue
        return member, info
    extra = f" (unreachable: {'; '.join(unreachable)})" if unreachable else ""
    raise AgentError(f"no node of the cluster has a VM {vm!r}{extra}", "")


async def follow(
    state: StateDir, address: str, migration_id: str, on_record: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Read migration ``migration_id``'s events from the agent at ``address``, handing
    each (but keep-alives) to ``on_record``; the last record (``finished`` or ``error``)."""
    url = parse_address(address).url + f"/v1/migrations/{migration_id}/events"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=STREAM_SILENCE_S)
    last: dict[str, Any] | None = None
    connector = aiohttp.TCPConnector(ssl=tls.client_context(state))
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                raise AgentRefused(f"agent {address}: HTTP {resp.status}", address, resp.status, "")
            async for raw in resp.content:
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(record, dict) or record.get("event") == "keepalive":
                    continue
                on_record(record)
                last = record
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AgentError(
            f"agent {address}: the event stream broke: {exc or type(exc).__name__}", address
        ) from exc
    if last is None or last.get("event") not in ("finished", "error"):
        raise AgentError(
            f"agent {address}: the event stream ended before the migration did", address
        )
    return last


async def abort(state: StateDir, address: str, migration_id: str, reason: str) -> None:
    """Ask the source agent to abort (errors only logged by the caller)."""
    async with AgentClient(state, timeout_s=10.0) as client:
        await client.post_json(address, f"/v1/migrations/{migration_id}/abort", {"reason": reason})


async def call_local(
    state: StateDir, method: str, path: str, body: Any = None, timeout_s: float = 60.0
) -> Any:
    """One call to this node's own agent."""
    identity = state.require_member()
    async with AgentClient(state, timeout_s=timeout_s) as client:
        if method == "GET":
            return await client.get_json(str(identity.address), path)
        return await client.post_json(str(identity.address), path, body)
