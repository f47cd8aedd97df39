"""The agent's QMP relay for an incoming VM takes only the source node that asked."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from migrate.agent.qmpproxy import QmpTlsProxy
from migrate.deadline import within
from migrate.tls import NodeCredentials, client_context, server_context
from tests.pki_helper import ThrowawayCa

GREETING = b'{"QMP": {"version": {}}}\r\n'


async def _greeting(port: int, creds: NodeCredentials) -> bytes:
    reader, writer = await within(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(creds), server_hostname="127.0.0.1"
        ),
        5.0,
    )
    try:
        return await within(reader.read(len(GREETING)), 5.0)
    finally:
        writer.close()


def test_qmp_relay_takes_only_the_named_source(tmp_path: Path) -> None:
    ca = ThrowawayCa.create()
    node_b = ca.issue(tmp_path / "b", "node-b", "127.0.0.1")
    node_a = ca.issue(tmp_path / "a", "node-a", "198.19.0.1")
    node_x = ca.issue(tmp_path / "x", "node-x", "198.19.0.1")  # same CA
    qmp = tmp_path / "vm" / "qmp.sock"
    qmp.parent.mkdir()

    async def scenario() -> tuple[bytes, bytes]:
        async def fake_qemu(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(GREETING)
            await writer.drain()
            writer.close()

        qemu = await asyncio.start_unix_server(fake_qemu, str(qmp))
        proxy = QmpTlsProxy(
            "127.0.0.1", qmp, server_context(node_b), logging.getLogger("t"), peer_name="node-a"
        )
        port = await proxy.start()
        try:
            return await _greeting(port, node_x), await _greeting(port, node_a)
        finally:
            await proxy.close()
            qemu.close()
            await qemu.wait_closed()

    refused, relayed = asyncio.run(scenario())
    assert refused == b""
    assert relayed == GREETING
