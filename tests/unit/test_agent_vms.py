"""Agent-owned VMs without QEMU: what an agent takes, adoption's command-line reading, migrate
options, and the VM/migration routes' refusals through a real in-process agent (mTLS)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest
from aiohttp import web

from migrate.agent.app import AgentContext, create_app
from migrate.agent.client import AgentClient
from migrate.agent.metrics import AgentMetrics
from migrate.agent.migrations import MigrateOptions
from migrate.agent.tlsgate import GatedTLSSite
from migrate.agent.vms import check_definition
from migrate.cluster import pki, tls
from migrate.cluster.address import parse_address
from migrate.cluster.errors import AgentRefused
from migrate.cluster.state import Member, NodeIdentity, StateDir, create_cluster
from migrate.errors import ConfigError
from migrate.hostvm import nics_on_bridges, parse_qemu_argv
from migrate.vmdef import NicDef, RamBackend, RamDef, VmDefinition
from migrate.vmspec import LaunchSite

DEFINITION = VmDefinition(
    name="web1",
    memory_mib=128,
    vcpus=2,
    cpu_model="qemu64,+ssse3",
    kernel="/srv/vmlinuz",
    initrd="/srv/initrd",
    append="console=ttyS0 quiet",
    nics=(NicDef("52:54:00:00:00:01", "net0", bridge="br0"),),
).to_dict()


def test_agents_take_file_ram_and_bridge_nics_only() -> None:
    definition = VmDefinition.from_dict(DEFINITION)
    check_definition(definition)
    for bad, needle in (
        ({**DEFINITION, "ram": {"backend": "anonymous"}}, "file RAM backend"),
        (
            {**DEFINITION, "nics": [{"mac": "52:54:00:00:00:01", "tap": "tap7"}]},
            "not a fixed tap",
        ),
    ):
        with pytest.raises(ConfigError, match=needle):
            check_definition(VmDefinition.from_dict(bad))


def test_adoption_reads_back_what_the_agent_launched() -> None:
    """The agent's argv (hostvm's, plus its own QMP monitor) parsed back by
    hostvm.parse_qemu_argv; taps become NICs on their bridges again."""
    definition = VmDefinition.from_dict(DEFINITION)
    site = LaunchSite(
        qmp_socket=Path("/run/q.sock"),
        serial_socket=None,
        serial_log=Path("/run/serial.log"),
        ram_path=Path("/dev/shm/x.ram"),
        taps={"net0": "tap7"},
    )
    argv = [
        *definition.spec().qemu_argv(site),
        "-chardev", "socket,id=qmpx0,path=/run/a.sock,server=on,wait=off",
        "-mon", "chardev=qmpx0,mode=control",
        "-daemonize", "-pidfile", "/run/qemu.pid",
    ]  # fmt: skip
    parsed = parse_qemu_argv(argv)
    assert parsed.qmp_sockets == (Path("/run/q.sock"), Path("/run/a.sock"))
    adopted = nics_on_bridges(parsed.definition, {"tap7": "br0"})
    assert adopted == definition
    check_definition(adopted)
    with pytest.raises(ConfigError, match="on no bridge"):
        nics_on_bridges(parsed.definition, {})
    anonymous = dataclasses.replace(definition, ram=RamDef(backend=RamBackend.ANONYMOUS))
    plain = parse_qemu_argv(anonymous.spec().qemu_argv(site)).definition
    with pytest.raises(ConfigError, match="file RAM backend"):
        check_definition(nics_on_bridges(plain, {"tap7": "br0"}))


def test_migrate_options() -> None:
    options = MigrateOptions.from_json({"to": "b", "strategy": "pagestream", "tls": False})
    assert (options.to, options.strategy, options.tls) == ("b", "pagestream", False)
    assert MigrateOptions.from_json(options.to_json()) == options
    with pytest.raises(ConfigError, match="unknown migrate option"):
        MigrateOptions.from_json({"to": "b", "bogus": 1})
    with pytest.raises(ConfigError, match="tls must be true or false"):
        MigrateOptions.from_json({"to": "b", "tls": "yes"})


def _member(ca_state: StateDir, path: Path, name: str, address: str) -> StateDir:
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
    ca_state.write_members(members)
    state = StateDir(path)
    state.install(
        NodeIdentity(name, addr), pki.cert_pem(ca), pki.cert_pem(cert), node.key_pem, members
    )
    return state


def test_vm_and_migration_routes_refuse_in_one_line(tmp_path: Path) -> None:
    state_a = StateDir(tmp_path / "a")
    create_cluster(state_a, "a", parse_address("127.0.0.1:7443"))
    member = _member(state_a, tmp_path / "b", "b", "127.0.0.1:7444")
    log = logging.getLogger("test.agent.vms")
    ctx = AgentContext(state_a, state_a.require_member(), AgentMetrics(), log)

    async def run() -> None:
        runner = web.AppRunner(create_app(ctx), access_log=None)
        await runner.setup()
        site = GatedTLSSite(runner, "127.0.0.1", 0, tls.server_context(state_a), lambda *_: None)
        await site.start()
        address = f"127.0.0.1:{site.bound_port}"
        try:
            async with AgentClient(member, timeout_s=5) as client:
                assert await client.get_json(address, "/v1/vms") == {"node": "a", "vms": []}
                cases = [
                    ("GET", "/v1/vms/ghost", None, 404, "no VM 'ghost' on node 'a'"),
                    (
                        "POST",
                        "/v1/vms",
                        {"definition": {"name": "x"}},
                        400,
                        "missing field 'memory_mib'",
                    ),
                    ("POST", "/v1/vms/ghost/migrate", {"to": "b"}, 404, "no VM 'ghost'"),
                    ("POST", "/v1/vms/ghost/start", {}, 404, "no VM 'ghost'"),
                    ("POST", "/v1/vms/adopt", {"qmp_socket": "rel"}, 400, "absolute path"),
                    ("POST", "/v1/vms/ghost/incoming/commit", {}, 409, "not an incoming migration"),
                    ("GET", "/v1/vms/ghost/ram/digest", None, 409, "not running here"),
                    ("POST", "/v1/migrations/nope/abort", {}, 404, "no migration 'nope'"),
                ]
                for method, path, body, status, needle in cases:
                    with pytest.raises(AgentRefused) as caught:
                        if method == "GET":
                            await client.get_json(address, path)
                        else:
                            await client.post_json(address, path, body)
                    assert caught.value.status == status, (path, caught.value)
                    assert needle in str(caught.value), (path, caught.value)
                    assert "\n" not in str(caught.value)
                # A defined, stopped VM: migrate refuses before anything starts.
                ctx.services["vms"].create(VmDefinition.from_dict(DEFINITION))
                with pytest.raises(AgentRefused, match="not running on node 'a'"):
                    await client.post_json(address, "/v1/vms/web1/migrate", {"to": "b"})
                shown = await client.get_json(address, "/v1/vms/web1")
                assert shown["state"] == "stopped" and shown["definition"] == DEFINITION
        finally:
            await runner.cleanup()

    asyncio.run(run())
