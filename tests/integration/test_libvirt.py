"""The libvirt strategy against two real libvirt daemons in the lab (lab/libvirt.py).

Each test gets a fresh lab with a libvirtd on hosts A and B (QEMU capability cache
kept in .cache/libvirt, so only the first run probes QEMU). Nothing here skips: a
missing libvirtd or libvirt-python fails the tests (scripts/setup-system.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
from collections.abc import Iterator

import pytest

from lab.accel import AccelChoice
from lab.demo import DemoConfig, Workload, guest_spec
from lab.guest import GuestImage, cache_dir
from lab.libvirt import LibvirtLab, sweep
from lab.libvirt_demo import define_guest, lab_request, start_guest
from lab.net import Lab
from migrate.cli import main as livemig_main
from migrate.errors import PreflightError
from migrate.events import Progress
from migrate.libvirt import LibvirtMigration, migrate_domain
from migrate.libvirt.conn import require_libvirt
from migrate.policy import Policy
from migrate.report import Integrity, Status
from tests.integration.conftest import guest_answers

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def libvirt_prerequisites() -> None:
    missing = [t for t in ("libvirtd", "virsh", "unshare") if shutil.which(t) is None]
    assert not missing, f"missing {', '.join(missing)} (scripts/setup-system.sh)"
    require_libvirt()  # raises ConfigError without libvirt-python
    sweep()


@pytest.fixture
def daemons(lab: Lab) -> Iterator[LibvirtLab]:
    with LibvirtLab(lab, cache_dir() / "libvirt") as daemons:
        yield daemons


def _config(workload: str = "idle", memory_mib: int = 128, **kwargs: object) -> DemoConfig:
    return DemoConfig(
        workload=Workload.parse(workload), memory_mib=memory_mib, dirty_mib=16, **kwargs
    )  # type: ignore[arg-type]


def _state(daemons: LibvirtLab, host: str, name: str) -> str:
    libvirt_host = daemons.host_a if host == "a" else daemons.host_b
    listed = libvirt_host.virsh("list", "--all", "--name", check=False).split()
    if name not in listed:
        return "absent"
    return libvirt_host.virsh("domstate", name).strip()


def test_demo_libvirt_json_live_migration_with_integrity_and_guest_downtime(
    guest: GuestImage, capsys: pytest.CaptureFixture[str]
) -> None:
    code = livemig_main(
        ["demo", "--libvirt", "--json", "--workload", "openssl", "--memory-mib", "128"]
    )
    out = capsys.readouterr().out
    report = json.loads(out)
    assert code == 0, report.get("error")
    assert report["strategy"] == "libvirt"
    assert report["status"] == "completed"
    assert report["mode"] == "live"
    assert report["integrity"] == "ok", report["integrity_detail"]
    assert "VIR_MIGRATE_PAUSED" in report["integrity_detail"]
    assert report["guest_check"].startswith("ok"), report["guest_check"]
    # The probe saw the guest stop and come back, after libvirt's own figure.
    assert report["guest_downtime_ms"] is not None
    assert report["downtime_ms"] is not None
    assert report["guest_downtime_ms"] >= report["downtime_ms"] > 0
    tl = report["timeline"]
    assert tl["source_stop_ms"] <= tl["target_completed_ms"] <= tl["verified_ms"]
    assert tl["verified_ms"] <= tl["target_resume_ms"]
    assert report["samples"], "no job statistics were sampled"
    assert report["transferred_bytes"] > 0
    outcomes = {d["action"]: d["outcome"] for d in report["decisions"]}
    assert outcomes.get("announce") == "rejected"  # libvirt has no such lever
    assert {c["name"] for c in report["preflight"]} >= {"cpu", "target-memory", "target-domain"}


def test_abort_leaves_the_domain_running_on_the_source_and_nothing_on_the_target(
    lab: Lab, daemons: LibvirtLab, guest: GuestImage, accel: AccelChoice
) -> None:
    # A 4 MiB/s cap and a writer keep pre-copy going long enough to abort it.
    policy = Policy(name="slow", controller="static", max_bandwidth_bytes_per_s=4 * MIB)
    config = _config("dirty:8", policy=policy)
    address = lab.next_guest_address()
    spec = guest_spec(config, guest, accel, address)
    define_guest(daemons, lab, spec)

    async def scenario() -> None:
        console = await start_guest(daemons, spec, config)
        try:
            migration = LibvirtMigration(lab_request(daemons, spec.name, config))
            await migration.start()
            async for event in migration.events():
                if isinstance(event, Progress) and event.sample.ram_transferred_bytes > 0:
                    migration.abort("test: abort during pre-copy")
                    break
            report = await migration.wait()
            assert report.status is Status.ABORTED, report.error
            assert "test: abort during pre-copy" in (report.error or "")
            assert any(d.action == "abort" for d in report.decisions)
            assert _state(daemons, "a", spec.name) == "running"
            assert _state(daemons, "b", spec.name) == "absent"
            assert daemons.host_b.virsh("list", "--all", "--name").split() == []
            assert await guest_answers(lab, address.split("/")[0]) > 0
        finally:
            await console.console.close()

    asyncio.run(scenario())


def test_domain_whose_cpu_the_target_cannot_run_is_refused_naming_the_flags(
    lab: Lab, daemons: LibvirtLab, guest: GuestImage, accel: AccelChoice
) -> None:
    # Both lab hosts run the same TCG QEMU, and a running domain's live <cpu> is what
    # QEMU actually gave it (libvirt marks the features TCG dropped as disabled), so
    # only a defined domain can ask for more than the target has: AVX-512.
    cpu = "<cpu mode='custom' match='exact'><model fallback='forbid'>Skylake-Server</model></cpu>"
    config = _config()
    spec = guest_spec(config, guest, accel, lab.next_guest_address())
    define_guest(daemons, lab, spec, cpu_xml=cpu)

    with pytest.raises(PreflightError) as refused:
        asyncio.run(migrate_domain(lab_request(daemons, spec.name, config)))
    reasons = " ".join(refused.value.reasons)
    assert "cpu:" in reasons
    assert "Skylake-Server" in reasons
    assert "avx512f" in reasons, reasons
    assert _state(daemons, "a", spec.name) == "shut off"
    assert _state(daemons, "b", spec.name) == "absent"


def test_offline_migration_of_a_shut_off_domain(
    lab: Lab, daemons: LibvirtLab, guest: GuestImage, accel: AccelChoice
) -> None:
    config = _config()
    spec = guest_spec(config, guest, accel, lab.next_guest_address())
    define_guest(daemons, lab, spec)
    assert _state(daemons, "a", spec.name) == "shut off"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = livemig_main(
            [
                "migrate", "--libvirt", daemons.host_a.uri, spec.name,
                "--to", daemons.host_b.uri, "--peer-uri", daemons.host_b.peer_uri, "--json",
            ]
        )  # fmt: skip
    report = json.loads(stdout.getvalue())
    assert code == 0, report.get("error")
    assert report["status"] == "completed"
    assert report["strategy"] == "libvirt"
    assert report["mode"] == "offline"
    assert report["integrity"] == Integrity.UNCHECKED.value
    assert "definition" in report["integrity_detail"]
    assert _state(daemons, "a", spec.name) == "absent"
    assert _state(daemons, "b", spec.name) == "shut off"
