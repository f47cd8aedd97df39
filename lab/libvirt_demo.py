"""``livemig demo --libvirt``: the test guest as a libvirt domain, moved by libvirt.

A fresh :class:`~lab.net.Lab` with a libvirtd on hosts A and B
(:class:`~lab.libvirt.LibvirtLab`); the guest defined and started on A as a
persistent domain (shared file-backed RAM, its NIC on A's bridge, its serial
console on a socket under the daemon's private /var/lib/libvirt, which is the
same path on B); probed from the client every millisecond while the engine's
``libvirt`` strategy migrates it to B; then the guest's own check on B's console.

The benchmark runs the same demo three ways (:data:`LIBVIRT_WAYS`): livemig steering
libvirt's job, libvirt left at its defaults, and Nova's libvirt driver's schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from lab.demo import (
    DemoConfig,
    DemoHooks,
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
from migrate.deadline import within
from migrate.errors import ConfigError
from migrate.events import EventBus
from migrate.libvirt import LibvirtEndpoint, LibvirtMigration, LibvirtRequest
from migrate.policy import Policy
from migrate.presets import preset
from migrate.vmspec import VMSpec

#: The console socket, inside each daemon's private /var/lib/libvirt: one path in the
#: domain XML, a different file per host.
CONSOLE_DIR = Path("/var/lib/libvirt")


@dataclass(frozen=True)
class LibvirtWay:
    """How a libvirt migration is run: who steers libvirt's job (``policy``'s
    controller) and whether livemig keeps the target paused to compare its RAM
    (``verify``; otherwise libvirt resumes it in its Finish phase). ``follows`` says
    whose behaviour it reproduces."""

    name: str
    policy: Policy
    verify: bool
    follows: str


#: libvirt as ``virsh migrate --live --p2p`` leaves it: nothing set, nothing steered.
LIBVIRT_DEFAULT_POLICY = Policy(
    name="libvirt-default", controller="none", announce_initial_ms=None,
    compression_allowed=False, max_throttle_pct=0,
)  # fmt: skip

LIBVIRT_WAYS: dict[str, LibvirtWay] = {
    "livemig": LibvirtWay(
        "livemig",
        preset("livemig"),
        True,
        "livemig's controller carried out through libvirt's calls; the target kept "
        "paused (VIR_MIGRATE_PAUSED) until its RAM matched the source's",
    ),
    "libvirt-default": LibvirtWay(
        "libvirt-default",
        LIBVIRT_DEFAULT_POLICY,
        False,
        "migrateToURI3 LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE (virsh migrate --live "
        "--p2p --persistent --undefinesource) at libvirt's defaults: "
        "QEMU's 300 ms downtime limit, libvirt's unlimited bandwidth, nobody steers; "
        "libvirt resumes the target in its Finish phase",
    ),
    "nova": LibvirtWay(
        "nova",
        preset("nova"),
        False,
        "Nova's libvirt driver (nova/virt/libvirt/driver.py, migration.py): migrateToURI3 "
        "LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE, live_migration_bandwidth 0 (libvirt's "
        "unlimited), _live_migration_monitor every 0.5 s raising the downtime by "
        "downtime_steps (50 ms at once ... 500 ms, one step per 75 s/GiB), abort past "
        "800 s/GiB; libvirt resumes the target",
    ),
}


def libvirt_way(name: str) -> LibvirtWay:
    """The way called ``name``. Raises :class:`ConfigError` for unknown names."""
    try:
        return LIBVIRT_WAYS[name]
    except KeyError:
        raise ConfigError(
            f"unknown libvirt way {name!r} (known: {', '.join(LIBVIRT_WAYS)})"
        ) from None


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


async def run_libvirt_demo(
    config: DemoConfig, events: EventBus | None = None, hooks: DemoHooks | None = None
) -> DemoResult:
    """The demo through libvirt; the result carries the report also when it failed.

    ``hooks.before_migration`` gets both consoles (as QEMU processes: ``.console``
    only; the target's QEMU does not exist yet). Raises :class:`~migrate.errors.LivemigError` subclasses for set-up failures and
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
                if hooks is not None and hooks.before_migration is not None:
                    await hooks.before_migration(source.as_qemu(), target.as_qemu())
                link_before = lab.migration_link_stats(lab.host_a).tx_bytes
                migration = LibvirtMigration(lab_request(daemons, spec.name, config), events=events)
                report = await migration.run()
                await asyncio.sleep(config.settle_s)
                wire = lab.migration_link_stats(lab.host_a).tx_bytes - link_before
                if report.status == "completed":
                    await within(asyncio.shield(attach), 5)
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
