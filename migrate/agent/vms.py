"""The VMs an agent owns: definitions in its state directory, QEMUs it starts or adopts.

Layout under the state directory::

    vms/NAME/definition.json   the VM's definition (migrate.vmdef JSON), owned by this node
    vms/NAME/run.json          the running QEMU: pid, sockets, RAM file, taps, state
    vms/NAME/qmp.sock          QMP for the engine (a migration's source side)
    vms/NAME/qmp-agent.sock    QMP for the agent's own questions (status, stop)
    vms/NAME/serial.log        the guest's serial console
    vms/NAME/qemu.pid          QEMU's pid file
    vms/NAME/tls/              QEMU's tls-creds-x509 directory (from the node's certificate)

QEMU is started, stopped and adopted by :mod:`migrate.hostvm`; this module adds
the node's side: taps on the bridges a definition names, the records, the TLS relay.
Guest RAM is a ``memory-backend-file,share=on`` at
``/dev/shm/livemig-NODE-STATE-NAME.ram`` (STATE: a digest of the state dir, so two
agents on one machine never share a file; unless the definition names a RAM ``dir``). QEMU is started with ``-daemonize``: it leaves the agent's session and process
group, so an agent that stops (or is restarted, or killed) leaves its VMs running;
the next agent re-adopts every VM whose ``run.json`` names a live QEMU
(:meth:`VmManager.readopt`). An incoming VM (a migration's target) also serves QMP
over TCP with mutual TLS on the node's address, for the source node's engine
(relayed by the agent: :mod:`migrate.agent.qmpproxy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from migrate import hostvm
from migrate.agent.qmpproxy import QmpTlsProxy
from migrate.deadline import within
from migrate.errors import ConfigError, LivemigError, QemuError
from migrate.qmp import QmpSession, process_exited
from migrate.tls import NodeCredentials, server_context, write_qemu_creds_dir
from migrate.vmdef import RamBackend, VmDefinition

VMS_DIR = "vms"
RAM_DIR = Path("/dev/shm")
#: How long QEMU may take to start (until it daemonized) and to quit.
LAUNCH_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
QMP_TIMEOUT_S = 5.0
_MAX_SOCKET_PATH = 107


class VmError(LivemigError):
    """A VM operation refused or failed; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class VmRun:
    """``run.json``: one QEMU this agent started or adopted."""

    pid: int
    qmp_socket: str
    agent_socket: str
    ram_path: str
    serial_log: str | None = None
    taps: dict[str, str] = field(default_factory=dict)  # created by this agent
    adopted: bool = False
    incoming: bool = False
    qmp_tcp_port: int | None = None
    migration_port: int | None = None
    started_at: float = field(default_factory=time.time)

    @classmethod
    def from_json(cls, data: Any) -> VmRun:
        if not isinstance(data, dict):
            raise ConfigError("run.json is not an object")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (bound and released: the caller binds it next)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    return pid > 0 and not process_exited(pid)


def check_definition(definition: VmDefinition) -> None:
    """What an agent needs beyond a valid definition: RAM it can map (a file
    backend: the integrity check digests it, pagestream needs it) and NICs on
    bridges (each host makes its own tap). Raises :class:`ConfigError`."""
    if definition.ram.backend is not RamBackend.FILE:
        raise ConfigError("agents run VMs with a file RAM backend only (ram.backend file)")
    for nic in definition.nics:
        if nic.bridge is None:
            raise ConfigError(f"NIC {nic.id}: agents attach NICs to a bridge, not a fixed tap")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


async def _ip(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await within(proc.communicate(), 10.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise VmError(f"`ip {' '.join(args)}` took over 10 s", 500) from None
    if proc.returncode != 0:
        raise VmError(f"`ip {' '.join(args)}`: {err.decode(errors='replace').strip()}", 500)


def vm_run(vm: hostvm.HostVm, agent_socket: str) -> VmRun:
    """A bare run record of a launched QEMU (for cleaning up after a failed launch)."""
    return VmRun(vm.pid, str(vm.qmp_socket), agent_socket, str(vm.ram_path or ""))


def bridges_of_taps() -> dict[str, str]:
    """Every interface of this namespace that has a master: ifname -> bridge."""
    out: dict[str, str] = {}
    for dev in Path("/sys/class/net").iterdir():
        master = dev / "master"
        if master.exists():
            out[dev.name] = Path(os.readlink(master)).name
    return out


def ram_file(node: str, state_path: Path, name: str) -> Path:
    """Where the agent of ``node`` (state dir ``state_path``) keeps VM ``name``'s RAM.

    The state dir is in the name: two agents on one machine (a lab, a test) may
    carry the same node and VM names and must not share (or delete) one file.
    """
    state = hashlib.sha256(str(state_path.resolve()).encode()).hexdigest()[:8]
    return RAM_DIR / f"livemig-{node}-{state}-{name}.ram"


class VmManager:
    """One agent's VMs (see the module docstring). Operations on a VM are serialised."""

    def __init__(self, state_path: Path, node: str, host: str, log: logging.Logger) -> None:
        self.root = state_path / VMS_DIR
        self.state_path = state_path
        self.node = node
        self.host = host
        self.log = log
        self.locks: dict[str, asyncio.Lock] = {}
        #: VMs in a migration, by name: "source" or "target".
        self.migrating: dict[str, str] = {}
        #: QMP over TLS for the engine on the source host, by incoming VM.
        self.proxies: dict[str, QmpTlsProxy] = {}

    async def close_proxy(self, name: str) -> None:
        proxy = self.proxies.pop(name, None)
        if proxy is not None:
            await proxy.close()

    # -- files -------------------------------------------------------------------------

    def dir(self, name: str) -> Path:
        return self.root / name

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "definition.json").is_file())

    def exists(self, name: str) -> bool:
        return (self.dir(name) / "definition.json").is_file()

    def definition(self, name: str) -> VmDefinition:
        path = self.dir(name) / "definition.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise VmError(f"no VM {name!r} on node {self.node!r}", 404) from None
        except (OSError, ValueError) as exc:
            raise VmError(f"cannot read {path}: {exc}", 500) from None
        try:
            return VmDefinition.from_dict(data)
        except ConfigError as exc:
            raise VmError(f"cannot read {path}: {exc}", 500) from None

    def run(self, name: str) -> VmRun | None:
        path = self.dir(name) / "run.json"
        try:
            return VmRun.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, ConfigError) as exc:
            self.log.warning("VM %s: unreadable run.json (%s): taken as stopped", name, exc)
            return None

    def _write(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as out:
            json.dump(data, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def save_definition(self, definition: VmDefinition) -> None:
        self._write(self.dir(definition.name) / "definition.json", definition.to_dict())

    def _save_run(self, name: str, run: VmRun | None) -> None:
        path = self.dir(name) / "run.json"
        if run is None:
            path.unlink(missing_ok=True)
        else:
            self._write(path, asdict(run))

    def ram_path(self, name: str) -> Path:
        return ram_file(self.node, self.state_path, name)

    def creds(self) -> NodeCredentials:
        return NodeCredentials.from_state_dir(self.state_path)

    def tls_dir(self, name: str) -> Path:
        """The VM's QEMU creds directory, (re)written from the node's certificate."""
        return write_qemu_creds_dir(self.creds(), self.dir(name) / "tls")

    # -- state -------------------------------------------------------------------------

    def alive(self, name: str) -> VmRun | None:
        """The run record when its QEMU is alive, else None."""
        run = self.run(name)
        if run is None or not _pid_alive(run.pid):
            return None
        return run

    async def describe(self, name: str) -> dict[str, Any]:
        definition = self.definition(name)
        run = self.run(name)
        info: dict[str, Any] = {
            "name": name,
            "node": self.node,
            "definition": definition.to_dict(),
            "state": "stopped",
            "pid": None,
            "qemu_status": None,
            "adopted": False,
        }
        if run is not None and _pid_alive(run.pid):
            info.update(pid=run.pid, adopted=run.adopted, state="running", ram_path=run.ram_path)
            if run.incoming:
                info["state"] = "incoming"
            role = self.migrating.get(name)
            if role is not None:
                info["state"] = f"migrating ({role})"
            else:
                info["qemu_status"] = await self.qemu_status(run)
        return info

    async def qemu_status(self, run: VmRun) -> str | None:
        try:
            session = await QmpSession.connect(run.agent_socket, "agent", QMP_TIMEOUT_S)
        except LivemigError:
            return None
        try:
            return await session.status(timeout=QMP_TIMEOUT_S)
        except LivemigError:
            return None
        finally:
            await session.close()

    # -- create / start / stop --------------------------------------------------------------

    def create(self, definition: VmDefinition) -> None:
        try:
            check_definition(definition)
        except ConfigError as exc:
            raise VmError(str(exc), 400) from None
        if self.exists(definition.name):
            raise VmError(f"VM {definition.name!r} already exists on node {self.node!r}")
        self.save_definition(definition)
        self.log.info("VM %s defined", definition.name)

    async def start(self, name: str) -> VmRun:
        definition = self.definition(name)
        if self.alive(name) is not None:
            raise VmError(f"VM {name!r} is already running on node {self.node!r}")
        return await self.launch(definition)

    def _tap_name(self, name: str, nic: str) -> str:
        digest = hashlib.sha256(f"{self.node}/{name}/{nic}".encode()).hexdigest()
        return f"lm{digest[:10]}"

    async def launch(
        self, definition: VmDefinition, incoming: bool = False, source: str | None = None
    ) -> VmRun:
        """Start QEMU for ``definition`` on this host (:func:`migrate.hostvm.launch_vm`;
        ``incoming``: ``-incoming defer -S`` plus QMP over TCP+TLS on this node's
        address, relayed; ``source``: the one node whose certificate the relay
        takes). Raises :class:`VmError`."""
        name = definition.name
        try:
            check_definition(definition)
        except ConfigError as exc:
            raise VmError(str(exc), 400) from None
        vm_dir = self.dir(name)
        vm_dir.mkdir(parents=True, exist_ok=True)
        qmp, agent_sock = vm_dir / "qmp.sock", vm_dir / "qmp-agent.sock"
        if len(str(agent_sock)) > _MAX_SOCKET_PATH:
            raise VmError(f"socket path {agent_sock} is too long for a UNIX socket", 500)
        ram = self.ram_path(name)
        taps: dict[str, str] = {}
        vm: hostvm.HostVm | None = None
        try:
            for nic in definition.nics:
                assert nic.bridge is not None  # check_definition
                tap = self._tap_name(name, nic.id)
                with contextlib.suppress(VmError):
                    await _ip("link", "del", tap)
                await _ip("tuntap", "add", "dev", tap, "mode", "tap")
                taps[nic.id] = tap
                await _ip("link", "set", tap, "master", nic.bridge, "up")
            qmp_port = migration_port = None
            if incoming:
                self.tls_dir(name)  # the target QEMU's creds for the migration stream
                migration_port = free_port(self.host)
            try:
                vm = await hostvm.launch_vm(
                    definition,
                    vm_dir,
                    incoming=incoming,
                    paused=incoming,
                    taps=taps,
                    ram_file=ram,
                    extra_qmp_sockets=(agent_sock,),
                    timeout_s=LAUNCH_TIMEOUT_S,
                )
            except (QemuError, ConfigError) as exc:
                raise VmError(str(exc), 500) from None
            if incoming:
                proxy = QmpTlsProxy(
                    self.host, qmp, server_context(self.creds()), self.log, peer_name=source
                )
                qmp_port = await proxy.start()
                self.proxies[name] = proxy
            run = VmRun(
                pid=vm.pid,
                qmp_socket=str(qmp),
                agent_socket=str(agent_sock),
                ram_path=str(vm.ram_path or ""),
                serial_log=str(vm.serial_log) if vm.serial_log else None,
                taps=taps,
                incoming=incoming,
                qmp_tcp_port=qmp_port,
                migration_port=migration_port,
            )
            self._save_run(name, run)
        except BaseException:
            await self.close_proxy(name)
            if vm is not None:
                with contextlib.suppress(QemuError):
                    await self._terminate(definition, vm_run(vm, str(agent_sock)))
            await self._cleanup(name, VmRun(0, "", "", str(ram), taps=taps))
            raise
        self.log.info("VM %s started (pid %d%s)", name, run.pid, ", incoming" if incoming else "")
        return run

    def _host_vm(self, definition: VmDefinition, run: VmRun) -> hostvm.HostVm:
        """The run record as :mod:`migrate.hostvm` sees it; QMP is the agent's own
        monitor (the engine may hold the other)."""
        return hostvm.HostVm(
            definition=definition,
            pid=run.pid,
            qmp_socket=Path(run.agent_socket),
            ram_path=Path(run.ram_path) if run.ram_path else None,
            state_dir=None if run.adopted else self.dir(definition.name),
            serial_log=Path(run.serial_log) if run.serial_log else None,
            argv=(),
            adopted=run.adopted,
        )

    async def _terminate(self, definition: VmDefinition, run: VmRun) -> None:
        """``quit`` over the agent's QMP, then SIGTERM, then SIGKILL (hostvm.stop_vm)."""
        if not _pid_alive(run.pid):
            return
        try:
            await hostvm.stop_vm(self._host_vm(definition, run), timeout_s=STOP_TIMEOUT_S)
        except QemuError as exc:
            raise VmError(str(exc), 500) from None

    async def _cleanup(self, name: str, run: VmRun) -> None:
        """Remove what a stopped QEMU leaves: its taps, RAM file and sockets (not an
        adopted VM's own files)."""
        await self.close_proxy(name)
        for tap in run.taps.values():
            with contextlib.suppress(VmError):
                await _ip("link", "del", tap)
        vm_dir = self.dir(name)
        if not run.adopted:
            Path(run.ram_path).unlink(missing_ok=True) if run.ram_path else None
        for leftover in ("qmp.sock", "qmp-agent.sock", "serial.sock", "qemu.pid"):
            (vm_dir / leftover).unlink(missing_ok=True)
        shutil.rmtree(vm_dir / "tls", ignore_errors=True)
        self._save_run(name, None)

    async def stop(self, name: str) -> None:
        """Stop the VM's QEMU (it stays defined). Raises :class:`VmError`."""
        self.definition(name)
        if name in self.migrating:
            raise VmError(f"VM {name!r} is being migrated")
        run = self.run(name)
        if run is None:
            raise VmError(f"VM {name!r} is not running on node {self.node!r}")
        await self._terminate(self.definition(name), run)
        await self._cleanup(name, run)
        self.log.info("VM %s stopped", name)

    async def forget(self, name: str) -> None:
        """Stop the VM if it runs and drop its definition and files (it lives elsewhere now)."""
        run = self.run(name)
        if run is not None:
            with contextlib.suppress(VmError):
                definition = self.definition(name)
                await self._terminate(definition, run)
            if _pid_alive(run.pid):
                raise VmError(f"QEMU pid {run.pid} did not exit", 500)
            await self._cleanup(name, run)
        shutil.rmtree(self.dir(name), ignore_errors=True)
        self.locks.pop(name, None)

    # -- adopt / re-adopt -------------------------------------------------------------------

    async def adopt(self, qmp_socket: Path, name: str | None = None) -> VmDefinition:
        """Take over a QEMU started elsewhere, reached at ``qmp_socket``
        (:func:`migrate.hostvm.adopt_vm`: its pid from the socket's peer, its
        definition from its command line; each tap NIC becomes a NIC on its tap's
        bridge). Raises :class:`VmError`."""
        if not qmp_socket.exists():
            raise VmError(f"cannot reach a QEMU at {qmp_socket}: no such socket", 400)
        try:
            vm = await hostvm.adopt_vm(qmp_socket, QMP_TIMEOUT_S)
            definition = hostvm.nics_on_bridges(vm.definition, bridges_of_taps())
            if name is not None and name != definition.name:
                definition = dataclasses.replace(definition, name=name)
            check_definition(definition)
        except ConfigError as exc:
            raise VmError(f"cannot adopt the QEMU at {qmp_socket}: {exc}", 400) from None
        except LivemigError as exc:
            raise VmError(f"cannot reach a QEMU at {qmp_socket}: {exc}", 400) from None
        if self.exists(definition.name):
            raise VmError(f"VM {definition.name!r} already exists on node {self.node!r}")
        self.save_definition(definition)
        run = VmRun(
            pid=vm.pid,
            qmp_socket=str(qmp_socket),
            agent_socket=str(qmp_socket),
            ram_path=str(vm.ram_path or ""),
            serial_log=str(vm.serial_log) if vm.serial_log else None,
            adopted=True,
        )
        self._save_run(definition.name, run)
        self.log.info("VM %s adopted (pid %d, QMP %s)", definition.name, vm.pid, qmp_socket)
        return definition

    def readopt(self) -> list[str]:
        """At start-up: every VM whose ``run.json`` names a live QEMU is this agent's
        again; the records of QEMUs that are gone are dropped. Returns the re-adopted."""
        found = []
        for name in self.names():
            run = self.run(name)
            if run is None:
                continue
            if _pid_alive(run.pid) and any(run.qmp_socket in a for a in _cmdline(run.pid)):
                found.append(name)
                self.log.info("VM %s re-adopted (pid %d)", name, run.pid)
                if run.incoming:
                    self.log.warning("VM %s was an unfinished incoming migration", name)
            else:
                self.log.info("VM %s: its QEMU (pid %d) is gone: stopped", name, run.pid)
                self._save_run(name, None)
                if not run.adopted and run.ram_path:
                    Path(run.ram_path).unlink(missing_ok=True)
        return found
