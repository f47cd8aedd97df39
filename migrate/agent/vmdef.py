"""A VM definition as agents keep and exchange it: versioned JSON around a :class:`VMSpec`.

::

    {"version": 1, "name": "web1", "memory_mib": 256, "vcpus": 1,
     "cpu_model": "qemu64", "accelerator": "tcg", "machine": "pc",
     "kernel": "/srv/vmlinuz", "initrd": "/srv/initrd", "append": "console=ttyS0",
     "nics": [{"id": "net0", "mac": "52:54:00:00:00:01", "bridge": "br0"}],
     "ram_backend": "shared-file"}

Paths (kernel, initrd) are read on whichever host starts the VM: a migration's
target must hold the same files at the same paths (as with a disk image). NICs
name the host bridge their tap joins; each host makes its own tap. The RAM backend
is always a ``memory-backend-file,share=on`` under ``/dev/shm`` (``shared-file``):
agents digest their own VM's RAM for the integrity check, and pagestream needs it.

:func:`from_qemu_argv` recovers a definition from a running QEMU's command line
(``livemig vm adopt``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrate import validate
from migrate.errors import ConfigError
from migrate.vmspec import Accelerator, NicSpec, RamBackendKind, VMSpec

DEFINITION_VERSION = 1
_BRIDGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", re.ASCII)
_KEYS = {
    "version", "name", "memory_mib", "vcpus", "cpu_model", "accelerator", "machine",
    "kernel", "initrd", "append", "nics", "ram_backend",
}  # fmt: skip
_NIC_KEYS = {"id", "mac", "bridge", "model"}


@dataclass(frozen=True)
class NicDef:
    """A NIC: its id, MAC, device model and the host bridge its tap joins."""

    id: str
    mac: str
    bridge: str
    model: str = "virtio-net-pci"

    def __post_init__(self) -> None:
        NicSpec(mac=self.mac, id=self.id, model=self.model)  # the same checks
        if not isinstance(self.bridge, str) or not _BRIDGE_RE.fullmatch(self.bridge):
            raise ConfigError(f"bad bridge name {self.bridge!r} (an interface name)")


@dataclass(frozen=True)
class VmDefinition:
    """What an agent needs to start a VM on its host (see the module docstring)."""

    name: str
    memory_mib: int
    vcpus: int = 1
    cpu_model: str = "qemu64"
    accelerator: Accelerator = Accelerator.TCG
    machine: str = "pc"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    nics: tuple[NicDef, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        validate.text(self.name, "VM name", pattern=validate.PLAIN_NAME, max_length=64)
        validate.text(self.machine, "machine", pattern=validate.PLAIN_NAME, max_length=64)
        if self.append:
            validate.text(self.append, "append", max_length=4096, spaces=True)
        for name in ("kernel", "initrd"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Path) or not value.is_absolute()):
                raise ConfigError(f"{name} must be an absolute path, not {value!r}")
        self.spec()  # VMSpec's own checks (memory, vCPUs, CPU model, NIC ids, initrd)

    def spec(self) -> VMSpec:
        """The VM as the launcher builds its command line (shared-file RAM)."""
        return VMSpec(
            name=self.name,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            cpu_model=self.cpu_model,
            accelerator=self.accelerator,
            kernel=self.kernel,
            initrd=self.initrd,
            append=self.append,
            nics=tuple(NicSpec(mac=n.mac, id=n.id, model=n.model) for n in self.nics),
            ram_backend=RamBackendKind.SHARED_FILE,
            machine=self.machine,
        )

    @property
    def ram_bytes(self) -> int:
        return self.memory_mib << 20

    def to_json(self) -> dict[str, Any]:
        return {
            "version": DEFINITION_VERSION,
            "name": self.name,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "cpu_model": self.cpu_model,
            "accelerator": self.accelerator.value,
            "machine": self.machine,
            "kernel": str(self.kernel) if self.kernel else None,
            "initrd": str(self.initrd) if self.initrd else None,
            "append": self.append,
            "nics": [
                {"id": n.id, "mac": n.mac, "bridge": n.bridge, "model": n.model} for n in self.nics
            ],
            "ram_backend": RamBackendKind.SHARED_FILE.value,
        }

    @classmethod
    def from_json(cls, data: Any) -> VmDefinition:
        """Raises :class:`ConfigError` naming what is wrong (unknown keys included)."""
        if not isinstance(data, dict):
            raise ConfigError("a VM definition must be a JSON object")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ConfigError(f"unknown VM definition field(s): {', '.join(unknown)}")
        if data.get("version", DEFINITION_VERSION) != DEFINITION_VERSION:
            raise ConfigError(
                f"VM definition version {data.get('version')!r} (this livemig reads "
                f"{DEFINITION_VERSION})"
            )
        if data.get("ram_backend", "shared-file") != RamBackendKind.SHARED_FILE.value:
            raise ConfigError("agents run VMs with ram_backend shared-file only")
        nics = data.get("nics", [])
        if not isinstance(nics, list) or len(nics) > 8:
            raise ConfigError("nics must be a list of at most 8 NICs")
        nic_defs = []
        for nic in nics:
            if not isinstance(nic, dict) or not set(nic) <= _NIC_KEYS:
                raise ConfigError(f"a NIC is an object with {sorted(_NIC_KEYS)}, not {nic!r}")
            nic_defs.append(
                NicDef(
                    id=nic.get("id", "net0"),
                    mac=nic.get("mac", ""),
                    bridge=nic.get("bridge", ""),
                    model=nic.get("model", "virtio-net-pci"),
                )
            )
        try:
            accelerator = Accelerator(data.get("accelerator", "tcg"))
        except ValueError:
            raise ConfigError(f"unknown accelerator {data.get('accelerator')!r}") from None
        if "name" not in data or "memory_mib" not in data:
            raise ConfigError("a VM definition needs name and memory_mib")
        return cls(
            name=data["name"],
            memory_mib=data["memory_mib"],
            vcpus=data.get("vcpus", 1),
            cpu_model=data.get("cpu_model", "qemu64"),
            accelerator=accelerator,
            machine=data.get("machine", "pc"),
            kernel=_path(data.get("kernel"), "kernel"),
            initrd=_path(data.get("initrd"), "initrd"),
            append=data.get("append", ""),
            nics=tuple(nic_defs),
        )


def _path(value: Any, name: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(f"{name} must be an absolute path, not {value!r}")
    return Path(value)


def _options(text: str) -> dict[str, str]:
    """QEMU's ``key=value,key=value`` option string (first bare word under ``""``)."""
    out: dict[str, str] = {}
    for i, part in enumerate(text.split(",")):
        key, sep, value = part.partition("=")
        if not sep and i == 0:
            out[""] = key
        else:
            out[key] = value
    return out


def _memory_mib(text: str) -> int:
    match = re.fullmatch(r"(?:size=)?([0-9]+)([MG]?)", text.split(",")[0])
    if not match:
        raise ConfigError(f"cannot read the VM's memory size from -m {text!r}")
    value = int(match.group(1))
    return value * 1024 if match.group(2) == "G" else value


def from_qemu_argv(argv: list[str], bridge_of: dict[str, str]) -> VmDefinition:
    """The definition of a running QEMU from its command line (``/proc/PID/cmdline``).

    ``bridge_of`` maps each tap device to the bridge it is enslaved to on this host.
    Raises :class:`ConfigError` for a VM this recovery cannot describe (no
    ``memory-backend-file,share=on`` RAM, a NIC that is not a tap on a bridge).
    """
    args: dict[str, list[str]] = {}
    for flag, value in itertools.pairwise(argv):
        if flag.startswith("-"):
            args.setdefault(flag.lstrip("-"), []).append(value)
    name_opts = _options(args.get("name", [""])[0])
    name = name_opts.get("guest") or name_opts.get("", "")
    if not name:
        raise ConfigError("the QEMU has no -name: cannot name the adopted VM")
    if "m" not in args:
        raise ConfigError("the QEMU has no -m: cannot read its memory size")
    shared = [
        o
        for o in (_options(v) for v in args.get("object", []))
        if o.get("") == "memory-backend-file" and o.get("share") in ("on", "true", "yes")
    ]
    if not shared:
        raise ConfigError("the QEMU's RAM is not a memory-backend-file with share=on")
    accel = "tcg"
    for value in args.get("accel", []):
        accel = _options(value).get("", accel)
    for value in args.get("machine", []):
        accel = _options(value).get("accel", accel)
    machine = _options(args.get("machine", ["pc"])[0]).get("", "pc")
    netdevs = {
        o.get("id", ""): o
        for o in (_options(v) for v in args.get("netdev", []))
        if o.get("") == "tap"
    }
    nics = []
    for value in args.get("device", []):
        dev = _options(value)
        netdev = dev.get("netdev")
        if netdev is None:
            continue
        tap = netdevs.get(netdev)
        if tap is None or "ifname" not in tap:
            raise ConfigError(f"NIC {netdev!r} is not a tap device with an ifname")
        bridge = bridge_of.get(tap["ifname"])
        if bridge is None:
            raise ConfigError(f"tap {tap['ifname']} of NIC {netdev!r} is on no bridge")
        nics.append(
            NicDef(
                id=netdev,
                mac=dev.get("mac", ""),
                bridge=bridge,
                model=dev.get("") or "virtio-net-pci",
            )
        )
    smp = _options(args.get("smp", ["1"])[0])
    return VmDefinition(
        name=name,
        memory_mib=_memory_mib(args["m"][0]),
        vcpus=int(smp.get("", smp.get("cpus", "1")) or 1),
        cpu_model=args.get("cpu", ["qemu64"])[0],
        accelerator=Accelerator(accel) if accel in ("tcg", "kvm") else Accelerator.TCG,
        machine=machine,
        kernel=_path(args["kernel"][0], "kernel") if "kernel" in args else None,
        initrd=_path(args["initrd"][0], "initrd") if "initrd" in args else None,
        append=args.get("append", [""])[0],
        nics=tuple(nics),
    )
