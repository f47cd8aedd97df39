"""The VM definition: a versioned JSON document that says what a VM is, not where it runs.

A node keeps one per VM; a migration carries it to the target node, whose agent
starts the incoming QEMU from it with its own paths (:mod:`migrate.hostvm`).
Schema ``docs/schema/vm-definition.json`` (generated from these types by
:mod:`migrate.schema`); every field is checked when read, and the first bad one
is named in one line (:class:`~migrate.errors.ConfigError`)::

    {"schema_version": 1, "name": "web1", "memory_mib": 256, "vcpus": 1,
     "cpu_model": "qemu64", "kernel": "/srv/vm/vmlinuz", "initrd": "/srv/vm/initrd",
     "append": "console=ttyS0",
     "disks": [{"id": "disk0", "path": "/srv/shared/web1.qcow2", "format": "qcow2",
                "size_mib": 2048, "cache": "none", "sharing": "shared"}],
     "nics": [{"id": "net0", "mac": "52:54:00:12:34:56", "bridge": "br0"}],
     "ram": {"backend": "file", "dir": null, "hugepages": false, "share": true}}

Fields left out take their defaults; unknown fields are refused. A definition
becomes the launcher's :class:`~migrate.vmspec.VMSpec` with :meth:`VmDefinition.spec`
(the lab builds the same spec directly).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from migrate import validate
from migrate.errors import ConfigError
from migrate.vmspec import (
    Accelerator,
    DiskCache,
    DiskFormat,
    DiskSpec,
    NicSpec,
    RamBackendKind,
    VMSpec,
)

VM_DEFINITION_SCHEMA_VERSION = 1
#: The largest definition file read (bytes): a definition is a few hundred.
MAX_DEFINITION_BYTES = 1 << 20

_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", re.ASCII)
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*", re.ASCII)


class DiskSharing(StrEnum):
    """``shared``: both hosts see the image at ``path`` (nothing to copy);
    ``local``: each host has its own copy (a block mirror must move it)."""

    SHARED = "shared"
    LOCAL = "local"


class RamBackend(StrEnum):
    """``file``: a ``memory-backend-file`` the engine can map (integrity check,
    pagestream); ``anonymous``: plain guest RAM (native only, unchecked)."""

    FILE = "file"
    ANONYMOUS = "anonymous"


def _path(value: Any, where: str) -> str:
    text = validate.text(value, where, max_length=4096)
    if not text.startswith("/") or "," in text:
        raise ConfigError(f"{where} must be an absolute path without commas, not {text!r}")
    return text


@dataclass(frozen=True)
class DiskDef:
    """A virtio disk: image ``path`` (absolute), ``format``, ``size_mib`` (informative:
    the image's virtual size, checked by preflight), ``cache`` and ``sharing``."""

    path: str
    id: str = "disk0"
    format: DiskFormat = DiskFormat.RAW
    size_mib: int | None = None
    cache: DiskCache = DiskCache.NONE
    sharing: DiskSharing = DiskSharing.SHARED

    def check(self, where: str) -> None:
        _path(self.path, f"{where}.path")
        validate.text(self.id, f"{where}.id", pattern=validate.PLAIN_NAME, max_length=32)
        if self.size_mib is not None:
            validate.whole(self.size_mib, f"{where}.size_mib", minimum=1)


@dataclass(frozen=True)
class NicDef:
    """A NIC: ``mac``, ``model``, and its host side, a ``bridge`` to attach a tap to
    (the launcher makes the tap) or an existing ``tap``; exactly one of the two."""

    mac: str
    id: str = "net0"
    model: str = "virtio-net-pci"
    bridge: str | None = None
    tap: str | None = None

    def check(self, where: str) -> None:
        if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac):
            raise ConfigError(
                f"{where}.mac must be aa:bb:cc:dd:ee:ff (lower case), not {self.mac!r}"
            )
        validate.text(self.id, f"{where}.id", pattern=validate.PLAIN_NAME, max_length=32)
        validate.text(self.model, f"{where}.model", pattern=_MODEL_RE, max_length=64)
        if (self.bridge is None) == (self.tap is None):
            raise ConfigError(f"{where} needs exactly one of bridge and tap")
        for name in ("bridge", "tap"):
            value = getattr(self, name)
            if value is not None:
                validate.text(value, f"{where}.{name}", pattern=_IFNAME_RE, max_length=15)


@dataclass(frozen=True)
class RamDef:
    """Guest RAM: ``backend``; for ``file``, the ``dir`` its file goes in (None: the
    VM's state dir on each host; with ``hugepages``, a hugetlbfs mount) and
    ``share`` (must be true: the engine maps the file)."""

    backend: RamBackend = RamBackend.FILE
    dir: str | None = None
    hugepages: bool = False
    share: bool = True

    def check(self, where: str) -> None:
        if self.dir is not None:
            _path(self.dir, f"{where}.dir")
        validate.flag(self.hugepages, f"{where}.hugepages")
        validate.flag(self.share, f"{where}.share")
        if self.backend is RamBackend.FILE and not self.share:
            raise ConfigError(f"{where}.share must be true for a file backend (livemig maps it)")
        if self.hugepages and (self.backend is not RamBackend.FILE or self.dir is None):
            raise ConfigError(f"{where}.hugepages needs the file backend and a hugetlbfs dir")
        if self.backend is RamBackend.ANONYMOUS and self.dir is not None:
            raise ConfigError(f"{where}.dir is for the file backend only")


@dataclass(frozen=True)
class VmDefinition:
    """A VM: name, memory (MiB), vCPUs, CPU model, boot (kernel/initrd/append or
    disks), NICs, RAM backend. ``schema_version`` is this document's version."""

    name: str
    memory_mib: int
    vcpus: int = 1
    cpu_model: str = "qemu64"
    machine: str = "pc"
    accelerator: Accelerator = Accelerator.TCG
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    disks: tuple[DiskDef, ...] = ()
    nics: tuple[NicDef, ...] = ()
    ram: RamDef = field(default_factory=RamDef)
    schema_version: int = VM_DEFINITION_SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Raises :class:`ConfigError` naming the first bad field."""
        if self.schema_version != VM_DEFINITION_SCHEMA_VERSION:
            raise ConfigError(
                f"vm definition: schema_version {self.schema_version!r} is not supported "
                f"(this livemig reads {VM_DEFINITION_SCHEMA_VERSION})"
            )
        validate.text(self.name, "vm definition: name", pattern=validate.PLAIN_NAME, max_length=64)
        validate.whole(self.memory_mib, "vm definition: memory_mib", minimum=16, maximum=1 << 22)
        validate.whole(self.vcpus, "vm definition: vcpus", minimum=1, maximum=1024)
        validate.text(self.cpu_model, "vm definition: cpu_model", max_length=4096)
        validate.text(self.machine, "vm definition: machine", max_length=256)
        if not isinstance(self.append, str) or validate.has_control(self.append):
            raise ConfigError(
                f"vm definition: append must be one line of text, not {self.append!r}"
            )
        for name in ("kernel", "initrd"):
            if getattr(self, name) is not None:
                _path(getattr(self, name), f"vm definition: {name}")
        if self.initrd is not None and self.kernel is None:
            raise ConfigError("vm definition: an initrd needs a kernel")
        if self.kernel is None and not self.disks:
            raise ConfigError("vm definition: nothing to boot (give a kernel or a disk)")
        parts: tuple[tuple[str, tuple[DiskDef | NicDef, ...]], ...] = (
            ("disks", self.disks),
            ("nics", self.nics),
        )
        for what, items in parts:
            if not isinstance(items, tuple):
                raise ConfigError(f"vm definition: {what} must be a tuple")
            for i, item in enumerate(items):
                kind = DiskDef if what == "disks" else NicDef
                if not isinstance(item, kind):
                    raise ConfigError(f"vm definition: {what}[{i}] must be a {kind.__name__}")
                item.check(f"vm definition: {what}[{i}]")
            ids = [item.id for item in items]
            if len(set(ids)) != len(ids):
                raise ConfigError(f"vm definition: duplicate {what} ids {ids}")
        if not isinstance(self.ram, RamDef):
            raise ConfigError("vm definition: ram must be a RamDef")
        self.ram.check("vm definition: ram")

    # --- JSON -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (every field written)."""
        data = dataclasses.asdict(self)
        data["disks"] = [dict(d) for d in data["disks"]]
        data["nics"] = [dict(n) for n in data["nics"]]
        return _plain(data)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Any) -> VmDefinition:
        """Read the JSON form. Raises :class:`ConfigError` naming the first bad field."""
        built: VmDefinition = _build(cls, data, "vm definition")
        return built

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> VmDefinition:
        """Read a definition file. Raises :class:`ConfigError` (one line) for any problem."""
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_DEFINITION_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read vm definition {path}: {exc.strerror or exc}") from None
        if len(raw) > MAX_DEFINITION_BYTES:
            raise ConfigError(f"vm definition {path} is larger than {MAX_DEFINITION_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"vm definition {path} is not JSON: {exc}") from None
        return cls.from_dict(data)

    # --- to the launcher --------------------------------------------------------------

    def spec(self, ram_dir: Path | None = None) -> VMSpec:
        """The :class:`VMSpec` QEMU is started from; ``ram_dir`` is where this host
        puts a file RAM backend when the definition names no ``dir``."""
        ram_kind = (
            RamBackendKind.SHARED_FILE if self.ram.backend is RamBackend.FILE
            else RamBackendKind.ANONYMOUS
        )  # fmt: skip
        return VMSpec(
            name=self.name,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            cpu_model=self.cpu_model,
            accelerator=self.accelerator,
            kernel=Path(self.kernel) if self.kernel else None,
            initrd=Path(self.initrd) if self.initrd else None,
            append=self.append,
            nics=tuple(NicSpec(mac=n.mac, id=n.id, model=n.model) for n in self.nics),
            ram_backend=ram_kind,
            machine=self.machine,
            ram_dir=Path(self.ram.dir) if self.ram.dir else ram_dir,
            disks=tuple(
                DiskSpec(path=Path(d.path), id=d.id, format=d.format, cache=d.cache)
                for d in self.disks
            ),
        )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, StrEnum):
        return value.value
    return value


_NESTED: dict[str, type] = {"disks": DiskDef, "nics": NicDef}


def _build(cls: type[Any], data: Any, where: str) -> Any:
    """``cls`` from a JSON object: known fields only, enums and nested types converted."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, not {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _convert(cls, name, value, f"{where}: {name}")
    return cls(**kwargs)


_ENUMS: dict[str, type[StrEnum]] = {
    "format": DiskFormat,
    "cache": DiskCache,
    "sharing": DiskSharing,
    "accelerator": Accelerator,
    "backend": RamBackend,
}


def _convert(cls: type[Any], name: str, value: Any, where: str) -> Any:
    if name in _NESTED and cls is VmDefinition:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, not {type(value).__name__}")
        kind = _NESTED[name]
        return tuple(_build(kind, item, f"{where}[{i}]") for i, item in enumerate(value))
    if name == "ram" and cls is VmDefinition:
        return _build(RamDef, value, where)
    if name in _ENUMS:
        enum = _ENUMS[name]
        try:
            return enum(value)
        except ValueError:
            known = ", ".join(m.value for m in enum)
            raise ConfigError(f"{where} must be one of {known}, not {value!r}") from None
    if isinstance(value, dict | list):
        raise ConfigError(f"{where} must be a plain value, not {type(value).__name__}")
    return value
