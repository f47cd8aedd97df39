"""The ``pagestream`` strategy: livemig's own pre-copy of guest RAM; QEMU moves device state.

Both QEMUs keep guest RAM in ``memory-backend-file,share=on`` files. A sender
agent on the source host scans the source RAM file for dirty pages (a
:mod:`dirtytrack` tracker), captures and zstd-compresses them and streams them to
a receiver agent on the target host, which writes them into the target RAM file
(:mod:`migrate.pagestream.protocol`). Rounds repeat until the dirty set is small
enough for the policy's downtime limit (:mod:`migrate.pagestream.planner`); then::

    stop → migrate (x-ignore-shared: QEMU sends only its ~450 KB of non-shared RAM,
    then waits: pause-before-switchover) ‖ final scan + delta → receiver: "applied"
    → migrate-continue (device state) → target loaded → digests agree → cont

The stream's final digest (source RAM at stop vs target RAM after the last
round, computed by the agents while QEMU loads device state) must hold before
``cont``; otherwise the VM goes back to the source
(:func:`~migrate.strategy.finish_on_target`, :func:`~migrate.strategy.rollback`).
The engine's own comparison of both RAM files (``engine_compare``) repeats that
check after the device-state load, at the cost of two more passes over RAM in
the downtime; on a digest mismatch it is used anyway, to name the pages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from dirtytrack.ram import PAGE_SIZE
from dirtytrack.trackers import TrackerKind
from migrate.control.base import UNLIMITED_BANDWIDTH, ControlContext, Controller
from migrate.errors import ConfigError, MigrationAborted, MigrationError, QemuError, StreamError
from migrate.events import DecisionMade, EventBus, Progress
from migrate.integrity import IntegrityResult, RamComparison
from migrate.pagestream.control import AgentProcess, AgentRole
from migrate.pagestream.planner import (
    DEFAULT_FIXED_DOWNTIME_MS,
    SwitchoverPlanner,
    SwitchoverVerdict,
)
from migrate.pagestream.receiver import FaultPlan
from migrate.pagestream.tuning import level_label
from migrate.phase import Phase
from migrate.qmp import EventRecorder, QmpSession, migration_status_is
from migrate.report import (
    Decision,
    Integrity,
    MigrationReport,
    Sample,
    StreamStats,
)
from migrate.strategy import (
    MigrationRequest,
    StartState,
    StrategyRun,
    apply_decision,
    check_start,
    finish_on_target,
    ram_backing_file,
    set_capabilities,
    start_incoming,
)

_TCP_URI: Final = re.compile(r"^tcp:(?P<host>\[[0-9a-fA-F:]+\]|[^:\s\[\]]+):(?P<port>\d+)$")
#: xxh3 chunk digests of RAM, bytes/s on one core here (~9 ms per 256 MiB).
DIGEST_BYTES_PER_S: Final = 25e9
#: How long a sender error waits for the receiver to report the cause (seconds).
_PEER_REPORT_S: Final = 2.0
#: Commands that only make sense for QEMU's RAM stream, which pagestream replaces.
_NOT_APPLICABLE: Final = frozenset({"migrate-set-capabilities", "migrate-start-postcopy"})


@dataclass(frozen=True)
class PagestreamOptions:
    """How the stream runs; the defaults are what ``--strategy pagestream`` uses.

    ``tracker`` is a preference order (None: the sender's, soft-dirty → shadow
    diff if half the host's available memory holds a copy of guest RAM → page
    digests, by probe). ``start_level`` is the first zstd level (None: raw); the
    sender adapts it. ``engine_compare`` adds the engine's own comparison of
    both RAM files after the device-state load (where it can map them) to the
    stream digest. ``receiver_fault`` injects faults in the receiver (tests).
    ``log_dir`` keeps the agents' stderr. Timeouts in s.
    """

    tracker: tuple[TrackerKind, ...] | None = None
    max_threads: int = 2
    start_level: int | None = 1
    batch_pages: int | None = None
    fixed_downtime_ms: float = DEFAULT_FIXED_DOWNTIME_MS
    engine_compare: bool = False
    receiver_fault: FaultPlan = field(default_factory=FaultPlan)
    log_dir: Path | None = None
    setup_timeout_s: float = 120.0
    switchover_timeout_s: float = 60.0


def stream_host(migration_uri: str) -> str:
    """The address the page stream uses: the host of a ``tcp:HOST:PORT`` URI.

    Raises :class:`ConfigError` for other URIs (the page stream needs TCP).
    """
    match = _TCP_URI.match(migration_uri)
    if match is None:
        raise ConfigError(
            f"pagestream needs a tcp:HOST:PORT migration URI, not {migration_uri!r} "
            "(its page stream listens on HOST, next to QEMU's device-state stream)"
        )
    return match.group("host").strip("[]")


class PagestreamStrategy:
    """Pre-copy with livemig's own page stream; see the module docstring."""

    name = "pagestream"

    def __init__(self, options: PagestreamOptions | None = None) -> None:
        self.options = options or PagestreamOptions()

    async def run(
        self,
        request: MigrationRequest,
        source: QmpSession,
        target: QmpSession,
        controller: Controller,
        events: EventBus,
    ) -> MigrationReport:
        """Migrate; return the report, or raise :class:`MigrationError` carrying it.

        Raises :class:`ConfigError` before anything changes if either VM's RAM is
        not in a shared memory-backend-file or the URI is not TCP. On any failure
        or cancellation later the VM is left running on the source (if it was
        running), the target QEMU is told to quit and both agents are ended.
        """
        start = await check_start(source, target, request)
        source_ram, target_ram = await ram_backing_file(source), await ram_backing_file(target)
        missing = [
            side for side, ram in (("source", source_ram), ("target", target_ram)) if ram is None
        ]
        if missing or source_ram is None or target_ram is None:
            raise ConfigError(
                f"pagestream needs guest RAM in a shared file on both sides "
                f"(memory-backend-file,share=on); the {' and '.join(missing)} VM has none"
            )
        host = stream_host(request.migration_uri)
        run = _PagestreamRun(
            request, source, target, controller, events, start, self.options,
            source_ram, target_ram, host,
        )  # fmt: skip
        return await run.execute()


@dataclass
class _StreamTotals:
    rounds: int = 0
    pages_sent: int = 0
    zero_pages_sent: int = 0
    raw_bytes: int = 0
    payload_bytes: int = 0
    stream_bytes: int = 0
    scan_ms: float = 0.0
    batches_by_level: dict[str, int] = field(default_factory=dict)
    final_level: str = ""
    threads: int = 1
    final_round_pages: int = 0
    final_scan_ms: float = 0.0
    final_round_ms: float = 0.0
    zero_pages_skipped: int = 0
    digest: str = "not received"
    last_mbps: float = 0.0

    def add_round(self, stats: dict[str, Any]) -> None:
        self.rounds += 1
        self.pages_sent += int(stats["data_pages"])
        self.zero_pages_sent += int(stats["zero_pages"])
        self.raw_bytes += int(stats["raw_bytes"])
        self.payload_bytes += int(stats["payload_bytes"])
        self.stream_bytes += int(stats["wire_bytes"])
        self.threads = max(self.threads, int(stats["threads"]))
        for label, batches in dict(stats["batches_by_level"]).items():
            self.batches_by_level[label] = self.batches_by_level.get(label, 0) + int(batches)
        self.final_level = level_label(stats["level"])
        duration = float(stats["duration_s"])
        if duration > 0:
            self.last_mbps = int(stats["wire_bytes"]) * 8 / duration / 1e6


class _StreamVerifier:
    """The integrity check before ``cont``: the stream's digest, then (optionally)
    the engine's own comparison of both RAM files."""

    def __init__(
        self,
        receiver: AgentProcess,
        comparison: RamComparison | None,
        files: tuple[Path, Path],
        timeout_s: float,
    ) -> None:
        self.receiver = receiver
        self.comparison = comparison
        self.files = files
        self.timeout_s = timeout_s
        self.stream_ok: bool | None = None

    async def compare(self, repair: bool = False) -> IntegrityResult:
        verdict = await self.receiver.wait_event("verified", self.timeout_s)
        self.stream_ok = bool(verdict["ok"])
        mib = int(verdict["ram_bytes"]) >> 20
        if not self.stream_ok:
            ranges = ", ".join(
                f"pages {chunk['first_page']}-{chunk['last_page']}" for chunk in verdict["named"]
            )
            detail = (
                f"pagestream digest mismatch: {verdict['differing_chunks']} of "
                f"{verdict['chunks']} chunks of target RAM differ from the source at stop "
                f"({ranges})"
            )
            exact = await self._name_pages()
            if exact is None:
                return IntegrityResult(Integrity.FAILED, detail)
            return IntegrityResult(
                Integrity.FAILED, f"{detail}; engine comparison: {exact.detail}",
                exact.differing_pages,
            )  # fmt: skip
        if self.comparison is None:
            return IntegrityResult(
                Integrity.OK,
                f"{mib} MiB of RAM identical (pagestream digest: source at stop against "
                "target after the final round, xxh3)",
            )
        result = await self.comparison.compare(repair=repair)
        return dataclasses.replace(result, detail=f"{result.detail}; pagestream digest ok")

    async def _name_pages(self) -> IntegrityResult | None:
        """The engine's comparison, to name the differing pages (never repairs: a
        stream that delivered wrong pages is not trusted); None where the engine
        cannot map both files."""
        if self.comparison is not None:
            return await self.comparison.compare(repair=False)
        comparison = RamComparison(*self.files)
        try:
            result = await comparison.compare(repair=False)
        finally:
            await comparison.close()
        return None if result.integrity is Integrity.UNCHECKED else result


class _PagestreamRun(StrategyRun):
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
        self.setup_ms: float | None = None
        self.sender: AgentProcess | None = None
        self.receiver: AgentProcess | None = None
        self.verifier: _StreamVerifier | None = None
        self.totals = _StreamTotals()
        self.tracker = ""
        self.tracker_reason = ""
        self.running = start.was_running
        policy = request.policy
        self.max_downtime_ms = policy.max_downtime_ms
        self.downtime_limit_ms = min(policy.downtime_limit_ms, policy.max_downtime_ms)
        self.rate_limit: float | None = None
        self.rate_limit_sent: float | None = None
        # The digests before cont read all of RAM once (in parallel on both hosts).
        verify_ms = start.ram_bytes / DIGEST_BYTES_PER_S * 1e3
        self.planner = SwitchoverPlanner(fixed_downtime_ms=options.fixed_downtime_ms + verify_ms)
        self._fault_events_seen = 0
        self.marks: dict[str, float] = {}  # switchover steps, realtime seconds

    async def _stop_data_plane(self) -> None:
        await self._close_agents()

    async def _close_agents(self) -> None:
        for agent in (self.sender, self.receiver):
            if agent is not None:
                await agent.close()

    # --- the migration ------------------------------------------------------------------

    async def _migrate(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        request, source, target = self.request, self.source, self.target
        setup_began = time.monotonic()
        if request.offline and self.running:
            await source.execute("stop")
            self.running = False
        # Before migrate/migrate-incoming, on both sides: QEMU's stream skips shared RAM.
        await set_capabilities((source, target), {"events": True, "x-ignore-shared": True})
        # The source stops short of device state until pagestream's final round is in.
        await set_capabilities((source,), {"pause-before-switchover": True})
        context = ControlContext(ram_bytes=self.start.ram_bytes, started_monotonic=self.t0)
        for decision in self.controller.start(context):
            await self._apply(decision)
        if request.verify and self.options.engine_compare:
            self.comparison = RamComparison(self.source_ram, self.target_ram)
            self.comparison.prepare()
        await self._start_agents()
        # The target listens for device state now, outside the downtime.
        await start_incoming(target, request.migration_uri)
        if self.comparison is not None:
            await self.comparison.ready()
        self.setup_ms = (time.monotonic() - setup_began) * 1e3
        self.started_at, self.t0 = time.time(), time.monotonic()
        self.phase.advance(Phase.PRECOPY)
        await self._precopy()
        self.phase.advance(Phase.SWITCHOVER)
        await self._switchover(src_log, tgt_log)
        self.phase.advance(Phase.COMPLETED)
        self._emit_sample("completed", 0, 0.0, None, self.totals.rounds)
        if request.quit_source:
            with contextlib.suppress(QemuError):  # QEMU may drop QMP while quitting
                await source.execute("quit")

    async def _start_agents(self) -> None:
        options, request = self.options, self.request
        session = base64.b64encode(secrets.token_bytes(16)).decode()
        log_dir = options.log_dir
        self.receiver = AgentProcess(
            AgentRole.RECEIVER,
            request.target.netns,
            log_dir / "pagestream-receiver.log" if log_dir else None,
        )
        self.sender = AgentProcess(
            AgentRole.SENDER,
            request.source.netns,
            log_dir / "pagestream-sender.log" if log_dir else None,
        )
        await self.receiver.start()
        await self.sender.start()
        listen = await self.receiver.call(
            "listen",
            {
                "ram_path": str(self.target_ram),
                "host": self.host,
                "port": 0,
                "session": session,
                "fault": dataclasses.asdict(options.receiver_fault),
            },
            timeout=options.setup_timeout_s,
        )
        args: dict[str, Any] = {
            "ram_path": str(self.source_ram),
            "host": self.host,
            "port": int(listen["port"]),
            "session": session,
            "max_threads": options.max_threads,
            "start_level": options.start_level,
            "rate_limit_bytes_per_s": self.rate_limit,
        }
        if options.tracker is not None:
            args["tracker"] = [kind.value for kind in options.tracker]
        if options.batch_pages is not None:
            args["batch_pages"] = options.batch_pages
        opened = await self._sender_call("open", args, timeout=options.setup_timeout_s)
        self.rate_limit_sent = self.rate_limit
        self.tracker = str(opened["tracker"])
        self.tracker_reason = str(opened["tracker_reason"])
        self.events.notice(f"pagestream: {self.tracker_reason}")

    async def _precopy(self) -> None:
        if self.running:
            # Before the bulk sweep: all of RAM is still to go (controllers skip this).
            self._emit_sample("setup", self.start.ram_bytes // PAGE_SIZE, 0.0, None, 0)
        while self.running:
            args: dict[str, Any] = {}
            if self.rate_limit != self.rate_limit_sent:
                args["rate_limit_bytes_per_s"] = self.rate_limit
                self.rate_limit_sent = self.rate_limit
            stats = await self._sender_call("sweep", args)
            self._add_round(stats)
            found, scan_s = int(stats["pages"]), float(stats["scan_s"])
            self.planner.record_round(found, float(stats["compress_wait_s"] + stats["send_wait_s"]))
            # What the next sweep will find is estimated by what this one found.
            sample = self._emit_sample(
                "active", found, scan_s, stats.get("dirty_pages_per_s"), self.totals.rounds
            )
            for decision in self.controller.on_sample(sample):
                await self._apply(decision)
            verdict = self.planner.decide(
                found, scan_s, self.downtime_limit_ms, self.max_downtime_ms
            )
            self._notice_faults()
            if verdict.switch:
                self._record_switch(verdict)
                return

    def _add_round(self, stats: dict[str, Any]) -> None:
        self.totals.add_round(stats)
        self.totals.scan_ms += float(stats["scan_s"]) * 1e3
        if self.totals.rounds == 1:
            # The first sweep runs against zero RAM: what it did not find is zero.
            self.totals.zero_pages_skipped = self.start.ram_bytes // PAGE_SIZE - int(stats["pages"])

    def _record_switch(self, verdict: SwitchoverVerdict) -> None:
        decision = Decision(time.time(), "switchover", f"pagestream: {verdict.reason}")
        self.decisions.append(decision)
        self.events.emit(DecisionMade(decision))

    async def _switchover(self, src_log: EventRecorder, tgt_log: EventRecorder) -> None:
        assert self.sender is not None and self.receiver is not None
        request, source = self.request, self.source
        timeout = self.options.switchover_timeout_s
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
        self._add_round(stats)
        self.totals.final_round_pages = int(stats["pages"])
        self.totals.final_scan_ms = float(stats["scan_s"]) * 1e3
        self.totals.final_round_ms = float(stats["duration_s"]) * 1e3
        self._emit_sample(
            "device", int(stats["pages"]), float(stats["scan_s"]), None, self.totals.rounds
        )
        self._notice_faults()
        done = await src_log.wait_for(
            "MIGRATION", migration_status_is("completed", "failed", "cancelled"), timeout
        )
        self.final_info = await source.execute("query-migrate")
        if done is None or self.final_info.get("status") != "completed":
            reason = self.final_info.get("error-desc") or (
                f"QEMU's device-state migration ended {self.final_info.get('status')!r}"
            )
            raise MigrationError(str(reason))
        self.verifier = _StreamVerifier(
            self.receiver, self.comparison, (self.source_ram, self.target_ram), timeout
        )
        try:
            await finish_on_target(
                self.switchover, self.target, tgt_log, self.verifier, request.hooks,
                request.repair, timeout,
            )  # fmt: skip
        finally:
            if self.verifier.stream_ok is not None:
                self.totals.digest = "ok" if self.verifier.stream_ok else "mismatch"
            self._notice_faults()

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

    def _notice_faults(self) -> None:
        if self.receiver is None:
            return
        faults = [e for e in self.receiver.events if e.get("event") == "fault"]
        for fault in faults[self._fault_events_seen :]:
            self.events.notice(
                f"pagestream receiver fault injection: page {fault['page']}: {fault['what']}"
            )
        self._fault_events_seen = len(faults)

    async def _apply(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if decision.action == "abort":
            self.events.emit(DecisionMade(decision))
            raise MigrationAborted(decision.reason)
        if decision.command in _NOT_APPLICABLE:
            self.events.emit(DecisionMade(decision))
            self.events.notice(
                f"pagestream: {decision.command} not applied (guest RAM travels in "
                "pagestream's own stream, not QEMU's)"
            )
            return
        if decision.command == "migrate-set-parameters" and decision.side in ("source", "both"):
            arguments = decision.arguments
            if "downtime-limit" in arguments:
                self.downtime_limit_ms = min(
                    float(arguments["downtime-limit"]), self.max_downtime_ms
                )
            if "max-bandwidth" in arguments:
                cap = float(arguments["max-bandwidth"])
                self.rate_limit = None if cap <= 0 or cap >= UNLIMITED_BANDWIDTH else cap
        await apply_decision(decision, self.source, self.target, self.events)

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
        totals = self.totals
        stream = StreamStats(
            tracker=self.tracker,
            tracker_reason=self.tracker_reason,
            rounds=totals.rounds,
            pages_sent=totals.pages_sent,
            zero_pages_sent=totals.zero_pages_sent,
            zero_pages_skipped=totals.zero_pages_skipped,
            raw_bytes=totals.raw_bytes,
            payload_bytes=totals.payload_bytes,
            stream_bytes=totals.stream_bytes,
            device_state_bytes=device_bytes,
            compression_ratio=(
                totals.raw_bytes / totals.payload_bytes if totals.payload_bytes else 1.0
            ),
            zstd_batches=dict(totals.batches_by_level),
            final_level=totals.final_level,
            compress_threads=totals.threads,
            scan_ms_total=totals.scan_ms,
            final_round_pages=totals.final_round_pages,
            final_scan_ms=totals.final_scan_ms,
            final_round_ms=totals.final_round_ms,
            digest=totals.digest,
            switchover_ms={name: (t - at) * 1e3 for name, t in self.marks.items()},
        )
        return self._base_report(
            src_log,
            "pagestream",
            error,
            timeline=timeline,
            # The VM was stopped by us, not by QEMU: the downtime is STOP -> RESUME.
            downtime_ms=timeline.stop_to_resume_ms,
            setup_time_ms=self.setup_ms,
            transferred_bytes=totals.stream_bytes + device_bytes,
            precopy_rounds=totals.rounds,
            stream=stream,
        )
