"""Preflight on real QEMU: the cluster baseline CPU boots and moves; bad moves are refused."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from cpumodel import compute_baseline, load_catalog, load_host
from lab.demo import DemoConfig, Workload, run_demo
from migrate.engine import run_migration
from migrate.errors import PreflightError
from migrate.preflight import HostFacts
from migrate.report import Integrity, Status, Verdict
from tests.integration.conftest import VmFactory

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cpu"
MILAN = FIXTURES / "milan-epyc-7713.json"
ROCKET_LAKE = FIXTURES / "rocketlake-xeon-e2356g.json"
ALDER_LAKE = FIXTURES / "alderlake-i9-12900k.json"


def test_cluster_baseline_cpu_boots_and_migrates(tmp_path: Path) -> None:
    baseline = compute_baseline(
        [load_host(p) for p in (MILAN, ROCKET_LAKE, ALDER_LAKE)], load_catalog()
    )
    assert baseline.level == "x86-64-v3"
    config = DemoConfig(
        workload=Workload("openssl"),
        memory_mib=128,
        cpu_model=baseline.cpu,
        log_dir=tmp_path,
        warmup_s=0.5,
    )
    result = asyncio.run(run_demo(config))
    report = result.report
    assert report.status is Status.COMPLETED, report.error
    assert report.integrity is Integrity.OK
    assert result.environment.cpu_model == baseline.cpu
    assert report.guest_check == "ok: openssl running on target"
    (cpu,) = [c for c in report.preflight if c.name == "cpu"]
    assert cpu.verdict is not Verdict.REFUSED, cpu.detail


def test_preflight_refuses_avx512_guest_for_milan_and_force_overrides(vms: VmFactory) -> None:
    async def scenario() -> None:
        spec, _ip = vms.spec("idle")
        spec = dataclasses.replace(spec, cpu_model="Icelake-Server")
        async with vms.source(spec) as source, vms.target(spec) as target:
            await source.console.wait_for("LIVEMIG READY", 60)
            pair_request = dict(
                source_host=HostFacts.from_file(ROCKET_LAKE),
                target_host=HostFacts.from_file(MILAN),
                cpu_model="Icelake-Server",
            )
            from lab.demo import MIGRATION_PORT
            from migrate.strategy import HostEndpoint, MigrationRequest

            request = MigrationRequest(
                source=HostEndpoint("rocket-lake", source.site.qmp_socket),
                target=HostEndpoint(
                    "milan", target.site.qmp_socket, vms.lab.host_b.migration_uri(MIGRATION_PORT)
                ),
                **pair_request,  # type: ignore[arg-type]
            )
            with pytest.raises(PreflightError) as info:
                await run_migration(request, source.qmp, target.qmp)
            reasons = " ".join(info.value.reasons)
            assert "avx512f" in reasons and "a CPU model both hosts run" in reasons
            # Nothing moved: the VM runs on the source, the target still waits.
            assert await source.qmp.status() == "running"
            assert await target.qmp.status() == "inmigrate"
            report = await run_migration(
                dataclasses.replace(request, force=True), source.qmp, target.qmp
            )
            assert report.status is Status.COMPLETED and report.integrity is Integrity.OK
            (cpu,) = [c for c in report.preflight if c.name == "cpu"]
            assert cpu.verdict is Verdict.REFUSED  # recorded, and overridden by force

    asyncio.run(scenario())
