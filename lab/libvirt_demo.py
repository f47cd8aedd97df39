"""``livemig demo --libvirt``: the test guest as a libvirt domain, moved by libvirt.

A fresh :class:`~lab.net.Lab` with a libvirtd on hosts A and B
(:class:`~lab.libvirt.LibvirtLab`); the guest defined and started on A as a
persistent domain (shared file-backed RAM, its NIC on A's bridge, its serial
console on a socket under the daemon's private /var/lib/libvirt, which is the
same path on B); probed from the client every millisecond while the engine's
``libvirt`` strategy migrates it to B; then the guest's own check on B's console.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, cast

from lab.demo import (
    DemoConfig,
    DemoResult,
    _with_probe,
    guest_check,
    guest_spec,
    needs_disk,
    prepare_guest,
    wait_workload_started,
)
from lab.guest import cache_dir
from lab.libvirt import DomainSite, LibvirtHost, LibvirtLab, domain_xml
from lab.net import Lab
from lab.probe import NetworkProbe
from lab.qemu import QemuProcess, SerialConsole
from migrate.errors import ConfigError
from migrate.events import EventBus
from migrate.libvirt import LibvirtEndpoint, LibvirtMigration, LibvirtRequest
from migrate.vmspec import VMSpec

#: The console socket, inside each daemon's private /var/lib/libvirt: one path in the
#: domain XML, a different file per host.
CONSOLE_DIR = Path("/var/lib/libvirt")


class DomainConsole:
    """A libvirt domain's serial console on one host, read like a QemuProcess's."""

    def __init__(self, host: LibvirtHost, name: str) -> None:
        self.host = host
        self.name = name
        self.console = SerialConsole()
        self.socket = host.workdir / "lib" / f"{name}.serial"

    @property
    def alive(self) -> bool:
        out = self.host.virsh("domstate", self.name, check=False).strip()
        return out in ("running", "paused")

    @property
    def returncode(self) -> int | None:
        return None

    async def attach(self, timeout: float) -> None:
        """Connect once the domain's QEMU has created the socket."""
        deadline = time.monotonic() + timeout
        while not self.socket.is_socket():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no console socket {self.socket} within {timeout:.0f} s")
            await asyncio.sleep(0.01)
        await self.console.attach(self.socket, deadline)

    def as_qemu(self) -> QemuProcess:
        """For the lab's helpers that read ``.console``/``.alive``/``.returncode``."""
        return cast(QemuProcess, self)


def lab_request(
    daemons: LibvirtLab, domain: str, config: DemoConfig, **kwargs: Any
) -> LibvirtRequest:
    """The request moving ``domain`` from lab host A's daemon to B's."""
    a, b = daemons.host_a, daemons.host_b
    return LibvirtRequest(
        source=LibvirtEndpoint(f"host-a ({a.host.netns})", a.uri),
        target=LibvirtEndpoint(f"host-b ({b.host.netns})", b.uri, b.peer_uri),
        domain=domain,
        policy=config.policy,
        offline=config.offline,
        verify=config.verify,
        repair=config.repair,
        force=config.force,
        **kwargs,
    )


def define_guest(daemons: LibvirtLab, lab: Lab, spec: VMSpec, cpu_xml: str | None = None) -> str:
    """Define ``spec`` as a persistent domain on host A (its NIC on a new tap of A's
    bridge; a tap of the same name waits on B); returns the XML."""
    tap = lab.add_tap(lab.host_a)
    tap_b = lab.add_tap(lab.host_b)
    if tap_b != tap:
        raise RuntimeError(f"tap names differ between the hosts ({tap}, {tap_b})")
    xml = domain_xml(spec, DomainSite(tap, CONSOLE_DIR / f"{spec.name}.serial"), cpu_xml)
    path = daemons.host_a.workdir / f"{spec.name}.xml"
    path.write_text(xml)
    daemons.host_a.virsh("define", str(path))
    return xml


async def start_guest(daemons: LibvirtLab, spec: VMSpec, config: DemoConfig) -> DomainConsole:
    """Start the defined guest on host A paused, attach its console, run it, wait for
    its workload."""
    host = daemons.host_a
    await asyncio.to_thread(host.virsh, "start", "--paused", spec.name)
    console = DomainConsole(host, spec.name)
    await console.attach(10)
    await asyncio.to_thread(host.virsh, "resume", spec.name)
    await wait_workload_started(console.as_qemu(), config.workload)
    return console


async def run_libvirt_demo(config: DemoConfig, events: EventBus | None = None) -> DemoResult:
    """The demo through libvirt; the result carries the report also when it failed.

    Raises :class:`~migrate.errors.LivemigError` subclasses for set-up failures and
    refusals.
    """
    if needs_disk(config):
        raise ConfigError(
            "the libvirt demo gives its guest no disk yet: drop the disk workload and "
            "--with-local-disks (or use the native or pagestream strategy)"
        )
    events = events or EventBus()
    guest, accel, environment = await prepare_guest(config)
    with (
        Lab(bandwidth_mbit=config.bandwidth_mbit) as lab,
        LibvirtLab(lab, cache_dir() / "libvirt") as daemons,
    ):
        address = lab.next_guest_address()
        guest_ip = address.split("/")[0]
        spec = guest_spec(config, guest, accel, address)
        define_guest(daemons, lab, spec)
        source = await start_guest(daemons, spec, config)
        target = DomainConsole(daemons.host_b, spec.name)
        attach = asyncio.create_task(target.attach(120))
        try:
            async with NetworkProbe(
                guest_ip, lab.client_ns, config.probe_interval_ms / 1e3
            ) as probe:
                probe_started = time.time()
                await asyncio.sleep(config.warmup_s)
                link_before = lab.migration_link_stats(lab.host_a).tx_bytes
                migration = LibvirtMigration(lab_request(daemons, spec.name, config), events=events)
                report = await migration.run()
                await asyncio.sleep(config.settle_s)
                wire = lab.migration_link_stats(lab.host_a).tx_bytes - link_before
                if report.status == "completed":
                    await asyncio.wait_for(asyncio.shield(attach), 5)
                    check = await guest_check(target.as_qemu(), config.workload, 0)
                    report = dataclasses.replace(report, guest_check=check)
            assert probe.record is not None
            report = dataclasses.replace(
                _with_probe(report, probe.record, probe_started), wire_bytes=wire
            )
        finally:
            attach.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, OSError):
                await attach
            await source.console.close()
            await target.console.close()
    environment = dataclasses.replace(environment, cpu_model=spec.cpu_model)
    return DemoResult(report=report, environment=environment)
