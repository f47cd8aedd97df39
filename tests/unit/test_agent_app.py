"""The agent's application: routes vs. OpenAPI, the mutual-TLS rule, joining, metrics.

The TLS tests run a real agent on 127.0.0.1 (port chosen by the kernel) in-process:
a member's certificate gets in, no certificate gets 403 on member routes, a
certificate from another CA fails the handshake and the agent logs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from migrate.agent import openapi
from migrate.agent.app import AgentContext, create_app
from migrate.agent.client import AgentClient
from migrate.agent.metrics import AgentMetrics
from migrate.agent.nodes import remove_node
from migrate.agent.tlsgate import GatedTLSSite
from migrate.cluster import pki, tls
from migrate.cluster.address import parse_address
from migrate.cluster.errors import AgentError, AgentRefused
from migrate.cluster.state import Member, NodeIdentity, StateDir, create_cluster
from migrate.cluster.tokens import TokenStore
from migrate.errors import ConfigError
from migrate.phase import Phase
from migrate.report import MigrationReport, Status, Timeline

ROOT = Path(__file__).resolve().parents[2]


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _context(state: StateDir) -> tuple[AgentContext, ListHandler]:
    log = logging.getLogger(f"test.agent.{id(state)}")
    log.propagate = False
    handler = ListHandler()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    ctx = AgentContext(state, state.require_member(), AgentMetrics(), log)
    return ctx, handler


@pytest.fixture
def state_a(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "a")
    create_cluster(state, "a", parse_address("127.0.0.1:7443"))
    return state


def _member_state(ca_state: StateDir, path: Path, name: str, address: str) -> StateDir:
    """A second member's state, signed directly by ``ca_state``'s CA."""
    addr = parse_address(address)
    node = pki.make_csr(name, addr.host)
    ca = ca_state.ca_cert()
    cert = pki.sign_node(
        pki.load_csr(node.csr_pem), name, addr.host, ca, pki.load_key(ca_state.ca_key_pem())
    )
    members = (
        *ca_state.members(),
        Member(name, str(addr), False, pki.fingerprint(cert), time.time()),
    )
    state = StateDir(path)
    state.install(
        NodeIdentity(name, addr), pki.cert_pem(ca), pki.cert_pem(cert), node.key_pem, members
    )
    return state


def _registered(app: web.Application) -> set[tuple[str, str]]:
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp adds HEAD for every GET
        info = route.resource.canonical if route.resource is not None else ""
        routes.add((route.method, info))
    return routes


def test_every_route_is_documented_and_nothing_else(state_a: StateDir) -> None:
    app = create_app(_context(state_a)[0])
    doc = openapi.document()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert _registered(app) == documented
    public = {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items()
              if op.get("security") == []}  # fmt: skip
    assert public == {("GET", "/v1/cluster/ca"), ("POST", "/v1/cluster/join")}


def test_the_committed_document_is_current() -> None:
    committed = json.loads((ROOT / "docs" / "agent-openapi.json").read_text())
    assert committed == openapi.document(), (
        "run: python -m migrate.agent.openapi docs/agent-openapi.json"
    )


def test_extra_route_modules_plug_in(state_a: StateDir) -> None:
    async def example(_request: web.Request) -> web.Response:
        return web.json_response({"example": []})

    def register(router: Any) -> None:
        router.add("GET", "/v1/example", example, summary="VMs")

    app = create_app(_context(state_a)[0], extra=[register])
    assert ("GET", "/v1/example") in _registered(app)


@asynccontextmanager
async def _plain_client(
    ctx: AgentContext,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = TestClient(TestServer(create_app(ctx)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def test_without_a_certificate_only_ca_and_join_answer(state_a: StateDir) -> None:
    ctx, log = _context(state_a)

    async def run() -> None:
        async with _plain_client(ctx) as client:
            resp = await client.get("/v1/cluster/ca")
            assert resp.status == 200
            assert (await resp.json())["ca_sha256"] == state_a.ca_fingerprint()
            for path in (
                "/v1/node",
                "/v1/cluster/members",
                "/metrics",
                "/v1/openapi.json",
                "/nope",
            ):
                resp = await client.get(path)
                assert resp.status == 403, path
                assert (await resp.json())["reason"] == "no-client-cert"

    asyncio.run(run())
    assert (
        sum("REFUSED" in line and "client certificate is required" in line for line in log.lines)
        == 5
    )


def test_join_signs_records_and_consumes_the_token_once(state_a: StateDir) -> None:
    ctx, log = _context(state_a)
    token = TokenStore(state_a).issue(60)
    node = pki.make_csr("b", "127.0.0.2")
    body = {
        "token": token,
        "name": "b",
        "address": "127.0.0.2:7443",
        "csr_pem": node.csr_pem.decode(),
    }

    async def run() -> None:
        async with _plain_client(ctx) as client:
            # A CSR for another name: refused, the token stays usable.
            other = pki.make_csr("x", "127.0.0.2")
            resp = await client.post(
                "/v1/cluster/join", json={**body, "csr_pem": other.csr_pem.decode()}
            )
            assert resp.status == 400
            resp = await client.post("/v1/cluster/join", json={**body, "token": "A" * 43})
            assert resp.status == 403 and (await resp.json())["reason"] == "token-unknown"
            resp = await client.post("/v1/cluster/join", json=body)
            assert resp.status == 200, await resp.text()
            reply = await resp.json()
            cert = pki.load_cert(reply["node_cert_pem"].encode())
            pki.check_node_cert(cert, state_a.ca_cert(), node.key_pem)
            assert [m["name"] for m in reply["members"]["members"]] == ["a", "b"]
            resp = await client.post("/v1/cluster/join", json=body)
            assert resp.status == 403 and (await resp.json())["reason"] == "token-used"
            resp = await client.post("/v1/cluster/join", data=b"[1, 2")
            assert resp.status == 400

    asyncio.run(run())
    assert [m.name for m in state_a.members()] == ["a", "b"]
    assert any(line.startswith("JOINED b") for line in log.lines)


def test_mutual_tls_end_to_end(state_a: StateDir, tmp_path: Path) -> None:
    ctx, log = _context(state_a)
    refused: list[str] = []

    async def run() -> None:
        runner = web.AppRunner(create_app(ctx), access_log=None)
        await runner.setup()
        site = GatedTLSSite(runner, "127.0.0.1", 0, tls.server_context(state_a),
                            lambda peer, exc: refused.append(f"{peer} {exc}"))  # fmt: skip
        await site.start()
        try:
            address = f"127.0.0.1:{site.bound_port}"
            # The member's address in its certificate is 127.0.0.1 as well.
            member = _member_state(state_a, tmp_path / "b", "b", "127.0.0.1:7444")
            async with AgentClient(member, timeout_s=5) as client:
                # Signed by our CA, but not in a's member list: refused, in one line.
                with pytest.raises(AgentRefused, match=r"node 'b' .* is not a member") as no:
                    await client.get_json(address, "/v1/node")
                assert no.value.status == 403 and "\n" not in str(no.value)
                state_a.write_members(member.members())
                node = await client.get_json(address, "/v1/node")
                assert node["name"] == "a" and node["memory"]["available_bytes"] > 0
                # Only the CA's node may push members.
                with pytest.raises(AgentRefused, match="only 'a'"):
                    await client.post_json(
                        address, "/v1/cluster/members", {"version": 1, "members": []}
                    )
                # `cluster remove b` on a (the CA's node): a refuses b from then on.
                with pytest.raises(ConfigError, match="is this node"):
                    await remove_node(state_a, "a")
                with pytest.raises(ConfigError, match="no node 'zz'"):
                    await remove_node(state_a, "zz")
                with pytest.raises(ConfigError, match="does not hold the cluster CA"):
                    await remove_node(member, "a")
                left, failed = await remove_node(state_a, "b")
                assert [m.name for m in left] == ["a"] and failed == []
                with pytest.raises(AgentRefused, match="not a member"):
                    await client.get_json(address, "/v1/node")
            foreign = StateDir(tmp_path / "x")
            create_cluster(foreign, "x", parse_address("127.0.0.1:7445"))
            # A foreign member trusting our CA but presenting its own certificate.
            ctx_foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx_foreign.load_verify_locations(cafile=state_a.ca_path)
            ctx_foreign.load_cert_chain(foreign.cert_path, foreign.key_path)
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(f"https://{address}/v1/node", ssl=ctx_foreign) as resp:
                        await resp.read()
            # Plain HTTP on the TLS port: the handshake fails, is logged, the socket closes.
            reader, writer = await asyncio.open_connection("127.0.0.1", site.bound_port)
            writer.write(b"GET /v1/node HTTP/1.0\r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            # And a foreign cluster's client does not trust us.
            async with AgentClient(foreign, timeout_s=5) as client:
                with pytest.raises(AgentError, match="not trusted"):
                    await client.get_json(address, "/v1/node")
        finally:
            await runner.cleanup()

    asyncio.run(run())
    assert any(" b GET /v1/node -> 200" in line for line in log.lines), log.lines
    assert any("REFUSED" in ln and "not a member" in ln for ln in log.lines), log.lines
    assert any("certificate" in r for r in refused), refused
    assert any("HTTP" in r or "version" in r.lower() or "record" in r.lower() for r in refused), (
        refused
    )


def test_metrics_record_a_report() -> None:
    metrics = AgentMetrics()
    report = MigrationReport(
        status=Status.COMPLETED, strategy="native", mode="live", vm="vm", source="a",
        target="b", policy="livemig", phase=Phase.COMPLETED, total_time_ms=812.0,
        ram_bytes=1 << 28, timeline=Timeline(started_at=1.0), downtime_ms=4.0,
        guest_downtime_ms=41.5, transferred_bytes=100, wire_bytes=120,
    )  # fmt: skip
    metrics.record_report(report)
    metrics.record_report(report)
    text = metrics.exposition().decode()
    assert 'livemig_migrations_total{status="completed",strategy="native"} 2.0' in text
    assert 'livemig_migration_bytes_total{kind="wire",strategy="native"} 240.0' in text
    assert 'livemig_migration_guest_downtime_seconds_count{strategy="native"} 2.0' in text
    assert 'livemig_migration_qemu_downtime_seconds_sum{strategy="native"} 0.008' in text
    assert 'livemig_migration_total_time_seconds_bucket{le="1.0",strategy="native"} 2.0' in text
