"""Host VMs with real QEMU: launch from a definition, adopt from the QMP socket, stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lab.guest import GuestImage
from migrate.errors import ConfigError, QemuLaunchError
from migrate.hostvm import adopt_vm, launch_vm, stop_vm
from migrate.qmp import QmpSession, process_exited
from migrate.tls import client_context, write_qemu_creds_dir
from migrate.vmdef import VmDefinition
from migrate.vmspec import QmpTlsListen
from tests.pki_helper import ThrowawayCa


def test_launch_adopt_stop(guest: GuestImage, tmp_path: Path) -> None:
    definition = VmDefinition(
        name="hostvm",
        memory_mib=64,
        kernel=str(guest.kernel),
        initrd=str(guest.initrd),
        append="console=ttyS0 quiet",
    )
    ca = ThrowawayCa.create()
    node = ca.issue(tmp_path / "node", "node-b", "127.0.0.1")
    client = ca.issue(tmp_path / "client", "node-a", "127.0.0.2")
    creds_dir = write_qemu_creds_dir(node, tmp_path / "node" / "qemu-tls")

    async def scenario() -> None:
        vm = await launch_vm(
            definition, tmp_path / "vm", incoming=True, paused=True,
            qmp_tls=QmpTlsListen("127.0.0.1", 4991, creds_dir),
        )  # fmt: skip
        try:
            assert vm.ram_path == tmp_path / "vm" / "ram" and vm.ram_path.exists()
            adopted = await adopt_vm(vm.qmp_socket)
            # The definition survives the trip through QEMU's command line.
            assert adopted.definition == definition and adopted.pid == vm.pid
            assert adopted.ram_path == vm.ram_path and adopted.adopted
            remote = await QmpSession.connect_tcp(
                "127.0.0.1", 4991, "remote", client_context(client), 5.0
            )
            try:
                assert await remote.status() == "inmigrate"
            finally:
                await remote.close()
            with pytest.raises(QemuLaunchError, match="exited with"):
                await launch_vm(definition, tmp_path / "vm2", binary="false")
            with pytest.raises(ConfigError, match="options livemig does not know"):
                # Another QEMU (not livemig's) with an option it cannot move.
                await _adopt_foreign(tmp_path)
        finally:
            await stop_vm(vm)
        assert process_exited(vm.pid)
        assert not vm.qmp_socket.exists() and not vm.ram_path.exists()

    asyncio.run(scenario())


async def _adopt_foreign(tmp_path: Path) -> None:
    sock = tmp_path / "foreign.sock"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-m", "32",
        "-vnc", "none", "-qmp", f"unix:{sock},server=on,wait=off",
    )  # fmt: skip
    try:
        await adopt_vm(sock, timeout_s=10.0)
    finally:
        proc.kill()
        await proc.wait()
