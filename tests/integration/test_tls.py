"""Encrypted data paths between the lab's hosts, driven as two real hosts would be.

The engine runs inside host A's network namespace (a thread that entered it with
``setns``). It reaches the target QEMU only over the migration link: QMP over TCP
with mutual TLS (QEMU's ``tls-creds-x509`` on a ``-chardev socket``), and it never
maps the target's RAM file: the integrity check asks the RAM's owner for digests
and page writes (:class:`~migrate.remoteram.RamOwner`, in-process here, an agent's
HTTPS calls later). The certificates are a throwaway cluster CA's.

A marker (random 4 KiB pages written into free guest pages before the move) is
looked for in every frame captured on host A's migration interface: found in a
plain run, absent from TLS runs (native and pagestream), though it reached the
target's RAM in all of them. One plain and one TLS native run share the lab,
the guest workload and the probe, so their downtimes compare (printed).

The TLS runs name the source (``MigrationTls.source_name``: node-a). Before the
native TLS run, host A's QEMU presents another certificate of the same CA
(node-x) to a target told to accept only node-a (``tls-authz``): QEMU refuses it
(its log names ``CN=node-x``), the engine fails in one line, the VM stays.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from dirtytrack.ram import PAGE_SIZE, RamMapping
from lab.demo import MIGRATION_PORT, Workload, wait_workload_started
from lab.net import MIGRATION_IFACE
from lab.probe import NetworkProbe
from lab.qemu import QemuProcess
from migrate.deadline import within
from migrate.engine import migrate
from migrate.errors import MigrationError
from migrate.remoteram import RamOwner
from migrate.report import Integrity, MigrationReport, Status
from migrate.request import HostEndpoint, MigrationRequest, QmpTcpAddress
from migrate.tls import MigrationTls, NodeCredentials, write_qemu_creds_dir
from migrate.vmspec import VMSpec
from tests.integration.conftest import VmFactory, guest_answers
from tests.jsonschemas import validate_report
from tests.pki_helper import ThrowawayCa

QMP_TLS_PORT = 4445
MARKER_PAGES = 8
ENGINE_DEADLINE_S = 60.0
_CLONE_NEWNET = 0x40000000
_ETH_P_ALL = 0x0003
T = TypeVar("T")
RUNS = [
    (strategy, tls == "tls")
    for strategy, tls in (
        item.split(":")
        for item in os.environ.get(
            "LIVEMIG_TLS_RUNS", "native:plain,native:tls,pagestream:tls"
        ).split(",")
    )
]


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by a thread that entered network namespace ``netns`` (its result)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread)
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"netns {netns}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


class Capture:
    """Every frame on an interface of a namespace (AF_PACKET), kept in memory."""

    def __init__(self, netns: str, iface: str) -> None:
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
            sock.bind((iface, 0))
            sock.settimeout(0.2)
            return sock

        self.sock = in_netns(netns, open_socket)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(1 << 17))
            except TimeoutError:
                continue

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        return b"".join(self.frames)


def _free_pages(ram: Path, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` pages of the upper half of guest RAM that the guest never touched (zero)."""
    with RamMapping(ram) as mapping:
        pages = mapping.pages()
        half = len(pages) // 2
        zero = np.flatnonzero(~pages[half:].any(axis=1)) + half
        del pages
    picked = rng.choice(zero[: len(zero) // 2], size=count, replace=False)
    return sorted(int(p) for p in picked)


def _write_marker(ram: Path, pages: list[int], marker: bytes) -> None:
    with RamMapping(ram, writable=True) as mapping:
        for page in pages:
            mapping.buffer()[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = marker


def _marker_in(data: bytes, marker: bytes) -> int:
    """How many of the marker's 64-byte pieces appear in ``data``."""
    return sum(1 for off in range(0, PAGE_SIZE, 64) if marker[off : off + 64] in data)


@dataclasses.dataclass
class Run:
    report: MigrationReport
    pieces_on_wire: int
    marker_on_target: bool
    owner_calls: int
    wire_bytes: int


async def _move(
    vms: VmFactory,
    tmp_path: Path,
    strategy: str,
    tls: bool,
    a_creds: NodeCredentials,
    b_dir: Path,
    a_dir: Path,
    intruder_dir: Path | None = None,
) -> Run:
    lab = vms.lab
    spec, ip = vms.spec("idle")
    b_addr = lab.host_b.migration_addr
    # The target QEMU as its node would start it: a QMP monitor on the migration
    # address, TLS with the node's certificate, peers verified against the CA.
    target_spec = dataclasses.replace(
        spec,
        extra_args=(
            *spec.extra_args,
            "-object", f"tls-creds-x509,id=qmptls,dir={b_dir},endpoint=server,verify-peer=on",
            "-chardev",
            f"socket,id=qmptcp,host={b_addr},port={QMP_TLS_PORT},server=on,wait=off,"
            "tls-creds=qmptls",
            "-mon", "chardev=qmptcp,mode=control",
        ),
    )  # fmt: skip
    rng = np.random.default_rng()
    marker = rng.bytes(PAGE_SIZE)
    async with vms.source(spec) as source:
        assert source.ram_path is not None
        await wait_workload_started(source, Workload.parse("idle"))
        pages = _free_pages(source.ram_path, MARKER_PAGES, rng)
        _write_marker(source.ram_path, pages, marker)
        await source.release_qmp()  # the engine takes the source's one QMP socket
        if intruder_dir is not None:
            await _refused(vms, spec, target_spec, source.site.qmp_socket, a_creds, intruder_dir,
                           b_dir)  # fmt: skip
        async with vms.target(target_spec) as target:
            assert target.ram_path is not None
            return await _moved(vms, spec, ip, source, target, strategy, tls, a_creds, b_dir,
                                a_dir, pages, marker)  # fmt: skip
    raise AssertionError("unreachable")


async def _refused(
    vms: VmFactory,
    spec: VMSpec,
    target_spec: VMSpec,
    source_qmp: Path,
    a_creds: NodeCredentials,
    intruder_dir: Path,
    b_dir: Path,
) -> None:
    """Host A's QEMU presents another certificate of the CA (CN node-x): the target
    QEMU, told to accept only node-a (``tls-authz``), refuses it; the VM stays."""
    lab = vms.lab
    async with vms.target(target_spec, role="refusing-target") as target:
        request = MigrationRequest(
            source=HostEndpoint("host-a", source_qmp, netns=lab.host_a.netns),
            target=HostEndpoint(
                "host-b",
                migration_uri=lab.host_b.migration_uri(MIGRATION_PORT),
                netns=lab.host_b.netns,
                qmp_tcp=QmpTcpAddress(lab.host_b.migration_addr, QMP_TLS_PORT, a_creds),
            ),
            strategy="native",
            vm=spec.name,
            tls=MigrationTls(intruder_dir, b_dir, source_name="node-a"),
        )

        def engine() -> str:
            async def run() -> str:
                try:
                    await within(migrate(request), ENGINE_DEADLINE_S)
                except MigrationError as exc:
                    return str(exc)
                raise AssertionError("the target accepted a source it was not told to")

            return asyncio.run(run())

        began = time.monotonic()
        error = await asyncio.to_thread(in_netns, lab.host_a.netns, engine)
        print(f"\nrefused source (CN=node-x): {time.monotonic() - began:.2f} s: {error}")
        assert "stays on the source" in error, error
        assert "\n" not in error
        # QEMU names the client by its certificate's DN and exits (its incoming failed).
        denied = [line for line in target.read_qemu_log().splitlines() if "authz" in line]
        print(f"refusing target QEMU: {denied}")
        assert any("authz check for CN=node-x is denied" in line for line in denied), denied


async def _moved(
    vms: VmFactory,
    spec: VMSpec,
    ip: str,
    source: QemuProcess,
    target: QemuProcess,
    strategy: str,
    tls: bool,
    a_creds: NodeCredentials,
    b_dir: Path,
    a_dir: Path,
    pages: list[int],
    marker: bytes,
) -> Run:
    lab = vms.lab
    b_addr = lab.host_b.migration_addr
    on_target: list[bool] = []

    async def look_at_target() -> None:
        # Paused target, before cont: the marker crossed the link in every run.
        with RamMapping(target.ram_path) as ram:  # type: ignore[arg-type]
            buf = ram.buffer()
            on_target.append(any(bytes(buf[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]) == marker
                                 for p in pages))  # fmt: skip
            del buf

    calls = 0

    def request(owner: RamOwner) -> MigrationRequest:
        remote = owner.remote()

        async def counted_digest():  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return await remote.digest()

        from migrate.remoteram import RemoteRam
        from migrate.request import MigrationHooks

        return MigrationRequest(
            source=HostEndpoint("host-a", source.site.qmp_socket, netns=lab.host_a.netns),
            target=HostEndpoint(
                "host-b",
                migration_uri=lab.host_b.migration_uri(MIGRATION_PORT),
                netns=lab.host_b.netns,
                qmp_tcp=QmpTcpAddress(b_addr, QMP_TLS_PORT, a_creds),
            ),
            strategy=strategy,
            vm=spec.name,
            tls=MigrationTls(a_dir, b_dir, source_name="node-a") if tls else None,
            target_ram=RemoteRam(counted_digest, remote.page_hashes, remote.write_pages),
            hooks=MigrationHooks(before_target_resume=look_at_target),
        )

    def engine() -> MigrationReport:
        async def run() -> MigrationReport:
            # The RAM's owner: in-process here, the target node's agent later.
            async with RamOwner(target.ram_path) as owner:  # type: ignore[arg-type]
                task = asyncio.create_task(migrate(request(owner)))
                done, _ = await asyncio.wait({task}, timeout=ENGINE_DEADLINE_S)
                if not done:
                    for other in asyncio.all_tasks():
                        other.print_stack()
                    task.cancel()
                    raise AssertionError(f"the engine took over {ENGINE_DEADLINE_S} s")
                return task.result()

        return asyncio.run(run())

    capture = Capture(lab.host_a.netns, MIGRATION_IFACE)
    async with NetworkProbe(ip, lab.client_ns, 0.001) as probe:
        await asyncio.sleep(0.3)
        try:
            report = await asyncio.to_thread(in_netns, lab.host_a.netns, engine)
        finally:
            wire = capture.stop()
        await asyncio.sleep(0.3)
    assert probe.record is not None
    tl = report.timeline
    gap = probe.record.longest_gap(tl.started_at, tl.started_at + tl.ended_ms / 1e3)
    report = dataclasses.replace(
        report, guest_downtime_ms=gap.duration_ms if gap is not None else None
    )
    assert await guest_answers(lab, ip) > 0, "the guest does not answer on the target"
    source_gone = await source.wait_exited(5.0)
    assert source_gone is not None, "the source QEMU still runs after a completed move"
    return Run(report, _marker_in(wire, marker), bool(on_target and on_target[0]), calls, len(wire))


def test_tls_data_paths_between_hosts_hide_guest_pages(vms: VmFactory, tmp_path: Path) -> None:
    ca = ThrowawayCa.create()
    lab = vms.lab
    a_creds = ca.issue(tmp_path / "node-a", "node-a", lab.host_a.migration_addr)
    b_creds = ca.issue(tmp_path / "node-b", "node-b", lab.host_b.migration_addr)
    a_dir = write_qemu_creds_dir(a_creds, tmp_path / "node-a" / "qemu-tls")
    b_dir = write_qemu_creds_dir(b_creds, tmp_path / "node-b" / "qemu-tls")
    # Another member's certificate, signed by the same CA, used from host A.
    x_creds = ca.issue(tmp_path / "node-x", "node-x", lab.host_a.migration_addr)
    x_dir = write_qemu_creds_dir(x_creds, tmp_path / "node-x" / "qemu-tls")

    async def scenario() -> list[tuple[str, Run]]:
        runs = []
        for strategy, tls in RUNS:
            # The native TLS run first proves the target refuses another node's
            # certificate (a target QEMU of its own: a refused handshake leaves
            # QEMU listening, but its one migrate-incoming is spent).
            intruder = x_dir if (strategy, tls) == ("native", True) else None
            run = await _move(vms, tmp_path, strategy, tls, a_creds, b_dir, a_dir, intruder)
            runs.append((f"{strategy} {'tls' if tls else 'plain'}", run))
        return runs

    runs = asyncio.run(scenario())
    for name, run in runs:
        r = run.report
        print(
            f"\n{name}: status {r.status} transport {r.transport} integrity {r.integrity} "
            f"guest downtime {r.guest_downtime_ms} ms, downtime {r.downtime_ms} ms, total "
            f"{r.total_time_ms:.0f} ms, marker pieces on the wire {run.pieces_on_wire}/64, "
            f"captured {run.wire_bytes} B"
        )
        validate_report(r.to_dict())
        assert r.status is Status.COMPLETED, r.error
        assert r.integrity is Integrity.OK, r.integrity_detail
        assert run.marker_on_target, f"{name}: the marker never reached the target's RAM"
        assert run.owner_calls >= (1 if r.strategy == "native" else 0)
    for name, run in runs:
        if run.report.transport == "tls":
            assert run.pieces_on_wire == 0, f"{name}: guest memory crossed the link in clear"
        else:
            assert run.report.transport == "tcp"
            assert run.pieces_on_wire > 0, f"{name}: marker not seen in clear: the capture is blind"
    assert {run.report.transport for _, run in runs} == {"tcp", "tls"} or len(runs) < 2
