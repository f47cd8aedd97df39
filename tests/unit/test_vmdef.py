"""VM definitions: JSON round trip, strict validation, schema; argv round trip for adoption."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from migrate.disks.model import CacheMode, DiskFormat
from migrate.errors import ConfigError
from migrate.hostvm import parse_qemu_argv
from migrate.vmdef import DiskDef, DiskSharing, NicDef, RamDef, VmDefinition
from migrate.vmspec import LaunchSite
from tests.jsonschemas import validate_vm_definition


def _full() -> VmDefinition:
    return VmDefinition(
        name="web1",
        memory_mib=256,
        vcpus=2,
        cpu_model="Westcore,-vmx",
        kernel="/srv/vm/vmlinuz",
        initrd="/srv/vm/initrd",
        append="console=ttyS0 quiet livemig.ip=198.18.0.10/24",
        disks=(
            DiskDef("/srv/shared/web1.qcow2", "disk0", DiskFormat.QCOW2, 2048, CacheMode.NONE),
            DiskDef("/srv/local/data.raw", "data", size_mib=512, cache=CacheMode.WRITEBACK),
        ),
        nics=(
            NicDef("52:54:00:12:34:56", tap="tap0"),
            NicDef("52:54:00:12:34:57", "net1", tap="tap1"),
        ),
    )


def test_json_round_trip_and_schema() -> None:
    definition = _full()
    data = json.loads(definition.to_json())
    validate_vm_definition(data)
    assert VmDefinition.from_dict(data) == definition
    minimal = {"name": "vm", "memory_mib": 64, "kernel": "/k"}
    validate_vm_definition(minimal)
    assert VmDefinition.from_dict(minimal).ram == RamDef()
    bridged = dataclasses.replace(definition, nics=(NicDef("52:54:00:00:00:01", bridge="br0"),))
    assert VmDefinition.from_dict(json.loads(bridged.to_json())) == bridged
    with pytest.raises(ConfigError, match="must be a JSON object"):
        VmDefinition.from_dict([])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(bogus=1), "unknown field 'bogus'"),
        (lambda d: d.pop("memory_mib"), "missing field 'memory_mib'"),
        (lambda d: d.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda d: d.update(memory_mib="256"), "memory_mib must be a whole number"),
        (lambda d: d.update(memory_mib=8), "memory_mib must be at least 16"),
        (lambda d: d.update(name="a b"), "name must not hold whitespace"),
        (lambda d: d.update(kernel="vmlinuz"), "kernel must be an absolute path"),
        (lambda d: d.update(kernel=None, initrd=None, disks=[]), "nothing to boot"),
        (lambda d: d.update(append="a\nb"), "append must be one line"),
        (lambda d: d["disks"][0].update(format="vmdk"), r"disks\[0\]: format must be one of"),
        (lambda d: d["disks"][1].update(path="/a,b"), r"disks\[1\].path must be an absolute"),
        (lambda d: d["disks"][1].update(id="disk0"), "duplicate disks ids"),
        (lambda d: d["nics"][0].update(mac="52:54:00:12:34:5G"), r"nics\[0\].mac"),
        (lambda d: d["nics"][0].update(bridge="br0"), r"nics\[0\] needs exactly one of"),
        (lambda d: d["nics"][0].update(tap=None, bridge="br 0"), r"nics\[0\].bridge"),
        (lambda d: d["nics"][1].update(extra=1), r"nics\[1\]: unknown field 'extra'"),
        (lambda d: d.update(nics={}), "nics must be a list"),
        (lambda d: d.update(ram={"backend": "file", "share": False}), "share must be true"),
        (lambda d: d.update(ram={"hugepages": True}), "hugepages needs"),
        (lambda d: d.update(ram=[]), "ram must be a JSON object"),
    ],
)
def test_bad_definitions_are_refused_in_one_line(change: Any, message: str) -> None:
    data = _full().to_dict()
    change(data)
    with pytest.raises(ConfigError, match=message) as info:
        VmDefinition.from_dict(data)
    assert "\n" not in str(info.value)


def test_load_refuses_non_json_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        VmDefinition.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="is not JSON"):
        VmDefinition.load(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(_full().to_json())
    assert VmDefinition.load(tmp_path / "ok.json") == _full()


def _site(tmp_path: Path, **kwargs: Any) -> LaunchSite:
    return LaunchSite(
        qmp_socket=tmp_path / "qmp.sock",
        serial_socket=None,
        serial_log=tmp_path / "serial.log",
        ram_path=tmp_path / "ram",
        taps={"net0": "tap0", "net1": "tap1"},
        **kwargs,
    )


@pytest.mark.parametrize("incoming", [False, True])
def test_definition_to_argv_and_back(tmp_path: Path, incoming: bool) -> None:
    full = _full()
    # What a command line cannot carry: the disk's size and whether hosts share it.
    disks = tuple(
        dataclasses.replace(d, size_mib=None, sharing=DiskSharing.LOCAL) for d in full.disks
    )
    definition = dataclasses.replace(full, disks=disks)
    argv = full.spec().qemu_argv(_site(tmp_path, incoming=incoming, paused=incoming))
    parsed = parse_qemu_argv([*argv, "-daemonize", "-pidfile", str(tmp_path / "pid")])
    assert parsed.definition == definition
    assert parsed.ram_path == tmp_path / "ram"
    assert parsed.taps == {"net0": "tap0", "net1": "tap1"}
    assert parsed.qmp_sockets == (tmp_path / "qmp.sock",)
    assert parsed.serial_log == tmp_path / "serial.log"
    assert (parsed.incoming, parsed.paused) == (incoming, incoming)


def test_common_variants_are_understood() -> None:
    argv = [
        "qemu-system-x86_64", "-name", "guest=legacy,debug-threads=on", "-enable-kvm",
        "-machine", "pc,accel=kvm", "-m", "size=1G", "-smp", "cpus=2,sockets=1",
        "-cpu", "host", "-drive", "file=/img/a.qcow2,format=qcow2,if=virtio,cache=none",
        "-qmp", "unix:/run/q.sock,server=on,wait=off", "-serial", "file:/var/log/c.log",
        "-nographic", "-incoming", "tcp:0:4444",
    ]  # fmt: skip
    parsed = parse_qemu_argv(argv)
    d = parsed.definition
    assert (d.name, d.memory_mib, d.vcpus, d.accelerator.value) == ("legacy", 1024, 2, "kvm")
    assert d.ram.backend.value == "anonymous" and d.disks[0].format is DiskFormat.QCOW2
    assert parsed.qmp_sockets == (Path("/run/q.sock"),) and parsed.incoming


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["-vnc", ":0"], "-vnc"),
        (["-device", "e1000e,id=x"], "-device e1000e"),
        (["-object", "rng-random,id=r"], "-object rng-random"),
        (["-netdev", "user,id=u"], "-netdev user"),
        (["-machine", "pc,smm=off"], "-machine smm"),
        (["-serial", "pty"], "-serial pty"),
    ],
)
def test_unknown_options_are_refused_by_name(extra: list[str], named: str) -> None:
    argv = ["qemu-system-x86_64", "-m", "128", "-kernel", "/k", *extra]
    with pytest.raises(ConfigError, match="options livemig does not know") as info:
        parse_qemu_argv(argv)
    assert named in str(info.value)


def test_adoption_refuses_ram_it_cannot_describe() -> None:
    base = ["qemu", "-m", "128M", "-kernel", "/k", "-machine", "pc,memory-backend=r"]
    with pytest.raises(ConfigError, match="share=on"):
        parse_qemu_argv(
            [*base, "-object", "memory-backend-file,id=r,size=128M,mem-path=/dev/shm/x"]
        )
    with pytest.raises(ConfigError, match="differs from -m"):
        parse_qemu_argv(
            [*base, "-object", "memory-backend-file,id=r,size=64M,mem-path=/x,share=on"]
        )
    with pytest.raises(ConfigError, match="no -m"):
        parse_qemu_argv(["qemu", "-kernel", "/k"])
