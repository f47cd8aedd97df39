"""Fixtures for tests that boot the real guest under QEMU in the namespace lab.

Prerequisites (root, QEMU, iproute2, the built guest) are checked once: a missing
one fails the tests, it never skips them. Each test gets its own lab; QEMU logs and
serial consoles go to the test's ``tmp_path`` (kept by pytest) so a failing test
leaves its logs behind. At session end, a leftover lab namespace or QEMU process
fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lab.accel import AccelChoice, choose_accelerator
from lab.demo import MIGRATION_PORT, DemoConfig, Workload, guest_spec, wait_workload_started
from lab.guest import GuestImage, ensure_guest
from lab.net import Lab, lab_namespaces, remove_namespace, sweep
from lab.probe import NetworkProbe
from lab.qemu import QemuProcess
from migrate.strategy import HostEndpoint, MigrationRequest
from migrate.vmspec import VMSpec


def _require_prerequisites() -> None:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the lab creates network namespaces and taps)")
    for tool in ("qemu-system-x86_64", "ip", "tc", "busybox", "cpio", "gcc"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if missing:
        pytest.fail(
            "integration prerequisites missing: " + ", ".join(missing) + " (run `make test`)"
        )


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    _require_prerequisites()
    sweep()  # labs left by a killed earlier run
    return ensure_guest()


@pytest.fixture(scope="session")
def accel(guest: GuestImage) -> AccelChoice:
    import asyncio

    return asyncio.run(choose_accelerator(guest))


@pytest.fixture
def lab(guest: GuestImage) -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


@dataclass
class Pair:
    """A booted source VM on host A and an incoming (paused) target on host B."""

    lab: Lab
    spec: VMSpec
    source: QemuProcess
    target: QemuProcess
    guest_ip: str

    def request(self, **kwargs: object) -> MigrationRequest:
        return MigrationRequest(
            source=HostEndpoint("host-a", self.source.site.qmp_socket),
            target=HostEndpoint(
                "host-b", self.target.site.qmp_socket, self.lab.host_b.migration_uri(MIGRATION_PORT)
            ),
            vm=self.spec.name,
            **kwargs,  # type: ignore[arg-type]
        )


async def livemig_cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``livemig ARGS`` to its end (within ``timeout``); exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "migrate.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def guest_answers(lab: Lab, ip: str, seconds: float = 0.5) -> int:
    """How many probe replies the guest sends in ``seconds`` (from the client namespace)."""
    import asyncio

    async with NetworkProbe(ip, lab.client_ns, 0.005) as probe:
        await asyncio.sleep(seconds)
    assert probe.record is not None
    return len(probe.record.reply_ns)


@dataclass
class VmFactory:
    lab: Lab
    guest: GuestImage
    accel: AccelChoice
    log_dir: Path

    def spec(
        self, workload: str = "idle", memory_mib: int = 128, dirty_mib: int = 32
    ) -> tuple[VMSpec, str]:
        config = DemoConfig(
            workload=Workload.parse(workload), memory_mib=memory_mib, dirty_mib=dirty_mib
        )
        address = self.lab.next_guest_address()
        return guest_spec(config, self.guest, self.accel, address), address.split("/")[0]

    def source(self, spec: VMSpec, role: str = "source") -> QemuProcess:
        tap = self.lab.add_tap(self.lab.host_a)
        return QemuProcess(
            spec, role=role, netns=self.lab.host_a.netns, taps={"net0": tap}, log_dir=self.log_dir
        )

    def target(self, spec: VMSpec, role: str = "target") -> QemuProcess:
        tap = self.lab.add_tap(self.lab.host_b)
        return QemuProcess(
            spec, role=role, netns=self.lab.host_b.netns, taps={"net0": tap},
            incoming=True, paused=True, log_dir=self.log_dir,
        )  # fmt: skip

    @asynccontextmanager
    async def pair(
        self, workload: str = "idle", memory_mib: int = 128, dirty_mib: int = 32
    ) -> AsyncIterator[Pair]:
        spec, ip = self.spec(workload, memory_mib, dirty_mib)
        async with self.source(spec) as source:
            await wait_workload_started(source, Workload.parse(workload))
            async with self.target(spec) as target:
                yield Pair(self.lab, spec, source, target, ip)


@pytest.fixture
def vms(lab: Lab, guest: GuestImage, accel: AccelChoice, tmp_path: Path) -> VmFactory:
    return VmFactory(lab, guest, accel, tmp_path)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if this session left a lab namespace or a QEMU process behind.

    Only what this process owns counts (labs carry their owner's PID; QEMUs are our
    children): other sessions on the machine may be running their own labs.
    """
    if os.geteuid() != 0:
        return
    mine = [ns for ns in lab_namespaces() if ns.startswith(f"livemig-{os.getpid()}-")]
    qemus = [
        child.pid
        for child in psutil.Process().children(recursive=True)
        if child.name() == "qemu-system-x86_64"
    ]
    if mine or qemus:
        print(f"\nLEFT BEHIND by this session: namespaces {mine}, qemu pids {qemus}")
        for pid in qemus:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        for ns in mine:
            remove_namespace(ns)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
