"""QEMU processes of one host, started from a VM definition or adopted from elsewhere.

:func:`launch_vm` starts QEMU from a :class:`~migrate.vmdef.VmDefinition` with this
host's paths under a per-VM state dir (QMP socket, RAM file, serial log, pid
file), optionally waiting for a migration (``-incoming defer``) and paused
(``-S``), and with a QMP monitor on TCP+TLS for an engine on another host. QEMU
daemonizes: it outlives whoever launched it (an agent restart leaves VMs
running) and :func:`adopt_vm` finds it again.

:func:`adopt_vm` takes a QEMU started by anyone from its QMP socket: its pid
(SO_PEERCRED), its command line (``/proc/PID/cmdline``) and from that the
definition (:func:`parse_qemu_argv`: what :meth:`VMSpec.qemu_argv
<migrate.vmspec.VMSpec.qemu_argv>` writes plus common variants). An option it
does not know is refused by name: a definition that silently dropped a device
would start a target that cannot load the VM's state.

:func:`stop_vm` ends a VM: ``quit``, then SIGTERM, then SIGKILL, each with a
deadline, and removes the files a launch made.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dirtytrack.ram import filesystem_type
from migrate.deadline import within
from migrate.disks.images import image_info
from migrate.disks.model import CacheMode, DiskFormat
from migrate.errors import ConfigError, QemuError, QemuLaunchError
from migrate.qmp import QmpSession, process_exited
from migrate.vmdef import DiskDef, DiskSharing, NicDef, RamBackend, RamDef, VmDefinition
from migrate.vmspec import Accelerator, LaunchSite, QmpTlsListen


@dataclass(frozen=True)
class HostVm:
    """A QEMU on this host: its pid, QMP socket, RAM file (None: anonymous RAM),
    serial log, the definition it runs and its command line. ``adopted``: started
    elsewhere (then its files are not ours to remove)."""

    definition: VmDefinition
    pid: int
    qmp_socket: Path
    ram_path: Path | None
    state_dir: Path | None
    serial_log: Path | None
    argv: tuple[str, ...]
    adopted: bool = False


@dataclass(frozen=True)
class ParsedCommandLine:
    """What a QEMU command line says: the definition and this host's side of it.

    ``taps`` maps NIC id → tap ifname, ``qmp_sockets`` every UNIX QMP socket,
    ``ram_path`` the RAM file, ``incoming``/``paused`` the ``-incoming``/``-S``.
    """

    definition: VmDefinition
    ram_path: Path | None = None
    taps: Mapping[str, str] = field(default_factory=dict)
    qmp_sockets: tuple[Path, ...] = ()
    serial_log: Path | None = None
    incoming: bool = False
    paused: bool = False


# --- launch ----------------------------------------------------------------------------


async def launch_vm(
    definition: VmDefinition,
    state_dir: Path,
    *,
    incoming: bool = False,
    paused: bool = False,
    netns: str | None = None,
    taps: Mapping[str, str] | None = None,
    qmp_tls: QmpTlsListen | None = None,
    ram_file: Path | None = None,
    extra_qmp_sockets: Sequence[Path] = (),
    binary: str = "qemu-system-x86_64",
    timeout_s: float = 30.0,
) -> HostVm:
    """Start QEMU for ``definition`` with its files in ``state_dir`` (created).

    ``state_dir`` holds ``qmp.sock``, ``serial.log``, ``qemu.pid`` and (file RAM
    backend without a ``dir``) ``ram``. ``taps`` maps NIC ids to existing taps on
    this host (default: each NIC's ``tap``; a NIC with a ``bridge`` needs one here:
    making taps is the host's job). ``netns`` runs QEMU in that network namespace.
    ``ram_file`` is where a file RAM backend without a ``dir`` goes (default
    ``state_dir/ram``). ``extra_qmp_sockets`` are more UNIX QMP monitors (QEMU
    serves one client per monitor: an agent keeps one for itself).
    Returns once QMP answers. Raises :class:`QemuLaunchError` (exit code and
    QEMU's output) or :class:`ConfigError`; nothing is left running on failure.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    spec = replace(definition.spec(ram_dir=state_dir), binary=binary)
    taps = dict(taps or {})
    for nic in definition.nics:
        if nic.id not in taps:
            if nic.tap is None:
                raise ConfigError(f"NIC {nic.id} (bridge {nic.bridge}) needs a tap on this host")
            taps[nic.id] = nic.tap
    ram_path: Path | None = None
    if definition.ram.backend is RamBackend.FILE:
        ram_dir = Path(definition.ram.dir) if definition.ram.dir else state_dir
        ram_path = ram_dir / f"{definition.name}.ram" if definition.ram.dir else state_dir / "ram"
        if ram_file is not None and not definition.ram.dir:
            ram_path = ram_file
    site = LaunchSite(
        qmp_socket=state_dir / "qmp.sock",
        serial_socket=None,
        serial_log=state_dir / "serial.log",
        ram_path=ram_path,
        taps=taps,
        incoming=incoming,
        paused=paused,
        qmp_tls=qmp_tls,
    )
    pidfile = state_dir / "qemu.pid"
    for stale in (site.qmp_socket, pidfile, *extra_qmp_sockets):
        stale.unlink(missing_ok=True)
    if ram_path is not None and definition.ram.dir is None:
        ram_path.unlink(missing_ok=True)  # a stale file of an earlier run
    argv = spec.qemu_argv(site)
    for n, sock in enumerate(extra_qmp_sockets):
        argv += [
            "-chardev", f"socket,id=qmpx{n},path={sock},server=on,wait=off",
            "-mon", f"chardev=qmpx{n},mode=control",
        ]  # fmt: skip
    argv += ["-daemonize", "-pidfile", str(pidfile)]
    full = ["ip", "netns", "exec", netns, *argv] if netns else argv
    # -daemonize: the parent exits once QEMU is set up (QMP socket listening) and
    # reports any start-up error on its stderr before it does.
    proc = await asyncio.create_subprocess_exec(
        *full,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await within(proc.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        _kill_pidfile(pidfile)
        raise QemuLaunchError(
            f"QEMU for {definition.name} did not start within {timeout_s:g} s", full, None, ""
        ) from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        raise QemuLaunchError(
            f"QEMU for {definition.name} exited with {proc.returncode}: {last}",
            full,
            proc.returncode,
            text,
        )
    pid = _read_pid(pidfile)
    vm = HostVm(definition, pid, site.qmp_socket, ram_path, state_dir, site.serial_log, tuple(argv))
    try:
        session = await QmpSession.connect(site.qmp_socket, definition.name, timeout_s)
        await session.close()
    except BaseException:
        await stop_vm(vm, timeout_s=5.0)
        raise
    return vm


def _read_pid(pidfile: Path) -> int:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise QemuError(f"QEMU wrote no usable pid file {pidfile}: {exc}") from None


def _kill_pidfile(pidfile: Path) -> None:
    with contextlib.suppress(OSError, ValueError, QemuError):
        os.kill(_read_pid(pidfile), signal.SIGKILL)


async def stop_vm(vm: HostVm, timeout_s: float = 10.0) -> None:
    """End ``vm``: ``quit`` over QMP, then SIGTERM, then SIGKILL (each within
    ``timeout_s``); then remove the files :func:`launch_vm` made (not an adopted
    VM's). Raises :class:`QemuError` only if the process outlives SIGKILL."""
    try:
        if not process_exited(vm.pid):
            with contextlib.suppress(QemuError, ConfigError, OSError, TimeoutError):
                session = await QmpSession.connect(vm.qmp_socket, vm.definition.name, 2.0)
                try:
                    await session.execute("quit", timeout=2.0)
                except QemuError:
                    pass  # QEMU closes the socket while answering quit
                finally:
                    await session.close()
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(vm.pid, sig)
                if await _wait_gone(vm.pid, timeout_s):
                    break
            else:
                raise QemuError(f"QEMU {vm.pid} ({vm.definition.name}) survived SIGKILL")
    finally:
        if not vm.adopted and vm.state_dir is not None:
            for path in (vm.qmp_socket, vm.state_dir / "qemu.pid", vm.ram_path):
                if path is not None:
                    path.unlink(missing_ok=True)


async def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not process_exited(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --- adopt -----------------------------------------------------------------------------


def nics_on_bridges(definition: VmDefinition, bridge_of: Mapping[str, str]) -> VmDefinition:
    """``definition`` with each tap NIC turned into a NIC on the bridge its tap is
    enslaved to (``bridge_of``: ifname → bridge), so another host can make its own
    tap. Raises :class:`ConfigError` for a tap on no bridge."""
    nics = []
    for nic in definition.nics:
        if nic.tap is not None:
            bridge = bridge_of.get(nic.tap)
            if bridge is None:
                raise ConfigError(f"tap {nic.tap} of NIC {nic.id!r} is on no bridge")
            nic = replace(nic, tap=None, bridge=bridge)
        nics.append(nic)
    return replace(definition, nics=tuple(nics))


async def adopt_vm(qmp_socket: Path, timeout_s: float = 5.0) -> HostVm:
    """Take over a QEMU started elsewhere, from its QMP socket.

    Its pid comes from the socket's peer credentials, its definition from its
    command line. Raises :class:`ConfigError` (no socket, or a command line with
    options livemig does not know, named) or :class:`QemuError`.
    """
    session = await QmpSession.connect(qmp_socket, "adopt", timeout_s)
    try:
        pid = session.peer_pid
        if pid is None:
            raise QemuError(f"cannot tell which process serves {qmp_socket}")
        await session.execute("query-status")
    finally:
        await session.close()
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        raise QemuError(f"cannot read the command line of QEMU {pid}: {exc}") from None
    argv = [part.decode(errors="surrogateescape") for part in raw.split(b"\0") if part]
    parsed = parse_qemu_argv(argv)
    definition = await _with_disk_sizes(parsed.definition)
    return HostVm(
        definition=definition,
        pid=pid,
        qmp_socket=qmp_socket,
        ram_path=parsed.ram_path,
        state_dir=None,
        serial_log=parsed.serial_log,
        argv=tuple(argv),
        adopted=True,
    )


async def _with_disk_sizes(definition: VmDefinition) -> VmDefinition:
    """The definition with each disk's ``size_mib`` read from its image (a command
    line does not tell it); the image is opened shared (``qemu-img info -U``)."""
    disks = []
    for disk in definition.disks:
        if disk.size_mib is None:
            info = await image_info(Path(disk.path))
            disk = dataclasses.replace(disk, size_mib=-(-info.virtual_size // (1 << 20)))
        disks.append(disk)
    return dataclasses.replace(definition, disks=tuple(disks))


_SIZE_RE = re.compile(r"(?P<n>[0-9]+)(?P<unit>[KMGT]?)B?", re.IGNORECASE)
_UNIT_MIB = {"": 1.0, "K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}
#: Options without a value that carry nothing the definition needs.
_FLAGS_IGNORED = frozenset(
    {"-nodefaults", "-no-user-config", "-no-reboot", "-daemonize", "-nographic", "-no-shutdown"}
)


def _split_opts(text: str, implied: str | None = None) -> dict[str, str]:
    """QEMU's ``key=value,key=value`` (``,,`` is a literal comma); a first part
    without ``=`` is the ``implied`` key's value."""
    parts, current, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += text[i]
        i += 1
    parts.append(current)
    opts: dict[str, str] = {}
    for index, part in enumerate(parts):
        if "=" in part:
            key, value = part.split("=", 1)
            opts[key] = value
        elif index == 0 and implied is not None:
            opts[implied] = part
        elif part:
            opts[part] = "on"
    return opts


def _mib(text: str, where: str) -> int:
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"cannot adopt: {where} size {text!r} not understood")
    mib = int(match.group("n")) * _UNIT_MIB[match.group("unit").upper()]
    if mib != int(mib):
        raise ConfigError(f"cannot adopt: {where} size {text!r} is not whole MiB")
    return int(mib)


def parse_qemu_argv(argv: Sequence[str]) -> ParsedCommandLine:
    """The definition and host side of a QEMU command line (``argv[0]`` is QEMU).

    Understands what :meth:`VMSpec.qemu_argv <migrate.vmspec.VMSpec.qemu_argv>`
    writes and common variants (``-m 1G``/``size=``, ``-smp cpus=``,
    ``-enable-kvm``, ``-machine accel=``, ``-qmp unix:``, ``-drive if=virtio``,
    ``-serial file:``...). Raises :class:`ConfigError` naming every option (or
    ``-object``/``-device`` type) it does not know. What a command line cannot
    tell: a disk's ``size_mib`` (None) and ``sharing`` (``local``, the safe guess);
    a NIC's bridge (its ``tap`` is kept).
    """
    args = list(argv[1:])
    unknown: list[str] = []
    values: dict[str, str] = {}
    accel: str | None = None
    machine = "pc"
    memory_backend: dict[str, str] | None = None
    netdevs: dict[str, dict[str, str]] = {}
    nic_devices: list[dict[str, str]] = []
    drives: dict[str, dict[str, str]] = {}
    blockdevs: dict[str, dict[str, str]] = {}
    blk_devices: list[dict[str, str]] = []
    chardevs: dict[str, dict[str, str]] = {}
    monitors: list[str] = []
    qmp_sockets: list[Path] = []
    serial_log: Path | None = None
    incoming = paused = False
    i = 0

    def value(option: str) -> str:
        nonlocal i
        if i + 1 >= len(args):
            raise ConfigError(f"cannot adopt: {option} without a value")
        i += 1
        return args[i]

    while i < len(args):
        opt = args[i]
        if opt.startswith("--"):
            opt = opt[1:]
        if opt in _FLAGS_IGNORED:
            pass
        elif opt == "-S":
            paused = True
        elif opt == "-enable-kvm":
            accel = "kvm"
        elif opt in ("-name", "-cpu", "-kernel", "-initrd", "-append"):
            text = value(opt)
            values[opt] = _split_opts(text, "guest")["guest"] if opt == "-name" else text
        elif opt == "-accel":
            accel = _split_opts(value(opt), "accel")["accel"]
        elif opt == "-smp":
            smp = _split_opts(value(opt), "cpus")
            values["-smp"] = smp.get("cpus", "1")
        elif opt == "-m":
            values["-m"] = _split_opts(value(opt), "size")["size"]
        elif opt in ("-machine", "-M"):
            opts = _split_opts(value(opt), "type")
            machine = opts.pop("type", machine)
            accel = opts.pop("accel", accel)
            opts.pop("memory-backend", None)
            if opts:
                unknown.append(f"-machine {','.join(opts)}")
        elif opt == "-object":
            opts = _split_opts(value(opt), "qom-type")
            kind = opts.get("qom-type")
            if kind in ("memory-backend-file", "memory-backend-ram", "memory-backend-memfd"):
                if memory_backend is not None:
                    unknown.append("a second memory backend")
                memory_backend = opts
            elif kind != "tls-creds-x509":  # credentials are per host
                unknown.append(f"-object {kind}")
        elif opt == "-netdev":
            opts = _split_opts(value(opt), "type")
            if opts.get("type") != "tap" or "ifname" not in opts:
                unknown.append(f"-netdev {opts.get('type')} (only tap,ifname=)")
            netdevs[opts.get("id", "")] = opts
        elif opt == "-device":
            opts = _split_opts(value(opt), "driver")
            if "netdev" in opts:
                nic_devices.append(opts)
            elif opts.get("driver") == "virtio-blk-pci":
                blk_devices.append(opts)
            else:
                unknown.append(f"-device {opts.get('driver')}")
        elif opt == "-drive":
            opts = _split_opts(value(opt))
            drives[opts.get("id", f"disk{len(drives)}")] = opts
        elif opt == "-blockdev":
            opts = _split_opts(value(opt))
            blockdevs[opts.get("node-name", f"node{len(blockdevs)}")] = opts
        elif opt == "-chardev":
            opts = _split_opts(value(opt), "backend")
            chardevs[opts.get("id", "")] = opts
        elif opt == "-mon":
            opts = _split_opts(value(opt), "chardev")
            if opts.get("mode", "readline") == "control":
                monitors.append(opts.get("chardev", ""))
        elif opt == "-qmp":
            target = value(opt).split(",")[0]
            if target.startswith("unix:"):
                qmp_sockets.append(Path(target[5:]))
        elif opt == "-serial":
            target = value(opt)
            if target.startswith("file:"):
                serial_log = Path(target[5:])
            elif target.startswith("chardev:"):
                values["-serial"] = target[8:]
            elif target not in ("none", "null", "stdio"):
                unknown.append(f"-serial {target.split(':')[0]}")
        elif opt == "-display":
            if value(opt).split(",")[0] != "none":
                unknown.append("-display (other than none)")
        elif opt in ("-pidfile", "-D"):
            value(opt)
        elif opt == "-incoming":
            value(opt)
            incoming = True
        else:
            unknown.append(opt)
        i += 1
    for chardev_id in monitors:
        chardev = chardevs.get(chardev_id, {})
        if chardev.get("backend") == "socket" and "path" in chardev:
            qmp_sockets.append(Path(chardev["path"]))
    serial_id = values.get("-serial")
    if serial_id is not None:
        chardev = chardevs.get(serial_id, {})
        if chardev.get("backend") == "file" and "path" in chardev:
            serial_log = Path(chardev["path"])
    if unknown:
        raise ConfigError(
            "cannot adopt: QEMU options livemig does not know: " + ", ".join(dict.fromkeys(unknown))
        )
    if "-m" not in values:
        raise ConfigError("cannot adopt: the command line gives no -m (memory size)")
    memory_mib = _mib(values["-m"], "-m")
    ram, ram_path = _ram(memory_backend, memory_mib)
    nics, taps = _nics(nic_devices, netdevs)
    disks = _disks(drives, blk_devices) + _blockdev_disks(blockdevs, blk_devices)
    try:
        accelerator = Accelerator(accel or "tcg")
    except ValueError:
        raise ConfigError(f"cannot adopt: accelerator {accel!r} (tcg or kvm)") from None
    definition = VmDefinition(
        name=values.get("-name", "vm"),
        memory_mib=memory_mib,
        vcpus=_whole(values.get("-smp", "1"), "-smp"),
        cpu_model=values.get("-cpu", "qemu64"),
        machine=machine,
        accelerator=accelerator,
        kernel=values.get("-kernel"),
        initrd=values.get("-initrd"),
        append=values.get("-append", ""),
        disks=disks,
        nics=nics,
        ram=ram,
    )
    return ParsedCommandLine(
        definition, ram_path, taps, tuple(qmp_sockets), serial_log, incoming, paused
    )


def _whole(text: str, where: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"cannot adopt: {where} {text!r} is not a number")
    return int(text)


def _ram(backend: dict[str, str] | None, memory_mib: int) -> tuple[RamDef, Path | None]:
    if backend is None or backend.get("qom-type") != "memory-backend-file":
        if backend is not None and backend.get("qom-type") != "memory-backend-ram":
            raise ConfigError(f"cannot adopt: -object {backend.get('qom-type')} as guest RAM")
        return RamDef(backend=RamBackend.ANONYMOUS), None
    if "size" in backend and _mib(backend["size"], "memory backend") != memory_mib:
        raise ConfigError("cannot adopt: the memory backend's size differs from -m")
    if backend.get("share") not in ("on", "true", "yes"):
        raise ConfigError("cannot adopt: a memory-backend-file without share=on")
    path = Path(backend.get("mem-path", ""))
    if not path.is_absolute():
        raise ConfigError(f"cannot adopt: memory backend mem-path {str(path)!r}")
    hugepages = filesystem_type(path.parent) == "hugetlbfs"
    ram = RamDef(
        backend=RamBackend.FILE, dir=str(path.parent) if hugepages else None, hugepages=hugepages
    )
    return ram, path


def _nics(
    devices: list[dict[str, str]], netdevs: dict[str, dict[str, str]]
) -> tuple[tuple[NicDef, ...], dict[str, str]]:
    nics: list[NicDef] = []
    taps: dict[str, str] = {}
    for device in devices:
        netdev = netdevs.get(device["netdev"])
        if netdev is None:
            raise ConfigError(f"cannot adopt: -device with netdev {device['netdev']!r} undefined")
        if "mac" not in device:
            raise ConfigError(f"cannot adopt: NIC {device['netdev']} has no mac= (QEMU picks one)")
        nic_id = device["netdev"]
        nics.append(
            NicDef(
                mac=device["mac"].lower(), id=nic_id, model=device["driver"], tap=netdev["ifname"]
            )
        )
        taps[nic_id] = netdev["ifname"]
    return tuple(nics), taps


def _blockdev_disks(
    nodes: dict[str, dict[str, str]], devices: list[dict[str, str]]
) -> tuple[DiskDef, ...]:
    """Disks written as :func:`migrate.vmspec` writes them: a ``file`` node, a format
    node on it (``-blockdev``) and a ``virtio-blk-pci`` device on the format node."""
    if not nodes:
        return ()
    disks: list[DiskDef] = []
    used: set[str] = set()
    on = {"on": True, "off": False}
    for device in devices:
        fmt_node = nodes.get(device.get("drive", ""))
        if fmt_node is None:
            continue
        disk_id = device.get("id", "")
        file_node = nodes.get(fmt_node.get("file", ""))
        if file_node is None or file_node.get("driver") != "file":
            raise ConfigError(
                f"cannot adopt: disk {disk_id} has no file node under its format node"
            )
        used.update({device.get("drive", ""), fmt_node.get("file", "")})
        try:
            fmt = DiskFormat(fmt_node.get("driver", ""))
            cache = CacheMode.from_flags(
                direct=on[file_node.get("cache.direct", "off")],
                no_flush=on[file_node.get("cache.no-flush", "off")],
                writeback=on[device.get("write-cache", "on")],
            )
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"cannot adopt: disk {disk_id}: {exc}") from None
        disks.append(
            DiskDef(
                path=file_node.get("filename", ""),
                id=disk_id,
                format=fmt,
                cache=cache,
                sharing=DiskSharing.LOCAL,
            )
        )
    loose = sorted(set(nodes) - used)
    if loose:
        raise ConfigError(f"cannot adopt: block nodes {', '.join(loose)} belong to no disk")
    return tuple(disks)


def _disks(drives: dict[str, dict[str, str]], devices: list[dict[str, str]]) -> tuple[DiskDef, ...]:
    attached = {d.get("drive") for d in devices}
    disks: list[DiskDef] = []
    for drive_id, drive in drives.items():
        interface = drive.get("if", "ide")
        if interface == "none" and drive_id not in attached:
            raise ConfigError(f"cannot adopt: drive {drive_id} is attached to no device")
        if interface not in ("none", "virtio"):
            raise ConfigError(f"cannot adopt: drive {drive_id} on if={interface} (virtio only)")
        unknown = set(drive) - {"file", "format", "if", "id", "cache"}
        if unknown:
            raise ConfigError(
                f"cannot adopt: drive {drive_id} options {', '.join(sorted(unknown))}"
            )
        try:
            fmt = DiskFormat(drive.get("format", ""))
            cache = CacheMode(drive.get("cache", "writeback"))
        except ValueError as exc:
            raise ConfigError(f"cannot adopt: drive {drive_id}: {exc}") from None
        # Whether both hosts see the image cannot be read off a command line: local
        # (copied by a block job) is the safe guess; an operator may correct it.
        disks.append(
            DiskDef(
                path=drive.get("file", ""),
                id=drive_id,
                format=fmt,
                cache=cache,
                sharing=DiskSharing.LOCAL,
            )
        )
    return tuple(disks)
