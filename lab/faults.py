"""The fault matrix: ``livemig bench run --suite faults|faults-short``.

Each *cell* is one fault injected at one phase of one strategy's migration, in a
fresh lab: a 128 MiB guest running the ``dirty:8`` workload (its MEMDIRTY pattern
check proves memory intact), the migration link capped (tbf) so pre-copy lasts
seconds. The engine runs in this process through :class:`migrate.api.Migration`
(faults fired from an event callback), or as ``python -m migrate.cli migrate
--events`` in a subprocess for the faults aimed at the engine itself (SIGTERM,
SIGKILL). After the engine ended the cell records what an operator would find:
the status the engine reported, how many QEMUs run the VM, whether the running
copy's memory is intact, what was left behind, the exit code, and a verdict
(:func:`judge`): at most one running copy, exactly one unless the fault destroyed
the copy that held the VM, memory intact, nothing left behind, a truthful status
and exit code.

Phases: ``setup`` (as pre-copy begins, before any RAM crossed the link), ``bulk``
(after some MiB crossed the migration link), ``switchover`` (at the engine's
PhaseChanged to switchover), ``after`` (at the report saying completed),
``postcopy`` (native, policy allowing post-copy: once the VM runs on the target
after the post-copy switch). Conditions present from the start (target tmpfs full)
count as ``setup``; the lost ``cont`` reply is a ``switchover`` fault.

The engine never imports this module (see docs/DESIGN.md); ``migrate.cli_bench``
dispatches here when the suite is a fault suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import psutil

from lab.accel import AccelChoice, choose_accelerator
from lab.demo import DemoConfig, Workload, guest_check, guest_spec, wait_workload_started
from lab.guest import GuestImage, ensure_guest
from lab.net import MIGRATION_IFACE, Lab, run_ip
from lab.qemu import QemuProcess
from migrate.api import Migration
from migrate.deadline import within
from migrate.errors import LivemigError, PreflightError, QemuError
from migrate.events import EventBus, Finished, MigrationEvent, PhaseChanged
from migrate.pagestream.control import AGENT_MODULE
from migrate.phase import Phase
from migrate.presets import preset
from migrate.qmp import QmpSession
from migrate.report import MigrationReport
from migrate.request import HostEndpoint, MigrationRequest

REPO_ROOT = Path(__file__).resolve().parents[1]
MIGRATION_PORT = 4444
WORKLOAD = Workload("dirty:8")
MEMORY_MIB = 128
DIRTY_MIB = 16
#: The migration link's cap: dirty:8 (8 MiB/s) still converges, pre-copy lasts ~5 s.
LINK_MBIT = 160.0
#: The policy's downtime ceiling: what the set left at 160 Mbit/s needs.
MAX_DOWNTIME_MS = 1000.0
QMP_TIMEOUT_S = 3.0
STALL_TIMEOUT_S = 5.0
#: How much must have crossed the migration link for the ``bulk`` phase.
BULK_BYTES = 6 << 20
#: How long the migration link stays down.
LINK_DOWN_S = 8.0
#: Size of the tiny tmpfs the target's RAM file is put on (guest RAM: 128 MiB).
TMPFS_MIB = 16
CELL_TIMEOUT_S = 150.0
EXIT_OK, EXIT_ERROR, EXIT_PREFLIGHT, EXIT_MIGRATION = 0, 1, 3, 4
RESULTS_SCHEMA_VERSION = 1


class Fault(StrEnum):
    KILL_TARGET = "kill-target"  # kill -9 of the target QEMU
    KILL_SOURCE = "kill-source"  # kill -9 of the source QEMU
    LINK_DOWN = "link-down"  # migration link down for LINK_DOWN_S, then up
    SILENT_TARGET = "silent-target"  # SIGSTOP the target QEMU; SIGCONT after the engine ended
    KILL_RECEIVER = "kill-receiver"  # kill -9 of pagestream's receiver agent
    LOST_CONT = "lost-cont"  # a QMP proxy drops the target's reply to `cont`
    TARGET_TMPFS_FULL = "target-tmpfs-full"  # target RAM file on a 16 MiB tmpfs
    ENGINE_SIGTERM = "engine-sigterm"  # SIGTERM to `livemig migrate`
    ENGINE_SIGKILL = "engine-sigkill"  # SIGKILL to `livemig migrate`


class FaultPhase(StrEnum):
    SETUP = "setup"
    BULK = "bulk"
    SWITCHOVER = "switchover"
    AFTER = "after"
    POSTCOPY = "postcopy"


@dataclass(frozen=True)
class Cell:
    fault: Fault
    phase: FaultPhase
    strategy: str

    @property
    def name(self) -> str:
        return f"{self.fault}/{self.phase}/{self.strategy}"

    @property
    def in_subprocess(self) -> bool:
        return self.fault in (Fault.ENGINE_SIGTERM, Fault.ENGINE_SIGKILL)


@dataclass(frozen=True)
class CellResult:
    """What one cell found once the engine had ended (see :func:`judge`)."""

    fault: str
    phase: str
    strategy: str
    status: str  # the report's status; `refused` (preflight), `error`, `killed` (no report)
    injected: bool  # whether the fault fired (a phase can be missed: the migration ended first)
    fired_in: str | None  # the engine's phase when the fault fired
    running_copies: int
    running_on: tuple[str, ...]
    memory_intact: bool | None
    memory_check: str
    leftovers: tuple[str, ...]
    exit_code: int | None
    error: str | None
    vm_destroyed: bool  # the fault killed the QEMU that held the VM
    recover: str
    problems: tuple[str, ...]
    duration_s: float
    notes: tuple[str, ...] = ()

    @property
    def outcome_ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["outcome_ok"] = self.outcome_ok
        return data


@dataclass(frozen=True)
class FaultSuite:
    name: str
    description: str
    cells: tuple[Cell, ...]


def _cells(
    faults: tuple[Fault, ...], phases: tuple[FaultPhase, ...], strategies: tuple[str, ...]
) -> tuple[Cell, ...]:
    return tuple(Cell(f, p, s) for f in faults for p in phases for s in strategies)


_BOTH = ("native", "pagestream")
_TRANSFER = (FaultPhase.SETUP, FaultPhase.BULK, FaultPhase.SWITCHOVER)
_FULL: tuple[Cell, ...] = (
    *_cells((Fault.KILL_TARGET, Fault.KILL_SOURCE), (*_TRANSFER, FaultPhase.AFTER), _BOTH),
    *_cells((Fault.KILL_TARGET, Fault.KILL_SOURCE), (FaultPhase.POSTCOPY,), ("native",)),
    *_cells((Fault.LINK_DOWN,), _TRANSFER, _BOTH),
    *_cells((Fault.LINK_DOWN,), (FaultPhase.POSTCOPY,), ("native",)),
    *_cells((Fault.SILENT_TARGET,), _TRANSFER, _BOTH),
    *_cells((Fault.KILL_RECEIVER,), _TRANSFER, ("pagestream",)),
    *_cells((Fault.LOST_CONT,), (FaultPhase.SWITCHOVER,), _BOTH),
    *_cells((Fault.TARGET_TMPFS_FULL,), (FaultPhase.SETUP,), _BOTH),
    *_cells((Fault.ENGINE_SIGTERM,), (FaultPhase.BULK, FaultPhase.SWITCHOVER), ("native",)),
    *_cells((Fault.ENGINE_SIGKILL,), (FaultPhase.BULK,), ("native",)),
)

SUITES: dict[str, FaultSuite] = {
    "faults": FaultSuite(
        "faults",
        "fault x phase x strategy: every fault at every phase where it means something",
        _FULL,
    ),
    "faults-short": FaultSuite(
        "faults-short",
        "a few cells of the fault matrix (the integration test's; ~3 min)",
        (
            Cell(Fault.KILL_TARGET, FaultPhase.BULK, "native"),
            Cell(Fault.KILL_RECEIVER, FaultPhase.BULK, "pagestream"),
            Cell(Fault.LOST_CONT, FaultPhase.SWITCHOVER, "native"),
            Cell(Fault.LINK_DOWN, FaultPhase.BULK, "native"),
        ),
    ),
}


# --- the cell's world ------------------------------------------------------------------


@dataclass
class CellWorld:
    """One cell's lab, QEMUs and what the injector did."""

    cell: Cell
    lab: Lab
    source: QemuProcess
    target: QemuProcess
    fired_in: str | None = None
    fired_at: float | None = None
    notes: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stopped_target: bool = False
    console_mark: int = 0  # the source console's length when the engine ended
    signal_engine: Callable[[], None] | None = None  # the subprocess runner's
    recover: str = "n/a"  # what `livemig recover` did after the engine was killed

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def injected(self) -> bool:
        return self.fired_at is not None

    def fire(self, phase: str) -> None:
        """Inject the cell's fault now (synchronously: it lands where the engine is)."""
        if self.fired_at is not None:
            return
        self.fired_at, self.fired_in = time.time(), phase
        fault = self.cell.fault
        if fault is Fault.KILL_TARGET:
            self.target.kill()
        elif fault is Fault.KILL_SOURCE:
            self.source.kill()
        elif fault is Fault.LINK_DOWN:
            run_ip(["link", "set", MIGRATION_IFACE, "down"], self.lab.host_a.netns)
            self.tasks.append(asyncio.get_running_loop().create_task(self._link_up_later()))
        elif fault is Fault.SILENT_TARGET:
            self._signal_target(signal.SIGSTOP)
            self.stopped_target = True
        elif fault is Fault.KILL_RECEIVER:
            receivers = _agents("--role receiver")
            for proc in receivers:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            self.note(f"killed {len(receivers)} receiver agent(s)")
        elif fault in (Fault.ENGINE_SIGTERM, Fault.ENGINE_SIGKILL):
            if self.signal_engine is not None:
                self.signal_engine()
        else:  # conditions set up before the start: nothing to fire
            pass

    async def _link_up_later(self) -> None:
        await asyncio.sleep(LINK_DOWN_S)
        run_ip(["link", "set", MIGRATION_IFACE, "up"], self.lab.host_a.netns)

    def _signal_target(self, sig: int) -> None:
        if self.target.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.target.pid, sig)

    async def settle(self) -> None:
        """After the engine ended: let timed fault actions finish, wake a stopped target."""
        for task in self.tasks:
            await task
        self.tasks.clear()
        if self.stopped_target:
            self._signal_target(signal.SIGCONT)
            self.stopped_target = False


def _agents(marker: str = "") -> list[psutil.Process]:
    """pagestream agent processes below this process (``marker`` in their command line)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.cmdline())
            agent = "pagestream.agent" in cmdline or AGENT_MODULE in cmdline
            if agent and marker in cmdline:
                found.append(proc)
    return found


class Trigger:
    """Turns the engine's events (and the link's byte counter) into the fault's moment."""

    def __init__(self, world: CellWorld, migration: Migration | None = None) -> None:
        self.world = world
        self.migration = migration
        self.phase: str = Phase.SETUP.value
        self.report_status: str | None = None
        self._poller: asyncio.Task[None] | None = None

    @property
    def wanted(self) -> FaultPhase:
        return self.world.cell.phase

    def on_phase(self, phase: str) -> None:
        self.phase = phase
        if phase == Phase.PRECOPY.value:
            if self.wanted is FaultPhase.SETUP:
                self.world.fire(phase)
            elif self.wanted in (FaultPhase.BULK, FaultPhase.POSTCOPY):
                self._poller = asyncio.get_running_loop().create_task(self._watch_link())
        elif phase == Phase.SWITCHOVER.value and self.wanted is FaultPhase.SWITCHOVER:
            self.world.fire(phase)
        elif phase == Phase.POSTCOPY.value and self.wanted is FaultPhase.POSTCOPY:
            self.world.tasks.append(
                asyncio.get_running_loop().create_task(self._fire_once_target_runs())
            )
        if Phase(phase).terminal and self._poller is not None:
            self._poller.cancel()

    def on_finished(self, status: str) -> None:
        self.report_status = status
        if self.wanted is FaultPhase.AFTER and status == "completed":
            self.world.fire("completed")

    def on_event(self, event: MigrationEvent) -> None:
        """The in-process engine's callback."""
        if isinstance(event, PhaseChanged):
            self.on_phase(event.phase.value)
        elif isinstance(event, Finished):
            self.on_finished(str(event.report.status))

    async def _watch_link(self) -> None:
        lab = self.world.lab
        start = lab.migration_link_stats(lab.host_a).tx_bytes
        while self.phase in (Phase.PRECOPY.value, Phase.THROTTLING.value):
            if lab.migration_link_stats(lab.host_a).tx_bytes - start >= BULK_BYTES:
                if self.wanted is FaultPhase.BULK:
                    self.world.fire(self.phase)
                elif self.migration is not None:
                    self.migration.start_postcopy()
                return
            await asyncio.sleep(0.02)

    async def _fire_once_target_runs(self) -> None:
        """Post-copy: fire as soon as the target runs the guest, while post-copy still
        moves pages (a fault after post-copy's end is the `after` phase's cell)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.phase == Phase.POSTCOPY.value:
            with contextlib.suppress(QemuError):
                if await self.world.target.qmp.status(timeout=1.0) == "running":
                    break
            await asyncio.sleep(0.02)
        if self.phase == Phase.POSTCOPY.value:
            self.world.fire(self.phase)
        else:
            self.world.note(f"post-copy ended ({self.phase}) before the target was seen running")


# --- the lost `cont` reply: a QMP proxy ------------------------------------------------


class QmpProxy:
    """A UNIX-socket QMP proxy that forwards everything but the reply to ``cont``."""

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.dropped = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> QmpProxy:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.path.unlink(missing_ok=True)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.open_unix_connection(str(self.upstream))
        except OSError:
            c_writer.close()
            return
        cont_ids: set[Any] = set()
        up = asyncio.get_running_loop().create_task(self._pump(c_reader, u_writer, cont_ids, True))
        down = asyncio.get_running_loop().create_task(
            self._pump(u_reader, c_writer, cont_ids, False)
        )
        self._tasks |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for writer in (u_writer, c_writer):
            writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cont_ids: set[Any],
        from_client: bool,
    ) -> None:
        decoder = json.JSONDecoder()
        buffer = ""
        while chunk := await reader.read(65536):
            buffer += chunk.decode("utf-8", "replace")
            while True:
                stripped = buffer.lstrip()
                if not stripped:
                    buffer = ""
                    break
                try:
                    message, end = decoder.raw_decode(stripped)
                except json.JSONDecodeError:
                    buffer = stripped
                    break  # incomplete: wait for more
                buffer = stripped[end:]
                if isinstance(message, dict):
                    if from_client and message.get("execute") == "cont":
                        cont_ids.add(message.get("id"))
                    elif (
                        not from_client and "event" not in message and message.get("id") in cont_ids
                    ):
                        cont_ids.discard(message.get("id"))
                        self.dropped += 1
                        continue
                writer.write(json.dumps(message).encode() + b"\r\n")
                await writer.drain()


# --- running one cell ------------------------------------------------------------------


@dataclass(frozen=True)
class EngineEnd:
    status: str
    exit_code: int | None
    error: str | None
    report: MigrationReport | dict[str, Any] | None = None


def _policy(cell: Cell) -> Any:
    policy = dataclasses.replace(preset("livemig"), max_downtime_ms=MAX_DOWNTIME_MS)
    if cell.phase is FaultPhase.POSTCOPY:
        policy = dataclasses.replace(policy, postcopy_allowed=True)
    return policy


def _request(world: CellWorld, target_qmp: Path) -> MigrationRequest:
    lab = world.lab
    return MigrationRequest(
        source=HostEndpoint("host-a", world.source.site.qmp_socket, netns=lab.host_a.netns),
        target=HostEndpoint(
            "host-b", target_qmp, lab.host_b.migration_uri(MIGRATION_PORT), netns=lab.host_b.netns
        ),
        strategy=world.cell.strategy,
        policy=_policy(world.cell),
        vm=world.source.spec.name,
        link_mbit=LINK_MBIT,
        qmp_timeout_s=QMP_TIMEOUT_S,
        stall_timeout_s=STALL_TIMEOUT_S,
    )


def _exit_code(status: str) -> int:
    """The CLI's exit code for an in-process outcome (``livemig migrate``'s mapping)."""
    return {"completed": EXIT_OK, "refused": EXIT_PREFLIGHT, "error": EXIT_ERROR}.get(
        status, EXIT_MIGRATION
    )


async def _run_in_process(world: CellWorld) -> EngineEnd:
    """The engine through :class:`Migration`, the fault fired from its event callback."""
    proxy: QmpProxy | None = None
    target_session = world.target.qmp
    if world.cell.fault is Fault.LOST_CONT:
        await world.target.release_qmp()
        proxy = QmpProxy(world.target.site.qmp_socket, world.target.workdir / "proxy.sock")
        await proxy.__aenter__()
        target_session = await QmpSession.connect(proxy.path, "target (proxied)", 10)
    try:
        target_qmp = proxy.path if proxy is not None else world.target.site.qmp_socket
        migration = Migration(
            _request(world, target_qmp), source=world.source.qmp, target=target_session,
            events=EventBus(),
        )  # fmt: skip
        trigger = Trigger(world, migration)
        migration.add_callback(trigger.on_event)
        await migration.start()
        try:
            report = await migration.wait()
        except PreflightError as exc:
            return EngineEnd("refused", EXIT_PREFLIGHT, str(exc))
        except LivemigError as exc:
            return EngineEnd("error", EXIT_ERROR, str(exc))
        status = str(report.status)
        return EngineEnd(status, _exit_code(status), report.error, report)
    finally:
        if proxy is not None:
            world.note(
                f"proxy dropped {proxy.dropped} `cont` repl{'y' if proxy.dropped == 1 else 'ies'}"
            )
            await target_session.close()
            await proxy.__aexit__()


async def _run_subprocess(world: CellWorld) -> EngineEnd:
    """``livemig migrate --events`` on the pair's QMP sockets, signalled at the phase."""
    cell, lab = world.cell, world.lab
    await world.source.release_qmp()
    await world.target.release_qmp()
    argv = [
        sys.executable, "-m", "migrate.cli", "migrate", "--events", "--no-predict",
        "--strategy", cell.strategy, "--max-downtime-ms", f"{MAX_DOWNTIME_MS:g}",
        "--link-mbit", f"{LINK_MBIT:g}",
        "--source-qmp", str(world.source.site.qmp_socket),
        "--target-qmp", str(world.target.site.qmp_socket),
        "--target-uri", lab.host_b.migration_uri(MIGRATION_PORT),
    ]  # fmt: skip
    state_dir = Path(tempfile.mkdtemp(prefix="livemig-faults-state-"))
    argv += ["--state-dir", str(state_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    sig = signal.SIGTERM if cell.fault is Fault.ENGINE_SIGTERM else signal.SIGKILL

    def signal_engine() -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    world.signal_engine = signal_engine
    trigger = Trigger(world)
    final: dict[str, Any] | None = None
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.get_running_loop().create_task(proc.stderr.read())
    try:
        while line := await proc.stdout.readline():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = record.get("event")
            if kind == "phase":
                trigger.on_phase(str(record["phase"]))
            elif kind == "finished":
                final = record.get("report")
                trigger.on_finished(str((final or {}).get("status")))
        code = await proc.wait()
    finally:
        world.signal_engine = None
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = (await stderr_task).decode(errors="replace").strip()
    if err:
        world.note(f"engine stderr: {err.splitlines()[-1][:300]}")
    try:
        if final is None:
            if sig is signal.SIGKILL and world.injected:
                await _recover(world, state_dir, env)
            return EngineEnd("killed" if code < 0 else "error", code, err[-300:] or None)
        return EngineEnd(str(final.get("status")), code, final.get("error"), final)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


async def _recover(world: CellWorld, state_dir: Path, env: dict[str, str]) -> None:
    """`livemig recover --json` after the engine was killed: one running copy again."""
    argv = [sys.executable, "-m", "migrate.cli", "recover", "--json",
            "--state-dir", str(state_dir)]  # fmt: skip
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await within(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        world.recover = "`livemig recover` did not finish within 90 s"
        return
    wall = time.monotonic() - began
    try:
        data = json.loads(out)
        results = ", ".join(str(m.get("result")) for m in data.get("migrations", []))
        world.recover = (
            f"`livemig recover`: {results or 'nothing to do'} "
            f"({float(data.get('seconds', 0)) * 1e3:.0f} ms; {wall:.1f} s with the CLI start)"
        )
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        world.recover = f"`livemig recover` exited {proc.returncode}: {tail[0][:200]}"


async def runstate(vm: QemuProcess) -> str | None:
    """``vm``'s run state, or None if it is gone or does not answer."""
    if not vm.alive:
        return None
    try:
        return await vm.qmp.status(timeout=QMP_TIMEOUT_S)
    except QemuError:
        pass  # no session of ours (released), or it broke
    try:
        session = await QmpSession.connect(vm.site.qmp_socket, vm.role, QMP_TIMEOUT_S)
    except LivemigError:
        return None
    try:
        return await session.status(timeout=QMP_TIMEOUT_S)
    except QemuError:
        return None
    finally:
        await session.close()


def _leftover_processes(world: CellWorld) -> list[str]:
    """Processes in the lab's namespaces that are not its QEMUs, and agents below us."""
    live = {vm.pid for vm in (world.source, world.target) if vm.alive}
    found = []
    for ns in world.lab.namespaces:
        try:
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            ).stdout.split()
        except OSError:
            continue
        for pid in map(int, pids):
            if pid in live:
                continue
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                found.append(f"pid {pid} in {ns}: {' '.join(proc.cmdline())[:120]}")
    for proc in _agents():
        with contextlib.suppress(psutil.Error):
            line = f"agent pid {proc.pid}: {' '.join(proc.cmdline())[:120]}"
            if not any(line.split(":")[0].split()[-1] in f for f in found):
                found.append(line)
    return found


async def _observe(world: CellWorld, end: EngineEnd) -> dict[str, Any]:
    """Running copies, the running copy's memory check and leftovers after the engine."""
    await world.settle()
    for vm in (world.source, world.target):
        await vm.wait_exited(0.5)
    states = {vm.role: await runstate(vm) for vm in (world.source, world.target)}
    running = tuple(role for role, state in states.items() if state == "running")
    memory: bool | None = None
    check = "no running copy" if not running else ""
    if len(running) == 1:
        vm = world.source if running[0] == "source" else world.target
        since = world.console_mark if vm is world.source else 0
        check = await guest_check(vm, WORKLOAD, since)
        memory = check.startswith("ok")
        check = f"{vm.role}: {check}".replace(" on target", "")
    elif len(running) > 1:
        check = "two copies run"
    await asyncio.sleep(0.3)  # agents being reaped
    states_text = ", ".join(f"{role}: {state or 'gone'}" for role, state in states.items())
    world.note(f"after the engine: {states_text}")
    return {
        "running_on": running,
        "memory_intact": memory,
        "memory_check": check,
        "leftovers": _leftover_processes(world),
    }


def judge(
    cell: Cell,
    status: str,
    running_on: tuple[str, ...],
    memory_intact: bool | None,
    leftovers: tuple[str, ...],
    exit_code: int | None,
    error: str | None,
    vm_destroyed: bool,
    injected: bool,
    recover: str,
) -> tuple[str, ...]:
    """Why a cell's outcome is not OK (empty: OK)."""
    problems = []
    copies = len(running_on)
    error = error or ""
    if copies > 1:
        problems.append("more than one copy of the VM runs")
    if copies == 0 and not vm_destroyed:
        problems.append(
            "no copy runs although the fault destroyed none"
            + (f" (status {status}: the operator must decide; {recover})" if status in
               ("unknown", "killed") else "")
        )  # fmt: skip
    if copies == 1 and memory_intact is not True:
        problems.append("the running copy's memory check failed")
    if leftovers:
        problems.append(f"{len(leftovers)} process(es) left behind")
    after = cell.phase is FaultPhase.AFTER and injected
    if status == "completed" and "target" not in running_on and not (after and vm_destroyed):
        problems.append("status `completed` but the VM does not run on the target")
    if status in ("failed", "aborted") and "target" in running_on:
        problems.append(f"status `{status}` but the VM runs on the target")
    if (
        vm_destroyed and cell.fault is Fault.KILL_SOURCE and status in ("failed", "aborted")
        and copies == 0 and "lost" not in error
    ):  # fmt: skip
        problems.append("the source died and the VM is gone, but the report does not say lost")
    if status == "unknown" and "neither copy" not in error:
        problems.append("status `unknown` without saying what to do")
    expected = {
        "completed": {EXIT_OK},
        "failed": {EXIT_MIGRATION},
        "aborted": {EXIT_MIGRATION},
        "unknown": {EXIT_MIGRATION},
        "refused": {EXIT_PREFLIGHT},
        "error": {EXIT_ERROR},
    }.get(status, set())
    if cell.fault is Fault.ENGINE_SIGTERM and injected:
        expected = {128 + signal.SIGTERM}
    if cell.fault is Fault.ENGINE_SIGKILL and injected:
        expected = {-signal.SIGKILL}
    if exit_code not in expected:
        problems.append(f"exit code {exit_code} for status `{status}`")
    return tuple(problems)


def _vm_destroyed(world: CellWorld, end: EngineEnd) -> bool:
    """Whether the fault killed the QEMU that held the VM when it fired."""
    if not world.injected:
        return False
    cell = world.cell
    if cell.fault is Fault.KILL_SOURCE:
        # In post-copy (it fires only while pages still move) the source holds pages
        # the target lacks: killing it destroys the VM too.
        return cell.phase is not FaultPhase.AFTER
    if cell.fault is Fault.KILL_TARGET:
        return cell.phase in (FaultPhase.AFTER, FaultPhase.POSTCOPY)
    return False


def _recover_note(world: CellWorld) -> str:
    return world.recover


@contextlib.contextmanager
def _tiny_tmpfs(enabled: bool) -> Any:
    if not enabled:
        yield None
        return
    mount = Path(tempfile.mkdtemp(prefix="livemig-faults-tmpfs-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)


async def run_cell(cell: Cell, guest: GuestImage, accel: AccelChoice, log_dir: Path) -> CellResult:
    began = time.monotonic()
    log_dir.mkdir(parents=True, exist_ok=True)
    config = DemoConfig(workload=WORKLOAD, memory_mib=MEMORY_MIB, dirty_mib=DIRTY_MIB)
    with (
        Lab(bandwidth_mbit=LINK_MBIT) as lab,
        _tiny_tmpfs(cell.fault is Fault.TARGET_TMPFS_FULL) as tmpfs,
    ):
        spec = guest_spec(config, guest, accel, lab.next_guest_address())
        tap_a, tap_b = lab.add_tap(lab.host_a), lab.add_tap(lab.host_b)
        source = QemuProcess(
            spec, role="source", netns=lab.host_a.netns, taps={"net0": tap_a}, log_dir=log_dir
        )
        target_spec = dataclasses.replace(spec, ram_dir=tmpfs) if tmpfs is not None else spec
        async with source:
            await wait_workload_started(source, WORKLOAD)
            target = QemuProcess(
                target_spec, role="target", netns=lab.host_b.netns, taps={"net0": tap_b},
                incoming=True, paused=True, log_dir=log_dir,
            )  # fmt: skip
            async with target:
                world = CellWorld(cell, lab, source, target)
                if cell.fault is Fault.TARGET_TMPFS_FULL:
                    world.fire("setup")  # the condition holds from the start
                    world.note(f"target RAM file on a {TMPFS_MIB} MiB tmpfs")
                if cell.fault is Fault.LOST_CONT:
                    world.fire("setup")  # the proxy is in place from the start
                run = _run_subprocess if cell.in_subprocess else _run_in_process
                end = await run(world)
                world.console_mark = len(source.console.lines)
                seen = await _observe(world, end)
                ram_files = [vm.ram_path for vm in (source, target) if vm.ram_path is not None]
        leftovers = list(seen["leftovers"])
        leftovers += [f"RAM file {p}" for p in ram_files if p.exists()]
    if tmpfs is not None and os.path.ismount(tmpfs):
        leftovers.append(f"tmpfs still mounted at {tmpfs}")
    destroyed = _vm_destroyed(world, end)
    recover = _recover_note(world)
    problems = judge(
        cell, end.status, seen["running_on"], seen["memory_intact"], tuple(leftovers),
        end.exit_code, end.error, destroyed, world.injected, recover,
    )  # fmt: skip
    if not world.injected:
        world.note(f"the fault never fired: the migration ended before the {cell.phase} phase")
    return CellResult(
        fault=cell.fault.value,
        phase=cell.phase.value,
        strategy=cell.strategy,
        status=end.status,
        injected=world.injected,
        fired_in=world.fired_in,
        running_copies=len(seen["running_on"]),
        running_on=seen["running_on"],
        memory_intact=seen["memory_intact"],
        memory_check=seen["memory_check"],
        leftovers=tuple(leftovers),
        exit_code=end.exit_code,
        error=end.error,
        vm_destroyed=destroyed,
        recover=recover,
        problems=problems,
        duration_s=round(time.monotonic() - began, 1),
        notes=tuple(world.notes),
    )


# --- the suite --------------------------------------------------------------------------


class Listener(Protocol):
    def cell_started(self, index: int, total: int, cell: Cell) -> None: ...
    def cell_finished(self, index: int, total: int, result: CellResult) -> None: ...


@dataclass
class FaultResults:
    suite: str
    command: str
    started_at: float
    results: list[CellResult] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "suite": self.suite,
            "command": self.command,
            "started_at": self.started_at,
            "wall_s": round(self.wall_s, 1),
            "settings": {
                "workload": WORKLOAD.text,
                "memory_mib": MEMORY_MIB,
                "dirty_mib": DIRTY_MIB,
                "link_mbit": LINK_MBIT,
                "max_downtime_ms": MAX_DOWNTIME_MS,
                "qmp_timeout_s": QMP_TIMEOUT_S,
                "stall_timeout_s": STALL_TIMEOUT_S,
                "bulk_bytes": BULK_BYTES,
                "link_down_s": LINK_DOWN_S,
                "tmpfs_mib": TMPFS_MIB,
            },
            "cells": [r.to_dict() for r in self.results],
        }


def _failed_cell(cell: Cell, why: str, began: float) -> CellResult:
    return CellResult(
        fault=cell.fault.value, phase=cell.phase.value, strategy=cell.strategy,
        status="harness-error", injected=False, fired_in=None, running_copies=0, running_on=(),
        memory_intact=None, memory_check="", leftovers=(), exit_code=None, error=why,
        vm_destroyed=False, recover="n/a", problems=(f"the cell did not run: {why}",),
        duration_s=round(time.monotonic() - began, 1),
    )  # fmt: skip


async def run_fault_suite(
    suite: FaultSuite, out: Path, command: str = "", listener: Listener | None = None
) -> FaultResults:
    """Run every cell of ``suite``; results.json (after every cell) and report.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    guest = await asyncio.to_thread(ensure_guest)
    accel = await choose_accelerator(guest)
    results = FaultResults(suite.name, command, time.time())
    began = time.monotonic()
    total = len(suite.cells)
    for index, cell in enumerate(suite.cells):
        if listener is not None:
            listener.cell_started(index, total, cell)
        cell_began = time.monotonic()
        log_dir = out / "logs" / cell.name.replace("/", "-")
        try:
            result = await within(run_cell(cell, guest, accel, log_dir), CELL_TIMEOUT_S)
        except TimeoutError:
            result = _failed_cell(cell, f"hung (over {CELL_TIMEOUT_S:g} s)", cell_began)
        except LivemigError as exc:
            result = _failed_cell(cell, str(exc), cell_began)
        if result.outcome_ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        results.results.append(result)
        results.wall_s = time.monotonic() - began
        (out / "results.json").write_text(json.dumps(results.to_dict(), indent=1) + "\n")
        if listener is not None:
            listener.cell_finished(index, total, result)
    if (out / "logs").exists() and not any((out / "logs").iterdir()):
        (out / "logs").rmdir()
    write_report(results, out)
    return results


def _cell_text(result: CellResult) -> str:
    verdict = "ok" if result.outcome_ok else "**NOT OK**"
    where = "+".join(result.running_on) or "none"
    text = f"{result.status}, runs on {where}, exit {result.exit_code}: {verdict}"
    if not result.injected:
        text += " (fault not fired)"
    return text


def render_report(results: FaultResults) -> str:
    """report.md: the matrix (rows fault/phase, columns strategy) and every cell's detail."""
    strategies = sorted({r.strategy for r in results.results})
    rows: dict[tuple[str, str], dict[str, CellResult]] = {}
    for r in results.results:
        rows.setdefault((r.fault, r.phase), {})[r.strategy] = r
    ok = sum(r.outcome_ok for r in results.results)
    lines = [
        f"# Fault matrix: suite `{results.suite}`",
        "",
        f"{len(results.results)} cells, {ok} OK, {len(results.results) - ok} NOT OK; wall time "
        f"{results.wall_s / 60:.1f} min. Command: `{results.command}`.",
        "",
        f"Each cell: a fresh lab, {MEMORY_MIB} MiB guest running `{WORKLOAD.text}` "
        f"({DIRTY_MIB} MiB working set), migration link capped at {LINK_MBIT:g} Mbit/s, "
        f"policy livemig with max downtime {MAX_DOWNTIME_MS:g} ms, qmp_timeout_s "
        f"{QMP_TIMEOUT_S:g}, stall_timeout_s {STALL_TIMEOUT_S:g}. A cell is OK when at most "
        "one copy runs, exactly one unless the fault destroyed the copy holding the VM, the "
        "running copy's MEMDIRTY check passes, nothing is left behind, and status and exit "
        "code tell the truth (see `lab/faults.py`, `judge`).",
        "",
        "| fault | phase | " + " | ".join(strategies) + " |",
        "|---|---|" + "---|" * len(strategies),
    ]
    for (fault, phase), cells in rows.items():
        row = [_cell_text(cells[s]) if s in cells else "-" for s in strategies]
        lines.append(f"| {fault} | {phase} | " + " | ".join(row) + " |")
    lines += ["", "## Cells", ""]
    for r in results.results:
        lines.append(
            f"- **{r.fault}/{r.phase}/{r.strategy}** ({r.duration_s:g} s): status `{r.status}`, "
            f"fired in {r.fired_in or 'never'}, running copies {r.running_copies} "
            f"({'+'.join(r.running_on) or 'none'}), memory intact {r.memory_intact} "
            f"({r.memory_check}), exit {r.exit_code}, leftovers {len(r.leftovers)}"
            + (f", recover: {r.recover}" if r.recover != "n/a" else "")
        )
        if r.problems:
            lines.append(f"  - NOT OK: {'; '.join(r.problems)}")
        if r.error:
            lines.append(f"  - error: {r.error[:400]}")
        for note in r.notes:
            lines.append(f"  - {note}")
        for item in r.leftovers:
            lines.append(f"  - left behind: {item}")
    return "\n".join(lines) + "\n"


def write_report(results: FaultResults, out: Path) -> Path:
    path = out / "report.md"
    path.write_text(render_report(results))
    return path


def suite_named(name: str) -> FaultSuite:
    try:
        return SUITES[name]
    except KeyError:
        raise LivemigError(f"unknown fault suite {name!r} (known: {', '.join(SUITES)})") from None


class _PrintListener:
    def cell_started(self, index: int, total: int, cell: Cell) -> None:
        print(f"[{index + 1}/{total}] {cell.name} ...", file=sys.stderr, flush=True)

    def cell_finished(self, index: int, total: int, result: CellResult) -> None:
        verdict = "ok" if result.outcome_ok else "NOT OK: " + "; ".join(result.problems)
        print(
            f"[{index + 1}/{total}] {result.fault}/{result.phase}/{result.strategy}: "
            f"{result.status}, runs on {'+'.join(result.running_on) or 'none'} "
            f"({result.duration_s:g} s): {verdict}",
            file=sys.stderr,
            flush=True,
        )


def main_run(suite_name: str, out: Path, command: str) -> int:
    """``livemig bench run --suite faults...``: 0 when every cell is OK, 4 otherwise."""
    suite = suite_named(suite_name)
    results = asyncio.run(run_fault_suite(suite, out, command, _PrintListener()))
    bad = [r for r in results.results if not r.outcome_ok]
    print(
        f"{len(results.results)} cells, {len(bad)} NOT OK, {results.wall_s / 60:.1f} min; "
        f"wrote {out / 'results.json'}, {out / 'report.md'}",
        file=sys.stderr,
    )
    return EXIT_OK if not bad else EXIT_MIGRATION


__all__ = [
    "SUITES",
    "Cell",
    "CellResult",
    "Fault",
    "FaultPhase",
    "FaultResults",
    "FaultSuite",
    "QmpProxy",
    "judge",
    "main_run",
    "render_report",
    "run_cell",
    "run_fault_suite",
]
