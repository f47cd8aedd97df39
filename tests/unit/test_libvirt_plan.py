"""``plan --libvirt`` and ``cpu show|baseline --libvirt`` against libvirt-free fakes:
disks and blocking devices read from domain XML, the dirty rate from domain stats,
host CPUs from capabilities XML, and the CLI's output and exit codes. The real
daemons: tests/integration/test_libvirt.py."""

from __future__ import annotations

import json
from typing import Any

import libvirt
import pytest

from migrate.cli import EXIT_OK, EXIT_PREFLIGHT, EXIT_USAGE
from migrate.cli import main as livemig_main
from migrate.libvirt import plan as libvirt_plan
from migrate.libvirt.hostcpu import host_cpu_of
from migrate.libvirt.plan import dirty_rate_from_stats, plan_domain
from migrate.libvirt.preflight import (
    DomainFacts,
    blocking_devices,
    classify_disks,
    device_check,
    disk_check,
    mount_table,
)
from migrate.plan import BandwidthHint
from migrate.presets import preset
from migrate.report import Verdict

MIB = 1 << 20

MOUNTS = """\
/dev/sda1 / ext4 rw 0 0
nas:/export /var/lib/libvirt/images nfs4 rw 0 0
tmpfs /var/lib/libvirt/images/scratch tmpfs rw 0 0
"""

DISKS_XML = """<domain type='kvm'><name>d</name><devices>
  <disk type='network' device='disk'><source protocol='rbd' name='pool/vm'/><target dev='vda'/></disk>
  <disk type='file' device='disk'><source file='/var/lib/libvirt/images/vm.qcow2'/><target dev='vdb'/></disk>
  <disk type='file' device='cdrom'><target dev='sda'/><readonly/></disk>
  <disk type='file' device='disk'><source file='/var/lib/libvirt/images/scratch/s.img'/><target dev='vdc'/></disk>
  <disk type='block' device='disk'><source dev='/dev/vg/shared'/><target dev='vdd'/><shareable/></disk>
</devices></domain>"""

SKYLAKE_CAPS = """<capabilities><host><uuid>0</uuid><cpu><arch>x86_64</arch>
<model>Skylake-Client-IBRS</model><vendor>Intel</vendor>
<feature name='vmx'/><feature name='ssbd'/></cpu></host></capabilities>"""

MILAN_CAPS = """<capabilities><host><uuid>1</uuid><cpu><arch>x86_64</arch>
<model>EPYC-Milan</model><vendor>AMD</vendor><feature name='svm'/></cpu></host></capabilities>"""

RUNNING_XML = """<domain type='qemu'><name>web</name><uuid>u-1</uuid>
<memory unit='KiB'>262144</memory>
<cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
<devices><memballoon model='none'/></devices></domain>"""


def _facts(xml: str) -> DomainFacts:
    return DomainFacts(xml, "kvm", 256 * MIB, "d", "u-1", True)


def _libvirt_error(message: str) -> libvirt.libvirtError:
    libvirt.virResetLastError()  # libvirtError reads the process-wide last error
    return libvirt.libvirtError(message)


def test_disks_are_classified_shared_or_local() -> None:
    disks = {d.target: d for d in classify_disks(DISKS_XML, mount_table(MOUNTS))}
    assert disks["vda"].shared and disks["vda"].source == "rbd:pool/vm"
    assert disks["vdb"].shared and disks["vdb"].why == "on nfs4"
    assert disks["sda"].shared and disks["sda"].why == "no medium"
    # The longest mount point wins: a tmpfs under the NFS export is local.
    assert not disks["vdc"].shared and disks["vdc"].why == "on tmpfs"
    assert disks["vdd"].shared and disks["vdd"].why == "<shareable/>"
    refused = disk_check(_facts(DISKS_XML), MOUNTS)
    assert refused.verdict is Verdict.REFUSED and refused.forceable
    assert "vdc /var/lib/libvirt/images/scratch/s.img LOCAL" in refused.detail
    assert "--copy-storage-all" in refused.detail
    no_disks = disk_check(_facts(RUNNING_XML), MOUNTS)
    assert no_disks.verdict is Verdict.OK and "no disks" in no_disks.detail
    iso = """<domain><devices><disk type='file' device='cdrom'>
      <source file='/srv/boot.iso'/><target dev='sda'/><readonly/></disk></devices></domain>"""
    warning = disk_check(_facts(iso), MOUNTS)
    assert warning.verdict is Verdict.WARNING and "the target needs the same file" in warning.detail


def test_devices_that_block_migration_are_named_and_never_forceable() -> None:
    xml = """<domain><devices>
      <hostdev mode='subsystem' type='pci'><alias name='hostdev0'/></hostdev>
      <filesystem type='mount'><driver type='virtiofs'/></filesystem>
      <interface type='network'/>
    </devices></domain>"""
    assert blocking_devices(xml) == [
        "a host device passed through (hostdev0)",
        "virtio-fs (QEMU 7.2 cannot migrate its state)",
    ]
    check = device_check(_facts(xml))
    assert check.verdict is Verdict.REFUSED and not check.forceable
    assert device_check(_facts(RUNNING_XML)).verdict is Verdict.OK


def test_dirty_rate_is_read_only_once_measured() -> None:
    measured = {
        "dirtyrate.calc_status": libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED,
        "dirtyrate.megabytes_per_second": 12,
    }
    assert dirty_rate_from_stats(measured) == 12 * MIB
    measuring = {"dirtyrate.calc_status": libvirt.VIR_DOMAIN_DIRTYRATE_MEASURING}
    assert dirty_rate_from_stats(measuring) is None
    assert dirty_rate_from_stats({}) is None


class FakeDomain:
    def __init__(self, xml: str = RUNNING_XML, active: bool = True) -> None:
        self.xml = xml
        self.active = active
        self.dirty_rate_calls: list[tuple[int, int]] = []

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml

    def isActive(self) -> int:
        return int(self.active)

    def UUIDString(self) -> str:
        return "u-1"

    def name(self) -> str:
        return "web"

    def startDirtyRateCalc(self, seconds: int, flags: int = 0) -> int:
        self.dirty_rate_calls.append((seconds, flags))
        return 0


class NoDirtyRateDomain(FakeDomain):
    def startDirtyRateCalc(self, seconds: int, flags: int = 0) -> int:
        libvirt.virResetLastError()
        raise libvirt.libvirtError("calc-dirty-rate not supported")


class FakeConn:
    """One daemon: a domain (or none), its host CPU, free memory and verdicts."""

    def __init__(
        self,
        domain: FakeDomain | None = None,
        caps: str = SKYLAKE_CAPS,
        free_kib: int = 8 << 20,
        cpu_verdict: int = libvirt.VIR_CPU_COMPARE_SUPERSET,
        hostname: str = "host",
    ) -> None:
        self.domain = domain
        self.caps = caps
        self.free_kib = free_kib
        self.cpu_verdict = cpu_verdict
        self.hostname = hostname

    def lookupByName(self, name: str) -> FakeDomain:
        if self.domain is None:
            libvirt.virResetLastError()
            raise libvirt.libvirtError(f"Domain not found: no domain with matching name '{name}'")
        return self.domain

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        return self.lookupByName(uuid)

    def compareHypervisorCPU(self, *args: Any) -> int:
        return self.cpu_verdict

    def getDomainCapabilities(self, *args: Any) -> str:
        return (
            "<domainCapabilities><cpu><mode name='host-model' supported='yes'>"
            "<model>qemu64</model></mode></cpu></domainCapabilities>"
        )

    def close(self) -> int:
        return 0

    def getCapabilities(self) -> str:
        return self.caps

    def getHostname(self) -> str:
        return self.hostname

    def getMemoryStats(self, cell: int, flags: int = 0) -> dict[str, int]:
        return {"free": self.free_kib, "buffers": 0, "cached": 0, "total": 16 << 20}

    def getLibVersion(self) -> int:
        return 9_000_000

    def getVersion(self) -> int:
        return 7_002_000

    def domainListGetStats(
        self, domains: list[Any], stats: int
    ) -> list[tuple[Any, dict[str, Any]]]:
        assert stats == libvirt.VIR_DOMAIN_STATS_DIRTYRATE
        return [
            (
                domains[0],
                {
                    "dirtyrate.calc_status": libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED,
                    "dirtyrate.megabytes_per_second": 8,
                },
            )
        ]


def test_plan_domain_runs_the_preflight_and_forecasts_from_libvirts_dirty_rate() -> None:
    domain = FakeDomain()
    bandwidth = BandwidthHint.from_link_mbit(1000)
    planned = plan_domain(FakeConn(domain), FakeConn(), "web", preset("livemig"), bandwidth)
    assert domain.dirty_rate_calls == [(1, libvirt.VIR_DOMAIN_DIRTYRATE_MODE_PAGE_SAMPLING)]
    names = [c.name for c in planned.preflight]
    assert names == ["cpu", "target-domain", "disks", "devices", "target-memory", "versions"]
    assert not planned.refused
    assert planned.predicted is not None
    assert planned.predicted.dirty_rate_bytes_per_s == 8 * MIB
    assert "through libvirt" in planned.predicted.dirty_rate_method
    assert planned.predicted.ram_bytes == 256 * MIB
    data = json.loads(json.dumps(planned.to_dict()))
    assert data["mode"] == "live" and data["refused"] is False
    assert data["dirty_rate_bytes_per_s"] == 8 * MIB
    # A shut-off domain is judged, not measured: only its definition would move.
    off = FakeDomain(active=False)
    planned = plan_domain(FakeConn(off), FakeConn(), "web", preset("livemig"), bandwidth)
    assert off.dirty_rate_calls == [] and planned.predicted is None
    assert planned.to_dict()["mode"] == "offline"
    # A QEMU that cannot measure its dirty rate: judged, no forecast, and why.
    planned = plan_domain(
        FakeConn(NoDirtyRateDomain()), FakeConn(), "web", preset("livemig"), bandwidth
    )
    assert planned.predicted is None and not planned.refused
    assert planned.not_measured is not None and "calc-dirty-rate not supported" in (
        planned.not_measured
    )


def test_plan_cli_prints_json_and_exits_3_when_the_move_would_be_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conns = {
        "qemu:///a": FakeConn(FakeDomain()),
        "qemu:///b": FakeConn(free_kib=64 << 10, cpu_verdict=libvirt.VIR_CPU_COMPARE_INCOMPATIBLE),
    }
    monkeypatch.setattr(libvirt_plan, "open_connection", conns.__getitem__)
    argv = ["plan", "--libvirt", "qemu:///a", "web", "--to", "qemu:///b", "--link-mbit", "1000"]
    assert livemig_main([*argv, "--json"]) == EXIT_PREFLIGHT
    data = json.loads(capsys.readouterr().out)
    refused = {c["name"] for c in data["preflight"] if c["verdict"] == "refused"}
    assert refused == {"cpu", "target-memory"}
    assert data["refused"] is True and data["policy"] == "livemig"
    assert data["recommendation"]
    conns["qemu:///b"] = FakeConn()
    assert livemig_main(argv) == EXIT_OK
    text = capsys.readouterr().out
    assert "domain web (256 MiB, running: live migration)" in text
    assert "target-memory  ok" in text and "recommendation:" in text
    # --to belongs to --libvirt, and a missing domain is one line.
    assert livemig_main(["plan", "--lab", "--to", "qemu:///b"]) != EXIT_OK
    assert "go together" in capsys.readouterr().err
    conns["qemu:///a"] = FakeConn(None)
    assert livemig_main(argv) != EXIT_OK
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("livemig: error: ")
    assert "no domain with matching name 'web'" in err


def test_host_cpus_from_libvirt_capabilities(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cpumodel.libvirt import load_cpu_map
    from cpumodel.sources import model_resolver

    resolver = model_resolver(load_cpu_map(), lambda: pytest.fail("QEMU catalogue asked"))
    host = host_cpu_of(FakeConn(hostname="node-1"), "qemu:///a", resolver)
    assert host.name == "node-1" and host.vendor_label == "Intel"
    assert {"avx2", "vmx"} <= host.flags

    from migrate.libvirt import hostcpu

    conns = {
        "qemu:///a": FakeConn(hostname="intel-1"),
        "qemu:///b": FakeConn(caps=MILAN_CAPS, hostname="amd-1"),
    }
    monkeypatch.setattr(hostcpu, "open_connection", conns.__getitem__)
    assert livemig_main(["cpu", "show", "--libvirt", "qemu:///a", "--json"]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "intel-1" and "avx2" in shown["flags"]
    # Intel and AMD together: cpumodel proposes a model both run.
    code = livemig_main(["cpu", "baseline", "--libvirt", "qemu:///a", "qemu:///b", "--json"])
    assert code == EXIT_OK
    baseline = json.loads(capsys.readouterr().out)
    assert [h["name"] for h in baseline["hosts"]] == ["intel-1", "amd-1"]
    assert baseline["cpu"]
    assert livemig_main(["cpu", "baseline"]) == EXIT_USAGE
    assert "--libvirt" in capsys.readouterr().err
