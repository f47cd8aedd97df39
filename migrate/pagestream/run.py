"""One pagestream migration: :class:`~migrate.strategy.StrategyRun`'s hooks, filled in.

set-up: the agents on both hosts; transfer: sweeps until the planner says the
dirty set fits the downtime limit; switchover: stop, QEMU's non-shared RAM, the
final sweep and QEMU's device state, then the stream's digest before ``cont``.
See :mod:`migrate.pagestream.strategy`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any, Final

from dirtytrack.ram import PAGE_SIZE
from migrate.control.base import UNLIMITED_BANDWIDTH, Controller
from migrate.control.intents import (
    AnnounceEarly,
    ArmAutoConverge,
    ArmPostcopy,
    CapBandwidth,
    Compress,
    Intent,
    SetDowntimeLimit,
    SetMultifd,
    SetXbzrleCache,
    StartPostcopy,
    Switchover,
    SwitchoverNow,
    Throttle,
)
from migrate.errors import MigrationError, QemuError, StreamError
from migrate.events import DecisionMade, EventBus, Progress
from migrate.integrity import RamComparison
from migrate.pagestream.control import AgentChannel, AgentProcess, AgentRole
from migrate.pagestream.options import PagestreamOptions
from migrate.pagestream.planner import SwitchoverPlanner
from migrate.pagestream.totals import StreamTotals
from migrate.pagestream.verifier import StreamVerifier
from migrate.qmp import EventRecorder, QmpSession, migration_status_is
from migrate.remoteram import RemoteRamComparison
from migrate.report import Decision, MigrationReport, Outcome, Sample
from migrate.request import MigrationRequest
from migrate.safety import finish_on_target
from migrate.strategy import StartState, StrategyRun, send_to_qemu
from migrate.tls import NodeCredentials

#: xxh3 chunk digests of RAM, bytes/s on one core here (~9 ms per 256 MiB).
DIGEST_BYTES_PER_S: Final = 25e9
#: How long a sender error waits for the receiver to report the cause (seconds).
_PEER_REPORT_S: Final = 2.0
#: Commands that only make sense for QEMU's RAM stream, which pagestream replaces.


def _tls_args(creds: NodeCredentials) -> dict[str, str]:
    return {"ca": str(creds.ca), "cert": str(creds.cert), "key": str(creds.key)}


class PagestreamRun(StrategyRun):
    def __init__(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        controller: Controller,
        events: EventBus,
        start: StartState,
        options: PagestreamOptions,
        source_ram: Path,
        target_ram: Path,
        host: str,
    ) -> None:
        super().__init__(request, source, target, controller, events, start)
        self.options = options
        self.source_ram = source_ram
        self.target_ram = target_ram
        self.host = host
        self.sender: AgentProcess | None = None
        self.receiver: AgentChannel | None = None
        self.verifier: StreamVerifier | None = None
        self.totals = StreamTotals()
        self.ram_pages = start.ram_bytes // PAGE_SIZE
        self.tracker = ""
        self.tracker_reason = ""
        policy = request.policy
        self.max_downtime_ms = policy.max_downtime_ms
        self.downtime_limit_ms = min(policy.downtime_limit_ms, policy.max_downtime_ms)
        self.rate_limit: float | None = None
        self.switch_now = False
        self.rate_limit_sent: float | None = None
        # The digests before cont read all of RAM once (in parallel on both hosts).
        verify_ms = start.ram_bytes / DIGEST_BYTES_PER_S * 1e3
        self.planner = SwitchoverPlanner(fixed_downtime_ms=options.fixed_downtime_ms + verify_ms)
        self.marks: dict[str, float] = {}  # switchover steps, realtime seconds

    async def _stop_data_plane(self) -> None:
        for agent in (self.sender, self.receiver):
            if agent is not None:
                await agent.close()

    # --- set-up -------------------------------------------------------------------------

    def _capabilities(self) -> dict[str, bool]:
        # QEMU's stream skips shared RAM (the policy's capabilities are for that stream).
        return {"x-ignore-shared": True}

    def _source_capabilities(self) -> dict[str, bool]:
        # The source stops short of device state until pagestream's final round is in.
        return {"pause-before-switchover": True}

    async def _setup(self) -> None:
        if self.request.verify and self.options.engine_compare:
            remote = self.request.target_ram
            self.comparison = (
                RamComparison(self.source_ram, self.target_ram)
                if remote is None
                else RemoteRamComparison(self.source_ram, remote)
            )
            self.comparison.prepare()
        await self._start_agents()

    async def _start_agents(self) -> None:
        options, request = self.options, self.request
        session = base64.b64encode(secrets.token_bytes(16)).decode()
        log_dir = options.log_dir
        if request.target_receiver is not None:
            # The target host's agent starts the receiver and names its RAM file,
            # address and credentials; the engine asks only for the stream.
            self.receiver = request.target_receiver()
            listen_args: dict[str, Any] = {"session": session, "tls": request.tls is not None}
        else:
            self.receiver = AgentProcess(
                AgentRole.RECEIVER,
                request.target.netns,
                log_dir / "pagestream-receiver.log" if log_dir else None,
                module=options.agent_module,
            )
            listen_args = {
                "ram_path": str(self.target_ram),
                "host": self.host,
                "port": 0,
                "session": session,
                "tls": _tls_args(request.tls.stream_server()) if request.tls else None,
                "peer_name": request.tls.source_name if request.tls else None,
            }
        self.sender = AgentProcess(
            AgentRole.SENDER,
            request.source.netns,
            log_dir / "pagestream-sender.log" if log_dir else None,
            module=options.agent_module,
        )
        await self.receiver.start()
        await self.sender.start()
        listen = await self.receiver.call("listen", listen_args, timeout=options.setup_timeout_s)
        args: dict[str, Any] = {
            "ram_path": str(self.source_ram),
            "host": self.host,
            "port": int(listen["port"]),
            "session": session,
            "max_threads": options.max_threads,
            "start_level": options.start_level,
            "rate_limit_bytes_per_s": self.rate_limit,
        }
        tls = request.tls
        if tls is not None:
            args["tls"] = _tls_args(tls.stream_client())
            args["tls_hostname"] = tls.hostname or self.host
        if options.tracker is not None:
            args["tracker"] = [kind.value for kind in options.tracker]
        if options.batch_pages is not None:
            args["batch_pages"] = options.batch_pages
        opened = await self._sender_call("open", args, timeout=options.setup_timeout_s)
        self.rate_limit_sent = self.rate_limit
        self.tracker = str(opened["tracker"])
        self.tracker_reason = str(opened["tracker_reason"])
        self.events.notice(f"pagestream: {self.tracker_reason}")

    # --- transfer -----------------------------------------------------------------------

    async def _transfer(self, src_log: EventRecorder) -> None:
        """Sweep rounds until the planner's verdict is to switch over."""
        if self.running:
            # Before the bulk sweep: all of RAM is still to go (controllers skip this).
            self._emit_sample("setup", self.ram_pages, 0.0, None, 0)
        while self.running:
            args: dict[str, Any] = {}
            if self.rate_limit != self.rate_limit_sent:
                args["rate_limit_bytes_per_s"] = self.rate_limit
                self.rate_limit_sent = self.rate_limit
            await self._check_target()
            stats = await self._sender_call("sweep", args)
            self.totals.add_round(stats, self.ram_pages)
            found, scan_s = int(stats["pages"]), float(stats["scan_s"])
            self.planner.record_round(found, float(stats["compress_wait_s"] + stats["send_wait_s"]))
            # What the next sweep will find is estimated by what this one found.
            sample = self._emit_sample(
                "active", found, scan_s, stats.get("dirty_pages_per_s"), self.totals.rounds
            )
            for decision in self.controller.on_sample(sample):
                await self._apply(decision, src_log)
            if self.switch_now:
                self._record_switch("operator asked to switch over now")
                return
            verdict = self.planner.decide(
                found, scan_s, self.downtime_limit_ms, self.max_downtime_ms
            )
            if verdict.switch:
                self._record_switch(verdict.reason)
                return

    async def _check_target(self) -> None:
        """Raise :class:`MigrationError` unless the target QEMU still waits for the VM.

        pagestream's pages go to the target's RAM file, not to its QEMU, so a
        target QEMU that died would otherwise go unnoticed until the switchover.
        """
        try:
            status = await self.target.status(timeout=min(self.target.timeout_s, 2.0))
        except QemuError as exc:
            raise MigrationError(f"the target QEMU does not answer: {exc}") from exc
        if status != "inmigrate":
            raise MigrationError(f"the target QEMU is no longer waiting for the VM ({status})")

    def _record_switch(self, reason: str) -> None:
        decision = Decision(time.time(), f"pagestream: {reason}", (Switchover(),), Outcome.APPLIED)
        self.decisions.append(decision)
        self.events.emit(DecisionMade(decision))

    # --- switchover ---------------------------------------------------------------------

    async def _switchover(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        assert self.sender is not None and self.receiver is not None
        request, source = self.request, self.source
        timeout = self.options.switchover_timeout_s
        # The target must still wait for the VM before the source stops.
        await self._check_target()
        # Stopped by us, not by QEMU: QEMU sends the runstate it finds at completion,
        # so a target started without -S stays paused too, until the checks hold.
        if self.running:
            await source.execute("stop")
            self.running = False
        # QEMU's stream (x-ignore-shared: ~450 KB of BIOS/ROM blocks) crosses the link
        # while the final scan runs, then waits before device state.
        self.marks["migrate"] = time.time()
        await source.execute("migrate", {"uri": request.migration_uri})
        final_task = asyncio.create_task(self._sender_call("final", timeout=timeout))
        applied_task = asyncio.create_task(self.receiver.wait_event("applied", timeout))
        paused_task = asyncio.create_task(
            src_log.wait_for(
                "MIGRATION",
                migration_status_is("pre-switchover", "completed", "failed", "cancelled"),
                timeout,
            )
        )
        tasks: tuple[asyncio.Task[Any], ...] = (final_task, applied_task, paused_task)
        try:
            pending: set[asyncio.Task[Any]] = {applied_task, paused_task}
            while pending:
                finished, _ = await asyncio.wait(
                    {*pending, final_task}, return_when=asyncio.FIRST_COMPLETED
                )
                if final_task in finished and final_task.exception() is not None:
                    await final_task  # raises the sender's error
                pending -= finished
            paused = await paused_task
            if paused is None or paused.data.get("status") != "pre-switchover":
                info = await source.execute("query-migrate")
                raise MigrationError(
                    str(info.get("error-desc") or f"QEMU's migration ended "
                        f"{info.get('status')!r} before device state")
                )  # fmt: skip
            self.marks["pre_switchover"] = paused.timestamp
            applied = await applied_task
            self.marks["applied"] = float(applied["time"])
            if self.comparison is not None:
                # Not earlier: the source digest would compete with the final scan.
                self.comparison.source_stopped()
            # Every page is in target RAM: QEMU may load device state (virtio reads rings).
            await self.disks.finish_at_switchover()
            self.marks["continue"] = time.time()
            await source.execute("migrate-continue", {"state": "pre-switchover"})
            final = await final_task
            self.marks["final_reply"] = time.time()
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StreamError):
                        await task
        stats = final["round"]
        self.totals.add_final_round(stats, self.ram_pages)
        self._emit_sample(
            "device", int(stats["pages"]), float(stats["scan_s"]), None, self.totals.rounds
        )
        done = await src_log.wait_for(
            "MIGRATION", migration_status_is("completed", "failed", "cancelled"), timeout
        )
        self.final_info = await source.execute("query-migrate")
        if done is None or self.final_info.get("status") != "completed":
            reason = self.final_info.get("error-desc") or (
                f"QEMU's device-state migration ended {self.final_info.get('status')!r}"
            )
            raise MigrationError(str(reason))
        self.verifier = StreamVerifier(
            self.receiver, self.comparison, (self.source_ram, self.target_ram), timeout
        )
        try:
            await finish_on_target(
                self.switchover, self.target, tgt_log, self.verifier, request.hooks,
                request.repair, timeout, disks=self.disks,
            )  # fmt: skip
        finally:
            if self.verifier.stream_ok is not None:
                self.totals.digest = "ok" if self.verifier.stream_ok else "mismatch"

    def _on_completed(self) -> None:
        self._emit_sample("completed", 0, 0.0, None, self.totals.rounds)

    # --- helpers ------------------------------------------------------------------------

    async def _sender_call(
        self, command: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """A sender command; a broken stream is reported with the receiver's reason."""
        assert self.sender is not None
        try:
            return await self.sender.call(command, args, timeout)
        except StreamError as exc:
            if self.receiver is None or exc.kind not in ("transport", "agent"):
                raise
            # A broken stream seen by the sender usually has its cause on the other
            # end (a frame refused, the receiver gone): name that cause if it comes.
            failure = await self.receiver.wait_failure(_PEER_REPORT_S)
            if failure is not None:
                raise failure from exc
            raise

    async def _carry_out(self, decision: Decision, src_log: EventRecorder) -> tuple[Outcome, str]:
        """Carry out what pagestream has a lever for; reject the rest, saying why.

        Guest RAM travels in pagestream's own stream, so QEMU's RAM-stream levers
        (throttle via auto-converge, xbzrle/multifd compression, post-copy) do not
        act on it: those intents are rejected, never reported as applied.
        """
        applied: list[str] = []
        rejected: list[str] = []
        # QEMU's own stream (device state, ~450 KB of ROM blocks) gets the same limits.
        qemu_too: list[Intent] = []
        for intent in decision.intents:
            match intent:
                case SetDowntimeLimit(ms=ms):
                    self.downtime_limit_ms = min(float(ms), self.max_downtime_ms)
                    qemu_too.append(intent)
                    applied.append(f"switchover planner limit {self.downtime_limit_ms:g} ms")
                case CapBandwidth(bytes_per_s=cap):
                    self.rate_limit = None if cap <= 0 or cap >= UNLIMITED_BANDWIDTH else cap
                    qemu_too.append(intent)
                    applied.append("sender pacing " + ("off" if self.rate_limit is None else
                                                       f"{cap / 2**20:.1f} MiB/s"))  # fmt: skip
                case SwitchoverNow():
                    self.switch_now = True
                    applied.append("switch over after this round")
                case AnnounceEarly():
                    await send_to_qemu(Decision(decision.time, "", (intent,)), self.source,
                                       self.target)  # fmt: skip
                    applied.append("target announce timing")
                case Throttle() | ArmAutoConverge():
                    rejected.append(
                        f"{intent.kind}: QEMU's auto-converge throttles only for its own RAM "
                        "stream, which pagestream replaces"
                    )
                case Compress() | SetXbzrleCache() | SetMultifd():
                    rejected.append(
                        f"{intent.kind}: pagestream compresses its own stream (zstd, tuned)"
                    )
                case ArmPostcopy() | StartPostcopy():
                    rejected.append(f"{intent.kind}: pagestream has no post-copy")
                case _:
                    rejected.append(f"{intent.kind}: not a pagestream lever")
        if qemu_too:
            await send_to_qemu(Decision(decision.time, "", tuple(qemu_too)), self.source,
                               self.target)  # fmt: skip
        if rejected:
            self.events.notice("pagestream: not applied: " + "; ".join(rejected))
        detail = "; ".join([*applied, *(f"rejected {r}" for r in rejected)])
        if not rejected:
            return Outcome.APPLIED, detail
        return (Outcome.PARTIAL if applied else Outcome.REJECTED), detail

    def _emit_sample(
        self, status: str, dirty_pages: int, scan_s: float, dirty_rate: float | None, round_no: int
    ) -> Sample:
        _transfer, downtime = self.planner.estimate(dirty_pages, scan_s)
        totals = self.totals
        sample = Sample(
            time=time.time(),
            elapsed_ms=(time.monotonic() - self.t0) * 1e3,
            status=status,
            ram_total_bytes=self.start.ram_bytes,
            ram_remaining_bytes=dirty_pages * PAGE_SIZE,
            ram_transferred_bytes=totals.stream_bytes,
            dirty_pages_rate=int(dirty_rate or 0),
            dirty_sync_count=round_no,
            mbps=totals.last_mbps,
            expected_downtime_ms=downtime,
            duplicate_pages=totals.zero_pages_skipped + totals.zero_pages_sent,
            normal_pages=totals.pages_sent,
        )
        self.samples.append(sample)
        self.events.emit(Progress(sample))
        return sample

    # --- the report ---------------------------------------------------------------------

    def _report(
        self, src_log: EventRecorder, tgt_log: EventRecorder, error: str | None = None
    ) -> MigrationReport:
        ram = self.final_info.get("ram") or {}
        at = self.started_at
        timeline = self._timeline(src_log)
        device_bytes = int(ram.get("transferred", 0))
        stream = self.totals.stats(
            self.tracker,
            self.tracker_reason,
            device_bytes,
            {name: (t - at) * 1e3 for name, t in self.marks.items()},
        )
        return self._base_report(
            src_log,
            "pagestream",
            error,
            timeline=timeline,
            # The VM was stopped by us, not by QEMU: the downtime is STOP -> RESUME.
            downtime_ms=timeline.stop_to_resume_ms,
            setup_time_ms=self.setup_ms,
            transferred_bytes=self.totals.stream_bytes + device_bytes,
            precopy_rounds=self.totals.rounds,
            stream=stream,
        )
