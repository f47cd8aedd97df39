"""QMP of a local QEMU offered over TCP with mutual TLS, by the agent (asyncio + ssl).

A migration's target QEMU must be driven by the engine on the source host. QEMU
7.2's own TLS chardev proved unusable for QMP: its monitor reads a TLS socket only
when the socket turns readable, so a command already decrypted by gnutls waits
for the next bytes to arrive (commands answered one message late, or never). The
agent therefore terminates TLS itself — Python's ``ssl``, the node certificate,
client certificates required and checked against the cluster CA — and relays
the bytes to the QEMU's own UNIX QMP socket. One client at a time (QMP's rule);
each connection gets its own relay. With ``peer_name`` (an incoming VM: the
source node that asked for it) only that node's certificate (CN) is relayed. The engine connects as to any QMP-over-TLS
server (:class:`~migrate.request.QmpTcpAddress`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

from migrate.deadline import within
from migrate.tls import peer_node_name

#: How long to wait for the QEMU's socket to accept (s).
CONNECT_TIMEOUT_S = 5.0


class QmpTlsProxy:
    """Listens on ``host`` (a free port) and relays each TLS client to ``socket_path``."""

    def __init__(
        self,
        host: str,
        socket_path: Path,
        context: ssl.SSLContext,
        log: logging.Logger,
        peer_name: str | None = None,
    ) -> None:
        self.peer_name = peer_name
        self.host = host
        self.socket_path = socket_path
        self.context = context
        self.log = log
        self.port = 0
        self._server: asyncio.Server | None = None
        self._busy = asyncio.Lock()
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Start listening; the port."""
        self._server = await asyncio.start_server(self._serve, self.host, 0, ssl=self.context)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._relays.add(task)
        peer = writer.get_extra_info("peername")
        try:
            if self._busy.locked():
                self.log.warning(
                    "QMP relay %s: refused %s (one client at a time)",
                    self.socket_path.parent.name,
                    peer,
                )
                return
            if self.peer_name is not None:
                name = peer_node_name(writer.get_extra_info("ssl_object"))
                if name != self.peer_name:
                    self.log.warning(
                        "QMP relay %s: refused %s: node %r's certificate, not %r's",
                        self.socket_path.parent.name,
                        peer,
                        name,
                        self.peer_name,
                    )
                    return
            async with self._busy:
                try:
                    qr, qw = await within(
                        asyncio.open_unix_connection(str(self.socket_path)), CONNECT_TIMEOUT_S
                    )
                except (OSError, TimeoutError) as exc:
                    self.log.warning("QMP relay: cannot reach %s: %s", self.socket_path, exc)
                    return
                try:
                    await _pipe_both(reader, writer, qr, qw)
                finally:
                    qw.close()
                    with contextlib.suppress(OSError, ssl.SSLError):
                        await qw.wait_closed()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
                await writer.wait_closed()
            if task is not None:
                self._relays.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._relays):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._relays, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (OSError, ssl.SSLError, ConnectionError):
        pass


async def _pipe_both(
    r1: asyncio.StreamReader,
    w1: asyncio.StreamWriter,
    r2: asyncio.StreamReader,
    w2: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side closes."""
    tasks = [asyncio.create_task(_copy(r1, w2)), asyncio.create_task(_copy(r2, w1))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
