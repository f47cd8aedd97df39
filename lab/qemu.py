"""QEMU processes owned by async context managers.

:class:`QemuProcess` launches QEMU from a :class:`~migrate.vmspec.VMSpec` (inside a
network namespace if asked), attaches to its serial console and QMP, and on exit
shuts it down softly (``quit``), then with SIGTERM, then SIGKILL, always removing its
sockets and RAM file. Launch either fully succeeds or cleans up and raises
:class:`~migrate.errors.QemuLaunchError` with the exit code and QEMU's output.

QEMU gets ``PR_SET_PDEATHSIG=SIGKILL``: if the owning thread dies without cleaning
up (SIGKILL), the kernel kills QEMU too, so no orphan VM keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from migrate.deadline import within
from migrate.errors import QemuError, QemuLaunchError
from migrate.qmp import QmpSession
from migrate.vmspec import LaunchSite, RamBackendKind, VMSpec

_PR_SET_PDEATHSIG = 1
RAM_DIR = Path("/dev/shm")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class ConsoleLine:
    """A line from the guest's serial console and when it arrived (realtime seconds)."""

    timestamp: float
    text: str


class SerialConsole:
    """Reads a serial console socket line by line, timestamping each line on arrival."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.lines: list[ConsoleLine] = []
        self._log_path = log_path
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def attach(self, path: Path, deadline: float) -> None:
        """Connect to the console socket, retrying until ``deadline`` (monotonic).

        The socket file exists from QEMU's bind(), a moment before its listen():
        a connect in between is refused, so refusals are retried.
        """
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path))
                break
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.005)
        self._writer = writer
        self._task = asyncio.create_task(self._read(reader), name=f"serial {path}")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        log = self._log_path.open("a", encoding="utf-8") if self._log_path else None
        try:
            while raw := await reader.readline():
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                line = ConsoleLine(time.time(), text)
                self.lines.append(line)
                if log is not None:
                    log.write(f"{line.timestamp:.6f} {text}\n")
                    log.flush()
                async with self._changed:
                    self._changed.notify_all()
        except OSError:
            pass  # QEMU went away; the process owner reports why
        finally:
            if log is not None:
                log.close()
            async with self._changed:
                self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._task is None or self._task.done()

    async def wait_for(self, pattern: str, timeout: float, since: int = 0) -> ConsoleLine:
        """The first line at index >= ``since`` matching ``pattern`` (a regex).

        Raises :class:`QemuError` on timeout or when the console closes first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = since
        async with self._changed:
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index].text):
                        return self.lines[index]
                    index += 1
                if self.closed:
                    raise QemuError(f"serial console closed before a line matched {pattern!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QemuError(f"no console line matched {pattern!r} within {timeout:.1f} s")
                with contextlib.suppress(TimeoutError):
                    await within(self._changed.wait(), remaining)

    def matching(self, pattern: str, since: int = 0) -> list[ConsoleLine]:
        regex = re.compile(pattern)
        return [line for line in self.lines[since:] if regex.search(line.text)]

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class QemuProcess:
    """One QEMU process, owned from launch to exit.

    ``netns`` runs QEMU inside that network namespace; ``taps`` binds NIC ids to tap
    devices there. ``incoming`` starts it waiting for a migration (``-incoming
    defer``); ``paused`` adds ``-S``. ``log_dir`` keeps ``<role>.serial.log`` and
    ``<role>.qemu.log`` after exit (otherwise they go with the private work dir).
    ``disk_paths`` puts disks of the spec at other paths on this host (a target's
    own copy of a local disk); the images must exist.
    """

    def __init__(
        self,
        spec: VMSpec,
        *,
        role: str = "vm",
        netns: str | None = None,
        taps: Mapping[str, str] | None = None,
        incoming: bool = False,
        paused: bool = False,
        log_dir: Path | None = None,
        launch_timeout: float = 30.0,
        disk_paths: Mapping[str, Path] | None = None,
    ) -> None:
        self.spec = spec
        self.role = role
        self.netns = netns
        self.taps = dict(taps or {})
        self.incoming = incoming
        self.paused = paused
        self.launch_timeout = launch_timeout
        # The owner's PID in the name: `python -m lab.net sweep` removes the sites of
        # dead owners (a SIGKILLed test or engine runs no cleanup).
        self.workdir = Path(
            tempfile.mkdtemp(prefix=f"livemig-{os.getpid()}-{spec.name}-{role}-", dir=RAM_DIR)
        )
        self.log_dir = log_dir or self.workdir
        self.serial_log = self.log_dir / f"{role}.serial.log"
        self.qemu_log = self.log_dir / f"{role}.qemu.log"
        self.serial_socket = self.workdir / "serial.sock"
        self.site = LaunchSite(
            qmp_socket=self.workdir / "qmp.sock",
            serial_socket=self.serial_socket,
            ram_path=self._ram_file(spec),
            taps=self.taps,
            incoming=incoming,
            paused=paused,
            disk_paths=dict(disk_paths or {}),
        )
        argv = spec.qemu_argv(self.site)
        self.argv = ["ip", "netns", "exec", netns, *argv] if netns else argv
        self.console = SerialConsole(self.serial_log)
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QmpSession | None = None

    def _ram_file(self, spec: VMSpec) -> Path | None:
        if spec.ram_backend is not RamBackendKind.SHARED_FILE:
            return None
        if spec.ram_dir is None:
            return self.workdir / "ram"
        # Outside the work dir (e.g. on hugetlbfs): named after it, removed at shutdown.
        return spec.ram_dir / f"{self.workdir.name}.ram"

    async def __aenter__(self) -> QemuProcess:
        await self.launch()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # -- state -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def qmp(self) -> QmpSession:
        if self._qmp is None:
            raise QemuError(f"{self.role} QEMU has no QMP session (not launched, or shut down)")
        return self._qmp

    @property
    def ram_path(self) -> Path | None:
        return self.site.ram_path

    # -- launch / shutdown -------------------------------------------------------------

    async def launch(self) -> None:
        """Start QEMU and attach console and QMP. Raises :class:`QemuLaunchError`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            with self.qemu_log.open("ab") as out:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            deadline = time.monotonic() + self.launch_timeout
            await self._wait_for_socket(self.serial_socket, deadline)
            await self.console.attach(self.serial_socket, deadline)
            await self._wait_for_socket(self.site.qmp_socket, deadline)
            self._qmp = await QmpSession.connect(
                self.site.qmp_socket,
                f"{self.spec.name}/{self.role}",
                max(0.1, deadline - time.monotonic()),
            )
        except BaseException as exc:
            await self.shutdown()
            if isinstance(exc, QemuLaunchError | asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise self._launch_error(f"{self.role} QEMU did not start: {exc}") from exc

    async def _wait_for_socket(self, path: Path, deadline: float) -> None:
        while not path.is_socket():
            if self._proc is not None and self._proc.returncode is not None:
                raise self._launch_error(f"{self.role} QEMU exited with {self._proc.returncode}")
            if time.monotonic() >= deadline:
                raise self._launch_error(f"{self.role} QEMU created no {path.name} in time")
            await asyncio.sleep(0.01)

    def _launch_error(self, message: str) -> QemuLaunchError:
        output = self.read_qemu_log()
        last = output.strip().splitlines()[-1] if output.strip() else ""
        return QemuLaunchError(
            f"{message}{': ' + last if last else ''}", self.argv, self.returncode, output
        )

    def read_qemu_log(self) -> str:
        try:
            return self.qemu_log.read_text(errors="replace")
        except OSError:
            return ""

    async def release_qmp(self) -> None:
        """Close our QMP session so another client (e.g. ``livemig migrate``) can connect.

        QEMU's QMP socket serves one client at a time. Shutdown then uses signals.
        """
        if self._qmp is not None:
            await self._qmp.close()
            self._qmp = None

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop QEMU: ``quit``, then SIGTERM, then SIGKILL; always clean up files."""
        try:
            if self.alive and self._qmp is not None:
                with contextlib.suppress(QemuError, TimeoutError):
                    await within(self._qmp.execute("quit"), min(2.0, timeout))
                await self._wait_exit(timeout)
            for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                if not self.alive:
                    break
                self._signal(sig)
                await self._wait_exit(wait)
        finally:
            if self._qmp is not None:
                await self._qmp.close()
                self._qmp = None
            await self.console.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
            ram = self.site.ram_path
            if ram is not None and ram.parent != self.workdir:
                ram.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL QEMU now (fault injection, emergencies); :meth:`shutdown` still cleans up."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    async def _wait_exit(self, timeout: float) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(TimeoutError):
            await within(self._proc.wait(), timeout)

    async def wait_exited(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for QEMU to exit; its exit code, or None if still running."""
        await self._wait_exit(timeout)
        return self.returncode
