"""A migration run by the source node's agent: ``livemig migrate VM --to NODE``.

::

    CLI ──POST /v1/vms/VM/migrate──▶ source agent ──GET /v1/node──────────────▶ target agent
                                        │          ──POST /v1/vms/VM/incoming─▶ QEMU -incoming defer -S,
                                        │                                       QMP over TCP+TLS
                                        │          ══wss .../incoming/pagestream▶ pagestream receiver
                                        │                                       (its child; pagestream)
                                        │ engine (migrate.api.Migration): source QMP (local socket),
                                        │ target QMP (TCP+TLS), data path over TLS, RAM check
                                        │ through the target agent (ram/digest, page-hashes, pages)
                                        │          ──POST .../incoming/commit (or /discard)──▶
    CLI ◀──GET /v1/migrations/ID/events (JSON lines, the report last)

Preflight runs in the engine with both nodes' own facts: this node's CPU probe,
the target's CPU probe and free memory from its agent. The definition moves with
the VM: after success the target agent owns it and this node forgets it; after a
failure or an abort this node keeps it and the target agent drops its QEMU and the
definition. Both agents record the report in their metrics.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpumodel.errors import CpuModelError
from cpumodel.host import HostCpu
from dirtytrack.digest import RamDigest
from migrate.agent.app import AgentContext
from migrate.agent.client import AgentClient
from migrate.agent.routes_vm import encode_pages, manager
from migrate.agent.streamlink import AgentReceiver
from migrate.agent.vms import VmError
from migrate.api import Migration
from migrate.cluster.address import parse_address
from migrate.cluster.errors import ClusterError
from migrate.codec import from_dict
from migrate.deadline import within
from migrate.errors import ConfigError, LivemigError, PreflightError
from migrate.events import EventBus, Notice, PhaseChanged
from migrate.policy import Policy
from migrate.preflight import HostFacts
from migrate.progress import JsonLines
from migrate.remoteram import RemoteRam, decode_digest
from migrate.report import MigrationReport, new_migration_id
from migrate.request import HostEndpoint, MigrationRequest, QmpTcpAddress
from migrate.tls import MigrationTls

#: Deadline of one call to the target agent (RAM digests of a large guest included).
TARGET_CALL_TIMEOUT_S = 60.0
#: How long a finished migration's events stay available to followers.
KEEP_FINISHED_S = 600.0


@dataclasses.dataclass(frozen=True)
class MigrateOptions:
    """What the CLI asks for (``POST /v1/vms/NAME/migrate``)."""

    to: str
    strategy: str = "native"
    policy: Policy = dataclasses.field(default_factory=Policy)
    tls: bool = True
    verify: bool = True
    repair: bool = True
    force: bool = False
    predict: bool = True
    offline: bool = False

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> MigrateOptions:
        """Raises :class:`ConfigError` for unknown or ill-typed fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - names)
        if unknown:
            raise ConfigError(f"unknown migrate option(s): {', '.join(unknown)}")
        values = dict(body)
        if "policy" in values:
            try:
                values["policy"] = from_dict(Policy, values["policy"])
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"bad policy: {exc}") from None
        for flag in ("tls", "verify", "repair", "force", "predict", "offline"):
            if flag in values and not isinstance(values[flag], bool):
                raise ConfigError(f"{flag} must be true or false")
        if not isinstance(values.get("to"), str) or not isinstance(values.get("strategy", ""), str):
            raise ConfigError("to and strategy must be strings")
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        from migrate.codec import to_dict

        data: dict[str, Any] = to_dict(self)
        return data


class _Lines(io.StringIO):
    """A text stream (for :class:`JsonLines`) that hands each line to its run."""

    def __init__(self, run: MigrationRun) -> None:
        super().__init__()
        self.run = run
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self.run.add_line(line)
        return len(text)


class MigrationRun:
    """One migration this agent runs: its event lines (JSON), its handle, its end."""

    def __init__(self, migration_id: str, vm: str, options: MigrateOptions) -> None:
        self.id = migration_id
        self.vm = vm
        self.options = options
        self.lines: list[str] = []
        self.changed = asyncio.Event()
        self.finished = False
        self.finished_at: float | None = None
        self.handle: Migration | None = None
        self.abort_reason: str | None = None
        self.bus = EventBus(migration_id)
        self.json_lines = JsonLines(_Lines(self), final_by_caller=True)
        self.bus.add_callback(self.json_lines.handle)
        self.task: asyncio.Task[None] | None = None

    def add_line(self, line: str) -> None:
        self.lines.append(line)
        self.changed.set()

    def notice(self, message: str) -> None:
        self.add_line(
            json.dumps(
                {"migration_id": self.id, "event": "agent", "time": time.time(), "message": message}
            )
        )

    def finish(
        self, report: MigrationReport | None, error: str | None = None, code: int = 1
    ) -> None:
        if report is not None:
            self.json_lines.finish(report.to_dict())
        else:
            self.add_line(
                json.dumps(
                    {
                        "migration_id": self.id,
                        "event": "error",
                        "time": time.time(),
                        "error": error or "failed",
                        "exit_code": code,
                    }
                )
            )
        self.finished = True
        self.finished_at = time.monotonic()
        self.changed.set()

    def abort(self, reason: str) -> bool:
        """Ask the migration to stop (the VM stays on the source); whether it still ran."""
        if self.finished:
            return False
        self.abort_reason = reason
        if self.handle is not None and self.handle.started:
            self.handle.abort(reason)
        elif self.task is not None:
            self.task.cancel()
        return True

    async def follow(self, start: int = 0) -> Any:
        """Yield each line from ``start`` on; ``None`` every 5 s of silence (keep-alive)."""
        index = start
        while True:
            while index < len(self.lines):
                yield self.lines[index]
                index += 1
            if self.finished:
                return
            self.changed.clear()
            try:
                await within(self.changed.wait(), 5.0)
            except TimeoutError:
                yield None


def migrations(ctx: AgentContext) -> dict[str, MigrationRun]:
    runs = ctx.services.setdefault("migrations", {})
    assert isinstance(runs, dict)
    now = time.monotonic()
    for key in [
        k for k, r in runs.items() if r.finished_at and now - r.finished_at > KEEP_FINISHED_S
    ]:
        runs.pop(key, None)
    return runs


def start_migration(ctx: AgentContext, vm: str, options: MigrateOptions) -> MigrationRun:
    """Check what can be checked now, then run the migration in a task. Raises
    :class:`VmError` (unknown VM, not running, busy, unknown or same node)."""
    vms = manager(ctx)
    vms.definition(vm)
    if vm in vms.migrating:
        raise VmError(f"VM {vm!r} is already being migrated")
    if vms.alive(vm) is None:
        raise VmError(f"VM {vm!r} is not running on node {vms.node!r}")
    if options.to == ctx.identity.name:
        raise VmError(f"VM {vm!r} already runs on node {options.to!r}", 400)
    members = {m.name: m for m in ctx.state.members()}
    if options.to not in members:
        raise VmError(f"no node {options.to!r} in the cluster ({', '.join(sorted(members))})", 404)
    run = MigrationRun(new_migration_id(), vm, options)
    vms.migrating[vm] = "source"
    migrations(ctx)[run.id] = run
    run.task = asyncio.get_running_loop().create_task(_run(ctx, run, members[options.to].address))
    return run


def _host_cpu(cpu: Any) -> HostCpu | None:
    host = cpu.get("host") if isinstance(cpu, dict) else None
    if not isinstance(host, dict):
        return None
    try:
        return HostCpu.from_dict(host)
    except (CpuModelError, ValueError, TypeError, KeyError):
        return None


def _remote_ram(client: AgentClient, address: str, vm: str) -> RemoteRam:
    base = f"/v1/vms/{vm}/ram"

    async def digest() -> RamDigest:
        return decode_digest(await client.get_json(address, f"{base}/digest"))

    async def page_hashes(pages: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
        reply = await client.post_json(
            address, f"{base}/page-hashes", {"pages": encode_pages(pages)}
        )
        raw = base64.b64decode(str(reply.get("hashes", "")), validate=True)
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64)

    async def write_pages(pages: npt.NDArray[np.intp], data: bytes) -> None:
        body = {"pages": encode_pages(pages), "data": base64.b64encode(data).decode()}
        await client.post_json(address, f"{base}/pages", body)

    return RemoteRam(digest, page_hashes, write_pages)


async def _run(ctx: AgentContext, run: MigrationRun, address: str) -> None:
    vms = manager(ctx)
    vm, options = run.vm, run.options
    report: MigrationReport | None = None
    prepared = False
    try:
        async with AgentClient(ctx.state, timeout_s=TARGET_CALL_TIMEOUT_S) as client:
            try:
                run.notice(f"asking node {options.to} ({address}) for its CPU and memory")
                node = await client.get_json(address, "/v1/node")
                definition = vms.definition(vm)
                source_run = vms.alive(vm)
                if source_run is None:
                    raise VmError(f"VM {vm!r} stopped")
                prep = await client.post_json(
                    address, f"/v1/vms/{vm}/incoming",
                    {"definition": definition.to_dict(), "source": ctx.identity.name},
                )  # fmt: skip
                prepared = True
                run.notice(
                    f"node {options.to} started the target QEMU (QMP tls:{prep['qmp_host']}:"
                    f"{prep['qmp_port']}, migration {prep['migration_uri']})"
                )
                creds = vms.creds()
                target_host = parse_address(address).host
                memory = node.get("memory") if isinstance(node, dict) else None
                request = MigrationRequest(
                    source=HostEndpoint(
                        f"{ctx.identity.name} (source)", Path(source_run.qmp_socket)
                    ),
                    target=HostEndpoint(
                        f"{options.to} (target)",
                        migration_uri=str(prep["migration_uri"]),
                        qmp_tcp=QmpTcpAddress(str(prep["qmp_host"]), int(prep["qmp_port"]), creds),
                    ),
                    strategy=options.strategy,
                    policy=options.policy,
                    offline=options.offline,
                    verify=options.verify,
                    repair=options.repair,
                    force=options.force,
                    predict=options.predict,
                    quit_source=True,
                    cpu_model=definition.cpu_model,
                    vm=vm,
                    source_host=HostFacts(cpu=_host_cpu(ctx.cpu)),
                    target_host=HostFacts(
                        cpu=_host_cpu(node.get("cpu") if isinstance(node, dict) else None),
                        available_memory=(
                            int(memory["available_bytes"]) if isinstance(memory, dict) else None
                        ),
                    ),
                    migration_id=run.id,
                    tls=(
                        MigrationTls(
                            vms.tls_dir(vm),
                            Path(str(prep["tls_dir"])),
                            target_host,
                            source_name=ctx.identity.name,
                        )
                        if options.tls
                        else None
                    ),
                    target_ram=_remote_ram(client, address, vm),
                    target_receiver=AgentReceiver.factory(client, address, vm),
                )
                run.handle = Migration(request, events=run.bus, abort_grace_s=2.0)
                run.handle.add_callback(lambda event: _log_event(ctx, run, event))
                if run.abort_reason is not None:
                    raise asyncio.CancelledError
                await run.handle.start()
                report = await run.handle.wait()
            finally:
                await _settle(ctx, client, address, run, report, prepared)
    except asyncio.CancelledError:
        run.finish(report, f"migration aborted before it started: {run.abort_reason}", 4)
    except PreflightError as exc:
        run.finish(None, f"{exc}: {'; '.join(exc.reasons)}", 3)
    except (LivemigError, ClusterError, KeyError, ValueError, TypeError) as exc:
        ctx.log.warning("migration %s of %s to %s failed: %s", run.id, vm, options.to, exc)
        run.finish(report, str(exc), 1)
    else:
        run.finish(report)
    finally:
        vms.migrating.pop(vm, None)
        if report is not None:
            ctx.metrics.record_report(report)
            ctx.log.info("migration %s of %s to %s: %s", run.id, vm, options.to, report.status)


def _log_event(ctx: AgentContext, run: MigrationRun, event: object) -> None:
    if isinstance(event, PhaseChanged):
        ctx.log.info("migration %s: phase %s", run.id[:8], event.phase.value)
    elif isinstance(event, Notice):
        ctx.log.info("migration %s: %s", run.id[:8], event.message)


async def _settle(
    ctx: AgentContext,
    client: AgentClient,
    address: str,
    run: MigrationRun,
    report: MigrationReport | None,
    prepared: bool,
) -> None:
    """Move the definition with the VM (completed), or drop the target (anything else)."""
    vms = manager(ctx)
    vm = run.vm
    body = {"report": report.to_dict() if report is not None else None}
    if report is not None and report.status == "completed":
        await client.post_json(address, f"/v1/vms/{vm}/incoming/commit", body)
        vms.migrating.pop(vm, None)
        async with vms.lock(vm):
            await vms.forget(vm)
        run.notice(f"VM {vm} is owned by node {run.options.to} now")
        return
    if not prepared:
        return
    try:
        await client.post_json(
            address, f"/v1/vms/{vm}/incoming/discard", {**body, "reason": "migration not completed"}
        )
    except ClusterError as exc:
        ctx.log.error("VM %s: the target's incoming QEMU was not discarded: %s", vm, exc)
        run.notice(f"the target node could not drop its incoming QEMU: {exc}")
    else:
        run.notice(f"node {run.options.to} dropped its incoming QEMU; VM {vm} stays here")
