"""Cluster routes: the CA (public), joining (public, the token authenticates), members.

``POST /v1/cluster/join`` runs on the node that holds the CA. The request carries
the token, the new node's name and address and a CSR made on the new node (its key
never leaves it). The agent checks the CSR, signs a certificate whose subject and
SAN it sets itself, and — only if the token is valid, unexpired and unused — marks
the token used and records the member, under the token lock. Then it pushes the new
member list to the other members (best effort, logged).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from aiohttp import web
from cryptography import x509

from migrate.agent.app import AgentContext, Refusal, Router, context, json_response, peer, read_json
from migrate.cluster import pki
from migrate.cluster.address import parse_address
from migrate.cluster.errors import ClusterError, StateError, TokenError, TrustError
from migrate.cluster.state import (
    Member,
    check_name,
    members_from_json,
    members_to_json,
    with_member,
)
from migrate.cluster.tokens import TokenStore, well_formed
from migrate.errors import ConfigError

_HEX = re.compile(r"[0-9a-fA-F]+")
#: Deadline (s) for pushing the member list to one member.
PUSH_TIMEOUT_S = 5.0


def register(router: Router) -> None:
    router.add("GET", "/v1/cluster/ca", get_ca, public=True,
               summary="The cluster CA certificate (to compare with a join key's fingerprint)")  # fmt: skip
    router.add("POST", "/v1/cluster/join", join, public=True,
               summary="Join the cluster with a one-time token and a CSR")  # fmt: skip
    router.add("GET", "/v1/cluster/members", get_members, summary="The cluster's members")
    router.add("POST", "/v1/cluster/members", put_members,
               summary="Replace the member list (only from the node holding the CA)")  # fmt: skip


async def get_ca(request: web.Request) -> web.Response:
    """The CA. A joining node names the fingerprint its key carries (``?expect=``):
    when it is not this cluster's the request is refused, so the agent's log shows
    the failed join too. The joining node compares the fingerprint itself anyway;
    a fingerprint is no secret."""
    state = context(request).state
    ours = state.ca_fingerprint()
    expect = request.query.get("expect")
    if expect is not None and expect.lower() != ours:
        shown = expect[:16] if _HEX.fullmatch(expect[:16]) else "(not hex)"
        raise Refusal(
            409,
            f"the join key's CA fingerprint {shown}... is not this cluster's ({ours[:16]}...)",
            "ca-fingerprint",
        )
    return json_response({"ca_pem": state.ca_pem().decode("ascii"), "ca_sha256": ours})


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise Refusal(400, f"{name!r} must be a non-empty string", "bad-request")
    return value


async def join(request: web.Request) -> web.Response:
    ctx = context(request)
    body = await read_json(request)
    token = _field(body, "token")
    if not well_formed(token):
        raise Refusal(403, "join token unknown (malformed)", "token-unknown")
    try:
        name = check_name(_field(body, "name"))
        address = parse_address(_field(body, "address"))
    except ConfigError as exc:
        raise Refusal(400, str(exc), "bad-request") from None
    state = ctx.state
    if not state.holds_ca:
        raise Refusal(409, f"node {ctx.identity.name!r} does not hold the cluster CA", "not-ca")
    try:
        csr = pki.load_csr(_field(body, "csr_pem").encode("ascii", "replace"))
        if pki.common_name(csr) != name:
            raise TrustError(f"the CSR is for {pki.common_name(csr)!r}, not {name!r}")
    except TrustError as exc:
        raise Refusal(400, str(exc), "bad-csr") from None
    ca_cert = state.ca_cert()
    issued: list[tuple[x509.Certificate, Member]] = []

    def admit() -> tuple[Member, ...]:
        # Runs only for a valid, unused token: nothing is signed for anyone else.
        cert = pki.sign_node(csr, name, address.host, ca_cert, pki.load_key(state.ca_key_pem()))
        member = Member(name, str(address), False, pki.fingerprint(cert), time.time())
        members = with_member(state.members(), member)
        state.write_members(members)
        issued.append((cert, member))
        return members

    try:
        members = await asyncio.to_thread(TokenStore(state).redeem, token, name, admit)
    except TokenError as exc:
        raise Refusal(403, str(exc), f"token-{exc.reason}") from None
    except ConfigError as exc:
        raise Refusal(409, str(exc), "member-exists") from None
    cert, member = issued[0]
    ctx.log.info("JOINED %s at %s (certificate %s)", name, address, member.cert_sha256[:16])
    ctx.spawn(push_members(ctx, members, skip={name, ctx.identity.name}))
    return json_response(
        {
            "node_cert_pem": pki.cert_pem(cert).decode("ascii"),
            "ca_pem": pki.cert_pem(ca_cert).decode("ascii"),
            "members": members_to_json(members),
        }
    )


async def get_members(request: web.Request) -> web.Response:
    return json_response(members_to_json(context(request).state.members()))


async def put_members(request: web.Request) -> web.Response:
    ctx = context(request)
    caller = peer(request)
    current = ctx.state.members()
    holder = next(m for m in current if m.ca)
    if caller is None or caller.name != holder.name:
        raise Refusal(403, f"only {holder.name!r} (the CA's node) may change the members", "not-ca")
    try:
        members = members_from_json(await read_json(request))
    except ConfigError as exc:
        raise Refusal(400, str(exc), "bad-request") from None
    if not any(m.name == ctx.identity.name for m in members):
        raise Refusal(400, f"the list leaves out this node ({ctx.identity.name!r})", "bad-request")
    if next(m for m in members if m.ca).name != holder.name:
        raise Refusal(400, "the list moves the CA to another node", "bad-request")
    try:
        ctx.state.write_members(members)
    except (ConfigError, StateError, OSError) as exc:
        raise Refusal(500, f"cannot write members: {exc}", "state") from None
    ctx.log.info("members updated by %s: %s", caller.name, ", ".join(m.name for m in members))
    return json_response(members_to_json(members))


async def push_members(ctx: AgentContext, members: tuple[Member, ...], skip: set[str]) -> None:
    """Send ``members`` to every member not in ``skip``; log each outcome."""
    from migrate.agent.client import AgentClient

    targets = [m for m in members if m.name not in skip]
    if not targets:
        return
    async with AgentClient(ctx.state, timeout_s=PUSH_TIMEOUT_S) as client:
        for m in targets:
            try:
                await client.post_json(m.address, "/v1/cluster/members", members_to_json(members))
            except ClusterError as exc:
                ctx.log.warning("member list not pushed to %s (%s): %s", m.name, m.address, exc)
            else:
                ctx.log.info("member list pushed to %s", m.name)
