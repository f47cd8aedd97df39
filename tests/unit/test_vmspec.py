import itertools
from pathlib import Path

import pytest

from migrate.errors import ConfigError
from migrate.vmspec import Accelerator, LaunchSite, NicSpec, RamBackendKind, VMSpec


def _site(**kw: object) -> LaunchSite:
    base: dict[str, object] = {
        "qmp_socket": Path("/run/x/qmp.sock"),
        "serial_socket": Path("/run/x/serial.sock"),
        "ram_path": Path("/dev/shm/x/ram"),
        "taps": {"net0": "tap3"},
    }
    base.update(kw)
    return LaunchSite(**base)  # type: ignore[arg-type]


def _spec(**kw: object) -> VMSpec:
    base: dict[str, object] = {
        "name": "vm1",
        "memory_mib": 256,
        "kernel": Path("/k"),
        "initrd": Path("/i"),
        "append": "console=ttyS0",
        "nics": (NicSpec(mac="52:54:00:00:00:01"),),
    }
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def _pairs(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for flag, value in itertools.pairwise(argv):
        if flag.startswith("-"):
            out.setdefault(flag, []).append(value)
    return out


def test_argv_has_shared_ram_backend_tap_and_sockets() -> None:
    argv = _spec().qemu_argv(_site())
    flags = _pairs(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert flags["-machine"] == ["pc,memory-backend=ram0"]
    assert flags["-object"] == [
        "memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/x/ram,share=on"
    ]
    assert flags["-netdev"] == ["tap,id=net0,ifname=tap3,script=no,downscript=no"]
    assert flags["-device"] == ["virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,id=nic-net0"]
    assert flags["-accel"] == ["tcg"]
    assert "socket,id=qmp0,path=/run/x/qmp.sock,server=on,wait=off" in flags["-chardev"]
    assert "-incoming" not in argv and "-S" not in argv


def test_same_spec_launches_incoming_paused_target() -> None:
    spec = _spec(accelerator=Accelerator.KVM, cpu_model="host")
    source = spec.qemu_argv(_site())
    target = spec.qemu_argv(_site(incoming=True, paused=True))
    # The machine is defined identically; the target only adds how it starts.
    assert target == [*source, "-incoming", "defer", "-S"]
    assert _pairs(target)["-cpu"] == ["host"]


def test_anonymous_ram_has_no_backend_object() -> None:
    argv = _spec(ram_backend=RamBackendKind.ANONYMOUS).qemu_argv(_site(ram_path=None))
    assert "-object" not in argv
    assert _pairs(argv)["-machine"] == ["pc"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory_mib": 8}, "memory_mib"),
        ({"vcpus": 0}, "vcpus"),
        ({"name": "bad name"}, "bad VM name"),
        ({"kernel": None}, "initrd needs a kernel"),
        (
            {"nics": (NicSpec(mac="52:54:00:00:00:01"), NicSpec(mac="52:54:00:00:00:02"))},
            "duplicate",
        ),
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _spec(**kwargs)


def test_bad_mac_is_refused() -> None:
    with pytest.raises(ConfigError, match="bad MAC"):
        NicSpec(mac="52:54:00:00:00")


def test_nic_without_tap_and_shared_ram_without_path_are_refused() -> None:
    with pytest.raises(ConfigError, match="no tap"):
        _spec().qemu_argv(_site(taps={}))
    with pytest.raises(ConfigError, match="RAM file path"):
        _spec().qemu_argv(_site(ram_path=None))
