"""What a VM is, independent of where it runs: :class:`VMSpec` and its QEMU argv.

The same spec starts the source VM and the incoming VM on the target; what differs
per host (tap device names, socket and RAM-file paths, incoming/paused) is passed to
:meth:`VMSpec.qemu_argv` as a :class:`LaunchSite`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from migrate import validate
from migrate.errors import ConfigError

_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*", re.ASCII)


class Accelerator(StrEnum):
    TCG = "tcg"
    KVM = "kvm"


class RamBackendKind(StrEnum):
    """How guest RAM is backed.

    ``SHARED_FILE`` (``memory-backend-file,share=on`` under /dev/shm) lets the engine
    map guest RAM: needed for the RAM-digest integrity check and for pagestream.
    """

    ANONYMOUS = "anonymous"
    SHARED_FILE = "shared-file"

    @property
    def engine_can_map(self) -> bool:
        return self is RamBackendKind.SHARED_FILE


@dataclass(frozen=True)
class NicSpec:
    """A virtio NIC; its host-side tap is chosen per host at launch."""

    mac: str
    id: str = "net0"
    model: str = "virtio-net-pci"

    def __post_init__(self) -> None:
        if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac):
            raise ConfigError(f"bad MAC address {self.mac!r} (want aa:bb:cc:dd:ee:ff, lower case)")
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise ConfigError(f"bad NIC id {self.id!r}")


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class DiskCache(StrEnum):
    """QEMU's ``cache=`` modes; ``none`` (O_DIRECT) is what migration over shared storage needs."""

    NONE = "none"
    WRITETHROUGH = "writethrough"
    WRITEBACK = "writeback"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"


@dataclass(frozen=True)
class DiskSpec:
    """A virtio block device backed by an image file at the same path on every host."""

    path: Path
    id: str = "disk0"
    format: DiskFormat = DiskFormat.RAW
    cache: DiskCache = DiskCache.NONE

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise ConfigError(f"bad disk id {self.id!r}")
        raw = str(self.path)
        if not Path(raw).is_absolute() or "," in raw or validate.has_control(raw):
            raise ConfigError(f"disk {self.id}: path must be absolute, without commas: {raw!r}")


@dataclass(frozen=True)
class QmpTlsListen:
    """An extra QMP monitor on TCP with mutual TLS, for an engine on another host.

    ``creds_dir`` is a QEMU creds dir (:func:`migrate.tls.write_qemu_creds_dir`);
    clients must present a certificate of its CA.
    """

    host: str
    port: int
    creds_dir: Path


@dataclass(frozen=True)
class LaunchSite:
    """The host-specific half of a launch.

    ``taps`` maps NIC id → tap ifname on this host. ``incoming`` starts QEMU with
    ``-incoming defer``; ``paused`` with ``-S`` (an incoming VM then stays paused after
    the migration until the engine resumes it). The serial console goes to
    ``serial_socket`` (QEMU waits for a reader) or, without one, to the file
    ``serial_log``. ``qmp_tls`` adds a QMP monitor on TCP with mutual TLS.
    """

    qmp_socket: Path
    serial_socket: Path | None
    ram_path: Path | None = None
    taps: Mapping[str, str] = field(default_factory=dict)
    incoming: bool = False
    paused: bool = False
    serial_log: Path | None = None
    qmp_tls: QmpTlsListen | None = None


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to start identical source and incoming QEMUs.

    Memory in MiB. ``kernel``/``initrd``/``append`` boot a kernel directly.
    ``ram_dir`` is where a ``SHARED_FILE`` RAM backend's file goes (None: a
    private directory under /dev/shm); a hugetlbfs mount there gives huge-page
    backed guest RAM that the engine can still map (size a multiple of the huge
    page size, and enough huge pages reserved).
    """

    name: str
    memory_mib: int
    vcpus: int = 1
    cpu_model: str = "qemu64"
    accelerator: Accelerator = Accelerator.TCG
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    nics: tuple[NicSpec, ...] = ()
    ram_backend: RamBackendKind = RamBackendKind.SHARED_FILE
    machine: str = "pc"
    binary: str = "qemu-system-x86_64"
    extra_args: tuple[str, ...] = ()
    ram_dir: Path | None = None
    disks: tuple[DiskSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _ID_RE.fullmatch(self.name):
            raise ConfigError(f"bad VM name {self.name!r} (letters, digits, _ . -)")
        validate.whole(self.memory_mib, "memory_mib", minimum=16)
        validate.whole(self.vcpus, "vcpus", minimum=1)
        validate.text(self.cpu_model, "cpu_model", max_length=4096)
        if self.initrd is not None and self.kernel is None:
            raise ConfigError("an initrd needs a kernel")
        ids = [n.id for n in self.nics]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate NIC ids: {ids}")
        disk_ids = [d.id for d in self.disks]
        if len(set(disk_ids)) != len(disk_ids):
            raise ConfigError(f"duplicate disk ids: {disk_ids}")

    @property
    def ram_bytes(self) -> int:
        return self.memory_mib << 20

    def qemu_argv(self, site: LaunchSite) -> list[str]:
        """The QEMU command line for this spec on ``site``.

        Raises :class:`ConfigError` if a NIC has no tap on the site or a shared-file
        RAM backend has no path.
        """
        argv = [
            self.binary,
            "-name", self.name,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-accel", self.accelerator.value,
            "-cpu", self.cpu_model,
            "-smp", str(self.vcpus),
            "-m", f"{self.memory_mib}M",
        ]  # fmt: skip
        machine = self.machine
        if self.ram_backend is RamBackendKind.SHARED_FILE:
            if site.ram_path is None:
                raise ConfigError("a shared-file RAM backend needs a RAM file path")
            argv += [
                "-object",
                f"memory-backend-file,id=ram0,size={self.memory_mib}M,"
                f"mem-path={site.ram_path},share=on",
            ]
            machine += ",memory-backend=ram0"
        argv += ["-machine", machine]
        if self.kernel is not None:
            argv += ["-kernel", str(self.kernel)]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        if self.append:
            argv += ["-append", self.append]
        for nic in self.nics:
            tap = site.taps.get(nic.id)
            if tap is None:
                raise ConfigError(f"NIC {nic.id} has no tap device on this host")
            argv += [
                "-netdev", f"tap,id={nic.id},ifname={tap},script=no,downscript=no",
                "-device", f"{nic.model},netdev={nic.id},mac={nic.mac},id=nic-{nic.id}",
            ]  # fmt: skip
        for disk in self.disks:
            argv += [
                "-drive",
                f"file={disk.path},format={disk.format.value},if=none,id={disk.id},"
                f"cache={disk.cache.value}",
                "-device", f"virtio-blk-pci,drive={disk.id},id=blk-{disk.id}",
            ]  # fmt: skip
        if site.serial_socket is not None:
            serial = f"socket,id=serial0,path={site.serial_socket},server=on,wait=on"
        elif site.serial_log is not None:
            serial = f"file,id=serial0,path={site.serial_log}"
        else:
            raise ConfigError("a launch site needs a serial socket or a serial log file")
        argv += [
            "-chardev", serial,
            "-serial", "chardev:serial0",
            "-chardev", f"socket,id=qmp0,path={site.qmp_socket},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
        ]  # fmt: skip
        if site.qmp_tls is not None:
            tls = site.qmp_tls
            argv += [
                "-object",
                f"tls-creds-x509,id=qmptls0,dir={tls.creds_dir},endpoint=server,verify-peer=on",
                "-chardev",
                f"socket,id=qmp1,host={tls.host},port={tls.port},server=on,wait=off,"
                "tls-creds=qmptls0",
                "-mon", "chardev=qmp1,mode=control",
            ]  # fmt: skip
        if site.incoming:
            argv += ["-incoming", "defer"]
        if site.paused:
            argv.append("-S")
        argv += list(self.extra_args)
        return argv
