"""``ssl`` contexts for the cluster's connections.

- :func:`server_context`: the agent. Presents the node certificate; asks every
  client for a certificate and verifies one that is offered against the cluster CA
  (``CERT_OPTIONAL``): a client with a foreign certificate fails the handshake,
  a client with none gets through TLS and is refused by every route but the join
  route and the CA route (see ``migrate.agent.app``).
- :func:`client_context`: a member calling an agent — verifies the agent against
  the cluster CA (and its address against the certificate's SAN), presents the node
  certificate.
- :func:`pinned_context`: a joining node, after it has checked the CA's fingerprint:
  verifies the agent against that CA; no client certificate yet.
- :func:`bootstrap_context`: the joining node's first, unverified connection, which
  only fetches the CA certificate to compare its fingerprint with the join key's.
  Nothing secret is sent on it.
"""

from __future__ import annotations

import ssl

from migrate.cluster.state import StateDir


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(state: StateDir) -> ssl.SSLContext:
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(state.cert_path, state.key_path)
    ctx.load_verify_locations(cafile=state.ca_path)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(state: StateDir) -> ssl.SSLContext:
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cafile=state.ca_path)
    ctx.load_cert_chain(state.cert_path, state.key_path)
    return ctx


def pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    return ctx


def bootstrap_context() -> ssl.SSLContext:
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
