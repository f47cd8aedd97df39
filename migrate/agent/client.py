"""Calling agents over mutual TLS (aiohttp's client).

:class:`AgentClient` is a member's client: it verifies every agent against the
cluster CA and presents this node's certificate. Its errors are the cluster's:
:class:`AgentRefused` when an agent answered with a refusal (4xx, its one-line
error carried), :class:`AgentError` when no usable answer came back (unreachable,
deadline, TLS failure, 5xx, a reply of the wrong shape). Every call has a deadline.

:func:`fetch_ca` and :func:`post_join` are the joining node's two calls (see
``migrate.agent.join``).
"""

from __future__ import annotations

import json
import ssl
from types import TracebackType
from typing import Any

import aiohttp

from migrate.cluster import tls
from migrate.cluster.address import parse_address
from migrate.cluster.errors import AgentError, AgentRefused
from migrate.cluster.state import StateDir

#: Default deadline (s) of one call, connection and TLS handshake included.
DEFAULT_TIMEOUT_S = 10.0
#: Largest reply read from an agent.
MAX_REPLY_BYTES = 4 << 20


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    address: str,
    path: str,
    body: Any | None,
) -> Any:
    url = parse_address(address).url + path
    try:
        async with session.request(method, url, json=body) as resp:
            raw = bytearray()  # read() returns what has arrived, not the whole body
            while len(raw) <= MAX_REPLY_BYTES and (chunk := await resp.content.read(1 << 16)):
                raw += chunk
            status = resp.status
    except aiohttp.ClientConnectorCertificateError as exc:
        raise AgentError(
            f"agent {address}: its certificate is not trusted: {exc.certificate_error}", address
        ) from exc
    except aiohttp.ClientSSLError as exc:
        raise AgentError(f"agent {address}: TLS failed: {_ssl_text(exc)}", address) from exc
    except aiohttp.ClientConnectorError as exc:
        raise AgentError(
            f"agent {address} unreachable: {exc.os_error.strerror or exc.os_error}", address
        ) from exc
    except aiohttp.ClientError as exc:
        raise AgentError(f"agent {address}: {type(exc).__name__}: {exc}", address) from exc
    except TimeoutError as exc:
        raise AgentError(f"agent {address}: no answer within the deadline", address) from exc
    if len(raw) > MAX_REPLY_BYTES:
        raise AgentError(
            f"agent {address}: reply larger than {MAX_REPLY_BYTES} bytes", address, status
        )
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if 400 <= status < 500:
        reason = data.get("error") if isinstance(data, dict) else None
        reason = reason if isinstance(reason, str) else f"HTTP {status}"
        raise AgentRefused(f"agent {address} refused: {reason}", address, status, reason)
    if status != 200:
        raise AgentError(f"agent {address}: HTTP {status}", address, status)
    if data is None:
        raise AgentError(f"agent {address}: the reply is not JSON", address, status)
    return data


def _ssl_text(exc: aiohttp.ClientSSLError) -> str:
    inner = exc.os_error if hasattr(exc, "os_error") else exc
    if isinstance(inner, ssl.SSLError) and inner.reason:
        return str(inner.reason).lower().replace("_", " ")
    return str(inner)


def _session(ctx: ssl.SSLContext, timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx, limit=16),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        raise_for_status=False,
    )


class AgentClient:
    """A member's client of the cluster's agents; an async context manager.

    ``state`` is this node's state directory: its ``ca.pem`` verifies agents, its
    ``node.pem``/``node-key.pem`` authenticate this node.
    """

    def __init__(self, state: StateDir, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.state = state
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None

    async def __aenter__(self) -> AgentClient:
        self._ssl = tls.client_context(self.state)
        self._session = _session(self._ssl, self.timeout_s)
        return self

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """This member's client context (its certificate, the cluster CA), for
        connections that outlive one call (a websocket relay)."""
        if self._ssl is None:
            raise RuntimeError("AgentClient used outside `async with`")
        return self._ssl

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _require(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("AgentClient used outside `async with`")
        return self._session

    async def get_json(self, address: str, path: str) -> Any:
        """``GET path`` on the agent at ``address``; its JSON reply."""
        return await _request(self._require(), "GET", address, path, None)

    async def post_json(self, address: str, path: str, body: Any) -> Any:
        """``POST path`` with a JSON body; the agent's JSON reply."""
        return await _request(self._require(), "POST", address, path, body)


async def fetch_ca(address: str, expect_sha256: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """``GET /v1/cluster/ca?expect=FINGERPRINT`` without verifying the agent (it is
    what gets verified); the agent refuses (409) when the fingerprint is not its CA's."""
    async with _session(tls.bootstrap_context(), timeout_s) as session:
        return await _request(
            session, "GET", address, f"/v1/cluster/ca?expect={expect_sha256}", None
        )


async def post_join(
    address: str, ca_pem: bytes, body: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S
) -> Any:
    """``POST /v1/cluster/join``, verifying the agent against ``ca_pem`` (and its
    address against its certificate) before the body — the token — is sent."""
    async with _session(tls.pinned_context(ca_pem), timeout_s) as session:
        return await _request(session, "POST", address, "/v1/cluster/join", body)
