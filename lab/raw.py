"""Peers as their users get them: QEMU's own switchover, driven over plain QMP.

livemig's benchmark also runs the peers' presets inside livemig's engine (its RAM
check before ``cont``, its ``-S`` target); that measures their *settings and
schedules*, not what a QEMU, Proxmox, Nova or oVirt user gets. Here each peer runs
as its management layer runs QEMU, and nothing of livemig's engine is involved:

- the peer's capabilities on the side it sets them, its parameters (the preset's
  controller's start decisions, :mod:`migrate.presets`), then ``migrate``;
- its own loop: ``query-migrate`` when the peer polls (the controller's
  :attr:`~migrate.control.base.PeerPollLoop.next_poll_ms`), each poll fed to the
  controller of :mod:`migrate.control` that reproduces the peer's code, and the
  decisions' QMP ``command``/``arguments`` sent to their ``side`` as they are;
  an abort is ``migrate_cancel``;
- QEMU's own switchover, and the target resumed the way the peer resumes it
  (:class:`Resume`); no RAM check, no repair, no announce tweak;
- the source QEMU quits once the VM runs on the target.

Between the peer's polls the driver samples ``query-migrate`` every
``observe_interval_s`` for the report's timeline (like the engine's samples); those
samples are not shown to the peer. The ``events`` capability is switched on on both
sides so that QEMU's MIGRATION events time the switchover; it changes nothing in
how QEMU migrates (libvirt sets it too).

The peers (:data:`RAW_PEERS`), with the code they follow:

- ``raw:qemu-default`` — plain QEMU: nobody sets anything or steers; the target is
  started without ``-S``, so QEMU starts the VM itself when the incoming migration
  completes (``process_incoming_migration_bh``, migration/migration.c).
- ``raw:proxmox`` — qemu-server: the target runs with ``-incoming ... -S``
  (``PVE::QemuServer::StateFile::statefile_cmdline_option``); ``set_migration_caps``
  sets auto-converge and xbzrle on the source only; ``PVE/QemuMigrate.pm``
  ``phase2`` sets the parameters, polls (1 s, then 100 ms) until it sees
  ``completed``, and only then ``phase3_cleanup`` moves the config and sends
  ``resume`` to the target: the target is resumed at the poll that saw the source
  complete (here without the config move and the SSH tunnel's round trip, so a lower
  bound of Proxmox's downtime).
- ``raw:nova``, ``raw:ovirt-minimal-downtime`` — libvirt: the target is started
  paused (``qemuMigrationDstPrepare``: ``VIR_QEMU_PROCESS_START_PAUSED``) and
  resumed in the Finish phase once the incoming migration completed
  (``qemuMigrationDstFinish``); ``qemuMigrationParamsAlwaysOn`` sets
  ``pause-before-switchover`` on the source (answered by ``migrate-continue`` when
  the ``pre-switchover`` event arrives) and ``late-block-activate`` on the target;
  auto-converge (oVirt) is a source capability (``qemuMigrationParamsFlagMap``).
  Nova's and vdsm's monitors poll the job (0.5 s, 10 s) and change the downtime as
  their controllers say. Resuming at the target's completion event leaves out
  libvirt's Finish RPC: a lower bound again.

Settings the presets chose stand (e.g. oVirt's bandwidth: QEMU's default cap), so a
raw peer differs from its emulated preset only in how it is driven.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from lab.demo import DemoConfig, DemoHooks, DemoResult, LabPair, run_in_lab
from migrate.control.base import ControlContext, Controller, PeerPollLoop
from migrate.control.intents import Abort
from migrate.errors import ConfigError, QemuError
from migrate.events import DecisionMade, EventBus, Finished, PhaseChanged, Progress
from migrate.phase import Phase, PhaseTracker
from migrate.policy import Policy
from migrate.presets import controller_for, preset
from migrate.qmp import EventRecorder, QmpEvent, QmpSession, migration_status_is
from migrate.report import (
    Decision,
    Integrity,
    MigrationReport,
    Outcome,
    Sample,
    Status,
    Timeline,
    offset_ms,
)

RAW_PREFIX = "raw:"
_TERMINAL = frozenset({"completed", "failed", "cancelled"})


class Resume(StrEnum):
    """How the VM comes to run on the target."""

    #: Target without ``-S``: QEMU starts the VM when the incoming migration completes.
    AUTOSTART = "autostart"
    #: Target with ``-S``; ``cont`` once the peer's own poll saw the source complete.
    AT_POLL = "at-poll"
    #: Target with ``-S``; ``cont`` as soon as QEMU's events say the target completed.
    ON_EVENT = "on-event"

    @property
    def target_paused(self) -> bool:
        """Whether the target QEMU starts with ``-S``."""
        return self is not Resume.AUTOSTART


@dataclass(frozen=True)
class RawPeer:
    """A peer as its users run it: the preset for its settings and schedule, and what
    its management layer adds (``resume``, extra capabilities per side).

    ``steered`` false: nobody sets parameters or polls (plain QEMU). The preset's
    capabilities go to the source (where Proxmox and libvirt set them).
    """

    name: str
    preset: str
    resume: Resume
    steered: bool = True
    manager_source_capabilities: tuple[tuple[str, bool], ...] = ()
    manager_target_capabilities: tuple[tuple[str, bool], ...] = ()
    follows: str = ""

    @property
    def policy(self) -> Policy:
        return preset(self.preset)

    def source_capabilities(self) -> dict[str, bool]:
        return {**dict(self.policy.capabilities), **dict(self.manager_source_capabilities)}

    def target_capabilities(self) -> dict[str, bool]:
        return dict(self.manager_target_capabilities)

    @property
    def continues_at_pre_switchover(self) -> bool:
        """The source pauses before switchover and the peer answers ``migrate-continue``."""
        return self.source_capabilities().get("pause-before-switchover", False)


_LIBVIRT_SOURCE = (("pause-before-switchover", True),)
_LIBVIRT_TARGET = (("late-block-activate", True),)

RAW_PEERS: dict[str, RawPeer] = {
    peer.preset: peer
    for peer in (
        RawPeer(
            "raw:qemu-default",
            "qemu-default",
            Resume.AUTOSTART,
            steered=False,
            follows="QEMU 7.2 migration/migration.c (defaults, autostart)",
        ),
        RawPeer(
            "raw:proxmox",
            "proxmox",
            Resume.AT_POLL,
            follows="qemu-server PVE/QemuMigrate.pm phase2/phase3_cleanup, "
            "PVE/QemuServer/StateFile.pm",
        ),
        RawPeer(
            "raw:nova",
            "nova",
            Resume.ON_EVENT,
            manager_source_capabilities=_LIBVIRT_SOURCE,
            manager_target_capabilities=_LIBVIRT_TARGET,
            follows="nova/virt/libvirt/driver.py _live_migration_monitor; libvirt "
            "src/qemu/qemu_migration.c, qemu_migration_params.c",
        ),
        RawPeer(
            "raw:ovirt-minimal-downtime",
            "ovirt-minimal-downtime",
            Resume.ON_EVENT,
            manager_source_capabilities=_LIBVIRT_SOURCE,
            manager_target_capabilities=_LIBVIRT_TARGET,
            follows="vdsm lib/vdsm/virt/migration.py MonitorThread; libvirt "
            "src/qemu/qemu_migration.c, qemu_migration_params.c",
        ),
    )
}


def raw_peer(name: str) -> RawPeer:
    """The raw peer for preset ``name`` (``proxmox``) or its own name
    (``raw:proxmox``). Raises :class:`ConfigError` listing the known ones."""
    peer = RAW_PEERS.get(name.removeprefix(RAW_PREFIX))
    if peer is None:
        known = ", ".join(p.name for p in RAW_PEERS.values())
        raise ConfigError(f"no raw peer {name!r} (known: {known})")
    return peer


class RawPeerRun:
    """One migration driven the way ``peer`` drives it; :meth:`run` returns the report.

    ``controller`` replaces the preset's (tests). ``events`` receives the same event
    kinds the engine emits (phase, progress, decisions, finished) so observers of
    either work unchanged. ``timeout_s`` bounds the migration (then
    ``migrate_cancel``); QEMU's own errors end it as failed.
    """

    def __init__(
        self,
        peer: RawPeer,
        source: QmpSession,
        target: QmpSession,
        migration_uri: str,
        *,
        events: EventBus | None = None,
        controller: Controller | None = None,
        observe_interval_s: float = 0.1,
        timeout_s: float = 300.0,
        vm: str = "vm",
        source_name: str = "source",
        target_name: str = "target",
    ) -> None:
        self.peer = peer
        self.source = source
        self.target = target
        self.migration_uri = migration_uri
        self.events = events if events is not None else EventBus()
        self.controller = controller
        if controller is None and peer.steered:
            self.controller = controller_for(peer.policy)
        self.observe_interval_s = observe_interval_s
        self.timeout_s = timeout_s
        self.vm = vm
        self.source_name = source_name
        self.target_name = target_name
        self.samples: list[Sample] = []
        self.decisions: list[Decision] = []
        self.final_info: dict[str, Any] = {}
        self._phase = PhaseTracker(
            lambda previous, phase: self.events.emit(PhaseChanged(time.time(), previous, phase))
        )
        self.started_at = time.time()
        self.t0 = time.monotonic()
        self.ram_bytes = 0
        self._continued = False
        self._abort_reason: str | None = None
        self._last_poll_ms = -1.0

    # -- the run ---------------------------------------------------------------------

    async def run(self) -> MigrationReport:
        """Migrate; the report whatever the outcome. Raises :class:`ConfigError` if the
        source runs no VM or the target does not wait for one (nothing started)."""
        if (status := await self.source.status()) != "running":
            raise ConfigError(f"source VM is not running (its state is {status!r})")
        if (status := await self.target.status()) != "inmigrate":
            raise ConfigError(f"target QEMU is not waiting for a migration ({status!r})")
        size = await self.source.execute("query-memory-size-summary")
        self.ram_bytes = int(size["base-memory"])
        async with EventRecorder(self.source) as src_log, EventRecorder(self.target) as tgt_log:
            error: str | None = None
            try:
                await self._set_up()
                await self._migrate(src_log, tgt_log)
            except (QemuError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
                await asyncio.shield(self._cancel_quietly())
            except BaseException:
                await asyncio.shield(self._cancel_quietly())
                self._advance(Phase.ABORTED)
                self.events.emit(Finished(self._report(src_log, tgt_log, "cancelled")))
                raise
            if error is not None and not self.phase.terminal:
                self._advance(Phase.FAILED)
            report = self._report(src_log, tgt_log, error)
        self.events.emit(Finished(report))
        return report

    async def _set_up(self) -> None:
        await self._capabilities(self.source, {"events": True, **self.peer.source_capabilities()})
        await self._capabilities(self.target, {"events": True, **self.peer.target_capabilities()})
        if self.controller is not None:
            context = ControlContext(ram_bytes=self.ram_bytes, started_monotonic=time.monotonic())
            for decision in self.controller.start(context):
                await self._carry_out(decision)
        await self.target.execute("migrate-incoming", {"uri": self.migration_uri})

    async def _capabilities(self, session: QmpSession, capabilities: dict[str, bool]) -> None:
        caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
        await session.execute("migrate-set-capabilities", {"capabilities": caps})

    async def _migrate(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        self.started_at, self.t0 = time.time(), time.monotonic()
        self._advance(Phase.PRECOPY)
        await self.source.execute("migrate", {"uri": self.migration_uri})
        status, polled = await self._follow(src_log)
        if status != "completed":
            self.final_info = await self._final_info()
            reason = (
                self._abort_reason
                or self.final_info.get("error-desc")
                or f"QEMU reported status {status}"
            )
            self._advance(Phase.ABORTED if self._abort_reason else Phase.FAILED)
            raise _Ended(str(reason))
        self._advance(Phase.SWITCHOVER)
        await self._resume_target(tgt_log, polled)
        self._advance(Phase.COMPLETED)
        self.final_info = await self._final_info()
        with contextlib.suppress(QemuError):  # QEMU closes QMP while answering quit
            await self.source.execute("quit")

    async def _follow(self, src_log: EventRecorder) -> tuple[str, bool]:
        """Until a terminal status: QEMU's events at once, the peer's polls on time,
        observation samples in between. Returns the status and whether the peer's own
        poll saw it."""
        seen = 0
        next_observation = 0.0
        deadline = self.t0 + self.timeout_s
        while True:
            for event in src_log.events[seen:]:
                seen += 1
                if event.name == "MIGRATION":
                    status = str(event.data.get("status"))
                    await self._on_status(status)
                    if status in _TERMINAL:
                        return status, False
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"the migration did not end within {self.timeout_s:.0f} s")
            elapsed_ms = (now - self.t0) * 1e3
            peer_due = self._peer_due_ms()
            due_ms = min(next_observation, float("inf") if peer_due is None else peer_due)
            if elapsed_ms >= due_ms:
                sample, polled = await self._sample(peer_due)
                next_observation = sample.elapsed_ms + self.observe_interval_s * 1e3
                await self._on_status(sample.status)
                if sample.status in _TERMINAL:
                    return sample.status, polled
                continue
            await src_log.wait_any((due_ms - elapsed_ms) / 1e3, since=seen)

    def _peer_due_ms(self) -> float | None:
        """When the peer looks next (ms after ``migrate``), never before its last look;
        infinity if nobody steers, None if the controller sees every sample (it has no
        poll loop of its own)."""
        controller = self.controller
        if controller is None:
            return float("inf")
        if not isinstance(controller, PeerPollLoop):
            return None
        due = controller.next_poll_ms
        if due <= self._last_poll_ms:
            return self._last_poll_ms + self.observe_interval_s * 1e3
        return due

    async def _sample(self, peer_due_ms: float | None) -> tuple[Sample, bool]:
        info: dict[str, Any] = await self.source.execute("query-migrate")
        sample = Sample.from_query_migrate(info, time.time(), (time.monotonic() - self.t0) * 1e3)
        self.samples.append(sample)
        self.events.emit(Progress(sample))
        if sample.cpu_throttle_pct > 0 and self.phase is Phase.PRECOPY:
            self._advance(Phase.THROTTLING)
        polled = self.controller is not None and (
            peer_due_ms is None or sample.elapsed_ms >= peer_due_ms
        )
        if polled and self.controller is not None:
            self._last_poll_ms = sample.elapsed_ms
            for decision in self.controller.on_sample(sample):
                await self._carry_out(decision)
        return sample, polled

    async def _on_status(self, status: str) -> None:
        waiting = status == "pre-switchover" and self.peer.continues_at_pre_switchover
        if waiting and not self._continued:
            self._continued = True
            await self.source.execute("migrate-continue", {"state": "pre-switchover"})

    async def _carry_out(self, decision: Decision) -> None:
        """Send the decision's QMP command as the peer does; an abort cancels."""
        if decision.has(Abort):
            self._record(decision.settled(Outcome.APPLIED))
            self._abort_reason = decision.reason
            await self.source.execute("migrate_cancel")
            return
        if decision.command is None:
            self._record(decision.settled(Outcome.REJECTED, "no QMP command for it"))
            return
        sessions = {"target": (self.target,), "both": (self.source, self.target)}.get(
            decision.side, (self.source,)
        )
        try:
            for session in sessions:
                await session.execute(decision.command, decision.arguments or None)
        except QemuError as exc:
            # The peers log a refused setting and go on (Proxmox's eval); so do we.
            self._record(decision.settled(Outcome.FAILED, str(exc)))
            return
        self._record(decision.settled(Outcome.APPLIED))

    def _record(self, decision: Decision) -> None:
        self.decisions.append(decision)
        self.events.emit(DecisionMade(decision))

    async def _resume_target(self, tgt_log: EventRecorder, polled: bool) -> None:
        """The source completed: the VM runs on the target the peer's way."""
        resume = self.peer.resume
        if resume is Resume.AT_POLL and self.controller is not None and not polled:
            # The peer learns of the completion at its next poll, not before.
            due = self._peer_due_ms()
            if due is not None:
                delay = due / 1e3 - (time.monotonic() - self.t0)
                if delay > 0:
                    await asyncio.sleep(delay)
            await self._sample(due)
        elif resume is Resume.ON_EVENT:
            done = await _wait_target(tgt_log, "MIGRATION", 30.0)
            if done.data.get("status") != "completed":
                raise QemuError(f"the target's incoming migration {done.data.get('status')}")
        if resume is not Resume.AUTOSTART:
            await self.target.execute("cont")
        await _wait_target(tgt_log, "RESUME", 30.0)

    async def _final_info(self) -> dict[str, Any]:
        """QEMU's final figures, recorded as the last sample (observers read the
        source's CPU time at it, before the source quits); not shown to the peer."""
        with contextlib.suppress(QemuError):
            info: dict[str, Any] = await self.source.execute("query-migrate")
            elapsed_ms = (time.monotonic() - self.t0) * 1e3
            sample = Sample.from_query_migrate(info, time.time(), elapsed_ms)
            self.samples.append(sample)
            self.events.emit(Progress(sample))
            return info
        return self.final_info

    async def _cancel_quietly(self) -> None:
        if self.phase in (Phase.PRECOPY, Phase.THROTTLING):
            with contextlib.suppress(QemuError):
                await self.source.execute("migrate_cancel")

    @property
    def phase(self) -> Phase:
        return self._phase.phase

    def _advance(self, phase: Phase) -> None:
        if not self.phase.terminal:
            self._phase.advance(phase)

    # -- the report --------------------------------------------------------------------

    def _report(
        self, src_log: EventRecorder, tgt_log: EventRecorder, error: str | None
    ) -> MigrationReport:
        at = self.started_at
        stop = src_log.find("STOP")
        src_done = src_log.find("MIGRATION", migration_status_is("completed"))
        tgt_done = tgt_log.find("MIGRATION", migration_status_is("completed"))
        resume = tgt_log.find("RESUME")
        timeline = Timeline(
            started_at=at,
            source_stop_ms=offset_ms(at, stop.timestamp if stop else None),
            source_completed_ms=offset_ms(at, src_done.timestamp if src_done else None),
            target_completed_ms=offset_ms(at, tgt_done.timestamp if tgt_done else None),
            target_resume_ms=offset_ms(at, resume.timestamp if resume else None),
            ended_ms=(time.time() - at) * 1e3,
        )
        status = {Phase.COMPLETED: Status.COMPLETED, Phase.ABORTED: Status.ABORTED}.get(
            self.phase, Status.FAILED
        )
        info, ram = self.final_info, self.final_info.get("ram") or {}
        total_ms = timeline.target_resume_ms
        return MigrationReport(
            status=status,
            strategy="raw",
            mode="live",
            vm=self.vm,
            source=self.source_name,
            target=self.target_name,
            policy=self.peer.name,
            phase=self.phase,
            total_time_ms=total_ms if total_ms is not None else timeline.ended_ms,
            ram_bytes=self.ram_bytes,
            timeline=timeline,
            downtime_ms=_figure(info.get("downtime")),
            qemu_total_time_ms=_figure(info.get("total-time")),
            setup_time_ms=_figure(info.get("setup-time")),
            transferred_bytes=int(ram.get("transferred", 0)),
            precopy_rounds=int(ram.get("dirty-sync-count", 0)),
            integrity=Integrity.UNCHECKED,
            integrity_detail=(
                f"not compared: {self.peer.name} runs QEMU's own switchover without a RAM "
                "check (see the guest's own check)"
            ),
            samples=tuple(self.samples),
            decisions=tuple(self.decisions),
            error=error,
        )


class _Ended(QemuError):
    """QEMU ended the migration other than completed (phase already set)."""


async def _wait_target(log: EventRecorder, name: str, timeout: float) -> QmpEvent:
    """The target's first ``name`` event (MIGRATION: a terminal one); QemuError if the
    target's migration failed or nothing came within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if name == "RESUME" and (event := log.find("RESUME")) is not None:
            return event
        ended = log.find("MIGRATION", migration_status_is(*_TERMINAL))
        if ended is not None and (name == "MIGRATION" or ended.data.get("status") != "completed"):
            if name == "RESUME":
                raise QemuError(f"the target's incoming migration {ended.data.get('status')}")
            return ended
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QemuError(f"no {name} event from the target within {timeout:.0f} s")
        await log.wait_any(remaining, since=len(log.events))


def _figure(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


async def run_raw_demo(
    config: DemoConfig,
    peer: RawPeer,
    events: EventBus | None = None,
    hooks: DemoHooks | None = None,
) -> DemoResult:
    """:func:`lab.demo.run_demo` with ``peer`` migrating instead of livemig's engine:
    the same lab, guest, probe and guest check; the target started as the peer starts
    it. ``config.policy`` and ``config.strategy`` are not used (the peer's preset is).
    ``hooks.before_target_resume`` is not called: nothing of livemig's may sit in
    the peer's downtime. Raises :class:`~migrate.errors.LivemigError` subclasses for
    set-up failures."""
    hooks = hooks or DemoHooks()

    async def migrate(pair: LabPair) -> MigrationReport:
        run = RawPeerRun(
            peer,
            pair.source.qmp,
            pair.target.qmp,
            pair.migration_uri,
            events=events,
            vm=pair.spec.name,
            source_name=f"host-a ({pair.lab.host_a.netns})",
            target_name=f"host-b ({pair.lab.host_b.netns})",
        )
        task = asyncio.create_task(run.run(), name=f"{peer.name} migration")
        try:
            if hooks.after_migration_started is not None:
                await hooks.after_migration_started(pair.source, pair.target)
            return await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    return await run_in_lab(config, migrate, hooks, target_paused=peer.resume.target_paused)


__all__ = ["RAW_PEERS", "RAW_PREFIX", "RawPeer", "RawPeerRun", "Resume", "raw_peer", "run_raw_demo"]
