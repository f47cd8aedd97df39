"""A TLS listening site for aiohttp that logs refused handshakes.

aiohttp's ``TCPSite`` hands TLS to asyncio, which drops a failed handshake (a
client certificate from another CA, a client speaking plain HTTP) without telling
the application. An agent must log every refusal, so this site accepts plain TCP,
upgrades each connection with ``loop.start_tls`` and reports a handshake that
fails; a connection that succeeds is handed to aiohttp's request handler as if
aiohttp had accepted it over TLS itself.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

#: Called with the peer's address ("host:port") and the error of a refused handshake.
RefusalHook = Callable[[str, BaseException], None]


def peer_text(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unknown peer"


class _Handover(asyncio.Protocol):
    """Sits between the TLS transport and aiohttp's handler until the handler is
    connected: whatever arrives before (asyncio may deliver the first request in the
    same breath as the finished handshake) is kept and replayed in order."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self._inner = inner
        self._connected = False
        self._pending: list[tuple[str, Any]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)
        self._connected = True
        pending, self._pending = self._pending, []
        for event, arg in pending:
            if event == "data":
                self._inner.data_received(arg)
            elif event == "eof":
                self._inner.eof_received()
            else:
                self._inner.connection_lost(arg)

    def data_received(self, data: bytes) -> None:
        if self._connected:
            self._inner.data_received(data)
        else:
            self._pending.append(("data", data))

    def eof_received(self) -> bool | None:
        if self._connected:
            return self._inner.eof_received()
        self._pending.append(("eof", None))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connected:
            self._inner.connection_lost(exc)
        else:
            self._pending.append(("lost", exc))

    def pause_writing(self) -> None:
        if self._connected:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._connected:
            self._inner.resume_writing()


class _Gate(asyncio.Protocol):
    def __init__(self, site: GatedTLSSite) -> None:
        self._site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # nothing is read until start_tls owns the socket
        task = asyncio.get_running_loop().create_task(self._site._upgrade(transport))
        self._site._handshakes.add(task)
        task.add_done_callback(self._site._handshakes.discard)


class GatedTLSSite(web.BaseSite):
    """Like ``web.TCPSite`` with an ``ssl_context``, plus ``on_refused`` for every TLS
    handshake that fails or times out (``handshake_timeout_s``)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        on_refused: RefusalHook,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._tls = ssl_context
        self._on_refused = on_refused
        self._handshake_timeout_s = handshake_timeout_s
        self._handshakes: set[asyncio.Task[None]] = set()
        self.bound_port = port

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"https://{host}:{self.bound_port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Gate(self), self._host, self._port, reuse_address=True
        )
        if self._server.sockets:
            self.bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await super().stop()

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        server = self._runner.server
        assert server is not None
        peer = peer_text(transport.get_extra_info("peername"))
        handler = _Handover(server())
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                transport, handler, self._tls, server_side=True,
                ssl_handshake_timeout=self._handshake_timeout_s,
            )  # fmt: skip
        except (ssl.SSLError, OSError, EOFError, TimeoutError) as exc:
            transport.abort()
            self._on_refused(peer, exc)
            return
        if tls is None:  # the peer went away during the handshake
            transport.abort()
            return
        handler.connection_made(tls)
