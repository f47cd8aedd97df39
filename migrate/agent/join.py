"""Joining a cluster, on the new node (``livemig cluster join``).

1. Make this node's key and a CSR locally (the key never leaves the node).
2. Fetch the CA certificate from the agent named in the key, unverified, and
   compare its SHA-256 with the key's fingerprint. A mismatch stops here: only
   ``GET /v1/cluster/ca?expect=<fingerprint>`` went over the wire (the agent
   refuses and logs that request when the fingerprint is not its CA's; this node
   does not rely on it and compares for itself).
3. Connect again, verifying the agent against that CA and its address against its
   certificate; only then send the token, name, address and CSR.
4. Check the answer (the certificate is for this name and key and chains to the
   CA; the member list holds this node), then write the state directory
   atomically, ``node.json`` last.
"""

from __future__ import annotations

import hmac
from typing import Any

from migrate.agent import client
from migrate.cluster import pki
from migrate.cluster.address import Address, parse_address
from migrate.cluster.errors import AgentError, AgentRefused, TrustError
from migrate.cluster.joinkey import JoinKey
from migrate.cluster.state import Member, NodeIdentity, StateDir, check_name, members_from_json
from migrate.errors import ConfigError


def _pem(data: Any, name: str, address: str) -> bytes:
    if not isinstance(data, dict) or not isinstance(data.get(name), str):
        raise AgentError(f"agent {address}: its reply lacks {name!r}", address)
    return str(data[name]).encode("ascii", "replace")


async def join_cluster(
    state: StateDir,
    name: str,
    address: Address,
    key: JoinKey,
    timeout_s: float = client.DEFAULT_TIMEOUT_S,
) -> tuple[Member, ...]:
    """Join the cluster ``key`` leads to as ``name`` at ``address``; return the members.

    Raises :class:`TrustError` (wrong fingerprint, a certificate that does not hold),
    :class:`AgentRefused` (token refused, name taken...), :class:`AgentError`,
    :class:`StateError` (``state`` already holds a cluster). Nothing is written
    unless the join succeeded.
    """
    state.require_empty()
    check_name(name)
    target = str(parse_address(key.address))
    node = pki.make_csr(name, address.host)

    try:
        reply = await client.fetch_ca(target, key.ca_sha256, timeout_s)
    except AgentRefused as exc:
        if exc.status != 409:
            raise
        raise TrustError(f"{exc.reason}: refusing to send the token to {target}") from None
    ca_pem = _pem(reply, "ca_pem", target)
    ca = pki.load_cert(ca_pem)
    seen = pki.fingerprint(ca)
    if not hmac.compare_digest(seen, key.ca_sha256):
        raise TrustError(
            f"agent {target} presents CA fingerprint {seen[:16]}..., the join key says "
            f"{key.ca_sha256[:16]}...: refusing to send the token"
        )

    body = {"token": key.token, "name": name, "address": str(address),
            "csr_pem": node.csr_pem.decode("ascii")}  # fmt: skip
    answer = await client.post_join(target, pki.cert_pem(ca), body, timeout_s)
    cert_pem = _pem(answer, "node_cert_pem", target)
    if _pem(answer, "ca_pem", target).strip() != pki.cert_pem(ca).strip():
        raise TrustError(f"agent {target} answered with another CA than it showed")
    cert = pki.load_cert(cert_pem)
    pki.check_node_cert(cert, ca, node.key_pem)
    if pki.common_name(cert) != name:
        raise TrustError(f"agent {target} issued a certificate for {pki.common_name(cert)!r}")
    try:
        members = members_from_json(answer.get("members"))
    except ConfigError as exc:
        raise AgentError(f"agent {target}: bad member list: {exc}", target) from None
    if not any(m.name == name and m.cert_sha256 == pki.fingerprint(cert) for m in members):
        raise AgentError(f"agent {target}: the member list leaves out {name!r}", target)
    state.install(NodeIdentity(name, address), pki.cert_pem(ca), pki.cert_pem(cert),
                  node.key_pem, members)  # fmt: skip
    return members
