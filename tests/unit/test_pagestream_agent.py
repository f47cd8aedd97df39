"""The agents as real processes, driven through AgentProcess in this namespace.

No QEMU and no lab: RAM files in a temp dir, the stream over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from dirtytrack.ram import WORDS_PER_PAGE
from migrate.errors import ConfigError, StreamError
from migrate.pagestream.control import AgentProcess, AgentRole, agent_argv
from tests.doubles import faulty_receiver_agent

PAGES = 1024
SESSION = base64.b64encode(b"fedcba9876543210").decode()


def ram_file(path: Path, seed: int | None) -> Path:
    data = np.zeros((PAGES, WORDS_PER_PAGE), dtype=np.uint64)
    if seed is not None:
        rng = np.random.default_rng(seed)
        data[::3] = rng.integers(0, 256, size=(len(data[::3]), WORDS_PER_PAGE))
    path.write_bytes(data.tobytes())
    return path


def test_agent_argv_wraps_in_a_namespace() -> None:
    plain = agent_argv(AgentRole.SENDER, None, python="/py")
    assert plain == ["/py", "-m", "migrate.pagestream.agent", "--role", "sender"]
    wrapped = agent_argv(AgentRole.RECEIVER, "ns-b", python="/py")
    assert wrapped[:4] == ["ip", "netns", "exec", "ns-b"] and wrapped[-1] == "receiver"
    other = agent_argv(AgentRole.RECEIVER, None, python="/py", module="site.agent")
    assert other == ["/py", "-m", "site.agent", "--role", "receiver"]


def test_sender_and_receiver_agents_move_ram(tmp_path: Path) -> None:
    source = ram_file(tmp_path / "src.ram", seed=1)
    target = ram_file(tmp_path / "dst.ram", seed=None)

    async def scenario() -> None:
        async with (
            AgentProcess(AgentRole.RECEIVER, log_path=tmp_path / "rx.log") as receiver,
            AgentProcess(AgentRole.SENDER) as sender,
        ):
            listen = await receiver.call(
                "listen",
                {"ram_path": str(target), "host": "127.0.0.1", "session": SESSION},
                timeout=30,
            )
            opened = await sender.call(
                "open",
                {
                    "ram_path": str(source),
                    "host": "127.0.0.1",
                    "port": listen["port"],
                    "session": SESSION,
                    "tracker": ["shadow-diff"],
                },
                timeout=30,
            )
            assert opened["tracker"] == "shadow-diff" and opened["page_count"] == PAGES
            sent = await sender.call("sweep")
            assert sent["pages"] == len(range(0, PAGES, 3)) and sent["batches_by_level"]
            final = await sender.call("final", timeout=30)
            assert final["round"]["pages"] == 0 and final["digest"]["chunks"] == 2
            applied = await receiver.wait_event("applied", 10)
            assert applied["round"] == 2
            verified = await receiver.wait_event("verified", 10)
            assert verified["ok"] is True
            await receiver.wait_event("done", 10)
            pids = [receiver.pid, sender.pid]
        assert all(not psutil.pid_exists(pid) for pid in pids if pid is not None)
        assert receiver.returncode == 0 and sender.returncode == 0

    asyncio.run(scenario())
    assert source.read_bytes() == target.read_bytes()


def test_another_agent_module_runs_as_the_receiver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The faulty-receiver double, run as the receiver agent: the digest catches its page."""
    monkeypatch.setenv("PYTHONPATH", faulty_receiver_agent.pythonpath_with_repo())
    source = ram_file(tmp_path / "src.ram", seed=1)
    target = ram_file(tmp_path / "dst.ram", seed=None)
    log = tmp_path / "rx.log"

    async def scenario() -> None:
        async with (
            AgentProcess(
                AgentRole.RECEIVER, log_path=log, module=faulty_receiver_agent.MODULE
            ) as receiver,
            AgentProcess(AgentRole.SENDER) as sender,
        ):
            assert faulty_receiver_agent.MODULE in receiver.argv
            listen = await receiver.call(
                "listen",
                {"ram_path": str(target), "host": "127.0.0.1", "session": SESSION},
                timeout=30,
            )
            await sender.call(
                "open",
                {
                    "ram_path": str(source),
                    "host": "127.0.0.1",
                    "port": listen["port"],
                    "session": SESSION,
                    "tracker": ["shadow-diff"],
                },
                timeout=30,
            )
            await sender.call("sweep")
            await sender.call("final", timeout=30)
            fault = await receiver.wait_event("fault", 10)
            verified = await receiver.wait_event("verified", 10)
            assert verified["ok"] is False and verified["differing_chunks"] == 1
            named = verified["named"][0]
            assert named["first_page"] <= fault["page"] <= named["last_page"]
            await receiver.wait_event("done", 10)
        assert faulty_receiver_agent.corrupted_pages(log) == [fault["page"]]

    asyncio.run(scenario())
    assert source.read_bytes() != target.read_bytes()


def test_agent_errors_come_back_typed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AgentProcess(AgentRole.SENDER) as sender:
            with pytest.raises(StreamError, match="not opened") as info:
                await sender.call("sweep")
            assert info.value.side == "sender" and info.value.kind == "config"
            with pytest.raises(ConfigError, match="unknown sender command"):
                await sender.call("fly")
            with pytest.raises(ConfigError, match="RamMappingError"):
                await sender.call(
                    "open",
                    {
                        "ram_path": str(tmp_path / "missing"),
                        "host": "127.0.0.1",
                        "port": 1,
                        "session": SESSION,
                    },
                )
            # Still answering after errors.
            assert await sender.call("close") == {}

    asyncio.run(scenario())


def test_a_dying_agent_fails_calls_and_waits(tmp_path: Path) -> None:
    target = ram_file(tmp_path / "dst.ram", seed=None)

    async def scenario() -> None:
        async with AgentProcess(AgentRole.RECEIVER) as receiver:
            await receiver.call(
                "listen",
                {"ram_path": str(target), "host": "127.0.0.1", "session": SESSION},
                timeout=30,
            )
            assert receiver.pid is not None
            psutil.Process(receiver.pid).kill()
            with pytest.raises(StreamError, match="exited with code -9") as info:
                await receiver.wait_event("applied", 10)
            assert info.value.kind == "agent"
            with pytest.raises(StreamError, match="exited"):
                await receiver.call("close")

    asyncio.run(scenario())


def test_wait_event_times_out_with_a_stream_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AgentProcess(AgentRole.RECEIVER) as receiver:
            with pytest.raises(StreamError, match=r"no 'applied' within 0\.2 s"):
                await receiver.wait_event("applied", 0.2)

    asyncio.run(scenario())


def test_receiver_failure_is_an_event_the_engine_raises(tmp_path: Path) -> None:
    target = ram_file(tmp_path / "dst.ram", seed=None)

    async def scenario() -> None:
        async with AgentProcess(AgentRole.RECEIVER) as receiver:
            listen = await receiver.call(
                "listen",
                {
                    "ram_path": str(target),
                    "host": "127.0.0.1",
                    "session": SESSION,
                    "accept_timeout_s": 30,
                },
            )
            _reader, writer = await asyncio.open_connection("127.0.0.1", listen["port"])
            writer.write(b"GET / HTTP/1.0\r\n\r\n" + bytes(16))
            await writer.drain()
            with pytest.raises(StreamError, match=r"checksum mismatch|bad frame magic") as info:
                await receiver.wait_event("applied", 10)
            assert info.value.side == "receiver" and info.value.kind == "protocol"
            assert receiver.failure is not None
            writer.close()

    asyncio.run(scenario())


CHILD = """
import asyncio, sys
from migrate.pagestream.control import AgentProcess, AgentRole

async def main():
    agent = AgentProcess(AgentRole.SENDER)
    await agent.start()
    print(agent.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_agent_dies_with_its_owner() -> None:
    """PDEATHSIG: an engine killed with SIGKILL takes its agents with it."""
    owner = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        agent_pid = int(owner.stdout.readline())
        assert psutil.pid_exists(agent_pid)
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(agent_pid):
            status = psutil.Process(agent_pid).status()
            if status == psutil.STATUS_ZOMBIE:
                break  # dead; its parent (init) reaps it
            assert time.monotonic() < deadline, "agent outlived its owner"
            psutil.wait_procs([psutil.Process(agent_pid)], timeout=0.1)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
