"""The libvirt strategy against two real libvirt daemons in the lab (lab/libvirt.py).

Each test gets a fresh lab with a libvirtd on hosts A and B (QEMU capability cache
kept in .cache/libvirt, so only the first run probes QEMU). Nothing here skips: a
missing libvirtd or libvirt-python fails the tests (scripts/setup-system.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import shutil
import signal
import sys
from collections.abc import Iterator

import pytest

from lab.accel import AccelChoice
from lab.demo import DemoConfig, Workload, guest_check, guest_spec
from lab.guest import GuestImage, cache_dir
from lab.libvirt import LibvirtLab, sweep
from lab.libvirt_demo import DomainConsole, define_guest, lab_request, start_guest
from lab.net import Lab
from migrate.cli import main as livemig_main
from migrate.errors import PreflightError
from migrate.events import Progress
from migrate.libvirt import LibvirtMigration, migrate_domain
from migrate.libvirt.conn import require_libvirt
from migrate.libvirt.ram import qemu_ram_file
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


async def _cli(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "migrate.cli", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_plan_cpu_ctrl_c_and_postcopy_on_one_running_domain(
    lab: Lab, daemons: LibvirtLab, guest: GuestImage, accel: AccelChoice
) -> None:
    """One running domain, four things through the hosts' libvirt: ``plan --libvirt``
    and ``cpu show|baseline --libvirt``; Ctrl-C on ``livemig migrate --libvirt`` (the
    domain stays running on A, nothing on B); then post-copy, forced through the
    handle, moves it to B with the guest's own memory check ok."""
    # The guest writes 8 MiB/s over a 16 MiB working set and checks every page it wrote.
    config = _config("dirty:8", policy=dataclasses.replace(Policy(), postcopy_allowed=True))
    address = lab.next_guest_address()
    guest_ip = address.split("/")[0]
    spec = guest_spec(config, guest, accel, address)
    define_guest(daemons, lab, spec)
    a, b = daemons.host_a, daemons.host_b
    to_b = ("--to", b.uri)

    async def scenario() -> None:
        console = await start_guest(daemons, spec, config)
        try:
            await plan_and_cpu()
            await ctrl_c()
            await postcopy()
        finally:
            await console.console.close()

    async def plan_and_cpu() -> None:
        code, out, err = await _cli("plan", "--libvirt", a.uri, spec.name, *to_b, "--json")
        assert code == 0, err
        planned = json.loads(out)
        assert planned["mode"] == "live" and planned["refused"] is False
        assert planned["memory_bytes"] == 128 * MIB == planned["ram_bytes"]
        verdicts = {c["name"]: c["verdict"] for c in planned["preflight"]}
        assert verdicts == {
            "cpu": "ok", "target-domain": "ok", "disks": "ok", "devices": "ok",
            "target-memory": "ok", "versions": "ok",
        }  # fmt: skip
        # QEMU measured the writer through libvirt (page sampling): ~8 MiB/s.
        assert planned["dirty_rate_bytes_per_s"] > 1 * MIB, planned["dirty_rate_method"]
        assert "through libvirt" in planned["dirty_rate_method"]
        assert planned["recommendation"]
        code, out, err = await _cli("cpu", "show", "--libvirt", a.uri, "--json")
        assert code == 0, err
        shown = json.loads(out)
        assert shown["name"] == f"livemig-{a.name}" and shown["flags"]
        code, out, err = await _cli(
            "cpu", "baseline", "--libvirt", a.uri, b.uri, "--virt-type", "qemu", "--json"
        )
        assert code == 0, err
        baseline = json.loads(out)
        assert [h["name"] for h in baseline["hosts"]] == [f"livemig-{a.name}", f"livemig-{b.name}"]
        assert baseline["cpu"]

    async def ctrl_c() -> None:
        # A 40 Mbit/s link keeps pre-copy of 128 MiB going for ~25 s: time to interrupt.
        lab.set_bandwidth(40)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "migrate.cli", "migrate", "--libvirt", a.uri, spec.name,
            *to_b, "--peer-uri", b.peer_uri, "--events",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line, "the CLI ended before the migration ran"
                record = json.loads(line)
                sample = record.get("sample", {})
                if (
                    record["event"] == "progress"
                    and sample.get("ram_transferred_bytes", 0) > 4 * MIB
                ):
                    break
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        lab.set_bandwidth(None)
        assert proc.returncode == 130, err.decode()
        # One clear line, no traceback, no libvirt chatter.
        assert err.decode().strip().splitlines() == [
            "livemig: interrupted: migration aborted; the VM stays on the source"
        ]
        report = json.loads(out.decode().splitlines()[-1])["report"]
        assert report["status"] == "aborted" and "cancelled by the operator" in report["error"]
        assert "nothing left on the target" in report["error"]
        assert _state(daemons, "a", spec.name) == "running"
        assert b.virsh("list", "--all", "--name").split() == []
        uuid = a.virsh("domuuid", spec.name).strip()
        assert qemu_ram_file(uuid, incoming=True)[0] is None  # no target QEMU left
        assert await guest_answers(lab, guest_ip) > 0

    async def postcopy() -> None:
        target = DomainConsole(b, spec.name)
        attach = asyncio.create_task(target.attach(120))
        # A capped link keeps pre-copy going until the switch to post-copy is asked
        # for (uncapped, a quiet machine may converge first and switch over normally).
        lab.set_bandwidth(100)
        try:
            migration = LibvirtMigration(lab_request(daemons, spec.name, config))
            await migration.start()
            async for event in migration.events():
                if isinstance(event, Progress) and event.sample.ram_transferred_bytes > 4 * MIB:
                    migration.start_postcopy()
                    break
            report = await migration.wait()
            assert report.status is Status.COMPLETED, report.error
            postcopy = [d for d in report.decisions if d.action == "postcopy"]
            assert [d.outcome for d in postcopy] == ["applied"], report.decisions
            flags = [d for d in report.decisions if "VIR_MIGRATE_POSTCOPY" in d.outcome_detail]
            assert flags, report.decisions
            assert any(s.status == "postcopy-active" for s in report.samples)
            # libvirt resumed the target at the switch: the RAM compare cannot vouch for
            # pages that arrived afterwards; the guest's own check on B does.
            assert (
                report.integrity is Integrity.UNCHECKED and "post-copy" in report.integrity_detail
            )
            assert _state(daemons, "a", spec.name) == "absent"
            assert _state(daemons, "b", spec.name) == "running"
            await asyncio.wait_for(asyncio.shield(attach), 10)
            check = await guest_check(target.as_qemu(), config.workload, 0)
            assert check.startswith("ok: memdirty"), check
            assert await guest_answers(lab, guest_ip) > 0
        finally:
            lab.set_bandwidth(None)
            attach.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, OSError):
                await attach
            await target.console.close()

    asyncio.run(scenario())
