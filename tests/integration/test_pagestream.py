"""pagestream between the lab's hosts with the real guest: livemig's own pre-copy.

Each test checks that nothing of the stream is left behind (agent processes are
this process's children while they live).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest

from lab.demo import DemoConfig, Workload, run_demo
from lab.qemu import QemuProcess
from migrate.control.intents import ArmAutoConverge, SetDowntimeLimit, Throttle
from migrate.engine import run_migration
from migrate.errors import MigrationAborted, MigrationError
from migrate.events import EventBus
from migrate.pagestream.control import AGENT_MODULE
from migrate.pagestream.options import PagestreamOptions
from migrate.pagestream.strategy import PagestreamStrategy
from migrate.policy import Policy
from migrate.presets import controller_for, preset
from migrate.qmp import EventRecorder, migration_status_is
from migrate.report import Integrity, MigrationReport, Outcome, Status
from migrate.request import HostEndpoint, MigrationRequest
from migrate.vmspec import RamBackendKind
from tests.doubles import faulty_receiver_agent
from tests.integration.conftest import Pair, VmFactory, guest_answers
from tests.jsonschemas import validate_report

MIGRATION_PORT = 4444


AGENT_MODULES = (AGENT_MODULE, faulty_receiver_agent.MODULE)


def agents_alive() -> list[int]:
    return [
        child.pid
        for child in psutil.Process().children(recursive=True)
        if any(module in " ".join(child.cmdline()) for module in AGENT_MODULES)
    ]


@pytest.fixture
def faulty_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PagestreamOptions:
    """Options whose agents are the faulty-receiver double (it flips a page after the
    final round), logging to ``tmp_path`` (the double names the page there)."""
    monkeypatch.setenv("PYTHONPATH", faulty_receiver_agent.pythonpath_with_repo())
    return PagestreamOptions(agent_module=faulty_receiver_agent.MODULE, log_dir=tmp_path)


def _demo(tmp_path: Path, **kwargs: object) -> DemoConfig:
    base: dict[str, object] = {
        "strategy": "pagestream",
        "memory_mib": 128,
        "dirty_mib": 32,
        "log_dir": tmp_path,
        "warmup_s": 0.5,
    }
    base.update(kwargs)
    return DemoConfig(**base)  # type: ignore[arg-type]


def _assert_moved(report: MigrationReport) -> None:
    assert report.status is Status.COMPLETED, report.error
    assert report.strategy == "pagestream"
    assert report.integrity is Integrity.OK, report.integrity_detail
    assert "pagestream digest" in report.integrity_detail
    # pagestream finds dirty pages by content: nothing for the repair to do.
    assert report.repaired_pages == 0, report.integrity_detail
    assert str(report.guest_check).startswith("ok"), report.guest_check
    stream = report.stream
    assert stream is not None and stream.digest == "ok"
    assert stream.rounds >= 2 and stream.pages_sent > 0
    assert stream.tracker in ("soft-dirty", "page-digests", "shadow-diff")
    # Zero pages never travel, and QEMU's stream carried no guest RAM.
    assert stream.raw_bytes < report.ram_bytes
    assert stream.device_state_bytes < 4 << 20
    assert report.wire_bytes is not None and report.wire_bytes >= stream.stream_bytes
    tl = report.timeline
    assert tl.source_stop_ms is not None and tl.target_resume_ms is not None
    assert tl.source_stop_ms <= tl.target_resume_ms
    assert report.downtime_ms == tl.stop_to_resume_ms
    assert report.guest_downtime_ms is not None and report.guest_downtime_ms > 0
    samples = [s for s in report.samples if s.status == "active"]
    assert samples and samples[0].ram_remaining_bytes > 0
    rounds = [s.dirty_sync_count for s in samples]
    assert rounds == sorted(rounds) and set(rounds) == set(range(1, max(rounds) + 1))
    assert agents_alive() == []


def test_idle_guest_moves_with_pagestream(tmp_path: Path) -> None:
    result = asyncio.run(run_demo(_demo(tmp_path, workload=Workload("idle"))))
    report = result.report
    _assert_moved(report)
    assert report.guest_check == "ok: guest runs on target"
    assert report.decisions[-1].action == "switchover"
    stream = report.stream
    assert stream is not None
    assert stream.zero_pages_skipped > 0
    assert stream.compression_ratio > 1.0


def test_a_throttle_allowed_by_the_policy_is_rejected_not_faked(tmp_path: Path) -> None:
    """QEMU's auto-converge cannot slow pagestream's stream: the throttle intents are
    reported rejected (with why), the downtime-limit and bandwidth ones applied."""
    policy = dataclasses.replace(preset("livemig"), max_throttle_pct=50)
    report = asyncio.run(run_demo(_demo(tmp_path, workload=Workload("dirty:8"), policy=policy)))
    report = report.report
    _assert_moved(report)
    throttling = [d for d in report.decisions if d.has(Throttle) or d.has(ArmAutoConverge)]
    assert throttling, [d.action for d in report.decisions]
    for decision in throttling:
        assert decision.outcome is Outcome.REJECTED, decision
        assert "auto-converge" in decision.outcome_detail
    limits = [d for d in report.decisions if d.has(SetDowntimeLimit)]
    assert limits and all(d.outcome is Outcome.APPLIED for d in limits)
    assert all(d.outcome is not Outcome.PROPOSED for d in report.decisions)


def test_dirtying_guest_arrives_without_repair(tmp_path: Path) -> None:
    """The workload QEMU 7.2's own pre-copy loses pages on arrives intact."""
    result = asyncio.run(run_demo(_demo(tmp_path, workload=Workload("dirty:16"))))
    report = result.report
    _assert_moved(report)
    assert "memdirty" in str(report.guest_check)
    assert report.stream is not None and report.stream.rounds >= 2


def test_engine_comparison_confirms_the_stream(vms: VmFactory) -> None:
    """The engine's own comparison of both RAM files, after the device-state load,
    finds nothing to repair under a dirtying guest (QEMU 7.2's stream does)."""

    async def scenario() -> None:
        async with vms.pair("dirty:16") as pair:
            strategy = PagestreamStrategy(PagestreamOptions(engine_compare=True))
            request = _request(pair)
            report = await strategy.run(
                request, pair.source.qmp, pair.target.qmp, controller_for(request.policy),
                EventBus(),
            )  # fmt: skip
            assert report.status is Status.COMPLETED, report.error
            assert report.integrity is Integrity.OK
            assert "RAM identical (xxh3 digests); pagestream digest ok" in (report.integrity_detail)
            assert report.repaired_pages == 0
            mark = len(pair.target.console.lines)
            line = await pair.target.console.wait_for(r"^MEMDIRTY pass=", 30, since=mark)
            assert " bad=0 " in line.text

    asyncio.run(scenario())


def test_openssl_guest_demo_cli_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "migrate.cli", "demo", "--strategy", "pagestream",
         "--workload", "openssl", "--json", "--memory-mib", "128", "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    data = validate_report(json.loads(lines[0]))
    report = MigrationReport.from_dict({k: v for k, v in data.items() if k != "environment"})
    _assert_moved(report)
    assert report.guest_check == "ok: openssl running on target"
    assert data["stream"]["digest"] == "ok" and data["transferred_bytes"] > 0


def _request(pair: Pair, **kwargs: object) -> MigrationRequest:
    lab = pair.lab
    return MigrationRequest(
        source=HostEndpoint("host-a", pair.source.site.qmp_socket, netns=lab.host_a.netns),
        target=HostEndpoint(
            "host-b",
            pair.target.site.qmp_socket,
            lab.host_b.migration_uri(MIGRATION_PORT),
            netns=lab.host_b.netns,
        ),
        strategy="pagestream",
        vm=pair.spec.name,
        **kwargs,  # type: ignore[arg-type]
    )


def test_corrupted_page_in_the_receiver_keeps_the_vm_on_the_source(
    vms: VmFactory, faulty_receiver: PagestreamOptions
) -> None:
    async def scenario() -> None:
        async with vms.pair("openssl") as pair:
            strategy = PagestreamStrategy(faulty_receiver)
            request = _request(pair)
            with pytest.raises(MigrationAborted) as info:
                await strategy.run(
                    request, pair.source.qmp, pair.target.qmp,
                    controller_for(request.policy), EventBus(),
                )  # fmt: skip
            report = info.value.report
            assert report is not None and report.status is Status.ABORTED
            assert report.integrity is Integrity.FAILED
            assert report.stream is not None and report.stream.digest == "mismatch"
            assert faulty_receiver.log_dir is not None
            pages = faulty_receiver_agent.corrupted_pages(
                faulty_receiver.log_dir / "pagestream-receiver.log"
            )
            assert len(pages) == 1, pages
            page = pages[0]
            # The stream's digest names the chunk; the engine's comparison the page.
            assert "pagestream digest mismatch" in report.integrity_detail
            assert f"differ: {page}" in report.integrity_detail, report.integrity_detail
            assert "stays on the source" in str(info.value)
            # Exactly one copy runs: the source, answering on host A.
            assert await pair.target.wait_exited(10) is not None
            assert await pair.source.qmp.status() == "running"
            assert await guest_answers(pair.lab, pair.guest_ip) > 10
            mark = len(pair.source.console.lines)
            await pair.source.console.wait_for(r"^OPENSSL ", 15, since=mark)
            assert agents_alive() == []

    asyncio.run(scenario())


def test_target_without_dash_s_never_runs_unchecked(
    vms: VmFactory, faulty_receiver: PagestreamOptions
) -> None:
    """The engine stops the VM itself, so the runstate QEMU sends is "paused": even a
    target started without -S waits for the checks, and a bad page keeps it stopped."""

    async def scenario() -> None:
        spec, ip = vms.spec("openssl")
        async with vms.source(spec) as source:
            await source.console.wait_for(r"^OPENSSL ", 60)
            target = QemuProcess(
                spec, role="target", netns=vms.lab.host_b.netns,
                taps={"net0": vms.lab.add_tap(vms.lab.host_b)}, incoming=True,
                paused=False, log_dir=vms.log_dir,
            )  # fmt: skip
            async with target, EventRecorder(target.qmp) as target_events:
                pair = Pair(vms.lab, spec, source, target, ip)
                strategy = PagestreamStrategy(faulty_receiver)
                request = _request(pair)
                with pytest.raises(MigrationAborted):
                    await strategy.run(
                        request, source.qmp, target.qmp, controller_for(request.policy),
                        EventBus(),
                    )  # fmt: skip
                assert target_events.find("MIGRATION", migration_status_is("completed"))
                assert target_events.find("RESUME") is None
                assert await target.wait_exited(10) is not None
            assert await source.qmp.status() == "running"
            assert agents_alive() == []

    asyncio.run(scenario())


def test_receiver_agent_killed_mid_stream_keeps_the_vm_on_the_source(vms: VmFactory) -> None:
    async def scenario() -> None:
        vms.lab.set_bandwidth(40)  # ~5 MB/s: pre-copy takes seconds
        async with vms.pair("idle") as pair:
            task = asyncio.create_task(
                run_migration(_request(pair), pair.source.qmp, pair.target.qmp)
            )
            deadline = asyncio.get_running_loop().time() + 30
            receivers: list[psutil.Process] = []
            while not receivers:
                assert not task.done(), task
                assert asyncio.get_running_loop().time() < deadline
                receivers = [
                    child
                    for child in psutil.Process().children(recursive=True)
                    if "--role receiver" in " ".join(child.cmdline())
                ]
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            assert not task.done()
            receivers[0].kill()
            with pytest.raises(MigrationError) as info:
                await task
            report = info.value.report
            assert report is not None and report.status is Status.FAILED
            assert "receiver agent exited" in str(report.error), report.error
            assert await pair.target.wait_exited(10) is not None
            assert await pair.source.qmp.status() == "running"
            assert await guest_answers(pair.lab, pair.guest_ip) > 10
            assert agents_alive() == []

    asyncio.run(scenario())


def test_cancelled_pagestream_rolls_back(vms: VmFactory) -> None:
    async def scenario() -> None:
        vms.lab.set_bandwidth(40)
        async with vms.pair("idle") as pair:
            task = asyncio.create_task(
                run_migration(_request(pair), pair.source.qmp, pair.target.qmp)
            )
            await asyncio.sleep(3.0)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await pair.target.wait_exited(10) is not None
            assert await pair.source.qmp.status() == "running"
            assert await guest_answers(pair.lab, pair.guest_ip) > 10
            assert agents_alive() == []

    asyncio.run(scenario())


def test_policy_bandwidth_cap_paces_the_stream(vms: VmFactory) -> None:
    async def scenario() -> None:
        async with vms.pair("idle") as pair:
            policy = Policy(max_bandwidth_bytes_per_s=20_000_000)
            request = _request(pair, policy=policy)
            report = await run_migration(request, pair.source.qmp, pair.target.qmp)
            assert report.status is Status.COMPLETED and report.integrity is Integrity.OK
            stream = report.stream
            assert stream is not None
            rate = stream.stream_bytes / (report.total_time_ms / 1e3)
            assert rate < 20_000_000 * 1.1, rate
            # A slow link leaves CPU to spare: the sender compresses harder than raw.
            assert stream.final_level != "raw"

    asyncio.run(scenario())


# --- outside the lab's namespaces, through the CLI -----------------------------------


@asynccontextmanager
async def root_pair(
    vms: VmFactory, backend: RamBackendKind = RamBackendKind.SHARED_FILE
) -> AsyncIterator[tuple[QemuProcess, QemuProcess]]:
    """A source and an incoming QEMU in this namespace, without NICs."""
    spec, _ip = vms.spec("openssl")
    spec = dataclasses.replace(spec, nics=(), ram_backend=backend)
    async with QemuProcess(spec, role="source", log_dir=vms.log_dir) as source:
        await source.console.wait_for(r"^OPENSSL ", 60)
        async with QemuProcess(
            spec, role="target", incoming=True, paused=True, log_dir=vms.log_dir
        ) as target:
            await source.release_qmp()
            await target.release_qmp()
            yield source, target


def _cli_migrate(source: QemuProcess, target: QemuProcess, port: int) -> list[str]:
    return [
        sys.executable, "-m", "migrate.cli", "migrate", "--strategy", "pagestream",
        "--source-qmp", str(source.site.qmp_socket),
        "--target-qmp", str(target.site.qmp_socket),
        "--target-uri", f"tcp:127.0.0.1:{port}",
    ]  # fmt: skip


def test_livemig_migrate_cli_in_the_root_namespace(vms: VmFactory) -> None:
    async def scenario() -> None:
        async with root_pair(vms) as (source, target):
            proc = await asyncio.create_subprocess_exec(
                *_cli_migrate(source, target, 47811), "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, err.decode()
            report = validate_report(json.loads(out))
            assert report["status"] == "completed" and report["integrity"] == "ok"
            assert report["strategy"] == "pagestream" and report["repaired_pages"] == 0
            assert await source.wait_exited(10) is not None
            mark = len(target.console.lines)
            await target.console.wait_for(r"^OPENSSL ", 20, since=mark)

    asyncio.run(scenario())


def test_vm_without_shared_ram_is_refused_in_one_line(vms: VmFactory) -> None:
    async def scenario() -> None:
        async with root_pair(vms, RamBackendKind.ANONYMOUS) as (source, target):
            proc = await asyncio.create_subprocess_exec(
                *_cli_migrate(source, target, 47812),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _out, err = await asyncio.wait_for(proc.communicate(), 60)
            lines = err.decode().strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1, err.decode()
            assert "pagestream needs guest RAM in a shared file" in lines[0]
            assert "source and target VM has none" in lines[0]
            # Refused before anything changed: the VM runs on, the target still waits.
            assert source.alive and target.alive

    asyncio.run(scenario())


# --- huge pages -------------------------------------------------------------------------

HUGEPAGES = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


@pytest.fixture
def hugetlbfs(tmp_path: Path) -> Iterator[Path]:
    """A hugetlbfs mount with 2 x 128 MiB of 2 MiB pages reserved; both undone after."""
    total = HUGEPAGES / "nr_hugepages"
    before = int(total.read_text())
    wanted = 2 * 128 // 2
    mount = tmp_path / "hugetlbfs"
    mount.mkdir()
    total.write_text(str(before + wanted))
    try:
        free = int((HUGEPAGES / "free_hugepages").read_text())
        assert free >= wanted, f"only {free} free 2 MiB huge pages after reserving {wanted}"
        subprocess.run(
            ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount)], check=True
        )
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    finally:
        total.write_text(str(before))


def test_huge_page_backed_guest_moves_with_pagestream(vms: VmFactory, hugetlbfs: Path) -> None:
    async def scenario() -> None:
        spec, ip = vms.spec("dirty:8", memory_mib=128, dirty_mib=16)
        spec = dataclasses.replace(spec, ram_dir=hugetlbfs)
        free_before = int((HUGEPAGES / "free_hugepages").read_text())
        async with vms.source(spec) as source:
            await source.console.wait_for(r"^MEMDIRTY pass=", 60)
            async with vms.target(spec) as target:
                assert source.ram_path is not None and source.ram_path.parent == hugetlbfs
                # Both RAMs come from huge pages: faulted in, or reserved by the mapping.
                faulted = free_before - int((HUGEPAGES / "free_hugepages").read_text())
                reserved = int((HUGEPAGES / "resv_hugepages").read_text())
                assert faulted + reserved >= 2 * 128 // 2, (faulted, reserved)
                pair = Pair(vms.lab, spec, source, target, ip)
                report = await run_migration(_request(pair), source.qmp, target.qmp)
                assert report.status is Status.COMPLETED, report.error
                assert report.integrity is Integrity.OK and report.repaired_pages == 0
                mark = len(target.console.lines)
                line = await target.console.wait_for(r"^MEMDIRTY pass=", 30, since=mark)
                assert " bad=0 " in line.text
        assert list(hugetlbfs.iterdir()) == []  # RAM files removed with their QEMUs
        assert agents_alive() == []

    asyncio.run(scenario())
