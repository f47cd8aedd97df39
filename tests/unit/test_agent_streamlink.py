"""pagestream's receiver across agents (migrate.agent.streamlink): what the relay lets
through, and a real receiver started by an in-process agent (mTLS) and driven over
its websocket by :class:`AgentReceiver` — a child of the agent, ended with its socket."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web

from migrate.agent import streamlink
from migrate.agent.app import AgentContext, create_app
from migrate.agent.client import AgentClient
from migrate.agent.metrics import AgentMetrics
from migrate.agent.streamlink import AgentReceiver, vet
from migrate.agent.tlsgate import GatedTLSSite
from migrate.agent.vms import VmRun
from migrate.cluster import tls
from migrate.cluster.address import parse_address
from migrate.cluster.state import StateDir, create_cluster
from migrate.errors import ConfigError, StreamError
from migrate.tls import NodeCredentials
from migrate.vmdef import VmDefinition
from tests.unit.test_agent_vms import DEFINITION, _member

SESSION = base64.b64encode(b"k" * 16).decode()
ROOT = Path(__file__).resolve().parents[2]
#: A source agent's engine in another process: starts the receiver, then waits to die.
_SOURCE = f"""
import asyncio, sys
from pathlib import Path
from migrate.agent.client import AgentClient
from migrate.agent.streamlink import AgentReceiver
from migrate.cluster.state import StateDir

async def main():
    async with AgentClient(StateDir(Path(sys.argv[1])), timeout_s=30) as client:
        receiver = AgentReceiver(client.ssl_context, sys.argv[2], "web1")
        await receiver.start()
        await receiver.call("listen", {{"session": "{SESSION}", "tls": False}}, 30)
        print("listening", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


def test_the_relay_passes_listen_with_the_targets_own_paths_and_close_only() -> None:
    creds = NodeCredentials(Path("/t/ca.pem"), Path("/t/cert.pem"), Path("/t/key.pem"))
    listen = vet(
        {"id": 1, "cmd": "listen", "args": {"session": SESSION, "tls": True}},
        "/dev/shm/b.ram", "10.0.0.2", creds,
    )  # fmt: skip
    assert listen == {
        "id": 1,
        "cmd": "listen",
        "args": {
            "ram_path": "/dev/shm/b.ram",
            "host": "10.0.0.2",
            "port": 0,
            "session": SESSION,
            "tls": {"ca": "/t/ca.pem", "cert": "/t/cert.pem", "key": "/t/key.pem"},
        },
    }
    plain = vet({"id": 2, "cmd": "listen", "args": {"session": SESSION, "tls": False}},
                "/r", "h", None)  # fmt: skip
    assert "tls" not in plain["args"]
    # The member that opened the relay is the one node the receiver takes a stream from;
    # the source cannot name another (the target chooses it).
    from_a = vet({"id": 4, "cmd": "listen", "args": {"session": SESSION, "tls": True}},
                 "/r", "h", creds, "node-a")  # fmt: skip
    assert from_a["args"]["peer_name"] == "node-a"
    with pytest.raises(ValueError, match="the target chooses peer_name"):
        vet({"id": 5, "cmd": "listen",
             "args": {"session": SESSION, "tls": True, "peer_name": "node-x"}},
            "/r", "h", creds, "node-a")  # fmt: skip
    assert vet({"id": 3, "cmd": "close", "args": {"x": 1}}, "/r", "h", None)["args"] == {}
    for bad, needle in (
        ({"id": 1, "cmd": "sweep"}, "takes listen and close, not 'sweep'"),
        ({"cmd": "close"}, "integer id"),
        (
            {
                "id": 1,
                "cmd": "listen",
                "args": {"session": SESSION, "tls": False, "ram_path": "/etc/shadow"},
            },
            "the target chooses ram_path",
        ),
        ({"id": 1, "cmd": "listen", "args": {"session": SESSION, "tls": "yes"}}, r"tls \(true"),
        (
            {
                "id": 1,
                "cmd": "listen",
                "args": {"session": SESSION, "tls": False, "accept_timeout_s": 1e9},
            },
            "accept_timeout_s",
        ),
        ({"id": 1, "cmd": "listen", "args": {"session": SESSION, "tls": True}}, "no TLS"),
    ):
        with pytest.raises(ValueError, match=needle):
            vet(bad, "/r", "h", None)


def _receivers_of(pid: int) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(pid).children()
        if "migrate.pagestream.agent" in child.cmdline() and "receiver" in child.cmdline()
    ]


async def _gone(proc: psutil.Process, timeout_s: float = 15.0) -> bool:
    """Whether ``proc`` ends (and is reaped) within ``timeout_s`` (the agent, in this
    event loop, must run meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.is_running():
            return True
        await asyncio.sleep(0.05)
    return False


def test_a_receiver_started_by_the_target_agent_and_driven_over_its_websocket(
    tmp_path: Path,
) -> None:
    state_a = StateDir(tmp_path / "a")
    create_cluster(state_a, "a", parse_address("127.0.0.1:7443"))
    member = _member(state_a, tmp_path / "b", "b", "127.0.0.1:7444")
    ctx = AgentContext(
        state_a, state_a.require_member(), AgentMetrics(), logging.getLogger("test.streamlink")
    )
    ram = tmp_path / "web1.ram"
    ram.write_bytes(b"\0" * (1 << 20))

    async def run() -> None:
        runner = web.AppRunner(create_app(ctx), access_log=None)
        await runner.setup()
        site = GatedTLSSite(runner, "127.0.0.1", 0, tls.server_context(state_a), lambda *_: None)
        await site.start()
        address = f"127.0.0.1:{site.bound_port}"
        vms: Any = ctx.services.get("vms")
        try:
            async with AgentClient(member, timeout_s=30) as client:
                receiver = AgentReceiver(client.ssl_context, address, "web1")
                # Not an incoming VM here: refused before any process starts.
                with pytest.raises(StreamError, match="not an incoming migration here"):
                    await receiver.start()
                vms = ctx.services["vms"]
                vms.create(VmDefinition.from_dict(DEFINITION))
                # This process stands in for the incoming QEMU (alive, its RAM file).
                vms._save_run("web1", VmRun(os.getpid(), "/q.sock", "/a.sock", str(ram)))
                vms.migrating["web1"] = "target"

                receiver = AgentReceiver(client.ssl_context, address, "web1")
                await receiver.start()
                listen = await receiver.call("listen", {"session": SESSION, "tls": True}, 30)
                assert listen["page_count"] == 256 and listen["port"] > 0
                # The agent's child, on the agent's host; its credentials are the node's.
                (child,) = _receivers_of(os.getpid())
                assert child.ppid() == os.getpid()
                with pytest.raises(ConfigError, match="takes listen and close, not 'sweep'"):
                    await receiver.call("sweep", {}, 5)
                second = AgentReceiver(client.ssl_context, address, "web1")
                with pytest.raises(StreamError, match="already has a pagestream receiver"):
                    await second.start()
                # The websocket closes: the receiver is ended with it.
                await receiver.close()
                assert await _gone(child), "the receiver outlived its websocket"

                # The receiver dies: the engine's side hears it, with its exit code.
                receiver = AgentReceiver(client.ssl_context, address, "web1")
                await receiver.start()
                await receiver.call("listen", {"session": SESSION, "tls": False}, 30)
                (child,) = _receivers_of(os.getpid())
                child.kill()
                with pytest.raises(StreamError, match="exited with code -9"):
                    await receiver.wait_event("applied", 10)
                await receiver.close()

                # The source's agent dies (SIGKILL, no close frame): the receiver goes too.
                source = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", _SOURCE, str(member.path), address,
                    stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                )  # fmt: skip
                assert source.stdout is not None
                line = await asyncio.wait_for(source.stdout.readline(), 30)
                assert line.startswith(b"listening"), line
                (child,) = _receivers_of(os.getpid())
                source.kill()
                await source.wait()
                assert await _gone(child), "the receiver outlived its source agent"

                # Dropping the incoming VM ends a receiver that still runs.
                receiver = AgentReceiver(client.ssl_context, address, "web1")
                await receiver.start()
                await receiver.call("listen", {"session": SESSION, "tls": False}, 30)
                (child,) = _receivers_of(os.getpid())
                await streamlink.end_receiver(ctx, "web1")
                assert await _gone(child)
                with pytest.raises(StreamError):
                    await receiver.wait_event("applied", 10)
                await receiver.close()
        finally:
            if vms is not None:
                vms.migrating.clear()
            await runner.cleanup()

    asyncio.run(run())
