"""A ``qemu-storage-daemon`` that serves image files over NBD, owned from start to exit.

The replica side of ``livemig replicate`` (and of a migration onto a replica) needs a
process that opens an image and exports it writable over NBD; without an agent on
the target host that is a ``qemu-storage-daemon`` (QEMU's block layer without a VM,
driven over QMP). :class:`StorageDaemon` starts one with its QMP monitor on a UNIX
socket, serves NBD on a UNIX socket or a TCP address, adds and removes exports, and
on exit quits it (``quit``, then SIGKILL), removing its sockets. It runs with
``PR_SET_PDEATHSIG=SIGKILL``: if its owner dies without cleaning up (SIGKILL), the
kernel kills the daemon too, so no orphan keeps an image open — and the source's
copy job fails at once instead of finishing into a run nobody will record.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from migrate.deadline import within
from migrate.errors import ConfigError, QemuError, QemuLaunchError
from migrate.qmp import EventRecorder, QmpSession

_PR_SET_PDEATHSIG = 1
BINARY = "qemu-storage-daemon"


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD server listens: a UNIX socket ``path``, or TCP ``host``:``port``."""

    path: Path | None = None
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.host is None):
            raise ConfigError("an NBD address is a UNIX socket path or a host:port, not both")
        if self.host is not None and not (self.port and 0 < self.port < 65536):
            raise ConfigError(f"NBD address {self.host}: needs a port 1-65535")

    @classmethod
    def parse(cls, text: str) -> NbdAddress:
        """``HOST:PORT`` (``[v6]:PORT``) or an absolute UNIX socket path."""
        if text.startswith("/"):
            return cls(path=Path(text))
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"bad NBD address {text!r} (HOST:PORT or /path/to/socket)")
        return cls(host=host.strip("[]"), port=int(port))

    def server_arg(self) -> dict[str, Any]:
        """``nbd-server-start``'s ``addr`` (the legacy SocketAddress form)."""
        if self.path is not None:
            return {"type": "unix", "data": {"path": str(self.path)}}
        return {"type": "inet", "data": {"host": self.host, "port": str(self.port)}}

    def client_arg(self) -> dict[str, Any]:
        """The ``server`` of a ``blockdev-add driver=nbd`` (SocketAddress)."""
        if self.path is not None:
            return {"type": "unix", "path": str(self.path)}
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"{self.host}:{self.port}"


class StorageDaemon:
    """One ``qemu-storage-daemon``; an async context manager.

    ``workdir`` holds its QMP socket (and the NBD socket when ``nbd`` is None);
    ``nbd`` is where its NBD server listens. Raises :class:`QemuLaunchError` when it
    does not come up, :class:`QemuError` when a command fails.
    """

    def __init__(
        self, workdir: Path, nbd: NbdAddress | None = None, launch_timeout: float = 10.0
    ) -> None:
        self.workdir = workdir
        self.qmp_socket = workdir / ".qsd-qmp.sock"
        self.nbd = nbd or NbdAddress(path=workdir / ".nbd.sock")
        self.launch_timeout = launch_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QmpSession | None = None
        self._events: EventRecorder | None = None
        self._exports: dict[str, str] = {}  # export name -> node name

    @property
    def qmp(self) -> QmpSession:
        if self._qmp is None:
            raise QemuError("qemu-storage-daemon is not running")
        return self._qmp

    async def __aenter__(self) -> StorageDaemon:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if shutil.which(BINARY) is None:
            raise ConfigError(f"{BINARY} not found (apt-get install qemu-system-common)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self.qmp_socket, self.nbd.path):
            if stale is not None:
                stale.unlink(missing_ok=True)  # left by a killed earlier run
        argv = [
            BINARY,
            "--chardev", f"socket,id=qmp,path={self.qmp_socket},server=on,wait=off",
            "--monitor", "chardev=qmp",
        ]  # fmt: skip
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        try:
            self._qmp = await QmpSession.connect(
                self.qmp_socket, "qemu-storage-daemon", timeout=self.launch_timeout
            )
            self._events = EventRecorder(self._qmp)
            await self._events.__aenter__()
            await self._qmp.execute("nbd-server-start", {"addr": self.nbd.server_arg()})
        except (QemuError, ConfigError) as exc:
            output = await self._stop_and_read()
            raise QemuLaunchError(
                f"{BINARY} did not come up: {exc}", argv, self._returncode(), output
            ) from exc

    def _returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    async def export(self, name: str, image: Path, writable: bool = True) -> None:
        """Open the qcow2 ``image`` and export it over NBD as ``name``."""
        node = f"img-{name}"
        await self.qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": str(image)},
            },
        )
        try:
            await self.qmp.execute(
                "block-export-add",
                {"type": "nbd", "id": name, "node-name": node, "name": name, "writable": writable},
            )
        except QemuError:
            with contextlib.suppress(QemuError):
                await self.qmp.execute("blockdev-del", {"node-name": node})
            raise
        self._exports[name] = node

    async def unexport(self, name: str, timeout: float = 10.0) -> None:
        """Remove export ``name`` and close its image (flushed). Clients should have
        disconnected; one that has not is cut off (``mode=hard``)."""
        node = self._exports.pop(name, None)
        if node is None:
            return
        assert self._events is not None
        since = len(self._events.events)
        try:
            await self.qmp.execute("block-export-del", {"id": name})
        except QemuError:
            await self.qmp.execute("block-export-del", {"id": name, "mode": "hard"})
        gone = await self._events.wait_for(
            "BLOCK_EXPORT_DELETED", lambda e: e.data.get("id") == name, timeout, since
        )
        if gone is None:
            raise QemuError(f"NBD export {name} not deleted within {timeout:g} s")
        await self.qmp.execute("blockdev-del", {"node-name": node})

    async def stop(self, timeout: float = 5.0) -> None:
        """Close every export and quit; SIGKILL if it does not exit in ``timeout`` s."""
        if self._qmp is not None:
            for name in list(self._exports):
                with contextlib.suppress(QemuError):
                    await self.unexport(name, timeout)
        await self._stop_and_read(timeout)

    async def _stop_and_read(self, timeout: float = 5.0) -> str:
        if self._events is not None:
            await self._events.__aexit__(None, None, None)
            self._events = None
        if self._qmp is not None:
            with contextlib.suppress(QemuError):
                await self._qmp.execute("quit", timeout=timeout)
            await self._qmp.close()
            self._qmp = None
        output = ""
        proc, self._proc = self._proc, None
        if proc is not None:
            deadline = time.monotonic() + timeout
            with contextlib.suppress(TimeoutError):
                await within(proc.wait(), max(0.1, deadline - time.monotonic()))
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await within(proc.wait(), timeout)
            if proc.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    output = (await within(proc.stderr.read(), 1.0)).decode("utf-8", "replace")
        for path in (self.qmp_socket, self.nbd.path):
            if path is not None:
                path.unlink(missing_ok=True)
        return output
