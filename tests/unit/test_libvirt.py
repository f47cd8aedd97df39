"""The libvirt strategy's pure parts: job stats → samples, intents → libvirt, RAM lookup,
the request's checks and the CLI's options. The real daemons: tests/integration/test_libvirt.py."""

from __future__ import annotations

import json
from pathlib import Path

import libvirt
import pytest

from migrate.cli import build_parser
from migrate.cli import main as livemig_main
from migrate.control.base import UNLIMITED_BANDWIDTH, decide
from migrate.control.intents import (
    AnnounceEarly,
    ArmAutoConverge,
    ArmPostcopy,
    CapBandwidth,
    Compress,
    SetDowntimeLimit,
    SetMultifd,
    StartPostcopy,
    Throttle,
)
from migrate.errors import ConfigError
from migrate.libvirt import LibvirtEndpoint, LibvirtRequest
from migrate.libvirt.levers import bandwidth_mib, settle_live, settle_pending, start_settings
from migrate.libvirt.ram import qemu_ram_file
from migrate.libvirt.stats import completed_figure, job_status, sample_from_job_stats
from migrate.report import Outcome

MIB = 1 << 20


class FakeJobDomain:
    """Records the calls a running job takes; ``refuse`` names one libvirt refuses."""

    def __init__(self, refuse: str | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.refuse = refuse

    def _call(self, name: str, value: int = 0) -> int:
        if name == self.refuse:
            libvirt.virResetLastError()  # libvirtError reads the process-wide last error
            raise libvirt.libvirtError(f"{name} refused")
        self.calls.append((name, value))
        return 0

    def migrateSetMaxDowntime(self, downtime: int, flags: int = 0) -> int:
        return self._call("migrateSetMaxDowntime", downtime)

    def migrateSetMaxSpeed(self, bandwidth: int, flags: int = 0) -> int:
        return self._call("migrateSetMaxSpeed", bandwidth)

    def migrateSetCompressionCache(self, cacheSize: int, flags: int = 0) -> int:
        return self._call("migrateSetCompressionCache", cacheSize)

    def migrateStartPostCopy(self, flags: int = 0) -> int:
        return self._call("migrateStartPostCopy")

    def abortJob(self) -> int:
        return self._call("abortJob")


def test_job_stats_become_a_sample() -> None:
    stats = {
        "type": 2, "memory_total": 256 * MIB, "memory_remaining": 10 * MIB,
        "memory_processed": 100 * MIB, "memory_bps": 125_000_000, "memory_dirty_rate": 300,
        "memory_iteration": 3, "memory_page_size": 4096, "downtime": 50,
        "auto_converge_throttle": 20, "memory_constant": 7, "memory_normal": 9,
    }  # fmt: skip
    sample = sample_from_job_stats(stats, 100.0, 1500.0, "active")
    assert sample.status == "active"
    assert sample.ram_total_bytes == 256 * MIB
    assert sample.ram_remaining_bytes == 10 * MIB
    assert sample.ram_transferred_bytes == 100 * MIB
    assert sample.mbps == pytest.approx(1000.0)
    assert sample.dirty_rate_bytes_per_s == 300 * 4096
    assert sample.dirty_sync_count == 3
    assert sample.expected_downtime_ms == 50.0
    assert sample.cpu_throttle_pct == 20
    assert (sample.duplicate_pages, sample.normal_pages) == (7, 9)


def test_job_status_prefers_qemu_while_running_and_libvirt_at_the_end() -> None:
    assert job_status({"type": 2}, "device") == "device"
    assert job_status({"type": 2}) == "active"
    assert job_status({"type": 3}, "active") == "completed"
    assert job_status({}, None) == "none"
    assert sample_from_job_stats({"downtime": "x"}, 0, 0).expected_downtime_ms is None
    assert completed_figure({"downtime": 21}, "downtime") == 21.0
    assert completed_figure({}, "downtime") is None


def test_start_decisions_become_flags_and_parameters() -> None:
    base = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
    decisions = [
        decide(0, "caps", ArmAutoConverge(), ArmPostcopy(), Compress("xbzrle")),
        decide(0, "limits", SetDowntimeLimit(20), CapBandwidth(64 * MIB)),
        decide(0, "throttle", Throttle(initial_pct=1, increment_pct=1, max_pct=1)),
        decide(0, "announce", AnnounceEarly(0)),
        decide(0, "multifd", SetMultifd(channels=2, compression="zstd")),
    ]
    settings = start_settings(decisions, base)
    flags = settings.flags
    assert flags & libvirt.VIR_MIGRATE_AUTO_CONVERGE
    assert flags & libvirt.VIR_MIGRATE_POSTCOPY
    assert flags & libvirt.VIR_MIGRATE_COMPRESSED
    assert flags & libvirt.VIR_MIGRATE_PARALLEL
    params = settings.params
    assert params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 64
    assert params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] == "xbzrle"
    assert params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] == 1
    assert params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] == 2
    outcomes = {d.reason: (d.outcome, d.outcome_detail) for d in settings.settled}
    assert outcomes["caps"][0] is Outcome.APPLIED
    assert outcomes["throttle"][0] is Outcome.PARTIAL  # 1 % ceiling: no libvirt parameter
    assert "max-cpu-throttle" in outcomes["throttle"][1]
    assert outcomes["announce"][0] is Outcome.REJECTED
    assert "announces" in outcomes["announce"][1]
    assert outcomes["multifd"][0] is Outcome.PARTIAL
    # The downtime limit waits for the running job, with the bandwidth part already done.
    (pending,) = settings.pending
    assert pending.decision.reason == "limits"
    domain = FakeJobDomain()
    settled = settle_pending(pending, domain, postcopy_armed=True)
    assert settled.outcome is Outcome.APPLIED
    assert domain.calls == [("migrateSetMaxDowntime", 20)]


def test_no_bandwidth_cap_sets_no_parameter() -> None:
    settings = start_settings([decide(0, "cap", CapBandwidth(UNLIMITED_BANDWIDTH))], 0)
    assert libvirt.VIR_MIGRATE_PARAM_BANDWIDTH not in settings.params
    assert settings.settled[0].outcome is Outcome.APPLIED
    assert bandwidth_mib(MIB + 1) == 2  # a cap is rounded up, never tighter


def test_live_intents_go_through_libvirt_or_are_rejected_with_why() -> None:
    domain = FakeJobDomain()
    applied = settle_live(decide(0, "cap", CapBandwidth(8 * MIB)), domain, False)
    assert applied.outcome is Outcome.APPLIED
    assert domain.calls == [("migrateSetMaxSpeed", 8)]
    no_postcopy = settle_live(decide(0, "pc", StartPostcopy()), domain, postcopy_armed=False)
    assert no_postcopy.outcome is Outcome.REJECTED
    assert "VIR_MIGRATE_POSTCOPY" in no_postcopy.outcome_detail
    throttle = settle_live(decide(0, "t", Throttle(30, 10, 99)), domain, False)
    assert throttle.outcome is Outcome.REJECTED
    assert settle_live(decide(0, "pc", StartPostcopy()), domain, True).outcome is Outcome.APPLIED
    assert domain.calls[-1] == ("migrateStartPostCopy", 0)
    refused = settle_live(decide(0, "d", SetDowntimeLimit(50)), FakeJobDomain("migrateSetMaxDowntime"), False)  # fmt: skip
    assert refused.outcome is Outcome.FAILED
    assert "refused" in refused.outcome_detail


def _fake_proc(root: Path, pid: int, argv: list[str]) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_ram_file_is_read_from_the_qemu_command_line(tmp_path: Path) -> None:
    proc, ram = tmp_path / "proc", tmp_path / "pc.ram"
    ram.write_bytes(b"\0" * 4096)
    uuid = "5e7ddcbe-ff38-44d3-b1ca-9718180de3dc"
    backend = {"qom-type": "memory-backend-file", "id": "pc.ram", "mem-path": str(ram),
               "share": True, "size": 4096}  # fmt: skip
    _fake_proc(proc, 10, ["/usr/bin/qemu-system-x86_64", "-uuid", uuid, "-object", json.dumps(backend)])  # fmt: skip
    _fake_proc(proc, 11, ["/usr/bin/qemu-system-x86_64", "-uuid", uuid, "-incoming", "defer",
                          "-object", f"memory-backend-file,id=m,mem-path={ram},share=off"])  # fmt: skip
    _fake_proc(proc, 12, ["/bin/sh", "-uuid", uuid])
    assert qemu_ram_file(uuid, incoming=False, proc=proc) == (ram, "")
    path, why = qemu_ram_file(uuid, incoming=True, proc=proc)
    assert path is None and "not shared" in why
    path, why = qemu_ram_file("other", incoming=False, proc=proc)
    assert path is None and "no QEMU" in why


def test_request_checks_its_input() -> None:
    a, b = (
        LibvirtEndpoint("a", "qemu:///a"),
        LibvirtEndpoint("b", "qemu:///b", "qemu+tcp://b/system"),
    )
    assert b.migration_uri == "qemu+tcp://b/system"
    assert a.migration_uri == "qemu:///a"
    with pytest.raises(ConfigError):
        LibvirtRequest(a, b, " ")
    with pytest.raises(ConfigError):
        LibvirtRequest(a, a, "demo")
    with pytest.raises(ConfigError):
        LibvirtRequest(a, b, "demo", sample_interval_s=0)
    with pytest.raises(ConfigError):
        LibvirtEndpoint("x", "")


def test_cli_libvirt_options(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["migrate", "--libvirt", "qemu:///a", "dom", "--to", "qemu:///b"])
    assert args.libvirt == ["qemu:///a", "dom"] and args.to == "qemu:///b"
    assert parser.parse_args(["demo", "--libvirt", "--json"]).libvirt is True
    usage_errors = {
        ("migrate", "--libvirt", "qemu:///a", "dom"): "--libvirt needs --to",
        ("migrate", "--policy", "livemig"): "required: --source-qmp, --target-qmp, --target-uri",
        ("migrate", "--libvirt", "qemu:///a", "dom", "--to", "qemu:///b", "--source-qmp", "/x"):
            "--libvirt replaces --source-qmp",
        ("migrate", "--source-qmp", "/s", "--target-qmp", "/t", "--target-uri", "tcp:h:1",
         "--to", "qemu:///b"): "--to goes with --libvirt",
    }  # fmt: skip
    for argv, message in usage_errors.items():
        with pytest.raises(SystemExit) as exited:
            livemig_main(list(argv))
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_rollback_runs_to_its_end_through_a_second_cancellation() -> None:
    import asyncio

    from migrate.libvirt.run import _to_the_end

    done: list[str] = []

    async def rollback() -> list[str]:
        await asyncio.sleep(0.2)  # libvirt ending its job
        done.append("rolled back")
        return ["libvirt job aborted"]

    async def failing_task() -> tuple[list[str], bool]:
        return await _to_the_end(rollback())

    async def scenario() -> tuple[list[str], bool]:
        task = asyncio.create_task(failing_task())
        await asyncio.sleep(0.05)
        task.cancel()  # the abort's grace period ran out meanwhile
        return await task

    notes, cancelled = asyncio.run(scenario())
    assert done == ["rolled back"] and notes == ["libvirt job aborted"] and cancelled
