"""Two in-process agents on 127.0.0.1: a node joins through ``join_cluster`` (the
CLI's code path), the CA's node pushes the new member list to the other member,
and a key with a wrong fingerprint sends nothing and writes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web

from migrate.agent.join import join_cluster
from migrate.agent.nodes import list_nodes
from migrate.agent.server import serve
from migrate.cli import main
from migrate.cluster import pki, tls
from migrate.cluster.address import parse_address
from migrate.cluster.errors import AgentRefused, TrustError
from migrate.cluster.joinkey import JoinKey
from migrate.cluster.state import Member, NodeIdentity, StateDir, create_cluster
from migrate.cluster.tokens import TokenStore


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _key(state: StateDir, ttl_s: float = 60) -> JoinKey:
    identity = state.require_member()
    token = TokenStore(state).issue(ttl_s)
    return JoinKey(str(identity.address), state.ca_fingerprint(), token)


async def _wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_join_push_and_refusals_between_two_agents(tmp_path: Path) -> None:
    addr_a = parse_address(f"127.0.0.1:{_free_port()}")
    addr_b = parse_address(f"127.0.0.1:{_free_port()}")
    a = StateDir(tmp_path / "a")
    create_cluster(a, "a", addr_a)

    async def run() -> None:
        stop = asyncio.Event()
        agent_a = asyncio.create_task(serve(a, stop=stop))
        await _wait_for(lambda: "listening on" in (a.path / "agent.log").read_text()
                        if (a.path / "agent.log").exists() else False)  # fmt: skip
        b = StateDir(tmp_path / "b")
        members = await join_cluster(b, "b", addr_b, _key(a))
        assert [m.name for m in members] == ["a", "b"]
        agent_b = asyncio.create_task(serve(b, stop=stop))
        await _wait_for(lambda: (b.path / "agent.log").exists()
                        and "listening on" in (b.path / "agent.log").read_text())  # fmt: skip

        # Wrong fingerprint: refused on the joining side, nothing written anywhere.
        c = StateDir(tmp_path / "c")
        before = (a.path / "members.json").read_bytes()
        wrong = dataclasses.replace(_key(a), ca_sha256="f" * 64)
        with pytest.raises(TrustError, match="refusing to send the token"):
            await join_cluster(c, "c", parse_address("127.0.0.1:1"), wrong)
        assert not c.path.exists() and (a.path / "members.json").read_bytes() == before

        # A name already taken: refused, the token stays usable.
        key = _key(a)
        with pytest.raises(AgentRefused, match="already a member"):
            await join_cluster(c, "b", parse_address("127.0.0.1:2"), key)
        assert not c.path.exists()
        await join_cluster(c, "c", parse_address("127.0.0.1:3"), key)

        # A pushed the new list to B.
        await _wait_for(lambda: [m.name for m in b.members()] == ["a", "b", "c"])
        statuses = {s.member.name: s for s in await list_nodes(b, timeout_s=2)}
        assert statuses["a"].reachable and statuses["b"].reachable
        assert not statuses["c"].reachable  # c's agent is not running
        stop.set()
        await asyncio.wait_for(asyncio.gather(agent_a, agent_b), 10)

    asyncio.run(run())
    log_a = (a.path / "agent.log").read_text()
    assert "member list pushed to b" in log_a and "REFUSED" in log_a


def test_the_joining_node_checks_the_fingerprint_itself(tmp_path: Path) -> None:
    """An agent that ignores ``?expect=`` and shows another CA gets no token."""
    honest = StateDir(tmp_path / "a")
    create_cluster(honest, "a", parse_address("127.0.0.1:7443"))
    impostor = StateDir(tmp_path / "m")
    create_cluster(impostor, "m", parse_address("127.0.0.1:7443"))
    seen: list[str] = []

    async def ca(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        return web.json_response({"ca_pem": impostor.ca_pem().decode(), "ca_sha256": "x"})

    async def join(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        return web.json_response({})

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/v1/cluster/ca", ca)
        app.router.add_post("/v1/cluster/join", join)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context(impostor))
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            key = dataclasses.replace(_key(honest), address=f"127.0.0.1:{port}")
            with pytest.raises(TrustError, match="refusing to send the token"):
                await join_cluster(StateDir(tmp_path / "b"), "b", parse_address("127.0.0.1:1"), key)
        finally:
            await runner.cleanup()

    asyncio.run(run())
    assert len(seen) == 1 and seen[0].startswith("/v1/cluster/ca?expect=")
    assert not (tmp_path / "b").exists()


def test_cli_create_join_key_and_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "a"
    assert main(["cluster", "create", "--state-dir", str(state), "--name", "a",
                 "--address", "127.0.0.1:7443"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["cluster", "join-key", "--state-dir", str(state), "--ttl-s", "60"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and JoinKey.decode(out).address == "127.0.0.1:7443"

    assert main(["cluster", "join", "--state-dir", str(tmp_path / "b"), "--name", "b",
                 "--address", "127.0.0.2:7443", out.strip()[:-2] + "xx"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "join key is damaged" in err
    # A member that does not hold the CA cannot make keys.
    ca = StateDir(state)
    node = pki.make_csr("b", "127.0.0.2")
    cert = pki.sign_node(pki.load_csr(node.csr_pem), "b", "127.0.0.2", ca.ca_cert(),
                         pki.load_key(ca.ca_key_pem()))  # fmt: skip
    b = StateDir(tmp_path / "b")
    b.install(NodeIdentity("b", parse_address("127.0.0.2:7443")), ca.ca_pem(), pki.cert_pem(cert),
              node.key_pem, [*ca.members(), Member("b", "127.0.0.2:7443", False,
                                                   pki.fingerprint(cert), 0.0)])  # fmt: skip
    assert main(["cluster", "join-key", "--state-dir", str(b.path)]) == 1
    assert "does not hold the cluster CA" in capsys.readouterr().err
    assert main(["agent", "--state-dir", str(tmp_path / "none")]) == 1
    assert "holds no cluster" in capsys.readouterr().err
